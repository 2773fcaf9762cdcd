from pathlib import Path

import pytest

from llmops.cache import Built, cached_stage, stage_key
from llmops.config import TrainConfig
from llmops.memory import PeakMemory


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


def test_a_stage_records_its_peak_memory_even_when_a_measurement_inside_resets_it(tmp_path: Path) -> None:
    """The lifecycle cost table reads each stage's peak from `.built.json`; the evaluation stage measures a
    candidate's own peak inside it (a reset of the high-water mark), which must not hide the stage's."""

    def build(folder: Path) -> None:
        held = bytearray(300 * 2**20)  # 300 MB touched, then freed
        held[::4096] = b"x" * len(held[::4096])
        del held
        with PeakMemory() as inner:  # resets the high-water mark, as the evaluation does
            small = bytearray(20 * 2**20)
            small[::4096] = b"y" * len(small[::4096])
        assert inner.mb() is not None and inner.mb() < 150  # the inner block sees its own peak, not the stage's

    before = PeakMemory()
    before.close()
    folder, _ = cached_stage(tmp_path / "k", build)
    built = Built.of(folder)
    assert built is not None and built.finished >= built.started and built.peak_memory_mb is not None
    assert built.peak_memory_mb - before.base / 2**20 > 290  # the 300 MB the stage held before the inner reset
