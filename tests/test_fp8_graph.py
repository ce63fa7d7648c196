"""FP8 block-scaled linears through capture, detect, rewrite, the loader and every mapping
(docs/fp8.md, "FP8 in the graph").

The source is the engine-style TP model with FP8 decoder linears (tests/engine_qwen3.py,
``Fp8EngineQwen3ForCausalLM``: a float8_e4m3fn weight and its ``weight_scale_inv`` per linear,
``adp::fp8_block_linear``), preset ``fp8-tiny`` (every rank's part whole 128-tiles at tp 2, 4).
"""

from __future__ import annotations

import math

import pytest
import torch

from adp_pass import fp8
from adp_pass.capture import capture, fake_process_group
from adp_pass.detect import detect
from adp_pass.fx_vocab import COLLECTIVE_OPS, FP8_LINEAR_OPS, is_op
from adp_pass.graph_record import graph_record
from adp_pass.presets import model_config
from adp_pass.rewrite import rewrite
from adp_pass.verify import checkpoint_tensors
from tp_sources import capture_fp8_source, capture_source, fp8_full_state

SCALE = fp8.WEIGHT_BLOCK[0]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SITES = {"embedding": 1, "attention_out": 2, "mlp_out": 2, "lm_head_gather": 1}
MAPPINGS = {2: ["tp=2,attn_dp=1", "tp=2,attn_dp=0", "tp=2,attn_dp=1,mlp_tp=2"],
            4: ["tp=4,attn_dp=1", "tp=4,attn_dp=0", "tp=4,attn_dp=1,mlp_tp=2",
                "tp=4,attn_dp=1,attn_tp=2", "tp=4,attn_dp=1,attn_tp=2,mlp_tp=4"]}


@pytest.fixture(scope="module")
def config():
    return model_config("fp8-tiny")


@pytest.fixture(scope="module")
def full(config):
    return fp8_full_state(config)


@pytest.fixture(scope="module")
def captured(config, full):
    graphs = {}

    def get(tp: int, rank: int):
        if (tp, rank) not in graphs:
            graphs[tp, rank] = capture_fp8_source(config, tp, rank, full=full).gm
        return graphs[tp, rank]

    return get


# ----------------------------------------------------------------------------- capture, detect
def test_op_is_defined_without_the_runtime():
    # Capture and rewrite need the op's schema and fake only: adp_pass.fp8 defines them.
    import subprocess
    import sys

    code = ("import sys, torch, adp_pass.fp8 as f; "
            "assert not any(m.startswith('adp_pass.runtime.kernels') for m in sys.modules); "
            "w, s = f.quantize_weight(torch.randn(256, 192)); x = torch.randn(3, 192); "
            "assert torch.equal(torch.ops.adp.fp8_block_linear(x, w, s), "
            "f.fp8_linear_reference(x, w, s)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("tp", [2, 4])
def test_detect_finds_the_bf16_graphs_sites_in_the_fp8_graph(config, captured, tp):
    gm = captured(tp, tp - 1)
    linears = [n for n in gm.graph.nodes if is_op(n, FP8_LINEAR_OPS)]
    assert len(linears) == 7 * config.num_hidden_layers
    plan = detect(gm, f"tp={tp},attn_dp=1")
    assert plan.counts() == SITES
    if tp == 2:  # the same engine-style model in bf16 (one capture: the counts do not vary)
        bf16 = detect(capture_source("engine", config, tp, tp - 1).gm, f"tp={tp},attn_dp=1")
        assert bf16.counts() == plan.counts()
    specs = {p.name: p for p in plan.params}
    for linear in LINEARS:
        weight = specs[f"model.layers.1.{linear}.weight"]
        scale = specs[f"model.layers.1.{linear}.weight_scale_inv"]
        assert weight.dtype == "float8_e4m3fn" and scale.dtype == "float32"
        assert (scale.layout, scale.dim, scale.role) == (weight.layout, weight.dim, weight.role)
        assert scale.segments == tuple(n // SCALE for n in weight.segments)
        assert scale.local_shape == fp8.scale_shape(weight.local_shape)
        assert scale.full_shape == fp8.scale_shape(weight.full_shape)
    # 7 fp8 weights + 7 scales per layer, plus the vocab-sharded embedding and LM head
    assert sum(p.layout != "replicated" for p in plan.params) == 14 * 2 + 2


# ----------------------------------------------------------------------------- every mapping
@pytest.mark.parametrize("spec", [s for tp in MAPPINGS for s in MAPPINGS[tp]])
def test_scales_follow_their_weights_under_every_mapping(captured, full, spec):
    tp = int(spec.split(",")[0].split("=")[1])
    rank = tp - 1  # the last rank: its tiles sit at the far end of every scale grid
    gm = captured(tp, rank)
    plan = detect(gm, spec)
    new = rewrite(gm, plan, state_dict=full)
    specs = {p.name: p for p in plan.params}
    for linear in LINEARS:
        name = f"model.layers.0.{linear}.weight"
        weight, scale = specs[name], specs[name + "_scale_inv"]
        assert scale.parts == weight.parts
        held_w, held_s = new.get_parameter(name), new.get_parameter(name + "_scale_inv")
        assert held_w.dtype == fp8.E4M3 and tuple(held_w.shape) == weight.held_shape
        assert tuple(held_s.shape) == scale.held_shape == fp8.scale_shape(weight.held_shape)
        # The rank's tiles are the tiles of its values: dequantizing what it holds gives its
        # part of the dequantized full weight, bit for bit.
        want = weight.held_part(fp8.dequantize_weight(full[name], full[name + "_scale_inv"]), rank)
        assert torch.equal(fp8.dequantize_weight(held_w, held_s), want)
    check = graph_record(new).rewrite.self_check
    if plan.replicated_only:  # the numeric self-check ran the fp8 linears on rank values
        assert check.startswith("numeric"), check
        assert not any(is_op(n, COLLECTIVE_OPS) for n in new.graph.nodes)


def test_self_check_catches_scales_cut_unlike_their_weight(captured, full):
    from adp_pass.layouts import Segment
    from adp_pass.self_check import SelfCheckError

    gm = captured(2, 1)
    plan = detect(gm, "tp=2,attn_dp=1")
    node = next(n.name for n in gm.graph.nodes if n.op == "get_attr"
                and n.target == "model.layers.0.self_attn.q_proj.weight_scale_inv")
    layout = plan.node_layouts[node]
    assert layout.at(0) == (Segment(4, 4),)  # rank 1 holds tile rows 4..7 of 8
    # Claim the rank's tiles interleave in blocks of 2 (4 rows: 2..3 and 6..7): the shapes still
    # agree; only the numbers can tell.
    plan.node_layouts[node] = type(layout)(((0, (Segment(4, 2),)),), layout.partial, layout.deps)
    with pytest.raises(SelfCheckError, match="fp8_block_linear"):
        rewrite(gm, plan, state_dict=full)


# ----------------------------------------------------------------------------- refusal
def test_a_shard_of_partial_blocks_is_refused_before_any_weight_is_read(config):
    from engine_qwen3 import Fp8EngineQwen3ForCausalLM

    # intermediate 384 at tp=2: each rank would hold 192 rows of gate/up (1.5 tiles)
    odd = model_config("fp8-tiny", intermediate_size=384)
    with fake_process_group(2, 0):
        # never filled: the refusal must come from the graph alone, before any weight is read
        model = Fp8EngineQwen3ForCausalLM(odd, 2, 0, "0").eval()
        gm = capture(model, [torch.zeros(1, 4, dtype=torch.long)], rank=0, world_size=2).gm
    with pytest.raises(fp8.Fp8BlockError) as err:
        detect(gm, "tp=2,attn_dp=1,mlp_tp=2")
    text = str(err.value)
    # the first misfit in site order: layer 0's MLP, its row-parallel down_proj first
    assert "model.layers.0.mlp.down_proj.weight is FP8 with 128x128 scale blocks" in text
    assert "192 of its columns" in text and "not a multiple of 128" in text
    assert "(6 FP8 weights so)" in text  # down, gate and up of both layers
    assert "TP degrees whose shards are whole blocks: 1;" in text
    assert "capture the bf16 model" in text and err.value.hint
    # the bf16 graph of this job loads the checkpoint where every part is whole blocks: the MLP
    # whole (384 = 3 blocks), never split in two (192)
    bf16_ok = text.rsplit("whole blocks: ", 1)[1]
    assert "tp=2,attn_dp=1,attn_tp=1,mlp_tp=1" in bf16_ok and "mlp_tp=2" not in bf16_ok


# ----------------------------------------------------------------------------- the loader
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from adp_pass.quantize import quantize_checkpoint

    out = tmp_path_factory.mktemp("fp8-tiny")
    # what `adp quantize --preset fp8-tiny --dtype fp32` writes (bf16 scales, the default)
    quantize_checkpoint(out, preset="fp8-tiny", dtype="fp32", progress=False)
    return out


def test_loader_keeps_fp8_and_reads_each_ranks_tiles(captured, checkpoint):
    from adp_pass.runtime.weights import load_checkpoint

    gm = captured(4, 3)
    plan = detect(gm, "tp=4,attn_dp=1,attn_tp=2,mlp_tp=4")
    new = rewrite(gm, plan)  # uninitialised: every value below comes from the checkpoint
    report = load_checkpoint(new, plan, checkpoint, dtype=torch.float32, progress=False)
    stored = checkpoint_tensors(checkpoint)
    specs = {p.name: p for p in plan.params}
    assert report.kept_fp8 and len(report.fp8) == 14 and report.unused == []
    assert "14 FP8 weights kept in FP8 with their scales" in str(report)
    for linear in LINEARS:
        name = f"model.layers.1.{linear}.weight"
        weight, scale = new.get_parameter(name), new.get_parameter(name + "_scale_inv")
        assert weight.dtype == fp8.E4M3 and scale.dtype == torch.float32
        want_w = specs[name].held_part(stored[name], 3)
        want_s = specs[name + "_scale_inv"].held_part(stored[name + "_scale_inv"], 3)
        assert torch.equal(weight.view(torch.uint8), want_w.view(torch.uint8))
        assert torch.equal(scale, want_s.float())
    # attention kept TP over 2 ranks, MLP over 4: rank 3 holds the second half / last quarter
    assert new.get_parameter("model.layers.0.self_attn.q_proj.weight_scale_inv").shape == (4, 2)
    assert new.get_parameter("model.layers.0.mlp.down_proj.weight_scale_inv").shape == (2, 1)
    assert set(report.sliced) >= {f"model.layers.0.{linear}.weight_scale_inv" for linear in LINEARS}


def test_loader_refuses_a_bf16_checkpoint_for_the_fp8_graph(captured, config, tmp_path):
    from adp_pass.capture import build_hf_qwen3
    from adp_pass.runtime.weights import CheckpointError, load_checkpoint

    build_hf_qwen3(config, seed=0).save_pretrained(tmp_path, safe_serialization=True)
    gm = captured(2, 1)
    plan = detect(gm, "tp=2,attn_dp=1")
    with pytest.raises(CheckpointError, match=r"float8_e4m3fn in the graph .* FP8 block-scaled"):
        load_checkpoint(rewrite(gm, plan), plan, tmp_path, progress=False)


# A bf16 graph (today's path) still dequantizes at load: tests/test_quantize.py
# (test_a_replicated_rank_loads_the_dequantized_model, test_a_sharded_mlp_rank_reads_only_...).


# ----------------------------------------------------------------------------- gloo parity
# Reference: the unsharded FP8 model (tp=1, Fp8EngineQwen3ForCausalLM) on the checkpoint's full
# fp8 weights and scales, so it quantizes activations per token and 128-group as every rank does
# (each rank's K range is whole groups, so its groups are the full tensor's), run on each DP
# group's rows as that group runs them.
#
# Tolerance, and why. The fp8 products are the same; the fp32 sums are not (row-parallel
# partial sums added by the all-reduce, GEMMs of other row counts: CPU BLAS blocks by shape),
# ~1e-7 relative, so a logits row agrees within ROW_TOLERANCE = 1e-4 (the bf16 graphs' bound).
# Except where such a difference meets an activation sitting on an e4m3 rounding midpoint: it
# then rounds to the neighbouring fp8 value (one e4m3 ulp, 1/8 of that element), and the rest of
# that sequence moves by up to ~2e-2 (observed: the reference model itself gives 2.0e-2 on one
# sequence of this batch when run on 1 row instead of 4). Such a flip is one token's event, so
# at most FLIPPED_ROWS = 1 of the 4 sequences may exceed 1e-4, by at most FLIP_TOLERANCE = 5e-2.
# A wrong scale tile or shard reaches every sequence (every token reads every tile): doubling
# one scale of layer 0's down_proj moves all of them, by up to 7e-2.
ROW_TOLERANCE, FLIP_TOLERANCE, FLIPPED_ROWS = 1e-4, 5e-2, 1


def _row_diffs(got: torch.Tensor, want: torch.Tensor) -> list[float]:
    return [(g - w).abs().max().item() for g, w in zip(got, want)]


def _parity_rank(config, checkpoint: str, ids: torch.Tensor, specs: list[str],
                 splits: dict) -> dict:
    from adp_pass.capture import capture as capture_graph
    from adp_pass.launch import init_rank
    from adp_pass.mapping import Mapping
    from adp_pass.pipeline import Pipeline
    from adp_pass.runtime.rank import join_groups
    from adp_pass.runtime.weights import load_checkpoint
    from pathlib import Path
    from tp_sources import fp8_tp_model

    import time

    start = time.perf_counter()
    rank, world, device = init_rank()
    full = {k: (v.float() if k.endswith("_scale_inv") else v)
            for k, v in checkpoint_tensors(Path(checkpoint)).items()}
    model = fp8_tp_model(config, world, rank, full)
    pipeline = Pipeline()
    captured = pipeline.capture(lambda: capture_graph(model, [ids], rank=rank, world_size=world))
    with torch.no_grad():
        out = {"tp": captured.gm(ids)[0], "capture_s": time.perf_counter() - start}
    for spec in specs:
        mapping = Mapping.load(spec)
        plan = pipeline.detect(captured.gm, mapping)
        gm = pipeline.rewrite(captured.gm, plan)
        load_checkpoint(gm, plan, checkpoint, progress=False)
        join_groups(mapping, gm, rank)
        rows = splits[spec]
        dp = mapping.dp_rank(rank)
        mine = ids[sum(rows[:dp]): sum(rows[:dp]) + rows[dp]]
        pad = max(rows) if mapping.lockstep_size > 1 else len(mine)
        padded = torch.cat([mine, mine.new_zeros((pad - len(mine), mine.shape[1]))])
        with torch.no_grad():
            logits = gm(padded)[0][: len(mine)] if pad else None
        leader = rank == mapping.attn_group(rank)[0]
        out[spec] = (logits, len(plan.sites), sum(is_op(n, COLLECTIVE_OPS)
                                                  for n in gm.graph.nodes)) if leader else None
    out["seconds"] = time.perf_counter() - start
    return out


def _parity(config, checkpoint, world: int, splits: dict) -> None:
    from engine_qwen3 import Fp8EngineQwen3ForCausalLM
    from adp_pass.launch import launch

    specs = list(splits)
    ids = torch.randint(0, config.vocab_size, (sum(next(iter(splits.values()))), 5),
                        generator=torch.Generator().manual_seed(1))
    results = launch(_parity_rank, world, config, str(checkpoint), ids, specs, splits,
                     timeout_s=240)
    reference = Fp8EngineQwen3ForCausalLM(config).eval()
    stored = checkpoint_tensors(checkpoint)
    reference.load_state_dict({k: (v.float() if k.endswith("_scale_inv") else v)
                               for k, v in stored.items()}, strict=True)
    with torch.no_grad():
        want = reference(ids)
        # Each DP group's rows as that group runs them (same GEMM row counts; see above).
        per_group = {spec: torch.cat([reference(part) for part in ids.split(rows) if len(part)])
                     for spec, rows in splits.items()}
    assert want.abs().max() > 0.05  # not a degenerate model
    diffs = {f"tp rank {i}": _row_diffs(r["tp"], want) for i, r in enumerate(results)}
    for spec in specs:
        got = torch.cat([r[spec][0] for r in results
                         if r[spec] is not None and r[spec][0] is not None])
        assert got.shape == want.shape, spec
        diffs[spec] = _row_diffs(got, per_group[spec])
    print(f"max |logits - reference| per sequence (|reference| <= "
          f"{want.abs().max().item():.3f}): { {k: [f'{d:.1e}' for d in v] for k, v in diffs.items()} }"
          f"; rank seconds {[round(r['seconds'], 1) for r in results]} (capture "
          f"{[round(r['capture_s'], 1) for r in results]})")
    for name, rows in diffs.items():
        flipped = [d for d in rows if d > ROW_TOLERANCE]
        assert len(flipped) <= FLIPPED_ROWS and max(rows) <= FLIP_TOLERANCE, (name, rows)


@pytest.mark.multirank
def test_fp8_parity_on_two_gloo_ranks(config, checkpoint):
    # rows per DP group; the plain TP mapping has one group with the whole batch
    _parity(config, checkpoint, 2, {"tp=2,attn_dp=1": [1, 2], "tp=2,attn_dp=0": [3],
                                    "tp=2,attn_dp=1,mlp_tp=2": [2, 1]})


@pytest.mark.multirank
@pytest.mark.full
def test_fp8_parity_on_four_gloo_ranks(config, checkpoint):
    _parity(config, checkpoint, 4, {"tp=4,attn_dp=1": [1, 0, 2, 1], "tp=4,attn_dp=0": [4],
                                    "tp=4,attn_dp=1,mlp_tp=2": [1, 1, 0, 2],
                                    "tp=4,attn_dp=1,attn_tp=2": [3, 1],
                                    "tp=4,attn_dp=1,attn_tp=2,mlp_tp=4": [2, 2]})


def test_random_fp8_weights_are_the_quantized_presets(captured, checkpoint):
    from adp_pass.runtime.weights import load_checkpoint, random_weights

    gm = captured(2, 0)
    plan = detect(gm, "tp=2,attn_dp=1,mlp_tp=2")
    drawn, loaded = rewrite(gm, plan), rewrite(gm, plan)
    random_weights(drawn, plan)  # seed 0, std 0.02: what `adp quantize --preset` draws
    load_checkpoint(loaded, plan, checkpoint, progress=False)
    for name, value in loaded.named_parameters():
        mine = drawn.get_parameter(name)
        assert mine.dtype == value.dtype and mine.shape == value.shape, name
        if value.dtype == fp8.E4M3:
            mine, value = mine.view(torch.uint8), value.view(torch.uint8)
        assert torch.equal(mine, value), name
