"""Serving benchmark: our server with batching on and off vs `mlflow models serve`, in one run, one machine.

All three serve the same registered champion (`models:/<name>@champion`) on loopback, one at a
time. A closed-loop load generator (aiohttp, its own process) keeps `c` requests in flight, one
tweet per request, for a fixed time per level after a warm-up, at c = 1, 8 and 32. The upper
bound is the model alone: the champion's candidate scoring the same tweets in batches of
`serve.max_batch_size`, in-process, no HTTP.

Writes bench/results/serving.json and serving.md, with the machine and the targets:
- ours (batching on) >= 3x the peer's throughput at c=32, with a lower p99;
- batching on >= 3x batching off at c=32, p99 no worse;
- batching on >= 0.95x batching off at c=1, throughput and p50 (batching must cost a lone request nothing);
- served throughput (batching on, c=32) >= 0.8x the model-only offline throughput.

    make bench-serving     # needs a champion: make run first
    .venv/bin/python bench/serving.py --gateway --duration-s 10   # keys, limits, guards, traces on vs off: gateway.md
    .venv/bin/python bench/serving.py --gateway-parts --duration-s 10   # each part alone: gateway_parts.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from machine import machine
from mlflow import MlflowClient
from servers import otlp_sink, running, timed_load
from tabulate import tabulate

from llmops.classification.candidate import Classifier
from llmops.config import load_config
from llmops.registry import CHAMPION, TAG, download_candidate, resolve_tracking_uri

SERVERS = ("on", "off", "peer")
FLOOR_OF = "llmops (batching on)"
FLOOR = "HTTP alone: GET /healthz"
"""The same server and client with no model in the path: what HTTP costs on these cores."""
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
VENV_BIN = Path(sys.executable).parent


def test_texts(client: MlflowClient, name: str, version: str, dst: Path) -> list[str]:
    """The champion's own test split (its lineage tag points at it)."""
    uri = client.get_model_version(name, version).tags[TAG + "test_data"]
    return pd.read_parquet(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))["text"].tolist()


def offline_throughput(candidate: Path, texts: list[str], batch_size: int, repeats: int = 3) -> float:
    """The model alone on the batches a server forms: `batch_size` texts in arrival order, one call each (a
    single call over all texts would batch them by length, which a server cannot do)."""
    model = Classifier(candidate)
    model.predict_proba(texts[:batch_size], batch_size)
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            model.predict_proba(batch, batch_size)
        rates.append(len(texts) / (time.perf_counter() - start))
    return float(np.median(rates))


def measure_server(
    label: str,
    command: list[str],
    ready_path: str,
    predict: tuple[str, Any],
    texts: list[str],
    args: argparse.Namespace,
    env: dict[str, str],
    workdir: Path,
) -> list[dict[str, Any]]:
    with running(label, command, ready_path, env, workdir) as base:
        path, make_body = predict
        bodies = [json.dumps(make_body(t)).encode() for t in texts]
        rows = []
        for concurrency in args.concurrency:
            row = asyncio.run(timed_load(f"{base}{path}", bodies, concurrency, args.warmup_s, args.duration_s))
            row["server"] = label
            print(f"[{label}] c={concurrency}: {row['throughput']:.0f} req/s, p99 {row['p99_ms']:.1f} ms", flush=True)
            rows.append(row)
        if label == FLOOR_OF:
            row = asyncio.run(
                timed_load(f"{base}/healthz", None, max(args.concurrency), args.warmup_s, args.duration_s)
            )
            row["server"] = FLOOR
            print(f"[{FLOOR}] c={row['concurrency']}: {row['throughput']:.0f} req/s", flush=True)
            rows.append(row)
        return rows


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    table = tabulate(
        [
            [r["server"], r["concurrency"], round(r["throughput"]), r["p50_ms"], r["p95_ms"], r["p99_ms"], r["errors"]]
            for r in rows
        ],
        headers=["server", "concurrency", "texts/s", "p50 ms", "p95 ms", "p99 ms", "errors"],
        tablefmt="github",
        floatfmt=".1f",
    )
    checks = "\n".join(
        f"- {'met' if c['met'] else 'MISSED'}: {c['target']} ({c['measured']})" for c in result["targets"]
    )
    bound = http_bound(rows, result["offline_throughput"])
    m = result["machine"]
    return f"""# Serving benchmark

Champion: `{result["model"]}` version {result["version"]} ({result["kind"]}). One text per request,
closed loop, {result["duration_s"]:.0f} s per level after {result["warmup_s"]:.0f} s warm-up;
server and load generator share the machine.
Machine: {m["cpu"]}, {m["cores"]} cores, torch {m["torch"]}, CUDA: {m["cuda"] or "none"}.
Date: {result["date"]}.

Model-only offline throughput (batches of {result["batch_size"]}, no HTTP):
**{result["offline_throughput"]:.0f} texts/s**.

{table}

Targets:
{checks}

The `{FLOOR}` row is the same server and load generator with no model in the path: on {m["cores"]} shared
cores the model and HTTP take turns, so a server at c=32 cannot pass 1 / (1 / model-only + 1 / HTTP alone)
= **{bound:.0f} texts/s ({bound / result["offline_throughput"]:.2f}x model-only)**, and that with the cheapest
request there is (a GET, no body, no validation, no log).
"""


def http_bound(rows: list[dict[str, Any]], offline: float) -> float:
    """The most a server can serve when every request costs the model's time plus HTTP's, on the same cores."""
    floor = next(r for r in rows if r["server"] == FLOOR)["throughput"]
    return 1 / (1 / offline + 1 / floor)


def targets(rows: list[dict[str, Any]], offline: float) -> list[dict[str, Any]]:
    def at(server: str, concurrency: int = 32) -> dict[str, Any]:
        return next(r for r in rows if r["server"] == server and r["concurrency"] == concurrency)

    on, off, peer = at("llmops (batching on)"), at("llmops (batching off)"), at("mlflow models serve")
    lone_on, lone_off = at("llmops (batching on)", 1), at("llmops (batching off)", 1)

    def versus(other: dict[str, Any]) -> str:
        return f"{on['throughput'] / other['throughput']:.2f}x, p99 {on['p99_ms']:.0f} vs {other['p99_ms']:.0f} ms"

    return [
        {
            "target": ">= 3x mlflow models serve throughput at c=32, lower p99",
            "measured": versus(peer),
            "met": on["throughput"] >= 3 * peer["throughput"] and on["p99_ms"] < peer["p99_ms"],
        },
        {
            "target": "batching on >= 3x batching off at c=32, p99 no worse",
            "measured": versus(off)
            + (
                f"; 3x off is {3 * off['throughput']:.0f} texts/s, above the model alone's {offline:.0f}"
                if 3 * off["throughput"] > offline
                else ""
            ),
            "met": on["throughput"] >= 3 * off["throughput"] and on["p99_ms"] <= off["p99_ms"],
        },
        {
            "target": "batching on >= 0.95x batching off at c=1, throughput and p50",
            "measured": f"{lone_on['throughput'] / lone_off['throughput']:.2f}x, "
            f"p50 {lone_on['p50_ms']:.1f} vs {lone_off['p50_ms']:.1f} ms",
            "met": lone_on["throughput"] >= 0.95 * lone_off["throughput"]
            and lone_on["p50_ms"] <= lone_off["p50_ms"] / 0.95,
        },
        {
            "target": "served (batching on, c=32) >= 0.8x model-only offline throughput",
            "measured": f"{on['throughput'] / offline:.2f}x ({on['throughput']:.0f} vs {offline:.0f} texts/s)",
            "met": on["throughput"] >= 0.8 * offline,
        },
    ]


NO_KEYS = ["--set", "serve.gateway_store=null"]
NO_GUARDS = ["--set", "serve.guards={prompts: allow, answers: allow}"]
GATEWAY_OFF = [*NO_KEYS, *NO_GUARDS]
"""No key asked, nothing checked: the service as it was before the gateway."""


ON, EVERY = "all on", "all on, every request traced"
TRACES_SAMPLED = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
"""All on traces one request in ten (OpenTelemetry's ratio sampler, the usual production setting); a caller's
sampled `traceparent` is always followed."""


NO_APP = "no app: uvicorn, batcher, model"
"""`bench/bare_server.py`: a server of the same design with nothing else in a request's way (the ceiling)."""


def gateway(
    args: argparse.Namespace,
    ours: list[str],
    texts: list[str],
    model_only: Callable[[], float],
    env: dict,
    work: Path,
    no_app: list[str],
) -> dict:
    """Keys, limits, guards and traces all on against all off, on the classifier champion: three rounds, the
    servers taking turns in each (c=1, c=32, and HTTP alone on the bare server for the bound; `no_app`'s command at
    c=32, what the same cores serve with no app in the way). The model alone (`model_only`, in this process) is
    timed in each round too, for the bound: the machine drifts between rounds."""
    with_keys, key = bench_key(work)
    # a scoped key with limits counted in the store; guards redact the prediction log; spans go over OTLP
    on = [*ours, *with_keys]
    rows = []
    with otlp_sink() as (endpoint, sink):
        traced = env | {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint}
        modes = {"all off": ([*ours, *GATEWAY_OFF], env), ON: (on, traced | TRACES_SAMPLED), EVERY: (on, traced)}
        v1 = [json.dumps({"texts": [t]}).encode() for t in texts]
        offline = []
        for round_ in range(1, 4):
            offline.append(model_only())
            print(f"[model-only offline, round {round_}] {offline[-1]:.0f} texts/s", flush=True)
            for label, (command, server_env) in modes.items():
                sent = key if label != "all off" else None
                with running(label, command, "/readyz", server_env, work) as base:
                    for concurrency in (1, 32):
                        row = asyncio.run(
                            timed_load(f"{base}/v1/predict", v1, concurrency, args.warmup_s, args.duration_s, sent)
                        )
                        rows.append(row | {"server": label, "round": round_})
                        print(f"[{label}, round {round_}] c={concurrency}: {row['throughput']:.0f} req/s, "
                              f"p50 {row['p50_ms']:.1f} ms, errors {row['errors']}", flush=True)  # fmt: skip
                    if sent is None:
                        row = asyncio.run(timed_load(f"{base}/healthz", None, 32, args.warmup_s, args.duration_s))
                        rows.append(row | {"server": FLOOR, "round": round_})
            with running(NO_APP, no_app, "/readyz", env, work) as base:
                row = asyncio.run(timed_load(f"{base}/v1/predict", v1, 32, args.warmup_s, args.duration_s))
                rows.append(row | {"server": NO_APP, "round": round_})
                print(f"[{NO_APP}, round {round_}] c=32: {row['throughput']:.0f} req/s", flush=True)
        spans = sink()
    return {"rows": rows, "offline_throughput": float(np.median(offline)), "offline_rounds": offline,
            "spans_received": spans}  # fmt: skip


def bench_key(work: Path) -> tuple[list[str], str]:
    """A gateway store in `work` with one key whose limits the load never reaches: the server's `--set` for the
    store, and the key."""
    from llmops.gateway import GatewayStore

    store = work / "gateway.db"
    key, _ = GatewayStore(store).create("bench", rpm=10**9, tpm=10**9, budget=10**15, period="month")
    return ["--set", f"serve.gateway_store={store}"], key


PARTS = ("all off", "key and limits", "guards", "traces (1 in 10)", ON)
"""`--gateway-parts`: all off, each part of all on alone, and all on: what each costs at c=32."""


def gateway_parts(args: argparse.Namespace, ours: list[str], env: dict, work: Path, texts: list[str]) -> dict:
    """Throughput at c=32 with each of all on's parts alone, three rounds, the servers taking turns in each."""
    with_keys, key = bench_key(work)
    rows = []
    with otlp_sink() as (endpoint, sink):
        traced = env | {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint} | TRACES_SAMPLED
        modes = {
            "all off": ([*ours, *GATEWAY_OFF], env, None),
            "key and limits": ([*ours, *with_keys, *NO_GUARDS], env, key),
            "guards": ([*ours, *NO_KEYS], env, None),
            "traces (1 in 10)": ([*ours, *GATEWAY_OFF], traced, None),
            ON: ([*ours, *with_keys], traced, key),
        }
        v1 = [json.dumps({"texts": [t]}).encode() for t in texts]
        for round_ in range(1, 4):
            for label, (command, server_env, sent) in modes.items():
                with running(label, command, "/readyz", server_env, work) as base:
                    row = asyncio.run(timed_load(f"{base}/v1/predict", v1, 32, args.warmup_s, args.duration_s, sent))
                    rows.append(row | {"server": label, "round": round_})
                    print(f"[{label}, round {round_}] c=32: {row['throughput']:.0f} req/s, errors {row['errors']}")
        spans = sink()
    return {"rows": rows, "spans_received": spans}


def gateway_parts_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]

    def runs(server: str, field: str) -> list[float]:
        return [r[field] for r in rows if r["server"] == server]

    off = float(np.median(runs("all off", "throughput")))
    table = [
        [server, f"{np.median(t):.0f} ({min(t):.0f}-{max(t):.0f})", f"{np.median(t) / off:.2f}x",
         f"{1000 / np.median(t) - 1000 / off:+.2f}", f"{np.median(runs(server, 'p50_ms')):.1f}",
         sum(runs(server, "errors"))]
        for server in PARTS for t in [runs(server, "throughput")]
    ]  # fmt: skip
    m = result["machine"]
    return f"""# Gateway overhead, part by part

What each part of *all on* ([gateway.md](gateway.md)) costs alone: champion `{result["model"]}` version
{result["version"]} ({result["kind"]}), `/v1/predict`, one tweet per request, closed loop at c=32,
{result["duration_s"]:.0f} s after {result["warmup_s"]:.0f} s warm-up; {m["cpu"]}, {m["cores"]} cores, torch
{m["torch"]}; {result["date"]}. Three rounds, the five servers taking turns in each; median (min-max). *Key and
limits*: a stored key checked and counted (`serve.gateway_store`), guards `allow`, no tracing. *Guards*: the
prediction log redacted (`serve.guards` default), no key. *Traces*: OpenTelemetry over OTLP/HTTP to a receiver
on this machine, one request in ten sampled ({result["spans_received"]} spans received), no key, guards `allow`.
`ms / request`: the added server time per request at c=32 against all off (1000 / texts/s).

{tabulate(table, headers=["server", "texts/s", "x all off", "ms / request", "p50 ms", "errors"], tablefmt="github")}
"""


def gateway_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]

    def runs(server: str, concurrency: int, field: str) -> list[float]:
        return [r[field] for r in rows if r["server"] == server and r["concurrency"] == concurrency]

    def cell(values: list[float], digits: int = 0) -> str:
        return f"{np.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    off = "all off"
    table = [
        [server, c, cell(runs(server, c, "throughput")), cell(runs(server, c, "p50_ms"), 2),
         cell(runs(server, c, "p99_ms"), 1), sum(runs(server, c, "errors"))]
        for server in (off, ON, EVERY) for c in (1, 32)
    ] + [[FLOOR, 32, cell(runs(FLOOR, 32, "throughput")), cell(runs(FLOOR, 32, "p50_ms"), 2), "", 0]]  # fmt: skip
    ceiling = runs(NO_APP, 32, "throughput")
    if ceiling:  # runs before it was measured have none
        p50, p99 = cell(runs(NO_APP, 32, "p50_ms"), 2), cell(runs(NO_APP, 32, "p99_ms"), 1)
        table.append([NO_APP, 32, cell(ceiling), p50, p99, sum(runs(NO_APP, 32, "errors"))])

    def ratio(server: str) -> float:
        return float(np.median(runs(server, 32, "throughput")) / np.median(runs(off, 32, "throughput")))

    p50_cost = float(np.median(runs(ON, 1, "p50_ms")) - np.median(runs(off, 1, "p50_ms")))
    offline = result["offline_throughput"]
    bound = 1 / (1 / offline + 1 / float(np.median(runs(FLOOR, 32, "throughput"))))
    served = float(np.median(runs(ON, 32, "throughput"))) / bound
    served_off = float(np.median(runs(off, 32, "throughput"))) / bound
    checks = [
        ["all on >= 0.9x all off, throughput at c=32", f"{ratio(ON):.2f}x", ratio(ON) >= 0.9],
        ["all on p50 at c=1 <= all off's + 1 ms", f"{p50_cost:+.2f} ms", p50_cost <= 1.0],
        ["all on at c=32 >= 0.8x the bound 1 / (1/model-only + 1/HTTP alone)", f"{served:.2f}x of {bound:.0f}",
         served >= 0.8],
    ]  # fmt: skip
    result["targets"] = [{"target": t, "measured": m, "met": bool(ok)} for t, m, ok in checks]
    no_app_line = (
        f"*{NO_APP}* (`bench/bare_server.py`: the service's micro-batcher and model behind uvicorn, JSON in and out, "
        f"nothing else) reaches {float(np.median(ceiling)) / bound:.2f}x of the bound: what these cores serve when "
        "no app stands in a request's way.\n"
        if ceiling
        else ""
    )
    rounds = result.get("offline_rounds")  # runs before it was timed per round have one figure
    offline_cell = cell(rounds) if rounds else f"{offline:.0f}"
    m = result["machine"]
    return f"""# Gateway overhead

Champion `{result["model"]}` version {result["version"]} ({result["kind"]}), `/v1/predict`, one tweet per request,
closed loop, {result["duration_s"]:.0f} s per level after {result["warmup_s"]:.0f} s warm-up; server and load
generator share the machine ({m["cpu"]}, {m["cores"]} cores, torch {m["torch"]}); {result["date"]}. Three rounds,
the servers taking turns in each; median (min-max) of the three. *All on*: every request sends a stored key
(scoped, with per-minute, per-minute-token and monthly limits, taken from `gateway.db` in leases), the prediction
log is redacted (`serve.guards` default), and requests are traced with OpenTelemetry, exported over OTLP/HTTP to a
receiver on this machine that decodes them ({result["spans_received"]} spans received), one request in ten
sampled (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.1`). *Every request traced*:
the same with the SDK's default sampler. *All off*: no key asked, guards `allow`, no tracing. Model-only offline
throughput: {offline_cell} texts/s{" (in-process, timed in each round before the servers)" if rounds else ""}.

{tabulate(table, headers=["server", "c", "texts/s", "p50 ms", "p99 ms", "errors"], tablefmt="github")}

{tabulate(checks, headers=["target", "measured", "met"], tablefmt="github")}

Every request traced: {ratio(EVERY):.2f}x all off at c=32. All off itself reaches {served_off:.2f}x of the bound.
{no_app_line}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    parser.add_argument("--set", action="append", default=[], help="serve.<key>=value for our server (both modes)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gateway", action="store_true", help="keys, limits, guards, traces on vs off (gateway.md)")
    mode.add_argument("--gateway-parts", action="store_true", help="each of those alone (gateway_parts.md)")
    args = parser.parse_args()

    cfg = load_config(args.config)
    uri = resolve_tracking_uri(cfg.registry)
    name = cfg.registry.model_name
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.set_tracking_uri(uri)
    version = str(client.get_model_version_by_alias(name, CHAMPION).version)
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # mlflow models serve execs `uvicorn`

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        texts = test_texts(client, name, version, work)[: args.texts]
        candidate = download_candidate(name, version, work / "candidate", tracking_uri=uri)
        kind = Classifier(candidate).meta.kind
        offline = offline_throughput(candidate, texts, cfg.serve.max_batch_size)
        print(f"model-only offline: {offline:.0f} texts/s", flush=True)

        config = str(Path(args.config).resolve())
        ours = [str(VENV_BIN / "llmops"), "serve", "--config", config, "--port", "{port}"]
        ours += ["--set", f"serve.prediction_log={work / 'predictions.db'}"]
        ours += ["--set", f"serve.model_cache={work / 'cache'}"]
        ours += ["--set", f"serve.models=[{name}]"]  # the classifier alone, as the peer serves it
        ours += [part for item in args.set for part in ("--set", item)]
        v1 = ("/v1/predict", lambda text: {"texts": [text]})
        peer_cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@{CHAMPION}"]
        peer_cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", "{port}"]
        invocations = ("/invocations", lambda text: {"inputs": [text]})
        runs = {
            "on": ("llmops (batching on)", ours, "/readyz", v1),
            "off": ("llmops (batching off)", [*ours, "--set", "serve.batching=false"], "/readyz", v1),
            "peer": ("mlflow models serve", peer_cmd, "/ping", invocations),
        }
        if args.gateway or args.gateway_parts:
            if args.gateway:
                batch = cfg.serve.max_batch_size
                no_app = [sys.executable, str(REPO / "bench" / "bare_server.py"), str(candidate), "--port", "{port}"]
                no_app += ["--max-batch-size", str(batch)]
                model_only = partial(offline_throughput, candidate, texts, batch)
                measured = gateway(args, ours, texts, model_only, env, work, no_app)
                stem, measure, report = "gateway", measured, gateway_markdown
            else:
                stem, measure, report = (
                    "gateway_parts",
                    gateway_parts(args, ours, env, work, texts),
                    gateway_parts_markdown,
                )
            result = measure | {
                "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "model": name, "version": version,
                "kind": kind, "warmup_s": args.warmup_s, "duration_s": args.duration_s,
            }  # fmt: skip
            text = report(result)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
            (RESULTS / f"{stem}.md").write_text(text)
            print(text)
            return
        rows = []
        for key in args.servers:
            label, command, ready, protocol = runs[key]
            rows += measure_server(label, command, ready, protocol, texts, args, env, work)
        if args.servers != list(SERVERS):
            print(tabulate(rows, headers="keys", floatfmt=".1f"))
            return  # a partial run is an experiment: the results files hold complete runs only

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "model": name,
        "version": version,
        "kind": kind,
        "batch_size": cfg.serve.max_batch_size,
        "warmup_s": args.warmup_s,
        "duration_s": args.duration_s,
        "offline_throughput": offline,
        "rows": rows,
    }
    result["targets"] = targets(rows, offline)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "serving.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
