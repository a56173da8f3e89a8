"""Peak memory and speed of reading a multi-GB sharded checkpoint with quantkit's streaming reader.

What is measured, for each generated checkpoint (default: a ~3 GB BF16 llama-shaped one and a ~2.5 GB
DeepSeek-V3-shaped one in DeepSeek's block-FP8 layout, both sharded with a model.safetensors.index.json):

* quantkit: `open_checkpoint(folder)`, then `read(name)` (float32, FP8 dequantized) of every listed tensor
  once, each result dropped at once.
* peer: `safetensors.safe_open(shard, framework="pt")` and `get_tensor(name).float()` of every stored tensor
  of every shard (FP8 weights and their scales are only cast to float32, not dequantized).

Every measurement runs in a fresh interpreter, so neither checkpoint generation nor the other reader's
allocations are in its numbers. In that process: baseline = VmRSS after the imports and opening the
checkpoint; peak = ru_maxrss after the read loop; reported is peak minus baseline, the wall and CPU time of
the loop and stored bytes / wall time. The float32 size of the largest tensor is the floor of that number for any reader
that hands out whole float32 tensors. Page cache is warm (the files were just written) unless --cold.

quantkit passes when its peak above baseline stays under 1 GiB; the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The driver imports only the standard library: an exec'd child inherits its parent's peak RSS as the
# starting value of ru_maxrss, so a heavy driver would inflate every worker's peak.

GB = 10**9
MiB = 2**20
GiB = 2**30
TARGET_BYTES = GiB
REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "bench" / "results" / "read_memory.json"
DEFAULT_MD = REPO / "bench" / "results" / "read_memory.md"
INDEX_NAME = "model.safetensors.index.json"
SPEC_NAME = "bench_spec.json"  # marks a generated folder so --workdir --keep can reuse it

# Dimensions of small real models (a 1-2B llama; DeepSeek-V2-Lite-sized MoE with V3's MLA ranks), so that
# tensor sizes and counts are realistic; the layer count is then chosen to reach the requested size.
# vocab 32000 keeps the largest tensor (embedding / lm_head) at 131 MB stored, 262 MB in float32.
CHECKPOINTS: dict[str, dict] = {
    "bf16": {"preset": "llama", "fp8": False, "default_gb": 3.0,
             "overrides": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 16,
                           "num_key_value_heads": 8, "vocab_size": 32000}},
    "fp8": {"preset": "deepseek_v3", "fp8": True, "default_gb": 2.5,
            "overrides": {"hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                          "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": 1536,
                          "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                          "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2,
                          "num_experts_per_tok": 6, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 1,
                          "vocab_size": 32000}},
}
READERS = ("quantkit", "safetensors")


# ---- workers (run in fresh subprocesses) -----------------------------------------------------------------

def _stored_tensors(config: dict, fp8: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every stored tensor, in checkpoint order, FP8 block scales included."""
    from quantkit.arch import load_architecture
    from quantkit.testing.factory import FP8_BLOCK

    arch = load_architecture(config)
    linears = {lin.name for layer in arch.layers() for lin in layer.linears if len(lin.shape) == 2}
    stored = []
    for name, shape in arch.tensor_shapes().items():
        if name.endswith("e_score_correction_bias"):
            stored.append((name, shape, "F32"))  # DeepSeek ships the router bias in float32
        elif fp8 and name in linears:
            # DeepSeek's rule: every decoder Linear is FP8, embeddings, head, norms and router stay BF16.
            scale_shape = (-(-shape[0] // FP8_BLOCK[0]), -(-shape[1] // FP8_BLOCK[1]))
            stored += [(name, shape, "F8_E4M3"), (name + "_scale_inv", scale_shape, "F32")]
        else:
            stored.append((name, shape, "BF16"))
    return stored


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = {"BF16": 2, "F32": 4, "F8_E4M3": 1}[dtype]
    for d in shape:
        n *= d
    return n


def _sized_config(kind: str, size_gb: float, overrides: dict | None = None, layers: int | None = None) -> dict:
    """The preset with the benchmark's dimensions (then `overrides`, for other benchmarks' shapes) and the layer
    count whose stored size is nearest size_gb, or exactly `layers`."""
    import copy

    from quantkit.testing.factory import FP8_BLOCK, PRESETS

    spec = CHECKPOINTS[kind]
    config = copy.deepcopy(PRESETS[spec["preset"]])
    config.update(spec["overrides"])
    config.update(overrides or {})
    config.pop("num_nextn_predict_layers", None)  # no MTP layer: the generator writes what the arch lists
    config["torch_dtype"] = "bfloat16"
    if spec["fp8"]:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": list(FP8_BLOCK)}

    def total(layers: int) -> int:
        config["num_hidden_layers"] = layers
        return sum(_nbytes(s, d) for _, s, d in _stored_tensors(config, spec["fp8"]))

    if layers is not None:
        config["num_hidden_layers"] = layers
        return config
    target, layers = size_gb * GB, 1
    while total(layers) < target:
        layers += 1
    if layers > 1 and target - total(layers - 1) < total(layers) - target:
        layers -= 1
    config["num_hidden_layers"] = layers
    return config


def _generate(job: dict) -> dict:
    """Write config.json, the index and the shards, holding one shard in memory at a time. The job may carry
    config `overrides`, an exact `layers` count (then size_gb is ignored) and `unit_norms`: norm weights (the 1-D
    BF16 tensors) of 1 instead of random ones of 0.02, so that a MoE router sees inputs of a real model's scale and
    routes by token (with 0.02 the router's e_score_correction_bias decides, the same experts for every token)."""
    import torch
    from safetensors.torch import save_file

    from quantkit.testing.factory import quantize_block_fp8

    folder, kind, shards = Path(job["folder"]), job["kind"], job["shards"]
    fp8 = CHECKPOINTS[kind]["fp8"]
    config = _sized_config(kind, job.get("size_gb", 0), job.get("overrides"), job.get("layers"))
    stored = _stored_tensors(config, fp8)
    folder.mkdir(parents=True, exist_ok=True)

    # Split by cumulative bytes; an FP8 scale stays with its weight.
    total = sum(_nbytes(s, d) for _, s, d in stored)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map, running = {}, 0
    for name, shape, dtype in stored:
        owner = name.removesuffix("_scale_inv")
        weight_map[name] = weight_map.get(owner) or files[min(shards - 1, running * shards // total)]
        running += _nbytes(shape, dtype)

    # Values do not change what reading costs, so each distinct (shape, dtype) is drawn once and copied;
    # this keeps generation bound by disk writes rather than by randn and FP8 quantization on 2 cores.
    torch.manual_seed(0)
    templates: dict[tuple, torch.Tensor] = {}

    def tensor(name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        key = (shape, dtype, name.endswith("_scale_inv"))
        if key not in templates:
            if dtype == "F8_E4M3":
                q, scale = quantize_block_fp8(torch.randn(shape) * 0.02)
                templates[key] = q
                templates[(tuple(scale.shape), "F32", True)] = scale
            elif len(shape) == 1 and dtype == "BF16" and job.get("unit_norms"):
                templates[key] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                templates[key] = (torch.randn(shape) * 0.02).to(torch.bfloat16 if dtype == "BF16" else torch.float32)
        return templates[key].clone()  # save_file refuses tensors that share storage

    for file in files:
        part = {name: tensor(name, shape, dtype) for name, shape, dtype in stored if weight_map[name] == file}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        del part
    for file in files:  # flush now, so that --cold can evict clean pages and the timed reads see no writeback
        with open(folder / file, "rb") as f:
            os.fsync(f.fileno())

    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"files": files}


def _describe(job: dict) -> dict:
    from quantkit.source import open_checkpoint

    ckpt = open_checkpoint(job["folder"])
    infos = ckpt.tensors()
    largest = max(infos, key=lambda i: i.numel)
    return {"shards": len(ckpt.files), "size_on_disk": ckpt.size_on_disk(),
            "stored_bytes": sum(i.nbytes for i in infos), "listed_tensors": len(infos),
            "stored_tensors": sum(len(json.loads(_header(p))) - 1 for p in ckpt.files),
            "float32_bytes": sum(i.numel * 4 for i in infos),
            "largest_tensor": largest.name, "largest_tensor_shape": list(largest.shape),
            "largest_tensor_float32_bytes": largest.numel * 4, "is_fp8": ckpt.is_fp8}


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little"))


def _proc_status() -> dict[str, int]:
    """The kB fields of /proc/self/status, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(job: dict) -> dict:
    import gc

    import torch
    from safetensors import safe_open

    from quantkit.source import open_checkpoint

    folder, reader = Path(job["folder"]), job["reader"]
    ckpt = open_checkpoint(folder)
    names = [i.name for i in ckpt.tensors()]
    shards = ckpt.files
    if reader == "safetensors":
        ckpt.close()
    if job["cold"]:
        for path in shards:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    gc.collect()
    baseline, maxrss_before = _proc_status()["VmRSS"], _maxrss()

    load = os.getloadavg()[0]
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    if reader == "quantkit":
        for name in names:
            ckpt.read(name, dtype=torch.float32)  # result dropped at once, as a streaming consumer would
    else:
        for path in shards:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    f.get_tensor(name).float()
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start

    peak, status = _maxrss(), _proc_status()
    return {"reader": reader, "seconds": seconds, "cpu_seconds": cpu_seconds, "load_avg_1min": load,
            "baseline_rss": baseline, "peak_rss": peak,
            "peak_above_baseline": peak - baseline, "maxrss_before_read": maxrss_before,
            "rss_after_read": status["VmRSS"], "rss_file_after_read": status.get("RssFile", 0),
            "torch_threads": torch.get_num_threads()}


WORKERS = {"generate": _generate, "describe": _describe, "measure": _measure}


# ---- driver ----------------------------------------------------------------------------------------------

def _run_worker(task: str, job: dict) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", task, json.dumps(job)],
                         stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare(folder: Path, job: dict) -> float:
    """Generate the checkpoint unless a kept one from the same job is there; seconds spent generating."""
    spec_file = folder / SPEC_NAME
    if spec_file.is_file() and json.loads(spec_file.read_text()) == job:
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    _run_worker("generate", job)
    spec_file.write_text(json.dumps(job) + "\n")
    return time.perf_counter() - start


def _bench_checkpoint(kind: str, folder: Path, args: argparse.Namespace) -> dict:
    size_gb = args.size_gb or CHECKPOINTS[kind]["default_gb"]
    job = {"folder": str(folder), "kind": kind, "size_gb": size_gb, "shards": args.shards}
    print(f"[{kind}] preparing ~{size_gb:g} GB in {args.shards} shards under {folder}", flush=True)
    generate_seconds = _prepare(folder, job)
    info = _describe_checkpoint(folder)
    print(f"[{kind}] {info['size_on_disk'] / GB:.2f} GB on disk, {info['stored_tensors']} stored tensors "
          f"(generated in {generate_seconds:.0f} s)", flush=True)

    runs: dict[str, list[dict]] = {r: [] for r in READERS}
    for _ in range(args.repeats):  # alternate readers, so drift on the machine hits both alike
        for reader in READERS:
            m = _run_worker("measure", {"folder": str(folder), "reader": reader, "cold": args.cold})
            m["gb_per_s"] = info["stored_bytes"] / GB / m["seconds"]
            runs[reader].append(m)
            print(f"[{kind}] {reader:<11} peak +{m['peak_above_baseline'] / MiB:7.0f} MiB  "
                  f"{m['seconds']:6.2f} s ({m['cpu_seconds']:5.1f} s CPU, load {m['load_avg_1min']:.1f})  "
                  f"{m['gb_per_s']:5.2f} GB/s", flush=True)

    # Worst peak and best time over repeats: the peak is the bound we care about, time noise only adds.
    best = {r: {"peak_above_baseline": max(m["peak_above_baseline"] for m in ms),
                "seconds": min(m["seconds"] for m in ms),
                "cpu_seconds": min(m["cpu_seconds"] for m in ms)} for r, ms in runs.items()}
    for r in READERS:
        best[r]["gb_per_s"] = info["stored_bytes"] / GB / best[r]["seconds"]
    q, p = best["quantkit"], best["safetensors"]
    return {"kind": kind, "preset": CHECKPOINTS[kind]["preset"], "requested_gb": size_gb,
            "generate_seconds": generate_seconds, **info, "runs": runs, "summary": best,
            "ratio_peak": q["peak_above_baseline"] / p["peak_above_baseline"],
            "ratio_time": q["seconds"] / p["seconds"], "ratio_cpu": q["cpu_seconds"] / p["cpu_seconds"],
            "quantkit_under_target": q["peak_above_baseline"] < TARGET_BYTES}


def _describe_checkpoint(folder: Path) -> dict:
    info = _run_worker("describe", {"folder": str(folder)})
    info["num_hidden_layers"] = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    return info


def _machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    versions = _versions()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), **versions}


def _versions() -> dict:
    out = subprocess.run([sys.executable, "-c", "import json, torch, safetensors; print(json.dumps("
                          "{'torch': torch.__version__, 'safetensors': safetensors.__version__}))"],
                         stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout)


def _table(results: list[dict]) -> list[str]:
    lines = ["| checkpoint | on disk | largest tensor, float32 | reader | peak RSS above baseline | time | "
             "CPU time | stored GB/s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for reader in READERS:
            s = r["summary"][reader]
            lines.append(f"| {r['kind']} ({r['preset']}) | {r['size_on_disk'] / GB:.2f} GB | "
                         f"{r['largest_tensor_float32_bytes'] / MiB:.0f} MiB | {reader} | "
                         f"{s['peak_above_baseline'] / MiB:.0f} MiB | {s['seconds']:.2f} s | "
                         f"{s['cpu_seconds']:.2f} s | {s['gb_per_s']:.2f} |")
    return lines


def _verdicts(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        peak = r["summary"]["quantkit"]["peak_above_baseline"]
        verdict = "PASS" if r["quantkit_under_target"] else "FAIL"
        lines.append(f"- {r['kind']}: quantkit/safetensors peak RSS {r['ratio_peak']:.2f}x, "
                     f"time {r['ratio_time']:.2f}x (CPU {r['ratio_cpu']:.2f}x); "
                     f"quantkit peak above baseline {peak / MiB:.0f} MiB "
                     f"({peak / r['largest_tensor_float32_bytes']:.2f}x the largest float32 tensor) "
                     f"{'<' if r['quantkit_under_target'] else '>='} 1024 MiB target: {verdict}")
    return lines


def _markdown(report: dict) -> str:
    m = report["machine"]
    loads = [run["load_avg_1min"] for r in report["checkpoints"] for runs in r["runs"].values() for run in runs]
    lines = [
        "# Streaming checkpoint read: peak memory", "",
        f"Date: {report['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / GiB:.0f} GiB RAM, Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']}, safetensors {m['safetensors']}  ",
        f"Command: `{report['command']}`  ",
        f"Page cache: {'cold (evicted before each run)' if report['cold'] else 'warm (files just written)'}; "
        f"repeats: {report['repeats']} (worst peak, best time); 1-min load average during the runs "
        f"{min(loads):.1f}-{max(loads):.1f} on {m['cores']} cores (wall time is noisy when other work runs; "
        "CPU time less so)", "",
        "Each number comes from a fresh process that opens the checkpoint, records VmRSS as baseline, reads "
        "every tensor once as float32 and drops it; peak is `ru_maxrss`. quantkit: `open_checkpoint(...).read(name)` "
        "(FP8 dequantized). safetensors: `safe_open(shard, 'pt').get_tensor(name).float()` on every stored tensor "
        "(FP8 only cast, not dequantized). GB/s = stored bytes / read time.", "",
    ]
    for r in report["checkpoints"]:
        lines.append(f"- {r['kind']}: {r['preset']}-shaped, {r['num_hidden_layers']} layers, {r['shards']} shards, "
                     f"{r['size_on_disk'] / GB:.2f} GB on disk, {r['stored_tensors']} stored tensors "
                     f"({r['listed_tensors']} listed by quantkit), {r['float32_bytes'] / GB:.2f} GB as float32; "
                     f"largest `{r['largest_tensor']}` {r['largest_tensor_shape']} = "
                     f"{r['largest_tensor_float32_bytes'] / MiB:.0f} MiB float32")
    lines += ["", *_table(report["checkpoints"]), "", *_verdicts(report["checkpoints"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fp8", action="store_true", help="only the DeepSeek-V3-shaped FP8 checkpoint")
    which.add_argument("--bf16", action="store_true", help="only the llama-shaped BF16 checkpoint")
    parser.add_argument("--size-gb", type=float,
                        help="stored size of each checkpoint in GB (default: 3 for BF16, 2.5 for FP8)")
    parser.add_argument("--shards", type=int, default=4, help="safetensors shards per checkpoint (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per reader (default 2)")
    parser.add_argument("--cold", action="store_true", help="evict the shards from the page cache before each run")
    parser.add_argument("--workdir", type=Path, help="where to write checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the checkpoints; with --workdir a later run reuses them")
    parser.add_argument("--out", type=Path, default=DEFAULT_JSON, help=f"JSON results (default {DEFAULT_JSON})")
    parser.add_argument("--md", type=Path, default=DEFAULT_MD, help=f"Markdown summary (default {DEFAULT_MD})")
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        task, job = args.worker
        print(json.dumps(WORKERS[task](json.loads(job))))
        return 0

    kinds = ["fp8"] if args.fp8 else ["bf16"] if args.bf16 else ["bf16", "fp8"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="quantkit-read-memory-"))
    try:
        results = [_bench_checkpoint(kind, workdir / f"{kind}-checkpoint", args) for kind in kinds]
    finally:
        if not args.keep:
            for kind in kinds:
                shutil.rmtree(workdir / f"{kind}-checkpoint", ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)

    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": shlex.join(["python", os.path.relpath(Path(__file__).resolve(), REPO), *sys.argv[1:]]),
              "machine": _machine(), "cold": args.cold, "repeats": args.repeats,
              "target_bytes": TARGET_BYTES, "checkpoints": results,
              "pass": all(r["quantkit_under_target"] for r in results)}
    print()
    print("\n".join(_table(results)))
    print("\n".join(_verdicts(results)))
    print(f"quantkit peak RSS above baseline under 1 GiB: {'YES' if report['pass'] else 'NO'}")

    return write_results(report, _markdown(report), args.out, args.md)


def write_results(report: dict, markdown: str, json_path: Path, md_path: Path) -> int:
    """Both result files; the exit status: 0 when the report passes."""
    for path, text in ((json_path, json.dumps(report, indent=2) + "\n"), (md_path, markdown)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {json_path} and {md_path}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
