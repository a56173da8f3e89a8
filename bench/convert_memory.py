"""Peak memory and time of `quantkit convert` turning a multi-GB DeepSeek-V3-shaped FP8 checkpoint into GGUF
Q4_K_M, at two model sizes, with llama.cpp's quantizer as the peer.

The checkpoints are read_memory.py's FP8 one (DeepSeek's block-FP8 layout, 4 shards and an index) at two
sizes (default ~1.3 and ~2.6 GB, rounded to whole layers: 1.5 and 2.7 GB): the same per-layer shapes with
more layers, so the largest tensor is the same in both. The bundled tiny-deepseek's tokenizer files are
copied in (3072 tokens; the config's vocab of 32000 is padded with unused [PAD] tokens, as DeepSeek-V3's own
padded vocabulary is). For each size, each step in a fresh process:

* quantkit: the real CLI, `python -m quantkit.cli convert FOLDER --to gguf:Q4_K_M -o OUT.gguf --device cpu
  --threads 2`. Peak is the ru_maxrss of that process (os.wait4), with its wall and CPU time. Baseline is the
  peak of the same command with --dry-run (imports torch and quantkit, opens the checkpoint, plans, writes
  nothing); peak minus baseline is what converting adds.
* llama.cpp: quantkit writes a BF16 GGUF of the same model (not measured), then a fresh process runs
  `llama_model_quantize` (llama-cpp-python, the same 2 threads) from it to Q4_K_M; same measurements, baseline = VmRSS
  after importing llama_cpp. llama.cpp's real path from an FP8 checkpoint also runs convert_hf_to_gguf.py
  first (not measured), and it mmaps its input, so its RSS counts the file pages it has touched.

RssAnon and RssFile of both are sampled every 0.1 s from /proc (a lower bound of their peaks) to tell heap
from mapped file pages, and so is the PSS summed over the process and its descendants: quantkit encodes
k-quants in forked worker processes, whose own pages wait4's ru_maxrss (a maximum over processes) would not add.
Page cache is warm: every input was just written.

PASS when, at both sizes, quantkit's peak (the larger of ru_maxrss and the sampled process-tree PSS) stays
under 1 GiB + 3 x the float32 size of the checkpoint's largest tensor, and its peak at the larger size exceeds
the smaller's by no more than max(64 MiB, 10%). The exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Stdlib only here too (read_memory explains why: an exec'd child starts from its parent's ru_maxrss).
from read_memory import (
    GB,
    REPO,
    GiB,
    MiB,
    _describe_checkpoint,
    _machine,
    _maxrss,
    _prepare,
    _proc_status,
    write_results,
)

DEFAULT_JSON = REPO / "bench" / "results" / "convert_memory.json"
DEFAULT_MD = REPO / "bench" / "results" / "convert_memory.md"
TOKENIZER = REPO / "quantkit" / "bundled" / "models" / "tiny-deepseek"
TARGET_TYPE = "Q4_K_M"
GROWTH_BYTES, GROWTH_FRACTION = 64 * MiB, 0.10


# ---- worker (runs in a fresh subprocess) -----------------------------------------------------------------

def _llama_quantize(job: dict) -> dict:
    import ctypes

    import llama_cpp

    from quantkit.testing.ggml_reference import llama_quantize

    # llama.cpp logs a line per tensor; keep only warnings and errors (GGML_LOG_LEVEL_WARN = 3, ERROR = 4).
    def log(level, text, _):
        if level >= 3:
            sys.stderr.write(text.decode(errors="replace"))

    callback = llama_cpp.llama_log_callback(log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p())
    baseline = _proc_status()["VmRSS"]
    llama_quantize(job["src"], job["out"], llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, nthread=job["threads"])
    return {"baseline_rss": baseline, "peak_rss": _maxrss()}


# ---- driver ----------------------------------------------------------------------------------------------

def _run(cmd: list[str]) -> dict:
    """Run cmd to completion; its own peak RSS and CPU time from wait4, wall time, sampled RssAnon / RssFile and
    process-tree PSS."""
    sampled = {"RssAnon": 0, "RssFile": 0, "TreePss": 0}
    done = threading.Event()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while not done.wait(0.1):
            try:
                fields = {k: v for k, _, v in (line.partition(":") for line in status.read_text().splitlines())}
            except OSError:
                return
            for key in ("RssAnon", "RssFile"):
                if key in fields:
                    sampled[key] = max(sampled[key], int(fields[key].split()[0]) * 1024)
            sampled["TreePss"] = max(sampled["TreePss"], _tree_pss(proc.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout = proc.stdout.read()
    done.set()  # before reaping, so the sampler never reads a reused pid
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, stdout)
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024,
            "sampled_rss_anon": sampled["RssAnon"], "sampled_rss_file": sampled["RssFile"],
            "sampled_tree_pss": sampled["TreePss"], "peak": max(usage.ru_maxrss * 1024, sampled["TreePss"]),
            "load_avg_1min": load, "stdout": stdout.strip()}


def _tree_pss(root: int) -> int:
    """PSS of root and all its descendants (0 for processes that are gone)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    total = 0
    for pid in tree:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:")), 0)
    return total


def _cli(folder: Path, target: str, out: Path, threads: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli", "convert", str(folder), "--to", f"gguf:{target}", "-o", str(out),
            "--device", "cpu", "--threads", str(threads), *extra]


def _bench_size(size_gb: float, folder: Path, args: argparse.Namespace) -> dict:
    job = {"folder": str(folder), "kind": "fp8", "size_gb": size_gb, "shards": args.shards}
    print(f"[{size_gb:g} GB] preparing under {folder}", flush=True)
    generate_seconds = _prepare(folder, job)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    info = _describe_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    # The largest tensor of the GGUF file: one layer's routed experts stacked (written one expert at a time).
    stacked = config["n_routed_experts"] * config["moe_intermediate_size"] * config["hidden_size"] * 4
    target = GiB + 3 * info["largest_tensor_float32_bytes"]
    print(f"[{size_gb:g} GB] {info['size_on_disk'] / GB:.2f} GB on disk, {info['num_hidden_layers']} layers "
          f"(generated in {generate_seconds:.0f} s)", flush=True)

    q4, bf16, peer_out = (folder.parent / name for name in ("quantkit-Q4_K_M.gguf", "BF16.gguf", "llama-Q4_K_M.gguf"))
    try:
        baseline = _run(_cli(folder, TARGET_TYPE, q4, args.threads, "--dry-run"))
        quantkit = _run(_cli(folder, TARGET_TYPE, q4, args.threads))
        quantkit.update(baseline_rss=baseline["peak_rss"], output_bytes=q4.stat().st_size,
                        peak_above_baseline=quantkit["peak"] - baseline["peak"])
        q4.unlink()
        _report_step(size_gb, "quantkit", quantkit)
        bf16_seconds = _run(_cli(folder, "BF16", bf16, args.threads))["seconds"]
        llama = _run([sys.executable, str(Path(__file__).resolve()), "--llama-quantize",
                      json.dumps({"src": str(bf16), "out": str(peer_out), "threads": args.threads})])
        inner = json.loads(llama.pop("stdout").splitlines()[-1])
        llama.update(baseline_rss=inner["baseline_rss"], peak_above_baseline=llama["peak"] - inner["baseline_rss"],
                     input_bytes=bf16.stat().st_size, output_bytes=peer_out.stat().st_size)
        _report_step(size_gb, "llama.cpp", llama)
    finally:
        for path in (q4, bf16, peer_out):
            path.unlink(missing_ok=True)
        if not args.keep:  # one checkpoint on disk at a time (with its BF16 GGUF, about 3x its size)
            shutil.rmtree(folder, ignore_errors=True)
    return {"requested_gb": size_gb, "generate_seconds": generate_seconds, "bf16_gguf_seconds": bf16_seconds,
            **info, "gguf_largest_tensor_float32_bytes": stacked, "target_bytes": target,
            "quantkit": quantkit, "llama_cpp": llama,
            "ratio_peak": quantkit["peak"] / llama["peak"],
            "ratio_peak_above_baseline": quantkit["peak_above_baseline"] / llama["peak_above_baseline"],
            "ratio_time": quantkit["seconds"] / llama["seconds"],
            "ratio_cpu": quantkit["cpu_seconds"] / llama["cpu_seconds"],
            "under_target": quantkit["peak"] < target}


def _report_step(size_gb: float, who: str, m: dict) -> None:
    print(f"[{size_gb:g} GB] {who:<9} peak {m['peak'] / MiB:6.0f} MiB (+{m['peak_above_baseline'] / MiB:.0f} "
          f"above baseline; ru_maxrss {m['peak_rss'] / MiB:.0f}, process-tree PSS {m['sampled_tree_pss'] / MiB:.0f}, "
          f"sampled anon {m['sampled_rss_anon'] / MiB:.0f}, file {m['sampled_rss_file'] / MiB:.0f})  "
          f"{m['seconds']:7.1f} s ({m['cpu_seconds']:.1f} s CPU, load {m['load_avg_1min']:.1f})", flush=True)


def _git() -> dict:
    """The commit, and the files under quantkit/ that differ from it: the numbers are those of the working tree."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, stdout=subprocess.PIPE, text=True, check=True).stdout

    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "modified": [line[3:] for line in git("status", "--porcelain", "--", "quantkit").splitlines()]}


def _table(sizes: list[dict]) -> list[str]:
    lines = ["| checkpoint | converter | peak | above baseline | ru_maxrss / process-tree PSS | "
             "sampled anon / file RSS | time | CPU time | output |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sizes:
        for who, key in (("quantkit", "quantkit"), ("llama.cpp (from BF16 GGUF)", "llama_cpp")):
            m = r[key]
            lines.append(f"| {r['size_on_disk'] / GB:.2f} GB, {r['num_hidden_layers']} layers | {who} | "
                         f"{m['peak'] / MiB:.0f} MiB | {m['peak_above_baseline'] / MiB:.0f} MiB | "
                         f"{m['peak_rss'] / MiB:.0f} / {m['sampled_tree_pss'] / MiB:.0f} MiB | "
                         f"{m['sampled_rss_anon'] / MiB:.0f} / {m['sampled_rss_file'] / MiB:.0f} MiB | "
                         f"{m['seconds']:.1f} s | {m['cpu_seconds']:.1f} s | {m['output_bytes'] / GB:.3f} GB |")
    return lines


def _verdicts(report: dict) -> list[str]:
    lines = []
    for r in report["sizes"]:
        peak = r["quantkit"]["peak"]
        lines.append(f"- {r['size_on_disk'] / GB:.2f} GB: quantkit/llama.cpp peak {r['ratio_peak']:.2f}x "
                     f"(above baseline {r['ratio_peak_above_baseline']:.2f}x), time {r['ratio_time']:.2f}x "
                     f"(CPU {r['ratio_cpu']:.2f}x); quantkit peak {peak / MiB:.0f} MiB "
                     f"{'<' if r['under_target'] else '>='} {r['target_bytes'] / MiB:.0f} MiB target: "
                     f"{'PASS' if r['under_target'] else 'FAIL'}")
    g = report["growth"]
    lines.append(f"- growth of quantkit's peak from the smaller to the larger checkpoint: {g['bytes'] / MiB:+.0f} MiB "
                 f"(tolerance {g['tolerance_bytes'] / MiB:.0f} MiB): {'PASS' if g['ok'] else 'FAIL'}")
    return lines


def _markdown(report: dict) -> str:
    m, sizes = report["machine"], report["sizes"]
    first = sizes[0]
    loads = [r[k]["load_avg_1min"] for r in sizes for k in ("quantkit", "llama_cpp")]
    lines = [
        "# FP8 checkpoint -> GGUF Q4_K_M: peak memory", "",
        f"Date: {report['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / GiB:.0f} GiB RAM, Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']}, llama-cpp-python {report['llama_cpp_version']}  ",
        f"Command: `{report['command']}`  ",
        f"Code: commit {report['git']['commit']}"
        + (f" with uncommitted changes to {', '.join(report['git']['modified'])}" if report["git"]["modified"] else "")
        + "  ",
        f"Page cache warm (inputs just written); one run per measurement; 1-min load average at the starts "
        f"{min(loads):.1f}-{max(loads):.1f} on {m['cores']} cores (wall time is noisy when other work runs; "
        "CPU time less so)", "",
        "quantkit: `python -m quantkit.cli convert FOLDER --to gguf:Q4_K_M -o OUT.gguf --device cpu --threads "
        f"{report['threads']}` in a fresh process; peak RSS = its `ru_maxrss`; baseline = the peak of the same "
        "command with `--dry-run` (imports, opens the checkpoint, plans). llama.cpp: `llama_model_quantize` "
        f"(llama-cpp-python, {report['threads']} threads) from a BF16 GGUF of the same model that quantkit wrote "
        "first (not measured); baseline = VmRSS after importing llama_cpp. llama.cpp's own path from an FP8 "
        "checkpoint also needs convert_hf_to_gguf.py first (not measured); it mmaps its input, so its RSS "
        "includes the file pages it touched. Anon / file RSS are sampled every 0.1 s (lower bounds of their "
        "peaks).", "",
        f"Checkpoints: read_memory.py's DeepSeek-V3-shaped block-FP8 one, {first['shards']} shards, the same "
        f"per-layer shapes at both sizes; largest checkpoint tensor `{first['largest_tensor']}` "
        f"{first['largest_tensor_shape']} = {first['largest_tensor_float32_bytes'] / MiB:.0f} MiB float32 (target "
        f"1 GiB + 3x = {first['target_bytes'] / MiB:.0f} MiB); largest GGUF tensor, one layer's stacked routed "
        f"experts, {first['gguf_largest_tensor_float32_bytes'] / MiB:.0f} MiB float32. Tokenizer: the bundled "
        "tiny-deepseek's 3072 tokens, padded to the config's vocab of 32000 with unused [PAD] tokens.", "",
    ]
    for r in sizes:
        lines.append(f"- {r['size_on_disk'] / GB:.2f} GB on disk: {r['num_hidden_layers']} layers, "
                     f"{r['float32_bytes'] / GB:.2f} GB as float32; BF16 GGUF "
                     f"{r['llama_cpp']['input_bytes'] / GB:.2f} GB (written in {r['bf16_gguf_seconds']:.0f} s)")
    lines += ["", *_table(sizes), "", *_verdicts(report), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", type=float, nargs=2, default=[1.3, 2.6], metavar=("SMALL", "LARGE"),
                        help="stored sizes of the two checkpoints in GB (default 1.3 2.6; nearest whole layer count)")
    parser.add_argument("--shards", type=int, default=4, help="safetensors shards per checkpoint (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="quantizing threads of both converters (default 2)")
    parser.add_argument("--workdir", type=Path, help="where to write checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the checkpoints; with --workdir a later run reuses them")
    parser.add_argument("--out", type=Path, default=DEFAULT_JSON, help=f"JSON results (default {DEFAULT_JSON})")
    parser.add_argument("--md", type=Path, default=DEFAULT_MD, help=f"Markdown summary (default {DEFAULT_MD})")
    parser.add_argument("--llama-quantize", metavar="JOB", help=argparse.SUPPRESS)  # the peer's worker
    args = parser.parse_args(argv)

    if args.llama_quantize:
        print(json.dumps(_llama_quantize(json.loads(args.llama_quantize))))
        return 0

    code = _git()  # before the runs: what they measure
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="quantkit-convert-memory-"))
    try:
        sizes = [_bench_size(size, workdir / f"fp8-{size:g}gb", args) for size in args.sizes_gb]
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    small, large = (r["quantkit"]["peak"] for r in sizes)
    tolerance = max(GROWTH_BYTES, GROWTH_FRACTION * small)
    growth = {"bytes": large - small, "tolerance_bytes": tolerance, "ok": large - small <= tolerance}
    llama_version = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                   stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": shlex.join(["python", os.path.relpath(Path(__file__).resolve(), REPO), *sys.argv[1:]]),
              "machine": _machine(), "git": code, "llama_cpp_version": llama_version, "threads": args.threads,
              "target_type": TARGET_TYPE, "growth_tolerance": {"bytes": GROWTH_BYTES, "fraction": GROWTH_FRACTION},
              "sizes": sizes, "growth": growth, "pass": growth["ok"] and all(r["under_target"] for r in sizes)}
    print()
    print("\n".join(_table(sizes)))
    print("\n".join(_verdicts(report)))
    print(f"quantkit peak RSS under target and not growing with size: {'PASS' if report['pass'] else 'FAIL'}")

    return write_results(report, _markdown(report), args.out, args.md)


if __name__ == "__main__":
    sys.exit(main())
