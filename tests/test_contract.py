"""The rank wing's typed contract (runtime/contract.py): every type survives encode → decode,
damaged or foreign messages are named errors, and the module stays torch-free."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adp_pass.mapping import Mapping
from adp_pass.runtime import contract as c
from adp_pass.runtime.serving_config import KvCacheDtypeError, ServingConfig

ids = st.one_of(st.text(min_size=1, max_size=12), st.integers(0, 2**40))
tokens = st.lists(st.integers(0, 151_935), max_size=20)
params = st.builds(
    c.SamplingParams, max_new_tokens=st.integers(1, 4096),
    temperature=st.floats(0, 4, allow_nan=False), top_p=st.floats(0.01, 1.0),
    stop_token_ids=st.lists(st.integers(0, 151_935), max_size=3).map(tuple),
    seed=st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)))
requests = st.builds(c.Request, request_id=ids, prompt=tokens.filter(bool), params=params)


def _round_trip(value):
    """Through JSON text, as it travels (a job file, a record file, a link line)."""
    return c.from_json(type(value), json.loads(json.dumps(c.to_json(value))))


@settings(max_examples=50, deadline=None)
@given(requests)
def test_a_request_survives(request):
    assert _round_trip(request) == request


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.lists(requests, max_size=3), min_size=1, max_size=2), max_size=2),
       st.sampled_from(["tp=2,attn_dp=1", "tp=4,attn_dp=1,mlp_tp=2", "tp=2,attn_dp=0",
                        "tp=4,attn_dp=1,attn_tp=2"]))
def test_a_job_survives_with_its_mapping_parsed(workloads, spec):
    job = c.Job(Mapping.parse(spec), checkpoint="/ckpt", dtype="bfloat16",
                serving=ServingConfig(num_blocks=9, cuda_graph_sizes=(1, 8)), seed=3,
                check_first_step=True, workloads=workloads)
    back = _round_trip(job)
    assert back == job and isinstance(back.mapping, Mapping)
    assert back.serving.cuda_graph_sizes == (1, 8)


def test_a_job_parses_a_mapping_string_once_at_the_front_end():
    assert c.Job("tp=2,attn_dp=1").mapping == Mapping.parse("tp=2,attn_dp=1")


def _record() -> c.RankRecord:
    phase = c.PhaseStats(requests=2, wall_s=1.5, decode_steps=7, decode_tokens=14,
                         decode_s=0.7, mean_decode_step_ms=100.0, decode_tokens_per_s=20.0)
    return c.RankRecord(
        rank=1, world_size=2, mapping=Mapping.parse("tp=2,attn_dp=1,mlp_tp=2"), dp_rank=1,
        leader=True, device="cpu", phases=[phase, dataclasses.replace(phase, requests=0)],
        results=[c.Result("a", 3, [5, 6], "length"), c.Result(7, 1, [], "stop")],
        timings={"capture_s": 1.0}, counts={"sites": {"attention_out": 2}},
        memory_allocated_gib=None, first_step_check=c.FirstStepCheck(max_abs_diff=1e-6,
                                                                     same_argmax=True))


@pytest.mark.parametrize("value", [
    _record(),
    c.RankFailure(0, "CheckpointError", "shard 2 is unreadable", "re-download", 12.5),
    c.PhaseStats(requests=1, wall_s=0.1),
    c.FirstStepCheck(skipped="q_proj.weight is not a shard"),
    ServingConfig(),
    ServingConfig(kv_cache_dtype="fp8", kv_cache_scale=0.05),
], ids=lambda v: type(v).__name__)
def test_each_record_survives(value):
    assert _round_trip(value) == value


def test_a_job_keeps_its_kv_cache_dtype_and_refuses_an_unknown_one():
    job = c.Job(Mapping.parse("tp=2,attn_dp=1"), dtype="bfloat16",
                serving=ServingConfig(kv_cache_dtype="fp8", kv_cache_scale=0.05))
    back = _round_trip(job)
    assert back.serving.kv_cache_dtype == "fp8" and back.serving.kv_cache_scale == 0.05
    # A job file written without the fields (an earlier version) gets the defaults.
    data = c.to_json(job)
    del data["serving"]["kv_cache_dtype"], data["serving"]["kv_cache_scale"]
    assert c.from_json(c.Job, data).serving.kv_cache_dtype == "auto"
    data["serving"]["kv_cache_dtype"] = "int4"
    with pytest.raises(KvCacheDtypeError, match="unknown kv_cache_dtype 'int4'; use one of auto, fp8"):
        c.from_json(c.Job, data)


MESSAGES = [
    c.Hello(token="t", rank=3, dp_rank=1, reports=True, pid=42, host="h", lockstep_leader=2,
            kv_blocks=64, device="cuda:0"),
    c.Add(1, c.Request("r-1", [1, 2, 3], c.SamplingParams(max_new_tokens=4, top_p=0.9,
                                                          stop_token_ids=(2,), seed=-5))),
    c.Cancel(0, "r-1"),
    c.Stop("server shutdown"),
    c.Step([c.TokenEvent("r-1", [4, 5]), c.TokenEvent("r-2", [], "stop"),
            c.TokenEvent("r-3", [], None, "prompt too long")], c.RankLoad(1, 2, 3, 64)),
    c.Bye(3),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_each_serve_message_survives_the_link(message):
    line = c.encode_message(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one JSON line
    assert c.decode_message(line) == message


@pytest.mark.parametrize("line, words", [
    (b"not json\n", "not a serve-link message"),
    (b'{"rank": 1}\n', "not a serve-link message"),
    (b'{"type": "launch"}\n', "not a serve-link message"),
    (b'{"type": "bye", "rank": 1, "extra": 2}\n', "Bye has no field extra"),
    (b'{"type": "cancel", "dp_rank": 0}\n', "Cancel lacks request_id"),
])
def test_a_damaged_or_foreign_line_is_named(line, words):
    with pytest.raises(c.ContractError, match=words):
        c.decode_message(line)


def test_a_record_from_another_version_is_refused_not_half_read():
    data = c.to_json(_record())
    data["phases"][0]["queue_ms"] = 1.0
    with pytest.raises(c.ContractError, match="PhaseStats has no field queue_ms"):
        c.from_json(c.RankRecord, data)


def test_the_contract_imports_no_torch():
    code = ("import sys; import adp_pass.runtime.contract; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- make_job's checks
@pytest.mark.parametrize("change, words", [
    (dict(preset="no-such-preset"), ["unknown preset 'no-such-preset'"]),
    (dict(mapping="tp=3,attn_dp=1"), ["tp (3) must divide"]),
    (dict(prompt=[5, 256]), ["token id 256", "0..255"]),
    (dict(prompt=[]), ["empty prompt"]),
    (dict(new_tokens=600), ["more than the 512 positions"]),
    (dict(num_blocks=1), ["needs 24 tokens of KV cache", "holds 16"]),
    (dict(lists=3), ["3 request lists", "2 DP groups"]),
    (dict(layers=3), ["layers=3: preset tiny has 2 decoder layers"]),
    (dict(layers=0), ["layers=0"]),
])
def test_make_job_refuses_what_no_rank_could_serve(change, words):
    """The Python front end checks a job before any rank starts (a rank would fail only after
    its build, e.g. an out-of-vocabulary id as an IndexError)."""
    from adp_pass.errors import AdpError
    from adp_pass.runtime.frontend import make_job
    from adp_pass.runtime.serving_config import ServingConfig

    Request, SamplingParams = c.Request, c.SamplingParams
    request = Request("r0", change.get("prompt", [1, 2, 3, 4]),
                      SamplingParams(max_new_tokens=change.get("new_tokens", 20)))
    lists = [[request]] + [[] for _ in range(change.get("lists", 1) - 1)]
    with pytest.raises(AdpError) as info:
        make_job(change.get("mapping", "tp=2,attn_dp=1"), lists,
                 preset=change.get("preset", "tiny"), layers=change.get("layers"),
                 serving=ServingConfig(num_blocks=change.get("num_blocks", 256)))
    for word in words:
        assert word in str(info.value), str(info.value)


def test_a_jobs_layers_cut_the_presets_model_and_never_a_checkpoint(tmp_path):
    from adp_pass.runtime.frontend import JobInvalid, make_job

    assert c.Job(c.Mapping(tp_size=1), preset="tiny", layers=1).model_config().num_hidden_layers == 1
    assert c.Job(c.Mapping(tp_size=1), preset="tiny").model_config().num_hidden_layers == 2
    with pytest.raises(JobInvalid, match="served at the depth its config.json says"):
        make_job("tp=1,attn_dp=1", [[]], checkpoint=str(tmp_path), layers=1)


def test_run_job_refuses_a_world_size_that_is_not_the_mappings():
    from adp_pass.runtime.frontend import JobInvalid, make_job, run_job
    Request, SamplingParams = c.Request, c.SamplingParams

    job = make_job("tp=2,attn_dp=1", [[Request("r0", [1, 2], SamplingParams(max_new_tokens=2))]])
    with pytest.raises(JobInvalid, match="world_size 3 is not the mapping's 2 ranks"):
        run_job(job, 3)
