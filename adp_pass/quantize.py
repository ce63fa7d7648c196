"""Write an FP8 block-scaled checkpoint in the official Qwen3-FP8 format (docs/fp8.md), from a
preset's seeded random model or from an unquantized Hugging Face checkpoint.

Every decoder linear (q/k/v/o, gate/up/down) becomes ``float8_e4m3fn`` with its
``weight_scale_inv`` (one scale per 128 x 128 tile, bf16 by default, as the Qwen3 dense FP8
releases store it); embeddings, norms and the LM head are written in ``dtype`` (bf16 by default).
``config.json`` gets ``quantization_config``.

Streaming: the layout (every file's header) is computed from shapes alone, then each tensor is
made (drawn or read), quantized and written before the next, so the peak memory is one tensor
in float32, never the model: Qwen3-32B can be written on a machine with less RAM than it.

The checks (:func:`check_inputs`) are torch-free so that ``adp quantize`` reports a bad input
at once; torch is imported when the writing starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from adp_pass.checks import (DECODER_LINEAR, FP8_DTYPE, FP8_QUANT_CONFIG, SCALE_SUFFIX,
                             check_checkpoint, check_out_dir, expected_tensors, header_entries,
                             read_checkpoint_config, safetensors_files)
from adp_pass.errors import UsageError
from adp_pass.presets import PRESETS, UnknownPreset, preset_depth

if TYPE_CHECKING:
    import torch

BLOCK = 128  # the block the FP8 kernels support (128 x 128)
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}  # CLI name -> safetensors dtype
DEFAULT_SHARD_BYTES = 5 * 10**9
_ITEMSIZE = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4,
             "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = ("F16", "BF16", "F32", "F64")
# Files of a source checkpoint that are not copied: its weights and config (written anew), and
# weights in other formats.
_NOT_COPIED = re.compile(r".*\.(safetensors|safetensors\.index\.json|bin|pt|pth|h5|msgpack|gguf"
                         r"|partial)|config\.json")
_COPY_LIMIT = 64 << 20  # tokenizer and generation files are small; anything bigger is not ours


@dataclass(frozen=True)
class _Out:
    """One tensor as written: name, shape, safetensors dtype, and the file it goes to."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class _Item:
    """A source tensor and what it becomes: itself (cast to ``out.dtype``), or an fp8 weight
    and its scale (``scale``), written one after the other into the same file."""

    out: _Out
    scale: _Out | None = None

    @property
    def nbytes(self) -> int:
        return self.out.nbytes + (self.scale.nbytes if self.scale else 0)


@dataclass
class Inputs:
    """What :func:`check_inputs` validated: the source config.json (a dict) and the layout."""

    out: Path
    config: dict
    items: list[_Item]
    preset: str | None
    checkpoint: Path | None
    dtype: str  # "bf16", "fp16" or "fp32": the unquantized tensors
    scale_dtype: str  # the same names: the weight_scale_inv tensors

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self.items)


@dataclass
class QuantizeReport:
    out: Path
    files: list[str]
    tensors: int  # tensors written, scales included
    quantized: int  # fp8 weights
    scale_dtype: str
    bytes_written: int
    seconds: float
    source: str

    def __str__(self) -> str:
        gb = self.bytes_written / 1e9
        size = f"{gb:.2f} GB" if gb >= 1 else f"{self.bytes_written / 1e6:.1f} MB"
        return (f"wrote {self.out} from {self.source}: {self.tensors} tensors ({self.quantized} "
                f"FP8 weights with {self.scale_dtype} scales per 128x128 block) in "
                f"{len(self.files)} file{'s' * (len(self.files) != 1)}, {size}, "
                f"{self.seconds:.1f} s")


def parse_size(text: str) -> int:
    """Bytes from "5GB", "200MB", "500KB" or a plain number (decimal units, as transformers'
    ``max_shard_size``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"expected a size such as 5GB, 200MB or 1000000, got {text!r}")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    value = int(number * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[unit])
    if value < 1:
        raise ValueError(f"must be at least one byte, got {text!r}")
    return value


# ----------------------------------------------------------------------------- checks (no torch)
def check_inputs(out: str | Path, *, preset: str | None = None,
                 checkpoint: str | Path | None = None, scale_dtype: str = "bf16",
                 dtype: str = "bf16", block: int = BLOCK, force: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 layers: int | None = None) -> Inputs:
    """Every input of :func:`quantize_checkpoint`, checked before any work, each problem a
    :class:`UsageError` (or the checkpoint checks' errors) naming it and the fix. ``layers``:
    a preset's first N decoder layers only (its widths, embeddings and head as they are)."""
    if (preset is None) == (checkpoint is None):
        raise UsageError("give --preset NAME or --checkpoint DIR (one of them)", flag="--preset",
                         hint="--preset qwen3-8b writes that preset's random model; --checkpoint "
                         "DIR quantizes a bf16/fp32 Hugging Face checkpoint")
    if block != BLOCK:
        raise UsageError(f"--block {block}: the FP8 kernels support 128x128 weight blocks only",
                         flag="--block", hint="drop --block (128 is the default)")
    for flag, value in (("--scale-dtype", scale_dtype), ("--dtype", dtype)):
        if value not in DTYPES:
            raise UsageError(f"{flag} {value!r} is not one of {', '.join(DTYPES)}", flag=flag)
    if max_shard_bytes < 1:
        raise UsageError(f"--max-shard-size {max_shard_bytes} must be at least one byte",
                         flag="--max-shard-size")
    out = Path(out)
    if preset is not None:
        if preset not in PRESETS:
            raise UnknownPreset(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}",
                                flag="--preset", hint="e.g. --preset qwen3-8b")
        config = _preset_config_json(preset)
        try:
            depth = preset_depth(preset, layers)
        except ValueError as err:
            raise UsageError(f"--layers {layers}: {err}", flag="--layers",
                             hint=f"give 1 to {config['num_hidden_layers']}, or drop --layers"
                             ) from None
        config["num_hidden_layers"] = depth
        sources = {name: (shape, "F32") for name, shape in expected_tensors(config).items()}
    else:
        if layers is not None:
            raise UsageError("--layers truncates a --preset's random model; a --checkpoint is "
                             "quantized whole", flag="--layers", hint="drop --layers")
        checkpoint = Path(checkpoint)
        config = read_checkpoint_config(checkpoint)
        quant = config.get("quantization_config")
        if quant is not None:
            method = quant.get("quant_method", "unnamed") if isinstance(quant, dict) else quant
            raise UsageError(
                f"--checkpoint {checkpoint} is already quantized (quantization_config "
                f"quant_method {method!r})", flag="--checkpoint",
                hint="give the unquantized (bf16) release; an FP8 block-scaled checkpoint "
                f"loads as it is: adp run --checkpoint {checkpoint}")
        check_checkpoint(checkpoint)  # files, shapes, truncation; fp8 tensors without a config
        sources = {}
        for path in safetensors_files(checkpoint):
            sources.update(header_entries(path))
        if _same_dir(out, checkpoint):
            raise UsageError(f"--out {out} is the --checkpoint directory itself",
                             flag="--out", hint="write the FP8 checkpoint to a new directory")
    _check_out(out, force)
    items = _layout(_plan(sources, DTYPES[dtype], DTYPES[scale_dtype]), max_shard_bytes)
    inputs = Inputs(out, config, items, preset, None if checkpoint is None else Path(checkpoint),
                    dtype, scale_dtype)
    free = shutil.disk_usage(_existing(out)).free
    if inputs.nbytes > free:
        raise UsageError(f"--out {out}: the FP8 checkpoint needs {inputs.nbytes / 1e9:.2f} GB, "
                         f"its file system has {free / 1e9:.2f} GB free", flag="--out",
                         hint="free some space, or write to another disk")
    return inputs


def _preset_config_json(preset: str) -> dict:
    """config.json of a preset as ``check_checkpoint`` reads one (torch-free: the full
    transformers config is made when the files are written)."""
    shape = PRESETS[preset]
    fields = {k: v for k, v in dataclasses.asdict(shape).items() if k != "family"}
    return {"model_type": shape.family, **fields}


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and out.is_dir() and not force:
        held = sorted(p.name for p in out.iterdir())
        if held:
            more = f" and {len(held) - 3} more" if len(held) > 3 else ""
            raise UsageError(
                f"--out {out} exists and holds {len(held)} entries ({', '.join(held[:3])}{more})",
                flag="--out", hint="give a new or empty directory, or add --force to write the "
                "checkpoint over it (its *.safetensors, index and config.json are replaced)")
    check_out_dir(out, "--out")


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.exists() and a.resolve() == b.resolve()
    except OSError:
        return False


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _plan(sources: dict[str, tuple[tuple[int, ...], str]], dtype: str,
          scale_dtype: str) -> list[_Item]:
    """What each source tensor becomes: decoder linears fp8 + scale, other floating-point
    tensors ``dtype``, anything else as stored."""
    items = []
    for name, (shape, stored) in sources.items():
        stored = stored.upper()
        if DECODER_LINEAR.fullmatch(name) and len(shape) == 2 and stored in _FLOATS:
            scale = (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
            items.append(_Item(_Out(name, tuple(shape), FP8_DTYPE),
                               _Out(name + SCALE_SUFFIX, scale, scale_dtype)))
        else:
            items.append(_Item(_Out(name, tuple(shape), dtype if stored in _FLOATS else stored)))
    return items


def _layout(items: list[_Item], max_shard_bytes: int) -> list[_Item]:
    """Files of at most ``max_shard_bytes`` (a bigger tensor gets a file of its own), a weight
    and its scale always together; named as transformers names them."""
    groups: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    placed = []
    for name, group in zip(names, groups):
        for item in group:
            placed.append(_Item(dataclasses.replace(item.out, file=name),
                                item.scale and dataclasses.replace(item.scale, file=name)))
    return placed


# ----------------------------------------------------------------------------- writing
def quantize_checkpoint(out: str | Path, *, preset: str | None = None,
                        checkpoint: str | Path | None = None, scale_dtype: str = "bf16",
                        dtype: str = "bf16", block: int = BLOCK, seed: int = 0,
                        std: float = 0.02, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                        force: bool = False, progress: bool = True,
                        inputs: Inputs | None = None, device: str = "cpu",
                        layers: int | None = None) -> QuantizeReport:
    """Write the FP8 block-scaled checkpoint of ``preset`` (its seeded random model, drawn as
    ``runtime.weights.random_weights`` draws it with ``seed``/``std``, in float32) or of the
    unquantized ``checkpoint`` to the directory ``out``. ``scale_dtype``/``dtype``: "bf16",
    "fp16" or "fp32", of the scales and of the tensors that stay unquantized. ``inputs``: the
    result of :func:`check_inputs`, when already checked (its arguments then stand for those
    of the same names here). ``device``: where a preset's weights are drawn and quantized (a
    GPU writes Qwen3-32B in well under a minute where the CPU takes minutes; its generator draws
    other numbers than the CPU's for the same seed, so the two give different models).
    ``layers``: a preset's first N decoder layers only; each tensor is drawn by its name, so
    they are the whole model's first N layers, weight for weight."""
    start = time.perf_counter()
    if inputs is None:
        inputs = check_inputs(out, preset=preset, checkpoint=checkpoint, scale_dtype=scale_dtype,
                              dtype=dtype, block=block, force=force,
                              max_shard_bytes=max_shard_bytes, layers=layers)
    import contextlib

    import torch
    from safetensors import safe_open

    from adp_pass.runtime.weights import Progress

    out = inputs.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.partial"),
                  out / "model.safetensors.index.json", out / "config.json"]:
        stale.unlink(missing_ok=True)  # --force: no shard of an earlier run may stay beside ours
    with contextlib.ExitStack() as stack:
        if inputs.checkpoint is not None:
            handles = [stack.enter_context(safe_open(str(p), "pt"))
                       for p in safetensors_files(inputs.checkpoint)]
            where = {key: h for h in handles for key in h.keys()}
            source: Callable[[str, tuple[int, ...]], torch.Tensor] = (
                lambda name, shape: where[name].get_tensor(name))
            what = str(inputs.checkpoint)
        else:
            from adp_pass.runtime.weights import random_tensor

            source = (lambda name, shape: random_tensor(name, shape, seed=seed, std=std,
                                                        dtype=torch.float32, device=device))
            what = f"preset {inputs.preset} (random weights, seed {seed}, drawn on {device})"
        meter = Progress(sum(1 + (i.scale is not None) for i in inputs.items), inputs.nbytes,
                         enabled=progress, what="writing FP8 checkpoint")
        files = list(dict.fromkeys(item.out.file for item in inputs.items))
        for file in files:
            _write_file(out / file, [i for i in inputs.items if i.out.file == file], source,
                        meter)
        meter.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": inputs.nbytes},
                 "weight_map": {o.name: o.file for i in inputs.items
                                for o in (i.out, i.scale) if o is not None}}
        _write_json(out / "model.safetensors.index.json", index)
    _write_json(out / "config.json", _fp8_config(inputs))
    if inputs.checkpoint is not None:
        _copy_side_files(inputs.checkpoint, out)
    return QuantizeReport(out=out, files=files, tensors=meter.done_tensors,
                          quantized=sum(i.scale is not None for i in inputs.items),
                          scale_dtype=inputs.scale_dtype, bytes_written=meter.done_bytes,
                          seconds=time.perf_counter() - start, source=what)


def _write_file(path: Path, items: list[_Item], source, meter) -> None:
    """One safetensors file, written as it is made: the header (every offset known from the
    shapes), then each tensor's bytes. Written to ``NAME.partial`` and renamed when whole, so
    an interrupted run never leaves a file that looks complete."""
    import torch

    from adp_pass import fp8

    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for out in (o for i in items for o in (i.out, i.scale) if o is not None):
        header[out.name] = {"dtype": out.dtype, "shape": list(out.shape),
                            "data_offsets": [offset, offset + out.nbytes]}
        offset += out.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for item in items:
            tensor = source(item.out.name, item.out.shape)
            if tuple(tensor.shape) != item.out.shape:  # the header promised this shape
                raise RuntimeError(f"{item.out.name} is {list(tensor.shape)}, its header said "
                                   f"{list(item.out.shape)}")
            if item.scale is None:
                pieces = [(item.out, tensor.to(_torch_dtype(item.out.dtype)))]
            else:
                weight, scale = fp8.quantize_weight_stored(tensor, _torch_dtype(item.scale.dtype))
                pieces = [(item.out, weight), (item.scale, scale)]
            del tensor
            for out, value in pieces:
                data = value.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                if data.nbytes != out.nbytes:
                    raise RuntimeError(f"{out.name}: {data.nbytes} bytes, expected {out.nbytes}")
                f.write(memoryview(data))
                meter.advance(out.nbytes)
            del pieces, value, data  # nothing of this tensor outlives its turn
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16,
            "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
            "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}[name]


def _fp8_config(inputs: Inputs) -> dict:
    """The source's config.json (a preset's, as transformers writes it) with the FP8
    ``quantization_config`` and the unquantized tensors' dtype."""
    if inputs.preset is not None:
        from adp_pass.presets import model_config

        config = json.loads(model_config(
            inputs.preset, num_hidden_layers=inputs.config["num_hidden_layers"]).to_json_string())
    else:
        config = dict(inputs.config)
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = names[inputs.dtype]
    config["quantization_config"] = {**FP8_QUANT_CONFIG,
                                     "modules_to_not_convert": ["lm_head"]}
    return config


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def _copy_side_files(source: Path, out: Path) -> None:
    """Tokenizer, generation config, licence, ...: what makes the directory a model
    (``adp serve`` needs the tokenizer)."""
    for path in sorted(source.iterdir()):
        if (path.is_file() and not path.name.startswith(".") and not _NOT_COPIED.fullmatch(path.name)
                and path.stat().st_size <= _COPY_LIMIT):
            shutil.copy2(path, out / path.name)


def preset_checkpoint(preset: str, out: str | Path | None = None, *, seed: int = 0,
                      layers: int | None = None) -> Path:
    """The preset's seeded random model (``layers``: its first N decoder layers) as an FP8
    checkpoint in ``out`` (default: a folder under the temp dir named after the preset, layers,
    seed and device), written once and reused: what the benches' ``--quantize fp8`` serve.
    Drawn on the GPU when there is one (a bench's model only has to be the same within one
    run)."""
    import tempfile

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(out) if out is not None else (
        Path(tempfile.gettempdir())
        / f"adp-fp8-{preset}{f'-{layers}layers' if layers else ''}-seed{seed}-{device}")
    written = out / "config.json"
    # a folder reused for another depth is written again, not served at the wrong one
    if (not written.is_file() or json.loads(written.read_text()).get("num_hidden_layers")
            != preset_depth(preset, layers)):
        quantize_checkpoint(out, preset=preset, seed=seed, force=out.exists(), device=device,
                            layers=layers)
    return out
