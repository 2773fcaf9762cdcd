"""Fine-tune the classifier teacher with transformers' Trainer.

Dynamic padding, early stopping on validation macro-F1, checkpoints, and on a GPU mixed precision; on CPU full
precision on all cores. With `train.processes` above 1 `llmops.launcher` runs `fine_tune` data-parallel.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import (
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    set_seed,
)

from llmops.checkpoints import load_tokenizer
from llmops.classification.modeling import load_base_model
from llmops.config import ModelConfig, TrainConfig
from llmops.metrics import classification_scores
from llmops.prepared_data import PreparedData
from llmops.training import fine_tune_arguments, fine_tune_inputs, teacher_meta, train_to_candidate, use_all_cores


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


def fine_tune(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    task: str,
    data: PreparedData,
    out_dir: str | Path,
) -> Path:
    """Train the teacher on `data`; returns the candidate folder `out_dir/model` (`llmops.launcher.FineTune`)."""
    use_all_cores()
    set_seed(train_cfg.seed)  # before the head is initialised: Trainer seeds only after
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(model_cfg)
    model = load_base_model(model_cfg, data.labels)
    args = fine_tune_arguments(out_dir, train_cfg, data)
    tokenize = functools.partial(tokenize_split, tokenizer=tokenizer, max_length=model_cfg.max_length)
    patience = train_cfg.early_stopping_patience
    trainer = Trainer(
        **fine_tune_inputs(model, args, data, tokenize, tokenizer, DataCollatorWithPadding(tokenizer), patience),
        compute_metrics=compute_metrics_fn(len(data.labels)),
    )

    meta = teacher_meta(model_cfg, task, data, args)
    return train_to_candidate(trainer, out_dir, meta, best_metric="macro_f1")
