"""Training plumbing, for every task: transformers' Trainer arguments (evaluate and checkpoint together, keep the
best checkpoint), all cores on CPU, and the tail every fine-tuning and distillation shares: train, keep the best
checkpoint, and write it as a candidate folder with its training log.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pyarrow.parquet as pq
import torch
from transformers import EarlyStoppingCallback, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from llmops.candidate_folder import HISTORY_FILE, CandidateMeta, save_hf_candidate
from llmops.checkpoints import count_parameters
from llmops.config import DistillConfig, ModelConfig, TrainConfig
from llmops.prepared_data import PreparedData


def use_all_cores() -> None:
    """All cores, shared between the processes of a data-parallel run on this machine."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))


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


def distil_arguments(out_dir: Path, cfg: DistillConfig, train_rows: int, **more: Any) -> TrainingArguments:
    """`training_arguments` from the `distill` config: two evaluations an epoch, mixed precision on a GPU.
    `more`: the metric that picks the best checkpoint (default: validation macro-F1), columns to keep."""
    return training_arguments(
        out_dir,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        train_rows=train_rows,
        evals_per_epoch=2,
        mixed_precision=True,
        **more,
    )


def fine_tune_inputs(
    model: Any,
    args: TrainingArguments,
    data: PreparedData,
    tokenize: Callable[[Path], Any],
    tokenizer: PreTrainedTokenizerBase,
    collator: Any,
    patience: int,
) -> dict[str, Any]:
    """What every fine-tuning Trainer takes: the model and its arguments, the train and validation splits through
    the task's `tokenize(split_path)` (one process first: it fills the datasets cache, the others read it), the
    tokenizer and collator, and early stopping after `patience` evaluations without improvement."""
    with args.main_process_first(desc="tokenize"):
        train, validation = tokenize(data.split_path("train")), tokenize(data.split_path("validation"))
    return {
        "model": model,
        "args": args,
        "train_dataset": train,
        "eval_dataset": validation,
        "processing_class": tokenizer,
        "data_collator": collator,
        "callbacks": [EarlyStoppingCallback(early_stopping_patience=patience)],
    }


def drop_checkpoints(out_dir: Path) -> None:
    """Trainer checkpoints (optimizer states: several times the model) are not needed once the best one is saved
    as the candidate: a rerun reuses the finished stage folder, never a checkpoint."""
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)


def teacher_meta(
    model_cfg: ModelConfig, task: str, data: PreparedData, args: TrainingArguments, **recipe: Any
) -> CandidateMeta:
    """A teacher's `candidate.json` before training: its base, `recipe`, and where it trained."""
    return CandidateMeta(
        kind="teacher",
        labels=data.labels,
        max_length=model_cfg.max_length,
        task=task,
        recipe={
            "base": model_cfg.name_or_path,
            **recipe,
            "processes": args.world_size,
            "devices": "cuda" if args.device.type == "cuda" else "cpu",
        },
    )


def train_to_candidate(
    trainer: Trainer,
    out_dir: Path,
    meta: CandidateMeta,
    best_metric: str,
    release: Callable[[Any], PreTrainedModel] = lambda model: model,
) -> Path:
    """Train, then write the best checkpoint as the candidate folder `out_dir/model`, with the Trainer's log
    history beside it; the checkpoints go.

    meta: the candidate's `candidate.json` but for what training decides: its parameter counts and the best
    checkpoint's validation `best_metric` (recorded in its recipe as `validation_<best_metric>`).
    release: the trained model as it is released (LoRA adapters merged).
    Under `accelerate launch` every process trains and evaluates (evaluation is sharded and gathered); the first
    one writes the candidate.
    """
    trainer.train()
    best = trainer.evaluate()
    model_dir = out_dir / "model"
    if not trainer.is_world_process_zero():
        return model_dir
    (out_dir / HISTORY_FILE).write_text(json.dumps(trainer.state.log_history))
    released = release(trainer.model)  # the best checkpoint, loaded in place
    recipe = {**meta.recipe, f"validation_{best_metric}": best[f"eval_{best_metric}"]}
    tokenizer = cast(PreTrainedTokenizerBase, trainer.processing_class)  # every caller passes its tokenizer
    save_hf_candidate(released, tokenizer, replace(meta, recipe=recipe, params=count_parameters(released)), model_dir)
    drop_checkpoints(out_dir)
    return model_dir
