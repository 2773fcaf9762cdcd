"""The MLflow trace writer: a process of its own (`serving.tracing.MlflowTraces` starts it), which reads pickled
generations from its standard input and writes each as a trace in the store named on its command line, at a
lower priority than the service, until its input ends."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from types import SimpleNamespace

log = logging.getLogger("llmops.mlflow_traces")

NICE = 10
"""How much lower than the service the writer runs (`os.nice`): the service's threads come first on the cores."""


def main(tracking_uri: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.nice(NICE)
    import mlflow

    from serving.tracing import write_trace

    mlflow.set_tracking_uri(tracking_uri)
    while True:
        try:
            fields, (experiment_id, run_id, model_id), tags = pickle.load(sys.stdin.buffer)
        except EOFError:
            break
        try:
            write_trace(SimpleNamespace(**fields), experiment_id, run_id, model_id, tags)
        except Exception:
            log.exception("could not write an MLflow trace of request %s", fields.get("request_id", "?"))
    mlflow.flush_trace_async_logging()


if __name__ == "__main__":
    main(sys.argv[1])
