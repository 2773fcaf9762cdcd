"""What decides, before llama.cpp runs, whether a model becomes a GGUF candidate and whether the service
takes one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmops.candidate_folder import CandidateMeta
from llmops.checkpoints import packaged_model_path
from llmops.gguf import LlamaCppMissing, llama_cpp_version, unsupported
from llmops.gguf_convert import tokenizer_model
from serving.runtimes import NotServable, load_runtime


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


def test_the_service_refuses_a_gguf_version_by_its_kind(tmp_path: Path) -> None:
    CandidateMeta(kind="gguf-q8_0", labels=[], max_length=48, task="causal-lm").save(tmp_path)
    with pytest.raises(NotServable, match="gguf-q8_0 candidate runs on llama.cpp"):
        load_runtime(tmp_path)
