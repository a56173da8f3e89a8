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


# Options that only say how much data a step goes through: the test runs every step of the README's command
# as written except for these values (and caps the multiple-choice items the eval step scores, 400 by default).
# The code paths are the same; the README's amounts (16 imatrix chunks of 512 tokens, 100 windows of 256 tokens,
# 400 items, on three variants) took most of this test's minutes.
SCALED_DOWN = {"imatrix": {"--chunks": "2"}, "convert": {}, "eval": {"--windows": "4"}}
ADDED = {"eval": ["--mc-items", "20"]}


def _scaled_down(step: str) -> list[str]:
    args = step.split()[1:]
    command = args[0]
    for option, value in SCALED_DOWN[command].items():
        assert option in args, f"the README's {command} step has no {option}: update SCALED_DOWN"
        args[args.index(option) + 1] = value
    for option in ADDED.get(command, [])[::2]:
        assert option not in args, f"the README's {command} step sets {option}: update ADDED"
    return args + ADDED.get(command, [])


def test_readme_main_job_runs(tmp_path):
    """The main job's quantkit part, in this environment (the venv part is exercised by CI itself): every step,
    in order, with the README's arguments, on less data (SCALED_DOWN)."""
    main_job = _readme_commands()[0]
    steps = [s for s in main_job.split(" && ") if s.startswith("quantkit ")]
    assert [s.split()[1] for s in steps] == ["imatrix", "convert", "eval"]
    for step in steps:
        done = subprocess.run([sys.executable, "-m", "quantkit.cli", *_scaled_down(step)], cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{step}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "tiny-qwen2.imatrix.gguf").is_file()
    written = sorted(p.name for p in (tmp_path / "gguf").iterdir())
    assert written == ["tiny-qwen2-Q4_K_M.gguf", "tiny-qwen2-Q8_0.gguf"]
    report = (tmp_path / "eval-report" / "report.md").read_text()
    assert "tiny-qwen2-Q4_K_M" in report and (tmp_path / "eval-report" / "quality_vs_vram.png").is_file()
