"""Bad inputs get errors that name the problem and the fix."""

import pytest
import torch
import torch.nn as nn

from adp_pass.capture import capture, fake_process_group
from adp_pass.detect import DetectError, detect, find_collectives
from adp_pass.graph_record import graph_record
from adp_pass.mapping import MappingError
from adp_pass.presets import qwen3_config
from adp_pass.rewrite import RewriteError, rewrite
from tp_sources import capture_source

_c10d = torch.ops._c10d_functional


class TwoLayerTPMLP(nn.Module):
    """Not a Qwen3: a column/row-parallel ReLU MLP with one all-reduce."""

    def __init__(self, group_name: str) -> None:
        super().__init__()
        self.up = nn.Linear(16, 8, bias=False)
        self.down = nn.Linear(8, 16, bias=False)
        self.group_name = group_name

    def forward(self, x):
        partial = self.down(torch.relu(self.up(x)))
        return _c10d.wait_tensor(_c10d.all_reduce(partial, "sum", self.group_name))


class QwenPlusStrayReduce(nn.Module):
    """A Qwen3 TP graph with an extra all-reduce nobody can explain."""

    def __init__(self, inner: nn.Module, group_name: str) -> None:
        super().__init__()
        self.inner, self.group_name = inner, group_name

    def forward(self, ids):
        logits = self.inner(ids)
        return _c10d.wait_tensor(_c10d.all_reduce(logits * 2, "sum", self.group_name))


@pytest.fixture(scope="module")
def tiny_tp2():
    return capture_source("engine", qwen3_config("tiny"), 2, 0)


def test_graph_without_qwen3_structure():
    with fake_process_group(2, 0):
        import torch.distributed as dist

        model = TwoLayerTPMLP(dist.group.WORLD.group_name)
        captured = capture(model, [torch.zeros(4, 16)])
    with pytest.raises(DetectError, match="not a TP Qwen3 decoder graph"):
        detect(captured.gm, "tp=2,attn_dp=1")


def test_unclassified_collective_is_an_error_in_strict_mode():
    from tp_sources import engine_tp_model

    config = qwen3_config("tiny")
    with fake_process_group(2, 0):
        import torch.distributed as dist

        model = QwenPlusStrayReduce(engine_tp_model(config, 2, 0), dist.group.WORLD.group_name)
        captured = capture(model, [torch.zeros(2, 8, dtype=torch.long)])
    with pytest.raises(DetectError, match="collectives no pattern explains"):
        detect(captured.gm, "tp=2,attn_dp=1")
    plan = detect(captured.gm, "tp=2,attn_dp=1", strict=False)
    assert len(plan.unclassified) == 1 and plan.counts()["attention_out"] == 2


def test_mapping_world_size_differs_from_graph(tiny_tp2):
    with pytest.raises(MappingError, match=r"traced with 2 TP ranks but the mapping says tp=4"):
        detect(tiny_tp2.gm, "tp=4,attn_dp=1")


def test_mapping_without_attention_dp_keeps_every_site(tiny_tp2):
    plan = detect(tiny_tp2.gm, "tp=2")  # the TP job served as it is
    assert {(s.action, s.group_tag) for s in plan.sites} == {("keep", "world")}
    assert plan.shape_fixes == [] and all(p.held_shape == p.local_shape for p in plan.params)


def test_graph_without_collectives_for_a_tp_mapping():
    captured = capture_source("engine", qwen3_config("tiny"), 1, 0)
    with pytest.raises(MappingError, match="traced with 1 TP ranks but the mapping says tp=2"):
        detect(captured.gm, "tp=2,attn_dp=1")
    graph_record(captured.gm).world_size = None  # a graph from elsewhere, with no capture record
    with pytest.raises(DetectError, match="no collectives but the mapping says tp=2"):
        detect(captured.gm, "tp=2,attn_dp=1")


def _graph_state(gm) -> tuple:
    return (str(gm.graph), len(find_collectives(gm.graph)),
            {k: tuple(v.shape) for k, v in gm.state_dict().items()})


def test_plan_from_another_graph_is_refused_and_leaves_the_graph_as_it_was():
    config = qwen3_config("tiny")
    plan = detect(capture_source("engine", config, 2, 0).gm, "tp=2,attn_dp=1")
    for source, rank in (("hf", 0), ("engine", 1)):  # another source; another rank's graph
        other = capture_source(source, config, 2, rank)
        before = _graph_state(other.gm)
        with pytest.raises(RewriteError, match="made for another graph"):
            rewrite(other.gm, plan)
        assert _graph_state(other.gm) == before


def test_rewrite_returns_a_new_module_and_refuses_to_run_twice(tiny_tp2):
    before = _graph_state(tiny_tp2.gm)
    plan = detect(tiny_tp2.gm, "tp=2,attn_dp=1")
    gm = rewrite(tiny_tp2.gm, plan)
    assert gm is not tiny_tp2.gm and _graph_state(tiny_tp2.gm) == before
    assert find_collectives(gm.graph) == []
    with pytest.raises(RewriteError, match="already rewritten"):
        rewrite(gm, plan)
    with pytest.raises(DetectError, match="already rewritten"):
        detect(gm, "tp=2,attn_dp=1")


def test_misshaped_state_dict_tensor(tiny_tp2):
    plan = detect(tiny_tp2.gm, "tp=2,attn_dp=1")
    name = "layers.0.self_attn.o_proj.weight"
    full = {name: torch.zeros(3, 3)}
    with pytest.raises(RewriteError, match=rf"{name} has shape \[3, 3\], expected \[64, 128\]"):
        rewrite(tiny_tp2.gm, plan, state_dict=full)


def test_tp_not_dividing_heads_is_caught_before_tracing():
    from adp_pass.mapping import Mapping

    config = qwen3_config("tiny-3")  # 6 heads, 3 kv heads
    with pytest.raises(MappingError, match=r"tp \(4\) must divide the model.s num_attention_heads \(6\)"):
        Mapping.parse("tp=4,attn_dp=1").check_model(
            config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
        )


def test_rewrite_error_is_defined_once_and_reexported():
    from adp_pass import errors

    assert RewriteError is errors.RewriteError
    assert issubclass(errors.RewriteError, errors.AdpError)


def test_a_missing_extra_names_its_install_command():
    from adp_pass.errors import MissingExtra, require_extra

    with pytest.raises(MissingExtra, match="'serve' extra") as info:
        require_extra("adp_no_such_package", "serve")
    assert info.value.hint == "pip install 'adp-pass[serve]'" and info.value.exit_code == 2
