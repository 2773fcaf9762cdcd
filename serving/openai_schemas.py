"""Request and response models of the OpenAI API routes (`/v1/completions`, `/v1/chat/completions`,
`/v1/models`), in the shape the official `openai` client reads.

Unknown request fields are ignored, as OpenAI-compatible servers do (clients send fields like
`frequency_penalty`); fields llmops cannot honour (`n` above 1, `logprobs`, `echo`) are refused with a 422
naming them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from serving.schemas import MAX_STOP, STRICT, Integer, NotServed, PositiveInteger, Seed, StopString, Text

StopList = Annotated[
    list[StopString],  # the validator below says how many, with a clearer message than pydantic's
    WithJsonSchema({"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP}),
]


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False
    """Send one more chunk before `[DONE]` with the request's token counts."""


class _Sampling(BaseModel):
    model_config = STRICT | ConfigDict(extra="ignore")

    model: str = Field(description="A served generator, as `GET /v1/models` lists it (`tweet-generator`).")
    max_tokens: PositiveInteger | None = Field(
        default=None, description="Tokens to write at most (capped by the server)."
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0: greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Integer = Field(default=1, ge=1, le=1, description="Choices per prompt: only 1 is served.")
    stop: StopString | StopList | None = Field(default=None, description=f"Up to {MAX_STOP} strings that end the text.")
    seed: Seed | None = Field(default=None, description="Makes sampling reproducible.")
    min_tokens: Integer = Field(
        default=1,
        ge=0,
        description="vLLM's extension: tokens written before the end token may end the answer (capped like "
        "`max_tokens`). 1 by default: an answer is never empty unless a request asks for 0.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return stop

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] = Field(description="A prompt, or a list of prompts (one choice each).")
    logprobs: None = Field(default=None, description="Not served: must be absent or null.")
    echo: NotServed = Field(default=False, description="Not served: must be absent or false.")


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInteger | None = Field(default=None, description="The newer name of `max_tokens`.")
    logprobs: NotServed | None = Field(default=None, description="Not served: must be absent, null or false.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class _Answer(BaseModel):
    """What every answer and every streamed chunk carries."""

    id: str
    created: int
    model: str
    system_fingerprint: str
    """`llmops-<model>-v<version>`: which registered version answered."""


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmops"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
