"""``adp.sample_tokens`` (runtime/kernels/sample.py): greedy rows give ``torch.argmax``, sampled
rows a Gumbel-max draw keyed by (seed, counter, column) only. The kernel and the eager reference
(``reference.sample_tokens``) agree bit for bit: the same tokens, and the same noise. On CPU the
kernels run under the Triton interpreter, mostly with narrow pieces (``CHUNK`` patched) so that
small vocabularies still span several of them."""


import pytest
import torch
import triton
import triton.language as tl

from adp_pass.runtime.kernels import reference as R
from adp_pass.runtime.kernels import sample as S

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("inf")
# Seeds and counters whose halves are all different: negative, above 2**32, the int64 limits.
SEEDS = [0, 1, -1, 2**63 - 1, -2**63, 12345678901234, 2**32, -2**32, 7]
COUNTERS = [0, 0, 2**32 - 1, 2**32, 2**63 - 1, 7, 99, 2**40 + 5, 1]


@pytest.fixture
def chunk(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pieces of 64 columns (the op reads ``sample.CHUNK`` at each call)."""
    monkeypatch.setattr(S, "CHUNK", 64)
    return 64


def _params(rows: int, inv_temperature: list[float], min_logit: list[float], seed: int = 0):
    """fp32 inv_temperature and min_logit, int64 seeds and counters, cycling through the lists."""
    take = lambda values: [values[(seed + r) % len(values)] for r in range(rows)]  # noqa: E731
    return (torch.tensor(take(inv_temperature), dtype=torch.float32),
            torch.tensor(take(min_logit), dtype=torch.float32),
            torch.tensor(take(SEEDS), dtype=torch.int64),
            torch.tensor(take(COUNTERS), dtype=torch.int64))


def _on_device(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(DEVICE) for t in tensors)


def _sample(logits, *params) -> torch.Tensor:
    """The op on DEVICE (interpreted on CPU), as a CPU tensor."""
    return torch.ops.adp.sample_tokens(*_on_device(logits, *params)).cpu()


@triton.jit
def _noise_kernel(seed_ptr, counter_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    k0, k1 = S._sample_keys(tl.load(seed_ptr + row), tl.load(counter_ptr + row))
    tl.store(out_ptr + row * n_cols + cols, S._gumbel_noise(cols, k0, k1), mask=cols < n_cols)


def test_noise_is_the_reference_bit_for_bit():
    seeds, counters = torch.tensor(SEEDS), torch.tensor(COUNTERS)
    n_cols = 3000
    out = torch.empty(len(SEEDS), n_cols, device=DEVICE)
    _noise_kernel[(len(SEEDS), triton.cdiv(n_cols, 1024))](
        *_on_device(seeds, counters), out, n_cols, BLOCK=1024, enable_fp_fusion=False)
    want = R.gumbel_noise(seeds, counters, n_cols)
    assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32))
    # Standard Gumbel: mean 0.5772, standard deviation 1.2825 (27,000 draws: +-0.008, +-0.01).
    assert abs(want.mean().item() - 0.5772) < 0.03 and abs(want.std().item() - 1.2825) < 0.03
    assert -2.82 < want.min().item() and want.max().item() < 16.64


def test_the_log_is_within_an_ulp():
    # Every 7th u the hash can give (of 2**23), the last 1000 (-log(u) near 0), and their
    # -log(u): both logs the noise takes. (All of them pass; this is quicker.)
    m = torch.cat([torch.arange(0, 2**23, 7), torch.arange(2**23 - 1000, 2**23)])
    u = (m.float() + 0.5) * 2.0**-23
    for x in (u, -R.sample_log(u)):
        got, want = R.sample_log(x).double(), torch.log(x.double())
        nearest = want.float().abs()
        ulp = (torch.nextafter(nearest, torch.tensor(INF)) - nearest).double()
        assert ((got - want).abs() <= ulp).all()


@pytest.mark.parametrize("dtype,rows,vocab,width", [
    (torch.float32, 6, 200, 64), (torch.bfloat16, 6, 200, 64), (torch.float16, 6, 200, 64),
    (torch.float32, 1, 100, 64), (torch.bfloat16, 2, 333, 16),  # 21 pieces: over 16 row lanes
])
def test_kernel_matches_reference(monkeypatch, dtype, rows, vocab, width):
    monkeypatch.setattr(S, "CHUNK", width)
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype)
    inv_t, min_logit, seeds, counters = _params(
        rows, [1.0, 0.0, 1 / 0.7, 5.0, 0.0, 0.1], [-INF, 0.5, -INF, 1.0, 2.0, 3.0, -INF], seed=rows)
    min_logit[-1] = logits[-1].float().max()  # only the maximum is left
    got = _sample(logits, inv_t, min_logit, seeds, counters)
    want = R.sample_tokens(logits, inv_t, min_logit, seeds, counters)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, want)
    x = logits.float()
    assert (x[torch.arange(rows), got] >= torch.where(inv_t == 0, -INF, min_logit)).all()


def test_several_real_pieces_and_strided_rows():
    # The real CHUNK: three pieces, the last one partial; rows strided wider than the vocabulary,
    # and a transposed (column-strided) copy that the op makes contiguous.
    vocab = 2 * S.CHUNK + 37
    gen = torch.Generator().manual_seed(1)
    wide = (2 * torch.randn(4, vocab + 8, generator=gen)).to(torch.bfloat16)
    logits = wide[:, 4:4 + vocab]
    params = _params(4, [1.0, 0.0, 1.5, 0.8], [-INF, -INF, 1.0, 2.0])
    want = R.sample_tokens(logits, *params)
    assert torch.equal(_sample(logits, *params), want)
    assert torch.equal(_sample(logits.t().contiguous().t(), *params), want)


def test_greedy_rows_are_torch_argmax(chunk):
    vocab = 3 * chunk + 5
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(2))
    logits[0, chunk + 3] = logits[0, 2 * chunk + 1] = 50.0  # tie across pieces: the first
    logits[1, 7] = logits[1, 9] = 60.0  # tie in one piece
    logits[2, chunk + 5] = logits[2, 2 * chunk] = float("nan")  # NaN beats +inf before it
    logits[2, 3] = INF
    logits[3] = -INF  # all -inf: index 0
    logits[4, vocab - 1] = 70.0  # in the partial last piece
    # Greedy rows read neither min_logit (here above everything) nor seeds and counters.
    params = _params(6, [0.0], [100.0])
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        got = _sample(x, *params)
        assert torch.equal(got, x.argmax(dim=-1))
        assert got.tolist()[:5] == [chunk + 3, 7, chunk + 5, 0, vocab - 1]
        assert torch.equal(got, R.sample_tokens(x, *params))


def test_nan_scores_win_in_sampled_rows(chunk):
    logits = torch.randn(3, 2 * chunk, generator=torch.Generator().manual_seed(3))
    logits[0, chunk + 1] = logits[0, chunk + 9] = float("nan")  # the first NaN, however scaled
    logits[1, 5] = float("nan")  # not below any cut (NaN < m is false), so it stays and wins
    logits[2] = -INF  # every score -inf: index 0, as argmax
    params = _params(3, [1.0, 2.0, 1.0], [-INF, 10.0, -INF])
    got = _sample(logits, *params)
    assert got.tolist() == [chunk + 1, 5, 0]
    assert torch.equal(got, R.sample_tokens(logits, *params))


def test_a_rows_token_ignores_its_batch(chunk):
    gen = torch.Generator().manual_seed(4)
    row = 2 * torch.randn(1, 150, generator=gen)
    row_params = (torch.tensor([1.3]), torch.tensor([0.0]), torch.tensor([2**40 + 17]),
                  torch.tensor([12]))
    tokens = []
    for size, at in ((1, 0), (3, 2), (5, 1)):
        logits = 2 * torch.randn(size, 150, generator=gen)
        params = list(_params(size, [0.9, 0.0, 2.0], [-INF, 1.0], seed=size))
        logits[at] = row
        for p, value in zip(params, row_params):
            p[at] = value
        tokens.append(_sample(logits, *params)[at].item())
    assert len(set(tokens)) == 1
    assert tokens[0] == R.sample_tokens(row, *row_params).item()


def test_min_logit_cut(chunk):
    rows, vocab = 12, 2 * chunk + 10
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(5))
    top = logits.max(dim=-1).values
    logits[1::2, 3] = top[1::2]  # odd rows: the maximum twice
    cut = torch.where(torch.arange(rows) % 2 == 0, torch.tensor(0.5), top)  # odd rows: max only
    params = (torch.full((rows,), 2.0), cut, torch.full((rows,), 99, dtype=torch.int64),
              torch.arange(rows, dtype=torch.int64))
    got = _sample(logits, *params)
    assert torch.equal(got, R.sample_tokens(logits, *params))
    assert (logits[torch.arange(rows), got] >= cut).all()
    ties = logits[1::2] == top[1::2, None]
    assert ties[torch.arange(rows // 2), got[1::2]].all()
    # Over many counters, both copies of the maximum come up and nothing below the cut does.
    many = 400
    ref = R.sample_tokens(logits[1:2].expand(many, -1), torch.full((many,), 2.0),
                          cut[1:2].expand(many), torch.full((many,), 99), torch.arange(many))
    assert set(ref.tolist()) == set(ties[0].nonzero().flatten().tolist())
    ref = R.sample_tokens(logits[:1].expand(many, -1), torch.full((many,), 2.0),
                          torch.full((many,), 0.5), torch.full((many,), 99), torch.arange(many))
    assert (logits[0, ref] >= 0.5).all() and len(set(ref.tolist())) > 5


@pytest.mark.parametrize("cut", [False, True])
def test_frequencies_follow_softmax(cut):
    # 4000 counters of one seed: the reference's token frequencies against
    # softmax(logits * inv_temperature), renormalised over the tokens the cut keeps. The draws
    # are fixed, so this either always passes or always fails; the bound is the chi-square
    # statistic's 1 - 1e-5 quantile for 7 degrees of freedom (or 4 with the cut), 35.3 (28.5).
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.25])
    inv_t, n = 1 / 0.7, 4000
    min_logit = 0.25 if cut else -INF
    seed = -987654321 if cut else 5
    tokens = R.sample_tokens(logits.expand(n, -1), torch.full((n,), inv_t),
                             torch.full((n,), min_logit), torch.full((n,), seed), torch.arange(n))
    kept = logits >= min_logit
    probs = torch.softmax(torch.where(kept, logits * inv_t, -INF), dim=-1).double()
    counts = torch.bincount(tokens, minlength=8).double()
    assert (counts[~kept] == 0).all()
    expected = n * probs[kept]
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
    assert chi2 < (28.5 if cut else 35.3), (counts.tolist(), expected.tolist())
    assert (counts / n - probs).abs().max().item() < 0.035  # 4.5 sigma at p = 0.35


def test_draws_change_with_counter_and_seed():
    vocab = 1000  # one piece of the real CHUNK
    flat = torch.zeros(16, vocab)
    one = lambda v: torch.full((16,), v)  # noqa: E731
    by_counter = _sample(flat, one(1.0), one(-INF), torch.full((16,), 3), torch.arange(16))
    by_seed = _sample(flat, one(1.0), one(-INF), torch.arange(16) * 2**32 - 5, torch.full((16,), 3))
    assert len(set(by_counter.tolist())) > 10 and len(set(by_seed.tolist())) > 10
    # Every half of the seed and of the counter matters.
    base = (2**35 + 11, 2**33 + 4)
    variants = [base, (base[0] ^ 1, base[1]), (base[0] ^ 2**40, base[1]), (base[0], base[1] ^ 1),
                (base[0], base[1] ^ 2**50)]
    noise = R.gumbel_noise(torch.tensor([s for s, _ in variants]),
                           torch.tensor([c for _, c in variants]), vocab)
    for i in range(1, len(variants)):
        assert (noise[i] != noise[0]).float().mean() > 0.99


def test_bad_inputs_raise():
    logits = torch.randn(2, 10)
    good = [torch.ones(2), torch.full((2,), -INF), torch.zeros(2, dtype=torch.int64),
            torch.zeros(2, dtype=torch.int64)]
    op = torch.ops.adp.sample_tokens

    def call(logits=logits, index=None, value=None):
        args = list(good)
        if index is not None:
            args[index] = value
        return op(logits, *args)

    with pytest.raises(ValueError, match="rows, vocab"):
        call(logits[0])
    with pytest.raises(ValueError, match="logits must be float32, bfloat16 or float16"):
        call(logits.long())
    with pytest.raises(ValueError, match="empty vocabulary"):
        call(logits[:, :0])
    with pytest.raises(ValueError, match=r"inv_temperature must have shape \(2,\)"):
        call(index=0, value=torch.ones(3))
    with pytest.raises(ValueError, match="min_logit must be torch.float32"):
        call(index=1, value=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="seeds must be torch.int64"):
        call(index=2, value=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="counters must have shape"):
        call(index=3, value=torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="counters is on meta"):
        call(index=3, value=torch.zeros(2, dtype=torch.int64, device="meta"))


def test_empty_batch_opcheck_and_eager_fallback(monkeypatch):
    params = _on_device(*_params(3, [1.0, 0.0], [-INF, 0.0]))
    logits = torch.randn(3, 40, device=DEVICE)
    assert S.sample_tokens(logits[:0], *(p[:0] for p in params)).shape == (0,)
    torch.library.opcheck(torch.ops.adp.sample_tokens.default, (logits, *params))
    # On a GPU machine Triton compiles, and CPU tensors go to the reference.
    monkeypatch.setattr(S, "eager_on_cpu", lambda kernel, *tensors: True)
    cpu = [t.cpu() for t in (logits, *params)]
    assert torch.equal(S.sample_tokens(*cpu), R.sample_tokens(*cpu))
    with pytest.raises(ValueError, match="seeds must be"):
        S.sample_tokens(cpu[0], cpu[1], cpu[2], cpu[3].int(), cpu[4])


def _qwen_sized_batch():
    """64 rows of Qwen3's 151,936 bf16 logits: greedy, plain and cut sampled rows."""
    rows, vocab = 64, 151936
    gen = torch.Generator().manual_seed(6)
    logits = (4 * torch.randn(rows, vocab, generator=gen)).to(torch.bfloat16)
    inv_t = torch.tensor([0.0, 1.0, 1 / 0.7, 1 / 0.3] * (rows // 4))
    min_logit = torch.where(torch.arange(rows) % 3 == 0, torch.tensor(8.0), torch.tensor(-INF))
    seeds = torch.randint(-2**63, 2**63 - 1, (rows,), generator=gen)
    counters = torch.randint(0, 2**40, (rows,), generator=gen)
    return logits, inv_t, min_logit, seeds, counters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_the_cpu_reference_at_qwen_size():
    inputs = _qwen_sized_batch()
    got = torch.ops.adp.sample_tokens(*(t.cuda() for t in inputs)).cpu()
    scores = R.sample_scores(*inputs)
    best = scores.max(dim=-1).values
    chosen = scores.gather(1, got[:, None]).squeeze(1)
    # The design gives the same bits on every device; allow only near-ties all the same.
    assert ((best - chosen).abs() <= 1e-5 * best.abs()).all(), (got != scores.argmax(-1)).sum()
    assert (got == scores.argmax(dim=-1)).float().mean() > 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_with_new_counters():
    logits, inv_t, min_logit, seeds, counters = (t.cuda() for t in _qwen_sized_batch())
    out = torch.ops.adp.sample_tokens(logits, inv_t, min_logit, seeds, counters)  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.adp.sample_tokens(logits, inv_t, min_logit, seeds, counters)
    for step in range(3):
        counters.add_(1)
        graph.replay()
        want = R.sample_tokens(*(t.cpu() for t in (logits, inv_t, min_logit, seeds, counters)))
        assert (out.cpu() == want).float().mean() > 0.95, step
