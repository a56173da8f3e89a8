"""`quantkit run --executor ray` on a real Ray cluster that this module starts: a head and one worker node, each
with one CPU, on this machine, stopped at the end.

Ray cannot be kept on loopback: `ray start` replaces 127.0.0.1 with the machine's routable address (Ray's
resolve_ip_for_localhost) and its GCS listens on every interface; 127.0.0.1:PORT still works as the address to
connect to. Every node gets its own --temp-dir (one log monitor per session folder: a shared one makes every
forwarded line appear twice) and its own process session; stopping kills the processes of those sessions' process
groups and their descendants, never `ray stop`, which stops every Ray of this user on the machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mini_recipe import ROOT, run_env, run_files

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(groups: list[int]) -> None:
    """Kill every process of these process groups and their descendants: Ray's workers, children of a raylet,
    lead process groups of their own."""
    members = [p for p in psutil.process_iter() if _pgid(p.pid) in groups]
    procs = {p.pid: p for p in members}
    for p in members:
        try:
            procs |= {c.pid: c for c in p.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    for p in procs.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs.values(), timeout=30)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.fixture(scope="module")
def ray_cluster():
    """The cluster's address (127.0.0.1:PORT). Ray's workers compute with a statistics cache of their own, so the
    Ray run cannot reuse what a local run cached."""
    # Short paths: Ray's unix sockets live under --temp-dir, and a socket path has at most 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="qk-ray-"))
    env = run_env(root / "cache")
    port = _free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    nodes = [["--head", "--port", str(port), "--include-dashboard=false"], ["--address", f"127.0.0.1:{port}"]]
    groups = []
    try:
        for i, args in enumerate(nodes):
            # A session of its own: the node's daemons (GCS, raylet, agents) stay in this process group after
            # `ray start` returns; its workers are the raylet's children.
            node = subprocess.Popen([*RAY, "start", *args, *common, "--temp-dir", str(root / f"node{i}")], env=env,
                                    start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            groups.append(node.pid)
            out, _ = node.communicate(timeout=120)
            assert node.returncode == 0, out
        yield f"127.0.0.1:{port}"
    finally:
        _stop(groups)
        shutil.rmtree(root, ignore_errors=True)


def _quantkit(*args, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], env=run_env(cache), cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _task_lines(stderr: str, verb: str) -> set[str]:
    """The task ids of the runner's "start ID" / "done ID in ..." / "skip ID: ..." lines."""
    return {line.split(f"runner: {verb} ", 1)[1].split()[0].rstrip(":") for line in stderr.splitlines()
            if f"runner: {verb} " in line}


def test_ray_run_gives_the_local_bytes(ray_cluster, mini_run, tmp_path):
    """The session's small recipe run (GGUF with imatrix, GPTQ, evaluation, cards; local executor) again on the
    cluster: the same tasks and the same bytes, and a rerun starts nothing."""
    recipe, local_dir, _, local_log = mini_run
    ray_command = ["run", recipe, "-o", tmp_path / "ray", "--threads", 1, "--executor", "ray",
                   "--address", ray_cluster]
    ray = _quantkit(*ray_command, cache=tmp_path / "driver-cache", cwd=tmp_path)
    assert ray.returncode == 0, ray.stderr

    model = "tiny-qwen2"
    tasks = {f"{model}/imatrix", f"{model}/convert:Q4_K_M+Q8_0", f"{model}/convert:GPTQ-w4g128", f"{model}/eval",
             f"{model}/cards"}
    assert _task_lines(local_log, "done") == _task_lines(ray.stderr, "done") == tasks
    assert "(ray executor)" in ray.stderr
    assert f"({model}/eval pid=" in ray.stderr  # the workers' log lines came back, named by their task
    assert "\x1b[" not in ray.stderr  # without colour codes: stderr is not a terminal
    local_files, ray_files = run_files(local_dir), run_files(tmp_path / "ray")
    assert len(local_files) > 10
    assert sorted(ray_files) == sorted(local_files)
    assert [name for name in local_files if ray_files[name] != local_files[name]] == []

    again = _quantkit(*ray_command, cache=tmp_path / "driver-cache", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert _task_lines(again.stderr, "start") == set()
    assert f"skip {model}/imatrix: finished before" in again.stderr
    assert run_files(tmp_path / "ray") == ray_files


def test_ray_task_error_is_one_line(ray_cluster, tmp_path):
    # The recipe validates (config.json is there); the shard is found truncated only when the task reads it.
    model = tmp_path / "model"
    shutil.copytree(ROOT / "quantkit" / "bundled" / "models" / "tiny-qwen2", model)
    with open(model / "model-00002-of-00002.safetensors", "r+b") as f:
        f.truncate(1000)
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nmodels:\n  - {name: m, path: model}\nevaluation: false\n"
                    "variants:\n  - {to: 'gguf:Q8_0', imatrix: false}\n")
    result = _quantkit("run", path, "-o", tmp_path / "run", "--threads", 1, "--executor", "ray",
                       "--address", ray_cluster, cache=tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: m/convert:Q8_0: {model / 'model-00002-of-00002.safetensors'}: truncated")
    assert "Traceback" not in result.stderr


def test_unreachable_cluster_fails_fast(tmp_path):
    (tmp_path / "mini.yaml").write_text("name: mini\nmodels:\n  - name: tiny-qwen2\nvariants:\n  - to: gguf:Q8_0\n")
    result = _quantkit("run", "mini.yaml", "--executor", "ray", "--address", f"127.0.0.1:{_free_port()}",
                       cache=tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot reach the Ray cluster at '127.0.0.1:"), \
        result.stderr
