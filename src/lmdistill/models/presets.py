"""Model presets: a name -> a plain Hugging Face config, so every model is an ordinary HF model.

    from lmdistill.models import build_config
    config = build_config("minimind2-small", vocab_size=len(tokenizer), tokenizer=tokenizer, max_seq_len=1024)
    model = transformers.AutoModelForCausalLM.from_config(config)

Two MiniMind generations are reproduced with stock HF architectures (no custom code, so `generate`,
`save_pretrained`, peft and accelerate all work and `AutoModelForCausalLM.from_pretrained` loads the result):

- **minimind2** family (MiniMind2, 2025): no q/k norm -> `LlamaConfig`; with MoE -> `Qwen2MoeConfig`.
  intermediate = 64 * ceil(int(hidden * 8 / 3) / 64), rms_norm_eps 1e-5, head_dim = hidden / heads.
  MiniMind2-MoE: 4 routed experts, top-2 (renormalized), plus 1 shared expert of the same width,
  aux_loss_alpha 0.01.
- **minimind3** family (current MiniMind): q/k RMSNorm -> `Qwen3Config`; with MoE -> `Qwen3MoeConfig`.
  intermediate = 64 * ceil(hidden * pi / 64), rms_norm_eps 1e-6. MoE: 4 experts, top-1,
  expert width = intermediate, router_aux_loss_coef 5e-4.

Shared by both: rope_theta 1e6, max_position_embeddings 32768, tied input/output embeddings, SiLU
gated MLP, no biases. Vocabulary size always comes from the tokenizer, and so do pad/bos/eos ids
(HF uses pad_token_id as the embedding's padding_idx: that row starts at zero and gets no gradient
through the input embedding).

Parameter counts with vocab 6400 (exact, checked by tests/test_models_presets.py on the meta device;
"active" = per token: everything outside the routed experts + top_k/num_experts of them):

| preset          | HF architecture | hidden x layers | heads / kv | intermediate | total       | active      | MiniMind |
|-----------------|-----------------|-----------------|------------|--------------|-------------|-------------|----------|
| minimind2-small | llama           | 512 x 8         | 8 / 2      | 1408         | 25,829,888  | 25,829,888  | ~26M     |
| minimind2       | llama           | 768 x 16        | 8 / 2      | 2048         | 104,030,976 | 104,030,976 | ~104M    |
| minimind2-moe   | qwen2_moe       | 640 x 8         | 8 / 2      | 1728 (x4+1)  | 145,034,880 | 91,950,720  | ~145M    |
| minimind3       | qwen3           | 768 x 8         | 8 / 4      | 2432         | 63,912,192  | 63,912,192  | ~64M     |
| minimind3-moe   | qwen3_moe       | 768 x 8         | 8 / 4      | 2432 (x4)    | 198,416,640 | 63,936,768  | ~198M/64M|
| micro           | qwen3           | 256 x 4         | 4 / 2      | 832          | 4,983,552   | 4,983,552   | (CPU)    |
| nano            | qwen3           | 128 x 2         | 4 / 2      | 448          | 1,262,336   | 1,262,336   | (CPU)    |

Where the HF config differs from MiniMind's own code:
- minimind2-moe uses Qwen2-MoE, not Qwen3-MoE: Qwen3-MoE has no shared expert (dropping it would
  give 118.5M, not 145M) and adds q/k norm that MiniMind2 lacks. Qwen2-MoE expresses the shared expert
  natively (`shared_expert`, width `shared_expert_intermediate_size`) and, with `qkv_bias=False`, has
  MiniMind2's attention exactly. One difference remains: HF scales the shared expert's output by a
  learned per-token gate sigmoid(w . x) (`shared_expert_gate`, hidden_size params per layer, 5,120 in
  all) where MiniMind2 adds it with weight 1.
- Router aux loss: HF computes one Switch-Transformer loss over the tokens of all layers (value
  top_k when balanced); MiniMind sums a per-layer loss worth 1 when balanced (MiniMind2 per sequence).
  The coefficients are MiniMind's (0.01, 5e-4), so at balance HF's aux term is num_layers / top_k
  times smaller (4x for minimind2-moe, 8x for minimind3-moe); raise router_aux_loss_coef to match.
- RMSNorm: HF casts the normalized activations to the input dtype before the weight multiply,
  MiniMind after; identical in float32. MiniMind's dropout (0.0 by default) has no HF counterpart
  beyond attention_dropout. MiniMind's optional YaRN `inference_rope_scaling` is not set; pass
  `rope_parameters={...}` to use it.
- Counts: every minimind* preset has exactly the parameters of MiniMind's own model, except
  minimind2-moe (+5,120, the shared-expert gates above; MiniMind2-MoE itself has 145,029,760).

Knobs (all optional, `None` means "not given"): `hidden_size` (alias `dim`), `num_layers` (alias
`n_layers`), `max_seq_len` (-> max_position_embeddings), `use_moe`; `rope_theta`; and any field of
the target HF config class (e.g. `num_attention_heads`, `intermediate_size`, `num_experts`).
Changing the width keeps the preset's head count and recomputes the MLP width by the family's rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig, PretrainedConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

from lmdistill.errors import LmdistillError


@dataclass(frozen=True)
class Preset:
    """A model size: its MiniMind family decides the HF architecture and the MLP-width rule."""

    family: str  # "minimind2" or "minimind3"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    use_moe: bool = False
    description: str = ""


# Sizes in the descriptions are at MiniMind's 6,400-token vocabulary (the table above); a preset's vocabulary is its
# tokenizer's, and each token adds hidden_size parameters (tied embedding).
PRESETS: dict[str, Preset] = {
    "minimind2-small": Preset("minimind2", 512, 8, 8, 2, description="MiniMind2-Small, ~26M"),
    "minimind2": Preset("minimind2", 768, 16, 8, 2, description="MiniMind2, ~104M"),
    "minimind2-moe": Preset("minimind2", 640, 8, 8, 2, True, "MiniMind2-MoE, ~145M (4 experts top-2 + shared)"),
    "minimind3": Preset("minimind3", 768, 8, 8, 4, description="MiniMind3 (q/k norm), ~64M"),
    "minimind3-moe": Preset("minimind3", 768, 8, 8, 4, True, "MiniMind3-MoE, ~198M total / ~64M active"),
    "micro": Preset("minimind3", 256, 4, 4, 2, description="CPU demo size, ~5.0M"),
    "nano": Preset("minimind3", 128, 2, 4, 2, description="CPU test size, ~1.3M"),
}


def _minimind2_intermediate(hidden: int) -> int:
    return 64 * ((hidden * 8 // 3 + 63) // 64)


def _minimind3_intermediate(hidden: int) -> int:
    return 64 * math.ceil(hidden * math.pi / 64)


@dataclass(frozen=True)
class _Family:
    dense: type[PretrainedConfig]
    moe: type[PretrainedConfig]
    intermediate: Callable[[int], int]
    rms_norm_eps: float
    moe_fields: dict[str, Any]


_FAMILIES = {
    "minimind2": _Family(
        LlamaConfig, Qwen2MoeConfig, _minimind2_intermediate, 1e-5,
        dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.01, qkv_bias=False),
    ),
    "minimind3": _Family(
        Qwen3Config, Qwen3MoeConfig, _minimind3_intermediate, 1e-6,
        dict(num_experts=4, num_experts_per_tok=1, norm_topk_prob=True, router_aux_loss_coef=5e-4),
    ),
}

# knob -> aliases (MiniMind's older flag names)
_ALIASES = {
    "hidden_size": ("dim",),
    "num_layers": ("n_layers", "num_hidden_layers"),
    "num_attention_heads": ("n_heads",),
    "num_key_value_heads": ("n_kv_heads",),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`, or an error listing the valid names."""
    if name not in PRESETS:
        raise LmdistillError(f"unknown model preset '{name}'. Valid presets: {', '.join(PRESETS)}.")
    return PRESETS[name]


def _resolve_aliases(overrides: dict[str, Any]) -> dict[str, Any]:
    """Drop None values and fold aliases (`dim`, `n_layers`, ...) into their canonical knob names."""
    given = {k: v for k, v in overrides.items() if v is not None}
    for canonical, aliases in _ALIASES.items():
        for alias in aliases:
            if alias not in given:
                continue
            value = given.pop(alias)
            if canonical in given and given[canonical] != value:
                raise LmdistillError(
                    f"model knobs '{canonical}'={given[canonical]!r} and its alias '{alias}'={value!r} disagree; give one."
                )
            given[canonical] = value
    return given


def _config_keys(cls: type[PretrainedConfig]) -> set[str]:
    """Every keyword the HF config class knows (its dataclass fields and attribute-map names)."""
    keys = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return keys | set(getattr(cls, "attribute_map", {}))


def _positive_int(name: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LmdistillError(f"{where}: '{name}' must be a positive integer, found {value!r}.")
    return value


def _architecture_fields(preset: Preset, name: str, knobs: dict[str, Any], use_moe: bool) -> dict[str, Any]:
    """The preset's config fields after the structural knobs (width, depth, heads, MLP width)."""
    family = _FAMILIES[preset.family]
    where = f"preset '{name}'"
    hidden = _positive_int("hidden_size", knobs.pop("hidden_size", preset.hidden_size), where)
    layers = _positive_int("num_layers", knobs.pop("num_layers", preset.num_layers), where)
    heads = _positive_int("num_attention_heads", knobs.pop("num_attention_heads", preset.num_heads), where)
    kv_heads = _positive_int("num_key_value_heads", knobs.pop("num_key_value_heads", preset.num_kv_heads), where)
    if hidden % heads or heads % kv_heads:
        raise LmdistillError(
            f"{where}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}), and that a "
            f"multiple of num_key_value_heads ({kv_heads}); set num_attention_heads/num_key_value_heads to fit."
        )
    inter = _positive_int("intermediate_size", knobs.pop("intermediate_size", family.intermediate(hidden)), where)
    fields: dict[str, Any] = dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=inter, hidden_act="silu", rms_norm_eps=family.rms_norm_eps,
        max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True, attention_bias=False,
    )
    if preset.family == "minimind3":
        fields["head_dim"] = hidden // heads  # Qwen3Config defaults to 128
    if use_moe:
        fields.update(family.moe_fields, moe_intermediate_size=inter)
        fields.pop("attention_bias")
        if family.moe is Qwen2MoeConfig:
            fields["shared_expert_intermediate_size"] = inter
        if family.moe is Qwen3MoeConfig:
            fields.pop("head_dim")  # Qwen3-MoE derives it as hidden / heads
    return fields


def _token_ids(tokenizer: Any | None) -> dict[str, Any]:
    """pad/bos/eos ids from the tokenizer; without one, MiniMind's bos=1, eos=2."""
    if tokenizer is None:
        return dict(bos_token_id=1, eos_token_id=2)
    return {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in ("pad", "bos", "eos")}


def build_config(preset: str, vocab_size: int, tokenizer: Any | None = None, **overrides: Any) -> PretrainedConfig:
    """A Hugging Face config for `preset` with `vocab_size` rows, knobs and field overrides applied.

    Knobs: hidden_size/dim, num_layers/n_layers, max_seq_len (-> max_position_embeddings), use_moe,
    rope_theta; any other keyword must be a field of the resulting HF config class. `None` values are
    ignored, so CLI defaults can be passed straight through. pad/bos/eos ids come from `tokenizer`.
    """
    spec = get_preset(preset)
    _positive_int("vocab_size", vocab_size, f"preset '{preset}'")
    knobs = _resolve_aliases(overrides)
    use_moe = knobs.pop("use_moe", spec.use_moe)
    if not isinstance(use_moe, bool):
        raise LmdistillError(f"preset '{preset}': 'use_moe' must be true or false, found {use_moe!r}.")
    cls = _FAMILIES[spec.family].moe if use_moe else _FAMILIES[spec.family].dense
    fields = _architecture_fields(spec, preset, knobs, use_moe)
    if "max_seq_len" in knobs:
        fields["max_position_embeddings"] = _positive_int("max_seq_len", knobs.pop("max_seq_len"), f"preset '{preset}'")
    if "rope_theta" in knobs:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": float(knobs.pop("rope_theta"))}
    unknown = sorted(set(knobs) - _config_keys(cls))
    if unknown:
        raise LmdistillError(
            f"preset '{preset}' ({cls.model_type}): unknown model option(s) {', '.join(unknown)}. Valid: "
            f"hidden_size/dim, num_layers/n_layers, max_seq_len, use_moe, rope_theta, or a field of {cls.__name__} "
            f"({', '.join(sorted(_config_keys(cls) - {'architectures', 'transformers_version'}))})."
        )
    fields.update(_token_ids(tokenizer), vocab_size=vocab_size)
    fields.update(knobs)
    try:
        return cls(**fields)
    except (ValueError, TypeError, StrictDataclassError) as exc:  # HF's own validation (e.g. an odd head_dim for RoPE)
        raise LmdistillError(f"preset '{preset}': invalid {cls.__name__}: {' '.join(str(exc).split())}") from exc
