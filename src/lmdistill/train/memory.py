"""The memory arithmetic of `--dry_run`: bytes per device from the shapes of the models and of the run.

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
- CPU only (the peak is RSS): the process baseline CPU_BASELINE_BYTES and the tokenized data (`estimate.data_bytes`:
  12 bytes per example of a memory-mapped store, or what Python holds for examples in memory).
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

import math
from dataclasses import dataclass, field

import torch

from lmdistill.models.shapes import ModelShape, TeacherShape

MiB = 2**20
# RSS after `import lmdistill.train.loop` (python, torch, transformers, accelerate, peft), measured once on the
# project's 2-core Linux x86-64 machine (torch 2.13 CPU build, transformers 5.24): 348 MiB. Counted on CPU only.
CPU_BASELINE_BYTES = 348 * MiB
# the Linear layers of a Llama/Qwen decoder layer grouped by the input they read (LoRA activations)
GROUPS = {"attn_in": ("q_proj", "k_proj", "v_proj"), "attn_out": ("o_proj",), "mlp_in": ("gate_proj", "up_proj"),
          "mlp_mid": ("down_proj",)}


@dataclass(frozen=True)
class RunShape:
    """What the estimate reads of the run plan (`lmdistill.train.estimate.run_shape`)."""

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
            held += rows * (t.rows_k * 12 + 4)
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
