"""Prompts of different lengths share a prefill call (right-padded to the longest, within the
padding limit) and give the tokens each prompt gets on its own."""

import torch

from adp_pass.presets import model_config
from adp_pass.runtime.engine import RankEngine, Request
from adp_pass.runtime.prepare import prepare_rank
from adp_pass.runtime.sampling import SamplingParams


def test_mixed_length_prompts_share_a_prefill_and_keep_their_tokens():
    built = prepare_rank(model_config("tiny"), "tp=1,attn_dp=1", 0, device=torch.device("cpu"),
                         num_blocks=32, max_position=128)
    generator = torch.Generator().manual_seed(0)
    lengths = [7, 8, 6, 8, 2]  # the 2 would pad 4x: it waits for a call of its own
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]
    params = SamplingParams(max_new_tokens=4)

    def serve(batch: list[int]) -> tuple[dict, int]:
        engine = RankEngine(built.model, built.cache, max_batch=8, max_position=128)
        results = engine.generate([Request(i, prompts[i], params) for i in batch])
        return {r.request_id: r.tokens for r in results}, engine.stats.prefill_calls

    together, calls = serve(list(range(len(prompts))))
    # [7, 8, 6, 8] padded to 8 (3 of 32 tokens are padding, under PREFILL_PADDING), then [2].
    assert calls == 2
    for i in range(len(prompts)):
        alone, _ = serve([i])
        assert together[i] == alone[i], i
