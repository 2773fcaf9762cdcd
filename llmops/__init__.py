"""llmops: the whole lifecycle of a transformer classifier, from raw data to a served, monitored champion."""

__version__ = "0.2.0"
