"""Staging: the exact files of a variant's Hub repo in one local folder, ready to upload or inspect.

The folder is built as a hidden sibling `.<name>.<random>.part` and renamed into place only when complete, so a
staging folder under its final name is never half-made. Its `.quantkit-publish.json` manifest names the variant
it stages and every file with size and SHA-256: `upload` sends exactly those, and staging the same variant again
may replace it (and nothing else)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from quantkit.errors import PublishError
from quantkit.output import check_writable, write_error
from quantkit.publish.card import render_card
from quantkit.publish.shards import resplit_gguf
from quantkit.publish.variant import PLOT, VariantDir, check_repo_id, load_variant, unsplit_name

log = logging.getLogger(__name__)

# Hugging Face refuses files over 50 GB; 48 GB of tensor data leaves room for a shard's header.
HUB_FILE_LIMIT = 50 * 1000**3
DEFAULT_MAX_SHARD_BYTES = 48 * 1000**3
MANIFEST = ".quantkit-publish.json"
SUMS = "SHA256SUMS"
_HASH_CHUNK = 16 << 20


@dataclass(frozen=True)
class StagedFile:
    path: str  # path in the repo (posix), and under the staging folder
    size: int
    sha256: str


def stage(variant_dir: str | Path, staging_dir: str | Path, repo_id: str,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[StagedFile]:
    """Stage the variant in `variant_dir` for `repo_id` into `staging_dir`: the artifact's files (hard links where
    the file system allows, else copies; a GGUF over `max_shard_bytes` re-split into gguf-split shards; an HF
    folder's files at the repo root), README.md (the model card), the eval plot and SHA256SUMS. Returns every
    staged file, SHA256SUMS included, sorted by path."""
    check_repo_id(repo_id)
    if max_shard_bytes <= 0 or max_shard_bytes > HUB_FILE_LIMIT:
        raise PublishError(f"a shard size of {max_shard_bytes} bytes is not in 1..{HUB_FILE_LIMIT} (the Hub refuses "
                           "files over 50 GB); give e.g. --max-shard-size 48GB")
    variant = load_variant(variant_dir)
    staging_dir = Path(staging_dir).absolute()
    previous = _previous_staging(staging_dir, variant)
    check_writable(staging_dir.parent)
    tmp = staging_dir.parent / f".{staging_dir.name}.{uuid.uuid4().hex[:12]}.part"
    try:
        try:
            tmp.mkdir(parents=True)
            artifact = _stage_artifact(variant, tmp, max_shard_bytes)
            shutil.copyfile(variant.plot, tmp / PLOT)
            card = render_card(variant, repo_id, artifact_files=artifact)
            (tmp / "README.md").write_text(card, encoding="utf-8")
            staged = [_hashed(tmp, name) for name in sorted([*artifact, "README.md", PLOT])]
            # sha256sum's format: hash, two spaces (binary-safe text mode), path
            (tmp / SUMS).write_text("".join(f"{f.sha256}  {f.path}\n" for f in staged), encoding="utf-8")
            staged = sorted([*staged, _hashed(tmp, SUMS)], key=lambda f: f.path)
            manifest = {"variant_dir": str(variant.path), "repo_id": repo_id, "label": variant.label,
                        "files": [asdict(f) for f in staged]}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
            _replace(tmp, staging_dir, previous)
        except OSError as exc:
            raise write_error(staging_dir, exc) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return staged


def read_staging(staging_dir: str | Path) -> tuple[dict, list[StagedFile]]:
    """The manifest of a staging folder and its files, each checked present with its staged size."""
    staging_dir = Path(staging_dir)
    manifest = _manifest(staging_dir)
    if manifest is None:
        raise PublishError(f"{staging_dir} is not a quantkit staging folder (no {MANIFEST}); make one with "
                           "`quantkit publish VARIANT_DIR --dry-run -o DIR`")
    files = [StagedFile(**f) for f in manifest["files"]]
    for f in files:
        local = staging_dir / f.path
        if not local.is_file() or local.stat().st_size != f.size:
            raise PublishError(f"{local}: missing or changed since it was staged; stage the variant again")
    return manifest, files


def _manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("files"), list) and "variant_dir" in data
    return data if ok else None


def _previous_staging(staging_dir: Path, variant: VariantDir) -> bool:
    """Whether `staging_dir` holds a staging of this same variant (to be replaced); refuse anything else there."""
    if not staging_dir.exists():
        return False
    if not staging_dir.is_dir():
        raise PublishError(f"{staging_dir} is a file; give a staging folder with -o")
    present = {p.relative_to(staging_dir).as_posix() for p in staging_dir.rglob("*") if not p.is_dir()}
    if not present:
        return True
    manifest = _manifest(staging_dir)
    if manifest is None or manifest["variant_dir"] != str(variant.path):
        raise PublishError(f"{staging_dir} is not empty and not a staging of {variant.path}; give an empty or new "
                           "folder with -o, or remove it")
    extra = sorted(present - {f["path"] for f in manifest["files"]} - {MANIFEST})
    if extra:
        raise PublishError(f"{staging_dir} holds {extra[0]}, which staging did not make; remove it (staging again "
                           "replaces the folder)")
    return True


def _stage_artifact(v: VariantDir, dest: Path, max_shard_bytes: int) -> list[str]:
    if v.is_gguf:
        sources = list(v.files.values())
        if any(p.stat().st_size > max_shard_bytes for p in sources):
            log.info("re-splitting %s into shards of at most %d bytes", v.info["artifact"], max_shard_bytes)
            written = resplit_gguf(sources, dest / unsplit_name(sources[0].name), max_shard_bytes)
            return [p.name for p in written]
    else:
        too_big = [name for name, p in v.files.items() if p.stat().st_size > HUB_FILE_LIMIT]
        if too_big:
            raise PublishError(f"{v.files[too_big[0]]} is over the Hub's 50 GB file limit; convert the variant again "
                               "with smaller safetensors shards")
    for name, source in v.files.items():
        _link_or_copy(source, dest / name)
    return list(v.files)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no space or time; across file systems (or where links are refused) a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copyfile(source, target)


def _hashed(folder: Path, name: str) -> StagedFile:
    digest = hashlib.sha256()
    path = folder / name
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return StagedFile(name, path.stat().st_size, digest.hexdigest())


def _replace(tmp: Path, staging_dir: Path, previous: bool) -> None:
    """The complete staging takes the final name; a previous one (of the same variant) is moved aside first and
    removed after."""
    if not previous:
        os.rename(tmp, staging_dir)
        return
    old = staging_dir.parent / f".{staging_dir.name}.{uuid.uuid4().hex[:12]}.old"
    os.rename(staging_dir, old)
    try:
        os.rename(tmp, staging_dir)
    except OSError:
        os.rename(old, staging_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
