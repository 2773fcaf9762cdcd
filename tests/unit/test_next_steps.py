"""What `llmops run` tells a user to do next acts on what the run built, for either task."""

from __future__ import annotations

import pytest

from cli.main import next_steps


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm", "seq2seq-lm"])
def test_next_steps_name_the_runs_config_and_every_command_that_works(task: str) -> None:
    steps = next_steps("configs/mine.yaml", ["data.sample=500"], task, "sqlite:///mlflow.db", "1")
    args = "--config configs/mine.yaml --set 'data.sample=500'"
    for command in ("predict", "rollback", "serve", "monitor"):
        assert f".venv/bin/llmops {command} {args}" in steps
    assert ("/v1/chat/completions" in steps) == (task != "sequence-classification")
