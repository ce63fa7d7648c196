"""``adp::sample_tokens``: one token per row, greedy or temperature-sampled, with counter-based
noise, as two small Triton kernels (the second is ``greedy_argmax``'s).

Sampling is Gumbel-max: the token of a sampled row is the argmax of ``logit * inv_temperature +
G_i`` with ``G_i`` i.i.d. standard Gumbel, which draws from ``softmax(logits * inv_temperature)``.
The noise is a hash of (seed, counter, column) instead of a generator's state, so the op never
syncs with the host, holds no state, and fits in a CUDA graph (seeds and counters are ordinary
device tensors the engine updates); a row's token depends only on its own logits, inverse
temperature, filter, seed and counter: never on its position in the batch, on the other rows or
on the device (the kernel and ``reference.sample_tokens`` agree bit for bit; see Rounding).

Per row r, with ``x_i = fp32(logits[r, i])``:

* ``inv_temperature[r] == 0`` (greedy): ``argmax_i x_i``, exactly ``torch.argmax(logits[r])``
  (first index of the largest value; the first NaN wins), as ``adp.greedy_argmax``;
  ``min_logit``, ``seeds`` and ``counters`` are not read.
* otherwise: the first index of the largest ``s_i``, NaN counting as larger than everything (the
  first NaN wins, as in argmax), where ``s_i = -inf`` if ``x_i < min_logit[r]`` (the top-p cut:
  -inf keeps everything; a NaN ``x_i`` is never below the cut, so NaN logits still win), else
  ``s_i = (x_i * inv_temperature[r]) + G_i``, the product and the sum each rounded to fp32. If
  every ``s_i`` is -inf (``min_logit`` above the row's maximum), the answer is 0, as argmax of a
  row of -inf. ``inv_temperature`` is meant to be finite and > 0 on these rows (not checked:
  that would sync with the host).

The noise ``G_i`` of column i (all words uint32, arithmetic mod 2**32, ``>>`` logical)::

    mix(x):  x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
             (Chris Wellons' "lowbias32")
    seed_lo, seed_hi = bits 0-31 and 32-63 of seeds[r] (two's complement int64; any value)
    ctr_lo,  ctr_hi  = bits 0-31 and 32-63 of counters[r] (all 64 bits are used)
    k0 = mix(mix(mix(mix(seed_lo ^ 0x9E3779B9) ^ seed_hi) ^ ctr_lo) ^ ctr_hi)
    k1 = mix(k0 ^ 0x85EBCA6B)
    h  = mix(mix(i ^ k0) ^ k1)
    u  = (fp32(h >> 9) + 0.5) * 2**-23       exact: 2**23 values in [2**-24, 1 - 2**-24]
    G_i = -log(-log(u))                       fp32, so G_i lies in [-2.812, 16.636]

(23 bits, not 24: ``(h >> 8) + 0.5`` is not exact in fp32 above 2**23 and its top value rounds to
u = 1, G = +inf.) ``log`` is ``reference.sample_log`` / ``_sample_log`` below, Cephes' logf written
with fp32 multiplies and adds only: ``x = m * 2**e`` with m in [sqrt(1/2), sqrt(2)), ``f = m - 1``,
``log(1 + f)`` by its degree-8 polynomial ``c0..c8`` (``reference._LOG_POLY``), plus ``e * ln 2``
in two parts, each step rounded to fp32 in this order::

    y = ((((c0 * f + c1) * f + c2) ... ) * f + c8) * f * z      (z = f * f)
    log(x) = (f + ((y + e * -2.1219444e-4) - z * 0.5)) + e * 0.693359375

It is within 1 ulp of the true log on all 2**23 values of u and of -log(u).
``tl.log`` (libdevice on CUDA, numpy in the interpreter) would be ~20% cheaper in instructions,
but logs differ between implementations in the last bit (numpy's and torch's CPU ``log`` disagree
on ~20% of these inputs), which would flip near-tied tokens from one device to another.

Rounding: the first kernel launches with ``enable_fp_fusion=False`` (Triton 3.6 and 3.9), so no
multiply is contracted with an add into an FMA (the PTX holds no ``fma``); every fp32 operation
then rounds as torch's CPU ops do, and ``reference.sample_tokens`` gives the same tokens on CPU as
the kernel on a GPU or in the interpreter.

Layout: as ``greedy_argmax``, rows x ``CHUNK``-wide pieces, each program writing its piece's best
score, first index and NaN flag, and ``argmax._row_argmax_kernel`` picking each row's winner.
A greedy row's programs skip the noise and cost what ``greedy_argmax``'s do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .argmax import _BIG, _first_index_of_max, _row_argmax_kernel
from .utils import check_logit_rows, eager_on_cpu, launch_guard, pdl, previous_kernel_done

CHUNK = 4096  # columns per program of the first kernel (a power of two), read at each call


@triton.jit
def _mix(x):
    """lowbias32 of uint32 ``x`` (wrapping multiplies, logical shifts)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _sample_keys(seed, counter):
    """The row's keys (k0, k1), uint32, from int64 ``seed`` and ``counter``."""
    k0 = _mix(seed.to(tl.uint32) ^ 0x9E3779B9)
    k0 = _mix(k0 ^ (seed >> 32).to(tl.uint32))
    k0 = _mix(k0 ^ counter.to(tl.uint32))
    k0 = _mix(k0 ^ (counter >> 32).to(tl.uint32))
    return k0, _mix(k0 ^ 0x85EBCA6B)


@triton.jit
def _sample_log(x):
    """log of positive normal fp32 ``x``; the same operations as ``reference.sample_log``."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # [1, 2)
    big = m > 1.4142135381698608
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e).to(tl.float32)
    f = m - 1.0
    z = f * f
    y = f * 0.07037683576345444 + -0.11514610052108765
    y = y * f + 0.11676998436450958
    y = y * f + -0.12420140951871872
    y = y * f + 0.14249323308467865
    y = y * f + -0.16668057441711426
    y = y * f + 0.2000071406364441
    y = y * f + -0.24999994039535522
    y = y * f + 0.3333333134651184
    y = y * f * z
    y = y + e * -0.00021219444170128554
    y = y - z * 0.5
    return (f + y) + e * 0.693359375


@triton.jit
def _gumbel_noise(cols, k0, k1):
    """fp32 Gumbel noise of int32 columns ``cols`` under the row's keys."""
    h = _mix(_mix(cols.to(tl.uint32) ^ k0) ^ k1)
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
    return -_sample_log(-_sample_log(u))


@triton.jit
def _chunk_sample_kernel(logits_ptr, inv_temperature_ptr, min_logit_ptr, seed_ptr, counter_ptr,
                         part_val_ptr, part_idx_ptr, part_nan_ptr, row_stride, n_cols, n_chunks,
                         CHUNK: tl.constexpr, BIG: tl.constexpr, PDL: tl.constexpr = 0):
    previous_kernel_done(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = cols < n_cols
    values = tl.load(logits_ptr + row.to(tl.int64) * row_stride + cols, mask=valid,
                     other=float("-inf")).to(tl.float32)
    inv_temperature = tl.load(inv_temperature_ptr + row)
    if inv_temperature == 0.0:
        scores = values
    else:
        k0, k1 = _sample_keys(tl.load(seed_ptr + row), tl.load(counter_ptr + row))
        scores = values * inv_temperature + _gumbel_noise(cols, k0, k1)
        scores = tl.where(values < tl.load(min_logit_ptr + row), float("-inf"), scores)
    best, index, has_nan = _first_index_of_max(scores, cols, valid, BIG)
    slot = row * n_chunks + chunk
    tl.store(part_val_ptr + slot, best)
    tl.store(part_idx_ptr + slot, index)
    tl.store(part_nan_ptr + slot, has_nan)


def _check(logits: torch.Tensor, inv_temperature: torch.Tensor, min_logit: torch.Tensor,
           seeds: torch.Tensor, counters: torch.Tensor) -> None:
    check_logit_rows("sample_tokens", logits, _BIG - 1, {
        "inv_temperature": (inv_temperature, torch.float32),
        "min_logit": (min_logit, torch.float32),
        "seeds": (seeds, torch.int64), "counters": (counters, torch.int64)})


@torch.library.custom_op("adp::sample_tokens", mutates_args=())
def sample_tokens(logits: torch.Tensor, inv_temperature: torch.Tensor, min_logit: torch.Tensor,
                  seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One token per row of ``[B, V]`` logits (int64 ``[B]``): greedy where ``inv_temperature``
    is 0, else a Gumbel-max draw keyed by (``seeds``, ``counters``) among the logits not below
    ``min_logit`` (module docstring). fp32 ``inv_temperature`` and ``min_logit``, int64
    ``seeds`` and ``counters``, all ``[B]`` on the logits' device."""
    _check(logits, inv_temperature, min_logit, seeds, counters)
    if eager_on_cpu(_chunk_sample_kernel, logits):
        return reference.sample_tokens(logits, inv_temperature, min_logit, seeds, counters)
    rows, n_cols = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    # Per-row values are read at ``ptr + row``; contiguous() is a no-op for the usual buffers.
    inv_temperature, min_logit = inv_temperature.contiguous(), min_logit.contiguous()
    seeds, counters = seeds.contiguous(), counters.contiguous()
    chunk = CHUNK
    n_chunks = triton.cdiv(n_cols, chunk)
    part_val = torch.empty((rows, n_chunks), dtype=torch.float32, device=logits.device)
    part_idx = torch.empty((rows, n_chunks), dtype=torch.int32, device=logits.device)
    part_nan = torch.empty((rows, n_chunks), dtype=torch.int32, device=logits.device)
    with launch_guard(_chunk_sample_kernel, logits, inv_temperature, min_logit, seeds, counters):
        _chunk_sample_kernel[(rows, n_chunks)](
            logits, inv_temperature, min_logit, seeds, counters, part_val, part_idx, part_nan,
            logits.stride(0), n_cols, n_chunks, CHUNK=chunk, BIG=_BIG, num_warps=8,
            enable_fp_fusion=False, **pdl(logits))
        _row_argmax_kernel[(rows,)](
            part_val, part_idx, part_nan, out, n_chunks,
            CHUNKS_PAD=max(16, triton.next_power_of_2(n_chunks)), BIG=_BIG, num_warps=1,
            **pdl(logits))
    return out


@sample_tokens.register_fake
def _(logits: torch.Tensor, inv_temperature: torch.Tensor, min_logit: torch.Tensor,
      seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    _check(logits, inv_temperature, min_logit, seeds, counters)
    return logits.new_empty(logits.shape[:1], dtype=torch.int64)
