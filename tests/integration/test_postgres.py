"""The production configuration's registry path on a real PostgreSQL: an MLflow tracking server whose backend
store is a PostgreSQL server started here from its binaries (initdb into a temporary folder, a free port)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from llmops import registry
from llmops.config import load_config
from llmops.gateway import GatewayStore, Usage
from serving.metrics import ServingMetrics
from serving.models import ModelWatcher
from tests.conftest import STUDENT_AND_INT8, TINY_CONFIG
from tests.http_service import mlflow_server
from tests.postgres import postgres_server
from tests.tiny_registry import build_tiny_candidate

pytestmark = pytest.mark.usefixtures("prefect_server")
NAME = "tweet-sentiment"


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def tracking_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(postgres, tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def test_register_gate_promote_rollback_and_serving_lookup_on_postgres(
    tracking_server: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.lifecycle import lifecycle

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    first = lifecycle(str(TINY_CONFIG), [STUDENT_AND_INT8])  # register and gate through the real flow
    assert first["promoted"] and first["version"] == "1"

    cfg = load_config(TINY_CONFIG)
    client = registry.setup_tracking(cfg.registry)
    assert client.get_model_version(NAME, "1").tags["llmops.verdict"] == "passed"
    import mlflow

    with mlflow.start_run(run_name="second"):
        uri = registry.log_candidate_model(build_tiny_candidate(workdir / "second", 7), ["negative", "neutral",
                                           "positive"], ["a tweet"])  # fmt: skip
    second = registry.register(NAME, uri, {"candidate": "student"})
    assert registry.promote(client, NAME, second, expected_champion="1").promoted
    assert registry.alias_version(client, NAME, registry.PREVIOUS) == "1"
    assert registry.rollback(client, NAME).champion == "1"
    assert registry.alias_version(client, NAME, registry.CHAMPION) == "1"

    # The serving API's alias lookup and download, against the same server.
    watcher = ModelWatcher(
        MlflowClient(tracking_server, tracking_server), tracking_server, NAME, "champion", workdir / "served",
        ServingMetrics(), 1.0, 60.0,
    )  # fmt: skip
    watcher.check()
    assert watcher.served_version == "1" and watcher.current is not None


def test_two_replicas_count_one_total_in_the_gateway_store_on_postgres(postgres: str) -> None:
    """Two replicas' stores on one PostgreSQL database: keys made by one are found by the other, requests and
    tokens add up across them, and a revocation by one is seen by the other."""
    first, second = GatewayStore(postgres), GatewayStore(postgres)
    secret, _ = first.create("shared-app", rpm=3, tpm=50)
    key = second.find(secret)
    assert key is not None and key.rpm == 3
    now = (time.time() // 60) * 60 + 1  # the start of a minute: the three requests share one window
    assert [store.admit(key, now) for store in (first, second, first)] == [None, None, None]
    refused = second.admit(key, now + 1)
    assert refused is not None and refused.limit == "requests_per_minute"
    first.record([Usage("shared-app", "m", 30, 25)], now + 2)
    second.record([Usage("shared-app", "m", 1, 1)], now + 2)
    assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in first.usage()] == [(2, 31, 26)]
    over = first.admit(key, now + 61)
    assert over is None  # a new minute: the 57 tokens were the last minute's
    first.revoke("shared-app")
    assert second.find(secret) is None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_prediction_log_on_postgres_holds_no_raw_value_and_reads_back_as_monitoring_does(
    postgres: str, tmp_path: Path
) -> None:
    import sqlalchemy as sa

    from llmops.config import LlmopsConfig, RegistryConfig, ServeConfig
    from llmops.predlog import open_store
    from tests.http_service import in_process
    from tests.tiny_registry import register_versions, set_alias

    server = sa.create_engine(postgres, isolation_level="AUTOCOMMIT")
    with server.connect() as db:
        db.execute(sa.text("CREATE DATABASE predictions"))
        data_directory = Path(db.execute(sa.text("SHOW data_directory")).scalar_one())
    log_url = postgres.rsplit("/", 1)[0] + "/predictions"
    uri = register_versions(tmp_path, "pg-logged", seeds=[1])
    set_alias(uri, "pg-logged", "champion", "1")
    email, card = "dana.k@example.org", "4111 1111 1111 1111"
    cfg = LlmopsConfig(
        registry=RegistryConfig(model_name="pg-logged"),
        serve=ServeConfig(
            models=["pg-logged"],
            model_cache=str(tmp_path / "served"),
            prediction_log=log_url,
            flush_interval_s=0.2,
            gateway_store=None,
        ),
    )
    async with in_process(cfg, uri) as (client, _):
        answered = await client.post("/v1/predict", json={"texts": [f"refund to {card} or mail {email}", "fine"]})
        assert answered.status_code == 200
        await asyncio.sleep(0.6)  # written: the feedback finds its request in the database, not in the buffer
        feedback = {"request_id": answered.json()["request_id"], "index": 1, "label": "neutral"}
        assert (await client.post("/v1/feedback", json=feedback)).status_code == 202
        unknown = {"request_id": "no-such-request", "index": 0, "label": "neutral"}
        assert (await client.post("/v1/feedback", json=unknown)).status_code == 404
    store = open_store(log_url)
    logged = store.read_predictions()
    assert logged["text"].tolist() == ["refund to <CREDIT_CARD> or mail <EMAIL_ADDRESS>", "fine"]
    assert logged["flagged"].tolist() == ["CREDIT_CARD,EMAIL_ADDRESS", ""]
    assert store.read_feedback()["label"].tolist() == ["neutral"]
    assert store.read_predictions(last_n=1)["text"].tolist() == ["fine"]
    with server.connect() as db:
        db.execute(sa.text("CHECKPOINT"))  # the rows in the table files too, not only in the write-ahead log
    raw = b"".join(_bytes(p) for p in data_directory.rglob("*"))
    assert b"refund to <CREDIT_CARD>" in raw  # the rows are on disk here ...
    assert email.encode() not in raw and card.encode() not in raw  # ... and the values are not


def _bytes(path: Path) -> bytes:
    """A file of the running server's data directory (b"" for a folder, or a file gone meanwhile)."""
    try:
        return path.read_bytes() if path.is_file() else b""
    except OSError:
        return b""
