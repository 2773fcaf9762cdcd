"""The lifecycle on a real two-host Ray cluster (`ray.address`): its stages run as Prefect tasks on the cluster
through prefect-ray, on both hosts, fine-tuning as two Ray Train workers of one DDP group, one on each host, and
the run ends as a local one does, with a gated champion. The worker node is
a network namespace of its own (tests/ray_cluster.py); the Prefect server listens where both hosts reach it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from llmops.cache import Built
from tests.conftest import STUDENT_AND_INT8, TINY_CONFIG
from tests.http_service import prefect_server
from tests.ray_cluster import node_logs, ray_cluster

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_the_lifecycle_runs_its_stages_on_both_hosts_and_promotes(tmp_path: Path) -> None:
    from llmops.launcher import WORKERS_FILE

    (tmp_path / "prefect").mkdir()
    with ray_cluster(workers=1, cpus=1) as cluster, prefect_server(cluster.head.address, tmp_path / "prefect") as api:
        env = cluster.env | {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect")}
        env.pop("RAY_ADDRESS")  # the config key says where, this time
        run = subprocess.run(
            [str(BIN / "llmops"), "run", "--config", str(TINY_CONFIG), "--set", f"ray.address={cluster.address}",
             "--set", "train.processes=2", "--set", STUDENT_AND_INT8],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        # The monitor's pass runs as a task on the cluster too (the window is empty: no verdict, but a pass).
        monitored = subprocess.run(
            [str(BIN / "llmops"), "monitor", "--config", str(TINY_CONFIG), "--set", f"ray.address={cluster.address}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        logs = node_logs(cluster)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:] + logs
    assert "promoted to champion" in run.stdout
    built = {
        folder.relative_to(tmp_path / "artifacts").as_posix(): Built.of(folder)
        for folder in (tmp_path / "artifacts").glob("*/*")
        if folder.is_dir() and Built.of(folder) is not None
    }
    hosts = {path.split("/")[0]: set() for path in built}
    for path, record in built.items():
        hosts[path.split("/")[0]].add(record.host)  # type: ignore[union-attr]
    both = {cluster.head.address, cluster.workers[0].address}
    assert set().union(*hosts.values()) == both, hosts  # the stages ran on both hosts, nowhere else
    assert {"data", "teacher", "student", "eval"} <= set(hosts), hosts
    # Fine-tuning ran as two DDP workers, one on each host (1 CPU each), and wrote the one candidate folder.
    (teacher,) = (tmp_path / "artifacts" / "teacher").glob("*/model")
    workers = json.loads((teacher.parent / WORKERS_FILE).read_text())
    assert [(w["rank"], w["world_size"]) for w in workers] == [(0, 2), (1, 2)]
    assert {w["node"] for w in workers} == both
    assert (teacher / "candidate.json").is_file() and not (teacher.parent / "ray-train").exists()
    assert monitored.returncode == 0, monitored.stdout[-3000:] + monitored.stderr[-3000:]
    (monitor_run,) = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()],
        filter_string="tags.`llmops.kind` = 'monitor'",
    )
    assert monitor_run.data.tags["llmops.host"] in both  # a Ray worker's node, not this process's host name


@pytest.mark.slow
def test_a_node_without_the_shared_folder_fails_the_run_saying_so(tmp_path: Path) -> None:
    # The worker host does not see the lifecycle's folder (as a machine without the shared disk): whichever stage
    # lands there first (a stage's task, or a Ray Train worker of the fine-tuning, which needs both hosts), the run
    # fails naming the folder and the node, and nothing is built there in a folder of its own.
    shared, work = tmp_path / "shared", tmp_path / "shared" / "work"
    work.mkdir(parents=True)
    (tmp_path / "prefect").mkdir()
    with (
        ray_cluster(workers=1, cpus=1, hidden=(shared,)) as cluster,
        prefect_server(cluster.head.address, tmp_path / "prefect") as api,
    ):
        env = cluster.env | {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect")}
        run = subprocess.run(
            [str(BIN / "llmops"), "run", "--config", str(TINY_CONFIG), "--set", "train.processes=2"],
            cwd=work, env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        logs = node_logs(cluster)
    said = run.stdout + run.stderr
    assert run.returncode != 0, said[-4000:] + logs
    assert f"{work} is not visible on {cluster.workers[0].address}" in said, said[-4000:] + logs
    assert "must be on storage every node sees at the same path" in said
    assert not list((work / "artifacts").glob("teacher/*/model"))  # no candidate came of it


def test_without_an_address_ray_is_not_even_imported() -> None:
    probe = (
        "import sys, flows.lifecycle, flows.batch, cli.main, serving.app, llmops.batch; "
        "print(sorted(m for m in ('ray', 'prefect_ray') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
