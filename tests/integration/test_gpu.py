"""GPU paths: mixed-precision fine-tuning and bitsandbytes on CUDA. Skipped without a CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmops.classification.candidate import Classifier
from llmops.classification.data import prepare_data
from llmops.classification.train import fine_tune
from llmops.config import load_config
from llmops.quantize import quantize_candidate
from llmops.training import training_arguments
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.gpu


def test_training_arguments_use_mixed_precision_on_gpu(tmp_path: Path) -> None:
    args = training_arguments(
        tmp_path, epochs=1, batch_size=8, learning_rate=1e-3, train_rows=64, evals_per_epoch=1, mixed_precision=True
    )
    assert not args.use_cpu and (args.bf16 or args.fp16)


def test_tiny_teacher_trains_and_bnb_candidates_run_on_cuda(tmp_path: Path) -> None:
    cfg = load_config(TINY_CONFIG)
    data = prepare_data(cfg.data, tmp_path / "data")
    teacher = fine_tune(cfg.model, cfg.train, cfg.task, data, tmp_path / "teacher")
    for kind in ("bnb-int8", "nf4"):
        classifier = Classifier(quantize_candidate(teacher, kind, cfg.quantize, tmp_path / kind))
        assert classifier.device.type == "cuda"
        probs = classifier.predict_proba(["great flight", "lost my bag"])
        assert probs.shape == (2, 3) and torch.allclose(torch.tensor(probs.sum(axis=1)), torch.ones(2), atol=1e-3)


LLM_TINY = TINY_CONFIG.with_name("llm-tiny.yaml")


def _tiny_generator_checkpoint(tmp_path: Path) -> Path:
    """A tiny random Llama saved as a checkpoint folder: QLoRA loads a pretrained base in 4-bit."""
    from llmops.generation.modeling import load_base_model, load_tokenizer

    cfg = load_config(LLM_TINY)
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, cfg.task, tokenizer)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_qlora_trains_a_4bit_base_and_releases_a_merged_full_precision_teacher(tmp_path: Path) -> None:
    from llmops.generation.candidate import GenerationParams, Generator
    from llmops.generation.data import prepare_data as prepare_generative_data
    from llmops.generation.train import fine_tune as fine_tune_generator

    base = _tiny_generator_checkpoint(tmp_path)
    cfg = load_config(LLM_TINY, [f"model.name_or_path={base}", "model.random_init=null", "train.lora={qlora: true}"])
    data = prepare_generative_data(cfg.data, tmp_path / "data")
    teacher = fine_tune_generator(cfg.model, cfg.train, cfg.task, data, tmp_path / "teacher")
    generator = Generator(teacher)
    assert generator.meta.recipe["fine_tuning"] == "qlora"
    assert all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in generator.model.parameters())
    (answer,) = generator.generate(["write a positive tweet about coachella"], GenerationParams(max_new_tokens=4))
    assert answer.completion_tokens <= 4


def test_generator_bnb_candidates_run_on_cuda(tmp_path: Path) -> None:
    from llmops.generation.candidate import GenerationParams, Generator
    from llmops.generation.data import prepare_data as prepare_generative_data
    from llmops.generation.train import fine_tune as fine_tune_generator

    cfg = load_config(LLM_TINY)
    data = prepare_generative_data(cfg.data, tmp_path / "data")
    teacher = fine_tune_generator(cfg.model, cfg.train, cfg.task, data, tmp_path / "teacher")
    for kind in ("bnb-int8", "nf4"):
        generator = Generator(quantize_candidate(teacher, kind, cfg.quantize, tmp_path / kind))
        assert generator.device.type == "cuda"
        out = generator.generate(
            ["classify the sentiment of this tweet: great crew"], GenerationParams(max_new_tokens=3)
        )
        assert out[0].completion_tokens <= 3
