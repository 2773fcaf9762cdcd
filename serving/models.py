"""Following a registry alias: load the version it points at, warm it, swap it in atomically.

A LoRA adapter version (`llmops.generation.adapters`) loads no model: it attaches to the running base it was
trained on (that base must be served here, at that version) and its requests run in the base's engine, rows of
every adapter in one batch. Its alias moves like any other: the new version is attached beside the old one, new
requests take it, and the old one is detached when its last sequence ends.

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from llmops.candidate_folder import CandidateMeta
from llmops.generation.adapters import AdapterError, BaseRef, LoraWeights, adapter_of
from llmops.generation.candidate import GenerationParams
from llmops.registry import TAG, alias_version, fetch_version
from serving.engine import EngineClosed
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
class Source:
    """Where a registered version came from in the tracking store."""

    experiment_id: str
    run_id: str
    model_id: str | None
    """Its MLflow 3 logged model, when it has one."""


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
    base: LoadedModel | None = None
    """A LoRA adapter: the base version it runs over."""
    source: Source | None = None
    """The run that trained it: where its MLflow traces go."""

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


_LOADING = threading.Lock()
"""One version loads at a time in a process: transformers' `from_pretrained` builds a model on the meta device
under a context that is not thread-safe, so two watchers loading at once (four models served) failed with
"Tensor on device meta is not on the expected device cpu"."""


class WaitingForBase(Exception):
    """An adapter's base is served here but its first load is not over: try again in a moment."""


BaseLookup = Callable[[str], "ModelWatcher | None"]
"""A served model's watcher by registered name (None: not served here)."""


def load_version(
    client: MlflowClient,
    tracking_uri: str,
    name: str,
    version: str,
    alias: str,
    cache: Path,
    engine_factory: EngineFactory | None = None,
    bases: BaseLookup | None = None,
) -> LoadedModel:
    """Download, load and warm one version (blocking: run it off the event loop); an adapter version is attached
    to its base's running model instead."""
    folder = fetch_version(tracking_uri, name, version, cache)
    mv = client.get_model_version(name, version)
    metrics, source = {}, None
    try:
        if mv.run_id:
            run = client.get_run(mv.run_id)
            metrics, source = dict(run.data.metrics), Source(run.info.experiment_id, mv.run_id, mv.model_id)
    except MlflowException:
        pass
    tags = {k: v for k, v in mv.tags.items() if k.startswith(TAG)}
    meta = CandidateMeta.load(folder)
    base_ref = adapter_of(meta.recipe)
    if base_ref is not None:
        base = _running_base(name, version, base_ref, bases)
        adapter, on_base = attach_adapter(base, folder, meta, f"{name}/{version}")
        return LoadedModel(name, version, alias, adapter, tags, metrics, time.time(), on_base, base, source)  # type: ignore[arg-type]
    with _LOADING:
        runtime = load_runtime(folder)
    generative = runtime.meta.task != "sequence-classification"
    backend = engine_factory(runtime, name, version) if generative and engine_factory else None  # type: ignore[arg-type]
    return LoadedModel(name, version, alias, runtime, tags, metrics, time.time(), backend, source=source)


def _running_base(name: str, version: str, ref: BaseRef, bases: BaseLookup | None) -> LoadedModel:
    """The loaded base an adapter version runs over; `AdapterError` where this service does not serve it."""
    adapter = f"'{name}' version {version} is a LoRA adapter of {ref}"
    watcher = bases(ref.model) if bases is not None else None
    if watcher is None:
        raise AdapterError(f"{adapter}, which this service does not serve: add '{ref.model}' to serve.models")
    base = watcher.current
    if base is None:
        if not watcher.checked.is_set():
            raise WaitingForBase(f"{adapter}: waiting for its first load")
        raise AdapterError(f"{adapter}, which is not loaded here: {watcher.status}")
    if base.version != ref.version:
        raise AdapterError(
            f"{adapter}, but this service serves version {base.version} of '{ref.model}': an adapter runs only over "
            "the base version it was trained on (train it again on the new version)"
        )
    return base


def attach_adapter(
    base: LoadedModel, folder: Path, meta: CandidateMeta, key: str
) -> tuple[AdapterRuntime, AdapterBackend]:
    """The adapter in `folder` attached to `base`'s running model under `key`: its runtime and backend."""
    generation = base.generation
    adapters = getattr(generation.runtime, "adapters", None)
    if adapters is None:
        raise AdapterError(
            f"adapter {key}: its base version {base.version} is a {base.runtime.meta.kind} candidate, whose runtime "
            "runs no LoRA adapters (they are served over a torch base)"
        )
    weights = LoraWeights.load(folder, key)
    adapters.check(weights)  # here, so a misfit is refused before the engine is asked
    generation.backend.call(lambda: adapters.attach(weights))
    return AdapterRuntime(generation.runtime, meta), AdapterBackend(generation.backend, key)


class AdapterRuntime:
    """An adapter version as the routes see a generator: its own `meta`, the base's tokenizer and context."""

    def __init__(self, base: GeneratorRuntime, meta: CandidateMeta):
        self.base, self.meta = base, meta

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)


class AdapterBackend:
    """An adapter version's sequences, submitted to its base's engine with the adapter named on each."""

    def __init__(self, engine: GenerationBackend, key: str):
        self.engine, self.key = engine, key
        self.retired = False

    def submit(
        self, prompt_ids: list[int], params: GenerationParams, loop: asyncio.AbstractEventLoop, context: Any = None
    ) -> Any:
        if self.retired:  # the route takes the adapter's new version
            raise EngineClosed(f"adapter {self.key} was replaced")
        return self.engine.submit(prompt_ids, replace(params, adapter=self.key), loop, context)

    def call(self, function: Callable[[], T]) -> T:
        return self.engine.call(function)

    def release_adapter(self, key: str) -> None:
        self.engine.release_adapter(key)

    def retire(self) -> None:
        """A newer version of the adapter serves now: the base detaches this one when its sequences are done."""
        self.retired = True
        self.engine.release_adapter(self.key)

    def stop(self) -> None:
        """The base's engine stops with the base."""


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
        bases: BaseLookup | None = None,
    ):
        self.client = client
        self.engine_factory = engine_factory
        self.bases = bases
        """Where an adapter version finds its base (the service's other watchers)."""
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
        self.waiting_for_base = False
        """An adapter whose base has not finished its first load: poll again soon."""

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
        self.waiting_for_base = False
        if self.current is not None and self.current.version == target:
            if self._base_still_serves():
                self.status = None
                return
            self._failed.pop(target, None)  # its base moved: see whether it still fits (it is refused if not)
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
                self.bases,
            )
        except WaitingForBase as waiting:
            self.status, self.waiting_for_base = str(waiting), True
            return
        except Exception as error:
            if self.current is not None and not self._base_still_serves():
                self.current = None  # an adapter whose base was replaced: its engine takes nothing new
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

    def _base_still_serves(self) -> bool:
        """False for an adapter whose base version is no longer the one its base's watcher serves."""
        base = self.current.base if self.current is not None else None
        if base is None or self.bases is None:
            return True
        watcher = self.bases(base.name)
        return watcher is not None and watcher.current is base

    @property
    def served_version(self) -> str | None:
        return self.current.version if self.current else None

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.check)
            if self.waiting_for_base:
                await asyncio.sleep(0.2)
                continue
            self.checked.set()
            await asyncio.sleep(self.poll_interval_s)
