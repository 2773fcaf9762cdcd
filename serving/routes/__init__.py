"""The service's routes, one file per protocol over one serving core (`serving.service`):
`ours` (health, /v1), `mlflow` (/invocations), `oip` (/v2, the Open Inference Protocol), `openai`
(/v1/completions, /v1/chat/completions, /v1/models) and `tokenize` (/tokenize, /detokenize, /tokenizer_info:
the generators' tokenizers, in vLLM's shape)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from serving.schemas import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 411, 413, 415, 422, 429, 503)
}
"""The error responses every route documents (one shape: `ErrorResponse`)."""


def feedback_link(request_id: str) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI link from an answer to `/v1/feedback` on it (`request_id`: where the answer's id is)."""
    link = {"operationId": "feedback", "requestBody": {"request_id": request_id}, "description": "Feedback on it"}
    return {200: {"links": {"feedback": link}}}


def request_id_of(request: Request) -> str:
    return request.state.request_id
