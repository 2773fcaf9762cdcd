"""LLM runtimes benchmark: a SmolLM2-135M-shaped Llama served by `llmops serve` as torch fp32, torch int8,
GGUF q8_0 and q4_K_M, OpenVINO int8 and int4, beside `llama-server` on the same GGUF files, one run, one
machine; with `--shape 0.5b`, a Qwen2.5-0.5B-shaped Qwen2 the same way (`--kinds` to serve fewer candidates).

1. The model: `model.random_init` of SmolLM2-135M's shape (30 layers, hidden 576, 9 query / 3 key-value heads,
   FFN 1536, tied embeddings) with the packaged tokenizer (no weights exist offline; speed and memory do not
   depend on the values), and its candidates built by `llmops.quantize.quantize_candidate` (the lifecycle's own
   builders: torch dynamic int8, llama.cpp's converter and quantizer, llmops' OpenVINO export and NNCF). Each
   is registered in a scratch MLflow registry as its own model with a `champion` alias.
2. Servers, all up at once, each in its own process: one `llmops serve` per candidate (so each one's resident
   memory is its own), and `llama-server` on the q8_0 and the q4_K_M file, started as its users start it
   (`-np 16`, continuous batching on, `-t <cores>`, 256 positions per slot: prompt and answer fit).
3. A closed-loop load generator (aiohttp, this process) keeps `c` requests in flight on `/v1/completions`,
   streamed: prompts from the packaged instructions, greedy, exactly 64 new tokens (the end token held back:
   `min_tokens` for ours, `ignore_eos` for llama-server). c = 1, 4 and 16. Round-robin: for each repetition, for
   each c, every server in turn; three repetitions; the median (and min - max) of each figure.
4. In-process decode of each runtime at one sequence (the engine's running batch, no server), the bound on what
   serving can write at c=1; measured between the passes, the servers idle.
5. Quality of the runtime candidates against the fp32 model they came from, on a trained tiny Llama
   (configs/llm-tiny.yaml, 400 rows, 8 epochs): top-1 agreement, mean KL, perplexity.
6. Writes bench/results/llm_runtimes.json and .md (the 0.5B shape: llm_runtimes_0.5b.*), with the machine
   and the targets. The quality table is the 135M run's (it trains a tiny Llama, whatever the served shape).

    make bench-llm-runtimes
    make bench-llm-runtimes ARGS="--shape 0.5b --kinds int8 gguf-q8_0 gguf-q4_k_m"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import mlflow
import pandas as pd
import torch
from machine import machine
from mlflow import MlflowClient
from servers import PIDS, closed_loop, read_stream, running
from tabulate import tabulate

from llmops import gguf, registry
from llmops.candidate_folder import CandidateMeta, save_hf_candidate
from llmops.config import ModelConfig, QuantizeConfig, RegistryConfig, load_config
from llmops.generation.decode import argmax_rows
from llmops.generation.evaluate import agreement, prompts_of
from llmops.generation.loading import load_generator
from llmops.generation.modeling import load_base_model, load_tokenizer
from llmops.quantize import quantize_candidate
from llmops.registry import CHAMPION

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
VENV_BIN = Path(sys.executable).parent
SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
QWEN25_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "135m": ("SmolLM2-135M shape", SMOLLM2_135M),
    "0.5b": ("Qwen2.5-0.5B shape (0.36B parameters with this vocabulary)", QWEN25_05B),
}
"""`--shape`: what the model is called in the results, and its config."""
GGUF_KINDS = ("gguf-q8_0", "gguf-q4_k_m")
OPENVINO_KINDS = ("openvino-int8", "openvino-int4")
KINDS = ("fp32", "int8", *GGUF_KINDS, *OPENVINO_KINDS)
AGREEMENT_FLOORS = {"gguf-q8_0": 0.99, "gguf-q4_k_m": 0.95, "openvino-int8": 0.99, "openvino-int4": 0.95}
MAX_TOKENS = 64
SLOT_POSITIONS = 256
LLAMA_SERVER = Path(sys.prefix) / "llama-server" / "build" / "bin" / "llama-server"
"""The peer, built by `make bench-llm-runtimes` with llama.cpp's default options (OpenMP on), as its users get it;
llmops's own llama.cpp is built without OpenMP (scripts/build-llama-cpp.sh)."""
QUALITY_TRAINING = ["data.sample=400", "train.epochs=8", "train.learning_rate=3e-3"]
"""The trained tiny Llama the quality table compares on (random-init weights agree with anything)."""


def build(workdir: Path, shape: dict[str, Any], kinds: tuple[str, ...]) -> dict[str, Path]:
    """The folders of the candidates `kinds` (the fp32 model and they are built once per workdir)."""
    folders = {kind: workdir / "candidates" / kind for kind in ("fp32", *kinds)}
    if not (folders["fp32"] / "candidate.json").is_file():
        cfg = ModelConfig(random_init=shape, max_length=128)
        tokenizer = load_tokenizer(cfg)
        torch.manual_seed(0)
        model = load_base_model(cfg, "causal-lm", tokenizer)
        save_hf_candidate(model, tokenizer, CandidateMeta("student", [], 128, task="causal-lm"), folders["fp32"])
    quantize = QuantizeConfig(skip_modules=[], max_loss=None)
    for kind in kinds:
        if kind != "fp32" and not (folders[kind] / "candidate.json").is_file():
            print(f"building {kind}", flush=True)
            quantize_candidate(folders["fp32"], kind, quantize, folders[kind])
    return {kind: folders[kind] for kind in kinds}


def register(uri: str, folders: dict[str, Path], shape: str) -> dict[str, str]:
    """kind -> registered model name (`llm-<shape>-<kind>@champion`)."""
    client = MlflowClient(uri, registry_uri=uri)
    registry.setup_tracking(RegistryConfig(tracking_uri=uri, experiment="bench-llm-runtimes"))
    names = {kind: f"llm-{shape}-{kind}" for kind in folders}
    for kind, name in names.items():
        if client.search_model_versions(f"name='{name}'"):
            continue
        with mlflow.start_run(run_name=name):
            model_uri = registry.log_generator_model(folders[kind], ["write a positive tweet about coachella"])
            version = registry.register(name, model_uri, {"task": "causal-lm", "candidate": kind})
        client.set_registered_model_alias(name, CHAMPION, version)
    return names


def prompts() -> list[str]:
    """User turns of the packaged instructions' held-out rows (plain text: the same string to every server)."""
    from llmops.generation.data import prepare_data

    cfg = load_config(REPO / "configs" / "llm-tiny.yaml", ["data.sample=400"])
    with tempfile.TemporaryDirectory() as scratch:
        data = prepare_data(cfg.data, Path(scratch))
        test = pd.read_parquet(data.split_path("test"))
    texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts_of(test)]
    return texts[:64]


def servers(workdir: Path, folders: dict[str, Path], names: dict[str, str]) -> dict[str, tuple[list[str], str, str]]:
    """label -> (command, ready path, kind)."""
    cores = str(os.cpu_count() or 1)
    out: dict[str, tuple[list[str], str, str]] = {}
    for kind, name in names.items():
        command = [str(VENV_BIN / "llmops"), "serve", "--config", str(REPO / "configs" / "llm-tiny.yaml")]
        command += ["--port", "{port}", "--set", f"serve.models=[{name}]", "--set", "serve.max_waiting=256"]
        command += ["--set", f"serve.prediction_log={workdir / f'predictions-{kind}.db'}"]
        command += ["--set", f"serve.model_cache={workdir / f'cache-{kind}'}"]
        out[f"llmops serve {kind}"] = (command, "/readyz", name)
    for kind in (kind for kind in GGUF_KINDS if kind in folders):
        command = [str(LLAMA_SERVER), "-m", str(folders[kind] / gguf.GGUF_FILE), "--host", "127.0.0.1"]
        command += ["--port", "{port}", "-np", "16", "--cont-batching", "-t", cores, "-c", str(16 * SLOT_POSITIONS)]
        out[f"llama-server {kind}"] = (command, "/health", "llama-server")
    return out


async def _one(session: aiohttp.ClientSession, base: str, model: str, prompt: str) -> dict:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    if model == "llama-server":
        body |= {"ignore_eos": True}
    else:
        body |= {"model": model, "min_tokens": MAX_TOKENS, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    async with session.post(f"{base}/v1/completions", json=body) as response:
        if response.status != 200:
            await response.read()
            return {"error": response.status}
        first, chunks, usage = await read_stream(response, lambda choice: choice.get("text"))
    done = time.perf_counter()
    return {"ttft": (first or done) - start, "e2e": done - start, "tokens": usage if usage is not None else chunks}


async def level(base: str, model: str, texts: list[str], concurrency: int, requests: int) -> dict[str, Any]:
    """`requests` answers at `concurrency` in flight, after one warm-up request per slot."""
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)  # llama-server drops idle keep-alives
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
        return await closed_loop(concurrency, requests, lambda i: _one(session, base, model, texts[i % len(texts)]))


def in_process_decode(folder: Path, prompt: str) -> float:
    """Tokens/s of one sequence decoded by the engine's running batch of the runtime, 64 tokens, greedy."""
    generator = load_generator(folder)
    batch = generator.running_batch(1, positions=SLOT_POSITIONS)
    ids = generator.encode(prompt)
    best = 0.0
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            logits, _ = batch.admit([ids])
            for _ in range(MAX_TOKENS - 1):
                logits = batch.step(argmax_rows(logits).tolist())  # as the engine chooses
            best = max(best, MAX_TOKENS / (time.perf_counter() - start))
            batch.keep([])
    return best


def resident_mb(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of a process (and its children: a server's workers), MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def quality() -> list[dict[str, Any]]:
    """The runtime candidates of a trained tiny Llama against their fp32 source (agreement, KL, perplexity)."""
    from llmops.generation.data import prepare_data
    from llmops.generation.train import fine_tune

    cfg = load_config(REPO / "configs" / "llm-tiny.yaml", QUALITY_TRAINING)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data = prepare_data(cfg.data, root / "data")
        source = fine_tune(cfg.model, cfg.train, cfg.task, data, root / "teacher")
        test = pd.read_parquet(data.split_path("test")).head(64)
        prompts_, completions = prompts_of(test), list(test["completion"])
        fp32 = load_generator(source)
        nll, tokens = fp32.completion_nll(prompts_, completions)
        rows.append({"candidate": "fp32", "top1_agreement": 1.0, "mean_kl": 0.0, "perplexity": math.exp(nll / tokens)})
        for kind in ("gguf-f16", *GGUF_KINDS, *OPENVINO_KINDS, "int8"):
            folder = quantize_candidate(source, kind, QuantizeConfig(skip_modules=[], max_loss=None), root / kind)
            candidate = load_generator(folder)
            found = agreement(fp32, candidate, prompts_, completions)
            nll, tokens = candidate.completion_nll(prompts_, completions)
            rows.append({"candidate": kind, **found, "perplexity": math.exp(nll / tokens)})
    return rows


def summarise(passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per server and c: the median of each figure over the repetitions, with min and max."""
    out = []
    keys = sorted({(p["server"], p["concurrency"]) for p in passes}, key=lambda k: (k[1], k[0]))
    for server, concurrency in keys:
        mine = [p for p in passes if p["server"] == server and p["concurrency"] == concurrency]
        row: dict[str, Any] = {"server": server, "concurrency": concurrency, "repetitions": len(mine)}
        for figure in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p99_ms", "mean_tokens"):
            values = [p[figure] for p in mine]
            row[figure] = statistics.median(values)
            row[f"{figure}_range"] = [min(values), max(values)]
        row["errors"] = sum(p["errors"] for p in mine)
        out.append(row)
    return out


def targets(
    rows: list[dict[str, Any]], decode: dict[str, float], quality_rows: list[dict], kinds: tuple[str, ...]
) -> list[dict]:
    """The issue's targets on what this run served (`kinds`); the quality floors where it measured quality."""
    at = {(r["server"], r["concurrency"]): r for r in rows}
    checks = []
    runtimes = [kind for kind in (*GGUF_KINDS, *OPENVINO_KINDS) if kind in kinds]
    ggufs = [kind for kind in GGUF_KINDS if kind in kinds]
    for c in sorted({c for _, c in at}):
        for kind in ggufs:
            ours, peer = at[(f"llmops serve {kind}", c)], at[(f"llama-server {kind}", c)]
            ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
            checks.append((f"c={c}, {kind}: tokens/s >= 1.0x llama-server's", f"{ratio:.2f}x", ratio >= 1.0))
            checks.append(
                (
                    f"c={c}, {kind}: TTFT p99 no worse than llama-server's",
                    f"{ours['ttft_p99_ms']:.0f} vs {peer['ttft_p99_ms']:.0f} ms",
                    ours["ttft_p99_ms"] <= peer["ttft_p99_ms"],
                )
            )
    for kind in kinds:
        served = at[(f"llmops serve {kind}", 1)]["tokens_per_s"]
        ratio = served / decode[kind]
        checks.append((f"c=1, {kind}: served >= 0.9x in-process decode", f"{ratio:.2f}x", ratio >= 0.9))
    if "int8" in kinds and runtimes:
        best = max(runtimes, key=lambda k: at[(f"llmops serve {k}", 1)]["tokens_per_s"])
        int8 = at[("llmops serve int8", 1)]["tokens_per_s"]
        ratio = at[(f"llmops serve {best}", 1)]["tokens_per_s"] / int8
        peer = max((at[(f"llama-server {k}", 1)]["tokens_per_s"] for k in ggufs), default=0.0) / int8
        checks.append(
            (
                f"c=1: best runtime ({best}) >= 4x torch int8's served tokens/s",
                f"{ratio:.2f}x" + (f" (bound: llama-server itself {peer:.2f}x)" if ggufs else ""),
                ratio >= 4.0,
            )
        )
    by_kind = {r["candidate"]: r for r in quality_rows}
    for kind, floor in AGREEMENT_FLOORS.items() if quality_rows else ():
        value = by_kind[kind]["top1_agreement"]
        checks.append((f"{kind}: top-1 agreement with fp32 >= {floor}", f"{value:.4f}", value >= floor))
    return [{"target": t, "measured": m, "met": ok} for t, m, ok in checks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where models, registry and logs go (kept between runs)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, nargs="+", default=[6, 12, 32], help="requests per level, per c")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="135m", help="the served model's shape")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="candidates served")
    args = parser.parse_args()
    kinds = tuple(kind for kind in KINDS if kind in args.kinds)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="llmops-bench-llm-runtimes-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    title, shape = SHAPES[args.shape]
    folders = build(workdir, shape, kinds)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    names = register(uri, folders, args.shape)
    texts = prompts()
    quality_rows = quality() if args.shape == "135m" else []
    if quality_rows:
        print(tabulate(quality_rows, headers="keys", tablefmt="github", floatfmt=".6g"), flush=True)
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    passes: list[dict[str, Any]] = []
    decode: dict[str, list[float]] = {kind: [] for kind in kinds}
    memory: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        bases: dict[str, tuple[str, str]] = {}
        for label, (command, ready, model) in servers(workdir, folders, names).items():
            # the peer's own libraries, wherever its build folder now lies
            own = env | {"LD_LIBRARY_PATH": str(LLAMA_SERVER.parent)} if model == "llama-server" else env
            bases[label] = (stack.enter_context(running(label, command, ready, own, workdir)), model)
        for repetition in range(args.repetitions):
            for concurrency, requests in zip(args.concurrency, args.requests, strict=True):
                for label, (base, model) in bases.items():
                    row = asyncio.run(level(base, model, texts, concurrency, max(requests, concurrency)))
                    passes.append({"server": label, "concurrency": concurrency, "repetition": repetition, **row})
                    print(f"[{repetition}] {label} c={concurrency}: {row['tokens_per_s']:.0f} tok/s, "
                          f"TTFT p99 {row['ttft_p99_ms']:.0f} ms", flush=True)  # fmt: skip
            for kind in kinds:
                decode[kind].append(in_process_decode(folders[kind], texts[0]))
        for label in bases:
            memory[label] = resident_mb(PIDS[label])
    rows = summarise(passes)
    for row in rows:
        row |= {"rss_mb": memory[row["server"]]["VmRSS"], "peak_rss_mb": memory[row["server"]]["VmHWM"]}
    decoded = {kind: statistics.median(values) for kind, values in decode.items()}
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": f"{title}, random init, packaged tokenizer (vocabulary 30,522)",
        "shape": args.shape,
        "llama_cpp_python": gguf.llama_cpp_version(),
        "max_tokens": MAX_TOKENS,
        "passes": passes,
        "rows": rows,
        "in_process_decode_tokens_per_s": {
            kind: {"median": decoded[kind], "range": [min(values), max(values)]} for kind, values in decode.items()
        },
        "quality": quality_rows,
        "targets": targets(rows, decoded, quality_rows, kinds),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "llm_runtimes" if args.shape == "135m" else f"llm_runtimes_{args.shape}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, stem)


def _spread(row: dict, figure: str) -> str:
    low, high = row[f"{figure}_range"]
    return f"{row[figure]:.1f} ({low:.1f}-{high:.1f})"


def write_markdown(result: dict[str, Any], stem: str) -> None:
    m = result["machine"]
    table = tabulate(
        [
            [r["server"], r["concurrency"], _spread(r, "tokens_per_s"), _spread(r, "ttft_p50_ms"),
             _spread(r, "ttft_p99_ms"), _spread(r, "e2e_p99_ms"), f"{r['mean_tokens']:.0f}", r["errors"],
             f"{r['rss_mb']:.0f} / {r['peak_rss_mb']:.0f}"]
            for r in result["rows"]
        ],
        headers=["server", "c", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "e2e p99 ms", "tokens/answer", "errors",
                 "RSS / peak MB"],
        tablefmt="github",
    )  # fmt: skip
    decode = tabulate(
        [[k, f"{v['median']:.1f} ({v['range'][0]:.1f}-{v['range'][1]:.1f})"]
         for k, v in result["in_process_decode_tokens_per_s"].items()],
        headers=["runtime", "in-process decode, 1 sequence, tokens/s"],
        tablefmt="github",
    )  # fmt: skip
    md = [
        "# LLM runtimes benchmark" + ("" if result["shape"] == "135m" else f" ({result['shape']} shape)"),
        "",
        f"Model: {result['model']}. llama.cpp from llama-cpp-python {result['llama_cpp_python']}. Prompts from the "
        f"packaged instructions' held-out rows, `/v1/completions` streamed, greedy, exactly {result['max_tokens']} "
        "new tokens, closed loop; servers and load generator on one machine: "
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}. Date: {result['date']}. Every figure is the median of "
        f"{result['rows'][0]['repetitions']} round-robin repetitions (every server at a given c, in turn, then the "
        "next c, then the next repetition), min-max in brackets. RSS: the server process after the run.",
        "",
        table,
        "",
        "## In-process decode (the bound serving can reach at c=1)",
        "",
        decode,
        "",
        *(
            [
                "## Quality against the fp32 source (trained tiny Llama, 64 held-out completions, teacher-forced)",
                "",
                tabulate(result["quality"], headers="keys", tablefmt="github", floatfmt=".6g"),
                "",
            ]
            if result["quality"]
            else ["Quality against the fp32 source: in llm_runtimes.md (a trained tiny Llama, whatever the shape).", ""]
        ),
        "## Targets",
        "",
        tabulate(result["targets"], headers="keys", tablefmt="github"),
        "",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
