"""`llmops` command line: run the lifecycle, roll back the champion, predict (or generate), serve, monitor."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from cli import keys
from llmops.checkpoints import ModelLoadError
from llmops.config import ConfigError, load_config
from llmops.prepared_data import DataError
from llmops.registry import RegistryError

app = typer.Typer(
    help="The whole lifecycle of transformer classifiers and generators.", no_args_is_help=True, add_completion=False
)

ConfigOption = Annotated[str, typer.Option("--config", "-c", help="YAML config file.")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key: data.sample=2000.")]
BAD_INPUT = (ConfigError, DataError, ModelLoadError, RegistryError)

# `llmops run` starts a temporary Prefect server where no PREFECT_API_URL is set; on a fresh PREFECT_HOME it first
# builds its database, which on 2 busy cores outlasted Prefect's 20 s default (the run then fails before any stage).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


EXAMPLES = {
    "sequence-classification": '"the flight was great" "lost my bag again"',
    "generation": '"write a positive tweet about coachella" "classify the sentiment of this tweet: lost my bag again"',
}


def next_steps(config: str, overrides: list[str], task: str, uri: str, experiment_id: str) -> str:
    """Commands that act on what this run built: its config and overrides, its model."""
    from llmops.registry import experiment_url

    args = f"--config {config}" + "".join(f" --set '{o}'" for o in overrides)
    examples = EXAMPLES["sequence-classification" if task == "sequence-classification" else "generation"]
    lines = [
        "Next:",
        f"  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000   # runs side by side, registry aliases",
        f"    then open {experiment_url('http://127.0.0.1:5000', experiment_id)}   # this run's experiment",
        f"  .venv/bin/llmops predict {args} {examples}   # the champion, from the registry",
        f"  .venv/bin/llmops rollback {args}   # champion back to previous-champion",
        f"  .venv/bin/llmops serve {args}   # HTTP API on 127.0.0.1:8000, follows the champion"
        + ("" if task == "sequence-classification" else " (OpenAI's /v1/chat/completions)"),
        f"  .venv/bin/llmops monitor {args}   # drift, quality and bias of the served traffic",
    ]
    return "\n".join(lines)


@app.command()
def run(config: ConfigOption = "configs/quickstart.yaml", overrides: SetOption = None) -> None:
    """Run the lifecycle flow: data, fine-tune, distil, quantize, evaluate, gate, register, promote."""
    from flows.lifecycle import lifecycle
    from llmops.registry import resolve_tracking_uri

    try:
        cfg = load_config(config, overrides)
        result = lifecycle(config, overrides or [])
    except BAD_INPUT as error:
        _fail(error)
        return
    verdict = "promoted to champion" if result["promoted"] else "not promoted"
    if result["selected"] is None:
        typer.echo(f"\nno candidate passed the gates: {result['model']} not promoted ({result['message']}).")
    else:
        typer.echo(f"\n{result['model']} version {result['version']} ({result['selected']}): {verdict}.")
    typer.echo(f"champion: version {result['champion']}")
    uri = resolve_tracking_uri(cfg.registry)
    typer.echo(next_steps(config, overrides or [], cfg.task, uri, result["experiment_id"]))


@app.command()
def rollback(config: ConfigOption = "configs/quickstart.yaml", overrides: SetOption = None) -> None:
    """Point `champion` back at `previous-champion`."""
    from llmops import registry

    try:
        cfg = load_config(config, overrides)
        client = registry.setup_tracking(cfg.registry)
        result = registry.rollback(client, cfg.registry.model_name)
    except BAD_INPUT as error:
        _fail(error)
        return
    typer.echo(result.message)


@app.command()
def predict(
    texts: Annotated[list[str], typer.Argument(help="Texts to classify, or prompts for a generator.")],
    config: ConfigOption = "configs/quickstart.yaml",
    overrides: SetOption = None,
    alias: Annotated[str, typer.Option(help="Registry alias to load.")] = "champion",
    max_new_tokens: Annotated[int, typer.Option(help="Generators: tokens to write at most.")] = 48,
    temperature: Annotated[float, typer.Option(help="Generators: 0 is greedy, above 0 samples.")] = 0.0,
) -> None:
    """Classify texts (or answer prompts) with the registry's champion or another alias, through the MLflow model."""
    import mlflow
    from transformers.utils import logging as transformers_logging

    from llmops import registry

    transformers_logging.disable_progress_bar()  # "Loading weights" bars between a prompt and its answer
    try:
        cfg = load_config(config, overrides)
        registry.setup_tracking(cfg.registry)
        model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@{alias}")
    except BAD_INPUT as error:
        _fail(error)
        return
    except mlflow.exceptions.MlflowException as error:
        _fail(RegistryError(f"cannot load models:/{cfg.registry.model_name}@{alias}: {error.message}"))
        return
    if cfg.generative:
        _answer(model, texts, max_new_tokens, temperature)
        return
    predictions = model.predict(texts)
    predictions.insert(0, "text", texts)
    typer.echo(predictions.to_string(index=False, float_format="{:.3f}".format))


def _answer(model: Any, prompts: list[str], max_new_tokens: int, temperature: float) -> None:
    """A generator's answers, asked the way its training asked: a model trained on chats gets each prompt as a
    user message in its chat template. Greedy unless a temperature is given, as evaluation scores closed
    instructions; an answer that is one of the model's labels says which, as evaluation would score it."""
    from llmops.generation.evaluate import label_of

    generator = model.unwrap_python_model().generator
    chat = generator.prompt_format == "chat"
    inputs = [{"messages": [{"role": "user", "content": p}]} for p in prompts] if chat else prompts
    predictions = model.predict(inputs, params={"max_new_tokens": max_new_tokens, "temperature": temperature})
    for prompt, row in zip(prompts, predictions.itertuples(), strict=True):
        ended = "stop" if row.finish_reason == "stop" else f"cut at --max-new-tokens {max_new_tokens}"
        label = label_of(str(row.text), generator.meta.labels)
        scored = f"; scored as the label '{label}'" if label is not None else ""
        typer.echo(f"> {prompt}\n{row.text}\n  ({row.completion_tokens} tokens, {ended}{scored})")


@app.command("batch-predict")
def batch_predict(
    model: Annotated[str, typer.Option(help="models:/NAME@ALIAS or models:/NAME/VERSION.")],
    input: Annotated[str, typer.Option("--input", "-i", help="CSV, JSONL or Parquet file to score.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Folder: predictions/, rejects/, manifest.json.")],
    config: ConfigOption = "configs/quickstart.yaml",
    overrides: SetOption = None,
    column: Annotated[str | None, typer.Option(help="Column to score (default: text; prompt or messages).")] = None,
    keep: Annotated[list[str] | None, typer.Option(help="Input column copied into the predictions.")] = None,
    block_rows: Annotated[int, typer.Option(help="Rows per block: the unit of work and of resumption.")] = 10_000,
    max_chars: Annotated[int, typer.Option(help="Classifiers: longer texts are rejects.")] = 2000,
    max_new_tokens: Annotated[int, typer.Option(help="Generators: tokens to write at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="Generators: 0 is greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Generators: sampling seed.")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Score on this Ray cluster (default: $RAY_ADDRESS; none: in this process).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Ray: actors at most, each loading the model once.")] = 2,
    threads_per_worker: Annotated[int, typer.Option(help="Ray: CPUs (torch threads) per actor.")] = 1,
) -> None:
    """Score a dataset of any size with a registered model, block by block; run again to resume."""
    from pathlib import Path

    from llmops.batch import BatchError, BatchJob, run_batch
    from llmops.registry import resolve_tracking_uri

    try:
        cfg = load_config(config, overrides)
        job = BatchJob(
            model=model,
            input=Path(input),
            output=Path(output),
            column=column,
            keep=tuple(keep or ()),
            block_rows=block_rows,
            max_chars=max_chars,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
        )
        address = ray_address or os.environ.get("RAY_ADDRESS") or None
        summary = run_batch(job, resolve_tracking_uri(cfg.registry), address, workers, threads_per_worker)
    except (*BAD_INPUT, BatchError) as error:
        _fail(error)
        return
    resumed = f", {summary.resumed_blocks} of them from an earlier run" if summary.resumed_blocks else ""
    nodes = ", ".join(f"{node} ({n})" for node, n in sorted(summary.nodes.items()))
    typer.echo(
        f"{summary.model} version {summary.version}: {summary.scored} rows scored, {summary.rejected} rejected, "
        f"in {summary.blocks} blocks{resumed}.\n"
        + (f"  blocks scored on: {nodes}\n" if nodes else "")
        + f"  predictions: {summary.predictions}/   (pandas.read_parquet)\n"
        f"  rejects:     {summary.rejects}/   (row_id, reason)"
    )


@app.command()
def serve(
    config: ConfigOption = "configs/quickstart.yaml",
    overrides: SetOption = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: serve.port).")] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="As Ray Serve replicas on a Ray cluster (RAY_ADDRESS or --ray-address), autoscaled "
            "between serve.min_replicas and serve.max_replicas.",
        ),
    ] = False,
    ray_address: Annotated[str | None, typer.Option(help="The Ray cluster for --ray (default: RAY_ADDRESS).")] = None,
) -> None:
    """Serve the registry's champion over HTTP (/v1/predict, /invocations, /v2, /metrics, /docs)."""
    import json
    import tempfile

    import uvicorn

    from serving.app import CONFIG_ENV, OVERRIDES_ENV
    from serving.auth import load_api_keys
    from serving.tracing import exporter_from_environment

    try:
        cfg = load_config(config, overrides)
        load_api_keys(cfg.serve)  # a bad key file fails here, once, not in every worker
        exporter_from_environment(os.environ)  # and OTEL_* settings it cannot honour
    except BAD_INPUT as error:
        _fail(error)
        return
    if ray:
        from serving import ray_serve

        if not (ray_address or os.environ.get("RAY_ADDRESS")):
            _fail(ConfigError("--ray needs a Ray cluster: --ray-address HOST:PORT or RAY_ADDRESS (`ray start --head` "
                              "starts one here; `auto` finds one on this machine)"))  # fmt: skip
            return
        ray_serve.run(cfg, config, overrides or [], host or cfg.serve.host, cfg.serve.port if port is None else port,
                      ray_address)  # fmt: skip
        return
    # Workers are separate processes: they rebuild the app from the same config, passed by environment.
    os.environ[CONFIG_ENV] = str(config)
    os.environ[OVERRIDES_ENV] = json.dumps(overrides or [])
    if cfg.serve.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llmops-metrics-")
    uvicorn.run(
        "serving.app:app_from_environment",
        factory=True,
        workers=cfg.serve.workers,
        host=host or cfg.serve.host,
        port=cfg.serve.port if port is None else port,
        log_level="info",
        timeout_graceful_shutdown=30,
    )


@app.command()
def monitor(config: ConfigOption = "configs/quickstart.yaml", overrides: SetOption = None) -> None:
    """Compare the logged traffic with the champion's reference: report, bias, retraining decision (and retraining)."""
    from flows.monitor import monitor as monitor_flow
    from monitoring.window import MonitorError

    try:
        load_config(config, overrides)
        monitor_flow(config, overrides or [])
    except (*BAD_INPUT, MonitorError) as error:
        _fail(error)


StackHome = Annotated[str, typer.Option("--home", help="Folder for the stack's logs, pid files and stores.")]


@app.command()
def up(
    config: ConfigOption = "configs/quickstart.yaml",
    overrides: SetOption = None,
    home: StackHome = ".stack",
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server and UI.")] = 5000,
    prefect_port: Annotated[int, typer.Option(help="Prefect server and UI.")] = 4200,
    serving_port: Annotated[int, typer.Option(help="The serving API.")] = 8000,
    evidently_port: Annotated[int, typer.Option(help="The Evidently UI.")] = 8001,
) -> None:
    """Start the local stack: MLflow, Prefect server and worker (with prefect.yaml deployed), serving, Evidently UI."""
    from pathlib import Path

    from cli.stack import Ports, StackError
    from cli.stack import up as stack_up

    try:
        cfg = load_config(config, overrides)
        stack = stack_up(
            Path(home), Ports(mlflow_port, prefect_port, serving_port, evidently_port), cfg, config, overrides or []
        )
    except (*BAD_INPUT, StackError) as error:
        _fail(error)
        return
    typer.echo("The stack is up:")
    for name, url in stack.urls.items():
        typer.echo(f"  {name:<13} {url}")
    typer.echo(f"Logs and pid files: {stack.home}. In your shell:")
    for key, value in stack.env.items():
        typer.echo(f"  export {key}={value}")
    typer.echo("  .venv/bin/prefect deployment run 'lifecycle/quickstart'\n  make down")


@app.command()
def down(home: StackHome = ".stack") -> None:
    """Stop exactly the processes `llmops up` started."""
    from pathlib import Path

    from cli.stack import down as stack_down

    stopped = stack_down(Path(home))
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


app.add_typer(keys.app, name="keys")
app.command()(keys.usage)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
