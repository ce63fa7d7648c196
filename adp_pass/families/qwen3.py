"""Qwen3 dense (``model_type`` "qwen3"): per-head RMSNorm of q and k before the rotary
embedding (``q_norm`` / ``k_norm``), no biases, explicit ``head_dim``.

Published values are those of the Qwen3 model cards' ``config.json`` (head_dim 128, vocab
151936, rope theta 1e6, RMSNorm eps 1e-6 throughout).
"""

from adp_pass.families import Family, PresetShape


def _shape(*args, **kwargs) -> PresetShape:
    return PresetShape(*args, family="qwen3", **kwargs)


PRESETS = {
    "qwen3-0.6b": _shape(1024, 28, 16, 8, 3072, tie_word_embeddings=True),
    "qwen3-1.7b": _shape(2048, 28, 16, 8, 6144, tie_word_embeddings=True),
    "qwen3-4b": _shape(2560, 36, 32, 8, 9728, tie_word_embeddings=True),
    "qwen3-8b": _shape(4096, 36, 32, 8, 12288),
    "qwen3-14b": _shape(5120, 40, 40, 8, 17408),
    "qwen3-32b": _shape(5120, 64, 64, 8, 25600),
    # Test shapes: heads divisible by 1, 2, 4 and 8 ("tiny"), or by 3 ("tiny-3").
    "tiny": _shape(64, 2, 8, 8, 128, head_dim=16, vocab_size=256,
                   max_position_embeddings=512, rope_theta=10_000.0),
    "tiny-3": _shape(96, 2, 6, 3, 192, head_dim=16, vocab_size=384,
                     max_position_embeddings=512, rope_theta=10_000.0),
    # The README's default job: big enough to show the sites, small enough for a laptop CPU.
    "small": _shape(256, 4, 8, 4, 768, head_dim=32, vocab_size=1024,
                    max_position_embeddings=2048, rope_theta=10_000.0),
}

FAMILY = Family(
    model_type="qwen3",
    config_class="transformers.Qwen3Config",
    model_class="transformers.Qwen3ForCausalLM",
    rotary_class="transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding",
    presets=PRESETS,
    layer_tensors={
        "self_attn.q_norm.weight": ("head_dim",),
        "self_attn.k_norm.weight": ("head_dim",),
    },
    config_defaults={"rms_norm_eps": 1e-6, "attention_bias": False},
    description="q/k RMSNorm per head before the rotary embedding; no biases",
)
