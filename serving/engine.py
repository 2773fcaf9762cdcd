"""Continuous batching for a generator: sequences join and leave the running batch at every decoding step.

One engine per loaded model version, on one inference thread. Each loop: choose every running sequence's next
token (a sequence that wrote its end token, a stop string or its last allowed token leaves at once, one whose
client went away at the next loop), then one pass of the runtime over those tokens and the prompts of the
waiting sequences that join (llama.cpp runs both in one batch, as llama-server does; torch and OpenVINO step,
then prefill). A short request never waits for a long one to finish.

transformers ships a continuous-batching API (`generate_batch`, `transformers serve --continuous-batching`):
it cannot serve a torch-int8 champion, ignores `min_new_tokens`, and on this project's CPU wrote 0.6x the
tokens of this engine on the same fp32 weights at 16 concurrent requests (bench/generation_serving.py). So the
engine is the smallest scheduler that does the job: bounded running and waiting sets, per-sequence sampling and
seeds, streaming of text as it forms. The runtime holds the running sequences' state behind
`Generator.running_batch`: torch's key/value cache (`llmops.generation.decode.Running`: prefill, join,
keep_rows) or llama.cpp's slots (`llmops.generation.llamacpp.Slots`, its batch API, as llama-server drives it).
Sampling, stop strings and streaming are the engine's either way, so a GGUF champion answers under the same
rules. Decoder-only models batch; a seq2seq model answers one sequence at a time through `generate_ids`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from llmops.generation.candidate import GenerationParams, Generator
from llmops.generation.constrained import Grammars, grammars_for
from llmops.generation.decode import (
    TokenLogprob,
    argmax_rows,
    log_softmax_rows,
    pick,
    prompt_token_logprobs,
    take_rows,
    token_logprob,
)
from llmops.generation.vocabulary import AnswerText

log = logging.getLogger(__name__)
T = TypeVar("T")
REPLACEMENT = "\ufffd"
"""What a tokenizer decodes an incomplete UTF-8 character to."""


class EngineFull(RuntimeError):
    """The waiting queue is full: come back later."""


class EngineClosed(RuntimeError):
    """The engine's version was replaced and its thread has ended: submit to the current version's engine."""


@dataclass(frozen=True)
class Event:
    """What a sequence's reader gets as it forms: new text, and the reason it ended on the last event."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    """The tokens written since the last event, with their log-probabilities (when the request asked)."""


@dataclass
class Sequence:
    """One request's generation, from its prompt tokens to its last event."""

    prompt_ids: list[int]
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    written: list[int] = field(default_factory=list)
    """Token ids of the answer (the end token not included)."""
    answer: AnswerText | None = None
    """The answer's text, kept as its tokens come (made at the first)."""
    generated: int = 0
    """Tokens the model produced, the end token included: the answer's `completion_tokens`."""
    emitted: int = 0
    """Characters of text already sent."""
    cancelled: bool = False
    """Set by the reader (client gone): the sequence leaves at the next step."""
    finish_reason: str | None = None
    text: str = ""
    submitted: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    """When it left the queue for the running batch (its prompt's pass follows)."""
    first_token_at: float | None = None
    finished_at: float | None = None
    rng: torch.Generator | None = None
    chose_end_first: bool = False
    """The model's own first choice was the end token (barred by the minimum length: see `decode.Barred`)."""
    context: Any = None
    """What the caller needs back when the sequence ends, opaque to the engine (serving: `service.Origin`)."""
    embedding: np.ndarray | None = None
    """The prompt's embedding (the output layer's input at its last token), when the engine logs embeddings."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Each token the model produced (the end token included), when `params.logprobs` asks."""
    sent_logprobs: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """Each prompt token's, the first None, when `params.prompt_logprobs` asks: set before the first event."""
    matcher: Any = None
    """Where the answer is in its grammar (`params.grammar`): llguidance's matcher, made when the sequence joins."""
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted

    def send(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def unsent_logprobs(self) -> tuple[TokenLogprob, ...]:
        new = tuple(self.logprobs[self.sent_logprobs :])
        self.sent_logprobs = len(self.logprobs)
        return new


class GenerationEngine:
    """Continuous batching over one loaded generator (see the module docstring)."""

    def __init__(
        self,
        generator: Generator,
        *,
        max_running: int,
        max_waiting: int,
        continuous: bool = True,
        embeddings: bool = False,
        max_positions: int | None = None,
        on_finish: Callable[[Sequence], None] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ):
        self.generator = generator
        self.max_running = max_running if continuous and generator.task == "causal-lm" else 1
        self.max_waiting = max_waiting
        self.embeddings = embeddings
        """Keep each prompt's embedding (the output layer's input at its last token) for the prediction log."""
        self.on_finish = on_finish
        self.on_step = on_step
        """Called with (running, waiting) after every step, for metrics."""
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._batch = generator.running_batch(self.max_running, embeddings, max_positions)
        """The running sequences' state in the runtime (torch's KV cache, llama.cpp's slots), row for row."""
        self._logits: torch.Tensor | None = None
        self._grammars: Grammars | None = None
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        """Work for the inference thread between two steps (attaching a LoRA adapter), with its outcome."""
        self._released: set[str] = set()
        """Adapters no new sequence will ask for: detached once no sequence uses them."""
        self._wake = threading.Condition()
        self._stopping = False
        self._retiring = False
        self.closed = False
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        loop: asyncio.AbstractEventLoop,
        context: Any = None,
    ) -> Sequence:
        """Queue a sequence; its events arrive on `sequence.events` in `loop`. Raises EngineFull, EngineClosed."""
        sequence = Sequence(prompt_ids, params, loop, context=context)
        if params.seed is not None:
            sequence.rng = torch.Generator(self.generator.device).manual_seed(params.seed)
        with self._wake:
            if self.closed:
                raise EngineClosed("this version's engine has stopped")
            if len(self._waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self._waiting)} sequences are waiting (serve.max_waiting)")
            self._waiting.append(sequence)
            self._wake.notify()
        return sequence

    def stop(self) -> None:
        """Finish nothing more: the thread ends after its current step."""
        with self._wake:
            self._stopping = True
            self.closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def retire(self) -> None:
        """A newer version serves now: finish the sequences this engine has, then end its thread."""
        with self._wake:
            self._retiring = True
            self._wake.notify()

    def call(self, function: Callable[[], T]) -> T:
        """`function()` on the inference thread between two steps, where no pass is under way (blocking): how a
        LoRA adapter is attached to the running model. Raises what it raises, or `EngineClosed`."""
        outcome: Future[T] = Future()
        with self._wake:
            if self.closed or self._retiring:
                raise EngineClosed("this version's engine has stopped")
            self._calls.append((function, outcome))
            self._wake.notify()
        return outcome.result()

    def release_adapter(self, key: str) -> None:
        """No new sequence asks for adapter `key` (its version was replaced): detach it once none uses it."""
        with self._wake:
            self._released.add(key)
            self._wake.notify()

    # --- the inference thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self._running or self._stopping or self._calls or self._released):
                    if self._retiring:
                        self.closed = True
                        return
                    self._wake.wait()
                if self._stopping:
                    self._end_calls()
                    return
                calls = [self._calls.popleft() for _ in range(len(self._calls))]
            for function, outcome in calls:
                try:
                    outcome.set_result(function())
                except BaseException as error:  # the caller's to handle
                    outcome.set_exception(error)
            self._detach_released()
            if not (self._waiting or self._running):
                continue
            try:
                self._iterate()
            except Exception as error:  # a failed step fails its sequences, never the thread
                log.exception("generation step failed")
                for sequence in [*self._running]:
                    self._finish(sequence, "error", error_text=f"{type(error).__name__}: {error}")
                self._batch.keep([])
                self._running, self._logits = [], None
            if self.on_step is not None:
                self.on_step(len(self._running), len(self._waiting))

    def _end_calls(self) -> None:
        while self._calls:
            self._calls.popleft()[1].set_exception(EngineClosed("this version's engine has stopped"))

    def _detach_released(self) -> None:
        adapters = self.generator.adapters
        if not self._released:
            return
        with self._wake:
            used = {s.params.adapter for s in (*self._running, *self._waiting)}
            gone = self._released - used
            self._released -= gone
        if adapters is not None:
            for key in gone:
                adapters.detach(key)

    @torch.inference_mode()
    def _iterate(self) -> None:
        self._drop_cancelled()
        admitted = self._admit()
        if self.generator.task != "causal-lm":
            for sequence in admitted:
                self._whole(sequence)
            return
        staying = self._decode_step() if self._running else []
        if staying or admitted:
            self._forward(staying, admitted)

    def _admit(self) -> list[Sequence]:
        with self._wake:
            room = self.max_running - len(self._running)
            admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        now = time.perf_counter()
        for sequence in admitted:
            sequence.admitted_at = now
        return [s for s in admitted if not s.cancelled]

    def _drop_cancelled(self) -> None:
        gone = [i for i, s in enumerate(self._running) if s.cancelled]
        if gone:
            self._leave(gone)

    def _forward(self, tokens: list[int], joining: list[Sequence]) -> None:
        """One pass of the runtime: the running rows' next tokens and the joining sequences' prompts together
        (llama.cpp runs them in one batch, as llama-server's slots do); the next logits of every row."""
        joining = [s for s in joining if self._attached(s) and self._score_prompt(s) and self._constrain(s)]
        try:
            prompts, adapters = [s.prompt_ids for s in joining], [s.params.adapter for s in joining]
            self._logits, embeddings = self._batch.step_and_admit(tokens, prompts, adapters)
        finally:
            self._running += joining  # a failed pass fails the joining sequences with the running ones
        if embeddings is not None:
            for sequence, vector in zip(joining, embeddings, strict=True):
                sequence.embedding = vector

    def _attached(self, sequence: Sequence) -> bool:
        """False for a sequence whose adapter was detached before it joined (it has ended, asked to try again)."""
        adapters, key = self.generator.adapters, sequence.params.adapter
        if key is None or (adapters is not None and key in adapters.keys):
            return True
        self._finish(sequence, "error", error_text=f"adapter {key} is no longer served here: try again")
        return False

    def _score_prompt(self, sequence: Sequence) -> bool:
        """The prompt tokens' log-probabilities where the sequence asks (teacher-forced, in a pass of their own);
        False when that pass failed (the sequence has ended with the error)."""
        top = sequence.params.prompt_logprobs
        if top is None:
            return True
        try:
            scored = self._batch.score(sequence.prompt_ids, sequence.params.adapter)
            sequence.prompt_logprobs = prompt_token_logprobs(scored, sequence.prompt_ids, top)
        except Exception as error:
            log.exception("scoring a prompt failed")
            self._finish(sequence, "error", error_text=f"{type(error).__name__}: {error}")
            return False
        return True

    def _constrain(self, sequence: Sequence) -> bool:
        """A matcher for a sequence with a grammar; False when that failed (the sequence has ended with the error)."""
        if sequence.params.grammar is None:
            return True
        try:
            if self._grammars is None:
                self._grammars = grammars_for(self.generator.tokenizer)
            sequence.matcher = self._grammars.matcher(sequence.params.grammar)
        except Exception as error:
            self._finish(sequence, "error", error_text=f"{type(error).__name__}: {error}")
            return False
        return True

    def _masks(self, tokens: list[int]) -> dict[int, np.ndarray]:
        """The bitmask of the tokens its grammar allows next, for each constrained row that needs one: a greedy
        row whose own first choice (`tokens`) its grammar takes needs none (a check of one token costs about a
        microsecond, a mask over the vocabulary hundreds: inside a string the first choice is nearly always
        allowed). Sampled rows always get one."""
        rows = [
            row
            for row, sequence in enumerate(self._running)
            if sequence.matcher is not None
            and (sequence.params.temperature > 0 or not sequence.matcher.validate_tokens([tokens[row]]))
        ]
        if not rows:
            return {}
        assert self._grammars is not None
        masks = self._grammars.masks([self._running[row].matcher for row in rows])
        return dict(zip(rows, masks, strict=True))

    def _best_allowed(self, logits: torch.Tensor, rows: list[int], masks: dict[int, np.ndarray]) -> list[int]:
        """For each of `rows`, the token with the highest logit among those its mask allows."""
        assert self._grammars is not None
        allowed = self._grammars.allowed(np.stack([masks[row] for row in rows]), logits.shape[1])
        chosen = logits.index_select(0, torch.tensor(rows, device=logits.device))
        chosen = chosen.masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))
        return argmax_rows(chosen).tolist()

    def _sampled(self, logits: torch.Tensor, row: int, mask: np.ndarray, sequence: Sequence) -> int:
        """A sampled constrained row's next token under its temperature and top-p, among those `mask` allows."""
        assert self._grammars is not None
        ids = self._grammars.ids(mask, logits.shape[1])
        index = torch.from_numpy(ids).to(logits.device)
        masked = torch.full_like(logits[row : row + 1], float("-inf"))
        masked[0, index] = logits[row, index]
        chosen, _ = pick(masked, [], sequence.params.temperature, sequence.params.top_p, sequence.rng)
        return int(chosen[0])

    def _choose(self) -> tuple[list[int], list[int]]:
        """Each running sequence's next token under its own sampling and the tokens barred at its length (and its
        log-probability under the model, where the sequence asks); and the rows whose grammar allows no token."""
        assert self._logits is not None
        barred = self.generator.barred
        asking = [row for row, sequence in enumerate(self._running) if sequence.params.logprobs is not None]
        model_logprobs = log_softmax_rows(take_rows(self._logits, asking)) if asking else None  # before barring
        logits = barred.forbid_always(self._logits)
        tokens = argmax_rows(logits).tolist()
        masks = self._masks(tokens)
        stuck = [row for row, mask in masks.items() if not mask.any()]
        refused = [row for row in masks if row not in stuck and self._running[row].params.temperature <= 0]
        if refused:  # greedy rows whose first choice the grammar refused: the best allowed, in one masked argmax
            for row, token in zip(refused, self._best_allowed(logits, refused, masks), strict=True):
                tokens[row] = token
        for row, sequence in enumerate(self._running):
            params = sequence.params
            if sequence.matcher is not None:  # its grammar decides alone what may come next, the end token included
                if row in masks and row not in stuck and row not in refused:
                    tokens[row] = self._sampled(logits, row, masks[row], sequence)
                continue
            now_barred = barred.at(sequence.generated, params.min_new_tokens)
            own = tokens[row]  # greedy, and no barred token chosen: `pick` would choose the same
            if params.temperature > 0 or own in now_barred:
                chosen, first = pick(logits[row : row + 1], now_barred, params.temperature, params.top_p, sequence.rng)
                tokens[row], own = int(chosen[0]), int(first[0])
            if sequence.generated == 0:
                sequence.chose_end_first = own == barred.eos_id
        for index, row in enumerate(asking):
            sequence = self._running[row]
            assert model_logprobs is not None and sequence.params.logprobs is not None
            sequence.logprobs.append(token_logprob(model_logprobs[index], tokens[row], sequence.params.logprobs))
        return tokens, stuck

    def _decode_step(self) -> list[int]:
        """Choose every running sequence's next token and send its text; the finished ones leave. The tokens of
        the rows that stay, for the next pass."""
        tokens, stuck = self._choose()
        now = time.perf_counter()
        leaving = []
        for row, (sequence, token) in enumerate(zip(self._running, tokens, strict=True)):
            if sequence.first_token_at is None:
                sequence.first_token_at = now
            if row in stuck:
                why = "the schema asks for text this model's vocabulary cannot write"
                self._finish(sequence, "error", error_text=f"{why} (after {sequence.text!r})")
                leaving.append(row)
            elif self._advance(sequence, token):
                leaving.append(row)
            elif self._batch.full(row):  # the runtime's cache for it is spent: the answer ends here
                self._finish(sequence, "length")
                leaving.append(row)
        if leaving:
            self._leave(leaving)
        return [token for row, token in enumerate(tokens) if row not in leaving]

    def _advance(self, sequence: Sequence, token: int) -> bool:
        """Add a token, send the text it completes; True when the sequence is done."""
        generator, params = self.generator, sequence.params
        sequence.generated += 1
        if token == generator.eos_id:
            self._finish(sequence, "stop")
            return True
        sequence.written.append(token)
        if sequence.matcher is not None:
            return self._advance_constrained(sequence, token)
        if sequence.answer is None:
            sequence.answer = AnswerText(generator.vocabulary)
        text = sequence.answer.add(token)
        hits = [text.index(s) for s in params.stop if s and s in text]
        if hits:
            sequence.text = text[: min(hits)].rstrip()
            self._finish(sequence, "stop")
            return True
        sequence.text = text
        if sequence.generated >= params.max_new_tokens:
            self._finish(sequence, "length")
            return True
        # hold back what could be the start of a stop string (it may not be sent), and a character whose bytes
        # are not all written yet (byte-level vocabularies split one over several tokens)
        hold = max((len(s) - 1 for s in params.stop), default=0)
        ready = len(text.rstrip(REPLACEMENT)) - hold
        if ready > sequence.emitted:
            sequence.send(Event(text[sequence.emitted : ready], sequence.generated, None, sequence.unsent_logprobs()))
            sequence.emitted = ready
        return False

    def _advance_constrained(self, sequence: Sequence, token: int) -> bool:
        """`_advance` for an answer under a grammar: it ends when the grammar is complete; no stop strings."""
        assert self._grammars is not None
        if not sequence.matcher.consume_token(token):
            self._finish(sequence, "error", error_text=f"the grammar refused a token: {sequence.matcher.get_error()}")
            return True
        sequence.text = self._grammars.text(sequence.written)
        if sequence.matcher.is_stopped():
            self._finish(sequence, "stop")
            return True
        if sequence.generated >= sequence.params.max_new_tokens:
            self._finish(sequence, "length")
            return True
        ready = len(sequence.text.rstrip(REPLACEMENT))
        if ready > sequence.emitted:
            new = sequence.text[sequence.emitted : ready]
            sequence.send(Event(new, sequence.generated, None, sequence.unsent_logprobs()))
            sequence.emitted = ready
        return False

    def _finish(self, sequence: Sequence, reason: str, error_text: str = "") -> None:
        sequence.finish_reason = reason
        sequence.finished_at = time.perf_counter()
        if sequence.first_token_at is None:
            sequence.first_token_at = sequence.finished_at
        tail = sequence.text[sequence.emitted :] if reason != "error" else error_text
        sequence.emitted = len(sequence.text)
        if self.on_finish is not None and reason != "error":
            self.on_finish(sequence)  # logged before the reader hears the end: feedback may follow at once
        sequence.send(Event(tail, sequence.generated, reason, sequence.unsent_logprobs()))

    def _leave(self, rows: list[int]) -> None:
        gone = set(rows)
        staying = [i for i in range(len(self._running)) if i not in gone]
        self._running = [self._running[i] for i in staying]
        self._batch.keep(staying)
        self._logits = take_rows(self._logits, staying) if staying and self._logits is not None else None

    def _whole(self, sequence: Sequence) -> None:
        """A seq2seq model: the whole answer in one call, sent as one event."""
        decoded = self.generator.generate_ids([sequence.prompt_ids], sequence.params)
        (written,), (sequence.chose_end_first,) = decoded.ids, decoded.chose_end_first
        sequence.first_token_at = time.perf_counter()
        result = self.generator.result(written, len(sequence.prompt_ids), sequence.params)
        sequence.written, sequence.text, sequence.generated = written, result.text, result.completion_tokens
        self._finish(sequence, result.finish_reason)
