"""Quantize the student: torch dynamic int8 (CPU) and bitsandbytes int8 / NF4, for every task.

Each candidate is written as a folder that `llmops.candidate.Classifier` (or, for a
generator, `llmops.generation.candidate.Generator`) loads again, with its recipe in
`candidate.json`. The model class comes from the task recorded in the student's.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, BitsAndBytesConfig

from llmops.candidate import INT8_WEIGHTS, CandidateMeta, quantize_dynamic_int8, save_hf_candidate
from llmops.config import QuantizeConfig
from llmops.modeling import AUTO_CLASS

KIND_OF = {"fp32": "student", "int8": "int8", "bnb-int8": "bnb-int8", "nf4": "nf4"}


def _copy_non_weights(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix not in (".safetensors", ".bin", ".pt"):
            shutil.copy2(path, dst / path.name)


def save_dynamic_int8(student_dir: Path, cfg: QuantizeConfig, out_dir: Path) -> Path:
    meta = CandidateMeta.load(student_dir)
    model = AUTO_CLASS[meta.task].from_pretrained(student_dir)
    recipe = {
        "method": "torch.ao.quantization.quantize_dynamic",
        "dtype": "qint8",
        "per_channel": cfg.int8_per_channel,
        "skip_modules": cfg.skip_modules,
    }
    quantized = quantize_dynamic_int8(model, cfg.int8_per_channel, cfg.skip_modules)
    _copy_non_weights(student_dir, out_dir)
    torch.save(quantized.state_dict(), out_dir / INT8_WEIGHTS)
    dataclasses.replace(meta, kind="int8", recipe={**meta.recipe, "quantization": recipe}).save(out_dir)
    return out_dir


def bnb_config(kind: str, skip_modules: list[str]) -> BitsAndBytesConfig:
    """A classifier head left out of quantization stays accurate and avoids bnb's fresh-head crash. With no
    modules named, transformers keeps its own choice out (a language model's output layer)."""
    skip_modules = skip_modules or None  # type: ignore[assignment]
    if kind == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip_modules,
    )


def save_bitsandbytes(student_dir: Path, kind: str, cfg: QuantizeConfig, out_dir: Path) -> Path:
    config = bnb_config(kind, cfg.skip_modules)
    device_map = None if torch.cuda.is_available() else "cpu"
    meta = CandidateMeta.load(student_dir)
    model = AUTO_CLASS[meta.task].from_pretrained(student_dir, quantization_config=config, device_map=device_map)
    recipe = {"method": "bitsandbytes", **{k: v for k, v in config.to_dict().items() if not k.startswith("_")}}
    meta = dataclasses.replace(meta, kind=kind, recipe={**meta.recipe, "quantization": recipe})
    return save_hf_candidate(model, AutoTokenizer.from_pretrained(student_dir), meta, out_dir)


def quantize_candidate(student_dir: str | Path, kind: str, cfg: QuantizeConfig, out_dir: str | Path) -> Path:
    """Build one compressed candidate (`fp32` is the student itself) under `out_dir`."""
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    if kind == "fp32":
        return student_dir
    if kind == "int8":
        return save_dynamic_int8(student_dir, cfg, out_dir)
    if kind in ("bnb-int8", "nf4"):
        return save_bitsandbytes(student_dir, kind, cfg, out_dir)
    raise ValueError(f"quantize.candidates: unknown kind '{kind}'")
