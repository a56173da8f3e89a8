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
    steps = [s for s in main_job.split(" && ") if s.startswith("quantkit ")]
    assert len(steps) == 3
    for step in steps:
        subprocess.run([sys.executable, "-m", "quantkit.cli", *step.split()[1:]], cwd=tmp_path, check=True,
                       capture_output=True, text=True)
    assert (tmp_path / "tiny-qwen2.imatrix.gguf").is_file()
    written = sorted(p.name for p in (tmp_path / "gguf").iterdir())
    assert written == ["tiny-qwen2-Q4_K_M.gguf", "tiny-qwen2-Q8_0.gguf"]
    report = (tmp_path / "eval-report" / "report.md").read_text()
    assert "tiny-qwen2-Q4_K_M" in report and (tmp_path / "eval-report" / "quality_vs_vram.png").is_file()
