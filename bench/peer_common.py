"""What the peer benchmarks (bench/gptq_peers.py, bench/awq_peers.py) share: the peers' cached venvs and their
environment, a timed subprocess, the float32 HF copies the peers calibrate from, and one `quantkit eval` over a
model's outputs."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

TYPE_CHECKING = False
if TYPE_CHECKING:
    from quantkit.model import Model

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "bench" / "peers"
THREADS = 2


def venv_python(name: str, envs: Path = REPO / "tests/interop/envs", cache: Path | None = None) -> Path:
    """The venv build_env.sh (in `envs`, beside NAME.txt) builds or reuses, under `cache` if given."""
    env = os.environ | ({"QUANTKIT_ENV_CACHE": str(cache)} if cache else {})
    done = subprocess.run(["bash", str(envs / "build_env.sh"), name], capture_output=True, text=True, check=True,
                          env=env)
    return Path(done.stdout.strip().splitlines()[-1]) / "bin" / "python"


def peer_env(scratch: Path, python: Path) -> dict:
    """Offline, every cache in a scratch dir (PEERS.md §7 pitfall 11), 2 threads; GPTQModel's JIT kernels stay
    beside its venv so no run pays for compiling them."""
    scratch.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(scratch / "hf"),
            "XDG_CACHE_HOME": str(scratch / "cache"), "TMPDIR": str(scratch), "GPTQMODEL_CPU_WORKERS": "2",
            "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(python.parent.parent / "torch_extensions"),
            "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": ""}


def quantkit_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(REPO)}


def timed(cmd: list[str], env: dict, log: Path, cwd: Path | None = None) -> dict:
    """Run cmd, stderr to log; wall time, 1-min load at the start, rc, the error on failure, and the last stdout
    line's JSON (the drivers' timings) on success."""
    load = os.getloadavg()[0]
    began = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True, cwd=cwd)
    wall = time.perf_counter() - began
    log.write_text(log.read_text() + "\n--- stdout ---\n" + done.stdout)
    result = {"wall_s": wall, "load_1min": load, "rc": done.returncode, "command": " ".join(map(str, cmd))}
    if done.returncode:
        tail = [line for line in log.read_text().splitlines() if line.strip()]
        errors = [i for i, line in enumerate(tail) if re.match(r"^\w*(Error|Exception)\b", line)]
        at = errors[-1] if errors else len(tail) - 1
        result["error"] = " ".join(line.strip() for line in tail[at:at + 2] if line != "--- stdout ---")[:500]
        return result
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}"
    result.update(json.loads(last) if last.startswith("{") else {})
    return result


def float_copy(model: Model, dst: Path) -> Path:
    """A float32 HF folder of the model's weights as quantkit reads them (FP8 blocks dequantized): what the peers,
    which cannot read block-FP8 on CPU, calibrate from."""
    from safetensors.torch import save_file

    if (dst / "model.safetensors").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    save_file({t.name: model.source.read(t.name).contiguous() for t in model.source.tensors()},
              str(dst / "model.safetensors"))
    config = dict(model.config)
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in model.folder.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, dst / f.name)
    return dst


def model_inputs(name: str, work: Path, samples: int, ctx: int) -> tuple[Path, Path, Path]:
    """What every tool gets for a bundled model: (its folder; work/calib.json, the calibration token ids quantkit
    computes from samples x ctx of the bundled split; the folder the peers read, a float32 copy for FP8)."""
    from quantkit.bundled import resolve_model
    from quantkit.calib.data import calibration_samples
    from quantkit.model import Model

    src = resolve_model(name)
    work.mkdir(parents=True, exist_ok=True)
    with Model(src, device="cpu") as model:
        calib = work / "calib.json"
        calib.write_text(json.dumps([x.tolist() for x in calibration_samples(model, None, samples, ctx)]))
        peer_src = float_copy(model, work / "float32") if model.source.is_fp8 else src
    return src, calib, peer_src


def float_copy_meta(model: Model, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    config = dict(model.config)
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in model.folder.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, dst / f.name)


def quantize_seconds(log: Path) -> float | None:
    """quantkit's quantize time: its per-layer times (the layerwise writer's summary line) summed."""
    m = re.search(r"(\d+) layers, ([\d.]+) s per layer", log.read_text())
    return int(m.group(1)) * float(m.group(2)) if m else None


def evaluate(src: Path, targets: dict, ev: Path, log: Path, windows: int, quality: dict,
             ctx: int | None = None) -> dict | None:
    """`quantkit eval` of every target folder against src (windows of `ctx` tokens; None: eval's default); fills
    quality[key] (KLD, top-1, PPL) and quality['baseline_ppl'] (or quality['error']); returns the eval settings."""
    paths = {k: v for k, v in targets.items() if v is not None}
    r = timed([sys.executable, "-m", "quantkit.cli", "eval", *map(str, paths.values()), "--baseline", str(src),
               "--mc-items", "0", "--windows", str(windows), *(["--ctx", str(ctx)] if ctx else []), "--device", "cpu",
               "-o", str(ev), "--force"], quantkit_env(), log)
    if r["rc"]:
        quality["error"] = r.get("error")
        return None
    data = json.loads((ev / "report.json").read_text())
    quality["baseline_ppl"] = data["baseline"]["ppl"]
    by_path = {v["path"]: v for v in data["variants"]}
    for key, path in paths.items():
        v = by_path.get(str(path))
        if v is not None:
            quality[key] = {"kld_mean": v["kld"]["mean"], "kld_p99": v["kld"]["p99"], "top1_pct": v["top1_pct"],
                            "ppl": v["ppl"], "delta_ppl_pct": v["delta_ppl_pct"]}
    return data["settings"] | {"baseline": None}


def report_head(script: str, argv: list[str] | None) -> dict:
    """Date, commit, command and machine of a bench report."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"date": datetime.date.today().isoformat(), "commit": commit,
            "command": f"python bench/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__}}


def model_bench_args(parser, work: str, out: str) -> None:
    """The options of a bench that scores files of each bundled model with one `quantkit eval`."""
    parser.add_argument("--models", default="tiny-qwen2,tiny-llama,tiny-deepseek")
    parser.add_argument("--windows", type=int, default=60)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path(work))
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from the work's raw.json")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / out)
    parser.add_argument("--note", action="append", default=[], help="a remark for the results (repeatable)")


def per_model_report(args, script: str, argv: list[str] | None, settings: dict, run_model) -> dict:
    """`run_model(name, args, models)` for each of --models, the report kept in the work's raw.json after each; or,
    with --report-only, that stored report, its notes replaced by any --note."""
    raw = args.work / "raw.json"
    if args.report_only:
        report = json.loads(raw.read_text())
        report["notes"] = args.note or report.get("notes", [])
        return report
    report = report_head(script, argv) | {"settings": settings, "models": {}, "notes": args.note}
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    for name in args.models.split(","):
        run_model(name, args, report["models"])
        raw.write_text(json.dumps(report, indent=1))
    report["wall_s"] = time.perf_counter() - began
    raw.write_text(json.dumps(report, indent=1))
    return report


def write_results(stem: Path, report: dict, text: str) -> None:
    """A bench's results: <stem>.json (the report) and <stem>.md (its rendering), also printed."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


def fmt(x, spec="{:.1f}") -> str:
    return "—" if x is None else spec.format(x)
