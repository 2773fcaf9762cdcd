"""The HTTP service in-process (ASGI transport, real lifespan) against a real MLflow registry of tiny models.

Versions: 1 and 2 load (they answer differently), 3 is registered but fails to load.
Each test sets the aliases it needs first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from llmops.config import LlmopsConfig, RegistryConfig, ServeConfig
from llmops.predlog import open_store
from serving.app import create_app
from tests.tiny_registry import LABELS, register_versions, set_alias

NAME = "tiny-sentiment"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return register_versions(tmp_path_factory.mktemp("serving-registry"), NAME, seeds=[1, 2, 3], broken={3})


@pytest.fixture
def champion_1(store: str) -> Iterator[str]:
    set_alias(store, NAME, "champion", "1")
    set_alias(store, NAME, "challenger", "2")
    yield store


def config(model_name: str = NAME, **serve: Any) -> LlmopsConfig:
    settings = {"poll_interval_s": 0.1, "flush_interval_s": 0.2} | serve
    return LlmopsConfig(registry=RegistryConfig(model_name=model_name), serve=ServeConfig(**settings))


async def wait_until(check, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def serving(
    store: str, ready: bool = True, model_name: str = NAME, **serve: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config(model_name, **serve), tracking_uri=store)
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serving", timeout=60) as client:
            if ready:

                async def is_ready() -> bool:
                    return (await client.get("/readyz")).status_code == 200

                await wait_until(is_ready)
            yield client


async def version_served(client: httpx.AsyncClient) -> str:
    return (await client.get("/readyz")).json()["model"]["version"]


# --- happy paths -----------------------------------------------------------------------------------


async def test_predict_answers_each_text_with_the_champion_version(champion_1: str, workdir: Path) -> None:
    async with serving(champion_1) as client:
        response = await client.post("/v1/predict", json={"texts": ["the flight was great", "lost my bag again"]})
    assert response.status_code == 200
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["model"] == {"name": NAME, "version": "1", "alias": "champion"}
    assert len(body["predictions"]) == 2
    for prediction in body["predictions"]:
        assert set(prediction["probabilities"]) == set(LABELS)
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction["label"] == max(prediction["probabilities"], key=prediction["probabilities"].get)
        assert (prediction["model_name"], prediction["model_version"]) == (NAME, "1")


async def test_health_model_info_and_docs(champion_1: str, workdir: Path) -> None:
    async with serving(champion_1) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = (await client.get("/readyz")).json()
        info = (await client.get("/v1/model")).json()
        docs = await client.get("/docs")
        schema = (await client.get("/openapi.json")).json()
        # The page's scripts come from the service itself: /docs renders on a machine with no internet.
        scripts = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs.text)
        fetched = [(await client.get(url)).status_code for url in scripts]
    assert scripts and all(url.startswith("/") for url in scripts) and set(fetched) == {200}
    assert ready["ready"] is True and ready["reason"] is None
    assert ready["model"] == {"name": NAME, "version": "1", "alias": "champion"}
    served = {m["name"]: m for m in ready["models"]}  # the default serve.models: the generator is not registered
    assert served[NAME] == {"name": NAME, "alias": "champion", "version": "1", "task": "sequence-classification",
                            "adapter_of": None, "reason": None}  # fmt: skip
    assert served["tweet-generator"]["version"] is None and "no 'champion' alias" in served["tweet-generator"]["reason"]
    assert info["champion"]["version"] == "1" and info["champion"]["labels"] == LABELS
    assert info["champion"]["tags"]["llmops.seed"] == "1"
    assert info["champion"]["metrics"]["test_macro_f1"] == pytest.approx(0.51)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    predict_schema = schema["paths"]["/v1/predict"]["post"]
    assert predict_schema["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "PredictResponse"
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"dataframe_split": {"columns": ["text"], "data": [["good flight"], ["bad flight"]]}},
        {"dataframe_records": [{"text": "good flight"}, {"text": "bad flight"}]},
        {"instances": ["good flight", "bad flight"]},
        {"inputs": ["good flight", "bad flight"]},
        {"inputs": {"text": ["good flight", "bad flight"]}},
    ],
    ids=["dataframe_split", "dataframe_records", "instances", "inputs-list", "inputs-columns"],
)
async def test_invocations_speaks_every_mlflow_format(champion_1: str, workdir: Path, payload: dict) -> None:
    async with serving(champion_1) as client:
        response = await client.post("/invocations", json=payload)
        reference = await client.post("/v1/predict", json={"texts": ["good flight", "bad flight"]})
    assert response.status_code == 200
    records = response.json()["predictions"]
    assert [set(r) for r in records] == [{"label", "score"} | {f"prob_{label}" for label in LABELS}] * 2
    expected = reference.json()["predictions"]
    assert [r["label"] for r in records] == [p["label"] for p in expected]
    assert [r["prob_positive"] for r in records] == pytest.approx([p["probabilities"]["positive"] for p in expected])


async def test_open_inference_protocol_v2(champion_1: str, workdir: Path) -> None:
    async with serving(champion_1) as client:
        live = await client.get("/v2/health/live")
        ready = await client.get("/v2/health/ready")
        model_ready = await client.get(f"/v2/models/{NAME}/ready")
        metadata = (await client.get(f"/v2/models/{NAME}")).json()
        infer = await client.post(
            f"/v2/models/{NAME}/infer",
            json={"id": "r-1", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]},
        )
        only_labels = await client.post(
            f"/v2/models/{NAME}/infer",
            json={
                "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                "outputs": [{"name": "label"}],
            },
        )
    assert live.json() == {"live": True} and ready.json() == {"ready": True}
    assert model_ready.json() == {"name": NAME, "ready": True}
    assert metadata["versions"] == ["1"] and metadata["inputs"][0] == {
        "name": "text",
        "datatype": "BYTES",
        "shape": [-1],
    }
    body = infer.json()
    assert infer.status_code == 200 and body["id"] == "r-1" and body["model_version"] == "1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["shape"] == [2] and set(outputs["label"]["data"]) <= set(LABELS)
    assert outputs["probabilities"]["shape"] == [2, 3] and outputs["probabilities"]["datatype"] == "FP32"
    assert sum(outputs["probabilities"]["data"][:3]) == pytest.approx(1.0, abs=1e-5)
    assert [o["name"] for o in only_labels.json()["outputs"]] == ["label"]


# --- bad input -------------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
INFER = f"/v2/models/{NAME}/infer"


def v2_input(name: str = "text", datatype: str = "BYTES", data: list | None = None) -> dict:
    return {"name": name, "shape": [1], "datatype": datatype, "data": data or ["a"]}


BAD_INPUT = [
    ("empty list", "/v1/predict", {"texts": []}, 422, "texts"),
    ("empty text", "/v1/predict", {"texts": ["ok", "  "]}, 422, "texts[1]"),
    ("non-string text", "/v1/predict", {"texts": ["ok", 3]}, 422, "texts[1]"),
    ("missing field", "/v1/predict", {"text": ["ok"]}, 422, "texts"),
    ("unknown field", "/v1/predict", {"texts": ["ok"], "model": "x"}, 422, "model"),
    ("too many texts", "/v1/predict", {"texts": ["ok"] * 9}, 422, "texts"),
    ("text too long (reject)", "/v1/predict", {"texts": ["x" * 101]}, 422, "texts[0]"),
    ("no mlflow format", "/invocations", {"params": {}}, 422, None),
    ("two mlflow formats", "/invocations", {"instances": ["a"], "inputs": ["b"]}, 422, None),
    ("non-string instance", "/invocations", {"instances": [1.5]}, 422, "instances[0]"),
    ("empty dataframe", "/invocations", {"dataframe_split": {"data": []}}, 422, "dataframe_split.data"),
    ("v2 wrong datatype", INFER, {"inputs": [v2_input(datatype="FP32", data=[1.0])]}, 400, "inputs[0].datatype"),
    ("v2 wrong input name", INFER, {"inputs": [v2_input(name="x")]}, 400, "inputs"),
    ("v2 empty text", INFER, {"inputs": [v2_input(data=[""])]}, 422, "inputs[0].data[0]"),
    ("v2 unknown output", INFER, {"inputs": [v2_input()], "outputs": [{"name": "logits"}]}, 400, "outputs"),
    ("v2 unknown model", "/v2/models/other/infer", {"inputs": [v2_input()]}, 404, "name"),
    ("v2 row of two texts", INFER, {"inputs": [v2_input(data=[["a", "b"]])]}, 422, "inputs[0].data[0]"),
    ("feedback unknown request", "/v1/feedback", {"request_id": "never-seen", "label": "positive"}, 404, "request_id"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "payload", "status", "field"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
async def test_bad_input_is_a_4xx_naming_the_field(
    champion_1: str, workdir: Path, path: str, payload: dict, status: int, field: str | None
) -> None:
    async with serving(champion_1, max_texts=8, max_text_chars=100, over_length="reject") as client:
        response = await client.post(path, json=payload)
        still_serving = await client.post("/v1/predict", json={"texts": ["still fine"]})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field and body["error"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert still_serving.status_code == 200


async def test_malformed_requests_are_refused_before_scoring(champion_1: str, workdir: Path) -> None:
    async with serving(champion_1, max_body_bytes=2000, max_text_chars=10) as client:
        malformed = await client.post("/v1/predict", content=b'{"texts": [', headers=JSON)
        wrong_type = await client.post(
            "/v1/predict", content=b'{"texts": ["a"]}', headers={"content-type": "text/plain"}
        )
        oversized = await client.post("/v1/predict", json={"texts": ["x" * 3000]})
        truncated = await client.post("/v1/predict", json={"texts": ["y" * 50]})
        feedback_label = await client.post("/v1/feedback", json={"request_id": "r", "label": "furious"})
        metrics = (await client.get("/metrics")).text
    assert (malformed.status_code, malformed.json()["type"]) == (400, "malformed_json")
    assert (wrong_type.status_code, wrong_type.json()["type"]) == (415, "unsupported_media_type")
    assert (oversized.status_code, oversized.json()["type"]) == (413, "body_too_large")
    assert truncated.status_code == 200  # over_length=truncate (the default) cuts the text instead
    assert (feedback_label.status_code, feedback_label.json()["field"]) == (422, "label")
    assert 'status="500"' not in metrics


# --- auth ------------------------------------------------------------------------------------------


async def test_api_keys_guard_inference_and_feedback_only(
    champion_1: str, workdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LLMOPS_API_KEYS", "env-key-123")
    (workdir / "keys.txt").write_text("# team keys\nfile-key-456\n")
    caplog.set_level(logging.DEBUG)
    payload = {"texts": ["hello"]}
    async with serving(champion_1, api_keys_file="keys.txt") as client:
        anonymous = await client.post("/v1/predict", json=payload)
        wrong = await client.post("/v1/predict", json=payload, headers={"Authorization": "Bearer nope"})
        bearer = await client.post("/v1/predict", json=payload, headers={"Authorization": "Bearer env-key-123"})
        header = await client.post("/invocations", json={"instances": ["hi"]}, headers={"X-API-Key": "file-key-456"})
        v2 = await client.post(
            f"/v2/models/{NAME}/infer",
            json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
        )
        feedback = await client.post("/v1/feedback", json={"request_id": "x", "label": "positive"})
        open_endpoints = [
            (await client.get(p)).status_code for p in ("/healthz", "/readyz", "/metrics", "/v2/health/ready")
        ]
    assert anonymous.status_code == wrong.status_code == v2.status_code == feedback.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert bearer.status_code == 200 and header.status_code == 200
    assert open_endpoints == [200, 200, 200, 200]
    assert "env-key-123" not in caplog.text and "file-key-456" not in caplog.text


async def test_a_missing_key_file_is_a_clear_error(champion_1: str, workdir: Path) -> None:
    from llmops.config import ConfigError

    with pytest.raises(ConfigError, match="api_keys_file"):
        create_app(config(api_keys_file="absent.txt"), tracking_uri=champion_1)


# --- metrics, prediction log, feedback -------------------------------------------------------------


async def test_metrics_report_requests_batches_and_model_version(champion_1: str, workdir: Path) -> None:
    async with serving(champion_1) as client:
        await asyncio.gather(*(client.post("/v1/predict", json={"texts": ["a", "b"]}) for _ in range(5)))
        await client.post("/v1/predict", json={"texts": []})
        await client.get("/no/such/route")
        text = (await client.get("/metrics")).text
    assert 'http_requests_total{handler="/v1/predict",method="POST",status="200"} 5.0' in text
    assert 'http_requests_total{handler="/v1/predict",method="POST",status="422"} 1.0' in text
    assert 'http_requests_total{handler="none",method="GET",status="404"} 1.0' in text  # not one series per path
    assert 'http_request_duration_seconds_count{handler="/v1/predict",method="POST"} 6.0' in text
    assert 'handler="/metrics"' not in text
    assert "llmops_batch_size_sum 10.0" in text  # 5 requests x 2 texts, however they were grouped
    assert f'llmops_model_info{{alias="champion",model="{NAME}",version="1"}} 1.0' in text
    assert f'llmops_model_reloads_total{{alias="champion",model="{NAME}"}} 1.0' in text
    assert "llmops_queue_depth 0.0" in text


@pytest.mark.parametrize("log_path", ["predictions.db", "prediction-log"], ids=["sqlite", "parquet"])
async def test_every_prediction_and_feedback_is_logged_and_flushed_on_shutdown(
    champion_1: str, workdir: Path, log_path: str
) -> None:
    # A flush interval longer than the test: only the graceful shutdown can have written these rows.
    async with serving(champion_1, prediction_log=log_path, flush_interval_s=3600) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/predict", json={"texts": [f"t{i}", "x"]}) for i in range(10))
        )
        first = responses[0].json()
        feedback = await client.post(
            "/v1/feedback", json={"request_id": first["request_id"], "label": "negative", "index": 1}
        )
        beyond = await client.post(
            "/v1/feedback", json={"request_id": first["request_id"], "label": "negative", "index": 2}
        )
    assert (beyond.status_code, beyond.json()["field"]) == (404, "index")
    assert feedback.status_code == 202 and feedback.json()["stored"]
    store = open_store(workdir / log_path)
    logged = store.read_predictions()
    assert len(logged) == 20 and set(logged["route"]) == {"champion"} and set(logged["model_version"]) == {"1"}
    row = logged[(logged["request_id"] == first["request_id"]) & (logged["idx"] == 1)].iloc[0]
    assert row["text"] == "x" and row["label"] == first["predictions"][1]["label"]
    assert json.loads(row["probabilities"]) == pytest.approx(first["predictions"][1]["probabilities"], abs=1e-5)
    assert row["latency_ms"] > 0
    labels = store.read_feedback()
    assert labels[["request_id", "idx", "label"]].values.tolist() == [[first["request_id"], 1, "negative"]]


# --- following the alias ---------------------------------------------------------------------------


async def test_alias_switch_under_load_drops_nothing(champion_1: str, workdir: Path) -> None:
    results: list[tuple[int, str | None]] = []
    stop = asyncio.Event()

    async def steady_client(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            response = await client.post("/v1/predict", json={"texts": ["keep going"]})
            version = response.json()["model"]["version"] if response.status_code == 200 else None
            results.append((response.status_code, version))

    async with serving(champion_1) as client:
        clients = [asyncio.create_task(steady_client(client)) for _ in range(8)]
        await wait_until(lambda: asyncio.sleep(0, len(results) >= 20))
        set_alias(champion_1, NAME, "champion", "2")

        async def switched() -> bool:
            return await version_served(client) == "2"

        await wait_until(switched)
        served_before = len(results)
        await wait_until(lambda: asyncio.sleep(0, len(results) >= served_before + 20))
        stop.set()
        await asyncio.gather(*clients)
        metrics = (await client.get("/metrics")).text
    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:3]
    versions = [v for _, v in results]
    assert versions[0] == "1" and versions[-20:] == ["2"] * 20
    assert f'llmops_model_reloads_total{{alias="champion",model="{NAME}"}} 2.0' in metrics
    assert f'llmops_model_info{{alias="champion",model="{NAME}",version="2"}} 1.0' in metrics
    assert 'version="1"' not in metrics.split("llmops_model_info")[-1].split("\n# ")[0]


async def test_a_version_that_fails_to_load_leaves_the_old_one_serving(champion_1: str, workdir: Path) -> None:
    async with serving(champion_1) as client:
        set_alias(champion_1, NAME, "champion", "3")

        async def failure_reported() -> bool:
            return "failed to load" in ((await client.get("/readyz")).json()["reason"] or "")

        await wait_until(failure_reported)
        ready = await client.get("/readyz")
        answer = await client.post("/v1/predict", json={"texts": ["still here?"]})
        metrics = (await client.get("/metrics")).text
        set_alias(champion_1, NAME, "champion", "2")  # the fix: the alias moves on, the failure clears

        async def recovered() -> bool:
            return (await client.get("/readyz")).json()["reason"] is None

        await wait_until(recovered)
        after = await client.post("/v1/predict", json={"texts": ["and now?"]})
    assert ready.status_code == 200 and ready.json()["model"]["version"] == "1"
    assert "version 3 failed to load" in ready.json()["reason"]
    assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
    assert f'llmops_model_reload_failures_total{{alias="champion",model="{NAME}"}} 1.0' in metrics
    assert f'llmops_model_reload_error{{alias="champion",model="{NAME}"}} 1.0' in metrics
    assert after.json()["model"]["version"] == "2"


async def test_a_worker_takes_requests_only_once_its_first_load_is_over(champion_1: str, workdir: Path) -> None:
    # Workers share one port: a request must not reach one that is still loading while another could answer.
    async with serving(champion_1, ready=False) as client:
        first = await client.post("/v1/predict", json={"texts": ["hello"]})
    assert first.status_code == 200 and first.json()["model"]["version"] == "1"

    async with serving(champion_1, ready=False, startup_wait_s=0) as client:  # no wait: up at once, not ready
        early = await client.get("/readyz")
    assert early.status_code == 503 and f"{NAME}: not checked yet" in early.json()["reason"]


async def test_not_ready_without_a_champion(store: str, workdir: Path) -> None:
    async with serving(store, ready=False, model_name="no-such-model") as client:
        await asyncio.sleep(0.3)
        ready = await client.get("/readyz")
        answer = await client.post("/v1/predict", json={"texts": ["hello"]})
        health = await client.get("/healthz")
    assert ready.status_code == 503 and "has no 'champion' alias" in ready.json()["reason"]
    # Not "temporarily unavailable": a client would retry a 503 forever. The answer says how to register it.
    assert (answer.status_code, answer.json()["type"]) == (404, "not_registered")
    assert "retry-after" not in answer.headers and "llmops run" in answer.json()["error"]
    assert health.status_code == 200


# --- batching and back-pressure --------------------------------------------------------------------


async def test_concurrent_requests_share_forward_passes(champion_1: str, workdir: Path) -> None:
    async with serving(champion_1, max_batch_size=32, max_wait_ms=50) as client:
        responses = await asyncio.gather(*(client.post("/v1/predict", json={"texts": [f"t{i}"]}) for i in range(32)))
        text = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in responses)
    passes = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("llmops_batch_size_count")))
    assert passes < 32 / 2  # 32 single-text requests, far fewer forward passes


async def test_a_full_queue_answers_503_instead_of_hanging(champion_1: str, workdir: Path) -> None:
    async with serving(champion_1, max_batch_size=2, max_queue=4, max_wait_ms=20) as client:
        requests = [client.post("/v1/predict", json={"texts": ["a", "b"]}) for _ in range(60)]
        responses = await asyncio.wait_for(asyncio.gather(*requests), timeout=60)
        metrics = (await client.get("/metrics")).text
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["type"] == "overloaded"
    assert f'llmops_rejected_requests_total{{reason="queue_full"}} {float(statuses.count(503))}' in metrics


# --- challenger traffic ----------------------------------------------------------------------------


async def test_shadow_mode_logs_the_challenger_beside_the_champion(champion_1: str, workdir: Path) -> None:
    async with serving(champion_1, shadow=True) as client:

        async def challenger_loaded() -> bool:
            return (await client.get("/v1/model")).json()["challenger"] is not None

        await wait_until(challenger_loaded)
        answer = await client.post("/v1/predict", json={"texts": ["compare us"]})
    assert answer.json()["model"]["version"] == "1"  # the user only ever sees the champion
    logged = open_store(workdir / "predictions.db").read_predictions()
    mine = logged[logged["request_id"] == answer.json()["request_id"]]
    assert sorted(zip(mine["route"], mine["model_version"], strict=True)) == [("champion", "1"), ("shadow", "2")]


async def test_canary_routes_its_share_to_the_challenger(champion_1: str, workdir: Path) -> None:
    async with serving(champion_1, canary_share=1.0) as client:

        async def challenger_loaded() -> bool:
            return (await client.get("/v1/model")).json()["challenger"] is not None

        await wait_until(challenger_loaded)
        answers = [await client.post("/v1/predict", json={"texts": ["route me"]}) for _ in range(3)]
    assert [a.json()["model"]["version"] for a in answers] == ["2", "2", "2"]
    logged = open_store(workdir / "predictions.db").read_predictions()
    assert set(logged["route"]) == {"canary"}


def test_workers_fetching_the_same_version_at_once_all_get_it(tmp_path: Path, store: str) -> None:
    """Several server workers download a new version at the same moment; none may break another's download."""
    from concurrent.futures import ProcessPoolExecutor

    from llmops.registry import fetch_version

    with ProcessPoolExecutor(3) as pool:
        futures = [pool.submit(fetch_version, store, NAME, "1", tmp_path / "cache") for _ in range(3)]
        folders = {str(f.result()) for f in futures}
    assert len(folders) == 1 and (Path(folders.pop()) / "candidate.json").is_file()
    assert [p.name for p in (tmp_path / "cache" / NAME).iterdir()] == ["1"]  # no partial folder left behind
