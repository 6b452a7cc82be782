"""`--dry_run`: what a `train`/`distill` run will need, from configs alone, before any weight loads.

    lmdistill distill --teacher /ckpt/Qwen3-4B --student /ckpt/Qwen3-0.6B --data train.jsonl --output_dir runs/kd \
        --batch_size 4 --max_seq_len 2048 --dtype bfloat16 --dry_run

After the option checks (`preflight.check`), the models are built on the meta device from their configs (a folder's
config.json through AutoConfig; no weights file is opened), LoRA is applied there, and the data is tokenized (light;
it gives the number of examples, hence the steps). `estimate` is a pure function of those shapes and the options;
`format_estimate` prints it. Bytes per device, the parts summed (an upper bound: the teacher's forward and the
loss's buffers are not alive at once, nor all activations with all gradients):

- weights: student params x 4 (fp32 master weights); with bf16/fp16 autocast, + 2 bytes per trainable matmul
  weight (autocast keeps their cast copies through forward and backward). FSDP: / world + one layer gathered.
- gradients: trainable x 4 (DDP: x 2, its buckets; FSDP/ZeRO-2: / world). optimizer: AdamW, trainable x 8.
- activations (student, kept for backward), per token, from the saved tensors of transformers 5's Llama/Qwen
  decoder layers (sdpa attention; counted by hooks on tiny models, exact for fp32 Qwen3 and Llama):
      fp32:      24 H + 16 I + (8 + 8 q) (Hq + Hkv) + 4 (1 + q) heads + 4 q kv_heads + 8   per layer
      autocast:  26 H +  8 I + (4 + 6 q) (Hq + Hkv) + the same small terms                 per layer
  (H hidden, I MLP width, Hq = heads x head_dim, Hkv = kv_heads x head_dim, q = 1 with q/k RMSNorm as in Qwen3),
  plus 12 H + 12 for the final norm, its output (the loss's input) and the token ids, plus the gradients the
  backward of one layer holds at once (the MLP's: 3 I in the activations' dtype + 8 H). With gradient checkpointing:
  each layer's input (4 H) plus one layer's tensors, recomputed in backward. MoE: I = top_k x expert width +
  shared expert width (an approximation). LoRA: frozen norms keep less (-4 (2 H + q (Hq + Hkv))), a layer input no
  adapter reads is not kept, each adapter keeps its rank's output, and with dropout its own dropped copy and mask.
- teacher (online): weights in --teacher_dtype, its final hidden states [B, T, H_t] until the loss, and one layer's
  live tensors under no_grad (3 I + 4 H per token). A --teacher_cache holds no weights: its rows of the batch on the
  device, and the whole cache in host memory (its files' size).
- loss: the fused loss's fp32 [chunk, V] buffers (student logits, teacher logits; one more for an ensemble),
  `auto_chunk_size` rows each, and the hidden states' gradient [N, H] fp32 (the lm_head weight gradient it makes in
  its forward is that weight's .grad, counted with the gradients).
- CPU only (the peak is RSS): the process baseline CPU_BASELINE_BYTES and the tokenized data (sys.getsizeof).
- rows: a batch is padded to its longest row, so tokens per row are the data's longest example (at most
  --max_seq_len; `RunShape.train_len`). On-policy steps (`--on_policy_fraction`, `--method minillm`) train on
  prompt + the student's own reply: the longest prompt in the data + --max_new_tokens tokens per row (or the longest
  example, if longer, when other steps train on the data's replies). Generation (lean or HF decode) holds the KV
  cache of batch x (longest prompt + --max_new_tokens) positions, 2 x kv_heads x head_dim values per layer in the
  activations' dtype (MiniLLM: the teacher's too, in its dtype), one layer's copy more (a DynamicCache grows by
  concatenation) and the prefill's largest one-layer forward (3 I + 4 H per prompt token). Generation and the
  training forward are not alive at once: the total takes the larger of (activations + loss) and generation.
  `--generation_backend vllm`: the share of the GPU that vLLM reserves (--vllm_gpu_memory_utilization x the
  device's memory) is held throughout.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lmdistill.errors import LmdistillError

MiB = 2**20
# RSS after `import lmdistill.train.loop` (python, torch, transformers, accelerate, peft), measured once on the
# project's 2-core Linux x86-64 machine (torch 2.13 CPU build, transformers 5.24): 348 MiB. Counted on CPU only.
CPU_BASELINE_BYTES = 348 * MiB
# the Linear layers of a Llama/Qwen decoder layer grouped by the input they read (LoRA activations)
GROUPS = {"attn_in": ("q_proj", "k_proj", "v_proj"), "attn_out": ("o_proj",), "mlp_in": ("gate_proj", "up_proj"),
          "mlp_mid": ("down_proj",)}


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
    mlp: int  # MLP width a token goes through (MoE: top_k x expert width + shared expert)
    vocab: int  # output rows
    qk_norm: bool = False
    lora_targets: tuple[str, ...] = ()
    lora_r: int = 0
    lora_dropout: float = 0.0

    def describe(self) -> str:
        return f"{self.model_type} {self.hidden} x {self.layers}, vocabulary {self.vocab:,}"


@dataclass(frozen=True)
class TeacherShape:
    """An online teacher (`model` set) or a cache (`cache_bytes`: its files, held in host memory; `top_k`)."""

    name: str
    model: ModelShape | None = None
    dtype: str = "float32"
    cache_bytes: int = 0
    top_k: int = 0
    kept_layers: int = 0  # --feature_loss: teacher layers whose outputs are kept for the loss


@dataclass(frozen=True)
class RunShape:
    """The options the estimate reads (from the parsed args: `run_shape`)."""

    command: str
    batch_size: int
    seq_len: int
    accumulation_steps: int = 1
    world: int = 1
    strategy: str = "single"  # single | ddp | fsdp | zero2
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    device: str = "cpu"
    max_steps: int | None = None
    epochs: float = 1.0
    extra_trainable: int = 0  # --feature_loss projectors
    reply_tokens: int = 0  # on-policy steps: --max_new_tokens (0: the run generates nothing)
    prompt_tokens: int = 0  # on-policy steps: the longest prompt the student completes
    teacher_kv: bool = False  # MiniLLM: the teacher decodes beside the student (its own KV cache)
    vllm_bytes: int = 0  # --generation_backend vllm: the device memory vLLM reserves
    longest_example: int = 0  # the data's longest tokenized example (0: not known, --max_seq_len counts)
    all_on_policy: bool = False  # every trained row is prompt + reply (--on_policy_fraction 1; MiniLLM, --lm_coef 0)

    @property
    def train_len(self) -> int:
        """The longest row a step trains on: the longest example (a batch is padded to its longest row, at most
        --max_seq_len), or prompt + reply on on-policy steps."""
        data = min(self.seq_len, self.longest_example) if self.longest_example else self.seq_len
        if not self.reply_tokens:
            return data
        generated = self.prompt_tokens + self.reply_tokens
        return generated if self.all_on_policy else max(data, generated)


@dataclass
class Estimate:
    """Bytes per device; `activations` without and `activations_checkpointed` with gradient checkpointing."""

    run: RunShape
    student: ModelShape
    teachers: list[TeacherShape]
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    teacher: int
    loss: int
    chunk: int
    buffers: int  # the loss's [chunk, V] fp32 buffers
    generation: int = 0  # on-policy decode: KV caches and the prefill's one-layer forward (not alive with `loss`)
    host: dict[str, int] = field(default_factory=dict)  # process baseline, data, teacher caches (RSS on CPU)
    examples: int | None = None
    steps: int | None = None
    steps_from: str = ""
    data: str = ""  # what the data summary says
    visible: int | None = None
    visible_what: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> int:
        r = self.run
        return r.batch_size * r.accumulation_steps * r.world * r.train_len

    def total(self, checkpointed: bool) -> int:
        acts = self.activations_checkpointed if checkpointed else self.activations
        host = sum(self.host.values()) if self.run.device == "cpu" else 0
        held = self.weights + self.gradients + self.optimizer + self.teacher + host + self.run.vllm_bytes
        return held + max(acts + self.loss, self.generation)


# -- the arithmetic (pure) -----------------------------------------------------------------------------------
def layer_bytes(m: ModelShape, half: bool) -> int:
    """Bytes per token one decoder layer keeps for backward (module docstring)."""
    q = int(m.qk_norm)
    hq, hkv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    h_b, i_b, qk_b = (26, 8, 4 + 6 * q) if half else (24, 16, 8 + 8 * q)
    total = h_b * m.hidden + i_b * m.mlp + qk_b * (hq + hkv) + 4 * (1 + q) * m.heads + 4 * q * m.kv_heads + 8
    if not m.lora_targets:
        return total
    small = 2 if half else 4  # the dtype a LoRA branch sees its input in (fp32 residual stream, or autocast's cast)
    total -= 4 * (2 * m.hidden + q * (hq + hkv))  # frozen norm weights: their normalized inputs are not kept
    widths = {"attn_in": m.hidden, "attn_out": hq, "mlp_in": m.hidden, "mlp_mid": m.mlp}
    for group, names in GROUPS.items():
        n = sum(name in m.lora_targets for name in names)
        width = widths[group] * (4 if group in ("attn_in", "mlp_in") and not half else small)
        if n == 0 and group != "attn_out":  # frozen Linears keep no input; sdpa keeps the attention output anyway
            total -= width
        elif n and m.lora_dropout > 0:  # each adapter keeps its dropped copy and the dropout mask
            total += (2 * n - 1) * width
        total += n * m.lora_r * 4
    return max(total, 0)


def activation_bytes(m: ModelShape, tokens: int, half: bool, checkpointed: bool) -> int:
    """What the student keeps for backward, plus the gradients one layer's backward holds at once."""
    per_layer = layer_bytes(m, half)
    final = 12 * m.hidden + 12  # final norm input and normalized (fp32), its output, the ids
    kept = (4 * m.hidden * m.layers + per_layer) if checkpointed else per_layer * m.layers
    return tokens * (kept + final + backward_bytes(m, half))


def backward_bytes(m: ModelShape, half: bool) -> int:
    """Per token: the MLP's backward holds the gradients of the product, the activation and the up projection
    ([N, I] each) and of its input and output ([N, H], fp32 residual stream) while the layer's tensors are alive."""
    return 3 * m.mlp * (2 if half else 4) + 2 * m.hidden * 4


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def kv_bytes(m: ModelShape, rows: int, positions: int, value_bytes: int) -> int:
    """A KV cache of `rows` x `positions` (keys and values, every layer), plus one layer's copy: a DynamicCache
    grows by concatenating each layer's new position, so the old and the new tensor of one layer coexist."""
    per_layer = rows * positions * 2 * m.kv_heads * m.head_dim * value_bytes
    return per_layer * (m.layers + 1)


def generation_bytes(run: RunShape, student: ModelShape, teachers: list[TeacherShape]) -> int:
    """On-policy decode (lean or HF, not vLLM): the student's KV cache for batch x (longest prompt + replies), the
    teacher's too under MiniLLM, and the prefill's largest one-layer forward under no_grad."""
    if not run.reply_tokens or run.vllm_bytes or not run.prompt_tokens:
        return 0
    act = 2 if run.dtype != "float32" else 4
    positions = run.prompt_tokens + run.reply_tokens
    models = [(student, act)] + [(t.model, _dtype_bytes(t.dtype)) for t in teachers if run.teacher_kv and t.model]
    kv = sum(kv_bytes(m, run.batch_size, positions, b) for m, b in models)
    prefill = max(run.batch_size * run.prompt_tokens * (3 * m.mlp + 4 * m.hidden) * b for m, b in models)
    return kv + prefill


def teacher_bytes(teachers: list[TeacherShape], tokens: int, rows: int, half: bool, shard: int) -> int:
    """Online teachers: weights (FSDP: / shard, plus one layer gathered), final hidden states, the largest
    one-layer forward; caches: the batch's top-k rows (ids int64, logits fp32) and log-normalizers."""
    held, transient = 0, 0
    for t in teachers:
        if t.model is None:
            held += rows * (t.top_k * 12 + 4)
            continue
        m, b = t.model, _dtype_bytes(t.dtype)
        act = 2 if half else b
        held += m.params * b // shard + tokens * m.hidden * b * (1 + t.kept_layers)
        transient = max(transient, tokens * (3 * m.mlp + 4 * m.hidden) * act + (m.layer_params * b if shard > 1 else 0))
    return held + transient


def loss_bytes(student: ModelShape, tokens: int, rows: int, n_teacher_buffers: int, device: str = "cpu",
               free_bytes: int | None = None) -> tuple[int, int]:
    """(bytes, chunk): the fused loss's fp32 [chunk, V] logit buffers and the hidden states' gradient [N, H] fp32,
    both made in its forward. The lm_head weight's gradient it makes there too becomes that weight's .grad (counted
    with the gradients)."""
    from lmdistill.losses import auto_chunk_size

    chunk = auto_chunk_size(student.vocab, rows, torch.float32, device=device,  # CUDA: a share of the free memory
                            free_bytes=free_bytes if device.startswith("cuda") else None)
    buffers = (1 + n_teacher_buffers) * chunk * student.vocab * 4 + chunk * student.hidden * 4
    return buffers + tokens * student.hidden * 4, chunk


def estimate(run: RunShape, student: ModelShape, teachers: list[TeacherShape], examples: int | None = None,
             data_bytes: int = 0, free_bytes: int | None = None) -> Estimate:
    """The estimate for one process (one device) of a run: pure arithmetic on the shapes (module docstring)."""
    half = run.dtype != "float32"
    # the last position has no label; on-policy rows are prompt + reply (`train_len`)
    tokens, rows = run.batch_size * run.train_len, run.batch_size * (run.train_len - 1)
    shard = run.world if run.strategy == "fsdp" else 1
    trainable = student.trainable + run.extra_trainable
    weights = student.params * 4 // shard + (2 * student.matmul_trainable if half else 0)
    if run.strategy == "fsdp":
        weights += student.layer_params * 4
    grads = trainable * 4
    grads = grads * 2 if run.strategy == "ddp" else grads // (run.world if run.strategy in ("fsdp", "zero2") else 1)
    optimizer = trainable * 8 // (run.world if run.strategy in ("fsdp", "zero2") else 1)
    n_buffers = 0 if run.command == "train" else 1 + (len(teachers) > 1)
    loss, chunk = loss_bytes(student, tokens, rows, n_buffers, run.device, free_bytes)
    host = {"baseline": CPU_BASELINE_BYTES, "data": data_bytes}
    if any(t.cache_bytes for t in teachers):
        host["teacher_cache"] = sum(t.cache_bytes for t in teachers)
    est = Estimate(run, student, teachers, weights, grads, optimizer,
                   activation_bytes(student, tokens, half, False), activation_bytes(student, tokens, half, True),
                   teacher_bytes(teachers, tokens, rows, half, shard),
                   loss, chunk, 1 + n_buffers, generation_bytes(run, student, teachers), host, examples)
    est.steps, est.steps_from = _steps(run, examples)
    return est


def _steps(run: RunShape, examples: int | None) -> tuple[int | None, str]:
    per_step = run.batch_size * run.accumulation_steps * run.world
    if run.max_steps:
        return run.max_steps, "--max_steps"
    if examples is None:
        return None, "--epochs: needs the data"
    epochs = f"{run.epochs:g} epoch{'' if run.epochs == 1 else 's'}"
    return max(1, math.ceil(run.epochs * examples / per_step)), f"{epochs} of {examples:,} examples"


# -- shapes from the options (configs only, meta device) -----------------------------------------------------
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


def _student(args, tokenizer):
    from lmdistill.models import PRESETS, apply_lora

    distill = args.command == "distill"
    flag, ref = ("--student", args.student) if distill else ("--model", args.model)
    keys = ("hidden_size", "num_layers", "use_moe")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None} if ref in PRESETS else {}
    model = meta_model(ref, flag, tokenizer, overrides)
    if args.lora_r:
        targets = args.lora_target_modules.split(",") if args.lora_target_modules else None
        model = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                           target_modules=targets)
    return model, ref


def shapes(args, tokenizer) -> tuple[ModelShape, list[TeacherShape], int]:
    """(student, teachers, extra trainable parameters) of the run, from configs on the meta device; the vocabulary
    checks of the real run (`setup.compared_vocabulary`) apply."""
    from lmdistill.train.setup import compared_vocabulary, teacher_dtypes

    student_model, ref = _student(args, tokenizer)
    student = model_shape(student_model, ref)
    if args.command != "distill":
        compared_vocabulary(tokenizer, student_model, [])
        return student, [], 0
    teachers, rows = [], []
    for path, dtype in zip(args.teacher or [], teacher_dtypes(args)):
        model = meta_model(path, "--teacher", tokenizer)
        rows.append(model.get_output_embeddings().weight.shape[0])
        teachers.append(TeacherShape(path, model_shape(model, path), dtype))
    if not args.cross_tokenizer:
        compared_vocabulary(tokenizer, student_model, rows)
    for folder in args.teacher_cache or []:
        from lmdistill.teachers.cache import read_meta

        meta = read_meta(folder)
        size = sum((Path(folder) / s["file"]).stat().st_size for s in meta["shards"])
        teachers.append(TeacherShape(folder, cache_bytes=size, top_k=args.top_k or int(meta["top_k"])))
    extra = 0
    if args.feature_loss:
        from lmdistill.losses.features import parse_layer_map

        t = teachers[0].model
        pairs = parse_layer_map(args.layer_map, student.layers, t.layers)
        extra = len(pairs) * student.hidden * t.hidden
        teachers[0] = replace(teachers[0], kept_layers=len({p[1] for p in pairs}))
    return student, teachers, extra


def generates(args) -> bool:
    """Whether the run's student writes replies (on-policy steps or MiniLLM's sampling)."""
    return getattr(args, "on_policy_fraction", 0) > 0 or getattr(args, "method", "kd") == "minillm"


def prompts_only(args) -> bool:
    """Whether the run trains on the student's (or the mixture's) replies alone, the data giving only prompts
    (`estimate._examples` loads prompts then)."""
    minillm_prompts = getattr(args, "method", "kd") == "minillm" and args.lm_coef == 0
    return getattr(args, "on_policy_fraction", 0) >= 1 or minillm_prompts


def longest_prompt(examples) -> int:
    """The longest prompt an on-policy step completes: the tokens before an example's last trained span
    (`on_policy.last_prompt`); 0 when no example has one (plain text stays off-policy)."""
    from lmdistill.train.on_policy import last_prompt

    return max((len(last_prompt(ex)) for ex in examples), default=0)


def vllm_reserved_bytes(args, device: str) -> int:
    """`--generation_backend vllm`: what vLLM takes of the device (its utilization share of the total memory)."""
    if getattr(args, "generation_backend", "auto") != "vllm" or not device.startswith("cuda"):
        return 0
    total = torch.cuda.mem_get_info(torch.device(device))[1]
    return int(args.vllm_gpu_memory_utilization * total)


def run_shape(args, extra_trainable: int = 0, prompt_tokens: int = 0, longest_example: int = 0) -> RunShape:
    """The options the estimate reads; world size and strategy from torchrun/accelerate's environment.
    `prompt_tokens`: the data's longest prompt (`longest_prompt`), for a run that generates; `longest_example`:
    the longest tokenized example (0: unknown)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    on = lambda var: os.environ.get(var, "").lower() in ("true", "1")  # noqa: E731
    strategy = "single" if world == 1 else "zero2" if on("ACCELERATE_USE_DEEPSPEED") else (
        "fsdp" if on("ACCELERATE_USE_FSDP") and device != "cpu" else "ddp")  # accelerate runs FSDP as DDP on CPU
    gen = generates(args) and prompt_tokens > 0
    return RunShape(args.command, args.batch_size, args.max_seq_len, args.accumulation_steps, world, strategy,
                    args.dtype, args.gradient_checkpointing, device, args.max_steps, args.epochs, extra_trainable,
                    reply_tokens=args.max_new_tokens if gen else 0, prompt_tokens=prompt_tokens if gen else 0,
                    teacher_kv=gen and getattr(args, "method", "kd") == "minillm",
                    vllm_bytes=vllm_reserved_bytes(args, device) if gen else 0, longest_example=longest_example,
                    all_on_policy=gen and prompts_only(args))


def data_bytes(examples) -> int:
    """The tokenized examples as Python holds them (sys.getsizeof of dicts, lists and int objects)."""
    total = 0
    for ex in examples:
        total += sys.getsizeof(ex)
        seen: set[int] = set()
        for value in ex.values():
            if isinstance(value, list):
                total += sys.getsizeof(value)
                for x in value:
                    if type(x) is int and not -5 <= x <= 256 and id(x) not in seen:  # small ints are shared
                        seen.add(id(x))
                        total += sys.getsizeof(x)
    return total


def _examples(args, tokenizer):
    """The run's examples, loaded as `setup.build` loads them (the steps need their number)."""
    from lmdistill.data import load_examples, prompt_examples

    if getattr(args, "cross_tokenizer", None):
        from lmdistill.data.cross_tokenizer import load_cross_examples
        from lmdistill.tokenizer import load_tokenizer

        return load_cross_examples(args.data, tokenizer, load_tokenizer(args.teacher[0], "--teacher"),
                                   args.max_seq_len, args.data_format, args.skip_bad_records)
    if prompts_only(args):
        return prompt_examples(args.data, tokenizer, args.max_seq_len, args.data_format)
    return load_examples(args.data, tokenizer, args.max_seq_len, args.data_format, args.skip_bad_records)


def visible_memory(device: str) -> tuple[int, str]:
    """What the device has free now: CUDA's free memory (after this process's context), or available RAM."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return free, f"{_size(free)} free of {_size(total)} ({torch.cuda.get_device_name(torch.device(device))})"
    import psutil

    ram = psutil.virtual_memory()
    return ram.available, f"{_size(ram.available)} RAM available of {_size(ram.total)}"


# -- the dry run ---------------------------------------------------------------------------------------------
def build_estimate(args, tokenizer, examples) -> Estimate:
    """The run's estimate from its options, the checked tokenizer and the tokenized examples; no weight loads."""
    student, teachers, extra = shapes(args, tokenizer)
    longest = max((len(ex.get("input_ids", ())) for ex in examples), default=0)
    run = run_shape(args, extra, longest_prompt(examples) if generates(args) else 0, longest)
    visible, visible_what = visible_memory(run.device)
    est = estimate(run, student, teachers, len(examples), data_bytes(examples) if run.device == "cpu" else 0, visible)
    est.visible, est.visible_what = visible, visible_what
    stats = getattr(examples, "stats", None)
    est.data = stats.summary() if stats is not None else f"{args.data}: {len(examples):,} examples"
    if generates(args) and not run.reply_tokens:
        est.notes.append("on-policy steps generate nothing here: no example has a prompt (plain text stays as it is)")
    elif run.vllm_bytes:
        est.notes.append("generation: vLLM's reserved share is counted; its KV cache and weights' copy live in it")
    if getattr(args, "cross_tokenizer", None):
        est.notes.append("--cross_tokenizer: counted as the same-tokenizer fused loss (alignment buffers not counted)")
    if any("moe" in m.model_type for m in [student] + [t.model for t in teachers if t.model]):
        est.notes.append("MoE activations approximated: top_k x expert width per token")
    return est


def dry_run(args) -> int:
    """`--dry_run`: the option checks of a real run, then the estimate printed (one per stage with --via); nothing
    is loaded or written. A later stage's teacher is the model the stage before it trains."""
    from lmdistill.train import preflight
    from lmdistill.train.progressive import plan_stages, stage_args

    runs = [args]
    if getattr(args, "via", None):
        runs, teacher = [], args.teacher[0]
        for i, stage in enumerate(plan_stages(args)):
            runs.append(stage_args(args, stage, i))
            runs[-1].teacher, teacher = [teacher], stage["student"]
    checked = copy.copy(runs[0])
    checked.dry_run = False  # checked as the real run would be (e.g. against a checkpoint's options on --resume)
    tokenizer = preflight.check(checked).tokenizer
    examples = _examples(runs[0], tokenizer)
    for i, a in enumerate(runs):
        stage = f"stage {i + 1}/{len(runs)}: {a.teacher[0]} -> {a.student}\n" if len(runs) > 1 else ""
        if os.environ.get("RANK", "0") == "0":  # one table for a multi-process launch
            print(stage + format_estimate(build_estimate(a, tokenizer, examples)), flush=True)
    return 0


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _summary(est: Estimate) -> list[str]:
    r, s = est.run, est.student
    how = f"LoRA r={s.lora_r} on {', '.join(s.lora_targets)}" if s.lora_targets else "full training"
    role = "student" if r.command == "distill" else "model"
    lines = [f"lmdistill {r.command} --dry_run: configs only (meta device); no weights loaded, nothing written",
             f"  {role}  {s.name}: {s.describe()}: {s.params:,} parameters, {s.trainable + r.extra_trainable:,} "
             f"trainable ({how})"]
    for t in est.teachers:
        lines.append(f"  teacher  {t.name} ({t.dtype}): {t.model.describe()}: {t.model.params:,} parameters" if t.model
                     else f"  teacher  cache {t.name}: top-{t.top_k} rows, {_size(t.cache_bytes)} (no weights)")
    per = f"{r.batch_size} x {r.accumulation_steps} accumulation x {r.world} process(es) x {r.train_len}"
    return lines + [f"  data: {est.data}",
                    f"  tokens per optimizer step: {per} = {est.tokens_per_step:,} (at most: shorter examples are "
                    "padded per batch only)",
                    f"  optimizer steps: {est.steps if est.steps is not None else '?'} ({est.steps_from})",
                    f"  loss: chunks of {est.chunk:,} positions x {s.vocab:,} logits (fp32)",
                    *_generation_lines(est), ""]


def _generation_lines(est: Estimate) -> list[str]:
    r = est.run
    if not r.reply_tokens:
        return []
    how = "vLLM" if r.vllm_bytes else "the student's KV cache" + (" and the teacher's" if r.teacher_kv else "")
    return [f"  on-policy: replies of up to {r.reply_tokens:,} tokens (--max_new_tokens) after prompts of up to "
            f"{r.prompt_tokens:,}: rows of up to {r.train_len:,} tokens are trained; generation with {how}"]


def format_estimate(est: Estimate) -> str:
    """The estimate as a table: each part's bytes per device without and with gradient checkpointing."""
    r, s, cpu = est.run, est.student, est.run.device == "cpu"
    setup = "1 process" if r.strategy == "single" else f"{r.strategy.upper().replace('ZERO2', 'ZeRO-2')} over {r.world}"
    head = f"memory per device ({r.device}, {r.dtype}, {setup})"
    lines = _summary(est) + [f"{head:<62}{'no checkpointing':>18}{'--gradient_checkpointing':>26}"]
    teacher = ("teacher (weights, final hidden, one layer's forward)" if any(t.model for t in est.teachers)
               else "teacher (the batch's cached rows)")
    rows = [("weights (student: fp32" + (" + autocast copies)" if r.dtype != "float32" else ")"), est.weights),
            ("gradients (fp32, trainable parameters)", est.gradients),
            ("optimizer state (AdamW: 2 x fp32 per trainable parameter)", est.optimizer),
            (f"activations (student, {r.batch_size} x {r.train_len} tokens)", None),
            (teacher, est.teacher if est.teachers else None),
            (f"loss ({est.buffers} x [{est.chunk}, {s.vocab}] fp32 + hidden-state grad)", est.loss)]
    if est.generation:
        rows.append((f"generation (KV cache of {r.batch_size} x {r.prompt_tokens + r.reply_tokens} positions, "
                     "prefill)", est.generation))
    if r.vllm_bytes:
        rows.append(("vLLM's reserved share (--vllm_gpu_memory_utilization)", r.vllm_bytes))
    labels = {"baseline": "process baseline (python, torch, transformers: RSS)", "data": "tokenized data (Python "
              "lists)", "teacher_cache": "teacher cache files (held in RAM)"}
    rows += [(labels[k], v) for k, v in est.host.items() if cpu]
    for label, value in rows:
        a, b = (est.activations, est.activations_checkpointed) if label.startswith("activations") else (value, value)
        if a is not None:
            lines.append(f"  {label:<60}{_size(a) + '  ':>18}{_size(b) + '  ':>26}")
    mark = lambda on: " *" if on == r.gradient_checkpointing else "  "  # noqa: E731
    if est.generation:
        lines.append("  (generation and the training forward are not alive at once: the total counts the larger of "
                     "activations + loss and generation)")
    lines.append(f"  {'total (estimated peak; * = this run)':<60}{_size(est.total(False)) + mark(False):>18}"
                 f"{_size(est.total(True)) + mark(True):>26}")
    if not cpu and "teacher_cache" in est.host:
        lines.append(f"host memory, not in the total: teacher cache files {_size(est.host['teacher_cache'])}")
    if est.visible is not None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", r.world)) if cpu else 1  # CPU processes share the RAM
        need = est.total(r.gradient_checkpointing) * local
        share = f" ({local} processes share it)" if local > 1 else ""
        lines.append(f"device memory visible: {est.visible_what}{share}; fits: "
                     f"{'yes' if need <= est.visible else 'NO'} ({need / max(est.visible, 1):.0%} of it)")
    return "\n".join(lines + [f"note: {n}" for n in est.notes])
