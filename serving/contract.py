"""The OpenAPI document (`/openapi.json`, rendered at `/docs`) is the service's contract: a request it allows,
the server accepts; a request it rules out, the server refuses with a 4xx.

FastAPI derives the document from the request models. This module adds what only the running service knows:

- the limits of `serve.*`: texts per request (`max_texts`, prompts too), characters per text when over-length
  texts are refused (`max_text_chars` with `over_length: reject`), choices per prompt (`max_n`);
- which served model each route answers for, as loaded now: `infer` the classifier, `generate` and OpenAI's
  routes the generators, and the labels feedback may give; token ids below the model's vocabulary size;
- API-key security, declared only when keys are configured (without keys, nothing asks for one);
- the body of the Open Inference Protocol's `infer`, which its route reads itself (it also takes the binary
  tensor extension, which JSON Schema cannot describe).

The document follows the served versions: it is rebuilt when a version with other labels or another task
swaps in. `tests/integration/test_contract.py` holds the server to it with schemathesis.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.utils import get_openapi
from fastapi.routing import iter_route_contexts

from llmops.config import ServeConfig
from serving.deps import KEY_SCHEMES
from serving.schemas import NOT_BLANK
from serving.service import Service

Schema = dict[str, Any]


@dataclass(frozen=True)
class Served:
    """What the routes answer for right now."""

    models: tuple[str, ...]
    """The models of `serve.models` the registry has (one it has not is a 404, not a name to offer)."""
    classifier: str | None
    """The model `/v1/predict`, `/invocations` and `infer` score with, once loaded."""
    labels: tuple[str, ...]
    generators: tuple[str, ...]
    """The loaded generators."""
    vocabularies: tuple[int, ...]
    """Each loaded generator's vocabulary size: token ids run below it."""

    @classmethod
    def now(cls, service: Service) -> Served:
        champion = service.champion.current
        classifier = champion if champion is not None and not champion.generates else None
        loaded = [w.current for w in service.models.values() if w.current is not None and w.current.generates]
        return cls(
            models=tuple(name for name, watcher in service.models.items() if watcher.current or not watcher.absent),
            classifier=classifier.name if classifier else None,
            labels=tuple(classifier.labels) if classifier else (),
            generators=tuple(model.name for model in loaded),
            vocabularies=tuple(len(model.generation.runtime.tokenizer) for model in loaded),
        )


def install(app: FastAPI, service: Service, keys_required: bool) -> None:
    """Serve the contract at `/openapi.json` (and so `/docs`) in place of FastAPI's own document."""
    built: dict[Served, Schema] = {}

    def openapi() -> Schema:
        served = Served.now(service)
        if served not in built:
            built.clear()
            generated = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            keyed = keyed_operations(app) if keys_required else set()
            built[served] = document(generated, service.cfg, served, keyed)
        return built[served]

    app.openapi = openapi  # type: ignore[method-assign]


def keyed_operations(app: FastAPI) -> set[tuple[str, str]]:
    """(path, method) of the routes that ask for a key (`serving.deps.require_key` among their dependencies)."""

    def asks(dependant: Dependant) -> bool:
        return any(hasattr(d.call, "key_group") or asks(d) for d in dependant.dependencies)

    keyed = set()
    for route in iter_route_contexts(app.routes):  # routes of included routers too
        dependant, path = getattr(route, "dependant", None), route.path
        if dependant is not None and path and getattr(route, "include_in_schema", False) and asks(dependant):
            keyed |= {(path, method.lower()) for method in route.methods or ()}
    return keyed


def document(generated: Schema, cfg: ServeConfig, served: Served, keyed: set[tuple[str, str]]) -> Schema:
    """FastAPI's document with the service's own knowledge written in; `keyed`: the operations that ask for a
    key (none without keys)."""
    doc = copy.deepcopy(generated)
    schemas = doc["components"]["schemas"]
    text, texts = text_schema(cfg), texts_schema(cfg)

    schemas["PredictRequest"]["properties"]["texts"] = texts
    schemas["InvocationsRequest"] = invocations_schema(text, texts)
    schemas.pop("DataframeSplit", None)
    schemas["InferRequest"] = infer_schema(text, cfg)
    if served.labels:
        _nullable(schemas["FeedbackRequest"]["properties"], "label", {"type": "string", "enum": list(served.labels)})
    for option in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]:  # a prompt, or a list of them
        if option.get("type") == "array" and option["items"].get("type") != "integer":  # not one prompt's ids
            option |= {"minItems": 1, "maxItems": cfg.max_texts}
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        schemas[request]["properties"]["n"]["maximum"] = cfg.max_n
    if served.generators:
        for request in ("CompletionRequest", "ChatCompletionRequest"):
            schemas[request]["properties"]["model"]["enum"] = list(served.generators)
        token_ids(schemas, served)

    names = {
        "/v2/models/{name}": list(served.models),
        "/v2/models/{name}/ready": list(served.models),
        "/v2/models/{name}/infer": [served.classifier] if served.classifier else [],
        "/v2/models/{name}/generate": list(served.generators),
        "/v2/models/{name}/generate_stream": list(served.generators),
    }
    for path, allowed in names.items():
        for operation in doc["paths"][path].values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "name" and allowed:
                    parameter["schema"]["enum"] = allowed

    if keyed:  # as FastAPI declares a `Security` dependency
        schemes = {scheme.scheme_name: jsonable_encoder(scheme.model, by_alias=True, exclude_none=True)
                   for scheme in KEY_SCHEMES}  # fmt: skip
        doc["components"]["securitySchemes"] = schemes
        for path, method in keyed:
            doc["paths"][path][method]["security"] = [{name: []} for name in schemes]
    return doc


TOKEN_IDS = {"CompletionRequest": "prompt", "DetokenizeRequest": "tokens"}
"""The requests that take token ids, and the field holding them."""
TOKENIZER_ROUTES = ("TokenizeText", "TokenizeChat", "DetokenizeRequest")
"""Requests whose `model` may be left out while one generator is served."""


def _bounded(schema: Any, below: int) -> Any:
    """A copy of `schema` with every token id (an integer with minimum 0) under `below`."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer" and schema.get("minimum") == 0:
            return schema | {"maximum": below - 1}
        return {key: _bounded(value, below) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_bounded(value, below) for value in schema]
    return schema


def token_ids(schemas: Schema, served: Served) -> None:
    """Token ids run below the vocabulary of the model asked: one bound when every served generator has the same
    vocabulary size, else one per model. The tokenizer routes name the model when several are served."""
    for request in TOKENIZER_ROUTES:
        model = schemas[request]["properties"]["model"]
        model["anyOf"][0]["enum"] = list(served.generators)
        if len(served.generators) > 1:
            schemas[request]["properties"]["model"] = model["anyOf"][0]
            schemas[request].setdefault("required", []).append("model")
    for request, field in TOKEN_IDS.items():
        properties = schemas[request]["properties"]
        if len(set(served.vocabularies)) == 1:
            properties[field] = _bounded(properties[field], served.vocabularies[0])
            continue
        schemas[request].setdefault("allOf", []).extend(  # beside the request's own rules
            {
                "if": {"required": ["model"], "properties": {"model": {"const": name}}},
                "then": {"properties": {field: _bounded(properties[field], size)}},
            }
            for name, size in zip(served.generators, served.vocabularies, strict=True)
        )


def text_schema(cfg: ServeConfig) -> Schema:
    """One text to classify: not blank; over `max_text_chars` it is cut, unless `over_length: reject`."""
    schema: Schema = {"type": "string", "minLength": 1, "pattern": NOT_BLANK}
    if cfg.over_length == "reject":
        schema["maxLength"] = cfg.max_text_chars
    return schema


def texts_schema(cfg: ServeConfig) -> Schema:
    return {"type": "array", "items": text_schema(cfg), "minItems": 1, "maxItems": cfg.max_texts}


def _one_field(value: Schema) -> Schema:
    """An object holding `value` under `text`, or as its only field (MLflow's records and columns)."""
    return {
        "anyOf": [
            {"type": "object", "required": ["text"], "properties": {"text": value}},
            {"type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": value},
        ]
    }


def _nullable(properties: Schema, name: str, schema: Schema) -> None:
    properties[name] = {"anyOf": [schema, {"type": "null"}], "default": None}


def invocations_schema(text: Schema, texts: Schema) -> Schema:
    """MLflow's four input formats, one per request, over a single text column."""
    rows = texts | {"items": {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}]}}
    split = {
        "type": "object",
        "description": "pandas' `split` orientation of a frame with one column, the text.",
        "required": ["data"],
        "additionalProperties": False,
        "properties": {
            "columns": {
                "anyOf": [
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                    {"type": "null"},
                ]
            },
            "index": {"anyOf": [{"type": "array"}, {"type": "null"}]},
            "data": rows,
        },
    }
    text_or_record = {"anyOf": [text, _one_field(text)]}
    formats: dict[str, Schema] = {
        "dataframe_split": split,
        "dataframe_records": texts | {"items": _one_field(text)},
        "instances": texts | {"items": text_or_record},
        "inputs": {"anyOf": [texts | {"items": text_or_record}, _one_field(texts)]},
    }
    properties: Schema = {}
    for name, schema in formats.items():
        _nullable(properties, name, schema)
    _nullable(properties, "params", {"type": "object"})
    return {
        "type": "object",
        "title": "InvocationsRequest",
        "description": "Exactly one of MLflow's four input formats; `params` is accepted and ignored.",
        "additionalProperties": False,
        "properties": properties,
        "oneOf": [{"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in formats],
    }


def infer_schema(text: Schema, cfg: ServeConfig) -> Schema:
    """The Open Inference Protocol's request, as the classifier takes it: one BYTES tensor `text` of shape [n]
    (or [n, 1]), and any of the outputs `label`, `probabilities`."""
    row = {"type": "array", "items": text, "minItems": 1, "maxItems": 1}
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"const": "text"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"const": "BYTES"},
            "parameters": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            "data": {"type": "array", "items": {"anyOf": [text, row]}, "minItems": 1, "maxItems": cfg.max_texts},
        },
    }
    output = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"enum": ["label", "probabilities"]},
            "parameters": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        },
    }
    return {
        "type": "object",
        "title": "InferRequest",
        "required": ["inputs"],
        "properties": {
            "id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "parameters": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            "inputs": {"type": "array", "items": tensor, "minItems": 1, "maxItems": 1},
            "outputs": {"anyOf": [{"type": "array", "items": output}, {"type": "null"}]},
        },
    }
