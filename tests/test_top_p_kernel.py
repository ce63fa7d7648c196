"""``adp.top_p_cut`` (runtime/kernels/top_p.py): the top-p cut by bisection, no sort, against the
sort-based ``reference.top_p_min_logit``. They may differ only where the mass comparison at the
cut is within fp32 rounding (the sums run in different orders); the checks below accept a
different answer only when it is also a correct cut within 1e-5 of ``top_p`` in float64. On CPU
the kernel runs under the Triton interpreter with small vocabularies; ``CAP`` (read at each call)
is patched down to send rows through the whole-row bisection passes."""

import math

import pytest
import torch

from adp_pass.runtime.kernels import reference as R
from adp_pass.runtime.kernels import top_p as T

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF, NAN = float("inf"), float("nan")
# Per row: (inverse temperature, top_p), cycled over the rows of a batch.
SETTINGS = [(1.0, 0.9), (0.5, 0.5), (2.0, 0.999), (1 / 0.7, 0.1), (1.0, 1e-6), (1.0, 0.95),
            (3.0, 0.8), (0.25, 0.7), (1.0, 0.99), (1 / 0.6, 0.9)]


def _params(rows: int, settings=SETTINGS) -> tuple[torch.Tensor, torch.Tensor]:
    take = [settings[r % len(settings)] for r in range(rows)]
    return (torch.tensor([s for s, _ in take], dtype=torch.float32),
            torch.tensor([p for _, p in take], dtype=torch.float32))


def _cut(logits, inv_t, top_p) -> torch.Tensor:
    """The op on DEVICE (interpreted on CPU), as a CPU tensor."""
    return torch.ops.adp.top_p_cut(logits.to(DEVICE), inv_t.to(DEVICE), top_p.to(DEVICE)).cpu()


def _masses(row: torch.Tensor, inv_t: float, cut: float) -> tuple[float, float]:
    """float64 probability mass of the tokens above ``cut`` and at or above it."""
    x = row.double()
    probs = torch.softmax(row.float().double() * inv_t, dim=-1)
    return probs[x > cut].sum().item(), probs[x >= cut].sum().item()


def _is_a_cut(row: torch.Tensor, inv_t: float, top_p: float, cut: float, tol: float) -> bool:
    """``cut`` is one of the row's values, the tokens above it hold less than ``top_p`` and those
    at or above it at least ``top_p`` (within ``tol``; top_p <= 0: the maximum)."""
    if not (row.float() == cut).any():
        return False
    above, at_or_above = _masses(row, inv_t, cut)
    if top_p <= 0:
        return cut == row.float().max().item()
    return above < top_p + tol and at_or_above >= top_p - tol


def _check_rows(logits, inv_t, top_p, got, want, tol=1e-5) -> int:
    """Every row: the reference's answer, or a cut within rounding (both answers then are).
    Returns the number of rows that differ from the reference."""
    differ = 0
    for r in range(logits.shape[0]):
        g, w = got[r].item(), want[r].item()
        if g == w:
            continue
        differ += 1
        s, p = inv_t[r].item(), top_p[r].item()
        assert _is_a_cut(logits[r], s, p, g, tol) and _is_a_cut(logits[r], s, p, w, tol), (
            f"row {r}: kernel {g}, reference {w}, inv_t {s}, top_p {p}, masses above/at or "
            f"above the kernel's cut {_masses(logits[r], s, g)}, the reference's "
            f"{_masses(logits[r], s, w)}")
    return differ


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of different spreads, a few with a peak, one of small integers (ties everywhere)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * (0.5 + 4 * torch.rand(rows, 1, generator=g))
    peaked = torch.randint(0, vocab, (rows, 3), generator=g)
    x[::3].scatter_add_(1, peaked[::3], torch.full((len(x[::3]), 3), 12.0))
    x[1] = torch.randint(-4, 4, (vocab,), generator=g).float()
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_the_sort_based_reference(dtype):
    logits = _logits(10, 1500, dtype, seed=1)
    inv_t, top_p = _params(10)
    got = _cut(logits, inv_t, top_p)
    assert got.dtype == torch.float32 and got.shape == (10,)
    want = R.top_p_min_logit(logits, inv_t, top_p)
    assert _check_rows(logits, inv_t, top_p, got, want) <= 1
    # top_p 1e-6 keeps only the maximum.
    assert got[4].item() == logits[4].float().max().item()


@pytest.mark.parametrize("cap", [1, 16])
def test_whole_row_passes_when_the_candidates_do_not_fit(cap, monkeypatch):
    # CAP 1: the bisection runs on whole rows until (lo, hi] holds one token, or ends there
    # (the integer row: thousands of ties at the cut); CAP 16: it hands over to the registers.
    monkeypatch.setattr(T, "CAP", cap)
    for dtype, vocab, seed in ((torch.bfloat16, 2000, 2), (torch.float32, 700, 3)):
        logits = _logits(6, vocab, dtype, seed)
        inv_t, top_p = _params(6, SETTINGS[::-1])
        got = _cut(logits, inv_t, top_p)
        assert _check_rows(logits, inv_t, top_p, got, R.top_p_min_logit(logits, inv_t, top_p)) <= 1


def test_first_probe_above_the_cut():
    # The first probe normally lies below the cut; sent to just below the maximum instead, it is
    # an ordinary bisection step the other way, with the same answer.
    logits = _logits(6, 1200, torch.bfloat16, seed=4).to(DEVICE)
    inv_t, top_p = (t.to(DEVICE) for t in _params(6))
    want = torch.ops.adp.top_p_cut(logits, inv_t, top_p)
    if T.eager_on_cpu(T._top_p_cut_kernel, logits):
        pytest.skip("Triton compiles here and there is no GPU: the op runs the reference")
    for log_2v in (-100.0, 200.0):  # the probe at the top, far below the row
        assert torch.equal(T._launch(logits, inv_t, top_p, log_2v=log_2v), want)


def test_the_cut_is_a_row_value_holding_top_p():
    logits = _logits(10, 1000, torch.float32, seed=5)
    inv_t, top_p = _params(10)
    got = _cut(logits, inv_t, top_p)
    for r in range(10):
        assert _is_a_cut(logits[r], inv_t[r].item(), top_p[r].item(), got[r].item(), 1e-6), r


def test_rows_that_keep_everything_and_special_values():
    vocab = 300
    logits = torch.randn(12, vocab, generator=torch.Generator().manual_seed(6)) * 2
    logits[5, 17] = NAN          # a NaN: keep everything (the sampler then picks the NaN)
    logits[6, 40] = INF          # +inf and no NaN: only the +inf tokens
    logits[7] = -INF             # all -inf
    logits[8, ::2] = -INF        # -inf tokens in a finite row take no mass
    logits[9] = 0.0              # all equal: the cut is their value
    inv_t = torch.tensor([0.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, NAN])
    top_p = torch.tensor([0.5, 1.0, NAN, 0.5, 0.0, 0.9, 0.9, 0.9, 0.9, 0.3, -2.0, 0.5])
    got = _cut(logits, inv_t, top_p)
    # greedy, top_p 1, top_p NaN, inv_t < 0, inv_t NaN: -inf without reading the row.
    for r in (0, 1, 2, 3, 11):
        assert got[r].item() == -INF, r
    assert got[4].item() == logits[4].max().item()  # top_p 0: the first token stays
    assert got[10].item() == logits[10].max().item()
    assert got[5].item() == -INF and got[6].item() == INF and got[7].item() == -INF
    assert got[9].item() == 0.0
    special = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11]  # the op's CPU fallback agrees on them
    assert torch.equal(R.top_p_cut(logits, inv_t, top_p)[special], got[special])
    want = R.top_p_min_logit(logits, inv_t, top_p)
    finite = [0, 1, 2, 3, 4, 8, 9, 10, 11]
    assert _check_rows(logits[finite], inv_t[finite], top_p[finite], got[finite],
                       want[finite]) == 0
    # One column; and rows strided wider than the vocabulary (a column slice).
    one = torch.tensor([[3.5], [-1.0]])
    assert _cut(one, torch.ones(2), torch.full((2,), 0.9)).tolist() == [3.5, -1.0]
    wide = torch.randn(3, vocab + 8)
    view = wide[:, 4:4 + vocab]
    inv_t, top_p = torch.ones(3), torch.full((3,), 0.8)
    assert torch.equal(_cut(view, inv_t, top_p), _cut(view.contiguous(), inv_t, top_p))
    assert torch.ops.adp.top_p_cut(wide[:0].to(DEVICE), inv_t[:0].to(DEVICE),
                                   top_p[:0].to(DEVICE)).shape == (0,)


def test_bad_inputs_raise():
    logits, inv_t, top_p = torch.randn(2, 10), torch.ones(2), torch.full((2,), 0.9)
    op = torch.ops.adp.top_p_cut
    with pytest.raises(ValueError, match="rows, vocab"):
        op(logits[0], inv_t, top_p)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        op(logits.double(), inv_t, top_p)
    with pytest.raises(ValueError, match="empty vocabulary"):
        op(logits[:, :0], inv_t, top_p)
    with pytest.raises(ValueError, match="inv_temperature must have shape"):
        op(logits, inv_t[:1], top_p)
    with pytest.raises(ValueError, match="top_p must have shape"):
        op(logits, inv_t, top_p[:, None])
    with pytest.raises(ValueError, match="top_p must be torch.float32"):
        op(logits, inv_t, top_p.double())
    with pytest.raises(ValueError, match="inv_temperature must be torch.float32"):
        op(logits, inv_t.half(), top_p)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on"):
            op(logits.cuda(), inv_t, top_p.cuda())
    torch.library.opcheck(torch.ops.adp.top_p_cut.default,
                          (logits.to(DEVICE), inv_t.to(DEVICE), top_p.to(DEVICE)))


def _qwen_sized_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """64 rows of 151,936 bf16 logits on CUDA: flat rows and rows with a few clear favourites,
    over the usual temperatures and top_p values."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows, vocab = 64, 151936
    x = torch.randn(rows, vocab, device="cuda", generator=g) * 2.5
    top = torch.randint(0, vocab, (rows, 8), device="cuda", generator=g)
    spread = torch.arange(rows, device="cuda")[:, None] / 3  # row 0 flat, row 63 up to +21
    x.scatter_add_(1, top, torch.rand(rows, 8, device="cuda", generator=g) * spread)
    settings = [(1 / t, p) for t in (0.6, 0.7, 1.0, 1.3) for p in (0.5, 0.8, 0.9, 0.95)]
    inv_t, top_p = _params(rows, settings)
    return x.bfloat16(), inv_t.cuda(), top_p.cuda()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_qwen_size_matches_the_reference():
    logits, inv_t, top_p = _qwen_sized_batch()
    got = torch.ops.adp.top_p_cut(logits, inv_t, top_p)
    want = R.top_p_min_logit(logits, inv_t, top_p)
    differ = (got != want).nonzero().flatten().tolist()
    for r in differ:  # only where the reference's mass at its cut is within 1e-5 of top_p
        assert _is_a_cut(logits[r].cpu(), inv_t[r].item(), top_p[r].item(), want[r].item(),
                         1e-5 * top_p[r].item()), r
        assert _is_a_cut(logits[r].cpu(), inv_t[r].item(), top_p[r].item(), got[r].item(),
                         1e-5 * top_p[r].item()), r
    assert len(differ) <= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_with_new_logits():
    logits, inv_t, top_p = _qwen_sized_batch(seed=1)
    static = logits.clone()
    torch.ops.adp.top_p_cut(static, inv_t, top_p)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.adp.top_p_cut(static, inv_t, top_p)
    for seed in (2, 3):
        fresh, _, _ = _qwen_sized_batch(seed)
        static.copy_(fresh)
        graph.replay()
        assert torch.equal(out, torch.ops.adp.top_p_cut(fresh, inv_t, top_p))
    assert not math.isnan(out.sum().item())
