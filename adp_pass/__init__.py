"""adp-pass: turn tensor-parallel Qwen3 graphs into attention-data-parallel form.

capture (TP graph) -> detect (plain-data plan) -> rewrite (execute the plan) -> lower (Triton
ops) -> execute per rank, sequenced by ``Pipeline`` (adp_pass/pipeline.py). See docs/design.md.
"""

import importlib
import os
import sys

from adp_pass.errors import AdpError, RewriteError, UsageError


# Without a GPU, Triton kernels run only through Triton's interpreter, which Triton picks when
# it is imported and each @triton.jit function is defined. Deciding needs torch (is there a
# GPU?), but importing torch here would make every ``adp`` command, even ``--help``, pay seconds
# for it. So the decision is made just before Triton's first import (AOTAutograd imports it),
# by a one-shot import hook; if Triton is already imported it is made now, as before.
def _pick_triton_mode() -> None:
    import torch

    try:
        has_gpu = torch.cuda.is_available()
    except AttributeError:  # Triton imported while torch itself is importing: a GPU build
        return
    if not has_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")


class _BeforeTriton:
    """Meta-path finder that only watches for ``triton``; it never finds anything itself."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton":
            sys.meta_path.remove(self)
            _pick_triton_mode()
        return None


if "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        _pick_triton_mode()
    elif not any(isinstance(f, _BeforeTriton) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTriton())

# Public names, imported on first use (PEP 562) so that ``import adp_pass`` stays cheap. The
# stage functions named like their modules (capture, detect, rewrite) are imported from those
# modules: importing ``adp_pass.detect`` binds the module on the package under that name.
_LAZY = {
    "CapturedGraph": "adp_pass.capture",
    "capture_hf": "adp_pass.capture",
    "fake_process_group": "adp_pass.capture",
    "DetectError": "adp_pass.detect",
    "GraphRecord": "adp_pass.graph_record",
    "RewriteReport": "adp_pass.graph_record",
    "Mapping": "adp_pass.mapping",
    "MappingError": "adp_pass.mapping",
    "NotSupportedYet": "adp_pass.mapping",
    "Pipeline": "adp_pass.pipeline",
    "StageReport": "adp_pass.pipeline",
    "ParamSpec": "adp_pass.plan",
    "Plan": "adp_pass.plan",
    "ShapeFix": "adp_pass.plan",
    "Site": "adp_pass.plan",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adp_pass' has no attribute {name!r}")


__all__ = ["AdpError", "RewriteError", "UsageError", *_LAZY]
