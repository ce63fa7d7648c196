"""Structural patterns for the collectives of a TP Qwen3 graph, tried in this order."""

from adp_pass.patterns import (
    attention_allreduce,
    embedding_allreduce,
    lm_head_gather,
    mlp_allreduce,
)

# Order matters only for speed: the per-layer sites are the common case.
SITE_PATTERNS = (attention_allreduce, mlp_allreduce, embedding_allreduce, lm_head_gather)

__all__ = ["SITE_PATTERNS"]
