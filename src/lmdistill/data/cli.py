"""`lmdistill data`: what a data file becomes, i.e. exactly what the student will learn.

    lmdistill data --data train.jsonl --tokenizer my_tokenizer --max_seq_len 512 --show 3
    lmdistill data --data corpus.jsonl --tokenizer my_tokenizer --max_seq_len 2048 --prepare --num_proc 32

Prints the counts of `load_examples` (records, examples, truncated, dropped, bad, tokens, trained tokens) and
the first K examples decoded, trained spans marked: green on a terminal, between [[ and ]] otherwise. The data is
read through its tokenized store (`lmdistill.data.store`), built the first time; `--prepare` builds it ahead of
the runs that will read it (on a CPU node before GPU time, say) and prints where it is and how big.
"""

from __future__ import annotations

import argparse
import sys
import time

from lmdistill.data.loader import load_examples
from lmdistill.data.render import IGNORE_INDEX

OPEN, CLOSE = "[[", "]]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmdistill.config import int_at_least
    from lmdistill.data.options import add_data_arguments

    add_data_arguments(parser, "data file: .jsonl, .json, .parquet, .txt or a datasets folder")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer folder (e.g. one `lmdistill tokenizer` wrote)")
    parser.add_argument("--max_seq_len", type=int_at_least(2), default=512, help="examples are truncated to this many tokens")
    parser.add_argument("--show", type=int_at_least(0), default=3, metavar="K", help="how many rendered examples to print")
    parser.add_argument("--prepare", action="store_true",
                        help="build the tokenized store (if it is not built yet) and print its folder, size and counts")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lmdistill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    examples = load_examples(args.data, tokenizer, max_seq_len=args.max_seq_len, data_format=args.data_format,
                             skip_bad_records=args.skip_bad_records, num_proc=args.num_proc, cache_dir=args.data_cache)
    console = Console(file=sys.stdout, highlight=False)
    print(examples.stats.summary())
    if args.prepare:
        size = sum(p.stat().st_size for p in examples.folder.rglob("*") if p.is_file())
        print(f"store: {examples.folder} ({size / 2**20:,.1f} MiB, {len(examples):,} examples, "
              f"{examples.stats.tokens:,} tokens; ready in {time.perf_counter() - start:.1f} s). Every run with the "
              "same data file, tokenizer, --max_seq_len and format opens it instead of tokenizing.")
        return 0
    shown = examples[: max(args.show, 0)]
    if shown:
        legend = "in green" if console.is_terminal else f"between {OPEN} and {CLOSE}"
        print(f"\nTrained tokens are shown {legend}; everything else is context the student does not learn to produce.")
    for k, example in enumerate(shown):
        trained = sum(label != IGNORE_INDEX for label in example["labels"])
        print(f"\n--- example {k + 1} of {len(examples):,}: {len(example['input_ids'])} tokens, {trained} trained ---")
        show_example(console, tokenizer, example)
    return 0


def segments(tokenizer, example: dict) -> list[tuple[str, bool]]:
    """`[(text, trained), ...]`: runs of consecutive trained / untrained tokens, decoded."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example["input_ids"], example["labels"]):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return [(tokenizer.decode(ids, skip_special_tokens=False), trained) for ids, trained in runs]


def show_example(console, tokenizer, example: dict) -> None:
    """Print one example: rich styles on a terminal, brackets around trained spans otherwise."""
    from rich.text import Text

    parts = segments(tokenizer, example)
    if console.is_terminal:
        text = Text()
        for piece, trained in parts:
            text.append(piece, style="bold green" if trained else "dim")
        console.print(text, soft_wrap=True)
    else:
        print("".join(f"{OPEN}{piece}{CLOSE}" if trained else piece for piece, trained in parts))
