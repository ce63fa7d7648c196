"""The plan: plain data that ``detect`` produces and ``rewrite`` executes.

Everything refers to graph nodes and attributes by name, so a plan prints, serialises to JSON,
diffs, and is unit-tested without a graph. ``str(plan)`` is the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

from adp_pass.mapping import Mapping


# node.meta key naming the group (by tag: "world", "attn", "mlp") a collective of a rewritten
# graph runs over; the runtime binds each tag to the real group (adp_pass.runtime.groups).
GROUP_TAG = "adp_group"


@dataclass(frozen=True)
class ShardedWeight:
    """How one weight of a site is split over the TP ranks."""

    attr: str  # attribute name in the captured module
    layout: str  # "column" (output dim), "row" (input dim) or "vocab" (embedding rows)
    dim: int  # the stored tensor's sharded dim
    segments: tuple[int, ...] = ()  # local sizes of fused blocks along ``dim`` (q|k|v, gate|up)


@dataclass(frozen=True)
class Site:
    """One collective the rewrite removes, and how.

    Removal is "redirect ``replaced``'s users to ``replacement``", after re-pointing argument
    ``rewire`` entries ``(node, arg index, new input)``; the collective, its wait and whatever
    only they used are then dead.
    """

    kind: str  # "attention_out" | "mlp_out" | "embedding" | "lm_head_gather"
    collective: str
    wait: str | None
    group: str
    producer: str  # the node whose (partial) result the collective combined
    replaced: str
    replacement: str
    rewire: tuple[tuple[str, int, str], ...] = ()
    weights: tuple[ShardedWeight, ...] = ()
    block_input: str | None = None  # the tensor the block's column linears read (through views)
    # What the mapping does with the site: "remove" it (the block's weights become full),
    # "keep" it over the ranks of ``group_tag`` (a sub-group: weights regrouped to it), or
    # "gather_scatter": all-gather ``block_input`` over the group along dim 0 (the batch) and
    # reduce-scatter the block's partial output, the block staying sharded over the group.
    action: str = "remove"
    group_tag: str = ""  # "attn" | "mlp" | "world": the group a kept/inserted collective uses
    group_size: int = 0

    def remove(self, graph: fx.Graph) -> None:
        nodes = {n.name: n for n in graph.nodes}
        for node_name, index, source in self.rewire:
            node = nodes[node_name]
            args = list(node.args)
            args[index] = nodes[source]
            node.args = tuple(args)
        nodes[self.replaced].replace_all_uses_with(nodes[self.replacement])
        for name in (self.wait, self.collective):
            if name is not None and not nodes[name].users:
                graph.erase_node(nodes[name])


@dataclass(frozen=True)
class ParamSpec:
    """A parameter of the rewritten module: its TP layout and the full shape it gets."""

    name: str
    aliases: tuple[str, ...]
    layout: str  # "column" | "row" | "vocab" | "replicated"
    dim: int | None
    segments: tuple[int, ...]
    local_shape: tuple[int, ...]
    full_shape: tuple[int, ...]
    dtype: str
    role: str = ""  # "attention" | "mlp" | "vocab": the site kind that shards it ("" replicated)
    parts: int = 1  # ranks the rewritten job splits it over (1: each holds it whole)

    @property
    def held_shape(self) -> tuple[int, ...]:
        """The shape one rank holds after the rewrite: the full shape split ``parts`` ways."""
        if self.dim is None or self.parts == 1:
            return self.full_shape
        return tuple(s // self.parts if d == self.dim else s for d, s in enumerate(self.full_shape))

    def held_ranges(self, rank: int) -> list[tuple[int, int]]:
        """``(start, length)`` ranges of the full tensor's ``dim`` that rank ``rank`` holds after
        the rewrite: part ``rank % parts`` of each fused segment (groups are consecutive ranks)."""
        if self.dim is None or self.parts == 1:
            return [(0, self.full_shape[self.dim] if self.dim is not None else 1)]
        tp = self.full_shape[self.dim] // self.local_shape[self.dim]
        scale, index = tp // self.parts, rank % self.parts
        ranges, offset = [], 0
        for local in self.segments:
            ranges.append((offset + index * local * scale, local * scale))
            offset += local * tp
        return ranges

    def held_part(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s tensor after the rewrite, cut from the full one."""
        if self.dim is None or self.parts == 1:
            return full
        return torch.cat([full.narrow(self.dim, s, n) for s, n in self.held_ranges(rank)], self.dim)

    def shard_ranges(self, rank: int, tp_size: int) -> list[tuple[int, int]]:
        """``(start, length)`` ranges of the full tensor's ``dim`` that rank ``rank`` holds."""
        if self.dim is None:
            return [(0, self.full_shape[0] if self.full_shape else 1)]
        ranges, offset = [], 0
        for local in self.segments:
            ranges.append((offset + rank * local, local))
            offset += local * tp_size
        return ranges

    def assemble(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's shard (rank order), undoing fused layouts."""
        if self.dim is None:
            return shards[0]
        pieces = [shard.split(list(self.segments), dim=self.dim) for shard in shards]
        blocks = [torch.cat([p[j] for p in pieces], dim=self.dim) for j in range(len(self.segments))]
        return torch.cat(blocks, dim=self.dim)

    def shard(self, full: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
        """Rank ``rank``'s shard of the full tensor (the inverse of :meth:`assemble`)."""
        if self.dim is None:
            return full
        return torch.cat(
            [full.narrow(self.dim, s, n) for s, n in self.shard_ranges(rank, tp_size)], self.dim
        )


@dataclass(frozen=True)
class ShapeFix:
    """One size in a node's arguments that held a per-rank count.

    A constant is replaced (``old`` -> ``new``); a symbolic size (e.g. batch * local heads) is
    multiplied by ``new`` (``multiply``, with ``old`` 1) through a new ``mul`` node.
    """

    node: str
    target: str
    arg: int
    index: int | None  # position inside a list argument, or None for a scalar argument
    old: int
    new: int
    multiply: bool = False

    def apply(self, graph: fx.Graph, nodes: dict[str, fx.Node]) -> None:
        """Change the node in ``graph`` (a size multiplied by a new ``mul`` node)."""
        node = nodes[self.node]

        def multiply(current: fx.Node) -> fx.Node:
            with graph.inserting_before(node):
                return graph.call_function(operator.mul, (current, self.new))

        node.args = tuple(self._fixed(list(node.args), multiply))

    def apply_to_values(self, args: list) -> list:
        """The same change on argument values (ints, SymInts, lists of them)."""
        return self._fixed(list(args), lambda current: current * self.new)

    def _fixed(self, args: list, multiply) -> list:
        values = list(args[self.arg]) if self.index is not None else None
        current = values[self.index] if values is not None else args[self.arg]
        value = multiply(current) if self.multiply else self.new
        if values is None:
            args[self.arg] = value
        else:
            values[self.index] = value
            args[self.arg] = values
        return args


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """A digest of the graph's nodes and its attributes' shapes: what a plan was made for."""
    digest = hashlib.sha256(str(gm.graph).encode())
    for name, tensor in (*gm.named_parameters(), *gm.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
    return digest.hexdigest()[:16]


@dataclass
class Plan:
    mapping: Mapping
    rank: int
    sites: list[Site]
    params: list[ParamSpec]
    shape_fixes: list[ShapeFix]
    views_to_copy: list[str] = field(default_factory=list)  # view nodes that become reshape
    unclassified: list[str] = field(default_factory=list)
    # Fake values of every node after the rewrite, from detect's walk: lets rewrite refresh
    # node metadata without walking the graph again. Not part of the plan's data.
    node_values: dict = field(default_factory=dict, repr=False, compare=False)
    # Each live node's layout (adp_pass.sharding.Layout): which dims grew. Lets rewrite's
    # self-check take rank r's part of a full value. Not part of the plan's data either.
    node_layouts: dict = field(default_factory=dict, repr=False, compare=False)
    # graph_fingerprint() of the graph detect read: rewrite refuses any other graph.
    fingerprint: str = ""

    @property
    def replicated_only(self) -> bool:
        """Every site removed and every weight whole: the graph keeps no collective."""
        return all(s.action == "remove" for s in self.sites) and all(
            p.parts == 1 for p in self.params)

    def counts(self) -> dict[str, int]:
        return dict(Counter(site.kind for site in self.sites))

    @property
    def num_layers(self) -> int:
        return self.counts().get("attention_out", 0)

    def to_dict(self) -> dict:
        return {
            "mapping": self.mapping.to_dict(),
            "rank": self.rank,
            "counts": self.counts(),
            "sites": [asdict(s) for s in self.sites],
            "params": [asdict(p) for p in self.params],
            "shape_fixes": [asdict(f) for f in self.shape_fixes],
            "views_to_copy": self.views_to_copy,
            "unclassified": self.unclassified,
            "fingerprint": self.fingerprint,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """The plan :meth:`to_dict` wrote (the fake values and layouts detect kept aside are not
        part of the data; ``rewrite`` recomputes shapes without them)."""
        def site(d: dict) -> Site:
            d = dict(d, weights=tuple(ShardedWeight(**dict(w, segments=tuple(w["segments"])))
                                      for w in d["weights"]),
                     rewire=tuple(tuple(r) for r in d["rewire"]))
            return Site(**d)

        def param(d: dict) -> ParamSpec:
            return ParamSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

        return cls(
            mapping=Mapping.from_dict(data["mapping"]),
            rank=data["rank"],
            sites=[site(d) for d in data["sites"]],
            params=[param(d) for d in data["params"]],
            shape_fixes=[ShapeFix(**f) for f in data["shape_fixes"]],
            views_to_copy=list(data["views_to_copy"]),
            unclassified=list(data["unclassified"]),
            fingerprint=data.get("fingerprint", ""),
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        counts = self.counts()
        lines = [
            f"adp plan: rank {self.rank}, mapping {self.mapping}",
            f"  sites: {len(self.sites)} "
            + "(" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "); "
            + ", ".join(f"{a} {n}" for a, n in sorted(Counter(
                f"{s.action}" + (f" over {s.group_tag} ({s.group_size})" if s.action != "remove"
                                 else "") for s in self.sites).items())),
            f"  layers: {self.num_layers}, unclassified collectives: {len(self.unclassified)}",
            "",
            f"  {'site':<16} {'collective':<28} {'action':<15} producer",
        ]
        for site in self.sites:
            lines.append(
                f"  {site.kind:<16} {site.collective:<28} {site.action:<15} {site.producer}"
            )
        by_layout = Counter(p.layout for p in self.params)
        local = sum(math.prod(p.local_shape) for p in self.params)
        full = sum(math.prod(p.held_shape) for p in self.params)
        lines += [
            "",
            "  parameters: "
            + ", ".join(f"{k} {v}" for k, v in sorted(by_layout.items()))
            + f"; elements per rank {local:,} -> {full:,} ({full / max(local, 1):.2f}x)",
        ]
        for p in self.params:
            if p.layout != "replicated":
                seg = f" segments {list(p.segments)}" if len(p.segments) > 1 else ""
                split = f" (1/{p.parts} of {list(p.full_shape)})" if p.parts > 1 else ""
                lines.append(
                    f"  {p.layout:<7} dim {p.dim} {str(list(p.local_shape)):<14} -> "
                    f"{str(list(p.held_shape)):<14} {p.name}{seg}{split}"
                )
        lines += ["", f"  shape constants fixed: {len(self.shape_fixes)}"]
        for fix in self.shape_fixes[:12]:
            where = f"[{fix.index}]" if fix.index is not None else ""
            change = f"x{fix.new}" if fix.multiply else f"{fix.old} -> {fix.new}"
            lines.append(f"  {fix.node:<28} {fix.target:<24} arg {fix.arg}{where}: {change}")
        if len(self.shape_fixes) > 12:
            lines.append(f"  ... {len(self.shape_fixes) - 12} more")
        if self.views_to_copy:
            lines.append(f"  views that become reshape (copy) at full size: {len(self.views_to_copy)}")
        for item in self.unclassified:
            lines.append(f"  UNCLASSIFIED {item}")
        return "\n".join(lines)

