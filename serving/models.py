"""Following a registry alias: load the version it points at, warm it, swap it in atomically.

A request takes a reference to the current :class:`LoadedModel` when it starts and
keeps it to the end, so a swap never changes the model under a request in flight;
the old version is freed when its last request finishes. A version is a classifier or a
generator (its `candidate.json` says which; `serving.runtimes` is the seam); a generator comes with its own
backend (the continuous-batching engine), retired once the next version is in and its sequences are done.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from llmops.registry import TAG, alias_version, download_candidate
from serving.metrics import ServingMetrics
from serving.runtimes import (
    ClassifierRuntime,
    GenerationBackend,
    GeneratorRuntime,
    WrongModelKind,
    load_runtime,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

EngineFactory = Callable[[GeneratorRuntime, str, str], GenerationBackend]
"""(generator, model name, version) -> what schedules that version's sequences."""


@dataclass(frozen=True)
class Generating:
    """A generator version as the generation routes use it."""

    runtime: GeneratorRuntime
    backend: GenerationBackend


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    alias: str
    runtime: ClassifierRuntime | GeneratorRuntime
    tags: dict[str, str]
    metrics: dict[str, float]
    loaded_at: float
    backend: GenerationBackend | None = None
    """Generators: what schedules this version's sequences."""

    @property
    def task(self) -> str:
        return self.runtime.meta.task

    @property
    def generates(self) -> bool:
        return self.task != "sequence-classification"

    @property
    def classifier(self) -> ClassifierRuntime:
        """This version as a classifier; `WrongModelKind` for a generator."""
        if self.generates:
            raise WrongModelKind(self.name, self.task)
        return self.runtime  # type: ignore[return-value]

    @property
    def generation(self) -> Generating:
        """This version as a generator with its backend; `WrongModelKind` for a classifier."""
        if self.backend is None:
            raise WrongModelKind(self.name, self.task)
        return Generating(self.runtime, self.backend)  # type: ignore[arg-type]

    @property
    def labels(self) -> list[str]:
        return self.classifier.labels


def fetch_version(tracking_uri: str, name: str, version: str, cache: Path) -> Path:
    """The candidate folder of `name` version `version`, downloaded once into `cache/<name>/<version>`.

    A registered version never changes, so a finished folder is reused; the download
    goes to a temporary folder renamed at the end, so a crash leaves nothing half-written.
    Each process downloads into its own temporary folder: several workers may fetch the
    same version at once, and the first rename wins.
    """
    final = cache / name / version
    if not final.is_dir():
        tmp = cache / name / f".{version}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        download_candidate(name, version, tmp, tracking_uri=tracking_uri)
        try:
            tmp.rename(final)
        except OSError:  # another worker finished first: its folder holds the same version
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return next(final.rglob("candidate.json")).parent


def load_version(
    client: MlflowClient,
    tracking_uri: str,
    name: str,
    version: str,
    alias: str,
    cache: Path,
    engine_factory: EngineFactory | None = None,
) -> LoadedModel:
    """Download, load and warm one version (blocking: run it off the event loop)."""
    folder = fetch_version(tracking_uri, name, version, cache)
    runtime = load_runtime(folder)
    mv = client.get_model_version(name, version)
    try:
        metrics = dict(client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    except MlflowException:
        metrics = {}
    tags = {k: v for k, v in mv.tags.items() if k.startswith(TAG)}
    generative = runtime.meta.task != "sequence-classification"
    backend = engine_factory(runtime, name, version) if generative and engine_factory else None  # type: ignore[arg-type]
    return LoadedModel(name, version, alias, runtime, tags, metrics, time.time(), backend)


def on_own_thread(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on a thread that ends with it (blocking).

    Loading warms the model: its first forward passes run on the calling thread, and torch (and llama.cpp built
    with OpenMP) keep a team of OpenMP worker threads for each thread that ran a parallel region, for as long as
    that thread lives. A pooled thread would keep its team, and a process managing more OpenMP threads than it
    has cores makes every team stop spinning at its barriers: the engine's decoding then ran at half speed
    (2 cores, a 135M Llama served as torch int8: 11 tokens/s at one stream, 31 loaded this way; llama.cpp's
    OpenMP build 111 -> 63 in-process). A thread that ends takes its team with it."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, function(*args)))
        except BaseException as error:  # handed to the caller
            outcome.append((False, error))

    thread = threading.Thread(target=run, name="load-version", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


class ModelWatcher:
    """Polls where `alias` points; loads a new target in the background and swaps it in when warm."""

    def __init__(
        self,
        client: MlflowClient,
        tracking_uri: str,
        name: str,
        alias: str,
        cache: Path,
        metrics: ServingMetrics,
        poll_interval_s: float,
        retry_failed_after_s: float,
        engine_factory: EngineFactory | None = None,
    ):
        self.client = client
        self.engine_factory = engine_factory
        self.tracking_uri = tracking_uri
        self.name = name
        self.alias = alias
        self.cache = cache
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.retry_failed_after_s = retry_failed_after_s
        self.current: LoadedModel | None = None
        self.absent = False
        """The registry has no such model or no such alias: nothing to serve, and nothing to wait for."""
        self.status: str | None = "not checked yet"
        """Why the alias's target is not the one serving (None when it is)."""
        self._failed: dict[str, float] = {}
        self.checked = asyncio.Event()
        """Set once the first poll is over, whether it loaded a model or not."""

    def check(self) -> None:
        """One poll (blocking). Never raises: a failure is recorded and the current model keeps serving."""
        try:
            target = alias_version(self.client, self.name, self.alias)
        except Exception as error:  # registry unreachable: keep serving what we have
            self.status = f"registry unreachable: {error}"
            return
        if target is None:
            self.status = f"model '{self.name}' has no '{self.alias}' alias"
            self.absent = True
            return
        self.absent = False
        if self.current is not None and self.current.version == target:
            self.status = None
            return
        failed_at = self._failed.get(target)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_failed_after_s:
            return
        try:
            loaded = on_own_thread(
                load_version,
                self.client,
                self.tracking_uri,
                self.name,
                target,
                self.alias,
                self.cache,
                self.engine_factory,
            )
        except Exception as error:
            self._failed[target] = time.monotonic()
            self.status = f"version {target} failed to load: {type(error).__name__}: {error}"
            self.metrics.reload_failures.labels(self.name, self.alias).inc()
            self.metrics.reload_error.labels(self.name, self.alias).set(1)
            log.error("%s@%s: %s; still serving %s", self.name, self.alias, self.status, self.served_version)
            return
        previous_model = self.current
        previous = self.served_version
        self.current = loaded  # the swap: one reference assignment
        if previous_model is not None and previous_model.backend is not None:
            previous_model.backend.retire()  # it finishes the sequences it has, then stops
        # Move the loaded model's objects (and the libraries') out of the garbage collector's sight: a full
        # collection walks millions of long-lived objects and stalls every request for a few hundred ms.
        gc.collect()
        gc.freeze()
        self.status = None
        self._failed.pop(target, None)
        self.metrics.reloads.labels(self.name, self.alias).inc()
        self.metrics.reload_error.labels(self.name, self.alias).set(0)
        self.metrics.set_model(self.name, self.alias, target)
        log.info("%s@%s: now serving version %s (was %s)", self.name, self.alias, target, previous)

    @property
    def served_version(self) -> str | None:
        return self.current.version if self.current else None

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.check)
            self.checked.set()
            await asyncio.sleep(self.poll_interval_s)
