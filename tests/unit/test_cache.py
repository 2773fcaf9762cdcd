from pathlib import Path

import pytest

from llmops.cache import cached_stage, stage_key
from llmops.config import TrainConfig


def test_stage_key_follows_config_and_inputs() -> None:
    assert stage_key("data/abc", TrainConfig()) == stage_key("data/abc", TrainConfig())
    assert stage_key("data/abc", TrainConfig()) != stage_key("data/abc", TrainConfig(epochs=3))
    assert stage_key("data/abc", TrainConfig()) != stage_key("data/xyz", TrainConfig())


def test_cached_stage_builds_once(tmp_path: Path) -> None:
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "out.txt").write_text("done")

    first = cached_stage(tmp_path / "stage" / "k1", build)
    second = cached_stage(tmp_path / "stage" / "k1", build)
    assert first == (tmp_path / "stage" / "k1", False) and second[1] is True
    assert len(calls) == 1 and (tmp_path / "stage" / "k1" / "out.txt").read_text() == "done"


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_stage(tmp_path / "k", build)
    assert [p.name for p in tmp_path.iterdir()] == ["k.lock"]  # only the (released) lock: no folder, no .partial
