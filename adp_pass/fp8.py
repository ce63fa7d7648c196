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

from adp_pass.errors import AdpError

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


def dequantize_state(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
                     ) -> dict[str, torch.Tensor]:
    """A state dict with every fp8 weight and its ``weight_scale_inv`` replaced by the ``dtype``
    weight they stand for (the scales dropped); other tensors as they are."""
    from adp_pass.checks import SCALE_SUFFIX

    return {name: (dequantize_weight(value, tensors[name + SCALE_SUFFIX]).to(dtype)
                   if value.dtype == E4M3 else value)
            for name, value in tensors.items() if not name.endswith(SCALE_SUFFIX)}


def all_gather_bytes(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (the same shape and dtype on each), gathered as its bytes: gloo
    has no float8 (an FP8 model's weights), and bytes carry every dtype on every backend."""
    import torch.distributed as dist

    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    wire = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(wire, flat, group=group)
    return [w.view(tensor.dtype).view(tensor.shape) for w in wire]


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


# ------------------------------------------------------------------------- the op in the graph
# ``adp::fp8_block_linear`` is defined here, in the foundation, so that capturing an FP8 model
# on fake/meta tensors, detecting and rewriting its graph need no runtime module: the schema, the
# fake implementation and the reference arithmetic (every device's default) live with the format.
# ``runtime/kernels/fp8_gemm.py`` registers the Triton / cuBLAS kernels over the default.
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_weight(op: str, weight: torch.Tensor, weight_scale_inv: torch.Tensor, k: int) -> None:
    """An fp8 weight [N, K] (unit stride along K) and its tile scales of exactly
    ``scale_shape(weight.shape)``; each problem a ``ValueError`` naming it."""
    if weight.dim() != 2 or weight.dtype != E4M3:
        raise ValueError(f"{op}: weight must be a 2-D float8_e4m3fn [N, K], got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if weight.shape[1] != k:
        raise ValueError(f"{op}: x has K = {k} columns but weight is {tuple(weight.shape)}")
    if weight.stride(1) != 1 and weight.shape[1] > 1:
        raise ValueError(f"{op}: weight must be unit-stride along K (its rows contiguous), got "
                         f"strides {weight.stride()}; weights are not copied per call")
    expected = scale_shape(tuple(weight.shape))
    if tuple(weight_scale_inv.shape) != expected:
        raise ValueError(f"{op}: weight_scale_inv is {list(weight_scale_inv.shape)}; a weight of "
                         f"{list(weight.shape)} with 128x128 blocks needs {list(expected)}")
    if weight_scale_inv.dtype not in SCALE_DTYPES:
        raise ValueError(f"{op}: weight_scale_inv must be float32, bfloat16 or float16, got "
                         f"{weight_scale_inv.dtype}")
    if weight.device != weight_scale_inv.device:
        raise ValueError(f"{op}: weight on {weight.device}, weight_scale_inv on "
                         f"{weight_scale_inv.device}")


def check_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> None:
    """The arguments of ``adp::fp8_block_linear``, checked alike by every implementation."""
    op = "fp8_block_linear"
    if x.dim() == 0:
        raise ValueError(f"{op}: x must be [..., K]")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{op}: x must be bfloat16, float16 or float32 (fp8 activations go "
                         f"through fp8_block_linear_quantized), got {x.dtype}")
    check_weight(op, weight, weight_scale_inv, x.shape[-1])
    if x.device != weight.device:
        raise ValueError(f"{op}: x on {x.device}, weight on {weight.device}")


@torch.library.custom_op("adp::fp8_block_linear", mutates_args=())
def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor
                     ) -> torch.Tensor:
    """``fp8_linear_reference(x, weight, weight_scale_inv)``: ``x [..., K]`` in bf16/fp16/fp32,
    ``weight`` float8_e4m3fn [N, K], its tile scales; result ``[..., N]`` in ``x.dtype``. The
    scale is a required argument: an fp8 weight never reaches a product without it."""
    check_linear(x, weight, weight_scale_inv)
    return fp8_linear_reference(x, weight, weight_scale_inv)


@fp8_block_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    check_linear(x, weight, weight_scale_inv)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ------------------------------------------------------------------------------ refusals
class Fp8BlockError(AdpError, ValueError):
    """A rank's part of an FP8 weight is not whole 128 x 128 scale tiles: its scales would be
    shared with another rank's values, so no sharding of the scale grid matches the weight's."""

    default_hint = ("capture at a TP degree whose shards are whole 128-blocks, or capture the "
                    "bf16 model (the loader dequantizes an FP8 checkpoint for it)")


def block_aligned_tp(sizes: list[int], up_to: int, block: int = WEIGHT_BLOCK[0]) -> list[int]:
    """The TP degrees (1..``up_to``) that split every size in ``sizes`` into whole ``block``s."""
    return [t for t in range(1, up_to + 1)
            if all(n % t == 0 and (n // t) % block == 0 for n in sizes)]
