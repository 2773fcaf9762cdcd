"""Which runtime loads a generator candidate: its `candidate.json` kind says (GGUF kinds: llama.cpp; OpenVINO
kinds: OpenVINO; every other kind: torch; a LoRA adapter candidate: its base's, with the adapter applied)."""

from __future__ import annotations

from pathlib import Path

from llmops.candidate_folder import CandidateMeta
from llmops.config import OPENVINO_KINDS
from llmops.generation.adapters import AdapterError, LoraWeights, adapter_of, base_folder
from llmops.generation.candidate import Generator
from llmops.gguf import GGUF_KINDS


def load_generator(directory: str | Path) -> Generator:
    meta = CandidateMeta.load(directory)
    if adapter_of(meta.recipe) is not None:
        return load_with_adapter(directory)
    kind = meta.kind
    if kind in GGUF_KINDS:
        from llmops.generation.llamacpp import LlamaCppGenerator  # the bindings load only for a GGUF candidate

        return LlamaCppGenerator(directory)
    if kind in OPENVINO_KINDS:
        from llmops.generation.openvino import OpenVinoGenerator

        return OpenVinoGenerator(directory)
    return Generator(directory)


def load_with_adapter(directory: str | Path) -> Generator:
    """An adapter candidate loaded on its own: its base's generator running every pass with the adapter, and the
    adapter's own `candidate.json` (evaluation, the MLflow model)."""
    directory = Path(directory)
    meta = CandidateMeta.load(directory)
    ref = adapter_of(meta.recipe)
    assert ref is not None
    generator = load_generator(base_folder(directory, meta, ref))
    if generator.adapters is None:
        raise AdapterError(f"{directory}: its base {ref} runs in a runtime without LoRA adapters")
    generator.adapters.fix(LoraWeights.load(directory, str(directory)))
    generator.directory, generator.meta = directory, meta
    return generator
