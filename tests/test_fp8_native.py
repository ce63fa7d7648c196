"""An FP8 checkpoint served with FP8 kernels end to end (docs/fp8.md, "Serving an FP8
checkpoint"): the captured bf16/fp32 graph's decoder linears made ``adp.fp8_block_linear``
(adp_pass/fp8_linears.py), detect/rewrite/load with the checkpoint's fp8 weights and scales kept
as stored, the lowering's ``fp8_quant`` pass fusing the activation quantization into the norms
and SwiGLU, and ``prepare_rank`` choosing that path for an FP8 checkpoint.

Checkpoint: ``adp quantize --preset fp8-tiny --dtype fp32`` (bf16 scales), written to disk.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from adp_pass import fp8
from adp_pass.capture import capture_hf
from adp_pass.checks import DECODER_LINEAR, SCALE_SUFFIX
from adp_pass.detect import detect
from adp_pass.fp8_linears import Fp8LinearError, checkpoint_fp8_weights, use_fp8_linears
from adp_pass.fx_vocab import FP8_LINEAR_OPS, is_op
from adp_pass.graph_record import graph_record
from adp_pass.presets import model_config
from adp_pass.rewrite import rewrite
from adp_pass.runtime.first_step import fp8_first_step_verdict
from adp_pass.verify import FP8_FLIP_TOLERANCE

aten = torch.ops.aten
LAYERS = 2  # fp8-tiny
PROMPT = [5, 6, 7, 200, 31, 17, 3, 250, 9]


@pytest.fixture(scope="module")
def config():
    return model_config("fp8-tiny")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from adp_pass.quantize import quantize_checkpoint

    out = tmp_path_factory.mktemp("fp8-tiny")
    quantize_checkpoint(out, preset="fp8-tiny", dtype="fp32", progress=False)
    return out


@pytest.fixture(scope="module")
def names(checkpoint):
    return checkpoint_fp8_weights(checkpoint)


@pytest.fixture(scope="module")
def tp1(config):
    """The unsharded rank's fp32 capture (tp 1): compared with an unsharded reference."""
    return capture_hf(config, 1, 0, dtype=torch.float32, stamped_device="meta").gm


def _tensors(checkpoint) -> dict[str, torch.Tensor]:
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _count(gm, ops) -> int:
    return sum(is_op(n, ops) for n in gm.graph.nodes)


# ----------------------------------------------------------------------------- the graph pass
def test_the_checkpoints_fp8_weights_are_its_decoder_linears(checkpoint, names):
    assert len(names) == 7 * LAYERS and all(DECODER_LINEAR.fullmatch(n) for n in names)


def test_decoder_linears_become_fp8_with_their_scale_grids(config, tp1, names):
    gm = copy.deepcopy(tp1)
    before = {n: tuple(p.shape) for n, p in gm.named_parameters()}
    mms = _count(gm, {aten.mm.default})
    done = use_fp8_linears(gm, names)
    assert done.replaced == 7 * LAYERS and sorted(done.weights) == sorted(names)
    assert done.scales == tuple(w + SCALE_SUFFIX for w in done.weights)
    assert _count(gm, FP8_LINEAR_OPS) == 7 * LAYERS
    assert _count(gm, {aten.mm.default}) == mms - 7 * LAYERS == 1  # the LM head stays
    params = dict(gm.named_parameters())
    for name in names:
        assert params[name].dtype == fp8.E4M3 and tuple(params[name].shape) == before[name]
        scale = params[name + SCALE_SUFFIX]
        assert scale.dtype == torch.float32 and tuple(scale.shape) == fp8.scale_shape(before[name])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert params[name].dtype == torch.float32
    # Every node still has a fake value, the linears' of the graph's symbolic row count.
    linear = next(n for n in gm.graph.nodes if is_op(n, FP8_LINEAR_OPS))
    assert linear.meta["val"].dtype == torch.float32 and linear.meta["val"].shape[-1] == 1024
    assert use_fp8_linears(gm, names).replaced == 0  # idempotent


@pytest.mark.full  # a tp-2 capture (tests/test_fp8_graph.py covers detect on FP8 graphs)
def test_detect_shards_the_scales_with_their_weights(config, names):
    gm = capture_hf(config, 2, 1, dtype=torch.float32, stamped_device="meta").gm
    use_fp8_linears(gm, names)
    plan = detect(gm, "tp=2,attn_dp=1")
    specs = {p.name: p for p in plan.params}
    scales = [n + SCALE_SUFFIX for n in names]
    assert all(s in specs for s in scales)
    for name in names:
        weight, scale = specs[name], specs[name + SCALE_SUFFIX]
        assert (scale.layout, scale.dim) == (weight.layout, weight.dim)
        assert scale.full_shape == fp8.scale_shape(weight.full_shape)
        assert scale.local_shape == fp8.scale_shape(weight.local_shape)
    q = specs["model.layers.0.self_attn.q_proj.weight" + SCALE_SUFFIX]
    assert (q.local_shape, q.full_shape) == ((4, 2), (8, 2))  # rows split: 4 of 8 tiles each


def test_named_errors(tp1, names):
    with pytest.raises(Fp8LinearError, match="not the weight of a projection"):
        use_fp8_linears(copy.deepcopy(tp1), [*names, "model.layers.0.mlp.gate_up.weight"])
    gm = copy.deepcopy(tp1)
    weight = next(n for n in gm.graph.nodes
                  if n.op == "get_attr" and n.target == "model.layers.0.mlp.up_proj.weight")
    with gm.graph.inserting_after(weight):  # another reader of the raw weight: codes unscaled
        gm.graph.call_function(aten.sum.default, (weight,))
    with pytest.raises(Fp8LinearError, match="reads it besides its projection"):
        use_fp8_linears(gm, names)


def _toy(biased: bool) -> torch.fx.GraphModule:
    """``x @ proj.weight.T (+ proj.bias)`` as captured graphs write it (mm / addmm of t(W))."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    weight = graph.call_function(aten.t.default, (graph.get_attr("proj.weight"),))
    if biased:
        y = graph.call_function(aten.addmm.default, (graph.get_attr("proj.bias"), x, weight))
    else:
        y = graph.call_function(aten.mm.default, (x, weight))
    graph.output(y)
    return torch.fx.GraphModule(torch.nn.ModuleDict({"proj": torch.nn.Linear(192, 256)}), graph)


def test_a_lone_projection_computes_the_fp8_product_and_a_biased_one_is_refused():
    gm = _toy(biased=False)
    assert use_fp8_linears(gm, ["proj.weight"]).scales == ("proj.weight_scale_inv",)
    w, s = fp8.quantize_weight(torch.randn(256, 192))
    gm.proj.weight.data.copy_(w)
    gm.get_parameter("proj.weight_scale_inv").data.copy_(s)
    x = torch.randn(3, 192)
    # The op's kernel (runtime/kernels/fp8_gemm.py, when imported) sums in another order than
    # the reference: equal up to fp32 rounding of the accumulation.
    torch.testing.assert_close(gm(x), fp8.fp8_linear_reference(x, w, s), rtol=1e-5, atol=1e-5)
    with pytest.raises(Fp8LinearError, match="adds a bias"):
        use_fp8_linears(_toy(biased=True), ["proj.weight"])
    assert use_fp8_linears(_toy(biased=True), []).replaced == 0  # not fp8: left as it is


# ----------------------------------------------------------------------------- lowering, numerics
def _reference(config, checkpoint, *, w8a8: bool):
    """transformers' unsharded model over the checkpoint's dequantized weights (fp32); with
    ``w8a8`` its decoder linears compute ``fp8.fp8_linear_reference`` on the stored fp8 weights
    and scales instead (activations quantized per token and 128-group, as every kernel does)."""
    from transformers import Qwen3ForCausalLM

    stored = _tensors(checkpoint)
    weights = {k: v.float() for k, v in fp8.dequantize_state(stored).items()}
    model = Qwen3ForCausalLM(config).eval()
    model.load_state_dict(weights, strict=True)
    if w8a8:
        for name, module in model.named_modules():
            if name + ".weight" in stored and stored[name + ".weight"].dtype == fp8.E4M3:
                w, s = stored[name + ".weight"], stored[name + ".weight" + SCALE_SUFFIX]
                module.forward = (lambda w, s: lambda x: fp8.fp8_linear_reference(x, w, s))(w, s)
    return model


@pytest.fixture(scope="module")
def rewritten(tp1, names, checkpoint):
    from adp_pass.runtime.weights import load_checkpoint

    gm = copy.deepcopy(tp1)
    use_fp8_linears(gm, names)
    plan = detect(gm, "tp=1,attn_dp=1")
    gm = rewrite(gm, plan)
    report = load_checkpoint(gm, plan, checkpoint, dtype=torch.float32, progress=False)
    assert report.kept_fp8 and len(report.fp8) == 7 * LAYERS
    return gm


@pytest.mark.slow  # the lowering and two references (W8A8, dequantized) over fp8-tiny
def test_an_fp8_graph_lowers_and_its_activation_quantization_fuses(config, checkpoint, rewritten):
    from adp_pass.runtime.lower import PASS_NAMES, lower

    unfused = lower(copy.deepcopy(rewritten), passes=[p for p in PASS_NAMES if p != "fp8_quant"])
    ops = graph_record(unfused).lowering.ops
    assert ops["fp8_block_linear"] == 7 * LAYERS and ops["fp8_block_linear_quantized"] == 0
    fused = lower(copy.deepcopy(rewritten))
    lowering = graph_record(fused).lowering
    # Per layer: input norm -> q/k/v, post-attention norm -> gate/up, SwiGLU -> down.
    assert lowering.counts["fp8_quant"] == 3 * LAYERS
    assert {k: v for k, v in lowering.ops.items() if v} == {
        "rms_norm_fp8": 1, "add_rms_norm_fp8": 2 * LAYERS - 1, "silu_mul_fp8": LAYERS,
        "fp8_block_linear_quantized": 6 * LAYERS,
        "fp8_block_linear": LAYERS,  # o_proj: its input is the attention's output
        "add_rms_norm": 1,  # the final norm feeds the (unquantized) LM head
        "qk_norm_rope": LAYERS,
    }
    assert lower(fused).graph is fused.graph  # idempotent: nothing left to match
    assert graph_record(fused).lowering.counts["fp8_quant"] == 0

    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        got = fused(ids)[0]
        plain = unfused(ids)[0]
        w8a8 = _reference(config, checkpoint, w8a8=True)(input_ids=ids).logits
        exact = _reference(config, checkpoint, w8a8=False)(input_ids=ids).logits
    # The fused producers hand the GEMM the codes and scales fp8_block_linear computes itself.
    assert torch.equal(got, plain)
    assert_w8a8_close(got, w8a8)
    assert_dequantized_close(got, exact)


def assert_w8a8_close(got, want):
    """Against the unsharded W8A8 reference (the same e4m3 codes and scales, fp32 sums in
    another order): relative in norm < 1e-3 (measured 3e-5), every logit within 5e-2. Not
    tighter per element: an fp32 difference of ~1e-7 can move one activation across an e4m3
    rounding midpoint, by one e4m3 step (1/8 of it), which moved one position's logits by
    1.1e-4 here (the others <= 1e-6) and by up to 2e-2 in tests/test_fp8_graph.py; a wrong scale
    tile or weight moves every position by O(1e-1)."""
    diff = (got.float() - want.float()).abs()
    assert (diff.norm() / want.norm()).item() < 1e-3
    assert diff.max().item() < 5e-2


def assert_dequantized_close(got, want):
    """Against transformers on the dequantized weights in exact (fp32) arithmetic: what
    quantizing the activations costs. Each quantized element is within 2^-4 of itself (3
    mantissa bits), about 2^-4/sqrt(3) = 0.036 in RMS; through 2 layers the logits measured
    0.048 relative in norm. Bound 2^-3: a random model's logits are flat (argmax not compared),
    and raw e4m3 codes without their scales, or a wrong tile, give O(1)."""
    relative = ((got.float() - want.float()).norm() / want.norm()).item()
    assert 0 < relative < 2**-3, relative


# ----------------------------------------------------------------------------- prepare_rank
@pytest.mark.full  # CI time: two rank builds; the job test below builds the FP8 rank once and
# test_the_build_key_tells_the_fp8_graph_apart checks the cache key
def test_prepare_rank_serves_an_fp8_checkpoint_in_fp8(config, checkpoint, tmp_path):
    from transformers import AutoConfig

    from adp_pass.runtime.engine import RankEngine
    from adp_pass.runtime.prepare import prepare_rank

    cfg = AutoConfig.from_pretrained(checkpoint)
    cfg._attn_implementation, cfg.use_cache = "sdpa", False
    build = dict(device=torch.device("cpu"), checkpoint=checkpoint, num_blocks=8, max_position=64,
                 cache_dir=tmp_path)
    native = prepare_rank(cfg, "tp=1,attn_dp=1", 0, **build)
    assert native.reports["fp8_linears"].fp8_linears == 7 * LAYERS
    assert native.counts["lower"]["fp8_quant"] == 3 * LAYERS
    params = dict(native.model.named_parameters())
    # q|k|v and gate|up fused (runtime/lower/fuse_projections.py): 4 FP8 GEMMs per layer
    assert sum(p.dtype == fp8.E4M3 for p in params.values()) == 4 * LAYERS
    assert sum(n.endswith(SCALE_SUFFIX) for n in params) == 4 * LAYERS
    dequantized = prepare_rank(cfg, "tp=1,attn_dp=1", 0, fp8_linears=False, **build)
    assert dequantized.build_cache == "miss"  # another key: not the FP8 graph's entry
    assert "fp8_linears" not in dequantized.reports
    assert not any(p.dtype == fp8.E4M3 for p in dequantized.model.parameters())
    again = prepare_rank(cfg, "tp=1,attn_dp=1", 0, **build)
    assert again.build_cache == "hit" and again.counts["lower"]["fp8_quant"] == 3 * LAYERS

    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        w8a8 = _reference(config, checkpoint, w8a8=True)(input_ids=ids).logits[0, -1]
        exact = _reference(config, checkpoint, w8a8=False)(input_ids=ids).logits[0, -1]
    got = RankEngine(again.model, again.cache, max_position=64).prefill_logits(PROMPT).float()
    plain = RankEngine(dequantized.model, dequantized.cache, max_position=64).prefill_logits(PROMPT)
    assert_w8a8_close(got, w8a8)
    assert_dequantized_close(got, exact)
    assert (plain.float() - exact).abs().max().item() < 1e-4  # today's path: the bf16 graph


def test_fp8_linears_true_needs_an_fp8_checkpoint(config):
    from adp_pass.runtime.prepare import prepare_rank

    with pytest.raises(ValueError, match="fp8_linears=True needs an FP8 block-scaled checkpoint"):
        prepare_rank(config, "tp=1,attn_dp=1", 0, device=torch.device("cpu"), fp8_linears=True)


def test_the_build_key_tells_the_fp8_graph_apart(config):
    from adp_pass.runtime.build_cache import build_key

    keys = [build_key(config, "tp=1,attn_dp=1", 0, dtype=torch.float32, device="cpu",
                      fp8_linears=flag) for flag in (False, True)]
    assert keys[0] != keys[1] and json.dumps(keys[1].identity)  # both plain data


@pytest.mark.slow  # one rank's build, in this process
def test_a_job_on_an_fp8_checkpoint_runs_fp8_and_checks_its_first_step(checkpoint, tmp_path):
    """The batch front end on an FP8 checkpoint: the rank builds the FP8 graph (its report says
    so) and its first-step check compares with transformers on the dequantized weights, within
    the activation quantization's bound (each element within 2^-4 of itself)."""
    from adp_pass.runtime.contract import Request, SamplingParams
    from adp_pass.runtime.frontend import make_job, run_job
    from adp_pass.runtime.serving_config import ServingConfig

    requests = [Request("r0", [3, 1, 4, 1, 5, 9, 2, 6], SamplingParams(max_new_tokens=4))]
    job = make_job("tp=1,attn_dp=1", [requests], checkpoint=str(checkpoint), dtype="float32",
                   serving=ServingConfig(num_blocks=8, max_position=64), check_first_step=True,
                   cache_dir=None)
    report = run_job(job, 1, log_path=tmp_path / "run.log", echo=False)
    record = report.ranks[0]
    assert record.counts["fp8"] == {"fp8_linears": 14}, record.counts
    # q|k|v and gate|up fused on the FP8 weights (tests/test_fp8_fuse.py); the first-step check
    # below reads the original names back through unfused_state_dict.
    assert record.counts["fused"] == {"groups": 2 * LAYERS, "gemms": 5 * LAYERS}, record.counts
    check = record.first_step_check
    assert check is not None and check.skipped is None, check
    assert check.max_abs_diff <= 2 ** -3 * check.max_abs_logit, check
    # Against the W8A8 arithmetic done exactly, only the kernels' own error is left: fp32 sums in
    # another order, which may move an activation across an e4m3 midpoint (FP8_FLIP_TOLERANCE).
    assert check.ours_vs_w8a8 <= FP8_FLIP_TOLERANCE, check
    assert check.w8a8_vs_fp32 > 10 * check.ours_vs_w8a8, check  # the quantization dominates
    # the job runs in fp32, so its dtype's W8A8 is the exact one, bit for bit or nearly
    assert check.w8a8_in_dtype_vs_w8a8 <= 1e-5, check
    assert fp8_first_step_verdict(check)["within"]
    assert len(record.results[0].tokens) == 4


@pytest.mark.parametrize("ours, floor, within, governs", [
    (0.10, 0.01, True, "2^-3 x max |logit|"),    # shallow: the logit bound, 0.125 of 1.0
    (0.20, 0.01, False, "2^-3 x max |logit|"),   # a kernel error no floor excuses
    (1.90, 1.00, True, "2 x the noise floor"),   # deep: where a correct bf16 pipeline lands
    (2.10, 1.00, False, "2 x the noise floor"),  # past twice it
])
def test_the_fp8_first_step_bound_is_the_larger_of_logit_and_floor(ours, floor, within, governs):
    from adp_pass.runtime.contract import FirstStepCheck

    check = FirstStepCheck(max_abs_diff=0.5, max_abs_logit=1.0, same_argmax=True,
                           ours_vs_fp32=0.5, transformers_vs_fp32=0.1, ours_vs_w8a8=ours,
                           w8a8_vs_fp32=0.4, w8a8_in_dtype_vs_w8a8=floor)
    verdict = fp8_first_step_verdict(check)
    assert (verdict["within"], verdict["governs"]) == (within, governs), verdict
    assert verdict["limit"] == max(0.125, 2 * floor)
    assert fp8_first_step_verdict(dataclasses.replace(check, ours_vs_w8a8=None)) is None
