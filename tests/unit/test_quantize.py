"""Quantization recipes on a tiny BERT: which modules stay in full precision."""

import torch
from transformers import BertConfig, BertForSequenceClassification

from llmops.candidate import quantize_dynamic_int8


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
