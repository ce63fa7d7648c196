"""A first-order roofline model of one decode step per rank, and the mapping it picks.

For a Qwen3 dense model, a mapping, a load (requests per GPU, prompt and generated lengths) and
the dtypes (weights bf16 or fp8 block-scaled, KV cache bf16 or fp8, activations bf16),
``predict`` estimates one decode step on one rank as the sum of named terms (``TERMS``):

* ``weights_ms``: the bytes of every linear a step reads (fp8: 1 byte a weight plus one fp32
  scale per 128 x 128 tile; embedding, LM head and norms bf16) / copy bandwidth.
* ``gemm_ms``: per linear, how much longer its GEMM takes at the reference shape's rate for its
  tokens and dtype than reading its weights (0 when memory-bound).
* ``gemm_shape_ms``: what the linear's own shape adds: a measured rate of that shard shape, else
  the wave-quantisation law (``wave_utilisation``): a TP-8 shard is a narrow GEMM.
* ``kv_ms``: KV-cache bytes at the mean context / attention bandwidth (an FP8 cache: the FP8
  kernel's measured rate, ``attention_fp8_bandwidth_gbps``, where the profile has it).
* ``collectives_ms``: per collective, latency(op, group size) + NCCL's ring factor x bytes / bus
  bandwidth; latencies of unmeasured group sizes come from the ring law (``profiles``), each with
  a low / high range that gives ``step_ms_range``.
* ``sampling_ms``: every row the rank samples reads its logits (TP: all N x b rows).
* ``launch_ms``: each GEMM's ramp (``gemm_fixed_us``) and the small kernels.
* ``host_ms``: the host's work per step and request (a lockstep group's: every request of the
  group, and its per-step agreement, a host all-reduce). Decoding one step ahead (a rank alone,
  and a lockstep group since the runtime runs it ahead: ``lockstep_in_step`` false) the GPU
  waits only where that work is slower than the GPU's step; in step with the host
  (``lockstep_in_step`` true, the runtime before issue 28) a lockstep group's host work adds.
* ``agree_ms``: the agreement where it adds (a lockstep group in step with the host).
* ``overhead_ms``: ``step_overhead_us``, the one fitted constant.

Which collectives a mapping keeps or inserts, its weights per rank and its lockstep group come
from the rewrite's own rules (``adp_pass.mapping``, torch-free). Every constant comes from a
hardware profile (``adp_pass.profiles``: ``adp_pass/data/<gpu>.json``, each constant with its
source) or an ``adp calibrate`` output laid over one. docs/cost_model.md has the formulas, the
assumptions and what the model ignores.

Nothing here imports torch: ``adp plan`` answers in well under a second.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from adp_pass.errors import AdpError, UsageError
from adp_pass.mapping import Mapping, role_parts, site_action

BLOCK_SIZE = 16  # the runtime's KV-cache block (tokens); a sequence takes whole blocks
DEFAULT_CALIBRATION = "h200.json"
GB = 1e9
GIB = 2**30
OPS = ("allreduce", "allgather", "reducescatter")
_FACTOR = {"allreduce": lambda g: 2 * (g - 1) / g,
           "allgather": lambda g: (g - 1) / g,
           "reducescatter": lambda g: (g - 1) / g}
_OP_WORDS = {"allreduce": "all-reduce", "allgather": "all-gather",
             "reducescatter": "reduce-scatter"}
# Keys a calibration must hold (numbers > 0 unless noted), with what each means.
REQUIRED_KEYS = {
    "copy_bandwidth_gbps": "device-to-device copy, bytes read + written per second / 1e9",
    "gemm_tflops": "bf16 GEMM rate at decode shapes, by token count",
    "attention_bandwidth_gbps": "decode attention, bytes of K and V read per second / 1e9",
    "kernel_launch_us": "time of one small kernel inside a CUDA graph (>= 0)",
    "kernels_per_layer": "small kernels one decoder layer launches per step besides its GEMMs",
    "step_overhead_us": "fixed GPU-side work per decode step (>= 0)",
    "device_memory_gib": "memory of one device",
    "memory_reserve_gib": "memory kept for the CUDA context, activations, graphs (>= 0)",
    "allreduce": "latency_us and bus_bandwidth_gbps by group size",
    "allgather": "latency_us and bus_bandwidth_gbps by group size",
    "reducescatter": "latency_us and bus_bandwidth_gbps by group size",
}

# Optional constants of a profile (adp_pass/profiles.py): a calibration without them leaves
# their term out (0), except FP8, which then needs peak_tflops.
OPTIONAL_NUMBERS = ("gemm_fixed_us", "host_step_us", "host_per_request_us",
                    "sampling_bandwidth_gbps", "sm_count", "fp8_gemm_efficiency",
                    "attention_fp8_bandwidth_gbps")
_ZERO_OK = {"memory_reserve_gib", "step_overhead_us", "kernel_launch_us", "gemm_fixed_us",
            "host_step_us", "host_per_request_us"}  # may be 0
GEMM_REF_HIDDEN = 4096  # adp calibrate's reference GEMM: [T x 4096] @ [4096 x 16384]


class CalibrationError(UsageError):
    """A calibration file that is missing, unreadable or lacks a constant."""

    default_hint = "write one with 'adp calibrate --out FILE', or drop --calibration"


class NothingFits(AdpError):
    """No mapping of the GPU count holds the weights and the batch's KV cache (exit 1)."""


# ----------------------------------------------------------------------------- the model's shape
@dataclass(frozen=True)
class ModelShape:
    """What the model needs of a Qwen3 config: from a ``Qwen3Config``, a preset's
    ``Qwen3Shape`` or a ``config.json`` dict."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: Any) -> "ModelShape":
        if isinstance(config, ModelShape):
            return config

        def get(key, default=None):
            if isinstance(config, dict):
                return config.get(key, default)
            return getattr(config, key, default)

        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(
            hidden=hidden,
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads")),
            intermediate=int(get("intermediate_size")),
            head_dim=int(get("head_dim") or hidden // heads),
            vocab=int(get("vocab_size")),
            tied=bool(get("tie_word_embeddings", False)),
        )

    def role_params(self) -> dict[str, int]:
        """Parameters by role: the roles detect shards ("attention", "mlp", "vocab") and the
        norms every rank keeps whole ("replicated")."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h  # q, k, v, o
        mlp = 3 * h * self.intermediate  # gate, up, down
        norms = 2 * h + 2 * self.head_dim  # input / post-attention norms, q_norm, k_norm
        vocab = self.vocab * h * (1 if self.tied else 2)  # embedding (+ LM head)
        return {"attention": self.layers * attention, "mlp": self.layers * mlp,
                "vocab": vocab, "replicated": self.layers * norms + h}

    @property
    def total_params(self) -> int:
        return sum(self.role_params().values())

    def kv_bytes_per_token(self, kv_heads: int, dtype_bytes: int) -> int:
        """K and V of one token in every layer for ``kv_heads`` heads."""
        return self.layers * 2 * kv_heads * self.head_dim * dtype_bytes


# ----------------------------------------------------------------------------- calibration
class Calibration:
    """The machine's constants (a profile or calibration, flat), with the lookups the model
    needs. ``provenance`` says where each constant comes from (``adp_pass.profiles``)."""

    def __init__(self, data: dict, where: str = "calibration",
                 provenance: dict | None = None) -> None:
        self.data, self.where = data, where
        self.provenance = provenance or {}
        self._check()

    def _check(self) -> None:
        data, where = self.data, self.where
        if not isinstance(data, dict):
            raise CalibrationError(f"{where} must hold a JSON object", flag="--calibration")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise CalibrationError(f"{where} lacks {', '.join(missing)} "
                                   f"({REQUIRED_KEYS[missing[0]]})", flag="--calibration")
        for key in (*REQUIRED_KEYS, *OPTIONAL_NUMBERS):
            if key in ("gemm_tflops", *OPS) or key not in data:
                continue
            zero_ok = key in _ZERO_OK
            if not _number(data[key]) or data[key] < 0 or (data[key] == 0 and not zero_ok):
                sign = "non-negative" if zero_ok else "positive"
                raise CalibrationError(f"{where}: {key} must be a {sign} number, got "
                                       f"{data[key]!r}", flag="--calibration")
        for key in ("gemm_tflops", "gemm_tflops_fp8", "lockstep_agree_us"):
            if key not in data:
                continue
            table = data[key]
            if (not isinstance(table, dict) or not table
                    or not all(_intkey(k) and _number(v) and v > 0 for k, v in table.items())):
                raise CalibrationError(f"{where}: {key} must map token counts (or group sizes) "
                                       f"to positive numbers, e.g. {{\"64\": 235}}, got "
                                       f"{table!r}", flag="--calibration")
        peaks = data.get("peak_tflops")
        if peaks is not None and not (isinstance(peaks, dict) and all(
                _number(v) and v > 0 for v in peaks.values())):
            raise CalibrationError(f"{where}: peak_tflops must map dtypes to positive TFLOP/s, "
                                   f"e.g. {{\"bf16\": 989, \"fp8\": 1979}}, got {peaks!r}",
                                   flag="--calibration")
        for op in OPS:
            table = data[op]
            if not isinstance(table, dict):
                raise CalibrationError(f"{where}: {op} must map group sizes to "
                                       "{latency_us, bus_bandwidth_gbps}", flag="--calibration")
            for size, entry in table.items():
                ok = (_intkey(size) and int(size) >= 2 and isinstance(entry, dict)
                      and _number(entry.get("latency_us")) and entry["latency_us"] >= 0
                      and _number(entry.get("bus_bandwidth_gbps"))
                      and entry["bus_bandwidth_gbps"] > 0)
                if not ok:
                    raise CalibrationError(
                        f"{where}: {op}[{size!r}] must be {{\"latency_us\": >= 0, "
                        f"\"bus_bandwidth_gbps\": > 0}} for a group size >= 2, got {entry!r}",
                        flag="--calibration")

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def name(self) -> str:
        return str(self.data.get("gpu", "unknown device"))

    @property
    def source(self) -> str:
        return str(self.data.get("source", "measured"))

    @property
    def notes(self) -> list[str]:
        return list(self.data.get("notes_overlay", []))

    def _curve(self, key: str, tokens: int) -> float:
        """A rate measured at a few token counts, interpolated linearly in log(tokens); below
        the smallest point it falls in proportion (memory-bound: the same time), above the
        largest it stays."""
        points = sorted((int(k), float(v)) for k, v in self.data[key].items())
        tokens = max(1, tokens)
        if tokens <= points[0][0]:
            return points[0][1] * tokens / points[0][0]
        if tokens >= points[-1][0]:
            return points[-1][1]
        for (t0, r0), (t1, r1) in zip(points, points[1:]):
            if t0 <= tokens <= t1:
                w = (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0))
                return r0 + w * (r1 - r0)
        raise AssertionError("unreachable")

    def gemm_tflops(self, tokens: int, dtype: str = "bf16") -> float:
        """GEMM rate of the reference shape for ``tokens`` rows in ``dtype``. FP8: the measured
        ``gemm_tflops_fp8`` curve, else the bf16 curve x (fp8 peak / bf16 peak) x
        ``fp8_gemm_efficiency`` (block scaling's cost)."""
        if dtype != "fp8":
            return self._curve("gemm_tflops", tokens)
        if "gemm_tflops_fp8" in self.data:
            return self._curve("gemm_tflops_fp8", tokens)
        peaks = self.data.get("peak_tflops") or {}
        if not peaks.get("fp8") or not peaks.get("bf16"):
            raise CalibrationError(
                f"{self.where} has no FP8 GEMM rate (neither gemm_tflops_fp8 nor peak_tflops "
                "for bf16 and fp8)", flag="--weights",
                hint="use --weights bf16, or a profile with FP8 figures: --gpu h20|h100|h200|b200")
        return (self._curve("gemm_tflops", tokens) * peaks["fp8"] / peaks["bf16"]
                * float(self.data.get("fp8_gemm_efficiency", 1.0)))

    def shape_rate(self, tokens: int, n: int, k: int, dtype: str) -> tuple[float, str]:
        """(TFLOP/s, how) for a [tokens x k] @ [k x n] GEMM: the measured rate of this exact
        shard shape when ``gemm_shapes`` has it, else the reference curve x the shape's wave
        utilisation over the reference shape's (``wave_utilisation``)."""
        shapes = (self.data.get("gemm_shapes") or {}).get(dtype) or {}
        measured = shapes.get(f"{n}x{k}")
        if isinstance(measured, dict) and measured:
            points = sorted((int(t), float(r)) for t, r in measured.items())
            return _interp(points, tokens), "measured shape"
        base = self.gemm_tflops(tokens, dtype)
        sms = self.data.get("sm_count")
        if not sms:
            return base, "reference shape"
        ratio = (wave_utilisation(tokens, n, k, int(sms))
                 / wave_utilisation(tokens, 4 * GEMM_REF_HIDDEN, GEMM_REF_HIDDEN, int(sms)))
        return base * min(1.0, ratio), "wave law"

    def collective(self, op: str, group: int) -> tuple[float, float, str | None]:
        """(latency s, bus bandwidth bytes/s, note) for ``op`` over ``group`` ranks. A group
        size that was not measured takes the nearest measured one (the larger on a tie) and a
        note saying so (profiles fill 3..8 by the latency law first)."""
        table = {int(k): v for k, v in self.data[op].items()}
        if not table:
            raise CalibrationError(f"{self.where}: {op} has no group sizes; the mapping needs "
                                   f"one over {group} ranks", flag="--calibration",
                                   hint="calibrate on 2 or more GPUs: adp calibrate --gpus N")
        size = group if group in table else min(table, key=lambda s: (abs(s - group), -s))
        entry = table[size]
        note = None if size == group else (
            f"{_OP_WORDS[op]} over {group} ranks uses the calibration's figures for {size}")
        return entry["latency_us"] * 1e-6, entry["bus_bandwidth_gbps"] * GB, note

    def value_range(self, key: str) -> tuple[float, float]:
        """(low, high) of a constant: the span its provenance states (``range``), stretched to
        hold the value itself; the value at both ends where none is stated (a calibration
        file's own measurements)."""
        value = float(self.data.get(key, 0.0))
        span = (self.provenance.get(key) or {}).get("range")
        if not span:
            return value, value
        return min(float(span[0]), value), max(float(span[1]), value)

    def latency_range(self, op: str, group: int) -> tuple[float, float]:
        """(low, high) multipliers of the nominal latency (``profiles.latency_range``)."""
        from adp_pass.profiles import latency_range

        return latency_range(self.data, op, group)

    def agree_us(self, group: int) -> float:
        """Host agreement of a lockstep group per step: measured for ``group``, else gloo's ring
        law from the nearest measured size: latency(g) = latency(m) x (g - 1) / (m - 1)."""
        table = {int(k): float(v) for k, v in (self.data.get("lockstep_agree_us") or {}).items()}
        if group < 2 or not table:
            return 0.0
        if group in table:
            return table[group]
        m = min(table, key=lambda s: (abs(s - group), -s))
        return table[m] * (group - 1) / max(1, m - 1)


def wave_utilisation(tokens: int, n: int, k: int, sms: int) -> float:
    """Share of the SMs' tile slots a GEMM's output tiles fill (wave quantisation), with
    split-K up to K/512 ways where it fills more: tiles of 64 (tokens <= 64) or 128 rows x 128
    columns, ``sms`` tiles per wave."""
    tm = 64 if tokens <= 64 else 128
    tiles = math.ceil(tokens / tm) * math.ceil(n / 128)
    best = 0.0
    for split in range(1, max(1, min(16, k // 512)) + 1):
        work = tiles * split
        best = max(best, work / (math.ceil(work / sms) * sms))
    return best


def _interp(points: list[tuple[int, float]], tokens: int) -> float:
    tokens = max(1, tokens)
    if tokens <= points[0][0]:
        return points[0][1] * tokens / points[0][0]
    if tokens >= points[-1][0]:
        return points[-1][1]
    for (t0, r0), (t1, r1) in zip(points, points[1:]):
        if t0 <= tokens <= t1:
            w = (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return r0 + w * (r1 - r0)
    return points[-1][1]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _intkey(key: Any) -> bool:
    try:
        return int(key) >= 1
    except (TypeError, ValueError):
        return False


def default_calibration_path() -> Path:
    return Path(str(resources.files("adp_pass") / "data" / DEFAULT_CALIBRATION))


def load_calibration(source: "str | Path | dict | Calibration | None" = None) -> Calibration:
    """A Calibration from a profile name (h20, h100, h200, b200), a profile file, an
    ``adp calibrate`` output (laid over the profile of its GPU), a dict (taken as it is), or
    None: the profile of this machine's GPU (``ADP_GPU`` overrides), else H200."""
    if isinstance(source, Calibration):
        return source
    if isinstance(source, dict):
        return Calibration(source)
    from adp_pass.profiles import load_profile_data

    try:
        flat, provenance, where, _ = load_profile_data(source)
    except CalibrationError:
        raise
    except UsageError as err:  # a ProfileError: the same class of problem, the same exit code
        raise CalibrationError(str(err), flag=err.flag, hint=err.hint) from None
    return Calibration(flat, where, provenance)


# ----------------------------------------------------------------------------- mappings
def short_name(mapping: Mapping) -> str:
    """The shortest mapping string that parses back to ``mapping``."""
    if not mapping.enable_attention_dp:
        return f"tp={mapping.tp_size}"
    text = f"tp={mapping.tp_size},attn_dp=1"
    if mapping.attn_tp_size > 1:
        text += f",attn_tp={mapping.attn_tp_size}"
    if mapping.mlp_tp_size > 1:
        text += f",mlp_tp={mapping.mlp_tp_size}"
    return text


def describe(mapping: Mapping) -> str:
    """What the mapping does, in a few words."""
    n, a, m = mapping.tp_size, mapping.attn_tp_size, mapping.mlp_tp_size
    if n == 1:
        return "one GPU alone: no collectives"
    if not mapping.enable_attention_dp:
        return f"TP: 2 all-reduces per layer over {n}"
    if a == 1 and m == 1:
        return "replicated: no collectives"
    if a == 1:
        return f"MLP TP over {m}: all-gather + reduce-scatter per layer over {m}"
    groups = f"{n // a} DP group{'s' * (n // a != 1)}"
    if m == a:
        return f"attention + MLP TP over {a} ({groups}): 2 all-reduces per layer over {a}"
    if m == 1:
        return f"attention TP over {a} ({groups}), replicated MLP: 1 all-reduce per layer"
    return (f"attention TP over {a} ({groups}), MLP TP over {m}: 1 all-reduce + "
            f"all-gather + reduce-scatter per layer")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def working_gpu_counts(shape: ModelShape, limit: int = 64) -> list[int]:
    """GPU counts (tp) that divide the model's heads, kv heads and intermediate size."""
    common = math.gcd(shape.heads, shape.kv_heads, shape.intermediate)
    return [d for d in _divisors(common) if d <= limit]


def valid_mappings(config: Any, gpus: int) -> list[Mapping]:
    """Every mapping of ``gpus`` ranks (all tp=gpus) the rewrite accepts for this model, then
    tp=1 (one GPU, the reference). Raises a MappingError naming the GPU counts that work when
    ``gpus`` does not divide the model's heads or columns."""
    shape = ModelShape.of(config)
    if not isinstance(gpus, int) or gpus < 1:
        raise UsageError(f"the GPU count must be an integer >= 1, got {gpus!r}", flag="--gpus")
    for what, count in (("attention heads", shape.heads), ("kv heads", shape.kv_heads),
                        ("intermediate size", shape.intermediate)):
        if count % gpus:
            works = ", ".join(map(str, working_gpu_counts(shape)))
            raise UsageError(
                f"{gpus} GPUs cannot share this model: every mapping has tp={gpus}, which must "
                f"divide the model's {what} ({count})", flag="--gpus",
                hint=f"use a GPU count that divides its heads ({shape.heads}), kv heads "
                f"({shape.kv_heads}) and intermediate size ({shape.intermediate}): {works}")
    reference = Mapping(tp_size=1)
    if gpus == 1:
        return [reference]
    mappings = [Mapping(tp_size=gpus)]
    for attn in _divisors(gpus):
        for mlp in _divisors(gpus):
            mappings.append(Mapping(tp_size=gpus, enable_attention_dp=True, attn_tp_size=attn,
                                    mlp_tp_size=mlp))
    return mappings + [reference]


# ----------------------------------------------------------------------------- prediction
@dataclass(frozen=True)
class CollectiveCost:
    """One kind of collective in a step: ``count`` of them, each of ``nbytes`` (all-reduce: the
    buffer; all-gather: the gathered output; reduce-scatter: the input) over ``group`` ranks;
    ``latency_ms`` + ``transfer_ms`` = ``ms_each``; ``latency_range`` the low / high multipliers
    of the latency (profiles.latency_range)."""

    site: str
    op: str
    group: int
    nbytes: int
    count: int
    ms_each: float
    latency_ms: float = 0.0
    transfer_ms: float = 0.0
    latency_range: tuple[float, float] = (1.0, 1.0)

    @property
    def ms(self) -> float:
        return self.count * self.ms_each


@dataclass(frozen=True)
class GemmCost:
    """One linear of a layer (or the LM head) on one rank: [tokens x k] @ [k x n] in ``dtype``,
    ``count`` times a step. ``read_ms`` its weight read, ``compute_ms`` at the reference
    shape's rate, ``shape_ms`` what its own shape adds (``rate_how``), ``fixed_ms`` its ramp."""

    name: str
    role: str
    tokens: int
    n: int
    k: int
    dtype: str
    count: int
    weight_bytes: int
    read_ms: float
    compute_ms: float
    shaped_ms: float
    fixed_ms: float
    rate_how: str


@dataclass
class Prediction:
    """One decode step on one rank under one mapping (times in ms, sizes in bytes)."""

    mapping: Mapping
    name: str
    description: str
    step_ms: float
    tok_s_per_gpu: float
    weights_bytes_per_gpu: int  # held
    weights_read_bytes_per_gpu: int  # read each step: all but the embedding table's unused rows
    kv_bytes_per_gpu: int  # KV the batch holds at the mean context (what a step reads)
    kv_peak_bytes_per_gpu: int  # ... at the full context prompt + new_tokens (what must fit)
    memory_bytes_per_gpu: int  # weights + peak KV
    usable_bytes_per_gpu: int  # device memory - reserve
    kv_capacity_seqs: int  # sequences of prompt + new_tokens that fit, per DP group
    seqs_per_group: int  # sequences the DP group serves
    fits: bool
    reason: str  # why it does not fit ("" when it fits)
    breakdown: dict[str, float]
    tokens: dict[str, int]  # tokens per GEMM by role on this rank
    collectives: list[CollectiveCost] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gemms: list[GemmCost] = field(default_factory=list)
    # the step with the collective latencies and the host's work per request at the low / high
    # ends of their stated ranges
    step_ms_range: tuple[float, float] = (0.0, 0.0)
    dtypes: dict[str, str] = field(default_factory=dict)
    in_step: bool = False  # the host's work and the agreement add to the step (lockstep)

    @property
    def reference(self) -> bool:
        """tp=1: one GPU alone, listed for comparison; never the pick for several GPUs."""
        return self.mapping.tp_size == 1

    @property
    def collective_ms(self) -> float:
        return self.breakdown["collectives_ms"]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["mapping"] = self.name
        out["reference"] = self.reference
        out["collectives"] = [{**asdict(c), "ms": c.ms} for c in self.collectives]
        out["tok_s_per_gpu_range"] = [self.tokens_per_s(self.step_ms_range[1]),
                                      self.tokens_per_s(self.step_ms_range[0])]
        return out

    def tokens_per_s(self, step_ms: float) -> float:
        return self.tok_s_per_gpu * self.step_ms / step_ms if step_ms else 0.0


# The terms of a step, in the table's order: (breakdown key, column, meaning).
TERMS = (
    ("weights_ms", "w", "weights read at copy bandwidth"),
    ("gemm_ms", "gemm", "GEMM time beyond the weight read, at the reference shape's rate"),
    ("gemm_shape_ms", "shape", "what the shard shapes add (narrow GEMMs fill fewer SMs)"),
    ("kv_ms", "kv", "KV cache read at attention bandwidth"),
    ("collectives_ms", "coll", "collectives: latency (by group size) + bytes / bus bandwidth"),
    ("sampling_ms", "samp", "sampling: every row's logits read once"),
    ("launch_ms", "launch", "each GEMM's ramp (gemm_fixed_us) + the small kernels"),
    ("host_ms", "host", "host work per step and request, where the GPU waits for it"),
    ("agree_ms", "sync", "lockstep agreement on each step's shapes (host all-reduce)"),
    ("overhead_ms", "ovh", "fixed per-step overhead (step_overhead_us)"),
)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
FP8_BLOCK = 128  # adp_pass.fp8.WEIGHT_BLOCK: one fp32 scale per 128 x 128 weight tile


def _linear_bytes(n: int, k: int, dtype: str) -> int:
    """A [n, k] weight in ``dtype``; fp8 block-scaled carries one fp32 scale per tile."""
    size = n * k * DTYPE_BYTES[dtype]
    if dtype == "fp8":
        size += 4 * math.ceil(n / FP8_BLOCK) * math.ceil(k / FP8_BLOCK)
    return size


def _fp8_problem(shape: "ModelShape", gpus: int) -> str | None:
    """Why a TP split over ``gpus`` ranks cuts through FP8's 128 x 128 scale blocks, or None."""
    kv_split = min(gpus, shape.kv_heads)
    for what, width, parts in (("hidden size", shape.hidden, 1),
                               ("query width (heads x head_dim)", shape.heads * shape.head_dim,
                                gpus),
                               ("key/value width (kv heads x head_dim)",
                                shape.kv_heads * shape.head_dim, kv_split),
                               ("intermediate size", shape.intermediate, gpus)):
        # An unsplit width may end in a partial tile (the format stores ceil(width / 128)
        # scales, as fp8-tiny's hidden 192 does); a split must fall on tile edges.
        if parts > 1 and (width % parts or (width // parts) % FP8_BLOCK):
            split = f" split {parts} ways is {width // parts} per rank," if parts > 1 else ""
            return f"{what} {width}{split} not a multiple of"
    return None


def check_fp8(config: Any, gpus: int, model: str = "the model") -> None:
    """Raise a UsageError when the model, or a TP shard of ``gpus`` ranks (the finest split any
    mapping of ``gpus`` uses), cuts through the 128 x 128 scale blocks of block-scaled FP8."""
    shape = ModelShape.of(config)
    problem = _fp8_problem(shape, gpus)
    if problem is None:
        return
    good = [g for g in working_gpu_counts(shape) if _fp8_problem(shape, g) is None]
    raise UsageError(
        f"--weights fp8: {model}'s {problem} the {FP8_BLOCK}-wide scale blocks of block-scaled "
        "FP8", flag="--weights",
        hint="use --weights bf16" + (f", or --gpus {', '.join(map(str, good))}" if good
                                     else " (this model's shapes cannot be FP8 block-scaled)"))


def predict(config: Any, mapping: "Mapping | str", *, batch_per_gpu: int, prompt: int,
            new_tokens: int, calibration: "Calibration | dict | str | Path | None" = None,
            dtype_bytes: int | None = None, gpu_memory_bytes: int | None = None,
            weights: str = "bf16", kv_cache: str = "bf16") -> Prediction:
    """Predict one decode step on one rank of ``mapping`` (see the module docstring).

    ``batch_per_gpu`` is requests per GPU: the TP group serves tp x batch requests, a DP group
    of attn_tp ranks attn_tp x batch, a replicated rank batch. ``weights`` (bf16 or fp8
    block-scaled: linears only; embedding, LM head and norms stay bf16 as the FP8 releases
    ship them) and ``kv_cache`` (bf16, fp8) are counted at their own sizes; activations and
    collectives are bf16. ``dtype_bytes`` (4: fp32 everything) is the older single-dtype form.
    ``gpu_memory_bytes`` defaults to the calibration's device memory.
    """
    shape = ModelShape.of(config)
    mapping = Mapping.load(mapping)
    cal = load_calibration(calibration)
    for name, value, low in (("batch_per_gpu", batch_per_gpu, 1), ("prompt", prompt, 1),
                             ("new_tokens", new_tokens, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}",
                             flag="--" + name.replace("_", "-"))
    act = "bf16"
    if dtype_bytes is not None:
        if dtype_bytes not in (2, 4):
            raise UsageError(f"dtype_bytes must be 2 or 4, got {dtype_bytes!r}", flag="--dtype")
        if dtype_bytes == 4:
            weights = kv_cache = act = "fp32"
    for flag, value, allowed in (("--weights", weights, ("bf16", "fp8", "fp16", "fp32")),
                                 ("--kv-cache", kv_cache, ("bf16", "fp8", "fp16", "fp32"))):
        if value not in allowed:
            raise UsageError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}",
                             flag=flag)
    if weights == "fp8":
        check_fp8(shape, mapping.tp_size)
    lm_dtype = act  # embedding and LM head: bf16 even in FP8 releases
    if gpu_memory_bytes is None:
        gpu_memory_bytes = int(cal["device_memory_gib"] * GIB)
    parts = role_parts(mapping)
    params = shape.role_params()
    n, attn_group = mapping.tp_size, (mapping.attn_tp_size if mapping.enable_attention_dp
                                      else mapping.tp_size)
    notes: list[str] = list(cal.notes)

    # Tokens each rank runs per step: its attention group's requests, one token each.
    seqs = attn_group * batch_per_gpu
    mlp_action, _, mlp_group = site_action("mlp_out", mapping)
    attn_action, _, attn_size = site_action("attention_out", mapping)
    tokens = {"attention": seqs, "mlp": seqs * (mlp_group if mlp_action == "gather_scatter" else 1),
              "vocab": seqs}

    # The linears of one rank: (name, role, n out, k in, dtype, count per step).
    h, hd = shape.hidden, shape.head_dim
    a, m, v = parts["attention"], parts["mlp"], parts["vocab"]
    kv_rank = math.ceil(shape.kv_heads / a)
    linears = [
        ("qkv", "attention", (shape.heads // a + 2 * kv_rank) * hd, h, weights, shape.layers),
        ("o", "attention", h, shape.heads * hd // a, weights, shape.layers),
        ("gate_up", "mlp", 2 * shape.intermediate // m, h, weights, shape.layers),
        ("down", "mlp", h, shape.intermediate // m, weights, shape.layers),
        ("lm_head", "vocab", math.ceil(shape.vocab / v), h, lm_dtype, 1),
    ]
    # Weights: held (footprint) and read per step.
    wbytes = DTYPE_BYTES[weights]
    held = {role: math.ceil(params[role] / parts[role]) * (wbytes if role != "vocab"
                                                           else DTYPE_BYTES[lm_dtype])
            for role in ("attention", "mlp", "vocab")}
    if weights == "fp8":  # the scales of each rank's tiles
        held["attention"] += sum(_linear_bytes(nn, kk, "fp8") - nn * kk
                                 for _, r, nn, kk, _, _ in linears if r == "attention") * shape.layers
        held["mlp"] += sum(_linear_bytes(nn, kk, "fp8") - nn * kk
                           for _, r, nn, kk, _, _ in linears if r == "mlp") * shape.layers
    held["replicated"] = params["replicated"] * DTYPE_BYTES[act]
    weights_bytes = sum(held.values())
    copy_bw = cal["copy_bandwidth_gbps"] * GB
    fixed_s = float(cal.get("gemm_fixed_us", 0.0)) * 1e-6
    gemms: list[GemmCost] = []
    weights_ms = gemm_ms = shape_ms = fixed_ms = 0.0
    read_bytes = held["replicated"]
    for name, role, nn, kk, dtype, count in linears:
        t = tokens[role]
        nbytes = _linear_bytes(nn, kk, dtype)
        read_bytes += nbytes * count
        read_s = nbytes / copy_bw
        flops = 2 * t * nn * kk
        ref_s = flops / (cal.gemm_tflops(t, dtype) * 1e12)
        rate, how = cal.shape_rate(t, nn, kk, dtype)
        own_s = flops / (rate * 1e12)
        gemm = max(0.0, ref_s - read_s)
        shaped = max(0.0, own_s - read_s) - gemm
        weights_ms += read_s * count * 1e3
        gemm_ms += gemm * count * 1e3
        shape_ms += shaped * count * 1e3
        fixed_ms += fixed_s * count * 1e3
        gemms.append(GemmCost(name, role, t, nn, kk, dtype, count, nbytes, read_s * 1e3,
                              gemm * 1e3, shaped * 1e3, fixed_s * 1e3, how))
    weights_ms += held["replicated"] / copy_bw * 1e3

    # KV cache: each rank holds its share of the kv heads of its attention group's sequences.
    per_token = shape.kv_bytes_per_token(kv_rank, DTYPE_BYTES[kv_cache])
    mean_context = prompt + new_tokens / 2
    full_context = math.ceil((prompt + new_tokens) / BLOCK_SIZE) * BLOCK_SIZE
    kv_bytes = int(seqs * mean_context * per_token)
    per_seq = full_context * per_token
    kv_peak = seqs * per_seq
    # An FP8 cache at the FP8 kernel's own measured read rate where the profile has it (it
    # dequantizes every tile: on an H100 it saved a fraction of what half the bytes imply).
    kv_bw = (cal.get("attention_fp8_bandwidth_gbps") if kv_cache == "fp8" else None) \
        or cal["attention_bandwidth_gbps"]
    kv_ms = kv_bytes / (kv_bw * GB) * 1e3

    # Collectives per step (bf16 activations).
    act_bytes = shape.hidden * DTYPE_BYTES[act]  # one token's hidden state
    plan: list[tuple[str, str, int, int, int]] = []  # site, op, group, bytes, count
    if attn_action == "keep" and attn_size > 1:
        plan.append(("attention_out", "allreduce", attn_size, seqs * act_bytes, shape.layers))
    if mlp_action == "keep" and mlp_group > 1:
        plan.append(("mlp_out", "allreduce", mlp_group, seqs * act_bytes, shape.layers))
    elif mlp_action == "gather_scatter":
        gathered = mlp_group * seqs * act_bytes
        plan.append(("mlp_out", "allgather", mlp_group, gathered, shape.layers))
        plan.append(("mlp_out", "reducescatter", mlp_group, gathered, shape.layers))
    if parts["vocab"] > 1:  # TP: vocab-parallel embedding and LM head
        plan.append(("embedding", "allreduce", n, seqs * act_bytes, 1))
        plan.append(("lm_head_gather", "allgather", n,
                     seqs * shape.vocab * DTYPE_BYTES[act], 1))
    collectives = []
    for site, op, group, nbytes, count in plan:
        latency, bus_bw, note = cal.collective(op, group)
        if note and note not in notes:
            notes.append(note)
        transfer = _FACTOR[op](group) * nbytes / bus_bw
        collectives.append(CollectiveCost(site, op, group, nbytes, count,
                                          (latency + transfer) * 1e3, latency * 1e3,
                                          transfer * 1e3, cal.latency_range(op, group)))
    collectives_ms = sum(c.ms for c in collectives)
    coll_low = sum(c.count * (c.latency_ms * c.latency_range[0] + c.transfer_ms)
                   for c in collectives)
    coll_high = sum(c.count * (c.latency_ms * c.latency_range[1] + c.transfer_ms)
                    for c in collectives)

    # Sampling: every rank samples its group's rows over the whole vocabulary.
    sampling_bw = cal.get("sampling_bandwidth_gbps")
    sampling_ms = (seqs * shape.vocab * DTYPE_BYTES[act] / (sampling_bw * GB) * 1e3
                   if sampling_bw else 0.0)
    launch_ms = fixed_ms + shape.layers * cal["kernels_per_layer"] * cal["kernel_launch_us"] / 1e3
    overhead_ms = cal["step_overhead_us"] / 1e3

    # Host: one step ahead (every rank since issue 28; a lockstep group's agreement is host work
    # too), the GPU waits only where the host is the slower; in step with it (lockstep_in_step,
    # the runtime older 2-GPU rows ran), a lockstep group's work and agreement add.
    def host_total(per_request_us: float) -> float:
        return (cal.get("host_step_us", 0.0) + per_request_us * seqs) / 1e3

    host_ms_total = host_total(cal.get("host_per_request_us", 0.0))
    # Host work differs between hosts of one kind (fourfold between two H100 hosts at 256 rows):
    # the range takes the per-request figure at the ends of its stated span.
    host_per_request_span = cal.value_range("host_per_request_us")
    lockstep = mapping.lockstep_size
    agreement_ms = cal.agree_us(lockstep) / 1e3 if lockstep > 1 else 0.0
    in_step = bool(cal.get("lockstep_in_step", False)) and lockstep > 1
    agree_ms = agreement_ms if in_step else 0.0
    gpu_terms = {"weights_ms": weights_ms, "gemm_ms": gemm_ms, "gemm_shape_ms": shape_ms,
                 "kv_ms": kv_ms, "collectives_ms": collectives_ms, "sampling_ms": sampling_ms,
                 "launch_ms": launch_ms}

    def host_term(gpu_ms: float, total: float = host_ms_total) -> float:
        # one step ahead, the agreement is host work like the rest: hidden while it is shorter
        return total if in_step else max(0.0, total + agreement_ms - gpu_ms)

    gpu_ms = sum(gpu_terms.values()) + overhead_ms
    breakdown = {**gpu_terms, "host_ms": host_term(gpu_ms), "agree_ms": agree_ms,
                 "overhead_ms": overhead_ms}
    step_ms = sum(breakdown.values())
    ranged = []
    for coll, per_request_us in zip((coll_low, coll_high), host_per_request_span):
        g = gpu_ms - collectives_ms + coll
        ranged.append(g + host_term(g, host_total(per_request_us)) + agree_ms)

    # Memory.
    usable = gpu_memory_bytes - int(cal["memory_reserve_gib"] * GIB)
    free = usable - weights_bytes
    capacity = max(0, free // per_seq) if free > 0 else 0
    reason = ""
    if free <= 0:
        reason = (f"weights {weights_bytes / GB:.1f} GB/GPU exceed the {max(usable, 0) / GB:.1f} "
                  f"GB usable ({gpu_memory_bytes / GIB:.1f} GiB - "
                  f"{cal['memory_reserve_gib']:g} GiB reserved)")
    elif capacity < seqs:
        reason = (f"KV for {seqs} sequences of {prompt + new_tokens} tokens needs "
                  f"{kv_peak / GB:.1f} GB/GPU; the {free / GB:.1f} GB left after the weights "
                  f"hold {capacity} per {_group_words(mapping)}")
    return Prediction(
        mapping=mapping, name=short_name(mapping), description=describe(mapping),
        step_ms=step_ms, tok_s_per_gpu=batch_per_gpu / step_ms * 1e3,
        weights_bytes_per_gpu=weights_bytes, weights_read_bytes_per_gpu=read_bytes,
        kv_bytes_per_gpu=kv_bytes,
        kv_peak_bytes_per_gpu=kv_peak, memory_bytes_per_gpu=weights_bytes + kv_peak,
        usable_bytes_per_gpu=usable, kv_capacity_seqs=int(capacity), seqs_per_group=seqs,
        fits=not reason, reason=reason, breakdown=breakdown, tokens=tokens,
        collectives=collectives, notes=notes, gemms=gemms,
        step_ms_range=(min(ranged), max(ranged)),
        dtypes={"weights": weights, "kv_cache": kv_cache, "activations": act},
        in_step=in_step,
    )


def rank_mappings(config: Any, gpus: int, *, batch_per_gpu: int, prompt: int, new_tokens: int,
                  calibration: "Calibration | dict | str | Path | None" = None,
                  gpu_memory_bytes: int | None = None,
                  dtype_bytes: int | None = None, weights: str = "bf16",
                  kv_cache: str = "bf16") -> list[tuple[Mapping, Prediction]]:
    """Every valid mapping of ``gpus`` GPUs with its prediction, fastest first (tokens/s per
    GPU), the ones that fit before the ones that do not; tp=1 (one GPU, for reference) last."""
    cal = load_calibration(calibration)
    rows = [(m, predict(config, m, batch_per_gpu=batch_per_gpu, prompt=prompt,
                        new_tokens=new_tokens, calibration=cal, dtype_bytes=dtype_bytes,
                        gpu_memory_bytes=gpu_memory_bytes, weights=weights, kv_cache=kv_cache))
            for m in valid_mappings(config, gpus)]
    return sorted(rows, key=lambda r: (r[1].reference and gpus > 1, not r[1].fits,
                                       -r[1].tok_s_per_gpu))


@dataclass
class Pick:
    mapping: Mapping
    prediction: Prediction
    reason: str
    ranked: list[tuple[Mapping, Prediction]]

    def __str__(self) -> str:
        return f"{self.prediction.name} — {self.reason}"


def pick(config: Any, gpus: int, *, batch_per_gpu: int, prompt: int, new_tokens: int,
         calibration: "Calibration | dict | str | Path | None" = None,
         gpu_memory_bytes: int | None = None, dtype_bytes: int | None = None,
         weights: str = "bf16", kv_cache: str = "bf16",
         ranked: list[tuple[Mapping, Prediction]] | None = None) -> Pick:
    """The mapping of ``gpus`` GPUs with the most tokens/s per GPU among those that fit, with a
    one-line reason. Raises NothingFits when none holds the weights and the batch's KV."""
    if ranked is None:
        ranked = rank_mappings(config, gpus, batch_per_gpu=batch_per_gpu, prompt=prompt,
                               new_tokens=new_tokens, calibration=calibration,
                               gpu_memory_bytes=gpu_memory_bytes, dtype_bytes=dtype_bytes,
                               weights=weights, kv_cache=kv_cache)
    candidates = [r for r in ranked if not r[1].reference or gpus == 1]
    fitting = [r for r in candidates if r[1].fits]
    if not fitting:
        best = max(candidates, key=lambda r: r[1].kv_capacity_seqs / r[1].seqs_per_group)
        p = best[1]
        share = p.kv_capacity_seqs // max(1, p.seqs_per_group // batch_per_gpu)
        raise NothingFits(
            f"no mapping of {gpus} GPUs fits {batch_per_gpu} requests per GPU: the roomiest, "
            f"{p.name}, {p.reason}",
            hint=f"lower --batch-per-gpu to {share} or less (that fits {p.name}), shorten "
            "--prompt/--new-tokens, or use more GPUs")
    mapping, best = fitting[0]
    return Pick(mapping, best, _reason(best, candidates, gpus), ranked)


def _group_words(mapping: Mapping) -> str:
    """What one request set is served by: a GPU, or a group of ranks."""
    size = mapping.attn_tp_size if mapping.enable_attention_dp else mapping.tp_size
    return "GPU" if size == 1 else f"group of {size}"


def _reason(best: Prediction, candidates: list[tuple[Mapping, Prediction]], gpus: int) -> str:
    parts = [best.description]
    parts.append(f"weights {best.weights_bytes_per_gpu / GB:.1f} GB/GPU leave KV room for "
                 f"{best.kv_capacity_seqs} sequences per {_group_words(best.mapping)} "
                 f"(needs {best.seqs_per_group})")
    text = ", ".join(parts)
    tp = next((p for m, p in candidates if not m.enable_attention_dp and m.tp_size == gpus), None)
    others = [p for _, p in candidates if p is not best and p.fits]
    if tp is not None and tp is not best:
        text += f"; {best.tok_s_per_gpu / tp.tok_s_per_gpu:.2f}x {tp.name}"
        if not tp.fits:
            text += " (which does not fit)"
    if others and (tp is None or others[0] is not tp):
        text += f"; {best.tok_s_per_gpu / others[0].tok_s_per_gpu:.2f}x the next best, " \
                f"{others[0].name}"
    faster = [p for _, p in candidates if not p.fits and p.tok_s_per_gpu > best.tok_s_per_gpu]
    if faster:
        f = max(faster, key=lambda p: p.tok_s_per_gpu)
        text += (f"; {f.name} would be {f.tok_s_per_gpu / best.tok_s_per_gpu:.2f}x faster "
                 f"but does not fit ({f.reason})")
    return text


# ----------------------------------------------------------------------------- text output
def format_table(ranked: list[tuple[Mapping, Prediction]], chosen: Prediction | None) -> str:
    """The ``adp plan`` table: one row per mapping, in the given order, then a legend."""
    several = len(ranked) > 1
    names = [p.name + (" (1 GPU, ref.)" if p.reference and several else "") for _, p in ranked]
    w = max([len("mapping"), *map(len, names)])
    cols = [column for _, column, _ in TERMS]
    head = (f"{'mapping':<{w}} {'step ms':>8} {'range':>11} {'tok/s/GPU':>10} {'weights':>8} "
            f"{'KV':>6} {'memory':>7} {'KV room':>11} {'fits':>4}  "
            + " ".join(f"{t:>6}" for t in cols))
    units = (f"{'':<{w}} {'':>8} {'ms':>11} {'':>10} {'GB/GPU':>8} {'GB/GPU':>6} "
             f"{'GB/GPU':>7} {'seqs/need':>11} {'':>4}  " + " ".join(f"{'ms':>6}" for _ in cols))
    lines = [head, units]
    for name, (_, p) in zip(names, ranked):
        room = f"{p.kv_capacity_seqs}/{p.seqs_per_group}"
        lo, hi = p.step_ms_range
        span = f"{lo:.1f}-{hi:.1f}" if hi - lo >= 0.05 else "-"
        lines.append(
            f"{name:<{w}} {p.step_ms:>8.2f} {span:>11} {p.tok_s_per_gpu:>10,.0f} "
            f"{p.weights_bytes_per_gpu / GB:>8.1f} {p.kv_bytes_per_gpu / GB:>6.1f} "
            f"{p.memory_bytes_per_gpu / GB:>7.1f} {room:>11} {'yes' if p.fits else 'no':>4}  "
            + " ".join(f"{p.breakdown[key]:>6.2f}" for key, _, _ in TERMS)
            + ("  <- pick" if p is chosen else ""))
    lines += [
        "",
        "range: the step with every collective latency and the host's work per request at the",
        "low / high end of their stated ranges; KV: the cache a step reads (mean context);",
        "memory: weights + KV at the full context; KV room: sequences that fit per GPU (or DP",
        "group) / sequences it serves.",
        "Terms (ms, they add up to the step): " + "; ".join(
            f"{column} = {meaning}" for _, column, meaning in TERMS) + " (docs/cost_model.md).",
    ]
    return "\n".join(lines)
