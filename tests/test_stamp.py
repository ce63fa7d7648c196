"""Layer stamping (adp_pass/stamp.py): a capture that traces two decoder layers and copies the
second must give the graph, the weights and the outputs of a trace of every layer."""

import pytest
import torch
import torch.fx as fx

from adp_pass.capture import _stampable, capture_hf, fake_process_group
from adp_pass.presets import model_config
from adp_pass.stamp import (NotStampable, _layer_of_node, find_layer_spans, is_size_node,
                            stamp_layers)


def _structure(gm: fx.GraphModule) -> list[tuple]:
    """The graph with node names replaced by positions: equal iff the programs are equal."""
    index: dict[fx.Node, int] = {}
    rows = []

    def canon(value):
        if isinstance(value, fx.Node):
            return ("node", index[value])
        if isinstance(value, (list, tuple)):
            return tuple(canon(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, canon(v)) for k, v in sorted(value.items()))
        return repr(value)

    for position, node in enumerate(gm.graph.nodes):
        index[node] = position
        rows.append((node.op, str(node.target), canon(node.args), canon(node.kwargs)))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("preset,layers,world", [
    ("tiny", 4, 2),
    # another family and world size (opt-in, CI time: every family's capture is stamped, and
    # tests/test_families.py checks qwen2's rewritten ranks against transformers)
    pytest.param("qwen2-tiny", 3, 4, marks=pytest.mark.full),
])
@pytest.mark.slow  # a whole trace of every layer beside the stamped one
def test_stamped_capture_equals_the_trace_of_every_layer(preset, layers, world):
    config = model_config(preset, num_hidden_layers=layers)
    full = capture_hf(config, world, 1, stamp=False)
    stamped = capture_hf(config, world, 1)
    assert (full.traced_layers, stamped.traced_layers) == (layers, 2)
    assert _structure(stamped.gm) == _structure(full.gm)
    want, got = full.gm.state_dict(), stamped.gm.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in got.items()] == [
        (k, v.shape, v.dtype) for k, v in want.items()]
    assert not any(v.is_meta for v in got.values())  # loadable as the full trace is
    # A fake group scatters no data: the captured shards hold garbage. Same values for both.
    generator = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(v.shape, generator=generator) * 0.1 if v.is_floating_point() else v
               for k, v in want.items()}
    full.gm.load_state_dict(weights)
    stamped.gm.load_state_dict(weights)
    ids = torch.randint(0, config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    with fake_process_group(world, 1):  # the TP graphs' all-reduces are no-ops on a fake group
        assert torch.equal(stamped.gm(ids)[0], full.gm(ids)[0])


@pytest.fixture(scope="module")
def two_layers():
    return capture_hf(model_config("tiny"), 2, 0)


def _layer_params(gm: fx.GraphModule):
    template = {name.removeprefix("model.layers.1."): t for name, t in gm.named_parameters()
                if name.startswith("model.layers.1.")}
    return lambda k: {name: (torch.nn.Parameter(torch.zeros_like(t), requires_grad=False), True)
                      for name, t in template.items()}


def test_stamping_refuses_layers_that_are_different_programs(two_layers):
    gm = fx.GraphModule(two_layers.gm, two_layers.gm.graph)  # a copy of the graph
    gm.graph = fx.Graph()
    gm.graph.graph_copy(two_layers.gm.graph, {})
    gm.recompile()
    spans = find_layer_spans(gm)
    layer_one = spans.layer(1)
    victim = next(n for n in layer_one if n.target is torch.ops.aten.add.Tensor)
    victim.target = torch.ops.aten.sub.Tensor
    before = len(gm.graph.nodes)
    with pytest.raises(NotStampable, match="aten.add.Tensor vs aten.sub.Tensor"):
        stamp_layers(gm, 4, _layer_params(gm))
    assert len(gm.graph.nodes) == before  # refused before anything changed


def test_stamping_extends_a_two_layer_trace(two_layers):
    gm = fx.GraphModule(two_layers.gm, two_layers.gm.graph)
    gm.graph = fx.Graph()
    gm.graph.graph_copy(two_layers.gm.graph, {})
    gm.recompile()
    per_layer = len(find_layer_spans(gm).layer(1))
    before = len(gm.graph.nodes)
    stamp_layers(gm, 5, _layer_params(gm))
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {f"model.layers.{k}.mlp.down_proj.weight" for k in range(5)} <= reads
    getters_per_layer = sum(t.startswith("model.layers.1.") for t in reads)
    assert len(gm.graph.nodes) == before + 3 * (per_layer + getters_per_layer)
    # Layer k reads only itself, layer k-1 (the residual stream) and shared values; the
    # final norm and LM head read the last layer.
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        layer = _layer_of_node(node)
        reads = {_layer_of_node(i) for i in node.all_input_nodes
                 if i.op == "call_function" and not is_size_node(i)}  # sizes are shared
        allowed = {None, 4} if layer is None else {None, layer, layer - 1}
        assert reads <= allowed, (node.name, layer, reads)
    assert {_layer_of_node(n) for n in gm.graph.nodes if n.op == "call_function"} == {
        None, 0, 1, 2, 3, 4}


def test_stamped_layers_can_wait_on_the_meta_device():
    # prepare_rank's way: the plan fills every weight later, so layers 2.. take no memory.
    captured = capture_hf(model_config("tiny", num_hidden_layers=4), 2, 0, stamped_device="meta")
    meta = {k for k, v in captured.gm.state_dict().items() if v.is_meta}
    assert meta and meta == {k for k in captured.gm.state_dict()
                             if k.startswith("model.layers.") and int(k.split(".")[2]) >= 2}


def test_layers_of_mixed_types_are_all_traced():
    config = model_config("tiny", num_hidden_layers=4)
    assert _stampable(config)
    config.layer_types = ["full_attention", "sliding_attention"] * 2
    assert not _stampable(config)
    assert not _stampable(model_config("tiny"))  # two layers: nothing to stamp
