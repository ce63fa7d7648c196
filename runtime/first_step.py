"""A batch rank's first-step check (``Job.check_first_step``): one prompt's prefill logits on
the rank against transformers' model holding the same tensors, in the rank's dtype and in fp32;
an FP8 rank's also against the W8A8 arithmetic done exactly (fp32, the activations quantized
where the kernels quantize them), which tells the kernels' error apart from the quantization's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from adp_pass.runtime.contract import FirstStepCheck, Request
from adp_pass.runtime.rank import RankSession


def first_step_check(session: RankSession, requests: list[Request]) -> FirstStepCheck | None:
    """Collective: every rank calls it, with or without requests. Sharded weights (a sharded
    MLP, attention TP, the plain TP job) are gathered from the peers for the reference, and the
    model call goes through ``engine.prefill_logits``, padded to the lockstep group's shape.
    None for a rank without requests."""
    from transformers import AutoModelForCausalLM

    config, device = session.job.model_config(), session.device
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config).eval()
    tensors, skipped = _full_weights(session.built.model, reference)
    got = session.engine.prefill_logits(requests[0].prompt if requests else None)
    if not requests or tensors is None:
        del reference
        return FirstStepCheck(skipped=skipped) if requests else None
    from adp_pass import fp8
    from adp_pass.checks import SCALE_SUFFIX

    fp8_weights = [k.removesuffix(SCALE_SUFFIX) for k in tensors if k.endswith(SCALE_SUFFIX)]
    # shares the rank's tensors; an FP8 rank's weights dequantized to the rank's dtype
    reference.load_state_dict(fp8.dequantize_state(tensors, getattr(torch, session.job.dtype)),
                              strict=False, assign=True)
    with torch.device(device):  # inv_freq is not in the state dict: build it for real
        reference.model.rotary_emb = type(reference.model.rotary_emb)(config)
    prompt = torch.tensor([requests[0].prompt], device=device)
    hooked = lambda: _with_quantized_inputs(reference, fp8_weights, prompt)  # noqa: E731
    with torch.no_grad():
        want = reference(input_ids=prompt, use_cache=False).logits[0, -1].float()
        got = got.float()
        # The W8A8 arithmetic in the rank's dtype: where a deep model amplifies rounding, how
        # far a correct W8A8 pipeline at this precision lands from the exact one (below)
        w8a8_in_dtype = hooked().float() if fp8_weights else None
        # The same weights in fp32: how far either bf16 path is from exact arithmetic. An FP8
        # weight is dequantized again, in fp32: e4m3 x its tile's scale needs up to 12
        # significant bits, which bf16 (8) would round.
        reference.float()
        for name in fp8_weights:
            reference.get_parameter(name).data = fp8.dequantize_weight(
                tensors[name], tensors[name + SCALE_SUFFIX])
        exact = reference(input_ids=prompt, use_cache=False).logits[0, -1]
        w8a8 = hooked() if fp8_weights else None
    del reference
    return FirstStepCheck(
        max_abs_diff=(got - want).abs().max().item(),
        max_abs_logit=want.abs().max().item(),
        same_argmax=bool(got.argmax() == want.argmax()),
        ours_vs_fp32=(got - exact).abs().max().item(),
        transformers_vs_fp32=(want - exact).abs().max().item(),
        ours_vs_w8a8=None if w8a8 is None else (got - w8a8).abs().max().item(),
        w8a8_vs_fp32=None if w8a8 is None else (w8a8 - exact).abs().max().item(),
        w8a8_in_dtype_vs_w8a8=None if w8a8 is None else (w8a8_in_dtype - w8a8).abs().max().item(),
    )


def fp8_first_step_verdict(check: FirstStepCheck | None) -> dict | None:
    """An FP8 rank's first step against its stated bound (``adp_pass/verify.py``): its logits
    within the larger of 2^-3 x max |logit| and ``FP8_FIRST_STEP_FLOOR`` x the noise floor of
    the W8A8 arithmetic done exactly. The floor (the same arithmetic in the rank's dtype) is
    where a correct pipeline at that precision lands; where a deep model amplifies rounding,
    nothing tighter holds (docs/fp8.md). None without a W8A8 comparison (not an FP8 rank)."""
    if check is None or check.ours_vs_w8a8 is None:
        return None
    from adp_pass.verify import FP8_FIRST_STEP, FP8_FIRST_STEP_FLOOR

    by_logit = FP8_FIRST_STEP * check.max_abs_logit
    floor = check.w8a8_in_dtype_vs_w8a8
    by_floor = FP8_FIRST_STEP_FLOOR * floor
    limit, diff = max(by_logit, by_floor), check.ours_vs_w8a8
    governs = ("2^-3 x max |logit|" if by_logit >= by_floor
               else f"{FP8_FIRST_STEP_FLOOR:g} x the noise floor")
    return {"within": diff <= limit, "max_abs_diff": diff, "against": "W8A8 in fp32",
            "limit": limit, "limit_by_logit": by_logit, "limit_by_floor": by_floor,
            "noise_floor": floor, "governs": governs,
            "bound": f"max |logit diff| vs W8A8 in fp32 {diff:.4g} <= {limit:.4g} ({governs}; "
                     f"2^-3 x max |logit| {check.max_abs_logit:.4g} = {by_logit:.4g}, "
                     f"{FP8_FIRST_STEP_FLOOR:g} x noise floor {floor:.4g} = {by_floor:.4g})",
            "quantization_cost": (
                f"W8A8 in fp32 vs unquantized fp32: max |diff| {check.w8a8_vs_fp32:.4g}; ours vs "
                f"transformers (the rank's dtype, unquantized) {check.max_abs_diff:.4g}; noise "
                f"floor (W8A8 in the rank's dtype vs W8A8 in fp32) {floor:.4g}")}


def _with_quantized_inputs(reference, fp8_weights: list[str], prompt: torch.Tensor
                           ) -> torch.Tensor:
    """The reference's last-position logits with each FP8 linear's input rounded as the
    kernels round it (forward pre-hooks, removed after the call)."""
    hooks = [reference.get_submodule(name.rpartition(".")[0])
             .register_forward_pre_hook(_quantize_input) for name in fp8_weights]
    try:
        return reference(input_ids=prompt, use_cache=False).logits[0, -1]
    finally:
        for hook in hooks:
            hook.remove()


def _quantize_input(module, args):
    """A forward pre-hook: the linear's input rounded to e4m3 per token and 128-wide group, as
    the FP8 kernels quantize it (adp_pass/fp8.py's reference), in the input's dtype."""
    from adp_pass import fp8

    x = args[0]
    return (fp8.dequantize_activation(*fp8.quantize_activation(x)).to(x.dtype), *args[1:])


def _full_weights(model, reference) -> tuple[dict | None, str | None]:
    """The rank's weights at the reference's full shapes: its own tensors where they are full,
    else the shards of the ``full // local`` consecutive ranks around it, all-gathered over the
    world and concatenated along the one sharded dim (shards are contiguous, in rank order);
    an FP8 weight as its e4m3 codes beside its tile scales (``..._scale_inv``).

    Collective when a weight is sharded; every rank holds the same names and shapes, so all of
    them gather the same tensors in the same order (or all skip)."""
    from adp_pass.runtime.lower.fuse_projections import unfused_state_dict

    from adp_pass import fp8
    from adp_pass.checks import SCALE_SUFFIX

    full = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    weights = {k: v for k, v in unfused_state_dict(model).items() if not k.startswith("kv_cache")}
    # An FP8 rank's linears hold e4m3 codes and their tile scales (adp_pass/fp8_linears.py): the
    # scales are gathered like their weights.
    scales = {k for k in weights if k.endswith(SCALE_SUFFIX)}
    for name in scales:
        weight = name.removesuffix(SCALE_SUFFIX)
        if weight in full:
            full[name] = fp8.scale_shape(full[weight])
    for name, tensor in weights.items():
        want = full.get(name)
        if want is None or tuple(tensor.shape) == want:
            continue
        dims = [d for d, (a, b) in enumerate(zip(tensor.shape, want)) if a != b]
        if len(tensor.shape) != len(want) or len(dims) != 1 or want[dims[0]] % tensor.shape[dims[0]]:
            return None, f"{name} is {list(tensor.shape)}, not a shard of {list(want)}"
        dim, parts = dims[0], want[dims[0]] // tensor.shape[dims[0]]
        pieces = fp8.all_gather_bytes(tensor)  # an FP8 rank's codes too: gloo has no float8
        first = dist.get_rank() // parts * parts
        weights[name] = torch.cat(pieces[first:first + parts], dim=dim)
    return weights, None
