"""The mapping spec: how a TP job's ranks are regrouped for attention and for the MLP.

A graph is traced with ``tp_size`` ranks sharing every head and MLP column. The mapping says
how the rewritten job uses the same ``world_size`` ranks:

* attention: ``attn_tp_size`` ranks share one request set (1 = pure attention-DP, each rank
  serves its own requests with replicated attention weights); ``dp_size = tp / attn_tp``.
* MLP: ``mlp_tp_size`` ranks share the MLP (1 = replicated MLP, TensorRT-LLM's choice).

Every invalid combination raises :class:`MappingError` naming the constraint and the fix.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adp_pass.errors import UsageError


class MappingError(UsageError, ValueError):
    """A mapping that cannot describe a valid job. Messages use the short keys of the string
    form (``tp``, ``attn_dp``, ...), the words a user types."""


class NotSupportedYet(MappingError):
    """A valid mapping that this version cannot rewrite to yet."""


# Short keys of the compact form "tp=8,attn_dp=1,mlp_tp=1" and their dataclass fields.
_SHORT_KEYS = {
    "world": "world_size",
    "tp": "tp_size",
    "attn_dp": "enable_attention_dp",
    "attn_tp": "attn_tp_size",
    "mlp_tp": "mlp_tp_size",
}
_KEY_OF = {field: key for key, field in _SHORT_KEYS.items()}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Mapping:
    """World layout before (``tp_size``) and after (attention / MLP groups) the rewrite."""

    world_size: int = 0  # 0: same as tp_size
    tp_size: int = 1
    enable_attention_dp: bool = False
    attn_tp_size: int = 0  # 0: 1 under attention-DP, else tp_size
    mlp_tp_size: int = 0  # 0: 1 under attention-DP (replicated MLP), else tp_size

    def __post_init__(self) -> None:
        for name in ("world_size", "tp_size", "attn_tp_size", "mlp_tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MappingError(f"{_KEY_OF[name]} must be a non-negative integer, got {value!r}")
        if not isinstance(self.enable_attention_dp, bool):
            raise MappingError(f"attn_dp must be a bool, got {self.enable_attention_dp!r}")
        if self.tp_size < 1:
            raise MappingError(f"tp must be >= 1, got {self.tp_size}")
        world = self.world_size or self.tp_size
        attn_tp = self.attn_tp_size or (1 if self.enable_attention_dp else self.tp_size)
        mlp_tp = self.mlp_tp_size or (1 if self.enable_attention_dp else self.tp_size)
        object.__setattr__(self, "world_size", world)
        object.__setattr__(self, "attn_tp_size", attn_tp)
        object.__setattr__(self, "mlp_tp_size", mlp_tp)
        self._validate()

    def _validate(self) -> None:
        if self.world_size != self.tp_size:
            raise MappingError(
                f"world ({self.world_size}) must equal tp ({self.tp_size}): the "
                "rewrite regroups the ranks of one TP job; pipeline or outer data parallelism "
                "is not part of a mapping. Set world=tp."
            )
        if self.tp_size % self.attn_tp_size:
            raise MappingError(
                f"attn_tp ({self.attn_tp_size}) must divide tp ({self.tp_size}) so "
                "every attention group has the same size"
            )
        if self.tp_size % self.mlp_tp_size:
            raise MappingError(
                f"mlp_tp ({self.mlp_tp_size}) must divide tp ({self.tp_size}) so "
                "every MLP group has the same size"
            )
        if not self.enable_attention_dp and self.attn_tp_size != self.tp_size:
            raise MappingError(
                f"attn_tp ({self.attn_tp_size}) < tp ({self.tp_size}) means "
                "attention data parallelism: set attn_dp=1"
            )
        if not self.enable_attention_dp and self.mlp_tp_size != self.tp_size:
            raise MappingError(
                f"mlp_tp ({self.mlp_tp_size}) != tp ({self.tp_size}) needs "
                "attention-DP: set attn_dp=1, or drop mlp_tp"
            )

    # ----------------------------------------------------------------- derived layout
    @property
    def lockstep_size(self) -> int:
        """Consecutive ranks whose forward calls meet in a collective, so they must step
        together (1: every rank steps alone, the replicated attention-DP mapping)."""
        if not self.enable_attention_dp:
            return self.tp_size
        return math.lcm(self.attn_tp_size, self.mlp_tp_size)

    @property
    def dp_size(self) -> int:
        """Number of independent request sets (attention groups)."""
        return self.tp_size // self.attn_tp_size

    def attn_group(self, rank: int) -> list[int]:
        """Ranks that share ``rank``'s requests (and its attention heads)."""
        self._check_rank(rank)
        start = rank // self.attn_tp_size * self.attn_tp_size
        return list(range(start, start + self.attn_tp_size))

    def mlp_group(self, rank: int) -> list[int]:
        """Ranks that share ``rank``'s MLP columns."""
        self._check_rank(rank)
        start = rank // self.mlp_tp_size * self.mlp_tp_size
        return list(range(start, start + self.mlp_tp_size))

    def dp_rank(self, rank: int) -> int:
        """Index of ``rank``'s request set among the ``dp_size`` sets."""
        self._check_rank(rank)
        return rank // self.attn_tp_size

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise MappingError(f"rank {rank} is outside world {self.world_size}")

    def check_model(
        self, num_attention_heads: int, num_key_value_heads: int, intermediate_size: int
    ) -> None:
        """Reject a mapping whose TP degree does not divide the model's heads or columns."""
        for what, count in (
            ("num_attention_heads", num_attention_heads),
            ("num_key_value_heads", num_key_value_heads),
            ("intermediate_size", intermediate_size),
        ):
            if count % self.tp_size:
                raise MappingError(
                    f"tp ({self.tp_size}) must divide the model's {what} ({count}); pick a tp that "
                    f"divides it (e.g. {_divisors_hint(count)})"
                )
        if num_attention_heads % num_key_value_heads:
            raise MappingError(
                f"num_key_value_heads ({num_key_value_heads}) must divide num_attention_heads "
                f"({num_attention_heads})"
            )

    # ----------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, spec: str) -> "Mapping":
        """Parse the compact CLI form, e.g. ``"tp=8,attn_dp=1,mlp_tp=1"``."""
        if not isinstance(spec, str) or not spec.strip():
            raise MappingError('empty mapping string; expected e.g. "tp=2,attn_dp=1"')
        items = []
        for item in spec.split(","):
            item = item.strip()
            if not item:
                raise MappingError(f"empty entry in mapping {spec!r} (doubled or trailing comma)")
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not raw:
                raise MappingError(f"mapping entry {item!r} must look like key=value")
            items.append((key, raw))
        return cls._from_items(items, f"in {spec!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Mapping":
        """The keys and values of the string form, as a dict: ``{"tp": 8, "attn_dp": 1}``
        (long field names are accepted too, as in the string form; booleans only for attn_dp)."""
        items = []
        for key, value in values.items():
            if isinstance(value, bool):
                field_name = _SHORT_KEYS.get(str(key), str(key) if str(key) in _KEY_OF else None)
                if field_name not in (None, "enable_attention_dp"):
                    # JSON true is Python 1: taken as a count, "tp": true would be tp=1.
                    raise MappingError(f"{key} must be {_WANTS[field_name]}, got "
                                       f"{json.dumps(value)} (a boolean)")
                raw = "1" if value else "0"
            elif isinstance(value, (int, str)):
                raw = str(value).strip()
            else:  # 2.0, [2], {...}, null: the string form has no such values either
                raw = None
            items.append((str(key), raw, value))
        return cls._from_items(items, "")

    @classmethod
    def _from_items(cls, items: list, where: str) -> "Mapping":
        """One checker for both forms: known keys, no repeats, each value checked by its key."""
        fields: dict[str, Any] = {}
        for key, raw, *original in items:
            field_name = _SHORT_KEYS.get(key, key if key in _KEY_OF else None)
            if field_name is None:
                known = ", ".join(_SHORT_KEYS)
                raise MappingError(f"unknown mapping key {key!r}; known keys: {known}")
            if field_name in fields:
                raise MappingError(f"mapping key {key!r} given twice {where}".rstrip())
            if raw is None or raw == "":
                got = original[0] if original else raw
                raise MappingError(f"{key} must be {_WANTS[field_name]}, got {got!r}")
            fields[field_name] = _parse_value(key, field_name, raw)
        if "tp_size" not in fields:
            raise MappingError("a mapping needs tp (the TP degree the graph was traced with)")
        return cls(**fields)

    @classmethod
    def from_file(cls, path: str | Path) -> "Mapping":
        """Read a mapping from a ``.json`` or ``.toml`` file: the string form's keys and values,
        at the top level or under a ``mapping`` table."""
        path = Path(path)
        if path.suffix not in (".json", ".toml"):
            raise MappingError(f"mapping file {path} must end in .json or .toml")
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise MappingError(f"mapping file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise MappingError(f"cannot read mapping file {path}: {err}") from None
        try:
            values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise MappingError(f"cannot parse mapping file {path}: {err}") from None
        if isinstance(values, dict) and isinstance(values.get("mapping"), dict):
            values = values["mapping"]
        if not isinstance(values, dict):
            raise MappingError(f"mapping file {path} must hold a table/object of keys")
        return cls.from_dict(values)

    @classmethod
    def load(cls, spec: "str | Path | Mapping") -> "Mapping":
        """A Mapping from a Mapping, a compact string, or a path to a JSON/TOML file."""
        if isinstance(spec, Mapping):
            return spec
        text = str(spec)
        # A path-like spec without "=" is a file, so "m.yaml" is told it is the wrong kind.
        looks_like_file = "=" not in text and (Path(text).suffix or "/" in text)
        if isinstance(spec, Path) or text.endswith((".json", ".toml")) or looks_like_file:
            return cls.from_file(spec)
        return cls.parse(str(spec))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"tp={self.tp_size},attn_dp={int(self.enable_attention_dp)},"
            f"attn_tp={self.attn_tp_size},mlp_tp={self.mlp_tp_size}"
        )


# Which weights a collective site's kind shards; a mapping splits each role over its own group.
ROLE_OF_KIND = {"attention_out": "attention", "mlp_out": "mlp", "embedding": "vocab",
                "lm_head_gather": "vocab"}


def role_parts(mapping: Mapping) -> dict[str, int]:
    """Over how many ranks the rewritten job splits each role's weights."""
    if not mapping.enable_attention_dp:
        return dict.fromkeys(("attention", "mlp", "vocab"), mapping.tp_size)
    return {"attention": mapping.attn_tp_size, "mlp": mapping.mlp_tp_size, "vocab": 1}


def site_action(kind: str, mapping: Mapping) -> tuple[str, str, int]:
    """(action, group tag, group size) for a collective site of ``kind`` under ``mapping``:
    ``remove`` it, ``keep`` it over the tagged group, or ``gather_scatter`` (docs/mappings.md)."""
    if not mapping.enable_attention_dp:
        return "keep", "world", mapping.tp_size
    role, attn, mlp = ROLE_OF_KIND[kind], mapping.attn_tp_size, mapping.mlp_tp_size
    if role == "vocab" or (role == "attention" and attn == 1) or (role == "mlp" and mlp == 1):
        return "remove", "", 0
    if role == "attention":
        return "keep", "attn", attn
    if mlp == attn:  # the MLP group is the attention group: its ranks hold the same tokens
        return "keep", "mlp", mlp
    return "gather_scatter", "mlp", mlp


_WANTS = {
    "enable_attention_dp": "0/1 or true/false",
    "world_size": "an integer >= 1",
    "tp_size": "an integer >= 1",
    "attn_tp_size": "an integer >= 1",
    "mlp_tp_size": "an integer >= 1",
}


def _parse_value(key: str, field_name: str, raw: str) -> int | bool:
    """``raw`` as typed for ``key`` (the name the user wrote, used in the message)."""
    if field_name == "enable_attention_dp":
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise MappingError(f"{key} must be 0/1 or true/false, got {raw!r}")
    try:
        value = int(raw)
    except ValueError:
        raise MappingError(f"{key} must be an integer, got {raw!r}") from None
    if value < 1:
        raise MappingError(f"{key} must be >= 1, got {value}")
    return value


def _divisors_hint(count: int) -> str:
    return ", ".join(str(d) for d in range(1, min(count, 16) + 1) if count % d == 0)
