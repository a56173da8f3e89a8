"""The README's set-up commands are the ones CI runs and the ones that work."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    main_job, test_command = _readme_commands()[:2]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


# Recipe keys that only say how much data a step goes through: the test runs the README's main job as written
# except for these amounts (the code paths are the same; the demo's amounts take two minutes).
SCALED_DOWN = {"calibration": {"samples": 2, "ctx": 64, "imatrix_chunks": 1, "imatrix_ctx": 128},
               "evaluation": {"windows": 1, "mc_items": 4}}


def test_readme_main_job_runs(tmp_path):
    """The main job's quantkit part, in this environment (the venv part is exercised by CI itself): the demo recipe
    it names, run as written, on less data (SCALED_DOWN), from the repository root as the README's cd implies."""
    main_job = _readme_commands()[0]
    steps = [s for s in main_job.split(" && ") if s.startswith("quantkit ")]
    assert len(steps) == 1 and steps[0].split()[:2] == ["quantkit", "run"]
    args = steps[0].split()[1:]
    recipe_path = ROOT / args[1]
    recipe = yaml.safe_load(recipe_path.read_text())
    for section, amounts in SCALED_DOWN.items():
        for key, value in amounts.items():
            assert key in recipe[section], f"the demo recipe has no {section}.{key}: update SCALED_DOWN"
            recipe[section][key] = value
    scaled = tmp_path / recipe_path.name
    scaled.write_text(yaml.safe_dump(recipe))
    args[1] = str(scaled)
    args[args.index("-o") + 1] = str(tmp_path / "runs" / "demo")
    done = subprocess.run([sys.executable, "-m", "quantkit.cli", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{steps[0]}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    run_dir = tmp_path / "runs" / "demo"
    index = (run_dir / "index.md").read_text()
    for model in ("tiny-qwen2", "tiny-llama", "tiny-deepseek"):
        assert (run_dir / model / "eval" / "report.md").is_file() and (run_dir / model / "eval" /
                                                                        "quality_vs_vram.png").is_file()
        for variant in ("Q8_0", "Q4_K_M", "Q2_K", "GPTQ-w4g128", "AWQ-w4g128"):
            assert f"[{variant}]({model}/{variant}/)" in index
            assert (run_dir / model / variant / "README.md").is_file()
