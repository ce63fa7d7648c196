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
    """Both sources on one launch (a torchrun start costs seconds): transformers' bf16 model and
    the engine-style FP8 one."""
    return {"hf": _compiled_hf(ids), "fp8": _compiled_fp8(ids)}


def _compiled_hf(ids: torch.Tensor) -> dict:
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


@pytest.fixture(scope="module")
def two_rank_results():
    ids = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(3))
    return launch(_compiled_rank, 2, ids)


def test_compile_backend_matches_transformers_on_two_ranks(two_rank_results):
    for result in (r["hf"] for r in two_rank_results):
        assert result["shape"] == (3, 6, 256)
        assert result["max_abs_diff"] <= 1e-4, two_rank_results


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


def _compiled_fp8(ids: torch.Tensor) -> dict:
    from engine_qwen3 import Fp8EngineQwen3ForCausalLM
    from tp_sources import fp8_full_state, fp8_tp_model

    from adp_pass.presets import model_config

    rank, world, _ = init_rank()
    config = model_config("fp8-tiny")
    full = fp8_full_state(config)
    reference = Fp8EngineQwen3ForCausalLM(config).eval()
    reference.load_state_dict(full, strict=True)
    with torch.no_grad():
        want = reference(ids)
    model = fp8_tp_model(config, world, rank, full)
    compiled = torch.compile(model, backend="adp", options={"mapping": f"tp={world},attn_dp=1"})
    torch._dynamo.mark_dynamic(ids, 0)
    with torch.no_grad():
        got = compiled(ids)
    got, want = (got[0] if isinstance(got, (tuple, list)) else got,
                 want[0] if isinstance(want, (tuple, list)) else want)
    return {"row_diffs": [(g - w).abs().max().item() for g, w in zip(got, want)],
            "shape": tuple(got.shape), "largest": want.abs().max().item()}


def test_compile_backend_runs_an_fp8_tp_model_on_two_ranks(two_rank_results):
    # FP8 weights and their scale tiles gathered from the shards; tolerance as the FP8 parity
    # tests state it (tests/test_fp8_graph.py: 1e-4 per sequence, one e4m3 rounding flip).
    for result in (r["fp8"] for r in two_rank_results):
        assert result["shape"][:2] == (3, 6) and result["largest"] > 0.05
        flipped = [d for d in result["row_diffs"] if d > 1e-4]
        assert len(flipped) <= 1 and max(result["row_diffs"]) <= 5e-2, two_rank_results
