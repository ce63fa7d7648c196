"""A Qwen3 dense model written the way serving engines (vLLM / SGLang) write it.

Test fixture: the ADP pass must accept a tensor-parallel graph from this model as well as one
from transformers + ``torch.distributed.tensor.parallel``. Names and layouts deliberately differ
from transformers (no ``model.`` prefix, fused ``qkv_proj`` / ``gate_up_proj``, vocab-parallel
embedding, all-gathered lm_head) so the pass cannot lean on names. Collectives are the explicit
functional ``_c10d_functional`` ops; with ``tp_size == 1`` none are emitted, giving the
"unsharded" engine model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config

_c10d = torch.ops._c10d_functional


def _all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _c10d.wait_tensor(_c10d.all_reduce(x, "sum", group_name))


def _head_dim(config: Qwen3Config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_theta(config: Qwen3Config) -> float:
    # transformers 5 moved rope_theta into config.rope_parameters; older configs have the attribute.
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise NotImplementedError(f"only default RoPE is supported, got {params['rope_type']!r}")
    return float(params["rope_theta"]) if "rope_theta" in params else float(config.rope_theta)


def _check_tp(config: Qwen3Config, tp_size: int, tp_rank: int) -> None:
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    divisible = {
        "vocab_size": config.vocab_size,
        "num_attention_heads": config.num_attention_heads,
        # Engines replicate kv heads when tp > kv heads; this fixture does not.
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
    }
    for name, value in divisible.items():
        if value % tp_size:
            raise ValueError(f"config.{name}={value} is not divisible by tp_size={tp_size}")
    if config.attention_bias or config.hidden_act != "silu":
        raise NotImplementedError("fixture supports attention_bias=False and hidden_act='silu' only")


class RMSNorm(nn.Module):
    """Numerically identical to transformers' Qwen3RMSNorm (fp32 variance, cast back, times weight)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, tp_size: int, tp_rank: int, group_name: str | None) -> None:
        super().__init__()
        self.shard = vocab // tp_size
        self.start, self.end = tp_rank * self.shard, (tp_rank + 1) * self.shard
        self.tp_size, self.group_name = tp_size, group_name
        self.weight = nn.Parameter(torch.empty(self.shard, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        # Tensor-op masking (no Python branching on data) so the graph stays traceable.
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return _all_reduce(out, self.group_name)


class ParallelLMHead(nn.Module):
    """Column-parallel over the vocab; local logits are all-gathered to full [.., vocab]."""

    def __init__(self, vocab: int, hidden: int, tp_size: int, group_name: str | None) -> None:
        super().__init__()
        self.tp_size, self.group_name = tp_size, group_name
        self.weight = nn.Parameter(torch.empty(vocab // tp_size, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        if self.tp_size == 1:
            return logits
        flat = logits.reshape(-1, logits.shape[-1])  # [T, vocab/tp]
        g = _c10d.wait_tensor(_c10d.all_gather_into_tensor(flat, self.tp_size, self.group_name))
        # g is rank-major [tp*T, vocab/tp]; rank r holds vocab columns [r*V/tp, (r+1)*V/tp).
        full = torch.cat(torch.chunk(g, self.tp_size, dim=0), dim=-1)
        return full.reshape(*logits.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config, tp_size: int, group_name: str | None) -> None:
        super().__init__()
        self.head_dim = _head_dim(config)
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_heads = config.num_key_value_heads // tp_size
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.tp_size, self.group_name = tp_size, group_name
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # [B, S, heads, D] -> [B, heads, S, D]; shapes come from the tensors so B/S stay symbolic.
        q = self.q_norm(q.view(*q.shape[:-1], -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(*k.shape[:-1], -1, self.head_dim)).transpose(1, 2)
        v = v.view(*v.shape[:-1], -1, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        # GQA by explicit kv-head repetition (local q head i uses local kv head i // n_rep), which
        # keeps the SDPA call on the plain path for every backend and torch version.
        n_rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim**-0.5)
        o = self.o_proj(o.transpose(1, 2).reshape(*x.shape[:-1], -1))
        return o if self.tp_size == 1 else _all_reduce(o, self.group_name)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MLP(nn.Module):
    def __init__(self, config: Qwen3Config, tp_size: int, group_name: str | None) -> None:
        super().__init__()
        inter = config.intermediate_size // tp_size
        self.tp_size, self.group_name = tp_size, group_name
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        out = self.down_proj(F.silu(gate) * up)
        return out if self.tp_size == 1 else _all_reduce(out, self.group_name)


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, tp_size: int, group_name: str | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp_size, group_name)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp_size, group_name)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class EngineQwen3ForCausalLM(nn.Module):
    def __init__(self, config: Qwen3Config, tp_size: int = 1, tp_rank: int = 0, group_name: str | None = None) -> None:
        super().__init__()
        _check_tp(config, tp_size, tp_rank)
        if tp_size > 1 and group_name is None:
            if not dist.is_initialized():
                raise ValueError("tp_size > 1 needs group_name or an initialised default process group")
            group_name = dist.group.WORLD.group_name
        self.config, self.tp_size, self.tp_rank, self.group_name = config, tp_size, tp_rank, group_name
        self.head_dim = _head_dim(config)
        H, V = config.hidden_size, config.vocab_size
        self.embed_tokens = VocabParallelEmbedding(V, H, tp_size, tp_rank, group_name)
        self.layers = nn.ModuleList(DecoderLayer(config, tp_size, group_name) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(V, H, tp_size, group_name)
        inv_freq = 1.0 / (_rope_theta(config) ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.tied = bool(config.tie_word_embeddings)
        if self.tied:
            # Both are [vocab/tp, hidden] row shards of the same matrix, so sharing is consistent.
            self.lm_head.weight = self.embed_tokens.weight
            # Keep state_dict() keys == engine_state_dict_from_hf() keys (no duplicate lm_head.weight).
            self.register_state_dict_post_hook(_drop_tied_key)
            self.register_load_state_dict_pre_hook(_fill_tied_key)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        # Same cos/sin as transformers' default Qwen3 rotary embedding (fp32, then cast to h.dtype).
        pos = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(device=input_ids.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, head_dim], broadcasts over [B, heads, S, D]
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.norm(h))


def _drop_tied_key(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict.pop(prefix + "lm_head.weight", None)


def _fill_tied_key(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    if prefix + "embed_tokens.weight" in state_dict:
        state_dict.setdefault(prefix + "lm_head.weight", state_dict[prefix + "embed_tokens.weight"])


def engine_state_dict_from_hf(
    hf_state_dict: dict[str, torch.Tensor], config: Qwen3Config, tp_size: int = 1, tp_rank: int = 0
) -> dict[str, torch.Tensor]:
    """This rank's shard, in engine names and fused layouts, of a transformers Qwen3ForCausalLM state dict."""
    _check_tp(config, tp_size, tp_rank)
    D = _head_dim(config)

    def rows(t: torch.Tensor, n: int) -> torch.Tensor:  # rank's block of n // tp rows
        s = n // tp_size
        return t[tp_rank * s : (tp_rank + 1) * s]

    def cols(t: torch.Tensor, n: int) -> torch.Tensor:
        s = n // tp_size
        return t[:, tp_rank * s : (tp_rank + 1) * s]

    Hq, Hkv = config.num_attention_heads * D, config.num_key_value_heads * D
    I, V = config.intermediate_size, config.vocab_size
    out = {"embed_tokens.weight": rows(hf_state_dict["model.embed_tokens.weight"], V)}
    for i in range(config.num_hidden_layers):
        hf, en = f"model.layers.{i}.", f"layers.{i}."
        a, m = hf + "self_attn.", hf + "mlp."
        out[en + "input_layernorm.weight"] = hf_state_dict[hf + "input_layernorm.weight"]
        out[en + "post_attention_layernorm.weight"] = hf_state_dict[hf + "post_attention_layernorm.weight"]
        out[en + "self_attn.qkv_proj.weight"] = torch.cat(
            [
                rows(hf_state_dict[a + "q_proj.weight"], Hq),
                rows(hf_state_dict[a + "k_proj.weight"], Hkv),
                rows(hf_state_dict[a + "v_proj.weight"], Hkv),
            ]
        )
        out[en + "self_attn.q_norm.weight"] = hf_state_dict[a + "q_norm.weight"]
        out[en + "self_attn.k_norm.weight"] = hf_state_dict[a + "k_norm.weight"]
        out[en + "self_attn.o_proj.weight"] = cols(hf_state_dict[a + "o_proj.weight"], Hq)
        out[en + "mlp.gate_up_proj.weight"] = torch.cat(
            [rows(hf_state_dict[m + "gate_proj.weight"], I), rows(hf_state_dict[m + "up_proj.weight"], I)]
        )
        out[en + "mlp.down_proj.weight"] = cols(hf_state_dict[m + "down_proj.weight"], I)
    out["norm.weight"] = hf_state_dict["model.norm.weight"]
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = rows(hf_state_dict["lm_head.weight"], V)
    # Own, contiguous copies: shards must not alias (or keep alive) the full HF tensors.
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- FP8 variant
# The same engine-style TP model with its decoder linears FP8 block-scaled (docs/fp8.md, "FP8 in
# the graph"): each holds a float8_e4m3fn weight and its 128 x 128 tile scales
# (``weight_scale_inv``) and calls ``adp::fp8_block_linear``. q/k/v and gate/up are separate here
# and the names are transformers' (``model.layers.0.self_attn.q_proj.weight``, ...), so the
# rewritten graph loads an ``adp quantize`` checkpoint by name.
class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        from adp_pass import fp8

        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=fp8.E4M3),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.ones(fp8.scale_shape((out_features, in_features))), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.adp.fp8_block_linear(x, self.weight, self.weight_scale_inv)


class Fp8Attention(nn.Module):
    def __init__(self, config: Qwen3Config, tp_size: int, group_name: str | None) -> None:
        super().__init__()
        self.head_dim = _head_dim(config)
        self.tp_size, self.group_name = tp_size, group_name
        H, D = config.hidden_size, self.head_dim
        q, kv = config.num_attention_heads * D // tp_size, config.num_key_value_heads * D // tp_size
        self.q_proj, self.k_proj, self.v_proj = Fp8Linear(H, q), Fp8Linear(H, kv), Fp8Linear(H, kv)
        self.o_proj = Fp8Linear(q, H)
        self.q_norm = RMSNorm(D, config.rms_norm_eps)
        self.k_norm = RMSNorm(D, config.rms_norm_eps)
        self.n_rep = config.num_attention_heads // config.num_key_value_heads

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(*q.shape[:-1], -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(*k.shape[:-1], -1, self.head_dim)).transpose(1, 2)
        v = v.view(*v.shape[:-1], -1, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(self.n_rep, dim=1), v.repeat_interleave(self.n_rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim**-0.5)
        o = self.o_proj(o.transpose(1, 2).reshape(*x.shape[:-1], -1))
        return o if self.tp_size == 1 else _all_reduce(o, self.group_name)


class Fp8MLP(nn.Module):
    def __init__(self, config: Qwen3Config, tp_size: int, group_name: str | None) -> None:
        super().__init__()
        H, inter = config.hidden_size, config.intermediate_size // tp_size
        self.tp_size, self.group_name = tp_size, group_name
        self.gate_proj, self.up_proj = Fp8Linear(H, inter), Fp8Linear(H, inter)
        self.down_proj = Fp8Linear(inter, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out if self.tp_size == 1 else _all_reduce(out, self.group_name)


class Fp8DecoderLayer(DecoderLayer):
    """DecoderLayer's forward on the FP8 attention and MLP."""

    def __init__(self, config: Qwen3Config, tp_size: int, group_name: str | None) -> None:
        nn.Module.__init__(self)  # not DecoderLayer's: it would build bf16 linears first
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Fp8Attention(config, tp_size, group_name)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Fp8MLP(config, tp_size, group_name)


class _Rotary(nn.Module):
    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)


class Fp8Body(nn.Module):
    def __init__(self, config: Qwen3Config, tp_size: int, tp_rank: int, group_name: str | None,
                 ) -> None:
        super().__init__()
        H, V, D = config.hidden_size, config.vocab_size, _head_dim(config)
        self.embed_tokens = VocabParallelEmbedding(V, H, tp_size, tp_rank, group_name)
        self.layers = nn.ModuleList(Fp8DecoderLayer(config, tp_size, group_name)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(H, config.rms_norm_eps)
        inv_freq = 1.0 / (_rope_theta(config) ** (torch.arange(0, D, 2, dtype=torch.float) / D))
        self.rotary_emb = _Rotary(inv_freq)


class Fp8EngineQwen3ForCausalLM(nn.Module):
    """TP rank ``tp_rank`` of a Qwen3 whose decoder linears are FP8 block-scaled; ``tp_size``
    1 is the unsharded model (the parity reference). Untied embeddings only."""

    def __init__(self, config: Qwen3Config, tp_size: int = 1, tp_rank: int = 0,
                 group_name: str | None = None) -> None:
        super().__init__()
        _check_tp(config, tp_size, tp_rank)
        if config.tie_word_embeddings:
            raise NotImplementedError("the FP8 fixture has untied embeddings only")
        if tp_size > 1 and group_name is None:
            group_name = dist.group.WORLD.group_name
        self.tp_size = tp_size
        self.model = Fp8Body(config, tp_size, tp_rank, group_name)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp_size, group_name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float32)
        freqs = pos[:, None] * self.model.rotary_emb.inv_freq.to(device=input_ids.device,
                                                                 dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.model.norm(h))


_FP8_COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
               "mlp.up_proj")
_FP8_ROW = ("self_attn.o_proj", "mlp.down_proj")


def fp8_shard_state(full: dict[str, torch.Tensor], config: Qwen3Config, tp_size: int,
                    tp_rank: int) -> dict[str, torch.Tensor]:
    """Rank ``tp_rank``'s part of an FP8 checkpoint's tensors (transformers names): column
    linears' weight rows with their scale-tile rows, row linears' weight columns with their
    scale-tile columns, vocab rows of the embedding and LM head. Refuses shards that are not
    whole 128-tiles (a rank's scales would then cover other ranks' values)."""
    from adp_pass import fp8

    block = fp8.WEIGHT_BLOCK[0]

    def cut(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim] // tp_size
        return t.narrow(dim, tp_rank * n, n)

    out: dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        leaf = name.rsplit(".", 1)[0]
        module = leaf.split(".", 3)[-1] if leaf.startswith("model.layers.") else leaf
        dim = 0 if module in _FP8_COLUMN else 1 if module in _FP8_ROW else None
        if name.endswith("weight_scale_inv"):
            weight = full[name.removesuffix("_scale_inv")]
            n = weight.shape[dim] // tp_size
            if n % block:
                raise ValueError(f"{name}: a rank's {n} of {weight.shape[dim]} is not whole "
                                 f"{block}-tiles")
            out[name] = tensor.narrow(dim, tp_rank * n // block, n // block)
        elif dim is not None:
            out[name] = cut(tensor, dim)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = cut(tensor, 0)
        else:
            out[name] = tensor
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def fp8_state_from_reference(reference: dict[str, torch.Tensor],
                             scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """transformers' Qwen3 state dict with its decoder linears quantized as ``adp quantize``
    stores them (scales rounded to ``scale_dtype``, held as float32 here)."""
    from adp_pass import fp8

    out: dict[str, torch.Tensor] = {}
    for name, tensor in reference.items():
        module = name.rsplit(".", 1)[0].split(".", 3)[-1]
        if name.startswith("model.layers.") and module in _FP8_COLUMN + _FP8_ROW:
            weight, scale = fp8.quantize_weight_stored(tensor, scale_dtype)
            out[name], out[name + "_scale_inv"] = weight, scale.float()
        else:
            out[name] = tensor
    return out
