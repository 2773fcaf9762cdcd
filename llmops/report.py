"""The lifecycle's human-readable outputs: the summary table and the model card."""

from __future__ import annotations

from tabulate import tabulate

from llmops.gates import CandidateReport, Decision

COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "sequence-classification": [
        ("macro-F1", "macro_f1", ".4f"),
        ("size MB", "size_mb", ".1f"),
        ("p50 ms (b=1)", "latency_p50_ms", ".1f"),
        ("texts/s (b=64)", "throughput_per_s", ".0f"),
    ],
    "generation": [
        ("perplexity", "perplexity", ".2f"),
        ("macro-F1", "macro_f1", ".4f"),
        ("control", "control_accuracy", ".3f"),
        ("distinct-2", "distinct_2", ".3f"),
        ("TTFT ms", "ttft_p50_ms", ".1f"),
        ("tok/s (b=1)", "decode_tokens_per_s", ".0f"),
        ("tok/s (b=16)", "batch_tokens_per_s", ".0f"),
        ("size MB", "size_mb", ".1f"),
    ],
}
"""Per task family: header, metric, format."""
SPEED = {"sequence-classification": "throughput_per_s", "generation": "decode_tokens_per_s"}
"""`x teacher` is this speed over the teacher's."""


def _family(task: str) -> str:
    return "sequence-classification" if task == "sequence-classification" else "generation"


def _cell(report: CandidateReport, metric: str, fmt: str) -> str:
    value = report.metrics.get(metric)
    return "-" if value is None else format(value, fmt)


def summary_rows(reports: list[CandidateReport], decision: Decision) -> list[dict[str, str]]:
    teacher = next(r for r in reports if r.kind == "teacher")
    family = _family(teacher.task)
    speed = SPEED[family]
    rows = []
    for r in reports:
        verdict = decision.verdicts[r.kind]
        row = {"candidate": r.kind + (" *" if r.kind == decision.selected else "")}
        row |= {header: _cell(r, metric, fmt) for header, metric, fmt in COLUMNS[family]}
        row["x teacher"] = f"{r.metrics.get(speed, 0.0) / teacher.metrics.get(speed, 1.0):.1f}"
        row["gates"] = "pass" if verdict.passed else "fail: " + "; ".join(verdict.reasons)
        rows.append(row)
    return rows


def summary_table(reports: list[CandidateReport], decision: Decision, fmt: str = "github") -> str:
    """A table of every candidate; `*` marks the one selected (the fastest that passed every gate), and a line
    under it says why none is marked when none passed."""
    table = tabulate(summary_rows(reports, decision), headers="keys", tablefmt=fmt)
    if decision.selected is not None:
        return table
    why = "No candidate is marked *: none passed every gate (the gates column says why)."
    if decision.best_rejected is not None:
        why += f" The best on the quality metric, {decision.best_rejected}, is registered as rejected for inspection."
    return f"{table}\n\n{why}"


INTENDED_USE = {
    "sequence-classification": "Sentiment (or the configured labels) of short English social-media texts like the "
    "training data. Scores on topics absent from training are not measured here; the monitoring reports track them.",
    "generation": "Short English texts in the manner of the training completions, following instructions like the "
    "training prompts (with the tweet instructions: classifying a tweet's sentiment, writing a tweet of a given "
    "sentiment and topic). It is small and fine-tuned on little data: it writes plausible but unreliable text, and "
    "nothing it writes has been checked for facts or harm beyond the metrics above.",
}


def _selected_lines(selected: CandidateReport) -> list[str]:
    m = selected.metrics
    if selected.task == "sequence-classification":
        quality = f"test macro-F1 {m['macro_f1']:.4f}, accuracy {m['accuracy']:.4f}."
    else:
        shown = [("perplexity", "perplexity"), ("macro_f1", "instruction macro-F1"), ("exact_match", "exact match")]
        shown += [("control_accuracy", "control accuracy"), ("distinct_2", "distinct-2")]
        quality = ", ".join(f"{label} {m[key]:.4f}" for key, label in shown if key in m) + " on the test rows."
    lines = [
        f"Candidate: **{selected.kind}** ({selected.task}); {quality}",
        f"Parameters: {selected.params.get('params_total', 0):,} "
        f"({selected.params.get('params_non_embedding', 0):,} outside the embeddings); "
        f"{m.get('size_mb', 0.0):.1f} MB of weights.",
        "",
    ]
    if selected.per_class_f1:
        table = tabulate(selected.per_class_f1.items(), headers=["label", "F1"], tablefmt="github", floatfmt=".4f")
        lines += ["## Per-class F1", table, ""]
    if selected.slice_macro_f1:
        lines += [
            "## Per-slice macro-F1 (topic)",
            tabulate(
                [(k, selected.slice_rows.get(k, 0), v) for k, v in selected.slice_macro_f1.items()],
                headers=["slice", "test rows", "macro-F1"],
                tablefmt="github",
                floatfmt=".4f",
            ),
            "",
        ]
    if selected.samples:
        lines += ["## Sample answers (test prompts)", "", *_sample_lines(selected.samples), ""]
    if selected.notes:
        lines += ["## Not measured", "", *[f"- {note}" for note in selected.notes], ""]
    return lines


def _sample_lines(samples: list[dict[str, str]]) -> list[str]:
    """Each answer under its prompt, as a person reads them; one cut at the token limit says so."""
    lines = []
    for sample in samples:
        cut = " *(cut at the token limit)*" if sample.get("finish_reason") == "length" else ""
        lines += [f"- > {sample['prompt']}", f"  {sample['answer'] or '*(empty)*'}{cut}"]
    return lines


def model_card(
    model_name: str,
    version: str | None,
    reports: list[CandidateReport],
    decision: Decision,
    data_fingerprint: str,
    data_rows: dict[str, int],
    config_yaml: str,
) -> str:
    """Markdown model card for the registered candidate, logged with the lifecycle run."""
    selected = next((r for r in reports if r.kind == decision.registered), None)
    lines = [f"# {model_name}" + (f" version {version}" if version else ""), ""]
    if selected is not None:
        lines += _selected_lines(selected)
        if decision.selected is None:
            lines.insert(3, "It did **not** pass the gates (see the decision): it is registered for inspection only.")
            lines.insert(4, "")
    lines += [
        "## Decision",
        "",
        f"Promote: **{decision.promote}**: {decision.reason}",
        "",
        "## All candidates",
        "",
        summary_table(reports, decision),
        "",
        "## Data",
        "",
        f"Fingerprint `{data_fingerprint}`; rows per split: {data_rows}.",
        "",
        "## Intended use and limits",
        "",
        INTENDED_USE[_family(reports[0].task if reports else "sequence-classification")],
        "",
        "## Configuration",
        "",
        "```yaml",
        config_yaml.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


CONFIGURATION = "\n## Configuration\n"


def version_description(card: str, run_id: str) -> str:
    """A registered version's description: its model card, the configuration left in the lifecycle run."""
    head = card.split(CONFIGURATION)[0].rstrip()
    return f"{head}\n\nThe whole configuration: `config.yaml` of MLflow run `{run_id}`; `llmops.config` tag.\n"


def model_description(name: str, task: str, labels: list[str], base: str) -> str:
    """A registered model's description: what it is, what its aliases mean, where each version says more."""
    family = _family(task)
    made = "fine-tuned, distilled, quantized" if family == "sequence-classification" else "fine-tuned and distilled"
    lines = [
        f"**{name}**: a {task} model from `{base}`, {made} and gated by llmops."
        + (f" Labels: {', '.join(f'`{label}`' for label in labels)}." if labels and family != "generation" else ""),
        "",
        "Aliases: `champion` is the version `llmops serve` serves; `challenger` the newest version that passed the "
        "gates; `previous-champion` the version `llmops rollback` restores.",
        "",
        "Each version's description is its model card: the candidate, its test metrics, the decision and the data.",
        "",
        f"Intended use and limits: {INTENDED_USE[family]}",
    ]
    return "\n".join(lines)
