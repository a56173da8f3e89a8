"""`quantkit run`: a recipe run end to end, killed with SIGKILL at three points (a GGUF write, a GPTQ calibration,
the evaluation) and rerun to identical bytes with nothing finished redone; a changed recipe redoes exactly what it
affects; a damaged artifact is redone."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from mini_recipe import MINI_RECIPE, run_command, run_env, run_files


def _run(recipe: Path, run_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(run_command(recipe, run_dir), env=run_env(cache), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _skipped(log: str) -> set[str]:
    return {line.split("skip ", 1)[1].split(":")[0] for line in log.splitlines() if " skip " in line}


def _started(log: str) -> set[str]:
    return {line.rsplit("start ", 1)[1].strip() for line in log.splitlines() if " start " in line}


@pytest.fixture
def reference(mini_run):
    return mini_run


def test_run_makes_every_artifact_report_index_and_card(reference):
    recipe, run_dir, _, log = reference
    model = run_dir / "tiny-qwen2"
    assert (model / "imatrix.gguf").is_file()
    assert (model / "Q4_K_M" / "tiny-qwen2-Q4_K_M.gguf").is_file()
    assert (model / "GPTQ-w4g128" / "tiny-qwen2-GPTQ-w4g128" / "config.json").is_file()
    assert (run_dir / "recipe.yaml").read_bytes() == recipe.read_bytes()
    report = json.loads((model / "eval" / "report.json").read_text())
    assert "date" not in report and all("seconds" not in r for r in report["variants"])  # reproducible
    rows = {r["name"]: r for r in report["variants"]}
    assert set(rows) == {"tiny-qwen2-Q4_K_M", "tiny-qwen2-Q8_0", "tiny-qwen2-GPTQ-w4g128"}
    index = json.loads((run_dir / "index.json").read_text())
    for v in index["models"][0]["variants"]:
        row = rows[Path(v["path"]).name.removesuffix(".gguf")]
        assert v["kld_mean"] == row["kld"]["mean"] and v["bpw"] == row["bpw"]
    info = json.loads((model / "Q4_K_M" / "variant.json").read_text())
    assert info["command"] == ("quantkit convert tiny-qwen2 --to gguf:Q4_K_M --imatrix tiny-qwen2/imatrix.gguf")
    card = (model / "Q4_K_M" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "example/tiny-qwen2" and front["license"] == "mit"
    assert "me/tiny-qwen2-Q4_K_M" in card
    assert "done tiny-qwen2/cards" in log and "[5/5 tasks]" in log
    # the GGUF names its imatrix relative to the run directory: the same bytes wherever the run is
    assert b"tiny-qwen2/imatrix.gguf" in (model / "Q4_K_M" / "tiny-qwen2-Q4_K_M.gguf").read_bytes()[:100_000]


def _run_until(recipe: Path, run_dir: Path, cache: Path, marker) -> str:
    """Start the run and SIGKILL its whole process group at the first log line `marker` accepts."""
    proc = subprocess.Popen(run_command(recipe, run_dir), env=run_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if marker(line):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    return "".join(lines)


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())["tasks"]


@pytest.mark.slow
def test_kill_9_at_three_points_then_rerun_gives_identical_bytes(reference, tmp_path):
    recipe, whole, cache, _ = reference
    run_dir = tmp_path / "killed"

    # 1. during the GGUF write (after the importance matrix)
    _run_until(recipe, run_dir, cache, lambda line: "quantize:" in line and " 0/" not in line)
    assert "tiny-qwen2/imatrix" in _state(run_dir) and "tiny-qwen2/Q4_K_M" not in _state(run_dir)

    # 2. during GPTQ's calibration, after its first layer
    log = _run_until(recipe, run_dir, cache, lambda line: "gptq:w4g128: 1/4 layers" in line)
    assert "tiny-qwen2/imatrix" in _skipped(log)
    assert {"tiny-qwen2/Q4_K_M", "tiny-qwen2/Q8_0"} <= set(_state(run_dir))
    assert "tiny-qwen2/GPTQ-w4g128" not in _state(run_dir)
    assert (run_dir / "tiny-qwen2" / "GPTQ-w4g128" / "tiny-qwen2-GPTQ-w4g128.part").is_dir()

    # 3. during the evaluation
    log = _run_until(recipe, run_dir, cache, lambda line: "windows:" in line and " 0/" not in line)
    assert {"tiny-qwen2/imatrix", "tiny-qwen2/Q4_K_M", "tiny-qwen2/Q8_0"} <= _skipped(log)
    assert "resume tiny-qwen2/GPTQ-w4g128 from tiny-qwen2-GPTQ-w4g128.part" in log
    assert "tiny-qwen2/GPTQ-w4g128" in _state(run_dir) and "tiny-qwen2/eval" not in _state(run_dir)

    final = _run(recipe, run_dir, cache).stderr
    assert _skipped(final) == {"tiny-qwen2/imatrix", "tiny-qwen2/Q4_K_M", "tiny-qwen2/Q8_0",
                               "tiny-qwen2/GPTQ-w4g128"}
    assert _started(final) == {"tiny-qwen2/eval", "tiny-qwen2/cards"}
    assert run_files(run_dir) == run_files(whole)


@pytest.mark.slow
def test_a_changed_recipe_redoes_exactly_what_it_affects(reference, tmp_path):
    recipe, whole, cache, _ = reference
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(whole, run_dir)
    changed = tmp_path / "mini.yaml"
    changed.write_text(MINI_RECIPE.replace("  - to: gguf:Q4_K_M\n",
                                      "  - to: gguf:Q4_K_M\n    tensor_types: ['attn_v=q8_0']\n"))
    log = _run(changed, run_dir, cache).stderr
    assert "redo tiny-qwen2/Q4_K_M: the recipe or its inputs changed" in log
    assert _started(log) == {"tiny-qwen2/convert:Q4_K_M+Q8_0", "tiny-qwen2/eval", "tiny-qwen2/cards"}
    assert {"tiny-qwen2/imatrix", "tiny-qwen2/Q8_0", "tiny-qwen2/GPTQ-w4g128"} <= _skipped(log)
    before, after = run_files(whole), run_files(run_dir)
    assert after["tiny-qwen2/Q8_0/tiny-qwen2-Q8_0.gguf"] == before["tiny-qwen2/Q8_0/tiny-qwen2-Q8_0.gguf"]
    assert after["tiny-qwen2/Q4_K_M/tiny-qwen2-Q4_K_M.gguf"] != before["tiny-qwen2/Q4_K_M/tiny-qwen2-Q4_K_M.gguf"]

    # only the evaluation changed: the artifacts stay, the reports and cards are redone
    evaluation = tmp_path / "eval.yaml"
    evaluation.write_text(changed.read_text().replace("windows: 2", "windows: 1"))
    log = _run(evaluation, run_dir, cache).stderr
    assert _started(log) == {"tiny-qwen2/eval", "tiny-qwen2/cards"}


@pytest.mark.slow
def test_a_damaged_artifact_is_redone(reference, tmp_path):
    recipe, whole, cache, _ = reference
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(whole, run_dir)
    gguf = run_dir / "tiny-qwen2" / "Q8_0" / "tiny-qwen2-Q8_0.gguf"
    gguf.write_bytes(gguf.read_bytes()[:-10])
    log = _run(recipe, run_dir, cache).stderr
    assert "redo tiny-qwen2/Q8_0: its files changed" in log
    assert run_files(run_dir) == run_files(whole)


def test_a_failing_task_ends_the_run_with_one_error_line(tmp_path):
    """A model that validates (its config is there) but whose weights are truncated: the worker's error comes back
    as one line naming the task, and nothing is recorded as finished."""
    import shutil

    from quantkit.bundled import model_path

    model = tmp_path / "model"
    shutil.copytree(model_path("tiny-qwen2"), model)
    shard = sorted(model.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models:\n  - name: broken\n    path: model\nvariants:\n  - to: gguf:Q8_0\n    imatrix: false\n"
                      "evaluation: false\n")
    done = subprocess.run(run_command(recipe, tmp_path / "run"), env=run_env(tmp_path / "cache"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: broken/convert:Q8_0: ") and "truncated" in errors[0]
    assert "Traceback" not in done.stderr
    assert json.loads((tmp_path / "run" / "state.json").read_text())["tasks"] == {}


def test_sigterm_stops_every_worker(reference, tmp_path):
    """SIGTERM to the driver alone (as a batch system's kill): exit 143 with one line and no worker left running
    (what a rerun then does after any kill is the SIGKILL test's)."""
    import psutil

    recipe, _, cache, _ = reference
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(run_command(recipe, run_dir), env=run_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "gptq:w4g128:" in line:
            workers = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 143, rest[-3000:]
    assert workers and [line for line in rest.splitlines() if line.startswith("error")] == [
        "error: terminated (SIGTERM)"]
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_only_runs_one_variant_and_what_it_needs(reference, tmp_path):
    recipe, _, cache, _ = reference
    run_dir = tmp_path / "run"
    log = subprocess.run(run_command(recipe, run_dir) + ["--only", "Q8_0"], env=run_env(cache), capture_output=True,
                         text=True, timeout=300)
    assert log.returncode == 0, log.stderr[-3000:]
    assert _started(log.stderr) == {"tiny-qwen2/imatrix", "tiny-qwen2/convert:Q8_0", "tiny-qwen2/eval",
                                    "tiny-qwen2/cards"}
    assert sorted(p.name for p in (run_dir / "tiny-qwen2").iterdir()) == ["Q8_0", "eval", "imatrix.gguf"]


def test_a_finished_run_needs_no_executor(reference):
    """Nothing to do: no worker starts and no cluster is contacted (an address nobody listens on is never tried)."""
    recipe, whole, cache, _ = reference
    done = subprocess.run(run_command(recipe, whole) + ["--executor", "ray", "--address", "127.0.0.1:9"],
                          env=run_env(cache), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not _started(done.stderr)


def test_a_worker_with_other_code_refuses_the_task():
    from quantkit.errors import QuantkitError
    from quantkit.recipe.tasks import Task, execute

    with pytest.raises(QuantkitError, match="install the same quantkit on every node"):
        execute(Task("m/eval", "eval", "/", False, 1, "cpu", {}, version="0.0.0-other"))
