"""GPU paths: mixed-precision fine-tuning and bitsandbytes on CUDA. Skipped without a CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmops.candidate import Classifier
from llmops.config import load_config
from llmops.data import prepare_data
from llmops.quantize import quantize_candidate
from llmops.train import fine_tune, training_arguments
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
    teacher = fine_tune(cfg.model, cfg.train, data, tmp_path / "teacher")
    for kind in ("bnb-int8", "nf4"):
        classifier = Classifier(quantize_candidate(teacher, kind, cfg.quantize, tmp_path / kind))
        assert classifier.device.type == "cuda"
        probs = classifier.predict_proba(["great flight", "lost my bag"])
        assert probs.shape == (2, 3) and torch.allclose(torch.tensor(probs.sum(axis=1)), torch.ones(2), atol=1e-3)
