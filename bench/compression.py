"""Compression benchmark: teacher vs student fp32 vs int8 vs bnb-int8 vs NF4, in one run on one machine.

1. Runs `llmops run` on the quickstart config cold in a fresh directory, then again unchanged: each a
   new process, as a user runs it (Prefect's temporary server start included), timed.
2. Re-measures every candidate it built, sequentially, with the same threads and test rows:
   throughput is the median of 5 passes over 1,024 rows, latency over 200 single-text calls.
3. Writes bench/results/compression.json and compression.md, with the machine and the targets.

    make bench-compression            # or: python bench/compression.py --config configs/quickstart.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine
from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def timed_cli_run(config: Path, directory: Path, name: str) -> float:
    """Wall time of `llmops run --config CONFIG` in a new process, in `directory`."""
    log = directory / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "llmops.cli", "run", "--config", str(config)],
            cwd=directory,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{name} run failed:\n" + "\n".join(log.read_text().splitlines()[-30:]))
    return elapsed


def cached_result(config: Path, directory: Path) -> dict:
    """The flow's result (candidate folders), from the cache the timed runs filled."""
    from flows.lifecycle import lifecycle

    cwd = Path.cwd()
    os.chdir(directory)
    try:
        return lifecycle(str(config), [])
    finally:
        os.chdir(cwd)


def measure(result: dict, config: Path, directory: Path) -> list[dict]:
    from llmops.config import load_config
    from llmops.data import PreparedData
    from llmops.evaluate import evaluate_candidate

    # More rows and passes than the lifecycle's own (time-boxed) evaluation: shared 2-core machines are noisy.
    cfg = load_config(
        config, ["eval.throughput_repeats=5", "eval.throughput_max_rows=1024", "eval.latency_samples=200"]
    )
    data_dir = next((directory / cfg.work_dir / "data").iterdir())
    test = PreparedData.load(data_dir).split_path("test")
    rows = []
    for path in result["candidates"].values():
        report = evaluate_candidate(directory / path, test, cfg.eval)
        rows.append({"kind": report.kind, "params": report.params, **report.metrics})
    return rows


def non_embedding(row: dict) -> int:
    return row["params"]["params_non_embedding"]


def table(rows: list[dict], champion: str) -> list[dict]:
    teacher = next(r for r in rows if r["kind"] == "teacher")
    out = []
    for r in rows:
        out.append(
            {
                "candidate": r["kind"] + (" (champion)" if r["kind"] == champion else ""),
                "macro-F1": f"{r['macro_f1']:.4f}",
                "F1 / teacher": f"{r['macro_f1'] / teacher['macro_f1']:.3f}",
                "non-emb params": f"{r['params']['params_non_embedding'] / 1e6:.2f}M",
                "params / teacher": f"{non_embedding(r) / non_embedding(teacher):.2f}",
                "size MB": f"{r['size_mb']:.1f}",
                "p50 ms (b=1)": f"{r['latency_p50_ms']:.2f}",
                "texts/s (b=64)": f"{r['throughput_per_s']:.0f}",
                "throughput / teacher": f"{r['throughput_per_s'] / teacher['throughput_per_s']:.2f}",
            }
        )
    return out


def targets(rows: list[dict], champion: str, cold_s: float, rerun_s: float) -> list[dict]:
    by = {r["kind"]: r for r in rows}
    t, s = by["teacher"], by.get("student")
    checks = []
    if s:
        checks.append(("student >= 0.98 x teacher macro-F1", s["macro_f1"] / t["macro_f1"], 0.98))
        checks.append(
            (
                "student <= 0.5 x teacher non-embedding params",
                s["params"]["params_non_embedding"] / t["params"]["params_non_embedding"],
                0.5,
            )
        )
    if s and "int8" in by:
        checks.append(
            (
                "int8 >= 2.5 x student fp32 throughput (b=64)",
                by["int8"]["throughput_per_s"] / s["throughput_per_s"],
                2.5,
            )
        )
        checks.append(
            ("int8 macro-F1 loss vs student <= 0.5 point", 100 * (s["macro_f1"] - by["int8"]["macro_f1"]), 0.5)
        )
    checks.append(
        ("champion >= 4.5 x teacher throughput (b=64)", by[champion]["throughput_per_s"] / t["throughput_per_s"], 4.5)
    )
    checks.append(("quickstart lifecycle <= 12 min (s)", cold_s, 720))
    checks.append(("unchanged rerun <= 10% of cold run", rerun_s / cold_s, 0.10))
    upper = {
        "student <= 0.5 x teacher non-embedding params",
        "int8 macro-F1 loss vs student <= 0.5 point",
        "quickstart lifecycle <= 12 min (s)",
        "unchanged rerun <= 10% of cold run",
    }
    return [
        {
            "target": name,
            "measured": f"{value:.3f}",
            "bound": bound,
            "met": (value <= bound) if name in upper else (value >= bound),
        }
        for name, value, bound in checks
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    config = (REPO / args.config).resolve() if not Path(args.config).is_absolute() else Path(args.config)
    directory = Path(tempfile.mkdtemp(prefix="llmops-bench-"))
    try:
        cold_s = timed_cli_run(config, directory, "cold")
        rerun_s = timed_cli_run(config, directory, "rerun")
        result = cached_result(config, directory)
        rows = measure(result, config, directory)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    champion = result["selected"]
    report = {
        "machine": machine(),
        "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
        "cold_lifecycle_s": cold_s,
        "rerun_s": rerun_s,
        "champion": champion,
        "candidates": rows,
        "targets": targets(rows, champion, cold_s, rerun_s),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(report, indent=2))
    m = report["machine"]
    md = [
        "# Compression benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
        + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU")
        + f". Config: `{report['config']}`.",
        "",
        f"`llmops run` cold: {cold_s:.0f} s; unchanged rerun: {rerun_s:.0f} s (each a new process, "
        "Prefect's temporary server start included; the install is not).",
        "",
        tabulate(table(rows, champion), headers="keys", tablefmt="github"),
        "",
        "## Targets",
        "",
        tabulate(report["targets"], headers="keys", tablefmt="github"),
        "",
    ]
    (RESULTS / "compression.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
