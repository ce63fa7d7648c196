"""``adp quantize``: its flags and its run (the work is ``adp_pass/quantize.py``).

Torch-free at import, like the rest of the CLI: every input is checked before torch loads.
"""

from __future__ import annotations

import argparse

from adp_pass.commands.flags import int_at_least
from adp_pass.quantize import BLOCK, DEFAULT_SHARD_BYTES, DTYPES, check_inputs, parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_parser(sub, common: argparse.ArgumentParser, fmt) -> None:
    p = sub.add_parser(
        "quantize", parents=[common], formatter_class=fmt,
        help="write an FP8 block-scaled checkpoint (the Qwen3-FP8 format) of a preset or a "
        "bf16 checkpoint",
        description="Quantize every decoder linear (q/k/v/o, gate/up/down) to float8_e4m3fn "
        "with one weight_scale_inv per 128x128 block, as the official Qwen3-FP8 releases store "
        "them; embeddings, norms and the LM head stay --dtype. One tensor at a time: the model "
        "never has to fit in memory. See docs/fp8.md.")
    p.add_argument("--preset", metavar="NAME", default=None,
                   help="write this preset's seeded random model (the one 'adp run --preset' "
                   "builds with --seed), e.g. qwen3-8b, fp8-tiny")
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="quantize this unquantized (bf16/fp32) Hugging Face checkpoint; its "
                   "tokenizer and other small files are copied")
    p.add_argument("--out", metavar="DIR", required=True, help="the directory to write")
    p.add_argument("--scale-dtype", default="bf16", choices=list(DTYPES),
                   help="dtype of the weight_scale_inv tensors (the Qwen3 dense releases: bf16)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                   help="dtype of the tensors that stay unquantized (embeddings, norms, LM head)")
    p.add_argument("--block", metavar="N", type=int, default=BLOCK,
                   help="weight block size (128 only: the block the FP8 kernels support)")
    p.add_argument("--layers", metavar="N", type=int_at_least(1), default=None,
                   help="--preset: its first N decoder layers only, weight for weight those of "
                   "the whole model (the real widths at little depth: a check of the kernels "
                   "that depth would not amplify)")
    p.add_argument("--seed", metavar="N", type=int_at_least(0), default=0,
                   help="--preset: the random weights' seed")
    p.add_argument("--max-shard-size", metavar="SIZE", type=_size, default=DEFAULT_SHARD_BYTES,
                   help="largest safetensors file, e.g. 5GB, 200MB (decimal units); several "
                   "files get a model.safetensors.index.json")
    p.add_argument("--force", action="store_true",
                   help="write into an --out directory that already holds files (its "
                   "*.safetensors, index and config.json are replaced)")


def run(args: argparse.Namespace, stage) -> int:
    from pathlib import Path

    inputs = check_inputs(Path(args.out), preset=args.preset, checkpoint=args.checkpoint,
                          scale_dtype=args.scale_dtype, dtype=args.dtype, block=args.block,
                          force=args.force, max_shard_bytes=args.max_shard_size,
                          layers=args.layers)
    source = (f"preset {args.preset}{f' (first {args.layers} layers)' if args.layers else ''}"
              if args.preset else str(args.checkpoint))
    size = (f"{inputs.nbytes / 1e9:.2f} GB" if inputs.nbytes >= 1e9
            else f"{inputs.nbytes / 1e6:.1f} MB")
    with stage(f"quantize {source} to FP8 ({size}) in {args.out}"):
        from adp_pass.quantize import quantize_checkpoint

        report = quantize_checkpoint(args.out, seed=args.seed, inputs=inputs)
    print(f"quantize: {report}")
    print(f"  load it: adp run --checkpoint {args.out}")
    return 0
