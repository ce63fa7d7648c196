"""``adp calibrate``: measure this machine's constants for ``adp plan`` (adp_pass/calibrate.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from adp_pass.checks import CALIBRATION_KEYS, check_out_dir, check_out_file
from adp_pass.commands.flags import float_in, positive
from adp_pass.errors import UsageError


def add_parser(sub, common, fmt) -> None:
    p = sub.add_parser("calibrate", parents=[common], formatter_class=fmt,
                       help="measure this machine's constants for 'adp plan' (bandwidths, GEMM "
                       "rate, collectives)",
                       description="Measure the cost model's constants on this machine: copy "
                       "bandwidth, bf16 GEMM rate at decode shapes, decode attention bandwidth, "
                       "small-kernel time, and all-reduce / all-gather / reduce-scatter latency "
                       "and bus bandwidth for every group size 2..--gpus (ranks started by "
                       "torchrun: NCCL on GPUs, gloo ranks on a CPU-only machine, small sizes). "
                       "Writes JSON for 'adp plan --calibration'.")
    p.add_argument("--out", metavar="FILE", type=Path, required=True,
                   help="the calibration JSON to write")
    p.add_argument("--gpus", metavar="N", type=positive, default=None,
                   help="ranks for the collectives (one per GPU); if not given, every GPU, or 2 "
                   "gloo ranks without a GPU")
    p.add_argument("--timeout", metavar="S", type=float_in(0, low_open=True), default=120.0,
                   help="seconds any one collective may wait; a lost rank fails the job")
    p.add_argument("--force", action="store_true",
                   help="let --out replace an existing file that is not a calibration")


def run(args: argparse.Namespace, stage) -> int:
    out = args.out
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name", flag="--out",
                         hint=f"e.g. --out {out / 'calibration.json'}")
    check_out_dir(out.parent if str(out.parent) else Path("."), "--out")
    check_out_file(out, "--out", force=args.force, marks=CALIBRATION_KEYS)
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        gpus = args.gpus or count
        if gpus > count:
            raise UsageError(f"--gpus {gpus} is more than the {count} GPUs of this machine",
                             flag="--gpus", hint=f"use --gpus {count} or less")
    else:
        cores = os.cpu_count() or 1
        gpus = args.gpus or min(2, cores)
        if gpus > cores:
            raise UsageError(f"--gpus {gpus} is more gloo ranks than this machine can run: it has "
                             f"no GPU and {cores} CPU cores", flag="--gpus",
                             hint=f"use --gpus {cores} or less")
    from adp_pass.calibrate import calibrate, write_calibration

    with stage(f"measure on {gpus} {'GPU' if torch.cuda.is_available() else 'CPU rank'}"
               f"{'s' * (gpus != 1)}"):
        data = calibrate(gpus, timeout_s=args.timeout)
    write_calibration(data, out)
    gemm = ", ".join(f"{t} tokens {r:g}" for t, r in data["gemm_tflops"].items())
    print(f"calibrate: wrote {out} ({data['gpu']}, {gpus} rank{'s' * (gpus != 1)}, "
          f"{data['seconds']:g} s)")
    print(f"  copy {data['copy_bandwidth_gbps']:g} GB/s; GEMM (TFLOP/s) {gemm}; attention "
          f"{data['attention_bandwidth_gbps']:g} GB/s ({data['attention_kernel']}); small "
          f"kernel {data['kernel_launch_us']:g} us")
    for op, words in (("allreduce", "all-reduce"), ("allgather", "all-gather"),
                      ("reducescatter", "reduce-scatter")):
        cells = [f"{g}: {e['latency_us']:g} us + {e['bus_bandwidth_gbps']:g} GB/s"
                 for g, e in data[op].items()]
        if cells:
            print(f"  {words:<15}" + "; ".join(cells))
    if data.get("gemm_tflops_fp8"):
        print("  GEMM fp8 (TFLOP/s) " + ", ".join(f"{t} tokens {r:g}"
                                               for t, r in data["gemm_tflops_fp8"].items()))
    if data.get("gemm_shapes"):
        print(f"  GEMM on {len(data['gemm_shapes'].get('bf16', {}))} TP shard shapes "
              f"({', '.join(data['gemm_shapes'])})")
    if data.get("lockstep_agree_us"):
        print("  lockstep agreement (gloo) " + "; ".join(
            f"{g}: {us:g} us" for g, us in data["lockstep_agree_us"].items()))
    print(f"  use it: adp plan --gpu {out} --gpus {gpus} ... (laid over its GPU's profile)")
    return 0
