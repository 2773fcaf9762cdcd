"""The candidate contract: how a model is saved on disk and loaded back to predict.

A candidate folder holds `candidate.json` (task, kind, labels, recipe, parameter
counts), the tokenizer, the Hugging Face `config.json`, and its weights:
- teacher, student: `model.safetensors` (plain fp32 Hugging Face folder);
- bnb-int8, nf4: `model.safetensors` with the bitsandbytes quantization config;
- int8 (torch dynamic): `quantized_state_dict.pt`, a weights-only torch state
  dict, because safetensors cannot hold quantized tensors. It is rebuilt by
  applying the recorded recipe to the architecture and loading the weights;
- onnx-fp32, onnx-int8: `model.onnx`, run by ONNX Runtime (`llmops.ort`).
Evaluation, the MLflow model and serving all load classifiers through here;
generators load through `llmops.generation.candidate`, on the same folder layout.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llmops.config import ONNX_KINDS
from llmops.ort import ONNX_FILE, OnnxModel

META_FILE = "candidate.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".onnx")
INT8_WEIGHTS = "quantized_state_dict.pt"
HISTORY_FILE = "training_log.json"
"""Trainer log history, written beside the candidate folder by fine-tuning and distillation."""


@dataclass(frozen=True)
class CandidateMeta:
    kind: str
    labels: list[str]
    """Class labels in output order (empty for a generator)."""
    max_length: int
    recipe: dict[str, Any] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    task: str = "sequence-classification"

    def save(self, directory: Path) -> None:
        (directory / META_FILE).write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> CandidateMeta:
        return cls(**json.loads((Path(directory) / META_FILE).read_text()))


def save_hf_candidate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, meta: CandidateMeta, directory: str | Path
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    meta.save(directory)
    return directory


def is_skipped(name: str, skip_modules: list[str]) -> bool:
    return name in skip_modules or bool(set(name.split(".")) & set(skip_modules))


def quantize_dynamic_int8(model: torch.nn.Module, per_channel: bool, skip_modules: list[str]) -> torch.nn.Module:
    """torch dynamic int8 on every Linear layer except those under a module named in `skip_modules`.

    A name matches any component of a module's dotted path (`pooler` keeps `bert.pooler.dense`) or the whole
    path (`bert.encoder.layer.1.output.dense`, as the accuracy-aware search names the layers it keeps).
    """
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {
        name: qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not is_skipped(name, skip_modules)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchao migration notice, printed on every call
        return quantize_dynamic(model.eval(), qconfig_spec=spec, dtype=torch.qint8)


def load_int8(directory: Path, meta: CandidateMeta, auto_class: Any = AutoModelForSequenceClassification) -> Any:
    """A torch dynamic-int8 candidate: the architecture from config.json, quantized by the recorded recipe, then
    the int8 weights loaded into it."""
    config = AutoConfig.from_pretrained(directory)
    model = auto_class.from_config(config)
    recipe = meta.recipe["quantization"]
    quantized = quantize_dynamic_int8(model, recipe["per_channel"], recipe["skip_modules"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation inside torch's quantized unpickling
        quantized.load_state_dict(torch.load(directory / INT8_WEIGHTS, weights_only=True))
    return quantized


def weights_size_mb(directory: str | Path) -> float:
    """Size on disk of the weight files alone (tokenizer and config excluded)."""
    files = [p for p in Path(directory).iterdir() if p.suffix in WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files) / 2**20


def copy_without_weights(src: Path, dst: Path) -> None:
    """A candidate folder's tokenizer, config and candidate.json, for a candidate with other weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            shutil.copy2(path, dst / path.name)


def _drop_cast_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes logs a warning on every int8 matmul that it casts fp32 inputs to fp16: it says nothing new.
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def quiet_bitsandbytes() -> None:
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_cast_notice)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Forward(NamedTuple):
    probs: np.ndarray
    """(n_texts, n_labels) class probabilities"""
    embeddings: np.ndarray | None
    """(n_texts, hidden): the classification head's input"""
    unknown_share: np.ndarray
    """(n_texts,): share of each text's tokens that the tokenizer does not know"""

    def rows(self, which: slice) -> Forward:
        """The same outputs for a slice of the texts (one request's share of a batch)."""
        embeddings = None if self.embeddings is None else self.embeddings[which]
        return Forward(self.probs[which], embeddings, self.unknown_share[which])


class Classifier:
    """A loaded candidate: texts in, class probabilities out."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = CandidateMeta.load(self.directory)
        self.labels = self.meta.labels
        self.tokenizer = AutoTokenizer.from_pretrained(self.directory)
        self.model: Any
        if self.meta.kind in ONNX_KINDS:
            self.model = OnnxModel(self.directory / ONNX_FILE)
            self.device = torch.device("cpu")
            return
        if self.meta.kind == "int8":
            self.model = load_int8(self.directory, self.meta)
        else:
            # bnb folders carry their quantization config in config.json; bitsandbytes runs on CPU.
            quantized = self.meta.kind in ("bnb-int8", "nf4")
            if quantized:
                quiet_bitsandbytes()
            device_map = ("cuda" if torch.cuda.is_available() else "cpu") if quantized else None
            self.model = AutoModelForSequenceClassification.from_pretrained(self.directory, device_map=device_map)
        self.model.eval()
        self.device = next(iter(self.model.parameters())).device if self.meta.kind != "int8" else torch.device("cpu")

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(n_texts, n_labels) class probabilities."""
        return self.forward(texts, batch_size, embeddings=False).probs

    @torch.inference_mode()
    def forward(self, texts: list[str], batch_size: int = 64, embeddings: bool = True) -> Forward:
        """Probabilities, and what monitoring wants from the same pass: embeddings and unknown-token shares.

        Texts are batched in order of length (less padding; the outputs come back in the given order). A torch
        model's embedding is the classification head's input, caught with a forward hook; an ONNX graph returns
        it as its second output: no extra cost either way.
        """
        if not texts:
            return Forward(np.zeros((0, len(self.labels)), dtype=np.float32), None, np.zeros(0))
        order = np.argsort([len(text) for text in texts], kind="stable")
        probs: list[np.ndarray] = []
        embeds: list[np.ndarray] = []
        unknown: list[np.ndarray] = []
        unk_id, n_special = self.tokenizer.unk_token_id, self.tokenizer.num_special_tokens_to_add()
        for start in range(0, len(texts), batch_size):
            encoded = self.tokenizer(
                [texts[i] for i in order[start : start + batch_size]],
                padding=True,
                truncation=True,
                max_length=self.meta.max_length,
                return_tensors="np",
            )
            logits, embedding = self._run(encoded, embeddings)
            probs.append(_softmax(logits))
            if embedding is not None:
                embeds.append(embedding)
            if unk_id is not None:
                real = np.clip(encoded["attention_mask"].sum(axis=1) - n_special, 1, None)
                unknown.append((encoded["input_ids"] == unk_id).sum(axis=1) / real)
        back = np.argsort(order)
        shares = np.concatenate(unknown)[back] if unknown else np.zeros(len(texts))
        return Forward(np.concatenate(probs)[back], np.concatenate(embeds)[back] if embeddings else None, shares)

    def _run(self, encoded: Any, embeddings: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, embeddings or None) of one tokenized batch."""
        if isinstance(self.model, OnnxModel):
            logits, embedding = self.model(encoded)
            return logits, embedding if embeddings else None
        sink: list[np.ndarray] = []
        hook = self._embedding_hook(sink) if embeddings else None
        try:
            batch = {name: torch.from_numpy(values).to(self.device) for name, values in encoded.items()}
            logits = self.model(**batch).logits.float().cpu().numpy()
        finally:
            if hook is not None:
                hook.remove()
        return logits, sink[0] if sink else None

    def _embedding_hook(self, sink: list[np.ndarray]) -> torch.utils.hooks.RemovableHandle:
        head = getattr(self.model, "classifier", None)
        if not isinstance(head, torch.nn.Module):
            raise TypeError(f"{type(self.model).__name__} has no `classifier` head to read embeddings from")

        def catch(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            features = args[0]
            if features.dim() == 3:  # heads that pool themselves (RoBERTa): the first token
                features = features[:, 0]
            sink.append(features.float().cpu().numpy())

        return head.register_forward_pre_hook(catch)

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        """Per text: `label`, `score` (its probability) and `probabilities` by label."""
        probs = self.predict_proba(texts, batch_size)
        return [
            {
                "label": self.labels[int(row.argmax())],
                "score": float(row.max()),
                "probabilities": {label: float(p) for label, p in zip(self.labels, row, strict=True)},
            }
            for row in probs
        ]
