"""Generation benchmark: the generative quickstart's candidates (teacher, student, int8) side by side.

1. In a fresh directory, registers a `tweet-sentiment` champion with a short classifier lifecycle (not timed):
   it is the judge of control accuracy, as a user's own `make run` champion would be.
2. Runs `llmops run --config configs/llm-quickstart.yaml` cold, then again unchanged: each a new process, as a
   user runs it (Prefect's temporary server start included), timed.
3. Re-measures every candidate it built, one after the other, with the same threads and test rows, and more
   timed prompts than the lifecycle's own evaluation (16 prompts x 64 new tokens at batch 1) and more sampled
   tweets judged for control accuracy and topic (every `write` prompt of the test split, sampled three times).
4. Writes bench/results/generation.json and generation.md, with the machine and the targets.

    make bench-generation            # or: python bench/generation.py [--keep]
    python bench/generation.py --reuse /tmp/llmops-bench-XXXX   # measure a kept directory again (its times kept)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from machine import machine
from tabulate import tabulate

from llmops.config import LlmopsConfig
from llmops.generation.evaluate import Control

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CLASSIFIER = [
    "data.sample=3000",
    "train.epochs=1",
    "distill.epochs=1",
    "quantize.candidates=[int8]",
    "eval.latency_samples=20",
    "eval.throughput_max_rows=128",
]
"""A short classifier lifecycle: the judge of control accuracy (macro-F1 about 0.7 on the tweets)."""


def timed_cli_run(config: Path, directory: Path, name: str, overrides: list[str] = ()) -> float:  # type: ignore[assignment]
    """Wall time of `llmops run --config CONFIG` in a new process, in `directory`."""
    log = directory / f"{name}.log"
    command = [sys.executable, "-m", "cli", "run", "--config", str(config)]
    for item in overrides:
        command += ["--set", item]
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=directory, stdout=out, stderr=subprocess.STDOUT, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{name} run failed:\n" + "\n".join(log.read_text().splitlines()[-30:]))
    times = directory / TIMES
    times.write_text(json.dumps({**(json.loads(times.read_text()) if times.exists() else {}), name: elapsed}))
    return elapsed


TIMES = "times.json"
"""The timed runs' wall times, kept in the scratch directory: `--reuse` measures again without rerunning them."""


SAMPLES = 20
"""The champion's tweets printed in the results, sampled as evaluation samples (its temperature, top-p, seed)."""
CONTROL_SAMPLES = 300
"""`write` prompts sampled and judged for control accuracy when re-measuring: every one of the quickstart's test
split, as the lifecycle's own evaluation now samples them once (a standard error of about 0.026)."""
CONTROL_DRAWS = 3
"""Samplings of those prompts judged for control accuracy (evaluation's seed, and the next ones); the figure
reported is their mean. One sampling is a single draw: for one teacher three gave 0.537, 0.613 and 0.533."""


def training_seconds(directory: Path) -> dict[str, float]:
    """The cold run's training time of the teacher and of the student (the Trainer's `train_runtime`, in order):
    the part of the 15 minutes no later stage can give back."""
    runtimes = [float(s) for s in re.findall(r"'train_runtime': '([0-9.]+)'", (directory / "cold.log").read_text())]
    return dict(zip(("teacher", "student"), runtimes, strict=False))


def measure(config: Path, directory: Path) -> tuple[dict, list[dict], list[dict], float | None]:
    """The flow's result (from its cache), every candidate re-measured, the champion's sample tweets, and the
    control target's bound (`real_control`)."""
    import os

    from flows.lifecycle import lifecycle
    from llmops import tasks
    from llmops.config import load_config

    overrides = [
        "eval.generation.speed_prompts=16",
        "eval.generation.speed_new_tokens=64",
        f"eval.generation.samples={CONTROL_SAMPLES}",
    ]
    cwd = Path.cwd()
    os.chdir(directory)
    try:
        result = lifecycle(str(config), [])
        cfg = load_config(config, overrides)
        task = tasks.for_config(cfg)
        context = task.eval_context(cfg)
        data_dir = next(  # the generator's data, not the judge's
            p
            for p in (directory / cfg.work_dir / "data").iterdir()
            if (p / "test.parquet").exists() and "prompt" in pd.read_parquet(p / "test.parquet").columns
        )
        rows = []
        unseen = unseen_classify_rows(cfg)
        judge = tasks.control_judge(cfg, context)
        asked = pd.read_parquet(data_dir / "test.parquet").query("instruction == 'write'").head(CONTROL_SAMPLES)
        for path in result["candidates"].values():
            report = task.evaluate(cfg, str(directory / path), str(data_dir), context)
            scored = {"macro_f1_unseen": unseen_macro_f1(directory / path, unseen)}
            control, topic = samplings(directory / path, asked, cfg, judge)
            scored |= {"on_topic": float(np.mean(topic)), "topic_draws": topic}
            if "control_accuracy" in report.metrics:
                scored |= {"control_accuracy": float(np.mean(control)), "control_draws": control}
            rows.append(
                {"kind": report.kind, "params": report.params, "notes": report.notes, **report.metrics, **scored}
            )
        champion = result["selected"] or "teacher"
        tweets = sample_tweets(directory / result["candidates"][champion], data_dir / "test.parquet", cfg, judge)
        bound = real_control(judge, asked)
    finally:
        os.chdir(cwd)
    return result, rows, tweets, bound


def _control(r: dict) -> str:
    if "control_accuracy" not in r:
        return "-"
    return f"{r['control_accuracy']:.3f} ({min(r['control_draws']):.3f}-{max(r['control_draws']):.3f})"


def samplings(
    candidate: Path, asked: pd.DataFrame, cfg: LlmopsConfig, judge: Control | None
) -> tuple[list[float], list[float]]:
    """`CONTROL_DRAWS` samplings of the `write` rows evaluation samples (`asked`; evaluation's seed, and the next
    ones): the control accuracy of each (empty without a judge), and the share of its answers that the data's own
    topic tagger (`data.topics`) puts in the asked topic, over the rows that ask for one."""
    from llmops.corpus import tag_topic
    from llmops.generation.evaluate import open_generations
    from llmops.generation.loading import load_generator

    generator = load_generator(candidate)
    sampling = cfg.eval.generation
    named = asked["topic"] != "other"
    control, topic = [], []
    for draw in range(CONTROL_DRAWS):
        seeded = sampling.model_copy(update={"seed": sampling.seed + draw})
        metrics, _, generations = open_generations(generator, asked, seeded, judge)
        if "control_accuracy" in metrics:
            control.append(metrics["control_accuracy"])
        said = tag_topic(pd.Series([g.text for g in generations], index=asked.index), cfg.data.topics)
        topic.append(float((said == asked["topic"])[named].mean()))
    return control, topic


def real_control(judge: Control | None, asked: pd.DataFrame) -> float | None:
    """Control accuracy of the data itself: the share of the real tweets of the `write` rows evaluation samples
    (`asked`: their completions) the judge labels with their row's target. What a generator that writes like the
    data scores: the bound of the control target."""
    from llmops.generation.evaluate import said_labels

    if judge is None:
        return None
    said = said_labels(judge.classifier, asked["completion"].tolist())
    return float((pd.Series(said, index=asked.index) == asked["target"]).mean())


UNSEEN = 3000
"""Classify prompts of tweets `data.sample` left out, scored for every candidate: on the 300 classify rows of the
test split a macro-F1's standard error is about 0.027, on 3,000 about 0.009."""


def unseen_classify_rows(cfg: LlmopsConfig) -> pd.DataFrame:
    """`UNSEEN` labelled tweets the lifecycle never trained, validated or tested on, as classify instructions."""
    from llmops.generation.data import classify_prompt, packaged_tweets

    unseen = packaged_tweets(cfg.data).unseen
    rest = unseen.sample(n=min(UNSEEN, len(unseen)), random_state=0)
    prompts = rest["text"].map(classify_prompt)
    return pd.DataFrame(
        {
            "prompt": prompts,
            "messages": [json.dumps([{"role": "user", "content": p}]) for p in prompts],
            "completion": rest["label"],
            "instruction": "classify",
            "target": rest["label"],
            "topic": rest["topic"],
        }
    )


def unseen_macro_f1(candidate: Path, rows: pd.DataFrame) -> float:
    from llmops.generation.evaluate import closed_answers
    from llmops.generation.loading import load_generator

    return closed_answers(load_generator(candidate), rows)[0]["macro_f1"]


def sample_tweets(candidate: Path, test: Path, cfg: LlmopsConfig, judge: Control | None) -> list[dict]:
    """The first `SAMPLES` write prompts of the test split, answered as evaluation samples them, each with the
    label the control judge gives it."""
    from llmops.generation.candidate import GenerationParams
    from llmops.generation.evaluate import prompts_of
    from llmops.generation.loading import load_generator

    rows = pd.read_parquet(test).query("instruction == 'write'").head(SAMPLES)
    generation = cfg.eval.generation
    params = GenerationParams(
        max_new_tokens=generation.max_new_tokens,
        temperature=generation.temperature,
        top_p=generation.top_p,
        seed=generation.seed,
    )
    answers = load_generator(candidate).generate(prompts_of(rows), params)
    said = judge.classifier.predict_proba([a.text for a in answers]).argmax(axis=1) if judge else []
    return [
        {
            "prompt": prompt,
            "tweet": answer.text,
            "judged": judge.classifier.labels[int(label)] if judge else "-",
            "finish_reason": answer.finish_reason,
        }
        for prompt, answer, label in zip(rows["prompt"], answers, list(said) or [None] * len(answers), strict=True)
    ]


def _ratio(row: dict, teacher: dict, key: str) -> str:
    if key not in row or not teacher.get(key):
        return "-"
    return f"{row[key] / teacher[key]:.2f}"


def table(rows: list[dict], champion: str) -> list[dict]:
    teacher = next(r for r in rows if r["kind"] == "teacher")
    out = []
    for r in rows:
        params = r["params"]["params_non_embedding"]
        out.append(
            {
                "candidate": r["kind"] + (" (champion)" if r["kind"] == champion else ""),
                "perplexity": f"{r['perplexity']:.2f}",
                "ppl / teacher": _ratio(r, teacher, "perplexity"),
                "macro-F1 (unseen)": f"{r['macro_f1_unseen']:.4f}",
                "macro-F1 (test)": f"{r.get('macro_f1', float('nan')):.4f}",
                "F1 / teacher": _ratio(r, teacher, "macro_f1_unseen"),
                "control": _control(r),
                "control / teacher": _ratio(r, teacher, "control_accuracy"),
                "on topic": f"{r['on_topic']:.3f} ({min(r['topic_draws']):.3f}-{max(r['topic_draws']):.3f})",
                "empty": f"{r['empty_share']:.3f}",
                "off-label": f"{r['off_label_share']:.3f}",
                "distinct-2": f"{r['distinct_2']:.3f}",
                "repetition": f"{r['repetition_rate']:.3f}",
                "non-emb params": f"{params / 1e6:.2f}M",
                "params / teacher": f"{params / teacher['params']['params_non_embedding']:.2f}",
                "size MB": f"{r['size_mb']:.1f}",
                "peak MB": f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "-",
                "TTFT p50 ms": f"{r['ttft_p50_ms']:.1f}",
                "tok/s (b=1)": f"{r['decode_tokens_per_s']:.0f}",
                "x teacher (b=1)": _ratio(r, teacher, "decode_tokens_per_s"),
                "tok/s (b=16)": f"{r['batch_tokens_per_s']:.0f}",
            }
        )
    return out


def targets(rows: list[dict], champion: str, cold_s: float, rerun_s: float) -> list[dict]:
    by = {r["kind"]: r for r in rows}
    t, s, c = by["teacher"], by["student"], by[champion]
    checks: list[tuple[str, float, float, bool]] = [
        ("champion instruction macro-F1 (unseen) >= 0.72", c["macro_f1_unseen"], 0.72, False),
        ("champion control accuracy >= 0.60", c.get("control_accuracy", float("nan")), 0.60, False),
        ("champion empty share <= 0.02", c["empty_share"], 0.02, True),
        ("champion off-label share <= 0.05", c["off_label_share"], 0.05, True),
        (
            "student >= 0.95 x teacher instruction macro-F1 (unseen)",
            s["macro_f1_unseen"] / t["macro_f1_unseen"],
            0.95,
            False,
        ),
    ]
    if "control_accuracy" in s and t.get("control_accuracy"):
        checks.append(
            ("student >= 0.95 x teacher control accuracy", s["control_accuracy"] / t["control_accuracy"], 0.95, False)
        )
    non_embedding = s["params"]["params_non_embedding"] / t["params"]["params_non_embedding"]
    checks += [
        ("student <= 0.5 x teacher non-embedding params", non_embedding, 0.5, True),
        ("student perplexity <= 1.25 x teacher", s["perplexity"] / t["perplexity"], 1.25, True),
        (
            "champion >= 3 x teacher decode tokens/s (b=1)",
            c["decode_tokens_per_s"] / t["decode_tokens_per_s"],
            3,
            False,
        ),
        ("make run-llm <= 15 min (s)", cold_s, 900, True),
        ("unchanged rerun <= 10% of cold run", rerun_s / cold_s, 0.10, True),
    ]
    return [
        {"target": name, "measured": f"{value:.3f}", "bound": bound, "met": value <= bound if upper else value >= bound}
        for name, value, bound, upper in checks
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llm-quickstart.yaml")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--reuse", type=Path, help="a kept scratch directory: measure its runs again, not rerun them")
    args = parser.parse_args()
    config = (REPO / args.config).resolve() if not Path(args.config).is_absolute() else Path(args.config)
    directory = args.reuse or Path(tempfile.mkdtemp(prefix="llmops-bench-"))
    try:
        if args.reuse is None:
            timed_cli_run(REPO / "configs" / "quickstart.yaml", directory, "classifier", CLASSIFIER)
            timed_cli_run(config, directory, "cold")
            timed_cli_run(config, directory, "rerun")
        times = json.loads((directory / TIMES).read_text())
        cold_s, rerun_s = times["cold"], times["rerun"]
        training = training_seconds(directory)
        result, rows, tweets, bound = measure(config, directory)
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(directory, ignore_errors=True)
    champion = result["selected"] or "teacher"
    report = {
        "machine": machine(),
        "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
        "cold_lifecycle_s": cold_s,
        "rerun_s": rerun_s,
        "training_s": training,
        "champion": champion,
        "candidates": rows,
        "targets": targets(rows, champion, cold_s, rerun_s),
        "control_accuracy_of_real_tweets": bound,
        "samples": tweets,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(report, indent=2))
    m = report["machine"]
    notes = sorted({note for r in rows for note in r["notes"]})
    md = [
        "# Generation benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
        + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU")
        + f". Config: `{report['config']}`.",
        "",
        f"`llmops run` cold: {cold_s:.0f} s; unchanged rerun: {rerun_s:.0f} s (each a new process, "
        "Prefect's temporary server start included; the install is not). Of the cold run, training: "
        + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in training.items())
        + f" ({sum(training.values()):.0f} s, the least a cold run takes on this machine).",
        "",
        tabulate(table(rows, champion), headers="keys", tablefmt="github"),
        "",
        *[f"- {note}" for note in notes],
        f"- control accuracy on {CONTROL_SAMPLES} write prompts, each sampled {CONTROL_DRAWS} times (seeds); the "
        "mean, with the samplings' lowest and highest (the standard error of the mean is about 0.02); macro-F1 "
        "(unseen) on "
        f"{UNSEEN} classify prompts of tweets the run never saw (about 0.009); macro-F1 (test) on the test split's "
        "300 (about 0.027); on topic: the share of the same samplings' answers to prompts that name a topic which "
        "the data's own topic tagger (`data.topics`) puts in the asked topic",
        "",
        "## Targets",
        "",
        tabulate(report["targets"], headers="keys", tablefmt="github"),
        "",
        *(
            [
                f"The bound of the control target: the judge labels {bound:.3f} of the test split's "
                f"{CONTROL_SAMPLES} real tweets with the sentiment their row asks for (what a generator that "
                "writes like the data would score).",
                "",
            ]
            if bound is not None
            else []
        ),
        f"## What the champion writes ({champion})",
        "",
        f"The first {SAMPLES} `write` prompts of the test split, sampled as evaluation samples them (temperature, "
        "top-p and seed of `eval.generation`), each with the label the control judge gives it. Unedited; the "
        "packaged tokenizer lower-cases, and the packaged data replaces every URL with `http`.",
        "",
        tabulate(
            [[t["prompt"], t["tweet"] + (" [cut]" * (t["finish_reason"] == "length")), t["judged"]] for t in tweets],
            headers=["prompt", "tweet", "judged"],
            tablefmt="github",
        ),
        "",
    ]
    (RESULTS / "generation.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
