"""Consumer environments for the interop tests: cached venvs outside the repo, built by envs/build_env.sh
from pinned requirements (torch==2.13.0 CPU in each), so the first run pays for the install and later ones
start at once. Drivers under drivers/ run inside them, in one long-lived interpreter per venv (drivers/host.py)."""

import fcntl
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def build_env(name: str, cached_only: bool = False) -> Path | None:
    """The venv's python, built or reused (stamp = requirements + build script + Python version); with
    cached_only, None unless it is already built and current. A build holds a lock in the cache folder: under
    pytest -n 2 both workers may ask for the same venv, and the second must wait for the first build, not swap in
    its own beside it (the lock is here, not in build_env.sh, whose every byte is in the venvs' stamps)."""
    command = ["bash", str(HERE / "envs" / "build_env.sh"), name]
    if cached_only:
        done = subprocess.run([*command, "--cached"], capture_output=True, text=True)
    else:
        root = Path(os.environ.get("QUANTKIT_ENV_CACHE") or Path.home() / ".cache" / "quantkit" / "envs")
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = subprocess.run(command, capture_output=True, text=True)
    if cached_only and done.returncode == 3:
        return None
    if done.returncode:
        pytest.fail(f"building the {name} consumer env failed:\n{done.stderr[-4000:]}", pytrace=False)
    return Path(done.stdout.strip().splitlines()[-1]) / "bin" / "python"


class _Host:
    """run(driver, *args): a driver under drivers/ run in the venv by its host process (drivers/host.py), started on
    first use and kept for the session, so the consumer's imports (about 10 s) are paid once per venv, not once per
    run (the GPTQ and AWQ modules share the GPTQModel venv; the compressed-tensors tests make two runs). A non-zero
    exit fails the test; a host that died or timed out is replaced at the next run."""

    TIMEOUT = 1800

    def __init__(self, python: Path, env: dict, logs: Path):
        self.python, self.env, self.logs = python, env, logs
        self.process: subprocess.Popen | None = None
        self.runs = 0

    def __call__(self, driver: str, *args) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([str(self.python), str(HERE / "drivers" / "host.py")], env=self.env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.runs += 1
        log = self.logs / f"{self.runs}-{driver}.log"
        request = [os.getcwd(), str(log), str(HERE / "drivers" / driver), *map(str, args)]
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the host died starting up: no answer below, and its log says why if it got that far
        if not select.select([self.process.stdout], [], [], self.TIMEOUT)[0]:
            self.process.kill()
            reason = f"no answer in {self.TIMEOUT} s"
        else:
            status = self.process.stdout.readline().strip()
            if status == "0":
                return
            reason = f"rc {status}" if status else f"its host died, rc {self.process.wait()}"
        output = log.read_text() if log.exists() else ""
        sys.stderr.write(output)
        pytest.fail(f"{driver} failed in the consumer env ({reason}):\n{output[-4000:]}", pytrace=False)

    def close(self) -> None:
        """Every run is answered, its files written: the host is killed, not asked to exit (an interpreter holding
        torch and transformers took 3-5 s to shut down)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def _hosted(python: Path, env: dict, scratch: Path):
    """The fixtures' body: a _Host of that venv for the session, closed at its end."""
    logs = scratch / "logs"
    logs.mkdir()
    host = _Host(python, env, logs)
    yield host
    host.close()


@pytest.fixture(scope="session")
def gptqmodel_env(tmp_path_factory):
    """run(driver, *args) in the GPTQModel consumer env, offline, with every cache in a temp dir (PEERS.md §7
    pitfall 11) except compiled code, kept beside the venv: gptqmodel's JIT-compiled kernels (30-60 s to compile)
    and torch.compile's cache of the C++ kernels gptqmodel compiles on first use (TorchLinear's dequantize, 8-bit
    folders). Without precompiled headers: inductor rebuilds those in the temp dir (14 s) even when every kernel
    comes from the cache. The GPTQ logits run: 71 s with a cold cache per session, 31 s from a warm one (108 s the
    first time, after an env build)."""
    python = build_env("gptqmodel")
    scratch = tmp_path_factory.mktemp("gptqmodel-env")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(scratch / "hf"),
           "XDG_CACHE_HOME": str(scratch / "cache"), "TMPDIR": str(scratch), "GPTQMODEL_CPU_WORKERS": "2",
           "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(python.parent.parent / "torch_extensions"),
           "TORCHINDUCTOR_CACHE_DIR": str(python.parent.parent / "torchinductor"),
           "TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS": "0",
           "OMP_NUM_THREADS": "2", "PYTHONPATH": ""}
    yield from _hosted(python, env, scratch)


@pytest.fixture(scope="session")
def autogptq_env(tmp_path_factory):
    """run(driver, *args) in the AutoGPTQ 0.7.1 consumer env, offline, every cache in a temp dir. Building it
    (3-4 min) does not fit CI's time budget, so tests using it run only where it is already cached (by
    tests/interop/autogptq_check.py or an earlier run) or with QUANTKIT_INTEROP_AUTOGPTQ=1, which builds it."""
    python = build_env("autogptq", cached_only=not os.environ.get("QUANTKIT_INTEROP_AUTOGPTQ"))
    if python is None:
        pytest.skip("AutoGPTQ consumer env not cached: run tests/interop/autogptq_check.py or set "
                    "QUANTKIT_INTEROP_AUTOGPTQ=1")
    scratch = tmp_path_factory.mktemp("autogptq-env")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(scratch / "hf"),
           "XDG_CACHE_HOME": str(scratch / "cache"), "TMPDIR": str(scratch), "OMP_NUM_THREADS": "2",
           "PYTHONPATH": ""}
    yield from _hosted(python, env, scratch)


@pytest.fixture(scope="session")
def autoawq_env(tmp_path_factory):
    """run(driver, *args) in the AutoAWQ 0.2.9 consumer env (transformers 4.51.3), offline, every cache in a temp
    dir. A fresh build costs 5.5-6.5 min on 2 cores (bench/results/awq_consumers_peer_check.md), more than CI's time
    budget: tests using it run where it is already cached or with QUANTKIT_AUTOAWQ=1, which builds it."""
    python = build_env("autoawq", cached_only=not os.environ.get("QUANTKIT_AUTOAWQ"))
    if python is None:
        pytest.skip("AutoAWQ consumer env not cached: set QUANTKIT_AUTOAWQ=1 to build it (5.5-6.5 min)")
    scratch = tmp_path_factory.mktemp("autoawq-env")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(scratch / "hf"),
           "XDG_CACHE_HOME": str(scratch / "cache"), "TMPDIR": str(scratch), "OMP_NUM_THREADS": "2",
           "PYTHONPATH": ""}
    yield from _hosted(python, env, scratch)


@pytest.fixture(scope="session")
def ct_env(tmp_path_factory):
    """run(driver, *args) in the compressed-tensors consumer env (transformers 5.17.0 + compressed-tensors 0.20.0,
    envs/compressed_tensors.txt: 1.5 min to build on 2 cores), offline, every cache in a temp dir."""
    python = build_env("compressed_tensors")
    scratch = tmp_path_factory.mktemp("ct-env")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(scratch / "hf"),
           "XDG_CACHE_HOME": str(scratch / "cache"), "TMPDIR": str(scratch), "OMP_NUM_THREADS": "2",
           "PYTHONPATH": ""}
    yield from _hosted(python, env, scratch)
