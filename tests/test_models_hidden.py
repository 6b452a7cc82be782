"""forward_hidden / lm_head_of: hidden states and head reproduce HF's logits and MoE aux loss exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from lmdistill.models import apply_lora, forward_hidden, lm_head_of, load_model

TINY = dict(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2, verbose=False)
ARCH_PRESETS = {"llama": "minimind2-small", "qwen2_moe": "minimind2-moe", "qwen3": "nano", "qwen3_moe": "minimind3-moe"}
MOE = ["qwen2_moe", "qwen3_moe"]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 10 tokens; the second is left-padded by 3."""
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("arch", list(ARCH_PRESETS))
def test_head_of_hidden_equals_model_logits(arch):
    torch.manual_seed(0)
    model = load_model(ARCH_PRESETS[arch], **TINY).eval()
    ids, mask = _batch()
    with torch.no_grad():
        out = forward_hidden(model, ids, mask)
        expected = model(input_ids=ids, attention_mask=mask).logits
    weight, bias, scale, softcap = lm_head_of(model)
    assert out.hidden.shape == (2, 10, 32) and out.aux_loss is None  # eval mode: no aux
    assert (bias, scale, softcap) == (None, 1.0, None)
    torch.testing.assert_close(out.hidden @ weight.T, expected)


@pytest.mark.parametrize("arch", MOE)
def test_moe_aux_loss_equals_what_hf_adds_to_its_loss(arch):
    torch.manual_seed(0)
    model = load_model(ARCH_PRESETS[arch], **TINY).train()
    ids, mask = _batch(1)
    labels = ids.masked_fill(mask == 0, -100)
    out = forward_hidden(model, ids, mask)
    hf = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    coef = model.config.router_aux_loss_coef
    torch.testing.assert_close(out.aux_loss, coef * hf.aux_loss)
    ce = F.cross_entropy(lm_head_of(model).logits(out.hidden)[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(ce + out.aux_loss, hf.loss)
    torch.testing.assert_close(out.hidden @ lm_head_of(model).weight.T, hf.logits)
    (ce + out.aux_loss).backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0  # the router learns from it


def test_moe_aux_loss_in_eval_mode_only_when_requested():
    model = load_model("minimind3-moe", **TINY).eval()
    ids, mask = _batch()
    assert forward_hidden(model, ids, mask).aux_loss is None
    model.config.output_router_logits = True
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).aux_loss * model.config.router_aux_loss_coef
        torch.testing.assert_close(forward_hidden(model, ids, mask).aux_loss, expected)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_lora_is_active_inside_forward_hidden(arch):
    torch.manual_seed(0)
    model = apply_lora(load_model(ARCH_PRESETS[arch], **TINY), dropout=0.0).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    ids, mask = _batch()
    with torch.no_grad():
        hidden = forward_hidden(model, ids, mask).hidden
        expected = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            base_hidden = forward_hidden(model, ids, mask).hidden
    torch.testing.assert_close(lm_head_of(model).logits(hidden), expected)
    assert not torch.allclose(hidden, base_hidden, atol=1e-4)


def test_lm_head_weight_is_the_live_tied_parameter_and_gets_gradients():
    model = apply_lora(load_model("nano", **TINY), target_modules=["q_proj"])
    head = lm_head_of(model)
    embedding = model.get_base_model().model.embed_tokens.weight
    assert head.weight is embedding
    embedding.requires_grad_(True)
    ids, _ = _batch()
    forward_hidden(model, ids).hidden.mul(1).matmul(head.weight.T).logsumexp(-1).sum().backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_lm_head_untied_with_lora_and_modules_to_save():
    torch.manual_seed(0)
    model = load_model("nano", tie_word_embeddings=False, **TINY)
    assert lm_head_of(model).weight is model.lm_head.weight
    lora = apply_lora(model, target_modules=["q_proj", "lm_head"], dropout=0.0).eval()
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    ids, _ = _batch()
    with torch.no_grad():
        logits = lm_head_of(lora).logits(forward_hidden(lora, ids).hidden)
        torch.testing.assert_close(logits, lora(input_ids=ids).logits)

    saved = get_peft_model(load_model("nano", tie_word_embeddings=False, **TINY),
                           LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    copy = saved.get_base_model().lm_head.modules_to_save["default"].weight
    assert lm_head_of(saved).weight is copy and copy.requires_grad


def test_lm_head_reads_scale_and_softcap_from_config():
    model = load_model("nano", **TINY)
    model.config.final_logit_softcapping = 30.0
    model.config.logit_scale = 0.5
    head = lm_head_of(model)
    assert (head.logit_scale, head.softcap) == (0.5, 30.0)
    hidden = torch.randn(3, 32) * 50
    expected = torch.tanh(hidden @ head.weight.T * 0.5 / 30.0) * 30.0
    torch.testing.assert_close(head.logits(hidden), expected)


class _Wrapper(torch.nn.Module):
    """Stands in for DDP/FSDP: the model lives at `.module` and must be called through `forward`."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_runs_through_the_outer_wrapper_and_never_builds_full_logits():
    model = load_model("minimind3-moe", **TINY).train()
    shapes = []
    model.lm_head.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape)))
    wrapped = _Wrapper(model)
    ids, mask = _batch()
    out = forward_hidden(wrapped, ids, mask)
    assert wrapped.calls == 1 and out.hidden.shape == (2, 10, 32) and out.aux_loss is not None
    assert shapes == [(2, 0, 96)]  # the LM head saw no positions
    assert lm_head_of(wrapped).weight is model.lm_head.weight


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_decoder_only_path_for_models_without_logits_to_keep(arch, monkeypatch):
    import lmdistill.models.hidden as hidden_module

    model = load_model(ARCH_PRESETS[arch], **TINY).train()
    ids, mask = _batch(2)
    expected = forward_hidden(model, ids, mask)
    monkeypatch.setattr(hidden_module, "_takes_logits_to_keep", lambda lm: False)
    got = forward_hidden(model, ids, mask)
    torch.testing.assert_close(got.hidden, expected.hidden)
    if expected.aux_loss is None:
        assert got.aux_loss is None
    else:
        torch.testing.assert_close(got.aux_loss, expected.aux_loss)
