"""Runs llama.cpp's own converter (`convert_hf_to_gguf.py`) on a Hugging Face folder, as a script:

    python -m llmops.gguf_convert LLAMA_CPP_SRC MODEL_DIR --outfile OUT --outtype f16

Two additions. A decoder whose tokenizer is WordPiece (the packaged MiniLM vocabulary, for example) is
converted with the vocabulary writer llama.cpp's converter uses for BERT (`add_tokenizer_model("bert")`, tokens
in phantom-space form). llama.cpp reads a vocabulary independently of the architecture, so the Llama, Qwen2 or
GPT-2 graph runs on it; the converter's own Llama writer knows only SentencePiece and BPE and would refuse it.
A GPT-2 config as transformers 5 writes it (no `n_ctx`) gets its `n_positions` there. And the converter reads
the tokenizer as the class the folder declares (`llmops.candidate_folder.saved_tokenizer_class`): its own
`AutoTokenizer` call would read a Qwen2 folder's WordPiece vocabulary as Qwen2's byte-level BPE.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any


def tokenizer_model(model_dir: Path) -> str | None:
    """The tokenizer's model type in tokenizer.json (`WordPiece`, `BPE`, `Unigram`), None without one."""
    found = model_dir / "tokenizer.json"
    return json.loads(found.read_text())["model"]["type"] if found.is_file() else None


def main(argv: list[str]) -> None:
    src, model_dir = Path(argv[0]), Path(argv[1])
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    from conversion.base import ModelBase  # llama.cpp's converter package, from `src`

    read_config = ModelBase.load_hparams

    def load_hparams(dir_model: Path, is_mistral_format: bool) -> dict:
        config = read_config(dir_model, is_mistral_format)
        if "n_positions" in config:  # transformers 5's GPT2Config no longer writes n_ctx; the GPT-2 writer reads it
            config.setdefault("n_ctx", config["n_positions"])
        return config

    ModelBase.load_hparams = staticmethod(load_hparams)  # type: ignore[method-assign]
    from transformers import AutoTokenizer

    from llmops.candidate_folder import saved_tokenizer_class

    auto = AutoTokenizer.from_pretrained

    def as_saved(directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        declared = saved_tokenizer_class(directory)
        return declared.from_pretrained(directory, *args, **kwargs) if declared else auto(directory, *args, **kwargs)

    AutoTokenizer.from_pretrained = as_saved  # type: ignore[method-assign,assignment]  # the converter imports it in its calls
    if tokenizer_model(model_dir) == "WordPiece":
        from conversion import get_model_class
        from conversion.bert import BertModel

        architecture = json.loads((model_dir / "config.json").read_text())["architectures"][0]
        get_model_class(architecture).set_vocab = BertModel.set_vocab  # type: ignore[method-assign]
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *argv[1:]]
    runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
