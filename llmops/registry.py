"""Every MLflow call of the lifecycle: tracking setup, runs, registration, aliases.

Aliases: `champion` (served), `challenger` (the latest candidate that passed
its gates), `previous-champion` (what `llmops rollback` returns to).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import from_pandas
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.types.schema import AnyType

from llmops.candidate_folder import META_FILE
from llmops.config import RegistryConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
TAG = "llmops."
_PACKAGE = Path(__file__).parent
"""logged with every model (`code_paths`): a registered version loads with the code it was registered with"""
_MODEL_CODE = _PACKAGE / "classification" / "mlflow_model.py"
_GENERATOR_CODE = _PACKAGE / "generation" / "mlflow_model.py"
_RUNTIME_PACKAGES = (
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "mlflow",
    "pandas",
    "numpy",
    "bitsandbytes",
    "accelerate",
    "onnxruntime",
)


class RegistryError(RuntimeError):
    """The registry is not in the state an operation needs; the message says why."""


def resolve_tracking_uri(cfg: RegistryConfig) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then the embedded SQLite store in the working directory."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup_tracking(cfg: RegistryConfig) -> MlflowClient:
    """Point MLflow at the configured store and make sure the experiment exists."""
    uri = resolve_tracking_uri(cfg)
    # MLflow also writes these into os.environ, where a later run in this process would take them
    # for the user's own setting; restore them (MLflow keeps the URIs it was given for this process).
    saved = {var: os.environ.get(var) for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"] or uri)
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    with _store_lock(uri):
        ensure_experiment(cfg, cfg.experiment)
        mlflow.set_experiment(cfg.experiment)
    return MlflowClient()


def _store_lock(uri: str) -> AbstractContextManager[object]:
    """Two runs that open a new SQLite store at once: the first builds its tables and experiment, the other waits
    (MLflow's schema migrations collide when two processes run them together: `_alembic_tmp_... already exists`)."""
    if uri.startswith("sqlite:///"):
        return FileLock(uri.removeprefix("sqlite:///") + ".lock")
    return nullcontext()


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Marks the experiment as model training for MLflow builds that choose its view by it."""


def experiment_url(ui: str, experiment_id: str) -> str:
    """The experiment's runs in MLflow's UI. MLflow 3.17 opens an experiment on its GenAI overview (traces: 0)
    unless the page asks for the model-training view; the browser remembers the choice afterwards."""
    return f"{ui}/#/experiments/{experiment_id}?workflowType=machine_learning"


def ensure_experiment(cfg: RegistryConfig, name: str) -> str:
    """The id of experiment `name` in the store `setup_tracking` set, created if missing."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND.items() - found.tags.items():  # made by an older llmops, or by hand
            MlflowClient().set_experiment_tag(found.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return str(found.experiment_id)
    # A local store gets its artifacts in a folder beside it; a server chooses its own.
    local = resolve_tracking_uri(cfg).startswith(("sqlite:", "file:", "/"))
    location = Path(cfg.artifact_location).resolve().as_uri() if local else None
    return str(mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND))


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    return dict(client.get_model_version(name, version).tags)


def find_version_by_key(client: MlflowClient, name: str, candidate_key: str) -> str | None:
    """The registered version built from exactly these inputs, if any (reruns reuse it)."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    matching = [v for v in versions if v.tags.get(TAG + "candidate_key") == candidate_key]
    return str(max(int(v.version) for v in matching)) if matching else None


def download_candidate(name: str, version: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """The candidate folder (weights, tokenizer, candidate.json) of a registered version.

    `tracking_uri` names the store explicitly (serving); otherwise the one `setup_tracking` set.
    """
    # the version's own artifact location, asked of the named store: a `models:/` URI would be resolved by MLflow
    # against the process's current registry, which is another store when a process has touched two
    source = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(
        name, version
    )
    local = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(dst), tracking_uri=tracking_uri))
    found = next(local.rglob(META_FILE), None)
    if found is None:
        raise RegistryError(f"model {name} version {version} holds no llmops candidate ({META_FILE} missing)")
    return found.parent


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


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


@contextmanager
def _without_mlflow_advice() -> Iterator[None]:
    """MLflow's advice a user of llmops cannot act on, silenced where llmops calls MLflow: the integer-column schema
    hint (the splits' label ids are never missing; the generators' token counts are integers by nature)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Hint: Inferred schema contains integer", category=UserWarning)
        yield


def log_data_inputs(splits: dict[str, Path], fingerprint: str, targets: str = "label") -> None:
    """Splits as MLflow dataset inputs (with their digest) and as artifacts under `data/`."""
    for name, path in splits.items():
        frame = pd.read_parquet(path)
        with _without_mlflow_advice():
            warnings.simplefilter("ignore", UserWarning)  # and the dataset's source-type note
            dataset = from_pandas(frame, source=str(path), name=f"{name}-{fingerprint}", targets=targets)
            mlflow.log_input(dataset, context=name)
        mlflow.log_artifact(str(path), artifact_path="data")


def model_signature(labels: list[str]) -> ModelSignature:
    """One unnamed string column in (so a plain list of texts works); label, score, prob_<label> out."""
    inputs: list[ColSpec | TensorSpec] = [ColSpec("string")]
    outputs: list[ColSpec | TensorSpec] = [ColSpec("string", "label"), ColSpec("double", "score")]
    outputs += [ColSpec("double", f"prob_{label}") for label in labels]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def runtime_requirements() -> list[str]:
    """Pinned requirements of the logged model: the versions this flow ran with."""
    return [f"{pkg}=={installed_version(pkg).split('+')[0]}" for pkg in _RUNTIME_PACKAGES]


def _log_pyfunc(code: Path, candidate_dir: Path, signature: ModelSignature, input_example: Any) -> str:
    """Log a candidate as an MLflow models-from-code pyfunc (`code`) in the active run; returns its model URI."""
    with _without_mlflow_advice():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            artifacts={"candidate": str(candidate_dir)},
            code_paths=[str(_PACKAGE)],
            signature=signature,
            input_example=input_example,
            pip_requirements=runtime_requirements(),
        )
    return info.model_uri


def log_candidate_model(candidate_dir: Path, labels: list[str], input_example: list[str]) -> str:
    """Log a classifier candidate in the active run; returns its model URI."""
    return _log_pyfunc(_MODEL_CODE, candidate_dir, model_signature(labels), input_example)


def generator_signature() -> ModelSignature:
    """Prompts or chats in (one column of any type: strings, or records with `prompt` / `messages`), generation
    params, and per input `text`, `finish_reason` and token counts out."""
    outputs: list[ColSpec | TensorSpec] = [
        ColSpec(DataType.string, "text"),
        ColSpec(DataType.string, "finish_reason"),
        ColSpec(DataType.long, "prompt_tokens"),
        ColSpec(DataType.long, "completion_tokens"),
    ]
    params = ParamSchema(
        [
            ParamSpec("max_new_tokens", DataType.long, 64),
            ParamSpec("temperature", DataType.double, 0.0),
            ParamSpec("top_p", DataType.double, 1.0),
            ParamSpec("seed", DataType.long, None),
            ParamSpec("min_new_tokens", DataType.long, 1),  # never an empty answer unless asked for
            ParamSpec("stop", DataType.string, [], shape=(-1,)),
        ]
    )
    return ModelSignature(inputs=Schema([ColSpec(AnyType())]), outputs=Schema(outputs), params=params)


def log_generator_model(candidate_dir: Path, input_example: list[Any]) -> str:
    """Log a generator candidate in the active run; returns its model URI."""
    example = (input_example, {"max_new_tokens": 16})
    return _log_pyfunc(_GENERATOR_CODE, candidate_dir, generator_signature(), example)


def encode_tags(tags: dict[str, Any]) -> dict[str, str]:
    """`llmops.`-prefixed tag names; values JSON-encoded unless already strings."""
    return {TAG + k: v if isinstance(v, str) else json.dumps(v) for k, v in tags.items()}


def register(name: str, model_uri: str, tags: dict[str, Any]) -> str:
    """A new version of `name` with the given tags."""
    return str(mlflow.register_model(model_uri, name, tags=encode_tags(tags)).version)


@dataclass(frozen=True)
class PromotionResult:
    promoted: bool
    champion: str | None
    previous: str | None
    message: str


def promote(client: MlflowClient, name: str, version: str, expected_champion: str | None) -> PromotionResult:
    """Compare-and-set: make `version` champion only if the champion is still `expected_champion`.

    MLflow has no transactions: the check and the alias write are two calls, so
    two flows finishing in the same instant can still race; the window is one
    round trip, where without the check it is the whole evaluation.
    """
    current = alias_version(client, name, CHAMPION)
    if current != expected_champion:
        return PromotionResult(
            False,
            current,
            alias_version(client, name, PREVIOUS),
            f"champion moved from {expected_champion} to {current} during evaluation; version {version} not promoted",
        )
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, version)
    return PromotionResult(True, version, current, f"version {version} is champion (previous: {current})")


def rollback(client: MlflowClient, name: str) -> PromotionResult:
    """Point `champion` back at `previous-champion`; the rolled-back version becomes `previous-champion`."""
    current = alias_version(client, name, CHAMPION)
    previous = alias_version(client, name, PREVIOUS)
    if previous is None:
        raise RegistryError(f"model '{name}' has no '{PREVIOUS}' alias: nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
        client.set_model_version_tag(name, current, TAG + "rolled_back", "true")
    return PromotionResult(True, previous, current, f"champion is version {previous} again (was {current})")
