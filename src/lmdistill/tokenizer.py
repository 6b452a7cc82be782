"""`lmdistill tokenizer`: train a byte-level BPE tokenizer (MiniMind-style) and load tokenizers.

    lmdistill tokenizer --data train.jsonl more.txt --vocab_size 6400 --output_dir my_tokenizer

The result is an HF tokenizer folder (`AutoTokenizer.from_pretrained` loads it) laid out like MiniMind's:
`<|endoftext|>` (id 0: pad and unk), `<|im_start|>` (1: bos), `<|im_end|>` (2: eos, so generation stops
at the end of an assistant turn), `<think>` and `</think>` (3, 4: single tokens, not special, so decoding
keeps them), then the byte alphabet and the learned merges; no BOS/EOS is added when encoding. The chat
template is plain ChatML; an assistant turn with `reasoning_content` gets `<think>\\n...\\n</think>\\n\\n`
before its content, as in MiniMind's template (but no empty think block when there is no reasoning).
It trains on the text of any data format `lmdistill.data` reads (message contents, documents).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Sequence

from lmdistill.errors import LmdistillError

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_TOKENS = ("<think>", "</think>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *THINK_TOKENS)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens


def train_tokenizer(files: Sequence[str | Path] = (), vocab_size: int = 6400, output_dir: str | Path | None = None,
                    *, texts: Iterable[str] | None = None, data_format: str = "auto",
                    skip_bad_records: bool = False):
    """Train a byte-level BPE on the text of `files` (any `lmdistill.data` format) and/or `texts` (strings).

    Returns a `PreTrainedTokenizerFast` with the chat template and pad/bos/eos set; saved to `output_dir` when
    given. The vocabulary has `vocab_size` entries, or fewer when the corpus offers fewer merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise LmdistillError(f"vocab_size must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special "
                             f"tokens), found {vocab_size}.")
    corpus, seen = _corpus(files, texts, data_format, skip_bad_records), [0]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_counted(corpus, seen), trainer=trainer)
    if not seen[0]:
        raise LmdistillError("no text to train the tokenizer on: the data files and texts are empty.")
    fast = _wrap(_unspecial(tokenizer, THINK_TOKENS))
    if output_dir is not None:
        _save(fast, Path(output_dir))
    return fast


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(path: str | Path | None) -> bool:
    """Whether `path` is a folder holding tokenizer files (a model folder saved with its tokenizer does)."""
    return path is not None and Path(path).is_dir() and any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, flag: str = "--tokenizer", pad_to_eos: bool = True):
    """`AutoTokenizer.from_pretrained` on a local folder, with a user-facing error naming `flag` when it cannot.
    A tokenizer without a pad token pads with its eos token (pads are never trained)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise LmdistillError(f"{flag}: expected a tokenizer folder (tokenizer.json, tokenizer_config.json), "
                             f"found {'a file' if path.exists() else 'no folder'} at '{path}'.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # OSError, ValueError, json errors...: all mean "not a usable tokenizer folder"
        raise LmdistillError(f"{flag}: '{path}' is not a loadable HF tokenizer folder: {exc}") from None
    if pad_to_eos and tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def vocabulary_difference(a, b) -> str | None:
    """None when two tokenizers map the same tokens to the same ids (special tokens marked alike), else a short
    description of how they differ. Which token is eos/pad may differ (base vs instruct models share a vocabulary)."""
    va, vb = a.get_vocab(), b.get_vocab()
    special = lambda t: {i: tok.special for i, tok in t.added_tokens_decoder.items()}  # noqa: E731
    if va == vb and special(a) == special(b):
        return None
    if va != vb:
        ia, ib = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
        differ = sorted(i for i in set(ia) | set(ib) if ia.get(i) != ib.get(i))
        first = differ[0]
        return (f"{len(va):,} vs {len(vb):,} tokens, {len(differ):,} ids mapped differently (e.g. id {first}: "
                f"{ia.get(first)!r} vs {ib.get(first)!r})")
    which = sorted(i for i in set(special(a)) | set(special(b)) if special(a).get(i) != special(b).get(i))
    return f"the same tokens, but {len(which)} differ in being special (e.g. id {which[0]})"


def _corpus(files: Sequence[str | Path], texts: Iterable[str] | None, data_format: str,
            skip_bad_records: bool) -> Iterable[str]:
    from lmdistill.data import iter_texts

    if isinstance(files, (str, Path)):
        files = [files]
    for path in files:
        yield from iter_texts(path, data_format=data_format, skip_bad_records=skip_bad_records)
    for text in texts or ():
        if not isinstance(text, str):
            raise LmdistillError(f"texts: expected strings, found {type(text).__name__}.")
        yield text


def _counted(texts: Iterable[str], seen: list[int]) -> Iterable[str]:
    for text in texts:
        seen[0] += len(text)
        yield text


def _unspecial(tokenizer, contents: Sequence[str]):
    """The tokenizer with `contents` as ordinary added tokens: still matched whole, kept when decoding."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    for token in state["added_tokens"]:
        if token["content"] in contents:
            token["special"] = False
    return Tokenizer.from_str(json.dumps(state))


def _wrap(tokenizer):
    from transformers import PreTrainedTokenizerFast

    from lmdistill.data.render import CHATML_TEMPLATE

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD,
        chat_template=CHATML_TEMPLATE, clean_up_tokenization_spaces=False, add_bos_token=False,
        add_eos_token=False,
    )


def _save(tokenizer, output_dir: Path) -> None:
    """save_pretrained, naming the class every transformers version knows (5.x maps it to its fast backend)."""
    tokenizer.save_pretrained(str(output_dir))
    config_path = output_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmdistill.config import int_at_least
    from lmdistill.data.options import add_data_arguments

    add_data_arguments(parser, "data files in any format `lmdistill data` reads (.jsonl .json .parquet .txt, "
                               "datasets folder)", several=True, store=False)
    parser.add_argument("--vocab_size", type=int_at_least(MIN_VOCAB), default=6400,
                        help="vocabulary size, special tokens and the 256 bytes included")
    parser.add_argument("--output_dir", required=True, help="folder to write the HF tokenizer to")


def run(args: argparse.Namespace) -> int:
    from lmdistill.data import check_data_path

    for path in args.data:
        check_data_path(path, "--data")
    tokenizer = train_tokenizer(args.data, args.vocab_size, args.output_dir, data_format=args.data_format,
                                skip_bad_records=args.skip_bad_records)
    size = len(tokenizer)
    note = "" if size == args.vocab_size else f" (requested {args.vocab_size}: the corpus offers fewer merges)"
    print(f"Trained a byte-level BPE tokenizer with {size:,} tokens{note} on {len(args.data)} file(s); "
          f"saved to {args.output_dir}. Load it with AutoTokenizer.from_pretrained('{args.output_dir}').")
    return 0
