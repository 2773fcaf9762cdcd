"""A version is loaded and warmed on a thread of its own that ends with the load: torch and llama.cpp keep an
OpenMP team per thread that ran a forward pass, and a pooled loading thread would keep its team beside the
engine's (a process with more OpenMP threads than cores decodes at about half speed)."""

from __future__ import annotations

import threading

import pytest
import torch

from serving.models import on_own_thread


def warm() -> str:
    torch.ones(256, 256) @ torch.ones(256, 256)  # a parallel region: an OpenMP team for this thread
    return threading.current_thread().name


def test_the_load_runs_on_a_thread_that_is_gone_when_it_returns() -> None:
    assert on_own_thread(warm) == "load-version"
    assert "load-version" not in {thread.name for thread in threading.enumerate()}


def test_a_failed_load_raises_its_own_error_to_the_caller() -> None:
    def broken() -> None:
        raise FileNotFoundError("no model file")

    with pytest.raises(FileNotFoundError, match="no model file"):
        on_own_thread(broken)
