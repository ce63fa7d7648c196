"""Decoding one step ahead of the host (``RankEngine(async_decode=True)``, the default) gives
the tokens of decoding in step with it: across staggered admission, stop tokens read a step
late, cancellation while a step is in flight, and sampled requests (their draws are keyed by
seed and token index, so they do not depend on the batch or the mode)."""

import torch

from adp_pass.runtime.engine import RankEngine, Request
from adp_pass.runtime.sampling import SamplingParams
from test_engine_lockstep import ToyModel, _requests


def _serve(requests, *, async_decode: bool, max_batch: int = 3):
    model = ToyModel()
    cache = model.cache()
    engine = RankEngine(model, cache, max_batch=max_batch, async_decode=async_decode)
    results = engine.generate(requests)
    return {r.request_id: (r.tokens, r.finish_reason) for r in results}, engine, model, cache


def _with_stop(requests, stops: dict[str, int]) -> list[Request]:
    return [Request(r.request_id, r.prompt, SamplingParams(
        max_new_tokens=r.params.max_new_tokens,
        stop_token_ids=(stops[r.request_id],) if r.request_id in stops else ()))
        for r in requests]


def test_one_step_ahead_gives_the_in_step_tokens_with_staggered_admission():
    requests = _requests(5, seed=1, new=(6, 1, 5, 4, 7))
    want, sync_engine, sync_model, _ = _serve(requests, async_decode=False)
    got, engine, model, cache = _serve(requests, async_decode=True)
    assert got == want
    # Every generated token but the prefill's came from a decode step read by the host.
    assert engine.stats.decode_tokens == sum(len(t) - 1 for t, _ in want.values())
    # No row is launched past a length limit: never more decode calls than in step.
    decodes = [c for c in model.calls if c[1] == 1]
    assert len(decodes) <= len([c for c in sync_model.calls if c[1] == 1])
    assert engine._inflight is None and cache.num_free_blocks == cache.num_blocks


def test_a_stop_token_read_a_step_late_drops_the_row_in_flight():
    requests = _requests(5, seed=1, new=(6, 1, 5, 4, 7))
    plain, _, _, _ = _serve(requests, async_decode=False)
    # Stop two requests at their second and third generated token.
    stops = {"s1-0": plain["s1-0"][0][1], "s1-4": plain["s1-4"][0][2]}
    requests = _with_stop(requests, stops)
    want, _, _, _ = _serve(requests, async_decode=False)
    assert want["s1-0"][1] == "stop" and want["s1-4"][1] == "stop"
    got, engine, model, cache = _serve(requests, async_decode=True)
    assert got == want
    assert engine.stats.decode_tokens == sum(len(t) - 1 for t, _ in want.values())
    assert cache.num_free_blocks == cache.num_blocks  # the dropped rows' slots were freed


def test_steps_run_ahead_and_a_cancel_in_flight_frees_its_blocks():
    requests = _requests(3, seed=4, lengths=(5, 5, 5, 5, 5), new=(8, 8, 8))  # one prefill
    model = ToyModel()
    cache = model.cache()
    engine = RankEngine(model, cache, max_batch=3)
    for request in requests:
        engine.add(request)
    engine.step()  # prefill, then the first decode step launched
    assert engine._inflight is not None and len(engine._inflight.seqs) == 3
    engine.step()  # the second launched before the first is read
    assert [s.pending for s in engine._inflight.seqs] == [1, 1, 1]
    assert engine.cancel("s4-1")
    results = engine.run_until_done()
    assert sorted(r.request_id for r in results) == ["s4-0", "s4-2"]
    assert all(len(r.tokens) == 8 for r in results)
    assert cache.num_free_blocks == cache.num_blocks


def _sampled(seed: int = 11) -> list[Request]:
    return [Request("sampled", [5, 6, 7, 8], SamplingParams(max_new_tokens=5, temperature=0.8,
                                                             seed=seed)),
            Request("top-p", [9, 3, 2], SamplingParams(max_new_tokens=6, temperature=1.5,
                                                       top_p=0.6, seed=seed + 1))]


def test_sampled_requests_run_ahead_with_the_in_step_tokens():
    requests = _requests(3, seed=2, new=(6, 6, 6)) + _sampled()
    want, _, _, _ = _serve(requests, async_decode=False, max_batch=5)
    got, engine, _, cache = _serve(requests, async_decode=True, max_batch=5)
    assert got == want
    assert engine.stats.decode_tokens == sum(len(t) - 1 for t, _ in want.values())
    assert cache.num_free_blocks == cache.num_blocks
    # The sampled rows were launched before the step in flight was read.
    model = ToyModel()
    engine = RankEngine(model, model.cache(), max_batch=5)
    for request in _sampled():
        engine.add(request)
    engine.step()
    engine.step()
    assert [s.pending for s in engine._inflight.seqs] == [1, 1]


def test_a_seeded_request_draws_the_same_tokens_in_any_batch():
    alone, _, _, _ = _serve(_sampled(), async_decode=True, max_batch=5)
    crowded, _, _, _ = _serve(_requests(4, seed=5, new=(3, 7, 2, 5)) + _sampled(),
                              async_decode=True, max_batch=6)
    assert {k: crowded[k] for k in alone} == alone
    # ... and other seeds draw other tokens: the draws are not the argmax.
    reseeded, _, _, _ = _serve(_sampled(seed=40), async_decode=True, max_batch=5)
    assert reseeded != alone


def test_lockstep_runs_ahead_and_agrees_on_the_rows_it_launches():
    """A lockstep group decodes one step ahead too: each step's rows are agreed from what the
    host knows before the step in flight is read (rows certain to end there are not offered; a
    stop token read a step late leaves its row in the next launch), and the tokens are those of
    the engine in step with the host."""

    class Alone:
        def __init__(self):
            self.offers = []

        def agree(self, values):
            self.offers.append(list(values))
            return values

    requests = _requests(5, seed=1, new=(6, 1, 5, 4, 7))
    plain, _, _, _ = _serve(requests, async_decode=False)
    requests = _with_stop(requests, {"s1-0": plain["s1-0"][0][1], "s1-4": plain["s1-4"][0][2]})
    want, _, _, _ = _serve(requests, async_decode=False)
    lockstep = Alone()
    model = ToyModel()
    cache = model.cache()
    engine = RankEngine(model, cache, max_batch=3, lockstep=lockstep)
    assert engine.async_decode
    got = engine.generate(requests)
    assert {r.request_id: (r.tokens, r.finish_reason) for r in got} == want
    assert engine._inflight is None and engine.stats.idle_calls == 0
    assert cache.num_free_blocks == cache.num_blocks
    # every decode launch had exactly the rows this rank offered: no padding row for a row
    # already known to end
    assert [b for b, s in model.calls if s == 1] == [rows for _, _, rows, _ in lockstep.offers
                                                     if rows]


def test_the_device_token_is_the_previous_rows_argmax():
    engine = RankEngine(ToyModel(), ToyModel().cache(), max_batch=4)
    engine.runner.last_tokens[:3] = torch.tensor([7, 8, 9])
    ids = engine.runner._tokens_from([2, -1, 0], torch.tensor([[1], [2], [3]]))
    assert ids.view(-1).tolist() == [9, 2, 7]
    # Padding rows after the sequences (a lockstep group's agreed size) take the host's id.
    ids = engine.runner._tokens_from([1], torch.tensor([[1], [2], [3]]))
    assert ids.view(-1).tolist() == [8, 2, 3]
