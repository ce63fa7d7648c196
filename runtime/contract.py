"""The typed contract between the front ends and the ranks: what a rank is given, what it
returns, and what travels on the serve link. Torch-free, so a front end speaks it without
importing torch.

Every type here is a dataclass with one JSON form, made by :func:`to_json` and read back by
:func:`from_json` from the type hints: a field added to a type travels with it, and nothing
reads a rank's record by key. The serve link's messages are JSON lines tagged with their type
(:func:`encode_message` / :func:`decode_message`).

- :class:`Job`: the model, the mapping (a :class:`~adp_pass.mapping.Mapping`, parsed once at the
  front end), the serving geometry (:class:`ServingConfig`) and each DP group's requests per
  workload. ``adp run``, the benches and ``adp serve`` write it; every rank reads it.
- :class:`Request` (with its :class:`SamplingParams`) and :class:`Result`: one generation.
- :class:`RankRecord`: what a batch rank served, per workload (:class:`PhaseStats`), with its
  build timings and first-step check; :class:`RankFailure`: a rank's own error.
- The serve link: :class:`Hello`, :class:`Add`, :class:`Cancel`, :class:`Stop`, :class:`Step`
  (:class:`TokenEvent`s and the rank's :class:`RankLoad`), :class:`Bye`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from adp_pass.errors import AdpError
from adp_pass.mapping import Mapping
from adp_pass.runtime.serving_config import ServingConfig

RequestId = Union[str, int]


class ContractError(AdpError, ValueError):
    """A message or record does not fit its type: another version of adp-pass wrote it, or it is
    damaged."""


# ----------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (temperature 0 = greedy, as transformers' do_sample=False)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    # A request's own sampling seed (the OpenAI ``seed``): its tokens then depend on neither the
    # rank nor the batch it shares; None draws from the engine's generator.
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Request:
    request_id: RequestId
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Result:
    request_id: RequestId
    prompt_len: int
    tokens: list[int]
    finish_reason: str  # "length" | "stop" | "max_position"


# ----------------------------------------------------------------------------- the job
@dataclass
class Job:
    """What every rank of a batch job or a serving job is given."""

    mapping: Mapping
    preset: str = "tiny"
    checkpoint: str | None = None  # a Hugging Face checkpoint dir; its config.json wins
    dtype: str = "float32"
    serving: ServingConfig = field(default_factory=ServingConfig)
    seed: int = 0
    # A preset's first N decoder layers only (None: all), weight for weight the whole model's:
    # the benches' shallow models (the real widths at a depth that fits, or that does not
    # amplify rounding). A checkpoint's config.json says its own depth.
    layers: int | None = None
    check_first_step: bool = False
    # Build cache of the ranks' built graphs (runtime/build_cache.py, docs/build_cache.md): a
    # rank loads its entry from here, or builds and stores it; None: build, store nothing.
    cache_dir: str | None = None
    # Each rank writes its build stages' graphs as text to <dump_dir>/rank<r>/; None: nothing.
    dump_dir: str | None = None
    # workloads[w][g]: DP group g's requests in workload w. Workloads are served one after the
    # other by the same built ranks, each measured on its own (benchmarks); a serving job has
    # none (its requests arrive on the link).
    workloads: list[list[list[Request]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.mapping, Mapping):  # the Python front end's one parse
            self.mapping = Mapping.load(self.mapping)

    def requests_for(self, dp_rank: int, workload: int = 0) -> list[Request]:
        """DP group ``dp_rank``'s requests in ``workload`` (none if it has no list there)."""
        if workload >= len(self.workloads):
            return []
        groups = self.workloads[workload]
        return list(groups[dp_rank]) if dp_rank < len(groups) else []

    def model_config(self):
        """The model's ``PretrainedConfig``: the checkpoint's, else the preset's."""
        if self.checkpoint is not None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.checkpoint)
            config._attn_implementation = "sdpa"
            config.use_cache = False
            return config
        from adp_pass.presets import qwen3_config

        if self.layers is not None:
            return qwen3_config(self.preset, num_hidden_layers=self.layers)
        return qwen3_config(self.preset)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(to_json(self)))

    @classmethod
    def read(cls, path: str | Path) -> "Job":
        return from_json(cls, json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------- what ranks return
@dataclass
class PhaseStats:
    """One workload as one rank served it."""

    requests: int
    wall_s: float
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    mean_decode_step_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    mean_ttft_ms: float = 0.0
    # Lockstep only: steps made with padding rows alone, their time, and the agreement's time.
    idle_calls: int = 0
    idle_s: float = 0.0
    agree_s: float = 0.0
    prompt_warmup_s: float = 0.0  # start-up: the prompt path run before serving (CUDA)

    @classmethod
    def of(cls, stats, requests: int, wall_s: float) -> "PhaseStats":
        """From an engine's ``EngineStats``: each field here is read by name from ``stats`` (a
        field or a property), so a new statistic is one field there and one here."""
        taken = {f.name: getattr(stats, f.name) for f in dataclasses.fields(cls)
                 if f.name not in ("requests", "wall_s") and hasattr(stats, f.name)}
        return cls(requests=requests, wall_s=wall_s, **taken)


@dataclass
class FirstStepCheck:
    """A prompt's prefill logits on the rank against transformers holding the same tensors."""

    max_abs_diff: float | None = None
    max_abs_logit: float | None = None
    same_argmax: bool | None = None
    ours_vs_fp32: float | None = None
    transformers_vs_fp32: float | None = None
    # FP8 ranks: max |diff| against the kernels' arithmetic done exactly (the dequantized weights
    # in fp32, each FP8 linear's input quantized per token and 128-wide group as the kernels do),
    # and how far that reference itself is from the unquantized fp32 one (the quantization's cost)
    ours_vs_w8a8: float | None = None
    w8a8_vs_fp32: float | None = None
    # ... and the same W8A8 arithmetic in the rank's dtype against the exact one: the distance a
    # correct pipeline at that precision lands at (a deep model amplifies the rounding)
    w8a8_in_dtype_vs_w8a8: float | None = None
    skipped: str | None = None  # why there was no comparison (a weight that is not a shard)


@dataclass
class RankRecord:
    """What one rank of a batch job served. Only a DP group's leader (its attention group's
    first rank) counts in a job's totals: its peers served the same requests."""

    rank: int
    world_size: int
    mapping: Mapping
    dp_rank: int
    leader: bool
    device: str
    phases: list[PhaseStats]
    results: list[Result]
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, dict] = field(default_factory=dict)
    memory_allocated_gib: float | None = None
    first_step_check: FirstStepCheck | None = None

    @property
    def first(self) -> PhaseStats:
        """The first workload (the one a plain ``adp run`` serves)."""
        return self.phases[0]


@dataclass
class RankFailure:
    """A rank's own error, left in the job directory (torchrun reports only an exit code)."""

    rank: int
    type: str
    message: str
    hint: str | None = None
    time: float = 0.0

    @classmethod
    def of(cls, rank: int, err: BaseException) -> "RankFailure":
        return cls(rank, type(err).__name__, str(err).strip(), getattr(err, "hint", None),
                   time.time())

    def path(self, job_dir: str | Path) -> Path:
        return Path(job_dir) / f"rank{self.rank}.error.json"


def record_path(job_dir: str | Path, rank: int) -> Path:
    return Path(job_dir) / f"rank{rank}.json"


# ----------------------------------------------------------------------------- the serve link
@dataclass
class Hello:
    """A serving rank's first line: who it is, proven by the front end's secret."""

    token: str
    rank: int
    dp_rank: int
    reports: bool  # sends its DP group's tokens (the attention group's first rank)
    pid: int
    host: str
    lockstep_leader: int  # the rank that reads the link for its lockstep group
    kv_blocks: int
    device: str


@dataclass
class Add:
    dp_rank: int
    request: Request


@dataclass
class Cancel:
    dp_rank: int
    request_id: RequestId


@dataclass
class Stop:
    reason: str = "stop"


@dataclass
class TokenEvent:
    """A request's new tokens since the last step, its end, or the rank's refusal."""

    request_id: RequestId
    tokens: list[int]
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class RankLoad:
    """A serving rank's queue and KV use, sent with every step and every 0.5 s when idle."""

    waiting: int = 0
    running: int = 0
    kv_used: int = 0
    kv_total: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0


@dataclass
class Step:
    events: list[TokenEvent]
    load: RankLoad


@dataclass
class Bye:
    rank: int


Message = Union[Hello, Add, Cancel, Stop, Step, Bye]
_MESSAGES: dict[str, type] = {cls.__name__.lower(): cls
                              for cls in (Hello, Add, Cancel, Stop, Step, Bye)}


def encode_message(message: Message) -> bytes:
    """One JSON line, tagged with the message's type."""
    return json.dumps({"type": type(message).__name__.lower(), **to_json(message)}).encode() + b"\n"


def decode_message(line: bytes | str) -> Message:
    """The message a line of :func:`encode_message` holds; :class:`ContractError` if none."""
    try:
        data = json.loads(line)
        kind = data.pop("type")
        cls = _MESSAGES[kind]
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise ContractError(f"not a serve-link message: {str(line)[:120]!r} ({err!r})") from None
    return from_json(cls, data)


# ----------------------------------------------------------------------------- the codec
def to_json(value: Any) -> Any:
    """The JSON form of a contract value: dataclasses as objects of their fields, a mapping as
    its spec string, tuples as lists."""
    if isinstance(value, Mapping):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def from_json(cls: type, data: Any) -> Any:
    """A ``cls`` (a contract dataclass) from its :func:`to_json` form. Unknown or missing
    fields are a :class:`ContractError` naming them, never ignored."""
    if not isinstance(data, dict):
        raise ContractError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ContractError(f"{cls.__name__} has no field {', '.join(unknown)}: written by "
                            "another version of adp-pass?")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ContractError(f"{cls.__name__} lacks {', '.join(missing)}")
    return cls(**{name: _convert(hints[name], value, f"{cls.__name__}.{name}")
                  for name, value in data.items()})


def _convert(hint: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, where)
        return value  # a union of plain JSON types (RequestId)
    if hint is Mapping:
        return Mapping.parse(value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_json(hint, value)
    if origin is list:
        return [_convert(args[0], v, where) for v in value]
    if origin is tuple:
        return tuple(_convert(args[0], v, where) for v in value)
    if origin is dict:
        return {k: _convert(args[1], v, where) for k, v in value.items()}
    return value
