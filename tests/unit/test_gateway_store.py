"""The gateway store on a real SQLite file: keys kept hashed, refusals with the limit and when it lifts, windows
that turn over, and the errors `llmops keys` shows."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llmops.config import ServeConfig
from llmops.gateway import GatewayError, GatewayStore, Lease, Refusal, Usage, period_start

NOON = datetime(2026, 12, 31, 12, 0, 0, tzinfo=UTC).timestamp()


def test_the_secret_is_shown_once_and_never_stored(tmp_path: Path) -> None:
    store = GatewayStore(tmp_path / "gateway.db")
    secret, key = store.create("team-a", models=["tweet-generator"], groups=["inference", "feedback"])
    assert secret.startswith("llmops-") and len(secret) > 30 and key.hint == secret[:11]
    raw = b"".join(path.read_bytes() for path in tmp_path.iterdir())
    assert secret.encode() not in raw and secret[11:].encode() not in raw
    found = store.find(secret)
    assert found is not None and found.models == ("tweet-generator",) and found.may_call("feedback")
    assert not found.may_call("admin") and not found.may_use("tweet-sentiment")
    assert store.find(secret + "x") is None
    store.revoke("team-a")
    assert store.find(secret) is None and store.list_keys()[0].revoked is not None


def test_a_request_over_a_limit_is_refused_and_not_counted_until_its_window_ends(tmp_path: Path) -> None:
    store = GatewayStore(tmp_path / "gateway.db")
    _, key = store.create("bursty", rpm=2)
    assert [store.admit(key, NOON + i) for i in range(2)] == [None, None]
    refused = store.admit(key, NOON + 2.5)
    assert refused is not None and refused.limit == "requests_per_minute" and refused.retry_after_s == 58
    assert store.admit(key, NOON + 59) is not None  # refused requests took nothing, the window is still full
    assert store.admit(key, NOON + 60) is None  # a new minute


def test_tokens_per_minute_and_the_budget_count_what_was_recorded(tmp_path: Path) -> None:
    store = GatewayStore(tmp_path / "gateway.db")
    _, wordy = store.create("wordy", tpm=100)
    _, frugal = store.create("frugal", budget=1000, period="month")
    store.record([Usage("wordy", "m", 60, 40), Usage("frugal", "m", 600, 0)], NOON)
    assert store.admit(wordy, NOON + 1).limit == "tokens_per_minute"  # type: ignore[union-attr]
    assert store.admit(wordy, NOON + 60) is None
    assert store.admit(frugal, NOON) is None  # 600 of 1000
    store.record([Usage("frugal", "m", 300, 200)], NOON + 1)
    over = store.admit(frugal, NOON + 2)
    assert over is not None and over.limit == "token_budget"
    assert over.retry_after_s == 12 * 3600 + 1 - 2  # until the month ends, at midnight UTC
    assert store.admit(frugal, NOON + 12 * 3600) is None  # January: a new budget
    rows = store.usage()
    assert sum(r["requests"] for r in rows if r["key_name"] == "frugal") == 2


def test_a_flush_of_many_requests_adds_them_up_by_key_and_model(tmp_path: Path) -> None:
    store = GatewayStore(tmp_path / "gateway.db")
    _, busy = store.create("busy", tpm=1000)
    store.record([Usage("busy", "a", 3, 2)] * 150 + [Usage("busy", "b", 1, 0)] * 20 + [Usage("other", "a", 0, 0)], NOON)
    store.record([Usage("busy", "a", 0, 1)], NOON + 1)
    rows = {(r["key_name"], r["model"]): r for r in store.usage()}
    assert (
        rows["busy", "a"]["requests"],
        rows["busy", "a"]["prompt_tokens"],
        rows["busy", "a"]["completion_tokens"],
    ) == (151, 450, 301)
    assert (rows["busy", "b"]["requests"], rows["other", "a"]["requests"]) == (20, 1)
    over = store.admit(busy, NOON + 2)  # 751 + 20 tokens this minute: within 1000
    assert over is None
    store.record([Usage("busy", "b", 229, 0)], NOON + 3)
    assert store.admit(busy, NOON + 4).limit == "tokens_per_minute"  # type: ignore[union-attr]


def test_periods_are_utc_calendar_days_and_months() -> None:
    assert period_start("day", NOON) == ("2026-12-31", datetime(2027, 1, 1, tzinfo=UTC).timestamp())
    assert period_start("month", NOON)[0] == "2026-12-01"
    feb = datetime(2027, 2, 28, 23, 0, tzinfo=UTC).timestamp()
    assert period_start("month", feb) == ("2027-02-01", datetime(2027, 3, 1, tzinfo=UTC).timestamp())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"groups": ["inference", "billing"]}, "groups: billing; choose from inference, feedback, monitoring, admin"),
        ({"groups": []}, "groups: none given"),
        ({"period": "week"}, "period: 'week'; day or month"),
        ({"rpm": 0}, "rpm: 0; a limit is a positive number"),
        ({"name": " "}, "a key needs a name"),
        ({"name": "taken"}, "a key named 'taken' exists"),
    ],
)
def test_a_key_that_cannot_be_made_says_why(tmp_path: Path, change: dict, message: str) -> None:
    store = GatewayStore(tmp_path / "gateway.db")
    store.create("taken")
    with pytest.raises(GatewayError, match=message.replace("(", r"\(")):
        store.create(**({"name": "new"} | change))
    assert [k.name for k in store.list_keys()] == ["taken"]


def test_revoking_an_unknown_or_revoked_key_says_so(tmp_path: Path) -> None:
    store = GatewayStore(tmp_path / "gateway.db")
    store.create("once")
    with pytest.raises(GatewayError, match="no key named 'nobody'"):
        store.revoke("nobody")
    store.revoke("once")
    with pytest.raises(GatewayError, match="already revoked"):
        store.revoke("once")


def test_the_cli_prints_the_secret_once_and_says_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    config = ["--config", str(Path(__file__).parents[2] / "configs/quickstart.yaml")]
    run = CliRunner().invoke
    missing = run(app, ["keys", "list", *config])
    created = run(app, ["keys", "create", "team-a", "--models", "tweet-generator", "--rpm", "5", *config])
    again = run(app, ["keys", "create", "team-a", *config])
    listed = run(app, ["keys", "list", *config])
    assert missing.exit_code == 2 and "no gateway store at gateway.db" in missing.output
    assert created.exit_code == 0 and created.stdout.startswith("llmops-")
    secret = created.stdout.split()[0]
    assert again.exit_code == 2 and "a key named 'team-a' exists" in again.output
    assert "team-a" in listed.output and "tweet-generator" in listed.output and secret not in listed.output


def test_a_lease_takes_what_the_minute_has_room_for_and_nothing_once_it_is_full(tmp_path: Path) -> None:
    store = GatewayStore(str(tmp_path / "gateway.db"))
    _, key = store.create("bulk", rpm=25)
    first = store.lease(key, 20, NOON)
    second = store.lease(key, 20, NOON + 1)
    assert isinstance(first, Lease) and isinstance(second, Lease)
    assert (first.granted, second.granted) == (20, 5)  # the other 15 went back
    refused = store.lease(key, 20, NOON + 2)
    assert isinstance(refused, Refusal) and refused.limit == "requests_per_minute"
    assert store.lease(key, 20, NOON + 60).granted == 20  # type: ignore[union-attr]


def test_a_worker_admits_from_its_lease_and_stops_at_its_own_tokens_before_the_store_knows(tmp_path: Path) -> None:
    from serving.auth import Caller, Gate, lease_size
    from serving.metrics import ServingMetrics

    path = tmp_path / "gateway.db"
    store = GatewayStore(str(path))
    _, fast = store.create("fast", rpm=1000)
    _, wordy = store.create("wordy", tpm=100)
    gate = Gate(ServeConfig(gateway_store=str(path)), ServingMetrics())
    assert lease_size(fast) == 10 and lease_size(wordy) == 10
    if time.time() % 60 > 57:  # a lease lasts to the end of its minute: start this one well inside a minute
        time.sleep(60 - time.time() % 60 + 0.1)
    assert all(gate.admit(Caller(fast)) is None for _ in range(10))

    def counted(name: str) -> int:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT SUM(requests) FROM key_minutes WHERE key_name = ?", (name,)).fetchone()[0]

    assert counted("fast") == 10  # ten requests, one round trip
    assert gate.admit(Caller(fast)) is None and counted("fast") == 20
    assert gate.admit(Caller(wordy)) is None
    gate.record(Caller(wordy), "m", prompt_tokens=60, completion_tokens=50)  # not yet in the store
    refusal = gate.admit(Caller(wordy))
    assert refusal is not None and refusal.limit == "tokens_per_minute"


def test_requests_that_arrive_while_a_lease_is_taken_wait_for_it_instead_of_each_taking_one(tmp_path: Path) -> None:
    import asyncio

    from serving.auth import Caller, Gate
    from serving.metrics import ServingMetrics

    path = tmp_path / "gateway.db"
    store = GatewayStore(str(path))
    _, key = store.create("busy", rpm=1000)  # leases of 10
    gate = Gate(ServeConfig(gateway_store=str(path)), ServingMetrics())
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60 + 0.1)

    async def burst() -> list[Refusal | None]:  # 35 requests at once, as 35 clients of one event loop send them
        return await asyncio.gather(*(gate.refusal(Caller(key)) for _ in range(35)))

    assert asyncio.run(burst()) == [None] * 35
    with sqlite3.connect(path) as db:
        counted = db.execute("SELECT SUM(requests) FROM key_minutes WHERE key_name = 'busy'").fetchone()[0]
    assert counted == 40  # four leases, one after the other: not one per waiting request


def test_a_gate_serves_one_event_loop_after_another(tmp_path: Path) -> None:
    """An app run by one loop, then another (a test client, then the next): the lease lock of the first loop is not
    the second's."""
    import asyncio

    from serving.auth import Caller, Gate
    from serving.metrics import ServingMetrics

    path = tmp_path / "gateway.db"
    _, key = GatewayStore(str(path)).create("twice", rpm=1000)
    gate = Gate(ServeConfig(gateway_store=str(path)), ServingMetrics())

    async def burst() -> list[Refusal | None]:
        return await asyncio.gather(*(gate.refusal(Caller(key)) for _ in range(25)))

    assert asyncio.run(burst()) == [None] * 25
    assert asyncio.run(burst()) == [None] * 25


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "abc"},
        {"X-API-Key": ""},
        {"Authorization": "Bearer abc"},
        {"Authorization": "bearer  abc "},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"X-API-Key": "", "Authorization": "Bearer abc"},
        {"X-API-Key": "abc", "Authorization": "Bearer other"},
    ],
)
def test_the_key_a_caller_sent_is_read_as_the_documented_schemes_read_it(headers: dict[str, str]) -> None:
    """`key_sent` reads the two headers itself; the schemes the API document declares must agree with it."""
    import asyncio

    from starlette.requests import Request

    from serving.deps import KEY_SCHEMES, key_sent

    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    request = Request({"type": "http", "method": "POST", "path": "/v1/predict", "headers": raw})
    bearer, api_key = KEY_SCHEMES

    async def as_the_schemes_read_it() -> str | None:
        credentials = await bearer(request)
        return await api_key(request) or (credentials.credentials if credentials else None)

    assert key_sent(request) == asyncio.run(as_the_schemes_read_it())
