"""The OpenAPI document is the service's contract: schemathesis (`--checks all`: server errors, schema-valid
requests refused, schema-violating requests accepted, undocumented statuses and content types, auth that is
declared but not enforced, and the reverse) runs a fixed example budget with a fixed seed against the app,
served in this process by uvicorn over real HTTP, with API keys off and on; the document itself passes an
OpenAPI validator."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from llmops.config import LlmopsConfig, RegistryConfig, ServeConfig
from llmops.gateway import GatewayStore
from serving.app import create_app
from serving.schemas import WHITESPACE
from tests.http_service import in_process, served_in_thread
from tests.tiny_registry import LABELS, register_generators, register_versions, set_alias

CLASSIFIER = "contract-classifier"
GENERATOR = "contract-generator"
UNREGISTERED = "contract-never-registered"
BROKEN = "contract-broken"
KEY = "contract-key-123"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("contract-registry")
    uri = register_versions(root, CLASSIFIER, seeds=[5])
    register_generators(root, GENERATOR, seeds=[5], uri=uri)
    register_versions(root, BROKEN, seeds=[6], broken={6})  # its one version fails to load
    set_alias(uri, BROKEN, "champion", "1")
    set_alias(uri, CLASSIFIER, "champion", "1")
    set_alias(uri, GENERATOR, "champion", "1")
    return uri


SETUPS = {
    "all": ([CLASSIFIER, GENERATOR], CLASSIFIER),
    "default": ([CLASSIFIER, UNREGISTERED], CLASSIFIER),  # `make run` then `make serve`: the generator never ran
    "generator-only": ([GENERATOR], GENERATOR),  # `llmops serve --config configs/llm-quickstart.yaml`
}
"""serve.models and registry.model_name of each setup a user starts."""
GENERATOR_ROUTES = {
    "GET /tokenizer_info",
    "POST /detokenize",
    "POST /tokenize",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v2/models/{name}/generate",
    "POST /v2/models/{name}/generate_stream",
}
CLASSIFIER_ROUTES = {"POST /invocations", "POST /v1/predict", "POST /v2/models/{name}/infer", "POST /v1/feedback"}
BY_ID = {
    "POST /v1/feedback",
    "POST /v1/batches",
    "GET /v1/batches/{batch_id}",
    "POST /v1/batches/{batch_id}/cancel",
    "GET /v1/files/{file_id}",
    "GET /v1/files/{file_id}/content",
}
"""Operations on something by its id (a request, a file, a batch): a 404 for the random ids the fuzzer sends, in
every setup."""
UNSERVED = {"all": BY_ID, "default": GENERATOR_ROUTES | BY_ID, "generator-only": CLASSIFIER_ROUTES | BY_ID}
"""The operations that answer 404 to whatever the fuzzer sends in each setup: a kind of model not served, and
those by id."""


def start(uri: str, models: list[str], model_name: str) -> tuple[str, Callable[[], None]]:
    """The app on a free loopback port, served in this process by uvicorn; its base URL and how to stop it."""
    serve = ServeConfig(models=models, max_texts=8, max_new_tokens=8, default_max_tokens=8, flush_interval_s=60)
    app = create_app(LlmopsConfig(registry=RegistryConfig(model_name=model_name), serve=serve), tracking_uri=uri)
    served = served_in_thread(app)
    base = served.__enter__()
    return base, lambda: served.__exit__(None, None, None)


@pytest.fixture(params=["keys-off", "keys-on", "scoped-keys"])
def keys(request: pytest.FixtureRequest, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The key the fuzzer sends: none, an environment key (unscoped), or a stored key that may do what the
    fuzzer does (inference, feedback, monitoring; `serve.gateway_store` in the working folder)."""
    monkeypatch.delenv("LLMOPS_API_KEYS", raising=False)
    if request.param == "keys-on":
        monkeypatch.setenv("LLMOPS_API_KEYS", KEY)
        return KEY
    if request.param == "scoped-keys":
        secret, _ = GatewayStore(workdir / "gateway.db").create(
            "fuzzer", groups=["inference", "feedback", "monitoring"]
        )
        return secret
    return None


@pytest.fixture
def service(store: str, workdir: Path, keys: str | None) -> Iterator[str]:
    """Every model loaded; yields the base URL."""
    base, stop = start(store, *SETUPS["all"])
    yield base
    stop()


def test_the_document_is_valid_openapi_and_says_what_the_service_knows(service: str) -> None:
    doc = httpx.get(f"{service}/openapi.json").json()
    validate(doc)  # raises on an invalid document, an unresolvable $ref included
    schemas = doc["components"]["schemas"]
    keys_on = "securitySchemes" in doc["components"]
    predict = doc["paths"]["/v1/predict"]["post"]
    assert ("security" in predict) == keys_on
    assert "security" not in doc["paths"]["/healthz"]["get"]  # health stays open either way
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    texts = schemas["PredictRequest"]["properties"]["texts"]
    assert (texts["minItems"], texts["maxItems"]) == (1, 8)  # serve.max_texts
    label = schemas["FeedbackRequest"]["properties"]["label"]["anyOf"][0]
    assert label["enum"] == LABELS
    assert schemas["CompletionRequest"]["properties"]["model"]["enum"] == [GENERATOR]
    assert schemas["CompletionRequest"]["properties"]["n"]["maximum"] == 8  # serve.max_n
    options = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    ids = next(o for o in options if o.get("type") == "array" and o["items"].get("type") == "integer")
    assert ids["items"]["maximum"] == 30521  # token ids below the served vocabulary (MiniLM's 30522)
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] == 30521
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferRequest"
    }
    assert infer["parameters"][0]["schema"]["enum"] == [CLASSIFIER]


@pytest.mark.parametrize(
    ("setup", "keys"),
    [(setup, keys) for setup in SETUPS for keys in ("keys-off", "scoped-keys")],
    indirect=["keys"],
)  # every setup with keys off and with a scoped key (an environment key's document: the test above)
def test_schemathesis_finds_nothing_with_every_check(
    setup: str, store: str, workdir: Path, keys: str | None, tmp_path: Path
) -> None:
    service, stop = start(store, *SETUPS[setup])
    try:
        report = schemathesis(service, tmp_path, keys)
    finally:
        stop()
    # No warning (an unresolvable reference, routes never reached) but one: operations that answer 404 whatever
    # is sent, which are the routes of a kind of model the setup does not serve, and feedback on a random request
    # id (which ids the fuzzer reuses from earlier responses is chance). With every model served, the links from
    # an answer to feedback on it are followed in the stateful phase, every one of them.
    warned = re.search(r"=+ WARNINGS =+\n(.*?)\n=+ SUMMARY =+", report, re.DOTALL)
    warnings = warned.group(1).strip() if warned else ""
    assert not warnings or warnings.startswith("Missing test data"), report[-3000:]
    always_404 = set(re.findall(r"^\s+- ((?:GET|POST) \S+)$", warnings, re.MULTILINE))
    assert always_404 <= UNSERVED[setup], report[-3000:]
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected / (\d+) total", report)
    assert links is not None and (setup != "all" or len(set(links.groups())) == 1), report[-3000:]
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", report)
    assert selected is not None and len(set(selected.groups())) == 1, report[-3000:]  # every operation tested


def schemathesis(service: str, workdir: Path, key: str | None) -> str:
    """schemathesis' report of `--checks all` against the running service, sending `key`."""
    command = [str(SCHEMATHESIS), "run", f"{service}/openapi.json", "--checks", "all"]
    command += ["--max-examples", "15", "--seed", "20261124", "--workers", "1", "--no-color"]
    assert ("securitySchemes" in httpx.get(f"{service}/openapi.json").json()["components"]) == (key is not None)
    if key is not None:
        command += ["--header", f"Authorization: Bearer {key}"]
    # the links the document declares, not those schemathesis guesses from names (every declared one must be followed)
    (workdir / "schemathesis.toml").write_text("[phases.stateful.inference]\nalgorithms = []\n")
    run = subprocess.run(command, capture_output=True, text=True, cwd=workdir, timeout=600)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    assert "No issues found" in report or "1 warning in" in report, report[-3000:]
    return report


# --- what the fuzzer found once, each as a test -------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(models: list[str], model_name: str) -> LlmopsConfig:
    serve = ServeConfig(models=models, max_texts=8, flush_interval_s=60)
    return LlmopsConfig(registry=RegistryConfig(model_name=model_name), serve=serve)


@pytest.mark.anyio
async def test_a_served_model_the_registry_lacks_is_a_404_that_says_how_to_register_it(
    store: str, workdir: Path
) -> None:
    async with in_process(config(*SETUPS["default"]), store) as (client, _):
        ready = await client.get("/readyz")
        answers = [
            await client.get(f"/v2/models/{UNREGISTERED}"),
            await client.get(f"/v2/models/{UNREGISTERED}/ready"),
            await client.post(f"/v2/models/{UNREGISTERED}/generate", json={"text_input": "hi"}),
            await client.post("/v1/completions", json={"model": UNREGISTERED, "prompt": "hi"}),
        ]
        tokenize = await client.post("/tokenize", json={"prompt": "hi"})
        doc = (await client.get("/openapi.json")).json()
    assert ready.status_code == 200  # the classifier serves; nothing to wait for
    for answer in answers:
        assert (answer.status_code, answer.json()["type"]) == (404, "not_registered"), answer.text
        assert "llmops run" in answer.json()["error"] and "serve.models" in answer.json()["error"]
    assert answers[3].json()["field"] == "model"
    assert tokenize.status_code == 404  # no generator to tokenize with: not a 422 for a valid request
    names = doc["paths"]["/v2/models/{name}"]["get"]["parameters"][0]["schema"]["enum"]
    assert names == [CLASSIFIER]
    assert "enum" not in doc["components"]["schemas"]["CompletionRequest"]["properties"]["model"]


@pytest.mark.anyio
async def test_a_model_still_waiting_answers_ready_false_in_its_documented_shape_with_the_reason(
    store: str, workdir: Path
) -> None:
    async with in_process(config([CLASSIFIER, BROKEN], CLASSIFIER), store, ready=False) as (client, _):
        ready = await client.get(f"/v2/models/{BROKEN}/ready")
        server = await client.get("/v2/health/ready")
        doc = (await client.get("/openapi.json")).json()
    assert ready.status_code == 503 and server.status_code == 503
    assert ready.json()["ready"] is False and "version 1 failed to load" in ready.json()["reason"]
    assert server.json() == {"ready": False}
    for path, body in (("/v2/models/{name}/ready", ready.json()), ("/v2/health/ready", server.json())):
        documented = doc["paths"][path]["get"]["responses"]["503"]["content"]["application/json"]["schema"]
        schema = doc["components"]["schemas"][documented["$ref"].rsplit("/", 1)[1]]
        jsonschema.validate(body, schema)


@pytest.mark.anyio
async def test_blank_is_one_rule_in_the_document_and_the_service(store: str, workdir: Path) -> None:
    candidates = [*WHITESPACE, "\u200b", "\ufeff", "a", "\u001d a"]  # zero-width space and BOM are not blank
    async with in_process(config(*SETUPS["all"]), store) as (client, _):
        doc = (await client.get("/openapi.json")).json()
        statuses = {
            text: [
                (await client.post("/v1/predict", json={"texts": [text]})).status_code,
                (await client.post("/invocations", json={"inputs": [text]})).status_code,
                (
                    await client.post(
                        f"/v2/models/{GENERATOR}/generate", json={"text_input": text, "parameters": {"max_tokens": 1}}
                    )
                ).status_code,
            ]
            for text in candidates
        }
    pattern = doc["components"]["schemas"]["PredictRequest"]["properties"]["texts"]["items"]["pattern"]
    for text, answered in statuses.items():
        blank = not text.strip()
        assert (re.search(pattern, text) is None) == blank, repr(text)  # the document's rule
        assert answered == ([422] * 3 if blank else [200] * 3), (repr(text), answered)  # the service's


@pytest.mark.anyio
async def test_a_service_of_generators_alone_describes_its_model(store: str, workdir: Path) -> None:
    async with in_process(config(*SETUPS["generator-only"]), store) as (client, _):
        described = await client.get("/v1/model")
        predict = await client.post("/v1/predict", json={"texts": ["hello"]})
    assert described.status_code == 200, described.text
    champion = described.json()["champion"]
    assert (champion["name"], champion["task"], champion["labels"]) == (GENERATOR, "causal-lm", [])
    assert (predict.status_code, predict.json()["type"]) == (404, "wrong_model_kind")
    assert "/v1/completions" in predict.json()["error"]
