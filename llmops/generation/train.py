"""Fine-tune a generator (the teacher): supervised fine-tuning with the loss on completion tokens only.

Full fine-tuning, or LoRA adapters (`train.lora`, peft) merged into the base for release or released alone as an
adapter of a registered base version (`train.lora.adapter_of`); QLoRA (a 4-bit NF4 base) on a GPU. The best
checkpoint by validation loss is kept. bf16/fp16 on a GPU, all cores on CPU, and
`train.processes` data-parallel as for classifiers (`llmops.launcher.run_fine_tune` launches it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedModel, Trainer, set_seed

from llmops.config import LoraConfig, ModelConfig, TrainConfig
from llmops.generation.adapters import parse_base
from llmops.generation.data import IGNORE, prompt_format, tokenize_split
from llmops.generation.losses import (
    OWNERS,
    completion_loss,
    of_rows,
    score_completions,
    with_target_contrast,
    without_owners,
)
from llmops.generation.modeling import add_lora, freeze_embeddings, load_base_model, load_tokenizer, qlora_config
from llmops.prepared_data import PreparedData
from llmops.training import fine_tune_arguments, fine_tune_inputs, teacher_meta, train_to_candidate, use_all_cores


class CompletionTrainer(Trainer):
    """Trainer whose loss is the completion cross-entropy, averaged per token or per example."""

    def __init__(self, *args: Any, task: str, loss_per: str, target_contrast: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.task, self.loss_per, self.target_contrast = task, loss_per, target_contrast

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        inputs, owners, n_own = without_owners(inputs)
        everything = score_completions(model, inputs, self.task)  # the rows and their alternatives in one pass
        scored = of_rows(everything, n_own)
        loss = completion_loss(scored, self.loss_per)
        loss = with_target_contrast(loss, self.target_contrast, model, everything, n_own, owners)
        return (loss, {"logits": scored.logits}) if return_outputs else loss


CONTRAST = ("contrast_input_ids", "contrast_labels")
"""A row's alternatives as `tokenize_split(contrast=True)` gives them."""


@dataclass
class WithContrast:
    """Pads a batch as `pad` does. Where its rows carry alternatives (`tokenize_split(contrast=True)`), those are
    padded into the same batch after the rows, one forward pass for all, and `contrast_rows` holds the row each
    belongs to."""

    pad: DataCollatorForSeq2Seq

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows, alternatives, owners = [], [], []
        for row, feature in enumerate(features):
            rows.append({k: v for k, v in feature.items() if k not in CONTRAST})
            for ids, labels in zip(*(feature.get(k, []) for k in CONTRAST), strict=True):
                alternatives.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
                owners.append(row)
        batch = dict(self.pad(rows + alternatives))
        if alternatives:
            batch[OWNERS] = torch.tensor(owners)
        return batch


def collator(tokenizer: Any, model: Any, task: str) -> WithContrast:
    """Pads inputs with the pad token and labels with -100 (seq2seq: also builds the decoder inputs); a batch's
    alternatives, where it has them, likewise (`WithContrast`)."""
    return WithContrast(
        DataCollatorForSeq2Seq(
            tokenizer, model=model if task == "seq2seq-lm" else None, label_pad_token_id=IGNORE, padding=True
        )
    )


def _merge_lora(model: Any, cfg: LoraConfig, model_cfg: ModelConfig, task: str, tokenizer: Any, out_dir: Path) -> Any:
    """The adapters folded into the base weights: the released teacher is a plain model.

    Under QLoRA the trained base is 4-bit; the adapters are merged into a full-precision copy of it instead.
    """
    if not cfg.qlora:
        return model.merge_and_unload()
    import peft

    adapter = out_dir / "adapter"
    model.save_pretrained(adapter)
    base = load_base_model(model_cfg, task, tokenizer)
    return peft.PeftModel.from_pretrained(base, adapter).merge_and_unload()


def _base_ref(spec: str) -> dict[str, str]:
    """The base version an adapter is trained on, as its recipe records it (`adapter_of`, resolved by the flow to
    `name/version`)."""
    model, _, version = parse_base(spec)
    if version is None:
        raise ValueError(f"train.lora.adapter_of={spec!r}: fine-tuning needs the base's version (`name/version`)")
    return {"model": model, "version": version}


def fine_tune(
    model_cfg: ModelConfig, train_cfg: TrainConfig, task: str, data: PreparedData, out_dir: str | Path
) -> Path:
    """Train the teacher generator on `data`; returns the candidate folder `out_dir/model`."""
    use_all_cores()
    set_seed(train_cfg.seed)
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(model_cfg)
    lora = train_cfg.lora
    model = load_base_model(model_cfg, task, tokenizer, qlora_config() if lora and lora.qlora else None)
    if lora is not None:
        model = add_lora(model, lora, task)
    elif train_cfg.freeze_embeddings:
        freeze_embeddings(model)
    # Not grouped by length: it saved a fifth of the time, but batches of one length are batches of one kind of
    # row, and the quickstart teacher lost 0.028 macro-F1 and 0.037 control accuracy (3,000 unseen tweets). A
    # batch's own rows run in length parts instead (`score_completions`): the same batch, less padding computed.
    contrast = train_cfg.target_contrast > 0
    args = fine_tune_arguments(
        out_dir, train_cfg, data, best_metric="loss", greater_is_better=False, remove_unused_columns=not contrast
    )

    def tokenize(split: Path) -> Any:  # alternatives in training only: validation loss stays the completion loss
        return tokenize_split(
            split, tokenizer, task, model_cfg.max_length, contrast and split == data.split_path("train")
        )

    patience = train_cfg.early_stopping_patience
    trainer = CompletionTrainer(
        **fine_tune_inputs(model, args, data, tokenize, tokenizer, collator(tokenizer, model, task), patience),
        task=task,
        loss_per=train_cfg.loss_per,
        target_contrast=train_cfg.target_contrast,
    )

    meta = teacher_meta(
        model_cfg,
        task,
        data,
        args,
        prompt_format=prompt_format(data),
        fine_tuning="full" if lora is None else ("qlora" if lora.qlora else "lora"),
        loss_per=train_cfg.loss_per,
        freeze_embeddings=train_cfg.freeze_embeddings and lora is None,
        **({"target_contrast": train_cfg.target_contrast} if contrast else {}),
        **({"lora": lora.model_dump(mode="json")} if lora is not None else {}),
        **({"adapter_of": _base_ref(lora.adapter_of)} if lora is not None and lora.adapter_of else {}),
    )

    def release(trained: Any) -> PreTrainedModel:
        if lora is None or lora.adapter_of is not None:
            return trained  # a PeftModel saves its adapter alone
        return _merge_lora(trained, lora, model_cfg, task, tokenizer, out_dir)

    return train_to_candidate(trainer, out_dir, meta, best_metric="loss", release=release)
