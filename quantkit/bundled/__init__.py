"""Data that ships inside the package, so defaults work offline and without the repository: the trained
tiny models (tiny-qwen2, tiny-llama, tiny-deepseek), the standard-library text sets and the
multiple-choice task generator."""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError

MODELS_DIR = Path(__file__).resolve().parent / "models"
MODEL_NAMES = ("tiny-qwen2", "tiny-llama", "tiny-deepseek")
DEFAULT_MODEL = "tiny-qwen2"


def model_path(name: str = DEFAULT_MODEL) -> Path:
    path = MODELS_DIR / name
    if name not in MODEL_NAMES or not (path / "config.json").is_file():
        raise QuantkitError(f"no bundled model {name!r}; bundled: {', '.join(MODEL_NAMES)} "
                            "(rebuild them with `python -m eval.train_models`)")
    return path


def resolve_model(arg: str) -> Path:
    """A path as given, or a bundled model's folder when `arg` names one and no such path exists."""
    path = Path(arg)
    if not path.exists() and arg in MODEL_NAMES:
        return model_path(arg)
    return path
