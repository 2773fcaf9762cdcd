"""No app at all: uvicorn (httptools, uvloop), the service's micro-batcher and the model, JSON in and out.

`bench/serving.py --gateway` runs it beside our server: what a server of the same design reaches on the same
cores when nothing but HTTP, batching and the forward pass runs a request, the ceiling under the bound
`1 / (1/model-only + 1/HTTP alone)`. `POST /v1/predict` takes `{"texts": [...]}` and answers each text's label,
score and probabilities (no validation, no log, no metrics); any other path answers 200.

    python bench/bare_server.py CANDIDATE_DIR --port 8000
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any

# Run as a script, its folder comes first on the path, where bench/serving.py would stand in for the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import uvicorn  # noqa: E402

from llmops.classification.candidate import Classifier  # noqa: E402
from serving.batcher import MicroBatcher  # noqa: E402
from serving.metrics import ServingMetrics  # noqa: E402


def build(candidate: str, max_batch_size: int) -> Any:
    model = types.SimpleNamespace(classifier=Classifier(candidate))  # what the batcher reads of a loaded model
    labels = model.classifier.labels
    batcher: dict[str, MicroBatcher] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    batcher["it"] = MicroBatcher(
                        ServingMetrics(), enabled=True, max_batch_size=max_batch_size, max_wait_ms=5, max_queue=1024
                    )
                    batcher["it"].start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await batcher["it"].stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer: Any = "ok"
        if scope["path"] == "/v1/predict":
            out = await batcher["it"].predict(model, json.loads(body)["texts"])  # type: ignore[arg-type]
            answer = {
                "predictions": [
                    {
                        "label": labels[row.index(max(row))],
                        "score": max(row),
                        "probabilities": dict(zip(labels, row, strict=True)),
                    }
                    for row in out.probs.tolist()
                ]
            }
        data = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidate")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()
    uvicorn.run(build(args.candidate, args.max_batch_size), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
