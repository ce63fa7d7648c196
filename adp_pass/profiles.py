"""Hardware profiles for the cost model (``adp plan --gpu h20|h100|h200|b200|FILE``).

A profile is a packaged JSON (``adp_pass/data/<name>.json``, schema 2) whose every constant says
where it comes from::

    {"schema": 2, "name": "h20", "gpu": "NVIDIA H20", "match": ["H20"],
     "constants": {"copy_bandwidth_gbps": {"value": 3532, "source": "datasheet",
                                           "from": "HBM3 4.0 TB/s x 0.883 ..."}, ...},
     "measured": null | {an `adp calibrate` output}}

``source`` is one of ``datasheet`` (a vendor figure, with its derating in ``from``),
``measured`` (an ``adp calibrate`` or benchmark measurement, with date and versions), ``derived``
(computed from other constants; the rule in ``from``), ``law`` (a collective group size filled in
by the stated latency law), ``assumed`` (no source; ``range`` gives the span it may take) or
``fitted`` (fitted to this project's own one-GPU measurements, never to an outside table).

A measured calibration (``adp calibrate --out FILE``, flat keys) overrides the figures it
measures: ``--gpu FILE`` lays it over the profile of the GPU it names (``gpu`` key), and a
profile's own ``measured`` block is laid over its datasheet constants the same way. GEMM points
that the measurement shows to be memory-bound (their time is the weight read, not the math) are
not taken as compute rates.

Torch-free: ``adp plan`` reads this on any machine. Which GPU a process runs on is asked of
``nvidia-smi`` (``ADP_GPU`` overrides it), so benchmarks and ``adp plan`` on a GPU machine use
that GPU's profile.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

from adp_pass.errors import UsageError

PROFILE_NAMES = ("h20", "h100", "h200", "b200")
DEFAULT_PROFILE = "h200"
SOURCES = ("datasheet", "measured", "derived", "law", "assumed", "fitted")
OPS = ("allreduce", "allgather", "reducescatter")
# Ring steps of one collective over g ranks (NCCL's ring, LL protocol for small messages):
# an all-reduce is a reduce-scatter then an all-gather, g-1 steps each.
RING_STEPS = {"allreduce": lambda g: 2 * (g - 1), "allgather": lambda g: g - 1,
              "reducescatter": lambda g: g - 1}
# The single positive numbers an `adp calibrate` output measures: checked, then laid over a
# profile (one list, so a new measured number cannot be checked but dropped on its way in).
MEASURED_NUMBERS = ("copy_bandwidth_gbps", "attention_bandwidth_gbps",
                    "attention_fp8_bandwidth_gbps", "kernel_launch_us", "device_memory_gib")
# Keys of an `adp calibrate` output that measure a profile constant (the rest is metadata).
MEASURED_KEYS = (*MEASURED_NUMBERS, "gemm_tflops", "gemm_tflops_fp8", "gemm_shapes",
                 "lockstep_agree_us", *OPS)
# Compute-bound check of a measured GEMM point: its time must exceed the weight read (at copy
# bandwidth) plus the fixed per-GEMM cost by this factor to count as a compute rate.
COMPUTE_BOUND_MARGIN = 1.15
GEMM_REF_HIDDEN = 4096  # adp calibrate's reference GEMM: [T x 4096] @ [4096 x 16384]


class ProfileError(UsageError):
    """An unknown profile name, or a profile / calibration file that cannot be used (exit 2)."""

    default_hint = (f"use --gpu {'|'.join(PROFILE_NAMES)} or an 'adp calibrate --out FILE' "
                    "output")


def data_dir() -> Path:
    return Path(str(resources.files("adp_pass") / "data"))


def profile_path(name: str) -> Path:
    return data_dir() / f"{name}.json"


def detect_gpu_name() -> str | None:
    """This machine's GPU 0 by ``nvidia-smi``, or None (no GPU, no driver, or it failed)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    name = out.stdout.strip().splitlines()[0].strip() if out.stdout.strip() else ""
    return name or None


def profile_for_device(device_name: str | None) -> str | None:
    """The packaged profile whose ``match`` words appear in ``device_name`` (longest first, so
    "H200" does not take "H20"), or None."""
    if not device_name:
        return None
    text = device_name.upper()
    best: tuple[int, str] | None = None
    for name in PROFILE_NAMES:
        raw = json.loads(profile_path(name).read_text())
        for word in raw.get("match", []):
            if _word_in(word.upper(), text) and (best is None or len(word) > best[0]):
                best = (len(word), name)
    return None if best is None else best[1]


def _word_in(word: str, text: str) -> bool:
    """``word`` in ``text`` not followed by a digit ("H20" is not in "H200")."""
    start = text.find(word)
    while start >= 0:
        end = start + len(word)
        if end >= len(text) or not text[end].isdigit():
            return True
        start = text.find(word, start + 1)
    return False


def default_profile_name() -> tuple[str, str]:
    """(profile name, why): ``ADP_GPU``, else this machine's GPU, else the H200 default."""
    env = os.environ.get("ADP_GPU")
    if env:
        return env, "ADP_GPU"
    device = detect_gpu_name()
    found = profile_for_device(device)
    if found:
        return found, f"this machine's GPU ({device})"
    if device:
        return DEFAULT_PROFILE, f"no profile matches this machine's GPU ({device}): the default"
    return DEFAULT_PROFILE, "no GPU here: the default"


# ----------------------------------------------------------------------------- loading
def load_profile_data(spec: "str | Path | None") -> tuple[dict, dict, str, str]:
    """(flat constants, provenance by key, where, profile name) for a profile name, a profile
    file or an ``adp calibrate`` output; None picks this machine's GPU (else H200)."""
    why = ""
    if spec is None:
        spec, why = default_profile_name()
    text = str(spec)
    if text.lower() in PROFILE_NAMES:
        raw = _read(profile_path(text.lower()), flag="--gpu")
        flat, prov = _expand(raw, str(profile_path(text.lower())))
        where = f"{raw.get('name', text)} profile" + (f" ({why})" if why else "")
        return flat, prov, where, raw.get("name", text)
    path = Path(text)
    if not path.suffix and not path.exists():
        raise ProfileError(f"unknown GPU profile {text!r}: known are "
                           f"{', '.join(PROFILE_NAMES)}, or a calibration file", flag="--gpu")
    raw = _read(path, flag="--gpu")
    if isinstance(raw, dict) and "constants" in raw:
        flat, prov = _expand(raw, str(path))
        return flat, prov, str(path), raw.get("name", path.stem)
    return calibration_over_profile(raw, str(path))


def calibration_over_profile(raw: Any, where: str) -> tuple[dict, dict, str, str]:
    """An ``adp calibrate`` output laid over the packaged profile of the GPU it names."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{where} must hold a JSON object", flag="--gpu")
    base_name = profile_for_device(str(raw.get("gpu", ""))) or DEFAULT_PROFILE
    base_raw = _read(profile_path(base_name), flag="--gpu")
    flat, prov = _expand(base_raw, str(profile_path(base_name)))
    _check_calibration(raw, where)
    notes = overlay(flat, prov, raw, where)
    flat.setdefault("notes_overlay", []).extend(notes)
    if not any(k in raw for k in MEASURED_KEYS):
        raise ProfileError(f"{where} holds none of the measured constants "
                           f"({', '.join(MEASURED_KEYS[:4])}, ...)", flag="--gpu",
                           hint="write it with 'adp calibrate --out FILE'")
    return flat, prov, f"{where} over the {base_name} profile", base_name


def _read(path: Path, flag: str) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ProfileError(f"profile or calibration file {path} does not exist", flag=flag,
                           hint=f"use --gpu {'|'.join(PROFILE_NAMES)}, or write one with "
                           "'adp calibrate --out FILE'") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ProfileError(f"cannot read {path}: {err}", flag=flag) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ProfileError(f"{path} is not valid JSON: {err}", flag=flag) from None


def _check_calibration(raw: dict, where: str) -> None:
    for key in MEASURED_NUMBERS:
        if key in raw and not (_number(raw[key]) and raw[key] > 0):
            raise ProfileError(f"{where}: {key} must be a positive number, got {raw[key]!r}",
                               flag="--gpu", hint="re-run 'adp calibrate --out FILE'")


def _expand(raw: Any, where: str) -> tuple[dict, dict]:
    """A schema-2 profile's constants as flat values and provenance, its ``measured`` block laid
    over them, the collective tables filled to 8 ranks by the latency law."""
    if not isinstance(raw, dict) or not isinstance(raw.get("constants"), dict):
        raise ProfileError(f"{where} is not a profile (no 'constants' object)", flag="--gpu")
    flat: dict[str, Any] = {k: raw[k] for k in ("gpu", "name", "date") if k in raw}
    prov: dict[str, dict] = {}
    for key, entry in raw["constants"].items():
        if not isinstance(entry, dict) or "value" not in entry or "source" not in entry:
            raise ProfileError(f"{where}: constant {key} must be {{\"value\": ..., \"source\": "
                               f"..., \"from\": ...}}, got {entry!r}", flag="--gpu",
                               hint="every constant of a profile says where it comes from")
        if entry["source"] not in SOURCES:
            raise ProfileError(f"{where}: constant {key} has source {entry['source']!r}; one "
                               f"of {', '.join(SOURCES)}", flag="--gpu")
        if not entry.get("from"):
            raise ProfileError(f"{where}: constant {key} does not say where it comes from "
                               "('from' is empty)", flag="--gpu",
                               hint="add the datasheet figure and its derating, or the "
                               "measurement's date and versions")
        flat[key] = copy.deepcopy(entry["value"])
        prov[key] = {k: v for k, v in entry.items() if k != "value"}
    if raw.get("measured"):
        notes = overlay(flat, prov, raw["measured"], f"{where} (measured block)")
        flat.setdefault("notes_overlay", []).extend(notes)
    fill_collectives(flat, prov)
    flat["source"] = raw.get("summary", raw.get("name", where))
    return flat, prov


def overlay(flat: dict, prov: dict, measured: dict, where: str) -> list[str]:
    """Lay an ``adp calibrate`` output over ``flat``: each constant it measured replaces the
    profile's, with a ``measured`` provenance naming the date and versions. Returns notes."""
    notes: list[str] = []
    stamp = {"source": "measured", "date": measured.get("date"),
             "versions": measured.get("versions"), "gpu": measured.get("gpu"),
             "from": f"adp calibrate ({measured.get('source', 'calibration')}), {where}"}
    for key in MEASURED_NUMBERS:
        if _number(measured.get(key)) and measured[key] > 0:
            flat[key], prov[key] = measured[key], dict(stamp)
    for key, dtype_bytes in (("gemm_tflops", 2), ("gemm_tflops_fp8", 1)):
        points = measured.get(key)
        if not isinstance(points, dict):
            continue
        kept = {}
        for tokens, rate in points.items():
            if not (_intkey(tokens) and _number(rate) and rate > 0):
                continue
            if _compute_bound(int(tokens), rate, dtype_bytes, flat):
                kept[str(int(tokens))] = rate
            else:
                notes.append(f"{key}[{tokens}] = {rate:g} TFLOP/s is memory-bound (the weight "
                             "read), not a compute rate: the profile's figure is kept")
        if kept:
            merged = dict(flat.get(key) or {})
            merged.update(kept)
            flat[key] = merged
            prov[key] = {**stamp, "points": sorted(kept, key=int)}
    shapes = measured.get("gemm_shapes")
    if isinstance(shapes, dict):
        # FP8 only: step_overhead_us was fitted on bf16 decode rows with every GEMM at copy
        # bandwidth, so it already holds what bf16 GEMMs lose at decode sizes; the bf16 table on
        # top counted that twice (one H100: Qwen3-8B bf16 64 x 512, 8.78 ms against 7.89)
        if shapes.get("bf16"):
            notes.append("gemm_shapes: the bf16 shard-shape rates are not used (the fitted "
                         "step_overhead_us already holds what bf16 GEMMs lose at decode sizes); "
                         "the FP8 ones are")
        if shapes.get("fp8"):
            flat["gemm_shapes"] = {"fp8": shapes["fp8"]}
            prov["gemm_shapes"] = dict(stamp)
    if isinstance(measured.get("lockstep_agree_us"), dict) and measured["lockstep_agree_us"]:
        merged = dict(flat.get("lockstep_agree_us") or {})
        merged.update(measured["lockstep_agree_us"])
        flat["lockstep_agree_us"], prov["lockstep_agree_us"] = merged, dict(stamp)
    for op in OPS:
        table = measured.get(op)
        if isinstance(table, dict) and table:
            sizes = {str(int(g)): {"latency_us": e["latency_us"],
                                   "bus_bandwidth_gbps": e["bus_bandwidth_gbps"]}
                     for g, e in table.items() if _intkey(g) and isinstance(e, dict)
                     and _number(e.get("latency_us")) and _number(e.get("bus_bandwidth_gbps"))}
            flat[op] = sizes
            prov[op] = {**stamp, "measured_sizes": sorted(sizes, key=int)}
    return notes


def _compute_bound(tokens: int, rate: float, dtype_bytes: int, flat: dict) -> bool:
    hidden = GEMM_REF_HIDDEN
    weight = hidden * 4 * hidden * dtype_bytes
    seconds = 2 * tokens * hidden * 4 * hidden / (rate * 1e12)
    copy_bw = flat.get("copy_bandwidth_gbps")
    if not _number(copy_bw):
        return True
    floor = weight / (copy_bw * 1e9) + flat.get("gemm_fixed_us", 0.0) * 1e-6
    return seconds > COMPUTE_BOUND_MARGIN * floor


def fill_collectives(flat: dict, prov: dict, up_to: int = 8) -> None:
    """Fill group sizes 2..``up_to`` that were not measured with the latency law:
    latency(g) = latency(m) + hop_us * (steps(g) - steps(m)), m the largest measured size
    below g (ring steps: all-reduce 2(g-1), all-gather / reduce-scatter g-1); the bus bandwidth
    of m (in the ring model a group's bus bandwidth does not depend on its size)."""
    law = flat.get("collective_law")
    if not isinstance(law, dict):
        return
    hop = float(law.get("hop_us", 0.0))
    for op in OPS:
        table = {int(g): dict(e) for g, e in (flat.get(op) or {}).items()}
        if not table:
            continue
        measured = sorted(table)
        filled = []
        for g in range(2, up_to + 1):
            if g in table:
                continue
            below = [m for m in measured if m < g] or [measured[0]]
            m = below[-1]
            table[g] = {"latency_us": round(table[m]["latency_us"] + hop * (
                RING_STEPS[op](g) - RING_STEPS[op](m)), 3),
                "bus_bandwidth_gbps": table[m]["bus_bandwidth_gbps"], "law_from": m}
            filled.append(g)
        flat[op] = {str(g): table[g] for g in sorted(table)}
        if filled:
            entry = dict(prov.get(op, {}))
            entry["law_sizes"] = filled
            entry["law"] = (f"sizes {filled[0]}-{filled[-1]}: latency of the measured size m "
                            f"+ {hop:g} us per extra ring step (all-reduce 2(g-1) steps, "
                            "all-gather / reduce-scatter g-1), bus bandwidth of m")
            prov[op] = entry


def latency_range(flat: dict, op: str, group: int) -> tuple[float, float]:
    """(low, high) multipliers of the nominal latency of ``op`` over ``group`` ranks: measured
    sizes span [graph_fraction, 1] (timed eagerly, so a CUDA graph pays less); law-filled sizes
    also take the hop's range."""
    law = flat.get("collective_law") or {}
    low_factor = float(law.get("graph_fraction", 1.0))
    entry = (flat.get(op) or {}).get(str(group))
    if not entry:
        return 1.0, 1.0
    nominal = entry["latency_us"]
    if "law_from" not in entry or nominal <= 0:
        return low_factor, 1.0
    base = flat[op][str(entry["law_from"])]["latency_us"]
    steps = RING_STEPS[op](group) - RING_STEPS[op](int(entry["law_from"]))
    lo_hop, hi_hop = law.get("hop_us_range", [law.get("hop_us", 0.0)] * 2)
    return (low_factor * (base + lo_hop * steps) / nominal, (base + hi_hop * steps) / nominal)


def provenance_lines(prov: dict) -> list[str]:
    """One line per constant: key, source, where from."""
    lines = []
    for key in sorted(prov):
        entry = prov[key]
        where = entry.get("from", "")
        if entry.get("date"):
            where += f" ({entry['date']})"
        lines.append(f"{key}: {entry.get('source')}: {where}")
    return lines


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _intkey(key: Any) -> bool:
    try:
        return int(key) >= 1
    except (TypeError, ValueError):
        return False


def fold(profile: str, calibration: Path, out: Path) -> Path:
    """Write ``profile`` with ``calibration`` as its ``measured`` block to ``out`` (how a GPU
    run's measurement becomes the packaged profile: copy ``out`` over adp_pass/data/)."""
    raw = _read(profile_path(profile), flag="--gpu")
    measured = _read(calibration, flag="--calibration")
    _check_calibration(measured, str(calibration))
    raw["measured"] = measured
    raw["summary"] = (raw.get("summary", "") + f"; measured by adp calibrate on "
                      f"{measured.get('gpu')} ({measured.get('date')})").lstrip("; ")
    out.write_text(json.dumps(raw, indent=1) + "\n")
    return out


if __name__ == "__main__":  # python -m adp_pass.profiles fold h100 CAL.json OUT.json
    import sys

    if len(sys.argv) == 5 and sys.argv[1] == "fold":
        print(fold(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])))
    else:
        print("usage: python -m adp_pass.profiles fold PROFILE CALIBRATION.json OUT.json",
              file=sys.stderr)
        sys.exit(2)
