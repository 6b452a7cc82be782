"""Evaluation: language-model metrics (perplexity, bits/byte, agreement with a teacher) and task accuracy.

    from lmdistill.eval import evaluate_lm, evaluate_task, load_task_records
    evaluate_lm(model, examples, tokenizer, teacher=teacher)            # ce, ppl, bits_per_byte, kl, agreement
    evaluate_task(model, tokenizer, load_task_records("test.jsonl"), task="rouge")   # accuracy + CI, rouge_l

LM metrics live in `lmdistill.train.evaluate`: the loop evaluates with them during training, and the training
layer imports nothing from this one. The modules here: `scoring` (normalization, Rouge-L, intervals; pure
Python), `tasks` (exact match / Rouge-L over records, generating with `lmdistill.models.generation`), `cli`
(`lmdistill eval`).
Names are imported on first use, so `lmdistill eval --help` does not wait for torch.
"""

from importlib import import_module

_EXPORTS = {
    "evaluate_lm": "train.evaluate", "shift_labels": "train.evaluate",
    "Reply": "models.generation", "generate_replies": "models.generation", "stop_token_ids": "models.generation",
    "extract_answer": "scoring", "normalize_answer": "scoring", "rouge_l": "scoring", "strip_think": "scoring",
    "wilson_interval": "scoring",
    "TASKS": "tasks", "evaluate_task": "tasks", "load_task_records": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmdistill.eval' has no attribute '{name}'")
    module = _EXPORTS[name]
    value = getattr(import_module(f"lmdistill.{module}" if "." in module else f"lmdistill.eval.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
