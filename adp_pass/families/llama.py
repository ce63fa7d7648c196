"""Llama (``model_type`` "llama", transformers ``LlamaForCausalLM``): no q/k norm, plain RoPE
on the projections, no biases by default (``attention_bias`` / ``mlp_bias`` add them).

Published shapes are Llama 3's ``config.json`` (8B and 70B: head_dim 128, vocab 128256, rope theta
5e5, RMSNorm eps 1e-5, default rope; Llama 3.1's "llama3" rope scaling is not a preset, a
checkpoint brings it in its config).
"""

from adp_pass.families import Family, PresetShape


def _shape(*args, **kwargs) -> PresetShape:
    return PresetShape(*args, family="llama", **kwargs)


PRESETS = {
    "llama3-8b": _shape(4096, 32, 32, 8, 14336, vocab_size=128256,
                        max_position_embeddings=8192, rope_theta=500_000.0),
    "llama3-70b": _shape(8192, 80, 64, 8, 28672, vocab_size=128256,
                         max_position_embeddings=8192, rope_theta=500_000.0),
    # Test shapes (head_dim = hidden / heads as in every Llama; GQA 8/4: tp 1, 2, 4).
    "llama-tiny": _shape(64, 2, 8, 4, 128, head_dim=8, vocab_size=256,
                         max_position_embeddings=512, rope_theta=10_000.0),
    "llama-small": _shape(256, 4, 8, 4, 768, head_dim=32, vocab_size=1024,
                          max_position_embeddings=2048, rope_theta=10_000.0),
}

FAMILY = Family(
    model_type="llama",
    config_class="transformers.LlamaConfig",
    model_class="transformers.LlamaForCausalLM",
    rotary_class="transformers.models.llama.modeling_llama.LlamaRotaryEmbedding",
    presets=PRESETS,
    layer_tensors={},
    config_defaults={"rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False},
    description="no q/k norm, plain rotary embedding; no biases",
)
