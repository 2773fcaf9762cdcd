"""The prediction log: every served prediction and generation, and every feedback on them, for monitoring.

Serving writes it, monitoring reads it; this module is the contract between them.
Three stores behind one interface, chosen by the path:
- `predictions.db` (any `.db` / `.sqlite` path): one SQLite file in WAL mode, so a
  monitor can read while the server writes;
- a database URL (`postgresql+psycopg2://...`): the same tables in a database server, one log for every
  replica, read by monitoring wherever it runs;
- any other path: a folder of Parquet files, `predictions/part-*.parquet`,
  `feedback/part-*.parquet`, `generations/...` and `generation_feedback/...`, one file
  per flush (easy to ship to object storage).

:class:`PredictionLogWriter` keeps writes off the request path: rows go to an
in-memory buffer that a background thread flushes every `flush_interval_s`
seconds and on close. A crash loses at most the rows of the last interval.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa

log = logging.getLogger(__name__)

ROUTES = ("champion", "canary", "shadow")
"""Which model answered: the champion, the challenger in canary mode, or the challenger in shadow (not returned)."""


@dataclass(frozen=True)
class PredictionRow:
    request_id: str
    idx: int
    """Position of the text in its request."""
    ts: float
    """Unix time of the answer."""
    text: str
    label: str
    score: float
    probabilities: str
    """JSON object label -> probability."""
    model_name: str
    model_version: str
    route: str
    latency_ms: float
    embedding: bytes | None = None
    """The model's embedding of the text (float16 bytes, see :func:`encode_embedding`), for embedding drift."""
    unk_share: float | None = None
    """Share of the text's tokens unknown to the model's tokenizer."""
    key_name: str | None = None
    """The name of the API key that asked (`environment` for an environment key; None without keys), never the
    key."""
    flagged: str | None = None
    """What the guards found in the text, redacted: its kinds, comma-separated (`EMAIL_ADDRESS,PHONE_NUMBER`); ""
    nothing; None: not checked (`serve.guards` allows it)."""


@dataclass(frozen=True)
class FeedbackRow:
    request_id: str
    idx: int
    label: str
    ts: float


@dataclass(frozen=True)
class GenerationRow:
    """One generated answer of a served generator."""

    request_id: str
    idx: int
    """Position of the prompt in its request (a completion request may hold several)."""
    ts: float
    model_name: str
    model_version: str
    route: str
    """The protocol that asked: `openai` or `v2`."""
    prompt: str
    """The prompt as written, or a chat's last user message."""
    messages: str
    """A chat as JSON (its messages before the answer); "" for a plain prompt."""
    completion: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    ttft_ms: float
    latency_ms: float
    embedding: bytes | None = None
    """The model's hidden state at the prompt's last token (float16), for embedding drift of the prompts."""
    unk_share: float | None = None
    """Share of the prompt's tokens unknown to the model's tokenizer."""
    key_name: str | None = None
    """The name of the API key that asked, never the key."""
    flagged: str | None = None
    """What the guards found in the prompt or the answer, redacted: kinds, comma-separated; "" nothing; None: not
    checked."""


@dataclass(frozen=True)
class GenerationFeedbackRow:
    request_id: str
    idx: int
    rating: float | None
    """A user's score of the answer (any scale the team agrees on; for example -1, 0, 1)."""
    correction: str | None
    """The answer the model should have written."""
    ts: float


PREDICTION_COLUMNS = list(PredictionRow.__dataclass_fields__)
FEEDBACK_COLUMNS = list(FeedbackRow.__dataclass_fields__)
GENERATION_COLUMNS = list(GenerationRow.__dataclass_fields__)
GENERATION_FEEDBACK_COLUMNS = list(GenerationFeedbackRow.__dataclass_fields__)


def encode_embedding(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float16).tobytes()


def decode_embeddings(values: Iterable[bytes | None]) -> np.ndarray | None:
    """(n, hidden) float32 from logged embeddings; None when any row has none (logged without embeddings)."""
    values = list(values)
    if not values or any(v is None or (isinstance(v, float) and np.isnan(v)) for v in values):
        return None
    return np.stack([np.frombuffer(v, dtype=np.float16) for v in values]).astype(np.float32)  # type: ignore[arg-type]


def probabilities_json(labels: list[str], probs: Iterable[float]) -> str:
    return json.dumps({label: round(float(p), 6) for label, p in zip(labels, probs, strict=True)})


TABLES = ("predictions", "feedback", "generations", "generation_feedback")
COLUMNS = {
    "predictions": PREDICTION_COLUMNS,
    "feedback": FEEDBACK_COLUMNS,
    "generations": GENERATION_COLUMNS,
    "generation_feedback": GENERATION_FEEDBACK_COLUMNS,
}


CHUNK_ROWS = 20_000
"""Rows a window is read in at a time (`scan`): what a monitoring pass over a large window holds beside its
sample."""


class _Windows:
    """What every store reads the same way: a window is its `scan`, gathered and put in time order."""

    def scan(
        self,
        table: str,
        last_n: int | None = None,
        since: float | None = None,
        chunk_rows: int = CHUNK_ROWS,
        **equal: str | None,
    ) -> Iterator[pd.DataFrame]:
        raise NotImplementedError

    def _window(self, table: str, last_n: int | None, since: float | None, **equal: str | None) -> pd.DataFrame:
        frame = pd.concat(list(self.scan(table, last_n, since, CHUNK_ROWS, **equal)), ignore_index=True)
        return frame.sort_values(["ts", "request_id", "idx"], kind="stable").reset_index(drop=True)

    def read_predictions(
        self,
        last_n: int | None = None,
        since: float | None = None,
        route: str | None = None,
        model_version: str | None = None,
    ) -> pd.DataFrame:
        """The last `last_n` predictions at or after `since`, of one route and model version if given, oldest first."""
        return self._window("predictions", last_n, since, route=route, model_version=model_version)

    def read_generations(
        self, last_n: int | None = None, since: float | None = None, model_name: str | None = None
    ) -> pd.DataFrame:
        """The last `last_n` generations at or after `since`, of one model if given, oldest first."""
        return self._window("generations", last_n, since, model_name=model_name)


def _add_columns(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    """Columns of a newer log added to a log written before they existed (at the end, as the rows' fields)."""
    present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for column, kind in columns.items():
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


class SqliteStore(_Windows):
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS predictions (request_id TEXT, idx INTEGER, ts REAL, text TEXT,"
                " label TEXT, score REAL, probabilities TEXT, model_name TEXT, model_version TEXT, route TEXT,"
                " latency_ms REAL, embedding BLOB, unk_share REAL, key_name TEXT, flagged TEXT)"
            )
            added = {"embedding": "BLOB", "unk_share": "REAL", "key_name": "TEXT", "flagged": "TEXT"}
            _add_columns(db, "predictions", added)
            db.execute("CREATE INDEX IF NOT EXISTS predictions_request ON predictions (request_id)")
            db.execute("CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)")
            db.execute("CREATE TABLE IF NOT EXISTS feedback (request_id TEXT, idx INTEGER, label TEXT, ts REAL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS generations (request_id TEXT, idx INTEGER, ts REAL, model_name TEXT,"
                " model_version TEXT, route TEXT, prompt TEXT, messages TEXT, completion TEXT, prompt_tokens INTEGER,"
                " completion_tokens INTEGER, finish_reason TEXT, ttft_ms REAL, latency_ms REAL, embedding BLOB,"
                " unk_share REAL, key_name TEXT, flagged TEXT)"
            )
            _add_columns(db, "generations", {"key_name": "TEXT", "flagged": "TEXT"})
            db.execute("CREATE INDEX IF NOT EXISTS generations_request ON generations (request_id)")
            db.execute("CREATE INDEX IF NOT EXISTS generations_ts ON generations (ts)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS generation_feedback (request_id TEXT, idx INTEGER, rating REAL,"
                " correction TEXT, ts REAL)"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def write(self, predictions: list[PredictionRow], feedback: list[FeedbackRow], *more: list[Any]) -> None:
        """Every buffered row in one transaction; `more`: generation rows, then generation feedback rows."""
        tables: zip[tuple[str, list[Any]]] = zip(TABLES, (predictions, feedback, *more), strict=False)
        with self._connect() as db:
            for table, rows in tables:
                if rows:
                    marks = ",".join("?" * len(COLUMNS[table]))
                    db.executemany(f"INSERT INTO {table} VALUES ({marks})", [tuple(asdict(r).values()) for r in rows])

    def request_size(self, request_id: str) -> int:
        """How many texts the request had (0: no such request)."""
        with self._connect() as db:
            query = "SELECT COUNT(DISTINCT idx) FROM predictions WHERE request_id = ?"
            return int(db.execute(query, (request_id,)).fetchone()[0])

    def scan(
        self,
        table: str,
        last_n: int | None = None,
        since: float | None = None,
        chunk_rows: int = CHUNK_ROWS,
        **equal: str | None,
    ) -> Iterator[pd.DataFrame]:
        """The window's rows of `table` (the last `last_n` at or after `since`, each `column=value` of `equal` that
        is not None), newest first, `chunk_rows` at a time: the cursor streams, memory holds one chunk."""
        _check_window(table, equal)
        conditions = [("ts >= ?", since), *((f"{column} = ?", value) for column, value in equal.items())]
        where = [(clause, value) for clause, value in conditions if value is not None]
        query = f"SELECT * FROM {table}"
        if where:
            query += " WHERE " + " AND ".join(clause for clause, _ in where)
        params: list[object] = [value for _, value in where]
        query += " ORDER BY ts DESC, request_id DESC, idx DESC"
        if last_n is not None:
            query, params = query + " LIMIT ?", [*params, last_n]
        with closing(self._connect()) as db:
            yield from pd.read_sql_query(query, db, params=params, chunksize=chunk_rows)

    def read_feedback(self) -> pd.DataFrame:
        with self._connect() as db:
            return pd.read_sql_query("SELECT * FROM feedback ORDER BY ts", db)

    def generation_request_size(self, request_id: str) -> int:
        """How many prompts a generation request had (0: no such request)."""
        with self._connect() as db:
            query = "SELECT COUNT(DISTINCT idx) FROM generations WHERE request_id = ?"
            return int(db.execute(query, (request_id,)).fetchone()[0])

    def read_generation_feedback(self) -> pd.DataFrame:
        with self._connect() as db:
            return pd.read_sql_query("SELECT * FROM generation_feedback ORDER BY ts", db)


def _check_window(table: str, equal: dict[str, str | None]) -> None:
    unknown = set(equal) - set(COLUMNS.get(table, ()))
    if table not in ("predictions", "generations") or unknown:
        raise ValueError(f"no window of {table!r} by {sorted(unknown)}: predictions or generations, by their columns")


def _matches(frame: pd.DataFrame, since: float | None, equal: dict[str, str]) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    if since is not None:
        mask &= frame["ts"] >= since
    for column, value in equal.items():
        mask &= frame[column].astype(str) == value
    return mask


class ParquetStore(_Windows):
    def __init__(self, path: Path):
        self.path = path
        for part in TABLES:
            (path / part).mkdir(parents=True, exist_ok=True)

    def _append(self, part: str, rows: list[Any]) -> None:
        # Write then rename: a reader never sees half a file.
        name = f"part-{time.time_ns()}-{os.getpid()}"  # several server workers may flush at once
        tmp = self.path / part / f".{name}.tmp"
        pd.DataFrame([asdict(r) for r in rows]).to_parquet(tmp, index=False)
        tmp.rename(self.path / part / f"{name}.parquet")

    def write(self, predictions: list[PredictionRow], feedback: list[FeedbackRow], *more: list[Any]) -> None:
        batches: list[list[Any]] = [predictions, feedback, *more]
        for part, rows in zip(TABLES, batches, strict=False):
            if rows:
                self._append(part, rows)

    def _read(self, part: str, columns: list[str]) -> pd.DataFrame:
        files = sorted((self.path / part).glob("part-*.parquet"))
        if not files:
            return pd.DataFrame(columns=columns)
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    def request_size(self, request_id: str) -> int:
        """How many texts the request had (0: no such request)."""
        frame = self._read("predictions", PREDICTION_COLUMNS)
        return int(frame.loc[frame["request_id"] == request_id, "idx"].nunique())

    def scan(
        self,
        table: str,
        last_n: int | None = None,
        since: float | None = None,
        chunk_rows: int = CHUNK_ROWS,
        **equal: str | None,
    ) -> Iterator[pd.DataFrame]:
        """The window's rows of `table` as `SqliteStore.scan` reads them, file by file, `chunk_rows` at a time. With
        `last_n`, a first pass reads the matching rows' `ts` alone (8 bytes a row) to find the window's oldest
        instant; rows at that very instant are ordered by request and position, as the database orders them."""
        _check_window(table, equal)
        given = {column: value for column, value in equal.items() if value is not None}
        files = sorted((self.path / table).glob("part-*.parquet"))
        cutoff, tied_wanted = None, 0
        if last_n is not None:
            stamps = [self._matching_ts(f, since, given) for f in files]
            found = np.concatenate(stamps) if stamps else np.empty(0)
            if len(found) > last_n:
                cutoff = float(np.partition(found, len(found) - last_n)[len(found) - last_n])
                tied_wanted = last_n - int((found > cutoff).sum())
        tied, yielded = [], False
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=chunk_rows):
                frame = batch.to_pandas().reindex(columns=COLUMNS[table])
                frame = frame[_matches(frame, since, given)]
                if cutoff is not None:
                    tied.append(frame[frame["ts"] == cutoff])
                    frame = frame[frame["ts"] > cutoff]
                if len(frame):
                    yielded = True
                    yield frame.reset_index(drop=True)
        if tied_wanted:
            rows = pd.concat(tied, ignore_index=True).sort_values(["request_id", "idx"], kind="stable")
            yielded = True
            yield rows.tail(tied_wanted).reset_index(drop=True)
        if not yielded:
            yield pd.DataFrame(columns=COLUMNS[table])

    @staticmethod
    def _matching_ts(file: Path, since: float | None, equal: dict[str, str]) -> np.ndarray:
        table = pq.read_table(file, columns=["ts", *equal])
        mask = pc.greater_equal(table["ts"], since) if since is not None else None
        for column, value in equal.items():
            same = pc.equal(pc.cast(table[column], "string"), value)
            mask = same if mask is None else pc.and_(mask, same)
        stamps = table["ts"] if mask is None else table["ts"].filter(mask)
        return stamps.to_numpy().astype("float64")

    def read_feedback(self) -> pd.DataFrame:
        return self._read("feedback", FEEDBACK_COLUMNS).sort_values("ts", kind="stable").reset_index(drop=True)

    def generation_request_size(self, request_id: str) -> int:
        frame = self._read("generations", GENERATION_COLUMNS)
        return int(frame.loc[frame["request_id"] == request_id, "idx"].nunique())

    def read_generation_feedback(self) -> pd.DataFrame:
        frame = self._read("generation_feedback", GENERATION_FEEDBACK_COLUMNS)
        return frame.sort_values("ts", kind="stable").reset_index(drop=True)


def _database_tables(metadata: sa.MetaData) -> dict[str, sa.Table]:
    """The log's four tables, as the SQLite file has them, for a database server."""
    kinds: dict[Any, Any] = {str: sa.Text, int: sa.Integer, float: sa.Float(precision=53), bytes: sa.LargeBinary}
    tables = {}
    for table, row in zip(TABLES, (PredictionRow, FeedbackRow, GenerationRow, GenerationFeedbackRow), strict=True):
        hints = typing.get_type_hints(row)
        columns = [sa.Column(name, kinds[_base(hints[name])]) for name in COLUMNS[table]]
        tables[table] = sa.Table(table, metadata, *columns)
    sa.Index("predictions_request", tables["predictions"].c.request_id)
    sa.Index("predictions_ts", tables["predictions"].c.ts)
    sa.Index("generations_request", tables["generations"].c.request_id)
    sa.Index("generations_ts", tables["generations"].c.ts)
    return tables


def _base(hint: Any) -> type:
    """`str` of `str | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


class DatabaseStore(_Windows):
    """The log in a database server (`serve.prediction_log: postgresql://...`): every replica writes to one log and
    monitoring reads it wherever it runs. The tables are the SQLite file's."""

    def __init__(self, url: str):
        self.url = url
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        self.metadata = sa.MetaData()
        self.tables = _database_tables(self.metadata)
        self.metadata.create_all(self.engine)

    def write(self, predictions: list[PredictionRow], feedback: list[FeedbackRow], *more: list[Any]) -> None:
        """Every buffered row in one transaction; `more`: generation rows, then generation feedback rows."""
        batches: list[list[Any]] = [predictions, feedback, *more]
        with self.engine.begin() as db:
            for table, rows in zip(TABLES, batches, strict=False):
                if rows:
                    db.execute(self.tables[table].insert(), [asdict(r) for r in rows])

    def _size(self, table: str, request_id: str) -> int:
        t = self.tables[table]
        query = sa.select(sa.func.count(sa.distinct(t.c.idx))).where(t.c.request_id == request_id)
        with self.engine.connect() as db:
            return int(db.execute(query).scalar_one())

    def request_size(self, request_id: str) -> int:
        """How many texts the request had (0: no such request)."""
        return self._size("predictions", request_id)

    def generation_request_size(self, request_id: str) -> int:
        """How many prompts a generation request had (0: no such request)."""
        return self._size("generations", request_id)

    def scan(
        self,
        table: str,
        last_n: int | None = None,
        since: float | None = None,
        chunk_rows: int = CHUNK_ROWS,
        **equal: str | None,
    ) -> Iterator[pd.DataFrame]:
        """The window's rows of `table` as `SqliteStore.scan` reads them; a server-side cursor streams them."""
        _check_window(table, equal)
        t = self.tables[table]
        query = sa.select(t)
        if since is not None:
            query = query.where(t.c.ts >= since)
        for column, value in equal.items():
            if value is not None:
                query = query.where(t.c[column] == value)
        query = query.order_by(t.c.ts.desc(), t.c.request_id.desc(), t.c.idx.desc()).limit(last_n)
        with self.engine.connect().execution_options(stream_results=True, max_row_buffer=chunk_rows) as db:
            yield from pd.read_sql_query(query, db, chunksize=chunk_rows)

    def _all(self, table: str) -> pd.DataFrame:
        with self.engine.connect() as db:
            return pd.read_sql_query(sa.select(self.tables[table]).order_by(self.tables[table].c.ts), db)

    def read_feedback(self) -> pd.DataFrame:
        return self._all("feedback")

    def read_generation_feedback(self) -> pd.DataFrame:
        return self._all("generation_feedback")


PredictionStore = SqliteStore | ParquetStore | DatabaseStore


def open_store(path: str | Path) -> PredictionStore:
    """The log at `path`: a database URL (`postgresql://...`), a `.db` file (SQLite) or a folder (Parquet)."""
    if isinstance(path, str) and "://" in path:
        return DatabaseStore(path)
    path = Path(path)
    return SqliteStore(path) if path.suffix in (".db", ".sqlite", ".sqlite3") else ParquetStore(path)


class PredictionLogWriter:
    """Buffers rows in memory and writes them from a background thread, in batches."""

    def __init__(
        self, store: PredictionStore, flush_interval_s: float = 1.0, scrub: Callable[[Any], Any] | None = None
    ):
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.scrub = scrub
        """Applied to every row before it is written, on the writer's thread (serving's PII redaction)."""
        self._lock = threading.Lock()
        self._predictions: list[PredictionRow] = []
        self._feedback: list[FeedbackRow] = []
        self._generations: list[GenerationRow] = []
        self._generation_feedback: list[GenerationFeedbackRow] = []
        self._pending_sizes: dict[str, int] = {}
        self._pending_generations: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self.rows_written = 0
        self.write_failures = 0

    def start(self) -> PredictionLogWriter:
        self._thread.start()
        return self

    def append(self, predictions: list[PredictionRow]) -> None:
        with self._lock:
            self._predictions.extend(predictions)
            for r in predictions:
                self._pending_sizes[r.request_id] = max(self._pending_sizes.get(r.request_id, 0), r.idx + 1)

    def append_feedback(self, row: FeedbackRow) -> None:
        with self._lock:
            self._feedback.append(row)

    def append_generation(self, row: GenerationRow) -> None:
        with self._lock:
            self._generations.append(row)
            self._pending_generations[row.request_id] = max(
                self._pending_generations.get(row.request_id, 0), row.idx + 1
            )

    def append_generation_feedback(self, row: GenerationFeedbackRow) -> None:
        with self._lock:
            self._generation_feedback.append(row)

    def generation_request_size(self, request_id: str) -> int:
        """How many prompts a logged generation request had, written or still buffered (0: unknown)."""
        with self._lock:
            if request_id in self._pending_generations:
                return self._pending_generations[request_id]
        return self.store.generation_request_size(request_id)

    @property
    def pending(self) -> int:
        with self._lock:
            buffers = (self._predictions, self._feedback, self._generations, self._generation_feedback)
            return sum(len(b) for b in buffers)

    def request_size(self, request_id: str) -> int:
        """How many texts a logged request had, written or still buffered (0: unknown request)."""
        with self._lock:
            if request_id in self._pending_sizes:
                return self._pending_sizes[request_id]
        return self.store.request_size(request_id)

    def flush(self) -> None:
        with self._lock:
            predictions, feedback = self._predictions, self._feedback
            generations, generation_feedback = self._generations, self._generation_feedback
            self._predictions, self._feedback, self._generations, self._generation_feedback = [], [], [], []
        if not (predictions or feedback or generations or generation_feedback):
            return
        try:
            if self.scrub is not None:  # the rows kept for a retry are the scrubbed ones
                predictions = [self.scrub(r) for r in predictions]
                generations = [self.scrub(r) for r in generations]
                generation_feedback = [self.scrub(r) for r in generation_feedback]
            self.store.write(predictions, feedback, generations, generation_feedback)
        except Exception:
            # Keep the rows for the next flush rather than lose them; the failure shows in /metrics.
            self.write_failures += 1
            log.exception("prediction log write failed; %d rows kept for the next flush", len(predictions))
            with self._lock:
                self._predictions[:0] = predictions
                self._feedback[:0] = feedback
                self._generations[:0] = generations
                self._generation_feedback[:0] = generation_feedback
            return
        self.rows_written += len(predictions) + len(generations)
        with self._lock:
            for r in predictions:
                self._pending_sizes.pop(r.request_id, None)
            for g in generations:
                self._pending_generations.pop(g.request_id, None)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()

    def close(self) -> None:
        """Stop the thread and write everything still buffered."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
