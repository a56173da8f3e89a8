import shutil
from pathlib import Path

import pytest

from quantkit.testing.factory import make_tiny_model


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """Tiny model folders, made once per session; a test that damages one must work on `copy_model`."""
    root = tmp_path_factory.mktemp("models")
    made: dict[tuple, Path] = {}

    def get(preset: str, **kwargs) -> Path:
        key = (preset, tuple(sorted(kwargs.items())))
        if key not in made:
            name = preset + "".join(f"-{k}" for k, v in sorted(kwargs.items()) if v)
            made[key] = make_tiny_model(root / name, preset, **kwargs)
        return made[key]

    return get


@pytest.fixture
def copy_model(model_cache, tmp_path):
    def copy(preset: str, **kwargs) -> Path:
        dst = tmp_path / "model"
        shutil.copytree(model_cache(preset, **kwargs), dst)
        return dst

    return copy
