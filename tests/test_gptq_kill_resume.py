"""`quantkit convert --to gptq:` killed with SIGKILL mid-run, then the same command again: it resumes after the
last finished layer and the output is byte-identical to an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMMAND = ["convert", "tiny-deepseek", "--to", "gptq:w4g64-act", "--calib-samples", "8", "--calib-ctx", "128"]


def _run(out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *COMMAND, "-o", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_kill_9_then_rerun_gives_identical_bytes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    whole = tmp_path / "whole"
    assert _run(whole, env).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "quantkit.cli", *COMMAND, "-o", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = out / "tiny-deepseek-GPTQ-w4g64-act.part"
    deadline = time.monotonic() + 300
    while not list(folder.glob("layer-00001.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert folder.is_dir() and not (out / "tiny-deepseek-GPTQ-w4g64-act").exists(), "the run ended before the kill"
    finished = sorted(p.name for p in folder.glob("layer-*.safetensors"))
    assert finished and len(finished) < 4  # killed mid-run: some layers done, not all
    resumed = _run(out, env)
    assert resumed.returncode == 0, resumed.stderr
    assert _files(out / "tiny-deepseek-GPTQ-w4g64-act") == _files(whole / "tiny-deepseek-GPTQ-w4g64-act")
