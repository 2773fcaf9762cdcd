"""llmops: the whole lifecycle of transformer classifiers and generators, from raw data to a served, monitored
champion."""

__version__ = "0.3.0"
