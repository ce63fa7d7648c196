"""Checks the CLI runs before any expensive work: paths, checkpoint directories (read from the
safetensors headers, no tensor loaded), requests against the model and its KV cache.

No torch or transformers here: a bad input must be reported in well under a second.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path

from adp_pass.errors import AdpError, UsageError
from adp_pass.families import FAMILIES, family_of, supported_text

_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size")


class CheckpointInvalid(AdpError):
    """The directory is a checkpoint of a supported family, but a damaged or mismatched one
    (exit code 1)."""


class QuantizedCheckpoint(UsageError):
    """The checkpoint is quantized in a way adp-pass does not run (another method than FP8
    block-scaled, or FP8 with another block, format or activation scheme): its stored values
    taken as weights would be a silently corrupt model (exit code 2)."""

    default_hint = ("give the unquantized (bf16) release, e.g. Qwen/Qwen3-8B, or an FP8 "
                    "block-scaled one (e.g. Qwen/Qwen3-8B-FP8, or `adp quantize --checkpoint "
                    "BF16DIR --out DIR`)")


# The one quantized format adp-pass runs: the official Qwen3-FP8 (and DeepSeek) block-scaled one.
FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128]}
FP8_DTYPE = "F8_E4M3"  # safetensors' name of float8_e4m3fn
SCALE_DTYPES = ("BF16", "F16", "F32")  # weight_scale_inv as the releases store it
SCALE_SUFFIX = "_scale_inv"  # "...proj.weight" -> "...proj.weight_scale_inv"
# Scales of formats adp-pass does not run (per-tensor or static FP8: compressed-tensors, ...).
_OTHER_SCALES = ("weight_scale", "input_scale")
# The linears of a decoder layer: the weights the format stores as fp8.
DECODER_LINEAR = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """``path`` is, or can be made as, a directory this process can write to. Proven by doing
    it: the missing directories are made and a probe file is created in ``path``, then what the
    check made is removed. Permission bits (``os.access``) tell nothing true for root, /proc or
    a read-only mount, where only the write itself fails, after the work."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a directory", flag=flag,
                         hint="give a new or existing directory")
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides whether mkdir can work
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path} cannot be created: {probe} is a file, not a directory",
                         flag=flag, hint="choose a directory path")
    made = [p for p in [path, *path.parents] if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".adp-write-probe-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise UsageError(f"{flag} {path} is not writable: {err.strerror or err}", flag=flag,
                         hint="choose a directory you can write to") from None
    finally:
        for directory in made:  # innermost first
            with contextlib.suppress(OSError):
                directory.rmdir()


# Keys every file that `adp calibrate` writes holds: such a file may be replaced without --force.
CALIBRATION_KEYS = ("gpu", "copy_bandwidth_gbps", "allreduce")


def check_out_file(path: Path, flag: str = "--out", *, force: bool = False,
                   marks: tuple[str, ...] = ()) -> None:
    """``path`` can be written as a file: not a directory, in a writable directory (probed),
    and not an existing file of something else: one is replaced only when it is a JSON object
    with every key of ``marks`` (a file this command wrote before) or with ``--force``."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name", flag=flag,
                         hint=f"e.g. {flag} {path / 'out.json'}")
    check_out_dir(path.parent if str(path.parent) else Path("."), flag)
    if not path.exists() or force:
        return
    if not _is_ours(path, marks):
        raise UsageError(f"{flag} {path} exists and was not written by this command; it is "
                         "left alone", flag=flag,
                         hint="give a new file name, or add --force to replace it")
    try:
        with path.open("ab"):  # writable as it stands (opened, not changed)
            pass
    except OSError as err:
        raise UsageError(f"{flag} {path} cannot be replaced: {err.strerror or err}", flag=flag,
                         hint="give another file name") from None


def _is_ours(path: Path, marks: tuple[str, ...]) -> bool:
    if not marks or not path.is_file() or path.stat().st_size > 64 << 20:
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and all(key in data for key in marks)


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
    config. Names every missing, mis-shaped or truncated tensor file, and every flaw of an FP8
    checkpoint (:func:`check_quantization`)."""
    config = read_checkpoint_config(root, flag)
    files = safetensors_files(root, flag)
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    entries: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        for name, (shape, dtype) in header_entries(path, flag).items():
            found[name] = (shape, path.name)
            entries[name] = (shape, dtype)
    check_quantization(config, entries, root, flag)
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


def fp8_weight_shapes(root: Path, flag: str = "--checkpoint") -> dict[str, tuple[int, ...]]:
    """The float8_e4m3fn tensors of a checkpoint (none for an unquantized one) with their
    shapes, from the safetensors headers (no tensor read); for a directory
    :func:`check_checkpoint` has passed."""
    shapes = {}
    for path in safetensors_files(root, flag):
        for name, (shape, dtype) in header_entries(path, flag).items():
            if dtype.upper() == FP8_DTYPE:
                shapes[name] = shape
    return shapes


def safetensors_files(root: Path, flag: str = "--checkpoint") -> list[Path]:
    """A checkpoint directory's safetensors files: those its index lists (all present), else
    every ``*.safetensors``; a named error for a broken index or none at all."""
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


def check_quantization(config: dict | None, entries: dict[str, tuple[tuple[int, ...], str]],
                       root: Path, flag: str | None = "--checkpoint") -> list[str]:
    """Validate how a checkpoint is quantized, from config.json and the safetensors headers
    (``entries``: tensor name -> (shape, dtype string such as "BF16", "F8_E4M3")); return the
    names of its fp8 weights (none for an unquantized checkpoint).

    An FP8 block-scaled checkpoint (``FP8_QUANT_CONFIG``) passes when every fp8 tensor is a 2-D
    float8_e4m3fn weight with its ``<name>_scale_inv`` of the ceil grid of 128 x 128 tiles in
    bf16, fp16 or fp32, every scale has its fp8 weight, and every decoder linear not listed in
    ``modules_to_not_convert`` is fp8: an fp8 value is never taken without its scale. Another
    quantization method, block, format or activation scheme is :class:`QuantizedCheckpoint`;
    fp8 tensors or scales without ``quantization_config``, or a broken tensor, is
    :class:`CheckpointInvalid` naming the tensor."""
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    fp8 = sorted(n for n, (_, d) in entries.items() if d.upper().startswith("F8"))
    scales = sorted(n for n in entries if n.endswith("weight" + SCALE_SUFFIX))
    others = sorted(n for n in entries if n.rsplit(".", 1)[-1] in _OTHER_SCALES)
    if quant is None:
        if fp8 or scales or others:
            evidence = []
            if fp8:
                evidence.append(f"{len(fp8)} tensors are stored as {entries[fp8[0]][1]} "
                                f"(e.g. {fp8[0]})")
            if scales or others:
                evidence.append(f"{len(scales) + len(others)} weight-scale tensors (e.g. "
                                f"{(scales or others)[0]})")
            raise CheckpointInvalid(
                f"{root} is an inconsistent checkpoint: {'; '.join(evidence)}, but config.json "
                "has no quantization_config, so nothing says how to read them", flag=flag,
                hint="restore the checkpoint's own config.json (an FP8 release carries "
                f"quantization_config = {json.dumps(FP8_QUANT_CONFIG)}), or re-quantize the "
                "bf16 release with `adp quantize --checkpoint BF16DIR --out DIR`")
        return []
    _check_fp8_config(quant, root, flag)
    skip = quant.get("modules_to_not_convert") or []
    problems = []
    for name in others:
        problems.append(f"{name}: a per-tensor or static scale ({name.rsplit('.', 1)[-1]}) is "
                        "not part of the block-scaled format (weight_scale_inv per 128x128 tile)")
    for name in scales:
        weight = name[: -len(SCALE_SUFFIX)]
        if weight not in entries:
            problems.append(f"{name} is a weight scale without its weight: {weight} is not in "
                            "the checkpoint")
        elif not entries[weight][1].upper().startswith("F8"):
            problems.append(f"{name} is a weight scale beside {weight}, which is stored as "
                            f"{entries[weight][1]}, not {FP8_DTYPE}: only fp8 weights carry one")
    for name in fp8:
        shape, dtype = entries[name]
        scale = name + SCALE_SUFFIX
        if dtype.upper() != FP8_DTYPE:
            problems.append(f"{name} is stored as {dtype}; quantization_config fmt e4m3 needs "
                            f"{FP8_DTYPE} (float8_e4m3fn)")
        elif len(shape) != 2:
            problems.append(f"{name} is an fp8 tensor of shape {list(shape)}; only 2-D linear "
                            "weights are quantized")
        elif scale not in entries:
            problems.append(f"{name} is fp8 but its scale {scale} is missing")
        else:
            want = [math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)]
            got, scale_dtype = entries[scale]
            if list(got) != want:
                problems.append(f"{scale} is {list(got)}; its weight {name} of {list(shape)} "
                                f"with 128x128 blocks needs {want}")
            elif scale_dtype.upper() not in SCALE_DTYPES:
                problems.append(f"{scale} is stored as {scale_dtype}; a scale is BF16, F16 or "
                                "F32")
    for name in sorted(entries):
        module = name.rsplit(".", 1)[0]
        if (DECODER_LINEAR.fullmatch(name) and name not in fp8
                and not any(f".{m}." in f".{module}." for m in skip)):
            problems.append(f"{name} is stored as {entries[name][1]} in an FP8 checkpoint and "
                            "is not in modules_to_not_convert: every decoder linear is "
                            f"{FP8_DTYPE} with a weight_scale_inv")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointInvalid(f"{root}: FP8 checkpoint: {problems[0]}{more}", flag=flag,
                                hint="the files are damaged or were not written in the FP8 "
                                "block-scaled format: re-download them, or re-quantize the bf16 "
                                "release with `adp quantize --checkpoint BF16DIR --out DIR`")
    return fp8


def _check_fp8_config(quant: object, root: Path, flag: str | None) -> None:
    """``quantization_config`` is FP8 block-scaled as the kernels run it; anything else is
    refused by name (method, format, activation scheme or block)."""
    if not isinstance(quant, dict):
        raise CheckpointInvalid(f"{root / 'config.json'}: quantization_config is "
                                f"{type(quant).__name__}, not an object", flag=flag)
    method = quant.get("quant_method", "unnamed")
    if method != "fp8":
        raise QuantizedCheckpoint(
            f"{root} is quantized with quant_method {method!r}, which adp-pass does not run: it "
            "runs unquantized checkpoints and FP8 block-scaled ones (quant_method fp8, e4m3, "
            "128x128 weight blocks, dynamic activation scales)", flag=flag)
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise QuantizedCheckpoint(f"{root}: quantization_config fmt {fmt!r} is not supported: "
                                  "the FP8 kernels run e4m3 (float8_e4m3fn) weights", flag=flag)
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise QuantizedCheckpoint(
            f"{root}: quantization_config activation_scheme {scheme!r} is not supported: the "
            "FP8 kernels quantize activations dynamically (per token and 128-wide group), not "
            "with stored input scales", flag=flag)
    block = quant.get("weight_block_size")
    if block is None:
        raise QuantizedCheckpoint(
            f"{root}: quantization_config has no weight_block_size: per-tensor FP8 scales are "
            "not supported; the FP8 kernels support 128x128 weight blocks", flag=flag)
    if list(block) != FP8_QUANT_CONFIG["weight_block_size"]:
        raise QuantizedCheckpoint(
            f"{root}: quantization_config weight_block_size {list(block)} is not supported: the "
            "FP8 kernels support 128x128 weight blocks only", flag=flag,
            hint="re-quantize the bf16 release with 128x128 blocks: `adp quantize --checkpoint "
            "BF16DIR --out DIR`")


def header_entries(path: Path, flag: str | None = "--checkpoint"
                   ) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype string) from a safetensors header (8-byte length, then
    JSON), checking that the file is long enough to hold the data the header promises:
    :class:`CheckpointInvalid` for a file that is not one or is truncated (no data read)."""
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
