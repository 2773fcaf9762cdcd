"""Token-by-token decoding for decoder-only models: one prefill, then one forward pass per new token.

transformers' `generate()` is built for every model and every decoding strategy; for a small model on CPU its
per-step bookkeeping costs more than the model itself (measured on the quickstart's int8 student at batch 1: 415
tokens/s through `generate()`, 961 through this loop, same greedy tokens). This loop does what the lifecycle and
serving need and nothing more: greedy or temperature / top-p sampling, a minimum length, tokens an answer may
not use (:class:`Barred`), stop at the end-of-text token, a key/value cache, left-padded batches with their
position ids. Seq2seq models keep `generate()`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import torch
from transformers import DynamicCache

from llmops.generation.adapters import AdapterError, Adapters

GREEDY_BELOW = 1e-6


@dataclass(frozen=True)
class Barred:
    """Tokens an answer may not use (`llmops.generation.vocabulary.Vocabulary.barred` says which).

    `never` at any step; `not_first` at the first; the end token until the answer has `min_new_tokens` tokens
    (1 by default everywhere: an answer is empty only when the caller asks for `min_new_tokens=0`).
    """

    eos_id: int
    never: tuple[int, ...] = ()
    not_first: tuple[int, ...] = ()

    def at(self, count: int, min_new_tokens: int) -> list[int]:
        """Tokens barred, beyond `never`, when choosing the `count`-th new token (0: the first)."""
        barred = list(self.not_first) if count == 0 else []
        return [*barred, self.eos_id] if count < min_new_tokens else barred

    @cached_property
    def _never(self) -> np.ndarray:
        """`never` as an index array, made once: a WordPiece vocabulary bars about a thousand tokens, and turning
        their tuple into an index at every step took about a fifth of the serving engine's own time per token."""
        return np.asarray(self.never, dtype=np.int64)

    def forbid_always(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (batch, vocab) with `never` at -inf, in place (through numpy on the CPU: see `argmax_rows`)."""
        if self.never and numpy_ready(logits):
            logits.numpy()[:, self._never] = -np.inf
        elif self.never:
            logits[:, torch.from_numpy(self._never).to(logits.device)] = float("-inf")
        return logits


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token (batch,). Float32 logits on the CPU go through numpy, on the calling thread
    alone: torch would split a batch's rows over its OpenMP team, whose threads then spin at their barrier beside
    a runtime with threads of its own. Serving llama.cpp's q8_0 135M Llama at 16 sequences on 2 cores, torch's
    idle team took 14% of a core, and ggml's threads, each waiting on the other at every barrier, lost a third
    of their speed (345 -> 461 tokens/s in-process)."""
    if numpy_ready(logits):
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def take_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`logits[rows]`, through numpy on the CPU for the reason `argmax_rows` gives."""
    if numpy_ready(logits):
        return torch.from_numpy(logits.numpy()[rows])
    return logits[rows]


def numpy_ready(logits: torch.Tensor) -> bool:
    """Whether `logits` can be read and written through numpy without a copy."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (its raw logits' log-softmax: no temperature, no barred tokens),
    and the `top` most likely tokens at that position with theirs, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax_rows(logits: torch.Tensor) -> np.ndarray:
    """(rows, vocab) float32 log-probabilities, through numpy for the reason `argmax_rows` gives."""
    values = logits.numpy() if numpy_ready(logits) else logits.float().cpu().numpy()
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprob(logprobs: np.ndarray, token: int, top: int) -> TokenLogprob:
    """`token`'s entry at one position of `log_softmax_rows` (vocab,), with the `top` most likely tokens."""
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        head = np.argpartition(-logprobs, top - 1)[:top] if top < len(logprobs) else np.arange(len(logprobs))
        head = head[np.argsort(-logprobs[head], kind="stable")]
        best = tuple((int(i), float(logprobs[i])) for i in head)
    return TokenLogprob(int(token), float(logprobs[token]), best)


def prompt_token_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob | None]:
    """Each prompt token's entry given the tokens before it, from the logits at every position (len(ids), vocab):
    None for the first token, which nothing predicts."""
    logprobs = log_softmax_rows(logits[: len(ids) - 1])
    return [None, *(token_logprob(row, token, top) for row, token in zip(logprobs, ids[1:], strict=True))]


def choose(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row. logits: (batch, vocab). Returns (batch,) token ids.

    temperature 0 is greedy; otherwise sample from the softmax at `temperature`, restricted to the smallest set
    of tokens whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020). A temperature under
    `GREEDY_BELOW` is greedy too: it would make the same choice, but dividing by it overflows to inf and NaN.
    """
    if temperature < GREEDY_BELOW:
        return argmax_rows(logits)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        outside[..., 0] = False  # the most likely token always stays (a top_p under float32's range reads as 0)
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def pick(
    logits: torch.Tensor,
    barred: list[int],
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token, never one of `barred`; and the token each row chose before that rule (batch,).

    A row that chose a barred token chooses again with it removed: for sampling, that is the model's
    distribution given that the token is not barred. Keeping the first choice lets evaluation count the answers a
    model would have ended before writing anything.
    """
    first = choose(logits, temperature, top_p, generator)
    if not barred:
        return first, first
    barred_ids = torch.tensor(barred, device=logits.device)
    again = torch.isin(first, barred_ids)
    if not bool(again.any()):
        return first, first
    tokens = first.clone()
    tokens[again] = choose(logits[again].index_fill(1, barred_ids, float("-inf")), temperature, top_p, generator)
    return tokens, first


@dataclass(frozen=True)
class Decoded:
    """What decoding wrote: new token ids per row (ending with the end token where the row stopped by itself),
    and per row whether the model's own first choice was the end token (an answer it would have left empty)."""

    ids: list[list[int]]
    chose_end_first: list[bool]


@contextmanager
def head_inputs(model: Any) -> Iterator[list[torch.Tensor]]:
    """Collects what the output layer reads on each forward pass inside the block: the hidden state the next token
    is chosen from. At a prompt's last token it is the model's embedding of the prompt (monitoring's drift input)."""
    caught: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _, args: caught.append(args[0])) if head is not None else None
    try:
        yield caught
    finally:
        if hook is not None:
            hook.remove()


def _accepts(model: Any, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


@dataclass
class Batch:
    """The running state of a batch of sequences: their attention mask and their key/value cache.

    Invariant between steps: the mask is as wide as the cache is long. Rows are left-padded, so every row's
    next token goes in the last column; a row's position is its count of real tokens.
    """

    attention_mask: torch.Tensor
    """(batch, width): 0 on the left padding"""
    cache: Any

    def __len__(self) -> int:
        return len(self.attention_mask)


@torch.inference_mode()
def prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Batch]:
    """Run the left-padded prompts once; returns the last position's logits (batch, vocab) and the state."""
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=DynamicCache(),
        use_cache=True,
        **extra,
    )
    return out.logits[:, -1, :], Batch(attention_mask, out.past_key_values)


@torch.inference_mode()
def step(model: Any, tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Feed one new token per row (batch,); returns the next logits (batch, vocab)."""
    batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(len(tokens), 1)], dim=1)
    positions = batch.attention_mask.sum(dim=1, keepdim=True) - 1
    out = model(
        input_ids=tokens[:, None],
        attention_mask=batch.attention_mask,
        position_ids=positions,
        past_key_values=batch.cache,
        use_cache=True,
    )
    batch.cache = out.past_key_values
    return out.logits[:, -1, :]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def join(first: Batch, second: Batch) -> Batch:
    """One batch of both batches' rows (first's, then second's), the narrower one padded on the left: how new
    sequences enter a running batch between two steps (continuous batching)."""
    width = max(first.attention_mask.shape[1], second.attention_mask.shape[1])
    mask = torch.cat([_pad_left(b.attention_mask, width, 1) for b in (first, second)], dim=0)
    for mine, theirs in zip(first.cache.layers, second.cache.layers, strict=True):
        mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)], dim=0)
        mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)], dim=0)
    return Batch(mask, first.cache)


def keep_rows(batch: Batch, rows: list[int]) -> Batch:
    """The batch with only `rows`, in that order (finished sequences leave it), and without the left columns that
    have become padding in every row."""
    index = torch.tensor(rows, dtype=torch.long, device=batch.attention_mask.device)
    mask = batch.attention_mask.index_select(0, index)
    start = int((mask.sum(dim=0) > 0).nonzero()[0]) if len(rows) else 0
    for layer in batch.cache.layers:
        layer.keys = layer.keys.index_select(0, index)[..., start:, :]
        layer.values = layer.values.index_select(0, index)[..., start:, :]
    return Batch(mask[:, start:], batch.cache)


class RunningBatch(Protocol):
    """The running sequences of the serving engine, in a runtime: rows in the order they joined."""

    def admit(
        self, prompts: list[list[int]], adapters: list[str | None] | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """New rows for `prompts` (each with the LoRA adapter `adapters` names, or none): their next-token logits
        (n, vocab) and, when kept, the prompts' embeddings."""
        ...

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token to every row (in row order); the next logits (rows, vocab)."""
        ...

    def step_and_admit(
        self, tokens: list[int], prompts: list[list[int]], adapters: list[str | None] | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """`step(tokens)` and `admit(prompts)` in one pass where the runtime can (llama.cpp): the next logits of
        every row (the running ones, then the new ones) and, when kept, the new prompts' embeddings. `adapters`
        names each new row's LoRA adapter (`llmops.generation.adapters`; None: the base alone)."""
        ...

    def full(self, row: int) -> bool:
        """Whether the row has no room for another token."""
        ...

    def score(self, ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """Logits at every position of one sequence (len(ids), vocab), teacher-forced, leaving the rows alone
        (prompt logprobs)."""
        ...

    def keep(self, rows: list[int]) -> None:
        """Only `rows` stay, in that order."""
        ...


def step_then_admit(
    batch: RunningBatch, tokens: list[int], prompts: list[list[int]], adapters: list[str | None] | None = None
) -> tuple[torch.Tensor, np.ndarray | None]:
    """`RunningBatch.step_and_admit` for a runtime whose passes take one shape at a time: a step, then a prefill."""
    logits, embeddings = [batch.step(tokens)] if tokens else [], None
    if prompts:
        joined, embeddings = batch.admit(prompts, adapters)
        logits.append(joined)
    return torch.cat(logits), embeddings


def no_adapters(adapters: Sequence[str | None] | None, runtime: str) -> None:
    """A runtime that runs no LoRA adapters refuses rows that ask for one."""
    if adapters and any(adapters):
        raise AdapterError(f"the {runtime} runtime runs no LoRA adapters (they are served over a torch base)")


class Running:
    """The serving engine's running batch over a torch decoder: sequences join (one prefill for all that join at
    once, merged into the batch by `join`), step together, and leave (`keep_rows`) at any step; each row with its
    own LoRA adapter or none (`adapters`). `llmops.generation.llamacpp.Slots` is the same over llama.cpp."""

    def __init__(
        self, model: Any, pad_id: int, device: torch.device, embeddings: bool = False, adapters: Adapters | None = None
    ):
        self.model, self.pad_id, self.device, self.embeddings = model, pad_id, device, embeddings
        self.adapters = adapters if adapters is not None else Adapters(model)
        self._batch: Batch | None = None
        self._keys: list[str | None] = []
        """Each row's adapter."""

    @torch.inference_mode()
    def admit(
        self, prompts: list[list[int]], adapters: list[str | None] | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """New rows for `prompts`, left-padded into one prefill: their next-token logits (n, vocab) and, when
        asked, the prompts' embeddings (n, hidden: the output layer's input at the last prompt token)."""
        keys: list[str | None] = list(adapters) if adapters else [None] * len(prompts)
        width = max(len(ids) for ids in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        starts = torch.tensor([width - len(p) for p in prompts])
        mask = (torch.arange(width)[None, :] >= starts[:, None]).long()
        capture: AbstractContextManager[list[torch.Tensor]] = (
            head_inputs(self.model) if self.embeddings else nullcontext([])
        )
        with capture as caught, self.adapters.routed(keys):
            logits, batch = prefill(self.model, ids.to(self.device), mask.to(self.device))
        self._batch = batch if self._batch is None else join(self._batch, batch)
        self._keys += keys
        embeddings = caught[0][:, -1, :].float().cpu().numpy() if caught else None
        return logits, embeddings

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token to every row (in row order); the next logits (rows, vocab)."""
        assert self._batch is not None
        with self.adapters.routed(self._keys):
            return step(self.model, torch.tensor(tokens, device=self.device), self._batch)

    def step_and_admit(
        self, tokens: list[int], prompts: list[list[int]], adapters: list[str | None] | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        return step_then_admit(self, tokens, prompts, adapters)

    def full(self, row: int) -> bool:
        return False  # the model's own context is checked before a sequence is admitted

    @torch.inference_mode()
    def score(self, ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """Logits at every position of one sequence (len(ids), vocab), in a pass of its own."""
        with self.adapters.routed([adapter]):
            return self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float().cpu()

    def keep(self, rows: list[int]) -> None:
        """Only `rows` stay, in that order."""
        self._keys = [self._keys[row] for row in rows]
        if not rows:
            self._batch = None
        elif self._batch is not None:
            self._batch = keep_rows(self._batch, rows)


@torch.inference_mode()
def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    min_new_tokens: int = 1,
    generator: torch.Generator | None = None,
    barred: Barred | None = None,
) -> Decoded:
    """New token ids per row, each ending with `eos_id` when the row stopped by itself, never a `barred` token."""
    barred = barred or Barred(eos_id)
    logits, batch = prefill(model, input_ids, attention_mask)
    written: list[list[int]] = [[] for _ in range(len(batch))]
    finished = torch.zeros(len(batch), dtype=torch.bool, device=input_ids.device)
    chose_end_first: list[bool] = []
    for count in range(max_new_tokens):
        now_barred = barred.at(count, min_new_tokens)
        tokens, own = pick(barred.forbid_always(logits), now_barred, temperature, top_p, generator)
        if count == 0:
            chose_end_first = (own == eos_id).tolist()
        for row, token in enumerate(tokens.tolist()):
            if not finished[row]:
                written[row].append(token)
        finished |= tokens == eos_id
        if bool(finished.all()) or count + 1 == max_new_tokens:
            break
        logits = step(model, tokens, batch)
    return Decoded(written, chose_end_first)
