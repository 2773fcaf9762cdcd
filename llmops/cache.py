"""Content-addressed stage folders: an unchanged stage is reused, not recomputed.

A stage's folder is `work_dir/<stage>/<key>`, the key a hash of the stage's
config and of its inputs' folders (themselves keyed), so a change anywhere
upstream gives new keys downstream. A stage is built in a temporary folder and
renamed into place when complete: a crash leaves nothing that looks finished.

Two runs sharing a `work_dir` (two people pressing run, a scheduled run overlapping a manual one, two workers on
one volume) build a stage once: the builder holds `<key>.lock` (an OS file lock, released if its process dies);
the other waits for it, then finds the folder complete and reuses it.

A built folder records when it was built and the process's peak resident memory while it was (`.built.json`):
the lifecycle's MLflow runs show real durations, and bench/llm_lifecycle.py reads each stage's cost from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from pydantic import BaseModel

import llmops
from llmops.memory import PeakMemory
from llmops.ports import node_address

log = logging.getLogger(__name__)


def _jsonable(part: Any) -> Any:
    if isinstance(part, BaseModel):
        return part.model_dump(mode="json")
    if isinstance(part, Path):
        return str(part)
    return part


def stage_key(*parts: Any) -> str:
    """A short, stable hash of the parts (configs, paths, strings) and the llmops version."""
    payload = json.dumps([llmops.__version__, *map(_jsonable, parts)], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


BUILT = ".built.json"


@dataclass(frozen=True)
class Built:
    """When a stage folder was built (seconds since the epoch), and the process's peak memory meanwhile."""

    started: float
    finished: float
    peak_memory_mb: float | None = None
    """The resident set's high-water mark while building (the GPU allocator's peak on CUDA): `llmops.memory`."""
    host: str | None = None
    """Where: the Ray node's address on a cluster, else the host's name."""

    @classmethod
    def of(cls, folder: str | Path) -> Built | None:
        """The build times of `folder`, a stage folder (None for one built before llmops recorded them)."""
        record = Path(folder) / BUILT
        return cls(**json.loads(record.read_text())) if record.is_file() else None


def cached_stage(folder: Path, build: Callable[[Path], Any]) -> tuple[Path, bool]:
    """Run `build(tmp_folder)` unless `folder` is already complete; returns (folder, was_cached).

    One builder at a time per folder, across processes: a run that finds the stage being built waits for it."""
    if folder.is_dir():
        return folder, True
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder.with_name(folder.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        builder = folder.with_name(folder.name + ".partial") / ".builder"
        who = builder.read_text().strip() if builder.is_file() else "another process"
        log.warning(
            "stage %s/%s is being built by another run (%s): waiting for it", folder.parent.name, folder.name, who
        )
        lock.acquire()
    try:
        if folder.is_dir():  # the other run built it while this one waited
            return folder, True
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died: the lock says nobody builds it now
        tmp.mkdir()
        (tmp / ".builder").write_text(f"pid {os.getpid()}\n")
        started = time.time()
        try:
            with PeakMemory() as memory:
                build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / ".builder").unlink()
        built = Built(started, time.time(), memory.peak_mb(), node_address())
        (tmp / BUILT).write_text(json.dumps(dataclasses.asdict(built)))
        tmp.rename(folder)
        return folder, False
    finally:
        lock.release()
