"""What decides, before llama.cpp runs, whether a model becomes a GGUF candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmops.checkpoints import packaged_model_path
from llmops.gguf import LlamaCppMissing, llama_cpp_version, unsupported
from llmops.gguf_convert import tokenizer_model


def folder(tmp_path: Path, architecture: str) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return tmp_path


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"])
def test_the_decoders_llama_cpp_runs_are_taken(tmp_path: Path, architecture: str) -> None:
    assert unsupported(folder(tmp_path, architecture)) is None


def test_another_architecture_is_named_in_the_refusal(tmp_path: Path) -> None:
    reason = unsupported(folder(tmp_path, "BertLMHeadModel"))
    assert reason is not None and "BertLMHeadModel" in reason and "LlamaForCausalLM" in reason


def test_the_packaged_tokenizer_is_wordpiece_and_a_folder_without_one_has_none(tmp_path: Path) -> None:
    assert tokenizer_model(packaged_model_path()) == "WordPiece"  # converted with llama.cpp's BERT vocabulary
    assert tokenizer_model(tmp_path) is None


def test_llama_cpp_not_built_is_said_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOPS_LLAMA_CPP", str(tmp_path / "nowhere"))
    with pytest.raises(LlamaCppMissing, match="make install builds it"):
        llama_cpp_version()
