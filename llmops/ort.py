"""ONNX Runtime candidates of a classifier: export to ONNX, quantize with ONNX Runtime's own tooling, run.

An ONNX candidate folder is a candidate folder (tokenizer, `config.json`, `candidate.json`) whose weights are one
`model.onnx`. The graph has two outputs: the logits and the classification head's input, so the prediction log
gets its embeddings from the same pass, as it does from a torch candidate's forward hook.

- `onnx-fp32`: the student exported by `torch.onnx.export` (TorchScript exporter, eager attention), run as it is;
  ONNX Runtime applies its own graph optimizations when the session starts.
- `onnx-int8`: ONNX Runtime's dynamic int8 (`quantize_dynamic`, int8 weights per channel) or static int8
  (`quantize_static`, activations calibrated on training rows), with the accuracy-aware search of
  `llmops.quantize`: the MatMuls of the layers it returns to fp32 are left out of quantization.

Measured on this project's 2-core AMD EPYC (AVX-512 VNNI), the student at batch 64: ONNX Runtime's transformer
fusions (`onnxruntime.transformers.optimizer`) were no faster than the session's own optimizations, and static
int8 was slower than dynamic (QDQ 0.46x, QOperator 0.8x): so neither is the default, and `onnx_int8_mode: auto`
keeps static only where it measures faster.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from llmops.candidate_folder import load_saved_tokenizer

ONNX_FILE = "model.onnx"
OUTPUTS = ["logits", "embeddings"]
PROVIDER = "CPUExecutionProvider"


class OnnxLoadError(RuntimeError):
    """An ONNX candidate whose model file is missing or unreadable."""


class _LogitsAndEmbeddings(torch.nn.Module):
    """What is exported: the classifier's logits and its head's input (the first token where the head pools)."""

    def __init__(self, model: torch.nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self._caught: list[torch.Tensor] = []
        head: torch.nn.Module = model.classifier  # type: ignore[assignment]
        head.register_forward_pre_hook(lambda module, args: self._caught.append(args[0]))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._caught.clear()
        logits = self.model(**dict(zip(self.input_names, inputs, strict=True))).logits
        features = self._caught[-1]
        return logits, features[:, 0] if features.dim() == 3 else features


def export(model_dir: Path, out_file: Path, opset: int) -> list[str]:
    """Export the classifier in `model_dir` to `out_file`; returns the graph's input names."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokenizer = load_saved_tokenizer(model_dir)
    if not isinstance(getattr(model, "classifier", None), torch.nn.Module):
        raise TypeError(f"{type(model).__name__} has no `classifier` head: it cannot be exported with its embeddings")
    example = tokenizer(["an example to trace", "two"], padding=True, return_tensors="pt")
    names = [name for name in tokenizer.model_input_names if name in example]
    dynamic = {name: {0: "batch", 1: "tokens"} for name in names} | {name: {0: "batch"} for name in OUTPUTS}
    # The tracer warns where transformers' mask code branches on shapes: the branches taken hold for every input
    # length (checked: the exported graph scores the test split exactly as the torch model does).
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LogitsAndEmbeddings(model, names),
            tuple(example[name] for name in names),
            str(out_file),
            input_names=names,
            output_names=OUTPUTS,
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    return names


class OnnxModel:
    """An ONNX Runtime session over a candidate's graph: tokenizer output in, (logits, embeddings) out."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        if not path.is_file():
            raise OnnxLoadError(f"ONNX candidate {path.parent}: {path.name} is missing")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # what the evaluation and serving set for torch
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[PROVIDER])
        except Exception as error:  # ORT raises its own Fail / InvalidProtobuf / InvalidGraph
            raise OnnxLoadError(f"ONNX candidate {path.parent}: {path.name} cannot be loaded: {error}") from error
        self.input_names = [node.name for node in self.session.get_inputs()]

    def __call__(self, encoded: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        feed = {name: np.asarray(encoded[name], dtype=np.int64) for name in self.input_names}
        logits, embeddings = self.session.run(OUTPUTS, feed)
        return logits, embeddings


def module_of(node_name: str) -> str:
    """The torch module an exported node came from: `/model/bert/encoder/layer.0/output/dense/MatMul` ->
    `bert.encoder.layer.0.output.dense` (the names `quantize.skip_modules` and the search use)."""
    parts = node_name.strip("/").split("/")[:-1]
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts)


def weight_matmuls(path: Path) -> dict[str, str]:
    """The nodes int8 quantizes (MatMul / Gemm by a weight), by name, with the module each came from."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return {
        node.name: module_of(node.name)
        for node in graph.node
        if node.op_type in ("MatMul", "Gemm") and any(name in weights for name in node.input)
    }


def nodes_to_quantize(nodes: dict[str, str], kept_fp32: list[str], skip: Callable[[str], bool]) -> list[str]:
    """The weight MatMuls int8 takes: all but those of kept or skipped modules. Named explicitly, so that ONNX
    Runtime leaves the attention's activation-by-activation MatMuls in fp32 too, as torch's int8 does."""
    return [node for node, module in nodes.items() if module not in kept_fp32 and not skip(module)]


@contextmanager
def quiet_quantization_logs() -> Iterator[None]:
    """ONNX Runtime's quantization tools log every node they skip at INFO, and advice at WARNING, on the root logger."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def quantize_dynamic(src: Path, dst: Path, per_channel: bool, nodes: list[str]) -> None:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    if not nodes:  # ONNX Runtime reads an empty list as "every node"
        shutil.copyfile(src, dst)
        return
    with quiet_quantization_logs():
        ort_quantize_dynamic(
            src,
            dst,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            op_types_to_quantize=["MatMul", "Gemm"],  # not the embeddings' Gather: as torch int8, the Linear layers
            nodes_to_quantize=nodes,
            extra_options={"DefaultTensorType": 1},  # float: the exported graph leaves some shapes to run time
        )


def quantize_static(
    src: Path, dst: Path, per_channel: bool, nodes: list[str], calibration: list[dict[str, np.ndarray]]
) -> None:
    """Static int8 in ONNX Runtime's operator format (uint8 activations, int8 weights), ranges calibrated by
    min/max over the calibration batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    if not nodes:
        shutil.copyfile(src, dst)
        return

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, np.ndarray]] = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with quiet_quantization_logs():
        ort_quantize_static(
            src,
            dst,
            Batches(),
            quant_format=QuantFormat.QOperator,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=nodes,
            extra_options={"DefaultTensorType": 1},
        )


def calibration_batches(
    texts: list[str], tokenizer: Any, input_names: list[str], max_length: int, batch_size: int = 32
) -> list[dict[str, np.ndarray]]:
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="np"
        )
        batches.append({name: encoded[name].astype(np.int64) for name in input_names})
    return batches


def recipe(opset: int, input_names: list[str], **quantization: Any) -> dict[str, Any]:
    """What an ONNX candidate was built with, recorded in its candidate.json and on its MLflow run."""
    import onnx
    import onnxruntime as ort

    return {
        "format": "onnx",
        "exporter": "torch.onnx.export (TorchScript, eager attention)",
        "opset": opset,
        "inputs": input_names,
        "outputs": OUTPUTS,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "execution_provider": PROVIDER,
        "torch": installed_version("torch"),
        **quantization,
    }
