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
    contrast_prompts,
    contrastable_kinds,
    encode_example,
    normalise_rows,
    packaged_tweets,
    prepare_data,
    render_prompt,
    tokenize_split,
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


def _rows(*rows: tuple[str, str, str]) -> pd.DataFrame:
    """(instruction, prompt, target) rows as chats, answered "x"."""
    return pd.DataFrame(
        [
            (p, json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": p}]), "x", k, t, "")
            for k, p, t in rows
        ],
        columns=["prompt", "messages", "completion", "instruction", "target", "topic"],
    )


def test_target_contrast_renames_the_target_a_prompt_names() -> None:
    frame = _rows(
        ("write", "write a negative tweet about apple", "negative"),
        ("write", "write a positive tweet about a positively good airline", "positive"),
        ("write", "write a neutral tweet", "neutral"),
        ("classify", "classify the sentiment of this tweet: so positive today", "positive"),
        ("classify", "classify the sentiment of this tweet: lost my bag", "negative"),
    )
    # `classify` prompts do not name their target (the answer): only `write` rows get alternatives
    assert contrastable_kinds(frame) == {"write": ["negative", "neutral", "positive"]}
    prompts, histories = contrast_prompts(frame)
    assert prompts[0] == ["write a neutral tweet about apple", "write a positive tweet about apple"]
    assert prompts[1] == [  # the word, not a part of another ("positively")
        "write a negative tweet about a positively good airline",
        "write a neutral tweet about a positively good airline",
    ]
    assert prompts[3] == prompts[4] == histories[3] == []
    chat = json.loads(histories[2][0])  # the last user message renamed, the rest of the chat as it was
    assert chat == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "write a negative tweet"}]


def test_a_kind_with_one_target_or_an_unnamed_one_gets_no_alternatives() -> None:
    assert contrastable_kinds(_rows(("write", "write a sad poem", "sad"), ("write", "write a sad song", "sad"))) == {}
    unnamed = _rows(("write", "write a sad poem", "sad"), ("write", "write something cheerful", "happy"))
    assert contrastable_kinds(unnamed) == {}


def test_contrast_alternatives_carry_the_same_answer_after_another_prompt(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "train.parquet"
    _rows(("write", "write a sad poem", "sad"), ("write", "write a happy poem", "happy")).to_parquet(path)
    plain, contrasted = (tokenize_split(path, tokenizer, "causal-lm", 64, contrast=c) for c in (False, True))
    assert "contrast_input_ids" not in plain.column_names
    row = contrasted[0]
    assert [row[k] for k in ("input_ids", "labels")] == [plain[0][k] for k in ("input_ids", "labels")]
    (other,) = row["contrast_input_ids"]
    assert tokenizer.decode(other, skip_special_tokens=True).startswith("system : be brief user : write a happy poem")
    answer = [label for label in row["labels"] if label != IGNORE]
    assert [label for label in row["contrast_labels"][0] if label != IGNORE] == answer


def test_alternatives_ride_in_the_batch_after_its_rows(tmp_path: Path, tokenizer) -> None:
    from llmops.generation.train import collator

    path = tmp_path / "train.parquet"
    frame = _rows(("write", "write a sad poem", "sad"), ("classify", "is this sad: rain", "sad"))
    pd.concat([frame, _rows(("write", "write a happy poem", "happy"))]).to_parquet(path)
    rows = tokenize_split(path, tokenizer, "causal-lm", 64, contrast=True)
    batch = collator(tokenizer, None, "causal-lm")([rows[0], rows[1], rows[2]])
    assert batch["input_ids"].shape[0] == 5 and batch["contrast_rows"].tolist() == [0, 2]  # 3 rows, then 2 others
    assert (batch["labels"][3] == batch["labels"][0]).all()  # row 0's answer, after the other prompt
    plain = collator(tokenizer, None, "causal-lm")([tokenize_split(path, tokenizer, "causal-lm", 64)[0]])
    assert "contrast_rows" not in plain and plain["input_ids"].shape[0] == 1
