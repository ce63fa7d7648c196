"""Cached per-rank builds: a rank's serving graph stored once, loaded in a second on later starts.

``prepare_rank`` spends almost all of its time tracing (capture), then detect + rewrite and the
lowering; none of it depends on the weights. So what is cached is the *built graph*: the
rewritten, lowered, KV-cache-inserted ``GraphModule`` without its weights, plus its plan. A
later start with the same key rebuilds the module from it, fills the weights through the plan
(``random_weights`` / ``load_checkpoint``, as a fresh build does) and allocates the KV cache for
the requested geometry. See docs/build_cache.md.

An entry is a directory ``<cache_dir>/rank<r>-<identity hash>/``:

* ``graph.json``: the fx graph node by node (name, op, target, args, kwargs) with the node tags
  later stages read (``adp_group`` on collectives, for ``runtime/groups.bind_groups``), the
  graph's record (``adp_pass/graph_record.py``: capture's job, the rewrite's report, the
  lowering's and cache insertion's counts and descriptions) as JSON, and every tensor attribute
  by name (kind, parameter or buffer, persistent, shape, dtype); weights and KV caches are not
  stored, only described;
* ``plan.json``: ``Plan.to_json()``;
* ``tensors.safetensors``: the few non-weight tensors that cannot be recomputed (the rotary
  ``inv_freq`` buffers); the cos/sin tables of the lowering are recomputed for the requested
  ``max_position`` by the recipe verified when the entry was stored;
* ``manifest.json``, written last: the full key, each file's size and sha256, and the typed
  report of every stage of the build (``adp_pass/stage_reports.py``).

An entry whose manifest does not parse, whose files do not match their checksums, or whose key
differs (another torch / transformers / triton / adp-pass version, or edited adp_pass sources)
is never loaded: :func:`lookup` warns (:class:`BuildCacheWarning`) and the caller rebuilds it.

Nothing here executes stored code: the graph is rebuilt with ``fx.Graph.create_node`` from
JSON, op targets are looked up by name under ``torch.ops`` and call targets only in
``operator``/``math``/``torch``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from adp_pass.attributes import owner_of, set_attr
from adp_pass.graph_record import GraphRecord, graph_record, set_graph_record
from adp_pass.plan import GROUP_TAG, Plan
from adp_pass.stage_reports import StageReport, report_from_json

FORMAT = "adp-pass rank build"
# 2: the graph's one typed record and the stage reports replace loose meta keys and timings.
FORMAT_VERSION = 2
MANIFEST, GRAPH, PLAN, TENSORS = "manifest.json", "graph.json", "plan.json", "tensors.safetensors"
# Node meta a later stage reads (everything else in node.meta is tracing bookkeeping).
NODE_META_KEYS = (GROUP_TAG,)
# Config fields that name or date a model but do not shape its graph (save_pretrained sets
# architectures and dtype; the graph is built from model_type). The serving dtype is a key field
# of its own (a checkpoint's dtype only says how it was saved); use_cache is off in every capture.
IGNORED_CONFIG_FIELDS = frozenset(
    {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "architectures",
     "torch_dtype", "dtype", "use_cache"}
)
_CALL_MODULES = ("operator", "_operator", "math")  # plus torch and torch.*
_BUILD_DEVICE = "@build"  # a torch.device literal equal to the build device: the load device


class BuildCacheWarning(UserWarning):
    """A cache entry was found but not used (stale or corrupt), or a build could not be stored."""


class EntryError(Exception):
    """An entry that must not be loaded."""

    status = "corrupt"


class StaleEntry(EntryError):
    """Written for another key (versions, sources) or another format."""

    status = "stale"


class CorruptEntry(EntryError):
    """Unreadable, truncated or edited."""


class NotCacheable(Exception):
    """The graph holds something this format does not store (the rank is served uncached)."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/adp-pass``, else ``~/.cache/adp-pass``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adp-pass"


# ------------------------------------------------------------------------------------- the key
@dataclass(frozen=True)
class BuildKey:
    """What a built rank depends on. ``identity`` names the entry (config, mapping, rank, dtype,
    device type, lowering); ``versions`` and ``source`` must match for the entry to be used,
    else it is stale and rebuilt in place."""

    identity: dict
    versions: dict
    source: str

    @property
    def fields(self) -> dict:
        return {**self.identity, "versions": self.versions, "source": self.source}

    @property
    def entry_name(self) -> str:
        digest = hashlib.sha256(_canonical(self.identity).encode()).hexdigest()
        return f"rank{self.identity['rank']}-{digest[:20]}"

    def describe(self) -> str:
        i = self.identity
        return (f"{i['config'].get('model_type', 'model')} rank {i['rank']} of {i['mapping']}, "
                f"{i['dtype']} on {i['device']}")


def build_key(config, mapping, rank: int, *, dtype: torch.dtype, device: torch.device | str,
              lower_ops: bool = True, fp8_linears: bool = False) -> BuildKey:
    """The key of rank ``rank``'s build of ``config`` under ``mapping``. The KV-cache geometry
    (num_blocks, block_size) and ``max_position`` are not part of it: they shape buffers, never
    the graph's code, and are applied when an entry is loaded. ``fp8_linears``: the graph's
    projections are FP8 (an FP8 checkpoint served in FP8); the same config served dequantized
    is another graph, so another entry."""
    from adp_pass.mapping import Mapping

    config_fields = {k: v for k, v in config.to_dict().items() if k not in IGNORED_CONFIG_FIELDS}
    identity = {
        "format": FORMAT_VERSION,
        "config": json.loads(_canonical(config_fields)),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "mapping": str(Mapping.load(mapping)),
        "rank": int(rank),
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.device(device).type,
        "lower_ops": bool(lower_ops),
        "fp8_linears": bool(fp8_linears),
    }
    return BuildKey(identity, versions(), source_hash())


def versions() -> dict:
    import transformers

    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": _dist_version("triton"),
        "adp-pass": _dist_version("adp-pass"),
    }


@lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 over every ``.py`` file of adp_pass, adp_pass.patterns and adp_pass.runtime (with
    its kernels and lowering passes): any code change makes every entry stale."""
    digest = hashlib.sha256()
    # Found, not imported: the runtime hashes the passes' code but does not depend on it.
    for package in ("adp_pass", "adp_pass.patterns", "adp_pass.runtime"):
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


# ------------------------------------------------------------------------------ lookup results
@dataclass
class CachedBuild:
    """A loaded entry: the module (weights on the meta device; KV caches and rotary tables on
    the load device), its plan, and the reports of the build's stages."""

    model: fx.GraphModule
    plan: Plan
    reports: dict[str, StageReport]
    path: Path
    manifest: dict


@dataclass
class Lookup:
    status: str  # "hit" | "miss" | "stale" | "corrupt"
    path: Path
    reason: str = ""
    built: CachedBuild | None = None


def lookup(cache_dir: str | Path, key: BuildKey, *, device: torch.device | str, num_blocks: int,
           block_size: int, max_position: int, check: Callable[[Plan], None] | None = None
           ) -> Lookup:
    """The entry for ``key`` under ``cache_dir``, loaded; a stale or corrupt one is reported
    with a :class:`BuildCacheWarning` and not loaded (the caller rebuilds and stores over it)."""
    path = Path(cache_dir) / key.entry_name
    if not path.exists():
        return Lookup("miss", path)
    try:
        built = load_entry(path, key, device=device, num_blocks=num_blocks,
                           block_size=block_size, max_position=max_position, check=check)
    except EntryError as err:
        warnings.warn(f"build cache: {err.status} entry {path}: {err}; rebuilding it",
                      BuildCacheWarning, stacklevel=2)
        return Lookup(err.status, path, str(err))
    return Lookup("hit", path, built=built)


# ------------------------------------------------------------------------------------- storing
def store(cache_dir: str | Path, key: BuildKey, gm: fx.GraphModule, plan: Plan, *,
          reports: dict[str, StageReport] | None = None) -> Path:
    """Write ``gm`` (built, lowered, KV-cache inserted; its weights are not written), its plan
    and the ``reports`` of the stages that built it as the entry for ``key``, replacing any
    entry there. Atomic: the entry is written under a
    temporary name and renamed. Raises :class:`NotCacheable` for a graph this format cannot hold
    (checked by rebuilding the graph from what would be written) and ``OSError``."""
    graph_doc, tensors = serialize(gm, plan)
    import safetensors.torch

    files = {
        GRAPH: json.dumps(graph_doc, separators=(",", ":")).encode(),
        PLAN: plan.to_json().encode(),
    }
    if tensors:
        files[TENSORS] = safetensors.torch.save(tensors)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "entry": key.entry_name,
        "describe": key.describe(),
        "key": key.fields,
        "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                  for name, data in files.items()},
        "built": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "device": str(graph_doc["build_device"]),
            "reports": [report.to_json() for report in (reports or {}).values()],
        },
    }
    final = Path(cache_dir) / key.entry_name
    _write_dir(final, {**files, MANIFEST: json.dumps(manifest, indent=1).encode()})
    return final


def _write_dir(final: Path, files: dict[str, bytes]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
    trash = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for name, data in files.items():  # the manifest last: it vouches for the others
            (tmp / name).write_bytes(data)
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
            try:
                os.rename(final, trash)
            except FileNotFoundError:
                trash = None
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).exists():  # not another process storing the same build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------------- loading
def load_entry(path: str | Path, key: BuildKey | None, *, device: torch.device | str,
               num_blocks: int, block_size: int, max_position: int,
               check: Callable[[Plan], None] | None = None) -> CachedBuild:
    """Rebuild the module of the entry at ``path``; raises :class:`StaleEntry` if it was written
    for another key (``key=None``: any key of this format), :class:`CorruptEntry` if it cannot
    be trusted. Checksums are verified before anything is parsed. ``check(plan)`` runs before
    anything is allocated (the memory check: its error propagates)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CorruptEntry(f"no {MANIFEST} (an incomplete or foreign directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptEntry(f"{MANIFEST} unreadable ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptEntry(f"{MANIFEST} is not an adp-pass rank build manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StaleEntry(f"format version {manifest.get('format_version')} (this adp-pass reads "
                         f"{FORMAT_VERSION})")
    if not isinstance(manifest.get("key"), dict):
        raise CorruptEntry(f"{MANIFEST} holds no key")
    if key is not None:
        differences = _key_differences(manifest["key"], key.fields)
        if differences:
            raise StaleEntry("built for " + "; ".join(differences))
    data = {}
    files = manifest.get("files")
    if not isinstance(files, dict) or GRAPH not in files or PLAN not in files:
        raise CorruptEntry(f"{MANIFEST} lists no graph or plan")
    for name, want in files.items():
        if name not in (GRAPH, PLAN, TENSORS) or not isinstance(want, dict):
            raise CorruptEntry(f"{MANIFEST} lists {name!r}, which is not a file of an entry")
        try:
            blob = (path / name).read_bytes()
        except OSError as err:
            raise CorruptEntry(f"{name} unreadable ({err.strerror or err})") from None
        if len(blob) != want.get("bytes"):
            raise CorruptEntry(f"{name} is {len(blob)} bytes, the manifest says "
                               f"{want.get('bytes')} (truncated or edited)")
        if hashlib.sha256(blob).hexdigest() != want.get("sha256"):
            raise CorruptEntry(f"{name} does not match its checksum (edited or damaged)")
        data[name] = blob
    try:
        plan = Plan.from_json(data[PLAN].decode())
    except Exception as err:  # noqa: BLE001
        raise CorruptEntry(f"{PLAN} unreadable: {type(err).__name__}: {err}") from err
    if check is not None:
        check(plan)
    try:
        tensors = {}
        if TENSORS in data:
            import safetensors.torch

            tensors = safetensors.torch.load(data[TENSORS])
        gm = deserialize(json.loads(data[GRAPH]), tensors, device=torch.device(device),
                         num_blocks=num_blocks, block_size=block_size, max_position=max_position)
    except EntryError:
        raise
    except Exception as err:  # noqa: BLE001 - anything a checked entry still fails on
        raise CorruptEntry(f"cannot rebuild the graph: {type(err).__name__}: {err}") from err
    try:
        reports = {doc["stage"]: report_from_json(doc) for doc in manifest["built"]["reports"]}
    except (KeyError, TypeError) as err:
        raise CorruptEntry(f"{MANIFEST} holds no readable stage reports ({err!r})") from None
    return CachedBuild(gm, plan, reports, path, manifest)


def _key_differences(stored: dict, wanted: dict) -> list[str]:
    out = []
    for name in sorted(set(stored) | set(wanted)):
        a, b = stored.get(name), wanted.get(name)
        if a == b:
            continue
        if name == "versions" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k} {a.get(k)} (now {b.get(k)})" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif name == "source":
            out.append("other adp_pass sources (the code changed since)")
        elif name == "config":
            changed = sorted(k for k in set(a or {}) | set(b or {})
                             if (a or {}).get(k) != (b or {}).get(k))
            out.append(f"another model config ({', '.join(changed[:5])} differ)")
        else:
            out.append(f"{name} {a!r} (now {b!r})")
    return out


# ------------------------------------------------------------------------- the graph as JSON
def serialize(gm: fx.GraphModule, plan: Plan) -> tuple[dict, dict[str, torch.Tensor]]:
    """``gm`` as a JSON-able document and the non-weight tensors to store with it. Checked by
    rebuilding the graph from the document: the code must come out identical."""
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise NotCacheable(f"graph with a {type(gm.graph._codegen).__name__} code generator")
    build_device = _build_device(gm)
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            raise NotCacheable(f"call_module node {node.name}")
        record = {
            "name": node.name,
            "op": node.op,
            "target": _encode_target(node),
            "args": _encode(node.args, build_device),
            "kwargs": _encode(node.kwargs, build_device),
        }
        if node.type is not None:
            raise NotCacheable(f"node {node.name} has a type annotation")
        meta = {k: _encode(node.meta[k], build_device) for k in NODE_META_KEYS if k in node.meta}
        if meta:
            record["meta"] = meta
        nodes.append(record)

    weights = {name for spec in plan.params for name in (spec.name, *spec.aliases)}
    record = graph_record(gm)
    kv = _kv_names(record)
    rope = set(record.lowering.cos_sin_cache) if record.lowering is not None else set()
    entries, stored, seen = [], {}, {}
    for name, tensor, is_param, persistent in _tensor_attributes(gm):
        entry = {"name": name, "param": is_param, "persistent": persistent,
                 "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
        if is_param:
            entry["requires_grad"] = tensor.requires_grad
        if id(tensor) in seen:
            entry["same_as"] = seen[id(tensor)]
        else:
            seen[id(tensor)] = name
            if name in kv:
                entry["kind"], entry["layer"] = "kv_cache", kv[name]
            elif name in rope and (recipe := _rope_recipe(gm, tensor)) is not None:
                entry["kind"], entry["recipe"] = "rope", recipe
            elif name in weights and persistent:
                entry["kind"] = "weight"
            else:
                if tensor.device.type == "meta":
                    raise NotCacheable(f"{name} is on the meta device (store a graph built for "
                                       "real, as prepare_rank builds it)")
                entry["kind"] = "stored"
                stored[name] = tensor.detach().to("cpu", copy=True).contiguous()
                if name in rope:  # a table no recipe reproduces: only good for its max_position
                    entry["max_position"] = int(tensor.shape[0])
        entries.append(entry)

    doc = {
        "nodes": nodes,
        "tensors": entries,
        "record": record.to_json(),
        "training": gm.training,
        "code_sha256": hashlib.sha256(gm.code.encode()).hexdigest(),
        "build_device": str(build_device) if build_device is not None else None,
    }
    rebuilt = _graph_from(doc["nodes"], build_device)
    if rebuilt.python_code(root_module="self").src != gm.code:
        raise NotCacheable("the graph does not rebuild to the same code")
    if _node_tags(rebuilt) != _node_tags(gm.graph):
        raise NotCacheable("the graph does not rebuild with the same node tags")
    return doc, stored


def deserialize(doc: dict, tensors: dict[str, torch.Tensor], *, device: torch.device,
                num_blocks: int, block_size: int, max_position: int) -> fx.GraphModule:
    """The module ``doc`` describes: weights as meta tensors (for the weight loader to fill), KV
    caches zeroed at ``num_blocks`` x ``block_size``, rotary tables of ``max_position`` rows,
    stored tensors on ``device``."""
    import adp_pass.runtime.cache_insertion  # noqa: F401  (registers adp.cached_attention)
    import adp_pass.runtime.kernels  # noqa: F401  (registers the other adp ops)

    device = _resolve(device)
    build_device = doc.get("build_device")
    graph = _graph_from(doc["nodes"], device if build_device is not None else None)
    record = GraphRecord.from_json(doc["record"])
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    made: dict[str, torch.Tensor] = {}
    rope_later = []
    for entry in doc["tensors"]:
        name = entry["name"]
        if "same_as" in entry:
            tensor = made[entry["same_as"]]
        else:
            dtype, shape = _dtype(entry["dtype"]), tuple(entry["shape"])
            kind = entry["kind"]
            if kind == "weight":
                tensor = torch.empty(shape, dtype=dtype, device="meta")
            elif kind == "kv_cache":
                shape = (num_blocks, block_size, *shape[2:])
                tensor = torch.zeros(shape, dtype=dtype, device=device)
            elif kind == "rope":
                tensor = torch.empty((0, shape[1]), dtype=dtype, device="meta")  # made below
                rope_later.append(entry)
            elif kind == "stored":
                if name not in tensors:
                    raise CorruptEntry(f"tensor {name} is not in {TENSORS}")
                tensor = tensors[name]
                if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                    raise CorruptEntry(f"tensor {name} is {list(tensor.shape)} {tensor.dtype}, "
                                       f"described as {list(shape)} {dtype}")
                if "max_position" in entry and entry["max_position"] != max_position:
                    raise StaleEntry(f"max_position {entry['max_position']} (now {max_position}): "
                                     f"its table {name} cannot be recomputed")
                tensor = tensor.to(device)
            else:
                raise CorruptEntry(f"tensor {name} of unknown kind {kind!r}")
            if entry["param"]:
                tensor = torch.nn.Parameter(tensor, requires_grad=entry.get("requires_grad", False))
        made[name] = tensor
        set_attr(gm, name, tensor, entry["persistent"])
    for entry in rope_later:  # after the inv_freq buffers they are computed from
        table = _rope_table(entry["recipe"], made, entry, max_position, device)
        owner, leaf = owner_of(gm, entry["name"])
        owner.register_buffer(leaf, table, persistent=entry["persistent"])
        made[entry["name"]] = table
        if record.lowering is not None and entry["name"] in record.lowering.cos_sin_cache:
            record.lowering.cos_sin_cache[entry["name"]].shape = list(table.shape)
    if record.cache is not None:
        record.cache.kv.num_blocks, record.cache.kv.block_size = num_blocks, block_size
    set_graph_record(gm, record)
    gm.train(doc.get("training", True))
    gm.graph = graph  # recompiles
    # The code is checked where it can be: a graph with device literals that were the build
    # device's names the load device instead (a build on cuda:0 served on cuda:1).
    if build_device is None or torch.device(build_device) == device:
        if hashlib.sha256(gm.code.encode()).hexdigest() != doc["code_sha256"]:
            raise CorruptEntry("the graph does not rebuild to the code it was stored with")
    return gm


def _graph_from(records: list[dict], device: torch.device | None) -> fx.Graph:
    graph = fx.Graph()
    made: dict[str, fx.Node] = {}
    for record in records:
        name = record["name"]
        target = _decode_target(record["op"], record["target"])
        args = _decode(record["args"], made, device)
        kwargs = _decode(record["kwargs"], made, device)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise CorruptEntry(f"node {name}: malformed args")
        node = graph.create_node(record["op"], target, args, kwargs, name=name)
        if node.name != name:
            raise CorruptEntry(f"node {name} came back as {node.name}")
        for k, v in record.get("meta", {}).items():
            node.meta[k] = _decode(v, made, device)
        made[name] = node
    return graph


def _node_tags(graph: fx.Graph) -> list:
    return [(n.name, {k: n.meta[k] for k in NODE_META_KEYS if k in n.meta}) for n in graph.nodes]


def _tensor_attributes(gm: torch.nn.Module):
    """(name, tensor, is_parameter, persistent) of every parameter and buffer, module by module in
    registration order (aliases included), so the rebuilt module keeps the same order."""
    for prefix, module in gm.named_modules(remove_duplicate=False):
        dotted = f"{prefix}." if prefix else ""
        for leaf, tensor in module._parameters.items():
            if tensor is not None:
                yield dotted + leaf, tensor, True, True
        for leaf, tensor in module._buffers.items():
            if tensor is not None:
                yield dotted + leaf, tensor, False, leaf not in module._non_persistent_buffers_set


def _kv_names(record: GraphRecord) -> dict[str, int]:
    count = record.cache.attention_cores if record.cache is not None else 0
    return {f"kv_cache_{i}_{kind}": i for i in range(count) for kind in ("k", "v")}


def _build_device(gm: fx.GraphModule) -> torch.device | None:
    for tensor in list(gm.parameters()) + list(gm.buffers()):
        if tensor.device.type != "meta":
            return _resolve(tensor.device)
    return None


def _resolve(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ------------------------------------------------------------------------- rotary cos/sin tables
def _inv_freq_buffers(gm: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, t) for name, t, is_param, persistent in _tensor_attributes(gm)
            if not is_param and not persistent and name.endswith("inv_freq")]


def _rope_recipe(gm: fx.GraphModule, table: torch.Tensor) -> dict | None:
    """How the lowering made ``table`` (qk_norm_rope's rule: the default rope formula when the
    buffer's values give a rope theta, else tabulated from the buffer), verified bit for bit."""
    from adp_pass.runtime.lower.qk_norm_rope import rope_theta_of

    if table.dim() != 2 or table.device.type == "meta":
        return None
    for name, inv_freq in _inv_freq_buffers(gm):
        if inv_freq.device.type == "meta":
            continue
        recipe = {"inv_freq": name, "theta": rope_theta_of(inv_freq, table.shape[1])}
        candidate = _make_table(recipe, inv_freq, table.shape[0], table.shape[1], table.dtype,
                                table.device)
        if candidate.shape == table.shape and torch.equal(candidate, table):
            return recipe
    return None


def _make_table(recipe: dict, inv_freq: torch.Tensor, rows: int, head_dim: int,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    from adp_pass.runtime.kernels import build_cos_sin_cache
    from adp_pass.runtime.lower.qk_norm_rope import cos_sin_cache_from_inv_freq

    if recipe["theta"] is not None:
        return build_cos_sin_cache(rows, head_dim, recipe["theta"], dtype, device)
    return cos_sin_cache_from_inv_freq(inv_freq, rows, dtype, device)


def _rope_table(recipe: dict, made: dict, entry: dict, max_position: int,
                device: torch.device) -> torch.Tensor:
    inv_freq = made.get(recipe.get("inv_freq"))
    if inv_freq is None or inv_freq.device.type == "meta":
        raise CorruptEntry(f"{entry['name']}: its inv_freq buffer {recipe.get('inv_freq')} is "
                           "missing")
    return _make_table(recipe, inv_freq, max_position, entry["shape"][1], _dtype(entry["dtype"]),
                       device)


# --------------------------------------------------------------------------- value encoding
def _encode(value: Any, build_device: torch.device | None) -> Any:
    """JSON for an fx argument: scalars as themselves, everything else as a one-key object."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v, build_device) for v in value]
        return {"tuple": items} if isinstance(value, tuple) else {"list": items}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, build_device), _encode(v, build_device)]
                         for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode(v, build_device) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": _dtype_name(value)}
    if isinstance(value, torch.device):
        if build_device is not None and _resolve(value) == build_device:
            return {"device": _BUILD_DEVICE}
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise NotCacheable(f"a {type(value).__name__} value ({value!r:.60})")


def _decode(value: Any, nodes: dict[str, fx.Node], device: torch.device | None) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise CorruptEntry(f"malformed value {value!r:.60}")
    (tag, payload), = value.items()
    if tag == "node":
        if payload not in nodes:
            raise CorruptEntry(f"reference to unknown node {payload!r}")
        return nodes[payload]
    if tag == "list":
        return [_decode(v, nodes, device) for v in payload]
    if tag == "tuple":
        return tuple(_decode(v, nodes, device) for v in payload)
    if tag == "dict":
        return {_decode(k, nodes, device): _decode(v, nodes, device) for k, v in payload}
    if tag == "slice":
        return slice(*(_decode(v, nodes, device) for v in payload))
    if tag == "dtype":
        return _dtype(payload)
    if tag == "device":
        if payload == _BUILD_DEVICE:
            if device is None:
                raise CorruptEntry("a build-device literal without a build device")
            return device
        return torch.device(payload)
    if tag in ("layout", "memory_format"):
        kind = torch.layout if tag == "layout" else torch.memory_format
        found = getattr(torch, str(payload), None)
        if not isinstance(found, kind):
            raise CorruptEntry(f"unknown {tag} {payload!r}")
        return found
    raise CorruptEntry(f"unknown value tag {tag!r}")


def _encode_target(node: fx.Node) -> Any:
    target = node.target
    if node.op in ("placeholder", "get_attr", "output", "call_method"):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return {"op": [target.namespace, target.overloadpacket.__name__, target._overloadname]}
    if isinstance(target, torch._ops.OpOverloadPacket):
        return {"op": [target._qualified_op_name.split("::")[0], target.__name__, None]}
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if module and qualname and _call_module_allowed(module):
        try:
            if _resolve_call(module, qualname) is target:
                return {"call": [module, qualname]}
        except (ImportError, AttributeError):
            pass
    raise NotCacheable(f"node {node.name} calls {target!r}, which is not stored by name")


def _decode_target(op: str, target: Any) -> Any:
    if op in ("placeholder", "get_attr", "output", "call_method"):
        if not isinstance(target, str):
            raise CorruptEntry(f"malformed {op} target")
        return target
    if op != "call_function" or not isinstance(target, dict) or len(target) != 1:
        raise CorruptEntry(f"malformed node ({op})")
    (tag, payload), = target.items()
    try:
        if tag == "op":
            namespace, name, overload = payload
            packet = getattr(getattr(torch.ops, namespace), name)
            return packet if overload is None else getattr(packet, overload)
        if tag == "call":
            module, qualname = payload
            if not _call_module_allowed(module):
                raise CorruptEntry(f"call target in module {module!r} is not allowed")
            return _resolve_call(module, qualname)
    except (AttributeError, ImportError, RuntimeError, ValueError, TypeError) as err:
        raise CorruptEntry(f"unknown call target {payload!r} ({err})") from None
    raise CorruptEntry(f"unknown target tag {tag!r}")


def _call_module_allowed(module: str) -> bool:
    return module in _CALL_MODULES or module == "torch" or module.startswith("torch.")


def _resolve_call(module: str, qualname: str) -> Any:
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    found = getattr(torch, str(name), None)
    if not isinstance(found, torch.dtype):
        raise CorruptEntry(f"unknown dtype {name!r}")
    return found


__all__ = [
    "BuildCacheWarning", "BuildKey", "CachedBuild", "CorruptEntry", "EntryError", "Lookup",
    "NotCacheable", "StaleEntry", "build_key", "default_cache_dir", "deserialize", "load_entry",
    "lookup", "serialize", "source_hash", "store", "versions",
]
