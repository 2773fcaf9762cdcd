"""The contract's token-id bounds when served generators have vocabularies of different sizes: one rule per
model, beside the request's own rules (a structured answer takes no stop strings)."""

from __future__ import annotations

from serving.contract import Served, token_ids
from serving.openai_schemas import NO_STOP_WITH_FORMAT


def test_each_model_bounds_its_token_ids_and_the_request_keeps_its_rules() -> None:
    token = {"type": "integer", "minimum": 0}
    optional_model = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    schemas = {
        "CompletionRequest": {
            "properties": {"prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": token}]}},
            "allOf": [NO_STOP_WITH_FORMAT],
        },
        "DetokenizeRequest": {"properties": {"model": optional_model, "tokens": {"type": "array", "items": token}}},
        "TokenizeText": {"properties": {"model": optional_model}},
        "TokenizeChat": {"properties": {"model": optional_model}},
    }
    served = Served(models=("a", "b"), classifier=None, labels=(), generators=("a", "b"), vocabularies=(100, 50))
    token_ids(schemas, served)
    rules = schemas["CompletionRequest"]["allOf"]
    assert rules[0] == NO_STOP_WITH_FORMAT
    bounds = {r["if"]["properties"]["model"]["const"]: r["then"]["properties"]["prompt"] for r in rules[1:]}
    assert bounds["a"]["anyOf"][1]["items"]["maximum"] == 99 and bounds["b"]["anyOf"][1]["items"]["maximum"] == 49
    assert schemas["DetokenizeRequest"]["required"] == ["model"]  # several generators: name the one
    assert schemas["TokenizeText"]["properties"]["model"] == {"type": "string", "enum": ["a", "b"]}
