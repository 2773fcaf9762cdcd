"""Distil the teacher into a student built from a subset of its layers.

Building the student this way (DistilBERT-style initialisation: embeddings,
chosen layers, pooler and head copied from the teacher) is also the
structured-pruning step: whole layers are removed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PreTrainedModel,
    Trainer,
)

from llmops.candidate import HISTORY_FILE, CandidateMeta, save_hf_candidate
from llmops.config import DistillConfig
from llmops.data import PreparedData
from llmops.modeling import count_parameters
from llmops.train import compute_metrics_fn, drop_checkpoints, tokenize_split, training_arguments, use_all_cores

UNLABELLED = -100


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T).

    student_logits, teacher_logits: (batch, classes); labels: (batch,) class ids,
    -100 for transfer-set rows that have no label (they count in the KL term only).
    The KL term compares the temperature-softened distributions (Hinton et al.,
    2015); T^2 keeps its gradients on the scale of the hard-label term.
    Returns a scalar.
    """
    labelled = labels != UNLABELLED
    hard = F.cross_entropy(student_logits[labelled], labels[labelled]) if labelled.any() else student_logits.sum() * 0
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * hard + (1.0 - alpha) * temperature**2 * soft


def hidden_state_loss(
    student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...], attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean (1 - cosine similarity) between paired hidden states over real tokens.

    Each element: (batch, seq, hidden); the pairs are already aligned (student
    layer i with the teacher layer it was copied from). attention_mask: (batch, seq).
    Returns a scalar; zero when the hidden states are equal.
    """
    mask = attention_mask.bool()
    losses = [
        1.0 - F.cosine_similarity(s[mask], t[mask], dim=-1).mean()
        for s, t in zip(student_hidden, teacher_hidden, strict=True)
    ]
    return torch.stack(losses).mean()


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


class DistillationTrainer(Trainer):
    """Trainer whose loss reads the teacher's logits from the batch (cached once, before training)."""

    def __init__(
        self,
        *args: Any,
        alpha: float,
        temperature: float,
        hidden_weight: float = 0.0,
        teacher: PreTrainedModel | None = None,
        layer_map: list[int] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        self.teacher, self.layer_map = teacher, layer_map

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        inputs = dict(inputs)  # Trainer.prediction_step reads the labels back from the original
        teacher_logits = inputs.pop("teacher_logits")
        labels = inputs.pop("labels")
        outputs = model(**inputs, output_hidden_states=self.hidden_weight > 0)
        loss = distillation_loss(outputs.logits, teacher_logits, labels, self.alpha, self.temperature)
        if self.hidden_weight > 0 and model.training:
            with torch.no_grad():
                teacher_hidden = self.teacher(**inputs, output_hidden_states=True).hidden_states  # type: ignore[misc]
            # hidden_states[0] is the embedding output; layer i's output is hidden_states[i + 1]
            paired = tuple(teacher_hidden[i + 1] for i in self.layer_map or [])
            loss = loss + self.hidden_weight * hidden_state_loss(
                outputs.hidden_states[1:], paired, inputs["attention_mask"]
            )
        return (loss, outputs) if return_outputs else loss


@torch.inference_mode()
def teacher_logits(
    teacher: PreTrainedModel, dataset: datasets.Dataset, collator: DataCollatorWithPadding, batch_size: int = 128
) -> list[list[float]]:
    """The teacher's logits for every row, computed once: its forward pass costs as much as a student step. Rows go
    through in order of length (less padding), the logits come back in the dataset's order."""
    teacher.eval()
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(dataset)), key=lengths.__getitem__)
    rows: list[list[float]] = [[] for _ in order]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collator([dataset[i] for i in chunk])
        batch.pop("labels")
        for i, logits in zip(chunk, teacher(**batch).logits.float().tolist(), strict=True):
            rows[i] = logits
    return rows


def transfer_indices(pool_rows: int, transfer_rows: int) -> list[int]:
    """The rows of the unlabelled split (`pool_rows` of them) that the transfer set takes, in its order: the first
    `transfer_rows` of a seeded shuffle. The rest no model has seen: the compression benchmark scores on them."""
    return np.random.default_rng(0).permutation(pool_rows)[:transfer_rows].tolist()  # = Dataset.shuffle(seed=0)


def transfer_set(data: PreparedData, tokenizer: Any, max_length: int, cfg: DistillConfig) -> datasets.Dataset:
    """Up to `cfg.transfer_rows` unlabelled texts, tokenized, with label -100 (soft targets only)."""
    pool = tokenize_split(data.split_path("unlabeled"), tokenizer, max_length)
    return pool.select(transfer_indices(len(pool), cfg.transfer_rows)).map(_unlabel, batched=True)


def _unlabel(batch: dict[str, list[Any]]) -> dict[str, list[int]]:
    return {"labels": [UNLABELLED] * len(batch["labels"])}


def distil(cfg: DistillConfig, teacher_dir: str | Path, data: PreparedData, out_dir: str | Path) -> Path:
    """Distil the teacher candidate at `teacher_dir`; returns the student candidate folder."""
    use_all_cores()
    out_dir = Path(out_dir)
    teacher_meta = CandidateMeta.load(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    ffn_keep = resolve_ffn_keep(teacher, cfg.ffn_keep)
    student = build_student(teacher, cfg.student_layers, ffn_keep)
    collator = DataCollatorWithPadding(tokenizer)
    train = tokenize_split(data.split_path("train"), tokenizer, teacher_meta.max_length)
    if cfg.transfer_rows > 0 and data.split_path("unlabeled").is_file():
        train = datasets.concatenate_datasets([train, transfer_set(data, tokenizer, teacher_meta.max_length, cfg)])
    train = train.add_column("teacher_logits", teacher_logits(teacher, train, collator))
    validation = tokenize_split(data.split_path("validation"), tokenizer, teacher_meta.max_length)
    validation = validation.add_column("teacher_logits", teacher_logits(teacher, validation, collator))
    args = training_arguments(
        out_dir,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        train_rows=len(train),
        evals_per_epoch=2,
        mixed_precision=True,
        remove_unused_columns=False,
    )
    if cfg.hidden_weight > 0:
        teacher.to(args.device)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics_fn(len(data.labels)),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
        alpha=cfg.alpha,
        temperature=cfg.temperature,
        hidden_weight=cfg.hidden_weight,
        teacher=teacher if cfg.hidden_weight > 0 else None,
        layer_map=cfg.student_layers,
    )
    trainer.train()
    best = trainer.evaluate()
    (out_dir / HISTORY_FILE).write_text(json.dumps(trainer.state.log_history))
    meta = CandidateMeta(
        kind="student",
        labels=data.labels,
        max_length=teacher_meta.max_length,
        recipe={
            "teacher_layers": cfg.student_layers,
            "ffn_keep": ffn_keep,
            "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "hidden_weight": cfg.hidden_weight,
            "transfer_rows": cfg.transfer_rows,
            "validation_macro_f1": best["eval_macro_f1"],
        },
        params=count_parameters(student),
    )
    save_hf_candidate(student, tokenizer, meta, out_dir / "model")  # best checkpoint, loaded in place
    drop_checkpoints(out_dir)
    return out_dir / "model"
