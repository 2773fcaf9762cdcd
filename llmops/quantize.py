"""Quantize the student: torch dynamic int8 (CPU) and bitsandbytes int8 / NF4, for every task.

Each candidate is written as a folder that `llmops.candidate.Classifier` (or, for a
generator, `llmops.generation.candidate.Generator`) loads again, with its recipe in
`candidate.json`. The model class comes from the task recorded in the student's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoTokenizer, BitsAndBytesConfig

from llmops.candidate import (
    INT8_WEIGHTS,
    CandidateMeta,
    Classifier,
    is_skipped,
    quantize_dynamic_int8,
    save_hf_candidate,
)
from llmops.config import QuantizeConfig
from llmops.data import PreparedData
from llmops.evaluate import macro_f1_on
from llmops.modeling import AUTO_CLASS

log = logging.getLogger(__name__)

KIND_OF = {"fp32": "student", "int8": "int8", "bnb-int8": "bnb-int8", "nf4": "nf4"}


def _copy_non_weights(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix not in (".safetensors", ".bin", ".pt"):
            shutil.copy2(path, dst / path.name)


@dataclass
class Search:
    """Accuracy-aware int8: which Linear layers stay fp32 so that validation macro-F1 loses at most `max_loss`."""

    max_loss: float
    reference_macro_f1: float = 0.0
    """The fp32 student's."""
    trials: list[dict] = field(default_factory=list)
    """Every validation pass: the layers kept in fp32 and the macro-F1 it scored."""
    kept_fp32: list[str] = field(default_factory=list)
    met: bool = False
    """Whether the result is within `max_loss` (else the budget ran out: the best tried is used)."""


def accuracy_aware_search(student_dir: Path, validation: pd.DataFrame, cfg: QuantizeConfig) -> Search:
    """Quantize every Linear layer; while macro-F1 loses more than `cfg.max_loss` against fp32, return layers to fp32
    one at a time, the most sensitive first (the layer whose return alone recovers the most), within
    `cfg.search_trials` validation passes."""
    assert cfg.max_loss is not None
    max_loss = cfg.max_loss
    classifier = Classifier(student_dir)
    fp32 = classifier.model
    rows = validation.head(cfg.search_rows)
    search = Search(cfg.max_loss, reference_macro_f1=macro_f1_on(classifier, rows))

    def score(kept: list[str]) -> float:
        classifier.model = quantize_dynamic_int8(copy.deepcopy(fp32), cfg.int8_per_channel, cfg.skip_modules + kept)
        value = macro_f1_on(classifier, rows)
        search.trials.append({"kept_fp32": list(kept), "macro_f1": value})
        return value

    def within(value: float) -> bool:
        return search.reference_macro_f1 - value <= max_loss + 1e-12

    best: tuple[float, list[str]] = (score([]), [])
    if within(best[0]):
        search.met = True
        return search
    linear = [name for name, module in fp32.named_modules() if isinstance(module, torch.nn.Linear)]
    layers = [name for name in linear if not is_skipped(name, cfg.skip_modules)]

    def budget() -> bool:
        return len(search.trials) < cfg.search_trials

    recovered = {layer: score([layer]) for layer in layers if budget()}
    kept: list[str] = []
    for layer in sorted(recovered, key=recovered.__getitem__, reverse=True):
        if not budget():
            break
        kept.append(layer)
        value = score(kept)
        if value > best[0]:
            best = (value, list(kept))
        if within(value):
            search.met = True
            best = (value, list(kept))
            break
    search.kept_fp32 = best[1]
    log.info(
        "int8 search: %d layer(s) kept in fp32, validation macro-F1 %.4f vs fp32 %.4f (%s)",
        len(search.kept_fp32),
        best[0],
        search.reference_macro_f1,
        "within max_loss" if search.met else "budget spent",
    )
    return search


def save_dynamic_int8(student_dir: Path, cfg: QuantizeConfig, out_dir: Path, data_dir: Path | None = None) -> Path:
    meta = CandidateMeta.load(student_dir)
    model = AUTO_CLASS[meta.task].from_pretrained(student_dir)
    skip = list(cfg.skip_modules)
    search = None
    if cfg.max_loss is not None and data_dir is not None and meta.task == "sequence-classification":
        validation = pd.read_parquet(PreparedData.load(data_dir).split_path("validation"))
        search = accuracy_aware_search(student_dir, validation, cfg)
        skip += search.kept_fp32
    recipe = {
        "method": "torch.ao.quantization.quantize_dynamic",
        "dtype": "qint8",
        "per_channel": cfg.int8_per_channel,
        "skip_modules": skip,
        **({"search": dataclasses.asdict(search)} if search else {}),
    }
    quantized = quantize_dynamic_int8(model, cfg.int8_per_channel, skip)
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


def quantize_candidate(
    student_dir: str | Path, kind: str, cfg: QuantizeConfig, out_dir: str | Path, data_dir: str | Path | None = None
) -> Path:
    """Build one compressed candidate (`fp32` is the student itself) under `out_dir`. `data_dir`: the prepared
    data whose validation split the accuracy-aware int8 search scores on (without it, int8 quantizes every layer
    outside `skip_modules`)."""
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    if kind == "fp32":
        return student_dir
    if kind == "int8":
        return save_dynamic_int8(student_dir, cfg, out_dir, Path(data_dir) if data_dir is not None else None)
    if kind in ("bnb-int8", "nf4"):
        return save_bitsandbytes(student_dir, kind, cfg, out_dir)
    raise ValueError(f"quantize.candidates: unknown kind '{kind}'")
