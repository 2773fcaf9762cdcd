"""Generation serving benchmark: our server (continuous batching on and off) vs `transformers serve` (default and
`--continuous-batching`) vs `mlflow models serve`, the same generator champion, one run, one machine.

1. A registry with a `tweet-generator` champion: `--workdir` of an earlier `llmops run --config
   configs/llm-quickstart.yaml`, else that lifecycle is run first in a scratch folder.
2. Each server in turn on loopback; a closed-loop load generator (aiohttp, this process) keeps `c` requests in
   flight: the champion's held-out test prompts as chats, greedy, exactly 64 new tokens each (the end token held
   back: `min_tokens` for ours, a generation config for `transformers serve`, `min_new_tokens` for the pyfunc),
   streamed where the server streams. At c = 1, 4 and 16, a fixed number of requests per level after a warm-up.
   - ours: `llmops serve` on the registered champion, `/v1/chat/completions`; and on the champion's fp32 student
     (registered beside it as `tweet-generator-fp32`), the weights `transformers serve` runs;
   - `transformers serve` cannot read a torch-int8 state dict: it serves the champion's fp32 student (the same
     weights before quantization; with an fp32 champion, the champion itself);
   - `transformers serve --continuous-batching` ignores `min_new_tokens`: its answers stop at the end token (the
     tokens/answer column shows it); tokens/s counts what each server wrote, from its usage;
   - `mlflow models serve` on `models:/tweet-generator@champion` (its pyfunc, `/invocations`, no streaming: its
     time to first token is its whole answer).
3. Generated tokens/s (from the answers' token counts), time to first token p50 / p99, end-to-end p99.
4. Writes bench/results/generation_serving.json and .md, with the machine and the targets.

    make bench-generation-serving
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import mlflow
import pandas as pd
from machine import machine
from mlflow import MlflowClient
from servers import closed_loop, read_stream, running
from tabulate import tabulate

from llmops import registry
from llmops.generation.evaluate import prompts_of
from llmops.registry import CHAMPION, TAG

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
VENV_BIN = Path(sys.executable).parent
NAME = "tweet-generator"
FP32 = "tweet-generator-fp32"
"""The champion's fp32 student, registered beside it in the benchmark's store: our server on the very weights
`transformers serve` runs, so the engine is compared apart from int8."""
MAX_TOKENS = 64


def prepare(workdir: Path | None) -> Path:
    """A folder holding mlflow.db with a generator champion (running the LLM quickstart there if needed)."""
    if workdir is not None:
        return workdir
    directory = Path(tempfile.mkdtemp(prefix="llmops-bench-gen-serving-"))
    command = [str(VENV_BIN / "llmops"), "run", "--config", str(REPO / "configs" / "llm-quickstart.yaml")]
    print(f"registering a champion: {' '.join(command)}", flush=True)
    with (directory / "lifecycle.log").open("w") as log:
        subprocess.run(command, cwd=directory, stdout=log, stderr=subprocess.STDOUT, check=True)
    return directory


def champion_facts(uri: str, workdir: Path) -> tuple[str, dict[str, str], list[list[dict[str, str]]], Path]:
    """Version, tags, the held-out test prompts (as chats) and the fp32 folder `transformers serve` can read."""
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias(NAME, CHAMPION)
    tags = dict(version.tags)
    test = pd.read_parquet(
        mlflow.artifacts.download_artifacts(tags[TAG + "test_data"], dst_path=str(workdir / "t"), tracking_uri=uri)
    )
    chats = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts_of(test)]
    if tags[TAG + "candidate"] in ("int8", "bnb-int8", "nf4"):  # quantized: the student they were made from
        fp32 = next((workdir / "artifacts" / "student").glob("*/model"))
    else:
        fp32 = workdir / "artifacts" / tags[TAG + "candidate"] / tags[TAG + "candidate_key"] / "model"
    return str(version.version), tags, chats, fp32


def forced_length(kind: str, generation_config: dict[str, Any]) -> dict[str, Any]:
    """What each server needs in a request to write exactly MAX_TOKENS tokens (the end token held back)."""
    if kind == "ours":  # vLLM's extension
        return {"min_tokens": MAX_TOKENS}
    if kind == "openai":  # transformers serve: a whole generation config in the body
        forced = generation_config | {"max_new_tokens": MAX_TOKENS, "min_new_tokens": MAX_TOKENS, "do_sample": False}
        return {"generation_config": json.dumps(forced)}
    return {"min_new_tokens": MAX_TOKENS}  # the pyfunc's params


def register_fp32(uri: str, fp32: Path) -> None:
    """`FP32@champion`: the fp32 student as a registered model of its own (once per store)."""
    client = MlflowClient(uri, registry_uri=uri)
    if client.search_model_versions(f"name='{FP32}'"):
        return
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_name="bench-fp32-student"):
        model_uri = registry.log_generator_model(fp32, ["write a positive tweet about coachella"])
        version = registry.register(FP32, model_uri, {"task": "causal-lm", "candidate": "student"})
    client.set_registered_model_alias(FP32, CHAMPION, version)


async def _one(
    session: aiohttp.ClientSession, base: str, kind: str, chat: list[dict[str, str]], model: str, extra: dict
) -> dict:
    """One request; returns ttft, e2e and generated tokens (or an error)."""
    start = time.perf_counter()
    if kind == "invocations":
        body = {"inputs": [{"messages": chat}], "params": {"max_new_tokens": MAX_TOKENS, **extra}}
        async with session.post(f"{base}/invocations", json=body) as response:
            data = await response.json()
            done = time.perf_counter()
            if response.status != 200:
                return {"error": response.status}
        predictions = data["predictions"]
        tokens = int(predictions[0]["completion_tokens"])
        return {"ttft": done - start, "e2e": done - start, "tokens": tokens}
    body: dict[str, Any] = {
        "model": model,
        "messages": chat,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        **extra,
    }
    if kind == "ours":
        body["stream_options"] = {"include_usage": True}
    async with session.post(f"{base}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            await response.read()
            return {"error": response.status}
        first, tokens, usage = await read_stream(response, lambda choice: (choice.get("delta") or {}).get("content"))
    done = time.perf_counter()
    return {"ttft": (first or done) - start, "e2e": done - start, "tokens": usage if usage is not None else tokens}


async def _level(
    base: str, kind: str, model: str, chats: list, concurrency: int, requests: int, extra: dict
) -> dict[str, Any]:
    """`requests` answers at `concurrency` in flight (after one warm-up request per slot)."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await closed_loop(
            concurrency, requests, lambda i: _one(session, base, kind, chats[i % len(chats)], model, extra)
        )


def servers(workdir: Path, fp32: Path) -> dict[str, tuple[list[str], str, str, str]]:
    """label -> (command, ready path, request kind, model field)."""
    ours = [str(VENV_BIN / "llmops"), "serve", "--config", str(REPO / "configs" / "llm-quickstart.yaml")]
    ours += ["--port", "{port}", "--set", f"serve.models=[{NAME}]"]
    ours += ["--set", f"serve.prediction_log={workdir / 'bench-predictions.db'}"]
    ours += ["--set", f"serve.model_cache={workdir / 'bench-cache'}", "--set", "serve.max_waiting=256"]
    transformers = [str(VENV_BIN / "transformers"), "serve", str(fp32), "--host", "127.0.0.1", "--port", "{port}"]
    mlflow_serve = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@{CHAMPION}"]
    mlflow_serve += ["--env-manager", "local", "--host", "127.0.0.1", "--port", "{port}"]
    ours_fp32 = [part.replace(f"serve.models=[{NAME}]", f"serve.models=[{FP32}]") for part in ours]
    return {
        "llmops (continuous batching)": (ours, "/readyz", "ours", NAME),
        "llmops (continuous batching), fp32 student": (ours_fp32, "/readyz", "ours", FP32),
        "llmops (one sequence at a time)": (
            [*ours, "--set", "serve.continuous_batching=false"],
            "/readyz",
            "ours",
            NAME,
        ),
        "transformers serve": (transformers, "/health", "openai", str(fp32)),
        "transformers serve --continuous-batching": (
            [*transformers, "--continuous-batching"],
            "/health",
            "openai",
            str(fp32),
        ),
        "mlflow models serve": (mlflow_serve, "/ping", "invocations", NAME),
    }


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    at16 = {r["server"]: r for r in rows if r["concurrency"] == 16 and r["requests"]}
    ours = at16["llmops (continuous batching)"]
    off = at16["llmops (one sequence at a time)"]
    peers = {k: v for k, v in at16.items() if not k.startswith("llmops")}
    best = max(peers.values(), key=lambda r: r["tokens_per_s"])
    checks = [
        ("c=16: >= 4x the tokens/s of one sequence at a time", ours["tokens_per_s"] / off["tokens_per_s"], 4.0),
        (
            f"c=16: >= 1.5x the best peer's tokens/s ({best['server']})",
            ours["tokens_per_s"] / best["tokens_per_s"],
            1.5,
        ),
    ]
    same = at16.get("llmops (continuous batching), fp32 student")
    if same is not None:  # apart from int8: the same fp32 weights as transformers serve
        checks.append(
            (
                f"c=16, fp32 student: >= 1.5x the best peer's tokens/s ({best['server']})",
                same["tokens_per_s"] / best["tokens_per_s"],
                1.5,
            )
        )
    out = [{"target": t, "measured": f"{v:.2f}", "met": v >= bound} for t, v, bound in checks]
    for label, peer in peers.items():
        out.append(
            {
                "target": f"c=16: TTFT p99 lower than {label}",
                "measured": f"{ours['ttft_p99_ms']:.0f} vs {peer['ttft_p99_ms']:.0f} ms",
                "met": ours["ttft_p99_ms"] < peer["ttft_p99_ms"],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="a folder with mlflow.db and artifacts/ of an LLM quickstart")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    parser.add_argument("--only", nargs="*", help="server labels to run (default: all)")
    args = parser.parse_args()
    workdir = prepare(args.workdir).resolve()
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    version, tags, chats, fp32 = champion_facts(uri, workdir)
    generation_config = json.loads((fp32 / "generation_config.json").read_text())
    register_fp32(uri, fp32)
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # mlflow models serve execs `uvicorn`
    rows = []
    for label, (command, ready, kind, model) in servers(workdir, fp32).items():
        if args.only and label not in args.only:
            continue
        with running(label, command, ready, env, workdir) as base:
            for concurrency in args.concurrency:
                requests = max(args.requests, concurrency)
                extra = forced_length(kind, generation_config)
                row = asyncio.run(_level(base, kind, model, chats, concurrency, requests, extra))
                row["server"] = label
                print(
                    f"[{label}] c={concurrency}: {row['tokens_per_s']:.0f} tok/s, TTFT p99 {row['ttft_p99_ms']} ms",
                    flush=True,
                )
                rows.append(row)
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": NAME,
        "version": version,
        "candidate": tags.get(TAG + "candidate"),
        "transformers_serves": str(fp32.relative_to(workdir)),
        "max_tokens": MAX_TOKENS,
        "rows": rows,
        "targets": targets(rows) if not args.only else [],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generation_serving.json").write_text(json.dumps(result, indent=2))
    table = tabulate(
        [
            [r["server"], r["concurrency"], r["requests"], r["errors"], round(r["tokens_per_s"]), r["mean_tokens"],
             r["ttft_p50_ms"], r["ttft_p99_ms"], r["e2e_p99_ms"]]
            for r in rows
        ],
        headers=["server", "c", "requests", "errors", "tokens/s", "tokens/answer", "TTFT p50 ms", "TTFT p99 ms",
                 "e2e p99 ms"],
        tablefmt="github",
        floatfmt=".1f",
    )  # fmt: skip
    m = result["machine"]
    md = [
        "# Generation serving benchmark",
        "",
        f"Champion: `{NAME}` version {version} ({result['candidate']}); `transformers serve` serves "
        f"`{result['transformers_serves']}` (fp32). Chats from the held-out test split, greedy, exactly "
        f"{MAX_TOKENS} new tokens each, closed loop, server and load generator on one machine: {m['cpu']}, "
        f"{m['cores']} cores, torch {m['torch']}, CUDA: {m['cuda'] or 'none'}. Date: {result['date']}. "
        f"`llmops ..., fp32 student` serves `{FP32}`, the same fp32 weights as `transformers serve`. "
        "`transformers serve --continuous-batching` ignores `min_new_tokens`: its answers end at the end token "
        "(tokens/answer); tokens/s counts what each server wrote.",
        "",
        table,
        "",
        "## Targets",
        "",
        tabulate(result["targets"], headers="keys", tablefmt="github") if result["targets"] else "(partial run)",
        "",
    ]
    (RESULTS / "generation_serving.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
