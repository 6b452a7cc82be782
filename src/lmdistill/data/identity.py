"""The identity of a data file (or a saved `datasets` folder): its size and a checksum of its bytes, whole up to
FULL_HASH_BYTES, else SAMPLE_BLOCKS evenly spaced blocks plus the end (a corpus of gigabytes is not read again at
every start).

Checkpoints record it, so `--resume` can tell that the data changed under a run (same path, other records): the
example order is a function of (seed, step, number of examples), and over other data the run would not continue
the same way. The tokenized store (`lmdistill.data.store`) keys on it too, with the files' modification times.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FULL_HASH_BYTES = 64 * 2**20
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 64 * 2**10


def file_digest(path: str | Path, with_mtime: bool = False) -> dict:
    """{"bytes", "blake2b"} of a file, or of every file under a folder (names and bytes, in sorted order)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h, total = hashlib.blake2b(digest_size=16), 0
    for f in files:
        st = f.stat()
        total += st.st_size
        name = f.relative_to(root) if root.is_dir() else ""
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns if with_mtime else ''}".encode())
        with open(f, "rb") as stream:
            if st.st_size <= FULL_HASH_BYTES:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    h.update(block)
                continue
            step = (st.st_size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
            for k in range(SAMPLE_BLOCKS):
                stream.seek(k * step)
                h.update(stream.read(SAMPLE_BYTES))
            stream.seek(st.st_size - SAMPLE_BYTES)
            h.update(stream.read(SAMPLE_BYTES))
    return {"bytes": total, "blake2b": h.hexdigest()}


def data_fingerprint(path: str | Path) -> dict:
    """{"path", "bytes", "blake2b"}: what a checkpoint records of its training data."""
    return {"path": str(path), **file_digest(path)}


def describe_change(old: dict, new: dict) -> str | None:
    """What changed between two fingerprints of the same data option, in words; None when nothing did."""
    if old.get("blake2b") == new.get("blake2b") and old.get("bytes") == new.get("bytes"):
        return None
    parts = []
    if old.get("bytes") != new.get("bytes"):
        parts.append(f"{old.get('bytes', 0):,} -> {new.get('bytes', 0):,} bytes")
    parts.append(f"content checksum {str(old.get('blake2b'))[:12]} -> {str(new.get('blake2b'))[:12]}")
    if old.get("examples") is not None:
        parts.append(f"the checkpoint was trained on its {old['examples']:,} examples")
    return ", ".join(parts)
