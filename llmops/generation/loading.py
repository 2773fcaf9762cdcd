"""Which runtime loads a generator candidate: its `candidate.json` kind says (GGUF kinds: llama.cpp; every
other kind: torch)."""

from __future__ import annotations

from pathlib import Path

from llmops.candidate_folder import CandidateMeta
from llmops.generation.candidate import Generator
from llmops.gguf import GGUF_KINDS


def load_generator(directory: str | Path) -> Generator:
    if CandidateMeta.load(directory).kind in GGUF_KINDS:
        from llmops.generation.llamacpp import LlamaCppGenerator  # the bindings load only for a GGUF candidate

        return LlamaCppGenerator(directory)
    return Generator(directory)
