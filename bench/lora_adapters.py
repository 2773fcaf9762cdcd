"""Several LoRA adapters of one base in one batch, against the same adapters merged into whole models
(`bench/generation_serving.py --adapters`).

Four adapters as `train.lora: {}` makes them (peft's defaults for the architecture, r=16, alpha=32) over the fp32
student registered as `tweet-generator-fp32`, each registered as its own model (`train.lora.adapter_of`'s layout),
and each merged into a whole copy of the base, registered too. Their factors are random (small): what is timed
is the work, and every answer is held to the same length (`min_tokens` = `max_tokens`), so what the adapters
would write does not change it. Three `llmops serve` processes, started once and measured round-robin, three
repetitions, c=16 closed loop:
- the first merged model alone (every request to it): the base's own speed;
- the base and the four adapters in one service, requests spread over the four adapters (rows of every adapter in
  one running batch);
- the four merged models in one service (four engines, requests spread over them).
Resident memory of each server (after loading, and its peak) is read from /proc.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import mlflow
import numpy as np
import peft
import torch
from machine import machine
from mlflow import MlflowClient
from servers import PIDS, closed_loop, running, streamed_chat
from tabulate import tabulate

from llmops import registry
from llmops.candidate_folder import CandidateMeta, load_saved_tokenizer, save_hf_candidate
from llmops.registry import CHAMPION

ADAPTERS = [f"tweet-adapter-{i}" for i in range(4)]
MERGED = [f"tweet-merged-{i}" for i in range(4)]
REPEATS = 3
TOKENS = 64


def _register(uri: str, name: str, folder: Path) -> None:
    with mlflow.start_run(run_name=f"bench-{name}"):
        model_uri = registry.log_generator_model(folder, ["write a positive tweet about coachella"])
        version = registry.register(name, model_uri, {"task": "causal-lm", "candidate": "teacher"})
    MlflowClient(uri, registry_uri=uri).set_registered_model_alias(name, CHAMPION, version)


def build(workdir: Path, uri: str, base_name: str, fp32: Path) -> None:
    """The four adapters over `base_name`'s champion (the fp32 student in `fp32`) and their merged copies, each
    registered with a `champion` alias (once per store)."""
    from transformers import AutoModelForCausalLM

    client = MlflowClient(uri, registry_uri=uri)
    if client.search_model_versions(f"name='{MERGED[-1]}'"):
        return
    base_version = client.get_model_version_by_alias(base_name, CHAMPION).version
    base_meta = CandidateMeta.load(fp32)
    tokenizer = load_saved_tokenizer(fp32)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for i, (adapter, merged) in enumerate(zip(ADAPTERS, MERGED, strict=True)):
        model = AutoModelForCausalLM.from_pretrained(fp32)
        lora = peft.LoraConfig(r=16, lora_alpha=32, task_type=peft.TaskType.CAUSAL_LM)
        model = peft.get_peft_model(model, lora)
        torch.manual_seed(i)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.normal_(0, 0.02)
        folder = workdir / "bench-adapters" / adapter
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        recipe = {
            "base": str(fp32),
            "prompt_format": base_meta.recipe.get("prompt_format", "plain"),
            "adapter_of": {"model": base_name, "version": str(base_version)},
        }
        CandidateMeta("teacher", [], base_meta.max_length, recipe, task="causal-lm").save(folder)
        _register(uri, adapter, folder)
        whole = workdir / "bench-adapters" / merged
        meta = CandidateMeta("teacher", [], base_meta.max_length, dict(base_meta.recipe), task="causal-lm")
        save_hf_candidate(model.merge_and_unload(), tokenizer, meta, whole)
        _register(uri, merged, whole)


async def _one(session: aiohttp.ClientSession, base: str, model: str, chat: list) -> dict:
    body = {"model": model, "messages": chat, "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    return await streamed_chat(session, base, body)


async def _level(base: str, models: list[str], chats: list, requests: int) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        return await closed_loop(
            16, requests, lambda i: _one(session, base, models[i % len(models)], chats[i % len(chats)])
        )


def resident_mb(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def measure(
    workdir: Path, uri: str, base_name: str, fp32: Path, chats: list, command: list[str], env: dict, requests: int
) -> None:
    """Build, serve the three set-ups at once, measure them round-robin, write bench/results/lora_adapters.*."""
    from contextlib import ExitStack

    build(workdir, uri, base_name, fp32)
    setups = {
        "merged base alone": ([MERGED[0]], [MERGED[0]]),
        "four adapters over one base": ([base_name, *ADAPTERS], ADAPTERS),
        "four merged models": (MERGED, MERGED),
    }
    rows: list[dict[str, Any]] = []
    memory: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        bases = {}
        for label, (served, _) in setups.items():
            models = f"serve.models=[{', '.join(served)}]"
            argv = [models if part.startswith("serve.models=") else part for part in command]
            log = workdir / f"bench-predictions-{label.replace(' ', '-')}.db"  # one writer per SQLite file
            argv += ["--set", f"serve.prediction_log={log}"]
            bases[label] = stack.enter_context(running(label, argv, "/readyz", env, workdir))
            memory[label] = resident_mb(PIDS[label])
        for repeat in range(REPEATS):
            for label, (_, asked) in setups.items():  # interleaved: the machine's drift falls on each alike
                row = asyncio.run(_level(bases[label], asked, chats, requests))
                row |= {"setup": label, "repeat": repeat}
                print(f"[{label}] {row['tokens_per_s']:.0f} tok/s, errors {row['errors']}", flush=True)
                rows.append(row)
        for label in setups:
            memory[label] = {"loaded_mb": memory[label]["VmRSS"], "peak_mb": resident_mb(PIDS[label])["VmHWM"]}
    write(rows, memory, requests)


def _median(rows: list[dict[str, Any]], setup: str, key: str) -> tuple[float, float, float]:
    values = [r[key] for r in rows if r["setup"] == setup]
    return float(np.median(values)), min(values), max(values)


def write(rows: list[dict[str, Any]], memory: dict[str, dict[str, float]], requests: int) -> None:
    results = Path(__file__).resolve().parent / "results"
    m = machine()
    speed = {setup: _median(rows, setup, "tokens_per_s") for setup in memory}
    table = [
        [setup, f"{t[0]:.0f} ({t[1]:.0f}-{t[2]:.0f})", f"{_median(rows, setup, 'ttft_p99_ms')[0]:.0f}",
         f"{_median(rows, setup, 'e2e_p99_ms')[0]:.0f}", sum(r["errors"] for r in rows if r["setup"] == setup),
         f"{memory[setup]['loaded_mb']:.0f}", f"{memory[setup]['peak_mb']:.0f}"]
        for setup, t in speed.items()
    ]  # fmt: skip
    mixed = speed["four adapters over one base"][0]
    vs_base, vs_merged = mixed / speed["merged base alone"][0], mixed / speed["four merged models"][0]
    adapters_mb = memory["four adapters over one base"]["peak_mb"]
    merged_mb = memory["four merged models"]["peak_mb"]
    checks = [
        {"target": "c=16, four adapters mixed: >= 0.8x the tokens/s of the merged base alone",
         "measured": f"{vs_base:.2f}x", "met": vs_base >= 0.8},
        {"target": "... >= 2x four merged models in one service", "measured": f"{vs_merged:.2f}x",
         "met": vs_merged >= 2.0},
        {"target": "... at the same memory budget or less (peak resident memory)",
         "measured": f"{adapters_mb:.0f} vs {merged_mb:.0f} MB", "met": adapters_mb <= merged_mb},
    ]  # fmt: skip
    result = {"machine": m, "date": time.strftime("%Y-%m-%d"), "rows": rows, "memory": memory, "targets": checks}
    (results / "lora_adapters.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Four LoRA adapters of one base in one batch",
        "",
        f"`llmops serve` on the LLM quickstart's fp32 student (`tweet-generator-fp32`, a 3-layer MiniLM decoder) "
        f"and four LoRA adapters of it (peft's defaults for the architecture: query and value, r=16), each also "
        f"merged into a whole model. {m['cpu']}, {m['cores']} cores, torch {m['torch']}. Date: {result['date']}. "
        f"Chats from the held-out test split, greedy, exactly {TOKENS} new tokens each, closed loop at c=16, "
        f"{requests} requests per pass after a warm-up, the three servers measured round-robin, {REPEATS} "
        "repetitions: median (min-max). Memory: each server's resident set after loading and its peak.",
        "",
        tabulate(
            table,
            headers=["set-up", "tokens/s", "TTFT p99 ms", "e2e p99 ms", "errors", "RSS loaded MB", "RSS peak MB"],
            tablefmt="github",
        ),
        "",
        "## Targets",
        "",
        tabulate(checks, headers="keys", tablefmt="github"),
        "",
    ]
    (results / "lora_adapters.md").write_text("\n".join(md))
    print("\n".join(md))
