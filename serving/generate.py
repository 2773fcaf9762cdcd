"""Generation, shared by every protocol that generates (OpenAI's routes, the Open Inference Protocol's
`generate`): check a request against the limits, hand it to the served version's engine, and read its
answer as a stream or whole.

A request keeps the version it started on: its sequence lives in that version's engine, which finishes the
sequences it has before it stops when a newer version swaps in.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from llmops.generation.candidate import GenerationParams, Prompt
from llmops.generation.constrained import GrammarError, built_grammars, grammars_for
from llmops.generation.decode import TokenLogprob
from serving.auth import CALLER
from serving.engine import EngineClosed, EngineFull, Event, Sequence
from serving.errors import ApiError
from serving.models import Generating, LoadedModel
from serving.runtimes import GeneratorRuntime, WrongModelKind
from serving.service import Origin, Service


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt: Prompt
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 1
    """Tokens written before the end token may end the answer (vLLM's `min_tokens`; stop strings still end it).
    Capped by the answer's budget, as `max_tokens` is. 1: never an empty answer unless the caller asks for 0."""
    field: str = "prompt"
    """The request field holding the prompt, for error messages."""
    prompt_ids: tuple[int, ...] | None = None
    """A prompt given as token ids (then `prompt` is unused): the model reads exactly these."""
    logprobs: int | None = None
    """Each written token's log-probability with this many alternatives (None: none)."""
    prompt_logprobs: int | None = None
    """The prompt tokens' too (`echo`)."""
    grammar: str | None = None
    """The answer keeps to this grammar (structured output: `llmops.generation.constrained`)."""


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


class Stream:
    """One request's generation as it forms: `events()` for pieces of text, `answer()` for the whole."""

    def __init__(
        self,
        sequence: Sequence,
        model: LoadedModel,
        request_id: str,
        prompt_text: str,
        check: Callable[[str], Awaitable[None]] | None = None,
    ):
        self.sequence = sequence
        self.check = check
        """Raises on an answer the caller may not have (`serve.guards` blocks answers): the answer is then held
        until it is whole and checked."""
        self.model = model
        self.request_id = request_id
        self.prompt_tokens = len(sequence.prompt_ids)
        self.prompt_text = prompt_text
        """The prompt as the model reads it (a chat rendered, token ids decoded): what `echo` shows."""
        self.tokenizer = model.generation.runtime.tokenizer

    async def events(self) -> AsyncIterator[Event]:
        """Text as it forms; the last event carries the finish reason. A reader that stops early (the client went
        away) frees the sequence's slot at the next step. An answer to check comes whole, as one event, once
        checked."""
        try:
            if self.check is None:
                while (event := await self._next()).finish_reason is None:
                    yield event
                yield event
                return
            text, logprobs = "", list[TokenLogprob]()
            while True:
                event = await self._next()
                text += event.text
                logprobs += event.logprobs
                if event.finish_reason is not None:
                    break
            await self.check(text)
            yield Event(text, event.completion_tokens, event.finish_reason, tuple(logprobs))
        finally:
            self.cancel()

    async def _next(self) -> Event:
        event = await self.sequence.events.get()
        if event.finish_reason == "error":
            raise ApiError(500, f"generation failed: {event.text}", type="generation_error")
        return event

    def cancel(self) -> None:
        """The reader is gone: the sequence leaves at the next step (nothing happens once it has finished)."""
        if self.sequence.finish_reason is None:
            self.sequence.cancelled = True

    async def answer(self) -> Answer:
        text, last, logprobs = "", None, list[TokenLogprob]()
        async for event in self.events():
            text += event.text
            logprobs += event.logprobs
            last = event
        assert last is not None and last.finish_reason is not None
        return Answer(text, last.finish_reason, self.prompt_tokens, last.completion_tokens, tuple(logprobs))


def only_generator(service: Service) -> str:
    """The name of the one generator served, for routes whose `model` may be left out (vLLM serves one model): a
    422 when several are, a 503 while a served model is still loading, a 404 when none is a generator."""
    generators = [name for name, watcher in service.models.items() if watcher.current and watcher.current.generates]
    if len(generators) == 1:
        return generators[0]
    if generators:
        served = ", ".join(generators)
        raise ApiError(422, f"model: name the generator (serving {served})", type="invalid_field", field="model")
    loading = [watcher for watcher in service.models.values() if watcher.current is None and not watcher.absent]
    if loading:
        service.loaded(loading[0], field="model")  # the 503 of a model still loading (it may be a generator)
    raise ApiError(404, "no generator is served here: serve.models names none the registry has", type="not_found")


def generator_model(service: Service, name: str) -> tuple[LoadedModel, Generating]:
    watcher = service.models.get(name)
    if watcher is None:
        served = ", ".join(service.models)
        raise ApiError(404, f"model '{name}' is not served here (serving {served})", type="not_found", field="model")
    model = service.loaded(watcher, field="model")
    try:
        return model, model.generation
    except WrongModelKind as error:
        # 404, as OpenAI answers a model its route does not serve ("This is a chat model and not supported ...").
        raise ApiError(404, f"model {error}: use /v1/predict", type="wrong_model_kind", field="model") from None


def _params(
    service: Service, request: GenerationRequest, prompt_tokens: int, generator: GeneratorRuntime
) -> GenerationParams:
    cfg = service.cfg
    if prompt_tokens > cfg.max_prompt_tokens:
        raise ApiError(
            413,
            f"{request.field}: {prompt_tokens} tokens; at most {cfg.max_prompt_tokens} (serve.max_prompt_tokens)",
            type="prompt_too_long",
            field=request.field,
        )
    budget = min(request.max_tokens or cfg.default_max_tokens, cfg.max_new_tokens)
    context = generator.context_length
    if context is not None:
        if prompt_tokens >= context:
            raise ApiError(
                413,
                f"{request.field}: {prompt_tokens} tokens leave no room in the model's {context} positions",
                type="prompt_too_long",
                field=request.field,
            )
        budget = min(budget, context - prompt_tokens)
    return GenerationParams(
        max_new_tokens=budget,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=request.stop,
        seed=request.seed,
        min_new_tokens=min(request.min_tokens, budget),  # capped like max_tokens, never refused
        logprobs=request.logprobs,
        prompt_logprobs=request.prompt_logprobs,
        grammar=request.grammar,
    )


def _prompt(request: GenerationRequest, generator: GeneratorRuntime) -> tuple[list[int], Prompt, str]:
    """The prompt's token ids, the prompt as the prediction log keeps it, and as `echo` shows it."""
    tokenizer = generator.tokenizer
    if request.prompt_ids is None:
        text = request.prompt if isinstance(request.prompt, str) else generator.render(request.prompt)
        return generator.encode(request.prompt, truncate=False), request.prompt, text
    check_token_ids(request.prompt_ids, tokenizer, request.field)
    text = tokenizer.decode(list(request.prompt_ids))
    return list(request.prompt_ids), text, text


def check_token_ids(ids: Iterable[int], tokenizer: Any, field: str) -> None:
    """422 naming the position of the first id outside the model's vocabulary."""
    vocabulary = len(tokenizer)
    for position, token in enumerate(ids):
        if token >= vocabulary:
            message = f"{field}[{position}]: token id {token} is not in the model's vocabulary of {vocabulary}"
            raise ApiError(422, message, type="invalid_field", field=f"{field}[{position}]")


def _check_decoder_only(request: GenerationRequest, generator: GeneratorRuntime, name: str) -> None:
    """Logprobs and structured output are the serving engine's, which decodes decoder models step by step; a
    seq2seq model answers whole (transformers' `generate`)."""
    task = generator.meta.task
    if task == "causal-lm":
        return
    for field, asked in (
        ("logprobs", request.logprobs is not None or request.prompt_logprobs is not None),
        ("response_format", request.grammar is not None),
    ):
        if asked:
            message = f"{field}: served for decoder models; '{name}' is a {task} model"
            raise ApiError(422, message, type="invalid_field", field=field)


async def _check_grammar(grammar: str | None, generator: GeneratorRuntime) -> None:
    """The grammar against the model's vocabulary (the engine's check, made once per grammar and vocabulary)."""
    if grammar is None:
        return
    tokenizer = generator.tokenizer
    grammars = built_grammars(tokenizer)
    if grammars is None:  # built once, in about a second: not on the event loop
        grammars = await asyncio.to_thread(grammars_for, tokenizer)
    try:
        grammars.check(grammar)
    except GrammarError as error:
        raise ApiError(
            422,
            f"response_format: the grammar engine cannot use this schema with the model's vocabulary: {error}",
            type="invalid_field",
            field="response_format",
        ) from None


async def merged(streams: list[Stream]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several streams as they come, each with its stream's index."""
    if len(streams) == 1:  # the common case: no task and queue between the reader and the engine's events
        async for event in streams[0].events():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event | BaseException]] = asyncio.Queue()

    async def pump(index: int, stream: Stream) -> None:
        try:
            async for event in stream.events():
                await queue.put((index, event))
        except BaseException as error:  # handed to the reader, which raises it
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield index, item
            if item.finish_reason is not None:
                open_streams -= 1
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.cancel()


async def generate(service: Service, request: GenerationRequest, request_id: str, route: str, index: int = 0) -> Stream:
    """Start a generation with the model's current version; 404 / 503 / 413 before anything runs.
    `index`: the prompt's position in its request (the prediction log keys answers by request id and index)."""
    loop = asyncio.get_running_loop()
    for _ in range(3):  # a version swapped out between reading it and submitting: take the new one
        model, generation = generator_model(service, request.model)
        _check_decoder_only(request, generation.runtime, request.model)
        await _check_grammar(request.grammar, generation.runtime)
        prompt_ids, logged, echoed = _prompt(request, generation.runtime)
        if service.guards.blocks(model.name):
            texts = [logged] if isinstance(logged, str) else [m["content"] for m in logged]
            with service.tracing.span("guards"):
                await service.guards.prompts_checked(model.name, [t for t in texts if isinstance(t, str)])
        params = _params(service, request, len(prompt_ids), generation.runtime)
        origin = Origin(request_id, index, logged, route, model, CALLER.get(), service.tracing.current())
        try:
            sequence = generation.backend.submit(prompt_ids, params, loop, origin)
        except EngineFull as error:
            service.metrics.rejected.labels("generation_queue_full").inc()
            raise ApiError(503, f"server busy: {error}", type="overloaded", headers={"Retry-After": "1"}) from None
        except EngineClosed:
            continue
        check = None
        if service.guards.blocks(model.name, "answers"):
            check = functools.partial(service.guards.answer_checked, model.name)
        return Stream(sequence, model, request_id, echoed, check)
    raise ApiError(503, "the model is being replaced: try again", type="not_ready", headers={"Retry-After": "1"})
