"""What tests/recipe's modules share: the small recipe that conftest.py's `mini_run` runs once per session (the
kill/resume tests rerun it; the Ray test compares the Ray executor's bytes with it), and how a run is started."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Calibration and evaluation cut to a few windows: the code paths are the amounts' size-independent ones.
MINI_RECIPE = """\
name: mini
models:
  - name: tiny-qwen2
    base_model: example/tiny-qwen2
    license: mit
calibration: {samples: 4, ctx: 64, imatrix_chunks: 2, imatrix_ctx: 64}
evaluation: {ctx: 64, windows: 2, mc_items: 4}
variants:
  - to: gguf:Q4_K_M
  - to: gguf:Q8_0
  - to: gptq:w4g128
publish:
  repo_id: "me/{model}-{variant}"
"""
# state.json records times; .lock is the run's lock file: everything else must be identical
VOLATILE = {"state.json", ".lock"}


def run_env(cache: Path) -> dict:
    """This checkout's quantkit first on the path (of the driver and of whatever it starts) and a statistics cache
    of the run's own."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "QUANTKIT_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}


def run_command(recipe: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli", "run", str(recipe), "-o", str(run_dir), "--threads", "1"]


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in VOLATILE}
