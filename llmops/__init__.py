"""llmops: the whole lifecycle of transformer classifiers and generators, from raw data to a served, monitored
champion."""

import logging

__version__ = "0.3.0"

# bitsandbytes announces at import, on every CPU, that it found no hub-downloaded CPU kernel for 4-bit matmuls: the
# hub is not reachable here and the fallback is what runs. Its real warnings and errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
