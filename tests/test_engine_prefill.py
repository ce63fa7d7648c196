"""Prompts of different lengths share a prefill call and give the tokens each prompt gets on its
own: packed (back to back, no padding; long prompts in chunks over several steps; decode rows
of running sequences in the same call), or right-padded to the longest within the padding
limit (``packed_prefill=False``, what a lockstep group does). Prefill calls ask the graph for
the logits rows they sample alone (``logits_indices``), with the tokens of full logits."""

import pytest
import torch

from adp_pass.presets import model_config
from adp_pass.runtime.engine import RankEngine, Request
from adp_pass.runtime.prepare import prepare_rank
from adp_pass.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def built():
    return prepare_rank(model_config("tiny"), "tp=1,attn_dp=1", 0, device=torch.device("cpu"),
                        num_blocks=32, max_position=128)


def _prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


def _serve(built, prompts, ids, **engine_options):
    engine = RankEngine(built.model, built.cache, max_position=128, **engine_options)
    results = engine.generate([Request(i, prompts[i], SamplingParams(max_new_tokens=4))
                               for i in ids])
    assert built.cache.num_free_blocks == built.cache.num_blocks
    return {r.request_id: r.tokens for r in results}, engine.stats


@pytest.mark.full  # CI: the padded path's tokens and last positions are checked by
# test_padded_prefill_and_prefill_logits_select_last_positions, its lockstep use by
# tests/test_engine_lockstep.py
def test_mixed_length_prompts_share_a_padded_prefill_and_keep_their_tokens(built):
    lengths = [7, 8, 6, 8, 2]  # the 2 would pad 4x: it waits for a call of its own
    prompts = _prompts(lengths)

    def serve(batch: list[int]) -> tuple[dict, int]:
        tokens, stats = _serve(built, prompts, batch, max_batch=8, packed_prefill=False)
        return tokens, stats.prefill_calls

    together, calls = serve(list(range(len(prompts))))
    # [7, 8, 6, 8] padded to 8 (3 of 32 tokens are padding, under PREFILL_PADDING), then [2].
    assert calls == 2
    for i in range(len(prompts)):
        alone, _ = serve([i])
        assert together[i] == alone[i], i


@pytest.mark.full  # CI time: every engine test prefills packed; this one pins the call count
def test_packed_prefill_takes_every_length_in_one_call(built):
    prompts = _prompts([7, 3, 5, 2])
    # The padded path gives each prompt its own tokens (the test above).
    padded, _ = _serve(built, prompts, range(4), max_batch=8, packed_prefill=False)
    together, stats = _serve(built, prompts, range(4), max_batch=8)
    assert together == padded
    assert stats.prefill_calls == 1 and stats.prefill_tokens == 17 and stats.mixed_calls == 0


@pytest.mark.slow
def test_long_prompts_are_prefilled_in_chunks_with_the_same_tokens(built):
    prompts = _prompts([11, 3, 6], seed=1)
    alone, _ = _serve(built, prompts, range(3), max_batch=4)  # one packed call, no chunks
    # 5 tokens a step: the 11-token prompt runs as 5 + 5 + 1, the others behind it (3 + 1,
    # then 5 + 1); the finished ones decode in the same calls as the later chunks.
    chunked, stats = _serve(built, prompts, range(3), max_batch=4, max_prefill_tokens=5)
    assert chunked == alone
    assert stats.prefill_tokens == 20 and stats.prefill_calls == 4
    assert stats.mixed_calls > 0


@pytest.mark.full  # CI time: test_long_prompts_are_prefilled_in_chunks_... mixes decode rows
# into prompt calls too
def test_a_prompt_arriving_mid_decode_joins_the_decode_call(built):
    prompts = _prompts([4, 6], seed=2)
    want, _ = _serve(built, prompts, range(2))
    engine = RankEngine(built.model, built.cache, max_position=128)
    engine.add(Request(0, prompts[0], SamplingParams(max_new_tokens=4)))
    results = engine.step() + engine.step()  # prefill, then a decode step in flight
    engine.add(Request(1, prompts[1], SamplingParams(max_new_tokens=4)))
    results += engine.step()  # the prompt and request 0's decode row in one call
    assert engine.stats.mixed_calls == 1
    results += engine.run_until_done()
    assert {r.request_id: r.tokens for r in results} == want
    assert built.cache.num_free_blocks == built.cache.num_blocks


@pytest.mark.full  # an option's path (mix_decode=False); CI keeps the default's tests
def test_without_mixing_decodes_run_in_their_own_call(built):
    prompts = _prompts([4, 6], seed=2)
    want, _ = _serve(built, prompts, range(2))
    got, stats = _serve(built, prompts, range(2), max_prefill_tokens=5, mix_decode=False)
    assert got == want and stats.mixed_calls == 0 and stats.prefill_calls == 2


def test_cancel_during_a_chunked_prefill_frees_its_blocks(built):
    prompts = _prompts([30], seed=3)
    engine = RankEngine(built.model, built.cache, max_position=128, max_prefill_tokens=4)
    engine.add(Request("long", prompts[0], SamplingParams(max_new_tokens=4)))
    engine.step()
    assert engine.prefilling and engine.prefilling[0].done == 4
    assert engine.cancel("long") and not engine.has_work
    assert built.cache.num_free_blocks == built.cache.num_blocks


class _Spy(torch.nn.Module):
    """The graph, recording each call's ``logits_indices`` and logits shape; with ``full`` its
    signature lacks ``logits_indices``, so the engine asks for every row as before."""

    def __init__(self, model, full=False):
        super().__init__()
        self.model, self.calls = model, []
        if full:
            self.forward = self._full

    def forward(self, input_ids, positions, slot_mapping, block_tables, context_lens,
                query_start_loc=None, logits_indices=slice(None)):
        out = self.model(input_ids, positions, slot_mapping, block_tables, context_lens,
                         query_start_loc, logits_indices=logits_indices)
        rows = None if isinstance(logits_indices, slice) else logits_indices.tolist()
        self.calls.append((tuple(input_ids.shape), rows, tuple(out[0].shape)))
        return out

    def _full(self, input_ids, positions, slot_mapping, block_tables, context_lens,
              query_start_loc=None):
        return _Spy.forward(self, input_ids, positions, slot_mapping, block_tables,
                            context_lens, query_start_loc)


def _spied(built, prompts, full=False, **engine_options):
    spy = _Spy(built.model, full)
    engine = RankEngine(spy, built.cache, max_position=128, **engine_options)
    assert engine.runner.selects_logits is not full
    results = engine.generate([Request(i, p, SamplingParams(max_new_tokens=2))
                               for i, p in enumerate(prompts)])
    assert built.cache.num_free_blocks == built.cache.num_blocks
    return [r.tokens for r in results], spy.calls


@pytest.mark.full  # CI time; tests/test_cache_insertion.py checks logits_indices' rows
def test_prefill_computes_only_the_sampled_logits_rows(built):
    """Chunked packed prefill: a chunk that ends no prompt asks for no row; a call that ends two
    prompts asks for their last tokens, one with decode rows for theirs too. The tokens equal
    those of full logits."""
    prompts = _prompts([11, 3, 6], seed=1)
    vocab = model_config("tiny").vocab_size
    options = dict(max_batch=4, max_prefill_tokens=5)
    want, full_calls = _spied(built, prompts, full=True, **options)
    got, calls = _spied(built, prompts, **options)
    assert got == want
    assert all(rows is None for _, rows, _ in full_calls)
    prefill = [(shape, rows, out) for shape, rows, out in calls if shape[1] > 1]
    # Steps of test_long_prompts_are_prefilled_in_chunks...: 5 + 5 tokens of the 11 (no row),
    # then its last 1 with the 3 and the first 1 of the 6 (rows 0 and 3: the two that end), then
    # the 6's last 5 with the two decode rows (rows 4, 5, 6).
    assert prefill == [((1, 5), [], (1, 0, vocab)), ((1, 5), [], (1, 0, vocab)),
                       ((1, 5), [0, 3], (1, 2, vocab)), ((1, 7), [4, 5, 6], (1, 3, vocab))]
    # Decode calls (one token per row) ask for every row.
    assert all(rows is None for shape, rows, _ in calls if shape[1] == 1)


@pytest.mark.slow
def test_padded_prefill_and_prefill_logits_select_last_positions(built):
    """The padded path asks for the prompts' distinct last positions in every row; the tokens,
    and prefill_logits, equal those of full logits."""
    prompts = _prompts([7, 8, 6, 8])
    want, _ = _spied(built, prompts, full=True, max_batch=8, packed_prefill=False)
    got, calls = _spied(built, prompts, max_batch=8, packed_prefill=False)
    assert got == want
    assert calls[0][:2] == ((4, 8), [5, 6, 7]) and calls[0][2][:2] == (4, 3)

    full = RankEngine(_Spy(built.model, full=True), built.cache).prefill_logits(prompts[0])
    spy = _Spy(built.model)
    picked = RankEngine(spy, built.cache).prefill_logits(prompts[0])
    assert spy.calls[0][1] == [6]
    torch.testing.assert_close(picked, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("packed", [True, pytest.param(False, marks=pytest.mark.full)])
def test_prompt_warm_up_writes_nothing_to_the_cache(built, packed):
    # A CUDA engine runs the prompt path before serving (Triton compiles there, not in the first
    # TTFT); on the CPU it is called directly: every cache byte and every block as they were.
    engine = RankEngine(built.model, built.cache, max_position=128)
    for cache in built.cache.k_caches + built.cache.v_caches:
        cache.normal_()  # a write of the warm-up's zero-token K/V would show
    caches = [c.clone() for c in built.cache.k_caches + built.cache.v_caches]
    engine.runner.warm_up_prompts(12, built.cache.blocks_for, packed=packed, decode_rows=3)
    assert all(torch.equal(a, b) for a, b in
               zip(caches, built.cache.k_caches + built.cache.v_caches))
    assert built.cache.num_free_blocks == built.cache.num_blocks
    for cache in built.cache.k_caches + built.cache.v_caches:
        cache.zero_()  # as the fixture made it, for the module's other tests
