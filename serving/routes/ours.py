"""Our own protocol: health, `/v1/predict`, `/v1/model`, `/v1/feedback`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.deps import ForFeedback, ForInferenceJson, ForMonitoring, ServiceDep, check_texts
from serving.models import LoadedModel
from serving.routes import ERRORS, feedback_link, request_id_of
from serving.schemas import (
    FeedbackRequest,
    FeedbackResponse,
    HealthResponse,
    LoadedModelInfo,
    ModelRef,
    ModelResponse,
    Prediction,
    PredictRequest,
    PredictResponse,
    ReadyResponse,
    ServedModel,
)

router = APIRouter()


# --- health ----------------------------------------------------------------------------------------


@router.get("/healthz", response_model=HealthResponse, tags=["health"])
async def healthz() -> HealthResponse:
    """The process is alive."""
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, tags=["health"], responses={503: {"model": ReadyResponse}})
async def readyz(service: ServiceDep) -> JSONResponse:
    """200 once every served model the registry has is loaded and warmed; the body carries each model's version
    and a reload failure while its old version serves."""
    model = service.champion.current
    models = [
        ServedModel(
            name=name,
            alias=watcher.alias,
            version=watcher.current.version if watcher.current else None,
            task=watcher.current.task if watcher.current else None,
            adapter_of=f"{base.name}/{base.version}" if watcher.current and (base := watcher.current.base) else None,
            reason=watcher.status,
        )
        for name, watcher in service.models.items()
    ]
    ready = service.ready
    # A model the registry does not have yet holds nothing back; it is named only while nothing serves.
    reasons = [f"{name}: {w.status}" for name, w in service.models.items() if w.status and (not w.absent or not ready)]
    body = ReadyResponse(
        ready=ready,
        model=ModelRef(name=model.name, version=model.version, alias=model.alias) if model else None,
        reason="; ".join(reasons) or None,
        models=models,
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


# --- /v1 -------------------------------------------------------------------------------------------


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    tags=["v1"],
    responses=ERRORS | feedback_link("$response.body#/request_id"),
)
async def predict(body: PredictRequest, request: Request, service: ForInferenceJson) -> PredictResponse:
    """Label and class probabilities per text, with the model version that answered."""
    texts = check_texts(body.texts, "texts", service.cfg)
    request_id = request_id_of(request)
    scored = await service.score(texts, request_id)
    model = scored.model
    predictions = [
        Prediction(
            label=label,
            score=max(row),
            probabilities=dict(zip(model.labels, row, strict=True)),
            model_name=model.name,
            model_version=model.version,
        )
        for label, row in zip(scored.labels(), scored.rows, strict=True)
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
        task=model.task,
        labels=[] if model.generates else model.labels,
        kind=model.runtime.meta.kind,
        loaded_at=model.loaded_at,
        tags=model.tags,
        metrics=model.metrics,
    )


@router.get("/v1/model", response_model=ModelResponse, tags=["v1"], responses=ERRORS)
async def model_info(service: ForMonitoring) -> ModelResponse:
    """Which version the classifier routes use, with its metrics and tags (and the challenger's, when shadow or
    canary is on); in a service of generators alone, the first generator's."""
    challenger = service.challenger.current if service.challenger else None
    return ModelResponse(
        champion=_model_info(service.champion.current),
        challenger=_model_info(challenger),
        reload_error=service.champion.status if service.champion.current else None,
    )


@router.post(
    "/v1/feedback",
    response_model=FeedbackResponse,
    status_code=202,
    tags=["v1"],
    responses=ERRORS,
)
async def feedback(body: FeedbackRequest, service: ForFeedback) -> FeedbackResponse:
    """The true label of a past prediction, or a rating or corrected completion of a past generation, stored
    beside it for monitoring."""
    if body.label is not None:
        await service.feedback(body.request_id, body.index, body.label)
    else:
        await service.generation_feedback(body.request_id, body.index, body.rating, body.completion)
    return FeedbackResponse(**body.model_dump(), stored=True)
