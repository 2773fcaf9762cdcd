"""Distil a generator into a student: token-level distillation from the teacher's logits.

The student is a layer-dropped copy of the teacher (`llmops.students.build_student`: the same tokenizer, so the
two distributions are over one vocabulary). At every completion token the loss compares the student's next-token
distribution with the teacher's: forward KL, reverse KL or the generalized Jensen-Shannon divergence of GKD
(Agarwal et al. 2024), computed by TRL's maintained implementation. With `distill.on_policy`, a share of the
batches are the student's own completions, scored by the teacher (GKD's on-policy term).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from transformers import EarlyStoppingCallback, PreTrainedModel, Trainer, set_seed

from llmops.candidate_folder import CandidateMeta
from llmops.config import DistillConfig
from llmops.generation.data import IGNORE, tokenize_split
from llmops.generation.losses import (
    completion_loss,
    first_rows,
    of_rows,
    score_completions,
    token_distillation_loss,
    with_target_contrast,
    without_owners,
)
from llmops.generation.modeling import freeze_embeddings
from llmops.generation.train import collator
from llmops.prepared_data import PreparedData
from llmops.students import teacher_and_student
from llmops.training import distil_arguments, train_to_candidate, use_all_cores


class TokenDistillationTrainer(Trainer):
    """Trainer whose loss is alpha * cross-entropy on the completion + (1 - alpha) * divergence to the teacher."""

    def __init__(
        self,
        *args: Any,
        teacher: PreTrainedModel,
        cfg: DistillConfig,
        task: str,
        pad_id: int,
        loss_per: str = "token",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.teacher, self.cfg, self.task, self.pad_id, self.loss_per = teacher, cfg, task, pad_id, loss_per
        self.rng = random.Random(0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        inputs, owners, n_own = without_owners(inputs)
        on_policy = model.training and self.cfg.on_policy > 0 and self.rng.random() < self.cfg.on_policy
        if on_policy:  # alternatives follow the reference answers, not the student's
            inputs, owners = self._student_written(model, first_rows(inputs, n_own)), None
        everything = score_completions(model, inputs, self.task)  # the rows and their alternatives in one pass
        scored = of_rows(everything, n_own)
        with torch.no_grad():
            teacher = score_completions(self.teacher, first_rows(inputs, n_own), self.task)
        divergence = token_distillation_loss(
            scored.logits,
            teacher.logits,
            scored.rows,
            self.cfg.loss,
            self.cfg.beta,
            self.cfg.temperature,
            self.loss_per,
        )
        # The student's own completions have no reference answer: only the teacher's judgement counts there.
        alpha = 0.0 if on_policy else self.cfg.alpha
        hard = completion_loss(scored, self.loss_per) if alpha > 0 else 0.0
        loss = alpha * hard + (1.0 - alpha) * divergence
        loss = with_target_contrast(loss, self.cfg.target_contrast, model, everything, n_own, owners)
        return (loss, {"logits": scored.logits}) if return_outputs else loss

    @torch.no_grad()
    def _student_written(self, model: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with each reference completion replaced by one the student samples (GKD's on-policy data)."""
        labels = inputs["labels"]
        budget = int((labels != IGNORE).sum(dim=1).max())
        model.eval()
        try:
            if self.task == "seq2seq-lm":
                written = model.generate(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    do_sample=True,
                    max_new_tokens=budget,
                )[:, 1:]  # without the decoder start token
                new_labels = written.masked_fill(written == self.pad_id, IGNORE)
                decoder_inputs = model.prepare_decoder_input_ids_from_labels(labels=new_labels)
                return {**inputs, "labels": new_labels, "decoder_input_ids": decoder_inputs}
            return self._decoder_rollout(model, inputs, budget)
        finally:
            model.train()

    def _decoder_rollout(self, model: Any, inputs: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
        # A prompt is the run of unscored tokens at the start of a row (its padding is unscored too, at the end).
        prompts = [
            ids[: int((lab == IGNORE).cumprod(0).sum())]
            for ids, lab in zip(inputs["input_ids"], inputs["labels"], strict=True)
        ]
        width = max(len(p) for p in prompts)
        device = inputs["input_ids"].device
        left = torch.full((len(prompts), width), self.pad_id, device=device)
        mask = torch.zeros_like(left)
        for i, p in enumerate(prompts):
            left[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
        written = model.generate(input_ids=left, attention_mask=mask, do_sample=True, max_new_tokens=budget)
        rows = []
        for i, p in enumerate(prompts):
            new = written[i, width:]
            ended = (new == model.generation_config.eos_token_id).nonzero()
            new = new[: int(ended[0]) + 1] if len(ended) else new
            rows.append((torch.cat([p, new]), [IGNORE] * len(p) + new.tolist()))
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, device=device)
        attention = torch.zeros_like(input_ids)
        new_labels = torch.full_like(input_ids, IGNORE)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)], attention[i, : len(ids)] = ids, 1
            new_labels[i, : len(lab)] = torch.tensor(lab, device=device)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": new_labels}


def distil(
    cfg: DistillConfig, teacher_dir: str | Path, data: PreparedData, out_dir: str | Path, loss_per: str = "token"
) -> Path:
    """Distil the generator at `teacher_dir`; returns the student candidate folder. `loss_per` follows the teacher's
    training (`train.loss_per`)."""
    use_all_cores()
    set_seed(0)
    out_dir = Path(out_dir)
    pair = teacher_and_student(teacher_dir, cfg.student_layers, cfg.ffn_keep)
    meta, tokenizer, teacher, student = pair.meta, pair.tokenizer, pair.teacher, pair.student
    task = meta.task
    if cfg.freeze_embeddings:
        freeze_embeddings(student)
    train_rows = pq.read_metadata(data.split_path("train")).num_rows
    contrast = cfg.target_contrast > 0
    args = distil_arguments(
        out_dir, cfg, train_rows, best_metric="loss", greater_is_better=False, remove_unused_columns=not contrast
    )
    teacher.to(args.device)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    trainer = TokenDistillationTrainer(
        model=student,
        args=args,
        train_dataset=tokenize_split(data.split_path("train"), tokenizer, task, meta.max_length, contrast),
        eval_dataset=tokenize_split(data.split_path("validation"), tokenizer, task, meta.max_length),
        processing_class=tokenizer,
        data_collator=collator(tokenizer, student, task),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
        teacher=teacher,
        cfg=cfg,
        task=task,
        pad_id=tokenizer.pad_token_id,
        loss_per=loss_per,
    )

    student_meta = CandidateMeta(
        kind="student",
        labels=meta.labels,
        max_length=meta.max_length,
        task=task,
        recipe={
            "prompt_format": meta.recipe.get("prompt_format", "plain"),
            "teacher_layers": cfg.student_layers,
            "ffn_keep": pair.ffn_keep,
            "loss": cfg.loss,
            **({"beta": cfg.beta} if cfg.loss == "jsd" else {}),
            "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "on_policy": cfg.on_policy,
            "loss_per": loss_per,
            "freeze_embeddings": cfg.freeze_embeddings,
            **({"target_contrast": cfg.target_contrast} if contrast else {}),
        },
    )
    return train_to_candidate(trainer, out_dir, student_meta, best_metric="loss")
