"""Quantize the student: torch dynamic int8 (CPU) and bitsandbytes int8 / NF4 for every task, for a
classifier ONNX Runtime fp32 and int8 (`llmops.ort`), for a decoder llama.cpp's GGUF f16, q8_0 and q4_K_M
(`llmops.gguf`), and OpenVINO int8 and int4 (`llmops.openvino_ir`).

Each candidate is written as a folder that `llmops.classification.candidate.Classifier` (or, for a
generator, `llmops.generation.candidate.Generator`) loads again, with its recipe in
`candidate.json`. The model class comes from the task recorded in the student's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import BitsAndBytesConfig

from llmops import gguf, openvino_ir, ort
from llmops.candidate_folder import (
    INT8_WEIGHTS,
    CandidateMeta,
    copy_without_weights,
    is_skipped,
    load_saved_tokenizer,
    quantize_dynamic_int8,
    save_hf_candidate,
)
from llmops.checkpoints import AUTO_CLASS
from llmops.classification.candidate import Classifier
from llmops.classification.evaluate import macro_f1_on, measure_throughput
from llmops.config import GGUF_QUANT_KINDS, ONNX_KINDS, OPENVINO_KINDS, QuantizeConfig
from llmops.prepared_data import PreparedData

log = logging.getLogger(__name__)

KIND_OF = {"fp32": "student"}
"""The candidate name of a `quantize.candidates` kind where it differs (the fp32 student is `student`)."""


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

    def within(self, value: float) -> bool:
        """Whether a validation macro-F1 of `value` loses at most `max_loss` against the fp32 student."""
        return self.reference_macro_f1 - value <= self.max_loss + 1e-12


def accuracy_aware_search(
    classifier: Classifier,
    layers: list[str],
    quantize_keeping: Callable[[list[str]], Any],
    validation: pd.DataFrame,
    cfg: QuantizeConfig,
) -> Search:
    """Quantize every layer of `layers`; while macro-F1 loses more than `cfg.max_loss` against the fp32
    `classifier`, return layers to fp32 one at a time, the most sensitive first (the layer whose return alone
    recovers the most), within `cfg.search_trials` validation passes.

    `quantize_keeping(kept)` builds the int8 model with the `kept` layers in fp32, for `classifier.model`: the same
    search serves torch's and ONNX Runtime's int8. The classifier gets its fp32 model back at the end.
    """
    assert cfg.max_loss is not None
    fp32 = classifier.model
    rows = validation.head(cfg.search_rows)
    search = Search(cfg.max_loss, reference_macro_f1=macro_f1_on(classifier, rows))

    def score(kept: list[str]) -> float:
        classifier.model = quantize_keeping(kept)
        value = macro_f1_on(classifier, rows)
        search.trials.append({"kept_fp32": list(kept), "macro_f1": value})
        return value

    def budget() -> bool:
        return len(search.trials) < cfg.search_trials

    try:
        best: tuple[float, list[str]] = (score([]), [])
        if search.within(best[0]):
            search.met = True
            return search
        recovered = {layer: score([layer]) for layer in layers if budget()}
        kept: list[str] = []
        for layer in sorted(recovered, key=recovered.__getitem__, reverse=True):
            if not budget():
                break
            kept.append(layer)
            value = score(kept)
            if value > best[0]:
                best = (value, list(kept))
            if search.within(value):
                search.met = True
                best = (value, list(kept))
                break
        search.kept_fp32 = best[1]
    finally:
        classifier.model = fp32
    log.info(
        "int8 search: %d layer(s) kept in fp32, validation macro-F1 %.4f vs fp32 %.4f (%s)",
        len(search.kept_fp32),
        best[0],
        search.reference_macro_f1,
        "within max_loss" if search.met else "budget spent",
    )
    return search


def _validation(data_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(PreparedData.load(data_dir).split_path("validation"))


def search_torch_int8(student_dir: Path, validation: pd.DataFrame, cfg: QuantizeConfig) -> Search:
    classifier = Classifier(student_dir)
    fp32 = classifier.model
    linear = [name for name, module in fp32.named_modules() if isinstance(module, torch.nn.Linear)]
    layers = [name for name in linear if not is_skipped(name, cfg.skip_modules)]
    skip = cfg.skip_modules

    def keeping(kept: list[str]) -> torch.nn.Module:
        return quantize_dynamic_int8(copy.deepcopy(fp32), cfg.int8_per_channel, skip + kept)

    return accuracy_aware_search(classifier, layers, keeping, validation, cfg)


def save_dynamic_int8(student_dir: Path, cfg: QuantizeConfig, out_dir: Path, data_dir: Path | None = None) -> Path:
    meta = CandidateMeta.load(student_dir)
    model = AUTO_CLASS[meta.task].from_pretrained(student_dir)
    skip = list(cfg.skip_modules)
    search = None
    if cfg.max_loss is not None and data_dir is not None and meta.task == "sequence-classification":
        search = search_torch_int8(student_dir, _validation(data_dir), cfg)
        skip += search.kept_fp32
    recipe = {
        "method": "torch.ao.quantization.quantize_dynamic",
        "dtype": "qint8",
        "per_channel": cfg.int8_per_channel,
        "skip_modules": skip,
        **({"search": dataclasses.asdict(search)} if search else {}),
    }
    quantized = quantize_dynamic_int8(model, cfg.int8_per_channel, skip)
    copy_without_weights(student_dir, out_dir)
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
    return save_hf_candidate(model, load_saved_tokenizer(student_dir), meta, out_dir)


def unavailable(student_dir: str | Path, kind: str) -> str | None:
    """Why `kind` cannot be built from this student (None: it can): a runtime that does not take its
    architecture. The lifecycle skips such a candidate with this note rather than fail the run."""
    if kind in GGUF_QUANT_KINDS:
        return gguf.unsupported(Path(student_dir))
    if kind in OPENVINO_KINDS:
        return openvino_ir.unsupported(Path(student_dir))
    return None


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
    if kind in ONNX_KINDS:
        return save_onnx(student_dir, kind, cfg, out_dir, Path(data_dir) if data_dir is not None else None)
    if kind in GGUF_QUANT_KINDS:
        return gguf.save_gguf(student_dir, kind, out_dir)
    if kind in OPENVINO_KINDS:
        return openvino_ir.save_openvino(student_dir, kind, out_dir)
    raise ValueError(f"quantize.candidates: unknown kind '{kind}'")


def save_onnx(student_dir: Path, kind: str, cfg: QuantizeConfig, out_dir: Path, data_dir: Path | None) -> Path:
    """The student exported to ONNX (`onnx-fp32`), or quantized by ONNX Runtime (`onnx-int8`, dynamic or static
    as `cfg.onnx_int8_mode` says, with the accuracy-aware search when `cfg.max_loss` is set and data is given)."""
    meta = CandidateMeta.load(student_dir)
    if meta.task != "sequence-classification":
        raise ValueError(f"quantize.candidates: {kind} is built for classifiers, not for a {meta.task} model")
    if kind == "onnx-int8" and cfg.onnx_int8_mode == "static" and data_dir is None:
        raise ValueError("quantize.onnx_int8_mode: static needs the training rows to calibrate on")
    copy_without_weights(student_dir, out_dir)
    model_file = out_dir / ort.ONNX_FILE
    inputs = ort.export(student_dir, model_file, cfg.onnx_opset)
    fp32_meta = dataclasses.replace(
        meta, kind="onnx-fp32", recipe={**meta.recipe, "quantization": ort.recipe(cfg.onnx_opset, inputs)}
    )
    fp32_meta.save(out_dir)
    if kind == "onnx-fp32":
        return out_dir
    with tempfile.TemporaryDirectory(prefix="llmops-onnx-") as scratch:
        quantization = _onnx_int8(out_dir, inputs, cfg, data_dir, Path(scratch))
        (Path(scratch) / "int8.onnx").replace(model_file)
    recipe = {**meta.recipe, "quantization": ort.recipe(cfg.onnx_opset, inputs, **quantization)}
    dataclasses.replace(meta, kind="onnx-int8", recipe=recipe).save(out_dir)
    return out_dir


def _onnx_int8(
    fp32_dir: Path, inputs: list[str], cfg: QuantizeConfig, data_dir: Path | None, scratch: Path
) -> dict[str, Any]:
    """Writes `scratch/int8.onnx` from the fp32 candidate in `fp32_dir` (graph inputs `inputs`); returns its
    quantization recipe."""
    source = fp32_dir / ort.ONNX_FILE
    nodes = ort.weight_matmuls(source)
    skip = lambda module: is_skipped(module, cfg.skip_modules)  # noqa: E731
    layers = list(dict.fromkeys(module for module in nodes.values() if not skip(module)))
    trial = scratch / "trial.onnx"

    def dynamic_keeping(kept: list[str]) -> ort.OnnxModel:
        ort.quantize_dynamic(source, trial, cfg.int8_per_channel, ort.nodes_to_quantize(nodes, kept, skip))
        return ort.OnnxModel(trial)

    classifier = Classifier(fp32_dir)
    validation = _validation(data_dir) if data_dir is not None else None
    search = None
    if cfg.max_loss is not None and validation is not None:
        search = accuracy_aware_search(classifier, layers, dynamic_keeping, validation, cfg)
    kept = search.kept_fp32 if search else []
    quantized = ort.nodes_to_quantize(nodes, kept, skip)
    recipe: dict[str, Any] = {
        "method": "onnxruntime.quantization",
        "weights": "int8",
        "per_channel": cfg.int8_per_channel,
        "kept_fp32": kept,
        "nodes_quantized": len(quantized),
        "nodes_fp32": len(nodes) - len(quantized),
        **({"search": dataclasses.asdict(search)} if search else {}),
    }
    dynamic_file, static_file = scratch / "dynamic.onnx", scratch / "static.onnx"
    if cfg.onnx_int8_mode != "static":
        ort.quantize_dynamic(source, dynamic_file, cfg.int8_per_channel, quantized)
    if cfg.onnx_int8_mode == "dynamic" or data_dir is None or validation is None:
        dynamic_file.replace(scratch / "int8.onnx")
        return {**recipe, "mode": "dynamic"}
    train = pd.read_parquet(PreparedData.load(data_dir).split_path("train"))["text"].head(cfg.calibration_rows)
    batches = ort.calibration_batches(train.tolist(), classifier.tokenizer, inputs, classifier.meta.max_length)
    ort.quantize_static(source, static_file, cfg.int8_per_channel, quantized, batches)
    recipe |= {"calibration_rows": len(train), "calibration": "minmax", "static_format": "QOperator (u8 activations)"}
    if cfg.onnx_int8_mode == "static":
        static_file.replace(scratch / "int8.onnx")
        return {**recipe, "mode": "static"}
    rows = validation.head(cfg.search_rows)
    measured = {}
    for mode, path in (("dynamic", dynamic_file), ("static", static_file)):
        classifier.model = ort.OnnxModel(path)
        measured[mode] = {
            "macro_f1": macro_f1_on(classifier, rows),
            "texts_per_s": measure_throughput(classifier, rows["text"].tolist(), 64),
        }
    static = measured["static"]
    # Without max_loss there is no search: speed alone decides.
    within = search is None or search.within(static["macro_f1"])
    wins = static["texts_per_s"] > measured["dynamic"]["texts_per_s"] and within
    mode = "static" if wins else "dynamic"
    (static_file if wins else dynamic_file).replace(scratch / "int8.onnx")
    log.info("onnx int8: %s kept (validation: %s)", mode, measured)
    return {**recipe, "mode": mode, "auto": measured}
