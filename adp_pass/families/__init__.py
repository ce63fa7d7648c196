"""Model families: everything that differs between the decoder models adp-pass handles.

One module per family (``qwen3.py``, ``llama.py``, ``qwen2.py``) defines a :class:`Family`:
the transformers classes (config, causal LM, rotary embedding), the presets, the checkpoint
tensors, the fixed config values of its presets and the TP plan. The rest of the project takes a
``PretrainedConfig`` and asks ``family_of(config)`` for what it needs, keyed by
``config.model_type``. The patterns (``patterns/``) know no family: they find the collective
sites by structure. docs/families.md says how to add one.

No torch or transformers at import: ``adp --help`` and the CLI's checks import this package.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from adp_pass.errors import UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class PresetShape:
    """A preset: the shape of a published checkpoint's config.json, or a small test shape.

    ``family`` is the ``model_type`` whose :class:`Family` builds the config (default rope with
    ``rope_theta``, the family's fixed values such as its RMSNorm eps)."""

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
    family: str = "qwen3"


class UnsupportedFamily(UsageError, KeyError):
    """A ``model_type`` no module in ``adp_pass.families`` describes."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def _import(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


# Checkpoint dims: "hidden", "q" (heads * head_dim), "kv" (kv heads * head_dim), "inter",
# "head_dim", "vocab".
_DECODER_TENSORS = {
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "mlp.gate_proj.weight": ("inter", "hidden"),
    "mlp.up_proj.weight": ("inter", "hidden"),
    "mlp.down_proj.weight": ("hidden", "inter"),
}
# Biases a config flag switches on (LlamaConfig / Qwen3Config ``attention_bias``, Llama's
# ``mlp_bias``).
_FLAG_TENSORS = {
    "attention_bias": {
        "self_attn.q_proj.bias": ("q",),
        "self_attn.k_proj.bias": ("kv",),
        "self_attn.v_proj.bias": ("kv",),
        "self_attn.o_proj.bias": ("hidden",),
    },
    "mlp_bias": {
        "mlp.gate_proj.bias": ("inter",),
        "mlp.up_proj.bias": ("inter",),
        "mlp.down_proj.bias": ("hidden",),
    },
}


@dataclass(frozen=True)
class Family:
    """What adp-pass needs to know about one decoder family (one ``model_type``).

    * ``config_class`` / ``model_class`` / ``rotary_class``: dotted transformers names, imported
      on use (``ForCausalLM`` with the standard ``model.layers.N.{self_attn,mlp}`` layout and a
      ``base_model_tp_plan``; the rotary embedding whose ``inv_freq`` the graph holds);
    * ``presets``: preset name -> :class:`PresetShape` (``family`` set to ``model_type``);
    * ``layer_tensors``: per decoder layer, checkpoint name -> dims (besides the shared q/k/v/o,
      gate/up/down and the two layer norms), e.g. Qwen3's q/k norms, Qwen2's q/k/v biases;
    * ``config_defaults``: what every preset's config sets (RMSNorm eps, bias flags, ...).

    A config without ``head_dim`` (Qwen2's) gets ``hidden_size // num_attention_heads`` written
    in by :meth:`complete`, the value the model uses.
    """

    model_type: str
    config_class: str
    model_class: str
    rotary_class: str
    presets: Mapping[str, PresetShape] = field(default_factory=dict)
    layer_tensors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    # ------------------------------------------------------------------ transformers classes
    def config_type(self) -> type["PretrainedConfig"]:
        return _import(self.config_class)

    def model_type_class(self) -> type["PreTrainedModel"]:
        return _import(self.model_class)

    # ------------------------------------------------------------------ configs
    def make_config(self, shape: PresetShape, **overrides) -> "PretrainedConfig":
        """The family's config for a preset shape with ``overrides``: default rope with the
        shape's ``rope_theta``, no KV cache, SDPA attention (one attention core op per layer)."""
        fields = {k: v for k, v in shape.__dict__.items() if k != "family"}
        fields.update(overrides)
        rope_theta = fields.pop("rope_theta")
        kwargs = {**self.config_defaults, **fields}
        config = self.config_type()(
            **kwargs,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
            use_cache=False,
        )
        config._attn_implementation = "sdpa"
        return self.complete(config)

    def complete(self, config: "PretrainedConfig") -> "PretrainedConfig":
        """Write in what other modules read off every config (in place; values the model
        uses anyway): ``head_dim`` for families whose config lacks it."""
        if getattr(config, "head_dim", None) is None:
            config.head_dim = config.hidden_size // config.num_attention_heads
        return config

    def tp_plan(self, config: "PretrainedConfig") -> dict[str, str]:
        """transformers' own TP plan of the base model (fqn pattern -> style name)."""
        plan = getattr(config, "base_model_tp_plan", None)
        if not plan:
            raise UnsupportedFamily(
                f"{type(config).__name__} has no base_model_tp_plan: a {self.model_type} model "
                "cannot be made tensor-parallel with transformers' plan")
        return dict(plan)

    # ------------------------------------------------------------------ models
    def build(self, config: "PretrainedConfig") -> "PreTrainedModel":
        """A ``ForCausalLM`` on the current default device/dtype, in eval mode."""
        return self.model_type_class()(self.complete(config)).eval()

    def rotary_inv_freq(self, config: "PretrainedConfig"):
        """The rotary ``inv_freq`` buffer the family's model computes for ``config`` (fp32, CPU):
        recomputes a non-persistent buffer no checkpoint holds."""
        return _import(self.rotary_class)(self.complete(config)).inv_freq

    # ------------------------------------------------------------------ checkpoints
    def expected_tensors(self, config: dict) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor a checkpoint with this ``config.json`` must hold."""
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        size = {
            "hidden": config["hidden_size"],
            "q": config["num_attention_heads"] * head_dim,
            "kv": config["num_key_value_heads"] * head_dim,
            "inter": config["intermediate_size"],
            "head_dim": head_dim,
        }
        vocab, hidden = config["vocab_size"], config["hidden_size"]
        shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
        if not config.get("tie_word_embeddings", False):
            shapes["lm_head.weight"] = (vocab, hidden)
        per_layer = {**_DECODER_TENSORS, **self.layer_tensors}
        for flag, tensors in _FLAG_TENSORS.items():
            if config.get(flag):
                per_layer.update(tensors)
        for i in range(config["num_hidden_layers"]):
            for name, dims in per_layer.items():
                shapes[f"model.layers.{i}.{name}"] = tuple(size[d] for d in dims)
        return shapes


# ----------------------------------------------------------------------------- the registry
_MODULES = ("qwen3", "llama", "qwen2")  # adp_pass.families.<name> each define FAMILY


def _load() -> dict[str, Family]:
    families = {}
    for name in _MODULES:
        family = importlib.import_module(f"{__name__}.{name}").FAMILY
        families[family.model_type] = family
    return families


FAMILIES: dict[str, Family] = _load()


def family_of(what: "PretrainedConfig | PresetShape | dict | str") -> Family:
    """The family of a config, a preset shape, a config.json dict or a ``model_type``."""
    if isinstance(what, str):
        model_type = what
    elif isinstance(what, PresetShape):
        model_type = what.family
    elif isinstance(what, dict):
        model_type = what.get("model_type")
    else:
        model_type = getattr(what, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedFamily(
            f"model_type {model_type!r} is not supported; adp-pass supports "
            f"{supported_text()} (dense models)",
            hint="add a module to adp_pass/families (docs/families.md)")
    return FAMILIES[model_type]


def supported_text() -> str:
    names = list(FAMILIES)
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def all_presets() -> dict[str, PresetShape]:
    """Every family's presets by name (names are unique across families)."""
    presets: dict[str, PresetShape] = {}
    for family in FAMILIES.values():
        for name, shape in family.presets.items():
            if name in presets:
                raise ValueError(f"preset {name!r} is defined by two families")
            if shape.family != family.model_type:
                raise ValueError(f"preset {name!r} of {family.model_type} says {shape.family}")
            presets[name] = shape
    return presets


__all__ = ["FAMILIES", "Family", "PresetShape", "UnsupportedFamily", "all_presets", "family_of",
           "supported_text"]
