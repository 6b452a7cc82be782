"""Training health: keep the best model, stop early, and say when a run is going wrong.

    lmdistill distill ... --eval_data held.jsonl --eval_interval 50 --keep_best              # best eval CE -> final
    lmdistill train ... --eval_data held.jsonl --eval_interval 50 --keep_best bits_per_byte --early_stopping_patience 3
    lmdistill distill ... --strict_health        # a health warning stops the run (checkpoint saved, exit status 1)

The loop hands `Health` every optimizer step's metrics and every evaluation. Train metrics are already summed over
processes and eval results are broadcast from the main process, so every process takes the same decisions (save a
best checkpoint, stop early, stop on a warning) without further talk. What it keeps between steps (best value and
step, patience counter, the checks' windows) is a `HealthState` of named fields, saved as a plain dict in every
checkpoint, so --resume continues exactly.

Warnings: a `{"type": "health", "check": NAME, ...}` record in metrics.jsonl and a `warning:` line in the log, each
saying what was seen and what to try, from numbers the loop already computes:

    overfitting     held-out CE rose at OVERFIT_EVALS evaluations in a row while the training loss fell
    collapse        held-out next-token entropy of the student near zero while its CE is not: confidently wrong
    kd_plateau      a bounded divergence (jsd, skew KLs, tvd) stopped falling far above zero (a share of its
                    maximum) over the last PLATEAU_WINDOWS windows of total_steps / 20 steps
    teacher_worse   the teacher's held-out CE is above the student's: more distillation pulls the student back
    grad_explode    the median gradient norm of a window of GRAD_WINDOW steps is 10x the smallest earlier median
    grad_vanish     the median gradient norm fell to ~0 while the training loss is still high

Each check warns at most once per run (the checks look at noisy windows; a warning repeated every time the noise
crosses a threshold would bury the first).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass, field, fields

from lmdistill.errors import LmdistillError

LOWER_IS_BETTER = ("ce", "ppl", "bits_per_byte", "kl_to_teacher")
HIGHER_IS_BETTER = ("agreement", "accuracy", "exact_match")
OVERFIT_EVALS = 3  # held-out CE rising at this many evaluations in a row
COLLAPSE_ENTROPY, COLLAPSE_CE = 0.1, 1.0  # nats: near-certain predictions, yet this CE or more
PLATEAU_WINDOWS, PLATEAU_DROP, PLATEAU_SHARE = 4, 0.10, 0.03  # < 10% lower than 4 windows ago, >= 3% of the maximum
GRAD_WINDOW, GRAD_EXPLODE, GRAD_VANISH = 10, 10.0, 1e-3
BOUNDED_ADVICE = ("bounded divergences give a student that starts far from the teacher little gradient where it is "
                  "wrong. Try --divergence forward_kl first (then the divergence you want from that checkpoint), "
                  "--alpha 0.1-0.5 (hard-label CE alongside), or a temperature schedule (--temperature 2 "
                  "--temperature_end 1)")


# -- options -------------------------------------------------------------------------------------------------
def metric_name(text):
    """The type of --keep_best: a metric name; YAML `true` means the default (eval CE), `false` none."""
    if isinstance(text, bool):
        return "ce" if text else None
    return str(text).strip()


def direction(metric: str) -> str | None:
    """"min" or "max" for a metric whose better direction is known (per-member `kl_to_teacher_2` as its base)."""
    base = re.sub(r"_\d+$", "", metric)
    return "min" if base in LOWER_IS_BETTER else "max" if base in HIGHER_IS_BETTER else None


def logged_metrics(command: str, teacher=None) -> list[str]:
    """The eval metrics a run's evaluations log that have a direction (what --keep_best may name): KL and
    agreement need a teacher that scores the student's tokens (not one with its own tokenization), per member too."""
    from lmdistill.teachers.registry import OWN_TOKENIZATION, capabilities_of

    names = ["ce", "ppl", "bits_per_byte"]
    if command == "distill" and teacher is not None and OWN_TOKENIZATION not in capabilities_of(teacher):
        names += ["kl_to_teacher", "agreement"]
        n = len(teacher.leaves()) if teacher.members else 1
        names += [f"{m}_{i}" for i in range(1, n + 1) for m in ("kl_to_teacher", "agreement")] if n > 1 else []
    return names


def check_options(values, command: str, teacher=None):
    """Pre-flight: --keep_best / --early_stopping_* need evaluations during the run and a metric it logs; returns
    the run's `HealthPlan`."""
    from lmdistill.train.plan import HealthPlan

    v = values
    keep_best, patience, delta = v["keep_best"], v["early_stopping_patience"], v["early_stopping_min_delta"]
    names = logged_metrics(command, teacher)
    plan = HealthPlan(keep_best, patience, delta, bool(v["strict_health"]), tuple(names))
    if keep_best is None and not patience:
        if delta:
            raise LmdistillError("--early_stopping_min_delta: applies to early stopping; add "
                                 "--early_stopping_patience K (stop after K evaluations without such a gain).")
        return plan
    flag = "--keep_best" if keep_best is not None else "--early_stopping_patience"
    if not v["eval_data"]:
        raise LmdistillError(f"{flag}: chooses by held-out metrics; it needs --eval_data FILE (held-out data) and "
                             "--eval_interval N (evaluate every N steps).")
    if not v["eval_interval"]:
        raise LmdistillError(f"{flag}: with --eval_interval 0 the run evaluates only at its end, leaving nothing to "
                             "choose from; pass --eval_interval N (evaluate every N steps).")
    metric = keep_best or "ce"
    if metric not in names:
        why = (" (entropy and teacher_ce are logged but neither is better high or low)"
               if metric in ("entropy", "teacher_ce") else
               " (KL and agreement need a teacher that scores the eval data: `lmdistill distill` without "
               "--cross_tokenizer)" if direction(metric) else "")
        raise LmdistillError(f"--keep_best {metric}: not an eval metric this run logs with a known direction{why}; "
                             f"expected one of {', '.join(names)}.")
    return plan


def kd_bound(objective) -> tuple[str, float] | None:
    """(divergence, its largest value) for the bounded divergences the plateau check watches; None otherwise."""
    from lmdistill.losses.divergences import canonical_divergence

    if objective.name != "kd":
        return None
    kd = objective.kd
    name, lam, beta = canonical_divergence(kd.divergence), kd.skew_lambda, kd.jsd_beta
    if name == "jsd":
        return name, -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    if name in ("skew_forward_kl", "skew_reverse_kl") and lam > 0:
        return name, -math.log(lam)  # the mixture holds at least lambda of the first distribution
    return (name, 1.0) if name == "tvd" else None


# -- the checks (pure functions of the windows they read; each returns its warning or None) --------------------
def overfitting(evals: list[list]) -> dict | None:
    """`evals`: [step, held-out CE, mean training loss since the previous evaluation] of the latest evaluations."""
    if len(evals) <= OVERFIT_EVALS:
        return None
    span = evals[-OVERFIT_EVALS - 1:]
    rising = all(b[1] > a[1] for a, b in zip(span, span[1:]))
    if not rising or not span[-1][2] < span[0][2]:
        return None
    (s0, ce0, l0), (s1, ce1, l1) = span[0][:3], span[-1][:3]
    return {"check": "overfitting", "eval_ce": [ce0, ce1], "train_loss": [l0, l1], "steps": [s0, s1],
            "message": f"held-out CE rose at {OVERFIT_EVALS} evaluations in a row ({ce0:.4f} at step {s0} -> "
                       f"{ce1:.4f} at step {s1}) while the training loss fell ({l0:.4f} -> {l1:.4f}): the model is "
                       "overfitting the training data. Try --keep_best (export the best evaluated model), "
                       "--early_stopping_patience K, fewer steps or epochs, more data, or more --weight_decay."}


def collapse(result: dict) -> dict | None:
    entropy, ce = result.get("entropy"), result.get("ce")
    if entropy is None or ce is None or not (entropy < COLLAPSE_ENTROPY and ce >= COLLAPSE_CE):
        return None
    return {"check": "collapse", "entropy": entropy, "eval_ce": ce,
            "message": f"the student's predictions have collapsed: on held-out trained positions it is nearly "
                       f"certain of each next token (mean entropy {entropy:.4f} nats) yet its CE is {ce:.4f} nats, so "
                       "it is confidently wrong. Try a lower --learning_rate, fewer steps (or --keep_best), more "
                       "data; when distilling with jsd or a skew divergence, --divergence forward_kl or --alpha > 0."}


def teacher_worse(result: dict) -> dict | None:
    teacher, student = result.get("teacher_ce"), result.get("ce")
    if teacher is None or student is None or not teacher > student:
        return None
    return {"check": "teacher_worse", "teacher_ce": teacher, "eval_ce": student,
            "message": f"the teacher is worse than the student on the held-out data (teacher CE {teacher:.4f} > "
                       f"student CE {student:.4f}): distilling further pulls the student toward the worse model. "
                       "Keep the better student (--keep_best), or distill from a better teacher (compare them "
                       "with `lmdistill eval --model STUDENT --teacher TEACHER`)."}


def kd_plateau(windows: list[float], divergence: str, bound: float, steps: int, alpha: float,
               last_eval: dict | None) -> dict | None:
    """`windows`: mean KD loss (the divergence alone) of consecutive windows of `steps` optimizer steps."""
    if len(windows) <= PLATEAU_WINDOWS:
        return None
    now, before = windows[-1], windows[-1 - PLATEAU_WINDOWS]
    if now < (1 - PLATEAU_DROP) * before or now < PLATEAU_SHARE * bound:
        return None
    seen = ""
    if last_eval and last_eval.get("agreement") is not None:
        seen = f"; on held-out data the student's top-1 agrees with the teacher's at {last_eval['agreement']:.1%}"
        if last_eval.get("teacher_ce") is not None:
            seen += f" and its CE is {last_eval['ce']:.4f} against the teacher's {last_eval['teacher_ce']:.4f}"
    alpha_note = f" (--alpha is {alpha:g} already: try more)" if alpha > 0 else ""
    return {"check": "kd_plateau", "divergence": divergence, "kd_loss": now, "kd_loss_before": before,
            "maximum": bound,
            "message": f"the KD loss ({divergence}) has stopped falling far above zero: {before:.4f} -> {now:.4f} "
                       f"over the last {PLATEAU_WINDOWS * steps} steps, {now / bound:.0%} of its maximum "
                       f"{bound:.3f}{seen}. From a random student, {BOUNDED_ADVICE}{alpha_note}."}


def gradients(medians: list[float], loss_now: float, loss_first: float) -> dict | None:
    """`medians`: median gradient norm of consecutive windows of GRAD_WINDOW steps, the current one last."""
    if len(medians) < 2:
        return None
    now, earlier = medians[-1], medians[:-1]
    if now > GRAD_EXPLODE * min(earlier) and min(earlier) > 0:
        return {"check": "grad_explode", "grad_norm": now, "smallest_before": min(earlier),
                "message": f"gradient norms are exploding: median {now:.4g} over the last {GRAD_WINDOW} steps, "
                           f"{now / min(earlier):.0f}x the smallest earlier median ({min(earlier):.4g}). Try a lower "
                           "--learning_rate, more --warmup_iters, or a smaller --grad_clip."}
    if now <= max(1e-8, GRAD_VANISH * max(earlier)) and loss_now > 0.5 * loss_first:
        return {"check": "grad_vanish", "grad_norm": now, "largest_before": max(earlier), "loss": loss_now,
                "message": f"gradient norms have vanished: median {now:.3g} over the last {GRAD_WINDOW} steps "
                           f"(largest earlier median {max(earlier):.3g}) while the training loss is still "
                           f"{loss_now:.4f} (first steps: {loss_first:.4f}): the model has stopped learning. Check "
                           "the model's initialization (all-zero or dead layers), --learning_rate and --dtype."}
    return None


# -- the run's watcher ---------------------------------------------------------------------------------------
@dataclass
class HealthState:
    """What `Health` keeps between steps, checkpointed (`as_dict`/`from_dict`: a plain dict of builtins)."""

    metric: str  # the metric --keep_best / early stopping follow
    best_value: float | None = None  # its best evaluated value, and the step of it
    best_step: int | None = None
    bad_evals: int = 0  # evaluations in a row without a gain of more than --early_stopping_min_delta
    stopped_at: int | None = None  # the step early stopping stopped the run at
    last_value_step: int | None = None  # the latest evaluation's value of the metric, and its step
    last_value: float | None = None
    last_eval: dict | None = None  # the latest evaluation's ce, agreement and teacher_ce
    # overfitting: [step, held-out CE, mean training loss since the previous evaluation] of the latest evaluations
    evals: list[list] = field(default_factory=list)
    since_eval_loss: float = 0.0  # training loss summed over the steps since the last evaluation, and their number
    since_eval_steps: int = 0
    # kd_plateau: KD loss summed over the current window's steps, their number, and the mean of each earlier window
    kd_loss_sum: float = 0.0
    kd_steps: int = 0
    kd_windows: list[float] = field(default_factory=list)
    # grad_explode / grad_vanish: the current window's gradient norms and losses, the median norm of each earlier
    # window, and the mean loss of the first window (what "the training loss is still high" compares with)
    grad_norms: list[float] = field(default_factory=list)
    grad_losses: list[float] = field(default_factory=list)
    grad_medians: list[float] = field(default_factory=list)
    grad_reference_loss: float | None = None
    warned: list[str] = field(default_factory=list)  # the checks that have warned (each warns once per run)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> "HealthState":
        """The state a checkpoint saved: this dict of named fields, or the dict of positional lists that
        checkpoints saved before (`since_eval`, `kd`, `grad`, `last_value` as [step, value])."""
        if any(k in state for k in ("since_eval", "kd", "grad")) or isinstance(state.get("last_value"), list):
            state = _named_fields(state)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


def _named_fields(old: dict) -> dict:
    """A state saved as positional lists, in `HealthState`'s named fields."""
    new = {k: v for k, v in old.items() if k not in ("since_eval", "kd", "grad", "last_value")}
    if "since_eval" in old:
        new["since_eval_loss"], new["since_eval_steps"] = old["since_eval"]
    if "kd" in old:
        new["kd_loss_sum"], new["kd_steps"], new["kd_windows"] = old["kd"]
    if "grad" in old:
        new["grad_norms"], new["grad_medians"], new["grad_losses"], new["grad_reference_loss"] = old["grad"]
    if old.get("last_value"):
        new["last_value_step"], new["last_value"] = old["last_value"]
    return new


class Health:
    """Best model, early stopping and warnings of one run (see the module docstring); `state` is checkpointed."""

    def __init__(self, plan, total_steps: int, distilling: bool, eval_teacher: bool):
        h = plan.health
        self.plan, self.keep_best = plan, h.keep_best is not None
        self.metric = h.keep_best or "ce"
        self.mode = direction(self.metric)
        self.patience, self.min_delta, self.strict = h.patience, h.min_delta, h.strict
        self.bound = kd_bound(plan.objective) if distilling else None
        self.kd_window = max(5, total_steps // 20)
        self.state = HealthState(self.metric)
        self.log = None  # the run's MetricsLogger, set by the loop
        if (self.keep_best or self.patience) and not eval_teacher and direction(self.metric) and (
                self.metric.startswith(("kl_to_teacher", "agreement"))):
            raise LmdistillError(f"--keep_best {self.metric}: this run's evaluations have no teacher scores (a teacher "
                                 "cache without --eval_data scores, or another vocabulary); choose ce, ppl or "
                                 "bits_per_byte.")

    @property
    def stopped(self) -> bool:
        return self.state.stopped_at is not None

    # -- checkpoints --
    def state_dict(self) -> dict:
        return self.state.as_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.state = HealthState.from_dict({"metric": None, **state})
        if self.state.metric != self.metric:  # --keep_best changed on resume: its record starts over
            st = self.state
            st.metric, st.best_value, st.best_step, st.bad_evals, st.stopped_at = self.metric, None, None, 0, None

    def protected(self, out) -> list:
        """The best checkpoint, which checkpoint rotation (--keep_checkpoints) must not delete."""
        step = self.state.best_step
        return [out / f"checkpoint-{step}"] if self.keep_best and step is not None else []

    # -- per step / per evaluation --
    def on_step(self, trainer, stats: dict) -> None:
        st = self.state
        st.since_eval_loss += stats["loss"]
        st.since_eval_steps += 1
        found = []
        if self.bound is not None and stats.get("kd_loss") is not None:
            st.kd_loss_sum, st.kd_steps = st.kd_loss_sum + stats["kd_loss"], st.kd_steps + 1
            if st.kd_steps == self.kd_window:
                st.kd_windows = (st.kd_windows + [st.kd_loss_sum / st.kd_steps])[-PLATEAU_WINDOWS - 1:]
                st.kd_loss_sum, st.kd_steps = 0.0, 0
                found.append(("kd_plateau", kd_plateau(st.kd_windows, self.bound[0], self.bound[1], self.kd_window,
                                                       self.plan.objective.kd.alpha, st.last_eval)))
        norm = stats.get("grad_norm")
        if norm is not None and not math.isnan(norm):
            norms, medians, losses = st.grad_norms, st.grad_medians, st.grad_losses
            norms.append(norm)
            losses.append(stats["loss"])
            if len(norms) == GRAD_WINDOW:
                loss = sum(losses) / len(losses)
                st.grad_reference_loss = loss if st.grad_reference_loss is None else st.grad_reference_loss
                medians.append(statistics.median(norms))
                del medians[:-50], norms[:], losses[:]
                check = gradients(medians, loss, st.grad_reference_loss)
                found.append((check["check"], check) if check else ("grad", None))
        self._warn(trainer, found)

    def on_eval(self, trainer, result: dict) -> bool:
        """Best model and early stopping after an evaluation (every process); returns True to stop the run."""
        result = _broadcast(trainer, result)
        st, step = self.state, trainer.global_step
        loss_sum, n = st.since_eval_loss, st.since_eval_steps
        st.since_eval_loss, st.since_eval_steps = 0.0, 0
        st.last_eval = {k: result.get(k) for k in ("ce", "agreement", "teacher_ce")}
        if "ce" in result and n:
            st.evals = (st.evals + [[step, result["ce"], loss_sum / n]])[-OVERFIT_EVALS - 1:]
        self._warn(trainer, [("overfitting", overfitting(st.evals)), ("collapse", collapse(result)),
                             ("teacher_worse", teacher_worse(result))])
        if not (self.keep_best or self.patience):
            return False
        value = result.get(self.metric)
        if value is None or math.isnan(value):
            return False
        best, sign = st.best_value, 1 if self.mode == "min" else -1
        improved = best is None or sign * (value - best) < 0
        st.bad_evals = 0 if best is None or sign * (value - best) < -self.min_delta else st.bad_evals + 1
        st.last_value_step, st.last_value = step, value
        if improved:
            st.best_value, st.best_step = value, step
        if self.patience and st.bad_evals >= self.patience:
            st.stopped_at = step
        if improved and self.keep_best:  # the checkpoint holds the state just updated: its best step is itself
            path = trainer.save_checkpoint()
            was = "first evaluation" if best is None else f"was {best:.4f}"
            self._event("best", step, {"metric": self.metric, "value": value, "previous": best,
                                       "checkpoint": f"checkpoint-{step}"},
                        f"best eval {self.metric} so far: {value:.4f} ({was}); saved {path.name if path else ''}")
        if st.stopped_at is None:
            return False
        text = (f"early stopping at step {step}: eval {self.metric} did not improve by more than {self.min_delta:g} "
                f"at {st.bad_evals} evaluations in a row (best {st.best_value:.4f} at step {st.best_step})")
        self._event("early_stop", step, {"metric": self.metric, "best_value": st.best_value,
                                         "best_step": st.best_step, "patience": self.patience,
                                         "min_delta": self.min_delta, "message": text}, text)
        return True

    def _warn(self, trainer, found: list) -> None:
        warned = self.state.warned
        for name, warning in found:
            if warning is None or name in warned:
                continue
            warned.append(name)
            step = trainer.global_step
            self._event("health", step, dict(warning), f"warning ({name}) at step {step}: {warning['message']}")
            if self.strict:
                path = trainer.save_checkpoint()
                raise LmdistillError(f"--strict_health: stopped after step {step}: {warning['message']} Saved "
                                     f"{path or 'a checkpoint'}; `--resume` continues past this warning (it is "
                                     "recorded in the checkpoint).")

    def _event(self, kind: str, step: int, fields: dict, text: str) -> None:
        if self.log is not None:
            self.log.event(kind, step, fields, text)

    # -- the end of the run --
    def export_best(self, trainer) -> None:
        """--keep_best: load the best checkpoint's weights into the model the loop is about to export (the last
        stays in its checkpoint folder); records which step was kept and why."""
        st, step = self.state, trainer.global_step
        if not self.keep_best or st.best_step is None:
            return
        best = st.best_step
        folder = trainer.out / f"checkpoint-{best}"
        last = st.last_value if st.last_value_step == step else None
        reason = f"best eval {self.metric} {st.best_value:.4f}, at step {best}"
        if best != step:
            from lmdistill.train import state as ckpt

            if not (folder / ckpt.STATE_FILE).is_file():
                text = (f"the best checkpoint {folder.name} is gone (deleted by hand, or behind an older --resume "
                        f"point); exported the last model (step {step}) instead")
                self._event("final", step, {"exported_step": step, "metric": self.metric, "message": text},
                            f"warning: {text}.")
                return
            ckpt.load_model_weights(trainer.acc.unwrap_model(trainer.model), folder)  # every process, as resume does
            reason += (f"; the last model (step {step}" + (f", {self.metric} {last:.4f}" if last is not None else "") +
                       f") stays in checkpoint-{step}")
        self._event("final", step, {"exported_step": best, "metric": self.metric, "value": st.best_value,
                                    "last_step": step, "message": reason},
                    f"--keep_best: the final model is step {best}'s ({reason}).")


def _broadcast(trainer, result: dict) -> dict:
    """The main process's eval result on every process (only the main one evaluates)."""
    if trainer.world == 1:
        return result
    from accelerate.utils import broadcast_object_list

    box = [result]
    broadcast_object_list(box, from_process=0)
    return box[0]
