"""Correctness and traceability of the adp Triton kernels (runtime/kernels).

On CPU the kernels run under the Triton interpreter, so shapes stay small. References live in
tests/kernel_reference.py (copied from transformers' Qwen3 code and checked against it below).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.models.qwen3.modeling_qwen3 as hf_qwen3
from torch.fx.experimental.proxy_tensor import make_fx
from transformers import Qwen3Config

sys.path.insert(0, str(Path(__file__).parent))  # kernel_reference, whatever pytest's import mode
import kernel_reference as ref  # noqa: E402
from adp_pass.runtime import kernels as K  # noqa: E402
import adp_pass.runtime.kernels.cached_attention  # noqa: E402,F401  (registers the attention ops)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol): about one ulp of the output dtype at |x| ~ 1-2 (bf16 ulp 2^-7, fp16 2^-10);
# fp32 differs from eager only by reduction order and rsqrt/exp implementations.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}
# In bf16/fp16 the rounding order must match eager, so nearly all elements are bit-identical; a
# wrong order (e.g. no rounding before the weight multiply) drops this far below the threshold.
MIN_EXACT_FRACTION = 0.98
EPS = 1e-6
HIDDEN = [64, 769, 5125]
TOKENS = [1, 3, 17]


@pytest.fixture(autouse=True, scope="module")
def interpreter_rounds_bf16_to_nearest_even():
    with pytest.MonkeyPatch.context() as mp:
        ref.patch_interpreter_bf16_rounding(mp)
        yield


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "",
                 rounded_in: torch.dtype | None = None) -> None:
    """allclose with the per-dtype tolerance, reporting mismatch count and the worst index.
    ``rounded_in``: an intermediate was rounded to this (lower) precision, so one of its ulps
    (a reduction-order flip of that rounding) is the tolerance."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    atol, rtol = TOL[rounded_in or expected.dtype]
    a, e = actual.float(), expected.float()
    err = (a - e).abs()
    ratio = torch.nan_to_num(err / (atol + rtol * e.abs()), nan=torch.inf)  # NaN counts as a miss
    bad = ratio > 1
    if bad.any():
        idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(ratio), a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements outside atol={atol}, rtol={rtol}; "
            f"worst at index {idx}: got {a[idx].item()}, expected {e[idx].item()}, "
            f"|diff|={err[idx].item():.3g}"
        )
    if expected.dtype != torch.float32:
        exact = (actual == expected).float().mean().item()
        assert exact >= MIN_EXACT_FRACTION, (
            f"{name}: only {exact:.4f} of elements bit-identical to eager "
            f"(need {MIN_EXACT_FRACTION}); rounding order differs from transformers"
        )


def make(
    shape: tuple[int, ...], dtype: torch.dtype, strided: bool = False, seed: int = 0, device: str = DEVICE
) -> torch.Tensor:
    """Random input; ``strided`` returns a column slice (offset 5) of a wider buffer."""
    g = torch.Generator().manual_seed(seed)
    if not strided:
        return (torch.randn(shape, generator=g) * 2).to(device=device, dtype=dtype)
    buf = (torch.randn((*shape[:-1], shape[-1] + 13), generator=g) * 2).to(device=device, dtype=dtype)
    return buf[..., 5 : 5 + shape[-1]]


def norm_weight(n: int, dtype: torch.dtype, seed: int = 1, device: str = DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.3 * torch.randn(n, generator=g)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm(hidden: int, tokens: int, dtype: torch.dtype, strided: bool) -> None:
    x, w = make((tokens, hidden), dtype, strided), norm_weight(hidden, dtype)
    assert_close(K.rms_norm(x, w, EPS), ref.rms_norm_ref(x, w, EPS), "rms_norm")


def test_rms_norm_leading_dims_and_fp32_weight() -> None:
    # 3-D collapsible view, a non-collapsible one (copied), and an fp32 weight with bf16 input
    # (eager promotes the product to fp32).
    buf = make((2, 5, 97), torch.bfloat16)
    w = norm_weight(96, torch.bfloat16)
    for x in (buf[..., 1:], buf[:, 1:4, :96]):
        assert_close(K.rms_norm(x, w, EPS), ref.rms_norm_ref(x, w, EPS), "rms_norm 3-D")
    w32 = norm_weight(96, torch.float32)
    x = buf[..., :96]
    # fp32 out, but x * rstd is rounded to bf16 first (as eager does): on a GPU the fp32
    # statistics' reduction order can flip that rounding by one bf16 ulp (H200: 1 of 960).
    assert_close(K.rms_norm(x, w32, EPS), ref.rms_norm_ref(x, w32, EPS), "rms_norm fp32 weight",
                 rounded_in=torch.bfloat16)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_add_rms_norm(hidden: int, tokens: int, dtype: torch.dtype, strided: bool) -> None:
    x = make((tokens, hidden), dtype, strided, seed=0)
    residual = make((tokens, hidden), dtype, strided, seed=2)
    w = norm_weight(hidden, dtype)
    x_before, r_before = x.clone(), residual.clone()
    normed, new_residual = K.add_rms_norm(x, residual, w, EPS)
    ref_normed, ref_residual = ref.add_rms_norm_ref(x, residual, w, EPS)
    assert torch.equal(new_residual, ref_residual), "residual sum must be exact"
    assert_close(normed, ref_normed, "add_rms_norm")
    assert torch.equal(x, x_before) and torch.equal(residual, r_before), "inputs were mutated"


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("inter", HIDDEN)
def test_silu_mul(inter: int, tokens: int, dtype: torch.dtype, strided: bool) -> None:
    gate, up = make((tokens, inter), dtype, strided, 0), make((tokens, inter), dtype, strided, 3)
    assert_close(K.silu_mul(gate, up), ref.silu_mul_ref(gate, up), "silu_mul")
    gate_up = make((tokens, 2 * inter), dtype, strided, 4)
    assert_close(K.silu_mul_fused(gate_up), ref.silu_mul_fused_ref(gate_up), "silu_mul_fused")


# Strided rows at the mid size: opt-in (CI time); test_silu_mul and the flat size cover strided
# rows, the unstrided mid case its column tiles.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size, strided", [("flat", False), ("flat", True), ("mid", False),
                                           pytest.param("mid", True, marks=pytest.mark.full)])
def test_silu_mul_mid_and_prefill_sizes(size: str, dtype: torch.dtype, strided: bool) -> None:
    # 65 to _FLAT_ROWS - 1 rows: 2048-wide column tiles (here two, the second masked); from
    # _FLAT_ROWS rows on, one flat index over the output (row = index // columns).
    from adp_pass.runtime.kernels.silu_mul import _FLAT_ROWS

    tokens, inter = (100, 2100) if size == "mid" else (_FLAT_ROWS + 3, 40)
    gate, up = make((tokens, inter), dtype, strided, 0), make((tokens, inter), dtype, strided, 3)
    assert_close(K.silu_mul(gate, up), ref.silu_mul_ref(gate, up), f"silu_mul {size}")
    gate_up = make((tokens, 2 * inter), dtype, strided, 4)
    assert_close(K.silu_mul_fused(gate_up), ref.silu_mul_fused_ref(gate_up), f"silu_mul_fused {size}")


def qkv_views(
    tokens: int, n_q: int, n_kv: int, head_dim: int, dtype: torch.dtype, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, n_q, D] and k [T, n_kv, D], either views of one fused qkv buffer or contiguous."""
    if not fused:
        q = make((tokens, n_q, head_dim), dtype, seed=5)
        return q, make((tokens, n_kv, head_dim), dtype, seed=6)
    qkv = make((tokens, (n_q + 2 * n_kv) * head_dim), dtype, seed=7)
    q = qkv[:, : n_q * head_dim].view(tokens, n_q, head_dim)
    k = qkv[:, n_q * head_dim : (n_q + n_kv) * head_dim].view(tokens, n_kv, head_dim)
    return q, k


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("heads", [(4, 2), (6, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_qk_norm_rope(
    head_dim: int, heads: tuple[int, int], tokens: int, dtype: torch.dtype, fused: bool
) -> None:
    n_q, n_kv = heads
    q, k = qkv_views(tokens, n_q, n_kv, head_dim, dtype, fused)
    qw, kw = norm_weight(head_dim, dtype, 8), norm_weight(head_dim, dtype, 9)
    cache = K.build_cos_sin_cache(4096, head_dim, 1e6, dtype, DEVICE)
    g = torch.Generator().manual_seed(tokens)
    # Random positions, read through a stride-2 view.
    positions = torch.randint(0, 4096, (2 * tokens,), generator=g).to(DEVICE)[::2]
    q_out, k_out = K.qk_norm_rope(q, k, qw, kw, cache, positions, EPS)
    q_ref, k_ref = ref.qk_norm_rope_ref(q, k, qw, kw, cache, positions, EPS)
    assert_close(q_out, q_ref, "qk_norm_rope q")
    assert_close(k_out, k_ref, "qk_norm_rope k")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_match_transformers(dtype: torch.dtype) -> None:
    head_dim, theta = 64, 1e6
    x, w = make((3, 4, head_dim), dtype, device="cpu"), norm_weight(head_dim, dtype, device="cpu")
    norm = hf_qwen3.Qwen3RMSNorm(head_dim, eps=EPS).to(dtype)
    norm.weight.data.copy_(w)
    assert torch.equal(norm(x), ref.rms_norm_ref(x, w, EPS))

    config = Qwen3Config(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    gate, up = make((3, 40), dtype, seed=1, device="cpu"), make((3, 40), dtype, seed=2, device="cpu")
    act = hf_qwen3.Qwen3MLP(config).act_fn
    assert torch.equal(act(gate) * up, ref.silu_mul_ref(gate, up))

    positions = torch.tensor([[0, 7, 4095, 123]])
    hf_cos, hf_sin = hf_qwen3.Qwen3RotaryEmbedding(config)(x, positions)
    cos, sin = ref.rotary_cos_sin_ref(positions[0], head_dim, theta, dtype)
    assert torch.equal(hf_cos[0], cos) and torch.equal(hf_sin[0], sin)
    cache = K.build_cos_sin_cache(4096, head_dim, theta, dtype, "cpu")[positions[0]]
    half = head_dim // 2
    assert torch.equal(cache[:, :half], cos[:, :half]) and torch.equal(cache[:, half:], sin[:, :half])

    q = make((1, 4, 4, head_dim), dtype, seed=3, device="cpu")
    k = make((1, 2, 4, head_dim), dtype, seed=4, device="cpu")
    ours = ref.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    for got, want in zip(ours, hf_qwen3.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)):
        assert torch.equal(got, want)


def test_input_validation() -> None:
    x = make((2, 8), torch.float32)
    with pytest.raises(ValueError, match="weight shape"):
        K.rms_norm(x, norm_weight(7, torch.float32), EPS)
    with pytest.raises(ValueError, match="must match"):
        K.silu_mul(x, x.to(torch.bfloat16))
    with pytest.raises(ValueError, match="even"):
        K.silu_mul_fused(make((2, 7), torch.float32))
    q, k = qkv_views(2, 4, 2, 64, torch.bfloat16, fused=False)
    w = norm_weight(64, torch.bfloat16)
    cache = K.build_cos_sin_cache(16, 64, 1e6, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="one dtype"):
        K.qk_norm_rope(q, k, w, w, cache, torch.arange(2, device=DEVICE), EPS)


def _op_samples() -> list[tuple[object, tuple]]:
    dt = torch.bfloat16
    x, r, w = make((3, 96), dt, True), make((3, 96), dt, seed=2), norm_weight(96, dt)
    q, k = qkv_views(3, 4, 2, 64, dt, fused=True)
    qw = norm_weight(64, dt)
    cache = K.build_cos_sin_cache(64, 64, 1e6, dt, DEVICE)
    return [
        (torch.ops.adp.rms_norm.default, (x, w, EPS)),
        (torch.ops.adp.add_rms_norm.default, (x, r, w, EPS)),
        (torch.ops.adp.silu_mul.default, (x, r)),
        (torch.ops.adp.silu_mul_fused.default, (make((3, 192), dt),)),
        (torch.ops.adp.qk_norm_rope.default, (q, k, qw, qw, cache, torch.tensor([5, 0, 63], device=DEVICE), EPS)),
    ]


@pytest.mark.parametrize("op, args", _op_samples(), ids=lambda v: str(v) if hasattr(v, "name") else "-")
def test_opcheck_and_fake_trace(op: torch._ops.OpOverload, args: tuple) -> None:
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    gm = make_fx(lambda *a: op(*a), tracing_mode="fake")(*args)
    assert op in {n.target for n in gm.graph.nodes}


def test_torch_compile_fullgraph() -> None:
    dt = torch.bfloat16
    hidden, tokens, n_q, n_kv, head_dim = 128, 3, 4, 2, 64
    x, residual = make((tokens, hidden), dt, seed=1), make((tokens, hidden), dt, seed=2)
    w = norm_weight(hidden, dt)
    qkv = make((tokens, (n_q + 2 * n_kv) * head_dim), dt, seed=3)
    gate_up = make((tokens, 2 * hidden), dt, seed=4)
    qw, positions = norm_weight(head_dim, dt), torch.arange(tokens, device=DEVICE)
    cache = K.build_cos_sin_cache(32, head_dim, 1e6, dt, DEVICE)

    def layer_piece(x, residual, qkv, gate_up, positions):
        h, res = torch.ops.adp.add_rms_norm(x, residual, w, EPS)
        q = qkv[:, : n_q * head_dim].view(tokens, n_q, head_dim)
        k = qkv[:, n_q * head_dim : (n_q + n_kv) * head_dim].view(tokens, n_kv, head_dim)
        q, k = torch.ops.adp.qk_norm_rope(q, k, qw, qw, cache, positions, EPS)
        act = torch.ops.adp.silu_mul_fused(gate_up)
        normed = torch.ops.adp.rms_norm(h + act[:, :hidden], w, EPS)
        return normed, res, q, k, torch.ops.adp.silu_mul(act, act)

    args = (x, residual, qkv, gate_up, positions)
    compiled = torch.compile(layer_piece, fullgraph=True, backend="eager")
    for got, want in zip(compiled(*args), layer_piece(*args)):
        assert torch.equal(got, want)


def _run_rms_norm_in_fresh_process(env: dict) -> subprocess.CompletedProcess:
    # Prints whether the kernel is interpreted, whether launch_guard refuses CPU tensors, and
    # the op's result.
    code = (
        "import sys, torch; from adp_pass.runtime import kernels as K; "
        "from adp_pass.runtime.kernels.utils import launch_guard; "
        "from triton.runtime.interpreter import InterpretedFunction; "
        "kernel = sys.modules['adp_pass.runtime.kernels.rms_norm']._rms_norm_kernel; "
        "x = torch.ones(2, 4)\n"
        "try:\n    launch_guard(kernel, x); refused = False\n"
        "except RuntimeError as e:\n    refused = 'TRITON_INTERPRET=1' in str(e)\n"
        "print(isinstance(kernel, InterpretedFunction), refused, "
        "K.rms_norm(x, torch.ones(4), 1e-6).sum().item())"
    )
    cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_cpu_only_machine_picks_the_interpreter_by_itself() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a machine without a GPU, wherever the test runs
    proc = _run_rms_norm_in_fresh_process(env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    interpreted, refused, value = proc.stdout.split()[-3:]
    assert (interpreted, refused) == ("True", "False")
    assert float(value) == pytest.approx(8.0, rel=1e-5)


def test_cpu_tensors_with_compiling_triton_run_eager() -> None:
    # A GPU machine's situation (Triton compiles; here compiling is all it can do, no launch):
    # CPU tensors take the eager reference. Launching a compiled kernel on them stays an error.
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = _run_rms_norm_in_fresh_process(env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    interpreted, refused, value = proc.stdout.split()[-3:]
    assert (interpreted, refused) == ("False", "True")
    assert float(value) == pytest.approx(8.0, rel=1e-5)


# (atol, rtol) of the attention ops, as tests/test_varlen_attention.py uses against an fp32
# reference: the kernel's summation order and, for 16-bit dots, P's rounding.
ATTENTION_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
ELEMENTWISE_OPS = ["rms_norm", "add_rms_norm", "silu_mul", "silu_mul_fused", "qk_norm_rope"]
ATTENTION_OPS = ["reshape_and_cache", "paged_decode_attention", "varlen_attention",
                 "cached_attention_decode", "cached_attention_prefill", "cached_attention_packed"]


def _fallback_cases(dtype: torch.dtype) -> dict[str, tuple[str, tuple]]:
    """Small CPU inputs for every adp op: case name -> (op name, args). Paged caches are NaN
    outside the contexts, reached through shuffled tables, so a wrong read poisons the output."""
    x, r = make((3, 96), dtype, True, device="cpu"), make((3, 96), dtype, seed=2, device="cpu")
    w = norm_weight(96, dtype, device="cpu")
    qkv = make((3, 8 * 64), dtype, seed=7, device="cpu")  # q and k as views of a fused qkv
    q, k = qkv[:, : 4 * 64].view(3, 4, 64), qkv[:, 4 * 64 : 6 * 64].view(3, 2, 64)
    rope = (q, k, norm_weight(64, dtype, 8, "cpu"), norm_weight(64, dtype, 9, "cpu"),
            K.build_cos_sin_cache(64, 64, 1e6, dtype, "cpu"), torch.tensor([5, 0, 63]), EPS)
    gen = torch.Generator().manual_seed(0)
    kv_heads, group, head_dim, block = 2, 2, 32, 16

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    def paged(context_lens):
        return ref.poisoned_paged_cache(context_lens, block, kv_heads, head_dim, dtype, gen, 2)

    k_cache, v_cache, tables = paged([1, 17, 40])
    decode = (rand(3, kv_heads * group, head_dim), k_cache, v_cache, tables,
              torch.tensor([1, 17, 40], dtype=torch.int32), 0.2)
    q_lens, lens = [1, 5, 0, 12], [9, 5, 3, 30]
    k_cache, v_cache, tables = paged(lens)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    varlen = (rand(sum(q_lens) + 2, kv_heads * group, head_dim), k_cache, v_cache, tables, starts,
              torch.tensor(lens, dtype=torch.int32), 0.2)  # 2 padding rows past the last sequence
    write = (rand(5, kv_heads, head_dim), rand(5, kv_heads, head_dim),
             torch.zeros(4, block, kv_heads, head_dim, dtype=dtype),
             torch.zeros(4, block, kv_heads, head_dim, dtype=dtype), torch.tensor([3, -1, 17, 40, 63]))

    def cached(batch, seq, context_lens, packed):
        k_cache, v_cache, tables = paged(context_lens)
        slots = [tables[b, (c - seq + s) // block] * block + (c - seq + s) % block
                 for b, c in enumerate(context_lens) for s in range(seq)]
        if packed:  # one row of tokens, `seq` per sequence
            batch, seq = 1, seq * len(context_lens)
        args = (rand(batch, kv_heads * group, seq, head_dim), rand(batch, kv_heads, seq, head_dim),
                rand(batch, kv_heads, seq, head_dim), k_cache, v_cache, torch.stack(slots).long(),
                tables, torch.tensor(context_lens, dtype=torch.int32), 0.2)
        if packed:
            n = len(context_lens)
            return args + (torch.arange(0, seq + 1, seq // n, dtype=torch.int32),)
        return args

    return {
        "rms_norm": ("rms_norm", (x, w, EPS)),
        "add_rms_norm": ("add_rms_norm", (x, r, w, EPS)),
        "silu_mul": ("silu_mul", (x, r)),
        "silu_mul_fused": ("silu_mul_fused", (make((3, 192), dtype, True, device="cpu"),)),
        "qk_norm_rope": ("qk_norm_rope", rope),
        "reshape_and_cache": ("reshape_and_cache", write),
        "paged_decode_attention": ("paged_decode_attention", decode),
        "varlen_attention": ("varlen_attention", varlen),
        "cached_attention_decode": ("cached_attention", cached(2, 1, [7, 33], False)),
        "cached_attention_prefill": ("cached_attention", cached(2, 3, [3, 3], False)),
        "cached_attention_packed": ("cached_attention", cached(2, 2, [2, 20], True)),
    }


_FALLBACK_SCRIPT = """
import sys, torch
import adp_pass.runtime.kernels  # registers the ops
import adp_pass.runtime.kernels.cached_attention
from triton.runtime.interpreter import InterpretedFunction
sys.path.insert(0, sys.argv[3])
from kernel_reference import run_op_case
kernel_modules = [m for name, m in list(sys.modules.items()) if name.startswith("adp_pass.runtime.kernels")]
jits = [f for m in kernel_modules for f in vars(m).values()
        if type(f).__name__ in ("JITFunction", "InterpretedFunction")]
assert jits and not any(isinstance(f, InterpretedFunction) for f in jits), jits
cases = torch.load(sys.argv[1])
torch.save({key: {name: run_op_case(*case) for name, case in by_name.items()}
            for key, by_name in cases.items()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def eager_fallback_outputs(tmp_path_factory) -> dict:
    """Every op on _fallback_cases' CPU inputs, run in a fresh process with TRITON_INTERPRET=0,
    i.e. through the eager fallback (compiled kernels cannot take CPU tensors)."""
    tmp = tmp_path_factory.mktemp("fallback")
    cases = {str(dtype): _fallback_cases(dtype) for dtype in DTYPES}
    torch.save(cases, tmp / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-c", _FALLBACK_SCRIPT, str(tmp / "cases.pt"), str(tmp / "out.pt"),
           str(Path(__file__).parent)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / "out.pt")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ELEMENTWISE_OPS + ATTENTION_OPS)
def test_eager_fallback_matches_the_kernels(eager_fallback_outputs: dict, case: str,
                                            dtype: torch.dtype) -> None:
    # The kernels here (interpreted on CPU; compiled on CUDA copies on a GPU machine) against
    # the fallback's outputs from the fresh process, so the two cannot drift apart.
    op, args = _fallback_cases(dtype)[case]
    on_device = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    outputs, caches = ref.run_op_case(op, on_device)
    got_outputs, got_caches = eager_fallback_outputs[str(dtype)][case]
    assert len(got_outputs) == len(outputs) and len(got_caches) == len(caches)
    for i, (got, want) in enumerate(zip(got_outputs, outputs)):
        assert got.device.type == "cpu" and got.shape == want.shape and got.dtype == want.dtype
        if case in ELEMENTWISE_OPS:
            assert_close(got, want.cpu(), f"{case}[{i}]")
            assert got.is_contiguous(), f"{case}[{i}]: the ops return contiguous tensors"
        else:
            atol, rtol = ATTENTION_TOL[dtype]
            torch.testing.assert_close(got, want.cpu(), atol=atol, rtol=rtol, msg=f"{case}[{i}]")
    for got, want in zip(got_caches, caches):  # copies of the new tokens: exact
        torch.testing.assert_close(got, want.cpu(), atol=0, rtol=0, equal_nan=True)


def test_bench_dry_run(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_kernels.py"
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(script), "--dry-run", "--tokens", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {r["impl"] for r in result["rows"]} == {"triton", "eager", "compile", "copy"}
    assert len(result["rows"]) == 5 * 4 and "| qk_norm_rope | 2 |" in proc.stdout
    assert result["metadata"]["versions"]["torch"] == torch.__version__


def test_pdl_setting_is_checked_and_off_the_gpu_is_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    from adp_pass.runtime.kernels import utils

    x = torch.zeros(2)  # CPU: no programmatic dependent launch, whatever the setting
    for setting in ("off", "wait", "trigger"):
        monkeypatch.setattr(utils, "PDL", setting)
        assert utils.pdl(x) == {"PDL": 0, "launch_pdl": False}
    monkeypatch.setattr(utils, "PDL", "sometimes")
    with pytest.raises(ValueError, match="PDL must be 'off', 'wait' or 'trigger', got 'sometimes'"):
        utils.pdl(x)
