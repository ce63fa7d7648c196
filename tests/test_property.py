"""Property test: any small Qwen3 config, world size and batch split rewrites to a graph whose
per-rank slices reproduce transformers' logits.

The rewritten graph holds no collective, so all ranks' slices run in this process; the graph is
captured on a fake process group (structure only), the numbers come from real computation.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adp_pass.detect import detect, find_collectives
from adp_pass.presets import qwen3_config
from adp_pass.rewrite import rewrite
from adp_pass.capture import build_hf_qwen3
from tp_sources import capture_source, unsharded_state


@st.composite
def configs(draw):
    world = draw(st.sampled_from([1, 2, 3, 4]))
    kv_heads = world * draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    config = qwen3_config(
        "tiny",
        hidden_size=draw(st.sampled_from([32, 48, 64])),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 16])),
        num_hidden_layers=draw(st.sampled_from([1, 2])),
        intermediate_size=world * draw(st.sampled_from([16, 24])),
        vocab_size=world * draw(st.sampled_from([32, 48])),
        tie_word_embeddings=draw(st.booleans()),
    )
    batch = draw(st.integers(world, 5))
    cuts = sorted(draw(st.lists(st.integers(1, batch - 1), min_size=world - 1,
                                max_size=world - 1, unique=True))) if world > 1 else []
    splits = [b - a for a, b in zip([0, *cuts], [*cuts, batch])]
    rank = draw(st.integers(0, world - 1))
    source = draw(st.sampled_from(["hf", "engine"]))
    return config, world, rank, splits, source


@pytest.mark.slow
@pytest.mark.full  # superseded in CI by tests/test_source_styles.py (more source styles)
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=configs(), seq=st.integers(2, 7))
def test_rewrite_matches_transformers_on_every_split(case, seq):
    config, world, rank, splits, source = case
    captured = capture_source(source, config, world, rank)
    plan = detect(captured.gm, f"tp={world},attn_dp=1")
    layers = config.num_hidden_layers
    assert plan.counts().get("attention_out", 0) == (layers if world > 1 else 0)
    assert plan.counts().get("mlp_out", 0) == (layers if world > 1 else 0)
    gm = rewrite(captured.gm, plan)
    assert find_collectives(gm.graph) == []
    gm.load_state_dict(unsharded_state(source, config), strict=True)

    ids = torch.randint(0, config.vocab_size, (sum(splits), seq))
    reference = build_hf_qwen3(config)  # same seed as the state dict the rewrite loaded
    with torch.no_grad():
        want = reference(input_ids=ids, use_cache=False).logits
        pieces = torch.split(ids, splits)
        got = torch.cat([gm(piece)[0] for piece in pieces])
    assert (got - want).abs().max().item() <= 1e-4
