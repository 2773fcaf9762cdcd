"""Which runtime loads a generator candidate: its `candidate.json` kind says (GGUF kinds: llama.cpp; OpenVINO
kinds: OpenVINO; every other kind: torch; a LoRA adapter candidate: its base's, with the adapter applied)."""

from __future__ import annotations

from pathlib import Path

from llmops.candidate_folder import CandidateMeta
from llmops.config import OPENVINO_KINDS
from llmops.generation.adapters import adapter_of
from llmops.generation.candidate import Generator
from llmops.gguf import GGUF_KINDS


def load_generator(directory: str | Path) -> Generator:
    meta = CandidateMeta.load(directory)
    if adapter_of(meta.recipe) is not None:
        from llmops.generation.adapters import load_with_adapter

        return load_with_adapter(directory)  # type: ignore[no-any-return]
    kind = meta.kind
    if kind in GGUF_KINDS:
        from llmops.generation.llamacpp import LlamaCppGenerator  # the bindings load only for a GGUF candidate

        return LlamaCppGenerator(directory)
    if kind in OPENVINO_KINDS:
        from llmops.generation.openvino import OpenVinoGenerator

        return OpenVinoGenerator(directory)
    return Generator(directory)
