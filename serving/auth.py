"""Who may call what: API keys from the environment and a file (unscoped: they unlock everything), and the
named, scoped, limited keys of the gateway store (`llmops.gateway`, managed with `llmops keys`).

No key anywhere means no authentication. Keys are compared in constant time (environment keys) or by their
SHA-256 (stored keys) and never logged; a key's name stands for it in metrics and usage. Each worker reads a
stored key again after `serve.key_refresh_s`, so a revoked key is refused within that many seconds, everywhere.
Usage is added to the store from a background thread, in batches, so no request waits on that write; a request
reads the store (a key not seen for `key_refresh_s`, a new lease of requests) on a thread too, never on the event
loop, where a SQLite store waiting for that writer's transaction would hold every other request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from llmops.config import ConfigError, ServeConfig
from llmops.gateway import ApiKey, GatewayStore, Refusal, Usage
from serving.metrics import Children, ServingMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who sent the request: a stored key, or one of the environment's (name None, may do anything)."""

    key: ApiKey | None = None

    @property
    def name(self) -> str:
        return self.key.name if self.key else "environment"

    def may_call(self, group: str) -> bool:
        return self.key is None or self.key.may_call(group)

    def may_use(self, model: str) -> bool:
        return self.key is None or self.key.may_use(model)


CALLER: ContextVar[Caller | None] = ContextVar("llmops_caller", default=None)
"""The caller of the request being answered (set by the route's key check; None without keys)."""


def load_api_keys(cfg: ServeConfig) -> frozenset[str]:
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",")]
    if cfg.api_keys_file is not None:
        path = Path(cfg.api_keys_file)
        if not path.is_file():
            raise ConfigError(f"serve.api_keys_file: {path} does not exist")
        lines = (line.strip() for line in path.read_text().splitlines())
        keys += [line for line in lines if line and not line.startswith("#")]
    return frozenset(k for k in keys if k)


def key_is_valid(given: str | None, keys: frozenset[str]) -> bool:
    if given is None:
        return False
    # Compare against every key, so the time taken says nothing about which one nearly matched.
    matches = [hmac.compare_digest(given.encode(), key.encode()) for key in keys]
    return any(matches)


def open_gateway_store(cfg: ServeConfig) -> GatewayStore | None:
    """The store of `serve.gateway_store`: a database URL, or a SQLite file once `llmops keys create` made it."""
    location = cfg.gateway_store
    if location is None or ("://" not in location and not Path(location).is_file()):
        return None
    return GatewayStore(location)


@dataclass
class _Held:
    """A lease of a key's requests (`GatewayStore.lease`), as this worker spends it."""

    minute: int
    left: int
    tokens: int
    """The minute's tokens: the store's when leased, plus what this worker's requests used since."""
    spent: int
    """The budget period's, likewise."""

    def admits(self, key: ApiKey, minute: int) -> bool:
        """One more request of this lease is within every limit, as far as this worker knows."""
        return (
            self.left > 0
            and self.minute == minute
            and (key.tpm is None or self.tokens < key.tpm)
            and (key.budget is None or self.spent < key.budget)
        )


LEASE_MAX = 1000
"""The most requests one lease takes: a key allowed 100,000 a minute or more is leased 1,000 at a time."""


def lease_size(key: ApiKey) -> int:
    """Requests a worker takes from the store at once for `key`: a hundredth of its per-minute limit, between 1
    and `LEASE_MAX` (exact counting for limits of 199 a minute or fewer; at most 1% of the limit per worker ahead
    of what was served), 10 for a key limited by tokens alone (its tokens are checked on every request: the store's
    count at the lease plus what this worker used since). A lease is a store round trip on a thread: with 50 a lease,
    a service answering 600 requests a second spent 6% more of its event loop per request than with 1,000."""
    if key.rpm is None:
        return 10
    return max(1, min(LEASE_MAX, key.rpm // 100))


class Gate:
    def __init__(self, cfg: ServeConfig, metrics: ServingMetrics):
        self.env_keys = load_api_keys(cfg)
        self.store = open_gateway_store(cfg)
        self.metrics = metrics
        self._requests, self._tokens = Children(metrics.key_requests), Children(metrics.key_tokens)
        self.refresh_s = cfg.key_refresh_s
        self._known: dict[str, tuple[float, ApiKey | None]] = {}
        self._leases: dict[str, _Held] = {}
        """Key name -> what is left of this worker's lease."""
        self._leasing: dict[int, tuple[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]]] = {}
        """Per event loop (by id, with the loop): key name -> held while this worker takes a lease for it
        (`refusal`)."""
        self._pending: list[Usage] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="key-usage", daemon=True)

    async def caller(self, given: str | None) -> Caller | None:
        """`authenticate` without holding the event loop: a stored key read in the last `key_refresh_s` is answered
        from memory, a store read goes to a thread."""
        if given is None or self.store is None or key_is_valid(given, self.env_keys) or self._fresh(given) is not None:
            return self.authenticate(given)
        return await asyncio.to_thread(self.authenticate, given)

    async def refusal(self, caller: Caller) -> Refusal | None:
        """`admit` without holding the event loop: a request within this worker's lease is admitted in memory; a new
        lease is taken on a thread (a SQLite store may wait there for the usage writer's transaction), one at a time
        per key, so requests arriving meanwhile wait for it instead of each taking one."""
        key = caller.key
        if key is None or self.store is None or self._from_lease(key):
            return None
        loop = asyncio.get_running_loop()
        held = self._leasing.get(id(loop))
        if held is None or held[0] is not loop:  # a lock belongs to the loop that first waits on it
            held = self._leasing[id(loop)] = (loop, {})
        async with held[1].setdefault(key.name, asyncio.Lock()):
            if self._from_lease(key):  # leased while this request waited
                return None
            return await asyncio.to_thread(self.admit, caller)

    @property
    def required(self) -> bool:
        """Keys are asked for: some are configured in the environment, or a gateway store is in use."""
        return bool(self.env_keys) or self.store is not None

    def authenticate(self, given: str | None) -> Caller | None:
        """The caller `given` identifies, or None (no key, an unknown one, a revoked one)."""
        if given is None:
            return None
        if key_is_valid(given, self.env_keys):
            return Caller()
        if self.store is None:
            return None
        known = self._fresh(given)
        if known is None:
            known = (time.monotonic(), self.store.find(given))
            if len(self._known) > 10_000:  # random secrets sent by a scanner do not fill the memory
                self._known.clear()
            self._known[given] = known
        return Caller(known[1]) if known[1] is not None else None

    def _fresh(self, given: str) -> tuple[float, ApiKey | None] | None:
        """When `given` was read from the store and what it found, if that was in the last `key_refresh_s`."""
        known = self._known.get(given)
        return known if known is not None and time.monotonic() - known[0] <= self.refresh_s else None

    def admit(self, caller: Caller) -> Refusal | None:
        """None, or the limit of the caller's key that refuses this request now. Requests are taken from the store
        in leases (`lease_size`): most requests are admitted from this worker's lease without a database round
        trip; the store's count runs ahead of what was served by less than one lease per worker, and the token
        limits are read again with each lease."""
        key = caller.key
        if key is None or self.store is None or self._from_lease(key):
            return None
        with self._lock:
            unflushed = any(u.key_name == key.name and (u.prompt_tokens or u.completion_tokens) for u in self._pending)
        if unflushed:  # the store counts this worker's tokens before it leases more
            self._flush()
        taken = self.store.lease(key, lease_size(key))
        if isinstance(taken, Refusal):
            self.metrics.limited.labels(caller.name, taken.limit).inc()
            return taken
        with self._lock:
            self._leases[key.name] = _Held(taken.minute, taken.granted - 1, taken.tokens, taken.spent)
        return None

    def _from_lease(self, key: ApiKey) -> bool:
        """One request of `key` taken from this worker's lease, if the lease admits it."""
        minute = int(time.time() // 60)
        with self._lock:
            held = self._leases.get(key.name)
            if held is not None and held.admits(key, minute):
                held.left -= 1
                return True
        return False

    def record(self, caller: Caller | None, model: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """What one request used: Prometheus at once, the store (stored keys) from the background thread."""
        name = caller.name if caller else "none"
        self._requests(name, model).inc()
        if caller is not None and caller.key is not None and (prompt_tokens or completion_tokens):
            with self._lock:
                held = self._leases.get(name)
                if held is not None:  # what this worker spent since its lease counts before the next one
                    held.tokens += prompt_tokens + completion_tokens
                    held.spent += prompt_tokens + completion_tokens
        if prompt_tokens or completion_tokens:
            self._tokens(name, model, "prompt").inc(prompt_tokens)
            self._tokens(name, model, "completion").inc(completion_tokens)
        if caller is not None and caller.key is not None and self.store is not None:
            with self._lock:
                self._pending.append(Usage(caller.name, model, prompt_tokens, completion_tokens))

    def start(self) -> None:
        if self.store is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._flush()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending or self.store is None:
            return
        try:
            self.store.record(pending)
        except Exception:  # the store is away: keep the counts for the next try
            log.exception("could not add usage to the gateway store; retrying")
            with self._lock:
                self._pending[:0] = pending
