"""A first-order roofline model of one decode step per rank, and the mapping it picks.

For a Qwen3 dense model, a mapping and a load (requests per GPU, prompt and generated lengths),
``predict`` estimates one decode step on one rank as

    step = weights_read + gemm_excess + kv_read + collectives + overhead

* ``weights_read`` = bytes of the weights a step reads on this rank / copy bandwidth. Every
  linear weight (q/k/v/o, gate/up/down, LM head) and norm is read once per step; the embedding
  table is not (a step reads only its tokens' rows), unless it is tied to the LM head.
* ``gemm_excess`` = for each role (attention, MLP, LM head), how much longer its GEMMs take at
  the calibrated GEMM rate for its token count than reading its weights: max(0, flops / rate -
  bytes / copy bandwidth). 0 when the linears are memory-bound; the linear layers' time is
  ``max(weights_read, flops / rate)`` per role, the roofline.
* ``kv_read`` = KV-cache bytes the rank's attention reads at the mean context
  (prompt + new_tokens / 2) / attention bandwidth (attention runs after the linears that feed
  it, so it is added, not overlapped).
* ``collectives`` = per collective and step: latency + factor * bytes / bus bandwidth, with
  NCCL's ring factors (all-reduce 2(g-1)/g of the buffer, all-gather and reduce-scatter (g-1)/g
  of the gathered size) and the latency and bus bandwidth calibrated for group size g.
* ``overhead`` = step_overhead_us (host work per step: scheduling, sampling, graph launch) +
  layers * kernels_per_layer * kernel_launch_us (the ramp and tail of each small kernel).

Which collectives a mapping keeps or inserts, and its weights per rank, come from the rewrite's
own rules: ``adp_pass.mapping.site_action`` and ``role_parts`` (torch-free). Every constant comes from the calibration (``adp calibrate``; the packaged
default ``adp_pass/data/h200.json``). docs/cost_model.md has the formulas, the assumptions and
what the model ignores.

Nothing here imports torch: ``adp plan`` answers in well under a second.
"""

from __future__ import annotations

import json
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
    "kernels_per_layer": "kernels one decoder layer launches per decode step",
    "step_overhead_us": "host work per decode step (>= 0)",
    "device_memory_gib": "memory of one device",
    "memory_reserve_gib": "memory kept for the CUDA context, activations, graphs (>= 0)",
    "allreduce": "latency_us and bus_bandwidth_gbps by group size",
    "allgather": "latency_us and bus_bandwidth_gbps by group size",
    "reducescatter": "latency_us and bus_bandwidth_gbps by group size",
}

_ZERO_OK = {"memory_reserve_gib", "step_overhead_us", "kernel_launch_us"}  # may be 0


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
    """The machine's constants (a calibration JSON), with the lookups the model needs."""

    def __init__(self, data: dict, where: str = "calibration") -> None:
        self.data, self.where = data, where
        self._check()

    def _check(self) -> None:
        data, where = self.data, self.where
        if not isinstance(data, dict):
            raise CalibrationError(f"{where} must hold a JSON object", flag="--calibration")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise CalibrationError(f"{where} lacks {', '.join(missing)} "
                                   f"({REQUIRED_KEYS[missing[0]]})", flag="--calibration")
        for key in REQUIRED_KEYS:
            if key in ("gemm_tflops", *OPS):
                continue
            zero_ok = key in _ZERO_OK
            if not _number(data[key]) or data[key] < 0 or (data[key] == 0 and not zero_ok):
                sign = "non-negative" if zero_ok else "positive"
                raise CalibrationError(f"{where}: {key} must be a {sign} number, got "
                                       f"{data[key]!r}", flag="--calibration")
        gemm = data["gemm_tflops"]
        if (not isinstance(gemm, dict) or not gemm
                or not all(_intkey(k) and _number(v) and v > 0 for k, v in gemm.items())):
            raise CalibrationError(f"{where}: gemm_tflops must map token counts to positive "
                                   f"TFLOP/s, e.g. {{\"64\": 235}}, got {gemm!r}",
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

    @property
    def name(self) -> str:
        return str(self.data.get("gpu", "unknown device"))

    @property
    def source(self) -> str:
        return str(self.data.get("source", "measured"))

    def gemm_tflops(self, tokens: int) -> float:
        """GEMM rate for ``tokens`` rows: measured points, interpolated linearly in log(tokens);
        below the smallest point the rate falls in proportion (memory-bound: same time), above
        the largest it stays."""
        points = sorted((int(k), float(v)) for k, v in self.data["gemm_tflops"].items())
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

    def collective(self, op: str, group: int) -> tuple[float, float, str | None]:
        """(latency s, bus bandwidth bytes/s, note) for ``op`` over ``group`` ranks. A group
        size that was not measured takes the nearest measured one (the larger on a tie) and a
        note saying so."""
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
    """A Calibration from a path, a dict, or (None) the packaged H200 default."""
    if isinstance(source, Calibration):
        return source
    if isinstance(source, dict):
        return Calibration(source)
    path = default_calibration_path() if source is None else Path(source)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CalibrationError(f"calibration file {path} does not exist",
                               flag="--calibration") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CalibrationError(f"cannot read calibration file {path}: {err}",
                               flag="--calibration") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CalibrationError(f"calibration file {path} is not valid JSON: {err}",
                               flag="--calibration") from None
    return Calibration(data, str(path))


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
    buffer; all-gather: the gathered output; reduce-scatter: the input) over ``group`` ranks."""

    site: str
    op: str
    group: int
    nbytes: int
    count: int
    ms_each: float

    @property
    def ms(self) -> float:
        return self.count * self.ms_each


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
        return out


def predict(config: Any, mapping: "Mapping | str", *, batch_per_gpu: int, prompt: int,
            new_tokens: int, calibration: "Calibration | dict | str | Path | None" = None,
            dtype_bytes: int = 2, gpu_memory_bytes: int | None = None) -> Prediction:
    """Predict one decode step on one rank of ``mapping`` (see the module docstring).

    ``batch_per_gpu`` is requests per GPU: the TP group serves tp x batch requests, a DP group
    of attn_tp ranks attn_tp x batch, a replicated rank batch. ``gpu_memory_bytes`` defaults to
    the calibration's device memory.
    """
    shape = ModelShape.of(config)
    mapping = Mapping.load(mapping)
    cal = load_calibration(calibration)
    for name, value, low in (("batch_per_gpu", batch_per_gpu, 1), ("prompt", prompt, 1),
                             ("new_tokens", new_tokens, 1), ("dtype_bytes", dtype_bytes, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}",
                             flag="--" + name.replace("_", "-"))
    if gpu_memory_bytes is None:
        gpu_memory_bytes = int(cal["device_memory_gib"] * GIB)
    parts = role_parts(mapping)
    params = shape.role_params()
    n, attn_group = mapping.tp_size, (mapping.attn_tp_size if mapping.enable_attention_dp
                                      else mapping.tp_size)
    notes: list[str] = []

    # Tokens each rank runs per step: its attention group's requests, one token each.
    seqs = attn_group * batch_per_gpu
    mlp_action, _, mlp_group = site_action("mlp_out", mapping)
    attn_action, _, attn_size = site_action("attention_out", mapping)
    tokens = {"attention": seqs, "mlp": seqs * (mlp_group if mlp_action == "gather_scatter" else 1),
              "vocab": seqs}

    # Weights: held (footprint) and read per step.
    held = {role: math.ceil(params[role] / parts[role]) * dtype_bytes
            for role in ("attention", "mlp", "vocab")}
    held["replicated"] = params["replicated"] * dtype_bytes
    weights_bytes = sum(held.values())
    lm_head_bytes = math.ceil(shape.vocab * shape.hidden / parts["vocab"]) * dtype_bytes
    read = {"attention": held["attention"], "mlp": held["mlp"], "vocab": lm_head_bytes,
            "replicated": held["replicated"]}
    copy_bw = cal["copy_bandwidth_gbps"] * GB
    weights_ms = sum(read.values()) / copy_bw * 1e3
    gemm_ms = 0.0
    for role in ("attention", "mlp", "vocab"):
        flops = 2 * tokens[role] * read[role] / dtype_bytes
        compute_s = flops / (cal.gemm_tflops(tokens[role]) * 1e12)
        gemm_ms += max(0.0, compute_s - read[role] / copy_bw) * 1e3

    # KV cache: each rank holds its share of the kv heads of its attention group's sequences.
    kv_heads_rank = math.ceil(shape.kv_heads / parts["attention"])
    per_token = shape.kv_bytes_per_token(kv_heads_rank, dtype_bytes)
    mean_context = prompt + new_tokens / 2
    full_context = math.ceil((prompt + new_tokens) / BLOCK_SIZE) * BLOCK_SIZE
    kv_bytes = int(seqs * mean_context * per_token)
    per_seq = full_context * per_token
    kv_peak = seqs * per_seq
    kv_ms = kv_bytes / (cal["attention_bandwidth_gbps"] * GB) * 1e3

    # Collectives per step.
    act = shape.hidden * dtype_bytes  # one token's hidden state
    plan: list[tuple[str, str, int, int, int]] = []  # site, op, group, bytes, count
    if attn_action == "keep" and attn_size > 1:
        plan.append(("attention_out", "allreduce", attn_size, seqs * act, shape.layers))
    if mlp_action == "keep" and mlp_group > 1:
        plan.append(("mlp_out", "allreduce", mlp_group, seqs * act, shape.layers))
    elif mlp_action == "gather_scatter":
        gathered = mlp_group * seqs * act
        plan.append(("mlp_out", "allgather", mlp_group, gathered, shape.layers))
        plan.append(("mlp_out", "reducescatter", mlp_group, gathered, shape.layers))
    if parts["vocab"] > 1:  # TP: vocab-parallel embedding and LM head
        plan.append(("embedding", "allreduce", n, seqs * act, 1))
        plan.append(("lm_head_gather", "allgather", n, seqs * shape.vocab * dtype_bytes, 1))
    collectives = []
    for site, op, group, nbytes, count in plan:
        latency, bus_bw, note = cal.collective(op, group)
        if note and note not in notes:
            notes.append(note)
        each = (latency + _FACTOR[op](group) * nbytes / bus_bw) * 1e3
        collectives.append(CollectiveCost(site, op, group, nbytes, count, each))
    collectives_ms = sum(c.ms for c in collectives)
    overhead_ms = (cal["step_overhead_us"]
                   + shape.layers * cal["kernels_per_layer"] * cal["kernel_launch_us"]) / 1e3

    breakdown = {"weights_ms": weights_ms, "gemm_ms": gemm_ms, "kv_ms": kv_ms,
                 "collectives_ms": collectives_ms, "overhead_ms": overhead_ms}
    step_ms = sum(breakdown.values())

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
        weights_bytes_per_gpu=weights_bytes, weights_read_bytes_per_gpu=sum(read.values()),
        kv_bytes_per_gpu=kv_bytes,
        kv_peak_bytes_per_gpu=kv_peak, memory_bytes_per_gpu=weights_bytes + kv_peak,
        usable_bytes_per_gpu=usable, kv_capacity_seqs=int(capacity), seqs_per_group=seqs,
        fits=not reason, reason=reason, breakdown=breakdown, tokens=tokens,
        collectives=collectives, notes=notes,
    )


def rank_mappings(config: Any, gpus: int, *, batch_per_gpu: int, prompt: int, new_tokens: int,
                  calibration: "Calibration | dict | str | Path | None" = None,
                  gpu_memory_bytes: int | None = None,
                  dtype_bytes: int = 2) -> list[tuple[Mapping, Prediction]]:
    """Every valid mapping of ``gpus`` GPUs with its prediction, fastest first (tokens/s per
    GPU), the ones that fit before the ones that do not; tp=1 (one GPU, for reference) last."""
    cal = load_calibration(calibration)
    rows = [(m, predict(config, m, batch_per_gpu=batch_per_gpu, prompt=prompt,
                        new_tokens=new_tokens, calibration=cal, dtype_bytes=dtype_bytes,
                        gpu_memory_bytes=gpu_memory_bytes))
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
         gpu_memory_bytes: int | None = None, dtype_bytes: int = 2,
         ranked: list[tuple[Mapping, Prediction]] | None = None) -> Pick:
    """The mapping of ``gpus`` GPUs with the most tokens/s per GPU among those that fit, with a
    one-line reason. Raises NothingFits when none holds the weights and the batch's KV."""
    if ranked is None:
        ranked = rank_mappings(config, gpus, batch_per_gpu=batch_per_gpu, prompt=prompt,
                               new_tokens=new_tokens, calibration=calibration,
                               gpu_memory_bytes=gpu_memory_bytes, dtype_bytes=dtype_bytes)
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
    terms = ("w", "gemm", "kv", "coll", "ovh")
    head = (f"{'mapping':<{w}} {'step ms':>8} {'tok/s/GPU':>10} {'weights':>8} {'KV':>7} "
            f"{'memory':>8} {'KV room':>12} {'fits':>4}  " + " ".join(f"{t:>6}" for t in terms))
    units = (f"{'':<{w}} {'':>8} {'':>10} {'GB/GPU':>8} {'GB/GPU':>7} {'GB/GPU':>8} "
             f"{'seqs/need':>12} {'':>4}  " + " ".join(f"{'ms':>6}" for _ in terms))
    lines = [head, units]
    for name, (_, p) in zip(names, ranked):
        b = p.breakdown
        cells = (b["weights_ms"], b["gemm_ms"], b["kv_ms"], b["collectives_ms"], b["overhead_ms"])
        room = f"{p.kv_capacity_seqs}/{p.seqs_per_group}"
        lines.append(
            f"{name:<{w}} {p.step_ms:>8.2f} {p.tok_s_per_gpu:>10,.0f} "
            f"{p.weights_bytes_per_gpu / GB:>8.1f} {p.kv_bytes_per_gpu / GB:>7.1f} "
            f"{p.memory_bytes_per_gpu / GB:>8.1f} {room:>12} {'yes' if p.fits else 'no':>4}  "
            + " ".join(f"{c:>6.2f}" for c in cells) + ("  <- pick" if p is chosen else ""))
    lines += [
        "",
        "KV: the cache a step reads (mean context); memory: weights + KV at the full context;",
        "KV room: sequences of prompt + new tokens that fit per GPU (or DP group) / sequences it",
        "serves; w + gemm + kv + coll + ovh = step ms: weights read, GEMM time beyond it, KV read,",
        "collectives, fixed overhead (docs/cost_model.md).",
    ]
    return "\n".join(lines)
