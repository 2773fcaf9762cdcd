"""An OpenVINO candidate run in-process by OpenVINO's CPU plugin: the same prompts, token ids and decoding rules
as the torch generator, so every metric of the evaluation means the same; only the forward passes are
OpenVINO's.

The IR (`llmops.openvino_ir`) takes the key/value cache as inputs and returns it grown. At load, OpenVINO's
make-stateful transformation turns each such pair into a variable of the infer request, so between two steps the
cache stays inside OpenVINO and a step passes only the new tokens, the mask and the positions. `Running` is the
serving engine's running batch over it, as `llmops.generation.decode.Running` is over torch: new sequences are
prefilled in a request of their own and joined into the batch's request (left-padded, like torch's), finished
ones leave it; only a join or a leave reads and writes the cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from llmops.generation.candidate import GenerationParams, Generator, Prompt
from llmops.generation.decode import Decoded, no_adapters, step_then_admit
from llmops.openvino_ir import INPUTS, MODEL_FILE

GENERATE_SLOTS = 16
"""Sequences evaluation decodes together."""


class _Cache:
    """The running rows' attention mask (rows, width: 0 on the left padding) and their key/value cache, in numpy,
    as read out of a request when rows join or leave."""

    def __init__(self, mask: np.ndarray, states: dict[str, np.ndarray]):
        self.mask, self.states = mask, states

    @staticmethod
    def _pad_left(array: np.ndarray, width: int, axis: int) -> np.ndarray:
        missing = width - array.shape[axis]
        if missing == 0:
            return array
        pad = [(0, 0)] * array.ndim
        pad[axis] = (missing, 0)
        return np.pad(array, pad)

    def join(self, other: _Cache) -> _Cache:
        width = max(self.mask.shape[1], other.mask.shape[1])
        mask = np.concatenate([self._pad_left(c.mask, width, 1) for c in (self, other)])
        states = {
            name: np.concatenate([self._pad_left(c.states[name], width, 2) for c in (self, other)])
            for name in self.states
        }
        return _Cache(mask, states)

    def rows(self, rows: list[int]) -> _Cache:
        """Only `rows`, without the left columns that are padding in all of them."""
        mask = self.mask[rows]
        start = int(np.flatnonzero(mask.sum(axis=0) > 0)[0])
        return _Cache(mask[:, start:], {name: state[rows, :, start:] for name, state in self.states.items()})


class Running:
    """The serving engine's running batch over an OpenVINO decoder (see the module's doc)."""

    def __init__(self, compiled: Any, cache_shape: tuple[int, int], embeddings: bool = False):
        self._heads, self._width = cache_shape
        self.embeddings = embeddings
        self._request = compiled.create_infer_request()
        self._prefill = compiled.create_infer_request()
        self._mask: np.ndarray | None = None

    @staticmethod
    def _read(request: Any) -> dict[str, np.ndarray]:
        return {state.name: np.array(state.state.data) for state in request.query_state()}

    @staticmethod
    def _write(request: Any, states: dict[str, np.ndarray]) -> None:
        import openvino as ov

        for state in request.query_state():
            state.state = ov.Tensor(np.ascontiguousarray(states[state.name]))

    def _empty(self, request: Any, rows: int) -> None:
        import openvino as ov

        for state in request.query_state():
            state.state = ov.Tensor(np.zeros((rows, self._heads, 0, self._width), dtype=np.float32))

    def _run(self, request: Any, ids: np.ndarray, mask: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = (mask.cumsum(axis=1) - 1).clip(min=0)[:, -ids.shape[1] :]
        out = request.infer(
            {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "logits_index": index},
            share_inputs=True,
        )
        return out["logits"], out["hidden"]

    def prefill(
        self, prompts: list[list[int]], index: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, _Cache]:
        """The left-padded prompts run in the prefill request: logits and head inputs at `index` (default: the
        last position) and their cache."""
        width = max(len(ids) for ids in prompts)
        ids = np.zeros((len(prompts), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
        self._empty(self._prefill, len(prompts))
        logits, hidden = self._run(self._prefill, ids, mask, np.array([width - 1]) if index is None else index)
        return logits, hidden, _Cache(mask, self._read(self._prefill))

    def admit(
        self, prompts: list[list[int]], adapters: list[str | None] | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """New rows for `prompts` (one prefill for all): their next-token logits (n, vocab) and, when asked, the
        prompts' embeddings (n, hidden)."""
        no_adapters(adapters, "OpenVINO")
        logits, hidden, joining = self.prefill(prompts)
        cache = joining if self._mask is None else self._cache().join(joining)
        self._write(self._request, cache.states)
        self._mask = cache.mask
        return torch.from_numpy(logits[:, -1].copy()), hidden[:, -1].copy() if self.embeddings else None

    def _cache(self) -> _Cache:
        assert self._mask is not None
        return _Cache(self._mask, self._read(self._request))

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token to every row (in row order); the next logits (rows, vocab)."""
        assert self._mask is not None
        self._mask = np.concatenate([self._mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        ids = np.array(tokens, dtype=np.int64)[:, None]
        logits, _ = self._run(self._request, ids, self._mask, np.array([0]))
        return torch.from_numpy(logits[:, -1].copy())

    def step_and_admit(
        self, tokens: list[int], prompts: list[list[int]], adapters: list[str | None] | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        return step_then_admit(self, tokens, prompts, adapters)

    def full(self, row: int) -> bool:
        return False  # the model's own context is checked before a sequence is admitted

    def keep(self, rows: list[int]) -> None:
        """Only `rows` stay, in that order."""
        if self._mask is None or rows == list(range(len(self._mask))):
            return
        if not rows:
            self._mask = None
            self._request.reset_state()
            return
        cache = self._cache().rows(rows)
        self._write(self._request, cache.states)
        self._mask = cache.mask

    def score(self, ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """Logits at every position of one sequence (len(ids), vocab)."""
        no_adapters([adapter], "OpenVINO")
        logits, _, _ = self.prefill([ids], np.arange(len(ids)))
        return torch.from_numpy(logits[0].copy())


class OpenVinoGenerator(Generator):
    """A loaded OpenVINO candidate (`openvino-int8`, `openvino-int4`)."""

    def _load_model(self) -> tuple[Any, torch.device]:
        import openvino as ov
        from openvino._offline_transformations import apply_make_stateful_transformation

        from llmops.openvino_ir import cache_shape

        model_file, self._positions = self._model_file(MODEL_FILE, "OpenVINO")
        core = ov.Core()
        try:
            model = core.read_model(model_file)
        except RuntimeError as error:
            raise RuntimeError(f"OpenVINO could not load {model_file}: {error}") from error
        caches = model.inputs[len(INPUTS) :]
        pairs = {p.get_any_name(): p.get_any_name().replace("past.", "present.") for p in caches}
        apply_make_stateful_transformation(model, pairs)
        properties = {
            "INFERENCE_PRECISION_HINT": "f32",  # as torch computes; unset, the plugin takes bf16 where the CPU has it
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        }
        compiled = core.compile_model(model, "CPU", properties)
        from transformers import AutoConfig

        self._cache_shape = cache_shape(AutoConfig.from_pretrained(self.directory))
        self._own: Running | None = None
        return compiled, torch.device("cpu")

    @property
    def context_length(self) -> int | None:
        return self._positions

    def running_batch(self, slots: int, embeddings: bool = False, positions: int | None = None) -> Running:
        """The serving engine's running batch (see `Running`); its cache grows, as torch's."""
        return Running(self.model, self._cache_shape, embeddings)

    def _running(self) -> Running:
        """Evaluation's own."""
        if self._own is None:
            self._own = self.running_batch(GENERATE_SLOTS, embeddings=True)
        return self._own

    def generate_ids(self, encoded: list[list[int]], params: GenerationParams) -> Decoded:
        if self.task != "causal-lm":
            raise ValueError(f"OpenVINO candidates are decoders; this candidate is a {self.task} model")
        return self.generate_running(self._running(), encoded, params, GENERATE_SLOTS)

    def prompt_embeddings(self, prompts: Sequence[Prompt], batch_size: int = 32) -> np.ndarray:
        """The output layer's input at each prompt's last token, as torch's `prompt_embeddings`."""
        vectors = []
        for first in range(0, len(prompts), batch_size):
            encoded = [self.encode(prompt) for prompt in prompts[first : first + batch_size]]
            _, hidden, _ = self._running().prefill(encoded)
            vectors.append(hidden[:, -1].copy())
        return np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)

    def completion_logits(
        self, prompts: Sequence[Prompt], completions: Sequence[str], batch_size: int = 8
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.scored_one_at_a_time(self._running().score, prompts, completions)
