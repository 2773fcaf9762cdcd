"""Fine-tune the teacher with transformers' Trainer.

Dynamic padding, early stopping on validation macro-F1, checkpoints, and on a
GPU mixed precision; on CPU full precision on all cores.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
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
from llmops.config import ModelConfig, TrainConfig
from llmops.data import PreparedData
from llmops.metrics import classification_scores
from llmops.modeling import count_parameters, load_base_model, load_tokenizer


def use_all_cores() -> None:
    torch.set_num_threads(os.cpu_count() or 1)


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
) -> TrainingArguments:
    """Arguments shared by fine-tuning and distillation: evaluate and checkpoint together."""
    on_gpu = torch.cuda.is_available()
    steps_per_epoch = max(1, math.ceil(train_rows / batch_size))
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
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_steps=max(1, eval_steps // 2),
        report_to="none",
        use_cpu=not on_gpu,
        bf16=on_gpu and mixed_precision and torch.cuda.is_bf16_supported(),
        fp16=on_gpu and mixed_precision and not torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        remove_unused_columns=remove_unused_columns,
        seed=seed,
    )


def fine_tune(model_cfg: ModelConfig, train_cfg: TrainConfig, data: PreparedData, out_dir: str | Path) -> Path:
    """Train the teacher on `data`; returns the candidate folder `out_dir/model`."""
    use_all_cores()
    set_seed(train_cfg.seed)  # before the head is initialised: Trainer seeds only after
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(model_cfg)
    model = load_base_model(model_cfg, data.labels)
    train = tokenize_split(data.split_path("train"), tokenizer, model_cfg.max_length)
    validation = tokenize_split(data.split_path("validation"), tokenizer, model_cfg.max_length)
    args = training_arguments(
        out_dir,
        epochs=train_cfg.epochs,
        batch_size=train_cfg.batch_size,
        learning_rate=train_cfg.learning_rate,
        train_rows=len(train),
        evals_per_epoch=train_cfg.evals_per_epoch,
        mixed_precision=train_cfg.mixed_precision,
        weight_decay=train_cfg.weight_decay,
        warmup_ratio=train_cfg.warmup_ratio,
        seed=train_cfg.seed,
    )
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
    best = trainer.evaluate()
    (out_dir / HISTORY_FILE).write_text(json.dumps(trainer.state.log_history))
    meta = CandidateMeta(
        kind="teacher",
        labels=data.labels,
        max_length=model_cfg.max_length,
        recipe={"base": model_cfg.name_or_path, "validation_macro_f1": best["eval_macro_f1"]},
        params=count_parameters(model),
    )
    return save_hf_candidate(model, tokenizer, meta, out_dir / "model")  # best checkpoint, loaded in place
