"""docker-compose.yml without a Docker engine: the file validates, and everything it names exists here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from llmops.config import environment_overrides, load_config
from serving.metrics import ServingMetrics
from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def documented_variables() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z_]+=", line)]
    return dict(pairs)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_compose_file_validates() -> None:
    result = subprocess.run(
        ["docker-compose", "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "-q"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_stack_has_every_service_the_product_needs() -> None:
    services = set(compose()["services"])
    assert {"postgres", "minio", "create-bucket", "mlflow", "prefect-server", "worker", "serving", "lb"} <= services
    assert {"evidently", "prometheus", "grafana"} <= services
    assert compose()["services"]["serving"]["deploy"]["replicas"] >= 2


def test_every_build_mount_and_variable_exists() -> None:
    spec = compose()
    for name, service in spec["services"].items():
        build = service.get("build")
        if build:
            dockerfile = REPO / build["context"] / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            if "target" in build:
                assert re.search(rf"^FROM .+ AS {build['target']}$", dockerfile.read_text(), re.M), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
    used = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    assert used <= set(documented_variables()), f"not in .env.example: {used - set(documented_variables())}"


def test_no_credential_is_baked_into_an_image() -> None:
    for dockerfile in [*REPO.glob("*/Dockerfile"), *REPO.glob("docker/*/Dockerfile")]:
        assert not re.search(r"PASSWORD|SECRET|API_KEYS=", dockerfile.read_text()), dockerfile


def test_containers_config_keys_are_real_keys() -> None:
    env = compose()["x-llmops-env"]
    overrides = environment_overrides({k: str(v) for k, v in env.items()})
    assert len(overrides) == sum(k.startswith("LLMOPS__") for k in env) > 0
    cfg = load_config(REPO / documented_variables()["LLMOPS_CONFIG"], overrides)
    assert cfg.serve.prediction_log == "/home/llmops/data/predictions"  # a Parquet folder: one writer per replica


def test_prometheus_scrapes_the_serving_port_and_grafana_plots_real_metrics() -> None:
    prometheus = yaml.safe_load((REPO / "docker/prometheus/prometheus.yml").read_text())
    sd = prometheus["scrape_configs"][0]["dns_sd_configs"][0]
    assert sd["names"] == ["serving"] and sd["port"] == 8000
    dashboard = json.loads((REPO / "docker/grafana/dashboards/serving.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "latency", "batch size", "queue depth", "model version"):
        assert topic in titles
    exposed = {m.name for m in ServingMetrics().registry.collect()}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for metric in re.findall(r"\b(llmops_[a-z_]+?)(?:_bucket|_sum|_count|_total)?\b", target["expr"]):
                assert metric in exposed, f"panel '{panel['title']}' plots {metric}, which serving does not expose"
