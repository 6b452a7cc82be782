"""The identity of a data file (or a saved `datasets` folder): its size and a checksum of its bytes.

Checkpoints record it, so `--resume` can tell that the data changed under a run (same path, other records): the
example order is a function of (seed, step, number of examples), and over other data the run would not continue
the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 20


def data_fingerprint(path: str | Path) -> dict:
    """{"path", "bytes", "blake2b"} of a file, or of every file under a folder (names and bytes, in sorted order)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h, total = hashlib.blake2b(digest_size=16), 0
    for f in files:
        if root.is_dir():
            h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(BLOCK), b""):
                h.update(block)
                total += len(block)
    return {"path": str(path), "bytes": total, "blake2b": h.hexdigest()}


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
