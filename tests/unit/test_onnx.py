"""ONNX Runtime candidates of a tiny BERT: export, int8 (dynamic, static, accuracy-aware), load errors."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmops.candidate_folder import CandidateMeta
from llmops.classification.candidate import Classifier
from llmops.config import LlmopsConfig, QuantizeConfig
from llmops.ort import ONNX_FILE, OnnxLoadError
from llmops.quantize import quantize_candidate
from tests.tiny_registry import LABELS, build_tiny_candidate
from tests.unit.test_quantize import _sensitive_student

TEXTS = ["the flight was great", "lost my bag again", "ok", "a much longer tweet about a delayed flight to denver"]


def _prepared(directory: Path, validation: pd.DataFrame) -> Path:
    """The prepared-data folder the lifecycle hands quantization: validation rows to search on, training rows to
    calibrate on."""
    directory.mkdir()
    (directory / "data.json").write_text(json.dumps({"labels": LABELS, "fingerprint": "test"}))
    validation.to_parquet(directory / "validation.parquet")
    validation.to_parquet(directory / "train.parquet")
    return directory


def test_onnx_fp32_answers_as_the_torch_student_does_with_its_embeddings(tmp_path: Path) -> None:
    student = build_tiny_candidate(tmp_path / "student", seed=1)
    exported = quantize_candidate(student, "onnx-fp32", QuantizeConfig(), tmp_path / "onnx")
    torch_model, onnx_model = Classifier(student), Classifier(exported)
    expected, got = torch_model.forward(TEXTS, batch_size=2), onnx_model.forward(TEXTS, batch_size=2)
    np.testing.assert_allclose(got.probs, expected.probs, atol=1e-5)
    assert got.embeddings is not None and expected.embeddings is not None
    np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-4)
    recipe = CandidateMeta.load(exported).recipe["quantization"]
    assert recipe["format"] == "onnx" and recipe["opset"] == 17 and recipe["execution_provider"]
    assert recipe["onnxruntime"] and "model.safetensors" not in {p.name for p in exported.iterdir()}


def test_the_onnx_search_keeps_layers_in_fp32_when_no_loss_is_allowed(tmp_path: Path) -> None:
    student, validation = _sensitive_student(tmp_path / "student")
    cfg = QuantizeConfig(int8_per_channel=False, max_loss=0.0, onnx_int8_mode="dynamic")
    out = quantize_candidate(student, "onnx-int8", cfg, tmp_path / "int8", _prepared(tmp_path / "data", validation))
    recipe = CandidateMeta.load(out).recipe["quantization"]
    search = recipe["search"]
    assert search["met"] and recipe["kept_fp32"] == search["kept_fp32"] != []
    assert search["trials"][0]["macro_f1"] < search["reference_macro_f1"]  # all-int8 changed the predictions...
    predicted = Classifier(out).predict_proba(validation["text"].tolist()).argmax(axis=1)
    assert (predicted == validation["label_id"].to_numpy()).all()  # ...the result does not
    assert recipe["mode"] == "dynamic" and recipe["nodes_fp32"] > 1  # the head, and what the search kept


def test_the_onnx_search_quantizes_everything_when_the_budget_allows_it(tmp_path: Path) -> None:
    student, validation = _sensitive_student(tmp_path / "student")
    cfg = QuantizeConfig(int8_per_channel=False, max_loss=1.0, onnx_int8_mode="dynamic")
    out = quantize_candidate(student, "onnx-int8", cfg, tmp_path / "int8", _prepared(tmp_path / "data", validation))
    recipe = CandidateMeta.load(out).recipe["quantization"]
    assert recipe["kept_fp32"] == [] and len(recipe["search"]["trials"]) == 1
    assert recipe["nodes_fp32"] == 1  # the classifier head alone (quantize.skip_modules)


@pytest.mark.parametrize("mode", ["static", "auto"])
def test_static_int8_is_calibrated_on_training_rows_and_auto_keeps_the_faster(tmp_path: Path, mode: str) -> None:
    student = build_tiny_candidate(tmp_path / "student", seed=2)
    rows = pd.DataFrame({"text": TEXTS * 10, "label": "neutral", "label_id": 1})
    cfg = QuantizeConfig(max_loss=None, onnx_int8_mode=mode, calibration_rows=16)  # type: ignore[arg-type]
    out = quantize_candidate(student, "onnx-int8", cfg, tmp_path / "int8", _prepared(tmp_path / "data", rows))
    recipe = CandidateMeta.load(out).recipe["quantization"]
    assert recipe["calibration_rows"] == 16
    if mode == "auto":
        measured = recipe["auto"]
        faster = max(measured, key=lambda m: measured[m]["texts_per_s"])
        assert recipe["mode"] == faster  # no loss budget: speed alone decides
    else:
        assert recipe["mode"] == "static"
    assert Classifier(out).predict_proba(TEXTS).shape == (4, 3)


def test_static_int8_without_training_rows_is_a_clear_error(tmp_path: Path) -> None:
    student = build_tiny_candidate(tmp_path / "student", seed=2)
    with pytest.raises(ValueError, match="static needs the training rows"):
        quantize_candidate(student, "onnx-int8", QuantizeConfig(onnx_int8_mode="static"), tmp_path / "int8")


def test_a_missing_or_corrupt_onnx_file_fails_the_load_with_a_clear_error(tmp_path: Path) -> None:
    student = build_tiny_candidate(tmp_path / "student", seed=1)
    exported = quantize_candidate(student, "onnx-fp32", QuantizeConfig(), tmp_path / "onnx")
    (exported / ONNX_FILE).write_bytes(b"not a model")
    with pytest.raises(OnnxLoadError, match=r"model.onnx cannot be loaded"):
        Classifier(exported)
    (exported / ONNX_FILE).unlink()
    with pytest.raises(OnnxLoadError, match=r"model.onnx is missing"):
        Classifier(exported)


def test_onnx_candidates_are_for_classifiers() -> None:
    with pytest.raises(ValueError, match=r"\['onnx-int8'\] are built for classifiers"):
        LlmopsConfig(task="causal-lm", quantize=QuantizeConfig(candidates=["fp32", "onnx-int8"]))
    assert "onnx-int8" not in LlmopsConfig(task="causal-lm").quantize.candidates
