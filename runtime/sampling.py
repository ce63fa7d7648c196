"""Next-token choice for a batch of sequences, each with its own sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (temperature 0 = greedy, as transformers' do_sample=False)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # A request's own sampling seed (the OpenAI ``seed``): its tokens then depend on neither the
    # rank nor the batch it shares; None draws from the engine's generator.
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of ``[B, V]`` logits; on CUDA by ``adp.greedy_argmax``, which
    spreads each long row over many programs (runtime/kernels/argmax.py)."""
    if logits.is_cuda and logits.dim() == 2:
        from adp_pass.runtime.kernels import argmax  # noqa: F401  (registers the op)

        return torch.ops.adp.greedy_argmax(logits)
    return logits.argmax(dim=-1)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generator: torch.Generator | None = None,
    row_generators: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]; greedy rows take the argmax (first on ties, as
    transformers does), the others sample from the temperature-scaled top-p distribution, from
    ``row_generators[i]`` where given (a seeded request), else from ``generator``."""
    tokens = greedy(logits)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    temperature = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
    top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
    probs = torch.softmax(logits[rows].float() / temperature[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p[:, None]
    sorted_probs = sorted_probs * keep
    own = [row_generators[i] if row_generators else None for i in sampled]
    if not any(g is not None for g in own):
        choice = torch.multinomial(sorted_probs, 1, generator=generator).squeeze(-1)
    else:  # one draw per row: a seeded row must not consume the shared generator's state
        choice = torch.cat([torch.multinomial(sorted_probs[j:j + 1], 1, generator=g or generator)
                            .view(1) for j, g in enumerate(own)])
    tokens[rows] = order.gather(-1, choice[:, None]).squeeze(-1)
    return tokens
