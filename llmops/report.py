"""The lifecycle's human-readable outputs: the summary table and the model card."""

from __future__ import annotations

from tabulate import tabulate

from llmops.evaluate import CandidateReport
from llmops.gates import Decision


def summary_rows(reports: list[CandidateReport], decision: Decision) -> list[dict[str, str]]:
    teacher = next(r for r in reports if r.kind == "teacher")
    rows = []
    for r in reports:
        verdict = decision.verdicts[r.kind]
        rows.append(
            {
                "candidate": r.kind + (" *" if r.kind == decision.selected else ""),
                "macro-F1": f"{r.macro_f1:.4f}",
                "size MB": f"{r.size_mb:.1f}",
                "p50 ms (b=1)": f"{r.latency_p50_ms:.1f}",
                "texts/s (b=64)": f"{r.throughput_per_s:.0f}",
                "x teacher": f"{r.throughput_per_s / teacher.throughput_per_s:.1f}",
                "gates": "pass" if verdict.passed else "fail: " + "; ".join(verdict.reasons),
            }
        )
    return rows


def summary_table(reports: list[CandidateReport], decision: Decision, fmt: str = "github") -> str:
    """A table of every candidate; `*` marks the one selected for registration."""
    return tabulate(summary_rows(reports, decision), headers="keys", tablefmt=fmt)


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
    selected = next((r for r in reports if r.kind == decision.selected), None)
    lines = [f"# {model_name}" + (f" version {version}" if version else ""), ""]
    if selected is not None:
        lines += [
            f"Candidate: **{selected.kind}**; test macro-F1 {selected.macro_f1:.4f}, accuracy {selected.accuracy:.4f}.",
            f"Parameters: {selected.params.get('params_total', 0):,} "
            f"({selected.params.get('params_non_embedding', 0):,} outside the embeddings); "
            f"{selected.size_mb:.1f} MB of weights.",
            "",
            "## Per-class F1",
            tabulate(selected.per_class_f1.items(), headers=["label", "F1"], tablefmt="github", floatfmt=".4f"),
            "",
            "## Per-slice macro-F1 (topic)",
            tabulate(
                [(k, selected.slice_rows.get(k, 0), v) for k, v in selected.slice_macro_f1.items()],
                headers=["slice", "test rows", "macro-F1"],
                tablefmt="github",
                floatfmt=".4f",
            ),
            "",
        ]
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
        "Sentiment (or the configured labels) of short English social-media texts like the training data. "
        "Scores on topics absent from training are not measured here; the monitoring reports track them.",
        "",
        "## Configuration",
        "",
        "```yaml",
        config_yaml.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
