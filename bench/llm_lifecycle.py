"""The generative lifecycle's cost by model size: each stage's time and peak memory for a ~10M Llama, a
SmolLM2-135M-shaped Llama and a Qwen2.5-0.5B-shaped Qwen2 (LoRA), one machine, one run each.

1. Each size is `model.random_init` of the shape with the packaged tokenizer (no weights exist offline; time and
   memory do not depend on the values; the vocabulary is the packaged 30,522 tokens, so the 0.5B shape has 0.36B
   parameters where Qwen's own 151,936-token vocabulary would give 0.49B), on configs/llm-tiny.yaml's small
   evaluation and 200 tweets (400 instructions), one epoch.
2. `llmops run` runs the whole lifecycle in its own process, as a user runs it (fresh work_dir and registry per
   size): data, fine-tune, distil (every third layer), every default causal-LM candidate (fp32, torch int8,
   bitsandbytes int8 and nf4, GGUF q8_0 and q4_K_M), evaluation of each, gates, registry.
3. Each stage folder records its build time and the process's peak resident memory while it was built
   (`.built.json`, `llmops.memory`); the whole run's wall time and peak resident memory come from the OS
   (`wait4`). "registry, gates, Prefect" is the rest: the run's wall time less its stages.
4. Writes bench/results/llm_lifecycle.{md,json} with the machine.

    make bench-llm-lifecycle            # all sizes; ARGS="--sizes 10M 135M" for some
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from llm_runtimes import QWEN25_05B, SMOLLM2_135M
from machine import machine
from safetensors import safe_open
from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
VENV_BIN = Path(sys.executable).parent
LLAMA_10M = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
SIZES: dict[str, dict[str, Any]] = {
    "10M": {"shape": LLAMA_10M, "lora": None, "learning_rate": 1e-3},
    "135M": {"shape": SMOLLM2_135M, "lora": None, "learning_rate": 3e-4},
    "0.5B": {"shape": QWEN25_05B, "lora": {"r": 16, "alpha": 32}, "learning_rate": 2e-4},
}
REST = "registry, gates, Prefect"
CANDIDATES = ("int8", "bnb-int8", "nf4", "gguf-q8_0", "gguf-q4_k_m", "openvino-int8", "openvino-int4")
STAGES = ("data", "teacher", "student", *CANDIDATES)


def config(size: str, workdir: Path) -> Path:
    """The size's config: configs/llm-tiny.yaml with the shape, the data and training of this benchmark."""
    spec = SIZES[size]
    cfg = yaml.safe_load((REPO / "configs" / "llm-tiny.yaml").read_text())
    layers = spec["shape"]["num_hidden_layers"]
    cfg["work_dir"] = str(workdir / "artifacts")
    cfg["data"]["sample"] = 200
    cfg["model"] |= {"random_init": spec["shape"], "max_length": 64}
    cfg["train"] |= {"epochs": 1, "batch_size": 16, "learning_rate": spec["learning_rate"]}
    if spec["lora"]:
        cfg["train"]["lora"] = spec["lora"]
    cfg["distill"] |= {"student_layers": list(range(0, layers, 3)), "learning_rate": spec["learning_rate"]}
    cfg["quantize"] = {"candidates": ["fp32", *CANDIDATES]}
    cfg["registry"] = {
        "model_name": f"llm-cost-{size}",
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
        "artifact_location": str(workdir / "mlartifacts"),
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def parameters(model_dir: Path) -> int:
    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    return total


def stages(work_dir: Path) -> dict[str, dict[str, float | None]]:
    """stage -> seconds and peak MB, from the stage folders' `.built.json` (evaluations by candidate)."""
    found: dict[str, dict[str, float | None]] = {}
    for record in sorted(work_dir.glob("*/*/.built.json")):
        built = json.loads(record.read_text())
        stage = record.parent.parent.name
        if stage == "eval":
            stage = "eval " + json.loads((record.parent / "report.json").read_text())["kind"]
        elif stage == "champions":
            continue
        found[stage] = {"seconds": built["finished"] - built["started"], "peak_mb": built.get("peak_memory_mb")}
    return found


def run_size(size: str, root: Path) -> dict[str, Any]:
    workdir = root / size
    workdir.mkdir(parents=True, exist_ok=True)
    path = config(size, workdir)
    env = os.environ | {"PREFECT_HOME": str(workdir / "prefect")}
    print(f"== {size}: llmops run --config {path}", flush=True)
    started = time.time()
    with (workdir / "run.log").open("w") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "llmops"), "run", "--config", str(path)], cwd=workdir, env=env, stdout=log, stderr=log
        )
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.time() - started
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (workdir / "run.log").read_text()[-3000:]
        print(f"{size}: llmops run failed (exit {os.waitstatus_to_exitcode(status)}):\n{tail}", flush=True)
        return {"size": size, "failed": tail, "wall_s": wall}
    work_dir = workdir / "artifacts"
    teacher = next(work_dir.glob("teacher/*/model"))
    student = next(work_dir.glob("student/*/model"))
    found = stages(work_dir)
    rest = wall - sum(s["seconds"] or 0 for s in found.values())
    return {
        "size": size,
        "shape": SIZES[size]["shape"],
        "lora": SIZES[size]["lora"],
        "teacher_parameters": parameters(teacher),
        "student_parameters": parameters(student),
        "wall_s": wall,
        # the OS's figure is the peak since the stages' last reset of the high-water mark (/proc/self/clear_refs)
        "peak_rss_mb": max([usage.ru_maxrss / 1024, *(s["peak_mb"] or 0 for s in found.values())]),
        "stages": found | {REST: {"seconds": rest, "peak_mb": None}},
    }


def _cell(stage: dict[str, float | None] | None) -> str:
    if stage is None:
        return "-"
    peak = stage["peak_mb"]
    return f"{stage['seconds']:.0f} s / {peak / 1024:.2f} GB" if peak is not None else f"{stage['seconds']:.0f} s"


def write_markdown(result: dict[str, Any]) -> None:
    failed = [run for run in result["runs"] if "failed" in run]
    runs = [run for run in result["runs"] if "failed" not in run]
    names = [n for run in runs for n in run["stages"]]
    evaluations = [f"eval {kind}" for kind in ("teacher", "student", *STAGES[3:])]
    known = [*STAGES, *evaluations]
    order = [n for n in known if n in names] + sorted({n for n in names if n not in known} - {REST}) + [REST]
    by_stage = tabulate(
        [[name, *(_cell(run["stages"].get(name)) for run in runs)] for name in order]
        + [["whole run (wall, peak RSS)", *(f"{r['wall_s']:.0f} s / {r['peak_rss_mb'] / 1024:.2f} GB" for r in runs)]],
        headers=["stage", *(r["size"] for r in runs)],
        tablefmt="github",
    )
    growth = []
    for previous, run in itertools.pairwise(runs):
        growth.append(
            [
                f"{previous['size']} -> {run['size']}",
                f"{run['teacher_parameters'] / previous['teacher_parameters']:.1f}x",
                f"{run['wall_s'] / previous['wall_s']:.1f}x",
                f"{run['peak_rss_mb'] / previous['peak_rss_mb']:.1f}x",
            ]
        )
    sizes = tabulate(
        [
            [r["size"], r["shape"]["model_type"], r["shape"]["num_hidden_layers"], r["shape"]["hidden_size"],
             f"{r['teacher_parameters'] / 1e6:.1f}M", f"{r['student_parameters'] / 1e6:.1f}M",
             "LoRA r=" + str(r["lora"]["r"]) if r["lora"] else "full"]
            for r in runs
        ],
        headers=["size", "architecture", "layers", "hidden", "teacher params", "student params", "fine-tuning"],
        tablefmt="github",
    )  # fmt: skip
    m = result["machine"]
    md = [
        "# The generative lifecycle's cost by model size",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; {result['date']}. One `llmops run` per size, in its "
        "own process, nothing else running: 200 tweets (400 instructions), one epoch, max_length 64, student = every "
        "third layer, eight candidates (fp32, torch int8, bitsandbytes int8 / nf4, GGUF q8_0 / q4_K_M, OpenVINO int8 / "
        "int4), "
        "configs/llm-tiny.yaml's evaluation. Each cell: the stage's wall time / the process's peak resident memory "
        "while it ran (`.built.json`). One run per size: these are costs, not a comparison of systems.",
        "",
        sizes,
        "",
        by_stage,
        "",
        *(f"**{run['size']} failed** after {run['wall_s']:.0f} s:\n\n```\n{run['failed']}\n```\n" for run in failed),
        "## Growth",
        "",
        tabulate(growth, headers=["step", "parameters", "wall time", "peak RSS"], tablefmt="github"),
        "",
    ]
    (RESULTS / "llm_lifecycle.md").write_text("\n".join(md))
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--workdir", type=Path, default=None, help="kept for inspection (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm-lifecycle-") as scratch:
        root = args.workdir or Path(scratch)
        result: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "runs": []}
        RESULTS.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:  # the results so far written after each size: a long run keeps what it measured
            result["runs"].append(run_size(size, root))
            (RESULTS / "llm_lifecycle.json").write_text(json.dumps(result, indent=2))
            write_markdown(result)


if __name__ == "__main__":
    main()
