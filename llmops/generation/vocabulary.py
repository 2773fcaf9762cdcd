"""What a tokenizer's vocabulary means for generation: which tokens may start an answer, which are never
written, and how token ids become the text a person reads.

Byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece (Llama 2, T5) vocabularies decode losslessly: their
text is the tokenizer's own decoding, without the "clean-up" that rewrites ` 's` or ` .` (it changes text that
was written so). A WordPiece vocabulary (BERT, the packaged MiniLM) splits every punctuation mark into a word of
its own and does not record the spaces around it: `@united` and `@ united` are the same tokens. Its text is
rebuilt by :func:`join_wordpieces`, whose spacing rules were chosen by counting the packaged tweets (27k `@name`
against 335 `@ name`, 3.5k `self-driving` against 1.5k ` - `, 7.5k `word:` against 118 `word :`). On the
35.5k plain-ASCII tweets of the packaged corpus, 98.3% of the 674k token boundaries get the spacing the tweet had
and 78% of whole tweets come back exactly, up to the tokenizer's own lower-casing. What cannot come back is what
the tokens do not say: a spaced dash (`great - thanks` reads `great-thanks`), an emoticon after a word
(`great :)` reads `great:)`), a spaced `@ name`.

Every rule looks at the tokens before the current one only, so the text of the first k tokens is a prefix of
the text of k + 1: streamed text equals whole text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from llmops.generation.decode import Barred

CONTINUATION = "##"
"""WordPiece's mark of a piece that continues the word before it."""

_WORD = re.compile(r"^\w+$")
_DIGITS = re.compile(r"^\d+$")
GLUE_LEFT = frozenset(".,!?;:%)]}'/_…")
"""Marks written against the word before them (`great!`, `5%`, `(yes)`, `and/or`)."""
GLUE_RIGHT = frozenset("@#$([{/_<")
"""Marks the next word is written against (`@united`, `#tbt`, `$100`, `(yes`)."""
CONTRACTIONS = frozenset({"s", "t", "m", "re", "ve", "ll", "d"})
"""Words written against an apostrophe that follows a word (`don't`, `i'm`, `united's`)."""
EMOTICON_EYES = frozenset(":;=")
URL_SCHEMES = frozenset({"http", "https", "ftp"})
NUMBER_SEPARATORS = frozenset(".,:/")
"""Between two numbers these join them (`3.5`, `1,000`, `5:30`, `10/10`)."""
URL_ENDERS = frozenset("@#$(")
"""Marks that start a new word after a link (`https://t.co/x @name`, `https://t.co/x $20`)."""
DOMAINS = frozenset({"com", "org", "net", "edu", "gov", "co", "ly", "io", "me", "tv", "uk", "de", "ca", "us"})
"""Written against the dot before them (`inhabitat.com`, `bit.ly`)."""


@dataclass
class _Spacing:
    """What the rules remember of the tokens so far."""

    previous: str = ""
    """The last token's text ("" before the first)."""
    before_previous: str = ""
    glued: bool = False
    """Whether the last token was written against the one before it."""
    quotes: int = 0
    """Double quotes so far: an odd count means one is open."""
    in_url: bool = False


def _is_word(token: str) -> bool:
    return bool(_WORD.match(token))


def _space_before(token: str, state: _Spacing) -> bool:
    """Whether a space goes between the text so far and `token` (a whole word or mark, not a `##` piece)."""
    prev, before = state.previous, state.before_previous
    if not prev:
        return False
    if state.in_url:  # a word right after a word ends the address, and so do a handle, a tag, a price
        return (_is_word(prev) and _is_word(token)) or token in URL_ENDERS
    if token == ":" and prev in URL_SCHEMES:
        return False
    if _DIGITS.match(token) and prev in NUMBER_SEPARATORS and _DIGITS.match(before) and state.glued:
        return False
    if token == prev and not _is_word(token) and state.glued:
        return False  # a mark repeated (`$$`, `**`, `>>`)
    initial = len(token) == 1 == len(before) and _is_word(token) and _is_word(before)
    if prev == "." and _is_word(before) and (token in DOMAINS or initial):
        return not state.glued  # `bit.ly`, `u.s.` (not after an ellipsis: `wait... ca`)
    if prev in ".'" and not state.glued:
        return False  # `.@name` opening a tweet, an opening single quote
    if token == "+" and _DIGITS.match(prev):
        return False  # `18+`
    if token == '"':
        return state.quotes % 2 == 0  # an opening quote has a space before it, a closing one none
    if prev == '"':
        return state.quotes % 2 == 0  # the word after an opening quote is written against it
    if token == "-":
        return not (_is_word(prev) or prev in EMOTICON_EYES)
    if prev == "-":
        return not state.glued
    if token == "'":
        return not _is_word(prev)
    if prev == "'":
        return not (state.glued and token in CONTRACTIONS)
    if token in "()" and (prev in EMOTICON_EYES or (prev == "-" and before in EMOTICON_EYES)):
        return False
    if token in ":;":
        return not (_is_word(prev) or _DIGITS.match(prev))  # `rt @name:`, `5:30`; after a mark, `great! :)`
    if token in GLUE_LEFT:
        return False
    return prev not in GLUE_RIGHT


def _remember(state: _Spacing, token: str, space: bool) -> None:
    if token == '"':
        state.quotes += 1
    if state.in_url and space:
        state.in_url = False
    elif token == ":" and state.previous in URL_SCHEMES and not space:
        state.in_url = True
    state.glued = not space and bool(state.previous)  # the first token is glued to nothing
    state.before_previous, state.previous = state.previous, token


def join_wordpieces(tokens: list[str]) -> str:
    """WordPiece tokens (special tokens already left out) -> text, with the spacing a tweet would have."""
    state = _Spacing()
    return "".join(_written(state, token) for token in tokens)


def _written(state: _Spacing, token: str) -> str:
    """What one more WordPiece token adds to the text: itself, a space before it or not, or a word's piece."""
    if token.startswith(CONTINUATION) and len(token) > len(CONTINUATION):
        piece = token[len(CONTINUATION) :]
        # the word goes on: keep the rules' view of it whole ("abc" + "##12" is one word)
        state.previous = state.previous + piece if _is_word(state.previous + piece) else piece
        return piece
    space = _space_before(token, state)
    _remember(state, token, space)
    return " " + token if space else token


def is_wordpiece(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's decoder is WordPiece's (BERT and its family)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "WordPiece"


class Vocabulary:
    """A generator's tokenizer seen from decoding: the text of token ids, and the tokens an answer may not use.

    - `never`: special tokens other than the end token (padding, start, unknown, mask): they carry no text, and
      an answer made of them reads as empty; and WordPiece tokens its tokenizer never makes from text (BERT's
      `[unused0]` to `[unused993]`): a model that writes one has a row no training moved, and a reader sees
      `[unused80]`.
    - `not_first`: tokens an answer may not start with: WordPiece continuation pieces (`##2015` would be glued to
      the prompt) and tokens whose text is only whitespace. The end token is barred at the start separately, by
      the minimum length (an empty answer is allowed only when the caller asks for `min_tokens: 0`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        self.wordpiece = is_wordpiece(tokenizer)
        specials = set(tokenizer.all_special_ids)
        vocab = {index: token for token, index in tokenizer.get_vocab().items() if index not in specials}
        self.never = sorted((specials - {self.eos_id}) | self._unwritten(vocab))
        self.not_first = sorted(self._not_first(vocab))
        self.hidden = frozenset(self.never) | {self.eos_id}
        """Tokens `text` and `AnswerText` leave out."""

    def _unwritten(self, vocab: dict[int, str]) -> set[int]:
        """WordPiece tokens the tokenizer's own pre-tokenizer would split (BERT's splits every punctuation mark off
        as a word of its own): no text becomes them."""
        pre = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
        if not self.wordpiece or pre is None:
            return set()
        bodies = {i: token.removeprefix(CONTINUATION) for i, token in vocab.items()}
        return {i for i, body in bodies.items() if not body.isalnum() and len(pre.pre_tokenize_str(body)) > 1}

    def _not_first(self, vocab: dict[int, str]) -> set[int]:
        if self.wordpiece:
            return {i for i, token in vocab.items() if token.startswith(CONTINUATION) and len(token) > 2}
        ids = sorted(vocab)  # one batched decode: a 150k vocabulary decoded token by token takes seconds
        texts = self.tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
        return {i for i, text in zip(ids, texts, strict=True) if not text.strip()}

    @property
    def barred(self) -> Barred:
        return Barred(self.eos_id, tuple(self.never), tuple(self.not_first))

    def text(self, ids: list[int]) -> str:
        """Token ids as text, special tokens left out, without leading or trailing whitespace."""
        if not self.wordpiece:
            text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            return str(text).strip()
        tokens = self.tokenizer.convert_ids_to_tokens([i for i in ids if i not in self.hidden])
        return join_wordpieces(list(tokens)).strip()


class AnswerText:
    """The text of an answer as its tokens come: `add(token)` gives `Vocabulary.text` of all of them so far, at
    a cost a token that does not grow with the answer.

    Decoding the whole answer again at each token (as the serving engine did) cost 66 us a token on average over
    a 64-token answer and 92 us at its 64th (packaged vocabulary, 2 cores, measured), a cost that grows with the
    answer and is paid on the engine's thread between passes, by every running row. WordPiece text is rebuilt
    by the same rules one token at a time (each looks back only). Other vocabularies go through the tokenizers
    library's `DecodeStream`, which decodes a few tokens of context to place each new one's text and holds back
    a character whose bytes are not all written: an answer cut inside one ends before it (the whole decoding
    would end it in U+FFFD). A tokenizer without a Rust backend decodes the whole answer each time, as before.
    """

    def __init__(self, vocabulary: Vocabulary):
        self._vocabulary = vocabulary
        self._written = ""
        self._ids: list[int] = []
        self._spacing = _Spacing() if vocabulary.wordpiece else None
        backend = getattr(vocabulary.tokenizer, "backend_tokenizer", None)
        self._stream = (
            (DecodeStream(skip_special_tokens=True), backend)
            if backend is not None and not vocabulary.wordpiece
            else None
        )

    def add(self, token: int) -> str:
        """The answer's text with `token` written, without leading or trailing whitespace."""
        vocabulary = self._vocabulary
        if self._spacing is not None:
            if token not in vocabulary.hidden:
                self._written += _written(self._spacing, str(vocabulary.tokenizer.convert_ids_to_tokens(token)))
        elif self._stream is not None:
            stream, backend = self._stream
            self._written += stream.step(backend, token) or ""
        else:
            self._ids.append(token)
            return vocabulary.text(self._ids)
        return self._written.strip()
