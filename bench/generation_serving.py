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

With `--surface`, what LLM tools ask of the server instead, on `llmops serve` alone (bench/results/
openai_surface.json and .md):
- structured output: the same chats with and without a JSON schema (`response_format`), c=16, greedy, up to
  MAX_TOKENS new tokens, three interleaved repetitions; tokens/s and how many structured answers parse and
  validate;
- lm-evaluation-harness on the test split's sentiment questions (a multiple-choice task scored from echoed prompt
  logprobs, a generation task by exact match): `local-completions` against the served fp32 student, and the
  harness's in-process Hugging Face backend on the same checkpoint.

With `--adapters`, four LoRA adapters of the fp32 student in one batch against the same adapters merged into four
models (bench/lora_adapters.py; bench/results/lora_adapters.json and .md).

    make bench-generation-serving
    .venv/bin/python bench/generation_serving.py --surface --workdir DIR
    .venv/bin/python bench/generation_serving.py --adapters --workdir DIR
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
import jsonschema
import lora_adapters
import mlflow
import numpy as np
import pandas as pd
import yaml
from machine import machine
from mlflow import MlflowClient
from servers import closed_loop, running, streamed_chat
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
    return await streamed_chat(session, base, body)


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


RATING = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["negative", "neutral", "positive"]},
        "topic": {"type": "string", "maxLength": 24},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["sentiment", "topic", "confidence"],
    "additionalProperties": False,
}
"""The structured answers' schema: bounded, so a complete answer fits MAX_TOKENS."""
SURFACE_REPEATS = 3
SURFACE_MODES = ("free text", "json schema", "free text, same length")
STRUCTURED_COLUMNS = ["answers", "tokens/s", "tokens/answer", "TTFT p99 ms", "e2e p99 ms", "valid"]
LABELS = ["negative", "neutral", "positive"]


async def _chat(session: aiohttp.ClientSession, base: str, model: str, chat: list, extra: dict) -> dict:
    """One streamed chat answer: ttft, e2e, tokens and its text and finish reason."""
    body = {"model": model, "messages": chat, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    body |= {"stream_options": {"include_usage": True}} | extra
    start = time.perf_counter()
    first, text, finish, tokens = None, "", None, 0
    async with session.post(f"{base}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            return {"error": response.status}
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content")
                if piece:
                    first, text = first or time.perf_counter(), text + piece
                finish = choice.get("finish_reason") or finish
    done = time.perf_counter()
    return {"ttft": (first or done) - start, "e2e": done - start, "tokens": tokens, "text": text, "finish": finish}


def _valid(answer: dict) -> bool:
    try:
        jsonschema.validate(json.loads(answer["text"]), RATING)
    except (ValueError, jsonschema.ValidationError):
        return False
    return answer["finish"] == "stop"


async def _structured_level(
    base: str, chats: list, mode: str, requests: int, lengths: dict[int, int]
) -> dict[str, Any]:
    """c=16 closed loop in one of three modes: `json schema`, `free text`, or `free text, same length`: each
    chat's answer held to exactly the length of its structured answer (`lengths`, by chat), so both modes do the
    same work in the same mix (answers of one length would join and leave the batch in lockstep, a cheaper
    schedule than the structured answers' staggered one). `json schema` fills `lengths`."""
    extra: dict[str, Any] = {}
    if mode == "json schema":
        extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "rating", "schema": RATING}}}
    answers: list[dict] = []

    async def one(session: aiohttp.ClientSession, i: int) -> dict:
        chat = i % len(chats)
        length = lengths.get(chat, MAX_TOKENS // 2)
        held = {"min_tokens": length, "max_tokens": length} if mode == "free text, same length" else {}
        answer = await _chat(session, base, NAME, chats[chat], extra | held)
        if mode == "json schema" and "error" not in answer:
            lengths[chat] = answer["tokens"]
        answers.append(answer)
        return answer

    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        row = await closed_loop(16, requests, lambda i: one(session, i))
    measured = answers[16:]  # after the warm-up
    row["valid"] = sum(_valid(a) for a in measured) if mode == "json schema" else None
    row["answers"] = len(measured)
    return row


def _lm_eval_tasks(directory: Path, chats: list, labels: list[str], tokenizer: Any) -> list[str]:
    """Two tasks on a JSONL of the test split's sentiment questions, rendered as the model reads them."""
    from llmops.generation.data import render_prompt

    rows = [
        {"prompt": render_prompt(tokenizer, "", chat), "choices": LABELS, "answer": LABELS.index(label)}
        for chat, label in zip(chats, labels, strict=True)
    ]
    questions = directory / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    files = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(questions)}}, "test_split": "test"}
    mean = {"aggregation": "mean", "higher_is_better": True}
    tasks = {
        "llmops_which_label": {
            "output_type": "multiple_choice",
            "doc_to_text": "{{prompt}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", **mean}],
        },
        "llmops_write_label": {
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{choices[answer]}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False, "temperature": 0.0},
            "metric_list": [{"metric": "exact_match", **mean}],
        },
    }
    for name, task in tasks.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(files | {"task": name} | task))
    return list(tasks)


def _harness(tasks: list[str], directory: Path, model: str, model_args: dict[str, Any]) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, task_manager=TaskManager(include_path=str(directory))
    )
    assert results is not None
    scores = {t: results["results"][t] for t in tasks}
    return {
        "accuracy": scores["llmops_which_label"]["acc,none"],
        "exact_match": float(scores["llmops_write_label"]["exact_match,none"]),
        "seconds": time.perf_counter() - start,
    }


def surface(workdir: Path, uri: str, chats: list, fp32: Path, env: dict[str, str], requests: int) -> None:
    """Structured output and lm-evaluation-harness against `llmops serve` (see the module's doc)."""
    from transformers import AutoTokenizer

    command, ready, _, _ = servers(workdir, fp32)["llmops (continuous batching)"]
    test = pd.read_parquet(next((workdir / "t").rglob("*.parquet")))
    classify = test[test["instruction"] == "classify"]
    questions = [
        json.loads(m) if m else [{"role": "user", "content": p}]
        for m, p in zip(classify["messages"], classify["prompt"], strict=True)
    ]
    rows: list[dict[str, Any]] = []
    with running("llmops surface", command, ready, env, workdir) as base:
        lengths: dict[int, int] = {}
        for repeat in range(SURFACE_REPEATS):
            for mode in SURFACE_MODES:  # interleaved: the machine's drift falls on every mode alike
                row = asyncio.run(_structured_level(base, chats, mode, requests, lengths))
                row |= {"mode": mode, "repeat": repeat}
                print(f"[{mode}] {row['tokens_per_s']:.0f} tok/s, valid {row['valid']}", flush=True)
                rows.append(row)
    directory = workdir / "lm-eval-tasks"
    directory.mkdir(exist_ok=True)
    tasks = _lm_eval_tasks(directory, questions, list(classify["completion"]), AutoTokenizer.from_pretrained(fp32))
    # the fp32 student alone: lm-eval asks `/tokenizer_info` and `/tokenize` without a model name
    alone = [part.replace(f"serve.models=[{NAME}]", f"serve.models=[{FP32}]") for part in command]
    with running("llmops lm-eval", alone, ready, env, workdir) as base:
        served = _harness(
            tasks, directory, "local-completions",
            {"base_url": f"{base}/v1/completions", "model": FP32, "num_concurrent": 4, "max_retries": 1},
        )  # fmt: skip
    local = _harness(
        tasks, directory, "hf", {"pretrained": str(fp32), "dtype": "float32", "device": "cpu", "add_bos_token": False}
    )
    write_surface(rows, served, local, len(questions))


def _median(rows: list[dict[str, Any]], mode: str, key: str) -> tuple[float, float, float]:
    values = [r[key] for r in rows if r["mode"] == mode]
    return float(np.median(values)), min(values), max(values)


def _check(target: str, measured: str, met: bool) -> dict[str, Any]:
    return {"target": target, "measured": measured, "met": met}


def write_surface(rows: list[dict[str, Any]], served: dict, local: dict, questions: int) -> None:
    m = machine()
    free, schema = _median(rows, "free text", "tokens_per_s"), _median(rows, "json schema", "tokens_per_s")
    same = _median(rows, "free text, same length", "tokens_per_s")
    valid = sum(r["valid"] for r in rows if r["mode"] == "json schema")
    answered = sum(r["answers"] for r in rows if r["mode"] == "json schema")
    table = [
        [mode, f"{t[0]:.0f} ({t[1]:.0f}-{t[2]:.0f})", f"{_median(rows, mode, 'mean_tokens')[0]:.1f}",
         f"{_median(rows, mode, 'ttft_p99_ms')[0]:.0f}", f"{_median(rows, mode, 'e2e_p99_ms')[0]:.0f}",
         f"{valid}/{answered}" if mode == "json schema" else "-"]
        for mode, t in (("free text", free), ("json schema", schema), ("free text, same length", same))
    ]  # fmt: skip
    harness = [
        [label, f"{r['accuracy']:.4f}", f"{r['exact_match']:.4f}", f"{r['seconds']:.0f}"]
        for label, r in (("llmops serve (local-completions)", served), ("Hugging Face in-process (hf)", local))
    ]
    ratio, same_work = schema[0] / free[0], schema[0] / same[0]
    gap = abs(served["accuracy"] - local["accuracy"]) * 100
    same_match = f"{served['exact_match']:.4f} vs {local['exact_match']:.4f}"
    checks = [
        _check("c=16: tokens/s with a JSON schema >= 0.85x without", f"{ratio:.2f}x", ratio >= 0.85),
        _check("... and >= 0.85x free answers of the same length", f"{same_work:.2f}x", same_work >= 0.85),
        _check("every structured answer valid", f"{valid}/{answered}", valid == answered),
        _check("lm-eval multiple choice: served within 0.5 point of in-process", f"{gap:.2f} points", gap <= 0.5),
        _check("lm-eval generation: same exact match", same_match, served["exact_match"] == local["exact_match"]),
    ]
    result = {"machine": m, "date": time.strftime("%Y-%m-%d"), "schema": RATING, "rows": rows, "served": served,
              "in_process": local, "questions": questions, "targets": checks}  # fmt: skip
    (RESULTS / "openai_surface.json").write_text(json.dumps(result, indent=2))
    md = [
        "# What LLM tools ask of the server: structured output and lm-evaluation-harness",
        "",
        f"`llmops serve` on the LLM quickstart's champion (`{NAME}`) and its fp32 student (`{FP32}`). {m['cpu']}, "
        f"{m['cores']} cores, torch {m['torch']}. Date: {result['date']}. Server and load generator on one machine.",
        "",
        f"Structured output: the held-out test chats, greedy, up to {MAX_TOKENS} new tokens, closed loop at c=16, "
        f"with and without `response_format` (schema below), and free answers each held to the length of the same "
        f"chat's structured answer (`min_tokens` = `max_tokens`: the same work in the same mix), {SURFACE_REPEATS} "
        "interleaved repetitions: median (min-max). An answer is valid when it parses, validates against the schema "
        "and ended by itself.",
        "",
        tabulate(table, headers=STRUCTURED_COLUMNS, tablefmt="github"),
        "",
        "```json",
        json.dumps(RATING),
        "```",
        "",
        f"lm-evaluation-harness ({questions} sentiment questions of the test split, as JSONL tasks: which label, "
        "scored from echoed prompt logprobs; write the label, exact match), the served fp32 student against the "
        "harness's in-process Hugging Face backend on the same checkpoint (`add_bos_token=False`: the remote "
        "tokenizer adds no special tokens):",
        "",
        tabulate(harness, headers=["backend", "accuracy (choice)", "exact match (writing)", "s"], tablefmt="github"),
        "",
        "## Targets",
        "",
        tabulate(checks, headers="keys", tablefmt="github"),
        "",
    ]  # fmt: skip
    (RESULTS / "openai_surface.md").write_text("\n".join(md))
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="a folder with mlflow.db and artifacts/ of an LLM quickstart")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    parser.add_argument("--only", nargs="*", help="server labels to run (default: all)")
    parser.add_argument("--surface", action="store_true", help="structured output and lm-eval instead")
    parser.add_argument("--adapters", action="store_true", help="four LoRA adapters in one batch instead")
    args = parser.parse_args()
    workdir = prepare(args.workdir).resolve()
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    version, tags, chats, fp32 = champion_facts(uri, workdir)
    generation_config = json.loads((fp32 / "generation_config.json").read_text())
    register_fp32(uri, fp32)
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # mlflow models serve execs `uvicorn`
    if args.surface:
        surface(workdir, uri, chats, fp32, env, max(args.requests, 48))
        return
    if args.adapters:
        command = servers(workdir, fp32)["llmops (continuous batching)"][0]
        lora_adapters.measure(workdir, uri, FP32, fp32, chats, command, env, max(args.requests, 48))
        return
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
