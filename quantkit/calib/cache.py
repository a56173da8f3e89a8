"""Calibration statistics cached on disk, keyed by everything they depend on: the checkpoint's files (name,
size, modification time), its config, the exact calibration token ids, the statistic and its settings, and the
quantkit version. A rerun with the same inputs reuses the statistics instead of running the model again."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from quantkit import __version__
from quantkit.calib.imatrix import Imatrix
from quantkit.errors import SourceError


def default_cache_dir() -> Path:
    root = os.environ.get("QUANTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "quantkit")
    return Path(root) / "calib"


class StatisticsCache:
    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else default_cache_dir()

    def key(self, model, statistic: str, tokens: torch.Tensor, **settings) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps([__version__, statistic, model.source.file_identity(), model.config, settings],
                                 sort_keys=True, default=str).encode())
        digest.update(tokens.to(torch.int64).cpu().numpy().tobytes())
        return f"{statistic}-{digest.hexdigest()[:32]}"

    def path(self, key: str, suffix: str) -> Path:
        return self.folder / (key + suffix)

    def load_imatrix(self, key: str) -> Imatrix | None:
        path = self.path(key, ".imatrix.gguf")
        if not path.is_file():
            return None
        try:
            return Imatrix.load(path)
        except SourceError:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
            return None

    def save_imatrix(self, key: str, imatrix: Imatrix) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            imatrix.save(self.path(key, ".imatrix.gguf"))
        except OSError:  # caching is an optimisation: an unwritable cache folder costs only the reuse
            pass
