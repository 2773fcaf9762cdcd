"""Monitoring of a served generator: what users ask, what it writes, whether it writes what was asked.

One pass compares a window of the champion's logged generations with its reference (the prompts of its
reference data, answered once per version by the champion itself, greedily, and cached):
- prompt drift: Evidently's text drift on the prompts, their descriptors (length, words, URL and mention
  share, unknown tokens), and the prompts' embedding (the output layer's input at the prompt's last token,
  logged by serving) on a few principal components;
- generation descriptors: length, words, empty and truncated share, repetition (seq-rep-3), unknown tokens;
- control: where a prompt asks for a label (`write a positive tweet ...`), the share of generations the
  classifier champion labels with it, in the window and in the reference;
- quality from feedback (ratings, corrections), and bias: control accuracy and rating by topic slice.
These are the generator's parts of the one monitoring pass (`monitoring.monitor.run_pass`): the same pure
retraining policy, an MLflow run per pass, the Evidently workspace. A retraining starts the generative lifecycle
(`lifecycle/llm`) with the window's corrected and well-rated answers as extra training rows.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.metrics import DriftedColumnsCount, ValueDrift
from mlflow import MlflowClient

from llmops import registry
from llmops.classification.candidate import Classifier
from llmops.config import LlmopsConfig
from llmops.corpus import tag_topic
from llmops.generation.evaluate import Judge, said_labels
from llmops.metrics.text import seq_rep, unknown_shares
from llmops.predlog import PredictionStore, decode_embeddings, open_store
from monitoring.decision import RetrainDecision, WindowResult
from monitoring.monitor import Launcher, MonitorOutcome, RetrainRequest, run_pass
from monitoring.report import (
    EMBEDDING_SHARE,
    MonitoringReport,
    column_signal,
    drift_results,
    principal_components,
    sample_facts,
)
from monitoring.summary import (
    Bias,
    Drift,
    FeedbackQuality,
    Gap,
    Generations,
    PassSummary,
    ReferenceFacts,
    Shares,
    plain,
)
from monitoring.window import Champion, ReferenceCache, Side, WindowSpec, describe, read_window

PROMPT_DESCRIPTORS = ("length", "words", "url_share", "mention_share", "has_unknown")
GENERATION_DESCRIPTORS = ("g_length", "g_words", "g_repetition", "g_empty", "g_truncated", "g_has_unknown")
CATEGORICAL = ("has_unknown", "g_empty", "g_truncated", "g_has_unknown")


def requested_labels(prompts: pd.Series, pattern: str) -> pd.Series:
    """The label each prompt asks its answer to carry (the pattern's first group), or None."""
    found = prompts.str.extract(re.compile(pattern, re.IGNORECASE), expand=False)
    found = found.iloc[:, 0] if isinstance(found, pd.DataFrame) else found
    return found.str.lower().where(found.notna(), None)


def describe_generations(texts: pd.Series, finish: pd.Series, unknown: np.ndarray) -> pd.DataFrame:
    yes_no = {True: "yes", False: "no"}
    return pd.DataFrame(
        {
            "g_length": texts.str.len(),
            "g_words": texts.str.count(r"\S+"),
            "g_repetition": [seq_rep(t) for t in texts],
            "g_empty": (texts.str.strip() == "").map(yes_no),
            "g_truncated": (finish == "length").map(yes_no),
            "g_unk_share": unknown,
            "g_has_unknown": pd.Series(unknown > 0, index=texts.index).map(yes_no),
        },
        index=texts.index,
    )


def _side(frame: pd.DataFrame, embeddings: np.ndarray | None, prompt_unknown: np.ndarray, cfg: LlmopsConfig,
          tokenizer: Any) -> Side:  # fmt: skip
    """Topic, requested label and every descriptor of prompts and generations, on one frame."""
    frame = frame.reset_index(drop=True)
    frame["topic"] = tag_topic(frame["prompt"], cfg.data.topics) if len(frame) else pd.Series(dtype="object")
    frame["requested"] = requested_labels(frame["prompt"], cfg.monitor.generation.target_pattern)
    frame = frame.join(describe(frame["prompt"], prompt_unknown, cfg.data.url_token))
    unknown = unknown_shares(tokenizer, frame["completion"].tolist())
    frame = frame.join(describe_generations(frame["completion"], frame["finish_reason"], unknown))
    return Side(frame, embeddings)


def load_window(
    store: PredictionStore, spec: WindowSpec, champion: Champion, cfg: LlmopsConfig, tokenizer: Any
) -> Side:
    """The champion's logged generations in the window, with their latest feedback joined; a uniform sample of
    `monitor.sample_rows` of them when the window holds more (every one with feedback kept aside)."""
    feedback = store.read_generation_feedback()[["request_id", "idx", "rating", "correction"]]
    read = read_window(
        store,
        "generations",
        spec,
        feedback,
        lambda chunk: chunk["rating"].notna() | chunk["correction"].notna(),
        cfg.monitor.sample_rows,
        model_name=champion.name,
        model_version=champion.version,
    )
    logged = read.logged
    columns = ["request_id", "idx", "ts", "prompt", "messages", "completion", "finish_reason", "rating", "correction"]
    frame = logged[columns].copy()
    frame["flagged"] = logged.get("flagged")  # what the guards found
    known = logged["unk_share"] if "unk_share" in logged else pd.Series([None] * len(logged))
    prompt_unknown = (
        known.to_numpy(dtype="float64")
        if len(logged) and known.notna().all()
        else unknown_shares(tokenizer, frame["prompt"].tolist())
    )
    embeddings = decode_embeddings(logged["embedding"]) if len(logged) else None
    side = _side(frame, embeddings, prompt_unknown, cfg, tokenizer)
    return replace(side, rows=read.rows, with_feedback=read.with_feedback) if read.sampled else side


class GenerationReferenceCache(ReferenceCache):
    """Per generator version: its reference prompts answered by it (greedily), with their embeddings."""

    def generation_reference(self, champion: Champion, cfg: LlmopsConfig) -> Side:
        from llmops.generation.candidate import GenerationParams
        from llmops.generation.evaluate import prompts_of
        from llmops.generation.loading import load_generator

        rows = cfg.monitor.generation.reference_rows
        folder = self.root / f"{champion.name}-v{champion.version}"
        table, vectors = folder / f"generations-{rows}.parquet", folder / f"generations-{rows}.npy"
        generator = load_generator(self.model_dir(champion))
        if not (table.is_file() and vectors.is_file()):
            data = self.reference_data(champion)
            data = data.sample(min(rows, len(data)), random_state=0).reset_index(drop=True)
            prompts = prompts_of(data)
            answers = generator.generate(
                prompts, GenerationParams(max_new_tokens=cfg.monitor.generation.max_new_tokens)
            )
            frame = pd.DataFrame(
                {
                    "prompt": data["prompt"].astype(str),
                    "messages": data["messages"].astype(str),
                    "completion": [a.text for a in answers],
                    "finish_reason": [a.finish_reason for a in answers],
                }
            )
            folder.mkdir(parents=True, exist_ok=True)
            frame.to_parquet(table, index=False)
            np.save(vectors, generator.prompt_embeddings(prompts))
        frame = pd.read_parquet(table)
        prompt_unknown = unknown_shares(generator.tokenizer, frame["prompt"].tolist())
        return _side(frame, np.load(vectors), prompt_unknown, cfg, generator.tokenizer)


def judge(side: Side, control: Judge | None) -> None:
    """`said` (the control classifier's label of each generation with a requested label) and `controlled`."""
    frame = side.frame
    frame["said"], frame["controlled"] = None, np.nan
    asked = frame["requested"].notna() & (frame["completion"].str.strip() != "")
    if control is None or not asked.any():
        return
    frame.loc[asked, "said"] = said_labels(control, frame.loc[asked, "completion"].tolist())
    frame.loc[asked, "controlled"] = (frame.loc[asked, "said"] == frame.loc[asked, "requested"]).astype(float)


def _control_classifier(
    cfg: LlmopsConfig, client: MlflowClient, cache: ReferenceCache
) -> tuple[Classifier | None, str]:
    name = cfg.monitor.generation.control_model
    if name is None:
        return None, "no control model configured (monitor.generation.control_model)"
    version = registry.alias_version(client, name, registry.CHAMPION)
    if version is None:
        return None, f"control not measured: no '{name}' champion in the registry"
    folder = cache.model_dir(Champion(name, version, [], None, ""))  # only its weights are needed
    return Classifier(folder), f"control judged by {name} version {version}"


def drift(reference: Side, window: Side, cfg: LlmopsConfig, metadata: dict[str, Any]) -> tuple[Any, Drift]:
    """One Evidently report over prompt text, descriptors of prompts and generations, and the prompt embedding."""
    columns = ["prompt", *PROMPT_DESCRIPTORS, *GENERATION_DESCRIPTORS]
    ref, cur = reference.frame[columns].reset_index(drop=True), window.frame[columns].reset_index(drop=True)
    components = principal_components(reference, window, cfg.monitor.embedding_components)
    embedding_columns: list[str] = []
    if components is not None:
        ref, cur = ref.join(components[0]), cur.join(components[1])
        embedding_columns = list(components[0].columns)
    numerical = [c for c in (*PROMPT_DESCRIPTORS, *GENERATION_DESCRIPTORS) if c not in CATEGORICAL]
    definition = DataDefinition(
        text_columns=["prompt"],
        categorical_columns=list(CATEGORICAL),
        numerical_columns=[*numerical, *embedding_columns],
    )
    metrics: list[Any] = [ValueDrift(column=c) for c in columns]
    if embedding_columns:
        metrics.append(DriftedColumnsCount(columns=embedding_columns, drift_share=EMBEDDING_SHARE))
    snapshot = Report(metrics, metadata=metadata, tags=["drift", "generation"], include_tests=True).run(
        Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, definition)
    )
    per_column, embedding = drift_results(snapshot)
    signals: dict[str, Any] = {
        "prompt": column_signal(per_column, "prompt"),
        "prompt_descriptors": {d: column_signal(per_column, d) for d in PROMPT_DESCRIPTORS},
        "embedding": embedding or {"drifted": False, "unavailable": "the window was logged without embeddings"},
        "generation": {d: column_signal(per_column, d) for d in GENERATION_DESCRIPTORS},
    }
    signals["generation"]["drifted"] = any(d["drifted"] for d in signals["generation"].values())
    reasons = []
    for name in cfg.monitor.generation.drift_on:
        signal = signals[name]
        if not signal["drifted"]:
            continue
        if name == "generation":
            drifted = [d for d, s in signal.items() if isinstance(s, dict) and s.get("drifted")]
            reasons.append(f"generations drifted: {', '.join(drifted)}")
        elif name == "embedding":
            reasons.append(f"prompt embedding: {signal['drifted_components']} principal components drifted")
        else:
            reasons.append(f"prompt: {signal['method']} {signal['score']:.3f} (threshold {signal['threshold']})")
    return snapshot, Drift(bool(reasons), reasons, plain(signals))


def _share(values: pd.Series) -> float | None:
    values = values.dropna()
    return None if values.empty else round(float(values.mean()), 6)


def shares(frame: pd.DataFrame) -> Shares:
    return Shares(
        rows=len(frame),
        empty_share=_share((frame["g_empty"] == "yes").astype(float)),
        truncated_share=_share((frame["g_truncated"] == "yes").astype(float)),
        repetition=_share(frame["g_repetition"]),
        unk_share=_share(frame["g_unk_share"]),
        control_accuracy=_share(frame["controlled"]),
        judged=int(frame["controlled"].notna().sum()),
    )


def bias_by_topic(frame: pd.DataFrame, min_rows: int, ceiling: float | None) -> Bias:
    """Control accuracy and mean rating per topic; the largest control gap between topics with enough rows."""
    slices: list[dict[str, Any]] = []
    for topic, rows in frame.groupby("topic"):
        judged = rows["controlled"].dropna()
        slices.append(
            {
                "name": f"topic={topic}",
                "rows": len(rows),
                "control_accuracy": None if judged.empty else round(float(judged.mean()), 6),
                "judged": len(judged),
                "mean_rating": _share(rows["rating"].astype(float)) if "rating" in rows else None,
                "gated": len(judged) >= min_rows,
            }
        )
    gated = [s for s in slices if s["gated"]]
    gap = None
    if len(gated) >= 2:
        high = max(gated, key=lambda s: float(s["control_accuracy"]))
        low = min(gated, key=lambda s: float(s["control_accuracy"]))
        value = round(float(high["control_accuracy"]) - float(low["control_accuracy"]), 6)
        gap = Gap(value, (high["name"], low["name"]), ceiling=ceiling)
    return Bias(slices, control_gap=gap)


def training_rows(window: Side, good_rating: float) -> pd.DataFrame:
    """Generative training rows from feedback: a correction replaces the answer; a well-rated answer stays."""
    frame = _with_feedback(window)
    corrected = frame[frame["correction"].notna() & (frame["correction"].astype(str).str.strip() != "")]
    liked = frame[frame["correction"].isna() & (frame["rating"].astype(float) >= good_rating)]
    rows = pd.concat([corrected.assign(completion=corrected["correction"]), liked], ignore_index=True)[
        ["prompt", "messages", "completion"]
    ]
    return rows.reset_index(drop=True)


def _with_feedback(window: Side) -> pd.DataFrame:
    """The rows that may carry feedback: every row of the window, or of a sampled one, those set aside with it."""
    return window.frame if window.with_feedback is None else window.with_feedback


def served_generators(cfg: LlmopsConfig) -> list[str]:
    """The served models (`serve.models`) other than the config's own whose champion generates text."""
    client = registry.setup_tracking(cfg.registry)
    found = []
    for name in cfg.served_models:
        version = registry.alias_version(client, name, registry.CHAMPION)
        if name != cfg.registry.model_name and version is not None:
            task = registry.version_tags(client, name, version).get(registry.TAG + "task", "sequence-classification")
            if task != "sequence-classification":
                found.append(name)
    return found


def run_generation_monitor(
    cfg: LlmopsConfig, model_name: str, *, launcher: Launcher | None = None, now: float | None = None
) -> MonitorOutcome:
    """One pass over a generator: window vs reference, report, decision (recorded), and the retraining if decided."""

    def parts(client: MlflowClient, tracking_uri: str) -> GenerationMonitor:
        cache = GenerationReferenceCache(Path(cfg.work_dir) / "monitor", tracking_uri)
        return GenerationMonitor(cfg, client, cache, tracking_uri)

    return run_pass(cfg, model_name, parts, launcher=launcher, now=now)


@dataclass
class GenerationMonitor:
    cfg: LlmopsConfig
    client: MlflowClient
    cache: GenerationReferenceCache
    tracking_uri: str
    task: str | None = "generation"

    def load_window(self, spec: WindowSpec, champion: Champion) -> Side:
        store = open_store(self.cfg.serve.prediction_log)
        return load_window(store, spec, champion, self.cfg, self.cache.tokenizer(champion))

    def report(
        self, window: Side, champion: Champion, spec: WindowSpec, summary: PassSummary, folder: Path, at: float
    ) -> tuple[MonitoringReport, WindowResult]:
        cfg = self.cfg
        reference = self.cache.generation_reference(champion, cfg)
        control, control_note = _control_classifier(cfg, self.client, self.cache)
        judge(window, control)
        judge(reference, control)
        metadata = {"model": champion.name, "champion_version": champion.version, "window": spec.describe()}
        snapshot, drift_summary = drift(reference, window, cfg, metadata)
        now_shares, ref_shares = shares(window.frame), shares(reference.frame)
        with_feedback = _with_feedback(window)
        ratings = with_feedback["rating"].astype(float).dropna()
        quality_drop = None
        now_accuracy, ref_accuracy = now_shares.control_accuracy, ref_shares.control_accuracy
        if now_accuracy is not None and ref_accuracy is not None and now_shares.judged >= cfg.monitor.min_labelled:
            quality_drop = round(ref_accuracy - now_accuracy, 6)
        bias = bias_by_topic(window.frame, cfg.monitor.bias.min_slice_rows, cfg.monitor.retrain.max_bias_gap)
        summary = replace(
            summary,
            window=replace(summary.window, sample=sample_facts(window, len(reference.frame))),
            reference=ReferenceFacts(champion.reference_uri, len(reference.frame)),
            drift=drift_summary,
            generations=Generations(now_shares, ref_shares, control_note),
            quality=FeedbackQuality(
                drop=quality_drop,
                ratings=len(ratings),
                mean_rating=None if ratings.empty else round(float(ratings.mean()), 6),
                corrections=int(with_feedback["correction"].notna().sum()),
            ),
            bias=bias,
        )
        report = MonitoringReport(snapshot, None, summary)
        snapshot.save_html(str(folder / "report.html"))
        bias_gap = bias.control_gap.value if bias.control_gap else None
        rows = window.size
        return report, WindowResult(at, rows, drift=report.drift_detected, quality_drop=quality_drop, bias_gap=bias_gap)

    def retraining(
        self, window: Side, decision: RetrainDecision, folder: Path
    ) -> tuple[RetrainRequest, dict[str, Any]]:
        extra = training_rows(window, self.cfg.monitor.generation.good_rating)
        extra_path = None
        if len(extra):
            extra_path = str(folder / "feedback-generations.parquet")
            extra.to_parquet(extra_path, index=False)
        overrides = [f"registry.tracking_uri={self.tracking_uri}"] + (
            [f"data.extra_rows={extra_path}"] if extra_path else []
        )
        generation = self.cfg.monitor.generation
        request = RetrainRequest(
            generation.retrain_config, overrides, extra_path, decision.reason, deployment=generation.retrain_deployment
        )
        return request, {"config": request.config, "extra_rows": extra_path, "training_rows": len(extra)}

    def metrics(self, summary: PassSummary) -> dict[str, float]:
        return generation_metrics(summary)


def generation_metrics(summary: PassSummary) -> dict[str, float]:
    values: dict[str, float] = {"window_rows": summary.window.rows}
    drift = summary.drift
    if drift is not None:
        values["drift_prompt"] = drift.signals["prompt"]["score"]
        if drift.embedding_share is not None:
            values["drift_embedding_share"] = drift.embedding_share
        values |= {f"drift_{name}": score for name, score in drift.scores("generation").items()}
    if summary.generations is not None:
        for key, value in asdict(summary.generations.window).items():
            if isinstance(value, int | float):
                values[f"window_{key}"] = float(value)
    if isinstance(summary.quality, FeedbackQuality) and summary.quality.mean_rating is not None:
        values["window_mean_rating"] = summary.quality.mean_rating
    if summary.bias is not None and summary.bias.control_gap is not None:
        values["bias_control_gap"] = summary.bias.control_gap.value
    return values
