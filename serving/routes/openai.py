"""OpenAI's API for the served generators: `/v1/completions`, `/v1/chat/completions` (both streamed as
server-sent events with `stream: true`, ending with `[DONE]`) and `/v1/models`.

The official `openai` client works unchanged with `base_url=http://127.0.0.1:8000/v1`. Errors keep the
service's one shape (`{"error": ..., "type": ..., "field": ..., "request_id": ...}`), with the status codes
the client maps to its exceptions.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from llmops.generation.constrained import JSON_OBJECT, GrammarError, json_schema_grammar
from llmops.generation.decode import TokenLogprob
from serving.deps import ForInference, ForInferenceJson
from serving.engine import Event
from serving.errors import ApiError
from serving.generate import GenerationRequest, Stream, generate, merged
from serving.logprobs import CompletionLogprobsBuilder, chat_logprobs
from serving.openai_schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from serving.routes import ERRORS, feedback_link, request_id_of
from serving.service import Service

router = APIRouter()
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "With `stream: true`: server-sent events."}
}
ROUTE = "openai"


def event_of(payload: BaseModel | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {data}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


@dataclass(frozen=True)
class PromptIn:
    """One prompt of a request: text or a chat (`prompt`), or token ids, and the field that holds it."""

    prompt: Any
    field: str
    ids: tuple[int, ...] | None = None


def _choices(service: Service, body: CompletionRequest | ChatCompletionRequest) -> int:
    """`n`, checked against the service's limit."""
    if body.n > service.cfg.max_n:
        raise ApiError(
            422, f"n: {body.n} choices; at most {service.cfg.max_n} (serve.max_n)", type="invalid_field", field="n"
        )
    return body.n


def _grammar(body: CompletionRequest | ChatCompletionRequest) -> str | None:
    """The grammar of the request's `response_format` (None: free text); 422 for a schema that is not JSON Schema
    or that the grammar engine cannot compile, and for stop strings beside it."""
    answer_format = body.response_format
    if answer_format is None or answer_format.type == "text":
        return None
    if body.stop is not None:
        message = "stop: a structured answer ends where its schema does; give stop strings or response_format"
        raise ApiError(422, message, type="invalid_field", field="stop")
    if answer_format.type == "json_object":
        return _compiled(json.dumps(JSON_OBJECT), "response_format")
    schema = json.dumps(answer_format.json_schema.json_schema)  # property order is the answer's order
    return _compiled(schema, "response_format.json_schema.schema")


@functools.lru_cache(maxsize=256)
def _compiled(schema_text: str, field: str) -> str:
    """A schema checked against its metaschema and compiled, once per schema (checking and compiling cost more
    than a few decoding steps: clients send the same schema again and again)."""
    schema = json.loads(schema_text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        message = f"{field}: not a JSON Schema: {error.message}"
        raise ApiError(422, message, type="invalid_field", field=field) from None
    try:
        return json_schema_grammar(schema)
    except GrammarError as error:
        message = f"{field}: the grammar engine cannot compile this schema: {error}"
        raise ApiError(422, message, type="invalid_field", field=field) from None


async def _start(
    service: Service,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[PromptIn],
    max_tokens: int | None,
    request_id: str,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> list[Stream]:
    """`n` streams per prompt, in choice order (prompt by prompt, OpenAI's order); choice i of a seeded request
    samples with `seed + i`. If any is refused, the ones already started are stopped."""
    n = _choices(service, body)
    grammar = _grammar(body)
    streams: list[Stream] = []
    try:
        for prompt in prompts:
            for choice in range(n):
                request = GenerationRequest(
                    model=body.model,
                    prompt=prompt.prompt,
                    prompt_ids=prompt.ids,
                    max_tokens=max_tokens,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    stop=body.stops(),
                    seed=None if body.seed is None else body.seed + choice,
                    min_tokens=body.min_tokens,
                    field=prompt.field,
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                    grammar=grammar,
                )
                streams.append(await generate(service, request, request_id, ROUTE, len(streams)))
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


def error_event(error: ApiError) -> str:
    """A failure after the stream began (its status is already sent): one event in the error shape."""
    return event_of(json.dumps({"error": error.message, "type": error.type}))


@router.get("/v1/models", response_model=ModelList, tags=["openai"], responses=ERRORS)
async def list_models(service: ForInference) -> ModelList:
    """Every served model that has a version loaded (classifiers too: `/v1/predict` answers those); a LoRA
    adapter names its base as `parent`."""
    cards = [
        ModelCard(
            id=name,
            created=int(model.loaded_at),
            root=f"{name}/{model.version}",
            parent=f"{model.base.name}/{model.base.version}" if model.base else None,
        )
        for name, watcher in service.models.items()
        if (model := watcher.current) is not None
    ]
    return ModelList(data=cards)


@dataclass(frozen=True)
class Header:
    """What every object and chunk of one response repeats."""

    id: str
    model: str
    system_fingerprint: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def of(cls, prefix: str, request_id: str, model: str, stream: Stream) -> Header:
        return cls(f"{prefix}-{request_id}", model, f"llmops-{stream.model.name}-v{stream.model.version}")

    def fields(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "created": self.created,
        }


def _wants_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _completion_prompts(body: CompletionRequest, service: Service) -> list[PromptIn]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [PromptIn(prompt, "prompt")]
    if not prompt:
        raise ApiError(422, "prompt: give at least one prompt", type="invalid_field", field="prompt")
    if isinstance(prompt[0], int):
        return [PromptIn("", "prompt", tuple(prompt))]  # type: ignore[arg-type]
    if len(prompt) > service.cfg.max_texts:
        raise ApiError(
            422,
            f"prompt: {len(prompt)} prompts; at most {service.cfg.max_texts} (serve.max_texts)",
            type="too_many_texts",
            field="prompt",
        )
    if isinstance(prompt[0], str):
        return [PromptIn(text, f"prompt[{i}]") for i, text in enumerate(prompt)]
    return [PromptIn("", f"prompt[{i}]", tuple(ids)) for i, ids in enumerate(prompt)]  # type: ignore[arg-type]


class _CompletionChoices:
    """What each choice of a completion has written so far, and each piece as the response shows it: with
    `echo`, the prompt (and its tokens' logprobs) comes before the choice's first piece."""

    def __init__(self, body: CompletionRequest, streams: list[Stream]):
        self.body, self.streams = body, streams
        self.builders = [CompletionLogprobsBuilder(s.tokenizer) for s in streams]
        self.started = [False] * len(streams)
        self.tokens = [0] * len(streams)

    def piece(self, index: int, event: Event) -> CompletionChoice:
        stream, text = self.streams[index], event.text
        self.tokens[index] = event.completion_tokens
        parts = []
        if not self.started[index]:
            self.started[index] = True
            if self.body.echo:
                text = stream.prompt_text + text
                if self.body.logprobs is not None:
                    sequence = stream.sequence
                    assert sequence.prompt_logprobs is not None
                    parts.append(self.builders[index].piece(sequence.prompt_ids, sequence.prompt_logprobs))
        if self.body.logprobs is not None:
            parts.append(self.builders[index].written(event.logprobs))
        logprobs = joined(parts) if parts else None
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=event.finish_reason)


def joined(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for part in parts:
        out.tokens += part.tokens
        out.token_logprobs += part.token_logprobs
        out.top_logprobs += part.top_logprobs
        out.text_offset += part.text_offset
    return out


@router.post(
    "/v1/completions",
    response_model=Completion,
    tags=["openai"],
    responses=ERRORS | {200: STREAMED[200] | feedback_link("$response.header.X-Request-ID")[200]},
)
async def completions(body: CompletionRequest, request: Request, service: ForInferenceJson) -> Any:
    """Text completion of a prompt (or of each prompt of a list), whole or streamed; `n` choices each, in
    prompt order. With `echo` and `logprobs`, the prompt tokens' log-probabilities (lm-evaluation-harness's
    loglikelihood tasks)."""
    prompts = _completion_prompts(body, service)
    request_id = request_id_of(request)
    prompt_logprobs = body.logprobs if body.echo else None
    streams = await _start(service, body, prompts, body.max_tokens, request_id, body.logprobs, prompt_logprobs)
    header = Header.of("cmpl", request_id, body.model, streams[0])
    prompt_tokens = sum(s.prompt_tokens for s in streams[:: body.n])
    shown = _CompletionChoices(body, streams)
    if not body.stream:
        pieces: list[list[CompletionChoice]] = [[] for _ in streams]
        async for index, event in merged(streams):
            pieces[index].append(shown.piece(index, event))
        choices = [
            CompletionChoice(
                index=index,
                text="".join(p.text for p in parts),
                logprobs=joined([p.logprobs for p in parts if p.logprobs]) if body.logprobs is not None else None,
                finish_reason=parts[-1].finish_reason,
            )
            for index, parts in enumerate(pieces)
        ]
        return Completion(**header.fields(), choices=choices, usage=_usage(prompt_tokens, sum(shown.tokens)))

    async def chunks() -> AsyncIterator[str]:
        try:
            async for index, event in merged(streams):
                yield event_of(Completion(**header.fields(), choices=[shown.piece(index, event)]))
        except ApiError as error:
            yield error_event(error)
            return
        if _wants_usage(body):
            yield event_of(Completion(**header.fields(), choices=[], usage=_usage(prompt_tokens, sum(shown.tokens))))
        yield event_of("[DONE]")

    return StreamingResponse(chunks(), media_type="text/event-stream")


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    tags=["openai"],
    responses=ERRORS | STREAMED,
)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ForInferenceJson) -> Any:
    """The assistant's next message in a conversation, rendered with the model's chat template; whole or
    streamed, `n` choices."""
    chat = [message.model_dump() for message in body.messages]
    request_id = request_id_of(request)
    max_tokens = body.max_completion_tokens or body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    streams = await _start(service, body, [PromptIn(chat, "messages")], max_tokens, request_id, logprobs)
    header = Header.of("chatcmpl", request_id, body.model, streams[0])
    prompt_tokens = streams[0].prompt_tokens

    def logprobs_of(stream: Stream, entries: tuple[TokenLogprob, ...]) -> ChatLogprobs | None:
        return chat_logprobs(stream.tokenizer, entries) if logprobs is not None else None

    if not body.stream:
        answers = await asyncio.gather(*(stream.answer() for stream in streams))
        choices = [
            ChatChoice(
                index=index,
                message=ChatMessageOut(content=answer.text),
                logprobs=logprobs_of(streams[index], answer.logprobs),
                finish_reason=answer.finish_reason,
            )
            for index, answer in enumerate(answers)
        ]
        usage = _usage(prompt_tokens * len(streams), sum(a.completion_tokens for a in answers))
        return ChatCompletion(**header.fields(), choices=choices, usage=usage)

    def chunk(index: int, delta: ChatDelta, finish_reason: str | None = None, lp: ChatLogprobs | None = None) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish_reason)
        return event_of(ChatCompletionChunk(**header.fields(), choices=[choice]))

    async def chunks() -> AsyncIterator[str]:
        for index in range(len(streams)):
            yield chunk(index, ChatDelta(role="assistant", content=""))
        tokens = [0] * len(streams)
        try:
            async for index, piece in merged(streams):
                tokens[index] = piece.completion_tokens
                if piece.text or piece.logprobs:
                    yield chunk(index, ChatDelta(content=piece.text), lp=logprobs_of(streams[index], piece.logprobs))
                if piece.finish_reason is not None:
                    yield chunk(index, ChatDelta(), piece.finish_reason)
        except ApiError as error:
            yield error_event(error)
            return
        if _wants_usage(body):
            usage = _usage(prompt_tokens * len(streams), sum(tokens))
            yield event_of(ChatCompletionChunk(**header.fields(), choices=[], usage=usage))
        yield event_of("[DONE]")

    return StreamingResponse(chunks(), media_type="text/event-stream")
