"""Layouts of the TP-sharded axis: which dims of a tensor grow in the rewrite, and how.

A tensor's layout is, per sharded dim, a list of segments. A segment of local length ``L`` with
block ``B`` (``L = o * B``) holds, in the full tensor, ``tp * L`` entries laid out as ``o`` runs
of ``tp`` rank blocks of ``B``: local index ``a * B + j`` of rank ``r`` is full index
``a * tp * B + r * B + j``. A plain column shard is one segment with ``o = 1``; a fused
``q|k|v`` or ``gate|up`` output has one segment per fused block. A *partial* tensor holds one
rank's addend of a sum (a row-parallel linear before its all-reduce). ``sharding.py`` derives
the layouts; this module is the algebra they share with the shape fixes and the self-check.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Any, Iterable

import sympy
import torch
import torch.fx as fx

aten = torch.ops.aten

INT_MAX = 2**62


@dataclass(frozen=True)
class Segment:
    length: Any  # local size (an int, or a sympy expression for a symbolic dim)
    block: Any  # each rank's contiguous block inside it


DimLayout = tuple[Segment, ...]


@dataclass(frozen=True)
class Layout:
    dims: tuple[tuple[int, DimLayout], ...] = ()
    partial: bool = False
    deps: frozenset = frozenset()  # names of the view decisions this layout rests on

    def at(self, dim: int) -> DimLayout | None:
        return dict(self.dims).get(dim)

    @property
    def replicated(self) -> bool:
        return not self.dims and not self.partial

    def describe(self) -> str:
        if self.partial:
            return "a partial sum"
        if not self.dims:
            return "replicated"
        return ", ".join(f"dim {d} sharded ({_segments_text(s)})" for d, s in self.dims)


REPLICATED = Layout()


def _layout(dims: dict[int, DimLayout], deps: frozenset, partial: bool = False) -> Layout:
    return Layout(tuple(sorted(dims.items())), partial, deps)


def _segments_text(segments: DimLayout) -> str:
    return " | ".join(f"{s.length} in blocks of {s.block}" for s in segments)


def grown_shape(shape: Iterable, layout: Layout, growth: int) -> list:
    """The shape a tensor has after the rewrite: its sharded dims ``growth`` times larger."""
    shape = list(shape)
    for dim, _ in layout.dims:
        shape[dim] = shape[dim] * growth
    return shape


def expected_shape(old: torch.Tensor, new: torch.Tensor, layout: Layout, growth: int) -> list | None:
    """The shape ``new`` should have (``old``'s, grown as ``layout`` says), or None if it has
    it. Symbolic sizes are compared as expressions, or skipped against concrete ones."""
    want = list(old.shape) if layout.partial else grown_shape(old.shape, layout, growth)
    have = list(new.shape)
    if len(want) != len(have):
        return want
    for w, h in zip(want, have):
        symbolic = isinstance(w, torch.SymInt) or isinstance(h, torch.SymInt)
        if symbolic and isinstance(w, torch.SymInt) and isinstance(h, torch.SymInt):
            if _expr(w) != _expr(h):
                return want
        elif not symbolic and int(w) != int(h):
            return want
    return None


def local_part(
    full: torch.Tensor, layout: Layout, rank: int, growth: int, symbols: dict | None = None
) -> torch.Tensor:
    """Rank ``rank``'s local tensor inside the full one (the inverse of the growth).
    ``symbols`` gives values to symbolic sizes (batch, sequence) in the layout."""
    for dim, segments in layout.dims:
        pieces, offset = [], 0
        for seg in segments:
            length, block = (int(_expr(v).subs(symbols or {})) for v in (seg.length, seg.block))
            part = full.narrow(dim, offset, length * growth)
            shape = (*part.shape[:dim], length // block, growth, block, *part.shape[dim + 1:])
            pieces.append(part.reshape(shape).select(dim + 1, rank).flatten(dim, dim + 1))
            offset += length * growth
        full = torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]
    return full


def _expr(size: Any) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return size.node.expr
    if isinstance(size, sympy.Expr):
        return size
    return sympy.Integer(int(size))


def _divides(small: Any, big: Any) -> bool:
    """Whether ``small`` provably divides ``big`` (symbols are positive integers)."""
    return _expr_divides(_expr(small), _expr(big))


@functools.lru_cache(maxsize=4096)
def _expr_divides(small: sympy.Expr, big: sympy.Expr) -> bool:
    # Cached: every decoder layer asks the same questions, and sympy.simplify is slow.
    quotient = sympy.simplify(big / small)
    return bool(quotient.is_integer) and bool(quotient.is_positive)


def _is_concrete(size: Any) -> bool:
    return _expr(size).is_number


def _plain(size: Any) -> Any:
    """An int where the size is a number, else the sympy expression."""
    expr = sympy.simplify(_expr(size))
    return int(expr) if expr.is_number else expr



class _Conflict(Exception):
    def __init__(self, node: fx.Node, reason: str, deps: frozenset, final: bool = False) -> None:
        super().__init__(reason)
        self.node, self.reason, self.deps = node, reason, deps
        self.final = final  # no other choice of layouts can help (an op without a rule)


class _Restart(Exception):
    """A constraint found later changed an earlier node: walk again from ``node``."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node: fx.Node) -> list:
    return list(node.meta["val"].shape)


def view_groups(old_in: list, old_out: list) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output dims whose products match (view semantics)."""
    in_products, out_products, acc = [], [], sympy.Integer(1)
    for size in old_in:
        acc = acc * _expr(size)
        in_products.append(sympy.expand(acc))
    acc = sympy.Integer(1)
    for size in old_out:
        acc = acc * _expr(size)
        out_products.append(sympy.expand(acc))
    groups, last_in, last_out = [], -1, -1
    for i, product in enumerate(in_products):
        for j in range(last_out + 1, len(out_products)):
            if out_products[j] == product:
                groups.append((list(range(last_in + 1, i + 1)), list(range(last_out + 1, j + 1))))
                last_in, last_out = i, j
                break
    if last_in < len(old_in) - 1 or last_out < len(old_out) - 1:
        groups.append(
            (list(range(last_in + 1, len(old_in))), list(range(last_out + 1, len(old_out))))
        )
    return groups

