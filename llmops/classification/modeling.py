"""The classifier's base model: pretrained weights with a fresh head for the labels, or a random init."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from llmops.checkpoints import resolve_checkpoint
from llmops.config import ModelConfig


def label_maps(labels: list[str]) -> dict[str, Any]:
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def load_base_model(cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
    """The teacher's starting point: pretrained weights with a fresh head, or random init."""
    checkpoint = resolve_checkpoint(cfg.name_or_path)
    if cfg.random_init is not None:
        config = AutoConfig.from_pretrained(checkpoint, **cfg.random_init, **label_maps(labels))
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForSequenceClassification.from_pretrained(checkpoint, **label_maps(labels))
