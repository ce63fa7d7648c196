"""A TP decoder written in many source styles, for the style-fuzzing property test.

Serving engines and hand-written TP models spell the same computation differently: explicit
per-rank head counts or ``-1``; fused or separate q/k/v and gate/up; ``view`` or
``reshape``; batch-first ``[b, s, h]`` or sequence-first ``[s, b, h]`` activations; q/k
bias; q/k norms; vocab-parallel or replicated embedding, tied or not; kv heads replicated
when tp exceeds them (vLLM's rule). A :class:`Style` picks one spelling of each, and
:class:`StyledTPModel` is rank r's TP model in that style (``tp == 1``: the unsharded one,
whose state dict the rewrite loads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_c10d = torch.ops._c10d_functional


@dataclass(frozen=True)
class Style:
    tp: int = 2
    heads_per_rank: int = 2  # q heads on each rank
    gqa: int = 1  # q heads per kv head
    head_dim: int = 8
    hidden: int = 32
    layers: int = 1
    explicit_heads: bool = True  # view(b, s, n_local, d) rather than view(b, s, -1, d)
    fused_qkv: bool = False
    fused_gate_up: bool = False
    use_reshape: bool = False
    seq_first: bool = False  # activations [s, b, hidden] (Megatron) rather than [b, s, hidden]
    qkv_bias: bool = False
    qk_norm: bool = True
    math_attention: bool = False  # softmax(q @ k^T) @ v rather than SDPA
    mask_to_heads: bool = False  # a causal mask expanded to the local head count (as CUDA's
    # efficient-attention path does) rather than is_causal
    vocab_parallel: bool = True
    tied: bool = False
    vocab_per_rank: int = 16
    inter_per_rank: int = 16

    @property
    def heads(self) -> int:
        return self.heads_per_rank * self.tp

    @property
    def kv_heads(self) -> int:
        """Total kv heads; fewer than tp means each is replicated on tp / kv_heads ranks."""
        return max(1, self.heads // self.gqa)

    @property
    def kv_per_rank(self) -> int:
        return max(1, self.kv_heads // self.tp)

    @property
    def vocab(self) -> int:
        return self.vocab_per_rank * self.tp

    @property
    def inter(self) -> int:
        return self.inter_per_rank * self.tp


def _all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    return _c10d.wait_tensor(_c10d.all_reduce(x, "sum", group))


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Layer(nn.Module):
    def __init__(self, s: Style, tp: int, group: str | None) -> None:
        super().__init__()
        self.s, self.tp, self.group = s, tp, group
        self.nq = s.heads // tp
        self.nkv = max(1, s.kv_heads // tp)
        d = s.head_dim
        q, kv = self.nq * d, self.nkv * d
        if s.fused_qkv:
            self.qkv_proj = nn.Linear(s.hidden, q + 2 * kv, bias=s.qkv_bias)
        else:
            self.q_proj = nn.Linear(s.hidden, q, bias=s.qkv_bias)
            self.k_proj = nn.Linear(s.hidden, kv, bias=s.qkv_bias)
            self.v_proj = nn.Linear(s.hidden, kv, bias=s.qkv_bias)
        self.o_proj = nn.Linear(q, s.hidden, bias=False)
        inter = s.inter // tp
        if s.fused_gate_up:
            self.gate_up_proj = nn.Linear(s.hidden, 2 * inter, bias=False)
        else:
            self.gate_proj = nn.Linear(s.hidden, inter, bias=False)
            self.up_proj = nn.Linear(s.hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, s.hidden, bias=False)
        self.input_norm = nn.Parameter(torch.ones(s.hidden))
        self.post_norm = nn.Parameter(torch.ones(s.hidden))
        if s.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(d))
            self.k_norm = nn.Parameter(torch.ones(d))

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """[.., n*d] -> [b, n, s, d], in the style's spelling."""
        s = self.s
        n = count if s.explicit_heads else -1
        a, b = x.shape[0], x.shape[1]
        x = x.reshape(a, b, n, s.head_dim) if s.use_reshape else x.view(a, b, n, s.head_dim)
        return x.permute(1, 2, 0, 3) if s.seq_first else x.transpose(1, 2)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s, d = self.s, self.s.head_dim
        if s.fused_qkv:
            q, k, v = self.qkv_proj(x).split([self.nq * d, self.nkv * d, self.nkv * d], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = self._heads(q, self.nq), self._heads(k, self.nkv), self._heads(v, self.nkv)
        if s.qk_norm:
            q, k = _rms(q, self.q_norm), _rms(k, self.k_norm)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = self.nq // self.nkv
        if rep > 1:  # transformers' repeat_kv spelling: expand a new dim, then merge it
            b, n, t = k.shape[0], k.shape[1], k.shape[2]
            k = k[:, :, None].expand(b, n, rep, t, d).reshape(b, n * rep, t, d)
            v = v[:, :, None].expand(b, n, rep, t, d).reshape(b, n * rep, t, d)
        if s.math_attention:  # matmul folds the heads into the batch: [b * n, s, d]
            t = q.shape[2]
            scores = (q @ k.transpose(-1, -2)) * d**-0.5
            future = torch.ones(t, t, dtype=torch.bool).triu(1)
            o = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        elif s.mask_to_heads:
            b, t = q.shape[0], q.shape[2]
            allowed = torch.ones(t, t, dtype=torch.bool).tril()
            mask = allowed[None, None].expand(b, self.nq, t, t)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, n, s, d]
        o = o.permute(2, 0, 1, 3) if s.seq_first else o.transpose(1, 2)
        count = self.nq * d if s.explicit_heads else -1
        o = o.reshape(o.shape[0], o.shape[1], count)
        out = self.o_proj(o)
        return out if self.tp == 1 else _all_reduce(out, self.group)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.s.fused_gate_up:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        out = self.down_proj(F.silu(gate) * up)
        return out if self.tp == 1 else _all_reduce(out, self.group)

    def forward(self, h, cos, sin):
        h = h + self.attention(_rms(h, self.input_norm), cos, sin)
        return h + self.mlp(_rms(h, self.post_norm))


class StyledTPModel(nn.Module):
    """Rank ``rank``'s model of a ``tp``-rank job in ``style`` (tp=1: the unsharded model)."""

    def __init__(self, style: Style, tp: int, rank: int = 0) -> None:
        super().__init__()
        self.s, self.tp, self.rank = style, tp, rank
        self.group = dist.group.WORLD.group_name if tp > 1 else None
        vocab_rows = style.vocab // tp if style.vocab_parallel else style.vocab
        self.embed = nn.Parameter(torch.empty(vocab_rows, style.hidden))
        self.layers = nn.ModuleList(_Layer(style, tp, self.group) for _ in range(style.layers))
        self.norm = nn.Parameter(torch.ones(style.hidden))
        if style.tied:
            self.lm_head = self.embed
        else:
            self.lm_head = nn.Parameter(torch.empty(vocab_rows, style.hidden))
        d = style.head_dim
        self.register_buffer(
            "inv_freq", 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d)), persistent=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = self.s
        if s.vocab_parallel and self.tp > 1:
            shard = self.embed.shape[0]
            start = self.rank * shard
            outside = (ids < start) | (ids >= start + shard)
            h = F.embedding((ids - start).masked_fill(outside, 0), self.embed)
            h = _all_reduce(h.masked_fill(outside.unsqueeze(-1), 0.0), self.group)
        else:
            h = F.embedding(ids, self.embed)
        seq = ids.shape[0] if s.seq_first else ids.shape[1]
        freqs = torch.arange(seq, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [s, d]: broadcasts over [b, n, s, d]
        cos, sin = emb.cos(), emb.sin()
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = F.linear(_rms(h, self.norm), self.lm_head)
        if not s.vocab_parallel or self.tp == 1:
            return logits
        flat = logits.reshape(-1, logits.shape[-1])
        gathered = _c10d.wait_tensor(_c10d.all_gather_into_tensor(flat, self.tp, self.group))
        full = torch.cat(torch.chunk(gathered, self.tp, dim=0), dim=-1)
        return full.reshape(*logits.shape[:-1], -1)


def full_state(style: Style, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the unsharded model (norms near 1, so the numbers stay tame)."""
    torch.manual_seed(seed)
    model = StyledTPModel(style, 1)
    state = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if "norm" in name:
            state[name] = 1.0 + 0.1 * torch.randn(tensor.shape)
        else:
            state[name] = torch.randn(tensor.shape) * tensor.shape[-1] ** -0.5
    if style.tied:
        state["lm_head"] = state["embed"]
    return state


def shard_state(style: Style, full: dict[str, torch.Tensor], rank: int) -> dict:
    """Rank ``rank``'s tensors of a ``style.tp``-rank job, cut from the unsharded ones."""
    tp, d = style.tp, style.head_dim

    def rows(t: torch.Tensor, parts: int, index: int) -> torch.Tensor:
        size = t.shape[0] // parts
        return t[index * size:(index + 1) * size]

    def kv_rows(t: torch.Tensor) -> torch.Tensor:
        if style.kv_heads >= tp:
            return rows(t, tp, rank)
        head = rank * style.kv_heads // tp  # vLLM: each kv head replicated on tp/kv ranks
        return t[head * d:(head + 1) * d]

    out = {}
    for name, tensor in full.items():
        leaf = name.rsplit(".", 1)[-1] if "." in name else name
        module = name.split(".")[-2] if name.count(".") >= 2 else ""
        if name in ("embed", "lm_head"):
            out[name] = rows(tensor, tp, rank) if style.vocab_parallel else tensor
        elif module in ("q_proj", "gate_proj", "up_proj"):
            out[name] = rows(tensor, tp, rank)
        elif module in ("k_proj", "v_proj"):
            out[name] = kv_rows(tensor)
        elif module == "qkv_proj":
            q_size, kv_size = style.heads * d, style.kv_heads * d
            q, k, v = tensor.split([q_size, kv_size, kv_size])
            out[name] = torch.cat([rows(q, tp, rank), kv_rows(k), kv_rows(v)])
        elif module == "gate_up_proj":
            gate, up = tensor.chunk(2)
            out[name] = torch.cat([rows(gate, tp, rank), rows(up, tp, rank)])
        elif module in ("o_proj", "down_proj") and leaf == "weight":
            out[name] = rows(tensor.t(), tp, rank).t()
        else:
            out[name] = tensor
    return {k: v.contiguous().clone() for k, v in out.items()}


def example_ids(style: Style, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (seq, batch) if style.seq_first else (batch, seq)
    return torch.randint(0, style.vocab, shape, generator=generator)
