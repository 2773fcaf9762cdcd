"""The `monitor` flow: one monitoring pass over the prediction log, and the retraining it may decide.

    python -m flows.monitor --config configs/quickstart.yaml

A retraining goes through Prefect (`run_deployment` of `monitor.retrain_deployment`,
not waited for) when a Prefect API is configured, or runs the lifecycle flow
in-process on the embedded default. Either way the new candidate meets the same
gates as any other: the monitor never promotes.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from prefect import flow, get_run_logger

from flows.lifecycle import lifecycle
from llmops.config import LlmopsConfig, load_config
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
    from monitoring.generation import run_generation_monitor, served_generators

    cfg = load_config(config, overrides)
    if cfg.generative:
        outcome = run_generation_monitor(cfg, cfg.registry.model_name, launcher=launcher(cfg))
    else:
        outcome = run_monitor(cfg, config, overrides or [], launcher=launcher(cfg))
    get_run_logger().info("report written to %s", outcome.report_dir)
    print(verdict_lines(outcome))
    result = {**outcome.summary.to_json(), "report_dir": str(outcome.report_dir), "run_id": outcome.run_id}
    others: dict[str, Any] = {}
    for name in served_generators(cfg):
        try:  # one generator that cannot be monitored loses neither the classifier's pass nor the others'
            other = run_generation_monitor(cfg, name, launcher=launcher(cfg))
        except MonitorError as error:
            get_run_logger().error("%s: not monitored: %s", name, error)
            others[name] = {"error": str(error)}
            continue
        print(verdict_lines(other))
        others[name] = {**other.summary.to_json(), "report_dir": str(other.report_dir), "run_id": other.run_id}
    if others:
        result["generators"] = others
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one monitoring pass as a plain Prefect flow.")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    monitor(args.config, args.overrides)


if __name__ == "__main__":
    main()
