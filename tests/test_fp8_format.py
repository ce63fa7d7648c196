"""FP8 checkpoints (the official Qwen3-FP8 format) are validated by name, from the headers in the
CLI's check and again in the rank loader, never loaded as if their e4m3 values were the weights;
a valid one passes both and runs; and the block-scaled reference arithmetic (adp_pass/fp8.py) is
right.

The checkpoints are real safetensors files: ``adp quantize --preset tiny`` writes the official
format, and each bad variant is that checkpoint broken in one way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adp_pass import cli, fp8
from adp_pass.checks import CheckpointInvalid, QuantizedCheckpoint, check_checkpoint, expected_tensors
from adp_pass.mapping import Mapping
from adp_pass.plan import ParamSpec, Plan

Q = "model.layers.0.self_attn.q_proj.weight"
SCALE = Q + "_scale_inv"


def _edit(root: Path, tensors=None, config=None, cut: int = 0) -> None:
    """Apply ``tensors(dict)`` / ``config(dict)`` edits to the checkpoint in ``root``."""
    file = root / "model.safetensors"
    if tensors is not None:
        state = load_file(file)
        tensors(state)
        save_file(state, file, metadata={"format": "pt"})
    if config is not None:
        data = json.loads((root / "config.json").read_text())
        config(data)
        (root / "config.json").write_text(json.dumps(data))
    if cut:
        file.write_bytes(file.read_bytes()[:-cut])


def _requantize_64(state: dict) -> None:
    for name in [n for n in state if n + "_scale_inv" in state]:
        weight = fp8.dequantize_weight(state[name], state[name + "_scale_inv"])
        state[name], state[name + "_scale_inv"] = fp8.quantize_weight(weight, (64, 64))


def _dequantize_q(state: dict) -> None:  # dequantized in place, its scale left behind
    state[Q] = fp8.dequantize_weight(state[Q], state[SCALE]).bfloat16()


def _scales_as(dtype: torch.dtype):
    def edit(state: dict) -> None:
        for name in [n for n in state if n.endswith("_scale_inv")]:
            state[name] = state[name].to(dtype)
    return edit


# variant -> (edits, the error class or None for a valid checkpoint, words of its message)
VARIANTS = {
    "official": ({}, None, ""),
    "scales-fp16": ({"tensors": _scales_as(torch.float16)}, None, ""),
    "scales-fp32": ({"tensors": _scales_as(torch.float32)}, None, ""),
    "wrong-dtype": ({"tensors": lambda t: t.update({Q: t[Q].float().to(torch.float8_e5m2)})},
                    CheckpointInvalid, f"{Q} is stored as F8_E5M2; quantization_config fmt e4m3 "
                    "needs F8_E4M3"),
    "scale-missing": ({"tensors": lambda t: t.pop(SCALE)}, CheckpointInvalid,
                      f"{Q} is fp8 but its scale {SCALE} is missing"),
    "scale-misshaped": ({"tensors": lambda t: t.update({SCALE: torch.ones(2, 1)})},
                        CheckpointInvalid, f"{SCALE} is [2, 1]; its weight {Q} of [128, 64] with "
                        "128x128 blocks needs [1, 1]"),
    "64x64-blocks": ({"tensors": _requantize_64, "config": lambda c: c["quantization_config"]
                      .update(weight_block_size=[64, 64])}, QuantizedCheckpoint,
                     "weight_block_size [64, 64] is not supported: the FP8 kernels support "
                     "128x128 weight blocks only"),
    "scale-without-weight": ({"tensors": _dequantize_q}, CheckpointInvalid,
                             f"{SCALE} is a weight scale beside {Q}, which is stored as BF16"),
    "truncated": ({"cut": 1000}, CheckpointInvalid, "is truncated"),
    "no-quantization-config": ({"config": lambda c: c.pop("quantization_config")},
                               CheckpointInvalid, "inconsistent checkpoint: 14 tensors are stored "
                               "as F8_E4M3"),
    "gptq": ({"config": lambda c: c.update(quantization_config={"quant_method": "gptq",
                                                                 "bits": 4})},
             QuantizedCheckpoint, "quantized with quant_method 'gptq', which adp-pass does not run"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fp8")
    official = base / "official"
    assert cli.main(["quantize", "--preset", "tiny", "--out", str(official)]) == 0
    (official / "tokenizer_config.json").write_text("{}")  # for adp serve's tokenizer check
    _word_tokenizer(official)
    for name, (edits, _, _) in VARIANTS.items():
        if name != "official":
            shutil.copytree(official, base / name)
            _edit(base / name, **edits)
    return {name: base / name for name in VARIANTS}


def _word_tokenizer(root: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(root)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_cli_check_validates_fp8(checkpoints, variant):
    _, error, words = VARIANTS[variant]
    if error is None:
        config = check_checkpoint(checkpoints[variant])
        assert config["quantization_config"]["quant_method"] == "fp8"
        return
    with pytest.raises(error) as err:
        check_checkpoint(checkpoints[variant])
    assert words in str(err.value), str(err.value)
    assert err.value.hint  # and the fix
    assert err.value.exit_code == (2 if error is QuantizedCheckpoint else 1)


def _graph_of(config: dict) -> tuple[torch.nn.Module, Plan]:
    """Every tensor of ``config``'s checkpoint as a meta parameter, replicated, with its plan:
    the loader's view of a rewritten graph, without capturing one."""
    module, specs = torch.nn.Module(), []
    for name, shape in expected_tensors(config).items():
        owner = module
        for part in name.split(".")[:-1]:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(name.rsplit(".", 1)[-1], torch.nn.Parameter(
            torch.empty(shape, device="meta"), requires_grad=False))
        specs.append(ParamSpec(name, (name,), "replicated", None, (), shape, shape, "float32"))
    return module, Plan(Mapping(tp_size=2, enable_attention_dp=True), 0, [], specs, [])


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_rank_loader_validates_fp8_before_reading(checkpoints, variant):
    from adp_pass.runtime.weights import CheckpointError, load_checkpoint

    _, error, words = VARIANTS[variant]
    config = json.loads((checkpoints["official"] / "config.json").read_text())
    module, plan = _graph_of(config)
    if error is None:
        report = load_checkpoint(module, plan, checkpoints[variant], progress=False)
        assert len(report.fp8) == 14 and report.dequantized_to == "float32"
        files = load_file(checkpoints[variant] / "model.safetensors")
        want = fp8.dequantize_weight(files[Q], files[SCALE])
        assert torch.equal(module.get_parameter(Q), want)
        return
    with pytest.raises(CheckpointError if error is CheckpointInvalid else error) as err:
        load_checkpoint(module, plan, checkpoints[variant], progress=False)
    assert words in str(err.value), str(err.value)
    assert module.get_parameter(Q).is_meta  # refused before any tensor was read


@pytest.fixture
def no_work(monkeypatch):
    started = []

    def stage(self, what):
        started.append(what)
        raise KeyboardInterrupt  # stop at the first stage: the checks are what is tested

    monkeypatch.setattr(cli._Stages, "__call__", stage)
    return started


@pytest.mark.parametrize("command", ["run", "serve"])
def test_adp_runs_a_valid_fp8_checkpoint_and_refuses_a_bad_one(checkpoints, command, no_work,
                                                               capsys):
    argv = [command, "--checkpoint", str(checkpoints["official"]), "--world-size", "1",
            "--device", "cpu"]
    if command == "serve":
        import socket

        with socket.socket() as probe:  # a free port: serve checks it before starting
            probe.bind(("127.0.0.1", 0))
            argv += ["--port", str(probe.getsockname()[1])]
    assert cli.main(argv) == 130  # accepted: it got as far as its first stage
    assert len(no_work) == 1
    no_work.clear()
    capsys.readouterr()
    argv[2] = str(checkpoints["scale-missing"])
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and f"{SCALE} is missing" in err and "fix:" in err
    assert not no_work  # refused before any work


# ----------------------------------------------------------------------------- reference maths
@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (5, 7)])
def test_weight_round_trip_is_within_e4m3_precision(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.02
    quantized, scale = fp8.quantize_weight(weight)
    assert quantized.dtype == torch.float8_e4m3fn and tuple(quantized.shape) == shape
    assert tuple(scale.shape) == fp8.scale_shape(shape)
    back = fp8.dequantize_weight(quantized, scale)
    # e4m3 keeps 3 mantissa bits: a round-to-nearest error of at most 2^-4 of each value's
    # binade, so at most 1/16 of the tile's largest magnitude.
    tile_max = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]] * 448
    assert ((back - weight).abs() <= tile_max / 16 + 1e-12).all()
    assert (back - weight).norm() / weight.norm() < 0.04


def test_each_tile_has_its_own_scale():
    weight = torch.ones(256, 256)
    weight[:128, 128:] *= 1000  # one loud tile must not crush the others' precision
    quantized, scale = fp8.quantize_weight(weight)
    assert torch.allclose(scale, torch.tensor([[1.0, 1000.0], [1.0, 1.0]]) / 448)
    assert torch.equal(fp8.dequantize_weight(quantized, scale), weight)


def test_a_misshaped_scale_is_named():
    with pytest.raises(ValueError, match=r"weight_scale_inv is \[1, 1\].*needs \[2, 1\]"):
        fp8.dequantize_weight(torch.zeros(256, 128, dtype=fp8.E4M3), torch.ones(1, 1))


def test_the_reference_linear_is_close_to_the_unquantized_product():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 300, generator=gen)
    weight = torch.randn(130, 300, generator=gen) * 0.05
    quantized, scale = fp8.quantize_weight(weight)
    got = fp8.fp8_linear_reference(x, quantized, scale)
    exact = x @ weight.T
    # Two e4m3 roundings (activation and weight), each within 2^-4 relative: a few percent.
    assert (got - exact).norm() / exact.norm() < 0.06
    # And exactly the dequantized operands' float32 product.
    xq, xs = fp8.quantize_activation(x)
    want = fp8.dequantize_activation(xq, xs) @ fp8.dequantize_weight(quantized, scale).T
    assert torch.equal(got, want)
