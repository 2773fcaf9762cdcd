"""Quantization recipes on a tiny BERT: which modules stay in full precision."""

import json
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from llmops.candidate_folder import CandidateMeta, quantize_dynamic_int8
from llmops.classification.candidate import Classifier
from llmops.config import QuantizeConfig
from llmops.quantize import save_dynamic_int8, search_torch_int8
from tests.tiny_registry import LABELS, build_tiny_candidate


def _model() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    return BertForSequenceClassification(config).eval()


def test_int8_keeps_skipped_modules_in_full_precision() -> None:
    quantized = quantize_dynamic_int8(_model(), per_channel=True, skip_modules=["classifier", "pooler"])
    assert type(quantized.classifier) is torch.nn.Linear
    assert type(quantized.bert.pooler.dense) is torch.nn.Linear
    assert type(quantized.bert.encoder.layer[0].attention.self.query) is not torch.nn.Linear
    assert quantized(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3)


def test_output_projections_can_stay_in_full_precision() -> None:
    quantized = quantize_dynamic_int8(_model(), per_channel=True, skip_modules=["classifier", "output"])
    layer = quantized.bert.encoder.layer[0]
    assert type(layer.output.dense) is torch.nn.Linear and type(layer.attention.output.dense) is torch.nn.Linear
    assert type(layer.intermediate.dense) is not torch.nn.Linear


def test_a_whole_dotted_name_keeps_just_that_layer() -> None:
    quantized = quantize_dynamic_int8(_model(), per_channel=True, skip_modules=["bert.encoder.layer.1.output.dense"])
    assert type(quantized.bert.encoder.layer[1].output.dense) is torch.nn.Linear
    assert type(quantized.bert.encoder.layer[0].output.dense) is not torch.nn.Linear


# --- accuracy-aware int8 ----------------------------------------------------------------------------------


def _sensitive_student(directory: Path) -> tuple[Path, pd.DataFrame]:
    """A tiny student on the edge between two labels (its bias centres their logits over the rows), with one
    outlier weight that int8's one scale per tensor cannot hold: quantized, its predictions change. Validation
    labels are the fp32 student's own predictions."""
    words = ["flight", "delayed", "great", "phone", "battery", "awful", "love", "rain", "music", "late", "crew"]
    texts = [" ".join(words[(i * k) % len(words)] for k in (1, 3, 7, 2)) + f" {i}" for i in range(90)]
    student = build_tiny_candidate(directory, seed=3)
    model = BertForSequenceClassification.from_pretrained(student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    with torch.no_grad():
        layer = model.bert.encoder.layer[1]
        layer.intermediate.dense.weight[0, 0] = 1000.0  # the outlier...
        layer.output.dense.weight[:, 0] = 0.0  # ...on a unit whose output nothing reads: fp32 is unchanged
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        model.classifier.bias.sub_(logits.median(dim=0).values)  # labels 0 and 1 split the rows
        model.classifier.bias[2] -= 100.0
    model.save_pretrained(student)
    predicted = Classifier(student).predict_proba(texts).argmax(axis=1)
    rows = pd.DataFrame({"text": texts, "label": [LABELS[i] for i in predicted], "label_id": predicted})
    return student, rows


def test_the_search_keeps_layers_in_fp32_when_no_loss_is_allowed(tmp_path: Path) -> None:
    student, validation = _sensitive_student(tmp_path / "student")
    cfg = QuantizeConfig(int8_per_channel=False, max_loss=0.0, search_trials=40)
    search = search_torch_int8(student, validation, cfg)
    assert search.met and search.kept_fp32  # at least one layer returned to fp32
    assert search.trials[0]["kept_fp32"] == [] and search.trials[0]["macro_f1"] < search.reference_macro_f1
    assert search.trials[-1]["macro_f1"] == search.reference_macro_f1  # the loss the result keeps: none
    assert all(not t["kept_fp32"] or t["kept_fp32"][0].startswith("bert.") for t in search.trials)  # never the test


def test_the_search_quantizes_everything_when_the_budget_allows_it(tmp_path: Path) -> None:
    student, validation = _sensitive_student(tmp_path / "student")
    search = search_torch_int8(student, validation, QuantizeConfig(int8_per_channel=False, max_loss=1.0))
    assert search.met and search.kept_fp32 == [] and len(search.trials) == 1


def test_an_int8_candidate_records_its_search_and_loads_with_the_layers_it_kept(tmp_path: Path) -> None:
    student, validation = _sensitive_student(tmp_path / "student")
    cfg = QuantizeConfig(int8_per_channel=False, max_loss=0.0)
    data = tmp_path / "data"  # the prepared data the lifecycle hands it: the search reads its validation split
    data.mkdir()
    (data / "data.json").write_text(json.dumps({"labels": LABELS, "fingerprint": "test"}))
    validation.to_parquet(data / "validation.parquet")
    out = save_dynamic_int8(student, cfg, tmp_path / "int8", data)
    recipe = CandidateMeta.load(out).recipe["quantization"]
    assert recipe["search"]["kept_fp32"] and set(recipe["search"]["kept_fp32"]) <= set(recipe["skip_modules"])
    loaded = Classifier(out)  # rebuilt from the recipe: the kept layers are plain Linear again
    for name in recipe["search"]["kept_fp32"]:
        assert type(loaded.model.get_submodule(name)) is torch.nn.Linear
    predicted = loaded.predict_proba(validation["text"].tolist()).argmax(axis=1)
    assert (predicted == validation["label_id"].to_numpy()).all()
