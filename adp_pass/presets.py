"""Presets: published checkpoints' shapes and small test shapes, of every model family.

The presets themselves live with their family (``adp_pass/families/<family>.py``); this module
gathers them: ``PRESETS`` (name -> :class:`PresetShape`) and ``model_config(name)``, the family's
transformers config. ``qwen3_config`` is the name earlier versions had (Qwen3 only); it is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adp_pass.errors import UsageError
from adp_pass.families import PresetShape, all_presets, family_of

if TYPE_CHECKING:  # transformers is imported on use: `adp --help` must not pay for it
    from transformers import PretrainedConfig, Qwen3Config

# Earlier name of the shape class (every field as before; ``family`` defaults to "qwen3").
Qwen3Shape = PresetShape


class UnknownPreset(UsageError, KeyError):
    """A preset name that is not in PRESETS."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


PRESETS: dict[str, PresetShape] = all_presets()
# FP8 test shape (docs/fp8.md): every rank's part of q/k/v/o and gate/up/down is whole 128 x 128
# scale tiles at tp 2 and 4, attention and MLP split alike: at tp 4 q and o hold 256 rows /
# columns (8 heads x 128 / 4), k and v 128 rows (4 kv heads x 128 / 4), gate/up/down 128 of the
# 512 intermediate. The rest is small for the CPU tests: 2 layers, hidden 192 (a partial tile
# along the input dim), vocab 256.
PRESETS["fp8-tiny"] = PresetShape(192, 2, 8, 4, 512, head_dim=128, vocab_size=256,
                                  max_position_embeddings=512, rope_theta=10_000.0,
                                  family="qwen3")


def _shape(preset: str | PresetShape) -> PresetShape:
    if isinstance(preset, PresetShape):
        return preset
    if preset not in PRESETS:
        raise UnknownPreset(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}",
                            flag="--preset")
    return PRESETS[preset]


def preset_depth(preset: str | PresetShape, layers: int | None = None) -> int:
    """The decoder layers a preset is served with: all of them, or its first ``layers`` (the
    benches' and ``adp quantize``'s depth-cut models). ValueError naming the preset's depth for
    a ``layers`` outside 1..that; each caller words it for its own flag or field."""
    depth = _shape(preset).num_hidden_layers
    if layers is not None and not 1 <= layers <= depth:
        raise ValueError(f"preset {preset} has {depth} decoder layers")
    return depth if layers is None else layers


def model_config(preset: str | PresetShape, **overrides) -> "PretrainedConfig":
    """The transformers config of a preset name (or shape) of any family, with overrides applied:
    ``Qwen3Config`` for "tiny", ``LlamaConfig`` for "llama-tiny", ``Qwen2Config`` for
    "qwen2-tiny", ... (default rope, no KV cache, SDPA attention)."""
    shape = _shape(preset)
    return family_of(shape).make_config(shape, **overrides)


def qwen3_config(preset: str | PresetShape, **overrides) -> "Qwen3Config":
    """A transformers ``Qwen3Config`` for a Qwen3 preset name (or shape), with overrides applied.

    Kept for callers of earlier versions; a preset of another family gives that family's config
    (as :func:`model_config` does), so a caller handed any preset name builds the right model."""
    return model_config(preset, **overrides)


__all__ = ["PRESETS", "PresetShape", "Qwen3Shape", "UnknownPreset", "model_config",
           "preset_depth", "qwen3_config"]
