"""Quantization throughput: quantkit vs llama.cpp's quantizer on the same F16 GGUF, same thread count.

    python bench/quantize_speed.py [--size-gb 0.5] [--threads 2] [--types Q4_K_M,Q6_K,Q8_0]
                                   [--imatrix-types IQ4_XS] [--runs 1] [--device cpu]

A llama-shaped model (a 1-2B llama's dimensions, layers chosen to reach --size-gb as F16) is generated with
random weights and written as an F16 GGUF by quantkit (not timed). Then, for each file type:

* peer: `llama_model_quantize` (what llama-quantize runs, through llama-cpp-python) with nthread = --threads;
* quantkit: `quantkit.convert.convert(f16.gguf, ["gguf:TYPE"], threads=--threads)` (or on
  --device cuda), reading, quantizing and writing exactly what the peer does.

The --imatrix-types run with an importance matrix on both sides: a synthetic one (heavy-tailed positive values
for every weight but token_embd, as llama-imatrix records them), saved as a GGUF imatrix for quantkit and passed
as llama_model_imatrix_data to llama.cpp. With --runs N every type runs N times (peer, then quantkit, in turn);
every run is recorded and the ratio is that of the median times.

Both outputs must have identical tensor data (checked; the run fails otherwise), so the two sides do the same
work. Reported: wall time, CPU time, F16 input GB/s, and the ratio llama.cpp time / quantkit time (> 1: quantkit
is faster). Results go to bench/results/quantize_speed.{json,md} (--out to change; a --device cuda run goes
to quantize_speed_cuda.*; the IQ1 / IQ2 runs are in quantize_speed_iquants.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantkit import convert as api  # noqa: E402
from quantkit.calib import Imatrix  # noqa: E402
from quantkit.formats.gguf.mixtures import file_type  # noqa: E402
from quantkit.quant import kernels  # noqa: E402
from quantkit.source.gguf_file import GGUFFile  # noqa: E402
from quantkit.testing.factory import make_tiny_model  # noqa: E402
from quantkit.testing.ggml_reference import llama_quantize  # noqa: E402

GB = 10**9
# a 1-2B llama's dimensions; vocab kept at 32000 so the embedding is one of many large tensors, not most of it
DIMS = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 8,
        "vocab_size": 32000, "max_position_embeddings": 4096}


def _layers_for(size_gb: float) -> int:
    h, i, kv = DIMS["hidden_size"], DIMS["intermediate_size"], DIMS["num_key_value_heads"]
    head_dim = h // DIMS["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * i
    fixed = 2 * DIMS["vocab_size"] * h
    return max(1, round((size_gb * GB / 2 - fixed) / per_layer))


def _cpu_seconds() -> float:
    """This process and its finished children (quantkit's encoding worker processes end with each conversion)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _timed(fn, *args, **kwargs) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, _cpu_seconds() - cpu


def _tensor_data(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    g = GGUFFile(path)
    return {name: (g.type_name(name), np.asarray(g.data(name))) for name in g.tensors}


def _same_tensors(ours: Path, theirs: Path) -> list[str]:
    a, b = _tensor_data(ours), _tensor_data(theirs)
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [n for n in a if a[n][0] != b[n][0] or not np.array_equal(a[n][1], b[n][1])]


def _synthetic_imatrix(f16: Path, path: Path) -> dict[str, np.ndarray]:
    """A heavy-tailed positive importance vector for every 2-D weight but token_embd, saved as a GGUF imatrix;
    returns what llama-quantize would pass to ggml (the same vectors)."""
    gen = torch.Generator().manual_seed(0)
    g = GGUFFile(f16)
    imatrix = Imatrix(datasets=["synthetic"], chunk_count=1, chunk_size=512)
    for name in g.tensors:
        shape = g.shape(name)
        if len(shape) != 2 or name == "token_embd.weight":
            continue
        sums = torch.exp(2 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)) * 512
        imatrix.sums[name] = sums[None]
        imatrix.counts[name] = torch.tensor([512], dtype=torch.int64)
    imatrix.save(path)
    return {name: v.numpy() for name, v in Imatrix.load(path).importances().items()}


def _machine(device: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    import llama_cpp

    info["llama_cpp_python"] = llama_cpp.__version__
    return info


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Quantization throughput: quantkit vs llama.cpp ({report['device']})", "",
             f"Date: {report['date']}  ",
             f"Machine: {m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if "gpu" in m else "") +
             f"; Python {m['python']}, torch {m['torch']}, llama-cpp-python {m['llama_cpp_python']}  ",
             f"Command: `{report['command']}`  ",
             f"Load average (1 min) before / after: {report['load_before']:.1f} / {report['load_after']:.1f} "
             f"on {m['cores']} cores", "",
             f"Input: {report['model']}. Both sides quantize the same F16 GGUF with {report['threads']} threads "
             "(llama.cpp: nthread; quantkit: that many worker threads"
             + (", tensors on the GPU" if report["device"] == "cuda" else
                f", codecs: {report.get('codec_impl', 'torch')}")
             + ") and write the whole file; their tensor data was compared and is identical. "
             f"{report.get('runs', 1)} run(s) per type, in turn; times are medians, every run in the JSON.", "",
             "| type | llama.cpp | quantkit | llama.cpp / quantkit (time) | ratio per run | quantkit CPU time "
             "| quantkit F16 GB/s |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        per_run = ", ".join(f"{p / o:.2f}" for p, o in zip(r.get("peer_runs_s", [r["peer_s"]]),
                                                            r.get("ours_runs_s", [r["ours_s"]]), strict=True))
        label = r["type"] + (" + imatrix" if r.get("imatrix") else "")
        lines.append(f"| {label} | {r['peer_s']:.1f} s | {r['ours_s']:.1f} s | {r['ratio']:.2f} | {per_run} | "
                     f"{r['ours_cpu_s']:.1f} s | {report['input_bytes'] / GB / r['ours_s']:.2f} |")
    lines += ["", "Ratio > 1 means quantkit is faster. Goal: ≥ 1.0 at equal threads on CPU."]
    if any(r["type"].startswith(("IQ1", "IQ2", "IQ3")) for r in report["results"]):
        lines += ["", "Both sides build their i-quant grid tables once per process, in the type's first run (ggml: "
                  "IQ1 ~7 s on an idle core, 20+ s beside other work, IQ2_XXS < 1 s; quantkit: IQ1 ~1 s), so each "
                  "per-run ratio compares like with like: run 1 includes both sides' set-up, the later runs neither."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=0.5, help="F16 size of the generated model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--types", default="Q4_K_M,Q6_K,Q8_0")
    parser.add_argument("--imatrix-types", default="IQ4_XS", help="types run with a synthetic imatrix ('' for none)")
    parser.add_argument("--runs", type=int, default=1, help="runs per type (every one recorded)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="results path stem (default bench/results/...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = args.out or REPO / "bench" / "results" / ("quantize_speed" + ("_cuda" if args.device == "cuda" else ""))
    work = Path(tempfile.mkdtemp(prefix="qk-speed-", dir=args.workdir))
    try:
        layers = _layers_for(args.size_gb)
        hf = make_tiny_model(work / "hf", "llama", shards=4,
                             config_overrides={**DIMS, "num_hidden_layers": layers})
        [(f16, _)] = api.convert(hf, ["gguf:F16"], work / "f16.gguf", name="bench-llama")
        shutil.rmtree(hf)
        input_bytes = f16.stat().st_size
        print(f"input: llama-shaped, {layers} layers, F16 GGUF {input_bytes / GB:.2f} GB", flush=True)
        imatrix_types = [t for t in args.imatrix_types.split(",") if t]
        importance = _synthetic_imatrix(f16, work / "imatrix.gguf") if imatrix_types else None
        load_before = os.getloadavg()[0]
        results = []
        jobs = [(t, False) for t in args.types.split(",") if t] + [(t, True) for t in imatrix_types]
        for type_name, weighted in jobs:
            label = type_name + (" + imatrix" if weighted else "")
            r = {"type": type_name, "imatrix": weighted, "peer_runs_s": [], "ours_runs_s": [], "ours_cpu_runs_s": []}
            for _ in range(args.runs):
                theirs, ours = work / f"llama-{type_name}.gguf", work / f"quantkit-{type_name}.gguf"
                peer_s, _ = _timed(llama_quantize, f16, theirs, file_type(type_name).ftype, nthread=args.threads,
                                   importance=importance if weighted else None)
                ours_s, ours_cpu = _timed(api.convert, f16, [f"gguf:{type_name}"], ours, device=args.device,
                                          threads=args.threads, name="bench-llama",
                                          imatrix=work / "imatrix.gguf" if weighted else None)
                differ = _same_tensors(ours, theirs)
                if differ:
                    print(f"{label}: tensor data differs from llama.cpp's in {len(differ)} tensors, "
                          f"e.g. {differ[:3]}")
                    return 1
                r["peer_runs_s"].append(peer_s)
                r["ours_runs_s"].append(ours_s)
                r["ours_cpu_runs_s"].append(ours_cpu)
                print(f"{label}: llama.cpp {peer_s:.1f} s, quantkit {ours_s:.1f} s (CPU {ours_cpu:.1f} s), "
                      f"llama.cpp/quantkit {peer_s / ours_s:.2f}; tensor data identical", flush=True)
                theirs.unlink()
                ours.unlink()
            r.update(peer_s=statistics.median(r["peer_runs_s"]), ours_s=statistics.median(r["ours_runs_s"]),
                     ours_cpu_s=statistics.median(r["ours_cpu_runs_s"]), identical=True)
            r["ratio"] = r["peer_s"] / r["ours_s"]
            results.append(r)
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": "python bench/quantize_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "device": args.device, "threads": args.threads, "machine": _machine(args.device),
                  "codec_impl": "kernel" if args.device == "cpu" and kernels.handles(12) else "torch",
                  "runs": args.runs,
                  "model": f"llama-shaped ({DIMS['hidden_size']} hidden, {DIMS['intermediate_size']} FFN, "
                           f"{layers} layers, vocab {DIMS['vocab_size']}), random weights, "
                           f"F16 GGUF {input_bytes / GB:.2f} GB",
                  "input_bytes": input_bytes, "load_before": load_before, "load_after": os.getloadavg()[0],
                  "results": results}
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(_markdown(report))
        print(f"written {stem.with_suffix('.md')}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
