"""Each site pattern of ``patterns/`` on tiny hand-built FX graphs: exact match counts, what a
match records, and near-miss graphs that must not match.

The graphs are one rank of a 2-way TP decoder written op by op (a few nodes per layer, values on
fake tensors), so these tests take well under a second; the whole-model tests
(test_structure.py, test_source_styles.py) stay the integration check.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from adp_pass.fx_vocab import COLLECTIVE_OPS, is_op
from adp_pass.patterns import (
    SITE_PATTERNS,
    attention_allreduce,
    embedding_allreduce,
    lm_head_gather,
    mlp_allreduce,
)

aten = torch.ops.aten
funcol = torch.ops._c10d_functional
TP, GROUP = 2, "tp"
TOKENS, HIDDEN, HEADS, HEAD_DIM, INTER, VOCAB = 6, 8, 2, 4, 16, 10  # per-rank sizes


class TinyGraph:
    """Builds a graph node by node; every node gets its value on fake tensors."""

    def __init__(self) -> None:
        self.graph, self.root = fx.Graph(), torch.nn.Module()
        self.mode = FakeTensorMode()

    def input(self, name: str, shape: tuple, dtype=torch.float32) -> fx.Node:
        node = self.graph.placeholder(name)
        node.meta["val"] = self.mode.from_tensor(torch.zeros(shape, dtype=dtype))
        return node

    def weight(self, name: str, shape: tuple) -> fx.Node:
        self.root.register_parameter(name, torch.nn.Parameter(torch.zeros(shape),
                                                              requires_grad=False))
        node = self.graph.get_attr(name)
        node.meta["val"] = self.mode.from_tensor(getattr(self.root, name))
        return node

    def op(self, target, *args) -> fx.Node:
        node = self.graph.call_function(target, args)
        values = fx.node.map_arg(args, lambda n: n.meta["val"])
        with self.mode:
            node.meta["val"] = target(*values)
        return node

    def collective(self, target, *args) -> fx.Node:
        """A functional collective and its wait; the value is what one rank gets back."""
        node = self.graph.call_function(target, args)
        value = args[0].meta["val"]
        if target is funcol.all_gather_into_tensor.default:
            with self.mode:
                value = torch.cat([value] * args[1])
        node.meta["val"] = value
        wait = self.graph.call_function(funcol.wait_tensor.default, (node,))
        wait.meta["val"] = value
        return wait

    def linear(self, x: fx.Node, name: str, out_features: int) -> fx.Node:
        """``mm(x, t(W))``: how AOTAutograd writes a bias-free ``nn.Linear``."""
        weight = self.weight(name, (out_features, x.meta["val"].shape[-1]))
        return self.op(aten.mm.default, x, self.op(aten.t.default, weight))

    def module(self, output: fx.Node) -> fx.GraphModule:
        self.graph.output((output,))
        return fx.GraphModule(self.root, self.graph)


def attention(b: TinyGraph, x: fx.Node, layer: int, *, core: str = "sdpa",
              fused: bool = False) -> fx.Node:
    """q/k/v column linears → attention core → o_proj row linear → all-reduce."""
    width = HEADS * HEAD_DIM
    if fused:  # one qkv_proj, split along its last dim
        qkv = b.linear(x, f"l{layer}_qkv", 3 * width)
        split = b.op(aten.split_with_sizes.default, qkv, [width, width, width], -1)
        q, k, v = (b.op(operator.getitem, split, i) for i in range(3))
    else:
        q, k, v = (b.linear(x, f"l{layer}_{n}", width) for n in "qkv")
    q, k, v = (b.op(aten.transpose.int, b.op(aten.view.default, t, [1, TOKENS, HEADS, HEAD_DIM]),
                    1, 2) for t in (q, k, v))
    if core == "sdpa":
        out = b.op(aten.scaled_dot_product_attention.default, q, k, v)
    elif core == "softmax":  # SDPA decomposed, as on meta tensors
        scores = b.op(aten.matmul.default, q, b.op(aten.transpose.int, k, -2, -1))
        out = b.op(aten.matmul.default, b.op(aten._softmax.default, scores, -1, False), v)
    else:  # near miss: mixes q and k but has no attention core
        out = b.op(aten.add.Tensor, q, k)
    flat = b.op(aten.reshape.default, b.op(aten.transpose.int, out, 1, 2), [TOKENS, width])
    return b.collective(funcol.all_reduce.default, b.linear(flat, f"l{layer}_o", HIDDEN),
                        "sum", GROUP)


def mlp(b: TinyGraph, x: fx.Node, layer: int, *, activation=aten.silu.default,
        reduce_op: str = "sum") -> fx.Node:
    """gate/up column linears → activation(gate) * up → down row linear → all-reduce."""
    gate, up = b.linear(x, f"l{layer}_gate", INTER), b.linear(x, f"l{layer}_up", INTER)
    hidden = b.op(aten.mul.Tensor, b.op(activation, gate), up)
    return b.collective(funcol.all_reduce.default, b.linear(hidden, f"l{layer}_down", HIDDEN),
                        reduce_op, GROUP)


def embedding(b: TinyGraph, ids: fx.Node, *, projected: bool = False) -> fx.Node:
    """This rank's rows of a vocab-parallel table: shift the ids, clamp, look up, all-reduce."""
    table = b.weight("embed", (VOCAB, HIDDEN))
    local_ids = b.op(aten.clamp.default, b.op(aten.sub.Tensor, ids, VOCAB), 0, VOCAB - 1)
    rows = b.op(aten.embedding.default, table, local_ids)
    if projected:  # near miss: a linear layer between the lookup and the reduce
        rows = b.linear(b.op(aten.view.default, rows, [TOKENS, HIDDEN]), "embed_proj", HIDDEN)
    summed = b.collective(funcol.all_reduce.default, rows, "sum", GROUP)
    return b.op(aten.view.default, summed, [TOKENS, HIDDEN])


def lm_head(b: TinyGraph, x: fx.Node, *, join_dim: int = -1) -> fx.Node:
    """Column-parallel head: gather every rank's logits, chunk them by rank, lay side by side."""
    gathered = b.collective(funcol.all_gather_into_tensor.default,
                            b.linear(x, "lm_head", VOCAB), TP, GROUP)
    chunks = b.op(aten.chunk.default, gathered, TP)
    return b.op(aten.cat.default, [b.op(operator.getitem, chunks, r) for r in range(TP)],
                join_dim)


def decoder(layers: int = 1, **variants) -> fx.GraphModule:
    b = TinyGraph()
    ids = b.input("input_ids", (2, TOKENS // 2), torch.int64)
    h = embedding(b, ids, projected=variants.get("projected_embedding", False))
    for layer in range(layers):
        h = b.op(aten.add.Tensor, h, attention(b, h, layer, core=variants.get("core", "sdpa"),
                                               fused=variants.get("fused", False)))
        h = b.op(aten.add.Tensor, h, mlp(b, h, layer,
                                         activation=variants.get("activation", aten.silu.default),
                                         reduce_op=variants.get("reduce_op", "sum")))
    return b.module(lm_head(b, h, join_dim=variants.get("join_dim", -1)))


def matches(gm: fx.GraphModule, pattern) -> list:
    return [site for n in gm.graph.nodes if is_op(n, COLLECTIVE_OPS)
            for site in [pattern.match(n)] if site is not None]


def counts(gm: fx.GraphModule) -> dict[str, int]:
    return {p.KIND: len(matches(gm, p)) for p in SITE_PATTERNS}


@pytest.mark.parametrize("layers", [1, 3])
def test_each_pattern_matches_its_sites_exactly(layers):
    gm = decoder(layers)
    assert counts(gm) == {"attention_out": layers, "mlp_out": layers, "embedding": 1,
                          "lm_head_gather": 1}
    # No collective is claimed by two patterns.
    collectives = [n for n in gm.graph.nodes if is_op(n, COLLECTIVE_OPS)]
    assert len(collectives) == 2 * layers + 2
    assert all(sum(p.match(n) is not None for p in SITE_PATTERNS) == 1 for n in collectives)


def test_attention_site_records_its_weights_and_wiring():
    (site,) = matches(decoder(), attention_allreduce)
    assert site.kind == "attention_out" and site.group == GROUP
    assert [(w.attr, w.layout, w.dim) for w in site.weights] == [
        ("l0_o", "row", 1), ("l0_q", "column", 0), ("l0_k", "column", 0), ("l0_v", "column", 0)]
    assert site.wait is not None and site.replaced == site.wait
    assert site.replacement == site.producer  # the o_proj matmul's output takes the wait's place
    assert site.block_input is not None  # q, k and v read one tensor: the residual stream


def test_attention_accepts_decomposed_softmax_and_fused_qkv():
    assert counts(decoder(core="softmax"))["attention_out"] == 1
    (site,) = matches(decoder(fused=True), attention_allreduce)
    (qkv,) = [w for w in site.weights if w.layout == "column"]
    width = HEADS * HEAD_DIM
    assert qkv.attr == "l0_qkv" and qkv.segments == (width, width, width)


def test_attention_near_miss_without_an_attention_core():
    gm = decoder(core="none")
    assert counts(gm) == {"attention_out": 0, "mlp_out": 1, "embedding": 1, "lm_head_gather": 1}


def test_mlp_site_records_down_gate_and_up():
    (site,) = matches(decoder(), mlp_allreduce)
    assert [(w.attr, w.layout) for w in site.weights] == [
        ("l0_down", "row"), ("l0_gate", "column"), ("l0_up", "column")]


@pytest.mark.parametrize("variant", [{"activation": aten.relu.default}, {"reduce_op": "max"}])
def test_mlp_near_misses(variant):
    """A relu MLP is no gated SiLU block; a max-reduce is no partial sum."""
    assert counts(decoder(**variant))["mlp_out"] == 0


def test_embedding_site_rewires_the_lookup_to_the_raw_ids():
    (site,) = matches(decoder(), embedding_allreduce)
    assert [(w.attr, w.layout, w.dim) for w in site.weights] == [("embed", "vocab", 0)]
    ((node, arg, source),) = site.rewire
    assert node == site.producer and arg == 1 and source == "input_ids"


def test_embedding_near_miss_with_a_linear_before_the_reduce():
    assert counts(decoder(projected_embedding=True))["embedding"] == 0


def test_lm_head_site_replaces_the_joining_cat():
    gm = decoder()
    (site,) = matches(gm, lm_head_gather)
    cat = next(n for n in gm.graph.nodes if is_op(n, {aten.cat.default}))
    assert site.replaced == cat.name and site.replacement == site.producer
    assert [(w.attr, w.layout, w.dim, w.segments) for w in site.weights] == [
        ("lm_head", "column", 0, (VOCAB,))]


def test_lm_head_near_miss_joined_along_the_rows():
    """Gathered blocks stacked along dim 0 are not one rank's vocab columns side by side."""
    assert counts(decoder(join_dim=0))["lm_head_gather"] == 0
