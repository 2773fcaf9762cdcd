"""Which runtime loads a generator candidate: its `candidate.json` kind says (GGUF kinds: llama.cpp; OpenVINO
kinds: OpenVINO; every other kind: torch)."""

from __future__ import annotations

from pathlib import Path

from llmops.candidate_folder import CandidateMeta
from llmops.config import OPENVINO_KINDS
from llmops.generation.candidate import Generator
from llmops.gguf import GGUF_KINDS


def load_generator(directory: str | Path) -> Generator:
    kind = CandidateMeta.load(directory).kind
    if kind in GGUF_KINDS:
        from llmops.generation.llamacpp import LlamaCppGenerator  # the bindings load only for a GGUF candidate

        return LlamaCppGenerator(directory)
    if kind in OPENVINO_KINDS:
        from llmops.generation.openvino import OpenVinoGenerator

        return OpenVinoGenerator(directory)
    return Generator(directory)
