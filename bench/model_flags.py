"""The model flags the serving benches share: a preset's random weights, a checkpoint (bf16 or
FP8 block-scaled), or the preset written as an FP8 checkpoint first; and the KV-cache dtype."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="serve this checkpoint (bf16, or FP8 block-scaled: FP8 linears) "
                        "instead of the preset's random weights; its config.json wins")
    parser.add_argument("--quantize", choices=["fp8"], default=None,
                        help="write the preset's random model as an FP8 checkpoint first (adp "
                        "quantize, into --quantize-dir) and serve it")
    parser.add_argument("--quantize-dir", type=Path, default=None,
                        help="where --quantize writes (kept and reused); default a folder under "
                        "the temp dir named after the preset")
    parser.add_argument("--layers", type=int, default=None,
                        help="the preset's first N decoder layers only, weight for weight the "
                        "whole model's (bf16, or the FP8 checkpoint --quantize writes): the "
                        "real widths at a depth that fits one GPU, or that does not amplify "
                        "rounding in the first-step check")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")


def resolve_model(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The model's config; sets ``args.checkpoint`` (written for --quantize), ``args.weights``
    and ``args.kv_cache`` (the cost model's names: "bf16" or "fp8"), and ``args.job_layers``
    (the job's ``layers``: a bf16 preset's depth; an FP8 checkpoint's config says its own)."""
    from transformers import AutoConfig

    from adp_pass.presets import qwen3_config
    from adp_pass.quantize import preset_checkpoint

    if args.quantize and args.checkpoint:
        parser.error("give --checkpoint or --quantize, not both")
    if args.layers is not None and args.checkpoint:
        parser.error("--layers cuts the preset's model; a --checkpoint has its own depth")
    if args.layers is not None:
        from adp_pass.presets import preset_depth

        try:
            preset_depth(args.preset, args.layers)
        except ValueError as err:
            parser.error(f"--layers {args.layers}: {err}; give 1 to that")
    if args.quantize:
        args.checkpoint = preset_checkpoint(args.preset, args.quantize_dir, layers=args.layers)
    cut = {} if args.layers is None else {"num_hidden_layers": args.layers}
    config = (qwen3_config(args.preset, **cut) if args.checkpoint is None
              else AutoConfig.from_pretrained(args.checkpoint))
    args.weights = "fp8" if getattr(config, "quantization_config", None) else "bf16"
    args.kv_cache = "fp8" if args.kv_cache_dtype == "fp8" else "bf16"
    args.job_layers = args.layers if args.checkpoint is None else None
    return config
