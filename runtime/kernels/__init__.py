"""Triton kernels for Qwen3 decoder layers, registered as ``torch.ops.adp.*`` custom ops.

Importing this package registers the ops (and their fake implementations for tracing).
See docs/kernels.md for numerics and testing notes.
"""

# adp_pass.runtime (imported first) picks Triton's interpreter when there is no GPU.
from .add_rms_norm import add_rms_norm
from .qk_norm_rope import build_cos_sin_cache, qk_norm_rope
from .rms_norm import rms_norm
from .silu_mul import silu_mul, silu_mul_fused

__all__ = [
    "add_rms_norm",
    "build_cos_sin_cache",
    "qk_norm_rope",
    "rms_norm",
    "silu_mul",
    "silu_mul_fused",
]
