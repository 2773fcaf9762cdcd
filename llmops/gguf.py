"""GGUF candidates: a generator converted by llama.cpp's own converter and quantized by its own quantizer.

llama.cpp is the one `make install` builds from the pinned llama-cpp-python source distribution
(scripts/build-llama-cpp.sh) under `<venv>/llama.cpp`: `llama-quantize` and the shared libraries in
`build/bin`, the converter (`convert_hf_to_gguf.py`, `gguf-py`) in `src`, llama-cpp-python's bindings over those
libraries in `python`. `LLMOPS_LLAMA_CPP` points elsewhere.

A GGUF candidate folder holds `model.gguf` beside the student's config and tokenizer (the service tokenizes
with the same tokenizer as every other candidate) and a `candidate.json` whose recipe names the llama.cpp
version, the converter and the quantization type.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from llmops.candidate_folder import CandidateMeta, architecture_refusal, copy_without_weights
from llmops.config import GGUF_QUANT_KINDS

GGUF_FILE = "model.gguf"
GGUF_KINDS: dict[str, str] = dict(zip(GGUF_QUANT_KINDS, ("F16", "Q8_0", "Q4_K_M"), strict=True))
"""Candidate kind (`llmops.config.GGUF_QUANT_KINDS`) -> llama.cpp's quantization type."""
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")
"""What llmops converts (llama.cpp's converter knows many more; these are the ones tested here)."""


class LlamaCppMissing(RuntimeError):
    """llama.cpp is not built where llmops looks for it."""


def llama_cpp_dir() -> Path:
    return Path(os.environ.get("LLMOPS_LLAMA_CPP") or Path(sys.prefix) / "llama.cpp")


def llama_cpp_version(root: Path | None = None) -> str:
    """The llama-cpp-python release whose vendored llama.cpp was built (the first word of its `.built` stamp,
    which also names the build's options)."""
    stamp = (root or llama_cpp_dir()) / ".built"
    if not stamp.is_file():
        raise LlamaCppMissing(
            f"llama.cpp is not built under {stamp.parent} (make install builds it; LLMOPS_LLAMA_CPP points elsewhere)"
        )
    return stamp.read_text().split()[0]


def binary(name: str) -> Path:
    """A tool of the built llama.cpp (`llama-quantize`)."""
    llama_cpp_version()
    found = llama_cpp_dir() / "build" / "bin" / name
    if not found.is_file():
        raise LlamaCppMissing(f"{found} is missing: rebuild llama.cpp (rm -rf {llama_cpp_dir()}; make install)")
    return found


def bindings() -> Any:
    """llama-cpp-python's `llama_cpp` module over the built libraries (not the wheel's own build)."""
    root = llama_cpp_dir()
    llama_cpp_version(root)
    os.environ["LLAMA_CPP_LIB_PATH"] = str(root / "build" / "bin")
    if str(root / "python") not in sys.path:
        sys.path.insert(0, str(root / "python"))
    llama_cpp = importlib.import_module("llama_cpp")
    if _log_to_python not in _KEPT:
        _KEPT.append(llama_cpp.llama_log_callback(_log_to_python))  # kept: the library holds only a pointer
        llama_cpp.llama_log_set(_KEPT[-1], None)
    return llama_cpp


_LOG = logging.getLogger("llama.cpp")
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}
"""ggml's log levels (DEBUG 1, INFO 2, WARN 3, ERROR 4; 5 continues the last line) -> Python's. Its warnings
(a context padded past the training length, ...) are about sizes llmops chose: INFO, not on a user's terminal.
llama-cpp-python's own callback maps an older numbering and prints them as errors."""
_KEPT: list[Any] = []
_last_level = [logging.DEBUG]


def _log_to_python(level: int, text: bytes, _: Any) -> None:
    if level != 5:
        _last_level[0] = _LEVELS.get(level, logging.DEBUG)
    _LOG.log(_last_level[0], "%s", text.decode("utf-8", "replace").rstrip())


def unsupported(model_dir: Path) -> str | None:
    """Why the model in `model_dir` cannot become a GGUF candidate (None: it can)."""
    return architecture_refusal(model_dir, "llama.cpp", ARCHITECTURES)


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{tail}")


def convert(model_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    """The Hugging Face model in `model_dir` as a GGUF file, by llama.cpp's converter (`llmops.gguf_convert`)."""
    src = llama_cpp_dir() / "src"
    llama_cpp_version()
    command = [sys.executable, "-m", "llmops.gguf_convert", str(src), str(model_dir)]
    _run([*command, "--outfile", str(out_file), "--outtype", outtype], f"converting {model_dir} to GGUF")
    return out_file


def quantize(source: Path, out_file: Path, qtype: str) -> Path:
    """`source` (a 16- or 32-bit GGUF) quantized to `qtype` by llama-quantize, on every core."""
    threads = str(os.cpu_count() or 1)
    _run([str(binary("llama-quantize")), str(source), str(out_file), qtype, threads], f"llama-quantize {qtype}")
    return out_file


def save_gguf(student_dir: Path, kind: str, out_dir: Path) -> Path:
    """The student as a GGUF candidate folder of `kind` (`gguf-f16`, `gguf-q8_0`, `gguf-q4_k_m`)."""
    meta = CandidateMeta.load(student_dir)
    reason = unsupported(student_dir)
    if reason is not None:
        raise ValueError(f"quantize.candidates: {kind}: {reason}")
    qtype = GGUF_KINDS[kind]
    copy_without_weights(student_dir, out_dir)
    with tempfile.TemporaryDirectory(prefix="llmops-gguf-") as scratch:
        f16 = convert(student_dir, Path(scratch) / "f16.gguf")
        if qtype == "F16":
            shutil.move(f16, out_dir / GGUF_FILE)
        else:
            quantize(f16, out_dir / GGUF_FILE, qtype)
    quantization = {
        "runtime": "llama.cpp",
        "llama_cpp_python": llama_cpp_version(),
        "converter": "convert_hf_to_gguf.py (vendored), outtype f16",
        "quant_type": qtype,
        "source": str(student_dir),
    }
    dataclasses.replace(meta, kind=kind, recipe={**meta.recipe, "quantization": quantization}).save(out_dir)
    return out_dir
