"""Prepared data, for every task: the Parquet splits one data stage wrote and `data.json` beside them (labels,
a content fingerprint, rows per split). Every later stage reads its rows through `PreparedData`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """The data cannot be used; the message says what is wrong and where."""


@dataclass(frozen=True)
class PreparedData:
    """Where the splits of one data preparation live, and what they hold."""

    directory: Path
    labels: list[str]
    fingerprint: str

    def split_path(self, split: str) -> Path:
        return self.directory / f"{split}.parquet"

    @classmethod
    def load(cls, directory: str | Path) -> PreparedData:
        directory = Path(directory)
        meta = json.loads((directory / "data.json").read_text())
        return cls(directory, meta["labels"], meta["fingerprint"])


def fingerprint(frames: dict[str, pd.DataFrame]) -> str:
    """A content hash of the splits: same rows in the same order give the same value."""
    digest = hashlib.sha256()
    for name in sorted(frames):
        digest.update(name.encode())
        digest.update(pd.util.hash_pandas_object(frames[name], index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def write_prepared(frames: dict[str, pd.DataFrame], labels: list[str], out_dir: str | Path) -> PreparedData:
    """Parquet splits plus `data.json` (labels, fingerprint, rows per split) under `out_dir`; any task."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        frame.to_parquet(out / f"{name}.parquet", index=False)
    prepared = PreparedData(out, labels, fingerprint(frames))
    summary = {name: len(frame) for name, frame in frames.items()}
    (out / "data.json").write_text(
        json.dumps({"labels": labels, "fingerprint": prepared.fingerprint, "rows": summary}, indent=2)
    )
    return prepared
