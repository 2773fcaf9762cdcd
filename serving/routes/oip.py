"""The Open Inference Protocol (KServe v2, Triton): server and model metadata, health, `infer`."""

from __future__ import annotations

import struct
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

import llmops
from serving.deps import Authorized, PredictorDep, check_texts
from serving.errors import ApiError, field_path
from serving.predictor import Predictor
from serving.routes import ERRORS, request_id_of
from serving.schemas import (
    InferRequest,
    InferResponse,
    LiveResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ResponseOutput,
    ServerMetadataResponse,
    TensorMetadata,
    V2ReadyResponse,
)

router = APIRouter()


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
    request_id = infer.id or request_id_of(request)
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
