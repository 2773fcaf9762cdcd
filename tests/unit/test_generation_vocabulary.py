"""Text a person can read: tokens back to tweets as written, and the tokens an answer may not use."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmops.config import ModelConfig
from llmops.corpus import clean_text, packaged_corpus_path
from llmops.generation.modeling import load_tokenizer
from llmops.generation.vocabulary import AnswerText, Vocabulary, join_wordpieces

VOCABULARY = Vocabulary(load_tokenizer(ModelConfig()))
"""The packaged MiniLM tokenizer as generation loads it ([SEP] ends an answer)."""


@pytest.fixture(scope="module")
def packaged() -> Vocabulary:
    return VOCABULARY


def round_trip(vocabulary: Vocabulary, text: str) -> str:
    return vocabulary.text(vocabulary.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    "tweet",
    [
        "@united lost my bag again",
        "#coachella2015 lineup is out!!!",
        "read this https://t.co/abc12xyz now",
        "don't fly @americanair, i'm done",
        "@jet_blue's crew was great! :)",
        "boarding at 5:30pm for $100 (yes, really)",
        "self-driving cars... in 2015?",
        '"best flight ever" said no one',
        ".@southwestair thanks 1,000 times, 3.5 stars",
        "see you at inhabitat.com/xyz #tbt",
    ],
)
def test_tweets_come_back_as_written_up_to_lower_case(packaged: Vocabulary, tweet: str) -> None:
    assert round_trip(packaged, tweet) == tweet


WORD = st.from_regex(r"[a-z]{1,8}", fullmatch=True)
ATOMS = st.one_of(
    WORD,
    WORD.map(lambda w: w + "!"),
    WORD.map(lambda w: w + ","),
    st.from_regex(r"@[a-z][a-z0-9_]{0,10}[a-z0-9]", fullmatch=True),
    st.from_regex(r"#[a-z][a-z0-9]{0,12}", fullmatch=True),
    st.from_regex(r"https://t\.co/[a-z0-9]{10}", fullmatch=True),
    WORD.map(lambda w: w + "..."),
    st.sampled_from(["don't", "i'm", "it's", "we're", "can't", "they'll", "5:30", "$20", "10%", "3.5"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ATOMS, min_size=1, max_size=12))
def test_handles_tags_urls_and_contractions_round_trip(words: list[str]) -> None:
    tweet = " ".join(words)
    assert round_trip(VOCABULARY, tweet) == tweet


TOKENS = ["@", "#", "united", "##ed", "##15", "http", "https", ":", "/", ".", "co", "'", "t", "s", "!", "-", '"', "("]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=20))
def test_the_text_of_fewer_tokens_is_a_prefix_of_the_text_of_more(tokens: list[str]) -> None:
    """What streaming relies on: text sent as tokens arrive is never taken back."""
    whole = join_wordpieces(tokens)
    for k in range(len(tokens)):
        assert whole.startswith(join_wordpieces(tokens[:k]))


def test_the_packaged_tweets_get_their_spacing_back(packaged: Vocabulary) -> None:
    """Measured on 3,000 plain-ASCII tweets of the packaged corpus: the space (or none) between two tokens is
    what the tweet had at 98% of token boundaries or more (the rules were counted on this corpus)."""
    texts = pd.read_csv(packaged_corpus_path(), encoding="latin-1", nrows=4000)["text"].map(str).map(clean_text)
    right = total = 0
    for text in [t for t in texts if t.isascii()][:3000]:
        encoded = packaged.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [s for s, i in zip(encoded["offset_mapping"], encoded["input_ids"], strict=True)]
        rebuilt = re.sub(r"\s+", " ", round_trip(packaged, text))
        written = packaged.tokenizer.backend_tokenizer.normalizer.normalize_str(text)
        total += len(spans) - 1
        right += len(spans) - 1 - _spacing_errors(written, rebuilt)
    assert right / total >= 0.98


def _spacing_errors(written: str, rebuilt: str) -> int:
    """Spaces added or dropped: the texts are equal once spaces are removed (WordPiece keeps every character)."""
    assert written.replace(" ", "") == rebuilt.replace(" ", "")
    at_written = {len(written[:i].replace(" ", "")) for i, c in enumerate(written) if c == " "}
    at_rebuilt = {len(rebuilt[:i].replace(" ", "")) for i, c in enumerate(rebuilt) if c == " "}
    return len(at_written ^ at_rebuilt)


def test_the_packaged_vocabulary_bars_specials_always_and_pieces_at_the_start(packaged: Vocabulary) -> None:
    tokenizer = packaged.tokenizer
    assert packaged.eos_id == tokenizer.sep_token_id and packaged.eos_id not in packaged.never
    assert {tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.unk_token_id} <= set(packaged.never)
    pieces = {i for t, i in tokenizer.get_vocab().items() if t.startswith("##") and len(t) > 2}
    assert set(packaged.not_first) == pieces
    assert tokenizer.convert_tokens_to_ids("united") not in packaged.not_first


def test_the_packaged_vocabulary_never_writes_a_token_no_text_makes(packaged: Vocabulary) -> None:
    tokenizer = packaged.tokenizer
    placeholders = {i for t, i in tokenizer.get_vocab().items() if re.fullmatch(r"\[unused\d+\]", t)}
    assert len(placeholders) > 900 and placeholders <= set(packaged.never)
    tweets = pd.read_csv(packaged_corpus_path(), encoding="latin-1")["text"].head(3000).map(clean_text)
    written = {i for ids in tokenizer(list(tweets), add_special_tokens=False)["input_ids"] for i in ids}
    assert not written & set(packaged.never)  # nothing barred that text makes: "##ing", "@", "'" stay writable
    assert len(written) > 5000


def _byte_level() -> Vocabulary:
    """A byte-level BPE tokenizer (GPT-2's kind), trained here on a few lines."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["don't stop me now", "it's a #tbt @united, café", "  spaced  out  "], trainer)
    return Vocabulary(PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>"))


BYTE_LEVEL = _byte_level()


@pytest.fixture(scope="module")
def byte_level() -> Vocabulary:
    return BYTE_LEVEL


@pytest.mark.parametrize("text", ["don't stop", "it 's  two  spaces", "@united #tbt café ☕", "a .b , c"])
def test_a_byte_level_vocabulary_decodes_text_unchanged(byte_level: Vocabulary, text: str) -> None:
    assert round_trip(byte_level, text) == text  # no clean-up: " 's" and " ." stay as written


def test_a_byte_level_answer_may_not_start_with_whitespace(byte_level: Vocabulary) -> None:
    space = byte_level.tokenizer.convert_tokens_to_ids("Ġ")
    assert space in byte_level.not_first and byte_level.eos_id not in byte_level.not_first


def _written_one_by_one(vocabulary: Vocabulary, ids: list[int]) -> list[str]:
    answer = AnswerText(vocabulary)
    return [answer.add(token) for token in ids]


def _sent(text: str) -> str:
    """A text up to its last character that is neither whitespace nor U+FFFD (one that may be a character whose
    bytes are not all written yet: the stream holds it back, the whole decoding writes it so)."""
    return re.sub(r"[\s\ufffd]+$", "", text)


def test_an_answer_written_token_by_token_reads_as_the_whole_decoding(packaged: Vocabulary) -> None:
    tweets = pd.read_csv(packaged_corpus_path(), encoding="latin-1", nrows=300)["text"].map(str).map(clean_text)
    for ids in packaged.tokenizer(list(tweets), add_special_tokens=False)["input_ids"]:
        ids = [*ids[:3], packaged.eos_id, packaged.tokenizer.pad_token_id, *ids[3:]]  # hidden tokens write nothing
        assert _written_one_by_one(packaged, ids) == [packaged.text(ids[: k + 1]) for k in range(len(ids))]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_tokens_written_one_by_one_read_as_their_whole_decoding(data: st.DataObject) -> None:
    for vocabulary in (VOCABULARY, BYTE_LEVEL, METASPACE):
        size = len(vocabulary.tokenizer)
        ids = data.draw(st.lists(st.integers(0, min(size, 2000) - 1), max_size=40))
        written = [_sent(text) for text in _written_one_by_one(vocabulary, ids)]
        assert written == [_sent(vocabulary.text(ids[: k + 1])) for k in range(len(ids))]


def test_a_character_split_over_tokens_appears_once_it_is_whole(byte_level: Vocabulary) -> None:
    ids = byte_level.tokenizer("café ☕ now", add_special_tokens=False)["input_ids"]
    steps = _written_one_by_one(byte_level, ids)
    assert steps[-1] == "café ☕ now"
    assert not any("\ufffd" in step for step in steps)  # never a half-written character


def _metaspace() -> Vocabulary:
    """A SentencePiece-style BPE tokenizer (Llama 2's kind: `▁` for a space, bytes for what it has no token for)."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>", *bytes_])
    tokenizer.train_from_iterator(["don't stop me now", "it's a #tbt @united", "the plane was late again"], trainer)
    return Vocabulary(PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>"))


METASPACE = _metaspace()
