"""The served generators' tokenizers over HTTP, in vLLM's shape, so a client needs no local copy:
`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info` (lm-evaluation-harness's `local-completions`
finds these and tokenizes through them).

`model` may be left out while one generator is served. `/tokenize` with `add_special_tokens` (the default)
gives the ids the model reads for that prompt (a decoder's start token first); without it, the text's own
tokens, as a client building token-id prompts wants them. `messages` are rendered with the model's chat template
and its generation prompt, as `/v1/chat/completions` renders them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from serving.deps import ForInference, ForInferenceJson
from serving.generate import check_token_ids, generator_model, only_generator
from serving.openai_schemas import ChatMessage, TokenId
from serving.routes import ERRORS
from serving.runtimes import GeneratorRuntime
from serving.schemas import STRICT
from serving.service import Service

router = APIRouter(tags=["tokenizer"])


class _Tokenize(BaseModel):
    model_config = STRICT | ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="A served generator; may be left out while one is served.")
    return_token_strs: bool = Field(default=False, description="Each token's text too.")


class TokenizeText(_Tokenize):
    prompt: str
    add_special_tokens: bool = Field(
        default=True, description="The ids the model reads (its start token first); false: the text's own tokens."
    )


class TokenizeChat(_Tokenize):
    messages: list[ChatMessage] = Field(min_length=1, description="A chat, rendered as chat completions render it.")


TokenizeRequest = TokenizeText | TokenizeChat
"""vLLM's two shapes: a text or a chat."""


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    """Positions the model has for prompt and answer (null: no such limit)."""
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = STRICT | ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="A served generator; may be left out while one is served.")
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What a client needs to tokenize and template as the server does."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int | None


def _runtime(service: Service, name: str | None) -> GeneratorRuntime:
    _, generation = generator_model(service, name or only_generator(service))
    return generation.runtime


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, service: ForInferenceJson) -> TokenizeResponse:
    """A prompt's (or a chat's) token ids under the model's tokenizer."""
    runtime = _runtime(service, body.model)
    tokenizer = runtime.tokenizer
    if isinstance(body, TokenizeChat):
        ids = runtime.encode([m.model_dump() for m in body.messages], truncate=False)
    elif body.add_special_tokens:
        ids = runtime.encode(body.prompt, truncate=False)
    else:
        ids = list(tokenizer(body.prompt, add_special_tokens=False)["input_ids"])
    strs = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(ids)]
    return TokenizeResponse(
        count=len(ids),
        max_model_len=runtime.context_length,
        tokens=ids,
        token_strs=strs if body.return_token_strs else None,
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, service: ForInferenceJson) -> DetokenizeResponse:
    """Token ids back to text (special tokens as written)."""
    tokenizer = _runtime(service, body.model).tokenizer
    check_token_ids(body.tokens, tokenizer, "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=ERRORS)
async def tokenizer_info(
    service: ForInference, model: str | None = Query(default=None, description="A served generator.")
) -> TokenizerInfo:
    """The tokenizer's class, special tokens and chat template."""
    runtime = _runtime(service, model)
    tokenizer: Any = runtime.tokenizer
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return TokenizerInfo(
        tokenizer_class=type(tokenizer).__name__,
        eos_token=tokenizer.eos_token,
        bos_token=tokenizer.bos_token,
        pad_token=tokenizer.pad_token,
        chat_template=template,
        model_max_length=runtime.context_length,
    )
