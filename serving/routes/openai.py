"""OpenAI's API for the served generators: `/v1/completions`, `/v1/chat/completions` (both streamed as
server-sent events with `stream: true`, ending with `[DONE]`) and `/v1/models`.

The official `openai` client works unchanged with `base_url=http://127.0.0.1:8000/v1`. Errors keep the
service's one shape (`{"error": ..., "type": ..., "field": ..., "request_id": ...}`), with the status codes
the client maps to its exceptions.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from serving.deps import Authorized, JsonBody, ServiceDep
from serving.errors import ApiError
from serving.generate import GenerationRequest, Stream, generate, merged
from serving.openai_schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
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


def event(payload: BaseModel | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {data}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


async def _start(
    service: Service, body: Any, prompts: list[Any], fields: list[str], max_tokens: int | None, request_id: str
) -> list[Stream]:
    """One stream per prompt; if any is refused, the ones already started are stopped."""
    streams: list[Stream] = []
    try:
        for index, (prompt, field) in enumerate(zip(prompts, fields, strict=True)):
            request = GenerationRequest(
                model=body.model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                stop=body.stops(),
                seed=body.seed,
                min_tokens=body.min_tokens,
                field=field,
            )
            streams.append(await generate(service, request, request_id, ROUTE, index))
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


def error_event(error: ApiError) -> str:
    """A failure after the stream began (its status is already sent): one event in the error shape."""
    return event(json.dumps({"error": error.message, "type": error.type}))


@router.get("/v1/models", response_model=ModelList, tags=["openai"], dependencies=Authorized, responses=ERRORS)
async def list_models(service: ServiceDep) -> ModelList:
    """Every served model that has a version loaded (classifiers too: `/v1/predict` answers those)."""
    cards = [
        ModelCard(id=name, created=int(watcher.current.loaded_at))
        for name, watcher in service.models.items()
        if watcher.current is not None
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


@router.post(
    "/v1/completions",
    response_model=Completion,
    tags=["openai"],
    dependencies=JsonBody,
    responses=ERRORS | {200: STREAMED[200] | feedback_link("$response.header.X-Request-ID")[200]},
)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Any:
    """Text completion of a prompt (or of each prompt of a list), whole or streamed."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ApiError(422, "prompt: give at least one prompt", type="invalid_field", field="prompt")
    if len(prompts) > service.cfg.max_texts:
        raise ApiError(
            422,
            f"prompt: {len(prompts)} prompts; at most {service.cfg.max_texts} (serve.max_texts)",
            type="too_many_texts",
            field="prompt",
        )
    fields = ["prompt"] if isinstance(body.prompt, str) else [f"prompt[{i}]" for i in range(len(prompts))]
    request_id = request_id_of(request)
    streams = await _start(service, body, prompts, fields, body.max_tokens, request_id)
    header = Header.of("cmpl", request_id, body.model, streams[0])
    prompt_tokens = sum(s.prompt_tokens for s in streams)
    if not body.stream:
        texts, tokens = [""] * len(streams), [0] * len(streams)
        reasons: list[str | None] = [None] * len(streams)
        async for index, piece in merged(streams):
            texts[index] += piece.text
            reasons[index], tokens[index] = piece.finish_reason, piece.completion_tokens
        choices = [
            CompletionChoice(index=i, text=text, finish_reason=reason)
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
        ]
        return Completion(**header.fields(), choices=choices, usage=_usage(prompt_tokens, sum(tokens)))

    async def chunks() -> AsyncIterator[str]:
        tokens = [0] * len(streams)
        try:
            async for index, piece in merged(streams):
                tokens[index] = piece.completion_tokens
                choice = CompletionChoice(index=index, text=piece.text, finish_reason=piece.finish_reason)
                yield event(Completion(**header.fields(), choices=[choice]))
        except ApiError as error:
            yield error_event(error)
            return
        if _wants_usage(body):
            yield event(Completion(**header.fields(), choices=[], usage=_usage(prompt_tokens, sum(tokens))))
        yield event("[DONE]")

    return StreamingResponse(chunks(), media_type="text/event-stream")


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    tags=["openai"],
    dependencies=JsonBody,
    responses=ERRORS | STREAMED,
)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep) -> Any:
    """The assistant's next message in a conversation, rendered with the model's chat template; whole or
    streamed."""
    chat = [message.model_dump() for message in body.messages]
    request_id = request_id_of(request)
    max_tokens = body.max_completion_tokens or body.max_tokens
    (stream,) = await _start(service, body, [chat], ["messages"], max_tokens, request_id)
    header = Header.of("chatcmpl", request_id, body.model, stream)
    if not body.stream:
        answer = await stream.answer()
        choice = ChatChoice(index=0, message=ChatMessageOut(content=answer.text), finish_reason=answer.finish_reason)
        usage = _usage(answer.prompt_tokens, answer.completion_tokens)
        return ChatCompletion(**header.fields(), choices=[choice], usage=usage)

    def chunk(delta: ChatDelta, finish_reason: str | None = None) -> str:
        choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
        return event(ChatCompletionChunk(**header.fields(), choices=[choice]))

    async def chunks() -> AsyncIterator[str]:
        yield chunk(ChatDelta(role="assistant", content=""))
        completion_tokens = 0
        try:
            async for piece in stream.events():
                completion_tokens = piece.completion_tokens
                if piece.text:
                    yield chunk(ChatDelta(content=piece.text))
                if piece.finish_reason is not None:
                    yield chunk(ChatDelta(), piece.finish_reason)
        except ApiError as error:
            yield error_event(error)
            return
        if _wants_usage(body):
            usage = _usage(stream.prompt_tokens, completion_tokens)
            yield event(ChatCompletionChunk(**header.fields(), choices=[], usage=usage))
        yield event("[DONE]")

    return StreamingResponse(chunks(), media_type="text/event-stream")
