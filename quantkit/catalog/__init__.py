"""The DeepSeek family as configs only (models.json: each Hugging Face repo's config.json, the fields quantkit's
architectures read), so that `quantkit plan` can size a model before anything is downloaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from quantkit.arch import Architecture, load_architecture
from quantkit.errors import ConfigError

CATALOG_FILE = Path(__file__).with_name("models.json")


@dataclass(frozen=True)
class Origin:
    path: Path  # what messages name the model by


@dataclass(frozen=True)
class CatalogModel:
    """A catalog entry: its repo id and architecture, no weights. Formats plan from it as from a Model."""

    repo: str
    arch: Architecture

    @property
    def name(self) -> str:
        return self.repo.split("/", 1)[1]

    @property
    def source(self) -> Origin:
        return Origin(Path(self.repo))


@cache
def _configs() -> dict[str, dict]:
    return json.loads(CATALOG_FILE.read_text())


def names() -> list[str]:
    return list(_configs())


def find(name: str) -> str | None:
    """The repo id `name` means (the repo id or its name without the org, any case), or None."""
    key = name.strip().lower()
    for repo in _configs():
        if key in (repo.lower(), repo.split("/", 1)[1].lower()):
            return repo
    return None


def load(name: str) -> CatalogModel:
    repo = find(name)
    if repo is None:
        raise ConfigError(f"{name!r} is no file or folder, bundled model or catalog name; the catalog has "
                          + ", ".join(names()) + " (with or without the org, any case)")
    return CatalogModel(repo, load_architecture(_configs()[repo], origin=f"catalog {repo}"))


__all__ = ["CatalogModel", "find", "load", "names"]
