"""The FP8 kernels (runtime/kernels/fp8_quant.py, fp8_gemm.py) against the reference arithmetic
of adp_pass/fp8.py: quantization bit for bit, the block-scaled GEMM within fp32 summation error
plus one output ulp, on small odd shapes under the Triton interpreter (compiled on a GPU).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before the first triton import, as tests/conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import kernel_reference as ref  # noqa: E402
from adp_pass import fp8  # noqa: E402
from adp_pass.runtime import kernels as K  # noqa: E402
from adp_pass.runtime.kernels import fp8_gemm as G  # noqa: E402
from adp_pass.runtime.kernels import fp8_quant as Q  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E4M3 = torch.float8_e4m3fn
# Small tiles so the test shapes span several programs, K tiles and splits (the interpreter
# costs ~30 ms per program: no smaller than needed).
DECODE = G.Choice("decode", G.DecodeConfig(block_n=64, split_k=2, num_stages=2))
# the decode kernel quantizing x itself (an option: measured slower than quantizing first)
DECODE_IN_KERNEL = G.Choice("decode", G.DecodeConfig(block_n=64, split_k=2, num_stages=2,
                                                     quantize_x_in_kernel=True))
PREFILL = G.Choice("triton", G.PrefillConfig(block_m=16, block_n=64, group_m=2, num_stages=2,
                                             num_warps=4))


@pytest.fixture(autouse=True, scope="module")
def interpreter_rounds_bf16_to_nearest_even():
    # The fused producers are compared with adp.rms_norm / adp.silu_mul, whose bf16 casts the
    # interpreter truncates unless patched (tests/test_kernels.py does the same).
    with pytest.MonkeyPatch.context() as mp:
        ref.patch_interpreter_bf16_rounding(mp)
        yield


@pytest.fixture
def poisoned(monkeypatch):
    """Every tensor the launches allocate starts as NaN (fp8: code 0x7F, e4m3's NaN)."""
    def output(shape, dtype, device):
        if dtype == E4M3:
            return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(E4M3)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(Q, "_output", output)
    monkeypatch.setattr(G, "_output", output)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def activation(shape, dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    """Rows of very different magnitudes, so groups get very different scales."""
    g = gen(seed)
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=g))
    return x.to(DEVICE, dtype)


def weight(n, k, seed=1, scale_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized weight whose tiles have different scales."""
    g = gen(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w *= torch.exp(torch.randn(math.ceil(n / 128), math.ceil(k / 128), generator=g)) \
        .repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    wq, scale = fp8.quantize_weight(w)
    return wq.to(DEVICE), scale.to(DEVICE, scale_dtype)


def assert_same_codes(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == E4M3 and got.shape == want.shape
    diff = got.cpu().view(torch.uint8) != want.cpu().view(torch.uint8)
    assert not diff.any(), (f"{int(diff.sum())}/{diff.numel()} codes differ, first at "
                            f"{diff.nonzero()[0].tolist()}")


def assert_quantized(got: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> None:
    """Bit for bit ``fp8.quantize_activation`` (computed on the CPU: IEEE division)."""
    want_q, want_s = fp8.quantize_activation(x.cpu())
    assert_same_codes(got[0], want_q)
    assert got[1].dtype == torch.float32 and torch.equal(got[1].cpu(), want_s)


def assert_quantized_within_an_ulp(got: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor
                                   ) -> None:
    """``fp8.quantize_activation`` up to an fp32 ulp of the input: scales within 4 ulps
    (relative 2^-21), and a code one e4m3 step away only where a value sat on a rounding
    midpoint (at most 1% of them); a wrong group, scale or rounding breaks either."""
    want_q, want_s = fp8.quantize_activation(x.cpu())
    scale = got[1].cpu()
    assert scale.dtype == torch.float32
    torch.testing.assert_close(scale, want_s, rtol=2**-21, atol=0)
    codes = got[0].cpu().view(torch.uint8).int(), want_q.view(torch.uint8).int()
    apart = (codes[0] - codes[1]).abs()
    assert apart.max() <= 1 and (apart > 0).float().mean() <= 0.01, apart.sum()


def assert_linear_close(got: torch.Tensor, x_deq: torch.Tensor, w_deq: torch.Tensor,
                        want: torch.Tensor) -> float:
    """``got`` against the reference ``want`` (same products, fp32 sums, rounded once):

    * elementwise, each side is within half an output ulp of its fp32 sum, and the fp32 sums
      differ by at most the summation error: ``|got - want| <= ulp(want) + 2 * slack`` with
      ``slack = c * (|x| @ |W|.T)``, ``c = (K + 8) * 2^-24`` (fp32 accumulation; + the two
      scale products per tile). Compiled on sm_90 the fp8 MMA adds a tile's 128 products with
      ~14 bits of alignment (then promotes): ``c = 2^-9`` there;
    * in norm, ``|got - want| / |want| < 1e-2``: one bf16 ulp is at most 2^-7 = 7.8e-3 of a
      value, so even every element one ulp apart passes; in practice few are (printed).
    """
    assert got.shape == want.shape and got.dtype == want.dtype
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-23}[want.dtype]
    on_gpu = got.device.type == "cuda"
    got, want = got.double().cpu(), want.double().cpu()
    assert not got.isnan().any(), "NaN in the output: an element was not written"
    k = x_deq.shape[-1]
    c = 2**-9 if on_gpu else (k + 8) * 2**-24
    mass = x_deq.double().abs().cpu() @ w_deq.double().abs().cpu().T
    bound = ulp * want.abs() + 2 * c * mass + 1e-30
    bad = (got - want).abs() > bound
    assert not bad.any(), (f"{int(bad.sum())}/{bad.numel()} outside the bound; worst "
                           f"{((got - want).abs() / bound).max().item():.3g}x")
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-2, rel
    return rel


def reference(x, wq, ws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fp8_linear_reference`` and its dequantized operands, on the CPU."""
    x, wq, ws = x.cpu(), wq.cpu(), ws.cpu()
    xq, xs = fp8.quantize_activation(x)
    return (fp8.fp8_linear_reference(x, wq, ws), fp8.dequantize_activation(xq, xs),
            fp8.dequantize_weight(wq, ws))


# -------------------------------------------------------------------------------- quantization
def test_e4m3_codes_on_the_bits_match_torch_everywhere():
    # Every code's value and every midpoint between neighbours (ties to even), the seam at 2^-6,
    # subnormals, zeros of both signs, and random values over the whole range.
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes[(codes & 0x7F) != 0x7F].view(E4M3).float().sort().values
    mids = (values[1:] + values[:-1]) / 2
    rand = torch.empty(4096).uniform_(-448, 448, generator=gen(0))
    tiny = torch.empty(4096).uniform_(-2**-5, 2**-5, generator=gen(1))
    x = torch.cat([values, mids, rand, tiny, torch.tensor([-0.0, 2**-6, 2**-6 - 2**-24])])
    x = torch.nn.functional.pad(x, (0, -x.numel() % 128)).view(-1, 128)
    # One group per row, scale 448/448 = 1 forced by a 448 in each row: q is x itself.
    x[:, 0] = 448.0
    assert_quantized(K.fp8_quant_groups(x.to(DEVICE)), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, k", [(1, 128), (3, 384), (17, 200)])
def test_quant_groups_bit_exact(rows, k, dtype, poisoned):
    x = activation((rows, k), dtype, seed=rows + k)
    x[0, :128] = 0  # an all-zero group: scale 1e-12 / 448
    assert_quantized(K.fp8_quant_groups(x), x)


def test_quant_groups_strided_and_leading_dims():
    buf = activation((2, 3, 400), seed=3)
    x = buf[..., 7:307]  # a column slice: rows strided
    q, s = K.fp8_quant_groups(x)
    assert q.shape == (2, 3, 300) and s.shape == (2, 3, 3) and q.is_contiguous()
    assert_quantized((q.view(6, 300), s.view(6, 3)), x.reshape(6, 300))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [128, 320])
def test_rms_norm_fp8_is_quantized_rms_norm(hidden, dtype, poisoned):
    x = activation((5, hidden + 9), dtype, seed=hidden)[:, 4:4 + hidden]  # strided rows
    w = (1 + 0.3 * torch.randn(hidden, generator=gen(2))).to(DEVICE, dtype)
    got = K.rms_norm_fp8(x, w, 1e-6)
    if DEVICE == "cuda" and dtype == torch.float32:
        # Compiled, the fused kernel sums the squares in another order than adp.rms_norm (and
        # the CPU): in fp32 nothing rounds that away, so a row's amax and scale may sit an ulp
        # apart (seen on an H100, 2026-12-07: scales unequal, every code equal). bf16/fp16
        # round the norm first, and there the result is bit for bit.
        for norm in (K.rms_norm(x, w, 1e-6), ref.rms_norm_ref(x.cpu(), w.cpu(), 1e-6)):
            assert_quantized_within_an_ulp(got, norm)
        return
    assert_quantized(got, K.rms_norm(x, w, 1e-6))
    # the eager path (a GPU machine's CPU tensors) quantizes the reference norm
    assert_quantized(got, ref.rms_norm_ref(x.cpu(), w.cpu(), 1e-6))


def test_add_rms_norm_fp8_is_quantized_add_rms_norm(poisoned):
    x, r = activation((3, 200), seed=4), activation((3, 200), seed=5)
    w = (1 + 0.3 * torch.randn(200, generator=gen(6))).to(DEVICE, torch.bfloat16)
    q, s, new_residual = K.add_rms_norm_fp8(x, r, w, 1e-6)
    normed, want_residual = K.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(new_residual, want_residual)
    assert_quantized((q, s), normed)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(-g) = inf: silu is -0
@pytest.mark.parametrize("inter", [128, 700])
def test_silu_mul_fp8_is_quantized_silu_mul(inter, poisoned):
    gate_up = activation((4, 2 * inter), seed=inter)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]  # the fused gate|up output's halves
    assert_quantized(K.silu_mul_fp8(gate, up), K.silu_mul(gate, up))


# ---------------------------------------------------------------------------------------- GEMM
@pytest.mark.parametrize("n, k", [(128, 384), (256, 128)])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_gemm_backends_match_the_reference(rows, n, k, poisoned):
    x = activation((rows, k), seed=rows * n + k)
    wq, ws = weight(n, k, seed=n + k)
    want, x_deq, w_deq = reference(x, wq, ws)
    for choice in (DECODE, DECODE_IN_KERNEL, PREFILL):
        got = G.linear_2d(x, wq, ws, torch.bfloat16, choice=choice)
        assert_linear_close(got, x_deq, w_deq, want)


@pytest.mark.parametrize("choice", [DECODE, DECODE_IN_KERNEL, PREFILL],
                         ids=["decode", "decode-in-kernel", "prefill"])
def test_partial_tiles_and_bf16_scales(choice, poisoned):
    # N and K past the last full 128 tile; a bf16 scale given transposed (any strides).
    x = activation((5, 300), seed=7)
    wq, ws = weight(200, 300, seed=8, scale_dtype=torch.bfloat16)
    ws_t = ws.t().contiguous().t()
    want, x_deq, w_deq = reference(x, wq, ws)
    assert_linear_close(G.linear_2d(x, wq, ws_t, torch.bfloat16, choice=choice), x_deq, w_deq, want)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantized_op_on_fused_producer_output(out_dtype, poisoned):
    # The path the lowering will take: rms_norm_fp8 -> fp8_block_linear_quantized.
    x = activation((3, 256), seed=9)
    w_norm = torch.ones(256, dtype=torch.bfloat16, device=DEVICE)
    xq, xs = K.rms_norm_fp8(x, w_norm, 1e-6)
    wq, ws = weight(128, 256, seed=10)
    want = G.reference_quantized(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), out_dtype)
    x_deq = fp8.dequantize_activation(xq.cpu(), xs.cpu())
    w_deq = fp8.dequantize_weight(wq.cpu(), ws.cpu())
    for choice in (DECODE, PREFILL):
        got = G.linear_2d(xq, wq, ws, out_dtype, x_scale=xs, choice=choice)
        assert_linear_close(got, x_deq, w_deq, want)
    got = K.fp8_block_linear_quantized(xq, xs, wq, ws, out_dtype)
    assert_linear_close(got, x_deq, w_deq, want)


def test_op_strided_x_leading_dims_and_wide_weight_rows():
    buf = activation((2, 2, 300), seed=11)
    x = buf[..., 20:276]  # [2, 2, 256], rows strided
    wide, ws = weight(128, 384, seed=12)
    wq = wide[:, :256]  # row stride 384, unit K stride: a view of a wider weight
    ws = ws[:, :2]
    got = K.fp8_block_linear(x, wq, ws)
    assert got.shape == (2, 2, 128) and got.dtype == torch.bfloat16
    want, x_deq, w_deq = reference(x.reshape(4, 256), wq.contiguous(), ws)
    assert_linear_close(got.view(4, 128), x_deq, w_deq, want)


def test_split_k_is_deterministic():
    x = activation((7, 640), seed=13)
    wq, ws = weight(128, 640, seed=14)
    config = G.Choice("decode", G.DecodeConfig(block_n=64, split_k=3, num_stages=2))
    first = G.linear_2d(x, wq, ws, torch.bfloat16, choice=config)
    assert torch.equal(first, G.linear_2d(x, wq, ws, torch.bfloat16, choice=config))


def test_choice_table_and_defaults(monkeypatch):
    assert G.choose(1, 4096, 4096).backend == "decode"
    assert G.choose(64, 4096, 4096).backend == "decode"
    assert G.choose(65, 4096, 4096).backend == "triton"
    assert G.choose(8192, 4096, 4096).config == G.PrefillConfig()
    tuned = G.Choice("scaled_mm")
    monkeypatch.setattr(G, "TUNED", {(4096, 4096): {2048: tuned}, (200, 4096): {2048: tuned},
                                     (128, 128): {256: G.Choice("decode")}})
    assert [G.bucket(r) for r in (1, 2, 16, 17, 300, 9000)] == [1, 16, 16, 64, 2048, 8192]
    monkeypatch.setattr(G, "scaled_mm_available", lambda device: True)
    gpu = torch.device("cuda", 0)
    assert G.choose(1000, 4096, 4096, gpu) is tuned
    assert G.choose(1000, 4096, 4096).backend == "triton"  # no device: cuBLAS unknown
    assert G.choose(1000, 200, 4096, gpu).backend == "triton"  # N % 128: cuBLAS's path cannot
    assert G.choose(200, 128, 128).backend == "triton"  # decode above its row limit


def test_defaults_where_cublas_takes_block_scales(monkeypatch):
    # The measured split (H100): decode up to 16 rows, and to 64 at N <= 5120; cuBLAS above.
    monkeypatch.setattr(G, "scaled_mm_available", lambda device: True)
    gpu = torch.device("cuda", 0)
    picks = {(rows, n): G.choose(rows, n, 4096, gpu).backend
             for rows in (1, 16, 64, 65, 8192) for n in (1024, 4096, 5120, 8192, 12288)}
    assert {key for key, backend in picks.items() if backend == "decode"} == {
        (rows, n) for rows in (1, 16) for n in (1024, 4096, 5120, 8192, 12288)} | {
        (64, 1024), (64, 4096), (64, 5120)}
    assert {backend for backend in picks.values()} == {"decode", "scaled_mm"}
    assert G.choose(300, 200, 4096, gpu).backend == "triton"  # a shape cuBLAS cannot take
    assert G.choose(300, 4096, 4096).backend == "triton"  # no device: no cuBLAS probe
    monkeypatch.setattr(G, "scaled_mm_available", lambda device: False)
    assert G.choose(300, 4096, 4096, gpu).backend == "triton"
    assert G.choose(64, 12288, 4096, gpu).backend == "decode"


def test_eager_path_is_the_reference(monkeypatch):
    # A GPU machine's CPU tensors (Triton compiling) take adp_pass.fp8's arithmetic.
    monkeypatch.setattr(G, "eager_on_cpu", lambda *a: True)
    monkeypatch.setattr(Q, "eager_on_cpu", lambda *a: True)
    x = activation((3, 256), seed=15).cpu()
    wq, ws = weight(128, 256, seed=16)
    wq, ws = wq.cpu(), ws.cpu()
    assert torch.equal(K.fp8_block_linear(x, wq, ws), fp8.fp8_linear_reference(x, wq, ws))
    xq, xs = K.fp8_quant_groups(x)
    assert_quantized((xq, xs), x)
    assert torch.equal(K.fp8_block_linear_quantized(xq, xs, wq, ws, torch.bfloat16),
                       G.reference_quantized(xq, xs, wq, ws, torch.bfloat16))
    w = torch.ones(256, dtype=torch.bfloat16)
    assert_quantized(K.rms_norm_fp8(x, w, 1e-6), ref.rms_norm_ref(x, w, 1e-6))
    assert_quantized(K.silu_mul_fp8(x, x), ref.silu_mul_ref(x, x))


# -------------------------------------------------------------------------------------- errors
def test_bad_weights_and_scales_are_named():
    x = activation((2, 256))
    wq, ws = weight(256, 256)
    with pytest.raises(ValueError, match=r"weight_scale_inv is \[2, 1\].*needs \[2, 2\]"):
        K.fp8_block_linear(x, wq, ws[:, :1])
    with pytest.raises(ValueError, match=r"weight_scale_inv is \[4\]"):
        K.fp8_block_linear(x, wq, ws.flatten())
    with pytest.raises(ValueError, match="weight_scale_inv must be float32, bfloat16 or float16"):
        K.fp8_block_linear(x, wq, ws.double())
    with pytest.raises(ValueError, match="weight must be a 2-D float8_e4m3fn"):
        K.fp8_block_linear(x, wq.float(), ws)
    with pytest.raises(ValueError, match="unit-stride along K"):
        K.fp8_block_linear(x, wq.t(), ws)
    with pytest.raises(ValueError, match="x has K = 200"):
        K.fp8_block_linear(x[:, :200], wq, ws)
    with pytest.raises(ValueError, match="fp8 activations go through"):
        K.fp8_block_linear(x.to(E4M3), wq, ws)
    with pytest.raises((TypeError, RuntimeError), match="weight_scale_inv"):
        torch.ops.adp.fp8_block_linear(x, wq)  # an fp8 weight cannot go without its scales
    xq, xs = K.fp8_quant_groups(x)
    with pytest.raises(ValueError, match=r"x_scale must be float32 \[2, 2\]"):
        K.fp8_block_linear_quantized(xq, xs[:, :1], wq, ws, torch.bfloat16)
    with pytest.raises(ValueError, match="x_scale must be float32"):
        K.fp8_block_linear_quantized(xq, xs.bfloat16(), wq, ws, torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype must be"):
        K.fp8_block_linear_quantized(xq, xs, wq, ws, torch.int32)
    with pytest.raises(ValueError, match="x must be bfloat16, float16 or float32"):
        K.fp8_quant_groups(xq)


# ------------------------------------------------------------------------------------- tracing
def test_opcheck_and_make_fx():
    x = activation((3, 256))
    wq, ws = weight(128, 256)
    xq, xs = K.fp8_quant_groups(x)
    w = torch.ones(256, dtype=torch.bfloat16, device=DEVICE)
    cases = [
        (torch.ops.adp.fp8_quant_groups.default, (x,)),
        (torch.ops.adp.rms_norm_fp8.default, (x, w, 1e-6)),
        (torch.ops.adp.add_rms_norm_fp8.default, (x, x, w, 1e-6)),
        (torch.ops.adp.silu_mul_fp8.default, (x, x)),
        (torch.ops.adp.fp8_block_linear.default, (x, wq, ws)),
        (torch.ops.adp.fp8_block_linear_quantized.default, (xq, xs, wq, ws, torch.bfloat16)),
    ]
    for op, args in cases:
        # opcheck's test_schema compares tensors with a multiply torch lacks for fp8 on the CPU;
        # that the inputs are not written is checked here instead.
        before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))
        after = [a for a in args if isinstance(a, torch.Tensor)]
        assert all(torch.equal(a.view(torch.uint8) if a.dtype == E4M3 else a,
                               b.view(torch.uint8) if b.dtype == E4M3 else b)
                   for a, b in zip(after, before)), f"{op} wrote an input"

    def layer(x, w, wq, ws):
        q, s = torch.ops.adp.rms_norm_fp8(x, w, 1e-6)
        return torch.ops.adp.fp8_block_linear_quantized(q, s, wq, ws, torch.bfloat16) + \
            torch.ops.adp.fp8_block_linear(x, wq, ws)

    gm = make_fx(layer, tracing_mode="fake")(x, w, wq, ws)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.adp.fp8_block_linear.default in targets
    assert torch.ops.adp.rms_norm_fp8.default in targets


# ------------------------------------------------------------------------------- GPU (compiled)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a GPU")


@cuda
def test_gpu_native_cast_and_real_shapes():
    # The compiled kernels use Triton's fp32 -> e4m3 cast: bit for bit torch's on the CPU.
    x = activation((64, 4096), seed=20)
    assert_quantized(K.fp8_quant_groups(x), x)
    w = torch.ones(4096, dtype=torch.bfloat16, device="cuda")
    assert_quantized(K.rms_norm_fp8(x, w, 1e-6), K.rms_norm(x, w, 1e-6))
    wq, ws = weight(1024, 4096, seed=21)
    for rows in (1, 16, 64, 300):
        xr = x[:rows] if rows <= 64 else activation((rows, 4096), seed=22)
        want, x_deq, w_deq = reference(xr, wq, ws)
        assert_linear_close(K.fp8_block_linear(xr, wq, ws), x_deq, w_deq, want)


@cuda
def test_gpu_scaled_mm_backend_when_available():
    x = activation((5, 1024), seed=23)
    wq, ws = weight(256, 1024, seed=24)
    try:
        got = G.linear_2d(x, wq, ws, torch.bfloat16, choice=G.Choice("scaled_mm"))
    except (RuntimeError, NotImplementedError) as err:  # cuBLAS < 12.9 or not sm_90
        pytest.skip(f"torch._scaled_mm has no 128x128 block scaling here: {err}")
    want, x_deq, w_deq = reference(x, wq, ws)
    assert_linear_close(got, x_deq, w_deq, want)


@cuda
def test_gpu_decode_in_a_cuda_graph():
    x = activation((16, 4096), seed=25)
    wq, ws = weight(4096, 4096, seed=26)
    eager = K.fp8_block_linear(x, wq, ws)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.fp8_block_linear(x, wq, ws)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
