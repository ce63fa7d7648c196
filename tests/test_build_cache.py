"""The build cache (runtime/build_cache.py): a cached rank is the fresh build, bit for bit; any
change of what the build depends on misses; a damaged entry is rebuilt with a warning, never
loaded; without a cache nothing is written. Tiny preset on CPU."""

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adp_pass.graph_record import graph_record
from adp_pass.plan import GROUP_TAG
from adp_pass.presets import qwen3_config
from adp_pass.runtime import build_cache
from adp_pass.runtime.build_cache import BuildCacheWarning, build_key, lookup
from adp_pass.runtime.engine import Request, RankEngine
from adp_pass.runtime.groups import bind_groups
from adp_pass.runtime.prepare import prepare_rank
from adp_pass.runtime.sampling import SamplingParams

CPU = torch.device("cpu")
REPLICATED, COLLECTIVE = "tp=2,attn_dp=1", "tp=2,attn_dp=1,mlp_tp=2"
GEOMETRY = dict(device=CPU, num_blocks=8, block_size=16, max_position=64)


@pytest.fixture(scope="module")
def config():
    return qwen3_config("tiny")


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """Where the replicated builds write their stages' graphs."""
    return tmp_path_factory.mktemp("dumps")


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, config, dumps):
    """(cache dir, the fresh build that stored the entry, the build loaded from it)."""
    cache = tmp_path_factory.mktemp("cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BuildCacheWarning)  # a clean miss warns about nothing
        cold = prepare_rank(config, REPLICATED, 0, cache_dir=cache, dump_dir=dumps / "cold",
                            **GEOMETRY)
        warm = prepare_rank(config, REPLICATED, 0, cache_dir=cache, dump_dir=dumps / "warm",
                            **GEOMETRY)
    return cache, cold, warm


def _key(config, mapping=REPLICATED, rank=0, dtype=torch.float32):
    return build_key(config, mapping, rank, dtype=dtype, device=CPU)


def _entry(cache: Path, config) -> Path:
    return cache / _key(config).entry_name


def _tokens(built, prompts) -> tuple[list, torch.Tensor]:
    engine = RankEngine(built.model, built.cache)
    logits = engine.prefill_logits(prompts[0])
    results = engine.generate([Request(i, p, SamplingParams(max_new_tokens=2))
                               for i, p in enumerate(prompts)])
    return [r.tokens for r in results], logits


def test_hit_is_the_fresh_build_bit_for_bit(replicated):
    cache, cold, warm = replicated
    assert (cold.build_cache, warm.build_cache) == ("miss", "hit")
    assert list(cold.timings) == ["capture_s", "rewrite_s", "weights_s", "lower_s", "store_s",
                                  "fuse_s", "decode_mm_s"]
    assert list(warm.timings) == ["load_s", "weights_s", "fuse_s", "decode_mm_s"]
    assert "build cache hit" in warm.describe() and "load" in warm.describe()
    assert warm.model.code == cold.model.code and warm.counts == cold.counts
    # The graph's one record comes back typed and equal (the rank passes ran on both).
    assert graph_record(warm.model) == graph_record(cold.model)
    assert [k for k in warm.model.meta if k.startswith("adp")] == ["adp"]
    assert warm.plan == cold.plan
    want, got = cold.model.state_dict(), warm.model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    buffers = dict(cold.model.named_buffers())
    assert {k: (v.shape, v.dtype) for k, v in warm.model.named_buffers()} == {
        k: (v.shape, v.dtype) for k, v in buffers.items()}
    assert torch.equal(warm.model.get_buffer("adp_rope.cos_sin_cache"),
                       buffers["adp_rope.cos_sin_cache"])
    assert not any(t.is_meta for t in [*warm.model.parameters(), *warm.model.buffers()])
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    tokens_cold, logits_cold = _tokens(cold, prompts)
    tokens_warm, logits_warm = _tokens(warm, prompts)
    assert torch.equal(logits_warm, logits_cold) and tokens_warm == tokens_cold


def test_each_stage_is_reported_and_dumped(replicated, dumps):
    _, cold, warm = replicated
    assert list(cold.reports) == ["capture", "detect", "rewrite", "weights", "lower", "cache",
                                  "store", "fuse", "decode_mm"]
    assert list(warm.reports) == ["load", "weights", "fuse", "decode_mm"]
    assert cold.reports["lower"].counts == cold.counts["lower"]
    assert cold.reports["fuse"].counts == cold.counts["fused"]
    assert sorted(p.name for p in (dumps / "cold").iterdir()) == [
        "01-capture.txt", "02-detect.txt", "03-rewrite.txt", "04-lower.txt", "05-cache.txt",
        "06-fuse.txt", "07-decode_mm.txt"]
    assert sorted(p.name for p in (dumps / "warm").iterdir()) == [
        "01-load.txt", "02-fuse.txt", "03-decode_mm.txt"]
    assert "cached_attention" in (dumps / "warm" / "01-load.txt").read_text()
    # A hit's build reports are the stored build's, typed as they were made.
    assert list(cold.build_reports) == ["capture", "detect", "rewrite", "weights", "lower",
                                        "cache"]
    assert warm.build_reports == cold.build_reports


def test_collective_graph_and_its_group_tags_survive(tmp_path, config):
    cold = prepare_rank(config, COLLECTIVE, 0, cache_dir=tmp_path, **GEOMETRY)
    warm = prepare_rank(config, COLLECTIVE, 0, cache_dir=tmp_path, **GEOMETRY)
    assert (cold.build_cache, warm.build_cache) == ("miss", "hit")
    assert warm.model.code == cold.model.code and warm.plan == cold.plan

    def tags(gm):
        return {n.name: n.meta[GROUP_TAG] for n in gm.graph.nodes if GROUP_TAG in n.meta}

    assert tags(warm.model) == tags(cold.model) and set(tags(cold.model).values()) == {"mlp"}
    names = {"world": "w", "attn": "a", "mlp": "m"}
    assert bind_groups(warm.model, names) == bind_groups(cold.model, names) == 4
    assert warm.model.code == cold.model.code  # bound to the same (stand-in) groups


def test_geometry_is_applied_on_load_not_keyed(replicated, config):
    cache, cold, _ = replicated
    geometry = dict(GEOMETRY, num_blocks=5, block_size=32, max_position=100)
    built = prepare_rank(config, REPLICATED, 0, cache_dir=cache, **geometry)
    assert built.build_cache == "hit"
    assert tuple(built.model.get_buffer("kv_cache_0_k").shape[:2]) == (5, 32)
    table = built.model.get_buffer("adp_rope.cos_sin_cache")
    assert table.shape[0] == 100
    # The rows a shorter table has are the same numbers (the table is recomputed, not cut).
    assert torch.equal(table[:64], cold.model.get_buffer("adp_rope.cos_sin_cache"))


def test_checkpoint_weights_fill_a_loaded_graph(replicated, tmp_path):
    from transformers import Qwen3ForCausalLM

    from adp_pass.runtime.lower.fuse_projections import unfused_state_dict

    config = qwen3_config("tiny")  # save_pretrained writes architectures and dtype into it
    torch.manual_seed(1)
    reference = Qwen3ForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    built = prepare_rank(config, REPLICATED, 0, cache_dir=replicated[0], checkpoint=tmp_path,
                         **GEOMETRY)
    assert built.build_cache == "hit"
    want, got = reference.state_dict(), unfused_state_dict(built.model)
    assert set(got) <= set(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_a_hit_checks_memory_before_allocating(replicated, config, monkeypatch):
    from adp_pass.runtime import weights

    monkeypatch.setattr(weights, "_free_bytes", lambda device: 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BuildCacheWarning)  # refused, not taken for a bad entry
        with pytest.raises(weights.InsufficientMemory, match="KV cache"):
            prepare_rank(config, REPLICATED, 0, cache_dir=replicated[0], **GEOMETRY)


@pytest.mark.parametrize("change", ["config", "mapping", "rank", "dtype"])
def test_a_changed_key_misses(replicated, config, change):
    cache = replicated[0]
    key = {
        "config": lambda: _key(qwen3_config("tiny", rms_norm_eps=1e-5)),
        "mapping": lambda: _key(config, mapping=COLLECTIVE),
        "rank": lambda: _key(config, rank=1),
        "dtype": lambda: _key(config, dtype=torch.bfloat16),
    }[change]()
    assert key.entry_name != _key(config).entry_name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup(cache, key, **GEOMETRY).status == "miss"


def test_irrelevant_config_fields_still_hit(replicated, config):
    other = qwen3_config("tiny")
    other._name_or_path, other.transformers_version = "/somewhere/else", "0.0.1"
    assert _key(other) == _key(config)
    assert lookup(replicated[0], _key(other), **GEOMETRY).status == "hit"


@pytest.mark.parametrize("what", ["torch", "source"])
def test_a_version_or_code_change_is_stale(replicated, config, monkeypatch, what):
    if what == "torch":
        real = build_cache.versions()
        monkeypatch.setattr(build_cache, "versions", lambda: dict(real, torch="0.0.0"))
        expect = "torch"
    else:
        monkeypatch.setattr(build_cache, "source_hash", lambda: "0" * 64)
        expect = "sources"
    key = _key(config)
    with pytest.warns(BuildCacheWarning, match=f"stale entry .*{expect}"):
        found = lookup(replicated[0], key, **GEOMETRY)
    assert found.status == "stale" and found.built is None


def test_an_entry_of_the_old_format_is_stale(replicated, config, tmp_path):
    """Format 1 kept loose meta keys and timings; this adp-pass reads only its own format."""
    cache = _copy_entry(replicated, config, tmp_path)
    path = _entry(cache, config) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 1
    path.write_text(json.dumps(manifest))
    with pytest.warns(BuildCacheWarning, match="stale entry .*format version 1"):
        found = lookup(cache, _key(config), **GEOMETRY)
    assert found.status == "stale" and found.built is None


def _copy_entry(replicated, config, tmp_path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(_entry(replicated[0], config), cache / _key(config).entry_name)
    return cache


@pytest.mark.parametrize("damage", ["truncate graph", "edit plan", "truncate manifest",
                                    "delete tensors", "forged checksum"])
def test_a_damaged_entry_is_never_loaded(replicated, config, tmp_path, damage):
    cache = _copy_entry(replicated, config, tmp_path)
    entry = _entry(cache, config)
    if damage == "truncate graph":
        data = (entry / "graph.json").read_bytes()
        (entry / "graph.json").write_bytes(data[: len(data) // 2])
    elif damage == "edit plan":
        data = bytearray((entry / "plan.json").read_bytes())
        data[100] ^= 1
        (entry / "plan.json").write_bytes(bytes(data))
    elif damage == "truncate manifest":
        (entry / "manifest.json").write_text((entry / "manifest.json").read_text()[:50])
    elif damage == "delete tensors":
        (entry / "tensors.safetensors").unlink()
    else:  # a graph edited *and* its checksum updated: refused, its code is not the stored one
        text = (entry / "graph.json").read_text()
        assert "1e-06" in text  # the RMSNorm eps
        data = text.replace("1e-06", "1e-05", 1).encode()
        (entry / "graph.json").write_bytes(data)
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["files"]["graph.json"] = {"bytes": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest()}
        (entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(BuildCacheWarning, match="corrupt entry"):
        found = lookup(cache, _key(config), **GEOMETRY)
    assert found.status == "corrupt" and found.built is None


def test_a_truncated_entry_is_rebuilt_and_stored_again(replicated, config, tmp_path):
    cache = _copy_entry(replicated, config, tmp_path)
    graph = _entry(cache, config) / "graph.json"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.warns(BuildCacheWarning, match="truncated"):
        built = prepare_rank(config, REPLICATED, 0, cache_dir=cache, **GEOMETRY)
    assert built.build_cache == "corrupt" and "capture_s" in built.timings
    assert "rebuilt" in built.describe() and "truncated" in built.describe()
    assert built.model.code == replicated[1].model.code
    assert lookup(cache, _key(config), **GEOMETRY).status == "hit"
    assert [p.name for p in cache.iterdir()] == [_key(config).entry_name]  # no leftovers


def test_artifact_of_adp_rewrite_is_the_ranks_build(replicated, config, tmp_path, capsys):
    from adp_pass.cli import main

    assert main(["rewrite", "--preset", "tiny", "--mapping", REPLICATED, "--rank", "0",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    entry = tmp_path / "cache" / _key(config).entry_name
    assert f"serving artifact (float32 on cpu): {entry}" in out
    built = prepare_rank(config, REPLICATED, 0, artifact=entry, **GEOMETRY)
    assert built.build_cache == "hit" and built.build_cache_path == str(entry)
    assert built.model.code == replicated[1].model.code and built.plan == replicated[1].plan
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        p.name for p in _entry(replicated[0], config).iterdir())


def test_an_artifact_for_another_rank_is_not_loaded(replicated, config):
    with pytest.warns(BuildCacheWarning, match="rank 0 \\(now 1\\)"):
        with pytest.raises(RuntimeError, match="stop"):
            # The mismatch is found before anything is built; the build is cut short here.
            with _no_build():
                prepare_rank(config, REPLICATED, 1, artifact=_entry(replicated[0], config),
                             **GEOMETRY)


class _no_build:
    def __enter__(self):
        import adp_pass.runtime.prepare as prepare

        self.prepare, self.real = prepare, prepare._capture_and_rewrite

        def stop(*args, **kwargs):
            raise RuntimeError("stop")

        prepare._capture_and_rewrite = stop

    def __exit__(self, *exc):
        self.prepare._capture_and_rewrite = self.real


def test_no_cache_writes_nothing(tmp_path, monkeypatch, config):
    """Without cache_dir the build cache is not touched (so nothing is written); `adp run
    --no-cache` gives the ranks no cache dir, and by default they get the user's cache dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build_cache.default_cache_dir() == tmp_path / "xdg" / "adp-pass"

    def refuse(*args, **kwargs):
        raise AssertionError("the build cache was used")

    for name in ("lookup", "store", "load_entry", "build_key"):
        monkeypatch.setattr(build_cache, name, refuse)
    with pytest.raises(RuntimeError, match="stop"), _no_build():
        prepare_rank(config, REPLICATED, 0, **GEOMETRY)  # stops where it would capture

    jobs = []

    def fake_run_job(job, world_size, **kwargs):
        jobs.append(job)
        return SimpleNamespace(leaders=[], log="log")

    monkeypatch.setattr("adp_pass.runtime.frontend.run_job", fake_run_job)
    from adp_pass.cli import main

    assert main(["run", "--preset", "tiny", "--no-cache", "--requests", "1"]) == 0
    assert main(["run", "--preset", "tiny", "--requests", "1"]) == 0
    assert main(["run", "--preset", "tiny", "--cache-dir", str(tmp_path / "c"),
                 "--requests", "1"]) == 0
    assert [j.cache_dir for j in jobs] == [None, str(tmp_path / "xdg" / "adp-pass"),
                                           str(tmp_path / "c")]
    assert main(["run", "--preset", "tiny", "--no-cache", "--cache-dir", "x"]) == 2
    assert main(["run", "--preset", "tiny", "--requests", "1", "--no-cache",
                 "--dump-dir", str(tmp_path / "dumps")]) == 0
    assert jobs[-1].dump_dir == str(tmp_path / "dumps")  # each rank writes under it
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "c").exists()


def test_an_unstorable_graph_is_refused_when_stored():
    def helper(x):
        return x + 1

    graph = torch.fx.Graph()
    graph.output(graph.call_function(helper, (graph.placeholder("x"),)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    with pytest.raises(build_cache.NotCacheable, match="helper"):
        build_cache.serialize(gm, SimpleNamespace(params=[]))
