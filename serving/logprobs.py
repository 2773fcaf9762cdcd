"""Log-probabilities in the shapes OpenAI's clients read: the legacy completions lists and chat's `content`
entries. The values come from the engine (`serving.engine.Sequence.logprobs`, `prompt_logprobs`); this module
only names the tokens and lays them out."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from llmops.generation.decode import TokenLogprob
from serving.openai_schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

_TEXTS: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def token_text(tokenizer: Any, token: int) -> str:
    """One token's own text, special tokens as they are written (`</s>`, `[SEP]`), as vLLM names tokens; a piece
    of a character that several byte-level tokens spell reads as U+FFFD."""
    texts = _TEXTS.setdefault(tokenizer, {})
    if token not in texts:
        texts[token] = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token)])
    return texts[token]


class CompletionLogprobsBuilder:
    """One completion choice's `logprobs`, built as its tokens come (streamed or whole): `text_offset` runs on
    from one piece to the next. Offsets count the tokens' own texts from the start of the choice's `text`."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.offset = 0

    def piece(self, tokens: Sequence[int], entries: Sequence[TokenLogprob | None]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token, entry in zip(tokens, entries, strict=True):
            text = token_text(self.tokenizer, token)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            top = {token_text(self.tokenizer, t): value for t, value in entry.top}
            top[text] = entry.logprob  # the chosen token is always there (OpenAI's "up to logprobs + 1")
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append(top)
        return out

    def written(self, entries: Sequence[TokenLogprob]) -> CompletionLogprobs:
        return self.piece([entry.token for entry in entries], entries)


def _top(tokenizer: Any, token: int, value: float) -> TopLogprob:
    text = token_text(tokenizer, token)
    return TopLogprob(token=text, logprob=value, bytes=list(text.encode()))


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    """Chat's `logprobs` of written tokens: each with its `top_logprobs` (as many as the request asked)."""
    content = [
        ChatTokenLogprob(
            **_top(tokenizer, entry.token, entry.logprob).model_dump(),
            top_logprobs=[_top(tokenizer, t, value) for t, value in entry.top],
        )
        for entry in entries
    ]
    return ChatLogprobs(content=content)
