"""``torch.compile(tp_model, backend="adp")`` on real gloo ranks: the compiled TP model runs as
attention-DP (each rank its rows, weights gathered from the shards) and returns what the
unsharded transformers model returns."""

import pytest
import torch

from adp_pass.capture import build_hf_qwen3, parallelize_hf_qwen3
from adp_pass.launch import init_rank, launch
from adp_pass.presets import qwen3_config

pytestmark = pytest.mark.multirank


def _compiled_rank(ids: torch.Tensor) -> dict:
    _, world, _ = init_rank()
    config = qwen3_config("tiny")
    model = build_hf_qwen3(config, seed=0)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    parallelize_hf_qwen3(model, world)
    compiled = torch.compile(model, backend="adp", options={"mapping": f"tp={world},attn_dp=1"})
    torch._dynamo.mark_dynamic(ids, 0)  # the rows are split over the ranks
    with torch.no_grad():
        got = compiled(input_ids=ids, use_cache=False).logits
    return {"max_abs_diff": (got - want).abs().max().item(), "shape": tuple(got.shape)}


def test_compile_backend_matches_transformers_on_two_ranks():
    ids = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(3))
    results = launch(_compiled_rank, 2, ids)
    for result in results:
        assert result["shape"] == (3, 6, 256)
        assert result["max_abs_diff"] <= 1e-4, results


def test_static_batch_is_refused_with_the_fix():
    from adp_pass.capture import fake_process_group

    with fake_process_group(2, 0):
        model = parallelize_hf_qwen3(build_hf_qwen3(qwen3_config("tiny")), 2)
        compiled = torch.compile(model, backend="adp", dynamic=False)
        with pytest.raises(Exception, match=r"mark_dynamic\(input_ids, 0\)"):
            compiled(input_ids=torch.zeros(2, 4, dtype=torch.long), use_cache=False)
    torch._dynamo.reset()


def test_a_mapping_that_keeps_collectives_is_refused_with_the_fix():
    from adp_pass.backend import BackendError, adp_backend
    from adp_pass.capture import fake_process_group

    with fake_process_group(2, 0), pytest.raises(BackendError, match="serve it with adp run"):
        adp_backend(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), [],
                    {"mapping": "tp=2,attn_dp=1,mlp_tp=2"})
