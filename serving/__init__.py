"""The HTTP service of llmops: serves the registry's champion (see serving/app.py)."""
