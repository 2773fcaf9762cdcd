"""The losses of generative training, as pure functions of logits: what the model is scored on (completion
tokens only), the completion cross-entropy, and the token-level distillation divergences.

Every loss works on the completion tokens of a batch, flattened: `Scored.logits` (n_tokens, vocab),
`Scored.targets` (n_tokens,) and `Scored.rows` (n_tokens,), the example each token belongs to, so a loss can
be averaged per token or per example.
"""

from __future__ import annotations

import inspect
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmops.generation.data import IGNORE


@dataclass(frozen=True)
class Scored:
    """The completion tokens of a batch, flattened: what the model predicted there and what was right."""

    logits: torch.Tensor
    """(n_tokens, vocab): the model's scores for each completion token"""
    targets: torch.Tensor
    """(n_tokens,): the token that was right"""
    rows: torch.Tensor
    """(n_tokens,): the example each token belongs to"""


def scored_positions(labels: torch.Tensor, task: str) -> torch.Tensor:
    """(batch, seq) bool: the positions whose output predicts a completion token. A decoder's position t predicts
    token t + 1; a seq2seq decoder's position t predicts labels[t]."""
    if task == "seq2seq-lm":
        return labels != IGNORE
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def _takes_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _output_layer(model: Any) -> torch.nn.Linear | None:
    unwrapped = getattr(model, "module", model)  # under DistributedDataParallel
    head = unwrapped.get_output_embeddings() if hasattr(unwrapped, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Linear) else None


@contextmanager
def output_layer_at(model: Any, keep: torch.Tensor, project: bool = True) -> Iterator[bool]:
    """Inside the block, the model's output layer projects the positions `keep` (batch, seq) alone, and the model's
    logits come back as (n_kept, vocab). For models without `logits_to_keep` (the BERT decoder): there the
    projection onto a 30k vocabulary costs more than all six layers, and the loss reads a quarter of the positions.
    With `project=False` the model gives back the hidden states there instead, (n_kept, hidden), unprojected.
    Yields False, changing nothing, where the output layer is not a plain Linear layer."""
    head = _output_layer(model)
    if head is None:
        yield False
        return
    if project:
        head.forward = lambda hidden: F.linear(hidden[keep], head.weight, head.bias)  # type: ignore[method-assign,assignment]
    else:
        head.forward = lambda hidden: hidden[keep]  # type: ignore[method-assign,assignment]
    try:
        yield True
    finally:
        del head.forward  # the class's forward again


def score_completions(model: Any, inputs: dict[str, torch.Tensor], task: str, parts: int = 3) -> Scored:
    """Run the model on a batch and keep its outputs at completion tokens only.

    The vocabulary projection is the largest matrix product of a small LM: it is computed for completion positions
    alone, not for the prompt's or the padding's (`logits_to_keep` where transformers' model takes it, else
    :func:`output_layer_at`). A right-padded decoder batch whose rows differ much in length runs its layers as up
    to `parts` passes over rows of similar length, each as wide as its longest row (:func:`length_parts`), and the
    output layer once over all their completion positions, rows in order: the padding that a batch of short and
    long rows carries is not computed. The batch is the same (its rows are not regrouped across batches), and so
    are its logits and gradients.
    """
    splits = length_parts(inputs, task, model, parts)
    if len(splits) == 1:
        return _score_completions(model, inputs, task)
    head = _output_layer(model)
    assert head is not None  # length_parts splits only a plain output layer
    width = inputs["labels"].shape[1]
    hidden, rows, targets = [], [], []
    for part, narrow in splits:
        features = {k: v[part, :narrow] if v.dim() > 1 and v.shape[1] == width else v[part] for k, v in inputs.items()}
        labels = features.pop("labels")
        keep = scored_positions(labels, task)
        with output_layer_at(model, keep, project=False):
            hidden.append(model(**features).logits)
        rows.append(part[keep.nonzero()[:, 0]])
        targets.append(labels[:, 1:][labels[:, 1:] != IGNORE])
    everywhere = torch.cat(rows)
    order = torch.argsort(everywhere, stable=True)  # each row's tokens are in position order within its part
    logits = F.linear(torch.cat(hidden)[order], head.weight, head.bias)
    return Scored(logits, torch.cat(targets)[order], everywhere[order])


def _score_completions(model: Any, inputs: dict[str, torch.Tensor], task: str) -> Scored:
    labels = inputs["labels"]
    keep = scored_positions(labels, task)
    features = {k: v for k, v in inputs.items() if k != "labels"}
    if task != "seq2seq-lm" and _takes_logits_to_keep(model):
        logits = model(**features, logits_to_keep=keep).logits
    else:
        with output_layer_at(model, keep) as narrowed:
            logits = model(**features).logits
        logits = logits if narrowed else logits[keep]
    targets = labels[labels != IGNORE] if task == "seq2seq-lm" else labels[:, 1:][labels[:, 1:] != IGNORE]
    return Scored(logits, targets, keep.nonzero()[:, 0])


PASS_COST = 64
"""What one more pass costs, in positions: the layers' fixed cost, and smaller matrix products."""

RESCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Configuration keys of models whose logits are more than their output layer's product (Gemma's soft cap, Cohere's
and Granite's scales): their batches run in one pass."""


def length_parts(inputs: dict[str, torch.Tensor], task: str, model: Any, parts: int) -> list[tuple[torch.Tensor, int]]:
    """The rows of a batch as at most `parts` runs of similar length (rows, width), chosen to compute the fewest
    positions (a pass counts `PASS_COST` more); one run of every row where the batch is not a
    right-padded decoder batch, the model's logits are not its output layer's product alone, or the model is
    data-parallel (one forward pass a step there)."""
    mask = inputs.get("attention_mask")
    everything = [(torch.arange(len(inputs["labels"])), inputs["labels"].shape[1])]
    if parts < 2 or mask is None or task == "seq2seq-lm" or not _plain_logits(model):
        return everything
    lengths = mask.sum(dim=1)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]):
        return everything  # left-padded: a narrower batch would move the rows' positions
    order = torch.argsort(lengths, stable=True)
    ranked = lengths[order].tolist()

    def positions(ends: tuple[int, ...]) -> int:  # run i is rows order[ends[i-1]:ends[i]], as wide as its last
        return sum((end - start) * ranked[end - 1] + PASS_COST for start, end in zip((0, *ends), ends, strict=False))

    n = len(ranked)  # a batch: a few dozen rows, so every cut of the sorted rows can be tried
    cuts = (cut for k in range(parts) for cut in itertools.combinations(range(1, n), k))
    ends = min(((*cut, n) for cut in cuts), key=positions)
    return [(order[start:end], ranked[end - 1]) for start, end in zip((0, *ends), ends, strict=False)]


def _plain_logits(model: Any) -> bool:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or _output_layer(model) is None:
        return False
    config = getattr(model, "config", None)
    return not any(getattr(config, key, None) not in (None, 1.0) for key in RESCALED_LOGITS)


def average(values: torch.Tensor, rows: torch.Tensor, per: str) -> torch.Tensor:
    """Mean of per-token `values` (n_tokens,): over all tokens (`token`), or within each example (`rows`: the
    example of each token) and then over the examples (`example`). Returns a scalar."""
    if values.numel() == 0:
        return values.sum()
    if per == "token":
        return values.mean()
    n = int(rows.max()) + 1
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, torch.ones_like(values))
    present = counts > 0
    return (sums[present] / counts[present]).mean()


def completion_loss(scored: Scored, per: str) -> torch.Tensor:
    """Cross-entropy of the completion tokens, averaged per token or per example. Returns a scalar."""
    nll = F.cross_entropy(scored.logits.float(), scored.targets, reduction="none")
    return average(nll, scored.rows, per)


def answer_logprobs(scored: Scored, n_rows: int) -> torch.Tensor:
    """(n_rows,): the log-probability of each row's whole completion (the sum over its tokens)."""
    logp = -F.cross_entropy(scored.logits.float(), scored.targets, reduction="none")
    return torch.zeros(n_rows, dtype=logp.dtype, device=logp.device).index_add(0, scored.rows, logp)


OWNERS = "contrast_rows"
"""Batch key of the rows' alternatives (`llmops.generation.train.WithContrast`): they follow the batch's own rows,
and this holds, for each, the row it belongs to."""


def without_owners(inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, int]:
    """A batch's tensors, the owners of its alternatives (None when it has none), and how many of its rows are its
    own (they come first)."""
    owners = inputs.get(OWNERS)
    n_own = len(inputs["labels"]) - (0 if owners is None else len(owners))
    return {k: v for k, v in inputs.items() if k != OWNERS}, owners, n_own


def first_rows(inputs: dict[str, torch.Tensor], n_rows: int) -> dict[str, torch.Tensor]:
    """The batch's first `n_rows` rows: its own, without the alternatives."""
    return {k: v[:n_rows] for k, v in inputs.items()}


def of_rows(scored: Scored, n_rows: int) -> Scored:
    """The tokens of the first `n_rows` rows (they come first: tokens are in row order)."""
    keep = scored.rows < n_rows
    return Scored(scored.logits[keep], scored.targets[keep], scored.rows[keep])


def target_contrast_loss(scored: Scored, n_own: int, owners: torch.Tensor) -> torch.Tensor:
    """The generative-discriminative term of GeDi (Krause et al. 2020): the model as a classifier of its own
    answers. With a uniform prior, p(target | answer) is the softmax over the targets t of log p(answer | prompt
    naming t); the loss is the cross-entropy of the row's own target, averaged over the rows that have
    alternatives. `scored`: a batch of `n_own` rows followed by their alternatives, the same answers after the
    prompts naming each other target; `owners`: the row each alternative belongs to (ascending)."""
    logp = answer_logprobs(scored, n_own + len(owners))
    own, alternative = logp[:n_own], logp[n_own:]
    counts = torch.bincount(owners, minlength=n_own)
    rank = torch.arange(len(owners), device=owners.device) - (counts.cumsum(0) - counts)[owners]
    table = torch.full((n_own, 1 + int(counts.max())), float("-inf"), dtype=own.dtype, device=own.device)
    table[:, 0] = own
    table[owners, 1 + rank] = alternative
    contrasted = counts > 0
    return F.cross_entropy(table[contrasted], torch.zeros(int(contrasted.sum()), dtype=torch.long, device=own.device))


def with_target_contrast(
    loss: torch.Tensor, weight: float, model: Any, scored: Scored, n_own: int, owners: torch.Tensor | None
) -> torch.Tensor:
    """`loss + weight * target_contrast_loss` in training, on a batch with alternatives; else `loss` (validation
    loss stays comparable across runs)."""
    if owners is None or weight <= 0 or not model.training:
        return loss
    return loss + weight * target_contrast_loss(scored, n_own, owners)


BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}
"""TRL's generalized JSD at beta 0 is KL(teacher || student), at beta 1 KL(student || teacher)."""


def _generalized_jsd() -> Any:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKD lives under trl.experimental in TRL 1.x
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Divergence between the teacher's and the student's next-token distributions, per position.

    student_logits, teacher_logits: (..., vocab). Returns (...).
    loss: `forward_kl` = KL(p_teacher || p_student) (mode-covering), `reverse_kl` = KL(p_student || p_teacher)
    (mode-seeking), `jsd` = beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m) with
    m = beta * p_teacher + (1 - beta) * p_student. Both distributions are softened by `temperature`.
    """
    elementwise = _generalized_jsd()(
        student_logits, teacher_logits, beta=BETA.get(loss, beta), temperature=temperature, reduction="none"
    )
    return elementwise.sum(dim=-1)


def token_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    rows: torch.Tensor,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    per: str = "token",
) -> torch.Tensor:
    """`token_divergence` at every completion token, averaged per token or per example.

    student_logits, teacher_logits: (n_tokens, vocab) at the completion tokens; rows: (n_tokens,) the example of
    each token. Returns a scalar.
    """
    return average(token_divergence(student_logits, teacher_logits, loss, beta, temperature), rows, per)
