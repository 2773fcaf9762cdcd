"""The candidate contract: how a model is saved on disk and loaded back to predict.

A candidate folder holds `candidate.json` (task, kind, labels, recipe, parameter
counts), the tokenizer, the Hugging Face `config.json`, and its weights:
- teacher, student: `model.safetensors` (plain fp32 Hugging Face folder);
- bnb-int8, nf4: `model.safetensors` with the bitsandbytes quantization config;
- int8 (torch dynamic): `quantized_state_dict.pt`, a weights-only torch state
  dict, because safetensors cannot hold quantized tensors. It is rebuilt by
  applying the recorded recipe to the architecture and loading the weights;
- onnx-fp32, onnx-int8: `model.onnx`, run by ONNX Runtime (`llmops.ort`).
Both tasks write and read this layout: classifiers load through `llmops.classification.candidate`,
generators through `llmops.generation.candidate`.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmops.checkpoints import AUTO_CLASS

META_FILE = "candidate.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".onnx", ".gguf")
INT8_WEIGHTS = "quantized_state_dict.pt"
HISTORY_FILE = "training_log.json"
"""Trainer log history, written beside the candidate folder by fine-tuning and distillation."""


@dataclass(frozen=True)
class CandidateMeta:
    kind: str
    labels: list[str]
    """Class labels in output order (empty for a generator)."""
    max_length: int
    recipe: dict[str, Any] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    task: str = "sequence-classification"

    def save(self, directory: Path) -> None:
        (directory / META_FILE).write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> CandidateMeta:
        return cls(**json.loads((Path(directory) / META_FILE).read_text()))


def save_hf_candidate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, meta: CandidateMeta, directory: str | Path
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    meta.save(directory)
    return directory


def is_skipped(name: str, skip_modules: list[str]) -> bool:
    return name in skip_modules or bool(set(name.split(".")) & set(skip_modules))


def quantize_dynamic_int8(model: torch.nn.Module, per_channel: bool, skip_modules: list[str]) -> torch.nn.Module:
    """torch dynamic int8 on every Linear layer except those under a module named in `skip_modules`.

    A name matches any component of a module's dotted path (`pooler` keeps `bert.pooler.dense`) or the whole
    path (`bert.encoder.layer.1.output.dense`, as the accuracy-aware search names the layers it keeps).
    """
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {
        name: qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not is_skipped(name, skip_modules)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchao migration notice, printed on every call
        return quantize_dynamic(model.eval(), qconfig_spec=spec, dtype=torch.qint8)


def load_int8(directory: Path, meta: CandidateMeta) -> Any:
    """A torch dynamic-int8 candidate: the architecture of its task from config.json, quantized by the recorded
    recipe, then the int8 weights loaded into it."""
    config = AutoConfig.from_pretrained(directory)
    model = AUTO_CLASS[meta.task].from_config(config)
    recipe = meta.recipe["quantization"]
    quantized = quantize_dynamic_int8(model, recipe["per_channel"], recipe["skip_modules"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation inside torch's quantized unpickling
        quantized.load_state_dict(torch.load(directory / INT8_WEIGHTS, weights_only=True))
    return quantized


def saved_tokenizer_class(directory: str | Path) -> type[PreTrainedTokenizerBase] | None:
    """The tokenizer class a model folder declares (`tokenizer_config.json`), None where it declares none."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    declared_in = Path(directory) / "tokenizer_config.json"
    declared = json.loads(declared_in.read_text()).get("tokenizer_class") if declared_in.is_file() else None
    return tokenizer_class_from_name(declared) if declared else None


def load_saved_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer a model folder was saved with, loaded as the class it was saved as.

    `AutoTokenizer` alone is not that: for some architectures (Qwen2, Phi-3 and others, transformers 5's
    `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`) it replaces the class the folder declares with the
    architecture's own, which re-reads a foreign vocabulary (the packaged WordPiece one under a random-init Qwen2)
    as byte-level BPE and spells every word letter by letter. llmops's folders are written by `save_pretrained`
    from the tokenizer the run trained with, so the declared class is the right one; a folder that declares none
    loads as `AutoTokenizer` decides."""
    return (saved_tokenizer_class(directory) or AutoTokenizer).from_pretrained(directory)


def open_candidate(directory: str | Path) -> tuple[Path, CandidateMeta, PreTrainedTokenizerBase]:
    """What every task's loader reads first: the folder, its `candidate.json` and its tokenizer."""
    path = Path(directory)
    return path, CandidateMeta.load(path), load_saved_tokenizer(path)


def load_torch_model(directory: Path, meta: CandidateMeta) -> tuple[Any, torch.device]:
    """A candidate's torch model in eval mode, and the device it runs on: torch int8 rebuilt from its recipe (on
    CPU); bitsandbytes folders (their quantization config is in config.json) on the GPU when there is one, else
    on CPU; plain folders as saved."""
    if meta.kind == "int8":
        return load_int8(directory, meta).eval(), torch.device("cpu")
    quantized = meta.kind in ("bnb-int8", "nf4")
    if quantized:
        quiet_bitsandbytes()
    device_map = ("cuda" if torch.cuda.is_available() else "cpu") if quantized else None
    model = AUTO_CLASS[meta.task].from_pretrained(directory, device_map=device_map).eval()
    return model, next(iter(model.parameters())).device


def architecture_refusal(model_dir: Path, runtime: str, accepted: tuple[str, ...]) -> str | None:
    """Why the model in `model_dir` cannot become a `runtime` candidate, from its config alone (None: it can)."""
    config = json.loads((model_dir / "config.json").read_text())
    architecture = (config.get("architectures") or ["(none named)"])[0]
    if architecture not in accepted:
        return f"{runtime} candidates take {', '.join(accepted)}; this model is a {architecture}"
    return None


def weights_size_mb(directory: str | Path) -> float:
    """Size on disk of the weight files alone (tokenizer and config excluded)."""
    files = [p for p in Path(directory).iterdir() if p.suffix in WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files) / 2**20


def copy_without_weights(src: Path, dst: Path) -> None:
    """A candidate folder's tokenizer, config and candidate.json, for a candidate with other weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            shutil.copy2(path, dst / path.name)


def _drop_cast_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes logs a warning on every int8 matmul that it casts fp32 inputs to fp16: it says nothing new.
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def quiet_bitsandbytes() -> None:
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_cast_notice)
