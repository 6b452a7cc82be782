"""LoRA: a trainable student adapter, and a teacher adapter folder merged into the weights."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from lmdistill.errors import LmdistillError
from lmdistill.models import DEFAULT_TARGETS, apply_lora, load_model, load_teacher

TINY = dict(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2, verbose=False)


def _randomize_lora(model: PeftModel, seed: int = 0) -> None:
    """Give LoRA B non-zero values so the adapter changes the outputs (fresh B is zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def test_lora_student_trains_only_lora_parameters():
    torch.manual_seed(0)
    model = apply_lora(load_model("nano", **TINY), r=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".")[-4] for n in trainable}  # ...<module>.lora_A.default.weight
    assert wrapped == set(DEFAULT_TARGETS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    ids = torch.randint(0, 96, (2, 8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # lora_A gets a gradient only once lora_B is non-zero
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == ("lora_" in name), name


def test_lora_targets_explicit_and_validated():
    model = apply_lora(load_model("nano", **TINY), target_modules="q_proj, v_proj")
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    with pytest.raises(LmdistillError, match=r"target module\(s\) \['qkv'\] not found .*Linear layers are: .*q_proj"):
        apply_lora(load_model("nano", **TINY), target_modules=["q_proj", "qkv"])
    with pytest.raises(LmdistillError, match="rank r must be a positive integer"):
        apply_lora(load_model("nano", **TINY), r=0)


def test_lora_on_moe_reaches_attention_and_shared_expert():
    model = apply_lora(load_model("minimind2-moe", **TINY))
    targets = {t.rsplit(".", 1)[-1] for t in model.peft_config["default"].target_modules}
    assert targets == set(DEFAULT_TARGETS)  # gate/up/down_proj exist in the shared expert
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert any("shared_expert.down_proj" in n for n in names) and any("self_attn.q_proj" in n for n in names)
    assert not any("experts.gate_up_proj" in n or "experts.down_proj" in n for n in names if "shared" not in n)
    assert not getattr(model.peft_config["default"], "target_parameters", None)  # the fused experts stay frozen


@pytest.mark.parametrize("preset", ["nano", "minimind3-moe"])
def test_teacher_with_merged_adapter_equals_unmerged_peft_model(preset, tmp_path):
    torch.manual_seed(0)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    load_model(preset, **TINY).save_pretrained(base_dir)

    peft_model = apply_lora(load_model(base_dir, verbose=False), r=4, alpha=8)
    _randomize_lora(peft_model)
    peft_model.save_pretrained(adapter_dir)
    peft_model.eval()

    teacher = load_teacher(base_dir, adapter=adapter_dir, verbose=False)
    assert not isinstance(teacher, PeftModel) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any("lora" in n for n, _ in teacher.named_parameters())
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        plain = load_model(base_dir, verbose=False).eval()(ids).logits
        got = teacher(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter really did something


def test_teacher_adapter_folder_errors(tmp_path):
    with pytest.raises(LmdistillError, match="expected a peft LoRA adapter folder .* found no folder"):
        load_teacher("nano", adapter=tmp_path / "none", **TINY)
    with pytest.raises(LmdistillError, match="found a folder without adapter_config.json"):
        load_teacher("nano", adapter=tmp_path, **TINY)
