"""Qwen3 dense shapes: the published checkpoints' configs and small test shapes.

Published values are those of the Qwen3 model cards' ``config.json`` (head_dim 128, vocab
151936, rope theta 1e6, RMSNorm eps 1e-6 throughout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from adp_pass.errors import UsageError

if TYPE_CHECKING:  # transformers is imported on use: `adp --help` must not pay for it
    from transformers import Qwen3Config


@dataclass(frozen=True)
class Qwen3Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int = 128
    vocab_size: int = 151936
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0


class UnknownPreset(UsageError, KeyError):
    """A preset name that is not in PRESETS."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


PRESETS: dict[str, Qwen3Shape] = {
    "qwen3-0.6b": Qwen3Shape(1024, 28, 16, 8, 3072, tie_word_embeddings=True),
    "qwen3-1.7b": Qwen3Shape(2048, 28, 16, 8, 6144, tie_word_embeddings=True),
    "qwen3-4b": Qwen3Shape(2560, 36, 32, 8, 9728, tie_word_embeddings=True),
    "qwen3-8b": Qwen3Shape(4096, 36, 32, 8, 12288),
    "qwen3-14b": Qwen3Shape(5120, 40, 40, 8, 17408),
    "qwen3-32b": Qwen3Shape(5120, 64, 64, 8, 25600),
    # Test shapes: heads divisible by 1, 2, 4 and 8 ("tiny"), or by 3 ("tiny-3").
    "tiny": Qwen3Shape(64, 2, 8, 8, 128, head_dim=16, vocab_size=256,
                       max_position_embeddings=512, rope_theta=10_000.0),
    "tiny-3": Qwen3Shape(96, 2, 6, 3, 192, head_dim=16, vocab_size=384,
                         max_position_embeddings=512, rope_theta=10_000.0),
    # The README's default job: big enough to show the sites, small enough for a laptop CPU.
    "small": Qwen3Shape(256, 4, 8, 4, 768, head_dim=32, vocab_size=1024,
                        max_position_embeddings=2048, rope_theta=10_000.0),
}


def qwen3_config(preset: str | Qwen3Shape, **overrides) -> "Qwen3Config":
    """A transformers ``Qwen3Config`` for a preset name (or shape), with overrides applied."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise UnknownPreset(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}",
                                flag="--preset")
        preset = PRESETS[preset]
    from transformers import Qwen3Config

    fields = dict(preset.__dict__)
    fields.update(overrides)
    rope_theta = fields.pop("rope_theta")
    config = Qwen3Config(
        **fields,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=1e-6,
        attention_bias=False,
        use_cache=False,
    )
    # Plain SDPA attention: the graph then has one attention core op per layer.
    config._attn_implementation = "sdpa"
    return config
