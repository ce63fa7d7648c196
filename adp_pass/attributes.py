"""Module attributes by dotted name: where one lives, and setting one (creating the
submodules on the way). Shared by capture (parameters lifted out of the graph's inputs), rewrite
(full parameters under every alias) and the weight loader."""

from __future__ import annotations

import torch


def owner_of(root: torch.nn.Module, dotted: str) -> tuple[torch.nn.Module, str]:
    """The submodule holding attribute ``dotted`` and the attribute's own name."""
    path, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def set_attr(root: torch.nn.Module, dotted: str, tensor: torch.Tensor, persistent: bool) -> None:
    """Register ``tensor`` as parameter or buffer ``dotted`` of ``root``."""
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        if not isinstance(getattr(module, part, None), torch.nn.Module):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if isinstance(tensor, torch.nn.Parameter):
        module.register_parameter(leaf, tensor)
    else:
        module.register_buffer(leaf, tensor, persistent=persistent)
