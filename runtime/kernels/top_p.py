"""``adp::top_p_cut``: the top-p cut of each row of the logits, without sorting, as one Triton
kernel (one program per row).

Same answer as ``reference.top_p_min_logit`` (the sort-based cut; ``runtime/sampling.py``): per
row r with ``x_j = fp32(logits[r, j])``, ``s = inv_temperature[r]``, ``p = top_p[r]``::

    m = max_j x_j,   e_j = exp(x_j * s - m * s)      (the reference's softmax numerators)
    Z = sum_j e_j,   P = p * Z,   A(t) = sum_{x_j > t} e_j   (the mass strictly above t)
    cut = the smallest row value v with A(v) < P     (m if there is none, i.e. p <= 0)

i.e. the logit of the last token top-p keeps when sorting by probability: token j is kept iff the
mass of the tokens above it, ``A(x_j)``, is below ``p``; the first token always stays, and ties at
the cut all stay (``adp.sample_tokens`` keeps ``x >= cut``). Rows with ``s == 0`` (greedy) or
``p >= 1`` (also NaN ``s`` or ``p``, negative ``s``) return -inf (keep everything) after reading
nothing else, as the reference does.

Rows the formula does not cover (the reference's softmax gives NaNs there; we define):

* a NaN logit anywhere in the row: -inf (keep everything; the sampler then picks the first NaN,
  as argmax does);
* no NaN and a +inf logit: +inf (all the mass sits on the +inf tokens; the sampler picks the
  first of them, as it would with -inf);
* every logit -inf: -inf.

``inv_temperature`` must be finite, and ``logits * inv_temperature`` finite (not checked: that
would sync with the host).

Rounding: the sums run in fp32 in the kernel's order, the reference's in sort order, and ``exp``
differs by an ulp or two between devices, so the two answers can differ where the mass at the
boundary lies within fp32 rounding of ``P`` (``A(cut)`` or ``A`` at the next row value below,
relative 1e-6 or so); nowhere else. A row that cuts always gets one of its values (as fp32; a cut
at zero may come back as -0.0, which the sampler's ``x < cut`` treats as +0.0).

Algorithm (no sort, no host sync, fixed-size scratch: CUDA-graph capturable). A(t) is
non-increasing in t, and computed in one fixed summation order it stays so (rounding is
monotone), so bisection finds the cut exactly, on the order-preserving integer key of the logits'
dtype (16 bits for bf16/fp16, whose values are the only candidates; 32 for fp32), keeping
``A(hi) < P <= A(lo)`` from ``hi = key(m)`` (A = 0) and ``lo = key(-inf)`` (A = Z >= P). One
program per row, 16 warps; a pass over the row takes 8192 columns a step as [rows, 16 bytes]
tiles (each thread owns whole 16-byte groups) and loads the next tile before using the current.

1. Pass 1: ``m`` and whether the row holds a NaN (the only pass that reads HBM; the row then
   sits in L2: 19.5 MB for 64 x 151936 bf16).
2. Pass 2: ``Z`` and the first probe, ``A(t0)`` at ``t0 = m - ln(2V / (1 - p)) / s`` rounded
   down to the dtype (the tokens at or below it hold at most ``(1 - p) / 2`` of the mass, so
   ``A(t0) >= P`` unless rounding says otherwise, and then it is just a bisection step the other
   way). The pass also writes one int8 word per group (bit c: column c of the group is above
   ``t0``) and counts the groups with a bit set.
3. While more than ``CAP`` (2048) tokens are in ``(lo, hi]``: whole-row bisection passes (the
   first probe at ``m - ln(2V / ((1 - p) Z)) / s``, tighter by ``ln Z``), counting the tokens
   above each probe; then one pass marks the groups holding a token in ``(lo, hi]``.
4. A short pass over the words lists the marked groups in column order (deterministic), at most
   ``CAP``; their columns are gathered into registers (a [CAP, 16-byte group] tile, -inf where
   unmarked) and the remaining steps (at most 16, or 32) run there:
   ``A(t) = A(hi at step 3) + the candidates' mass above t``. The answer is the smallest
   candidate at or above the final ``hi``.

With decode logits most rows should need only steps 1, 2 and 4. Marking groups rather than
appending the logits themselves is deliberate: Triton lowers a scan and a scattered store through
shared memory at ~20 instructions per element, more than the exp of a pass; per word, over an
eighth of the elements, that is cheap.

Why recompute ``exp`` in every pass instead of keeping fp32 ``e_j`` in a [B, V] scratch: a pass
then reads 2 bytes per bf16 token from L2 instead of 4, and costs ~13 instructions per token
(one ``ex2.approx.ftz``): at 128 instructions and 16 ``ex2`` per clock per SM that is ~8 us per
pass for a 151936-column row, about what streaming the 608 KB of fp32 ``e`` from L2 would take
with only one CTA per SM issuing loads; and the 39 MB buffer (64 x 151936) would be written once,
fill most of the 50 MB L2 and evict the logits. With the register phase few passes remain anyway.

The kernel launches with ``enable_fp_fusion=False`` (as ``adp.sample_tokens``): ``x * s - m * s``
is then 0 exactly at the maximum, and every ``e_j`` is the same bits in every pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

from . import reference
from .utils import check_logit_rows, eager_on_cpu, launch_guard, pdl, previous_kernel_done

BLOCK = 8192  # columns per step of a full pass (a power of two), read at each call
CAP = 2048  # groups of candidates held in registers by the last steps (a power of two)
NUM_WARPS = 16
WORDS = 8192  # group words per step of the listing pass (a power of two, >= 16)
MAX_VOCAB = 2**25  # a group index shifted left by GROUP bits fits in int32
# key(-inf) in each dtype's order key (see _key): the bisection's first lower end.
_NEG_INF_KEY = {torch.float32: -2139095041, torch.bfloat16: -32641, torch.float16: -31745}


@triton.jit
def _key(v, DTYPE: tl.constexpr):
    """int64 order key of fp32 ``v`` in ``DTYPE``: keys order as the values do (-0.0 just below
    +0.0), NaNs outside [key(-inf), key(+inf)]. ``v`` is rounded to ``DTYPE`` first (bf16: toward
    zero, fp16: to nearest), so ``_key(v) - 1`` is the key of a value below ``v``."""
    if DTYPE == tl.float32:
        bits = v.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    else:
        if DTYPE == tl.bfloat16:
            bits = v.to(tl.int32, bitcast=True) >> 16  # arithmetic: sign-extended 16 bits
        else:
            bits = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        key = tl.where(bits < 0, bits ^ 0x7FFF, bits)
    return key.to(tl.int64)


@triton.jit
def _value(key, DTYPE: tl.constexpr):
    """The fp32 value of ``DTYPE`` order key ``key`` (inverse of ``_key``)."""
    k = key.to(tl.int32)
    if DTYPE == tl.float32:
        return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)
    else:
        bits = tl.where(k < 0, k ^ 0x7FFF, k)
        if DTYPE == tl.bfloat16:
            return (bits << 16).to(tl.float32, bitcast=True)
        else:
            return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_tile(row_ptr, start, n_cols, ROWS: tl.constexpr, GROUP: tl.constexpr):
    """Columns ``start .. start + ROWS * GROUP`` as a [ROWS, GROUP] tile (-inf past the row).
    A group is one 16-byte load, so a thread holds whole groups and sums along them stay in its
    registers."""
    cols = start + tl.arange(0, ROWS)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    return tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf"))


@triton.jit
def _numerators(x, inv_t, ymax, FAST_EXP: tl.constexpr):
    """``e_j`` of fp32 logits ``x``: the reference's ``exp(x * s - max(x * s))`` (0 at -inf).
    Compiled: ``ex2.approx.ftz`` of the argument times log2(e), which is ``tl.exp`` without the
    denormal fix-up of its ``ex2.approx`` (3 of ~12 instructions per token); the interpreter
    has no libdevice and takes ``tl.exp``."""
    y = x * inv_t - ymax
    if FAST_EXP:
        return libdevice.exp2(y * 1.4426950408889634)
    else:
        return tl.exp(y)


@triton.jit
def _sum2(v):
    return tl.sum(tl.sum(v, axis=1), axis=0)


@triton.jit
def _mark_groups(words_ptr, keep, start, n_groups, ROWS: tl.constexpr, GROUP: tl.constexpr):
    """Write one int8 word per group of the [ROWS, GROUP] tile at column ``start``: bit c set
    if column c of the group is kept. Returns 1 per group that keeps a column, [ROWS] int32."""
    bits = tl.sum(tl.where(keep, 1 << tl.arange(0, GROUP)[None, :], 0), axis=1)
    group = start // GROUP + tl.arange(0, ROWS)
    tl.store(words_ptr + group, bits.to(tl.int8), mask=group < n_groups)
    return (bits != 0).to(tl.int32)


@triton.jit
def _list_groups(words_ptr, n_groups, list_ptr, GROUP: tl.constexpr, CAP: tl.constexpr,
                 WORDS: tl.constexpr):
    """After ``_mark_groups`` (and a barrier): ``list_ptr[i] = group << GROUP | word`` for the
    groups with a nonzero word, in column order (the first ``CAP``); their number. Triton routes
    a scan and a scattered store through shared memory (~20 instructions per element), so this
    runs over the words, not the columns; a thread takes 16 words (one 16-byte load), counts
    them in its registers, and one scan over the threads places them."""
    base = tl.sum(tl.zeros([WORDS // 16], tl.int32), axis=0)
    for start in range(0, n_groups, WORDS):
        group = start + tl.arange(0, WORDS // 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
        word = tl.load(words_ptr + group, mask=group < n_groups, other=0).to(tl.int32) & 0xFF
        has = (word != 0).to(tl.int32)
        count = tl.sum(has, axis=1)
        pos = (base + (tl.cumsum(count, axis=0) - count)[:, None]
               + (tl.cumsum(has, axis=1) - has))
        tl.store(list_ptr + pos, (group << GROUP) | word, mask=(has != 0) & (pos < CAP))
        base += tl.sum(count, axis=0)
    return base


@triton.jit
def _row_max(row_ptr, n_cols, ROWS: tl.constexpr, GROUP: tl.constexpr):
    """(max of the row, 1 if it holds a NaN). Each step loads the next tile first."""
    top = tl.full([ROWS, GROUP], float("-inf"), tl.float32)
    nan = tl.zeros([ROWS, GROUP], tl.int32)
    nxt = _load_tile(row_ptr, 0, n_cols, ROWS, GROUP)
    for start in range(0, n_cols, ROWS * GROUP):
        x = nxt.to(tl.float32)
        nxt = _load_tile(row_ptr, start + ROWS * GROUP, n_cols, ROWS, GROUP)
        top = tl.maximum(top, x)
        nan = nan | (x != x).to(tl.int32)
    return tl.max(tl.max(top, axis=1), axis=0), tl.max(tl.max(nan, axis=1), axis=0)


@triton.jit
def _mass_above(row_ptr, n_cols, t, inv_t, ymax, words_ptr, n_groups, ROWS: tl.constexpr,
                GROUP: tl.constexpr, FAST_EXP: tl.constexpr, FIRST: tl.constexpr):
    """One pass over the row: (A(t), #{x > t}, Z, groups holding an x > t), the last two only if
    ``FIRST``, which also marks those groups (``_mark_groups``). Every A comes from the same
    per-lane accumulation and the same final sum, so A(t) is non-increasing in t, and A(-inf)
    is Z bit for bit."""
    mass = tl.zeros([ROWS, GROUP], tl.float32)
    total = tl.zeros([ROWS, GROUP], tl.float32)
    count = tl.zeros([ROWS, GROUP], tl.int32)
    hit = tl.zeros([ROWS], tl.int32)
    nxt = _load_tile(row_ptr, 0, n_cols, ROWS, GROUP)
    for start in range(0, n_cols, ROWS * GROUP):
        x = nxt.to(tl.float32)
        nxt = _load_tile(row_ptr, start + ROWS * GROUP, n_cols, ROWS, GROUP)
        e = _numerators(x, inv_t, ymax, FAST_EXP)
        above = x > t
        mass += tl.where(above, e, 0.0)
        count += above.to(tl.int32)
        if FIRST:
            total += e
            hit += _mark_groups(words_ptr, above, start, n_groups, ROWS, GROUP)
    return _sum2(mass), _sum2(count), _sum2(total), tl.sum(hit, axis=0)


@triton.jit
def _mark_between(row_ptr, n_cols, low, high, words_ptr, n_groups, ROWS: tl.constexpr,
                  GROUP: tl.constexpr):
    """Mark the groups holding a logit in (low, high] (``_mark_groups``)."""
    for start in range(0, n_cols, ROWS * GROUP):
        x = _load_tile(row_ptr, start, n_cols, ROWS, GROUP).to(tl.float32)
        _mark_groups(words_ptr, (x > low) & (x <= high), start, n_groups, ROWS, GROUP)


@triton.jit
def _cut(row_ptr, words_ptr, list_ptr, n_cols, n_groups, m, inv_t, top_p, log_2v,
         NEG_INF_KEY: tl.constexpr, DTYPE: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr,
         CAP: tl.constexpr, WORDS: tl.constexpr, FAST_EXP: tl.constexpr):
    """The cut of a row with finite max ``m`` and no NaN (module docstring, steps 2-4)."""
    ymax = m * inv_t
    hi = _key(m, DTYPE)
    lo = hi * 0 + NEG_INF_KEY
    slack = log_2v - tl.log(1.0 - top_p)
    probe = tl.minimum(tl.maximum(_key(m - slack / inv_t, DTYPE) - 1, lo), hi - 1)
    mass, n_above, z, n_hit = _mass_above(row_ptr, n_cols, _value(probe, DTYPE), inv_t, ymax,
                                          words_ptr, n_groups, ROWS, GROUP, FAST_EXP, True)
    p = top_p * z
    # Invariant: A(hi) = mass_hi < P <= A(lo); n_lo, n_hi: the tokens above value(lo), value(hi)
    # (n_lo = n_cols at lo = key(-inf) is an upper bound: -inf tokens are not above it).
    down = mass < p
    hi = tl.where(down, probe, hi)
    mass_hi = tl.where(down, mass, 0.0)
    n_hi = tl.where(down, n_above, 0)
    lo = tl.where(down, lo, probe)
    n_lo = tl.where(down, n_cols, n_above)
    # That pass marked the groups of (lo, hi] if the probe went up; use them if they fit.
    marked = (mass >= p) & (n_hit <= CAP)
    guess = _key(m - (slack - tl.log(z)) / inv_t, DTYPE) - 1
    # Whole-row steps while more than CAP tokens (so maybe more than CAP groups) are in (lo, hi].
    while (hi - lo > 1) & (n_lo - n_hi > CAP) & (not marked):
        mid = tl.where((guess > lo) & (guess < hi), guess, lo + ((hi - lo) >> 1))
        guess = lo
        mass, n_above, _, _ = _mass_above(row_ptr, n_cols, _value(mid, DTYPE), inv_t, ymax,
                                          words_ptr, n_groups, ROWS, GROUP, FAST_EXP, False)
        down = mass < p
        hi = tl.where(down, mid, hi)
        mass_hi = tl.where(down, mass, mass_hi)
        n_hi = tl.where(down, n_above, n_hi)
        lo = tl.where(down, lo, mid)
        n_lo = tl.where(down, n_lo, n_above)
    cut = _value(hi, DTYPE)
    if hi - lo > 1:
        if not marked:
            _mark_between(row_ptr, n_cols, _value(lo, DTYPE), cut, words_ptr, n_groups, ROWS,
                          GROUP)
        tl.debug_barrier()  # the words (and below, the list) come from other threads
        n_listed = _list_groups(words_ptr, n_groups, list_ptr, GROUP, CAP, WORDS)
        tl.debug_barrier()
        # The candidates (lo, hi] in registers: [CAP, GROUP], -inf elsewhere.
        slot = tl.arange(0, CAP)
        word = tl.load(list_ptr + slot, mask=slot < n_listed, other=0)
        lane = tl.arange(0, GROUP)[None, :]
        cols = (word >> GROUP)[:, None] * GROUP + lane
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        x = tl.where(((word[:, None] >> lane) & 1) != 0, x, float("-inf"))
        e = _numerators(x, inv_t, ymax, FAST_EXP)
        # A(t) = A(hi at the copy) + the candidates' mass above t.
        while hi - lo > 1:
            mid = lo + ((hi - lo) >> 1)
            mass = mass_hi + _sum2(tl.where(x > _value(mid, DTYPE), e, 0.0))
            down = mass < p
            hi = tl.where(down, mid, hi)
            lo = tl.where(down, lo, mid)
        # The smallest candidate at or above value(hi): a row value even where the sums in the
        # two orders disagree by a rounding at the low end.
        high = _value(hi, DTYPE)
        cut = tl.min(tl.min(tl.where(x >= high, x, float("inf")), axis=1), axis=0)
        cut = tl.where(cut == float("inf"), high, cut)
    return cut


@triton.jit
def _top_p_cut_kernel(logits_ptr, inv_temperature_ptr, top_p_ptr, out_ptr, words_ptr, list_ptr,
                      row_stride, n_cols, n_groups, log_2v, NEG_INF_KEY: tl.constexpr,
                      ROWS: tl.constexpr, GROUP: tl.constexpr, CAP: tl.constexpr,
                      WORDS: tl.constexpr, FAST_EXP: tl.constexpr, PDL: tl.constexpr = 0):
    previous_kernel_done(PDL)
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    inv_t = tl.load(inv_temperature_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    cut = tl.full((), float("-inf"), tl.float32)
    if (inv_t > 0.0) & (top_p < 1.0):  # false for NaNs too
        m, has_nan = _row_max(row_ptr, n_cols, ROWS, GROUP)
        if (has_nan == 0) & (m == float("inf")):
            cut = m
        elif (has_nan == 0) & (m > float("-inf")):
            cut = _cut(row_ptr, words_ptr + row.to(tl.int64) * n_groups,
                       list_ptr + row.to(tl.int64) * CAP, n_cols, n_groups, m, inv_t, top_p,
                       log_2v, NEG_INF_KEY, logits_ptr.dtype.element_ty, ROWS, GROUP, CAP, WORDS,
                       FAST_EXP)
    tl.store(out_ptr + row, cut)


def _check(logits: torch.Tensor, inv_temperature: torch.Tensor, top_p: torch.Tensor) -> None:
    check_logit_rows("top_p_cut", logits, MAX_VOCAB, {
        "inv_temperature": (inv_temperature, torch.float32), "top_p": (top_p, torch.float32)})


def _launch(logits: torch.Tensor, inv_temperature: torch.Tensor, top_p: torch.Tensor,
            log_2v: float | None = None) -> torch.Tensor:
    """Run the kernel on checked inputs. ``log_2v`` replaces ``ln(2V)`` in the first probe (tests
    use it to send the probe above the cut)."""
    rows, n_cols = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    inv_temperature, top_p = inv_temperature.contiguous(), top_p.contiguous()
    group = 16 // logits.element_size()  # columns per 16-byte load
    block = min(BLOCK, max(16 * group, triton.next_power_of_2(n_cols)))
    n_groups = triton.cdiv(n_cols, group)
    words = torch.empty((rows, n_groups), dtype=torch.int8, device=logits.device)
    listed = torch.empty((rows, CAP), dtype=torch.int32, device=logits.device)
    with launch_guard(_top_p_cut_kernel, logits, inv_temperature, top_p):
        _top_p_cut_kernel[(rows,)](
            logits, inv_temperature, top_p, out, words, listed, logits.stride(0), n_cols,
            n_groups, math.log(2.0 * n_cols) if log_2v is None else log_2v,
            NEG_INF_KEY=_NEG_INF_KEY[logits.dtype], ROWS=block // group, GROUP=group, CAP=CAP,
            WORDS=min(WORDS, max(256, triton.next_power_of_2(n_groups))),
            FAST_EXP=not isinstance(_top_p_cut_kernel, InterpretedFunction),
            num_warps=NUM_WARPS, enable_fp_fusion=False, **pdl(logits))
    return out


@torch.library.custom_op("adp::top_p_cut", mutates_args=())
def top_p_cut(logits: torch.Tensor, inv_temperature: torch.Tensor,
              top_p: torch.Tensor) -> torch.Tensor:
    """fp32 ``[B]``: per row of ``[B, V]`` logits, the logit of the last token top-p keeps under
    the row's temperature (``reference.top_p_min_logit``'s answer, without sorting: module
    docstring; CPU tensors while Triton compiles: ``reference.top_p_cut``); -inf for greedy rows (``inv_temperature == 0``) and ``top_p >= 1``.
    ``inv_temperature`` and ``top_p`` fp32 ``[B]`` on the logits' device."""
    _check(logits, inv_temperature, top_p)
    if eager_on_cpu(_top_p_cut_kernel, logits):
        return reference.top_p_cut(logits, inv_temperature, top_p)
    return _launch(logits, inv_temperature, top_p)


@top_p_cut.register_fake
def _(logits: torch.Tensor, inv_temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    _check(logits, inv_temperature, top_p)
    return logits.new_empty(logits.shape[:1], dtype=torch.float32)
