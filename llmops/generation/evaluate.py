"""Evaluate a generator on the held-out test rows: quality, control, diversity, speed, memory, size.

Every candidate is measured by the same function on the same rows with the same thread count:
- perplexity of the reference completions (teacher-forced);
- exact match and macro-F1 of greedy answers to the closed instructions (`classify`), per class and per topic, and
  the share of answers outside the label set;
- for the open instructions (`write`), sampled generations: control accuracy (the share that the registry's
  classifier champion labels with the requested target), distinct-2, repetition and truncated shares;
- over every answer, the empty share: answers that are empty, or that the model would have left empty (its own
  first choice was the end token, which decoding bars at the first step: `decode.Barred`);
- time to first token (p50, p95) and decode tokens/s at batch 1, tokens/s at batch `speed_batch_size`;
- peak memory while loading and generating, and the weights' size on disk.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from llmops.candidate_folder import weights_size_mb
from llmops.config import EvalConfig, GenerationEvalConfig
from llmops.gates import CandidateReport, Scoring
from llmops.generation.candidate import Generation, GenerationParams, Generator, Prompt
from llmops.generation.data import RowKinds
from llmops.generation.loading import load_generator
from llmops.memory import PeakMemory
from llmops.metrics import classification_scores, exact_match, generation_scores, slice_scores

SCORING = Scoring(speed="decode_tokens_per_s", latency_p50="ttft_p50_ms", latency_p95="ttft_p95_ms")
"""Generators: the fastest decodes the most tokens per second for one request; latency is time to first token."""
CLOSED_METRICS = ("macro_f1", "exact_match", "off_label_share")
"""Measured on the closed instructions' rows (`eval.generation.exact_match_instructions`), with `f1_<label>` and
`slice_f1_<topic>`."""
OPEN_METRICS = ("distinct_2", "repetition_rate", "truncated_share")
"""Measured on the open instructions' rows."""
SAMPLES_KEPT = 6
"""Answers of each kind kept on the report, for the model card: what a person reads."""


class Judge(Protocol):
    """What control accuracy needs of a classifier (`llmops.classification.candidate.Classifier` is one)."""

    labels: list[str]

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray: ...


def said_labels(judge: Judge, texts: list[str]) -> list[str]:
    """The label the judge gives each text: control accuracy is the share that carries the requested one."""
    if not texts:
        return []
    return [judge.labels[int(k)] for k in judge.predict_proba(texts).argmax(axis=1)]


@dataclass(frozen=True)
class Control:
    """The classifier that judges whether a generation carries the requested label."""

    name: str
    version: str
    classifier: Judge


def prompts_of(rows: pd.DataFrame) -> list[Prompt]:
    """Each row's prompt as the model gets it: its chat, or its plain prompt."""
    return [json.loads(m) if m else p for p, m in zip(rows["prompt"], rows["messages"], strict=True)]


def normalise_answer(text: str) -> str:
    """A closed answer as it is scored: trimmed, lower-cased, without trailing punctuation (`Positive.` is
    `positive`)."""
    return text.strip().lower().rstrip(".!?;:,").strip()


def label_of(answer: str, labels: list[str]) -> str | None:
    """The label a closed answer is scored as, or None when it is none of them."""
    normalised = normalise_answer(answer)
    return next((label for label in labels if normalise_answer(label) == normalised), None)


def closed_answers(
    generator: Generator, rows: pd.DataFrame
) -> tuple[dict[str, float], dict[str, Any], list[Generation]]:
    """Greedy answers to closed instructions: exact match, macro-F1 and per-class F1 over the reference answers'
    label set (an answer outside it counts as wrong, and in `off_label_share`), and macro-F1 per topic."""
    labels = sorted({normalise_answer(c) for c in rows["completion"]})
    longest = max(len(generator.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in rows["completion"])
    generations = generator.generate(prompts_of(rows), GenerationParams(max_new_tokens=longest + 1))
    answers = [g.text for g in generations]
    index = {label: i for i, label in enumerate(labels)}
    predicted = np.array([index.get(normalise_answer(a), -1) for a in answers])
    truth = np.array([index[normalise_answer(c)] for c in rows["completion"]])
    scores = classification_scores(predicted.tolist(), truth.tolist(), len(labels))
    frame = pd.DataFrame({"label_id": truth, "topic": rows["topic"].to_numpy()})
    slices, slice_rows = slice_scores(frame, predicted, len(labels))
    metrics = {
        "exact_match": exact_match(answers, rows["completion"].tolist()),
        "macro_f1": float(scores["macro_f1"]),
        "off_label_share": float(np.mean(predicted == -1)),
    }
    details = {
        "per_class_f1": dict(zip(labels, map(float, scores["per_class_f1"]), strict=True)),
        "slice_macro_f1": slices,
        "slice_rows": slice_rows,
    }
    return metrics, details, generations


def open_generations(
    generator: Generator, rows: pd.DataFrame, cfg: GenerationEvalConfig, control: Control | None
) -> tuple[dict[str, float], list[str], list[Generation]]:
    """Sampled answers to open instructions: diversity, repetition, truncated share, control."""
    params = GenerationParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed
    )
    generations = generator.generate(prompts_of(rows), params)
    texts = [g.text for g in generations]
    metrics = generation_scores(texts)
    metrics["truncated_share"] = float(np.mean([g.finish_reason == "length" for g in generations]))
    notes: list[str] = []
    targets = rows["target"].tolist()
    judged = [i for i, t in enumerate(targets) if t]
    if control is None:
        notes.append(f"control accuracy not measured: no '{cfg.control_model}' champion in the registry")
    elif not judged:
        notes.append("control accuracy not measured: the open rows carry no target")
    else:
        labels = control.classifier.labels
        unknown = sorted({targets[i] for i in judged} - set(labels))
        if unknown:
            notes.append(f"control accuracy: targets {unknown} are not labels of {control.name}; counted as misses")
        said = said_labels(control.classifier, [texts[i] for i in judged])
        metrics["control_accuracy"] = float(np.mean([s == targets[i] for s, i in zip(said, judged, strict=True)]))
        notes.append(f"control accuracy judged by {control.name} version {control.version}")
    return metrics, notes, generations


def empty_share(generations: list[Generation]) -> float:
    """Share of answers that are empty, or that the model would have left empty (its first choice was the end
    token): decoding never returns an empty answer by default, so the second is what shows a model that answers
    nothing."""
    return float(np.mean([not g.text or g.chose_end_first for g in generations]))


def _samples(rows: pd.DataFrame, generations: list[Generation]) -> list[dict[str, str]]:
    return [
        {"prompt": prompt, "answer": g.text, "finish_reason": g.finish_reason}
        for prompt, g in zip(rows["prompt"].head(SAMPLES_KEPT), generations[:SAMPLES_KEPT], strict=False)
    ]


def perplexity(generator: Generator, rows: pd.DataFrame) -> float:
    nll, tokens = generator.completion_nll(prompts_of(rows), rows["completion"].tolist())
    return math.exp(nll / max(tokens, 1))


def measure_speed(generator: Generator, prompts: list[Prompt], cfg: GenerationEvalConfig) -> dict[str, float]:
    """Time to first token and decode rate at batch 1, and the rate of one batch of `speed_batch_size` prompts;
    every generation forced to `speed_new_tokens` tokens.

    The decode rate is (n - 1) tokens over the median whole generation less the median first token, medians over
    the prompts: a difference of two single timings goes to zero or below when the machine stalls one of them,
    and a rate over it to billions of tokens a second (seen on a busy machine, where it crowned that candidate
    the fastest). Where the medians still leave nothing to divide by, the whole generation's rate stands in (a
    lower bound)."""
    encoded = [generator.encode(p) for p in prompts]
    first = GenerationParams(max_new_tokens=1)
    n = cfg.speed_new_tokens
    full = GenerationParams(max_new_tokens=n, min_new_tokens=n)
    generator.generate_ids(encoded[:1], full)  # warm-up: the first call allocates
    ttft, whole = [], []
    for ids in encoded:
        start = time.perf_counter()
        generator.generate_ids([ids], first)
        ttft.append(time.perf_counter() - start)
        start = time.perf_counter()
        generator.generate_ids([ids], full)
        whole.append(time.perf_counter() - start)
    decode_s = float(np.median(whole) - np.median(ttft))
    decode_rate = (n - 1) / decode_s if decode_s > 0 else n / float(np.median(whole))
    batch = (encoded * (cfg.speed_batch_size // len(encoded) + 1))[: cfg.speed_batch_size]
    start = time.perf_counter()
    generator.generate_ids(batch, full)
    batch_rate = len(batch) * cfg.speed_new_tokens / (time.perf_counter() - start)
    return {
        "ttft_p50_ms": float(np.percentile(ttft, 50) * 1000),
        "ttft_p95_ms": float(np.percentile(ttft, 95) * 1000),
        "decode_tokens_per_s": decode_rate,
        "batch_tokens_per_s": float(batch_rate),
    }


def _rows(test: pd.DataFrame, kinds: list[str], limit: int) -> pd.DataFrame:
    return test[test["instruction"].isin(kinds)].head(limit)


def _open_rows(test: pd.DataFrame, cfg: GenerationEvalConfig) -> pd.DataFrame:
    """Open instructions; with no instruction kinds in the data, every row that is not a closed one."""
    if (test["instruction"] != "").any():
        return _rows(test, cfg.control_instructions, cfg.samples)
    return test[~test["instruction"].isin(cfg.exact_match_instructions)].head(cfg.samples)


def unmeasurable(cfg: GenerationEvalConfig, rows: RowKinds, control: str | None) -> dict[str, str]:
    """The metrics this evaluation cannot report on data with `rows`, each with why. `control` is why there is no
    classifier to judge control accuracy (None: there is one)."""
    closed = rows.kinds & set(cfg.exact_match_instructions)
    has_kinds = bool(rows.kinds - {""})
    open_kinds = rows.kinds & set(cfg.control_instructions) if has_kinds else rows.kinds - closed
    described = (
        f"its rows' instruction kinds are {sorted(rows.kinds - {''})}"
        if has_kinds
        else "its rows carry no instruction kind"
    )
    why: dict[str, str] = {}
    if not closed:
        reason = (
            f"it needs rows of instruction kinds {cfg.exact_match_instructions} "
            f"(eval.generation.exact_match_instructions) and data.source has none ({described}: "
            "data.instruction_column)"
        )
        why |= dict.fromkeys(CLOSED_METRICS, reason)
    if not open_kinds:
        reason = f"it needs open rows of instruction kinds {cfg.control_instructions} and data.source has none"
        why |= dict.fromkeys(OPEN_METRICS, reason)
        why["control_accuracy"] = reason
    elif not open_kinds & rows.targeted:
        why["control_accuracy"] = "the open rows carry no target label (data.target_column)"
    elif control is not None:
        why["control_accuracy"] = control
    if not closed and not open_kinds:
        why["empty_share"] = "no rows are answered"
    return why


def evaluate_quality(
    generator: Generator, test: pd.DataFrame, cfg: GenerationEvalConfig, control: Control | None
) -> tuple[dict[str, float], dict[str, Any], list[str]]:
    """Quality metrics, details (per class, per slice, sample answers) and notes, without timing anything."""
    metrics: dict[str, float] = {"perplexity": perplexity(generator, test.head(cfg.perplexity_rows))}
    details: dict[str, Any] = {"samples": []}
    notes: list[str] = []
    answered: list[Generation] = []
    closed = _rows(test, cfg.exact_match_instructions, cfg.exact_match_rows)
    if len(closed):
        more, per_label, generations = closed_answers(generator, closed)
        metrics |= more
        details |= per_label
        details["samples"] += _samples(closed, generations)
        answered += generations
    else:
        notes.append(f"exact match and macro-F1 not measured: no {cfg.exact_match_instructions} rows in the test set")
    open_rows = _open_rows(test, cfg)
    if len(open_rows):
        more, said, generations = open_generations(generator, open_rows, cfg, control)
        metrics |= more
        notes += said
        details["samples"] += _samples(open_rows, generations)
        answered += generations
    if answered:
        metrics["empty_share"] = empty_share(answered)
    return metrics, details, notes


def agreement(
    reference: Generator, candidate: Generator, prompts: Sequence[Prompt], completions: Sequence[str]
) -> dict[str, float]:
    """How closely `candidate` follows `reference` (the fp32 model it came from) at every token of held-out
    completions: the share of positions where both rank the same token first, and the mean KL divergence
    KL(reference || candidate) of their next-token distributions (what llama.cpp's `llama-perplexity
    --kl-divergence` reports)."""
    same, positions, kl = 0, 0, 0.0
    pairs = zip(
        reference.completion_logits(prompts, completions, batch_size=1),
        candidate.completion_logits(prompts, completions, batch_size=1),
        strict=True,
    )
    for (ref_logits, targets), (cand_logits, cand_targets) in pairs:
        if not torch.equal(targets, cand_targets):
            raise ValueError("the two generators encode the rows differently: their tokenizers differ")
        ref, cand = ref_logits.float().log_softmax(-1), cand_logits.float().log_softmax(-1)
        same += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        kl += float((ref.exp() * (ref - cand)).sum())
        positions += len(targets)
    if positions == 0:
        raise ValueError("agreement needs at least one completion token")
    return {"top1_agreement": same / positions, "mean_kl": kl / positions, "positions": float(positions)}


def evaluate_candidate(
    candidate_dir: str | Path, test_path: str | Path, cfg: EvalConfig, control: Control | None
) -> CandidateReport:
    """Load the generator and measure it on the Parquet test split."""
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    test = pd.read_parquet(test_path)
    with PeakMemory() as memory:  # what serving needs: the model loaded, and generating at batch 1 and batch 16
        generator = load_generator(candidate_dir)
        speed = measure_speed(generator, prompts_of(test.head(cfg.generation.speed_prompts)), cfg.generation)
    peak = memory.mb()
    metrics, details, notes = evaluate_quality(generator, test, cfg.generation, control)
    metrics |= speed
    if peak is not None:
        metrics["peak_memory_mb"] = peak
    metrics["size_mb"] = weights_size_mb(candidate_dir)
    source = generator.meta.recipe.get("quantization", {}).get("source")
    rows = test.head(cfg.generation.agreement_rows)
    if source and len(rows):
        if Path(source).is_dir():
            found = agreement(Generator(source), generator, prompts_of(rows), list(rows["completion"]))
            metrics |= {"top1_agreement": found["top1_agreement"], "mean_kl": found["mean_kl"]}
        else:
            notes.append(f"agreement with the fp32 source not measured: {source} is gone")
    return CandidateReport(
        kind=generator.meta.kind,
        path=str(candidate_dir),
        metrics=metrics,
        task=generator.task,
        params=generator.meta.params,
        recipe=generator.meta.recipe,
        notes=notes,
        **details,
    )
