"""The front door: bad inputs to ``adp`` end in a few lines naming the problem and the fix, with
exit code 2 (fix the command line) or 1 (a failure), never a traceback, and before any expensive
work starts.

Cases run in-process through ``adp_pass.cli.main``; a few run as subprocesses (the real entry
point, ``--help`` timing). Checkpoint directories are written here as bare safetensors files
(header + zero bytes), so no torch is needed to make them.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from adp_pass import cli
from adp_pass.checks import check_checkpoint, expected_tensors
from adp_pass.tokenizer import ByteTokenizer

MAX_LINES = 6
TINY = {  # the "tiny" preset as a config.json
    "model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 8, "intermediate_size": 128, "head_dim": 16, "vocab_size": 256,
    "max_position_embeddings": 512, "tie_word_embeddings": False,
}


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], cut: int = 0) -> None:
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 4 * max(1, math.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    data = struct.pack("<Q", len(blob)) + blob + bytes(offset)
    path.write_bytes(data[: len(data) - cut])


def _checkpoint(root: Path, config: dict | None = TINY, shapes: dict | None = None,
                cut: int = 0, config_text: str | None = None) -> Path:
    root.mkdir(parents=True)
    if config_text is not None:
        (root / "config.json").write_text(config_text)
    elif config is not None:
        (root / "config.json").write_text(json.dumps(config))
    if shapes is None:
        shapes = expected_tensors(TINY)
    if shapes:
        _write_safetensors(root / "model.safetensors", shapes, cut)
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint directories, each broken in one way."""
    base = tmp_path_factory.mktemp("ckpt")
    good = expected_tensors(TINY)
    no_down = {k: v for k, v in good.items() if k != "model.layers.1.mlp.down_proj.weight"}
    wrong_q = dict(good, **{"model.layers.0.self_attn.q_proj.weight": (64, 64)})
    dirs = {
        "good": _checkpoint(base / "good"),
        "no_config": _checkpoint(base / "no_config", config=None),
        "mistral": _checkpoint(base / "llama", config=dict(TINY, model_type="mistral")),
        "no_type": _checkpoint(base / "no_type", config={k: v for k, v in TINY.items()
                                                         if k != "model_type"}),
        "bad_json": _checkpoint(base / "bad_json", config_text="{not json"),
        "no_hidden": _checkpoint(base / "no_hidden", config={k: v for k, v in TINY.items()
                                                             if k != "hidden_size"}),
        "no_weights": _checkpoint(base / "no_weights", shapes={}),
        "missing": _checkpoint(base / "missing", shapes=no_down),
        "misshaped": _checkpoint(base / "misshaped", shapes=wrong_q),
        "truncated": _checkpoint(base / "truncated", cut=1000),
        "kv1": _checkpoint(base / "kv1", config=dict(TINY, num_key_value_heads=1),
                           shapes=expected_tensors(dict(TINY, num_key_value_heads=1))),
    }
    (dirs["no_weights"] / "pytorch_model.bin").write_bytes(b"x")
    index = _checkpoint(base / "index", shapes={})
    (index / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    dirs["index"] = index
    not_a_dir = base / "file.txt"
    not_a_dir.write_text("x")
    dirs["file"] = not_a_dir
    dirs["absent"] = base / "absent"
    return dirs


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Mapping files with wrong keys or values, and paths that cannot be written."""
    base = tmp_path_factory.mktemp("files")
    contents = {
        "pp.json": json.dumps({"tp": 2, "attn_dp": 1, "pp": 2}),
        "str.json": json.dumps({"tp": "two", "attn_dp": 1}),
        "zero.json": json.dumps({"tp": 0, "attn_dp": 1}),
        "float.json": json.dumps({"tp": 2.0, "attn_dp": 1}),
        "list.json": json.dumps([2, 1]),
        "notp.json": json.dumps({"attn_dp": 1}),
        "maybe.toml": 'tp = 2\nattn_dp = "maybe"\n',
        "syntax.toml": "tp = = 2\n",
        "tp3.toml": "[mapping]\ntp = 3\nattn_dp = 1\n",
        "mapping.yaml": "tp: 2\n",
        "bool.json": json.dumps({"tp": True, "attn_dp": 1}),
        "mlp_bool.toml": "tp = 2\nattn_dp = true\nmlp_tp = false\n",
    }
    for name, text in contents.items():
        (base / name).write_text(text)
    (base / "a_file").write_text("x")
    return {name: base / name for name in [*contents, "a_file"]} | {"missing.json":
                                                                     base / "missing.json"}


# (argv, exit code, words the message must hold). "{name}" is a ckpt or files path.
CASES = [
    # top level
    ([], 2, ["required", "COMMAND"]),
    (["launch"], 2, ["invalid choice", "launch"]),
    (["rewrite", "--bogus"], 2, ["unrecognized", "--bogus", "see 'adp rewrite --help'"]),
    # serve / bench-serve flags (a valid serve would start a server: every case must fail first)
    (["serve", "--port", "0"], 2, ["--port", ">= 1"]),
    (["run", "--kv-cache-scale", "2"], 2, ["--kv-cache-scale", "fp8 only"]),
    (["serve", "--kv-cache-dtype", "fp4"], 2, ["--kv-cache-dtype", "fp4"]),
    (["serve", "--restart-attempts", "-1"], 2, ["--restart-attempts", ">= 0"]),
    (["serve", "--restart-backoff", "5", "--restart-backoff-max", "2"], 2,
     ["--restart-backoff-max 2", "shorter"]),
    (["serve", "--preset", "tiny", "--checkpoint", "{good}"], 2, ["--preset or --checkpoint"]),
    (["serve", "--world-size", "3"], 2, ["--world-size 3"]),
    (["serve", "--max-model-len", "100000"], 2, ["--max-model-len 100000", "positions"]),
    (["serve", "--num-blocks", "2", "--max-model-len", "64"], 2, ["--max-model-len 64",
                                                                   "--num-blocks"]),
    (["serve", "--nnodes", "2"], 2, ["--nnodes 2", "replicated"]),
    (["serve", "--mapping", "tp=2,attn_dp=0", "--nnodes", "3"], 2, ["--nnodes 3", "divide"]),
    (["serve", "--shutdown-timeout", "-1"], 2, ["--shutdown-timeout"]),
    (["bench-serve", "--rate", "0"], 2, ["--rate", "(0, inf)"]),
    (["serve", "--link-port", "29401"], 2, ["--link-port", "--node-rank"]),
    (["serve", "--checkpoint", "{good}"], 2, ["has no tokenizer", "adp serve needs it"]),
    (["serve", "--mapping", "tp=2,attn_dp=0", "--nnodes", "2", "--node-rank", "2"], 2,
     ["--node-rank 2", "--nnodes"]),
    (["serve", "--mapping", "tp=2,attn_dp=0", "--nnodes", "2", "--node-rank", "1"], 2,
     ["--node-rank needs --rdzv-endpoint and --link-port"]),
    (["serve", "--mapping", "tp=2,attn_dp=0", "--nnodes", "2", "--node-rank", "1",
      "--rdzv-endpoint", "nohost", "--link-port", "29401"], 2, ["not HOST:PORT"]),
    (["bench-serve", "--num-prompts", "0"], 2, ["--num-prompts", ">= 1"]),
    # serve: ports, names, keys, TLS, CORS, timeouts; output paths proven writable by a probe
    (["serve", "--port", "70000"], 2, ["--port", "1..65535", "70000"]),
    (["serve", "--link-port", "65536"], 2, ["--link-port", "1..65535"]),
    (["serve", "--served-model-name", ""], 2, ["--served-model-name", "must not be empty"]),
    (["serve", "--served-model-name", " tiny"], 2, ["--served-model-name", "spaces"]),
    (["serve", "--api-key", ""], 2, ["--api-key", "must not be empty"]),
    (["serve", "--api-key", "two words"], 2, ["--api-key", "without spaces"]),
    (["serve", "--metrics-public"], 2, ["--metrics-public", "add --api-key"]),
    (["serve", "--ssl-keyfile", "{a_file}"], 2, ["--ssl-keyfile and --ssl-certfile together"]),
    (["serve", "--ssl-keyfile", "{a_file}", "--ssl-certfile", "{missing.json}"], 2,
     ["--ssl-certfile", "is not a file"]),
    (["serve", "--ssl-keyfile", "{a_file}", "--ssl-certfile", "{a_file}"], 2,
     ["cannot be loaded", "pem"]),
    (["serve", "--allowed-origins", "app.example"], 2, ["--allowed-origins", "scheme://host"]),
    (["serve", "--read-timeout", "0"], 2, ["--read-timeout", "(0, inf)"]),
    (["serve", "--keep-alive-timeout", "-1"], 2, ["--keep-alive-timeout"]),
    (["serve", "--cache-dir", "/proc/adp-probe/cache"], 2, ["--cache-dir", "not writable"]),
    (["serve", "--log-dir", "/proc/adp-probe"], 2, ["--log-dir", "not writable"]),
    (["bench-serve", "--url", "ftp://127.0.0.1:8000"], 2, ["--url", "http://"]),
    (["bench-serve", "--url", "127.0.0.1:8000"], 2, ["--url", "http://"]),
    (["bench-serve", "--url", "http://127.0.0.1:8000/v1?x=1"], 2, ["--url", "query"]),
    (["bench-serve", "--out", "{a_file}"], 2, ["--out", "not written by this command",
                                               "--force"]),
    (["bench-serve", "--out", "/proc/adp-probe/bench.json"], 2, ["--out", "not writable"]),
    (["calibrate", "--out", "{pp.json}"], 2, ["--out", "not written by this command",
                                              "--force"]),
    (["calibrate", "--out", "/proc/adp-probe/calibration.json"], 2, ["--out", "not writable"]),
    (["run", "--cache-dir", "/proc/adp-probe"], 2, ["--cache-dir", "not writable"]),
    (["rewrite", "--out", "/proc/adp-probe"], 2, ["--out", "not writable"]),
    # verify flags
    (["verify", "--world-size", "0"], 2, ["--world-size", ">= 1"]),
    (["verify", "--world-size", "-1"], 2, ["--world-size"]),
    (["verify", "--world-size", "two"], 2, ["--world-size", "integer", "two"]),
    (["verify", "--world-size", "3"], 2, ["--world-size 3", "tp (3) must divide"]),
    (["verify", "--preset", "qwen3-99b"], 2, ["--preset", "invalid choice"]),
    (["verify", "--batch", "0"], 2, ["--batch", ">= 1"]),
    (["verify", "--batch", "1"], 2, ["--batch 1", "smaller than the 2 dp groups"]),
    (["verify", "--seq", "0"], 2, ["--seq", ">= 1"]),
    (["verify", "--seq", "5000"], 2, ["--seq 5000", "2048 positions"]),
    (["verify", "--splits", "1,2,1"], 2, ["--splits", "3 values", "2 dp groups"]),
    (["verify", "--splits", "1,2"], 2, ["--splits", "sum to 3"]),
    (["verify", "--splits=1,-1"], 2, ["--splits", ">= 0"]),
    (["verify", "--splits", "a,b"], 2, ["--splits", "integers"]),
    (["verify", "--splits", ""], 2, ["--splits", "nothing"]),
    (["verify", "--tolerance", "-1"], 2, ["--tolerance", "[0, inf)"]),
    (["verify", "--tolerance", "nan"], 2, ["--tolerance"]),
    (["verify", "--seed", "-3"], 2, ["--seed", ">= 0"]),
    (["verify", "--log-dir", "{a_file}"], 2, ["--log-dir", "not a directory"]),
    # rewrite: mapping strings
    (["rewrite", "--mapping", ""], 2, ["--mapping", "empty mapping"]),
    (["rewrite", "--mapping", "  "], 2, ["--mapping", "empty mapping"]),
    (["rewrite", "--mapping", "tp"], 2, ["--mapping", "key=value"]),
    (["rewrite", "--mapping", "tp="], 2, ["key=value"]),
    (["rewrite", "--mapping", "tp=x"], 2, ["tp must be an integer", "'x'"]),
    (["rewrite", "--mapping", "tp=0"], 2, ["tp must be >= 1"]),
    (["rewrite", "--mapping", "tp=-2,attn_dp=1"], 2, ["tp must be >= 1"]),
    (["rewrite", "--mapping", "tp=2,,attn_dp=1"], 2, ["empty entry"]),
    (["rewrite", "--mapping", "tp=2,tp=2"], 2, ["'tp' given twice"]),
    (["rewrite", "--mapping", "tp=2,pp=2"], 2, ["unknown mapping key 'pp'", "attn_dp"]),
    (["rewrite", "--mapping", "tp=2,attn_dp=maybe"], 2, ["attn_dp must be 0/1"]),
    (["rewrite", "--mapping", "attn_dp=1"], 2, ["needs tp"]),
    (["rewrite", "--mapping", "tp=8,world=16,attn_dp=1"], 2, ["world (16) must equal tp (8)"]),
    (["rewrite", "--mapping", "tp=8,attn_dp=1,mlp_tp=3"], 2, ["mlp_tp (3) must divide tp (8)"]),
    (["rewrite", "--mapping", "tp=8,attn_tp=2"], 2, ["set attn_dp=1"]),
    (["rewrite", "--mapping", "tp=8,mlp_tp=1"], 2, ["needs attention-dp"]),
    (["verify", "--mapping", "tp=4,attn_dp=1", "--world-size", "2"], 2, ["tp=4", "--world-size 4"]),
    (["verify", "--mapping", "tp=2,attn_dp=0", "--splits", "1,3"], 2, ["--splits", "attn_dp=0"]),
    (["verify", "--mapping", "tp=2,attn_dp=1,mlp_tp=2", "--batch", "4", "--splits", "1,1,2"], 2,
     ["2 dp groups", "3 values"]),
    (["rewrite", "--mapping", "tp=3,attn_dp=1"], 2, ["tp (3) must divide", "heads (8)"]),
    (["rewrite", "--mapping", "tp=16,attn_dp=1"], 2, ["tp (16) must divide", "(8)"]),
    (["rewrite", "--preset", "tiny-3", "--mapping", "tp=4,attn_dp=1"], 2,
     ["tp (4) must divide", "num_attention_heads (6)"]),
    # rewrite: mapping files
    (["rewrite", "--mapping", "{pp.json}"], 2, ["unknown mapping key 'pp'"]),
    (["rewrite", "--mapping", "{str.json}"], 2, ["tp must be an integer", "'two'"]),
    (["rewrite", "--mapping", "{zero.json}"], 2, ["tp must be >= 1"]),
    (["rewrite", "--mapping", "{float.json}"], 2, ["tp must be an integer >= 1", "2.0"]),
    (["rewrite", "--mapping", "{list.json}"], 2, ["table/object"]),
    (["rewrite", "--mapping", "{notp.json}"], 2, ["needs tp"]),
    (["rewrite", "--mapping", "{maybe.toml}"], 2, ["attn_dp must be 0/1", "maybe"]),
    (["rewrite", "--mapping", "{syntax.toml}"], 2, ["cannot parse", "syntax.toml"]),
    (["rewrite", "--mapping", "{tp3.toml}"], 2, ["tp (3) must divide"]),
    (["rewrite", "--mapping", "{missing.json}"], 2, ["missing.json", "does not exist"]),
    (["rewrite", "--mapping", "{mapping.yaml}"], 2, ["mapping.yaml", ".json or .toml"]),
    (["rewrite", "--mapping", "{bool.json}"], 2, ["tp must be an integer >= 1", "true (a boolean)"]),
    (["rewrite", "--mapping", "{mlp_bool.toml}"], 2, ["mlp_tp must be", "false (a boolean)"]),
    # rewrite: other flags
    (["rewrite", "--rank", "2"], 2, ["--rank 2", "tp=2", "0..1"]),
    (["rewrite", "--rank", "-1"], 2, ["--rank", ">= 0"]),
    (["rewrite", "--out", "{a_file}"], 2, ["--out", "not a directory"]),
    (["rewrite", "--out", "{a_file}/sub/dir"], 2, ["--out", "cannot be created", "is a file"]),
    # run: flags and requests
    (["run", "--world-size", "3"], 2, ["--world-size 3", "tp (3) must divide"]),
    (["run", "--requests", "0"], 2, ["--requests", ">= 1"]),
    (["run", "--new-tokens", "0"], 2, ["--new-tokens", ">= 1"]),
    (["run", "--prompt-len", "0"], 2, ["--prompt-len", ">= 1"]),
    (["run", "--temperature", "-0.5"], 2, ["--temperature"]),
    (["run", "--top-p", "1.5"], 2, ["--top-p", "(0, 1]"]),
    (["run", "--top-p", "0"], 2, ["--top-p", "(0, 1]"]),
    (["run", "--dtype", "int8"], 2, ["--dtype", "invalid choice"]),
    (["run", "--num-blocks", "0"], 2, ["--num-blocks", ">= 1"]),
    (["run", "--cuda-graphs", "0,1"], 2, ["--cuda-graphs", ">= 1"]),
    (["run", "--cuda-graphs", "a"], 2, ["--cuda-graphs", "integers"]),
    (["run", "--prompt-len", "600"], 2, ["608 tokens", "512 positions", "--new-tokens"]),
    (["run", "--prompt", "x" * 510], 2, ["prompt 0 (510 tokens)", "512 positions"]),
    (["run", "--prompt", ""], 2, ["prompt 0 is empty"]),
    (["run", "--prompt-len", "100", "--num-blocks", "2"], 2,
     ["needs 7 kv-cache blocks", "--num-blocks is 2", "raise --num-blocks"]),
    (["run", "--log-dir", "{a_file}"], 2, ["--log-dir", "not a directory"]),
    # run: checkpoints
    (["run", "--preset", "tiny", "--checkpoint", "{good}"], 2, ["--preset or --checkpoint"]),
    (["run", "--checkpoint", "{absent}"], 2, ["--checkpoint", "does not exist"]),
    (["run", "--checkpoint", "{file}"], 2, ["--checkpoint", "is a file"]),
    (["run", "--checkpoint", "{no_config}"], 2, ["no config.json", "save_pretrained"]),
    (["run", "--checkpoint", "{mistral}"], 2, ["this is a mistral checkpoint", "supports qwen3"]),
    (["run", "--checkpoint", "{no_type}"], 2, ["without model_type", "qwen3"]),
    (["run", "--checkpoint", "{bad_json}"], 1, ["config.json", "not valid json"]),
    (["run", "--checkpoint", "{no_hidden}"], 1, ["hidden_size"]),
    (["run", "--checkpoint", "{no_weights}"], 2, ["no *.safetensors", "convert the .bin"]),
    (["run", "--checkpoint", "{index}"], 1, ["model-00001-of-00002.safetensors", "incomplete"]),
    (["run", "--checkpoint", "{missing}"], 1,
     ["1 tensors are missing", "model.layers.1.mlp.down_proj.weight"]),
    (["run", "--checkpoint", "{misshaped}"], 1,
     ["wrong shape", "q_proj.weight is [64, 64]", "[128, 64]"]),
    (["run", "--checkpoint", "{truncated}"], 1, ["truncated", "fetch the file again"]),
    (["run", "--checkpoint", "{kv1}"], 2, ["--world-size 2", "num_key_value_heads (1)"]),
    (["run", "--checkpoint", "{good}", "--prompt", "hi"], 2, ["tokenizer", "--checkpoint"]),
]


@pytest.fixture
def no_work(monkeypatch):
    """Every expensive step starts as a stage: fail loudly if one starts."""
    started = []

    def stage(self, what):
        started.append(what)
        raise AssertionError(f"stage {what!r} started before the input was rejected")

    monkeypatch.setattr(cli._Stages, "__call__", stage)
    return started


def _fill(argv: list[str], paths: dict[str, Path]) -> list[str]:
    out = []
    for arg in argv:
        for name, path in paths.items():
            arg = arg.replace("{" + name + "}", str(path))
        out.append(arg)
    return out


def _check_error(code: int, err: str, want_code: int, words: list[str]) -> None:
    lines = err.strip().splitlines()
    assert code == want_code, err
    assert "Traceback" not in err
    assert 1 <= len(lines) <= MAX_LINES, err
    assert lines[0].startswith("adp") and ": error: " in lines[0], err
    for word in words:
        assert word.lower() in err.lower(), (word, err)


@pytest.mark.parametrize("argv, want_code, words", CASES,
                         ids=[" ".join(c[0])[:60] or "(none)" for c in CASES])
def test_bad_input(argv, want_code, words, ckpt, files, no_work, capsys, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # the same machine limit everywhere
    start = time.perf_counter()
    code = cli.main(_fill(argv, {**ckpt, **files}))
    out, err = capsys.readouterr()
    _check_error(code, err, want_code, words)
    assert out == ""  # nothing started, so nothing to report
    assert not no_work
    assert time.perf_counter() - start < 10


def test_there_are_at_least_50_cases():
    assert len(CASES) >= 50


def test_more_gloo_ranks_than_cores_warn_and_run_one_thread_each(capsys, monkeypatch):
    """gloo ranks run fine oversubscribed (this suite does it), so a tp=4 mapping can be verified
    on a 2-core machine: a warning, then the job, its ranks one thread each."""
    import torch

    import adp_pass.verify
    from adp_pass.errors import AdpError

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored (unset) afterwards
    seen = {}

    def job(config, world_size, **kwargs):  # the job as started, stopped before any rank
        seen.update(world=world_size, threads=os.environ.get("OMP_NUM_THREADS"))
        raise AdpError("stopped by the test")

    monkeypatch.setattr(adp_pass.verify, "verify", job)
    code = cli.main(["verify", "--preset", "tiny", "--world-size", "4"])
    err = capsys.readouterr().err
    assert code == 1 and "stopped by the test" in err and "Traceback" not in err
    assert seen == {"world": 4, "threads": "1"}
    assert "warning: --world-size 4 gloo ranks share 2 CPU cores" in err


def test_serve_reachable_from_other_machines_without_a_key_warns(capsys, monkeypatch):
    monkeypatch.delenv("ADP_API_KEY", raising=False)
    for argv, warned in ((["--host", "0.0.0.0"], True), (["--host", "0.0.0.0", "--api-key",
                                                          "k-123"], False), ([], False)):
        code = cli.main(["serve", *argv, "--cache-dir", "/proc/adp-probe"])
        err = capsys.readouterr().err
        assert code == 2 and "--cache-dir" in err  # stopped by the next check, after the warning
        assert ("no --api-key is set" in err) == warned, err
        assert "k-123" not in err


def test_more_ranks_than_gpus_points_to_cpu_ranks(no_work, capsys, monkeypatch):
    import torch

    monkeypatch.setenv("ADP_DEVICE", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code = cli.main(["verify", "--preset", "tiny", "--world-size", "2"])
    _check_error(code, capsys.readouterr().err, 2,
                 ["--world-size 2", "it has 1 GPUs", "--device cpu"])


def test_cuda_ranks_without_a_gpu(no_work, capsys, monkeypatch):
    import torch

    monkeypatch.setenv("ADP_DEVICE", "auto")  # restored after the test: --device exports its value
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["verify", "--preset", "tiny", "--device", "cuda"])
    _check_error(code, capsys.readouterr().err, 2, ["--device", "no CUDA device"])


def test_debug_shows_the_traceback(capsys):
    code = cli.main(["rewrite", "--mapping", "", "--debug"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "MappingError" in err


def test_a_valid_checkpoint_passes_the_checks(ckpt):
    assert check_checkpoint(ckpt["good"])["num_hidden_layers"] == 2


def test_stage_errors_are_project_errors_with_their_fix():
    from adp_pass.detect import DetectError
    from adp_pass.rewrite import RewriteError
    from adp_pass.self_check import SelfCheckError
    from adp_pass.shapes import ShapeFixError

    assert cli.explain(DetectError("not a TP Qwen3 decoder graph"))[:2] == (
        1, "not a TP Qwen3 decoder graph")
    assert "--no-strict" in cli.explain(DetectError("x"))[2]
    assert cli.explain(RewriteError("plan made for another graph"))[0] == 1
    assert "view(.., -1, head_dim)" in cli.explain(ShapeFixError("x"))[2]
    assert "--no-self-check" in cli.explain(SelfCheckError("x"))[2]
    code, message, hint = cli.explain(ZeroDivisionError("x"))
    assert code == 1 and "unexpected ZeroDivisionError" in message and "--debug" in hint


def test_a_failed_rank_is_shown_as_its_own_message(monkeypatch, capsys, tmp_path):
    """What the CLI prints for a failed rank: the rank's message and where the logs are."""
    from adp_pass.launch import RankFailed
    from adp_pass.runtime import frontend

    log = tmp_path / "run.log"

    def failing(job, world_size, **kwargs):
        raise RankFailed("rank 1 failed: CheckpointError: shard 2 is unreadable", rank=1,
                         log=str(log), hint="re-download the checkpoint")

    monkeypatch.setattr(frontend, "run_job", failing)
    code = cli.main(["run", "--world-size", "1", "--requests", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    error_at = next(i for i, line in enumerate(lines) if ": error: " in line)
    assert lines[error_at:] == [
        "adp run: error: rank 1 failed: CheckpointError: shard 2 is unreadable",
        "  fix: re-download the checkpoint",
        f"  rank logs: {log}",
    ]


@pytest.mark.multirank
@pytest.mark.parametrize("torchrun", [False, True], ids=["in-process", "torchrun"])
def test_run_job_reports_the_ranks_error_and_keeps_the_log(tmp_path, capfd, torchrun,
                                                           monkeypatch):
    """A real job whose rank fails, in this process or under a torchrun subprocess: its own
    exception text, not torchrun's dump; the whole output in the log; the temporary job
    directory removed."""
    from adp_pass.launch import RankFailed
    from adp_pass.runtime.frontend import run_job
    from adp_pass.runtime.contract import Job

    log = tmp_path / "logs" / "job.log"
    # A temp dir of its own: another test's job running beside this one (xdist) makes its own
    # adp-job-* directories in the shared one.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    jobs_before = set(Path(tempfile.gettempdir()).glob("adp-job-*"))
    with pytest.raises(RankFailed) as caught:
        run_job(Job(mapping="tp=1,attn_dp=1", preset="no-such-preset"), 1, log_path=log,
                timeout_s=120, torchrun=torchrun)
    assert str(caught.value).startswith("rank 0 failed: UnknownPreset: unknown preset "
                                        "'no-such-preset'")
    assert caught.value.rank == 0 and caught.value.log == str(log)
    assert "Traceback" in log.read_text()  # the details are kept, in the file
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and len((out + err).splitlines()) <= 2
    assert set(Path(tempfile.gettempdir()).glob("adp-job-*")) <= jobs_before


# ----------------------------------------------------------------------------- subprocesses
def _adp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adp_pass.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_help_answers_at_once():
    start = time.perf_counter()
    done = _adp("--help")
    assert done.returncode == 0 and "verify" in done.stdout and "rewrite" in done.stdout
    assert time.perf_counter() - start <= 3.0


@pytest.mark.parametrize("command", ["verify", "rewrite", "run", "serve", "bench-serve"])
def test_every_option_shows_its_default(command):
    text = _adp(command, "--help").stdout
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert len(options) >= 5
    assert text.count("(default:") >= len(options) - 1  # --help itself has none


def test_the_entry_point_reports_an_empty_mapping():
    done = _adp("rewrite", "--mapping", "")
    _check_error(done.returncode, done.stderr, 2, ["--mapping", "empty mapping"])
    assert done.stdout == ""


def test_byte_tokenizer_round_trip_and_unknown_ids():
    tok = ByteTokenizer()
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.decode(tok.encode("hé")) == "hé"
    assert tok.decode([104, 300, 105]) == "h\ufffdi"
    assert tok.decode([195]) == "\ufffd"  # a cut UTF-8 sequence


def test_checkpoint_tokenizer_is_used_for_prompts(tmp_path):
    """A checkpoint with a tokenizer: --prompt text goes through AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from adp_pass.tokenizer import load_tokenizer

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    root = _checkpoint(tmp_path / "ckpt")
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(root)
    tok = load_tokenizer(root)
    assert tok.encode("hello world") == [1, 2]
    assert tok.decode([2, 1]) == "world hello"
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def test_memory_and_os_errors_get_one_line_each():
    from adp_pass.runtime.weights import InsufficientMemory

    code, message, _ = cli.explain(InsufficientMemory("rank 0 needs 70.0 GiB; keep mlp_tp=8"))
    assert (code, message) == (1, "rank 0 needs 70.0 GiB; keep mlp_tp=8")
    code, message, hint = cli.explain(MemoryError())
    assert code == 1 and message == "out of memory" and "--num-blocks" in hint
    code, message, _ = cli.explain(PermissionError(13, "Permission denied", "/x/plan.json"))
    assert (code, message) == (1, "Permission denied: /x/plan.json")


def test_a_long_message_is_cut_to_three_lines(capsys):
    from adp_pass.errors import AdpError

    code = cli._report(AdpError("\n".join(f"line {i}" for i in range(40)), hint="h"), "run", False)
    lines = capsys.readouterr().err.splitlines()
    assert code == 1 and len(lines) == 4
    assert lines[0] == "adp run: error: line 0" and "38 more lines" in lines[2]


def test_out_replaces_its_own_file_and_another_only_with_force(no_work, tmp_path, capsys):
    """calibrate --out: an earlier calibration is replaced; another file is left alone unless
    --force (the check passes: the measuring stage is reached, stopped here by no_work)."""
    from adp_pass.checks import CALIBRATION_KEYS

    ours = tmp_path / "calibration.json"
    ours.write_text(json.dumps(dict.fromkeys(CALIBRATION_KEYS, 1)))
    other = tmp_path / "mapping.json"
    other.write_text('{"tp": 2, "attn_dp": 1}')
    for argv, passes in (([str(ours)], True), ([str(other)], False),
                         ([str(other), "--force"], True)):
        no_work.clear()
        cli.main(["calibrate", "--out", *argv])
        err = capsys.readouterr().err
        assert bool(no_work) == passes, err
        assert ("not written by this command" in err) != passes
    assert other.read_text() == '{"tp": 2, "attn_dp": 1}'
    assert not list(tmp_path.glob(".adp-write-probe-*"))  # the probe file is gone
