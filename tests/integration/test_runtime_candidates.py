"""What every runtime candidate (GGUF on llama.cpp, OpenVINO) promises when it cannot be built or loaded: an
architecture the runtime does not take is refused by name before any weights are read, and a model file cut
short or missing fails the load with a clear error."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from llmops.candidate_folder import CandidateMeta
from llmops.generation.loading import load_generator
from llmops.gguf import GGUF_FILE, save_gguf
from llmops.openvino_ir import MODEL_FILE, save_openvino

RUNTIMES: dict[str, tuple[Callable[[Path, str, Path], Path], str, str]] = {
    "gguf-q8_0": (save_gguf, GGUF_FILE, "llama.cpp could not load"),
    "openvino-int8": (save_openvino, MODEL_FILE, "OpenVINO could not load"),
}


@pytest.mark.parametrize("kind", list(RUNTIMES))
def test_an_architecture_the_runtime_cannot_take_is_refused_by_name(kind: str, tmp_path: Path) -> None:
    t5 = tmp_path / "t5"  # refused from its config alone, before any weights are read
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    CandidateMeta(kind="fp32", labels=[], max_length=48, task="seq2seq-lm").save(t5)
    save, _, _ = RUNTIMES[kind]
    with pytest.raises(ValueError, match="T5ForConditionalGeneration"):
        save(t5, kind, tmp_path / "candidate")
    assert not (tmp_path / "candidate").exists()  # nothing half-written


@pytest.mark.parametrize("kind", list(RUNTIMES))
def test_a_corrupt_or_missing_model_file_fails_the_load_with_a_clear_error(
    kind: str, llama: tuple[Path, object], tmp_path: Path
) -> None:
    save, model_file, message = RUNTIMES[kind]
    built = save(llama[0], kind, tmp_path / "candidate")
    broken = tmp_path / "broken"
    shutil.copytree(built, broken)
    (broken / model_file).write_bytes((built / model_file).read_bytes()[:2048])  # cut short, as an interrupted copy
    with pytest.raises(RuntimeError, match=message):
        load_generator(broken)
    (broken / model_file).unlink()
    with pytest.raises(FileNotFoundError, match="no model file"):
        load_generator(broken)
