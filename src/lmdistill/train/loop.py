"""The one training loop: CE training (`lmdistill train`), off- and on-policy distillation (`lmdistill distill`).

    plan = preflight.check(DistillConfig(...).values(), "distill")
    Trainer(plan).train()

Per optimizer step, each process takes `accumulation_steps` micro-batches from the plan's batch source
(`lmdistill.train.batches`: the seeded dataset stream, or a source built over it), and the plan's objective
(`lmdistill.train.objectives`) gives each its loss. The summed loss of every micro-batch is divided once by the
number of trained tokens of the whole step, counted over all micro-batches and all processes:

    grad = d/dtheta  sum_{ranks, micro-batches} loss_sum / N_trained(step)

so batch 1 x accumulation 8 == batch 8 x 1 and 2 ranks x batch 2 == 1 rank x batch 4.

Distillation uses the fused loss on the student's final hidden states and lm_head weight: no
`[batch, seq, vocab]` logits exist for either model. The teacher (any registered kind) is frozen and runs under
the same autocast context as the student.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext

import torch
from accelerate.utils import DistributedType

from lmdistill.data import shift_labels
from lmdistill.data.identity import data_fingerprint
from lmdistill.errors import LmdistillError
from lmdistill.models import forward_hidden, lm_head_of
from lmdistill.train import preflight
from lmdistill.train import state as ckpt
from lmdistill.train.batches import SOURCES, DatasetStream
from lmdistill.train.checkpointing import CheckpointMixin, debug_hooks
from lmdistill.train.evaluate import evaluate_lm
from lmdistill.train.generator import StudentGenerator
from lmdistill.train.health import Health
from lmdistill.train.lock import RunLock
from lmdistill.train.metrics import MetricsLogger
from lmdistill.train.objectives import objective_fn
from lmdistill.train.plan import RunPlan
from lmdistill.train.schedules import lr_lambda, temperature_at
from lmdistill.train.setup import build


def _accelerator(plan: RunPlan):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # Several runs in one process (the quickstart, tests) may differ in precision: reset accelerate's
    # per-process singleton (not the process group, which PartialState keeps).
    AcceleratorState._reset_state(reset_partial_state=False)
    device, tracker = plan.device or "", plan.output.tracker
    if device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device)  # accelerate takes the current device of a single process
    mixed = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[plan.dtype]
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=plan.student.use_moe)]
    return Accelerator(cpu=device == "cpu" or not torch.cuda.is_available(), mixed_precision=mixed,
                       log_with=None if tracker == "none" else tracker, kwargs_handlers=kwargs)


class Trainer(CheckpointMixin):
    def __init__(self, plan: RunPlan):
        from accelerate.utils import set_seed

        self.plan, s = plan, plan.schedule
        self.acc = _accelerator(plan)
        set_seed(s.seed)
        self.out, self.device = plan.output.output_dir, self.acc.device
        self.lock = RunLock(self.out).acquire() if self.acc.is_main_process else None  # one run per folder
        try:
            self._build(plan)
        except BaseException:
            if self.lock is not None:
                self.lock.release(remove_folder_if_empty=True)  # a failed start leaves nothing behind
            raise

    def _build(self, plan: RunPlan) -> None:
        s = plan.schedule
        setup = build(plan, self.device, self.acc.is_main_process)
        self.tokenizer, self.teacher, self.examples, self.eval_examples = (
            setup.tokenizer, setup.teacher, setup.examples, setup.eval_examples)
        self.data_identity = data_fingerprint(plan.data.path) if self.acc.is_main_process else {}
        self.distilling = self.teacher is not None
        self.eval_teacher = self._eval_teacher()
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.per_step = s.batch_size * s.accumulation_steps * self.world
        self.total_steps = s.max_steps or max(1, math.ceil(s.epochs * len(self.examples) / self.per_step))
        self.health = Health(plan, self.total_steps, self.distilling, self.eval_teacher is not None)
        self._saved_step, self.global_step, self.stop_signal = None, 0, None
        params = [p for p in setup.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s.warmup_iters, self.total_steps))
        self.model, self.optimizer = self.acc.prepare(setup.student, optimizer)
        self.projectors = ckpt.projectors_of(self.model)  # feature distillation's, on the student; else None
        fsdp = self.acc.distributed_type == DistributedType.FSDP
        if self.projectors is not None and fsdp:
            raise LmdistillError("--feature_loss under FSDP is not supported yet (the projectors are sharded with the "
                                 "student but run outside its forward); use DDP.")
        if self.teacher is not None and fsdp:
            self.teacher.prepare(self.acc.prepare_model)  # sharded too; stays frozen in eval mode
        self.generator = None
        if plan.source.generation is not None:
            self.generator = StudentGenerator(plan.source.generation, self.tokenizer, s.seed, self.rank, self.device,
                                              plan.dtype, self.unwrapped, lambda: self.global_step)
        d = plan.data
        dataset = DatasetStream(self.examples, self.tokenizer.pad_token_id, s.batch_size, s.accumulation_steps,
                                s.seed, self.world, self.rank, self.device,
                                pack_rows=d.max_seq_len if d.packing else None, group_by_length=d.group_by_length)
        self.source = SOURCES.part(plan.source.kind).build(plan, dataset, self) if self.distilling else dataset
        self.loss_fn = objective_fn(plan.objective.name)
        head = lm_head_of(self.model)
        if (head.logit_scale != 1.0 or head.softcap) and plan.objective.name == "cross_tokenizer":
            raise LmdistillError("--cross_tokenizer: the student scales or softcaps its logits; the cross-tokenizer "
                                 "losses do not support that yet (the token-level losses do).")

    def _eval_teacher(self):
        """Who scores the eval data: the teacher, a cache's held-out part, or None (with a note saying why)."""
        if self.teacher is None or self.eval_examples is None:
            return None
        teacher = self.teacher.for_eval(self.eval_examples)
        if teacher is None and self.acc.is_main_process:
            print("note: the teacher cache holds no scores for --eval_data, so eval reports the student's CE and "
                  "perplexity but not KL to the teacher (cache them with `cache-teacher --eval_data`)."
                  if self.teacher.offline else
                  "note: the teacher has another vocabulary, so eval reports the student's CE, perplexity and bits "
                  "per byte (comparable across tokenizers) but no KL or agreement to the teacher.")
        return teacher

    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

    # -- one optimizer step ------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list:
        """This process's micro-batches of `step`, from the batch source."""
        return self.source.batches(step)

    def micro_loss(self, batch, scale: float = 1.0):
        """The objective's loss of one micro-batch times `scale` (LossParts) and the MoE aux loss or None. The
        scale goes into the fused loss (`loss_scale`) unless a GradScaler multiplies the loss again later."""
        layers = self.projectors.student_layers if self.projectors is not None else None
        out = forward_hidden(self.model, **batch.model_inputs(), layers=layers)
        parts = self.loss_fn(self, batch, out, scale, scale if self.acc.scaler is None else None)
        return parts, out.aux_loss

    def temperature(self) -> float:
        o = self.plan.objective
        return temperature_at(self.global_step, self.total_steps, o.kd.temperature, o.temperature_end,
                              o.temperature_schedule)

    def accumulate(self, batches: list) -> dict:
        """Backward over the step's micro-batches; gradients = d(sum of losses)/d theta / N_trained(step).
        Batches of different groups (MiniLLM's sampled and dataset replies) are normalized each by its own global
        count. Returns the step's metrics: `loss`, one `NAME_loss` per named term divided by its group's global
        trained-token count, token counts and the temperature."""
        groups = list(getattr(self.source, "groups", None) or [None])  # fixed by the source: the same on every rank
        counts = [0] * len(groups)
        for b in batches:
            counts[groups.index(b.group)] += int((shift_labels(b.labels) != -100).sum())
        totals = [int(x) for x in self._sum(counts).tolist()]
        n_group = [max(x, 1) for x in totals]
        objective, terms = 0.0, {}
        for m, b in enumerate(batches):
            sync, g = m == len(batches) - 1, groups.index(b.group)
            with (nullcontext() if sync else self.acc.no_sync(self.model)), self.acc.autocast():
                parts, aux = self.micro_loss(b, self.world / n_group[g])  # DDP averages over ranks: undo it
                self.acc.backward(parts.loss if aux is None else parts.loss + aux / len(batches))
            objective += parts.loss.item() / self.world
            for name, value in parts.terms.items():
                terms[name] = terms.get(name, 0.0) + value / n_group[g]
            if aux is not None:  # a per-micro-batch mean, not a sum over tokens
                terms["aux"] = terms.get("aux", 0.0) + aux.item() / len(batches) / self.world
        names = sorted(terms)  # the same on every rank: fixed by the objective, not by the data
        tokens = sum(int(b.attention_mask.sum()) for b in batches)
        g = self._sum(torch.tensor([objective, tokens, *(terms[k] for k in names)], dtype=torch.float64))
        stats = {"loss": g[0].item(), **{f"{k}_loss": v.item() for k, v in zip(names, g[2:])},
                 "trained_tokens": sum(totals), "tokens": int(g[1].item())}
        return {**stats, **({"temperature": self.temperature()} if self.distilling else {})}

    def _sum(self, x):
        t = torch.as_tensor(x, dtype=torch.float64, device=self.device)
        return (self.acc.reduce(t, reduction="sum") if self.world > 1 else t).cpu()

    def optimizer_step(self) -> float:
        """Clip (the norm is measured even without clipping), then update; a NaN/inf gradient norm stops before the
        update, as a NaN loss does (under an fp16 loss scaler, whose scaled gradients overflow by design, the scaler
        skips the step instead)."""
        clip = self.plan.schedule.grad_clip
        grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf))
        if not math.isfinite(grad_norm) and self.acc.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            last = ckpt.list_checkpoints(self.out)
            raise LmdistillError(f"step {self.global_step + 1}: the gradient norm is {grad_norm}; stopping before the "
                                 f"optimizer step, the weights unchanged. Last good checkpoint: "
                                 f"{last[-1] if last else 'none'}. Lower --learning_rate, keep --grad_clip on, or "
                                 "check the data and the model's weights.")
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

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> int:
        o = self.plan.output
        if o.resume_from is not None:
            self.resume(o.resume_from)
        if self.acc.is_main_process:
            preflight.remove_outputs(list(o.stale_outputs))  # --overwrite: the earlier run goes now, not before
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.write_config(self.out, self.config_record())
        self.acc.wait_for_everyone()
        self.check_start_space()
        tracking = o.tracker != "none"
        if tracking and self.acc.is_main_process:
            self.acc.init_trackers(o.project, config={k: v for k, v in self.config_record().items() if v is not None})
        log = MetricsLogger(self.out, self.total_steps, self.global_step, self.acc.is_main_process, self.acc,
                            trackers=tracking)
        previous_handlers = self._install_signal_handlers()
        self.model.train()
        self.health.log = log
        try:
            while self.global_step < self.total_steps and not self.health.stopped:  # stopped: early stopping
                stats = self.step()
                done = self.global_step
                log.step(done, stats, log=done % max(o.log_interval, 1) == 0 or done in (1, self.total_steps))
                self.health.on_step(self, stats)
                if self._eval_due():
                    result = self.evaluate()
                    log.eval(self.global_step, result)
                    if self.health.on_eval(self, result):
                        break
                if o.save_interval and done % o.save_interval == 0 and done < self.total_steps:
                    self.save_checkpoint()
                debug_hooks(self.global_step)
                if self._stop_requested():
                    path = self.save_checkpoint()
                    log.message(f"stopped by {self.stop_signal} after step {self.global_step} of {self.total_steps}; "
                                f"saved {path}. Resume with the same command plus --resume.")
                    return 128 + int(getattr(signal, self.stop_signal or "SIGINT"))  # 130 / 143: unfinished
            self.finish()
        finally:
            log.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if self.lock is not None:
                self.lock.release()  # the run is over (finished, stopped or failed): the folder is free
        return 0

    def _eval_due(self) -> bool:
        interval = self.plan.eval.interval
        return self.eval_examples is not None and (
            self.global_step == self.total_steps or (interval and self.global_step % interval == 0))

    def evaluate(self) -> dict:
        result = {}
        if self.acc.is_main_process:
            result = evaluate_lm(self.unwrapped(), self.eval_examples, self.tokenizer, self.eval_teacher,
                                 batch_size=self.plan.schedule.batch_size, max_batches=self.plan.eval.batches,
                                 device=self.device)
        self.acc.wait_for_everyone()
        return result

    def close(self) -> None:
        """Leave the process group together (a rank that exits while its peer still holds the group can be
        aborted at interpreter shutdown); a no-op in a single process. Releases the generator."""
        import torch.distributed as dist

        if self.generator is not None:
            self.generator.close()
        if self.lock is not None:
            self.lock.release()
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def run_training(plan: RunPlan) -> int:
    trainer = Trainer(plan)
    try:
        return trainer.train()
    finally:
        trainer.close()
