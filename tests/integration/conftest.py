"""Fixtures of the runtime tests (test_gguf.py, test_openvino.py): a tiny trained Llama and held-out rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from llmops.generation.evaluate import prompts_of
from tests.integration.trained_decoders import trained


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    return trained(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def held_out(llama: tuple[Path, object]) -> tuple[list, list[str]]:
    test = pd.read_parquet(llama[1].split_path("test")).head(24)  # type: ignore[attr-defined]
    return prompts_of(test), list(test["completion"])
