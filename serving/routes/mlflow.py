"""MLflow's scoring protocol, as `mlflow models serve` speaks it: `/invocations`, `/ping`, `/version`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

import llmops
from serving.deps import ForInferenceJson, ServiceDep, check_texts
from serving.errors import ApiError
from serving.routes import ERRORS, request_id_of
from serving.schemas import InvocationsRequest, InvocationsResponse

router = APIRouter()


@router.get("/ping", response_class=PlainTextResponse, tags=["mlflow"])
async def ping(service: ServiceDep) -> PlainTextResponse:
    """MLflow's scoring-server health check."""
    return PlainTextResponse("\n", status_code=200 if service.ready else 503)


@router.get("/version", response_class=PlainTextResponse, tags=["mlflow"])
async def version() -> PlainTextResponse:
    """The server's version (MLflow's scoring-server clients ask for it)."""
    return PlainTextResponse(llmops.__version__)


# --- /invocations (MLflow scoring protocol) --------------------------------------------------------


def _one_column(row: Any, column: int, where: str) -> Any:
    if isinstance(row, list):
        if len(row) <= column:
            raise ApiError(422, f"{where}: row has no column {column}", type="invalid_field", field=where)
        return row[column]
    return row


def _from_record(record: Any, where: str) -> Any:
    if isinstance(record, dict):
        if "text" in record:
            return record["text"]
        if len(record) == 1:
            return next(iter(record.values()))
        raise ApiError(422, f"{where}: give a 'text' field", type="invalid_field", field=where)
    return record


def invocation_texts(body: InvocationsRequest) -> tuple[list[Any], str]:
    """The texts of any of MLflow's four input formats: the `text` column, else the only/first one."""
    if body.dataframe_split is not None:
        split = body.dataframe_split
        column = split.columns.index("text") if split.columns and "text" in split.columns else 0
        field = "dataframe_split.data"
        return [_one_column(row, column, f"{field}[{i}]") for i, row in enumerate(split.data)], field
    if body.dataframe_records is not None:
        return [_from_record(r, f"dataframe_records[{i}]") for i, r in enumerate(body.dataframe_records)], (
            "dataframe_records"
        )
    if body.instances is not None:
        return [_from_record(r, f"instances[{i}]") for i, r in enumerate(body.instances)], "instances"
    inputs = body.inputs
    if isinstance(inputs, dict):
        texts = inputs.get("text", next(iter(inputs.values()), None) if len(inputs) == 1 else None)
        if not isinstance(texts, list):
            raise ApiError(422, "inputs: give {'text': [...]} or a list of texts", type="invalid_field", field="inputs")
        return texts, "inputs.text"
    return [_from_record(r, f"inputs[{i}]") for i, r in enumerate(inputs or [])], "inputs"


@router.post("/invocations", response_model=InvocationsResponse, tags=["mlflow"], responses=ERRORS)
async def invocations(body: InvocationsRequest, request: Request, service: ForInferenceJson) -> InvocationsResponse:
    """MLflow's scoring protocol, answered like `mlflow models serve` answers for this model."""
    raw, field = invocation_texts(body)
    texts = check_texts(raw, field, service.cfg)
    scored = await service.score(texts, request_id_of(request))
    labels = scored.model.labels
    records = [
        {"label": label, "score": max(row)} | {f"prob_{k}": p for k, p in zip(labels, row, strict=True)}
        for label, row in zip(scored.labels(), scored.rows, strict=True)
    ]
    return InvocationsResponse(predictions=records)
