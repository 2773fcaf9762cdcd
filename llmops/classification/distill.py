"""Distil the classifier teacher into a student built from a subset of its layers (`llmops.students`): the
student learns the teacher's temperature-softened class distribution and the labels, optionally its hidden
states, on the training rows and an unlabelled transfer set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PreTrainedModel,
    Trainer,
)

from llmops.candidate_folder import CandidateMeta
from llmops.classification.train import compute_metrics_fn, tokenize_split
from llmops.config import DistillConfig
from llmops.prepared_data import PreparedData
from llmops.students import TeacherAndStudent, teacher_and_student
from llmops.training import distil_arguments, train_to_candidate, use_all_cores

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


def _with_soft_targets(
    pair: TeacherAndStudent, data: PreparedData, cfg: DistillConfig, collator: DataCollatorWithPadding
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training rows (with the transfer set) and the validation rows, tokenized, each with the teacher's
    logits."""
    max_length = pair.meta.max_length
    train = tokenize_split(data.split_path("train"), pair.tokenizer, max_length)
    if cfg.transfer_rows > 0 and data.split_path("unlabeled").is_file():
        train = datasets.concatenate_datasets([train, transfer_set(data, pair.tokenizer, max_length, cfg)])
    validation = tokenize_split(data.split_path("validation"), pair.tokenizer, max_length)
    return tuple(  # type: ignore[return-value]
        rows.add_column("teacher_logits", teacher_logits(pair.teacher, rows, collator)) for rows in (train, validation)
    )


def distil(cfg: DistillConfig, teacher_dir: str | Path, data: PreparedData, out_dir: str | Path) -> Path:
    """Distil the teacher candidate at `teacher_dir`; returns the student candidate folder."""
    use_all_cores()
    out_dir = Path(out_dir)
    pair = teacher_and_student(teacher_dir, cfg.student_layers, cfg.ffn_keep)
    teacher_meta, tokenizer, teacher = pair.meta, pair.tokenizer, pair.teacher
    collator = DataCollatorWithPadding(tokenizer)
    train, validation = _with_soft_targets(pair, data, cfg, collator)
    args = distil_arguments(out_dir, cfg, len(train), remove_unused_columns=False)
    if cfg.hidden_weight > 0:
        teacher.to(args.device)
    trainer = DistillationTrainer(
        model=pair.student,
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

    meta = CandidateMeta(
        kind="student",
        labels=data.labels,
        max_length=teacher_meta.max_length,
        task=teacher_meta.task,
        recipe={
            "teacher_layers": cfg.student_layers,
            "ffn_keep": pair.ffn_keep,
            "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "hidden_weight": cfg.hidden_weight,
            "transfer_rows": cfg.transfer_rows,
        },
    )
    return train_to_candidate(trainer, out_dir, meta, best_metric="macro_f1")
