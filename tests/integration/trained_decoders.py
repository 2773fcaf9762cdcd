"""A tiny Llama (or GPT-2, Qwen2) trained on the packaged instructions: the source the runtime candidates of
tests/integration/test_gguf.py and test_openvino.py are built from and compared with."""

from __future__ import annotations

from pathlib import Path

from llmops.config import load_config
from llmops.generation.data import prepare_data
from llmops.generation.train import fine_tune
from tests.conftest import REPO

LLM_TINY = REPO / "configs" / "llm-tiny.yaml"
GPT2 = "model.random_init={model_type: gpt2, n_embd: 64, n_layer: 2, n_head: 2, n_positions: 128}"
QWEN2 = (
    "model.random_init={model_type: qwen2, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 128}"
)


def trained(tmp: Path, *overrides: str) -> tuple[Path, object]:
    cfg = load_config(LLM_TINY, ["train.epochs=2", "data.sample=200", *overrides])
    data = prepare_data(cfg.data, tmp / "data")
    return fine_tune(cfg.model, cfg.train, cfg.task, data, tmp / "teacher"), data
