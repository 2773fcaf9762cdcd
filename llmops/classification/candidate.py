"""A classifier candidate loaded to predict: texts in, class probabilities (and what monitoring reads from the
same pass) out. Evaluation, the MLflow model, serving and monitoring load classifiers through here; the folder
layout is the shared contract of `llmops.candidate_folder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from llmops.candidate_folder import load_torch_model, open_candidate
from llmops.config import ONNX_KINDS
from llmops.ort import ONNX_FILE, OnnxModel


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
        self.directory, self.meta, self.tokenizer = open_candidate(directory)
        self.labels = self.meta.labels
        self.model: Any
        if self.meta.kind in ONNX_KINDS:
            self.model = OnnxModel(self.directory / ONNX_FILE)
            self.device = torch.device("cpu")
            return
        self.model, self.device = load_torch_model(self.directory, self.meta)

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
