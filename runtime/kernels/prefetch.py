"""``adp::prefetch_l2``: start reading a weight into the GPU's L2 cache, and return at once.

A decode step is a chain of weight reads (the projections) with kernels between them that leave
HBM idle or half busy: the paged attention streams the KV cache at ~86% of the copy bandwidth, the
norms and SwiGLU take 1-3 µs each, and every GEMM spends its first microseconds ramping up. The
op issues L2 prefetches of (the first ``max_bytes`` of) the next projection's weight ahead of
those kernels: the bytes arrive while HBM would otherwise idle, and the projection then finds them
in L2. It is the idea of CUTLASS's "GEMM with L2 weight prefetch" (example 63), done as a kernel
of its own so that cuBLAS GEMMs profit too (runtime/lower/prefetch_weights.py places them).

The prefetch is a hint: it changes no value, so the op has no output and no CPU behaviour. A
prefetch kernel lasts until its bytes have arrived (measured: ~3.4 TB/s for 96 MiB), so it runs
on a side stream (``SIDE_STREAM``), beside the kernels it overlaps; ``adp.prefetch_join`` at the
end of the graph joins that stream back.

Modes (``MODE``, read at launch, so a CUDA graph captures the mode that was set):

* ``"bulk"``   (sm_90+): ``cp.async.bulk.prefetch.L2`` per ``BULK_CHUNK`` bytes: a few
  instructions for megabytes, executed by the TMA unit.
* ``"lines"``  (sm_80+): ``prefetch.global.L2::evict_last`` per 128-byte line.
* ``"off"``: launch nothing.

``BYTES`` caps what each kind of site prefetches (the pass passes the site's kind): L2 is 50 MB
on the H100/H200, and what is prefetched must survive until the projection reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .utils import capability_major, device_index

MODE = "auto"  # "auto": "bulk" on sm_90+, "lines" on sm_80+, else "off"
# Per site kind: the most bytes of the weight to prefetch (tuned on H200: bench/profile_decode.py
# --variants).
BYTES = {
    "attention": 32 << 20,  # ahead of the paged attention: the o_proj weight (33.5 MB in Qwen3-8B)
    "gap": 8 << 20,  # ahead of the norm / SwiGLU kernels before a projection
}
# Issue the prefetch kernels on a side stream (forked from and joined back into the caller's
# stream, in a CUDA graph as a parallel branch): a prefetch kernel lasts as long as its bytes
# take to arrive, so on the caller's stream it would delay the kernels it is meant to overlap.
SIDE_STREAM = True
BULK_CHUNK = 64 << 10
LINE = 128
_LINES_PER_PROGRAM = 1024
_CHUNKS_PER_PROGRAM = 32

_BULK_ASM = tl.constexpr("""{
    .reg .pred p;
    setp.gt.s32 p, $2, 0;
    @p cp.async.bulk.prefetch.L2.global [$1], $2;
    mov.u32 $0, 0;
}""")
_LINE_ASM = tl.constexpr("""{
    .reg .pred p;
    setp.ne.s32 p, $2, 0;
    @p prefetch.global.L2::evict_last [$1];
    mov.u32 $0, 0;
}""")


@triton.jit
def _prefetch_bulk_kernel(ptr, nbytes, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    start = (tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * CHUNK
    # Sizes must be multiples of 16 bytes; a tail under 16 bytes is left out.
    size = (tl.minimum(nbytes - start, CHUNK) // 16 * 16).to(tl.int32)
    tl.inline_asm_elementwise(_BULK_ASM, "=r,l,r", [ptr + start, size], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_lines_kernel(ptr, nbytes, LINE_BYTES: tl.constexpr, PER_PROGRAM: tl.constexpr):
    start = (tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * LINE_BYTES
    inside = (start < nbytes).to(tl.int32)
    tl.inline_asm_elementwise(_LINE_ASM, "=r,l,r", [ptr + start, inside], dtype=tl.int32,
                              is_pure=False, pack=1)


_COMPILED = not isinstance(_prefetch_bulk_kernel, InterpretedFunction)


def mode_for(device: torch.device) -> str:
    """The mode a launch on ``device`` uses now: ``MODE``, with ``"auto"`` resolved."""
    if device.type != "cuda" or not _COMPILED:
        return "off"  # a hint with nothing to hint on CPU (or under the interpreter)
    if MODE != "auto":
        return MODE
    major = capability_major(device)
    return "bulk" if major >= 9 else "lines" if major >= 8 else "off"


def prefetch(weight: torch.Tensor, max_bytes: int, mode: str) -> None:
    """Issue the prefetch of ``weight``'s first ``max_bytes`` bytes with ``mode``."""
    nbytes = min(weight.numel() * weight.element_size(), max_bytes)
    if mode == "off" or nbytes < 16:
        return
    # Byte addressing; a strided weight is prefetched over its first contiguous bytes only.
    flat = weight if weight.is_contiguous() else weight.as_strided((weight.numel(),), (1,))
    data = flat.reshape(-1).view(torch.uint8)
    if mode == "bulk" and weight.data_ptr() % 16:
        mode = "lines"  # bulk copies need 16-byte aligned addresses
    with torch.cuda.device(weight.device):
        if mode == "bulk":
            programs = triton.cdiv(nbytes, BULK_CHUNK * _CHUNKS_PER_PROGRAM)
            _prefetch_bulk_kernel[(programs,)](data, nbytes, CHUNK=BULK_CHUNK,
                                               PER_PROGRAM=_CHUNKS_PER_PROGRAM, num_warps=1)
        elif mode == "lines":
            programs = triton.cdiv(nbytes, LINE * _LINES_PER_PROGRAM)
            _prefetch_lines_kernel[(programs,)](data, nbytes, LINE_BYTES=LINE,
                                                PER_PROGRAM=_LINES_PER_PROGRAM, num_warps=4)
        else:
            raise ValueError(f"prefetch mode must be 'bulk', 'lines', 'off' or 'auto', got {mode!r}")


_side_streams: dict[int, torch.cuda.Stream] = {}
_forked: set[int] = set()  # devices whose side stream has prefetches the caller has not joined


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device_index(device)
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


@torch.library.custom_op("adp::prefetch_l2", mutates_args=())
def prefetch_l2(weight: torch.Tensor, site: str) -> None:
    """Prefetch up to ``BYTES[site]`` bytes of ``weight`` into L2 (CUDA; nothing elsewhere)."""
    if site not in BYTES:
        raise ValueError(f"adp.prefetch_l2: unknown site kind {site!r}; known: {sorted(BYTES)}")
    mode = mode_for(weight.device)
    if mode == "off":
        return
    if not SIDE_STREAM:
        prefetch(weight, BYTES[site], mode)
        return
    side = _side_stream(weight.device)
    side.wait_stream(torch.cuda.current_stream(weight.device))  # after what precedes it
    with torch.cuda.stream(side):
        prefetch(weight, BYTES[site], mode)
    _forked.add(side.device.index)


@prefetch_l2.register_fake
def _(weight, site) -> None:
    return None


@torch.library.custom_op("adp::prefetch_join", mutates_args=())
def prefetch_join(anchor: torch.Tensor) -> None:
    """The caller's stream waits for the prefetches issued on ``anchor``'s device so far: a CUDA
    graph must join every stream it forked before its capture ends."""
    if not anchor.is_cuda:
        return
    index = device_index(anchor.device)
    # Only a stream this step forked: waiting on one with no captured work would invalidate a
    # CUDA graph capture.
    if index in _forked:
        _forked.discard(index)
        torch.cuda.current_stream(anchor.device).wait_stream(_side_streams[index])


@prefetch_join.register_fake
def _(anchor) -> None:
    return None


# The op returns nothing and writes nothing visible: without this, dead-code elimination would
# drop it from any graph.
torch.fx.node.has_side_effect(torch.ops.adp.prefetch_l2.default)
torch.fx.node.has_side_effect(torch.ops.adp.prefetch_join.default)
