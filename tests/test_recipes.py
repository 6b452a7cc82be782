"""Every shipped recipe loads, validates against the CLI, and runs one step with its paths swapped for tiny
local models (its own dtype, divergence, top-k, LoRA and adapter options kept), so a recipe never rots."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmdistill.cli import main

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def teacher_adapter(tmp_path_factory, tiny_teacher_dir) -> Path:
    """A LoRA adapter for the tiny teacher, saved by peft as a fine-tuning run would."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a non-trivial adapter
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


def test_there_are_recipes_for_each_scenario():
    names = {p.stem for p in RECIPES}
    assert {"minimind2_distill", "qwen2.5-3b-lora_to_0.5b-lora", "qwen3-4b_to_0.6b_topk", "qwen3_fsdp_2gpu"} <= names
    for path in RECIPES:
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert path.read_text().startswith("# ") and any(f"--config recipes/{path.name}" in h for h in header), \
            f"{path.name} must open with a comment saying how to run it"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_one_step_on_tiny_models(recipe, tiny_teacher_dir, tiny_chat, teacher_adapter, tmp_path):
    cfg = yaml.safe_load(recipe.read_text())
    out = tmp_path / "run"
    student_is_folder = "lora_r" in cfg  # LoRA students are pretrained folders in practice
    student = ["--student", str(tiny_teacher_dir)] if student_is_folder else [
        "--student", "nano", "--hidden_size", "32", "--num_layers", "1"]
    overrides = ["--teacher", str(tiny_teacher_dir), *student, "--data", str(tiny_chat), "--output_dir", str(out),
                 "--max_steps", "1", "--epochs", "1", "--batch_size", "2", "--accumulation_steps", "1",
                 "--max_seq_len", "64", "--save_interval", "0", "--eval_interval", "0"]
    if "teacher_adapter" in cfg:
        overrides += ["--teacher_adapter", str(teacher_adapter)]
    if cfg.get("top_k"):
        overrides += ["--top_k", "16"]  # the tiny vocabulary has 320 tokens
    assert main(["distill", "--config", str(recipe), *overrides]) == 0
    resolved = yaml.safe_load((out / "lmdistill_config.yaml").read_text())
    for key in ("divergence", "alpha", "temperature", "learning_rate", "dtype"):
        assert resolved[key] == cfg.get(key, resolved[key]), key
    assert (out / "model.safetensors").is_file()
