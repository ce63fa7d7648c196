"""Projection fusion of FP8 linears (runtime/lower/fuse_projections.py; docs/fp8.md, "Projection
fusion"): q|k|v and gate|up of an FP8 rank become one ``adp.fp8_block_linear_quantized`` (or
``adp.fp8_block_linear``) each, on ``cat(W_i)`` and ``cat(S_i)`` along N.

The graphs here are built directly, at fp8-tiny's shapes (hidden 192, q 8 x 128, k/v 4 x 128,
intermediate 512, 2 layers) and in the form the lowering leaves them (``fp8_quant``: one
quantizing producer, per linear its own views of the codes and scales; o_proj quantizing its
input itself), so no capture is needed: each test takes 3 s at most under the interpreter
(mostly its first kernel launches). The whole path (capture, ``fp8_linears``, lowering,
``prepare_rank`` running the pass after the build cache) is
``test_prepare_rank_fuses_an_fp8_rank`` (``-m full``) and, in the default suite,
tests/test_fp8_native.py's job test (its counts, and its first-step check reading the weights
back through ``unfused_state_dict``).

Numerics: the fused graph's outputs are asserted bit-identical (``torch.equal``) to the unfused
graph's: every member before the last is whole 128-row tiles, so the fused weight's tiles (and
the kernels' 64-/128-row blocks) are the members' tiles, each output column sums the same
per-tile products in the same order, and the activation codes and scales are the same tensors.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch

import adp_pass.runtime.kernels  # noqa: F401  (registers the adp FP8 ops)
from adp_pass import fp8
from adp_pass.graph_record import graph_record
from adp_pass.runtime.lower.fuse_projections import fuse_projections, unfused_state_dict

aten = torch.ops.aten
adp = torch.ops.adp
LINEAR = adp.fp8_block_linear.default
QUANTIZED = adp.fp8_block_linear_quantized.default
EPS = 1e-6
HIDDEN, LAYERS = 192, 2  # fp8-tiny
SHAPES = {"self_attn.q_proj": 1024, "self_attn.k_proj": 512, "self_attn.v_proj": 512,
          "self_attn.o_proj": HIDDEN, "mlp.gate_proj": 512, "mlp.up_proj": 512,
          "mlp.down_proj": HIDDEN}
IN = {"self_attn.o_proj": 1024, "mlp.down_proj": 512}  # in features; the others read HIDDEN


def _fp8_parameters(rows: int, cols: int, seed: int, scale_dtype=torch.float32):
    """A random weight quantized per 128 x 128 tile, its tiles' scales spread over a factor of
    16 (so a scale applied to the wrong tile shows)."""
    generator = torch.Generator().manual_seed(seed)
    weight = 0.05 * torch.randn(rows, cols, generator=generator)
    exponents = torch.randint(-2, 3, fp8.scale_shape((rows, cols)), generator=generator)
    tiles = exponents.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    weight *= 2.0 ** tiles
    w, s = fp8.quantize_weight_stored(weight, scale_dtype)
    return (torch.nn.Parameter(w, requires_grad=False),
            torch.nn.Parameter(s, requires_grad=False))


def _module(names_shapes: dict[str, tuple[int, int]], scale_dtypes: dict | None = None
            ) -> torch.nn.Module:
    """A module tree holding ``name.weight`` (fp8) and ``name.weight_scale_inv`` per entry, and
    norm weights where a name ends in ``norm``."""
    root = torch.nn.Module()
    for seed, (name, shape) in enumerate(names_shapes.items()):
        owner = root
        for part in name.split("."):
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if name.endswith("norm"):
            owner.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(shape[0]), requires_grad=False)
            continue
        dtype = (scale_dtypes or {}).get(name, torch.float32)
        owner.weight, owner.weight_scale_inv = _fp8_parameters(*shape, seed, dtype)
    return root


def qwen3_fp8_graph(quantized: bool = True, layers: int = LAYERS) -> torch.fx.GraphModule:
    """fp8-tiny's decoder (attention reduced to ``q * cat(k, v)``, the projections as served) as
    the lowering leaves it. ``quantized``: after ``fp8_quant`` (norms / SwiGLU quantize, each
    linear ``fp8_block_linear_quantized`` on its own views of the codes and scales); else before
    it (``fp8_block_linear`` on views of the norm's output). Input ``x [B, S, 192]``."""
    entries: dict[str, tuple[int, int]] = {}
    for i in range(layers):
        entries[f"model.layers.{i}.input_layernorm"] = (HIDDEN,)
        entries[f"model.layers.{i}.post_attention_layernorm"] = (HIDDEN,)
        for name, rows in SHAPES.items():
            entries[f"model.layers.{i}.{name}"] = (rows, IN.get(name, HIDDEN))
    root = _module(entries)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    b = g.call_function(aten.sym_size.int, (x, 0))
    s = g.call_function(aten.sym_size.int, (x, 1))
    tokens = g.call_function(operator.mul, (b, s))

    def attr(name):
        return g.get_attr(name)

    def item(node, i):
        return g.call_function(operator.getitem, (node, i))

    def linear(prefix, name, source):
        """``source``: (codes, scales) of a quantizing producer, or a high-precision tensor."""
        k = IN.get(name, HIDDEN)
        weight = attr(f"{prefix}.{name}.weight")
        scale = attr(f"{prefix}.{name}.weight_scale_inv")
        if isinstance(source, tuple):
            codes = g.call_function(aten.view.default, (source[0], [tokens, k]))
            scales = g.call_function(aten.view.default, (source[1], [tokens, -(-k // 128)]))
            out = g.call_function(QUANTIZED, (codes, scales, weight, scale, torch.float32))
        else:
            rows = g.call_function(aten.view.default, (source, [tokens, k]))
            out = g.call_function(LINEAR, (rows, weight, scale))
        return g.call_function(aten._unsafe_view.default, (out, [b, s, SHAPES[name]]))

    def norm(prefix, name, h, residual):
        weight = attr(f"{prefix}.{name}.weight")
        if residual is None:
            op = adp.rms_norm_fp8.default if quantized else adp.rms_norm.default
            made = g.call_function(op, (h, weight, EPS))
            return ((item(made, 0), item(made, 1)) if quantized else made), h
        op = adp.add_rms_norm_fp8.default if quantized else adp.add_rms_norm.default
        made = g.call_function(op, (h, residual, weight, EPS))
        if quantized:
            return (item(made, 0), item(made, 1)), item(made, 2)
        return item(made, 0), item(made, 1)

    h, residual = x, None
    for i in range(layers):
        prefix = f"model.layers.{i}"
        normed, residual = norm(prefix, "input_layernorm", h, residual)
        q, k, v = (linear(prefix, f"self_attn.{p}_proj", normed) for p in "qkv")
        attention = g.call_function(aten.mul.Tensor, (q, g.call_function(aten.cat.default,
                                                                          ([k, v], -1))))
        o = linear(prefix, "self_attn.o_proj", attention)  # quantizes its input itself
        normed, residual = norm(prefix, "post_attention_layernorm", o, residual)
        gate, up = (linear(prefix, f"mlp.{p}_proj", normed) for p in ("gate", "up"))
        if quantized:
            act = g.call_function(adp.silu_mul_fp8.default, (gate, up))
            act = (item(act, 0), item(act, 1))
        else:
            act = g.call_function(adp.silu_mul.default, (gate, up))
        h = linear(prefix, "mlp.down_proj", act)
    g.output((h, residual))
    return torch.fx.GraphModule(root, g)


def _census(gm) -> dict[str, int]:
    ops = {"quantized": QUANTIZED, "linear": LINEAR}
    return {k: sum(n.target is op for n in gm.graph.nodes) for k, op in ops.items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == fp8.E4M3 else t


def _run(gm, x):
    with torch.no_grad():
        return gm(x)


# ----------------------------------------------------------------------------- fp8-tiny's layers
@pytest.fixture(scope="module")
def graphs():
    plain = qwen3_fp8_graph()
    fused = copy.deepcopy(plain)
    counts = fuse_projections(fused)
    return plain, fused, counts


def test_qkv_and_gate_up_fuse_with_their_scale_grids(graphs):
    plain, fused, counts = graphs
    # Per layer q|k|v and gate|up: 5 GEMMs become 2; o_proj and down_proj stay alone.
    assert counts == {"groups": 2 * LAYERS, "gemms": 5 * LAYERS}
    assert _census(plain) == {"quantized": 6 * LAYERS, "linear": LAYERS}
    assert _census(fused) == {"quantized": 3 * LAYERS, "linear": LAYERS}
    params = dict(fused.named_parameters())
    qkv = "model.layers.0.self_attn.fused_q_proj_k_proj_v_proj_weight"
    gate_up = "model.layers.0.mlp.fused_gate_proj_up_proj_weight"
    assert (params[qkv].dtype, tuple(params[qkv].shape)) == (fp8.E4M3, (2048, HIDDEN))
    assert (params[qkv + "_scale_inv"].dtype, tuple(params[qkv + "_scale_inv"].shape)) == (
        torch.float32, (16, 2))  # 8 + 4 + 4 tile rows, ceil(192 / 128) tile columns
    assert tuple(params[gate_up].shape) == (1024, HIDDEN)
    assert tuple(params[gate_up + "_scale_inv"].shape) == (8, 2)
    for gone in ("model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.q_proj.weight_scale_inv",
                 "model.layers.1.mlp.up_proj.weight_scale_inv"):
        assert gone not in params
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" in params  # alone: kept
    # Memory does not grow: the originals are deleted, the bytes are the same.
    size = lambda gm: sum(p.numel() * p.element_size() for p in gm.parameters())  # noqa: E731
    assert size(fused) == size(plain)
    # The record names each original with its rows (tile rows for a scale grid) ...
    names = graph_record(fused).fused.names
    assert names[qkv + "_scale_inv"] == [
        (f"model.layers.0.self_attn.{p}_proj.weight_scale_inv", r) for p, r in
        (("q", 8), ("k", 4), ("v", 4))]
    assert names[gate_up] == [("model.layers.0.mlp.gate_proj.weight", 512),
                              ("model.layers.0.mlp.up_proj.weight", 512)]
    assert graph_record(fused).fused.refused == []
    # ... so the state dict splits back into the original tensors, bit for bit.
    want, got = plain.state_dict(), unfused_state_dict(fused)
    assert set(got) == set(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(_bits(got[k]), _bits(want[k]))
               for k in want)
    assert fuse_projections(fused) == {"groups": 0, "gemms": 0}  # nothing left to fuse


def test_fused_fp8_graph_is_bit_identical():
    """One layer (every producer: rms_norm_fp8, add_rms_norm_fp8, silu_mul_fp8 on the fused
    gate|up halves) at 9 tokens: the decode kernel. The tiled (prefill) kernel is in the
    refusals test below, on a group of its own."""
    plain = qwen3_fp8_graph(layers=1)
    fused = copy.deepcopy(plain)
    assert fuse_projections(fused) == {"groups": 2, "gemms": 5}
    x = torch.randn(1, 9, HIDDEN, generator=torch.Generator().manual_seed(0))
    want, got = _run(plain, x), _run(fused, x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert want[0].abs().max() > 0


def test_unquantized_fp8_linears_sharing_x_fuse_too():
    """Before ``fp8_quant`` (or where a producer has other readers) q/k/v read the norm's
    high-precision output: one ``fp8_block_linear`` quantizes it once instead of three times."""
    plain = qwen3_fp8_graph(quantized=False, layers=1)
    fused = copy.deepcopy(plain)
    assert fuse_projections(fused) == {"groups": 2, "gemms": 5}
    assert _census(plain) == {"quantized": 0, "linear": 7}
    assert _census(fused) == {"quantized": 0, "linear": 4}
    x = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(_run(fused, x), _run(plain, x)))


# ----------------------------------------------------------------------------- refusals
def _groups_graph() -> torch.fx.GraphModule:
    """Groups of FP8 linears (K = 256), each group reading its own quantized input:
    ``bad``: N = 192, 128 (the first ends in a partial tile) -> refused;
    ``tail``: N = 128, 192 (only the last does) -> fused;
    ``mixed``: fp32 and bf16 scale grids -> refused;
    ``dtypes``: out_dtype float32 and bfloat16 -> two lone GEMMs, no group."""
    entries = {"bad.a": (192, 256), "bad.b": (128, 256), "tail.a": (128, 256),
               "tail.b": (192, 256), "mixed.a": (128, 256), "mixed.b": (128, 256),
               "dtypes.a": (128, 256), "dtypes.b": (128, 256)}
    root = _module(entries, scale_dtypes={"mixed.b": torch.bfloat16})
    g = torch.fx.Graph()
    x = g.placeholder("x")
    inputs, outs = {}, []
    for name in entries:
        group = name.split(".")[0]
        if group not in inputs:
            made = g.call_function(adp.fp8_quant_groups.default, (x,))
            inputs[group] = [g.call_function(operator.getitem, (made, i)) for i in (0, 1)]
        dtype = torch.bfloat16 if name == "dtypes.b" else torch.float32
        outs.append(g.call_function(QUANTIZED, (*inputs[group], g.get_attr(f"{name}.weight"),
                                                g.get_attr(f"{name}.weight_scale_inv"), dtype)))
    g.output(tuple(outs))
    return torch.fx.GraphModule(root, g)


def test_groups_whose_scale_tiles_would_not_line_up_are_refused_and_counted():
    plain = _groups_graph()
    fused = copy.deepcopy(plain)
    assert fuse_projections(fused) == {"groups": 1, "gemms": 2, "refused": 2}
    refused = graph_record(fused).fused.refused
    assert len(refused) == 2
    assert "bad.a.weight has N = 192, not a multiple of 128" in refused[0]
    assert "weight_scale_inv dtypes differ (float32, bfloat16)" in refused[1]
    params = dict(fused.named_parameters())
    assert tuple(params["tail.fused_a_b_weight"].shape) == (320, 256)
    # 1 + 2 tile rows = ceil(320 / 128): the partial tile is the grid's last row.
    assert tuple(params["tail.fused_a_b_weight_scale_inv"].shape) == (3, 2)
    for kept in ("bad.a", "bad.b", "mixed.a", "mixed.b", "dtypes.a", "dtypes.b"):
        assert f"{kept}.weight" in params and f"{kept}.weight_scale_inv" in params
    assert params["mixed.b.weight_scale_inv"].dtype == torch.bfloat16  # never converted
    assert _census(fused)["quantized"] == 7
    # 3 rows: the decode kernel; 65: the tiled one (and the fused group's partial last tile).
    for rows in (3, 65):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        want, got = _run(plain, x), _run(fused, x)
        assert all(torch.equal(a, b) for a, b in zip(got, want))

    # Why ``bad`` must stay apart: concatenated, b's first 64 rows would take a's partial last
    # tile's scale (the grid even has the right shape, 2 + 1 = ceil(320 / 128) rows).
    a, b = (plain.get_submodule(f"bad.{m}") for m in "ab")
    naive = fp8.fp8_linear_reference(x, torch.cat([a.weight, b.weight]),
                                      torch.cat([a.weight_scale_inv, b.weight_scale_inv]))
    reference = [fp8.fp8_linear_reference(x, m.weight, m.weight_scale_inv) for m in (a, b)]
    assert torch.equal(naive[:, :192], reference[0])  # a itself is still right ...
    assert not torch.allclose(naive[:, 192:], reference[1], rtol=0.1, atol=0.1)  # ... b is not


# ----------------------------------------------------------------------------- the whole path
@pytest.mark.full  # CI time: a capture and two rank builds (~15 s on 2 cores). The fast tests
# above cover the pass on the graph form the lowering leaves (counts, names, bit-identity);
# tests/test_fp8_native.py's job test runs an FP8 rank through prepare_rank with the fusion on.
def test_prepare_rank_fuses_an_fp8_rank(tmp_path):
    from transformers import AutoConfig

    from adp_pass.quantize import quantize_checkpoint
    from adp_pass.runtime.engine import RankEngine
    from adp_pass.runtime.prepare import prepare_rank

    checkpoint = tmp_path / "fp8-tiny"
    quantize_checkpoint(checkpoint, preset="fp8-tiny", dtype="fp32", progress=False)
    config = AutoConfig.from_pretrained(checkpoint)
    config._attn_implementation, config.use_cache = "sdpa", False
    build = dict(device=torch.device("cpu"), checkpoint=checkpoint, num_blocks=8,
                 max_position=64, cache_dir=tmp_path / "cache")
    fused = prepare_rank(config, "tp=1,attn_dp=1", 0, **build)
    # The lowering's fp8_quant ran before (in the build), so the fused GEMMs read the codes.
    assert fused.counts["lower"]["fp8_quant"] == 3 * LAYERS
    assert fused.counts["fused"] == {"groups": 2 * LAYERS, "gemms": 5 * LAYERS}
    assert _census(fused.model) == {"quantized": 3 * LAYERS, "linear": LAYERS}
    # The build cache stored the unfused graph: a hit without the fusion has the originals.
    plain = prepare_rank(config, "tp=1,attn_dp=1", 0, fuse_projections=False, **build)
    assert plain.build_cache == "hit"
    assert "model.layers.0.self_attn.q_proj.weight_scale_inv" in dict(
        plain.model.named_parameters())
    want, got = plain.model.state_dict(), unfused_state_dict(fused.model)
    assert set(got) == set(want) and all(torch.equal(_bits(got[k]), _bits(want[k])) for k in want)
    prompt = [5, 6, 7, 200, 31, 17, 3, 250, 9]
    logits = [RankEngine(r.model, r.cache, max_position=64).prefill_logits(prompt)
              for r in (plain, fused)]
    assert torch.equal(logits[0], logits[1])
