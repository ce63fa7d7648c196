"""The decode CUDA graphs (GPU only: CUDA graphs need a GPU; on a CPU machine these tests are
reported as skipped): replaying them gives the tokens of the eager model, for batches that
fill a graph and batches padded up to one, greedy and sampled rows mixed."""

import pytest
import torch

from adp_pass.presets import model_config
from adp_pass.runtime.engine import RankEngine, Request
from adp_pass.runtime.prepare import prepare_rank
from adp_pass.runtime.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _serve(graph_sizes, requests):
    built = prepare_rank(model_config("tiny"), "tp=1,attn_dp=1", 0, device=torch.device("cuda"),
                         num_blocks=64, max_position=256)
    engine = RankEngine(built.model, built.cache, max_batch=8, max_seq_len=64,
                        max_position=256, cuda_graph_sizes=graph_sizes, seed=3)
    assert (engine.runner.graphs is not None) == bool(graph_sizes)
    return {r.request_id: r.tokens for r in engine.generate(requests)}, engine


@pytest.mark.parametrize("count", [3, 4])  # 3 is padded to the graph of 4
def test_graph_replay_gives_the_eager_tokens(count):
    generator = torch.Generator().manual_seed(count)
    requests = []
    for i in range(count):
        prompt = torch.randint(0, 256, (5 + i,), generator=generator).tolist()
        # Row 1 samples, row 2 samples from its top-p set (the seeded draws do not depend on the
        # batch or on the graph); the others are greedy.
        params = SamplingParams(max_new_tokens=12, temperature=(0.0, 0.8, 1.2, 0.0)[i],
                                top_p=0.7 if i == 2 else 1.0, seed=7 + i)
        requests.append(Request(f"r{i}", prompt, params))
    eager, _ = _serve((), requests)
    graphs, engine = _serve((1, 2, 4), requests)
    assert graphs == eager
    assert all(len(tokens) == 12 for tokens in graphs.values())
    # The sampling ran in the sampling graph of the batch's size, with the top-p cut.
    assert set(engine.runner.graphs.sampling) == {(4, True)}
    # A sampled request alone: its graph without the cut, and its draws as in the batch.
    alone, engine = _serve((1, 2, 4), requests[1:2])
    assert alone["r1"] == graphs["r1"] and set(engine.runner.graphs.sampling) == {(1, False)}


def _logits_and_tokens(pdl: str, prompts):
    """Greedy tokens and the decode logits of a bf16 rank whose graphs were captured with
    programmatic dependent launch on or off."""
    from adp_pass.runtime.kernels import utils as kernel_utils

    saved = kernel_utils.PDL
    kernel_utils.PDL = pdl
    try:
        built = prepare_rank(model_config("tiny"), "tp=1,attn_dp=1", 0, device=torch.device("cuda"),
                             dtype=torch.bfloat16, num_blocks=64, max_position=256)
        engine = RankEngine(built.model, built.cache, max_batch=4, max_seq_len=64,
                            max_position=256, cuda_graph_sizes=(4,), seed=3)
        results = engine.generate([Request(i, p, SamplingParams(max_new_tokens=10))
                                   for i, p in enumerate(prompts)])
        logits = engine.runner.graphs.outputs[4].clone()  # the last replay's logits
    finally:
        kernel_utils.PDL = saved
    return {r.request_id: r.tokens for r in results}, logits


def test_programmatic_dependent_launch_changes_no_value():
    """With PDL our kernels start while the kernel before them drains and wait
    (griddepcontrol.wait) before reading its outputs: a wait in the wrong place would read stale
    activations, so graphs captured with and without it must give the same bits."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3], [5, 8, 9, 7, 9], [3, 2, 3, 8, 4, 6]]
    want_tokens, want_logits = _logits_and_tokens("off", prompts)
    for level in ("wait", "trigger"):
        got_tokens, got_logits = _logits_and_tokens(level, prompts)
        assert got_tokens == want_tokens
        assert torch.equal(got_logits, want_logits)


def test_a_lockstep_rank_running_ahead_replays_padded_graphs_with_the_eager_tokens():
    """A lockstep rank one step ahead of the host on the GPU (issue 28): the stand-in peers make
    every step prefill and decode at a floor, so each decode replays the graph of the padded
    size with rows of the step in flight taking their tokens on the device; the tokens are
    those of the rank alone, eager."""

    class Peers:  # the other ranks of the group: always a bigger batch
        def __init__(self, floor):
            self.floor = floor

        def agree(self, values):
            if not values[3]:
                return values
            return [max(v, f) for v, f in zip(values, self.floor)] + values[len(self.floor):]

    generator = torch.Generator().manual_seed(5)
    requests = [Request(f"r{i}", torch.randint(0, 256, (4 + i,), generator=generator).tolist(),
                        SamplingParams(max_new_tokens=(9, 3, 12)[i])) for i in range(3)]
    eager, _ = _serve((), requests)
    built = prepare_rank(model_config("tiny"), "tp=1,attn_dp=1", 0, device=torch.device("cuda"),
                         num_blocks=64, max_position=256)
    engine = RankEngine(built.model, built.cache, max_batch=8, max_seq_len=64, max_position=256,
                        cuda_graph_sizes=(1, 2, 4, 8), seed=3, lockstep=Peers([2, 16, 8]))
    assert engine.async_decode
    got = {r.request_id: r.tokens for r in engine.generate(requests)}
    assert got == eager
    assert engine._inflight is None or not engine._inflight.seqs
