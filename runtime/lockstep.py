"""Shape agreement for ranks that must step together.

When a rank's graph holds collectives (a sharded MLP all-gathers the batch over its group and
reduce-scatters it back; a TP attention group all-reduces), every rank of the group must call
the model the same number of times, in the same order, with the same input shape: a rank that
skips a call, or calls with a different batch, hangs the group or corrupts the gathered tensor.
Each engine step therefore starts with one tiny CPU all-reduce (MAX) over the *lockstep* group
(``runtime/groups.py``: a gloo group of ``Mapping.lockstep_size`` consecutive ranks): every rank
offers its local sizes and all of them pad to the group's largest. Gloo keeps the agreement off
the GPU stream, so it never waits behind queued kernels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Lockstep:
    """``agree(values)``: the elementwise MAX of ``values`` over the ranks of ``group``.

    Collective: every rank of the group calls it the same number of times with lists of the
    same length.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.calls = 0

    def agree(self, values: list[int]) -> list[int]:
        agreed = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
        self.calls += 1
        return agreed.tolist()
