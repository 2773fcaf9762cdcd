from pathlib import Path

import pytest

from llmops.config import ConfigError, LlmopsConfig, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), LlmopsConfig)


def test_shipped_configs_exist() -> None:
    assert {"quickstart.yaml", "tiny.yaml", "full.yaml"} <= {p.name for p in CONFIGS}


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 2\n")
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key"):
        load_config(path)


def test_the_retired_dask_path_names_its_replacement() -> None:
    with pytest.raises(ConfigError, match=r"eval.parallel: dask is retired; `ray` evaluates the candidates"):
        load_config(None, ["eval.parallel=dask"])
    with pytest.raises(ConfigError, match=r"eval.dask_workers: the Dask path is retired; with eval.parallel: ray"):
        load_config(None, ["eval.dask_workers=2"])


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(None, ["train.batch_size=lots"])


def test_contradiction_is_named() -> None:
    with pytest.raises(ConfigError, match="holdout_topics names topics not in data.topics"):
        load_config(None, ["data.holdout_topics=[mars]"])


def test_student_layers_must_be_distinct() -> None:
    with pytest.raises(ConfigError, match="distill.student_layers"):
        load_config(None, ["distill.student_layers=[1, 1]"])


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(None, ["data.sample=100", "quantize.candidates=[fp32, int8]", "gates.max_size_mb=null"])
    assert cfg.data.sample == 100
    assert cfg.quantize.candidates == ["fp32", "int8"]
    assert cfg.gates.max_size_mb is None


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("data.sample")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_tracking_setup_does_not_leak_into_the_environment(tmp_path: Path, monkeypatch) -> None:
    import os

    from llmops import registry
    from llmops.config import RegistryConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.setup_tracking(RegistryConfig())
    assert "MLFLOW_TRACKING_URI" not in os.environ  # a second run elsewhere must not inherit this store
    assert registry.resolve_tracking_uri(RegistryConfig()) == f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["serve.shadow=true", "serve.canary_share=0.1"], "serve.shadow and serve.canary_share"),
        (["serve.max_batch_size=64", "serve.max_queue=32"], "serve.max_batch_size"),
        (["serve.over_length=drop"], "serve.over_length"),
        (["serve.canary_share=1.5"], "serve.canary_share"),
        (["serve.guards.prompts=redcat"], "serve.guards.prompts"),
        (["serve.guards.answers=hide"], "serve.guards.answers"),
        (["serve.guards.models={tweet-generator: {prompt: block}}"], "serve.guards.models.tweet-generator.prompt"),
        (["serve.key_refresh_s=0"], "serve.key_refresh_s"),
    ],
)
def test_serving_contradictions_are_named(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(None, overrides)


def test_environment_variables_override_the_file_and_set_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOPS__SERVE__PREDICTION_LOG", "/data/predictions")
    monkeypatch.setenv("LLMOPS__MONITOR__RETRAIN__MIN_WINDOW", "50")
    monkeypatch.setenv("LLMOPS__WORK_DIR", "/data/artifacts")
    cfg = load_config(None, ["work_dir=/elsewhere"])
    assert cfg.serve.prediction_log == "/data/predictions" and cfg.monitor.retrain.min_window == 50
    assert cfg.work_dir == "/elsewhere"
    monkeypatch.setenv("LLMOPS__SERVE__PREDICTON_LOG", "typo")
    with pytest.raises(ConfigError, match="serve.predicton_log: unknown key"):
        load_config(None)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["train.lora={adapter_of: tweet-generator@}"], "must be `name`, `name@alias` or `name/version`"),
        (["task=seq2seq-lm", "train.lora={adapter_of: base}"], "adapters are served over causal-lm bases"),
        (["task=causal-lm", "train.lora={adapter_of: base, qlora: true}"], "not under QLoRA"),
        (["task=causal-lm", "train.lora={adapter_of: tweet-generator/2}"], "registry.model_name must name it"),
    ],
)
def test_adapter_contradictions_are_named(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(None, overrides)


def test_adapter_of_takes_a_name_an_alias_or_a_version() -> None:
    for spec in ["tweet-generator", "tweet-generator@challenger", "tweet-generator/3"]:
        cfg = load_config(
            None, ["task=causal-lm", "registry.model_name=tweet-formal", f"train.lora={{adapter_of: {spec}}}"]
        )
        assert cfg.train.lora is not None and cfg.train.lora.adapter_of == spec


def test_ray_stages_name_a_stage_and_what_a_node_gives() -> None:
    cfg = load_config(None, ["ray.address=10.0.0.1:6379", "ray.stages={fine_tune: {num_cpus: 4, num_gpus: 1}}"])
    assert cfg.ray.address == "10.0.0.1:6379" and cfg.ray.stages["fine_tune"].num_gpus == 1
    with pytest.raises(ConfigError, match="ray.stages.train"):
        load_config(None, ["ray.stages={train: {num_cpus: 2}}"])
    with pytest.raises(ConfigError, match="ray.stages.evaluate.num_cpus"):
        load_config(None, ["ray.stages={evaluate: {num_cpus: 0}}"])
    assert load_config(None).ray.address is None  # no address: nothing runs on Ray
