"""Lockstep stepping (runtime/lockstep.py, RankEngine(lockstep=...)): ranks whose graph holds
collectives agree on every step's shapes and pad to the group's largest.

* padding, in one process: inputs of padded prefill/decode calls, logits read at each prompt's
  own last position, padding rows writing nothing to the KV cache; a stand-in for the other
  ranks inflates every call and the tokens must not change;
* real gloo ranks: a toy model whose MLP all-gathers the batch over its group and
  reduce-scatters it back (any shape mismatch fails or hangs), uneven requests, a rank without
  any; every rank's tokens equal the same engine alone with the whole MLP and no collective;
* end to end: ``run_job`` for the mappings whose graphs hold collectives, greedy tokens equal to
  transformers' ``generate``.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adp_pass.runtime.kernels.cached_attention  # noqa: F401  (registers adp.cached_attention)
from adp_pass.runtime.engine import RankEngine, Request
from adp_pass.runtime.kv_cache import PagedKVCache
from adp_pass.runtime.runner import decode_batch, prefill_batch
from adp_pass.runtime.sampling import SamplingParams

CPU = torch.device("cpu")
_c10d = torch.ops._c10d_functional


# ----------------------------------------------------------------------------- a toy model
class ToyModel(nn.Module):
    """One attention layer over a paged KV cache (``adp.cached_attention``) and an MLP, with the
    serving calling convention. With ``group`` (name, size, index) the MLP holds one slice of
    its columns and, like a sharded MLP of a rewritten graph, all-gathers the hidden states of
    the whole group along dim 0 and reduce-scatters the partial sums back: every rank of the
    group must call it with the same [B, S]."""

    def __init__(self, *, group: tuple[str, int, int] | None = None, seed: int = 0,
                 vocab: int = 48, hidden: int = 32, heads: int = 2, head_dim: int = 16,
                 inter: int = 64, num_blocks: int = 32, block_size: int = 16,
                 max_position: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def weight(*shape: int, std: float = 0.3) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=g) * std, requires_grad=False)

        self.embed, self.pos = weight(vocab, hidden, std=1.0), weight(max_position, hidden)
        self.qkv, self.o = weight(hidden, 3 * heads * head_dim), weight(heads * head_dim, hidden)
        up, down = weight(hidden, inter), weight(inter, hidden)
        self.head = weight(hidden, vocab, std=1.0)
        self.group = group
        if group is not None:
            _, size, index = group
            cols = inter // size
            up, down = up[:, index * cols:(index + 1) * cols], down[index * cols:(index + 1) * cols]
        self.up, self.down = nn.Parameter(up.clone()), nn.Parameter(down.clone())
        self.heads, self.head_dim = heads, head_dim
        shape = (num_blocks, block_size, heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))
        self.calls: list[tuple[int, int]] = []  # [B, S] of every call

    def forward(self, ids, positions, slot_mapping, block_tables, context_lens):
        batch, seq = ids.shape
        self.calls.append((batch, seq))
        h = self.embed[ids] + self.pos[positions]
        q, k, v = (h @ self.qkv).view(batch, seq, 3, self.heads, self.head_dim).unbind(2)
        out = torch.ops.adp.cached_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.k_cache, self.v_cache,
            slot_mapping, block_tables, context_lens, self.head_dim ** -0.5)
        h = h + out.transpose(1, 2).reshape(batch, seq, -1) @ self.o
        x = h
        if self.group is not None:
            name, size, _ = self.group
            x = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), size, name))
        y = F.gelu(x @ self.up) @ self.down
        if self.group is not None:
            y = _c10d.wait_tensor(_c10d.reduce_scatter_tensor(y.contiguous(), "sum", size, name))
        return (F.rms_norm(h + y, (h.shape[-1],)) @ self.head,)

    def cache(self) -> PagedKVCache:
        return PagedKVCache.over([self.k_cache], [self.v_cache])


def _requests(count: int, seed: int, lengths=(3, 7, 5, 7, 12), new=(4, 1, 5, 3, 2)) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    return [Request(f"s{seed}-{i}", torch.randint(1, 48, (lengths[i % 5],), generator=g).tolist(),
                    SamplingParams(max_new_tokens=new[i % 5])) for i in range(count)]


def _tokens(results) -> dict:
    return {r.request_id: r.tokens for r in results}


# ----------------------------------------------------------------------------- padding, 1 process
def test_prefill_batch_pads_prompts_and_adds_padding_rows():
    (ids, positions, slots, tables, lens), last = prefill_batch(
        [[5, 6, 7], [8]], [[16, 17, 18], [32]], [[1], [2]], rows=3, length=4, device=CPU)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 3]] * 3
    assert slots.tolist() == [16, 17, 18, -1, 32, -1, -1, -1, -1, -1, -1, -1]
    assert tables.tolist() == [[1], [2], [0]] and tables.dtype == torch.int32
    assert lens.tolist() == [4, 4, 4] and lens.dtype == torch.int32  # prefill: context_len == S
    assert last.tolist() == [2, 0]  # each prompt's own last token
    (ids, _, slots, tables, lens), last = prefill_batch([], [], [], rows=2, length=3, device=CPU)
    assert ids.shape == (2, 3) and slots.tolist() == [-1] * 6 and tables.shape == (2, 1)
    assert last.tolist() == []
    with pytest.raises(ValueError, match="do not fit"):
        prefill_batch([[1, 2, 3]], [[0, 1, 2]], [[0]], rows=1, length=2, device=CPU)


def test_decode_batch_padding_rows_write_and_read_nothing():
    ids, positions, slots, tables, lens = decode_batch(
        [9, 4], [5, 17], [21, 49], [[1], [2, 3]], [6, 18], rows=4, device=CPU)
    assert ids.tolist() == [[9], [4], [0], [0]] and positions.tolist() == [[5], [17], [0], [0]]
    assert slots.tolist() == [21, 49, -1, -1]
    assert tables.tolist() == [[1, 0], [2, 3], [0, 0], [0, 0]]
    assert lens.tolist() == [6, 18, 0, 0]


class _Echo(nn.Module):
    """Logits that say which token they were read at: one-hot of the input token."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, ids, positions, slot_mapping, block_tables, context_lens):
        self.calls.append((tuple(ids.shape), slot_mapping.tolist(), context_lens.tolist()))
        return (F.one_hot(ids, 64).float(),)


class _OtherRanks:
    """Stands in for a lockstep group's other ranks: while this rank has work they want at
    least ``floor`` = [prefill rows, prompt length, decode rows]."""

    def __init__(self, floor: list[int]):
        self.floor, self.calls = floor, 0

    def agree(self, values: list[int]) -> list[int]:
        self.calls += 1
        if len(values) == 4 and not values[3]:
            return values
        return [max(v, f) for v, f in zip(values, self.floor)] + values[len(self.floor):]


def test_lockstep_logits_come_from_each_prompts_last_token():
    model = _Echo()
    cache = PagedKVCache(1, 16, 16, 1, 16, torch.float32)
    # in step with the host: every step's calls are the floor's, so their count is exact here
    engine = RankEngine(model, cache, lockstep=_OtherRanks([3, 9, 5]), async_decode=False)
    prompts = [[3, 1, 4], [1, 5, 9], [2, 6, 5, 3, 5]]
    results = engine.generate([Request(i, p, SamplingParams(max_new_tokens=2))
                               for i, p in enumerate(prompts)])
    # echo: the first token is the prompt's last one (a right-pad would give 0), then it repeats
    assert [r.tokens for r in results] == [[4, 4], [9, 9], [5, 5]]
    shapes = [shape for shape, _, _ in model.calls]
    assert shapes == [(3, 9), (5, 1), (3, 9), (5, 1)]  # every call at the floor
    # first prefill: two prompts of 3 padded to 9, a padding row; every pad token slot -1
    _, slots, lens = model.calls[0]
    assert lens == [9, 9, 9]
    assert [s >= 0 for s in slots] == ([True] * 3 + [False] * 6) * 2 + [False] * 9
    _, slots, lens = model.calls[1]  # decode: two sequences, three padding rows
    assert [s >= 0 for s in slots] == [True, True, False, False, False] and lens[2:] == [0, 0, 0]
    assert engine.stats.prefill_tokens == 11 and engine.stats.decode_tokens == 3
    assert cache.num_free_blocks == 16


def test_padded_lockstep_steps_change_no_token_and_write_no_foreign_slot():
    requests = _requests(5, seed=1)
    alone = ToyModel()
    want = RankEngine(alone, alone.cache(), max_batch=3).generate(requests)
    padded = ToyModel()
    others = _OtherRanks([4, 13, 6])
    got = RankEngine(padded, padded.cache(), max_batch=3, lockstep=others).generate(requests)
    assert _tokens(got) == _tokens(want)
    assert all(shape in [(4, 13), (6, 1)] for shape in padded.calls)
    assert len(padded.calls) > len(alone.calls)  # a padding decode row after max_new_tokens=1
    # Padding rows wrote nothing: the same cache slots hold data as alone (same allocations).
    written = [(m.k_cache != 0).flatten(2).any(-1) for m in (alone, padded)]
    assert torch.equal(written[0], written[1])
    torch.testing.assert_close(padded.k_cache, alone.k_cache)


def test_without_lockstep_no_padding_and_no_agreement():
    model = ToyModel()
    engine = RankEngine(model, model.cache())
    engine.generate(_requests(3, seed=2))
    assert engine.lockstep is None and engine.stats.idle_calls == 0 and not engine.active
    assert all(b <= 3 for b, _ in model.calls)


def test_run_takes_a_mapping_whose_tp_is_the_world_size(capsys):
    from adp_pass.cli import main

    assert main(["run", "--mapping", "tp=2,attn_dp=0", "--world-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "--world-size 4 is not the --mapping's tp (2)" in err and "fix:" in err
    assert main(["run", "--mapping", "tp=2,attn_dp=1,attn_tp=3"]) == 2
    assert "attn_tp (3) must divide tp (2)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real gloo ranks
def _serve_in_lockstep(mapping_spec: str, per_group: list[int]) -> dict:
    import torch.distributed as dist

    from adp_pass.launch import init_rank
    from adp_pass.mapping import Mapping
    from adp_pass.runtime.groups import create_groups
    from adp_pass.runtime.lockstep import Lockstep

    rank, _, _ = init_rank()
    mapping = Mapping.load(mapping_spec)
    groups = create_groups(mapping)
    mlp = mapping.mlp_group(rank)
    dp = mapping.dp_rank(rank)
    requests = _requests(per_group[dp], seed=10 + dp)
    model = ToyModel(group=(groups.names["mlp"], len(mlp), mlp.index(rank)))
    engine = RankEngine(model, model.cache(), max_batch=2, lockstep=Lockstep(groups.lockstep))
    got = _tokens(engine.generate(requests))
    alone = ToyModel()  # the whole MLP, no collective, no lockstep
    want = _tokens(RankEngine(alone, alone.cache(), max_batch=2).generate(requests))
    dist.barrier()
    return {"got": got, "want": want, "calls": model.calls, "agreements": engine.lockstep.calls,
            "lockstep_ranks": groups.lockstep_ranks, "idle_calls": engine.stats.idle_calls}


@pytest.mark.multirank
@pytest.mark.parametrize("mapping, per_group", [
    ("tp=2,attn_dp=1,mlp_tp=2", [3, 0]),
    # four ranks with an empty one (opt-in, CI time: the case above has an empty rank of a
    # sharded MLP)
    pytest.param("tp=4,attn_dp=1,mlp_tp=4", [2, 0, 5, 1], marks=pytest.mark.full),
])
def test_lockstep_ranks_with_a_sharded_mlp_match_one_rank_alone(mapping, per_group):
    from adp_pass.launch import launch

    start = time.monotonic()
    ranks = launch(_serve_in_lockstep, len(per_group), mapping, per_group, timeout_s=60)
    for rank, out in enumerate(ranks):
        assert len(out["got"]) == per_group[rank], rank
        assert out["got"] == out["want"], rank
        peers = [ranks[r] for r in out["lockstep_ranks"]]
        assert all(p["calls"] == out["calls"] for p in peers)  # the same [B, S], call by call
        assert all(p["agreements"] == out["agreements"] for p in peers)
    assert ranks[per_group.index(0)]["idle_calls"] > 0  # no requests, yet it made every call
    assert time.monotonic() - start < 60


def _cancel_in_lockstep(mapping_spec: str, per_group: list[int], cancel_after: int) -> dict:
    """Each rank serves its requests one step at a time; DP group 0 cancels its first request
    after ``cancel_after`` steps, while a step is in flight (the group runs one step ahead)."""
    import torch.distributed as dist

    from adp_pass.launch import init_rank
    from adp_pass.mapping import Mapping
    from adp_pass.runtime.groups import create_groups
    from adp_pass.runtime.lockstep import Lockstep

    rank, _, _ = init_rank()
    mapping = Mapping.load(mapping_spec)
    groups = create_groups(mapping)
    mlp = mapping.mlp_group(rank)
    dp = mapping.dp_rank(rank)
    requests = _requests(per_group[dp], seed=20 + dp, new=(9, 6, 8, 7, 5))
    model = ToyModel(group=(groups.names["mlp"], len(mlp), mlp.index(rank)))
    cache = model.cache()
    engine = RankEngine(model, cache, max_batch=2, lockstep=Lockstep(groups.lockstep))
    for request in requests:
        engine.add(request)
    engine.begin()
    results, steps, cancelled, in_flight = [], 0, None, False
    while engine.active:
        if dp == 0 and steps == cancel_after:
            in_flight = engine._inflight is not None and bool(engine._inflight.seqs)
            cancelled = requests[0].request_id
            assert engine.cancel(cancelled)
        results += engine.step()
        steps += 1
    kept = [r for r in requests if r.request_id != cancelled]
    alone = ToyModel()
    want = _tokens(RankEngine(alone, alone.cache(), max_batch=2).generate(kept))
    dist.barrier()
    return {"got": _tokens(results), "want": want, "cancelled": cancelled,
            "in_flight": in_flight, "free": cache.num_free_blocks == cache.num_blocks}


@pytest.mark.multirank
def test_a_cancel_while_the_group_runs_ahead_leaves_the_other_tokens_and_frees_its_blocks():
    from adp_pass.launch import launch

    start = time.monotonic()
    ranks = launch(_cancel_in_lockstep, 2, "tp=2,attn_dp=1,mlp_tp=2", [3, 2], 3, timeout_s=60)
    assert ranks[0]["cancelled"] == "s20-0" and ranks[0]["in_flight"]
    assert "s20-0" not in ranks[0]["got"]
    for out in ranks:
        assert out["got"] == out["want"] and out["free"]
    assert time.monotonic() - start < 60


# ----------------------------------------------------------------------------- end to end
def _e2e_config():
    from adp_pass.presets import qwen3_config

    return qwen3_config("tiny", num_key_value_heads=4)  # GQA; tp=4 and attn_tp=2 divide 4


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """A checkpoint written by transformers, requests of three lengths, and transformers'
    greedy tokens for each."""
    from transformers import Qwen3ForCausalLM

    config = _e2e_config()
    path = tmp_path_factory.mktemp("tiny-gqa4-checkpoint")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    model.save_pretrained(path)
    generator = torch.Generator().manual_seed(3)
    requests = [
        Request(f"r{i}", torch.randint(0, config.vocab_size, (n,), generator=generator).tolist(),
                SamplingParams(max_new_tokens=6))
        for i, n in enumerate([5, 9, 3])
    ]
    want = {}
    for request in requests:
        ids = torch.tensor([request.prompt])
        out = model.generate(ids, do_sample=False, max_new_tokens=6, min_new_tokens=6,
                             attention_mask=torch.ones_like(ids))
        want[request.request_id] = out[0, len(request.prompt):].tolist()
    return str(path), requests, want


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("mapping, world", [
    # the TP job as captured: one DP group, all-reduces over both ranks (CI's case: two ranks)
    ("tp=2,attn_dp=0", 2),
    # own requests, MLP gathered over both ranks (opt-in: CI runs this mapping through the
    # lockstep engine in test_lockstep_ranks_with_a_sharded_mlp_match_one_rank_alone and on
    # four ranks in tests/test_mappings.py; the job path with collectives is the attn_tp case below)
    pytest.param("tp=2,attn_dp=1,mlp_tp=2", 2, marks=pytest.mark.full),
    # two DP groups of two ranks, attention TP inside each (opt-in, CI time: four ranks;
    # tests/test_families.py serves attn_tp=2 on two gloo ranks)
    pytest.param("tp=4,attn_dp=1,attn_tp=2", 4, marks=pytest.mark.full),
])
def test_run_job_with_collectives_matches_transformers(e2e, mapping, world):
    from adp_pass.mapping import Mapping
    from adp_pass.runtime.frontend import assign_by_load, make_job, run_job

    checkpoint, requests, want = e2e
    parsed = Mapping.load(mapping)
    from adp_pass.runtime.serving_config import ServingConfig

    job = make_job(mapping, assign_by_load(requests, parsed.dp_size), checkpoint=checkpoint,
                   serving=ServingConfig(num_blocks=16, max_position=64), check_first_step=True)
    report = run_job(job, world, timeout_s=300)
    served = {r.request_id: r.tokens for r in report.results}
    assert served == want
    assert [r.leader for r in report.ranks] == [parsed.attn_group(r)[0] == r
                                               for r in range(world)]
    for rank in report.ranks:
        assert rank.dp_rank == parsed.dp_rank(rank.rank)
        # the ranks of a DP group served the same requests, token for token
        leader = report.ranks[parsed.attn_group(rank.rank)[0]]
        assert rank.results == leader.results
        check = rank.first_step_check  # rank's padded prefill vs transformers, full weights
        assert check.same_argmax and check.max_abs_diff < 1e-4, check
