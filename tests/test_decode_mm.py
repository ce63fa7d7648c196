"""``adp.decode_mm`` (runtime/kernels/decode_mm.py) and the pass that uses it
(runtime/lower/decode_mm.py): the kernel's tiles, split-K sums and row buckets against
``torch.mm``, and which projections the pass replaces."""

import pytest
import torch

from adp_pass.graph_record import graph_record
from adp_pass.runtime.kernels import decode_mm as dmm
from adp_pass.runtime.lower.decode_mm import use_decode_mm

aten = torch.ops.aten
Config = dmm.DecodeMMConfig
# The kernel compiled on a GPU, interpreted on a CPU-only machine. fp32 on the interpreter only:
# compiled, tl.dot multiplies fp32 in tf32 (the pass never sends fp32 weights to the kernel).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] + ([torch.float32] if DEVICE == "cpu" else [])


@pytest.mark.parametrize(
    "rows, n, k, config",
    [
        (1, 64, 96, Config(32, 32, 1, 2)),  # one row; k not a multiple of the tile
        (5, 80, 128, Config(32, 32, 3, 2)),  # n past the last tile; an uneven split of k
        (16, 64, 256, Config(64, 64, 4, 3)),
        (33, 96, 64, Config(64, 32, 2, 2)),  # rows pad to 64
        (64, 128, 64, Config(128, 64, 1, 2)),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_mm(rows, n, k, config, dtype):
    gen = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    got = dmm.launch(x.to(DEVICE), weight.to(DEVICE), config)
    assert got.shape == (rows, n) and got.dtype == dtype
    assert_rounded_product(got, x.to(DEVICE), weight)


def assert_rounded_product(got, x, weight):
    """fp32 accumulation rounded once to the output dtype: within the dtype's unit roundoff of
    the exact product, plus the fp32 summation error bound (k * eps * |x| @ |W|.T)."""
    unit = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[got.dtype]
    x, weight, got = x.double(), weight.double().to(x.device), got.double().to(x.device)
    exact = x @ weight.t()
    bound = exact.abs() * unit + x.shape[1] * 2**-24 * (x.abs() @ weight.abs().t())
    assert ((got - exact).abs() <= bound + 1e-30).all(), (got - exact).abs().max()


def test_split_k_sums_in_a_fixed_order():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 200, generator=gen).to(DEVICE, torch.bfloat16)
    weight = torch.randn(48, 200, generator=gen).to(DEVICE, torch.bfloat16)
    first = dmm.launch(x, weight, Config(32, 32, 4, 2))
    assert torch.equal(first, dmm.launch(x, weight, Config(32, 32, 4, 2)))


def test_row_buckets_pick_only_tuned_entries(monkeypatch):
    small, mid = Config(64, 256, 1, 4), Config(64, 128, 1, 6)
    monkeypatch.setattr(dmm, "TUNED", {(128, 64): {16: small, 32: mid}, (96, 64): {32: mid}})
    assert [dmm.config_for(r, 128, 64) for r in (1, 16, 17, 32, 33, 64, 65)] == [
        small, small, mid, mid, None, None, None]
    # a bucket covers only its own range: 16 rows of (96, 64) were not tuned -> cuBLAS
    assert [dmm.config_for(r, 96, 64) for r in (16, 17)] == [None, mid]
    assert dmm.config_for(8, 4096, 4096 + 1) is None


def test_op_on_cpu_is_torch_mm():
    x, weight = torch.randn(3, 8), torch.randn(5, 8)
    assert torch.equal(torch.ops.adp.decode_mm(x, weight), torch.mm(x, weight.t()))
    with pytest.raises(ValueError, match="x \\[M, K\\] and weight \\[N, K\\]"):
        torch.ops.adp.decode_mm(x, torch.randn(5, 9))


class _Projections(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tuned = torch.nn.Parameter(torch.randn(128, 64), requires_grad=False)
        self.untuned = torch.nn.Parameter(torch.randn(32, 64), requires_grad=False)

    def forward(self, x):
        return torch.mm(x, self.tuned.t()), torch.mm(x, self.untuned.t())


def _mm_graph(module):
    from torch.fx.experimental.proxy_tensor import make_fx

    # An aten graph with get_attr weights, as the runtime's rewritten graphs are.
    return make_fx(module)(torch.randn(4, 64).to(module.tuned.dtype))


def test_pass_replaces_only_tuned_half_precision_weights(monkeypatch):
    monkeypatch.setattr(dmm, "TUNED", {(128, 64): {16: Config(64, 64, 1, 3)}})
    # fp32 weights stay on torch.mm: the kernel would multiply in tf32.
    assert use_decode_mm(_mm_graph(_Projections())) == 0
    module = _Projections().to(torch.bfloat16)
    gm = _mm_graph(module)
    assert use_decode_mm(gm) == 1
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.adp.decode_mm.default) == 1
    assert ops.count(aten.mm.default) == 1 and ops.count(aten.t.default) == 1
    assert graph_record(gm).decode_mm == 1
    x = torch.randn(4, 64).to(torch.bfloat16)
    for got, want in zip(gm(x), module(x)):
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a GPU")
def test_every_tuned_entry_on_the_gpu():
    # Each tuned (shape, bucket) compiled at its bucket's smallest and largest row counts.
    gen = torch.Generator(device="cuda").manual_seed(0)
    for (n, k), by_bucket in dmm.TUNED.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        for bucket in by_bucket:
            previous = dmm.ROW_BUCKETS.index(bucket) - 1
            smallest = dmm.ROW_BUCKETS[previous] + 1 if previous >= 0 else 1
            for rows in (smallest, bucket):
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                assert_rounded_product(torch.ops.adp.decode_mm(x, weight), x, weight)
