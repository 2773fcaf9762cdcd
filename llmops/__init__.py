"""llmops: the whole lifecycle of transformer classifiers and generators, from raw data to a served, monitored
champion."""

import logging
import os

__version__ = "0.3.0"

# llmops runs offline: the temporary Prefect server a flow starts, and MLflow, would otherwise try to send usage
# telemetry and log an error for each attempt. Set these variables yourself to choose otherwise.
for _variable, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(_variable, _value)

# bitsandbytes announces at import, on every CPU, that it found no hub-downloaded CPU kernel for 4-bit matmuls: the
# hub is not reachable here and the fallback is what runs. Its real warnings and errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
