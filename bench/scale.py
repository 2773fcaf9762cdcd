"""Scale benchmark, batch inference: the classifier champion scores 200,000 tweets with `llmops.batch`.

Side by side, on one machine, three interleaved repetitions (the machine drifts; medians judged, spread shown):
- in-process: the job in this process, torch on every core (what `llmops batch-predict` does without Ray);
- Ray, 1 worker: a local Ray head of as many CPUs as cores, one actor pinned to one thread;
- Ray, 2 workers: the same cluster, two actors of one thread each.
Each job is timed end to end as a user waits for it: reading and staging the input, loading the model (once per
actor), scoring, writing the parts. Target: 2 workers >= 1.8x 1 worker. Writes bench/results/scale.{md,json}.

    make bench-scale      # needs a classifier champion: make run first
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from llmops.batch import BatchJob, run_batch
from llmops.config import load_config
from llmops.corpus import read_source
from llmops.ports import free_port
from llmops.registry import resolve_tracking_uri

sys.path.append(str(Path(__file__).resolve().parent))
from machine import machine

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
TARGET = 1.8
SETUPS = ("in-process", "ray-1-worker", "ray-2-workers")


def tweets(cfg: Any, rows: int, path: Path) -> None:
    """`rows` tweets of the configured corpus (drawn with replacement), as a Parquet file."""
    raw = read_source(cfg.data)
    texts = raw[cfg.data.text_column].dropna().astype(str)
    texts.sample(rows, replace=True, random_state=0).reset_index(drop=True).to_frame("text").to_parquet(path)


def start_head(cpus: int, temp: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
         f"--num-cpus={cpus}", "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    os.environ.update({"RAY_AUTH_MODE": "disabled"})
    time.sleep(8)
    return f"127.0.0.1:{port}", head


def one(setup: str, data: Path, out: Path, model: str, uri: str, address: str, block_rows: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    job = BatchJob(model, data, out, block_rows=block_rows)
    start = time.perf_counter()
    if setup == "in-process":
        summary = run_batch(job, uri, progress=False)
    else:
        workers = 1 if setup == "ray-1-worker" else 2
        summary = run_batch(job, uri, address, workers=workers, threads_per_worker=1, progress=False)
    seconds = time.perf_counter() - start
    return {"setup": setup, "seconds": seconds, "rows": summary.rows, "rows_per_s": summary.rows / seconds}


def lifecycle_runs(repeats: int, address: str) -> list[dict[str, Any]]:
    """The tiny lifecycle (configs/tiny.yaml), cold (a fresh folder: data, training, registry), run locally and
    with its stages on the Ray head at `address`, interleaved."""
    runs = []
    home = Path(tempfile.mkdtemp(prefix="bench-scale-prefect-"))
    for repeat in range(repeats):
        for setup in ("local", "ray"):
            folder = Path(tempfile.mkdtemp(prefix=f"bench-scale-{setup}-"))
            env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL")}
            env |= {"PREFECT_HOME": str(home)} | ({"RAY_ADDRESS": address} if setup == "ray" else {})
            start = time.perf_counter()
            done = subprocess.run(
                [str(Path(sys.executable).with_name("llmops")), "run", "--config", str(REPO / "configs" / "tiny.yaml")],
                cwd=folder, env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            assert done.returncode == 0 and "promoted to champion" in done.stdout, (
                done.stdout[-3000:] + done.stderr[-3000:]
            )
            runs.append({"setup": setup, "seconds": seconds, "repeat": repeat})
            print(json.dumps(runs[-1]), flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-rows", type=int, default=10_000)
    parser.add_argument("--lifecycle", action="store_true", help="the tiny lifecycle, local against on Ray, instead")
    args = parser.parse_args()
    cfg = load_config(args.config)
    uri = resolve_tracking_uri(cfg.registry)
    model = f"models:/{cfg.registry.model_name}@champion"
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    data = work / "tweets.parquet"
    address, head = start_head(os.cpu_count() or 2, temp)
    runs: list[dict[str, Any]] = []
    try:
        if args.lifecycle:
            write_lifecycle(lifecycle_runs(args.repeats, address))
            return
        tweets(cfg, args.rows, data)
        for repeat in range(args.repeats):
            for setup in SETUPS:  # interleaved: each repetition runs every setup once
                result = one(setup, data, work / setup, model, uri, address, args.block_rows) | {"repeat": repeat}
                print(json.dumps(result), flush=True)
                runs.append(result)
    finally:
        os.killpg(head.pid, 9)
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    write(runs, args, model)


def write(runs: list[dict[str, Any]], args: argparse.Namespace, model: str) -> None:
    frame = pd.DataFrame(runs)
    rows = []
    medians = {}
    for setup in SETUPS:
        mine = frame[frame.setup == setup]
        medians[setup] = statistics.median(mine.rows_per_s)
        rows.append([setup, f"{statistics.median(mine.seconds):.1f}", f"{medians[setup]:,.0f}",
                     f"{mine.rows_per_s.min():,.0f} - {mine.rows_per_s.max():,.0f}"])  # fmt: skip
    speedup = medians["ray-2-workers"] / medians["ray-1-worker"]
    per_repeat = [
        frame[(frame.repeat == r) & (frame.setup == "ray-2-workers")].rows_per_s.iloc[0]
        / frame[(frame.repeat == r) & (frame.setup == "ray-1-worker")].rows_per_s.iloc[0]
        for r in sorted(frame.repeat.unique())
    ]
    verdict = "met" if speedup >= TARGET else "missed"
    host = machine()
    table = tabulate(rows, ["setup", "seconds (median)", "rows/s (median)", "rows/s (spread)"], tablefmt="github")
    md = (
        f"# Scale benchmark\n\n## Batch inference\n\n{args.rows:,} tweets, {model}, "
        f"blocks of {args.block_rows:,} rows, "
        f"{args.repeats} interleaved repetitions; each job timed end to end (staging, model loads, scoring, "
        f"writing).\n\n{table}\n\n"
        f"Ray 2 workers / 1 worker: **{speedup:.2f}x** (median of rows/s; per repetition "
        f"{', '.join(f'{s:.2f}x' for s in per_repeat)}); target {TARGET}x: {verdict}. "
        f"Ray 2 workers / in-process: {medians['ray-2-workers'] / medians['in-process']:.2f}x.\n\n"
        f"Machine: {host['cpu']}, {host['cores']} cores, torch {host['torch']}.\n"
    )
    save("batch", md, {"runs": runs, "speedup_2_vs_1": speedup, "target": TARGET, "machine": host})


def write_lifecycle(runs: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(runs)
    median = {s: statistics.median(frame[frame.setup == s].seconds) for s in ("local", "ray")}
    spread = {s: frame[frame.setup == s].seconds for s in ("local", "ray")}
    rows = [[s, f"{median[s]:.1f}", f"{spread[s].min():.1f} - {spread[s].max():.1f}"] for s in ("local", "ray")]
    host = machine()
    table = tabulate(rows, ["tiny lifecycle", "seconds (median)", "spread"], tablefmt="github")
    overhead = median["ray"] - median["local"]
    md = (
        f"## The lifecycle on Ray against local\n\n`llmops run --config configs/tiny.yaml`, cold (a fresh folder "
        f"each time), {frame.repeat.nunique()} interleaved repetitions; on Ray: its stages as tasks on a local "
        f"one-node Ray head of {host['cores']} CPUs (`RAY_ADDRESS`).\n\n{table}\n\n"
        f"The cluster path costs **{overhead:+.1f} s** ({median['ray'] / median['local']:.2f}x) on the tiny "
        f"lifecycle: each stage starts in a Ray worker process that imports torch, transformers and Prefect "
        f"again, and reports to the Prefect API from there.\n\nMachine: {host['cpu']}, {host['cores']} cores, "
        f"torch {host['torch']}.\n"
    )
    save("lifecycle", md, {"runs": runs, "overhead_s": overhead, "machine": host})


def save(section: str, md: str, data: dict[str, Any]) -> None:
    """One section of bench/results/scale.{md,json}; the other sections are kept."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "scale.json"
    sections = json.loads(path.read_text()) if path.is_file() else {}
    sections[section] = data | {"md": md}
    path.write_text(json.dumps(sections, indent=2))
    order = [s for s in ("batch", "lifecycle") if s in sections]
    (RESULTS / "scale.md").write_text("\n".join(sections[s]["md"] for s in order))
    print(md)


if __name__ == "__main__":
    main()
