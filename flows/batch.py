"""The `batch` flow: a registered model scores a dataset (`llmops batch-predict` as a Prefect deployment).

    prefect deployment run 'batch/score' --param model=models:/tweet-sentiment@champion \
        --param input=data/tweets.parquet --param output=scored/tweets

On the Ray cluster at `ray_address` (or $RAY_ADDRESS) when one is given, in the worker's process otherwise. A flow
run that fails or is cancelled midway is finished by running it again with the same parameters: blocks already
written are kept (llmops.batch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from llmops.batch import BatchJob, run_batch
from llmops.config import load_config
from llmops.registry import resolve_tracking_uri


@flow(name="batch", log_prints=True)
def batch(
    model: str,
    input: str,
    output: str,
    config: str = "configs/quickstart.yaml",
    overrides: list[str] | None = None,
    column: str | None = None,
    keep: list[str] | None = None,
    block_rows: int = 10_000,
    ray_address: str | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    """Score `input` with `model` into `output`; the registry is the config's."""
    cfg = load_config(config, overrides)
    job = BatchJob(model, Path(input), Path(output), column=column, keep=tuple(keep or ()), block_rows=block_rows)
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    summary = run_batch(job, resolve_tracking_uri(cfg.registry), address, workers, progress=False)
    get_run_logger().info(
        "%s version %s: %d rows scored, %d rejected, in %d blocks (%d resumed) -> %s",
        summary.model,
        summary.version,
        summary.scored,
        summary.rejected,
        summary.blocks,
        summary.resumed_blocks,
        summary.predictions,
    )
    return {
        "model": summary.model,
        "version": summary.version,
        "fingerprint": summary.fingerprint,
        "rows": summary.rows,
        "scored": summary.scored,
        "rejected": summary.rejected,
        "predictions": str(summary.predictions),
        "rejects": str(summary.rejects),
        "nodes": summary.nodes,
    }
