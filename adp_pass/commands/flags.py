"""What the ``adp`` commands share: argument types, the flags of ``run`` and ``serve`` (the
model, the ranks, the serving config, the output folders) and the checks made from them.

Torch-free: every input is checked before torch loads (``adp --help`` answers at once).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from adp_pass.checks import check_checkpoint, check_out_dir, fp8_weight_shapes
from adp_pass.errors import UsageError
from adp_pass.mapping import Mapping, MappingError
from adp_pass.presets import PRESETS
from adp_pass.runtime.serving_config import KV_CACHE_DTYPES, ServingConfig

BLOCK_SIZE = ServingConfig.block_size  # the serving job's KV-cache block size, defined once
DTYPES = ["float32", "bfloat16", "float16"]


class Parser(argparse.ArgumentParser):
    """Bad flags raise a UsageError, reported by ``main`` like every other error (argparse's
    own report prints the whole usage block first)."""

    def error(self, message: str):
        raise UsageError(message, hint=f"see '{self.prog} --help'")


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            left = "(" if low_open else "["
            right = "]" if math.isfinite(high) else ")"
            raise argparse.ArgumentTypeError(f"must be in {left}{low:g}, {high:g}{right}, "
                                             f"got {text}")
        return value

    return parse


def int_list(low: int, *, allow_empty: bool = False):
    def parse(text: str) -> list[int]:
        items = [t.strip() for t in text.split(",")] if text.strip() else []
        if not items and not allow_empty:
            raise argparse.ArgumentTypeError("expected comma-separated integers, got nothing")
        try:
            values = [int(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {text!r}") from None
        if any(v < low for v in values):
            raise argparse.ArgumentTypeError(f"every value must be >= {low}, got {text!r}")
        return values

    return parse


positive = int_at_least(1)


def port_number(text: str) -> int:
    value = int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1..65535, got {value}")
    return value


def served_name(text: str) -> str:
    """A name clients send back (``--served-model-name``): not empty, no control characters."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty: clients send it as 'model'")
    if text != text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be printable, without leading or trailing "
                                         f"spaces, got {text!r}")
    return text


def api_key(text: str) -> str:
    """A key sent in an HTTP header: printable ASCII, no spaces (the value is never echoed)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    if not (text.isascii() and text.isprintable()) or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError("must be printable ASCII without spaces (it travels "
                                         "in the Authorization header)")
    return text


def origin_list(text: str) -> list[str]:
    origins = [o.strip().rstrip("/") for o in text.split(",") if o.strip()]
    if not origins:
        raise argparse.ArgumentTypeError("expected comma-separated origins, got nothing")
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise argparse.ArgumentTypeError(f"an origin is scheme://host[:port] (or *), got "
                                             f"{origin!r}")
    return origins



# ----------------------------------------------------------------------------- shared checks
def parse_mapping(spec: str, flag: str = "--mapping") -> Mapping:
    try:
        return Mapping.load(spec)
    except MappingError as err:
        err.flag = err.flag or flag
        raise


def check_tp_fits_model(mapping: Mapping, heads: int, kv_heads: int, inter: int,
                         flag: str) -> None:
    try:
        mapping.check_model(heads, kv_heads, inter)
    except MappingError as err:
        if flag == "--world-size":  # the user typed a world size, not a tp: say how they relate
            raise UsageError(f"--world-size {mapping.tp_size} is the TP degree: {err}",
                             flag=flag, hint="pick a --world-size that divides the model's heads "
                             "and intermediate size") from None
        err.flag = flag
        raise


def ranks_device(args: argparse.Namespace) -> str:
    """--device (else ADP_DEVICE, else auto) resolved to "cpu" or "cuda"; exported, so that the
    ranks, which read it from their environment, run where it says."""
    from adp_pass.launch import DEVICE_ENV, job_device

    if getattr(args, "device", None):
        os.environ[DEVICE_ENV] = args.device
    try:
        return job_device()
    except (RuntimeError, ValueError) as err:
        raise UsageError(str(err), flag="--device", hint="use --device cpu (gloo ranks), or auto")


def check_ranks_fit_machine(world_size: int, device: str) -> None:
    """One rank per GPU. gloo ranks on the CPU share the cores when there are more ranks than
    cores (slower, but right: how a tp=8 mapping is verified on a laptop): a warning, and one
    thread per rank (OMP_NUM_THREADS, which the ranks inherit) so they do not fight over them."""
    import torch

    if device == "cuda":
        limit = torch.cuda.device_count()
        if world_size > limit:
            raise UsageError(f"--world-size {world_size} is more ranks than this machine can "
                             f"run: it has {limit} GPUs", flag="--world-size",
                             hint=f"use --world-size {limit} or less, or --device cpu (gloo "
                             "ranks on the CPU)")
        return
    cores = os.cpu_count() or 1
    if world_size > cores:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        print(f"adp: warning: --world-size {world_size} gloo ranks share {cores} CPU core"
              f"{'s' * (cores != 1)}, {os.environ['OMP_NUM_THREADS']} thread(s) each: slower, "
              "with the same results", file=sys.stderr, flush=True)


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="where the ranks run: auto (one GPU each when there are GPUs, else the "
                   "CPU with gloo), cpu or cuda; if not given, $ADP_DEVICE or auto")



@dataclass(frozen=True)
class ModelShape:
    """The model a command works on, as its flags name it (``--preset`` or ``--checkpoint``):
    the shape keys the checks need, read from the preset table or the checkpoint's checked
    config.json. Torch-free."""

    preset: str  # the preset's name; with a checkpoint, the default one (unused for the model)
    checkpoint: Path | None
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_position: int
    fp8: bool = False  # an FP8 block-scaled checkpoint holding fp8 weights (validated)

    @property
    def name(self) -> str:
        """How messages name the model: the checkpoint's path, else the preset."""
        return str(self.checkpoint) if self.checkpoint is not None else self.preset

    @property
    def label(self) -> str:
        """What a command's first line says it works on: ``checkpoint DIR`` (``(FP8)`` for an FP8
        one) or ``preset NAME``."""
        if self.checkpoint is None:
            return f"preset {self.preset}"
        return f"checkpoint {self.checkpoint}" + (" (FP8)" if self.fp8 else "")

    def config(self):
        """The transformers config a rank of this model builds (imports transformers): the
        checkpoint's config.json as ``Job.model_config`` reads it for ``adp run`` (SDPA, no KV
        cache), else the preset's. One definition, so ``adp rewrite --out``'s artifact has the
        key ``adp run --checkpoint`` looks up."""
        from adp_pass.runtime.contract import Job

        return Job(Mapping(tp_size=1), preset=self.preset,
                   checkpoint=str(self.checkpoint) if self.checkpoint is not None else None
                   ).model_config()


def model_shape(args: argparse.Namespace, default_preset: str = "tiny") -> ModelShape:
    """The model of ``--preset`` / ``--checkpoint`` (not both): a checkpoint is checked from its
    config.json and safetensors headers (``checks.check_checkpoint``: the directory, config.json,
    the family, every tensor's shape, an FP8 checkpoint's scales), no tensor read."""
    if args.checkpoint is not None and args.preset is not None:
        raise UsageError("give --preset or --checkpoint, not both", flag="--checkpoint",
                         hint="a checkpoint brings its own shape (config.json)")
    preset = args.preset or default_preset
    if args.checkpoint is not None:
        config = check_checkpoint(args.checkpoint)
        return ModelShape(
            preset, args.checkpoint, config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["vocab_size"],
            config.get("max_position_embeddings") or 4096,
            # check_checkpoint refused every quantization but FP8 block-scaled
            fp8=config.get("quantization_config") is not None
            and bool(fp8_weight_shapes(args.checkpoint)))
    shape = PRESETS[preset]
    return ModelShape(preset, None, shape.num_attention_heads, shape.num_key_value_heads,
                      shape.intermediate_size, shape.vocab_size, shape.max_position_embeddings)


def check_model_fits_mapping(model: ModelShape, mapping: Mapping, flag: str) -> None:
    """``check_tp_fits_model`` for a :class:`ModelShape`."""
    check_tp_fits_model(mapping, model.heads, model.kv_heads, model.intermediate, flag)


def check_fp8_shards(checkpoint: Path | None, mapping: Mapping, flag: str = "--mapping") -> None:
    """An FP8 checkpoint is served with FP8 linears (``prepare_rank``; ``adp verify`` and ``adp
    rewrite`` build the same graph): each TP rank's part of every fp8 weight must be whole
    128 x 128 scale tiles, or its tiles would cover another rank's values. Detect refuses such a
    graph (``fp8.Fp8BlockError``); this says so from the headers, before any rank starts or any
    trace, with the TP degrees that work. Which dim a weight is split on comes from the family's
    TP plan (colwise: its rows, rowwise: its columns).

    Imports torch and transformers (``adp_pass.fp8``, the config): call it after the machine
    check, the last of the others. Exit code 2: the mapping does not fit the checkpoint."""
    tp = mapping.tp_size
    if checkpoint is None or tp == 1:
        return
    shapes = fp8_weight_shapes(checkpoint)
    if not shapes:
        return
    import fnmatch

    from adp_pass import fp8
    from adp_pass.families import family_of
    from adp_pass.runtime.contract import Job

    config = Job(mapping, checkpoint=str(checkpoint)).model_config()
    styles = family_of(config).tp_plan(config)
    block = fp8.WEIGHT_BLOCK[0]
    misfits, sizes = [], []
    for name, shape in shapes.items():
        module = name.removeprefix("model.").removesuffix(".weight")
        style = next((s for pattern, s in styles.items() if fnmatch.fnmatchcase(module, pattern)),
                     None)
        if style is None or not style.startswith(("colwise", "rowwise")) or len(shape) != 2:
            continue  # not split by TP: whole on every rank
        dim = 0 if style.startswith("colwise") else 1
        sizes.append(shape[dim])
        if shape[dim] % tp or (shape[dim] // tp) % block:
            misfits.append((name, dim, shape))
    if not misfits:
        return
    name, dim, shape = misfits[0]
    works = [t for t in fp8.block_aligned_tp(sizes, max(tp, 8)) if t != tp]
    err = fp8.Fp8BlockError(
        f"{checkpoint}: {name} is FP8 with {block}x{block} scale blocks, but each of the {tp} TP "
        f"ranks would hold {shape[dim] / tp:g} of its {'rows' if dim == 0 else 'columns'} "
        f"(shape {list(shape)}), not a multiple of {block}: a rank's scale tiles would cover "
        f"another rank's values ({len(misfits)} FP8 weights so), under every mapping of tp={tp}",
        flag=flag, hint=f"use a TP degree whose shards are whole blocks "
        f"({', '.join(map(str, works)) or 'none'}), or the bf16 checkpoint of this model")
    err.exit_code = 2  # the mapping does not fit the model, as a tp that does not divide its heads
    raise err


def model_and_mapping(args: argparse.Namespace) -> tuple[str, int, int, Mapping]:
    """``adp run`` / ``adp serve``: the model (``--preset`` or ``--checkpoint``) and the mapping
    (``--mapping``, else replicated over ``--world-size``), checked against each other: the
    preset name, vocabulary size, positions and mapping."""
    model = model_shape(args)
    if args.mapping is not None:
        mapping = parse_mapping(args.mapping)
        if args.world_size is not None and args.world_size != mapping.world_size:
            raise UsageError(f"--world-size {args.world_size} is not the --mapping's tp "
                             f"({mapping.tp_size}): the mapping regroups the ranks of one TP job",
                             flag="--world-size", hint="drop --world-size, or make them equal")
        check_model_fits_mapping(model, mapping, "--mapping")
    else:
        mapping = parse_mapping(f"tp={args.world_size or 2},attn_dp=1", "--world-size")
        check_model_fits_mapping(model, mapping, "--world-size")
    return model.preset, model.vocab, model.max_position, mapping


# ----------------------------------------------------------------------------- run and serve
def add_model_flags(p: argparse.ArgumentParser, default_preset: str = "tiny",
                    checkpoint_help: str = "") -> None:
    """--preset / --checkpoint: the model a command builds (``run``, ``serve``, ``verify``,
    ``rewrite``; :func:`model_shape` reads them)."""
    p.add_argument("--preset", metavar="NAME", default=None, choices=sorted(PRESETS),
                   help="model shape with random weights: %(choices)s; if not given, "
                   f"{default_preset} (or the --checkpoint's)")
    p.add_argument("--checkpoint", metavar="DIR", type=Path, default=None,
                   help="Hugging Face checkpoint directory (config.json, *.safetensors, "
                   "tokenizer; bf16 or the FP8 block-scaled format of the Qwen3-FP8 releases "
                   f"and of adp quantize){checkpoint_help}")


def add_rank_flags(p: argparse.ArgumentParser, mapping_help: str) -> None:
    """--world-size, --device, --mapping: the ranks a job starts and how they are grouped."""
    p.add_argument("--world-size", metavar="N", type=positive, default=None,
                   help="ranks; if not given, 2 (or the --mapping's tp)")
    add_device_flag(p)
    p.add_argument("--mapping", metavar="SPEC", default=None, help=mapping_help)


def add_serving_flags(p: argparse.ArgumentParser, num_blocks_help: str = "") -> None:
    """The serving config (dtype, KV cache, CUDA graphs) and the folders a job writes."""
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and activations")
    p.add_argument("--num-blocks", metavar="N", type=positive, default=ServingConfig.num_blocks,
                   help=f"KV-cache blocks per rank ({BLOCK_SIZE} tokens each){num_blocks_help}")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV-cache element type: auto (the --dtype) or fp8 (float8_e4m3fn with "
                   "one K and one V scale per layer: half the bytes per token of bf16; "
                   "docs/fp8.md)")
    p.add_argument("--kv-cache-scale", metavar="S", type=float_in(0, low_open=True), default=1.0,
                   help="--kv-cache-dtype fp8: the K and V scale (stored = x / S in e4m3)")
    p.add_argument("--cuda-graphs", metavar="SIZES", type=int_list(1, allow_empty=True),
                   default="1,2,4,8,16,32,64",
                   help="decode batch sizes captured as CUDA graphs (GPU only; empty: none)")
    p.add_argument("--log-dir", metavar="DIR", type=Path, default=None,
                   help="where the ranks' log goes; if not given, a file under the temp dir")
    p.add_argument("--cache-dir", metavar="DIR", type=Path, default=None,
                   help="build cache: each rank loads its built graph from here, or builds and "
                   "stores it (docs/build_cache.md); if not given, $XDG_CACHE_HOME/adp-pass or "
                   "~/.cache/adp-pass")
    p.add_argument("--no-cache", action="store_true",
                   help="build every rank's graph; read and write no build cache")


def kv_cache_settings(args: argparse.Namespace) -> dict:
    """The serving config's KV-cache fields from --kv-cache-dtype / --kv-cache-scale."""
    if args.kv_cache_dtype != "fp8" and args.kv_cache_scale != 1.0:
        raise UsageError("--kv-cache-scale applies to --kv-cache-dtype fp8 only",
                         flag="--kv-cache-scale", hint="add --kv-cache-dtype fp8, or drop it")
    return {"kv_cache_dtype": args.kv_cache_dtype, "kv_cache_scale": args.kv_cache_scale}


def check_job_dirs(args: argparse.Namespace) -> None:
    """The folders a job writes (--log-dir, --cache-dir, --dump-dir) can be written, before
    any work starts (a probe file is made and removed)."""
    if args.no_cache and args.cache_dir is not None:
        raise UsageError("give --cache-dir or --no-cache, not both", flag="--no-cache")
    for flag in ("--log-dir", "--cache-dir", "--dump-dir"):
        path = getattr(args, flag[2:].replace("-", "_"), None)
        if path is not None:
            check_out_dir(path, flag)


def build_cache_dir(args: argparse.Namespace) -> str | None:
    """The build cache the ranks use (None: --no-cache)."""
    if args.no_cache:
        return None
    from adp_pass.runtime.build_cache import default_cache_dir

    return str(args.cache_dir or default_cache_dir())


def log_path(args: argparse.Namespace, kind: str = "run") -> Path:
    """The ranks' log: a new file in --log-dir, else under the temp dir."""
    from adp_pass.launch import default_log_path

    default = Path(default_log_path(kind))
    return args.log_dir / default.name if args.log_dir else default
