"""The HTTP service: `create_app(cfg)` builds it; `llmops serve` runs it under uvicorn.

Three inference protocols share one path (`Predictor.score`): `/v1/predict` (ours),
`/invocations` (MLflow's scoring protocol) and `/v2/models/{name}/infer` (the Open
Inference Protocol of KServe and Triton).
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_fastapi_instrumentator import Instrumentator
from pydantic import ValidationError

import llmops
from llmops.config import LlmopsConfig
from llmops.registry import resolve_tracking_uri
from serving.auth import load_api_keys
from serving.deps import Authorized, JsonBody, PredictorDep, check_texts
from serving.errors import ApiError, ErrorResponse, field_path, install_handlers
from serving.models import LoadedModel
from serving.predictor import Predictor
from serving.schemas import (
    FeedbackRequest,
    FeedbackResponse,
    HealthResponse,
    InferRequest,
    InferResponse,
    InvocationsRequest,
    InvocationsResponse,
    LiveResponse,
    LoadedModelInfo,
    ModelMetadataResponse,
    ModelReadyResponse,
    ModelRef,
    ModelResponse,
    Prediction,
    PredictRequest,
    PredictResponse,
    ReadyResponse,
    ResponseOutput,
    ServerMetadataResponse,
    TensorMetadata,
    V2ReadyResponse,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 411, 413, 415, 422, 503)
}

router = APIRouter()


def _request_id(request: Request) -> str:
    return request.state.request_id


# --- health ----------------------------------------------------------------------------------------


@router.get("/healthz", response_model=HealthResponse, tags=["health"])
async def healthz() -> HealthResponse:
    """The process is alive."""
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, tags=["health"], responses={503: {"model": ReadyResponse}})
async def readyz(predictor: PredictorDep) -> JSONResponse:
    """200 once a model is loaded and warmed; the body carries a reload failure while the old version serves."""
    model = predictor.champion.current
    body = ReadyResponse(
        ready=model is not None,
        model=ModelRef(name=model.name, version=model.version, alias=model.alias) if model else None,
        reason=predictor.champion.status,
    )
    return JSONResponse(body.model_dump(), status_code=200 if model else 503)


@router.get("/ping", response_class=PlainTextResponse, tags=["mlflow"])
async def ping(predictor: PredictorDep) -> PlainTextResponse:
    """MLflow's scoring-server health check."""
    return PlainTextResponse("\n", status_code=200 if predictor.ready else 503)


@router.get("/version", response_class=PlainTextResponse, tags=["mlflow"])
async def version() -> PlainTextResponse:
    """The server's version (MLflow's scoring-server clients ask for it)."""
    return PlainTextResponse(llmops.__version__)


# --- /v1 -------------------------------------------------------------------------------------------


@router.post("/v1/predict", response_model=PredictResponse, tags=["v1"], dependencies=JsonBody, responses=ERRORS)
async def predict(body: PredictRequest, request: Request, predictor: PredictorDep) -> PredictResponse:
    """Label and class probabilities per text, with the model version that answered."""
    texts = check_texts(body.texts, "texts", predictor.cfg)
    request_id = _request_id(request)
    scored = await predictor.score(texts, request_id)
    model = scored.model
    predictions = [
        Prediction(
            label=label,
            score=float(row.max()),
            probabilities=dict(zip(model.labels, map(float, row), strict=True)),
            model_name=model.name,
            model_version=model.version,
        )
        for label, row in zip(scored.labels(), scored.probs, strict=True)
    ]
    ref = ModelRef(name=model.name, version=model.version, alias=model.alias)
    return PredictResponse(request_id=request_id, model=ref, predictions=predictions)


def _model_info(model: LoadedModel | None) -> LoadedModelInfo | None:
    if model is None:
        return None
    return LoadedModelInfo(
        name=model.name,
        version=model.version,
        alias=model.alias,
        labels=model.labels,
        kind=model.classifier.meta.kind,
        loaded_at=model.loaded_at,
        tags=model.tags,
        metrics=model.metrics,
    )


@router.get("/v1/model", response_model=ModelResponse, tags=["v1"], dependencies=Authorized, responses=ERRORS)
async def model_info(predictor: PredictorDep) -> ModelResponse:
    """Which version serves, with its metrics and tags (and the challenger's, when shadow or canary is on)."""
    challenger = predictor.challenger.current if predictor.challenger else None
    return ModelResponse(
        champion=_model_info(predictor.champion.current),
        challenger=_model_info(challenger),
        reload_error=predictor.champion.status if predictor.champion.current else None,
    )


@router.post(
    "/v1/feedback",
    response_model=FeedbackResponse,
    status_code=202,
    tags=["v1"],
    dependencies=JsonBody,
    responses=ERRORS,
)
async def feedback(body: FeedbackRequest, predictor: PredictorDep) -> FeedbackResponse:
    """The true label of a past prediction, stored for monitoring."""
    await predictor.feedback(body.request_id, body.index, body.label)
    return FeedbackResponse(request_id=body.request_id, index=body.index, label=body.label, stored=True)


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


@router.post(
    "/invocations", response_model=InvocationsResponse, tags=["mlflow"], dependencies=JsonBody, responses=ERRORS
)
async def invocations(body: InvocationsRequest, request: Request, predictor: PredictorDep) -> InvocationsResponse:
    """MLflow's scoring protocol, answered like `mlflow models serve` answers for this model."""
    raw, field = invocation_texts(body)
    texts = check_texts(raw, field, predictor.cfg)
    scored = await predictor.score(texts, _request_id(request))
    labels = scored.model.labels
    records = [
        {"label": label, "score": float(row.max())} | {f"prob_{k}": float(p) for k, p in zip(labels, row, strict=True)}
        for label, row in zip(scored.labels(), scored.probs, strict=True)
    ]
    return InvocationsResponse(predictions=records)


# --- /v2 (Open Inference Protocol) -----------------------------------------------------------------

V2_INPUT = "text"
V2_OUTPUTS = ("label", "probabilities")


def _v2_model(predictor: Predictor, name: str) -> None:
    if name != predictor.model_name:
        raise ApiError(404, f"model '{name}' is not served here (serving '{predictor.model_name}')", type="not_found")


@router.get("/v2", response_model=ServerMetadataResponse, tags=["v2"])
async def v2_server() -> ServerMetadataResponse:
    return ServerMetadataResponse(name="llmops", version=llmops.__version__, extensions=["binary_tensor_data"])


@router.get("/v2/health/live", response_model=LiveResponse, tags=["v2"])
async def v2_live() -> LiveResponse:
    return LiveResponse(live=True)


@router.get("/v2/health/ready", response_model=V2ReadyResponse, tags=["v2"])
async def v2_ready(predictor: PredictorDep) -> JSONResponse:
    return JSONResponse({"ready": predictor.ready}, status_code=200 if predictor.ready else 503)


@router.get("/v2/models/{name}/ready", response_model=ModelReadyResponse, tags=["v2"], responses=ERRORS)
async def v2_model_ready(name: str, predictor: PredictorDep) -> JSONResponse:
    _v2_model(predictor, name)
    return JSONResponse({"name": name, "ready": predictor.ready}, status_code=200 if predictor.ready else 503)


@router.get(
    "/v2/models/{name}", response_model=ModelMetadataResponse, tags=["v2"], dependencies=Authorized, responses=ERRORS
)
async def v2_model_metadata(name: str, predictor: PredictorDep) -> ModelMetadataResponse:
    _v2_model(predictor, name)
    model = predictor.require_model()
    return ModelMetadataResponse(
        name=name,
        versions=[model.version],
        platform="pytorch_huggingface",
        inputs=[TensorMetadata(name=V2_INPUT, datatype="BYTES", shape=[-1])],
        outputs=[
            TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, len(model.labels)]),
        ],
    )


def _decode_bytes_tensor(raw: bytes, where: str) -> list[str]:
    """The binary tensor extension's BYTES layout: per element a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    try:
        while pos < len(raw):
            (size,) = struct.unpack_from("<I", raw, pos)
            out.append(raw[pos + 4 : pos + 4 + size].decode("utf-8"))
            pos += 4 + size
    except (struct.error, UnicodeDecodeError) as error:
        raise ApiError(400, f"{where}: bad BYTES tensor data: {error}", type="invalid_field", field=where) from None
    return out


async def _read_infer_request(request: Request) -> InferRequest:
    """JSON, or the binary tensor extension (a JSON header, then raw tensors) that tritonclient sends by default."""
    body = await request.body()
    header_length = request.headers.get("inference-header-content-length")
    try:
        if header_length is None:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type not in ("application/json", ""):
                raise ApiError(415, f"Content-Type must be application/json, not '{content_type}'", type="unsupported")
            return InferRequest.model_validate_json(body)
        split = int(header_length)
        infer = InferRequest.model_validate_json(body[:split])
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"malformed JSON: {first['msg']}", type="malformed_json") from None
        where = field_path(first["loc"])
        raise ApiError(422, f"{where}: {first['msg']}", type="invalid_field", field=where) from None
    except ValueError:
        raise ApiError(400, "Inference-Header-Content-Length must be an integer", type="invalid_request") from None
    offset = split
    for i, tensor in enumerate(infer.inputs):
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is not None and tensor.data is None:
            tensor.data = _decode_bytes_tensor(body[offset : offset + int(size)], f"inputs[{i}]")
            offset += int(size)
    return infer


def _flatten(data: list[Any]) -> list[Any]:
    return [x for item in data for x in (_flatten(item) if isinstance(item, list) else [item])]


@router.post(
    "/v2/models/{name}/infer",
    response_model=InferResponse,
    tags=["v2"],
    dependencies=Authorized,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": InferRequest.model_json_schema()}}, "required": True}
    },
)
async def v2_infer(name: str, request: Request, predictor: PredictorDep) -> InferResponse:
    """Input: one BYTES tensor `text` of shape [n]. Outputs: `label` (BYTES [n]) and `probabilities` (FP32 [n, k])."""
    _v2_model(predictor, name)
    infer = await _read_infer_request(request)
    if len(infer.inputs) != 1 or infer.inputs[0].name != V2_INPUT:
        names = [t.name for t in infer.inputs]
        raise ApiError(
            400, f"inputs: expected one tensor named '{V2_INPUT}', got {names}", type="invalid_field", field="inputs"
        )
    tensor = infer.inputs[0]
    if tensor.datatype != "BYTES":
        raise ApiError(
            400,
            f"inputs[0].datatype: must be BYTES, not {tensor.datatype}",
            type="invalid_field",
            field="inputs[0].datatype",
        )
    raw = _flatten(tensor.data or [])
    wanted = [o.name for o in infer.outputs] if infer.outputs else list(V2_OUTPUTS)
    unknown = sorted(set(wanted) - set(V2_OUTPUTS))
    if unknown:
        raise ApiError(
            400, f"outputs: unknown {unknown}; this model has {list(V2_OUTPUTS)}", type="invalid_field", field="outputs"
        )
    texts = check_texts(raw, "inputs[0].data", predictor.cfg)
    request_id = infer.id or _request_id(request)
    scored = await predictor.score(texts, request_id)
    n, k = scored.probs.shape
    tensors = {
        "label": ResponseOutput(name="label", shape=[n], datatype="BYTES", data=scored.labels()),
        "probabilities": ResponseOutput(
            name="probabilities", shape=[n, k], datatype="FP32", data=[float(p) for p in scored.probs.reshape(-1)]
        ),
    }
    return InferResponse(
        model_name=name, model_version=scored.model.version, id=request_id, outputs=[tensors[w] for w in wanted]
    )


# --- the app ---------------------------------------------------------------------------------------


class RequestContext:
    """A request id on every request and response (`X-Request-ID`); bodies over the limit refused before reading."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        refusal = None
        if scope["method"] in ("POST", "PUT", "PATCH"):
            if length is None and headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                refusal = (411, "send a Content-Length (chunked request bodies are not accepted)", "length_required")
            elif length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                refusal = (
                    413,
                    f"request body of {int(length)} bytes; at most {self.max_body_bytes} (serve.max_body_bytes)",
                    "body_too_large",
                )
        if refusal is not None:
            status, message, kind = refusal
            body = ErrorResponse(error=message, type=kind, request_id=request_id)
            await JSONResponse(body.model_dump(), status_code=status)(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)


def create_app(cfg: LlmopsConfig, tracking_uri: str | None = None) -> FastAPI:
    """The service for `cfg`, following `cfg.registry.model_name`@`cfg.serve.alias` in the given store."""

    uri = tracking_uri or resolve_tracking_uri(cfg.registry)
    api_keys = load_api_keys(cfg.serve)
    predictor = Predictor(cfg, uri)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if cfg.serve.threads is not None:
            torch.set_num_threads(cfg.serve.threads)
        await predictor.start()
        try:
            yield
        finally:
            await predictor.stop()

    app = FastAPI(
        title="llmops serving",
        version=llmops.__version__,
        summary=f"{cfg.registry.model_name}@{cfg.serve.alias} over /v1, MLflow /invocations and Open Inference v2.",
        lifespan=lifespan,
    )
    app.state.predictor = predictor
    app.state.api_keys = api_keys
    install_handlers(app)
    Instrumentator(
        registry=predictor.metrics.registry, excluded_handlers=["/metrics"], should_group_status_codes=False
    ).instrument(
        app, metric_namespace="", latency_lowr_buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
    ).expose(app, tags=["health"])
    app.include_router(router)
    app.add_middleware(RequestContext, max_body_bytes=cfg.serve.max_body_bytes)
    return app


CONFIG_ENV = "LLMOPS_SERVE_CONFIG"
OVERRIDES_ENV = "LLMOPS_SERVE_OVERRIDES"


def app_from_environment() -> FastAPI:
    """The app factory uvicorn calls in each worker: the config path and `--set` overrides come by environment."""
    from llmops.config import load_config

    overrides = json.loads(os.environ.get(OVERRIDES_ENV, "[]"))
    return create_app(load_config(os.environ.get(CONFIG_ENV) or None, overrides))
