"""Run by hand (not in CI, whose 15-minute budget the 3-4 min AutoGPTQ env build does not fit): build or reuse the
AutoGPTQ 0.7.1 consumer env, run tests/interop/test_autogptq.py in it, and write what it measured to
bench/results/autogptq_load.md.

    python tests/interop/autogptq_check.py            # QUANTKIT_ENV_CACHE=EMPTY_DIR to time a build from scratch

Afterwards the env stays cached, so plain pytest runs test_autogptq.py too (it skips where the env is missing).
"""

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "autogptq_load.md"


def _timed(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, text=True, **kwargs)
    return done, time.monotonic() - start


def main() -> int:
    build_env = ["bash", "tests/interop/envs/build_env.sh", "autogptq"]
    load = os.getloadavg()[0]  # the machine is shared: its load explains the times below
    cached = subprocess.run([*build_env, "--cached"], cwd=ROOT, capture_output=True).returncode == 0
    build, build_s = _timed(build_env, stdout=subprocess.PIPE)
    if build.returncode:
        return build.returncode
    junit = Path(tempfile.mkdtemp()) / "junit.xml"
    env = {**os.environ, "QUANTKIT_INTEROP_AUTOGPTQ": "1"}
    test, test_s = _timed([sys.executable, "-m", "pytest", "tests/interop/test_autogptq.py", "-s", "-p",
                           "no:cacheprovider", "-o", "junit_family=xunit1",
                           f"--junitxml={junit}"], env=env)
    cases = ET.parse(junit).getroot().iter("testcase")
    junit.unlink()
    rows, outcomes, versions = [], [], {}
    for case in cases:
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if (element := case.find(tag)) is not None:
                outcome = f"{'xfailed' if element.get('type') == 'pytest.xfail' else tag}: {element.get('message')}"
        outcomes.append(f"- `{case.get('name')}` ({float(case.get('time')):.0f} s): {outcome}")
        for prop in case.iter("property"):
            value = json.loads(prop.get("value"))
            versions = value.pop("versions", versions)
            if "error" in value:
                rows.append(f"| {prop.get('name')} | does not load | `{value['error']}` |")
            else:
                rows.append(f"| {prop.get('name')} | {value['max_abs_dlogit']:.3e} | {value['relative']:.2e} "
                            f"(kernel {', '.join(k.rsplit('.', 2)[-2] for k in value['kernels'])}) |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join([
        "# AutoGPTQ 0.7.1 loads quantkit's GPTQ folders",
        "",
        f"Recorded by `python tests/interop/autogptq_check.py` on {datetime.date.today()} at commit {commit}"
        f"{' (with uncommitted changes)' if dirty else ''}; {os.cpu_count()} CPU cores, load average {load:.1f} at the "
        "start.",
        f"Consumer env (tests/interop/envs/autogptq.txt): {', '.join(f'{k} {v}' for k, v in versions.items())}.",
        f"Env {'reused from the cache' if cached else 'built from scratch'}: {build_s:.0f} s; "
        f"test_autogptq.py: {test_s:.0f} s.",
        "",
        "Logits of AutoGPTQForCausalLM.from_quantized(device=\"cpu\", torch_dtype=float32, every CUDA kernel off) vs "
        "quantkit's forward on the same dequantized weights, 3 held-out windows of 96 tokens; relative = max "
        "|dlogit| / max |logit| (test tolerance 1e-3).",
        "",
        "| model:scheme | max abs dlogit | relative |",
        "|---|---:|---|",
        *rows,
        "",
        *outcomes,
        "",
        "Why tiny-qwen2 needs the tied lm_head.weight quantkit stores, why tiny-deepseek cannot load and why mixes "
        "are refused: tests/interop/test_autogptq.py.",
        "",
    ]))
    print(RESULTS.read_text())
    return test.returncode


if __name__ == "__main__":
    sys.exit(main())
