"""The options of `lmdistill train` and `lmdistill distill`, declared once: the commands parse them, recipe YAMLs
set them, and the Python API's `TrainConfig` / `DistillConfig` are made from them (`config_class`).

Teacher kinds (`lmdistill.teachers.registry`) and batch sources (`lmdistill.train.batches`) declare their own
options; a kind registered later (a plugin, a test) adds its options to `distill` and to `DistillConfig`.
"""

from __future__ import annotations

import argparse

from lmdistill.config import STEP_COUNTS, DTYPES, Parser, Repeated, config_class, float_in, int_at_least
from lmdistill.data.options import add_data_arguments
from lmdistill.losses.divergences import ALIASES, DIVERGENCES
from lmdistill.losses.engine import KDConfig
from lmdistill.models.generation import BACKENDS as GENERATION_BACKENDS
from lmdistill.teachers import registry as teacher_registry
from lmdistill.train import batches as source_registry
from lmdistill.train import minillm as _minillm, on_policy as _on_policy  # noqa: F401 - they register sources
from lmdistill.train.health import metric_name

LOSS = KDConfig()  # the loss options' defaults are the loss API's own
POSITIVE, COUNT = int_at_least(1), int_at_least(0)
UNIT, POSITIVE_FLOAT = float_in(0, 1), float_in(0, lo_open=True)


def _common(p: argparse.ArgumentParser, command: str) -> None:
    a = p.add_argument
    model_flag = "--student" if command == "distill" else "--model"
    # what and where
    add_data_arguments(p, "training data: .jsonl, .json, .parquet, .txt or a datasets folder, in any supported "
                          "format")
    a("--output_dir", "--out_dir", dest="output_dir", required=True,
      help="run folder: the final model, checkpoint-STEP/, metrics.jsonl, lmdistill_config.yaml")
    a("--overwrite", action="store_true",
      help="--output_dir holds an earlier run: delete its model, checkpoints and logs first and start anew")
    a("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
      help="continue from the newest complete checkpoint in --output_dir, or from the given checkpoint folder")
    a("--allow_config_change", action="store_true",
      help="with --resume: accept options that differ from the checkpoint's (e.g. a new learning rate) and data that "
           "changed since it was written (the resume is then not exact)")
    a("--strict_resume", action="store_true",
      help="with --resume: refuse a damaged newest checkpoint instead of falling back to the newest intact one")
    a("--tokenizer", default=None,
      help=f"tokenizer folder (default: the {'teacher' if command == 'distill' else 'model'} folder's own); every "
           "tokenizer involved must have the same vocabulary")
    # how long
    a("--max_steps", type=POSITIVE, default=None,
      help="optimizer steps (a positive integer; default: derived from --epochs and the data size)")
    a("--epochs", type=POSITIVE_FLOAT, default=1.0, help="passes over the data when --max_steps is not given")
    a("--batch_size", type=POSITIVE, default=8, help="examples per micro-batch per process")
    a("--accumulation_steps", type=POSITIVE, default=1, help="micro-batches per optimizer step")
    a("--max_seq_len", type=int_at_least(2), default=512, help="examples are truncated to this many tokens")
    a("--packing", action="store_true",
      help="several examples per row: each micro-batch's --batch_size examples packed first-fit into rows as long as "
           "its longest example, attention kept inside each example and positions restarting per example: the "
           "padding goes, the examples per step stay the same")
    a("--group_by_length", action="store_true",
      help="micro-batches of examples of similar length (sorted within windows of 64 steps, batch order shuffled): "
           "less padding, nothing asked of the model")
    # optimizer and schedule
    a("--learning_rate", "--lr", dest="learning_rate", type=POSITIVE_FLOAT, default=5e-4,
      help="peak AdamW learning rate")
    a("--weight_decay", type=float_in(0), default=0.01, help="AdamW weight decay")
    a("--warmup_iters", type=COUNT, default=0, help="linear warmup steps, then cosine from lr down to lr/10")
    a("--grad_clip", type=float_in(0), default=1.0, help="max gradient norm (0 disables clipping)")
    a("--seed", type=int, default=42, help="seeds the model initialization, the data order and sampling")
    # where it runs
    a("--dtype", default="float32", choices=list(DTYPES),
      help="training precision: float32, or bf16/fp16 mixed precision (autocast, fp32 master weights)")
    a("--device", default=None,
      help="cpu, cuda or cuda:N (default: cuda when available, else cpu; under torchrun the local GPU)")
    a("--gradient_checkpointing", action="store_true", help="recompute student activations in backward (less memory)")
    a("--num_workers", type=COUNT, default=0, help="accepted for MiniMind compatibility (tokenized data is in memory)")
    a("--ddp", action="store_true", help="accepted for MiniMind compatibility (torchrun/accelerate decide)")
    a("--dry_run", action="store_true",
      help="check the options, build the models on the meta device from their configs (no weights read), tokenize "
           "the data and print parameters, memory per device (weights, gradients, optimizer, activations with and "
           "without --gradient_checkpointing, teacher, loss, on-policy generation), tokens per step, steps and "
           "whether it fits; then exit")
    # logging, checkpoints, eval
    a("--log_interval", type=POSITIVE, default=10, help="write metrics.jsonl and a progress line every N steps")
    a("--save_interval", type=COUNT, default=0, help="write checkpoint-STEP/ every N steps (0: only at the end)")
    a("--keep_checkpoints", type=COUNT, default=2, help="keep the newest K checkpoints (0 keeps all)")
    a("--eval_data", default=None, help="held-out data evaluated during training (CE, perplexity, KL to the teacher)")
    a("--eval_interval", type=COUNT, default=0, help="evaluate every N steps (0: only at the end)")
    a("--eval_batches", type=POSITIVE, default=50, help="at most this many eval batches each time")
    a("--keep_best", nargs="?", const="ce", default=None, type=metric_name, metavar="METRIC",
      help="with --eval_data and --eval_interval: export the model of the best evaluation by METRIC (default ce; "
           "also ppl, bits_per_byte, kl_to_teacher, agreement) as the final model; the last stays in its "
           "checkpoint-STEP/")
    a("--early_stopping_patience", type=COUNT, default=0, metavar="K",
      help="stop after K evaluations without improvement of --keep_best's metric (default ce); 0: never")
    a("--early_stopping_min_delta", type=float_in(0), default=0.0,
      help="early stopping: an improvement smaller than this does not count")
    a("--strict_health", action="store_true",
      help="a health warning (overfitting, collapse, KD plateau, exploding/vanishing gradients) stops the run "
           "(checkpoint saved, exit status 1) instead of only warning")
    a("--report_to", default="none", choices=["none", "wandb", "tensorboard", "swanlab"],
      help="also log to this tracker (through accelerate)")
    a("--use_wandb", action="store_true", help="MiniMind: same as --report_to wandb")
    a("--wandb_project", default="lmdistill", help="project name for wandb / swanlab")
    # the model
    a("--lora_r", type=COUNT, default=0, help=f"train a LoRA adapter of this rank on {model_flag} (0: full training)")
    a("--lora_alpha", type=POSITIVE_FLOAT, default=16.0, help="LoRA scaling numerator (scale = lora_alpha / lora_r)")
    a("--lora_dropout", type=float_in(0, 1, hi_open=True), default=0.05, help="dropout on the LoRA branch")
    a("--lora_target_modules", default=None,
      help="comma-separated module names to adapt (default: the attention and MLP projections)")
    a("--hidden_size", "--dim", dest="hidden_size", type=POSITIVE, default=None,
      help=f"override a preset's width ({model_flag} presets only)")
    a("--num_layers", "--n_layers", dest="num_layers", type=POSITIVE, default=None,
      help=f"override a preset's depth ({model_flag} presets only)")
    a("--use_moe", action="store_true", default=None, help=f"use a preset's MoE variant ({model_flag} presets only)")


def _distill(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--student", required=True, help="student: a preset name or a local HF model folder")
    aliases = ", ".join(f"{k}={v}" for k, v in sorted(ALIASES.items()))
    a("--divergence", default=LOSS.divergence, choices=sorted(list(DIVERGENCES) + list(ALIASES)), metavar="NAME",
      help=f"D in the loss: {', '.join(DIVERGENCES)} (aliases: {aliases})")
    a("--alpha", type=UNIT, default=LOSS.alpha,
      help="weight of hard-label CE in [0, 1]: alpha*CE + (1-alpha)*T^2*D; 0 is pure distillation")
    a("--temperature", type=POSITIVE_FLOAT, default=LOSS.temperature,
      help="KD temperature T > 0 (the start value with --temperature_end)")
    a("--temperature_end", type=POSITIVE_FLOAT, default=None,
      help="anneal the temperature to this value at the last step (default: constant --temperature)")
    a("--temperature_schedule", default="linear", choices=["linear", "cosine"], help="shape of the annealing")
    a("--skew_lambda", type=UNIT, default=LOSS.skew_lambda, help="lambda of the skew KL divergences, in [0, 1]")
    a("--jsd_beta", type=float_in(0, 1, lo_open=True, hi_open=True), default=LOSS.jsd_beta,
      help="beta of the generalized JSD, in (0, 1)")
    a("--max_new_tokens", type=POSITIVE, default=128, help="on-policy steps: the longest reply the student writes")
    a("--generation_temperature", type=POSITIVE_FLOAT, default=1.0,
      help="on-policy steps: the student's sampling temperature")
    a("--generation_top_p", type=float_in(0, 1, lo_open=True), default=1.0,
      help="on-policy steps: nucleus sampling mass")
    a("--generation_backend", default="auto", choices=GENERATION_BACKENDS,
      help="on-policy steps: who samples the replies: auto (the lean decode loop on CPU, transformers' "
           "generate on GPU), lean, hf, or vllm (CUDA only, colocated, the student's weights synced after each step)")
    a("--vllm_gpu_memory_utilization", type=float_in(0, 1, lo_open=True), default=0.3,
      help="--generation_backend vllm: share of the GPU's memory vLLM may take")
    a("--top_k", type=POSITIVE, default=None,
      help="keep the teacher's k largest logits per position (default: the whole vocabulary)")
    a("--feature_loss", default=None, choices=["mse", "cosine"],
      help="also match hidden states: the student's mapped layers, projected to the teacher's width by a learned "
           "linear map, against the teacher's (default: logits only)")
    a("--feature_weight", type=float_in(0), default=1.0, help="--feature_loss: weight of the feature term")
    a("--layer_map", default="auto", metavar="auto|S:T,...",
      help="--feature_loss: student:teacher decoder layers (0-based, -1 = last) to match; auto spreads the student's "
           "layers evenly over the teacher's, last onto last")
    a("--via", action=Repeated, default=None, metavar="PRESET_OR_DIR",
      help="progressive distillation: distill the teacher into this model first (a preset: a new model; a folder: "
           "an initial checkpoint), then it into the next --via or the student; stages in OUTPUT_DIR/stage-N-NAME/")
    a("--stage_steps", type=STEP_COUNTS, default=None, metavar="N1,N2,...",
      help="--via: optimizer steps of each stage, the student's last (default: --max_steps / --epochs for each)")
    a("--method", default="kd", choices=["kd", "minillm"],
      help="kd: token-level distillation with --divergence, off- or on-policy (--on_policy_fraction); minillm: "
           "MiniLLM's policy-gradient sequence-level reverse KL on replies the student samples every step")


def add_arguments(parser: argparse.ArgumentParser, command: str = "train") -> None:
    """Declare the options of `lmdistill COMMAND` (train or distill) on `parser`."""
    if command == "distill":
        teacher_registry.declare_teacher_options(parser.add_argument)
        _distill(parser)
        source_registry.declare_source_options(parser.add_argument)
    else:
        parser.add_argument("--model", required=True, help="a preset name or a local HF model folder")
    _common(parser, command)


def build_parser(command: str) -> Parser:
    """The parser of `lmdistill train` / `lmdistill distill` (`lmdistill COMMAND --help` shows it)."""
    help_ = {"train": "train a model with cross-entropy (pretraining / SFT)",
             "distill": "distill a teacher into a student"}[command]
    parser = Parser(prog=f"lmdistill {command}", description=help_)
    add_arguments(parser, command)
    return parser


_CLASSES: dict[str, tuple[tuple[int, int], type]] = {}


def config_for(command: str) -> type:
    """`TrainConfig` or `DistillConfig` as the registries stand now (made again after a kind registers)."""
    version = (teacher_registry.TEACHER_KINDS.version, source_registry.SOURCES.version)
    known = _CLASSES.get(command)
    if known is None or known[0] != version:
        name = {"train": "TrainConfig", "distill": "DistillConfig"}[command]
        known = _CLASSES[command] = (version, config_class(name, command, build_parser(command), "lmdistill.api"))
    return known[1]
