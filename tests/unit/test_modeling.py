from pathlib import Path

import pytest

from llmops.checkpoints import ModelLoadError, packaged_model_path, preflight, resolve_checkpoint
from llmops.config import PACKAGED_MODEL, ModelConfig


def test_packaged_model_resolves_to_a_local_folder() -> None:
    assert (Path(resolve_checkpoint(PACKAGED_MODEL)) / "config.json").is_file()
    assert resolve_checkpoint(PACKAGED_MODEL) == str(packaged_model_path())


def test_missing_local_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a model folder"):
        resolve_checkpoint(str(tmp_path / "no-such-model"))


def test_hub_id_offline_fails_in_preflight() -> None:
    with pytest.raises(ModelLoadError, match="cannot load 'someone/not-cached-anywhere'"):
        preflight(ModelConfig(name_or_path="someone/not-cached-anywhere"))
