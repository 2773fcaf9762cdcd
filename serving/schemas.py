"""Request and response models of every endpoint (they are also the OpenAPI docs at /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, model_validator

# Request fields take exactly the JSON types the OpenAPI document gives them (request models are strict):
# "3" is not an integer, 0 is not false. These are the types strictness alone would get wrong or cannot say.


def whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _exactly_a_boolean(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("must be a boolean")
    return value


Integer = Annotated[int, BeforeValidator(whole_number)]
"""An integer as JSON Schema counts them: 3 and 3.0, never "3" or true."""
PositiveInteger = Annotated[int, Field(ge=1), BeforeValidator(whole_number)]
"""(The bound before the validator: after it, pydantic's document would say `ge` where JSON Schema says `minimum`.)"""
NotServed = Annotated[Literal[False], BeforeValidator(_exactly_a_boolean)]
"""A feature llmops does not serve: absent or false."""
WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
"""What `str.strip` removes: Python's whitespace (none lies above U+3000), the ASCII separators U+001C-U+001F
and U+0085 included."""
NOT_BLANK = "[^" + "".join(f"\\u{ord(c):04x}" for c in WHITESPACE) + "]"
"""One character that is not whitespace, the characters spelled out: `\\S` means three things in Python, in
JSON Schema's ECMAScript and in pydantic's Rust regex (U+001D is whitespace to one of them alone), and the
document and the service must draw one line (`serving.deps.check_texts` strips with Python)."""
Text = Annotated[str, Field(min_length=1, pattern=NOT_BLANK)]
"""Something other than whitespace (`NOT_BLANK`)."""
STRICT = ConfigDict(strict=True, regex_engine="python-re")
MAX_STOP = 4
"""Stop strings per request at most (OpenAI's limit; the generate extension takes the same)."""
StopString = Annotated[str, Field(min_length=1)]
Seed = Annotated[int, Field(ge=-(2**53), le=2**53), BeforeValidator(whole_number)]
"""Integers a JSON number holds exactly (a torch generator takes more)."""


class _Body(BaseModel):
    model_config = STRICT | ConfigDict(extra="forbid")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body. `error` is a plain string, as the Open Inference Protocol expects."""

    error: str
    type: str
    field: str | None = None
    """The request field at fault, e.g. `texts[2]`."""
    request_id: str | None = None


# --- /v1 -------------------------------------------------------------------------------------------


class PredictRequest(_Body):
    texts: list[StrictStr] = Field(examples=[["the flight was great", "lost my bag again"]])


class Prediction(BaseModel):
    label: str
    score: float
    """Probability of `label`."""
    probabilities: dict[str, float]
    model_name: str
    model_version: str


class ModelRef(BaseModel):
    name: str
    version: str
    alias: str


class PredictResponse(BaseModel):
    request_id: str
    model: ModelRef
    predictions: list[Prediction]


class FeedbackRequest(_Body):
    """Feedback on a past answer: the true `label` of a classification, or a `rating` and / or a corrected
    `completion` of a generation (the request id of either comes back in `X-Request-ID`)."""

    model_config = STRICT | ConfigDict(
        extra="forbid",
        json_schema_extra={  # what `_one_kind` checks, in the document
            "anyOf": [
                {
                    "title": "On a classification",
                    "required": ["label"],
                    "properties": {
                        "label": {"type": "string"},
                        "rating": {"type": "null"},
                        "completion": {"type": "null"},
                    },
                },
                {
                    "title": "On a generation",
                    "properties": {"label": {"type": "null"}},
                    "anyOf": [
                        {"required": ["rating"], "properties": {"rating": {"type": "number"}}},
                        {"required": ["completion"], "properties": {"completion": {"type": "string"}}},
                    ],
                },
            ]
        },
    )

    request_id: StrictStr = Field(min_length=1)
    label: StrictStr | None = None
    rating: float | None = None
    completion: StrictStr | None = Field(default=None, min_length=1)
    index: Integer = Field(default=0, ge=0)
    """Which text (or prompt) of the request (0 for single-text requests)."""

    @model_validator(mode="after")
    def _one_kind(self) -> FeedbackRequest:
        generation = self.rating is not None or self.completion is not None
        if self.label is None and not generation:
            raise ValueError("give a label (a classification) or a rating or completion (a generation)")
        if self.label is not None and generation:
            raise ValueError("a label is feedback on a classification; rating and completion on a generation")
        return self


class FeedbackResponse(BaseModel):
    request_id: str
    index: int
    label: str | None = None
    rating: float | None = None
    completion: str | None = None
    stored: bool


class LoadedModelInfo(BaseModel):
    name: str
    version: str
    alias: str
    task: str
    """sequence-classification, causal-lm or seq2seq-lm."""
    labels: list[str]
    """A classifier's labels (none for a generator)."""
    kind: str
    """Candidate kind: teacher, student, int8, bnb-int8, nf4, gguf-q8_0, openvino-int8, ..."""
    loaded_at: float
    tags: dict[str, str]
    metrics: dict[str, float]
    """Metrics of the run that logged this version (test macro-F1, throughput, ...)."""


class ModelResponse(BaseModel):
    champion: LoadedModelInfo | None
    challenger: LoadedModelInfo | None = None
    reload_error: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ServedModel(BaseModel):
    name: str
    alias: str
    version: str | None = None
    """The version serving now (null: none loaded yet)."""
    task: str | None = None
    adapter_of: str | None = None
    """A LoRA adapter: the base version it runs over, `name/version`."""
    reason: str | None = None
    """Why none is loaded, or the last reload failure while the old version keeps serving."""


class ReadyResponse(BaseModel):
    ready: bool
    """At least one model serves, and every served model the registry has is loaded."""
    model: ModelRef | None = None
    """The classifier routes' model."""
    reason: str | None = None
    """Why not ready, or the last reload failure while the old version keeps serving (the first, by model)."""
    models: list[ServedModel] = []
    """Every model of `serve.models`, each following its alias."""


# --- /invocations (MLflow scoring protocol) --------------------------------------------------------


class DataframeSplit(_Body):
    columns: list[str] | None = None
    index: list[Any] | None = None
    data: list[Any]


class InvocationsRequest(_Body):
    """Exactly one of the four MLflow input formats; `params` is accepted and ignored."""

    dataframe_split: DataframeSplit | None = None
    dataframe_records: list[dict[str, Any]] | None = None
    instances: list[Any] | None = None
    inputs: list[Any] | dict[str, Any] | None = None
    params: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _exactly_one_format(self) -> InvocationsRequest:
        given = [
            k for k in ("dataframe_split", "dataframe_records", "instances", "inputs") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of dataframe_split, dataframe_records, instances, inputs"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class InvocationsResponse(BaseModel):
    """MLflow's response shape: one record per text with `label`, `score` and `prob_<label>`."""

    predictions: list[dict[str, Any]]


# --- /v2 (Open Inference Protocol) -----------------------------------------------------------------


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class LiveResponse(BaseModel):
    live: bool


class V2ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool
    reason: str | None = None
    """While not ready: what it waits for (the load in progress, or why the last one failed)."""


class RequestInput(BaseModel):
    model_config = STRICT

    name: str
    shape: list[Integer]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None
    """Absent when the tensor travels in the binary part of the request (binary tensor extension)."""


class RequestOutput(BaseModel):
    model_config = STRICT

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = STRICT

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[ResponseOutput]


# --- Open Inference Protocol: Triton's generate extension, for generators ------------------------------


class GenerateRequest(BaseModel):
    """Triton's generate extension: the prompt in `text_input`, sampling in `parameters` (or at the top level)."""

    model_config = STRICT | ConfigDict(extra="ignore")

    text_input: Text
    parameters: GenerateParameters = Field(default_factory=lambda: GenerateParameters())
    max_tokens: PositiveInteger | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)


class GenerateParameters(BaseModel):
    model_config = STRICT | ConfigDict(extra="ignore")

    max_tokens: PositiveInteger | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP)
    seed: Seed | None = None
    min_tokens: Integer = Field(
        default=1, ge=0, description="Tokens written before the end token may end the answer; 0 allows an empty one."
    )


class GenerateResponse(BaseModel):
    model_name: str
    model_version: str
    text_output: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


GenerateRequest.model_rebuild()
