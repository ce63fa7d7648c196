"""A failed rank ends the job with an error naming it; its peers do not hang."""

import time

import pytest
import torch
import torch.distributed as dist

from adp_pass.launch import RankFailed, init_rank, launch

pytestmark = pytest.mark.multirank


def _rank_one_fails_while_rank_zero_waits() -> int:
    rank, _, _ = init_rank()
    if rank == 1:
        err = ValueError("checkpoint shard missing on rank 1")
        err.hint = "download shard 2 again"  # a rank's fix travels with its error
        raise err
    dist.all_reduce(torch.ones(1))  # would wait forever for rank 1 without the launcher/timeout
    return rank


def _ranks_sum() -> float:
    init_rank()
    value = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(value)
    return value.item()


def test_results_come_back_by_rank():
    assert launch(_ranks_sum, 3) == [6.0, 6.0, 6.0]


def test_failing_rank_is_named_and_the_others_stop():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 failed: .*checkpoint shard missing on rank 1"):
        launch(_rank_one_fails_while_rank_zero_waits, 2, timeout_s=30)
    assert time.monotonic() - start < 60


def test_with_a_log_dir_the_failure_is_one_line_and_the_details_are_in_files(tmp_path, capfd):
    with pytest.raises(RankFailed) as caught:
        launch(_rank_one_fails_while_rank_zero_waits, 2, timeout_s=30, log_dir=tmp_path)
    assert str(caught.value) == "rank 1 failed: ValueError: checkpoint shard missing on rank 1"
    assert caught.value.rank == 1 and caught.value.log == str(tmp_path)
    assert caught.value.hint == "download shard 2 again"
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and len((out + err).splitlines()) <= 2
    # torchrun keeps the failing rank's traceback in its error file under the log dir
    logs = "".join(p.read_text() for p in tmp_path.rglob("error.json"))
    assert "checkpoint shard missing on rank 1" in logs and "Traceback" in logs
