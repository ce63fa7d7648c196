"""The per-rank runtime: sampling, load balancing, and generation on real gloo ranks that must
reproduce transformers' greedy generate token for token."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen3ForCausalLM

from adp_pass.presets import qwen3_config
from adp_pass.runtime.engine import RankEngine, Request
from adp_pass.runtime.frontend import assign_by_load, make_job, run_job
from adp_pass.runtime.kernels import reference, top_p  # noqa: F401  (registers adp.top_p_cut)
from adp_pass.runtime.sampling import RowSampling, SamplingParams, request_seed, sample
from adp_pass.runtime.serving_config import ServingConfig

GQA_CONFIG = qwen3_config("tiny", num_key_value_heads=2)  # 8 q heads share 2 kv heads


def _rows(params, seeds=None, counters=None) -> RowSampling:
    n = len(params)
    return RowSampling.of(params, seeds or [0] * n, counters or [0] * n)


def test_greedy_is_argmax_and_top_p_keeps_the_head():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 4.9]])
    greedy = SamplingParams()
    assert sample(logits, _rows([greedy, greedy])).tolist() == [1, 0]
    narrow = SamplingParams(temperature=1.0, top_p=0.01)  # only the most likely token survives
    for seed in range(20):
        assert sample(logits, _rows([narrow, narrow], [seed, seed])).tolist() == [1, 0]


def test_top_p_cut_is_the_last_kept_logit():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    inv_t = torch.tensor([1.0, 1.0, 0.0])
    probs = torch.softmax(logits[0], -1)  # 0.644, 0.237, 0.087, 0.032
    top_p = torch.tensor([float(probs[0] + probs[1]) + 1e-3, 0.5, 0.5])
    # Row 0: the first two reach 0.881 < top_p, so the third is kept too; row 1: two of four
    # equal tokens reach 0.5, so the cut is their logit (ties at the cut all stay); row 2: greedy.
    for cut in (reference.top_p_min_logit(logits, inv_t, top_p),
                torch.ops.adp.top_p_cut(logits, inv_t, top_p)):
        assert cut.tolist() == [0.0, 0.0, float("-inf")]


def test_temperature_sampling_follows_seed_and_counter_and_spreads():
    logits = torch.zeros(1, 8)
    params = [SamplingParams(temperature=1.0)]
    draws = [sample(logits, _rows(params, [s], [0])).item() for s in range(40)]
    again = [sample(logits, _rows(params, [s], [0])).item() for s in range(40)]
    steps = [sample(logits, _rows(params, [3], [c])).item() for c in range(40)]
    assert draws == again and len(set(draws)) > 4 and len(set(steps)) > 4


def test_a_seed_is_the_requests_own_or_drawn_and_wraps_to_int64():
    draw = torch.Generator().manual_seed(0)
    assert request_seed(SamplingParams(seed=7), draw) == 7
    assert request_seed(SamplingParams(seed=2**64 + 5), draw) == 5
    assert request_seed(SamplingParams(seed=2**63), draw) == -2**63
    drawn = {request_seed(SamplingParams(), draw) for _ in range(4)}
    assert len(drawn) == 4 and all(-2**63 <= s < 2**63 for s in drawn)
    tiny = RowSampling.of([SamplingParams(temperature=1e-39)], [0], [0])
    assert tiny.inv_temperature == [1e30]  # capped: fp32 holds it times a logit


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_assign_by_load_balances_tokens_in_flight():
    params = SamplingParams(max_new_tokens=10)
    sizes = [100, 10, 10, 10, 50, 40]
    requests = [Request(i, [0] * n, params) for i, n in enumerate(sizes)]
    ranks = assign_by_load(requests, 2)
    assert [[r.request_id for r in rank] for rank in ranks] == [[0, 5], [1, 2, 3, 4]]
    loads = [sum(len(r.prompt) + 10 for r in rank) for rank in ranks]
    assert loads == [160, 120]


def _hf_greedy(config, checkpoint, prompt, new_tokens):
    model = Qwen3ForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.tensor([prompt])
    out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gqa-checkpoint")
    torch.manual_seed(0)
    Qwen3ForCausalLM(GQA_CONFIG).save_pretrained(path)
    return str(path)


@pytest.mark.multirank
# opt-in, CI time: CI serves a two-rank job against transformers in
# tests/test_engine_lockstep.py (test_run_job_with_collectives_matches_transformers)
@pytest.mark.parametrize("per_rank", [pytest.param([3, 0], marks=pytest.mark.full),
                                      pytest.param([1, 2], marks=pytest.mark.full)])
def test_generation_on_gloo_ranks_matches_transformers(checkpoint, per_rank):
    config = GQA_CONFIG
    generator = torch.Generator().manual_seed(sum(per_rank))
    lengths = [5, 9, 9][: sum(per_rank)]
    requests = [
        Request(f"r{i}", torch.randint(0, config.vocab_size, (n,), generator=generator).tolist(),
                SamplingParams(max_new_tokens=16))
        for i, n in enumerate(lengths)
    ]
    assignments = [requests[: per_rank[0]], requests[per_rank[0]:]]
    job = make_job("tp=2,attn_dp=1", assignments, checkpoint=checkpoint,
                   serving=ServingConfig(num_blocks=16, max_position=64))
    report = run_job(job, 2, timeout_s=600)
    served = {r.request_id: r.tokens for rank in report.ranks for r in rank.results}
    assert [rank.first.requests for rank in report.ranks] == per_rank
    for request in requests:
        assert served[request.request_id] == _hf_greedy(config, checkpoint, request.prompt, 16)


class _CollectiveSpy(TorchDispatchMode):
    """Records every distributed op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("_c10d_functional", "c10d", "c10d_functional"):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_replicated_mode_issues_no_collective_during_decode():
    from adp_pass.runtime.prepare import prepare_rank

    config = qwen3_config("tiny")
    built = prepare_rank(config, "tp=2,attn_dp=1", 1, device=torch.device("cpu"), num_blocks=8)
    assert not any("c10d" in str(n.target) for n in built.model.graph.nodes)
    engine = RankEngine(built.model, built.cache)
    for i, n in enumerate([4, 6]):
        engine.add(Request(i, list(range(1, n + 1)), SamplingParams(max_new_tokens=4)))
    engine.step()  # prefill (two lengths: two admissions over the first steps)
    with _CollectiveSpy() as spy:
        while engine.has_work:
            engine.step()
    assert engine.stats.decode_steps >= 3
    assert spy.seen == []
