"""Scale benchmark, batch inference: the classifier champion scores 200,000 tweets with `llmops.batch`.
(`--lifecycle`: the tiny lifecycle local against on Ray; `--serve`: Ray Serve with 1 and 2 replicas against
`llmops serve` with 2 workers at c=32; `--monitor`: monitoring passes over 10k, 100k and 1M
logged predictions, sampled and whole.)

Side by side, on one machine, three interleaved repetitions (the machine drifts; medians judged, spread shown):
- in-process: the job in this process, torch on every core (what `llmops batch-predict` does without Ray);
- Ray, 1 worker: a local Ray head of as many CPUs as cores, one actor pinned to one thread;
- Ray, 2 workers: the same cluster, two actors of one thread each.
Each job is timed end to end as a user waits for it: reading and staging the input, loading the model (once per
actor), scoring, writing the parts. Target: 2 workers >= 1.8x 1 worker. Interleaved with them, the bound: the
champion's scoring alone (no Ray, no files) in one process of one thread, and in two such processes at once; with
the 1-worker job's time, Amdahl's law gives the most 2 workers could gain here. During every job, the CPU seconds
of each process (the actors, the driver, Ray's other processes, the rest) are read once a second: the share of
the cores Ray itself takes, which the workers cannot have, tightens that bound. Writes
bench/results/scale.{md,json}.

    make bench-scale      # needs a classifier champion: make run first
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
from tabulate import tabulate

from llmops import registry
from llmops.batch import BatchJob, prepare, resolve_model, run_batch
from llmops.classification.candidate import Classifier
from llmops.config import load_config
from llmops.corpus import clean_frame, read_source
from llmops.ports import free_port
from llmops.predlog import FeedbackRow, PredictionRow, SqliteStore, encode_embedding, probabilities_json
from llmops.registry import fetch_version, resolve_tracking_uri

sys.path.append(str(Path(__file__).resolve().parent))
from machine import machine
from servers import running, timed_load

HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p != HERE]  # bench/monitoring.py must not shadow the `monitoring` package

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
TARGET = 1.8
SETUPS = ("in-process", "ray-1-worker", "ray-2-workers")
ALONE = ("alone-1-process", "alone-2-processes")
"""The bound's measurements: the champion scoring in 1 process, and in 2 at once, of one thread each."""
ALONE_ROWS = 20_000
ISSUE_ROWS = 200_000
"""The issue's batch size (the runs here use fewer rows: see the results file)."""


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


class CpuSeconds:
    """The CPU seconds spent while a job runs, by whom: the Ray workers (the actor processes), this process (the
    driver: Ray Data's executor, the job's loop, this sampler), Ray's other processes (the head's tree: GCS,
    raylet, agents, Ray Data's helper actors), and the rest of the machine; the cores left idle. Each process is
    read once a second, and once more at the end."""

    WORKER = "ray::MapWorker"

    def __init__(self, head: int):
        self.head, self.me = psutil.Process(head), os.getpid()
        self.seen: dict[int, tuple[str, float]] = {}  # pid -> (whose, CPU seconds at the last read)
        self.stop = threading.Event()

    def _read(self) -> dict[int, tuple[str, float]]:
        found = {}
        for process in [psutil.Process(self.me), *self.head.children(recursive=True)]:
            try:
                whose = ("driver" if process.pid == self.me else
                         "workers" if process.name().startswith(self.WORKER) else "ray")  # fmt: skip
                times = process.cpu_times()
                found[process.pid] = (whose, times.user + times.system)
            except psutil.Error:  # gone between listing and reading
                pass
        return found

    def __enter__(self) -> CpuSeconds:
        self.start, self.busy_at_start = self._read(), self._busy()
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(1.0):
            self.seen |= self._read()

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.seen |= self._read()
        wall, busy = time.perf_counter() - self.started, self._busy() - self.busy_at_start
        used = {"workers": 0.0, "driver": 0.0, "ray": 0.0}
        for pid, (whose, cpu) in self.seen.items():
            used[whose] += cpu - self.start.get(pid, (whose, 0.0))[1]
        self.result = {f"cpu_{k}_s": v for k, v in used.items()} | {
            "cpu_rest_s": max(busy - sum(used.values()), 0.0),
            "cpu_idle_s": max((os.cpu_count() or 1) * wall - busy, 0.0),
        }


def one(
    setup: str, data: Path, out: Path, model: str, uri: str, address: str, block_rows: int, head: int
) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    job = BatchJob(model, data, out, block_rows=block_rows)
    start = time.perf_counter()
    prepare(job, resolve_model(model, uri), generative=False)  # staging, timed apart; run_batch finds it done
    staged = time.perf_counter() - start
    with CpuSeconds(head) as cpu:
        if setup == "in-process":
            summary = run_batch(job, uri, progress=False)
        else:
            workers = 1 if setup == "ray-1-worker" else 2
            summary = run_batch(job, uri, address, workers=workers, threads_per_worker=1, progress=False)
    seconds = time.perf_counter() - start
    return {"setup": setup, "seconds": seconds, "staging_s": staged, "rows": summary.rows,
            "rows_per_s": summary.rows / seconds} | cpu.result  # fmt: skip


def score_alone(folder: Path, data: Path, rows: int) -> None:
    """The champion scores `rows` tweets in this process on one thread, nothing else (no Ray, no files): prints its
    rows/s, the model loaded and warmed up first."""
    import torch

    torch.set_num_threads(1)
    texts = pd.read_parquet(data).text.head(rows).tolist()
    classifier = Classifier(folder)
    classifier.predict_proba(texts[:64])
    start = time.perf_counter()
    classifier.predict_proba(texts, batch_size=BatchJob.batch_size)
    print(json.dumps({"rows_per_s": len(texts) / (time.perf_counter() - start)}))  # fewer than `rows` in a small run


def alone(setup: str, folder: Path, data: Path) -> dict[str, Any]:
    """`score_alone` in 1 process, or in 2 at once: their rows/s added up."""
    command = [sys.executable, __file__, "--score-alone", str(folder), str(data), str(ALONE_ROWS)]
    started = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
               for _ in range(1 if setup == "alone-1-process" else 2)]  # fmt: skip
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["rows_per_s"] for p in started]
    return {"setup": setup, "rows_per_s": sum(rates), "per_process": rates}


SIZES = (10_000, 100_000, 1_000_000)
WHOLE_SIZES = (10_000, 100_000)
"""The window read whole (`monitor.sample_rows: null`), as before, at the sizes this machine holds in memory."""


def build_log(cfg: Any, path: Path, rows: int, distinct: int = 5000, labelled_every: int = 100) -> str:
    """A SQLite prediction log of `rows` predictions of the champion, as serving writes it: `distinct` tweets scored
    by the champion (label, confidence, embedding, unknown-token share), repeated over the last hour, with a
    feedback label on every `labelled_every`-th. Returns the champion's version."""
    from monitoring.window import ReferenceCache, find_champion

    client = registry.setup_tracking(cfg.registry)
    champion = find_champion(client, cfg.registry.model_name)
    cache = ReferenceCache(Path(tempfile.mkdtemp(prefix="bench-scale-model-")), resolve_tracking_uri(cfg.registry))
    raw = clean_frame(read_source(cfg.data), cfg.data).sample(distinct, random_state=1).reset_index(drop=True)
    classifier = Classifier(cache.model_dir(champion))
    probs, embeddings, unknown = classifier.forward(raw["text"].tolist())
    assert embeddings is not None
    store = SqliteStore(path)
    start = time.time() - 3600
    for first in range(0, rows, 50_000):
        predictions, feedback = [], []
        for i in range(first, min(first + 50_000, rows)):
            j, request = i % distinct, f"r{i // 16:07d}"
            predictions.append(
                PredictionRow(request, i % 16, start + 3000 * i / rows, raw.text[j], champion.labels[probs[j].argmax()],
                              float(probs[j].max()), probabilities_json(champion.labels, probs[j]),
                              champion.name, champion.version, "champion", 5.0, encode_embedding(embeddings[j]),
                              float(unknown[j]))
            )  # fmt: skip
            if i % labelled_every == 0:
                feedback.append(FeedbackRow(request, i % 16, str(raw.label[j]), start + 3000 * i / rows + 1))
        store.write(predictions, feedback)
    return champion.version


def monitor_pass(config: str, log: Path, rows: int, sample: int | None, folder: Path) -> None:
    """One monitoring pass over the last `rows` predictions of `log` (in this process; the parent measures it)."""
    from monitoring.classification import run_monitor

    overrides = [f"serve.prediction_log={log}", f"monitor.window_size={rows}", "monitor.window_hours=null",
                 f"monitor.sample_rows={'null' if sample is None else sample}",
                 f"monitor.reports_dir={folder / 'reports'}", f"monitor.workspace={folder / 'workspace'}"]  # fmt: skip
    cfg = load_config(config, overrides)
    start = time.perf_counter()
    outcome = run_monitor(cfg, None, [])
    print(json.dumps({"seconds": time.perf_counter() - start, "window_rows": outcome.summary.window.rows,
                      "verdict": outcome.decision.verdict}))  # fmt: skip


def measured_pass(config: str, log: Path, rows: int, sample: int | None, folder: Path) -> dict[str, Any]:
    """`monitor_pass` in a child process: its seconds (the pass alone, imports excluded) and its peak memory."""
    command = [sys.executable, __file__, "--config", config, "--monitor-pass", str(log), str(rows),
               "null" if sample is None else str(sample), str(folder)]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    assert status == 0, out[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    return result | {"peak_rss_mb": usage.ru_maxrss / 1024}


def monitor_runs(config: str, repeats: int, sample: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cfg = load_config(config)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-monitor-"))
    log = work / "predictions.db"
    began = time.perf_counter()
    build_log(cfg, log, max(SIZES))
    built = {"rows": max(SIZES), "seconds": time.perf_counter() - began, "mb": log.stat().st_size / 2**20}
    print(json.dumps({"log": built}), flush=True)
    measured_pass(config, log, 10_000, sample, work)  # the champion's reference, scored once per version
    runs = []
    try:
        for repeat in range(repeats):
            for rows in SIZES:  # interleaved: each repetition runs every size once
                for setup, cap in (("sampled", sample), ("whole", None)):
                    if setup == "whole" and rows not in WHOLE_SIZES:
                        continue
                    result = measured_pass(config, log, rows, cap, work) | {"setup": setup, "rows": rows}
                    runs.append(result | {"repeat": repeat})
                    print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return runs, built


def write_monitor(runs: list[dict[str, Any]], built: dict[str, Any], sample: int) -> None:
    frame = pd.DataFrame(runs)
    rows, medians = [], {}
    for (setup, size), mine in frame.groupby(["setup", "rows"], sort=False):
        medians[setup, size] = (statistics.median(mine.seconds), statistics.median(mine.peak_rss_mb))
        rows.append([setup, f"{size:,}", f"{medians[setup, size][0]:.1f}",
                     f"{mine.seconds.min():.1f} - {mine.seconds.max():.1f}", f"{medians[setup, size][1]:,.0f}",
                     f"{mine.peak_rss_mb.min():,.0f} - {mine.peak_rss_mb.max():,.0f}"])  # fmt: skip
    table = tabulate(rows, ["window", "rows", "seconds (median)", "spread", "peak MB (median)", "spread"],
                     tablefmt="github")  # fmt: skip
    large = max(SIZES)
    middle = sorted(SIZES)[1]
    growth = (medians["sampled", large][0] - medians["sampled", middle][0]) / (large - middle) * 1e6
    memory = medians["sampled", large][1] - medians["sampled", middle][1]
    whole = [medians["whole", s][1] for s in WHOLE_SIZES]
    host = machine()
    md = (
        f"## Monitoring at scale\n\nOne monitoring pass (`monitoring.classification.run_monitor`: the window read from "
        f"a SQLite prediction log of {built['rows']:,} predictions ({built['mb']:,.0f} MB, with embeddings and a "
        f"feedback label on 1 in 100), reference, Evidently drift and quality reports, bias, decision, MLflow run and "
        f"workspace) over the last 10k, 100k and 1M predictions, each in a fresh process: seconds of the pass, peak "
        f"resident memory of the process (imports included). `sampled`: `monitor.sample_rows: {sample:,}` (the "
        f"default; the window read in chunks of 20,000, a uniform sample compared); `whole`: `sample_rows: null`, "
        f"the window in memory as before. {frame.repeat.nunique()} interleaved repetitions.\n\n{table}\n\n"
        f"Sampled, from 100k to 1M rows the pass grows by {growth:.1f} s per million rows (reading and sampling the "
        f"window, linear; the report's work is fixed by the sample) and its peak memory by {memory:+,.0f} MB. "
        f"Whole, peak memory grows from {whole[0]:,.0f} MB at 10k to {whole[1]:,.0f} MB at 100k rows; 1M rows whole "
        f"was not run.\n\nMachine: {host['cpu']}, {host['cores']} cores, torch {host['torch']}.\n"
    )
    save("monitor", md, {"runs": runs, "log": built, "sample_rows": sample, "machine": host})


SERVE_SETUPS = {
    "ray-serve-1-replica": ["--ray", "--set", "serve.min_replicas=1", "--set", "serve.max_replicas=1"],
    "ray-serve-2-replicas": ["--ray", "--set", "serve.min_replicas=2", "--set", "serve.max_replicas=2"],
    "llmops-serve-2-workers": ["--set", "serve.workers=2"],
}
SERVE_TARGET = 1.7
SERVE_FLOOR = "ray-serve-path-alone (GET /healthz)"


def serve_runs(config: str, repeats: int, address: str, duration_s: float) -> list[dict[str, Any]]:
    """Each setup serving the champion with one torch thread a replica or worker, `c` = 32 one-tweet requests in
    flight for `duration_s` after a warm-up; setups interleaved, `repeats` times."""
    cfg = load_config(config)
    raw = read_source(cfg.data)[cfg.data.text_column].dropna().astype(str).sample(2000, random_state=0)
    bodies = [json.dumps({"texts": [text]}).encode() for text in raw]
    env = os.environ | {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    work = Path(os.getcwd())  # the registry and the prediction log the config names
    runs = []
    for repeat in range(repeats):
        for setup, extra in SERVE_SETUPS.items():
            command = [str(Path(sys.executable).with_name("llmops")), "serve", "--config", config, "--port", "{port}",
                       "--set", "serve.threads=1", *extra]  # fmt: skip
            with running(setup, command, "/readyz", env, work) as base:
                row = asyncio.run(timed_load(f"{base}/v1/predict", bodies, 32, 5.0, duration_s))
                runs.append(row | {"setup": setup, "repeat": repeat})
                print(json.dumps(runs[-1]), flush=True)
                if setup == "ray-serve-2-replicas":  # the path alone: a health check, no model
                    row = asyncio.run(timed_load(f"{base}/healthz", None, 32, 5.0, duration_s))
                    runs.append(row | {"setup": SERVE_FLOOR, "repeat": repeat})
                    print(json.dumps(runs[-1]), flush=True)
    return runs


def write_serve(runs: list[dict[str, Any]], duration_s: float) -> None:
    frame = pd.DataFrame(runs)
    rows, medians = [], {}
    for setup in [*SERVE_SETUPS, SERVE_FLOOR]:
        mine = frame[frame.setup == setup]
        medians[setup] = (statistics.median(mine.throughput), statistics.median(mine.p99_ms))
        rows.append([setup, f"{medians[setup][0]:.0f}", f"{mine.throughput.min():.0f} - {mine.throughput.max():.0f}",
                     f"{medians[setup][1]:.0f}", f"{mine.p99_ms.min():.0f} - {mine.p99_ms.max():.0f}",
                     int(mine.errors.sum())])  # fmt: skip
    table = tabulate(rows, ["setup (c=32)", "req/s (median)", "spread", "p99 ms (median)", "spread", "errors"],
                     tablefmt="github")  # fmt: skip
    one, two, workers = (medians[s] for s in SERVE_SETUPS)
    floor = medians[SERVE_FLOOR][0]
    speedup = two[0] / one[0]
    verdict = "met" if speedup >= SERVE_TARGET and two[1] <= one[1] else "missed"
    host = machine()
    md = (
        f"## Serving on Ray Serve\n\nThe quickstart's classifier champion behind `llmops serve --ray` on a local Ray "
        f"head of {host['cores']} CPUs (replicas of 1 CPU and `serve.threads: 1` each), and behind `llmops serve` "
        f"with 2 uvicorn workers of one thread each; a closed loop of 32 one-tweet requests in flight, "
        f"{duration_s:.0f} s after 5 s of warm-up, {frame.repeat.nunique()} interleaved repetitions.\n\n{table}\n\n"
        f"Ray Serve 2 replicas / 1 replica: **{speedup:.2f}x** throughput (target {SERVE_TARGET}x, p99 no worse): "
        f"{verdict}. 2 replicas against `llmops serve` with 2 workers: {two[0] / workers[0]:.2f}x throughput, p99 "
        f"{two[1]:.0f} against {workers[1]:.0f} ms. The bound: Ray Serve's path alone (its proxy, the front, a "
        f"replica answering a health check with no model) carries {floor:.0f} req/s on this machine, "
        f"{floor / one[0]:.2f}x what one replica with the model does: {SERVE_TARGET}x one replica is "
        f"{'out of' if floor < SERVE_TARGET * one[0] else 'within'} this machine's reach. The proxy, the front, the "
        f"controller, the raylet and the load generator share the 2 cores with the replicas.\n\n"
        f"Machine: {host['cpu']}, {host['cores']} cores, torch "
        f"{host['torch']}.\n"
    )
    save("serve", md, {"runs": runs, "speedup_2_vs_1": speedup, "target": SERVE_TARGET, "machine": host})


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
    parser.add_argument("--serve", action="store_true", help="Ray Serve 1 and 2 replicas, llmops serve 2 workers")
    parser.add_argument("--duration-s", type=float, default=20.0, help="--serve: measured seconds per setup")
    parser.add_argument("--monitor", action="store_true", help="monitoring passes over 10k, 100k and 1M rows, instead")
    parser.add_argument("--sample-rows", type=int, default=50_000, help="monitor.sample_rows of the sampled passes")
    parser.add_argument("--monitor-pass", nargs=4, metavar=("LOG", "ROWS", "SAMPLE", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--score-alone", nargs=3, metavar=("FOLDER", "DATA", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score_alone:
        folder, data_path, rows = args.score_alone
        score_alone(Path(folder), Path(data_path), int(rows))
        return
    if args.monitor_pass:
        log, rows, sample, folder = args.monitor_pass
        monitor_pass(args.config, Path(log), int(rows), None if sample == "null" else int(sample), Path(folder))
        return
    if args.monitor:
        write_monitor(*monitor_runs(args.config, args.repeats, args.sample_rows), args.sample_rows)
        return
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
        if args.serve:
            write_serve(serve_runs(args.config, args.repeats, address, args.duration_s), args.duration_s)
            return
        tweets(cfg, args.rows, data)
        ref = resolve_model(model, uri)
        folder = fetch_version(uri, ref.name, ref.version, work / "models")
        for repeat in range(args.repeats):
            for setup in (*SETUPS, *ALONE):  # interleaved: each repetition runs every setup once
                if setup in ALONE:
                    result = alone(setup, folder, data) | {"repeat": repeat}
                else:
                    result = one(setup, data, work / setup, model, uri, address, args.block_rows, head.pid)
                    result |= {"repeat": repeat}
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
    jobs = frame[frame.setup.isin(SETUPS)]
    rows = []
    medians = {}
    for setup in SETUPS:
        mine = jobs[jobs.setup == setup]
        medians[setup] = statistics.median(mine.rows_per_s)
        spread = f"{mine.rows_per_s.min():,.0f} - {mine.rows_per_s.max():,.0f}"
        rows.append([setup, f"{statistics.median(mine.seconds):.1f}", f"{statistics.median(mine.staging_s):.1f}",
                     f"{medians[setup]:,.0f}", spread])  # fmt: skip

    def per_repeat(setup: str, over: str) -> list[float]:
        rate = {(r.setup, r.repeat): r.rows_per_s for r in frame.itertuples()}
        return [rate[(setup, r)] / rate[(over, r)] for r in sorted(frame.repeat.unique())]

    speedup = medians["ray-2-workers"] / medians["ray-1-worker"]
    verdict = "met" if speedup >= TARGET else "missed"
    # The bound: what 2 workers could gain at most, by Amdahl's law. In the 1-worker job, scoring alone would take
    # rows / r1 seconds (r1: the champion's rows/s on one thread, nothing else running); everything else in that job
    # (staging, starting Ray and the actors, loading the model, writing) is taken as not shrinking with workers,
    # and the scoring as shrinking by s2, what 2 processes scoring at once gain over one here (2 on an ideal machine).
    r1 = statistics.median(frame[frame.setup == "alone-1-process"].rows_per_s)
    s2 = statistics.median(per_repeat("alone-2-processes", "alone-1-process"))
    t1 = statistics.median(jobs[jobs.setup == "ray-1-worker"].seconds)
    scoring = args.rows / r1
    rest = max(t1 - scoring, 0.0)
    bound, ideal = t1 / (rest + scoring / s2), t1 / (rest + scoring / 2)
    # the issue's size, where the fixed part weighs less: the same measurements, the scoring scaled with the rows
    at_issue_size = (rest + ISSUE_ROWS / r1) / (rest + ISSUE_ROWS / r1 / s2)
    # What Ray itself takes while the 2 workers score: the driver (Ray Data's executor) and Ray's other processes
    # run on the same 2 cores, which leaves the workers 2 - taken of them; their scoring gains s2 * (2 - taken) / 2.
    frame["job_s"] = frame.seconds - frame.staging_s
    ray2 = frame[frame.setup == "ray-2-workers"]
    taken = statistics.median((ray2.cpu_driver_s + ray2.cpu_ray_s) / ray2.job_s)
    s2_ray = s2 * (2 - taken) / 2
    bound_ray = t1 / (rest + scoring / s2_ray)
    at_issue_size_ray = (rest + ISSUE_ROWS / r1) / (rest + ISSUE_ROWS / r1 / s2_ray)
    cpu_rows = []
    for setup in SETUPS:
        mine = frame[frame.setup == setup]
        cells = [statistics.median(mine[f"cpu_{k}_s"]) for k in ("workers", "driver", "ray", "rest", "idle")]
        share = statistics.median((mine.cpu_driver_s + mine.cpu_ray_s) / mine.job_s)
        cpu_rows.append([setup, f"{statistics.median(mine.job_s):.1f}", *(f"{c:.1f}" for c in cells),
                         "(the driver scores)" if setup == "in-process" else f"{share:.2f}"])  # fmt: skip
    cpu_table = tabulate(
        cpu_rows, ["setup", "job s (no staging)", "workers CPU s", "driver CPU s", "Ray's other processes CPU s",
                   "rest of machine CPU s", "idle core-s", "cores taken by driver + Ray"],
        tablefmt="github",
    )  # fmt: skip
    reach = (
        "met"
        if speedup >= TARGET
        else "missed, and out of reach of Ray Data on this machine: with what Ray itself takes on the same 2 cores, "
        "the bound is below the target"
        if max(bound_ray, at_issue_size_ray) < TARGET
        else "missed, though within the bound"
    )
    alone_rows = [
        [s, f"{statistics.median(frame[frame.setup == s].rows_per_s):,.0f}",
         f"{frame[frame.setup == s].rows_per_s.min():,.0f} - {frame[frame.setup == s].rows_per_s.max():,.0f}"]
        for s in ALONE
    ]  # fmt: skip
    host = machine()
    table = tabulate(
        rows, ["setup", "seconds (median)", "of which staging", "rows/s (median)", "rows/s (spread)"],
        tablefmt="github",
    )  # fmt: skip
    alone_table = tabulate(alone_rows, ["scoring alone (1 thread each)", "rows/s (median)", "spread"],
                           tablefmt="github")  # fmt: skip
    md = (
        f"# Scale benchmark\n\n## Batch inference\n\n{args.rows:,} tweets, {model}, "
        f"blocks of {args.block_rows:,} rows (on Ray, one in flight per actor), "
        f"{args.repeats} interleaved repetitions; each job timed end to end (staging, model loads, scoring, "
        f"writing)."
        + (
            f" {args.rows:,} rather than the issue's {ISSUE_ROWS:,} tweets, to keep the run (nine jobs and the "
            f"bound's measurements) within about 40 minutes here; the bound is also given at {ISSUE_ROWS:,}."
            if args.rows < ISSUE_ROWS
            else ""
        )
        + f"\n\n{table}\n\n"
        f"Ray 2 workers / 1 worker: **{speedup:.2f}x** (median of rows/s; per repetition "
        f"{', '.join(f'{s:.2f}x' for s in per_repeat('ray-2-workers', 'ray-1-worker'))}); target {TARGET}x: "
        f"{verdict}. Ray 2 workers / in-process: {medians['ray-2-workers'] / medians['in-process']:.2f}x.\n\n"
        f"**The bound.** Interleaved with the jobs, the champion scoring {ALONE_ROWS:,} tweets with nothing else "
        f"running (no Ray, no files; its model loaded first), in one process of one thread, and in two such "
        f"processes at once:\n\n{alone_table}\n\n"
        f"Two processes at once score **{s2:.2f}x** what one does (per repetition "
        f"{', '.join(f'{s:.2f}x' for s in per_repeat('alone-2-processes', 'alone-1-process'))}): the machine's "
        f"own ceiling for 2 workers' scoring. At {r1:,.0f} rows/s, the 1-worker job's scoring is {scoring:.1f} s "
        f"of its {t1:.1f} s; the other {rest:.1f} s (staging, Ray and its actors starting, the model loading, "
        f"writing) do not shrink with a second worker. Amdahl's law then bounds 2 workers / 1 worker at "
        f"**{bound:.2f}x** on this machine ({ideal:.2f}x were two processes to score twice as fast as one). "
        f"At the issue's {ISSUE_ROWS:,} tweets, where the fixed part weighs less, the same measurements (the "
        f"scoring taken as growing with the rows, the rest as fixed) bound it at **{at_issue_size:.2f}x**"
        f"{'' if at_issue_size >= TARGET else ': the 1.8x target is out of this machine’s reach at either size'}"
        ".\n\n"
        f"**What Ray itself takes.** That bound gives the workers both cores. They do not have them: during each "
        f"job (staging apart) every process was read once a second: the Ray workers (the actors), the driver (this "
        f"process: Ray Data's streaming executor, which polls its tasks ten times a second, and the job's loop), "
        f"Ray's other processes (the head's tree: GCS, raylet, agents, and Ray Data's helper actors, which the "
        f"executor calls each round), the rest of the machine, and the idle cores (medians):\n\n{cpu_table}\n\n"
        f"While the 2 workers score, the driver and Ray's other processes take **{taken:.2f}** of the 2 cores "
        f"(median), which leaves the workers {2 - taken:.2f}: their scoring can gain at most {s2:.2f} x "
        f"{2 - taken:.2f} / 2 = {s2_ray:.2f}x, and with the same fixed part the bound for 2 workers / 1 worker is "
        f"**{bound_ray:.2f}x** here (**{at_issue_size_ray:.2f}x** at {ISSUE_ROWS:,} tweets). "
        f"The measured {speedup:.2f}x is {speedup / bound_ray:.2f} of it; target {TARGET}x: {reach}. "
        f"(With 1 worker, Ray's share fits in the idle core.) On a cluster, the driver and the head run beside the "
        f"workers on cores of their own, and this share does not come out of the workers'.\n\n"
        f"Machine: {host['cpu']}, {host['cores']} cores, torch {host['torch']}.\n"
    )
    save("batch", md, {"runs": runs, "speedup_2_vs_1": speedup, "target": TARGET, "bound": bound,
                       "bound_at_issue_size": at_issue_size, "two_processes_vs_one": s2, "cores_taken_by_ray": taken,
                       "bound_with_ray": bound_ray, "bound_with_ray_at_issue_size": at_issue_size_ray,
                       "machine": host})  # fmt: skip


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
    order = [s for s in ("batch", "lifecycle", "serve", "monitor") if s in sections]
    (RESULTS / "scale.md").write_text("\n".join(sections[s]["md"] for s in order))
    print(md)


if __name__ == "__main__":
    main()
