"""Triton kernels for Qwen3 decoder layers, registered as ``torch.ops.adp.*`` custom ops.

Importing this package registers the ops (and their fake implementations for tracing).
See docs/kernels.md for numerics and testing notes.
"""

# adp_pass.runtime (imported first) picks Triton's interpreter when there is no GPU.
from .add_rms_norm import add_rms_norm
from .fp8_gemm import fp8_block_linear, fp8_block_linear_quantized
from .fp8_quant import add_rms_norm_fp8, fp8_quant_groups, rms_norm_fp8, silu_mul_fp8
from .qk_norm_rope import build_cos_sin_cache, qk_norm_rope
from .rms_norm import rms_norm
from .silu_mul import silu_mul, silu_mul_fused

__all__ = [
    "add_rms_norm",
    "add_rms_norm_fp8",
    "build_cos_sin_cache",
    "fp8_block_linear",
    "fp8_block_linear_quantized",
    "fp8_quant_groups",
    "qk_norm_rope",
    "rms_norm",
    "rms_norm_fp8",
    "silu_mul",
    "silu_mul_fp8",
    "silu_mul_fused",
]
