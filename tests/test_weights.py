"""Tests for runtime/weights.py: checkpoint loading through the plan, memory check, random init."""

import dataclasses
import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3ForCausalLM

from adp_pass.capture import capture_hf_qwen3
from adp_pass.detect import detect
from adp_pass.mapping import Mapping
from adp_pass.plan import ParamSpec, Plan
from adp_pass.presets import qwen3_config
from adp_pass.rewrite import rewrite
from adp_pass.runtime.weights import (
    CheckpointError,
    InsufficientMemory,
    check_memory,
    kv_cache_bytes,
    load_checkpoint,
    random_weights,
)


def _hf_model(tied: bool, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(qwen3_config("tiny", tie_word_embeddings=tied)).eval()


def _rewritten(tied: bool):
    config = qwen3_config("tiny", tie_word_embeddings=tied)
    captured = capture_hf_qwen3(config, world_size=2, rank=0)
    plan = detect(captured.gm, "tp=2,attn_dp=1")
    return rewrite(captured.gm, plan), plan


@pytest.fixture(scope="module")
def untied():
    return _rewritten(tied=False)


@pytest.fixture(scope="module")
def tied():
    return _rewritten(tied=True)


def _save(model: Qwen3ForCausalLM, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def _assert_matches(gm, model: Qwen3ForCausalLM, *, logits: bool = True) -> None:
    loaded = gm.state_dict()
    expected = model.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    if not logits:
        return
    ids = torch.randint(0, model.config.vocab_size, (3, 7),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (gm(ids)[0] - model(input_ids=ids, use_cache=False).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_load_untied(untied, tmp_path, sharded, capsys):
    gm, plan = untied
    model = _hf_model(tied=False, seed=10 + sharded)  # another seed each: a stale load would show
    kwargs = {"max_shard_size": "200KB"} if sharded else {}
    path = _save(model, tmp_path / "ckpt", **kwargs)
    assert (path / "model.safetensors.index.json").exists() == sharded
    report = load_checkpoint(gm, plan, path)
    _assert_matches(gm, model)
    assert report.tensors == len(model.state_dict()) and report.sliced == [] and report.unused == []
    assert report.derived == ["model.rotary_emb.inv_freq"]
    assert len(report.files) == (3 if sharded else 1)
    assert report.bytes_read == sum(t.numel() * 4 for t in model.state_dict().values())
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{report.tensors}/{report.tensors} tensors" in line and "MB/s" in line


def test_load_tied(tied, tmp_path):
    gm, plan = tied
    model = _hf_model(tied=True, seed=12)
    path = _save(model, tmp_path / "ckpt", max_shard_size="200KB")
    assert "lm_head.weight" not in {k for f in path.glob("*.safetensors") for k in load_file(f)}
    load_checkpoint(gm, plan, path, progress=False)
    _assert_matches(gm, model)
    assert gm.get_parameter("lm_head.weight") is gm.get_parameter("model.embed_tokens.weight")


def test_load_casts_and_keeps_tensors_in_place(untied, tmp_path):
    gm, plan = untied
    model = _hf_model(tied=False, seed=13)
    path = _save(model, tmp_path / "ckpt")
    weight = gm.get_parameter("model.layers.0.self_attn.q_proj.weight")
    load_checkpoint(gm, plan, path, progress=False)
    # Same device and dtype: filled in place, so references (compiled code) stay valid.
    assert gm.get_parameter("model.layers.0.self_attn.q_proj.weight") is weight
    half = copy.deepcopy(gm)
    load_checkpoint(half, plan, path, dtype=torch.bfloat16, progress=False)
    norm = half.get_parameter("model.norm.weight")
    assert norm.dtype == torch.bfloat16 and torch.equal(norm, model.model.norm.weight.bfloat16())
    assert half.get_buffer("model.rotary_emb.inv_freq").dtype == torch.float32  # derived: kept
    load_checkpoint(half, plan, path, progress=False)  # default dtype: the current one (bf16)
    assert half.get_parameter("model.norm.weight") is norm


def test_load_into_meta_graph(tmp_path):
    # Big presets are captured on meta: every tensor is registered anew, inv_freq from config.json.
    config = qwen3_config("tiny")
    captured = capture_hf_qwen3(config, world_size=2, rank=1, meta=True)
    plan = detect(captured.gm, "tp=2,attn_dp=1")
    gm = rewrite(captured.gm, plan)
    model = _hf_model(tied=False, seed=17)
    load_checkpoint(gm, plan, _save(model, tmp_path / "ckpt"), progress=False)
    assert torch.equal(gm.get_buffer("model.rotary_emb.inv_freq"), model.model.rotary_emb.inv_freq)
    # No logits: a meta capture bakes device=meta into the graph's arange/scalar_tensor nodes.
    _assert_matches(gm, model, logits=False)


def _rewrite_file(path: Path, edit) -> None:
    """Apply ``edit`` to the state dict of the checkpoint's single file and write it back."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(untied, tmp_path):
    gm, plan = untied
    path = _save(_hf_model(tied=False, seed=14), tmp_path / "ckpt")
    _rewrite_file(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(gm, plan, path, progress=False)
    message = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in message and "model.safetensors" in message
    assert "1 tensors" in message


def test_wrong_shape_is_named(untied, tmp_path):
    gm, plan = untied
    path = _save(_hf_model(tied=False, seed=15), tmp_path / "ckpt")
    _rewrite_file(path, lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(gm, plan, path, progress=False)
    message = str(err.value)
    assert "model.norm.weight" in message and "expected [64], found [32]" in message
    assert "different config" in message


def test_config_disagreeing_with_graph(untied, tmp_path):
    gm, plan = untied
    path = _save(_hf_model(tied=True, seed=16), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings True \(graph False\)"):
        load_checkpoint(gm, plan, path, progress=False)
    torch.manual_seed(0)
    wide = Qwen3ForCausalLM(qwen3_config("tiny", intermediate_size=192))
    path = _save(wide, tmp_path / "wide")
    with pytest.raises(CheckpointError, match=r"intermediate_size 192 \(graph 128\)"):
        load_checkpoint(gm, plan, path, progress=False)


def test_directory_without_safetensors(untied, tmp_path):
    gm, plan = untied
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files .*pytorch_model\.bin"):
        load_checkpoint(gm, plan, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(gm, plan, tmp_path / "nowhere", progress=False)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("layout,dim", [("column", 0), ("row", 1)])
def test_sliced_read_of_a_sharded_parameter(tmp_path, rank, layout, dim):
    # A fused q|k|v weight kept tensor-parallel: local blocks of 4, 2 and 2 rows (or columns).
    local = (8, 6) if dim == 0 else (6, 8)
    full_shape = tuple(s * 2 if d == dim else s for d, s in enumerate(local))
    spec = ParamSpec("qkv.weight", ("qkv.weight",), layout, dim, (4, 2, 2), local, full_shape,
                     "float32", "attention", parts=2)
    plan = Plan(Mapping(tp_size=2), rank, [], [spec], [])
    module = torch.nn.Module()
    module.qkv = torch.nn.Module()
    module.qkv.weight = torch.nn.Parameter(torch.zeros(local), requires_grad=False)
    full = torch.randn(full_shape)
    save_file({"qkv.weight": full, "other": torch.ones(3)}, tmp_path / "model.safetensors")
    report = load_checkpoint(module, plan, tmp_path, progress=False)
    assert torch.equal(module.qkv.weight, spec.shard(full, rank, 2))
    assert report.sliced == ["qkv.weight"] and report.unused == ["other"]
    assert report.bytes_read == 8 * 6 * 4  # the shard only, not the full tensor


def test_check_memory(untied):
    _, plan = untied
    weights = sum(torch.Size(p.full_shape).numel() * 4 for p in plan.params)
    kv = kv_cache_bytes(2, 8, 16, num_blocks=64, block_size=16, dtype=torch.float32)
    assert kv == 2 * 2 * 64 * 16 * 8 * 16 * 4
    ok = check_memory(plan, kv_cache_bytes=kv, device="cpu", free_bytes=10 * (weights + kv))
    assert ok.fits and ok.weights_bytes == weights and ok.total_bytes == weights + kv
    assert check_memory(plan, kv_cache_bytes=0, device="cpu").free_bytes > 0  # /proc/meminfo
    half = check_memory(
        plan, kv_cache_bytes=0, device="cpu", dtype=torch.bfloat16, free_bytes=weights
    )
    assert half.weights_bytes == weights // 2
    gib = 1024**3
    with pytest.raises(InsufficientMemory) as err:
        check_memory(plan, kv_cache_bytes=7 * gib, device="cpu", free_bytes=6 * gib, headroom=1.0)
    message = str(err.value)
    assert "rank 0 needs 7.0 GiB" in message and "KV cache 7.0 GiB" in message
    assert "cpu has 6.0 GiB free" in message and "by 1.0 GiB too little" in message
    assert "lower max batch/context" in message
    assert "use mapping tp=2,attn_dp=1,attn_tp=2,mlp_tp=1 (3.5 GiB per rank)" in message


@pytest.mark.full  # CI time: two meta captures; tests/test_quantize.py checks that the model drawn
# by name is the one every rank builds
def test_random_weights_meta_graph_is_reproducible_across_ranks():
    config = qwen3_config("tiny")
    models = {}
    for rank in (0, 1):
        captured = capture_hf_qwen3(config, world_size=2, rank=rank, meta=True)
        plan = detect(captured.gm, "tp=2,attn_dp=1")
        gm = rewrite(captured.gm, plan)
        assert gm.get_parameter("model.norm.weight").is_meta
        if rank == 0:  # without the config, a meta inv_freq cannot be made
            with pytest.raises(CheckpointError, match="inv_freq"):
                random_weights(gm, plan, seed=3)
        random_weights(gm, plan, seed=3, config=config)
        models[rank] = gm.state_dict()
    reference = _hf_model(tied=False, seed=0)
    for name, tensor in models[0].items():
        assert not tensor.is_meta and torch.equal(tensor, models[1][name]), name
    assert models[0]["model.norm.weight"].sub(1).abs().max() < 0.2
    assert models[0]["lm_head.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    inv_freq = gm.get_buffer("model.rotary_emb.inv_freq")
    assert torch.equal(inv_freq, reference.model.rotary_emb.inv_freq)


def test_random_weights_sharded_target_is_the_full_tensors_shard():
    spec = ParamSpec("w", ("w",), "column", 0, (2, 2), (4, 3), (8, 3), "float32", "mlp", parts=2)
    shards = []
    for rank in (0, 1):
        module = torch.nn.Module()
        module.w = torch.nn.Parameter(torch.empty(4, 3, device="meta"), requires_grad=False)
        random_weights(module, Plan(Mapping(tp_size=2), rank, [], [spec], []), seed=5)
        shards.append(module.w.detach())
    full = torch.nn.Module()
    full.w = torch.nn.Parameter(torch.empty(8, 3), requires_grad=False)
    whole = dataclasses.replace(spec, parts=1)
    random_weights(full, Plan(Mapping(tp_size=2), 0, [], [whole], []), seed=5)
    assert torch.equal(spec.assemble(shards), full.w)


def test_progress_in_a_rank_log_is_a_line_per_quarter(monkeypatch, capsys):
    from adp_pass.runtime.weights import _Progress

    monkeypatch.setenv("RANK", "1")  # as under torchrun: the front end shows "[rank N]" lines
    meter = _Progress(8, 8_000_000, enabled=True)
    for _ in range(8):
        meter.advance(1_000_000)
    meter.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        f"[rank 1] loading checkpoint: {n}/8 tensors" for n in (2, 4, 6, 8)
    ]
