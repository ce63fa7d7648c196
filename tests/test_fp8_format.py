"""FP8 checkpoints (the official Qwen3-FP8 format) are refused by name, never loaded as if their
e4m3 values were the weights; and the block-scaled reference arithmetic (adp_pass/fp8.py) is
right.

The checkpoints are real safetensors files: a tiny Qwen3 saved by transformers, its decoder
linears then quantized per 128 x 128 tile exactly as the Qwen FP8 release stores them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3ForCausalLM

from adp_pass import cli, fp8
from adp_pass.checks import QuantizedCheckpoint, check_checkpoint
from adp_pass.presets import qwen3_config

QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128]}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fp8_checkpoint(root: Path, *, quant_config: dict | None = QUANT_CONFIG,
                    block: tuple[int, int] = (128, 128), drop_scale: str | None = None,
                    bad_scale: str | None = None) -> Path:
    torch.manual_seed(0)
    Qwen3ForCausalLM(qwen3_config("tiny")).save_pretrained(root, safe_serialization=True)
    tensors = load_file(root / "model.safetensors")
    for name in [n for n in tensors if n.split(".")[-2] in LINEARS]:
        weight, scale = fp8.quantize_weight(tensors[name], block)
        tensors[name] = weight
        scale_name = name + "_scale_inv"
        if scale_name == drop_scale:
            continue
        tensors[scale_name] = scale[:, :-1] if scale_name == bad_scale else scale.bfloat16()
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "config.json").read_text())
    config.pop("quantization_config", None)
    if quant_config is not None:
        config["quantization_config"] = dict(quant_config, weight_block_size=list(block))
    (root / "config.json").write_text(json.dumps(config))
    return root


SCALE = "model.layers.0.self_attn.q_proj.weight_scale_inv"
VARIANTS = {
    "official": {},
    "no-quantization-config": {"quant_config": None},
    "scale-missing": {"drop_scale": SCALE, "quant_config": None},
    "scale-misshaped": {"bad_scale": SCALE},
    "64x64-blocks": {"block": (64, 64)},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fp8")
    return {name: _fp8_checkpoint(base / name, **kw) for name, kw in VARIANTS.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_cli_check_refuses_fp8_by_name(checkpoints, variant):
    with pytest.raises(QuantizedCheckpoint) as err:
        check_checkpoint(checkpoints[variant])
    message = str(err.value)
    assert "quantized (FP8) checkpoint" in message and "does not run FP8" in message
    assert "float8_e4m3fn" in message.lower() or "F8_E4M3" in message
    assert err.value.exit_code == 2 and "bf16" in err.value.hint


def test_the_config_alone_is_enough_evidence(checkpoints):
    with pytest.raises(QuantizedCheckpoint, match="quant_method 'fp8'"):
        check_checkpoint(checkpoints["official"])


@pytest.fixture
def no_work(monkeypatch):
    started = []

    def stage(self, what):
        started.append(what)
        raise AssertionError(f"stage {what!r} started before the checkpoint was refused")

    monkeypatch.setattr(cli._Stages, "__call__", stage)
    return started


@pytest.mark.parametrize("command", ["run", "serve"])
def test_adp_refuses_an_fp8_checkpoint_before_any_work(checkpoints, command, no_work, capsys):
    code = cli.main([command, "--checkpoint", str(checkpoints["no-quantization-config"]),
                     "--world-size", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "quantized (FP8)" in err and "bf16" in err
    assert not no_work


def test_the_rank_loader_refuses_fp8_before_reading(checkpoints):
    from adp_pass.capture import capture_hf_qwen3
    from adp_pass.detect import detect
    from adp_pass.rewrite import rewrite
    from adp_pass.runtime.weights import load_checkpoint

    captured = capture_hf_qwen3(qwen3_config("tiny"), world_size=2, rank=0, meta=True)
    plan = detect(captured.gm, "tp=2,attn_dp=1")
    gm = rewrite(captured.gm, plan)
    with pytest.raises(QuantizedCheckpoint, match="weight-scale tensors"):
        load_checkpoint(gm, plan, checkpoints["no-quantization-config"], progress=False)
    assert gm.get_parameter("model.layers.0.self_attn.q_proj.weight").device.type == "meta"


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
