"""Fine-tuning here or data-parallel, for every task. With `train.processes` above 1 the task's fine-tuning runs
as that many processes of one DDP group (NCCL on GPUs, gloo on CPUs), each on its shard of the batches:

- on one machine, under `accelerate launch`, one process per GPU (or per CPU share): `run_fine_tune` writes a
  launch spec naming the task's fine-tuning function, and this module is each process's entry point;

      python -m accelerate.commands.launch --multi_gpu --num_processes 2 -m llmops.launcher launch.json

- on a Ray cluster (the lifecycle's stages on Ray), as the workers of a Ray Train `TorchTrainer`, on any nodes,
  each with what `ray.stages.fine_tune` asks (CPUs, GPUs, memory).

Either way every process runs the same function on the same spec, and the first writes the candidate folder the
single process would. The function is named in the spec (`module:function`), not imported here: the launcher
sits below both tasks.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmops.config import ConfigError, ModelConfig, RayStage, TrainConfig
from llmops.ports import free_port, node_address
from llmops.prepared_data import PreparedData

LAUNCH_SPEC = "launch.json"

FineTune = Callable[[ModelConfig, TrainConfig, str, PreparedData, "str | Path"], Path]
"""A task's fine-tuning in one process: (model, train, task, data, out_dir) -> the candidate folder. Under
`accelerate launch` every process runs it and the first one writes the candidate. A module-level function: the
launched processes import it by name."""


class TrainLaunchError(RuntimeError):
    """The data-parallel fine-tuning (under `accelerate launch` or on Ray Train) failed; the message says why."""


def run_fine_tune(
    fine_tune: FineTune,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    task: str,
    data_dir: str | Path,
    out_dir: str | Path,
    ray_worker: RayStage | None = None,
) -> Path:
    """`fine_tune` here, or data-parallel across `train.processes`: Ray Train workers of `ray_worker`'s resources
    each when this process runs in a Ray cluster (the lifecycle's stages on Ray), else `accelerate launch`."""
    if train_cfg.processes == 1:
        return fine_tune(model_cfg, train_cfg, task, PreparedData.load(data_dir), out_dir)
    if _in_ray_cluster():
        return _ray_train(fine_tune, model_cfg, train_cfg, task, data_dir, out_dir, ray_worker or RayStage())
    gpus = torch.cuda.device_count()
    if gpus and train_cfg.processes > gpus and "--gpu_ids" not in train_cfg.launch_args:
        raise ConfigError(f"train.processes={train_cfg.processes} but this machine has {gpus} GPU(s)")
    PreparedData.load(data_dir)  # a bad data folder fails here, not in N processes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / LAUNCH_SPEC
    spec.write_text(json.dumps(_spec(fine_tune, model_cfg, train_cfg, task, data_dir, out_dir), indent=2))
    _launch(launch_command(train_cfg, spec))
    model_dir = out_dir / "model"
    if not model_dir.is_dir():
        raise TrainLaunchError(f"accelerate launch finished but wrote no model to {model_dir}")
    return model_dir


def _spec(
    fine_tune: FineTune, model_cfg: ModelConfig, train_cfg: TrainConfig, task: str, data_dir: str | Path, out: Path
) -> dict[str, Any]:
    return {
        "fine_tune": f"{fine_tune.__module__}:{fine_tune.__name__}",
        "task": task,
        "model": model_cfg.model_dump(mode="json"),
        "train": train_cfg.model_dump(mode="json"),
        "data_dir": str(Path(data_dir).resolve()),  # every process, on every node, finds them
        "out_dir": str(out.resolve()),
    }


def _run_spec(spec: dict[str, Any]) -> None:
    """One process's fine-tuning, as the spec names it."""
    module, _, name = spec["fine_tune"].partition(":")
    fine_tune: FineTune = getattr(importlib.import_module(module), name)
    fine_tune(
        ModelConfig.model_validate(spec["model"]),
        TrainConfig.model_validate(spec["train"]),
        spec["task"],
        PreparedData.load(spec["data_dir"]),
        spec["out_dir"],
    )


def _in_ray_cluster() -> bool:
    """Whether this process is a Ray worker or driver (Ray is not imported to ask)."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


WORKERS_FILE = "workers.json"
"""Beside a candidate fine-tuned by Ray Train workers: each rank's node."""


def _ray_train(
    fine_tune: FineTune,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    task: str,
    data_dir: str | Path,
    out_dir: str | Path,
    worker: RayStage,
) -> Path:
    """The fine-tuning as `train.processes` Ray Train workers of one DDP group (gloo on CPUs, NCCL when the
    workers have GPUs), placed by Ray on any nodes; the first writes the candidate into `out_dir`, which every
    node must see (the stage folders' shared storage)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    PreparedData.load(data_dir)  # a bad data folder fails here, not in N workers
    out_dir = Path(out_dir).resolve()
    (out_dir / "ranks").mkdir(parents=True, exist_ok=True)
    resources = {"CPU": worker.num_cpus} | ({"GPU": worker.num_gpus} if worker.num_gpus else {})
    if worker.memory_gb is not None:
        resources["memory"] = worker.memory_gb * 2**30
    trainer = TorchTrainer(
        _ray_train_worker,
        train_loop_config=_spec(fine_tune, model_cfg, train_cfg, task, data_dir, out_dir) | {"cwd": os.getcwd()},
        scaling_config=ScalingConfig(
            num_workers=train_cfg.processes, use_gpu=worker.num_gpus > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name="fine-tune", storage_path=str(out_dir / "ray-train"), failure_config=FailureConfig(max_failures=0)
        ),
    )
    try:
        trainer.fit()
    except Exception as error:  # Ray Train wraps the workers' errors in its own types
        raise TrainLaunchError(f"data-parallel fine-tuning on Ray Train failed: {error}") from error
    ranks = [json.loads(f.read_text()) for f in sorted((out_dir / "ranks").glob("rank-*.json"))]
    (out_dir / WORKERS_FILE).write_text(json.dumps(sorted(ranks, key=lambda r: r["rank"]), indent=2))
    shutil.rmtree(out_dir / "ranks", ignore_errors=True)
    shutil.rmtree(out_dir / "ray-train", ignore_errors=True)
    model_dir = out_dir / "model"
    if not model_dir.is_dir():
        raise TrainLaunchError(f"Ray Train finished but wrote no model to {model_dir}")
    return model_dir


def _ray_train_worker(spec: dict[str, Any]) -> None:
    """One Ray Train worker: its rank and node noted, then the fine-tuning (Ray has set up the process group)."""
    import ray.train

    if not Path(spec["cwd"]).is_dir():
        raise TrainLaunchError(
            f"{spec['cwd']} is not visible on {node_address()}: Ray Train workers fine-tune from the lifecycle's "
            "working directory, which must be on storage every node sees at the same path (docs/scale.md)"
        )
    os.chdir(spec["cwd"])  # a model or data path relative to the lifecycle's folder means the same here
    rank = ray.train.get_context().get_world_rank()
    note = {"rank": rank, "node": node_address(), "world_size": ray.train.get_context().get_world_size()}
    (Path(spec["out_dir"]) / "ranks" / f"rank-{rank}.json").write_text(json.dumps(note))
    _run_spec(spec)


def launch_command(train_cfg: TrainConfig, spec: Path) -> list[str]:
    """`accelerate launch` of this module. `--multi_gpu` is torchrun underneath: NCCL on GPUs, gloo on CPUs."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(train_cfg.processes), "--num_machines", "1",
        "--main_process_port", str(free_port()),  # two runs on one machine must not meet on 29500
        "--mixed_precision", "no",  # TrainingArguments decides (bf16/fp16 on a GPU)
        "--dynamo_backend", "no",
        *train_cfg.launch_args,
        "-m", "llmops.launcher", str(spec),
    ]  # fmt: skip


def _launch(command: list[str], tail_lines: int = 40) -> None:
    """Run the launcher, passing its output through; a failure names the command and its last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as launched:
        assert launched.stdout is not None
        for line in launched.stdout:
            sys.stdout.write(line)
            tail.append(line)
    if launched.returncode != 0:
        raise TrainLaunchError(
            f"data-parallel fine-tuning failed (exit {launched.returncode}): {' '.join(command)}\n" + "".join(tail)
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One process of a data-parallel fine-tuning (see run_fine_tune).")
    parser.add_argument("spec", type=Path, help=f"the {LAUNCH_SPEC} run_fine_tune wrote")
    _run_spec(json.loads(parser.parse_args(argv).spec.read_text()))


if __name__ == "__main__":
    main()
