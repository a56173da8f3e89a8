"""Output locations: checked before any work starts, and write failures said in one line."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from quantkit.errors import OutputError


def check_writable(folder: Path) -> None:
    """Raise OutputError unless files can be created in `folder` (or, when it does not exist yet, in the
    nearest existing folder above it, where it would be created): a probe file is made there and removed.
    Permission bits do not answer this (root ignores them; read-only mounts and quotas do not show in them),
    so the probe asks the file system itself. Nothing is left behind."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write to {folder}: {existing} is a file, not a folder; choose another output "
                          "location")
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantkit-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise write_error(folder, exc) from exc


def write_error(path: Path, exc: OSError) -> OutputError:
    """The one-line error for an OSError while creating or writing `path`."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"cannot write {path}: the disk is full ({exc.strerror}); free some space or choose "
                           "another output location")
    return OutputError(f"cannot write to {path}: {exc.strerror or exc}; choose another output location or fix "
                       "its permissions")
