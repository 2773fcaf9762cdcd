"""The runtime seam: what serving needs of a loaded model version, whatever runs it.

A classifier version answers `ClassifierRuntime` (texts in, probabilities, embeddings and unknown-token shares
out: `llmops.classification.candidate.Classifier` on torch or ONNX Runtime). A generator version is a
`GeneratorRuntime` (it tokenizes prompts and knows its context) driven by a `GenerationBackend` that schedules
its sequences (`serving.engine.GenerationEngine`, continuous batching over a torch `Generator`). The routes, the
batcher and the service state depend on these protocols only. A new runtime (llama.cpp, OpenVINO) implements
one of them and `load_runtime` picks it from the candidate's `candidate.json`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llmops.candidate_folder import CandidateMeta
from llmops.classification.candidate import Forward
from llmops.generation.candidate import GenerationParams, Prompt
from serving.engine import Sequence

T = TypeVar("T")
WARM_TEXTS = ["warming up the model", "a second, somewhat longer text to warm up the padded path"]


class ClassifierRuntime(Protocol):
    meta: CandidateMeta
    labels: list[str]

    def forward(self, texts: list[str], batch_size: int = 64, embeddings: bool = True) -> Forward:
        """Class probabilities, the head's input (when asked) and unknown-token shares, in the texts' order."""
        ...


class GeneratorRuntime(Protocol):
    meta: CandidateMeta
    tokenizer: Any

    @property
    def context_length(self) -> int | None:
        """Positions for prompt and answer together (None: no such limit)."""
        ...

    def encode(self, prompt: Prompt, truncate: bool = True) -> list[int]:
        """The prompt's token ids as the model reads them."""
        ...

    def render(self, prompt: Prompt) -> str:
        """The text the model sees before its answer (a chat rendered with the model's template)."""
        ...


class GenerationBackend(Protocol):
    """Schedules one generator version's sequences: their events arrive on `sequence.events` in `loop`."""

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        loop: asyncio.AbstractEventLoop,
        context: Any = None,
    ) -> Sequence:
        """Queue a sequence. Raises `serving.engine.EngineFull` (too many waiting) or `EngineClosed` (retired)."""
        ...

    def retire(self) -> None:
        """A newer version serves now: finish what is running, take nothing new."""
        ...

    def call(self, function: Callable[[], T]) -> T:
        """`function()` where no pass is under way (attaching a LoRA adapter to the running model)."""
        ...

    def release_adapter(self, key: str) -> None:
        """No new sequence asks for adapter `key`: detach it once none uses it."""
        ...

    def stop(self) -> None:
        """The server stops: end after the current step."""
        ...


class WrongModelKind(Exception):
    """A classifier route was asked of a generator, or the other way round; each protocol words its own error."""

    def __init__(self, name: str, task: str):
        super().__init__(f"'{name}' is a {task} model")
        self.name, self.task = name, task


def load_runtime(folder: Path) -> ClassifierRuntime | GeneratorRuntime:
    """The version in `folder` loaded by the runtime its `candidate.json` names, and warmed: the first forward
    pass allocates; pay it before traffic does."""
    meta = CandidateMeta.load(folder)
    if meta.task == "sequence-classification":
        from llmops.classification.candidate import Classifier

        classifier = Classifier(folder)
        classifier.predict_proba(WARM_TEXTS)
        return classifier
    from llmops.generation.loading import load_generator

    generator = load_generator(folder)
    generator.generate(WARM_TEXTS, GenerationParams(max_new_tokens=2))
    return generator
