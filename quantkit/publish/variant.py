"""A variant directory of a `quantkit run` (what `quantkit publish` takes): its variant.json, the artifact's files and
the model's eval report, read and checked once, before anything is written.

    RUN_DIR/recipe.yaml
    RUN_DIR/<model>/eval/report.json, quality_vs_vram.png
    RUN_DIR/<model>/<variant>/variant.json, <artifact>   (a GGUF file or gguf-split shards, or an HF folder)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import PublishError

KEYS = ("recipe", "model", "source", "base_model", "license", "variant", "to", "format", "artifact", "files",
        "command", "tags", "eval_ctx")
FORMATS = ("gguf", "gptq", "awq", "ct")
EVAL_DIR = "eval"
REPORT = "report.json"
PLOT = "quality_vs_vram.png"
RECIPE = "recipe.yaml"
# The Hub's rule for both halves of a repo id (huggingface_hub's validate_repo_id): letters, digits, "-", "_", ".",
# at most 96 characters, no leading or trailing "-" or ".", no "--" or "..".
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")
_RUN_HINT = "run `quantkit run RECIPE` (it writes variant directories), or point at one it wrote"


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a Hub model id USER/NAME, else one PublishError saying what a valid one looks like."""
    parts = str(repo_id).split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) and "--" not in p and ".." not in p for p in parts):
        raise PublishError(f"{repo_id!r} is not a Hugging Face repo id; give USER/NAME (letters, digits, '-', '_', "
                           "'.'), e.g. --repo-id alice/tiny-qwen2-Q4_K_M-GGUF")
    return repo_id


def artifact_stem(name: str) -> str:
    """The name an eval report gives an artifact: a GGUF file's stem, an HF folder's name."""
    return name[:-len(".gguf")] if name.endswith(".gguf") else name


def unsplit_name(name: str) -> str:
    """A GGUF file name without gguf-split's -00001-of-00003 (the name the whole file would have)."""
    return _SPLIT_SUFFIX.sub("", artifact_stem(name)) + ".gguf"


@dataclass(frozen=True)
class VariantDir:
    path: Path
    info: dict  # variant.json
    report: dict  # the model's eval report.json
    row: dict  # this variant's row of the report
    files: dict[str, Path]  # the artifact's files: path in the repo -> file on disk

    @property
    def model_dir(self) -> Path:
        return self.path.parent

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent

    @property
    def plot(self) -> Path:
        return self.model_dir / EVAL_DIR / PLOT

    @property
    def recipe(self) -> Path:
        return self.run_dir / RECIPE

    @property
    def is_gguf(self) -> bool:
        return self.info["format"] == "gguf"

    @property
    def label(self) -> str:
        return f"{self.info['model']}-{self.info['variant']}"


def default_staging_dir(variant_dir: Path) -> Path:
    """<RUN_DIR>/publish/<model>-<variant>, beside the run's models."""
    variant = load_variant(variant_dir)
    return variant.run_dir / "publish" / variant.label


def load_variant(variant_dir: str | Path) -> VariantDir:
    path = Path(variant_dir).absolute()
    if not path.is_dir():
        raise PublishError(f"{path}: no such variant directory; {_RUN_HINT}")
    info = _read_json(path / "variant.json", f"{path} is not a variant directory (no variant.json); {_RUN_HINT}")
    missing = [k for k in KEYS if k not in info]
    if missing:
        raise PublishError(f"{path / 'variant.json'} lacks {', '.join(missing)}; it was not written by this "
                           "quantkit's `quantkit run`: run the recipe again")
    if info["format"] not in FORMATS:
        raise PublishError(f"{path / 'variant.json'}: format {info['format']!r} is not one of "
                           f"{', '.join(FORMATS)}; run the recipe again with this quantkit")
    if not isinstance(info["files"], list) or not info["files"] or not isinstance(info["tags"], list):
        raise PublishError(f"{path / 'variant.json'}: files must be a non-empty list and tags a list; run the "
                           "recipe again")
    files = _artifact_files(path, info)
    report_path = path.parent / EVAL_DIR / REPORT
    eval_hint = (f"run `quantkit run` to the end (it evaluates every variant), or `quantkit eval` on {info['model']}'s "
                 f"variants with -o {path.parent / EVAL_DIR}")
    report = _read_json(report_path, f"{report_path}: no eval report of {info['model']}; {eval_hint}")
    if not (path.parent / EVAL_DIR / PLOT).is_file():
        raise PublishError(f"{path.parent / EVAL_DIR / PLOT}: the eval plot is missing; {eval_hint}")
    name = artifact_stem(Path(info["artifact"]).name)
    rows = [r for r in report.get("variants", []) if isinstance(r, dict) and r.get("name") == name]
    if not rows or not isinstance(report.get("baseline"), dict):
        raise PublishError(f"{report_path} has no row for {name} (the {info['variant']} artifact); {eval_hint}")
    return VariantDir(path, info, report, rows[0], files)


def _read_json(path: Path, missing: str) -> dict:
    if not path.is_file():
        raise PublishError(missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishError(f"{path}: unreadable ({exc}); run the step that writes it again") from None
    if not isinstance(data, dict):
        raise PublishError(f"{path}: not a JSON object; run the step that writes it again")
    return data


def _artifact_files(path: Path, info: dict) -> dict[str, Path]:
    """Every file of the artifact under its path in the repo: GGUF files by name, an HF folder's files relative
    to the folder (the repo root is the checkpoint)."""
    absent = [f for f in info["files"] if not (path / f).exists()]
    artifact = path / info["artifact"]
    if not artifact.exists() and info["artifact"] not in absent:
        absent.insert(0, info["artifact"])
    if absent:
        raise PublishError(f"{path}: {', '.join(map(str, absent))} of the artifact not found (deleted, or the run "
                           "stopped before writing it); run the recipe again to make it")
    if info["format"] == "gguf":
        gguf = [path / f for f in info["files"]]
        if not all(f.is_file() and f.name.endswith(".gguf") for f in gguf):
            raise PublishError(f"{path / 'variant.json'}: a GGUF variant's files must be .gguf files; run the "
                               "recipe again")
        return {f.name: f for f in sorted(gguf)}
    if not (artifact / "config.json").is_file():
        raise PublishError(f"{artifact}: not an HF model folder (no config.json); run the recipe again to make it")
    # Hidden files are a tool's bookkeeping, not part of the checkpoint.
    return {f.relative_to(artifact).as_posix(): f for f in sorted(artifact.rglob("*"))
            if f.is_file() and not any(p.startswith(".") for p in f.relative_to(artifact).parts)}
