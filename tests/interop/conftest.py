"""Consumer environments for the interop tests: cached venvs outside the repo, built by envs/build_env.sh
from pinned requirements (torch==2.13.0 CPU in each), so the first run pays for the install and later ones
start at once. Drivers under drivers/ run inside them as subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def build_env(name: str) -> Path:
    """The venv's python, built or reused (stamp = requirements + build script + Python version)."""
    done = subprocess.run(["bash", str(HERE / "envs" / "build_env.sh"), name], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"building the {name} consumer env failed:\n{done.stderr[-4000:]}", pytrace=False)
    return Path(done.stdout.strip().splitlines()[-1]) / "bin" / "python"


@pytest.fixture(scope="session")
def gptqmodel_env(tmp_path_factory):
    """run(driver, *args) in the GPTQModel consumer env, offline, with every cache in a temp dir (PEERS.md §7
    pitfall 11) except gptqmodel's JIT-compiled kernels, kept beside the venv (30-60 s to compile)."""
    python = build_env("gptqmodel")
    scratch = tmp_path_factory.mktemp("gptqmodel-env")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(scratch / "hf"),
           "XDG_CACHE_HOME": str(scratch / "cache"), "TMPDIR": str(scratch), "GPTQMODEL_CPU_WORKERS": "2",
           "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(python.parent.parent / "torch_extensions"),
           "OMP_NUM_THREADS": "2", "PYTHONPATH": ""}

    def run(driver: str, *args) -> subprocess.CompletedProcess:
        done = subprocess.run([str(python), str(HERE / "drivers" / driver), *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=1800)
        if done.returncode:
            sys.stderr.write(done.stderr)
            pytest.fail(f"{driver} failed in the consumer env (rc {done.returncode}):\n{done.stderr[-4000:]}",
                        pytrace=False)
        return done

    return run
