"""A TP decoder written in many source styles, for the style-fuzzing property test.

Serving engines and hand-written TP models spell the same computation differently: explicit
per-rank head counts or ``-1``; fused or separate q/k/v and gate/up; ``view`` or
``reshape``; batch-first ``[b, s, h]`` or sequence-first ``[s, b, h]`` activations; q/k
bias; q/k norms; vocab-parallel or replicated embedding, tied or not; kv heads replicated
when tp exceeds them (vLLM's rule); FP8 block-scaled projections (``adp::fp8_block_linear``
with a ``weight_scale_inv`` beside each fp8 weight, as an FP8 checkpoint's engine holds them).
A :class:`Style` picks one spelling of each, and
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
    fp8: bool = False  # q/k/v/o/gate/up/down as FP8 block-scaled linears (128 x 128 tiles)

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


class _Fp8Linear(nn.Module):
    """An FP8 block-scaled projection: e4m3 ``weight [out, in]``, fp32 ``weight_scale_inv``
    (one per 128 x 128 tile), an optional bias added after the op."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        from adp_pass import fp8  # defines adp::fp8_block_linear

        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=fp8.E4M3),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.ones(fp8.scale_shape((out_features, in_features))), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.adp.fp8_block_linear(x, self.weight, self.weight_scale_inv)
        return y if self.bias is None else y + self.bias


def _linear(s: Style, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    if s.fp8:
        return _Fp8Linear(in_features, out_features, bias)
    return nn.Linear(in_features, out_features, bias=bias)


class _Layer(nn.Module):
    def __init__(self, s: Style, tp: int, group: str | None) -> None:
        super().__init__()
        self.s, self.tp, self.group = s, tp, group
        self.nq = s.heads // tp
        self.nkv = max(1, s.kv_heads // tp)
        d = s.head_dim
        q, kv = self.nq * d, self.nkv * d
        if s.fused_qkv:
            self.qkv_proj = _linear(s, s.hidden, q + 2 * kv, bias=s.qkv_bias)
        else:
            self.q_proj = _linear(s, s.hidden, q, bias=s.qkv_bias)
            self.k_proj = _linear(s, s.hidden, kv, bias=s.qkv_bias)
            self.v_proj = _linear(s, s.hidden, kv, bias=s.qkv_bias)
        self.o_proj = _linear(s, q, s.hidden)
        inter = s.inter // tp
        if s.fused_gate_up:
            self.gate_up_proj = _linear(s, s.hidden, 2 * inter)
        else:
            self.gate_proj = _linear(s, s.hidden, inter)
            self.up_proj = _linear(s, s.hidden, inter)
        self.down_proj = _linear(s, inter, s.hidden)
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
        if name.endswith("_scale_inv"):
            continue  # drawn with its weight
        if name + "_scale_inv" in model.state_dict():  # an fp8 weight: drawn, then quantized
            from adp_pass import fp8

            drawn = torch.randn(tensor.shape) * tensor.shape[-1] ** -0.5
            state[name], state[name + "_scale_inv"] = fp8.quantize_weight_stored(
                drawn, torch.float32)
        elif "norm" in name:
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

    def cut(name: str, tensor: torch.Tensor) -> torch.Tensor:
        leaf = name.rsplit(".", 1)[-1] if "." in name else name
        module = name.split(".")[-2] if name.count(".") >= 2 else ""
        if name in ("embed", "lm_head"):
            return rows(tensor, tp, rank) if style.vocab_parallel else tensor
        if module in ("q_proj", "gate_proj", "up_proj"):
            return rows(tensor, tp, rank)
        if module in ("k_proj", "v_proj"):
            return kv_rows(tensor)
        if module == "qkv_proj":
            q_size, kv_size = style.heads * d, style.kv_heads * d
            q, k, v = tensor.split([q_size, kv_size, kv_size])
            return torch.cat([rows(q, tp, rank), kv_rows(k), kv_rows(v)])
        if module == "gate_up_proj":
            gate, up = tensor.chunk(2)
            return torch.cat([rows(gate, tp, rank), rows(up, tp, rank)])
        if module in ("o_proj", "down_proj") and leaf == "weight":
            return rows(tensor.t(), tp, rank).t()
        return tensor

    out = {}
    for name, tensor in full.items():
        if name.endswith("_scale_inv"):
            continue  # cut with its weight
        out[name] = cut(name, tensor)
        if name + "_scale_inv" in full:
            out[name + "_scale_inv"] = _fp8_scale_shard(
                name, tensor, full[name + "_scale_inv"], out[name], cut)
    return {k: v.contiguous().clone() for k, v in out.items()}


def _fp8_scale_shard(name: str, weight: torch.Tensor, scale: torch.Tensor,
                     local: torch.Tensor, cut) -> torch.Tensor:
    """The scale tiles of an fp8 weight's shard: the full grid's tiles when the shard is whole
    128 x 128 tiles of the full weight (what an FP8 engine holds); otherwise the shard
    re-quantized on its own tiles, a source whose tiles differ from the checkpoint's, which
    the pass must refuse (``Fp8BlockError``)."""
    from adp_pass import fp8

    n, k = weight.shape
    row_of = cut(name, torch.arange(n)[:, None].expand(n, k))[:, 0]  # full row of each local row
    col_of = cut(name, torch.arange(k)[None, :].expand(n, k))[0, :]
    row_tiles, col_tiles = _whole_tiles(row_of, n), _whole_tiles(col_of, k)
    if row_tiles is not None and col_tiles is not None:
        return scale[row_tiles][:, col_tiles]
    values = fp8.dequantize_weight(weight, scale)
    return fp8.quantize_weight_stored(cut(name, values), torch.float32)[1]


def _whole_tiles(index: torch.Tensor, full: int, block: int = 128) -> list[int] | None:
    """The full tile of each local 128-tile when every one is a whole tile of the full dim
    (consecutive, starting on a tile edge, as long as that tile); else None."""
    tiles = []
    for start in range(0, len(index), block):
        part = index[start:start + block]
        first = int(part[0])
        expected = torch.arange(first, first + min(block, full - first))
        if first % block or not torch.equal(part, expected):
            return None
        tiles.append(first // block)
    return tiles


def example_ids(style: Style, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (seq, batch) if style.seq_first else (batch, seq)
    return torch.randint(0, style.vocab, shape, generator=generator)
