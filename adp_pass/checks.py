"""Checks the CLI runs before any expensive work: paths, checkpoint directories (read from the
safetensors headers, no tensor loaded), requests against the model and its KV cache.

No torch or transformers here: a bad input must be reported in well under a second.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from adp_pass.errors import AdpError, UsageError
from adp_pass.families import FAMILIES, family_of, supported_text

_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size")


class CheckpointInvalid(AdpError):
    """The directory is a checkpoint of a supported family, but a damaged or mismatched one
    (exit code 1)."""


class QuantizedCheckpoint(UsageError):
    """The checkpoint stores quantized (FP8) weights, which adp-pass does not run yet: their raw
    e4m3 values taken as weights would be a silently corrupt model (exit code 2)."""

    default_hint = ("give the unquantized (bf16) release of the model, e.g. Qwen/Qwen3-8B "
                    "rather than Qwen/Qwen3-8B-FP8")


# Names the FP8 formats (Qwen/DeepSeek block-scaled, per-tensor compressed-tensors) give the
# scales stored beside a quantized weight.
_SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale")


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """``path`` is, or can be made as, a writable directory."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a directory", flag=flag,
                         hint="give a new or existing directory")
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides whether mkdir can work
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path} cannot be created: {probe} is a file, not a directory",
                         flag=flag, hint="choose a directory path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} is not writable ({probe} denies writing)", flag=flag,
                         hint="choose a directory you can write to")


def read_checkpoint_config(root: Path, flag: str = "--checkpoint") -> dict:
    """``config.json`` of a checkpoint directory of a supported family (adp_pass/families:
    qwen3, llama, qwen2), or a UsageError naming what it is."""
    if not root.exists():
        raise UsageError(f"{flag} {root} does not exist", flag=flag,
                         hint="give the directory that holds config.json and *.safetensors")
    if not root.is_dir():
        raise UsageError(f"{flag} {root} is a file, not a checkpoint directory", flag=flag,
                         hint="give the directory that holds config.json and *.safetensors")
    path = root / "config.json"
    if not path.is_file():
        raise UsageError(f"{flag} {root} has no config.json: not a Hugging Face checkpoint",
                         flag=flag, hint="give a directory written by save_pretrained()")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointInvalid(f"{path} is not valid JSON: {err}", flag=flag,
                                hint="re-download or re-save the checkpoint") from None
    if not isinstance(config, dict):
        raise CheckpointInvalid(f"{path} does not hold a JSON object", flag=flag)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        what = f"a {model_type} checkpoint" if model_type else "a checkpoint without model_type"
        raise UsageError(f"{flag} {root}: this is {what}; adp-pass supports {supported_text()} "
                         "(dense models)", flag=flag,
                         hint="give a checkpoint of one of those families, or a --preset")
    absent = [k for k in _CONFIG_KEYS if not isinstance(config.get(k), int) or config[k] < 1]
    if absent:
        raise CheckpointInvalid(f"{path} lacks positive integers for {', '.join(absent)}",
                                flag=flag, hint="re-save the checkpoint with save_pretrained()")
    return config


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint with this config must hold (the family's
    tensors, ``Family.expected_tensors``; a config without ``model_type`` is taken as qwen3)."""
    return family_of(config.get("model_type") or "qwen3").expected_tensors(config)


def check_checkpoint(root: Path, flag: str = "--checkpoint") -> dict:
    """Validate a checkpoint directory from its config and safetensors headers; return the
    config. Names every missing, mis-shaped or truncated tensor file."""
    config = read_checkpoint_config(root, flag)
    files = _safetensors_files(root, flag)
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    dtypes: dict[str, str] = {}
    for path in files:
        for name, (shape, dtype) in _header_entries(path, flag).items():
            found[name] = (shape, path.name)
            dtypes[name] = dtype
    refuse_quantized(config, dtypes, root, flag)
    want = expected_tensors(config)
    missing = [n for n in want if n not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointInvalid(
            f"{root}: {len(missing)} tensors are missing: {', '.join(missing[:3])}{more}",
            flag=flag, hint="the download is incomplete or the files are of another model")
    wrong = [f"{n} is {list(found[n][0])} in {found[n][1]}, config.json implies {list(s)}"
             for n, s in want.items() if found[n][0] != s]
    if wrong:
        raise CheckpointInvalid(f"{root}: {len(wrong)} tensors have the wrong shape: {wrong[0]}",
                                flag=flag, hint="config.json and the weights disagree: re-save "
                                "the model with save_pretrained()")
    return config


def _safetensors_files(root: Path, flag: str) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointInvalid(f"{index} is unreadable: {err!r}", flag=flag) from None
        absent = [n for n in names if not (root / n).is_file()]
        if absent:
            raise CheckpointInvalid(
                f"{index.name} lists files that are not in {root}: {', '.join(absent[:3])}",
                flag=flag, hint="the download is incomplete: fetch the missing files")
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
        hint = ("convert the .bin/.pt weights: save_pretrained(dir, safe_serialization=True)"
                if others else "the weights are missing: download the *.safetensors files")
        raise UsageError(f"{flag} {root} has no *.safetensors files", flag=flag, hint=hint)
    return files


def refuse_quantized(config: dict | None, dtypes: dict[str, str], root: Path,
                     flag: str | None = "--checkpoint") -> None:
    """Raise :class:`QuantizedCheckpoint` if the checkpoint is quantized: by its config
    (``quantization_config``), by a tensor stored as float8, or by a weight scale beside a
    weight. Any one suffices: a config without ``quantization_config`` whose linears are still
    e4m3 is the case that used to load silently wrong. ``dtypes`` maps each tensor to its
    safetensors dtype string ("BF16", "F8_E4M3", ...)."""
    method = None
    if isinstance(config, dict) and config.get("quantization_config") is not None:
        quant = config["quantization_config"]
        method = quant.get("quant_method", "unnamed") if isinstance(quant, dict) else "unnamed"
    fp8 = sorted(n for n, d in dtypes.items() if d.upper().startswith("F8"))
    scales = sorted(n for n in dtypes if n.rsplit(".", 1)[-1] in _SCALE_SUFFIXES)
    if method is None and not fp8 and not scales:
        return
    evidence = []
    if method is not None:
        evidence.append(f"config.json has quantization_config (quant_method {method!r})")
    if fp8:
        evidence.append(f"{len(fp8)} tensors are stored as {dtypes[fp8[0]]} (e.g. {fp8[0]})")
    if scales:
        evidence.append(f"{len(scales)} weight-scale tensors (e.g. {scales[0]})")
    raise QuantizedCheckpoint(
        f"{root} is a quantized (FP8) checkpoint: {'; '.join(evidence)}; adp-pass does not run "
        "FP8 weights yet, and their stored values without the scales are not the model",
        flag=flag)


def _header_entries(path: Path, flag: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor shapes and dtypes from a safetensors header (8-byte length, then JSON), checking
    that the file is long enough to hold the data the header promises."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        entries = {k: (tuple(v["shape"]), str(v["dtype"])) for k, v in header.items()
                   if k != "__metadata__"}
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        raise CheckpointInvalid(f"{path} is not a safetensors file ({err})", flag=flag,
                                hint="re-download or re-save it") from None
    if 8 + length + end > size:
        raise CheckpointInvalid(
            f"{path} is truncated ({size} bytes, its header needs {8 + length + end})",
            flag=flag, hint="the download is incomplete: fetch the file again")
    return entries


def check_requests(prompts: list[list[int]], new_tokens: int, *, vocab_size: int,
                   max_position: int, num_blocks: int, block_size: int) -> None:
    """Each request fits the vocabulary, the model's positions and the KV cache."""
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise UsageError(f"prompt {i} is empty", flag="--prompt",
                             hint="give at least one character")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise UsageError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary "
                             f"(0..{vocab_size - 1})", flag="--prompt")
        total = len(prompt) + new_tokens
        if total > max_position:
            raise UsageError(
                f"prompt {i} ({len(prompt)} tokens) + --new-tokens {new_tokens} = {total} "
                f"tokens, more than the model's {max_position} positions",
                flag="--new-tokens", hint="shorten the prompt or lower --new-tokens")
        blocks = math.ceil(total / block_size)
        if blocks > num_blocks:
            raise UsageError(
                f"prompt {i} ({len(prompt)} tokens) + --new-tokens {new_tokens} needs {blocks} "
                f"KV-cache blocks of {block_size} tokens; --num-blocks is {num_blocks}",
                flag="--num-blocks", hint=f"raise --num-blocks to at least {blocks}, or "
                "shorten the request")
