"""Final hidden states without the `[B, T, V]` logits, and the output projection that makes them.

Fused distillation losses never materialize full logits: they take the decoder's last hidden states
and the LM head weight and project a chunk at a time. These two functions supply exactly that:

    out = forward_hidden(model, input_ids, attention_mask)     # out.hidden: [B, T, H]
    head = lm_head_of(model)                                    # head.weight: [V, H]
    logits = head.logits(out.hidden)                            # == model(input_ids).logits
    loss = task_loss + (out.aux_loss if out.aux_loss is not None else 0)   # MoE router balance

They work on plain HF models, on peft-wrapped models (LoRA layers inside the decoder stay active) and
on MoE models, whose router load-balancing loss is returned already multiplied by
`config.router_aux_loss_coef`, exactly the term HF's own forward adds to its loss.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from lmdistill.errors import LmdistillError
from lmdistill.models.lora import unwrap_peft


class HiddenOutput(NamedTuple):
    """hidden: [B, T, H] after the final norm; aux_loss: scalar (coef-weighted router loss) or None; layers: the
    outputs [B, T, H] of the decoder layers asked for ({index: tensor}, `forward_hidden(layers=...)`)."""

    hidden: torch.Tensor
    aux_loss: torch.Tensor | None
    layers: dict | None = None


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder's blocks (`model.model.layers` for Llama/Qwen), in order."""
    layers = getattr(_decoder(unwrap(model)), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise LmdistillError(f"{type(unwrap(model)).__name__}: cannot find its decoder layers (expected `.model.layers`).")
    return layers


class LmHead(NamedTuple):
    """The output projection: logits = softcap(scale * (hidden @ weight.T + bias))."""

    weight: torch.Tensor  # [V, H], the live parameter (tied embeddings included)
    bias: torch.Tensor | None  # [V] or None
    logit_scale: float
    softcap: float | None  # logits = softcap * tanh(logits / softcap) when set

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V], exactly as the model's forward computes them."""
        out = nn.functional.linear(hidden, self.weight, self.bias)
        if self.logit_scale != 1.0:
            out = out * self.logit_scale
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def unwrap(model: Any) -> nn.Module:
    """The HF causal LM inside DDP/FSDP (`.module`), torch.compile (`._orig_mod`) and peft wrappers.

    peft's LoRA layers live inside the HF model, so they stay active in what this returns.
    """
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    lm = unwrap_peft(model)
    if not hasattr(lm, "get_output_embeddings") or lm.get_output_embeddings() is None:
        raise LmdistillError(f"expected a causal LM with an output projection (lm_head), found {type(lm).__name__}.")
    return lm


def _decoder(lm: nn.Module) -> nn.Module:
    """The base decoder of a causal LM (`model.model` for Llama/Qwen): everything but the LM head."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if decoder is None or decoder is lm:
        decoder = getattr(lm, "model", None)
    if not isinstance(decoder, nn.Module) or decoder is lm:
        raise LmdistillError(f"{type(lm).__name__}: cannot find its base decoder (expected `.model`).")
    return decoder


def num_experts(config: Any) -> int | None:
    """Routed experts per MoE layer (`num_experts` or Mixtral's `num_local_experts`); None if dense."""
    return getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)


def is_moe(model: Any) -> bool:
    """True for models with a router aux loss (Qwen2/3-MoE, Mixtral, ...)."""
    config = unwrap(model).config
    return bool(num_experts(config)) and hasattr(config, "router_aux_loss_coef")


def _balancing_loss_fn(lm: nn.Module) -> Callable[..., Any]:
    """transformers' `load_balancing_loss_func` from the model's own modeling module (Qwen3-MoE's otherwise)."""
    fn = getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)
    if fn is None:
        fn = importlib.import_module("transformers.models.qwen3_moe.modeling_qwen3_moe").load_balancing_loss_func
    return fn


def _takes_logits_to_keep(lm: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(lm.forward).parameters


def _run_through_wrapper(model: Any, decoder: nn.Module, kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """Call the outermost `model` (so DDP syncs gradients and peft hooks run) with no logit positions
    kept, capturing the decoder's output with a hook: (hidden [B, T, H], model output)."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(hook)
    try:
        device = kwargs["input_ids"].device if kwargs["input_ids"] is not None else kwargs["inputs_embeds"].device
        out = model(logits_to_keep=torch.zeros(0, dtype=torch.long, device=device), **kwargs)
    finally:
        handle.remove()
    return captured[-1], out


def forward_hidden(
    model: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
    layers: Any = None, **kwargs: Any
) -> HiddenOutput:
    """Final (post-norm) hidden states [B, T, H] without the [B, T, V] logits, and the MoE aux loss.

    `model` may be a plain HF model, peft-wrapped, or DDP/FSDP-wrapped. Models whose forward takes
    `logits_to_keep` (all current HF causal LMs) run through their outermost wrapper with no logit
    position kept, so DDP gradient sync and peft work; others run their base decoder directly. The
    aux loss (router load balancing x `config.router_aux_loss_coef`, padding excluded through the
    attention mask, exactly as HF adds it to its loss) is computed in training mode or when
    `config.output_router_logits` is set; None otherwise and for dense models. Extra `kwargs`
    (e.g. position_ids, inputs_embeds) go to the model. `layers` (decoder-layer indices, 0-based) also returns
    those layers' outputs, captured by forward hooks: only they are kept (no `output_hidden_states`).
    """
    if layers:
        return _with_layers(model, input_ids, attention_mask, sorted(set(layers)), kwargs)
    lm = unwrap(model)
    config = lm.config
    moe = is_moe(lm)
    want_aux = moe and (lm.training or bool(getattr(config, "output_router_logits", False)))
    kwargs.update(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    kwargs.setdefault("inputs_embeds", None)
    if moe:
        kwargs["output_router_logits"] = want_aux
    decoder = _decoder(lm)
    if _takes_logits_to_keep(lm):
        hidden, out = _run_through_wrapper(model, decoder, kwargs)
        aux = out.aux_loss if want_aux else None
    else:
        out = decoder(**kwargs)
        hidden = out.last_hidden_state
        aux = None
        if want_aux:
            aux = _balancing_loss_fn(lm)(out.router_logits, num_experts(config), config.num_experts_per_tok, attention_mask)
    if not want_aux:
        return HiddenOutput(hidden, None)
    if not isinstance(aux, torch.Tensor):  # no MoE layer produced router logits
        aux = hidden.new_zeros(())
    return HiddenOutput(hidden, config.router_aux_loss_coef * aux.to(hidden.device))


def _with_layers(model: Any, input_ids, attention_mask, layers: list[int], kwargs: dict) -> HiddenOutput:
    blocks = decoder_layers(model)
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise LmdistillError(f"layer {bad[0]}: the model has decoder layers 0..{len(blocks) - 1}.")
    captured: dict[int, torch.Tensor] = {}

    def hook_for(index: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        out = forward_hidden(model, input_ids, attention_mask, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return HiddenOutput(out.hidden, out.aux_loss, captured)


def _live_weight(head: nn.Module) -> torch.Tensor:
    """The head's effective weight; for a LoRA-wrapped head, W + sum of active deltas (differentiable)."""
    weight = head.weight
    lora_a = getattr(head, "lora_A", None)
    if lora_a is None or getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return weight
    for name in head.active_adapters:
        if name not in lora_a:
            continue
        if name in getattr(head, "lora_variant", {}):
            raise LmdistillError(f"lm_head: LoRA variant adapter '{name}' (e.g. DoRA) on the LM head is not supported.")
        weight = weight + head.get_delta_weight(name).to(weight.dtype)
    return weight


def lm_head_of(model: Any) -> LmHead:
    """The output projection `(weight [V, H], bias | None, logit_scale, softcap | None)`.

    Handles tied embeddings (the weight *is* the embedding parameter, so gradients reach it), peft
    wrapping (`modules_to_save` copies, LoRA on lm_head folded in), and configs that scale or softcap
    logits: Cohere `logit_scale` (multiply), Granite `logits_scaling` (divide), Gemma
    `final_logit_softcapping`. Qwen/Llama: (W, None, 1.0, None).
    """
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LmHead(_live_weight(head), getattr(head, "bias", None), scale, float(softcap) if softcap else None)


def full_weights(head: LmHead) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head weight and bias as whole tensors. Under FSDP2 they are sharded DTensors outside the model's
    forward; `full_tensor()` all-gathers them differentiably (its backward reduce-scatters)."""
    from torch.distributed.tensor import DTensor

    gather = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    return gather(head.weight), None if head.bias is None else gather(head.bias)


# Layers that mix tokens other than through masked attention (recurrent / convolutional state): a packed row would
# leak one example's state into the next.
NOT_PACKABLE_LAYERS = ("linear_attention", "mamba", "conv", "recurrent", "ssm")
NOT_PACKABLE_MODELS = ("mamba", "mamba2", "falcon_mamba", "rwkv", "jamba", "zamba", "zamba2", "bamba", "lfm2",
                       "granitemoehybrid", "qwen3_next", "recurrent_gemma", "falcon_h1", "nemotron_h")


def packing_blocker(model: Any) -> str | None:
    """None when the model keeps packed examples apart (attention masked from restarting position ids); else
    what stops it, in words."""
    config = unwrap(model).config.get_text_config()
    if config.model_type in NOT_PACKABLE_MODELS:
        return f"a {config.model_type} model (recurrent or convolutional layers)"
    kinds = sorted({t for t in getattr(config, "layer_types", None) or [] if any(k in t for k in NOT_PACKABLE_LAYERS)})
    return f"{', '.join(kinds)} layers" if kinds else None
