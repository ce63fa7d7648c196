"""Next-token choice for a batch of sequences, each with its own sampling parameters.

Every choice, greedy or sampled, is a function of the row's logits and of (seed, counter): the
request's seed (its own ``SamplingParams.seed``, else one the engine draws when the request
arrives) and the index of the token being generated. Sampling is Gumbel-max with noise hashed
from those two numbers (``adp.sample_tokens``, runtime/kernels/sample.py), so it holds no
generator state, never syncs with the host and runs inside the decode step's CUDA graph; a
seeded request gets the same tokens whatever batch, rank or step-ahead mode it decodes in.
Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (the
first always stays), as the logits not below the last kept token's (``adp.top_p_cut``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Defined with the contract (torch-free: front ends build requests without torch); here for
# the engine's imports.
from adp_pass.runtime.contract import SamplingParams

_INT64 = 2**64


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of ``[B, V]`` logits; on CUDA by ``adp.greedy_argmax``, which
    spreads each long row over many programs (runtime/kernels/argmax.py)."""
    if logits.is_cuda and logits.dim() == 2:
        from adp_pass.runtime.kernels import argmax  # noqa: F401  (registers the op)

        return torch.ops.adp.greedy_argmax(logits)
    return logits.argmax(dim=-1)


def request_seed(params: SamplingParams, draw: torch.Generator) -> int:
    """The seed a request samples with: its own (wrapped to int64, as the kernel reads it), else
    one drawn from the engine's host generator ``draw``."""
    if params.seed is not None:
        return (params.seed + 2**63) % _INT64 - 2**63
    return int(torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64, generator=draw))


@dataclass
class RowSampling:
    """The sampling inputs of one call's rows, as host lists: ``1 / temperature`` (0 = greedy),
    ``top_p``, seed and counter (the index of the token the row generates)."""

    inv_temperature: list[float]
    top_p: list[float]
    seeds: list[int]
    counters: list[int]

    @classmethod
    def of(cls, params: list[SamplingParams], seeds: list[int],
           counters: list[int]) -> "RowSampling":
        # 1 / temperature is capped where fp32 still holds it times a logit (a temperature of
        # 1e-39 is greedy in effect, not inf * logit = NaN).
        return cls([min(1.0 / p.temperature, 1e30) if p.temperature > 0 else 0.0 for p in params],
                   [p.top_p for p in params], list(seeds), list(counters))

    @property
    def greedy(self) -> bool:
        """Every row takes the argmax."""
        return not any(self.inv_temperature)

    @property
    def cuts(self) -> bool:
        """Some sampled row keeps only its top-p tokens (the choice then finds its cut)."""
        return any(t > 0 and p < 1 for t, p in zip(self.inv_temperature, self.top_p))

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(inv_temperature, top_p, seeds, counters)``: fp32, fp32, int64, int64, ``[rows]``."""
        floats = torch.tensor([self.inv_temperature, self.top_p], dtype=torch.float32)
        longs = torch.tensor([self.seeds, self.counters], dtype=torch.int64)
        floats, longs = floats.to(device), longs.to(device)
        return floats[0], floats[1], longs[0], longs[1]


def choose_tokens(logits: torch.Tensor, inv_temperature: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, counters: torch.Tensor, *, cuts: bool) -> torch.Tensor:
    """One token per row of ``[B, V]`` logits from device tensors (``RowSampling.tensors``);
    ``cuts``: apply top-p (``adp.top_p_cut``: a bisection over each row, no sort), else every
    row keeps its whole vocabulary.
    No host sync: a decode graph captures it."""
    import adp_pass.runtime.kernels.sample  # noqa: F401  (registers adp.sample_tokens)
    import adp_pass.runtime.kernels.top_p  # noqa: F401  (registers adp.top_p_cut)

    if cuts:
        min_logit = torch.ops.adp.top_p_cut(logits, inv_temperature, top_p)
    else:
        min_logit = torch.full_like(inv_temperature, float("-inf"))
    return torch.ops.adp.sample_tokens(logits, inv_temperature, min_logit, seeds, counters)


def sample(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]: greedy rows take the argmax (first on ties, as
    transformers does), the others a draw from the temperature-scaled top-p distribution keyed
    by their (seed, counter)."""
    if rows.greedy:
        return greedy(logits)
    return choose_tokens(logits, *rows.tensors(logits.device), cuts=rows.cuts)
