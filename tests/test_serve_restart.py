"""A lockstep group restarts after one of its ranks dies (issue 27): real ``adp serve``
processes on gloo ranks (preset tiny), a rank killed with SIGKILL while requests are in flight.

What each case checks: the requests the group held fail (a 503 in the OpenAI format, an error
event on a stream), ``/health`` says ``restarting`` (503 when no group serves meanwhile, 200
when others do), new requests get 503 ``restarting`` with ``Retry-After``, the group comes back
from the build cache (new pids, ``adp_group_restarts_total``) and the next request is answered.
Everything waits with a timeout.

The default lane has the plain TP mapping (one group of two ranks: ~30 s on 2 cores, start
included); ``mlp_tp=2`` (two DP groups in one lockstep group) and four ranks in two lockstep
groups (the other group keeps serving) are opt-in (-m full). The replicated mapping's restart
is in tests/test_serve.py."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import openai
import pytest

from test_serve import REQUEST_TIMEOUT_S, Server, Stream, wait_for

pytestmark = pytest.mark.multirank

RESTART_TIMEOUT_S = 120  # backoff 1 s + a start from the build cache on 2 shared cores


class Waiting:
    """A non-streamed completion waited for on a thread: its response, or its exception."""

    def __init__(self, server: Server, max_tokens: int) -> None:
        self.response: httpx.Response | None = None
        self.thread = threading.Thread(target=self._post, args=(server, max_tokens), daemon=True)
        self.thread.start()

    def _post(self, server, max_tokens):
        self.response = server.post("/v1/completions", {"prompt": [7, 8, 9],
                                                        "max_tokens": max_tokens})


def kill_and_recover(server: Server, victim: int, streams: int, expect_lost: int) -> None:
    """Start ``streams`` long streams and one non-streamed request, kill rank ``victim`` with
    SIGKILL, and check the failure, the restart and the service after it. ``expect_lost``: how
    many of the streams the victim's group held."""
    before = server.health()
    groups = len(before["groups"])
    pids = {r["rank"]: r["pid"] for r in before["ranks"]}
    running = [Stream(server, 200) for _ in range(streams)]
    # With one group, a non-streamed request is on it too (with several it could go anywhere).
    waiting = Waiting(server, 200) if groups == 1 else None
    try:
        wait_for(lambda: all(s.chunks for s in running)
                 and server.metric("adp_requests_in_flight") == streams + (groups == 1),
                 what="every request in flight")
        os.kill(pids[victim], signal.SIGKILL)
        wait_for(lambda: sum(s.error is not None for s in running) == expect_lost,
                 timeout_s=30, what=f"{expect_lost} streams failing")
        for stream in running:
            if stream.error is not None:  # the error event, raised by the openai client
                assert isinstance(stream.error, openai.APIError), stream.error
                assert f"rank {victim} died" in str(stream.error), stream.error
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.json()["status"] == "restarting", health.json()
        # 503 when no group serves meanwhile (one lockstep group), 200 while others do.
        assert health.status_code == (503 if groups == 1 else 200)
        if groups == 1:
            # The non-streamed request was on the dead group too: a 503 in the OpenAI format.
            waiting.thread.join(REQUEST_TIMEOUT_S)
            assert waiting.response is not None and waiting.response.status_code == 503
            error = waiting.response.json()["error"]
            assert error["code"] == "request_failed" and f"rank {victim}" in error["message"]
            refused = server.post("/v1/completions", {"prompt": [1], "max_tokens": 1})
            assert refused.status_code == 503 and refused.headers["Retry-After"]
            assert refused.json()["error"]["code"] == "restarting"
        else:
            # Requests still get answered by the live groups while the victim's restarts.
            answer = server.client.completions.create(model="tiny", prompt="x", max_tokens=1)
            assert answer.choices[0].finish_reason == "length"
        wait_for(lambda: server.health()["status"] == "ok", timeout_s=RESTART_TIMEOUT_S,
                 what="the group serving again")
        after = server.health()
        assert after["ranks"][victim]["pid"] != pids[victim]
        assert sum(g["restarts"] for g in after["groups"]) == 1
        assert server.metric("adp_group_restarts_total",
                             dp_rank=after["ranks"][victim]["dp_rank"]) == 1
        answer = server.client.completions.create(model="tiny", prompt="again", max_tokens=3)
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == 3
        assert server.process.poll() is None  # the server itself never went down
    finally:
        for stream in running:
            stream.close()
        if waiting is not None:
            waiting.thread.join(REQUEST_TIMEOUT_S)


def test_tp_group_restarts_after_a_rank_is_killed(tmp_path):
    """tp=2,attn_dp=0: both ranks step together; killing rank 1 fails the one DP group's
    requests, the group restarts, the next request is answered."""
    server = Server("--preset", "tiny", "--mapping", "tp=2,attn_dp=0", "--num-blocks", "32",
                    log=tmp_path / "tp.log")
    try:
        kill_and_recover(server, victim=1, streams=1, expect_lost=1)
    finally:
        server.stop()
    log = (tmp_path / "tp.log").read_text()
    assert "restarting ranks 0-1 (DP group 0) in 1 s (attempt 1 of 3)" in log, log[-2000:]
    assert "ranks 0-1 (DP group 0) serving again (restart 1)" in log


@pytest.mark.full  # its own server: ~35 s on 2 cores (-m full)
def test_mlp_tp_group_restarts_after_its_leader_is_killed(tmp_path):
    """tp=2,attn_dp=1,mlp_tp=2: two DP groups share the MLP, so they step together; killing
    rank 0 (the group's link to the front end) fails both groups' requests, then both serve."""
    server = Server("--preset", "tiny", "--mapping", "tp=2,attn_dp=1,mlp_tp=2",
                    "--num-blocks", "32", log=tmp_path / "mlp.log")
    try:
        kill_and_recover(server, victim=0, streams=2, expect_lost=2)
    finally:
        server.stop()


@pytest.mark.full  # four ranks on 2 cores: ~90 s (-m full)
def test_other_lockstep_group_keeps_serving_while_one_restarts(tmp_path):
    """tp=4,attn_dp=1,mlp_tp=2: lockstep groups {0, 1} and {2, 3}, each its own job; rank 3
    dies: only DP groups 2 and 3 lose their requests, 0 and 1 keep generating and answering."""
    server = Server("--preset", "tiny", "--mapping", "tp=4,attn_dp=1,mlp_tp=2",
                    "--num-blocks", "32", log=tmp_path / "four.log")
    try:
        kill_and_recover(server, victim=3, streams=4, expect_lost=2)
    finally:
        server.stop()
