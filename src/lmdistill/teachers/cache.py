"""Offline teacher cache: the teacher's top-k next-token distribution at every trained position, on disk.

    lmdistill cache-teacher --teacher Qwen3-4B/ --data train.jsonl --output_dir cache/ --top_k 64
    lmdistill distill --teacher_cache cache/ --student Qwen3-0.6B/ --data train.jsonl --output_dir runs/kd

The teacher runs once over the data; every later distillation run (other students, seeds, losses, epochs)
reads the cache instead and never loads the teacher. For each trained position (labels != -100 after the
next-token shift, in the order the data loader produces them) the cache holds the teacher's k largest
logits at T=1 (`logits` [P, k] fp32), their token ids (`ids` [P, k] int32) and the log-normalizer over the
whole vocabulary (`lse` [P] fp32), so both kinds of top-k teacher in the loss contract are exact:
renormalized over the k tokens at any temperature, and the tail bucket (k tokens + the rest of the mass)
at T=1.

Layout: `cache.json` (what was cached, from what, and the shards), `tokenizer/`, `index.safetensors`
(`offsets` [n_examples + 1] into the positions, `fingerprint` [n_examples] of each example's tokens and
labels, so a run on other data or another `--max_seq_len` is refused) and `shard-NNNNN.safetensors` with
the rows of consecutive examples. The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from lmdistill.config import Repeated
from lmdistill.errors import LmdistillError, check_space, guarded_write
from lmdistill.losses.scores import TeacherScores
from lmdistill.teachers.base import Teacher
from lmdistill.teachers.registry import (FULL_VOCABULARY, HIDDEN_STATES, SCORES_NEW_TEXT, STEPS_TOKENS, BuildContext,
                                         TeacherKind, TeacherSpec, register_teacher_kind)

FORMAT = "lmdistill-teacher-cache"
VERSION = 1
META_FILE, INDEX_FILE = "cache.json", "index.safetensors"
EVAL_DIR = "eval"  # an optional second cache of held-out examples (`cache-teacher --eval_data`)
SHARD_POSITIONS = 1 << 18  # positions per shard file (~130 MB at k = 64)
LOGIT_CHUNK_BYTES = 128 * 2**20  # fp32 [rows, vocab] logits computed at once


def fingerprint(example: dict) -> int:
    """A 63-bit hash of an example's input_ids and labels (what the cache rows were computed from)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(torch.as_tensor(example["input_ids"], dtype=torch.int64).numpy().tobytes())
    h.update(torch.as_tensor(example["labels"], dtype=torch.int64).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def trained_positions(example: dict) -> int:
    """Positions trained after the next-token shift: labels[1:] != -100."""
    return sum(1 for x in example["labels"][1:] if x != -100)


@dataclass
class TopKTeacher(TeacherScores):
    """Top-k teacher rows for a set of trained positions: ids [n, k] (int64), logits [n, k] and lse [n]
    (fp32, at T=1), over a vocabulary of `vocab_size` real tokens."""

    ids: Tensor
    logits: Tensor
    lse: Tensor
    vocab_size: int

    @property
    def stored_k(self) -> int:
        return self.ids.shape[1]

    @property
    def n_rows(self) -> int:
        return self.ids.shape[0]

    def to(self, device) -> "TopKTeacher":
        return TopKTeacher(self.ids.to(device), self.logits.to(device), self.lse.to(device), self.vocab_size)

    def block(self, start: int, rows: Tensor, out: Tensor) -> Tensor:
        """TeacherScores: trained rows [start, start + len(rows)) as dense logits (see `dense_logits`)."""
        return self.dense_logits(start, start + len(rows), out)

    def dense_logits(self, start: int, end: int, out: Tensor) -> Tensor:
        """Rows [start, end) as dense logits in `out` [end - start, vocab_size]: the k logits in place and every
        other token at the value that spreads the teacher's remaining mass evenly over them, so that the
        log-normalizer over the vocabulary, hence the rest bucket's mass at T=1, is the teacher's own."""
        ids, logits, lse = self.ids[start:end], self.logits[start:end].to(out.dtype), self.lse[start:end].to(out.dtype)
        n_rest = self.vocab_size - self.stored_k
        if n_rest > 0:
            kept = torch.logsumexp(logits, -1)
            rest = lse + torch.log1p(-torch.exp(kept - lse).clamp(max=1.0))  # log of the mass outside the top-k
            out.copy_((rest - math.log(n_rest))[:, None].expand_as(out))
        else:
            out.fill_(-math.inf)
        return out.scatter_(1, ids, logits)


def read_meta(folder: str | Path) -> dict:
    """A cache folder's `cache.json`, checked (cheap: the rows are not read)."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise LmdistillError(f"--teacher_cache: expected a folder made by `lmdistill cache-teacher` (with "
                             f"{META_FILE}), found {'no such folder' if not folder.is_dir() else 'no ' + META_FILE} "
                             f"at '{folder}'.")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise LmdistillError(f"{meta_path}: invalid JSON ({exc}); the cache is damaged, rebuild it.") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise LmdistillError(f"{meta_path}: expected format {FORMAT} version {VERSION}, found "
                             f"{meta.get('format')} version {meta.get('version')}.")
    return meta


class TeacherCache:
    """A cache folder opened for reading: metadata, per-example offsets and fingerprints, rows on demand."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        self.meta = read_meta(folder)
        index = load_file(str(self.folder / INDEX_FILE))
        self.offsets, self.fingerprints = index["offsets"], index["fingerprint"]
        self.stored_k, self.vocab_size = int(self.meta["top_k"]), int(self.meta["vocab_size"])
        shards = [load_file(str(self.folder / s["file"])) for s in self.meta["shards"]]
        cat = lambda key: torch.cat([s[key] for s in shards]) if shards else torch.empty(0)  # noqa: E731
        self.ids, self.logits, self.lse = cat("ids"), cat("logits"), cat("lse")
        if self.ids.shape[0] != int(self.offsets[-1]):
            raise LmdistillError(f"{self.folder}: the shards hold {self.ids.shape[0]} positions but the index "
                                 f"expects {int(self.offsets[-1])}; the cache is incomplete, rebuild it.")

    def __len__(self) -> int:
        return len(self.fingerprints)

    def tokenizer_dir(self) -> Path:
        return self.folder / "tokenizer"

    def describe(self) -> str:
        m = self.meta
        return (f"data '{m['data']}' (format {m['data_format']}), --max_seq_len {m['max_seq_len']}, the tokenizer "
                f"in {self.tokenizer_dir()}")

    def check_examples(self, examples: Sequence[dict], what: str = "--data") -> None:
        """The run's examples must be the ones the cache was built from, in the same order."""
        if len(examples) != len(self):
            raise LmdistillError(f"{what}: the teacher cache '{self.folder}' holds {len(self)} examples but this run "
                                 f"has {len(examples)}. Use the data and options the cache was built with: "
                                 f"{self.describe()}.")
        for i, ex in enumerate(examples):
            if fingerprint(ex) != int(self.fingerprints[i]):
                raise LmdistillError(f"{what}: example {i} differs from the one the teacher cache '{self.folder}' was "
                                     f"built from (other text, tokenizer or --max_seq_len). Use the data and options "
                                     f"the cache was built with: {self.describe()}, or rebuild the cache.")

    def rows(self, example_indices: Sequence[int], loss_top_k: int | None = None) -> TopKTeacher:
        """The cached rows of these examples' trained positions, in the order the loss sees them (example by
        example, positions increasing); `loss_top_k` < the cache's stored k keeps the largest `loss_top_k` (exact)."""
        parts = [torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in example_indices]
        sel = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        ids, logits = self.ids[sel].long(), self.logits[sel]
        if loss_top_k is not None and loss_top_k < self.stored_k:
            logits, pos = logits.topk(loss_top_k, -1)
            ids = ids.gather(-1, pos)
        return TopKTeacher(ids, logits, self.lse[sel], self.vocab_size)


class CachedTeacher(Teacher):
    """The Teacher of `distill --teacher_cache DIR`: each micro-batch reads its examples' cached rows (the batch
    carries `example_index`); exact within the cache's top k. It can score only the examples it was built from."""

    offline = True

    def __init__(self, cache: TeacherCache, loss_top_k: int | None = None, name: str | None = None):
        self.cache, self.loss_top_k = cache, loss_top_k
        self.vocab_size, self.stored_k = cache.vocab_size, loss_top_k or cache.stored_k
        self.name = name or f"cache {cache.folder}"

    def score(self, batch) -> TopKTeacher:
        return self.cache.rows(batch.example_index, self.loss_top_k).to(batch.input_ids.device)

    def check_examples(self, examples) -> None:
        self.cache.check_examples(examples)

    def for_eval(self, examples) -> Teacher | None:
        """The cache's held-out part (`cache-teacher --eval_data`) when it holds exactly these examples."""
        folder = self.cache.folder / EVAL_DIR
        if not (folder / META_FILE).is_file():
            return None
        teacher = CachedTeacher(TeacherCache(folder), self.loss_top_k, name=f"{self.name} (eval)")
        try:
            teacher.check_examples(examples)
        except LmdistillError:
            return None
        return teacher


# -- building ----------------------------------------------------------------------------------------------
def _topk_rows(scores: TeacherScores, positions: Tensor, k: int, vocab: int):
    """Top-k logits, ids and logsumexp of a teacher's scores at `positions` (flat positions of the batch), in fp32,
    a bounded chunk of rows at a time."""
    rows = max(1, min(len(positions), LOGIT_CHUNK_BYTES // (vocab * 4)))
    buf = torch.empty(rows, vocab, device=positions.device)
    out_v, out_i, out_l = [torch.empty(0, k)], [torch.empty(0, k, dtype=torch.int32)], [torch.empty(0)]
    for s in range(0, len(positions), rows):
        r = positions[s : s + rows]
        z = scores.block(s, r, buf[: len(r)])
        v, i = z.topk(k, -1)
        out_v.append(v.cpu())
        out_i.append(i.to(torch.int32).cpu())
        out_l.append(torch.logsumexp(z, -1).cpu())
    return torch.cat(out_v), torch.cat(out_i), torch.cat(out_l)


def build_cache(teacher, tokenizer, examples: Sequence[dict], output_dir: str | Path, top_k: int, *,
                meta: dict[str, Any], batch_size: int = 8, device: str | torch.device = "cpu",
                vocab_size: int | None = None, progress: bool = True,
                eval_examples: Sequence[dict] | None = None) -> Path:
    """Run `teacher` (a Teacher that scores any text, or a frozen HF model) over `examples` and write the cache
    folder atomically; returns its path. With `eval_examples`, a second cache of them goes to `eval/` inside it,
    so that distillation runs from the cache can report KL and agreement to the teacher on held-out data.

    With `progress`, a bar on a terminal and a plain line per tenth of the examples elsewhere (logs, pipes)."""
    from lmdistill.teachers.online import OnlineTeacher

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise LmdistillError(f"--output_dir: expected a new or empty folder for the cache, found '{out}' with files "
                             "in it; choose another folder or delete it.")
    vocab = vocab_size or len(tokenizer)
    teacher = teacher if isinstance(teacher, Teacher) else OnlineTeacher(teacher, vocab, name="--teacher")
    if teacher.offline:
        raise LmdistillError(f"{teacher.name} can score only the examples it was built from, not new data.")
    if not 1 <= top_k <= vocab:
        raise LmdistillError(f"--top_k: expected an integer in [1, {vocab}] (the vocabulary), found {top_k}.")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    positions = sum(trained_positions(ex) for ex in [*examples, *(eval_examples or [])])
    advice = "Free space or choose another --output_dir, then run the same command again."
    check_space(out.parent, positions * (8 * top_k + 4) + 2**20, "the teacher cache", "no cache was written", advice)
    try:
        with guarded_write(tmp, "the teacher cache", out.parent, "no cache folder was left behind", advice):
            options = dict(top_k=top_k, vocab=vocab, batch_size=batch_size, device=device, progress=progress)
            _write_cache(teacher, tokenizer, examples, tmp, meta=meta, **options)
            if eval_examples is not None:
                _write_cache(teacher, tokenizer, eval_examples, tmp / EVAL_DIR, meta={**meta, "part": "eval"},
                             **options)
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_cache(teacher: Teacher, tokenizer, examples: Sequence[dict], folder: Path, *, meta: dict[str, Any],
                 top_k: int, vocab: int, batch_size: int, device, progress: bool) -> None:
    """The shards, index, tokenizer and cache.json of `examples` in `folder` (not atomic: build_cache is)."""
    from safetensors.torch import save_file

    from lmdistill.data import pad_batch, shift_labels
    from lmdistill.data.batch import Batch
    from lmdistill.progress import Progress

    folder.mkdir(parents=True)
    offsets, prints, shards = [0], [], []
    buf: dict[str, list[Tensor]] = {"ids": [], "logits": [], "lse": []}
    first_example = 0

    def flush(upto: int) -> None:
        nonlocal first_example
        if not buf["ids"]:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in buf.items()}
        save_file(tensors, str(folder / name))
        shards.append({"file": name, "first_example": first_example, "examples": upto - first_example,
                       "positions": tensors["ids"].shape[0]})
        first_example = upto
        for v in buf.values():
            v.clear()

    bar = Progress(len(examples), "cache-teacher", "examples", enabled=progress)
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch_ex = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
            batch = Batch.of(pad_batch(batch_ex, tokenizer.pad_token_id), device, list(range(start, start + len(batch_ex))))
            positions = (shift_labels(batch.labels).reshape(-1) != -100).nonzero().squeeze(1)
            v, i, lse = _topk_rows(teacher.score(batch), positions, top_k, vocab)
            buf["logits"].append(v)
            buf["ids"].append(i)
            buf["lse"].append(lse)
            for ex in batch_ex:
                offsets.append(offsets[-1] + trained_positions(ex))
                prints.append(fingerprint(ex))
            if sum(t.shape[0] for t in buf["ids"]) >= SHARD_POSITIONS:
                flush(start + len(batch_ex))
            bar.update(len(batch_ex), note=f"{offsets[-1]:,} positions")
    bar.close()
    flush(len(examples))
    save_file({"offsets": torch.tensor(offsets, dtype=torch.int64),
               "fingerprint": torch.tensor(prints, dtype=torch.int64)}, str(folder / INDEX_FILE))
    tokenizer.save_pretrained(folder / "tokenizer")
    info = {"format": FORMAT, "version": VERSION, **meta, "top_k": top_k, "vocab_size": vocab,
            "examples": len(examples), "positions": offsets[-1], "temperature_of_lse": 1.0, "shards": shards}
    (folder / META_FILE).write_text(json.dumps(info, indent=2))


@register_teacher_kind
class CachedKind(TeacherKind):
    """`--teacher_cache DIR` (repeatable): the offline top-k cache of `lmdistill cache-teacher`."""

    name = "cached"
    lacks = {
        SCORES_NEW_TEXT: "a teacher cache holds scores of the dataset's replies only and cannot score replies the "
                         "student writes",
        STEPS_TOKENS: "a teacher cache cannot score the replies the student samples",
        HIDDEN_STATES: "a teacher cache holds no hidden states (only its top-k logits)",
    }

    @staticmethod
    def declare(add) -> None:
        add("--teacher_cache", action=Repeated, default=None, metavar="DIR",
            help="a folder made by `lmdistill cache-teacher`, read instead of running a teacher; repeat for an "
                 "ensemble")

    @classmethod
    def specs(cls, values) -> list[TeacherSpec]:
        return [TeacherSpec(cls.name, str(c), "--teacher_cache") for c in values["teacher_cache"] or []]

    @classmethod
    def capabilities_for(cls, spec: TeacherSpec) -> frozenset[str]:
        if not (Path(spec.ref) / META_FILE).is_file():  # not a cache: its own check says so, after the options'
            return frozenset()
        meta = read_meta(spec.ref)
        return frozenset({FULL_VOCABULARY}) if int(meta["top_k"]) >= int(meta["vocab_size"]) else frozenset()

    @classmethod
    def why_lacks(cls, spec: TeacherSpec, capability: str) -> str | None:
        if capability != FULL_VOCABULARY:
            return super().why_lacks(spec, capability)
        meta = read_meta(spec.ref)
        return (f"--teacher_cache '{spec.ref}' holds only the top {int(meta['top_k'])} of "
                f"{int(meta['vocab_size']):,} tokens per position: an ensemble needs every logit of each member (the "
                f"ids a cache did not keep have none). Cache the whole vocabulary (`cache-teacher --top_k "
                f"{int(meta['vocab_size'])}`) or use online teachers.")

    @classmethod
    def check(cls, spec: TeacherSpec, values) -> None:
        from lmdistill.losses.divergences import NEEDS_TAIL_BUCKET, canonical_divergence

        meta = read_meta(spec.ref)
        k, top_k = int(meta["top_k"]), values["top_k"]
        if top_k is not None and top_k > k:
            raise LmdistillError(f"--top_k: the teacher cache '{spec.ref}' holds the top {k} tokens per position; "
                                 f"expected --top_k <= {k}, found {top_k}.")
        start, end = values["temperature"], values["temperature_end"]
        temperatures = {start, start if end is None else end}
        if (canonical_divergence(values["divergence"]) in NEEDS_TAIL_BUCKET and temperatures != {1.0}
                and (top_k or k) < int(meta["vocab_size"])):
            raise LmdistillError(f"--divergence {values['divergence']} with --teacher_cache needs --temperature 1 and "
                                 f"no --temperature_end (found {start} -> {end}): the cache knows the teacher's "
                                 "remaining mass only at T=1.")

    @classmethod
    def tokenizer_dir(cls, spec: TeacherSpec) -> str | None:
        return str(Path(spec.ref) / "tokenizer")

    @classmethod
    def shape(cls, spec: TeacherSpec, ctx: BuildContext) -> list:
        from lmdistill.models.shapes import TeacherShape

        meta = read_meta(spec.ref)
        size = sum((Path(spec.ref) / s["file"]).stat().st_size for s in meta["shards"])
        return [TeacherShape(spec.ref, cache_bytes=size, rows_k=ctx.loss_top_k or int(meta["top_k"]))]

    @classmethod
    def build(cls, spec: TeacherSpec, ctx: BuildContext) -> CachedTeacher:
        return CachedTeacher(TeacherCache(spec.ref), ctx.loss_top_k, name=spec.label)
