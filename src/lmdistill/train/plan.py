"""The run plan: what a `train`/`distill` run will do, resolved once from its options and frozen.

    values = DistillConfig(...).values()          # the typed options (the CLI parses into the same)
    plan = preflight.check(values, "distill")     # every check that needs no model -> RunPlan
    Trainer(plan).train()                         # setup, the loop, health, checkpoints read the plan

Nothing below the commands reads options: setup, the loop, the dry-run estimate, health and progressive
distillation read these dataclasses. `values` keeps the options as given (recorded in the run folder and compared
on --resume), never read by the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lmdistill.losses.engine import KDConfig
from lmdistill.teachers.registry import TeacherSpec


@dataclass(frozen=True)
class LoraPlan:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StudentPlan:
    """The trained model: a preset or a folder (`flag` names the option: --model or --student)."""

    ref: str
    flag: str
    overrides: tuple[tuple[str, Any], ...] = ()  # preset width/depth/MoE (--hidden_size, --num_layers, --use_moe)
    lora: LoraPlan | None = None
    gradient_checkpointing: bool = False

    @property
    def use_moe(self) -> bool:
        return dict(self.overrides).get("use_moe") is True


@dataclass(frozen=True)
class DataPlan:
    path: str
    format: str
    skip_bad_records: bool
    max_seq_len: int
    mode: str = "examples"  # examples | prompts (every reply is the student's) | cross (both tokenizations)
    eval_path: str | None = None
    num_proc: int | None = None  # processes that build the tokenized store (None: every core)
    packing: bool = False  # several examples a row of max_seq_len tokens, attention kept inside each
    group_by_length: bool = False  # length-grouped micro-batches
    cache_dir: str | None = None  # where stores live (None: $LMDISTILL_CACHE/data or ~/.cache/lmdistill/data)


@dataclass(frozen=True)
class GenerationPlan:
    """How the student writes replies (on-policy steps, MiniLLM)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    backend: str = "auto"
    vllm_gpu_memory_utilization: float = 0.3


@dataclass(frozen=True)
class FeaturePlan:
    loss: str  # mse | cosine
    weight: float
    layer_map: str


@dataclass(frozen=True)
class Objective:
    """What is minimized. `name`: ce | kd | cross_tokenizer | minillm (`lmdistill.train.objectives`)."""

    name: str
    kd: KDConfig = field(default_factory=KDConfig)
    loss_top_k: int | None = None  # the teacher's k largest logits kept in the loss (--top_k)
    temperature_end: float | None = None
    temperature_schedule: str = "linear"
    feature: FeaturePlan | None = None
    cross_tokenizer: str | None = None  # uld | gold
    lm_coef: float = 1.0  # MiniLLM: weight of CE on the dataset replies
    minillm_clip: float | None = 0.2
    teacher_mix_alpha: float = 0.2
    settings: tuple[tuple[str, Any], ...] = ()  # what a registered objective keeps


@dataclass(frozen=True)
class SourcePlan:
    """Where each step's token sequences come from: a registered batch source (`lmdistill.train.sources`)."""

    kind: str = "dataset"
    on_policy_fraction: float = 0.0
    generation: GenerationPlan | None = None  # set when the source generates
    settings: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.settings).get(key, default)


@dataclass(frozen=True)
class Schedule:
    max_steps: int | None
    epochs: float
    batch_size: int
    accumulation_steps: int
    learning_rate: float
    weight_decay: float
    warmup_iters: int
    grad_clip: float
    seed: int


@dataclass(frozen=True)
class OutputPlan:
    output_dir: Path
    resume_from: Path | None = None
    stale_outputs: tuple[Path, ...] = ()
    save_interval: int = 0
    keep_checkpoints: int = 2
    log_interval: int = 10
    tracker: str = "none"  # none | wandb | tensorboard | swanlab
    project: str = "lmdistill"


@dataclass(frozen=True)
class EvalPlan:
    interval: int = 0
    batches: int = 50


@dataclass(frozen=True)
class HealthPlan:
    keep_best: str | None = None  # the metric, or None
    patience: int = 0
    min_delta: float = 0.0
    strict: bool = False
    metrics: tuple[str, ...] = ()  # the eval metrics with a direction that the run logs


@dataclass(frozen=True)
class RunPlan:
    command: str  # train | distill
    values: Mapping[str, Any]  # the options as given: recorded in the run folder, compared on --resume
    tokenizer: Any  # the run's tokenizer (checked against every other one involved)
    student: StudentPlan
    teacher: TeacherSpec | None
    data: DataPlan
    source: SourcePlan
    objective: Objective
    schedule: Schedule
    output: OutputPlan
    eval: EvalPlan
    health: HealthPlan
    device: str | None
    dtype: str
    via: tuple[str, ...] = ()  # progressive distillation's intermediate models
    stage_steps: tuple[int, ...] | None = None

    @property
    def distilling(self) -> bool:
        return self.teacher is not None
