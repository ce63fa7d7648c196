"""adp-pass: turn tensor-parallel Qwen3 graphs into attention-data-parallel form.

capture (TP graph) -> detect (plain-data plan) -> rewrite (execute the plan) -> lower (Triton
ops) -> execute per rank. See docs/design.md.
"""

import os

import torch

# Without a GPU, Triton kernels run only through Triton's interpreter, which Triton picks when
# it is imported and each @triton.jit function is defined; the imports below (AOTAutograd)
# already import Triton. So choose here, first, unless the user decided already.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from adp_pass.capture import CapturedGraph, capture, capture_hf_qwen3, fake_process_group
from adp_pass.detect import DetectError, detect
from adp_pass.mapping import Mapping, MappingError, NotSupportedYet
from adp_pass.plan import ParamSpec, Plan, ShapeFix, Site
from adp_pass.rewrite import RewriteError, rewrite

__all__ = [
    "CapturedGraph",
    "DetectError",
    "Mapping",
    "MappingError",
    "NotSupportedYet",
    "ParamSpec",
    "Plan",
    "RewriteError",
    "ShapeFix",
    "Site",
    "capture",
    "capture_hf_qwen3",
    "detect",
    "fake_process_group",
    "rewrite",
]
