"""Structured output: decoding constrained by a grammar, so an answer always parses as the grammar says.

The grammar engine is llguidance (the one llama.cpp, vLLM and SGLang use): a JSON Schema compiles to a grammar,
and for each sequence a matcher gives, at every step, the tokens that keep the text inside the grammar (a bit per
token). The serving engine chooses each constrained row's next token among those its own matcher allows, so
constrained and free sequences share the running batch. When the grammar is complete, the answer ends.

Vocabularies: byte-level BPE and SentencePiece ones (GPT-2, Llama, Qwen) go to llguidance as the fast tokenizer
describes them, and an answer's text is exactly the bytes its tokens spell. A WordPiece vocabulary (BERT, the
packaged MiniLM) records no spaces: here each token is its own text (`##` pieces without the mark, special
tokens none), so a structured answer is the plain concatenation of its tokens, and its strings cannot hold a
space (the vocabulary has no token for one). The JSON parses either way.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmops.generation.vocabulary import CONTINUATION, is_wordpiece

JSON_OBJECT: dict[str, Any] = {"type": "object"}
"""`response_format: {type: json_object}`: any JSON object."""


class GrammarError(ValueError):
    """A schema the grammar engine cannot compile; the message says why."""


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of the JSON documents `schema` admits, compiled once to check it (against a vocabulary:
    `Grammars.check`). Raises GrammarError."""
    import llguidance

    try:
        grammar = str(llguidance.LLMatcher.grammar_from_json_schema(schema))
    except (ValueError, TypeError) as error:
        raise GrammarError(str(error)) from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise GrammarError(problem)
    return grammar


ENCODED_TEXTS = 4096
"""Tokenized texts a WordPiece vocabulary keeps for llguidance."""


@dataclass
class _WordPieces:
    """A WordPiece vocabulary as llguidance's `TokenizerWrapper` reads it: each token's bytes and a tokenizer."""

    tokenizer: Any
    eos_token_id: int
    bos_token_id: int | None
    tokens: list[bytes]
    special_token_ids: list[int]
    encoded: dict[str, list[int]] = field(default_factory=dict)
    """Texts llguidance asked to tokenize (it asks for the same forced pieces, `{"name": `, at every mask)."""

    @classmethod
    def of(cls, tokenizer: Any) -> _WordPieces:
        specials = set(tokenizer.all_special_ids)
        tokens = []
        for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            text = "" if index in specials else token.removeprefix(CONTINUATION)
            tokens.append(text.encode())
        return cls(tokenizer, tokenizer.eos_token_id, tokenizer.bos_token_id, tokens, sorted(specials))

    def __call__(self, text: str) -> list[int]:
        ids = self.encoded.get(text)
        if ids is None:
            if len(self.encoded) >= ENCODED_TEXTS:
                self.encoded.clear()
            ids = self.encoded[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(ids)


BUILT_GRAMMARS = 64
"""Grammars whose start matcher is kept for copying."""


class Grammars:
    """llguidance over one generator's vocabulary: matchers for grammars, masks for a batch of rows, and the text
    of a constrained answer. Building it reads the whole vocabulary (about a second for 150k tokens): the serving
    engine makes one per model version, on first use."""

    def __init__(self, tokenizer: Any):
        import llguidance
        import llguidance.hf

        if is_wordpiece(tokenizer):
            self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_WordPieces.of(tokenizer)))
        else:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self._checked: set[str] = set()
        self._built: dict[str, Any] = {}
        """Matchers at the start of the grammars used last, by grammar (copied for each sequence)."""

    def check(self, grammar: str) -> None:
        """Raises GrammarError where the engine cannot use `grammar` with this vocabulary (checked once)."""
        import llguidance

        if grammar in self._checked:
            return
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(error)
        self._checked.add(grammar)

    def matcher(self, grammar: str) -> Any:
        """A matcher at the start of `grammar`: a copy of one built once per grammar (building one parses the
        grammar, a third of a millisecond for a small JSON schema; a copy, a microsecond)."""
        import llguidance

        built = self._built.pop(grammar, None)
        if built is None:
            built = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if built.is_error():
                raise GrammarError(built.get_error())
        self._built[grammar] = built  # the most recent last
        while len(self._built) > BUILT_GRAMMARS:
            del self._built[next(iter(self._built))]
        return built.deep_copy()

    def masks(self, matchers: list[Any]) -> np.ndarray:
        """(rows, words) int32: bit t of row r says whether matcher r allows token t next."""
        import llguidance.numpy

        bits = llguidance.numpy.allocate_token_bitmask(len(matchers), self.tokenizer.vocab_size)
        for row, matcher in enumerate(matchers):  # on the calling thread: no hand-off to a pool per step
            llguidance.numpy.fill_next_token_bitmask(matcher, bits, row)
        return bits

    @staticmethod
    def allowed(masks: np.ndarray, width: int) -> np.ndarray:
        """(rows, width) bool: the tokens each row of `masks` allows (False past the tokenizer's vocabulary)."""
        bits = np.unpackbits(masks.view(np.uint8), axis=1, count=min(width, masks.shape[1] * 32), bitorder="little")
        if bits.shape[1] < width:
            bits = np.pad(bits, ((0, 0), (0, width - bits.shape[1])))
        return bits.view(bool)

    @staticmethod
    def ids(mask: np.ndarray, width: int) -> np.ndarray:
        """The token ids one row of `masks` allows, below `width` (logits per row: a model's output layer may
        have more entries than its tokenizer has tokens)."""
        return np.flatnonzero(np.unpackbits(mask.view(np.uint8), count=min(width, len(mask) * 32), bitorder="little"))

    def text(self, ids: list[int]) -> str:
        """The answer's text: the bytes its tokens spell, as the grammar read them."""
        return str(self.tokenizer.decode_str(ids)).strip()


_BUILT: weakref.WeakKeyDictionary[Any, Grammars] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def grammars_for(tokenizer: Any) -> Grammars:
    """The `Grammars` of a tokenizer, built once (by whichever thread asks first)."""
    with _LOCK:
        if tokenizer not in _BUILT:
            _BUILT[tokenizer] = Grammars(tokenizer)
        return _BUILT[tokenizer]


def built_grammars(tokenizer: Any) -> Grammars | None:
    """The `Grammars` of a tokenizer if built already (`grammars_for` builds it: about a second for a large
    vocabulary, so callers on an event loop build it on a thread of its own)."""
    return _BUILT.get(tokenizer)
