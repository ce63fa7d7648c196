"""The lowering pass (runtime/lower): match counts, parity, traceability.

Graphs are captured once per model (module cache) as the pipeline makes them (capture -> detect ->
rewrite); each test lowers its own deep copy. The Triton kernels run under the interpreter on
CPU, so shapes stay tiny ("tiny"/"tiny-3" presets, seq 7, batch slices of 1 and 3).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

# TRITON_INTERPRET: tests/conftest.py sets it on machines without a GPU (only there).

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402
from transformers import Qwen3ForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from engine_qwen3 import EngineQwen3ForCausalLM, engine_state_dict_from_hf  # noqa: E402

from adp_pass.capture import (  # noqa: E402
    capture,
    capture_hf_qwen3,
    fake_process_group,
    parallelize_hf_qwen3,
)
from adp_pass.detect import detect  # noqa: E402
from adp_pass.fx_vocab import ATTENTION_CORE_OPS  # noqa: E402
from adp_pass.graph_record import graph_record  # noqa: E402
from adp_pass.presets import qwen3_config  # noqa: E402
from adp_pass.rewrite import rewrite  # noqa: E402
from adp_pass.runtime.lower import FP8_PASSES, PASS_NAMES, lower  # noqa: E402
from adp_pass.runtime.lower.qk_norm_rope import CACHE_ATTR, rope_theta_of  # noqa: E402
from kernel_reference import patch_interpreter_bf16_rounding  # noqa: E402

aten = torch.ops.aten
ATOL = 1e-4


# ----------------------------------------------------------------------------- model cases
@dataclass
class Case:
    name: str
    config: object
    layers: int
    fused_mlp: bool  # engine-style gate_up: silu_mul_fused
    ref: torch.nn.Module  # transformers model with the weights
    state_dict: dict  # what the rewritten graph loads (strict)
    gm: fx.GraphModule  # rewritten, not lowered: deep-copy before use

    def fresh(self) -> fx.GraphModule:
        gm = copy.deepcopy(self.gm)
        # fx's copy re-registers the GraphModule's own buffers as persistent (the engine's
        # top-level inv_freq); restore the flags so the state dict is the original's.
        gm._non_persistent_buffers_set = set(self.gm._non_persistent_buffers_set)
        gm.load_state_dict(self.state_dict, strict=True)
        return gm


CASES = {
    # name: (source, preset, layers, world size, tied, dtype mode)
    "hf-tiny-L2": ("hf", "tiny", 2, 2, False, None),
    # transformers 5.1x's rotary: frequencies as a matmul (bmm + transpose), not a mul.
    "hf-tiny-L2-matmul-rope": ("hf-matmul-rope", "tiny", 2, 2, False, None),
    "hf-tiny-L3": ("hf", "tiny", 3, 2, False, None),
    "hf-tiny3-L2": ("hf", "tiny-3", 2, 3, False, None),  # GQA (6 q / 3 kv heads): repeat_kv
    "engine-tiny-L2": ("engine", "tiny", 2, 2, False, None),
    "engine-tiny3-L2-tied": ("engine", "tiny-3", 2, 3, True, None),
    # bf16 params; "default": inv_freq stays fp32, "to": model.to(bf16) casts inv_freq too.
    "hf-tiny-L1-bf16-default": ("hf", "tiny", 1, 2, False, "default"),
    "hf-tiny-L1-bf16-to": ("hf", "tiny", 1, 2, False, "to"),
}
FP32_CASES = [name for name, spec in CASES.items() if spec[5] is None]
_built: dict[str, Case] = {}


def _hf_model(config, dtype_mode):
    torch.manual_seed(0)
    if dtype_mode == "default":
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            return Qwen3ForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
    model = Qwen3ForCausalLM(config).eval()
    return model.to(torch.bfloat16) if dtype_mode == "to" else model


def _rotary_forward_5_1x(self, x, position_ids):
    """Qwen3RotaryEmbedding.forward as transformers 5.17 writes it (the GPU image's version)."""
    inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    inv_freq_expanded = inv_freq_expanded.to(x.device)
    position_ids_expanded = position_ids[:, None, :].float()
    with torch.autocast(device_type=x.device.type, enabled=False):  # Force float32
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _build(name: str) -> Case:
    source, preset, layers, ws, tied, dtype_mode = CASES[name]
    config = qwen3_config(preset, num_hidden_layers=layers, tie_word_embeddings=tied)
    ref = _hf_model(config, dtype_mode)
    ids = [torch.zeros(2, 8, dtype=torch.long)]
    if source == "engine":
        with fake_process_group(ws, ws - 1):
            import torch.distributed as dist

            model = EngineQwen3ForCausalLM(config, ws, ws - 1, dist.group.WORLD.group_name)
            captured = capture(model, ids)
        state_dict = engine_state_dict_from_hf(ref.state_dict(), config, 1, 0)
    elif source == "hf-matmul-rope":
        import transformers.models.qwen3.modeling_qwen3 as hf_qwen3

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hf_qwen3.Qwen3RotaryEmbedding, "forward", _rotary_forward_5_1x)
            captured = capture_hf_qwen3(config, world_size=ws, rank=0)
        state_dict = ref.state_dict()
    elif dtype_mode is None:
        captured = capture_hf_qwen3(config, world_size=ws, rank=0)
        state_dict = ref.state_dict()
    else:
        with fake_process_group(ws, 0):
            model = parallelize_hf_qwen3(_hf_model(config, dtype_mode), ws)
            captured = capture(model, ids, rank=0, world_size=ws)
        state_dict = ref.state_dict()
    gm = rewrite(captured.gm, detect(captured.gm, f"tp={ws},attn_dp=1"))
    assert source != "hf-matmul-rope" or _count(gm, aten.bmm.default) == 1  # the form is there
    return Case(name, config, layers, source == "engine", ref, state_dict, gm)


def case(name: str) -> Case:
    if name not in _built:
        _built[name] = _build(name)
    return _built[name]


def _ids(config, batch=4, seq=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=generator)


def _logits(gm, ids):
    """Uneven batch slices (1 and the rest) through the graph, concatenated."""
    with torch.no_grad():
        return torch.cat([gm(ids[:1])[0], gm(ids[1:])[0]])


def _count(gm, *targets):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def expected_counts(layers: int) -> dict[str, int]:
    # Every RMSNorm (2L+1 decoder/final norms + 2L q/k norms) goes through rms_norm; 2L of the
    # layer norms read a residual add (every norm but layer 0's input_layernorm, final norm
    # included); one SwiGLU and one q/k pair per layer.
    return {
        "rms_norm": 4 * layers + 1,
        "add_rms_norm": 2 * layers,
        "silu_mul": layers,
        "qk_norm_rope": layers,
    }


def expected_ops(layers: int, fused_mlp: bool) -> dict[str, int]:
    return {
        "rms_norm": 1,  # layer 0's input_layernorm
        "add_rms_norm": 2 * layers,
        "silu_mul": 0 if fused_mlp else layers,
        "silu_mul_fused": layers if fused_mlp else 0,
        "qk_norm_rope": layers,
        **FP8_OPS_NONE,
    }


# The census also counts the FP8 ops (tests/test_fp8_native.py); a bf16/fp32 graph has none.
FP8_OPS_NONE = dict.fromkeys(("fp8_block_linear", "fp8_block_linear_quantized", "rms_norm_fp8",
                              "add_rms_norm_fp8", "silu_mul_fp8"), 0)


# ----------------------------------------------------------------------------- counts and structure
@pytest.mark.parametrize("name", list(CASES))
def test_counts_and_no_decomposed_pieces_left(name):
    c = case(name)
    gm = lower(c.fresh())
    assert graph_record(gm).lowering.counts == expected_counts(c.layers)
    assert graph_record(gm).lowering.ops == expected_ops(c.layers, c.fused_mlp)
    assert graph_record(gm).lowering.notes == []
    # (c) no decomposed RMSNorm, SiLU or rotary left (cos/sin tables now come from the cache).
    leftovers = (aten.rsqrt, aten.silu, aten.neg, aten.cos, aten.sin)
    leftovers = tuple(op.default for op in leftovers)
    assert {str(t): _count(gm, t) for t in leftovers} == {str(t): 0 for t in leftovers}
    # Every node still has a fake value (later passes and tools read shapes off the graph).
    assert [n.name for n in gm.graph.nodes if n.op != "output" and "val" not in n.meta] == []


def test_counts_three_layers_named_in_the_issue():
    gm = lower(case("hf-tiny-L3").fresh())
    counts = graph_record(gm).lowering.counts
    assert counts == {"rms_norm": 13, "add_rms_norm": 6, "silu_mul": 3, "qk_norm_rope": 3}


def test_meta_device_capture_lowers_too():
    # No weights: what one does to count sites of a big preset. SDPA is decomposed to
    # bmm/softmax there, so q/k are paired in graph order instead of through the attention op.
    config = qwen3_config("tiny-3", num_hidden_layers=1)
    captured = capture_hf_qwen3(config, world_size=3, rank=0, meta=True)
    gm = rewrite(captured.gm, detect(captured.gm, "tp=3,attn_dp=1"))
    assert _count(gm, *ATTENTION_CORE_OPS) == 0
    gm = lower(gm)
    assert graph_record(gm).lowering.counts == expected_counts(1)
    assert graph_record(gm).lowering.ops == expected_ops(1, fused_mlp=False)
    assert gm.get_buffer(CACHE_ATTR).device.type == "meta"


@pytest.mark.parametrize("name", ["hf-tiny-L2", "hf-tiny3-L2", "engine-tiny3-L2-tied"])
def test_attention_inputs_keep_shape_and_strides(name):
    before = case(name).fresh()
    after = lower(case(name).fresh())

    def attention_layouts(gm):
        out = []
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in ATTENTION_CORE_OPS:
                vals = [a.meta["val"] for a in node.args[:3]]
                out.append([(str(v.shape), str(v.stride()), v.dtype) for v in vals])
        return out

    assert attention_layouts(after) == attention_layouts(before)


def test_cache_buffer_and_state_dict():
    c = case("hf-tiny-L2")
    before = c.fresh()
    gm = lower(c.fresh(), max_position=64)
    cache = gm.get_buffer(CACHE_ATTR)
    head_dim = c.config.head_dim
    assert cache.shape == (64, head_dim) and cache.dtype == torch.float32
    assert gm.state_dict().keys() == before.state_dict().keys()  # non-persistent
    gm.load_state_dict(c.ref.state_dict(), strict=True)
    copied = copy.deepcopy(gm)  # stays non-persistent through fx's copy
    assert copied.state_dict().keys() == before.state_dict().keys()
    assert torch.equal(copied.get_buffer(CACHE_ATTR), cache)
    source = graph_record(gm).lowering.cos_sin_cache[CACHE_ATTR].source
    assert source == "build_cos_sin_cache(rope_theta=10000)"
    # Exactly the table transformers' rotary embedding computes.
    rotary = c.ref.model.rotary_emb
    x = torch.zeros(1, 64, head_dim)
    cos, sin = rotary(x, torch.arange(64)[None])
    half = head_dim // 2
    assert torch.equal(cache[:, :half], cos[0, :, :half])
    assert torch.equal(cache[:, half:], sin[0, :, :half])


def test_lowering_again_finds_nothing_new():
    gm = lower(case("engine-tiny-L2").fresh())
    ops = dict(graph_record(gm).lowering.ops)
    gm = lower(gm)
    # fp8_quant runs on graphs with FP8 linears only (tests/test_fp8_native.py)
    assert graph_record(gm).lowering.counts == dict.fromkeys(
        [p for p in PASS_NAMES if p not in FP8_PASSES], 0)
    assert graph_record(gm).lowering.ops == ops
    assert [name for name, _ in gm.named_buffers() if "cos_sin_cache" in name] == [CACHE_ATTR]


# ----------------------------------------------------------------------------- pass selection
def test_pass_subsets_and_order():
    c = case("hf-tiny-L2")
    gm = lower(c.fresh(), passes=["rms_norm"])
    assert graph_record(gm).lowering.counts == {"rms_norm": 9}
    assert graph_record(gm).lowering.ops["rms_norm"] == 9
    gm = lower(c.fresh(), passes=["silu_mul"])
    assert graph_record(gm).lowering.counts == {"silu_mul": 2}
    assert _count(gm, aten.rsqrt.default) == 9
    gm = lower(c.fresh(), passes=["rms_norm", "qk_norm_rope"])
    assert graph_record(gm).lowering.ops == {
        "rms_norm": 5, "add_rms_norm": 0, "silu_mul": 0, "silu_mul_fused": 0, "qk_norm_rope": 2,
        **FP8_OPS_NONE,
    }
    with pytest.raises(ValueError, match="needs \\['rms_norm'\\]"):
        lower(c.fresh(), passes=["add_rms_norm", "rms_norm"])
    with pytest.raises(ValueError, match="unknown lowering pass"):
        lower(c.fresh(), passes=["rms_norm", "layer_norm"])
    with pytest.raises(ValueError, match="max_position"):
        lower(c.fresh(), max_position=0)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", FP32_CASES)
def test_lowered_graph_parity_fp32(name):
    c = case(name)
    ids = _ids(c.config)
    before = _logits(c.fresh(), ids)
    gm = lower(c.fresh())
    gm.load_state_dict(c.state_dict, strict=True)  # the cache is not in the state dict
    after = _logits(gm, ids)
    assert after.shape == (4, 7, c.config.vocab_size)
    assert (after - before).abs().max().item() <= ATOL
    with torch.no_grad():
        eager = c.ref(ids).logits
    assert (after - eager).abs().max().item() <= ATOL


def test_parity_with_small_max_position():
    c = case("hf-tiny-L2")
    ids = _ids(c.config, seq=8)
    gm = lower(c.fresh(), max_position=8)  # positions 0..7: the cache's last row is used
    assert (_logits(gm, ids) - _logits(c.fresh(), ids)).abs().max().item() <= ATOL


@pytest.fixture
def interpreter_rounds_bf16_to_nearest_even(monkeypatch):
    patch_interpreter_bf16_rounding(monkeypatch)


@pytest.mark.parametrize(
    "name, cache_source",
    [("hf-tiny-L1-bf16-default", "build_cos_sin_cache"), ("hf-tiny-L1-bf16-to", "tabulated")],
)
def test_bf16_lowered_logits_bit_identical_to_eager(
    name, cache_source, interpreter_rounds_bf16_to_nearest_even
):
    c = case(name)
    ids = _ids(c.config)
    gm = lower(c.fresh())
    gm.load_state_dict(c.state_dict, strict=True)
    table = graph_record(gm).lowering.cos_sin_cache[CACHE_ATTR]
    assert table.source.startswith(cache_source) and table.dtype == "torch.bfloat16"
    after = _logits(gm, ids)
    with torch.no_grad():
        eager = c.ref(ids).logits
    assert after.dtype == torch.bfloat16
    # Every rounding point of the kernels is eager's; observed bit-identical on these shapes.
    mismatch = (after != eager).float().mean().item()
    worst = (after.float() - eager.float()).abs().max().item()
    assert mismatch <= 0.001, f"{mismatch:.2%} of logits differ from eager (max {worst})"


# ----------------------------------------------------------------------------- traceability
@pytest.mark.slow  # torch.compile of a whole lowered graph
def test_lowered_graph_traces_with_fake_tensors_and_compiles():
    c = case("engine-tiny3-L2-tied")
    gm = lower(c.fresh())
    ids = _ids(c.config)
    with torch.no_grad():
        want = gm(ids)[0]
    traced = make_fx(gm, tracing_mode="fake", _allow_non_fake_inputs=True)(ids)
    adp_ops = {
        n.target for n in traced.graph.nodes if n.op == "call_function" and "adp" in str(n.target)
    }
    assert adp_ops == {
        torch.ops.adp.rms_norm.default,
        torch.ops.adp.add_rms_norm.default,
        torch.ops.adp.silu_mul_fused.default,
        torch.ops.adp.qk_norm_rope.default,
    }
    compiled = torch.compile(gm, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        got = compiled(ids)[0]
        got_other_shape = compiled(ids[:3, :5])[0]
        want_other_shape = gm(ids[:3, :5])[0]
    torch._dynamo.reset()
    assert torch.equal(got, want) and torch.equal(got_other_shape, want_other_shape)


# ----------------------------------------------------------------------------- small graphs
def _symbolic(fn, *args):
    return make_fx(fn, tracing_mode="symbolic")(*args)


def _static(fn, *args):
    # Captured graphs have static hidden sizes; symbolic tracing would make the split size of
    # gate_up symbolic too.
    return make_fx(fn, tracing_mode="fake")(*args)


def _rms(x, w, eps=1e-5):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_and_add_rms_norm_patterns(dtype):
    def f(a, b, w, w_bad):
        s = a + b
        y = _rms(s, w, 1e-5)  # residual add -> add_rms_norm, s also read below
        z = _rms(a, w, 3e-6)  # plain -> rms_norm (other eps)
        u = _rms(torch.add(a, b, alpha=2), w)  # alpha: rms_norm only
        v = _rms(a + b[0], w)  # broadcasting add: rms_norm only
        bad = _rms(a, w_bad)  # [1, H] weight: not the kernel's contract, stays decomposed
        return y, s * 2, z, u, v, bad

    shapes = [(3, 5, 16), (3, 5, 16), (16,), (1, 16)]
    args = [torch.randn(shape).to(dtype) for shape in shapes]
    gm = lower(_symbolic(f, *args), passes=["rms_norm", "add_rms_norm"])
    assert graph_record(gm).lowering.counts == {"rms_norm": 4, "add_rms_norm": 1}
    assert graph_record(gm).lowering.ops["rms_norm"] == 3 and _count(gm, aten.rsqrt.default) == 1
    norms = [n for n in gm.graph.nodes if n.target is torch.ops.adp.rms_norm.default]
    eps_used = sorted(n.args[-1] for n in norms)
    assert eps_used == [3e-6, 1e-5, 1e-5]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(gm(*args), f(*args)):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_silu_mul_pattern_variants():
    def f(gate_up, g, u):
        half = gate_up.shape[-1] // 2
        a, b = gate_up.chunk(2, dim=-1)
        chunked = F.silu(a) * b
        c, d = gate_up.split([half, half], dim=-1)
        split = F.silu(c) * d
        sliced = F.silu(gate_up[..., :half]) * gate_up[..., half:]
        separate = F.silu(g) * u
        reversed_order = u * F.silu(g)
        s = F.silu(g)
        shared = s * u  # silu read twice: left alone
        broadcast = F.silu(g) * u[0]  # broadcasting: left alone
        return chunked, split, sliced, separate, reversed_order, shared, s + 1, broadcast

    args = [torch.randn(2, 3, 32), torch.randn(2, 3, 16), torch.randn(2, 3, 16)]
    gm = lower(_static(f, *args), passes=["silu_mul"])
    assert graph_record(gm).lowering.counts == {"silu_mul": 5}
    ops = graph_record(gm).lowering.ops
    assert (ops["silu_mul_fused"], ops["silu_mul"]) == (3, 2)
    for got, want in zip(gm(*args), f(*args)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rope_theta_recovered_from_inv_freq():
    for theta, head_dim in [(10_000.0, 16), (1_000_000.0, 128), (500_000.0, 64), (10_000.0, 128)]:
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        assert rope_theta_of(inv, head_dim) == theta
        assert rope_theta_of(inv.to(torch.bfloat16), head_dim) is None  # tabulated instead
        assert rope_theta_of(inv * 0.5, head_dim) is None  # scaled rope: not default
    assert rope_theta_of(torch.ones(8), 16) is None
