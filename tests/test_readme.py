"""The README's set-up commands are the ones CI runs and the ones that work."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    main_job, test_command = _readme_commands()[:2]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_main_job_runs(tmp_path):
    """The main job's quantkit part, in this environment (the venv part is exercised by CI itself)."""
    main_job = _readme_commands()[0]
    steps = main_job.split(" && ")
    quantkit_steps = [s for s in steps if s.startswith(("python -m quantkit", "quantkit "))]
    assert len(quantkit_steps) == 2
    make, inspect = quantkit_steps
    subprocess.run([sys.executable, *make.split()[1:]], cwd=tmp_path, check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "quantkit.cli", *inspect.split()[1:]], cwd=tmp_path,
                            check=True, capture_output=True, text=True)
    assert "deepseek_v3" in result.stdout and "128x128" in result.stdout
