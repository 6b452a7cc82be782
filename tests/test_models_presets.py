"""Presets, configs, parameter counts (meta device, so the big presets cost nothing) and HF save/load."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmdistill.errors import LmdistillError
from lmdistill.models import PRESETS, build_config, count_parameters, load_model, load_teacher

# tiny versions of each architecture: 4 heads of 8, 2 layers, a 96-token vocabulary
TINY = dict(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2, verbose=False)
ARCH_PRESETS = {"llama": "minimind2-small", "qwen2_moe": "minimind2-moe", "qwen3": "nano", "qwen3_moe": "minimind3-moe"}

# preset -> (HF model_type, total, active) with vocab 6400; the table in presets.py's docstring
EXPECTED = {
    "minimind2-small": ("llama", 25_829_888, 25_829_888),
    "minimind2": ("llama", 104_030_976, 104_030_976),
    "minimind2-moe": ("qwen2_moe", 145_034_880, 91_950_720),
    "minimind3": ("qwen3", 63_912_192, 63_912_192),
    "minimind3-moe": ("qwen3_moe", 198_416_640, 63_936_768),
    "micro": ("qwen3", 4_983_552, 4_983_552),
    "nano": ("qwen3", 1_262_336, 1_262_336),
}


def test_every_preset_is_documented_and_tested():
    assert set(PRESETS) == set(EXPECTED)
    import lmdistill.models.presets as presets

    for name, (_, total, active) in EXPECTED.items():
        assert f"| {name:<15} |" in presets.__doc__ and f"{total:,}" in presets.__doc__ and f"{active:,}" in presets.__doc__


@pytest.mark.parametrize("name", list(EXPECTED))
def test_preset_parameter_count_on_meta_device(name, capsys):
    model = load_model(name, vocab_size=6400, device="meta")
    model_type, total, active = EXPECTED[name]
    assert model.config.model_type == model_type
    assert model.device.type == "meta"
    assert count_parameters(model) == (total, active)
    printed = capsys.readouterr().out
    assert printed.startswith(f"built {name}: {total / 1e6:.2f}M params")
    assert ("active" in printed) == (total != active)


def test_minimind2_config_matches_minimind():
    config = build_config("minimind2-small", 6400)
    assert config.intermediate_size == 64 * math.ceil(512 * 8 / 3 / 64) == 1408
    assert config.rope_parameters["rope_theta"] == 1e6 and config.rms_norm_eps == 1e-5
    assert config.tie_word_embeddings and config.max_position_embeddings == 32768
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 2, 64)
    moe = build_config("minimind2-moe", 6400)
    assert (moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob, moe.qkv_bias) == (4, 2, True, False)
    assert moe.moe_intermediate_size == moe.shared_expert_intermediate_size == 1728


def test_minimind3_config_matches_minimind():
    config = build_config("minimind3", 6400)
    assert config.intermediate_size == math.ceil(768 * math.pi / 64) * 64 == 2432
    assert (config.head_dim, config.num_key_value_heads, config.rms_norm_eps) == (96, 4, 1e-6)
    moe = build_config("minimind3-moe", 6400)
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (4, 1, 2432)
    assert moe.router_aux_loss_coef == 5e-4


def test_knobs_and_aliases_override_the_preset():
    config = build_config("minimind2-small", 100, dim=640, n_layers=3, max_seq_len=1024, rope_theta=1e4)
    assert (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (640, 3, 1024)
    assert config.intermediate_size == 1728  # recomputed by the MiniMind2 rule
    assert config.rope_parameters["rope_theta"] == 1e4
    assert build_config("minimind3", 100, use_moe=True).model_type == "qwen3_moe"
    assert build_config("minimind2-moe", 100, use_moe=False).model_type == "llama"
    assert build_config("micro", 100, use_moe=True, num_experts=8).num_experts == 8
    assert build_config("nano", 100, hidden_size=None, intermediate_size=100).intermediate_size == 100


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_sise=64), r"unknown model option\(s\) hidden_sise"),
        (dict(dim=64, hidden_size=96), "disagree"),
        (dict(hidden_size=90), "multiple of num_attention_heads"),
        (dict(hidden_size=100), "invalid Qwen3Config: .*even rotary dimension"),
        (dict(num_layers=0), "'num_layers' must be a positive integer"),
        (dict(use_moe="no"), "'use_moe' must be true or false, found 'no'"),
    ],
)
def test_bad_knobs_are_clear_errors(kwargs, message):
    with pytest.raises(LmdistillError, match=message):
        build_config("nano", 100, **kwargs)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(LmdistillError, match="'gpt5': no such folder, and not a preset name. Expected a local folder .* or a preset .*minimind2-small.*nano"):
        load_model("gpt5", vocab_size=10)


def test_vocab_and_token_ids_come_from_the_tokenizer(minimind_tokenizer):
    model = load_model("nano", minimind_tokenizer, device="meta", verbose=False)
    config = model.config
    assert config.vocab_size == len(minimind_tokenizer) == 6400
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        minimind_tokenizer.pad_token_id, minimind_tokenizer.bos_token_id, minimind_tokenizer.eos_token_id)
    with pytest.raises(LmdistillError, match="smaller than the tokenizer"):
        load_model("nano", minimind_tokenizer, vocab_size=100, device="meta")


def test_preset_without_tokenizer_or_vocab_size_is_an_error():
    with pytest.raises(LmdistillError, match="pass tokenizer=... or vocab_size=N"):
        load_model("nano")


def test_dtype_option():
    model = load_model("nano", dtype="bfloat16", **TINY)
    assert model.dtype == torch.bfloat16
    assert load_model("nano", dtype=torch.float16, **TINY).dtype == torch.float16
    with pytest.raises(LmdistillError, match="expected one of float32, bfloat16, float16, auto; found 'fp8'"):
        load_model("nano", dtype="fp8", **TINY)


@pytest.mark.parametrize("arch", list(ARCH_PRESETS))
def test_save_and_load_round_trip_with_plain_transformers(arch, tmp_path):
    torch.manual_seed(0)
    model = load_model(ARCH_PRESETS[arch], **TINY).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 96, (2, 7))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert reloaded.config.model_type == arch
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
        ours = load_model(tmp_path, dtype="float32", device="cpu", verbose=False)
        torch.testing.assert_close(ours(ids).logits, model(ids).logits)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied embeddings survive


def test_generate_works():
    model = load_model("nano", **TINY).eval()
    out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_folder_errors_say_what_was_expected(tmp_path):
    with pytest.raises(LmdistillError, match="missing': no such folder, and not a preset name"):
        load_model(tmp_path / "missing")
    with pytest.raises(LmdistillError, match="expected config.json .* found notes.txt"):
        (tmp_path / "notes.txt").write_text("hi")
        load_model(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(LmdistillError, match="holds a LoRA adapter"):
        load_model(tmp_path)


def test_folder_rejects_preset_knobs_and_small_tokenizers(tmp_path, minimind_tokenizer):
    load_model("nano", **TINY).save_pretrained(tmp_path)
    with pytest.raises(LmdistillError, match="hidden_size only apply to presets"):
        load_model(tmp_path, hidden_size=64)
    with pytest.raises(LmdistillError, match="embeds 96 tokens but the tokenizer has 6400"):
        load_model(tmp_path, minimind_tokenizer)
    kept = load_model(tmp_path, max_seq_len=512, hidden_size=None, verbose=False)  # CLI defaults pass through
    assert kept.config.max_position_embeddings == 32768


def test_load_teacher_is_frozen_and_in_eval_mode():
    teacher = load_teacher("nano", tokenizer=None, verbose=False, **{k: v for k, v in TINY.items() if k != "verbose"})
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
