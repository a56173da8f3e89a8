"""The run directory's state file: what is finished, under which fingerprint, with which files and checksums.

One writer (the process driving the run) replaces state.json atomically after every finished task, so a kill at
any moment leaves the previous complete state. A task counts as finished only when its fingerprint (everything
its output depends on) is unchanged and every file it recorded is still there with the recorded size and
modification time; a file whose size or time changed is hashed again and must match its recorded sha256.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from quantkit.errors import QuantkitError

STATE_NAME = "state.json"
LOCK_NAME = ".lock"
VERSION = 1


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_records(root: Path, paths: list[Path]) -> dict[str, dict]:
    """{path relative to root: sha256, size, mtime_ns} of each file; a folder stands for every file under it."""
    records = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            stat = f.stat()
            records[f.relative_to(root).as_posix()] = {"sha256": sha256_file(f), "size": stat.st_size,
                                                       "mtime_ns": stat.st_mtime_ns}
    return records


class RunState:
    """state.json of a run directory, held under an exclusive lock for the run's lifetime (a second run on the same
    directory is refused; the lock dies with its process, so a killed run never blocks the next)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STATE_NAME
        self._lock = None
        self.tasks: dict[str, dict] = {}
        self.started: dict[str, str] = {}  # task id -> fingerprint of the attempt in progress

    def open(self) -> RunState:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.run_dir / LOCK_NAME, "a")
        except OSError as exc:
            raise QuantkitError(f"{self.run_dir}: cannot use it as the run directory ({exc.strerror}); choose a "
                                "writable one with -o") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise QuantkitError(f"{self.run_dir}: another `quantkit run` is using this run directory; wait for it "
                                "or choose another -o") from None
        self.load()
        return self

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> RunState:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self) -> None:
        if not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')}")
            self.tasks, self.started = dict(data["tasks"]), dict(data.get("started", {}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QuantkitError(f"{self.path}: not a state file this quantkit can read ({exc}); remove the run "
                                "directory or choose another -o") from None

    def save(self) -> None:
        data = json.dumps({"version": VERSION, "tasks": self.tasks, "started": self.started}, indent=1,
                          sort_keys=True)
        tmp = self.path.with_name(STATE_NAME + ".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(data + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise QuantkitError(f"{self.path}: cannot record the run's progress ({exc.strerror}); free space or "
                                "fix the run directory, then rerun the same command to resume") from None

    def finished(self, task_id: str, fingerprint: str) -> dict | None:
        """The task's record when it finished under this fingerprint and its files are intact; else None."""
        record = self.tasks.get(task_id)
        if record is None or record["fingerprint"] != fingerprint:
            return None
        for rel, info in record["files"].items():
            path = self.run_dir / rel
            try:
                stat = path.stat()
            except OSError:
                return None
            if stat.st_size != info["size"]:
                return None
            if stat.st_mtime_ns != info["mtime_ns"] and sha256_file(path) != info["sha256"]:
                return None
        return record

    def start(self, task_id: str, fingerprint: str) -> str | None:
        """Note an attempt; returns the fingerprint of an earlier unfinished attempt (None if none)."""
        previous = self.started.get(task_id)
        self.started[task_id] = fingerprint
        self.tasks.pop(task_id, None)
        self.save()
        return previous

    def finish(self, task_id: str, fingerprint: str, files: dict[str, dict], **facts) -> None:
        self.tasks[task_id] = {"fingerprint": fingerprint, "files": files, **facts}
        self.started.pop(task_id, None)
        self.save()
