"""Two lifecycles started together on one registry and one work_dir (two people pressing run, a scheduled run
overlapping a manual one): every stage is built once, by one of them; the other waits and reuses it; both end
without a traceback, with a champion that passed its gates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import STUDENT_AND_INT8, TINY_CONFIG

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_two_runs_at_once_build_each_stage_once(workdir: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    env = os.environ | {"PREFECT_API_URL": str(PREFECT_API_URL.value())}  # one Prefect server, as in a stack
    llmops = Path(sys.executable).parent / "llmops"
    command = [str(llmops), "run", "--config", str(TINY_CONFIG), "--set", STUDENT_AND_INT8]
    runs = [
        subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=900)[0] for run in runs]

    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-4000:]
        assert "Traceback" not in output, output[-4000:]
        # and no advice a user cannot act on between the progress bars (MLflow's schema hint, bitsandbytes' kernels)
        assert "Inferred schema contains integer" not in output and "gemm_4bit_forward" not in output
    for stage in ("data", "teacher", "student"):
        (built,) = [p for p in (workdir / "artifacts" / stage).iterdir() if p.is_dir()]  # one folder, no .partial
        reused = [output for output in outputs if f"cached: reusing {built.relative_to(workdir)}" in output]
        assert len(reused) == 1, f"{stage}: built by both runs"  # the other waited for it, then reused it
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    champion = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("tweet-sentiment", "champion")
    assert champion.tags["llmops.verdict"] == "passed"
