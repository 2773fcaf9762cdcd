"""The `monitor` flow: one monitoring pass over the prediction log, and the retraining it may decide.

    python -m flows.monitor --config configs/quickstart.yaml

A retraining goes through Prefect (`run_deployment` of `monitor.retrain_deployment`,
not waited for) when a Prefect API is configured, or runs the lifecycle flow
in-process on the embedded default. Either way the new candidate meets the same
gates as any other: the monitor never promotes.

With a Ray address (`ray.address`, `RAY_ADDRESS`) the flow runs as `monitor-on-ray`: each model's pass is a
Prefect task on the cluster (prefect-ray, `ray.stages.monitor`'s resources), all at once.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from functools import partial
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.lifecycle import lifecycle, on_ray, ray_address, ray_options, ray_task_runner
from llmops.config import LlmopsConfig, load_config
from llmops.ports import node_address
from monitoring.classification import run_monitor
from monitoring.monitor import RetrainRequest, verdict_lines
from monitoring.window import MonitorError

DEFAULT_CONFIG = "configs/quickstart.yaml"


def _through_prefect(cfg: LlmopsConfig) -> bool:
    if cfg.monitor.retrain_via != "auto":
        return cfg.monitor.retrain_via == "prefect"
    return bool(os.environ.get("PREFECT_API_URL"))


def launcher(cfg: LlmopsConfig) -> Any:
    def launch(request: RetrainRequest) -> dict[str, Any]:
        config = request.config or DEFAULT_CONFIG
        if _through_prefect(cfg):
            from prefect.deployments import run_deployment

            parameters = {"config": config, "overrides": request.overrides}
            deployment = request.deployment or cfg.monitor.retrain_deployment
            run = run_deployment(deployment, parameters=parameters, timeout=0)
            flow_run_id = str(run.id)  # type: ignore[union-attr]  # sync call: a FlowRun, not a coroutine
            return {"mode": "prefect", "deployment": deployment, "flow_run_id": flow_run_id}
        result = lifecycle(config, request.overrides)
        return {
            "mode": "in-process",
            "version": result["version"],
            "promoted": result["promoted"],
            "champion": result["champion"],
            "message": result["message"],
        }

    return launch


@flow(name="monitor", log_prints=True)
def monitor(config: str = DEFAULT_CONFIG, overrides: list[str] | None = None) -> dict[str, Any]:
    """Window vs the champion's reference: report, decision (recorded), retraining if decided; for the config's
    model, and for every served generator beside it (`serve.models`)."""
    from monitoring.generation import served_generators

    cfg = load_config(config, overrides)
    address = ray_address(cfg)
    if address is not None and not on_ray():
        on_cluster = monitor.with_options(name="monitor-on-ray", task_runner=ray_task_runner(address))
        return on_cluster(config, overrides)
    if on_ray():  # every model's pass at once, each a task on the cluster
        from prefect_ray.context import remote_options

        with remote_options(**ray_options(cfg, "monitor")):
            own = monitor_pass.submit(config, overrides or [], None)
            started = {name: monitor_pass.submit(config, overrides or [], name) for name in served_generators(cfg)}
        result = own.result()
        waits: dict[str, Callable[[], dict[str, Any]]] = {name: f.result for name, f in started.items()}
    else:
        result = monitor_pass.fn(config, overrides or [], None)
        waits = {name: partial(monitor_pass.fn, config, overrides or [], name) for name in served_generators(cfg)}
    others: dict[str, Any] = {}
    for name, wait in waits.items():
        try:  # one generator that cannot be monitored loses neither the classifier's pass nor the others'
            others[name] = wait()
        except MonitorError as error:
            get_run_logger().error("%s: not monitored: %s", name, error)
            others[name] = {"error": str(error)}
    if others:
        result["generators"] = others
    return result


@task(name="monitor-pass", cache_policy=NO_CACHE, log_prints=True)
def monitor_pass(config: str, overrides: list[str], model: str | None) -> dict[str, Any]:
    """One model's pass (None: the config's own model); its summary, where its report is, and the node it ran on."""
    from monitoring.generation import run_generation_monitor

    cfg = load_config(config, overrides)
    if model is not None or cfg.generative:
        outcome = run_generation_monitor(cfg, model or cfg.registry.model_name, launcher=launcher(cfg))
    else:
        outcome = run_monitor(cfg, config, overrides, launcher=launcher(cfg))
    print(verdict_lines(outcome))
    summary = outcome.summary.to_json()
    return summary | {"report_dir": str(outcome.report_dir), "run_id": outcome.run_id, "node": node_address()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one monitoring pass as a plain Prefect flow.")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    monitor(args.config, args.overrides)


if __name__ == "__main__":
    main()
