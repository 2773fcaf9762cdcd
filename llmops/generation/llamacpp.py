"""A GGUF candidate run in-process by llama.cpp (llama-cpp-python's bindings over the llama.cpp that
`make install` builds): the same prompts, token ids and decoding rules as the torch generator, so every
metric of the evaluation means the same; only the forward passes are llama.cpp's.

The service's tokenizer is the candidate's Hugging Face tokenizer, as for every other candidate: token ids go
to llama.cpp as they are (the GGUF holds the same vocabulary in the same order).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from llmops.generation.candidate import GenerationParams, Generator, Prompt
from llmops.generation.data import IGNORE
from llmops.generation.decode import Decoded, pick
from llmops.gguf import GGUF_FILE, bindings

MAX_CONTEXT = 2048
"""Positions llama.cpp allocates for (its key/value cache and, for scoring, every position's logits): the
model's own context or this, whichever is smaller."""


class LlamaCppGenerator(Generator):
    """A loaded GGUF candidate (`gguf-f16`, `gguf-q8_0`, `gguf-q4_k_m`)."""

    def _load_model(self) -> tuple[Any, torch.device]:
        model_file = self.directory / GGUF_FILE
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: the GGUF candidate has no model file")
        config = json.loads((self.directory / "config.json").read_text())
        self._positions = int(config.get("max_position_embeddings") or config.get("n_positions") or MAX_CONTEXT)
        llama_cpp = bindings()
        try:
            model = llama_cpp.Llama(
                model_path=str(model_file),
                n_ctx=min(self._positions, MAX_CONTEXT),
                n_threads=torch.get_num_threads(),
                logits_all=True,
                verbose=False,
            )
        except ValueError as error:  # llama-cpp-python's words for a file llama.cpp could not load
            raise RuntimeError(f"llama.cpp could not load {model_file}: {error}") from error
        return model, torch.device("cpu")

    @property
    def context_length(self) -> int:
        return min(self._positions, MAX_CONTEXT)

    def _logits(self, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` after what the context holds; the logits at each of them (len(tokens), vocab)."""
        start = self.model.n_tokens
        self.model.eval(tokens)
        return torch.from_numpy(np.array(self.model.scores[start : start + len(tokens)]))

    def generate_ids(self, encoded: list[list[int]], params: GenerationParams) -> Decoded:
        """One row at a time (llama.cpp's own batching serves; evaluation needs the answers, not the speed)."""
        if self.task != "causal-lm":
            raise ValueError(f"llama.cpp runs decoders; this candidate is a {self.task} model")
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        barred = self.barred
        written, chose_end_first = [], []
        for ids in encoded:
            self.model.reset()
            logits = self._logits(ids)[-1:]
            new: list[int] = []
            for count in range(params.max_new_tokens):
                now_barred = barred.at(count, params.min_new_tokens)
                token, own = pick(barred.forbid_always(logits), now_barred, params.temperature, params.top_p, generator)
                if count == 0:
                    chose_end_first.append(int(own[0]) == self.eos_id)
                new.append(int(token[0]))
                if new[-1] == self.eos_id or len(ids) + len(new) >= self.context_length:
                    break
                logits = self._logits(new[-1:])
            written.append(new)
        return Decoded(written, chose_end_first)

    def prompt_embeddings(self, prompts: Sequence[Prompt], batch_size: int = 32) -> np.ndarray:
        raise NotImplementedError("prompt embeddings of a GGUF candidate are not computed yet (serve.log_embeddings)")

    def completion_logits(
        self, prompts: Sequence[Prompt], completions: Sequence[str], batch_size: int = 8
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for example in self.examples(prompts, completions):
            ids, labels = example["input_ids"], torch.tensor(example["labels"])
            self.model.reset()
            logits = self._logits(ids)
            scored = (labels[1:] != IGNORE).nonzero()[:, 0]  # position t predicts token t + 1
            yield logits[scored], labels[1:][scored]
