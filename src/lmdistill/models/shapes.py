"""What the memory plan (`--dry_run`) needs of a model, read from its config on the meta device: no weight is read.

    model = meta_model("Qwen3-0.6B/", "--student", tokenizer)     # built on the meta device from config.json
    shape = model_shape(model, "Qwen3-0.6B/")                     # widths, depth, heads, parameters (LoRA too)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmdistill.errors import LmdistillError


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only HF model (its config; parameters counted on the meta device)."""

    name: str
    model_type: str
    params: int  # tied weights once
    trainable: int  # LoRA: the adapters; else params
    matmul_trainable: int  # trainable matmul weights in the decoder layers (autocast keeps their cast copies)
    layer_params: int  # the largest decoder layer's parameters (FSDP gathers one at a time)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int  # MLP width a token goes through (MoE: active experts x expert width + shared expert)
    vocab: int  # output rows
    qk_norm: bool = False
    lora_targets: tuple[str, ...] = ()
    lora_r: int = 0
    lora_dropout: float = 0.0

    def describe(self) -> str:
        return f"{self.model_type} {self.hidden} x {self.layers}, vocabulary {self.vocab:,}"


@dataclass(frozen=True)
class TeacherShape:
    """An online teacher (`model` set) or a cache (`cache_bytes`: its files, held in host memory; `rows_k`: the
    top-k entries of each row it reads, the loss's k or the cache's stored one)."""

    name: str
    model: ModelShape | None = None
    dtype: str = "float32"
    cache_bytes: int = 0
    rows_k: int = 0
    kept_layers: int = 0  # --feature_loss: teacher layers whose outputs are kept for the loss


def meta_model(ref: str, flag: str, tokenizer, overrides: dict | None = None):
    """`ref` (a preset or a HF folder) built on the meta device from its config: no weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmdistill.models import PRESETS, load_model

    if ref in PRESETS:
        return load_model(ref, tokenizer=tokenizer, device="meta", verbose=False, **(overrides or {}))
    try:
        config = AutoConfig.from_pretrained(str(Path(ref).expanduser()), local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise LmdistillError(f"{flag} '{ref}': expected a Hugging Face causal-LM config.json that transformers can "
                             f"build, found one it cannot: {' '.join(str(exc).split())}") from exc


def model_shape(model, name: str) -> ModelShape:
    """A ModelShape from a (meta) model, peft-wrapped or not."""
    from lmdistill.models.hidden import decoder_layers, num_experts, unwrap

    lm = unwrap(model)
    c = lm.config.get_text_config()
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    mlp = getattr(c, "intermediate_size", 0) or 0
    if num_experts(c):
        mlp = (c.num_experts_per_tok * (getattr(c, "moe_intermediate_size", None) or mlp)
               + (getattr(c, "shared_expert_intermediate_size", 0) or 0))
    layers = decoder_layers(model)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = tuple(sorted({n.split(".")[-2] for n, _ in model.named_modules() if n.endswith(".lora_A")}))
    lora = getattr(model, "peft_config", {}).get("default")
    seen, params, trainable, matmul = set(), 0, 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    for p in layers.parameters():
        matmul += p.numel() if p.requires_grad and p.dim() >= 2 else 0
    return ModelShape(
        name=name, model_type=c.model_type, params=params, trainable=trainable, matmul_trainable=matmul,
        layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers), hidden=c.hidden_size,
        layers=len(layers), heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim, mlp=mlp, vocab=lm.get_output_embeddings().weight.shape[0], qk_norm="q_norm" in names,
        lora_targets=targets, lora_r=lora.r if lora else 0, lora_dropout=lora.lora_dropout if lora else 0.0)
