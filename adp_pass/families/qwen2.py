"""Qwen2 / Qwen2.5 dense (``model_type`` "qwen2"): like Llama but with biases on the q, k and v
projections (not on o_proj), no q/k norm, and no ``head_dim`` in the config (it is
``hidden_size // num_attention_heads``; ``Family.complete`` writes it in).

transformers' TP plan shards the q/k/v biases with their weights (``ColwiseParallel``); the
pass finds them as the column weights' biases (``patterns/block_allreduce.py``) and grows them
with the weights. Published shape: Qwen2.5-7B's ``config.json`` (RMSNorm eps 1e-6, rope theta 1e6).
"""

from adp_pass.families import Family, PresetShape


def _shape(*args, **kwargs) -> PresetShape:
    return PresetShape(*args, family="qwen2", **kwargs)


PRESETS = {
    "qwen2.5-7b": _shape(3584, 28, 28, 4, 18944, vocab_size=152064,
                         max_position_embeddings=32768),
    # Test shapes (head_dim = hidden / heads, as Qwen2 computes it).
    "qwen2-tiny": _shape(64, 2, 8, 4, 128, head_dim=8, vocab_size=256,
                         max_position_embeddings=512, rope_theta=10_000.0),
    "qwen2-small": _shape(256, 4, 8, 4, 768, head_dim=32, vocab_size=1024,
                          max_position_embeddings=2048, rope_theta=10_000.0),
}

FAMILY = Family(
    model_type="qwen2",
    config_class="transformers.Qwen2Config",
    model_class="transformers.Qwen2ForCausalLM",
    rotary_class="transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding",
    presets=PRESETS,
    layer_tensors={
        "self_attn.q_proj.bias": ("q",),
        "self_attn.k_proj.bias": ("kv",),
        "self_attn.v_proj.bias": ("kv",),
    },
    config_defaults={"rms_norm_eps": 1e-6, "use_sliding_window": False},
    description="q/k/v biases (column-sharded with their weights); no q/k norm; plain rotary",
)
