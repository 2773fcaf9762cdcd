"""Fine-tuning here or data-parallel, for every task. With `train.processes` above 1 the task's fine-tuning runs
under `accelerate launch`, one process per GPU (or per CPU share): `run_fine_tune` writes a launch spec naming
the task's fine-tuning function, and this module is each process's entry point.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 -m llmops.launcher launch.json

The function is named in the spec (`module:function`), not imported here: the launcher sits below both tasks.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from llmops.config import ConfigError, ModelConfig, TrainConfig
from llmops.ports import free_port
from llmops.prepared_data import PreparedData

LAUNCH_SPEC = "launch.json"

FineTune = Callable[[ModelConfig, TrainConfig, str, PreparedData, "str | Path"], Path]
"""A task's fine-tuning in one process: (model, train, task, data, out_dir) -> the candidate folder. Under
`accelerate launch` every process runs it and the first one writes the candidate. A module-level function: the
launched processes import it by name."""


class TrainLaunchError(RuntimeError):
    """The data-parallel fine-tuning under `accelerate launch` failed; the message ends with its output."""


def run_fine_tune(
    fine_tune: FineTune,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    task: str,
    data_dir: str | Path,
    out_dir: str | Path,
) -> Path:
    """`fine_tune` here, or data-parallel across `train.processes` under `accelerate launch`."""
    if train_cfg.processes == 1:
        return fine_tune(model_cfg, train_cfg, task, PreparedData.load(data_dir), out_dir)
    gpus = torch.cuda.device_count()
    if gpus and train_cfg.processes > gpus and "--gpu_ids" not in train_cfg.launch_args:
        raise ConfigError(f"train.processes={train_cfg.processes} but this machine has {gpus} GPU(s)")
    PreparedData.load(data_dir)  # a bad data folder fails here, not in N processes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / LAUNCH_SPEC
    spec.write_text(
        json.dumps(
            {
                "fine_tune": f"{fine_tune.__module__}:{fine_tune.__name__}",
                "task": task,
                "model": model_cfg.model_dump(mode="json"),
                "train": train_cfg.model_dump(mode="json"),
                "data_dir": str(data_dir),
                "out_dir": str(out_dir),
            },
            indent=2,
        )
    )
    _launch(launch_command(train_cfg, spec))
    model_dir = out_dir / "model"
    if not model_dir.is_dir():
        raise TrainLaunchError(f"accelerate launch finished but wrote no model to {model_dir}")
    return model_dir


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
    spec = json.loads(parser.parse_args(argv).spec.read_text())
    module, _, name = spec["fine_tune"].partition(":")
    fine_tune: FineTune = getattr(importlib.import_module(module), name)
    fine_tune(
        ModelConfig.model_validate(spec["model"]),
        TrainConfig.model_validate(spec["train"]),
        spec["task"],
        PreparedData.load(spec["data_dir"]),
        spec["out_dir"],
    )


if __name__ == "__main__":
    main()
