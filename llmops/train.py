"""Fine-tune the teacher with transformers' Trainer.

Dynamic padding, early stopping on validation macro-F1, checkpoints, and on a
GPU mixed precision; on CPU full precision on all cores. With `train.processes`
above 1 the same function runs data-parallel under `accelerate launch`, one
process per GPU: `run_fine_tune` starts it and this module is each process's
entry point.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 -m llmops.train launch.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from llmops.candidate import HISTORY_FILE, CandidateMeta, save_hf_candidate
from llmops.config import ConfigError, ModelConfig, TrainConfig
from llmops.data import PreparedData
from llmops.metrics import classification_scores
from llmops.modeling import count_parameters, load_base_model, load_tokenizer
from llmops.stack import free_port

LAUNCH_SPEC = "launch.json"


class TrainLaunchError(RuntimeError):
    """The data-parallel fine-tuning under `accelerate launch` failed; the message ends with its output."""


def use_all_cores() -> None:
    """All cores, shared between the processes of a data-parallel run on this machine."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))


def tokenize_split(path: Path, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
    """A Parquet split -> `input_ids`, `attention_mask`, `labels` (unpadded: the collator pads)."""
    frame = datasets.Dataset.from_parquet(str(path))
    tokenize = functools.partial(_tokenize_batch, tokenizer=tokenizer, max_length=max_length)
    return frame.map(tokenize, batched=True, remove_columns=frame.column_names)


def _tokenize_batch(batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, Any]:
    # A module-level function: `datasets` fingerprints it stably (a closure makes it dump bytecode).
    encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
    encoded["labels"] = batch["label_id"]
    return dict(encoded)


def compute_metrics_fn(num_labels: int):
    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.asarray(logits).argmax(-1).tolist()
        scores = classification_scores(predicted, np.asarray(prediction.label_ids).tolist(), num_labels)
        return {"macro_f1": scores["macro_f1"], "accuracy": scores["accuracy"]}

    return compute_metrics


def training_arguments(
    out_dir: Path,
    *,
    epochs: float,
    batch_size: int,
    learning_rate: float,
    train_rows: int,
    evals_per_epoch: int,
    mixed_precision: bool,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.0,
    remove_unused_columns: bool = True,
    seed: int = 42,
    processes: int = 1,
    best_metric: str = "macro_f1",
    greater_is_better: bool = True,
) -> TrainingArguments:
    """Arguments shared by fine-tuning and distillation, for every task: evaluate and checkpoint together, and
    keep the best checkpoint by `best_metric` on the validation split."""
    on_gpu = torch.cuda.is_available()
    steps_per_epoch = max(1, math.ceil(train_rows / (batch_size * processes)))
    eval_steps = max(1, steps_per_epoch // evals_per_epoch)
    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size * 2,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=int(warmup_ratio * steps_per_epoch * epochs),
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=eval_steps,
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=best_metric,
        greater_is_better=greater_is_better,
        logging_steps=max(1, eval_steps // 2),
        report_to="none",
        use_cpu=not on_gpu,
        bf16=on_gpu and mixed_precision and torch.cuda.is_bf16_supported(),
        fp16=on_gpu and mixed_precision and not torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        remove_unused_columns=remove_unused_columns,
        seed=seed,
    )


def fine_tune_arguments(out_dir: Path, cfg: TrainConfig, data: PreparedData, **more: Any) -> TrainingArguments:
    """`training_arguments` from the `train` config, for this process's share of a (data-parallel) run.
    `more`: the metric that picks the best checkpoint (default: validation macro-F1), length grouping."""
    return training_arguments(
        out_dir,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        train_rows=pq.read_metadata(data.split_path("train")).num_rows,
        evals_per_epoch=cfg.evals_per_epoch,
        mixed_precision=cfg.mixed_precision,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        seed=cfg.seed,
        processes=int(os.environ.get("WORLD_SIZE", "1")),
        **more,
    )


def drop_checkpoints(out_dir: Path) -> None:
    """Trainer checkpoints (optimizer states: several times the model) are not needed once the best one is saved
    as the candidate: a rerun reuses the finished stage folder, never a checkpoint."""
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)


def fine_tune(model_cfg: ModelConfig, train_cfg: TrainConfig, data: PreparedData, out_dir: str | Path) -> Path:
    """Train the teacher on `data`; returns the candidate folder `out_dir/model`.

    Under `accelerate launch` every process runs this; the first one writes the candidate.
    """
    use_all_cores()
    set_seed(train_cfg.seed)  # before the head is initialised: Trainer seeds only after
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(model_cfg)
    model = load_base_model(model_cfg, data.labels)
    args = fine_tune_arguments(out_dir, train_cfg, data)
    with args.main_process_first(desc="tokenize"):  # one process fills the datasets cache, the others read it
        train = tokenize_split(data.split_path("train"), tokenizer, model_cfg.max_length)
        validation = tokenize_split(data.split_path("validation"), tokenizer, model_cfg.max_length)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics_fn(len(data.labels)),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=train_cfg.early_stopping_patience)],
    )
    trainer.train()
    best = trainer.evaluate()  # every process: evaluation is sharded and gathered
    model_dir = out_dir / "model"
    if not trainer.is_world_process_zero():
        return model_dir
    (out_dir / HISTORY_FILE).write_text(json.dumps(trainer.state.log_history))
    meta = CandidateMeta(
        kind="teacher",
        labels=data.labels,
        max_length=model_cfg.max_length,
        recipe={
            "base": model_cfg.name_or_path,
            "validation_macro_f1": best["eval_macro_f1"],
            "processes": args.world_size,
            "devices": "cuda" if args.device.type == "cuda" else "cpu",
        },
        params=count_parameters(model),
    )
    save_hf_candidate(model, tokenizer, meta, model_dir)  # best checkpoint, loaded in place
    drop_checkpoints(out_dir)
    return model_dir


def fine_tune_for_task(
    task: str, model_cfg: ModelConfig, train_cfg: TrainConfig, data: PreparedData, out_dir: str | Path
) -> Path:
    """This process's share of fine-tuning, with the task's own training (classifier or generator)."""
    if task == "sequence-classification":
        return fine_tune(model_cfg, train_cfg, data, out_dir)
    from llmops.generation.train import fine_tune as fine_tune_generator

    return fine_tune_generator(model_cfg, train_cfg, task, data, out_dir)


def run_fine_tune(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    task: str = "sequence-classification",
) -> Path:
    """Fine-tune here, or data-parallel across `train.processes` under `accelerate launch`."""
    if train_cfg.processes == 1:
        return fine_tune_for_task(task, model_cfg, train_cfg, PreparedData.load(data_dir), out_dir)
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
        "-m", "llmops.train", str(spec),
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
    fine_tune_for_task(
        spec.get("task", "sequence-classification"),
        ModelConfig.model_validate(spec["model"]),
        TrainConfig.model_validate(spec["train"]),
        PreparedData.load(spec["data_dir"]),
        spec["out_dir"],
    )


if __name__ == "__main__":
    main()
