"""Shared fixtures: local data from ../shared/data (skipped when absent) and tiny tokenizers/models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def data_store_cache(tmp_path_factory):
    """Tokenized stores (`lmdistill.data.store`) of this session go to a temporary folder, not ~/.cache; subprocesses
    inherit it through the environment."""
    import os

    folder = tmp_path_factory.mktemp("lmdistill_cache")
    previous = os.environ.get("LMDISTILL_CACHE")
    os.environ["LMDISTILL_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("LMDISTILL_CACHE", None)
    else:
        os.environ["LMDISTILL_CACHE"] = previous


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and OpenMP threads crawl when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_file(name: str) -> Path:
    """A file from ../shared/data, or skip the test when that folder is not on this machine."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data is optional)")
    return path


@pytest.fixture(scope="session")
def minimind_tokenizer_dir() -> Path:
    return shared_file("minimind_tokenizer")


@pytest.fixture(scope="session")
def minimind_tokenizer(minimind_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minimind_tokenizer_dir))


def _sentences(n: int, seed: int = 0) -> list[str]:
    """A small procedural English-like corpus (no files needed)."""
    import random

    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the teacher", "a student", "the king", "our queen"]
    verbs = ["sees", "likes", "follows", "writes to", "calls", "helps", "finds"]
    objects = ["the river", "a small house", "the old book", "a red apple", "the garden", "three birds"]
    return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A plain-text file of ~600 short sentences."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(_sentences(600)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> Path:
    """A MiniMind-format conversations JSONL of 40 two-turn dialogs."""
    import json

    s = _sentences(160, seed=1)
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(40):
            turns = [{"role": "user", "content": s[4 * i]}, {"role": "assistant", "content": s[4 * i + 1]},
                     {"role": "user", "content": s[4 * i + 2]}, {"role": "assistant", "content": s[4 * i + 3]}]
            f.write(json.dumps({"conversations": turns}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_corpus) -> Path:
    """A byte-level BPE (vocab 320) trained by the toolkit on the tiny corpus."""
    from lmdistill.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([tiny_corpus], vocab_size=320, output_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A random 'nano' teacher (hidden 48, 2 layers) saved as an HF folder with its tokenizer."""
    from transformers import AutoTokenizer

    from lmdistill.models import load_model

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    model = load_model("nano", tokenizer=tok, hidden_size=48, num_layers=2, verbose=False)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
