"""Host-side helpers shared by the Triton kernel wrappers.

Dtype conventions used by every kernel in this package:

* Loads are upcast to fp32 and all arithmetic happens in fp32.
* Wherever transformers' eager Qwen3 code produces an intermediate tensor in the model dtype
  (bf16/fp16), the kernel rounds to that dtype at the same point (``round_to(x, dtype)``; for
  bf16 by integer arithmetic, because compiled Triton drops a ``.to(bf16).to(fp32)`` round
  trip: bench/results/triton-bf16-roundtrip-h200.txt).
  Products of two bf16 (or two fp16) values are exact in fp32, so "fp32 multiply, round once"
  equals aten's bf16 multiply bit for bit; the only remaining differences come from reduction
  order and the transcendental approximations (rsqrt, exp), i.e. rare 1-ulp flips.
* Python float scalars (eps) reach the kernel as fp32, like ``variance + eps`` on an fp32 tensor.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda
from triton.runtime.interpreter import InterpretedFunction

# Programmatic dependent launch (sm_90+). With it on, our kernels are launched with the PDL
# attribute and begin with ``griddepcontrol.wait`` (``previous_kernel_done``): the GPU starts
# them while the kernel before them drains, instead of after, and the wait keeps them from
# reading its outputs early. "trigger" also lets the next kernel launch as soon as this one
# has started waiting (``griddepcontrol.launch_dependents``). Read at launch, so a CUDA graph
# keeps what was set at capture. Values: "off", "wait", "trigger" (True means "trigger").
# "wait" measured on the H200 (Qwen3-8B decode graph, bench/profile_decode.py --variants): -0.8%
# at 16 rows, no change at 64; "trigger" -1.2% at 16 but +1.2% at 64 (the early-launched kernels
# wait on SMs the GEMMs need).
PDL = "wait"
_PDL_LEVELS = {"off": 0, False: 0, "wait": 1, "trigger": 2, True: 2}

@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (round to nearest even), returned as fp32.

    bf16 and fp16 are rounded on the bits: on the H200 (Triton 3.6) the compiled kernel folds
    ``x.to(tl.bfloat16).to(tl.float32)`` away inside an expression (a - b of two rounded
    products kept 76% of elements bit-identical to eager; this form 100%; fp16 likewise 78%
    before). The interpreter computes the same thing. NaN passes through unchanged.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif dtype == tl.float16:
        # fp16 keeps 10 of fp32's 23 mantissa bits in its normal range; below it (|x| < 2^-14)
        # the cast is the fallback (subnormal fp16 values, rare in activations); above 65504
        # the value overflows to inf as the cast does.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
        rounded = bits.to(tl.float32, bitcast=True)
        rounded = tl.where(tl.abs(x) < 6.103515625e-05, x.to(dtype).to(tl.float32), rounded)
        rounded = tl.where(rounded > 65504.0, float("inf"), rounded)
        rounded = tl.where(rounded < -65504.0, float("-inf"), rounded)
        return tl.where(x != x, x, rounded)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def previous_kernel_done(PDL: tl.constexpr):
    """``PDL`` >= 1: wait until the kernel before this one has finished and its writes are
    visible; 2: then let the next kernel start launching. 0: nothing."""
    if PDL >= 1:
        tl_cuda.gdc_wait()
    if PDL >= 2:
        tl_cuda.gdc_launch_dependents()


def device_index(device: torch.device) -> int:
    """The CUDA device's index (the current device for a bare ``cuda``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def capability_major(device: torch.device) -> int:
    """The compute capability's major version of a CUDA device (9 for Hopper)."""
    return _major(device_index(device))


def pdl(tensor: torch.Tensor) -> dict:
    """Launch keywords for a kernel taking ``PDL: tl.constexpr``: the level of ``PDL`` when
    ``tensor`` is on an sm_90+ GPU, else 0."""
    if PDL not in _PDL_LEVELS:
        raise ValueError(f"kernels.utils.PDL must be 'off', 'wait' or 'trigger', got {PDL!r}")
    level = _PDL_LEVELS[PDL]
    if level and not (tensor.is_cuda and capability_major(tensor.device) >= 9):
        level = 0
    return {"PDL": level, "launch_pdl": level > 0}


# A whole row must fit in one program's registers; Qwen3 hidden sizes are <= 8192.
MAX_FUSED_SIZE = 65536


def block_and_warps(n_elements: int, max_block: int = MAX_FUSED_SIZE) -> tuple[int, int]:
    """Power-of-two block covering ``n_elements`` (capped at ``max_block``) and its num_warps.

    Warps grow with the block so each thread keeps ~8-16 elements (Liger-Kernel's
    ``calculate_settings`` thresholds).
    """
    block = min(triton.next_power_of_2(max(n_elements, 1)), max_block)
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    else:
        num_warps = 4
    return block, num_warps


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as 2-D ``[rows, x.shape[-1]]`` with unit column stride and one row stride.

    Leading dims that collapse (e.g. a column slice of a wider buffer) stay a view; only inputs
    whose leading dims cannot be described by a single row stride, or whose last dim is not
    unit-stride, are copied.
    """
    if x.dim() == 0:
        raise ValueError("expected at least 1-D input")
    if x.stride(-1) != 1:
        x = x.contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    assert x2.stride(1) == 1 or x2.shape[1] <= 1, f"bad column stride {x2.stride()}"
    return x2


def eager_on_cpu(kernel: object, *tensors: torch.Tensor) -> bool:
    """True when every tensor is on the CPU but ``kernel`` was compiled, not interpreted.

    Triton chooses interpreter or compiler once per process (when ``@triton.jit`` runs at import;
    ``adp_pass`` picks the interpreter only on machines without a GPU), and a compiled kernel
    cannot launch on CPU tensors. The ops then run ``reference`` (eager PyTorch, same rounding
    points) instead, so CPU ranks and CPU tests also work on GPU machines.
    """
    return (not isinstance(kernel, InterpretedFunction)
            and all(t.device.type == "cpu" for t in tensors))


def launch_guard(kernel: object, *tensors: torch.Tensor) -> contextlib.AbstractContextManager:
    """Check that all tensors share one device; return a context to launch ``kernel`` under.

    Triton launches on the *current* CUDA device, and per-rank code may hold tensors on another
    one, so CUDA launches run under ``torch.cuda.device``. CPU tensors only work when ``@triton.jit``
    built an interpreted kernel, which it decides when the kernel module is first imported (the
    ops send CPU tensors to their eager reference otherwise: ``eager_on_cpu``).
    """
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all inputs must be on {device}, got {t.device}")
    if device.type == "cuda":
        return torch.cuda.device(device)
    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "adp Triton kernels got CPU tensors but Triton is compiling; set TRITON_INTERPRET=1 "
            "before adp_pass.runtime.kernels is first imported"
        )
    return contextlib.nullcontext()


LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logit_rows(op: str, logits: torch.Tensor, max_cols: int,
                     per_row: dict[str, tuple[torch.Tensor, torch.dtype]]) -> None:
    """``[rows, vocab]`` logits (float, at most ``max_cols`` columns) and ``per_row`` tensors of
    one value per row, by name: shapes, dtypes and devices, each with a ``ValueError`` naming
    ``op``. Nothing that reads values: that would sync with the host (and break a CUDA graph)."""
    if logits.dim() != 2:
        raise ValueError(f"{op} takes [rows, vocab] logits, got {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    rows, n_cols = logits.shape
    if n_cols == 0:
        raise ValueError(f"{op} of an empty vocabulary")
    if n_cols > max_cols:
        raise ValueError(f"{op}: a vocabulary of {n_cols} columns exceeds {max_cols}")
    for name, (t, dtype) in per_row.items():
        if t.shape != (rows,):
            raise ValueError(f"{op}: {name} must have shape ({rows},), one per logits row, "
                             f"got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{op}: {name} must be {dtype}, got {t.dtype}")
        if t.device != logits.device:
            raise ValueError(f"{op}: {name} is on {t.device}, logits on {logits.device}")
