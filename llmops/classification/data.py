"""The classifier's data stage: read, clean, split and write the labelled corpus.

Output columns of every split: `text`, `label` (string), `label_id` (int),
`topic` (slice), `confidence` (float or NaN). Splits: train, validation, test,
holdout (held-out topics), unlabeled (rows left out by `data.sample`; only
their texts are used, as a distillation transfer set) and reference (what
monitoring compares live traffic with: `data.extra_rows` when given, else the
test split, rows the model never trained on).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from llmops.config import DataConfig
from llmops.corpus import clean_frame, read_source, stratified_split
from llmops.prepared_data import DataError, PreparedData, write_prepared


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
