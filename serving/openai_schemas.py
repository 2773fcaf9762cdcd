"""Request and response models of the OpenAI API routes (`/v1/completions`, `/v1/chat/completions`,
`/v1/models`), in the shape the official `openai` client reads.

Unknown request fields are ignored, as OpenAI-compatible servers do (clients send fields like
`frequency_penalty`); fields llmops cannot honour (`best_of` above `n`, `echo` on chat) are refused with a 422
naming them.

Log-probabilities are the model's own: the log-softmax of its logits before temperature, top-p or barred tokens,
as vLLM returns them by default and as teacher-forced scoring computes them. Completions give OpenAI's legacy
shape (`tokens`, `token_logprobs`, `top_logprobs`: the k most likely and the chosen token, `text_offset`); chat
gives `content` entries (`token`, `logprob`, `bytes`, `top_logprobs`). Every token the model produced has an
entry, the end token included.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator

from serving.schemas import (
    MAX_STOP,
    STRICT,
    Integer,
    NotServed,
    PositiveInteger,
    Seed,
    StopString,
    Text,
    whole_number,
)

MAX_LOGPROBS = 20
"""Most likely alternatives per token at most (`logprobs` on completions, `top_logprobs` on chat): OpenAI's
limit on chat, and vLLM's default `max_logprobs`."""
TokenId = Annotated[int, Field(ge=0), BeforeValidator(whole_number)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
"""A prompt already tokenized (lm-evaluation-harness sends these): the model reads exactly these ids."""
TopK = Annotated[int, Field(ge=0, le=MAX_LOGPROBS), BeforeValidator(whole_number)]

StopList = Annotated[
    list[StopString],  # the validator below says how many, with a clearer message than pydantic's
    WithJsonSchema({"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP}),
]


_TYPES = ["array", "boolean", "integer", "null", "number", "object", "string"]
_SCHEMA_TYPE: Any = {
    "anyOf": [
        {"enum": _TYPES},
        {"type": "array", "items": {"enum": _TYPES}, "minItems": 1, "uniqueItems": True},
    ]
}
"""What JSON Schema's metaschema says of `type`; the rest of a schema is checked against it by the route."""


class JsonSchemaFormat(BaseModel):
    model_config = STRICT | ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(default="answer", description="The schema's name (OpenAI's clients send one).")
    description: str | None = None
    json_schema: dict[str, Any] = Field(
        alias="schema",
        description="A JSON Schema (2020-12; the document states its `type` only): every answer is a JSON document "
        "it admits.",
        json_schema_extra={"properties": {"type": _SCHEMA_TYPE}},
    )
    strict: bool | None = Field(default=None, description="Answers always keep to the schema, strict or not.")


class TextFormat(BaseModel):
    model_config = STRICT

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = STRICT

    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False
    """Send one more chunk before `[DONE]` with the request's token counts."""


NO_STOP_WITH_FORMAT: Any = {  # the route's rule, in the document: a structured answer ends where its schema does
    "if": {
        "required": ["response_format"],
        "properties": {
            "response_format": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"enum": ["json_object", "json_schema"]}},
            }
        },
    },
    "then": {"properties": {"stop": {"type": "null"}}},
}
TOP_NEEDS_LOGPROBS: Any = {  # the validator of `top_logprobs`, in the document
    "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
    "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
}


class _Sampling(BaseModel):
    model_config = STRICT | ConfigDict(extra="ignore", json_schema_extra={"allOf": [NO_STOP_WITH_FORMAT]})

    model: str = Field(description="A served generator, as `GET /v1/models` lists it (`tweet-generator`).")
    max_tokens: PositiveInteger | None = Field(
        default=None, description="Tokens to write at most (capped by the server)."
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0: greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Integer = Field(
        default=1,
        ge=1,
        description="Choices per prompt, at most `serve.max_n` (8 by default); choice i of a seeded request samples "
        "with `seed + i`.",
    )
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
    response_format: ResponseFormat | None = Field(
        default=None,
        description="`json_object` or `json_schema`: decoding keeps every answer a JSON document (of the schema); "
        "an answer cut by `max_tokens` ends with `finish_reason: length`. Not with `stop`.",
    )

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
    prompt: Text | list[Text] | TokenIds | list[TokenIds] = Field(
        description="A prompt, a list of prompts, a prompt's token ids or a list of those (`n` choices each). "
        "Token ids are read as given, with no start token added."
    )
    logprobs: TopK | None = Field(
        default=None,
        description=f"Each written token's log-probability with this many most likely alternatives (0 to "
        f"{MAX_LOGPROBS}); `top_logprobs` holds those and the chosen token.",
    )
    echo: bool = Field(
        default=False,
        description="The prompt before the answer in `text`; with `logprobs`, the prompt tokens' log-probabilities "
        "first (the first token's null), as lm-evaluation-harness reads them.",
    )
    best_of: Literal[1] | None = Field(
        default=None,
        description="Not served (vLLM has dropped it too): absent, null or 1. Ask for `n` choices and rank them "
        "by their `logprobs`.",
    )


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    model_config = _Sampling.model_config | ConfigDict(
        json_schema_extra={"allOf": [NO_STOP_WITH_FORMAT, TOP_NEEDS_LOGPROBS]}
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInteger | None = Field(default=None, description="The newer name of `max_tokens`.")
    logprobs: bool | None = Field(default=None, description="Each written token's log-probability.")
    top_logprobs: TopK | None = Field(
        default=None,
        description=f"With `logprobs`: this many most likely alternatives per token (0 to {MAX_LOGPROBS}).",
    )
    echo: NotServed = Field(default=False, description="Completions only: absent or false here.")

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token in each list."""

    tokens: list[str]
    token_logprobs: list[float | None]
    """None for the prompt's first token (`echo`): nothing predicts it."""
    top_logprobs: list[dict[str, float] | None]
    """The most likely tokens at the position and the chosen one."""
    text_offset: list[int]
    """Where each token's text starts in the choice's `text`."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    """The token's text as UTF-8."""


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    root: str | None = None
    """vLLM's extension: the registered version serving, `name/version`."""
    parent: str | None = None
    """vLLM's extension: a LoRA adapter's base, `name/version` (null: a whole model)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- the Batch API (serving/batches.py) ---------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(description="An uploaded file (`POST /v1/files`, purpose `batch`) of JSONL requests.")
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = BatchRequestCounts()
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
