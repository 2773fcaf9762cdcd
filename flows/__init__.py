"""Prefect flows: wiring only; each task calls one llmops function."""
