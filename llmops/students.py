"""Student building, for every task: a copy of the teacher that keeps a subset of its layers (DistilBERT-style
initialisation: embeddings, the chosen layers and the head copied from the teacher), each feed-forward block
pruned to a share of its neurons. This is also the structured-pruning step: whole layers and neurons go.
Encoder-only, decoder-only and encoder-decoder models alike (`layer_stacks`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from llmops.candidate_folder import CandidateMeta, load_saved_tokenizer
from llmops.checkpoints import AUTO_CLASS


def layer_stacks(model: PreTrainedModel) -> list[torch.nn.ModuleList]:
    """The model's stacks of transformer blocks: one for encoder-only and decoder-only models (`encoder.layer` in
    BERT, `model.layers` in Llama, `transformer.h` in GPT-2), two for T5 (`encoder.block`, `decoder.block`)."""
    n_layers = model.config.num_hidden_layers
    stacks: dict[str, torch.nn.ModuleList] = {}
    for name, module in model.named_modules():
        inside_a_stack = any(name.startswith(outer + ".") for outer in stacks)
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and not inside_a_stack:
            stacks[name] = module
    if not stacks:
        raise ValueError(f"cannot find the {n_layers} transformer layers of {type(model).__name__}")
    return list(stacks.values())


FFN_LAYOUTS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("intermediate.dense",), "output.dense", "intermediate_size"),  # BERT family
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size"),  # Llama, Qwen, Mistral
)
"""Feed-forward blocks prunable by `prune_ffn`: the input projections, the output projection, the config key."""


def _ffn_layout(block: torch.nn.Module) -> tuple[list[torch.nn.Linear], torch.nn.Linear, str]:
    names = dict(block.named_modules())
    for inputs, output, key in FFN_LAYOUTS:
        if all(name in names for name in (*inputs, output)):
            return [names[n] for n in inputs], names[output], key  # type: ignore[return-value]
    raise ValueError(f"distill.ffn_keep: cannot prune the feed-forward block of {type(block).__name__}")


def _keep_rows(linear: torch.nn.Linear, index: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[index].clone())
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[index].clone())
    linear.out_features = len(index)


def _keep_columns(linear: torch.nn.Linear, index: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[:, index].clone())
    linear.in_features = len(index)


DEFAULT_FFN_KEEP = 0.96
"""`distill.ffn_keep` left unset, for blocks `prune_ffn` knows (see `resolve_ffn_keep`)."""


def resolve_ffn_keep(teacher: PreTrainedModel, keep: float | None) -> float:
    """`distill.ffn_keep` as given; unset: `DEFAULT_FFN_KEEP` where every block is one `prune_ffn` knows, else 1.0."""
    if keep is not None:
        return keep
    try:
        for blocks in layer_stacks(teacher):
            for block in blocks:
                _ffn_layout(block)
    except ValueError:
        return 1.0
    return DEFAULT_FFN_KEEP


def pruned_width(width: int, keep: float) -> int:
    """`keep` of `width`, rounded to a multiple of 64 (32 for narrow blocks): int8 and 4-bit CPU kernels work in
    blocks of 64 columns and slow down on other widths; bitsandbytes' CPU NF4 kernel fails unless the width is a
    multiple of 32."""
    multiple = 64 if width >= 256 else 32
    return min(width, max(multiple, round(width * keep / multiple) * multiple))


def prune_ffn(model: PreTrainedModel, keep: float) -> PreTrainedModel:
    """Structured pruning of every feed-forward block to about `keep` of its hidden neurons, in place.

    A neuron's importance is the product of its weight norms in and out (||W_in[j, :]|| * ||W_out[:, j]||):
    neurons that read little or write little are dropped, whole, so the block is a smaller dense block.
    """
    if keep >= 1.0:
        return model
    key, kept = None, 0
    for blocks in layer_stacks(model):
        for block in blocks:
            inputs, output, key = _ffn_layout(block)
            kept = pruned_width(output.in_features, keep)
            importance = output.weight.data.norm(dim=0)
            for linear in inputs:
                importance = importance * linear.weight.data.norm(dim=1)
            index = importance.topk(kept).indices.sort().values
            for linear in inputs:
                _keep_rows(linear, index)
            _keep_columns(output, index)
    if key is not None:
        setattr(model.config, key, kept)
    return model


def build_student(teacher: PreTrainedModel, layers: list[int], ffn_keep: float = 1.0) -> PreTrainedModel:
    """A copy of the teacher that keeps only `layers` (teacher indices, in order), in every stack it has, each
    with `ffn_keep` of its feed-forward neurons."""
    n_teacher = teacher.config.num_hidden_layers
    if max(layers) >= n_teacher:
        raise ValueError(f"distill.student_layers {layers}: the teacher has only {n_teacher} layers")
    if getattr(teacher.config, "relative_attention_num_buckets", None) and layers[0] != 0:
        raise ValueError(f"distill.student_layers {layers}: T5-style models keep their position bias in layer 0")
    student = copy.deepcopy(teacher)
    for blocks in layer_stacks(student):
        kept = [blocks[i] for i in layers]
        blocks.__init__(kept)  # type: ignore[misc]  # refill the same ModuleList in place
        for new_index, block in enumerate(kept):  # the key/value cache is indexed by position in the stack
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index  # type: ignore[assignment]
    config = student.config
    config.num_hidden_layers = len(layers)
    if getattr(config, "num_decoder_layers", None) is not None:
        config.num_decoder_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    return prune_ffn(student, ffn_keep)


@dataclass(frozen=True)
class TeacherAndStudent:
    """A teacher candidate loaded, and the student built from it (distillation starts here, for every task)."""

    meta: CandidateMeta
    """the teacher's"""
    tokenizer: Any
    teacher: Any
    """a `PreTrainedModel` of the task's auto class, in eval mode"""
    student: Any
    ffn_keep: float
    """the share of feed-forward neurons the student kept (`distill.ffn_keep`, resolved)"""


def teacher_and_student(teacher_dir: str | Path, layers: list[int], ffn_keep: float | None) -> TeacherAndStudent:
    """Load the teacher candidate at `teacher_dir` and build its student (`build_student`)."""
    meta = CandidateMeta.load(teacher_dir)
    teacher = AUTO_CLASS[meta.task].from_pretrained(teacher_dir).eval()
    keep = resolve_ffn_keep(teacher, ffn_keep)
    student = build_student(teacher, layers, keep)
    return TeacherAndStudent(meta, load_saved_tokenizer(teacher_dir), teacher, student, keep)
