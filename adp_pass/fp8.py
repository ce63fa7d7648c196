"""FP8 block-scaled numbers as the official Qwen3-FP8 (and DeepSeek) checkpoints store them:
the reference arithmetic every FP8 kernel, loader and test is measured against.

The format (``quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128]}``):

- a linear weight ``[out, in]`` is ``float8_e4m3fn`` with ``weight_scale_inv`` of shape
  ``[ceil(out / 128), ceil(in / 128)]`` beside it; the real weight is the fp8 value times the
  scale of its 128 x 128 tile (the name says "inverse" because it undoes the quantization);
- activations are quantized on the fly, per token and per 128-wide group of the input dim, with
  the scale ``amax / 448`` of that group (448 is e4m3's largest finite value).

Numerics: scales are computed and applied in float32, and the reference product accumulates in
float32 (``fp8_linear_reference``), as the kernels do; what differs between the kernels and this
reference is only the summation order.
"""

from __future__ import annotations

import math

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
WEIGHT_BLOCK = (128, 128)  # the block the kernels support (the Qwen3 and DeepSeek releases)
ACTIVATION_GROUP = 128
# A group of zeros gets this scale rather than 0, so dequantizing never divides by zero.
_MIN_AMAX = 1e-12


def scale_shape(weight_shape: tuple[int, int], block: tuple[int, int] = WEIGHT_BLOCK) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a weight of ``weight_shape``: one scale per tile,
    a partial tile at the edge counting as one."""
    return (math.ceil(weight_shape[0] / block[0]), math.ceil(weight_shape[1] / block[1]))


def _tile_view(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """``x`` zero-padded to whole tiles, viewed as [tiles_out, bo, tiles_in, bi]."""
    out, inn = x.shape
    rows, cols = scale_shape((out, inn), block)
    padded = torch.nn.functional.pad(x, (0, cols * block[1] - inn, 0, rows * block[0] - out))
    return padded.view(rows, block[0], cols, block[1]), out, inn


def quantize_weight(weight: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_fp8, weight_scale_inv)`` of a 2-D weight: each tile scaled so its largest
    magnitude lands on 448. The scale is float32; a checkpoint may store it as bf16/fp16."""
    tiles, out, inn = _tile_view(weight.detach().float(), block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(_MIN_AMAX)
    scale = amax / E4M3_MAX
    return _quantize_tiles(tiles, scale, out, inn, block), scale


def quantize_weight_stored(weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16,
                           block: tuple[int, int] = WEIGHT_BLOCK
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_fp8, weight_scale_inv)`` as a checkpoint stores them, the scale in
    ``scale_dtype`` (bf16, fp16 or fp32). The weight is quantized against the scale *as stored*
    (rounded to ``scale_dtype`` first), so ``dequantize_weight`` of the pair is the closest the
    file can hold; a bf16 scale that rounded down only saturates a tile's largest values at 448
    (at most 2^-8 of them, below e4m3's own 2^-4 rounding). Scales are kept inside the storage
    dtype's normal range, so an fp16 scale of a near-zero tile never becomes 0 (0/0)."""
    if scale_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"scale dtype {scale_dtype} is not one of bf16, fp16, fp32")
    tiles, out, inn = _tile_view(weight.detach().float(), block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(_MIN_AMAX)
    info = torch.finfo(scale_dtype)
    stored = (amax / E4M3_MAX).clamp(info.tiny, info.max).to(scale_dtype)
    return _quantize_tiles(tiles, stored.float(), out, inn, block), stored


def _quantize_tiles(tiles: torch.Tensor, scale: torch.Tensor, out: int, inn: int,
                    block: tuple[int, int]) -> torch.Tensor:
    quantized = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    rows, cols = scale.shape
    return quantized.view(rows * block[0], cols * block[1])[:out, :inn].contiguous()


def dequantize_weight(weight_fp8: torch.Tensor, scale_inv: torch.Tensor,
                      block: tuple[int, int] = WEIGHT_BLOCK) -> torch.Tensor:
    """The float32 weight an fp8 weight and its tile scales stand for."""
    expected = scale_shape(tuple(weight_fp8.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv is {list(scale_inv.shape)}; a weight of "
                         f"{list(weight_fp8.shape)} with {list(block)} blocks needs {list(expected)}")
    scale = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    out, inn = weight_fp8.shape
    return weight_fp8.float() * scale[:out, :inn]


def quantize_activation(x: torch.Tensor, group: int = ACTIVATION_GROUP
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scales)``: ``x [..., k]`` quantized per token and per ``group``-wide slice of
    the last dim (a partial last group counts as one); ``scales [..., ceil(k / group)]`` float32."""
    k = x.shape[-1]
    groups = math.ceil(k / group)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group - k))
    grouped = padded.view(*x.shape[:-1], groups, group)
    scale = grouped.abs().amax(dim=-1).clamp_min(_MIN_AMAX) / E4M3_MAX
    quantized = (grouped / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return quantized.view(*x.shape[:-1], groups * group)[..., :k], scale


def dequantize_activation(x_fp8: torch.Tensor, scales: torch.Tensor,
                          group: int = ACTIVATION_GROUP) -> torch.Tensor:
    k = x_fp8.shape[-1]
    return x_fp8.float() * scales.repeat_interleave(group, dim=-1)[..., :k]


def fp8_linear_reference(x: torch.Tensor, weight_fp8: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int] = WEIGHT_BLOCK) -> torch.Tensor:
    """``x @ W.T`` as a W8A8 block-scaled kernel computes it: ``x`` quantized per token and per
    ``block[1]``-wide group, ``W`` dequantized per tile, the product accumulated in float32;
    the result in ``x``'s dtype."""
    x_fp8, x_scale = quantize_activation(x, block[1])
    activation = dequantize_activation(x_fp8, x_scale, block[1])
    weight = dequantize_weight(weight_fp8, scale_inv, block)
    return (activation @ weight.T).to(x.dtype)
