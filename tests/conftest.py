"""Shared fixtures: local data from ../shared/data (skipped when absent) and tiny tokenizers/models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


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
