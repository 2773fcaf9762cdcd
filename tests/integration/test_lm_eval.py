"""lm-evaluation-harness, the harness everyone scores LLMs with, against the real `llmops serve` process
(`local-completions`, tokenizing through the server's `/tokenize`): a multiple-choice task scored from prompt
logprobs with `echo`, and a generation task, each on a JSONL file written here. The served champion must score
what the same harness scores with its in-process Hugging Face backend on the same checkpoint.

The model is the tiny Llama trained on the packaged instructions (tests/integration/trained_decoders.py); the
tasks ask it the test split's sentiment questions, rendered as it was trained to read them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from llmops.generation.candidate import Generator
from tests.http_service import serve_process
from tests.integration.trained_decoders import trained
from tests.tiny_registry import register_generators, set_alias

pytestmark = pytest.mark.slow
NAME = "lm-eval-generator"
LABELS = ["negative", "neutral", "positive"]
QUESTIONS = 24


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, pd.DataFrame]:
    """The trained model's candidate folder, the registry that serves it as champion, and its test rows."""
    root = tmp_path_factory.mktemp("lm-eval")
    folder, data = trained(root)
    uri = register_generators(root / "registry", NAME, seeds=[0], build=lambda directory, seed: folder)
    set_alias(uri, NAME, "champion", "1")
    rows = pd.read_parquet(data.split_path("test"))  # type: ignore[attr-defined]
    return folder, uri, rows[rows["instruction"] == "classify"].head(QUESTIONS)


@pytest.fixture(scope="module")
def tasks(champion: tuple[Path, str, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two lm-eval tasks on JSONL files: which label (multiple choice, loglikelihood), and write the label
    (generate_until, exact match)."""
    folder, _, rows = champion
    generator = Generator(folder)
    directory = tmp_path_factory.mktemp("tasks")
    questions = directory / "questions.jsonl"
    with questions.open("w") as out:
        for messages, label in zip(rows["messages"], rows["completion"], strict=True):
            prompt = generator.render(json.loads(messages))
            out.write(json.dumps({"prompt": prompt, "choices": LABELS, "answer": LABELS.index(label)}) + "\n")
    files = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(questions)}}, "test_split": "test"}
    which = {
        "task": "llmops_which_label",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    write = {
        "task": "llmops_write_label",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{choices[answer]}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match"}],
    }
    for task in (which, write):
        (directory / f"{task['task']}.yaml").write_text(yaml.safe_dump(files | task))
    return directory


@pytest.fixture(scope="module")
def server(champion: tuple[Path, str, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    _, uri, _ = champion
    workdir = tmp_path_factory.mktemp("lm-eval-serve")
    config = workdir / "serve.yaml"
    config.write_text(yaml.safe_dump({"registry": {"model_name": NAME}, "serve": {"models": [NAME]}}))
    base, _, proc = serve_process(workdir, config, uri)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def evaluate(tasks: Path, model: str, model_args: dict[str, Any]) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["llmops_which_label", "llmops_write_label"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    assert results is not None
    return results


def test_the_harness_scores_the_served_champion_as_it_scores_the_checkpoint(
    champion: tuple[Path, str, pd.DataFrame], tasks: Path, server: str
) -> None:
    folder, _, _ = champion
    served = evaluate(
        tasks,
        "local-completions",
        {"base_url": f"{server}/v1/completions", "model": NAME, "num_concurrent": 4, "max_retries": 1},
    )
    # the same token ids on both sides: the remote tokenizer adds no special tokens (lm-eval asks /tokenize so),
    # and the Hugging Face backend, left to the tokenizer's default, would wrap each text in [CLS] ... [SEP]
    local = evaluate(
        tasks, "hf", {"pretrained": str(folder), "dtype": "float32", "device": "cpu", "add_bos_token": False}
    )
    for task, metric in (("llmops_which_label", "acc,none"), ("llmops_write_label", "exact_match,none")):
        assert served["results"][task][metric] == pytest.approx(local["results"][task][metric], abs=0.005), task
    which = [s["resps"] for s in served["samples"]["llmops_which_label"]]
    expected = [s["resps"] for s in local["samples"]["llmops_which_label"]]
    for answer, reference in zip(which, expected, strict=True):  # each choice's loglikelihood, not only the score
        for (value, greedy), (reference_value, reference_greedy) in (
            (a[0], b[0]) for a, b in zip(answer, reference, strict=True)
        ):
            assert float(value) == pytest.approx(float(reference_value), abs=1e-3)
            assert greedy == reference_greedy
    assert served["results"]["llmops_which_label"]["acc,none"] > 1 / 3  # the model learned something to score
    assert served["results"]["llmops_write_label"]["exact_match,none"] > 0  # ... and to write
    written = [s["filtered_resps"][0] for s in served["samples"]["llmops_write_label"]]
    assert written == [s["filtered_resps"][0] for s in local["samples"]["llmops_write_label"]]
