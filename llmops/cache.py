"""Content-addressed stage folders: an unchanged stage is reused, not recomputed.

A stage's folder is `work_dir/<stage>/<key>`, the key a hash of the stage's
config and of its inputs' folders (themselves keyed), so a change anywhere
upstream gives new keys downstream. A stage is built in a temporary folder and
renamed into place when complete: a crash leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import llmops


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


def cached_stage(folder: Path, build: Callable[[Path], Any]) -> tuple[Path, bool]:
    """Run `build(tmp_folder)` unless `folder` is already complete; returns (folder, was_cached)."""
    if folder.is_dir():
        return folder, True
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(folder)
    return folder, False
