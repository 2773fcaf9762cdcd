"""The two sides of a monitoring comparison: the champion's reference and the current window.

The reference is the champion's reference data (registry tag `llmops.reference_data`),
scored once per version by the champion itself (labels, confidence, embeddings)
and cached. The window is read from the prediction log: the champion's own
predictions (route `champion`, its version) with any feedback labels joined in.
Texts on both sides go through the training data's cleaning, so a URL in live
traffic and the URL token in the reference count as the same thing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from transformers import PreTrainedTokenizerBase

from llmops.candidate_folder import load_saved_tokenizer
from llmops.classification.candidate import Classifier
from llmops.config import DataConfig, MonitorConfig
from llmops.corpus import clean_text, tag_topic
from llmops.metrics.text import unknown_shares
from llmops.predlog import CHUNK_ROWS, PredictionStore, decode_embeddings
from llmops.registry import TAG, alias_version, download_candidate

NUMERIC_DESCRIPTORS = ("length", "words", "url_share", "mention_share")
DESCRIPTORS = (*NUMERIC_DESCRIPTORS, "has_unknown")
"""`has_unknown` (a text holds a token the tokenizer does not know) is tested as a category: the per-text share of
unknown tokens (`unk_share`, reported as a mean) is zero for almost every text, and tests on such a column fire on
noise."""


class MonitorError(RuntimeError):
    """Monitoring cannot run; the message says what is missing."""


@dataclass(frozen=True)
class Champion:
    name: str
    version: str
    labels: list[str]
    test_macro_f1: float | None
    reference_uri: str


@dataclass(frozen=True)
class Side:
    """One side of the comparison: rows (text, topic, prediction, confidence, descriptors, ...) and embeddings."""

    frame: pd.DataFrame
    embeddings: np.ndarray | None
    rows: int | None = None
    """The window's rows when `frame` is a uniform sample of them (`monitor.sample_rows`); None: every row."""
    with_feedback: pd.DataFrame | None = None
    """With a sample: every row of the window that has feedback (quality and a retraining read them all)."""

    @property
    def size(self) -> int:
        """The rows the side stands for (the window's, sampled or not)."""
        return len(self.frame) if self.rows is None else self.rows

    @property
    def sampled(self) -> bool:
        return self.rows is not None


def find_champion(client: MlflowClient, name: str, alias: str = "champion") -> Champion:
    version = alias_version(client, name, alias)
    if version is None:
        raise MonitorError(f"model '{name}' has no '{alias}' alias: nothing to monitor (run the lifecycle first)")
    tags = dict(client.get_model_version(name, version).tags)
    reference = tags.get(TAG + "reference_data") or tags.get(TAG + "test_data")
    if reference is None:
        raise MonitorError(f"{name} version {version} has no {TAG}reference_data tag: register it with the lifecycle")
    f1 = tags.get(TAG + "test_macro_f1")
    return Champion(name, version, json.loads(tags[TAG + "labels"]), float(f1) if f1 else None, reference)


def describe(texts: pd.Series, unk_share: np.ndarray, url_token: str) -> pd.DataFrame:
    """Offline text descriptors: characters, words, share of URL and @mention words, unknown tokens."""
    words = texts.str.count(r"\S+").clip(lower=1)
    url = rf"(?:(?<=\s)|^)(?:{url_token}|https?://\S+|www\.\S+)(?=\s|$)"
    return pd.DataFrame(
        {
            "length": texts.str.len(),
            "words": words,
            "url_share": texts.str.count(url) / words,
            "mention_share": texts.str.count(r"(?:(?<=\s)|^)@\w+") / words,
            "unk_share": unk_share,
        },
        index=texts.index,
    ).assign(has_unknown=lambda d: (d["unk_share"] > 0).map({True: "yes", False: "no"}))


class ReferenceCache:
    """Per champion version: its candidate folder, and its reference scored by it (cached on disk)."""

    def __init__(self, root: str | Path, tracking_uri: str):
        self.root = Path(root)
        self.tracking_uri = tracking_uri

    def model_dir(self, champion: Champion) -> Path:
        folder = self.root / f"{champion.name}-v{champion.version}"
        found = next((folder / "model").rglob("candidate.json"), None) if (folder / "model").is_dir() else None
        if found is not None:
            return found.parent
        return download_candidate(champion.name, champion.version, folder / "model", self.tracking_uri)

    def tokenizer(self, champion: Champion) -> PreTrainedTokenizerBase:
        return load_saved_tokenizer(self.model_dir(champion))

    def reference_data(self, champion: Champion) -> pd.DataFrame:
        """The champion's reference rows as its lineage tag names them (downloaded once per version)."""
        folder = self.root / f"{champion.name}-v{champion.version}"
        try:
            local = mlflow.artifacts.download_artifacts(
                champion.reference_uri, dst_path=str(folder / "data"), tracking_uri=self.tracking_uri
            )
        except Exception as error:  # MLflow raises several types for a missing artifact
            raise MonitorError(f"cannot read the reference data {champion.reference_uri}: {error}") from None
        data = pd.read_parquet(local)
        if data.empty:
            raise MonitorError(f"the reference data {champion.reference_uri} is empty")
        return data

    def reference(self, champion: Champion, rows: int, data_cfg: DataConfig, seed: int = 0) -> Side:
        folder = self.root / f"{champion.name}-v{champion.version}"
        table, vectors = folder / f"reference-{rows}.parquet", folder / f"reference-{rows}.npy"
        if table.is_file() and vectors.is_file():
            return Side(pd.read_parquet(table), np.load(vectors))
        data = self.reference_data(champion)
        if len(data) > rows:
            data = data.sample(rows, random_state=seed)
        frame = pd.DataFrame({"text": data["text"].astype(str).reset_index(drop=True)})
        frame["topic"] = data["topic"].to_numpy() if "topic" in data else tag_topic(frame["text"], data_cfg.topics)
        frame["label"] = data["label"].astype(str).to_numpy()
        classifier = Classifier(self.model_dir(champion))
        probs, embeddings, unknown = classifier.forward(frame["text"].tolist())
        frame["prediction"] = [champion.labels[i] for i in probs.argmax(axis=1)]
        frame["confidence"] = probs.max(axis=1)
        frame = frame.join(describe(frame["text"], unknown, data_cfg.url_token))
        assert embeddings is not None
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(table, index=False)
        np.save(vectors, embeddings.astype(np.float32))
        return Side(frame, embeddings.astype(np.float32))


@dataclass(frozen=True)
class WindowSpec:
    last_n: int | None
    since: float | None

    @classmethod
    def from_config(cls, cfg: MonitorConfig, now: float | None = None) -> WindowSpec:
        now = time.time() if now is None else now
        return cls(cfg.window_size, None if cfg.window_hours is None else now - cfg.window_hours * 3600)

    def describe(self) -> str:
        parts = [f"last {self.last_n} predictions"] if self.last_n else []
        if self.since is not None:
            parts.append(f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}")
        return " ".join(parts) or "every prediction"


class UniformSample:
    """A uniform sample of at most `rows` rows of a stream of chunks, in one pass: each row draws a seeded random
    key and the `rows` smallest keys are kept (bottom-k sampling: every subset of that size is equally likely).
    Memory holds the sample and one chunk; time grows linearly with the rows seen."""

    def __init__(self, rows: int, seed: int = 0):
        self.rows = rows
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._kept: pd.DataFrame | None = None

    def add(self, chunk: pd.DataFrame) -> None:
        self.seen += len(chunk)
        chunk = chunk.assign(_key=self._rng.random(len(chunk)))
        if self._kept is not None and len(self._kept) == self.rows:
            chunk = chunk[chunk["_key"] < self._kept["_key"].max()]  # once full, most rows lose at once
        kept = chunk if self._kept is None else pd.concat([self._kept, chunk], ignore_index=True)
        self._kept = kept.nsmallest(self.rows, "_key") if len(kept) > self.rows else kept

    def frame(self, columns: list[str]) -> pd.DataFrame:
        """The sample in time order (`columns` when nothing was seen)."""
        if self._kept is None:
            return pd.DataFrame(columns=columns)
        kept = self._kept.drop(columns="_key")
        return kept.sort_values(["ts", "request_id", "idx"], kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class WindowRows:
    logged: pd.DataFrame
    """The window's logged rows with their feedback joined: every row, or a uniform sample of them."""
    rows: int
    """The rows in the window."""
    with_feedback: pd.DataFrame
    """Every row of the window that has feedback, sampled or not."""

    @property
    def sampled(self) -> bool:
        return len(self.logged) < self.rows


def read_window(
    store: PredictionStore,
    table: str,
    spec: WindowSpec,
    feedback: pd.DataFrame,
    has_feedback: Callable[[pd.DataFrame], pd.Series],
    sample_rows: int | None,
    seed: int = 0,
    **equal: str,
) -> WindowRows:
    """The window read in chunks, each joined with `feedback` (keyed by request_id and idx, latest per row):
    kept whole up to `sample_rows` rows (None: any size), a uniform sample of that many beyond. The rows with
    feedback (`has_feedback`) are kept whole: they are what quality and a retraining are made of."""
    feedback = feedback.drop_duplicates(["request_id", "idx"], keep="last")
    feedback = feedback.astype({"request_id": str, "idx": "int64"})
    sample = UniformSample(sample_rows, seed) if sample_rows is not None else None
    whole: list[pd.DataFrame] = []
    with_feedback: list[pd.DataFrame] = []
    for chunk in store.scan(table, spec.last_n, spec.since, CHUNK_ROWS, **equal):
        chunk = chunk.astype({"request_id": str, "idx": "int64"}).merge(feedback, on=["request_id", "idx"], how="left")
        with_feedback.append(chunk[has_feedback(chunk)])
        if sample is not None:
            sample.add(chunk)
        else:
            whole.append(chunk)
    columns = list(with_feedback[0].columns) if with_feedback else []
    if sample is not None:
        logged, rows = sample.frame(columns), sample.seen
    else:
        logged = pd.concat(whole, ignore_index=True) if whole else pd.DataFrame(columns=columns)
        logged, rows = (
            logged.sort_values(["ts", "request_id", "idx"], kind="stable").reset_index(drop=True),
            len(logged),
        )
    labelled = pd.concat(with_feedback, ignore_index=True) if with_feedback else pd.DataFrame(columns=columns)
    return WindowRows(logged, rows, labelled.sort_values("ts", kind="stable").reset_index(drop=True))


def load_window(
    store: PredictionStore,
    spec: WindowSpec,
    champion: Champion,
    tokenizer: PreTrainedTokenizerBase,
    data_cfg: DataConfig,
    sample_rows: int | None = None,
) -> Side:
    """The champion's logged predictions in the window, cleaned and described, with feedback labels joined; a
    uniform sample of `sample_rows` of them when the window holds more."""
    feedback = store.read_feedback()[["request_id", "idx", "label"]].rename(columns={"label": "feedback_label"})
    read = read_window(
        store,
        "predictions",
        spec,
        feedback,
        lambda chunk: chunk["feedback_label"].notna(),
        sample_rows,
        route="champion",
        model_version=champion.version,
    )
    logged = read.logged
    texts = pd.Series([clean_text(str(t), data_cfg.url_token) for t in logged["text"]], dtype="object")
    frame = pd.DataFrame(
        {
            "request_id": logged["request_id"].astype(str),
            "idx": logged["idx"].astype("int64"),
            "ts": logged["ts"].astype("float64"),
            "text": texts,
            "prediction": logged["label"].astype(str),
            "confidence": logged["score"].astype("float64"),
            "model_version": logged["model_version"].astype(str),
            "flagged": logged.get("flagged"),  # what the guards found (logs since 0.3)
            "feedback_label": logged["feedback_label"].astype("object"),
        }
    )
    frame["topic"] = tag_topic(frame["text"], data_cfg.topics) if len(frame) else pd.Series(dtype="object")
    logged_unknown = logged["unk_share"] if "unk_share" in logged else pd.Series([None] * len(logged))
    unknown = (
        logged_unknown.to_numpy(dtype="float64")
        if len(logged) and logged_unknown.notna().all()
        else unknown_shares(tokenizer, frame["text"].tolist())
    )
    frame = frame.join(describe(frame["text"], unknown, data_cfg.url_token)) if len(frame) else frame
    embeddings = decode_embeddings(logged["embedding"]) if "embedding" in logged and len(logged) else None
    if not read.sampled:
        return Side(frame, embeddings)
    labelled = read.with_feedback
    with_feedback = pd.DataFrame(
        {
            "text": [clean_text(str(t), data_cfg.url_token) for t in labelled["text"]],
            "prediction": labelled["label"].astype(str),
            "feedback_label": labelled["feedback_label"].astype(str),
        }
    )
    return Side(frame, embeddings, read.rows, with_feedback)


def labelled_rows(window: Side) -> pd.DataFrame:
    """Window rows with a feedback label, as training rows (`text`, `label`) for a retraining: every one of the
    window's, sampled or not."""
    rows = window_labelled(window)
    return pd.DataFrame({"text": rows["text"], "label": rows["feedback_label"]}).reset_index(drop=True)


def window_labelled(window: Side) -> pd.DataFrame:
    """The window's rows with a feedback label (`text`, `prediction`, `feedback_label`, ...)."""
    if window.with_feedback is not None:
        return window.with_feedback
    return window.frame[window.frame["feedback_label"].notna()]
