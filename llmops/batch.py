"""Batch inference: a registered classifier or generator scores a dataset of any size, block by block.

    job = BatchJob(model="models:/tweet-sentiment@champion", input=Path("tweets.csv"), output=Path("scored"))
    summary = run_batch(job, tracking_uri)                 # in this process
    summary = run_batch(job, tracking_uri, ray_address="auto", workers=2)   # on a Ray cluster

The input (CSV, JSONL or Parquet) is read once, streaming, into blocks of `block_rows` rows under
`OUTPUT/.blocks/`; each block is then scored on its own and written as `OUTPUT/predictions/part-NNNNN.parquet`
(and its refused rows as `OUTPUT/rejects/part-NNNNN.parquet`), each file renamed into place when whole. A block is
the unit of work and of resumption: a job started again on the same input, model version and settings scores only
the blocks with no predictions file, and a block scored twice (a retried task on a Ray cluster) rewrites the same
file, so no row is ever written twice. `OUTPUT/manifest.json` says which job the folder belongs to; another job's
folder is refused, not mixed.

On a Ray cluster the blocks are scored by a Ray Data actor pool: each actor loads the model once and scores whole
blocks, texts ordered by length inside a block (less padding). Every node must see OUTPUT (a shared path): the
actors read the staged blocks and write the parts there themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmops.ports import node_address

FORMATS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
MANIFEST = "manifest.json"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
"""`models:/NAME@ALIAS` (resolved to a version once, when the job starts) or `models:/NAME/VERSION`."""
CLASSIFIER_COLUMNS = ("text",)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar: the blocks
GENERATOR_COLUMNS = ("prompt", "messages")


class BatchError(ValueError):
    """A batch job that cannot start or go on: said plainly, with what to do."""


@dataclass(frozen=True)
class BatchJob:
    model: str
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    input: Path
    output: Path
    column: str | None = None
    """The input column to score. Default: `text` for a classifier; `prompt` or `messages` for a generator."""
    keep: tuple[str, ...] = ()
    """Input columns copied into the predictions beside `row_id` (an id of your own, say)."""
    block_rows: int = 10_000
    batch_size: int = 64
    max_chars: int = 2000
    """A text longer than this is refused (a reject), as `serve.max_text_chars` with `over_length: reject`."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None

    def settings(self) -> dict[str, Any]:
        """What decides the predictions, beside the model version and the input: a folder written under other
        settings is another job's."""
        return {k: v for k, v in asdict(self).items() if k not in ("model", "input", "output", "batch_size")} | {
            "keep": list(self.keep)
        }


@dataclass
class Summary:
    output: Path
    model: str
    version: str
    fingerprint: str
    blocks: int
    rows: int = 0
    scored: int = 0
    rejected: int = 0
    resumed_blocks: int = 0
    """Blocks already written by an earlier, interrupted run of the same job (not scored again)."""
    nodes: dict[str, int] = field(default_factory=dict)
    """Blocks scored by each node (host name, or the Ray node's address)."""

    @property
    def predictions(self) -> Path:
        return self.output / "predictions"

    @property
    def rejects(self) -> Path:
        return self.output / "rejects"


# ---------------------------------------------------------------------------------------------------------------
# The input: a fingerprint, then blocks


def input_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BatchError(f"{path}: unknown format '{path.suffix}'; give a .csv, .jsonl (or .json) or .parquet file")
    return fmt


def fingerprint(path: Path) -> str:
    """sha256 of the input's bytes, streamed (any size)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _record_batches(path: Path, fmt: str, text_columns: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    """The file as record batches, streaming; the text column read as text whatever its values look like."""
    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=65_536)
    elif fmt == "csv":
        from pyarrow import csv

        types = {c: pa.string() for c in text_columns}
        yield from csv.open_csv(path, convert_options=csv.ConvertOptions(column_types=types))
    else:
        for chunk in pd.read_json(path, lines=True, chunksize=65_536, dtype=False):
            for column in text_columns:  # a chat (a list) kept as JSON text: a column may mix it with strings
                if column in chunk:
                    chunk[column] = chunk[column].map(_json_unless_text)
            yield pa.RecordBatch.from_pandas(chunk, preserve_index=False)


def _json_unless_text(value: Any) -> Any:
    return value if _missing(value) or isinstance(value, str) else json.dumps(value)


def _missing(value: Any) -> bool:
    """An empty cell: None, or NaN as pandas reads one."""
    return value is None or (isinstance(value, float) and value != value)


def stage_blocks(path: Path, fmt: str, text_columns: tuple[str, ...], block_rows: int, into: Path) -> int:
    """The input split into Parquet files of `block_rows` rows (`row_id` added), written under `into`; returns
    how many. Reading streams: memory holds one block."""
    into.mkdir(parents=True, exist_ok=True)
    pending: list[pa.RecordBatch] = []
    held, first_row, blocks = 0, 0, 0

    def flush(rows: int) -> None:
        nonlocal pending, held, first_row, blocks
        table = pa.Table.from_batches(pending).combine_chunks()
        block, rest = table.slice(0, rows), table.slice(rows)
        block = block.append_column("row_id", pa.array(range(first_row, first_row + block.num_rows), pa.int64()))
        _write_atomically(block, into / f"block-{blocks:05d}.parquet")
        blocks, first_row = blocks + 1, first_row + block.num_rows
        pending, held = rest.to_batches(), rest.num_rows

    try:
        for batch in _record_batches(path, fmt, text_columns):
            pending.append(batch)
            held += batch.num_rows
            while held >= block_rows:
                flush(block_rows)
        if held:
            flush(held)
    except (pa.ArrowInvalid, ValueError, UnicodeDecodeError) as error:
        raise BatchError(f"{path}: cannot be read as {fmt}: {error}") from None
    return blocks


def block_file(output: Path, block: int) -> Path:
    return output / ".blocks" / f"block-{block:05d}.parquet"


def part_file(output: Path, kind: str, block: int) -> Path:
    return output / kind / f"part-{block:05d}.parquet"


def _write_atomically(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The model: one version, loaded once per process (or per Ray actor)


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    tracking_uri: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def resolve_model(model: str, tracking_uri: str) -> ModelRef:
    """`models:/NAME@ALIAS` pinned to the version the alias names now: a promotion during the job changes
    nothing in it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    match = MODEL_URI.match(model)
    if match is None:
        raise BatchError(f"--model '{model}': give models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias).version if alias else version
        client.get_model_version(name, str(version))
    except MlflowException as error:
        raise BatchError(f"{model} is not in the registry at {tracking_uri}: {error.message}") from None
    return ModelRef(name, str(version), tracking_uri)


class BlockScorer:
    """One loaded model that scores whole blocks: the unit of work in-process and of a Ray Data actor."""

    def __init__(self, ref: ModelRef, job: BatchJob, text_column: str, threads: int | None = None):
        from llmops.candidate_folder import CandidateMeta
        from llmops.registry import fetch_version

        if not (job.output / MANIFEST).is_file():
            raise BatchError(
                f"{job.output} is not visible on {socket.gethostname()}: the output folder must be on storage every "
                "node of the cluster sees (a shared path)"
            )
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.job, self.text_column = job, text_column
        self.version = ref.version
        self.fingerprint = json.loads((job.output / MANIFEST).read_text())["fingerprint"]
        folder = fetch_version(ref.tracking_uri, ref.name, ref.version, job.output / ".models")
        self.meta = CandidateMeta.load(folder)
        self.generative = self.meta.task != "sequence-classification"
        self.model: Any
        if self.generative:
            from llmops.generation.loading import load_generator

            self.model = load_generator(folder)
        else:
            from llmops.classification.candidate import Classifier

            self.model = Classifier(folder)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        """Ray Data's entry: a batch of block numbers in, one result row per block out."""
        results = [self.score(int(block)) for block in batch["block"]]
        return {key: [r[key] for r in results] for key in ("block", "rows", "scored", "rejected", "node")}

    def score(self, block: int) -> dict[str, Any]:
        """Score block `block` and write its predictions and rejects (rejects first: a block is done once its
        predictions file exists)."""
        frame = pq.read_table(block_file(self.job.output, block)).to_pandas()
        reasons = [self.refusal(value) for value in frame[self.text_column]]
        refused = pd.Series([r is not None for r in reasons], index=frame.index)
        rejects = pd.DataFrame(  # the refused text kept as written (a chat as JSON), to fix and score again
            {
                "row_id": frame.loc[refused, "row_id"].to_numpy(),
                "reason": [r for r in reasons if r is not None],
                self.text_column: frame.loc[refused, self.text_column].map(_as_text).to_numpy(),
            }
        )
        accepted = frame.loc[~refused].reset_index(drop=True)
        predictions = self.predict(accepted[self.text_column].tolist())
        out = pd.concat([accepted[["row_id", *self.job.keep]], predictions], axis=1)
        out.insert(1, "model_version", self.version)
        out.insert(2, "input_fingerprint", self.fingerprint)
        node = node_address()  # also in the files' metadata: which node scored the block
        stamp = {b"llmops.node": node.encode(), b"llmops.model_version": self.version.encode()}
        for kind, table in (("rejects", rejects), ("predictions", out)):
            arrow = pa.Table.from_pandas(table, preserve_index=False)
            _write_atomically(
                arrow.replace_schema_metadata(arrow.schema.metadata | stamp), part_file(self.job.output, kind, block)
            )
        return {"block": block, "rows": len(frame), "scored": len(out), "rejected": len(rejects), "node": node}

    def refusal(self, value: Any) -> str | None:
        """Why a row cannot be scored, or None."""
        if _missing(value):
            return "missing text"
        prompt: Any = str(value)
        if self.generative and (not isinstance(value, str) or self.text_column == "messages"):
            try:  # a chat: a list of {role, content} messages
                prompt = self._prompt(value)
                self.model.render(prompt)
            except (TypeError, ValueError, KeyError, AttributeError) as error:
                return f"not a chat (a list of {{role, content}} messages): {error}"
        elif not prompt.strip() or not any(c.isprintable() and not c.isspace() for c in prompt):
            return "empty text"
        if not self.generative and len(prompt) > self.job.max_chars:
            return f"too long: {len(prompt)} characters, at most {self.job.max_chars} (--max-chars)"
        if self.generative:
            tokens = len(self.model.encode(prompt, truncate=False))
            context = self.model.context_length
            if context is not None and tokens + 1 > context:
                return f"too long: {tokens} prompt tokens leave no room in the model's {context} positions"
        return None

    def _prompt(self, value: Any) -> Any:
        """A generator's prompt: text, or a chat (from a `messages` column, JSON text when read from JSONL)."""
        if isinstance(value, str) and self.text_column == "messages":
            value = json.loads(value)
        if isinstance(value, str):
            return value
        if not isinstance(value, list | tuple | np.ndarray):
            raise TypeError(f"{type(value).__name__}, not a list")
        return [dict(m) for m in value]

    def predict(self, values: list[Any]) -> pd.DataFrame:
        if not self.generative:
            probs = self.model.predict_proba([str(v) for v in values], batch_size=self.job.batch_size)
            labels = self.model.labels
            frame = pd.DataFrame(probs, columns=[f"prob_{label}" for label in labels])
            frame.insert(0, "score", probs.max(axis=1) if len(values) else [])
            frame.insert(0, "label", [labels[i] for i in probs.argmax(axis=1)] if len(values) else [])
            return frame
        return self._generate(values)

    def _generate(self, values: list[Any]) -> pd.DataFrame:
        from llmops.generation.candidate import GenerationParams

        prompts = [self._prompt(v) for v in values]
        order = sorted(range(len(prompts)), key=lambda i: len(self.model.encode(prompts[i])))  # less padding
        params = GenerationParams(
            max_new_tokens=self.job.max_new_tokens, temperature=self.job.temperature, seed=self.job.seed
        )
        results: list[Any] = [None] * len(prompts)
        for start in range(0, len(order), self.job.batch_size):
            rows = order[start : start + self.job.batch_size]
            for row, result in zip(rows, self.model.generate([prompts[i] for i in rows], params), strict=True):
                results[row] = result
        return pd.DataFrame(
            {
                "text": [r.text for r in results],
                "finish_reason": [r.finish_reason for r in results],
                "prompt_tokens": [r.prompt_tokens for r in results],
                "completion_tokens": [r.completion_tokens for r in results],
            }
        )


def _as_text(value: Any) -> str | None:
    if _missing(value):
        return None
    return value if isinstance(value, str) else json.dumps(value, default=str)


# ---------------------------------------------------------------------------------------------------------------
# The job


def _columns(path: Path, fmt: str) -> list[str]:
    if fmt == "parquet":
        return list(pq.ParquetFile(path).schema_arrow.names)
    if fmt == "csv":
        return list(pd.read_csv(path, nrows=0).columns)
    with path.open() as stream:
        first = stream.readline()
    return list(json.loads(first)) if first.strip() else []


def _text_column(job: BatchJob, columns: list[str], generative: bool) -> str:
    if job.column is not None:
        if job.column not in columns:
            raise BatchError(f"{job.input}: no column '{job.column}' (it has {', '.join(columns) or 'none'})")
        return job.column
    wanted = GENERATOR_COLUMNS if generative else CLASSIFIER_COLUMNS
    found = next((c for c in wanted if c in columns), None)
    if found is None:
        raise BatchError(
            f"{job.input}: no {' or '.join(repr(c) for c in wanted)} column (it has {', '.join(columns) or 'none'}); "
            "name the column to score with --column"
        )
    return found


def _is_generator(ref: ModelRef) -> bool:
    """Whether the version is a generator: from the task the lifecycle tags it with, else from its
    `candidate.json` (a version registered by hand)."""
    import tempfile

    from mlflow import MlflowClient

    from llmops.candidate_folder import CandidateMeta
    from llmops.registry import TAG, download_candidate

    client = MlflowClient(tracking_uri=ref.tracking_uri, registry_uri=ref.tracking_uri)
    task = client.get_model_version(ref.name, ref.version).tags.get(TAG + "task")
    if task is None:
        with tempfile.TemporaryDirectory() as tmp:
            task = CandidateMeta.load(download_candidate(ref.name, ref.version, tmp, ref.tracking_uri)).task
    return task != "sequence-classification"


def prepare(job: BatchJob, ref: ModelRef, generative: bool) -> tuple[dict[str, Any], str, int]:
    """The job's manifest (a new one, or the one an interrupted run left), its text column, and its blocks
    already done."""
    if not job.input.is_file():
        raise BatchError(f"--input {job.input}: no such file")
    fmt = input_format(job.input)
    if job.block_rows < 1:
        raise BatchError(f"--block-rows {job.block_rows}: give at least 1")
    columns = _columns(job.input, fmt)
    text_column = _text_column(job, columns, generative)
    missing = [c for c in job.keep if c not in columns]
    if missing:
        raise BatchError(f"--keep {', '.join(missing)}: not in {job.input} (it has {', '.join(columns)})")
    manifest: dict[str, Any] = {
        "model": ref.name,
        "version": ref.version,
        "input": str(job.input.resolve()),
        "fingerprint": fingerprint(job.input),
        "column": text_column,
        "settings": job.settings(),
    }
    path = job.output / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        same = {k: found.get(k) for k in ("model", "version", "fingerprint", "column", "settings")}
        if same != {k: manifest[k] for k in same}:
            differs = [k for k in same if same[k] != manifest[k]]
            raise BatchError(
                f"{job.output} holds another job's output ({', '.join(differs)} differ: it scored {found['input']} "
                f"with {found['model']} version {found['version']}); give another --output, or remove it"
            )
        if "blocks" in found:
            return (
                found,
                text_column,
                sum(part_file(job.output, "predictions", b).is_file() for b in range(found["blocks"])),
            )
    elif job.output.exists() and any(job.output.iterdir()):
        raise BatchError(f"{job.output} exists and is not a batch output folder; give another --output")
    made = not job.output.exists()
    job.output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2))
    blocks = stage_blocks(job.input, fmt, (text_column,), job.block_rows, job.output / ".blocks")
    if blocks == 0:
        shutil.rmtree(job.output if made else job.output / ".blocks", ignore_errors=True)
        path.unlink(missing_ok=True)  # nothing to resume
        raise BatchError(f"{job.input}: no rows to score")
    manifest["blocks"] = blocks
    path.write_text(json.dumps(manifest, indent=2))
    return manifest, text_column, 0


def run_batch(
    job: BatchJob,
    tracking_uri: str,
    ray_address: str | None = None,
    workers: int = 2,
    threads_per_worker: int = 1,
    progress: bool = True,
) -> Summary:
    """Score `job.input` with `job.model` into `job.output` (resuming an interrupted run of the same job):
    in this process, or on the Ray cluster at `ray_address` with up to `workers` actors."""
    from tqdm.auto import tqdm

    ref = resolve_model(job.model, tracking_uri)
    manifest, text_column, done = prepare(job, ref, _is_generator(ref))
    blocks = int(manifest["blocks"])
    pending = [b for b in range(blocks) if not part_file(job.output, "predictions", b).is_file()]
    summary = Summary(job.output, ref.name, ref.version, manifest["fingerprint"], blocks, resumed_blocks=done)
    bar = tqdm(total=blocks, initial=done, unit="block", desc=f"{ref.name} v{ref.version}", disable=not progress)
    try:
        if ray_address is None:
            scorer = BlockScorer(ref, job, text_column)
            for block in pending:
                _count(summary, scorer.score(block))
                bar.update(1)
        else:
            for result in _score_on_ray(ref, job, text_column, pending, ray_address, workers, threads_per_worker):
                _count(summary, result)
                bar.update(1)
    finally:
        bar.close()
    missing = [b for b in range(blocks) if not part_file(job.output, "predictions", b).is_file()]
    if missing:
        raise BatchError(f"blocks {missing[:5]} were not written; run the same command again to finish them")
    totals = _totals(job.output, blocks)
    summary.rows, summary.scored, summary.rejected = totals
    manifest |= {"complete": True, "rows": summary.rows, "scored": summary.scored, "rejected": summary.rejected}
    (job.output / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return summary


def _count(summary: Summary, result: dict[str, Any]) -> None:
    node = str(result["node"])
    summary.nodes[node] = summary.nodes.get(node, 0) + 1


def _totals(output: Path, blocks: int) -> tuple[int, int, int]:
    """Rows, scored and refused, read from the written files (resumed blocks included)."""
    scored = sum(pq.ParquetFile(part_file(output, "predictions", b)).metadata.num_rows for b in range(blocks))
    rejected = sum(pq.ParquetFile(part_file(output, "rejects", b)).metadata.num_rows for b in range(blocks))
    return scored + rejected, scored, rejected


def _score_on_ray(
    ref: ModelRef, job: BatchJob, text_column: str, pending: list[int], address: str, workers: int, threads: int
) -> Iterator[dict[str, Any]]:
    """The pending blocks through a Ray Data actor pool of `workers` actors (down to 1 while nodes are lost);
    results as blocks finish.

    Ray Data restarts an actor that dies (its node gone, say) and retries its task on another: a block scored
    twice rewrites the same files."""
    import ray

    if not pending:
        return
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    dataset = ray.data.from_items([{"block": b} for b in pending], override_num_blocks=len(pending))
    scored = dataset.map_batches(
        BlockScorer,
        fn_constructor_kwargs={"ref": ref, "job": job, "text_column": text_column, "threads": threads},
        batch_size=1,
        # one block per actor at a time: a block is read by the actor itself (nothing to prefetch), and one queued
        # behind a busy actor would wait there while another actor sits idle at the end of the job
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=workers, initial_size=workers, max_tasks_in_flight_per_actor=1
        ),
        num_cpus=threads,
    )
    seen: set[int] = set()
    for row in scored.iter_rows():
        if int(row["block"]) not in seen:  # a retried block may report twice; its files were rewritten, not added
            seen.add(int(row["block"]))
            yield dict(row)
