"""The one training loop: CE training (`lmdistill train`) and off-policy distillation (`lmdistill distill`).

Per optimizer step, each process takes `accumulation_steps` micro-batches of `batch_size` examples from one
seeded, epoch-by-epoch shuffled stream (the step number alone fixes which examples, so resume is exact).
The summed loss of every micro-batch is divided once by the number of trained tokens of the whole step,
counted over all micro-batches and all processes:

    grad = d/dtheta  sum_{ranks, micro-batches} loss_sum / N_trained(step)

so batch 1 x accumulation 8 == batch 8 x 1 and 2 ranks x batch 2 == 1 rank x batch 4.

Distillation uses the fused loss on both models' final hidden states and lm_head weights: no
`[batch, seq, vocab]` logits exist for either model. The teacher is frozen (eval mode, no grad, not in the
optimizer, optionally bf16) and runs under the same autocast context as the student. With `--teacher_cache`
no teacher runs: each micro-batch reads its examples' cached top-k rows (`lmdistill.teachers`).
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from accelerate.utils import DistributedType

from lmdistill.errors import LmdistillError
from lmdistill.data import shift_labels
from lmdistill.train.evaluate import evaluate_lm
from lmdistill.train.health import Health
from lmdistill.losses import fused_cross_entropy_parts, fused_teacher_distillation_loss_parts
from lmdistill.models import forward_hidden, lm_head_of
from lmdistill.models.hidden import full_weights
from lmdistill.train import preflight
from lmdistill.train.batches import CrossTokenizerStream, DatasetStream
from lmdistill.train.minillm import MiniLLMStream, sample_mixed
from lmdistill.train.on_policy import OnPolicyStream
from lmdistill.train import state as ckpt
from lmdistill.train.metrics import MetricsLogger
from lmdistill.train.setup import build

LR_FLOOR = 0.1  # cosine decays to lr / 10, as MiniMind's schedule


def lr_lambda(warmup: int, total: int):
    """Linear warmup over `warmup` steps, then cosine from 1 to LR_FLOOR at step `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _accelerator(args):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # Several runs in one process (the quickstart, tests) may differ in precision: reset accelerate's
    # per-process singleton (not the process group, which PartialState keeps).
    AcceleratorState._reset_state(reset_partial_state=False)

    report = "wandb" if args.use_wandb else args.report_to
    device = args.device or ""
    if device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device)  # accelerate takes the current device of a single process
    mixed = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=args.use_moe is True)]
    return Accelerator(cpu=device == "cpu" or not torch.cuda.is_available(), mixed_precision=mixed,
                       log_with=None if report == "none" else report, kwargs_handlers=kwargs)


def temperature_at(step: int, total: int, start: float, end: float | None, schedule: str = "linear") -> float:
    """KD temperature of optimizer step `step` (0-based) of `total`: `start` throughout when `end` is None, else
    from `start` at the first step to `end` at the last, linearly or along a half cosine."""
    if end is None or total <= 1:
        return start
    progress = min(1.0, step / (total - 1))
    if schedule == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    return start + (end - start) * progress


class Trainer:
    def __init__(self, args):
        from accelerate.utils import set_seed

        self.args = args
        self.plan = preflight.check(args)  # every check that needs no model: before anything is loaded or written
        self.acc = _accelerator(args)
        set_seed(args.seed)
        self.out = Path(args.output_dir)
        s = build(args, self.plan, self.acc.device, self.acc.is_main_process)
        self.tokenizer, self.teacher, self.examples, self.eval_examples = (
            s.tokenizer, s.teacher, s.examples, s.eval_examples)
        self.distilling = self.teacher is not None
        self.eval_teacher = None  # who scores the eval data: the teacher, or a cache's held-out part
        if self.teacher is not None and self.eval_examples is not None:
            self.eval_teacher = self.teacher.for_eval(self.eval_examples)
            if self.eval_teacher is None and self.acc.is_main_process and self.teacher.offline:
                print("note: the teacher cache holds no scores for --eval_data, so eval reports the student's CE and "
                      "perplexity but not KL to the teacher (cache them with `cache-teacher --eval_data`).")
            elif self.eval_teacher is None and self.acc.is_main_process:
                print("note: the teacher has another vocabulary, so eval reports the student's CE, perplexity and bits "
                      "per byte (comparable across tokenizers) but no KL or agreement to the teacher.")
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.per_step = args.batch_size * args.accumulation_steps * self.world
        self.total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(self.examples) / self.per_step))
        self.health = Health(args, self.total_steps, self.distilling, self.eval_teacher is not None)
        self._saved_step = None
        params = [p for p in s.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_iters, self.total_steps))
        self.model, self.optimizer = self.acc.prepare(s.student, optimizer)
        self.projectors = ckpt.projectors_of(self.model)  # feature distillation's, on the student; else None
        if self.projectors is not None and self.acc.distributed_type == DistributedType.FSDP:
            raise LmdistillError("--feature_loss under FSDP is not supported yet (the projectors are sharded with the "
                                 "student but run outside its forward); use DDP.")
        if self.teacher is not None and self.acc.distributed_type == DistributedType.FSDP:
            self.teacher.prepare(self.acc.prepare_model)  # sharded too; stays frozen in eval mode
        self.source = DatasetStream(self.examples, self.tokenizer.pad_token_id, args.batch_size,
                                    args.accumulation_steps, args.seed, self.world, self.rank, self.acc.device)
        if getattr(args, "cross_tokenizer", None):
            self.source = CrossTokenizerStream(self.source, self.teacher.pad_token_id)
        elif getattr(args, "method", "kd") == "minillm":
            self.source = MiniLLMStream(self.source, self.minillm_samples, args.lm_coef, args.minillm_clip)
        elif getattr(args, "on_policy_fraction", 0) > 0:
            self.source = OnPolicyStream(self.source, args.on_policy_fraction, args.seed, self.student_replies)
        self.global_step, self.stop_signal = 0, None
        self._vllm = None  # the vLLM engine of --generation_backend vllm, built at the first on-policy step
        self._check_head()

    def _check_head(self) -> None:
        head = lm_head_of(self.model)
        if (head.logit_scale != 1.0 or head.softcap) and getattr(self.args, "cross_tokenizer", None):
            raise LmdistillError("--cross_tokenizer: the student scales or softcaps its logits; the cross-tokenizer "
                                 "losses do not support that yet (the token-level losses do).")

    # -- one optimizer step ------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        """This process's micro-batches of `step`, from the batch source."""
        return self.source.batches(step)

    def micro_loss(self, batch: dict, scale: float = 1.0):
        """Loss of one micro-batch times `scale` (LossParts: the loss summed over its trained tokens, then scaled;
        the terms stay plain sums) and the MoE aux loss or None. A batch's `objective` picks the loss: none (the
        run's: CE or distillation), "lm" (`coef` x CE, term "lm") or "minillm" (the weighted single-step reverse KL
        and policy-gradient terms, "rkl" and "pg"). The scale goes into the fused loss (`loss_scale`), which then
        adds the lm_head's gradient straight into an existing .grad on later micro-batches instead of building a
        second [V, H] buffer; so backward must see the returned loss as is (no fp16 loss scaler: it scales after)."""
        a = self.args
        in_loss = self.acc.scaler is None  # a GradScaler multiplies the loss again before backward
        ls = scale if in_loss else None
        targets = shift_labels(batch["labels"])
        layers = self.projectors.student_layers if self.projectors is not None else None
        out = forward_hidden(self.model, batch["input_ids"], batch["attention_mask"], layers=layers)
        head = lm_head_of(self.model)
        w, b = full_weights(head)
        heads = {"student_logit_scale": head.logit_scale, "student_softcap": head.softcap}
        objective = batch.get("objective")
        if self.teacher is None or objective == "lm":
            coef = batch["coef"] if objective == "lm" else 1.0
            parts = fused_cross_entropy_parts(out.hidden, w, targets, reduction="sum", lm_head_bias=b,
                                              logit_scale=head.logit_scale, softcap=head.softcap,
                                              loss_scale=None if ls is None else ls * coef)
            if ls is None:
                parts.loss = parts.loss * (scale * coef)
            if objective == "lm":
                parts.terms = {"lm": parts.terms["ce"]}
            return parts, out.aux_loss
        if "student_rows" in batch:  # --cross_tokenizer
            from lmdistill.losses.cross_tokenizer import cross_tokenizer_loss_parts

            rows, wt, bt = self.teacher.score(batch)
            parts = cross_tokenizer_loss_parts(
                out.hidden, w, b, targets, batch["student_rows"], rows, wt, bt, a.cross_tokenizer,
                self.teacher.student_vocab, self.teacher.vocab_size, temperature=self.temperature(), alpha=a.alpha,
                top_k=a.top_k, shared=self.teacher.shared)
            parts.loss = parts.loss * scale
            return parts, out.aux_loss
        if objective == "minillm":
            parts = fused_teacher_distillation_loss_parts(
                out.hidden, w, self.teacher.score(batch), targets, reduction="sum", student_lm_head_bias=b,
                divergence="reverse_kl", kd_weights=batch["kd_weights"], ce_weights=batch["ce_weights"],
                loss_scale=ls, **heads)
            parts.terms = {"rkl": parts.terms["kd"], "pg": parts.terms["ce"]}
        else:
            scores = self.teacher.score(batch)
            parts = fused_teacher_distillation_loss_parts(
                out.hidden, w, scores, targets, reduction="sum", student_lm_head_bias=b,
                divergence=a.divergence, temperature=self.temperature(), alpha=a.alpha, skew_lambda=a.skew_lambda,
                jsd_beta=a.jsd_beta, loss_scale=ls, **heads, **({"top_k": a.top_k} if a.top_k else {}))
            if self.projectors is not None:  # hidden-state distillation on the same trained positions
                rows = (targets.reshape(-1) != -100).nonzero().squeeze(1)
                feature = self.projectors.loss_sum(out.layers, scores.layers, rows, a.feature_loss)
                parts.loss = parts.loss + (a.feature_weight * scale) * feature
                parts.terms["feature"] = feature.item()
        if ls is None:
            parts.loss = parts.loss * scale
        return parts, out.aux_loss

    def temperature(self) -> float:
        a = self.args
        return temperature_at(self.global_step, self.total_steps, a.temperature, a.temperature_end, a.temperature_schedule)

    def accumulate(self, batches: list[dict]) -> dict:
        """Backward over the step's micro-batches; gradients = d(sum of losses)/d theta / N_trained(step).
        Batches of different `objective`s (MiniLLM's sampled and dataset replies) are token groups normalized
        each by its own global count: gradients = sum over groups of d(sum of the group's losses)/d theta / N_group.
        Returns the step's metrics: `loss`, one `NAME_loss` per named term of the objective (kd, ce, aux, ...)
        divided by its group's global trained-token count, token counts and the temperature."""
        groups = list(getattr(self.source, "groups", None) or [None])  # fixed by the objective: the same on every rank
        counts = [0] * len(groups)
        for b in batches:
            counts[groups.index(b.get("objective"))] += int((shift_labels(b["labels"]) != -100).sum())
        totals = [int(x) for x in self._sum(counts).tolist()]
        n_group = [max(x, 1) for x in totals]
        objective, terms = 0.0, {}
        for m, b in enumerate(batches):
            sync = m == len(batches) - 1
            g = groups.index(b.get("objective"))
            with (nullcontext() if sync else self.acc.no_sync(self.model)), self.acc.autocast():
                parts, aux = self.micro_loss(b, self.world / n_group[g])  # DDP averages over ranks: undo it
                total = parts.loss if aux is None else parts.loss + aux / len(batches)
                self.acc.backward(total)
            objective += parts.loss.item() / self.world
            for name, value in parts.terms.items():
                terms[name] = terms.get(name, 0.0) + value / n_group[g]
            if aux is not None:  # a per-micro-batch mean, not a sum over tokens
                terms["aux"] = terms.get("aux", 0.0) + aux.item() / len(batches) / self.world
        names = sorted(terms)  # the same on every rank: fixed by the objective, not by the data
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        g = self._sum(torch.tensor([objective, tokens, *(terms[k] for k in names)], dtype=torch.float64))
        stats = {"loss": g[0].item(), **{f"{k}_loss": v.item() for k, v in zip(names, g[2:])},
                 "trained_tokens": sum(totals), "tokens": int(g[1].item())}
        return {**stats, **({"temperature": self.temperature()} if self.distilling else {})}

    def _sum(self, x):
        t = torch.as_tensor(x, dtype=torch.float64, device=self.acc.device)
        return (self.acc.reduce(t, reduction="sum") if self.world > 1 else t).cpu()

    def optimizer_step(self) -> float:
        grad_norm = float("nan")
        if self.args.grad_clip > 0:
            grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), self.args.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def step(self) -> dict:
        """One optimizer step: the batch source's micro-batches, backward, clip, update; returns its metrics.
        A NaN/inf loss raises before the update, naming the step and the last good checkpoint."""
        t0 = time.perf_counter()
        stats = self.accumulate(self.micro_batches(self.global_step))
        if not math.isfinite(stats["loss"]):
            last = ckpt.list_checkpoints(self.out)
            raise LmdistillError(f"step {self.global_step + 1}: the loss is {stats['loss']}; stopping before the "
                                 f"optimizer step. Last good checkpoint: {last[-1] if last else 'none'}. Lower "
                                 "--learning_rate or check the data.")
        lr = self.scheduler.get_last_lr()[0]
        stats["grad_norm"] = self.optimizer_step()
        self.global_step += 1
        seconds = time.perf_counter() - t0
        stats.update(self.source.last_stats, step=self.global_step, lr=lr, step_seconds=seconds,
                     epoch=self.global_step * self.per_step / len(self.examples), tokens_per_sec=stats["tokens"] / seconds)
        return stats

    def minillm_samples(self, prompts: list[list[int]]) -> list:
        """Replies sampled from the teacher-student mixture, with their tokens' log-probabilities (MiniLLM)."""
        return sample_mixed(self.acc.unwrap_model(self.model), self.teacher, self.tokenizer, prompts,
                            self.args.max_new_tokens, self.args.teacher_mix_alpha, self.acc.device)

    def student_replies(self, prompts: list[list[int]]) -> list:
        """The current student's sampled replies to token-id prompts (the on-policy batch source's generator)."""
        from lmdistill.models.generation import generate_replies

        a = self.args
        if a.generation_backend == "vllm":
            return self._vllm_replies(prompts)
        return generate_replies(self.acc.unwrap_model(self.model), self.tokenizer, prompts,
                                max_new_tokens=a.max_new_tokens, batch_size=len(prompts), device=self.acc.device,
                                progress=False, temperature=a.generation_temperature, top_p=a.generation_top_p,
                                backend=a.generation_backend)

    def _vllm_replies(self, prompts: list[list[int]]) -> list:
        """On-policy replies from a colocated vLLM engine: built from the student at its first use, given the
        student's weights again whenever an optimizer step changed them; each reply seeded by (seed, step, rank,
        call, index), so resume is exact."""
        import tempfile

        from lmdistill.models.generation import stop_token_ids
        from lmdistill.models.vllm_backend import VllmGenerator, reply_seeds

        a, model = self.args, self.acc.unwrap_model(self.model)
        if self._vllm is None:
            self._vllm_dir = tempfile.TemporaryDirectory(prefix="lmdistill-vllm-")
            ckpt.save_model_folder(model, self.tokenizer, Path(self._vllm_dir.name), merge_lora=True)
            self._vllm = VllmGenerator(self._vllm_dir.name, self.tokenizer, dtype=a.dtype,
                                       gpu_memory_utilization=a.vllm_gpu_memory_utilization, seed=a.seed)
            self._vllm_at = (self.global_step, 0)
        step, calls = self._vllm_at
        if step != self.global_step:
            self._vllm.sync(model)
            step, calls = self.global_step, 0
        self._vllm_at = (step, calls + 1)
        return self._vllm.replies(prompts, a.max_new_tokens, a.generation_temperature, a.generation_top_p, 0,
                                  stop_token_ids(self.tokenizer, model),
                                  reply_seeds(a.seed, step, self.rank * 1000 + calls, len(prompts)))

    # -- checkpoints -------------------------------------------------------------------------------
    def training_state(self, rng_per_rank: list) -> dict:
        return {"step": self.global_step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank, "config": vars(self.args),
                "health": self.health.state_dict()}

    def save_checkpoint(self) -> Path | None:
        from accelerate.utils import gather_object

        path = self.out / f"checkpoint-{self.global_step}"
        if self._saved_step == self.global_step:  # e.g. the best checkpoint, then the save interval's
            return path
        self._saved_step, path = self.global_step, None
        rng = gather_object([ckpt.rng_state()]) if self.world > 1 else [ckpt.rng_state()]  # every rank's sampling
        if self.acc.is_main_process:
            path = ckpt.save_checkpoint(self.out, self.global_step, self.acc.unwrap_model(self.model), self.tokenizer,
                                        self.training_state(rng), self.args.keep_checkpoints,
                                        protect=self.health.protected(self.out))
        self.acc.wait_for_everyone()
        return path

    def resume(self, folder: Path) -> None:
        state = torch.load(folder / ckpt.STATE_FILE, map_location="cpu", weights_only=False)
        ckpt.load_model_weights(self.acc.unwrap_model(self.model), folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        per_rank = state.get("rng_per_rank") or []
        ckpt.set_rng_state(per_rank[self.rank] if len(per_rank) == self.world else state["rng"])
        self.global_step = state["step"]
        self.health.load_state_dict(state.get("health"))
        if self.acc.is_main_process:
            _truncate_metrics(self.out / "metrics.jsonl", self.global_step)
            print(f"resumed from {folder} at step {self.global_step}")

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> int:
        a = self.args
        if self.plan.resume_from is not None:
            self.resume(self.plan.resume_from)
        if self.acc.is_main_process:
            preflight.remove_outputs(self.plan.stale_outputs)  # --overwrite: the earlier run goes now, not before
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.write_config(self.out, vars(a))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process and a.report_to != "none" or a.use_wandb:
            self.acc.init_trackers(a.wandb_project, config={k: v for k, v in vars(a).items() if v is not None})
        log = MetricsLogger(self.out, self.total_steps, self.global_step, self.acc.is_main_process, self.acc,
                            trackers=a.report_to != "none" or a.use_wandb)
        previous_handlers = self._install_signal_handlers()
        self.model.train()
        self.health.log = log
        try:
            while self.global_step < self.total_steps and not self.health.stopped:  # stopped: early stopping
                stats = self.step()
                done = self.global_step
                log.step(done, stats, log=done % max(a.log_interval, 1) == 0 or done in (1, self.total_steps))
                self.health.on_step(self, stats)
                if self._eval_due():
                    result = self.evaluate()
                    log.eval(self.global_step, result)
                    if self.health.on_eval(self, result):
                        break
                if a.save_interval and done % a.save_interval == 0 and done < self.total_steps:
                    self.save_checkpoint()
                _debug_hooks(self.global_step)
                if self._stop_requested():
                    path = self.save_checkpoint()
                    log.message(f"stopped by {self.stop_signal} after step {self.global_step} of {self.total_steps}; saved "
                                f"{path}. Resume with the same command plus --resume.")
                    return 128 + int(getattr(signal, self.stop_signal or "SIGINT"))  # 130 / 143: the run is unfinished
            self.finish()
        finally:
            log.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        return 0

    def _eval_due(self) -> bool:
        a = self.args
        return self.eval_examples is not None and (
            self.global_step == self.total_steps or (a.eval_interval and self.global_step % a.eval_interval == 0))

    def evaluate(self) -> dict:
        result = {}
        if self.acc.is_main_process:
            teacher = self.eval_teacher
            result = evaluate_lm(self.acc.unwrap_model(self.model), self.eval_examples, self.tokenizer, teacher,
                                 batch_size=self.args.batch_size, max_batches=self.args.eval_batches,
                                 device=self.acc.device)
        self.acc.wait_for_everyone()
        return result

    def finish(self) -> None:
        """The final student as an HF folder (LoRA merged; adapter in adapter/) plus the last checkpoint; under
        --keep_best the final student is the best checkpoint's and the last model stays in its checkpoint."""
        if self.args.save_interval or self.health.keep_best:
            self.save_checkpoint()
        self.health.export_best(self)
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.model)
            tmp = self.out / f".final.tmp-{os.getpid()}"
            ckpt.save_model_folder(model, self.tokenizer, tmp, merge_lora=True)
            for f in tmp.iterdir():
                os.replace(f, self.out / f.name)
            tmp.rmdir()
            if hasattr(model, "peft_config"):
                model.save_pretrained(self.out / "adapter")
            print(f"saved the {'student' if self.distilling else 'model'} to {self.out}")
        self.acc.wait_for_everyone()

    def close(self) -> None:
        """Leave the process group together (a rank that exits while its peer still holds the group can be
        aborted at interpreter shutdown); a no-op in a single process."""
        import torch.distributed as dist

        if self.world > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # -- signals -----------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        """SIGINT/SIGTERM finish the step and save; returns the handlers they replace (restored after train)."""
        def handler(signum, _frame):
            self.stop_signal = signal.Signals(signum).name

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, handler)
        return previous

    def _stop_requested(self) -> bool:
        return bool(self._sum(1.0 if self.stop_signal else 0.0) > 0)


def _debug_hooks(step: int) -> None:
    """Test hooks: LMDISTILL_KILL_AT_STEP=k sends SIGKILL after step k; LMDISTILL_SIGTERM_AT_STEP and
    LMDISTILL_SIGINT_AT_STEP likewise."""
    hooks = (("LMDISTILL_KILL_AT_STEP", signal.SIGKILL), ("LMDISTILL_SIGTERM_AT_STEP", signal.SIGTERM),
             ("LMDISTILL_SIGINT_AT_STEP", signal.SIGINT))
    for var, sig in hooks:
        if os.environ.get(var) == str(step):
            os.kill(os.getpid(), sig)


def _truncate_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites what the interrupted run logged after its checkpoint."""
    import json

    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def run_training(args) -> int:
    trainer = Trainer(args)
    try:
        return trainer.train()
    finally:
        trainer.close()
