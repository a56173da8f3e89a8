"""`quantkit run --executor ray`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import quantkit

pytest.importorskip("ray")

ROOT = Path(quantkit.__file__).resolve().parents[1]
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict:
    """This checkout's quantkit first on the path, and a statistics cache of its own."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "QUANTKIT_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}


def _quantkit(*args, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], env=_env(cache), cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_unreachable_cluster_fails_fast(tmp_path):
    (tmp_path / "mini.yaml").write_text("name: mini\nmodels:\n  - name: tiny-qwen2\nvariants:\n  - to: gguf:Q8_0\n")
    began = time.monotonic()
    result = _quantkit("run", "mini.yaml", "--executor", "ray", "--address", f"127.0.0.1:{_free_port()}",
                       cache=tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: cannot reach the Ray cluster at '127.0.0.1:"), result.stderr
    assert time.monotonic() - began < 60
