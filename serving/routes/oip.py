"""The Open Inference Protocol (KServe v2, Triton): server and model metadata, health, `infer` for the
classifier, and Triton's `generate` / `generate_stream` extension for generators."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

import llmops
from serving.deps import ForInference, ForInferenceJson, ServiceDep, check_texts
from serving.errors import ApiError, field_path
from serving.generate import GenerationRequest, generate
from serving.models import LoadedModel, ModelWatcher
from serving.routes import ERRORS, request_id_of
from serving.schemas import (
    GenerateRequest,
    GenerateResponse,
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
from serving.service import Service

router = APIRouter()
ROUTE = "v2"
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "One event per piece of text."}
}


# --- /v2 (Open Inference Protocol) -----------------------------------------------------------------

V2_INPUT = "text"
V2_OUTPUTS = ("label", "probabilities")


def _served(service: Service, name: str) -> ModelWatcher:
    if name not in service.models:
        served = ", ".join(service.models)
        raise ApiError(404, f"model '{name}' is not served here (serving {served})", type="not_found", field="name")
    return service.models[name]


def _classifier(service: Service, name: str) -> LoadedModel:
    """`infer` scores with the classifier routes' model: a 404 for a generator (it has `generate` instead)."""
    model = service.loaded(_served(service, name), field="name")
    if model.generates:
        raise ApiError(
            404, f"model '{name}' is a {model.task} model: use /v2/models/{name}/generate", type="wrong_model_kind",
            field="name",
        )  # fmt: skip
    if service.models[name] is not service.champion:
        raise ApiError(
            404,
            f"model '{name}' is served, but `infer` scores with '{service.champion.name}' (registry.model_name)",
            type="wrong_model_kind",
            field="name",
        )
    return model


@router.get("/v2", response_model=ServerMetadataResponse, tags=["v2"])
async def v2_server() -> ServerMetadataResponse:
    return ServerMetadataResponse(name="llmops", version=llmops.__version__, extensions=["binary_tensor_data"])


@router.get("/v2/health/live", response_model=LiveResponse, tags=["v2"])
async def v2_live() -> LiveResponse:
    return LiveResponse(live=True)


@router.get(
    "/v2/health/ready", response_model=V2ReadyResponse, tags=["v2"], responses={503: {"model": V2ReadyResponse}}
)
async def v2_ready(service: ServiceDep) -> JSONResponse:
    """200 once every served model the registry has is loaded; 503 (`ready: false`) before."""
    return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)


@router.get(
    "/v2/models/{name}/ready",
    response_model=ModelReadyResponse,
    tags=["v2"],
    responses=ERRORS | {503: {"model": ModelReadyResponse}},
)
async def v2_model_ready(name: str, service: ServiceDep) -> JSONResponse:
    """200 when a version of the model serves; 503 (`ready: false`, with what it waits for) while one loads; 404
    when the registry has none."""
    watcher = _served(service, name)
    if watcher.current is None:
        service.require_registered(watcher, field="name")
        body = ModelReadyResponse(name=name, ready=False, reason=watcher.status)
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(ModelReadyResponse(name=name, ready=True).model_dump(exclude_none=True))


@router.get("/v2/models/{name}", response_model=ModelMetadataResponse, tags=["v2"], responses=ERRORS)
async def v2_model_metadata(name: str, service: ForInference) -> ModelMetadataResponse:
    """A classifier's tensors for `infer`; a generator's for `generate`."""
    model = service.loaded(_served(service, name), field="name")
    if not model.generates:
        inputs = [TensorMetadata(name=V2_INPUT, datatype="BYTES", shape=[-1])]
        outputs = [
            TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, len(model.labels)]),
        ]
    else:
        inputs = [TensorMetadata(name="text_input", datatype="BYTES", shape=[1])]
        outputs = [TensorMetadata(name="text_output", datatype="BYTES", shape=[1])]
    return ModelMetadataResponse(
        name=name, versions=[model.version], platform="pytorch_huggingface", inputs=inputs, outputs=outputs
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


def _texts_of(data: list[Any], field: str) -> list[Any]:
    """The texts of a tensor of shape [n], or [n, 1] given as rows of one text."""
    texts = []
    for i, item in enumerate(data):
        if isinstance(item, list):
            if len(item) != 1:
                where = f"{field}[{i}]"
                raise ApiError(422, f"{where}: a row holds one text (shape [n, 1])", type="invalid_field", field=where)
            item = item[0]
        texts.append(item)
    return texts


@router.post(
    "/v2/models/{name}/infer",
    response_model=InferResponse,
    tags=["v2"],
    responses=ERRORS,
    openapi_extra={
        # The route reads its body itself (JSON or binary tensors); serving/contract.py writes the JSON schema.
        "requestBody": {
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}},
            "required": True,
        }
    },
)
async def v2_infer(name: str, request: Request, service: ForInference) -> InferResponse:
    """Input: one BYTES tensor `text` of shape [n]. Outputs: `label` (BYTES [n]) and `probabilities` (FP32 [n, k])."""
    _classifier(service, name)
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
    raw = _texts_of(tensor.data or [], "inputs[0].data")
    wanted = [o.name for o in infer.outputs] if infer.outputs else list(V2_OUTPUTS)
    unknown = sorted(set(wanted) - set(V2_OUTPUTS))
    if unknown:
        raise ApiError(
            400, f"outputs: unknown {unknown}; this model has {list(V2_OUTPUTS)}", type="invalid_field", field="outputs"
        )
    texts = check_texts(raw, "inputs[0].data", service.cfg)
    request_id = infer.id or request_id_of(request)
    scored = await service.score(texts, request_id)
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


# --- generate (Triton's generate extension, for generators) ---------------------------------------------


def _generation_request(name: str, body: GenerateRequest) -> GenerationRequest:
    p = body.parameters
    return GenerationRequest(
        model=name,
        prompt=body.text_input,
        max_tokens=body.max_tokens or p.max_tokens,
        temperature=p.temperature if body.temperature is None else body.temperature,
        top_p=p.top_p if body.top_p is None else body.top_p,
        stop=tuple(p.stop),
        seed=p.seed,
        min_tokens=p.min_tokens,
        field="text_input",
    )


@router.post(
    "/v2/models/{name}/generate",
    response_model=GenerateResponse,
    tags=["v2"],
    responses=ERRORS,
)
async def v2_generate(
    name: str, body: GenerateRequest, request: Request, service: ForInferenceJson
) -> GenerateResponse:
    """The whole answer to `text_input` from the generator `name`."""
    stream = await generate(service, _generation_request(name, body), request_id_of(request), ROUTE)
    answer = await stream.answer()
    return GenerateResponse(
        model_name=name,
        model_version=stream.model.version,
        text_output=answer.text,
        finish_reason=answer.finish_reason,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
    )


@router.post(
    "/v2/models/{name}/generate_stream",
    tags=["v2"],
    responses=ERRORS | STREAMED,
)
async def v2_generate_stream(
    name: str, body: GenerateRequest, request: Request, service: ForInferenceJson
) -> StreamingResponse:
    """The answer to `text_input` as server-sent events of `{model_name, model_version, text_output}`; the last
    one also carries `finish_reason` and the token counts."""
    stream = await generate(service, _generation_request(name, body), request_id_of(request), ROUTE)

    async def events() -> AsyncIterator[str]:
        try:
            async for piece in stream.events():
                last = piece.finish_reason is not None
                out = GenerateResponse(
                    model_name=name,
                    model_version=stream.model.version,
                    text_output=piece.text,
                    finish_reason=piece.finish_reason,
                    prompt_tokens=stream.prompt_tokens if last else None,
                    completion_tokens=piece.completion_tokens if last else None,
                )
                yield f"data: {out.model_dump_json(exclude_none=True)}\n\n"
        except ApiError as error:
            yield f"data: {json.dumps({'error': error.message, 'type': error.type})}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
