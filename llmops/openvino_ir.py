"""OpenVINO candidates: a decoder exported to OpenVINO's IR and its weights compressed by NNCF.

optimum-intel, the usual exporter, does not install against this stack (its releases pin transformers and
huggingface-hub below the versions llmops runs, and pull torchvision), so the export is llmops' own and small:
`openvino.convert_model` traces the model behind a wrapper whose inputs are the token ids, the attention mask,
the position ids, the key/value cache of every layer and the positions whose logits are wanted, and whose
outputs are those logits, the output layer's input there (the prompt embedding monitoring logs) and the grown
cache. The cache stays explicit in the IR; `llmops.generation.openvino` keeps it between steps inside
OpenVINO's own request state (the stateful form optimum-intel makes), so a step passes no cache between
Python and OpenVINO.
`nncf.compress_weights` then compresses every weight to int8 (asymmetric, per channel) or 4 bits (symmetric,
groups of 128, the embeddings and output layer in int8: NNCF's defaults); activations stay float32.

A folder holds `openvino_model.xml` / `.bin` beside the student's config and tokenizer, and a `candidate.json`
whose recipe names OpenVINO's and NNCF's versions and the compression.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from llmops.candidate_folder import CandidateMeta, architecture_refusal, copy_without_weights, load_torch_model
from llmops.config import OPENVINO_KINDS

MODEL_FILE = "openvino_model.xml"
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")
"""Decoders whose export is tested here (the wrapper needs a transformers decoder with a `DynamicCache`)."""
INPUTS = ("input_ids", "attention_mask", "position_ids", "logits_index")
GROUP_SIZE = 128


def unsupported(model_dir: Path) -> str | None:
    """Why the model in `model_dir` cannot become an OpenVINO candidate (None: it can)."""
    return architecture_refusal(model_dir, "OpenVINO", ARCHITECTURES)


class _Exportable(torch.nn.Module):
    """The decoder with its cache as plain tensors, the form `openvino.convert_model` traces."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model
        self.layers = model.config.get_text_config().num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, logits_index, *past):  # type: ignore[no-untyped-def]
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for number, layer in enumerate(cache.layers):  # set, not `update`: an empty start would be traced
            layer.dtype, layer.device = past[0].dtype, past[0].device
            layer.keys, layer.values, layer.is_initialized = past[2 * number], past[2 * number + 1], True
        out = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state[:, logits_index, :]
        grown = [tensor for layer in out.past_key_values.layers for tensor in (layer.keys, layer.values)]
        return (self.model.get_output_embeddings()(hidden), hidden, *grown)


def cache_shape(config: Any) -> tuple[int, int]:
    """(key/value heads, head width) of each layer's cache."""
    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return heads, getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def export(model: Any) -> Any:
    """The decoder as an `openvino.Model` with named inputs (`INPUTS`, then `past.N.key` / `past.N.value`) and
    outputs (`logits`, `hidden`, `present.N.key` / `present.N.value`)."""
    import openvino as ov

    model.config._attn_implementation = "eager"  # an additive mask: a row of left padding gives no NaN
    wrapper = _Exportable(model).eval()
    heads, width = cache_shape(model.config)
    batch, past, new = 2, 3, 4
    example = [
        torch.ones(batch, new, dtype=torch.long),
        torch.ones(batch, past + new, dtype=torch.long),
        torch.arange(past, past + new).repeat(batch, 1),
        torch.tensor([new - 1]),
        *[torch.zeros(batch, heads, past, width) for _ in range(2 * wrapper.layers)],
    ]
    with torch.no_grad(), warnings.catch_warnings():
        # shape checks of transformers' cache and mask code, fixed at trace time for every shape llmops feeds
        # (left-padded prefill, one-token steps, an empty cache: tests/integration/test_openvino.py runs each)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        converted = ov.convert_model(wrapper, example_input=tuple(example))
    caches = [f"{number}.{part}" for number in range(wrapper.layers) for part in ("key", "value")]
    for port, name in zip(converted.inputs, [*INPUTS, *(f"past.{c}" for c in caches)], strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(converted.outputs, ["logits", "hidden", *(f"present.{c}" for c in caches)], strict=True):
        port.get_tensor().set_names({name})
    return converted


def decline_telemetry() -> None:
    """OpenVINO's converter and NNCF send usage statistics unless the user opted out in a file under their home;
    llmops sends nothing: every consent check answers "declined", and no file is written."""
    from openvino_telemetry.utils import opt_in_checker

    opt_in_checker.OptInChecker.check = lambda *_, **__: opt_in_checker.ConsentCheckResult.DECLINED  # type: ignore[method-assign]


def compression(kind: str) -> dict[str, Any]:
    """NNCF's `compress_weights` arguments for `kind`. int4 groups `GROUP_SIZE` weights per scale; a layer
    narrower than that (a toy model's) gets the largest group that divides it."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    if kind == "openvino-int8":
        return {"mode": nncf.CompressWeightsMode.INT8_ASYM}
    adjust = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)
    return {
        "mode": nncf.CompressWeightsMode.INT4_SYM,
        "group_size": GROUP_SIZE,
        "ratio": 1.0,
        "advanced_parameters": adjust,
    }


def save_openvino(student_dir: Path, kind: str, out_dir: Path) -> Path:
    """The student as an OpenVINO candidate folder of `kind` (`openvino-int8`, `openvino-int4`)."""
    import nncf
    import openvino as ov
    from nncf.common.logging import nncf_logger as nncf_log

    if kind not in OPENVINO_KINDS:
        raise ValueError(f"quantize.candidates: unknown OpenVINO kind '{kind}' (known: {', '.join(OPENVINO_KINDS)})")
    meta = CandidateMeta.load(student_dir)
    reason = unsupported(student_dir)
    if reason is not None:
        raise ValueError(f"quantize.candidates: {kind}: {reason}")
    decline_telemetry()
    nncf_log.setLevel(logging.WARNING)  # its per-layer tables and progress bars, on every build
    model, _ = load_torch_model(student_dir, meta)
    arguments = compression(kind)
    compressed = nncf.compress_weights(export(model), **arguments)
    copy_without_weights(student_dir, out_dir)
    ov.save_model(compressed, out_dir / MODEL_FILE, compress_to_fp16=False)
    quantization: dict[str, Any] = {
        "runtime": "openvino",
        "openvino": ov.__version__.split("-")[0],
        "nncf": nncf.__version__,
        "exporter": "openvino.convert_model (llmops.openvino_ir), eager attention, explicit key/value cache",
        "weights": arguments["mode"].value,
        **{key: arguments[key] for key in ("group_size", "ratio") if key in arguments},
        "source": str(student_dir),
    }
    dataclasses.replace(meta, kind=kind, recipe={**meta.recipe, "quantization": quantization}).save(out_dir)
    return out_dir
