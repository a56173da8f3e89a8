"""FP8 DeepSeek-V3-shaped checkpoint -> GGUF Q4_K_M end to end, at two model sizes: quantkit's one command vs
llama.cpp's real two-step path (convert_hf_to_gguf.py to a BF16 GGUF, then llama-quantize); time, CPU time and
peak memory of each step, the intermediate file, and whether the outputs agree byte for byte.

The checkpoints are read_memory.py's FP8 one (DeepSeek's block-FP8 layout, 4 shards and an index) at two
sizes (default ~1.3 and ~2.6 GB, rounded to whole layers: 1.5 and 2.7 GB): the same per-layer shapes with
more layers, so the largest tensor is the same in both. The bundled tiny-deepseek's tokenizer files are
copied in (3072 tokens; the config's vocab of 32000 is padded with unused [PAD] tokens, as DeepSeek-V3's own
padded vocabulary is). For each size, each step in a fresh process:

* quantkit: the real CLI, `python -m quantkit.cli convert FOLDER --to gguf:Q4_K_M -o OUT.gguf --device cpu
  --threads 2`. Peak is the ru_maxrss of that process (os.wait4), with its wall and CPU time (its reaped
  encoding workers included). Baseline is the peak of the same command with --dry-run (imports torch and
  quantkit, opens the checkpoint, plans, writes nothing); peak minus baseline is what converting adds.
* llama.cpp step 1: `convert_hf_to_gguf.py FOLDER --outtype bf16 --outfile BF16.gguf` from the llama.cpp that
  the pinned llama-cpp-python sdist vendors (fetched once with `pip download` into a cache, see
  llama_cpp_source), run by this venv's python with its own gguf-py first on the path. One workaround: the
  tiny tokenizer's pre-tokenizer hash is in no table of known ones, so get_vocab_base_pre is patched to answer
  "deepseek-v3" (the tokenizer's metadata only; no tensor changes). Its FP8 path (base.py dequant_model)
  multiplies FP8 by the block scales in float32 and stores BF16. Baseline = VmRSS after its imports.
* llama.cpp step 2: `llama_model_quantize` (llama-cpp-python, the same 2 threads) from that BF16 GGUF to
  Q4_K_M; baseline = VmRSS after importing llama_cpp. It mmaps its input, so its RSS counts the file pages
  it has touched.

RssAnon and RssFile are sampled every 0.1 s from /proc (a lower bound of their peaks) to tell heap from mapped
file pages, and so is the PSS summed over the process and its descendants: quantkit's torch codecs encode in
forked worker processes (the compiled ones on threads), whose own pages wait4's ru_maxrss (a maximum over
processes) would not add. Page cache is warm: every input was just written.

The two Q4_K_M files are compared tensor by tensor (types and bytes). At the smaller size, tensors that differ
are also measured against the float32 weights (FP8 x scale, what quantkit encodes), and quantkit requantizes
llama.cpp's BF16 GGUF to Q4_K_M, which must equal llama.cpp's step 2 byte for byte: then any difference
comes from the BF16 intermediate, not from the encoders.

PASS when, at both sizes, quantkit's peak (the larger of ru_maxrss and the sampled process-tree PSS) stays
under 1 GiB + 3 x the float32 size of the checkpoint's largest tensor, its peak at the larger size exceeds
the smaller's by no more than max(64 MiB, 10%), and llama.cpp's two steps take at least 2x quantkit's wall
time (the issue's goal). The exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
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
SPEEDUP_GOAL = 2.0
LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python the venv has: its vendored llama.cpp is step 1's converter
SOURCE_CACHE = Path.home() / ".cache" / "quantkit" / "llama-cpp-src" / LLAMA_CPP_PYTHON
# The tiny tokenizer's hash is unknown to convert_hf_to_gguf; DeepSeek-V3's own pre-tokenizer is what a real
# DeepSeek-V3 checkpoint gets from it.
PRE_TOKENIZER = "deepseek-v3"


def llama_cpp_source(cache: Path = SOURCE_CACHE) -> Path:
    """vendor/llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/ from the llama-cpp-python sdist,
    downloaded and unpacked once into `cache` (reused after); the folder holding them."""
    dst = cache / "llama.cpp"
    if (dst / "convert_hf_to_gguf.py").is_file():
        return dst
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        unpacked = Path(tmp) / "llama.cpp"
        with tarfile.open(Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.removeprefix(prefix)
                if rel != m.name and (rel == "convert_hf_to_gguf.py" or rel.startswith(("conversion/", "gguf-py/"))):
                    m.name = rel
                    members.append(m)
            tar.extractall(unpacked, members=members, filter="data")
        unpacked.rename(dst)  # whole or not at all: a later run trusts what it finds
    return dst


# ---- workers (run in fresh subprocesses) -----------------------------------------------------------------

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


def _convert_hf(source: Path, argv: list[str]) -> dict:
    """convert_hf_to_gguf.py's main() with `argv`, as the script runs itself (its gguf-py first on the path),
    with the one workaround of the module docstring."""
    sys.path[:0] = [str(source / "gguf-py"), str(source)]
    sys.argv = [str(source / "convert_hf_to_gguf.py"), *argv]
    import convert_hf_to_gguf
    import gguf
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: PRE_TOKENIZER
    baseline = _proc_status()["VmRSS"]
    convert_hf_to_gguf.main()
    return {"baseline_rss": baseline, "gguf_py": gguf.__file__}


def _compare(job: dict) -> dict:
    """Tensor by tensor: the two Q4_K_M files' types and bytes; with `folder`, the tensors that differ against the
    checkpoint's float32 weights; with `requant`, which tensors of that file differ from llama.cpp's."""
    import numpy as np
    import torch

    from quantkit.formats.gguf.tensors import mapping_for
    from quantkit.model import Model
    from quantkit.quant import CODECS
    from quantkit.source.gguf_file import GGUFFile

    ours, theirs = GGUFFile(job["quantkit"]), GGUFFile(job["llama"])
    out = {"tensors": len(ours.tensors), "missing": sorted(set(ours.tensors) ^ set(theirs.tensors)),
           "type_differs": sorted(n for n in ours.tensors if n in theirs.tensors
                                  and ours.type_name(n) != theirs.type_name(n))}
    differ = [n for n in ours.tensors if n in theirs.tensors and n not in out["type_differs"]
              and not np.array_equal(ours.data(n), theirs.data(n))]
    out["identical"] = len(ours.tensors) - len(out["missing"]) - len(out["type_differs"]) - len(differ)
    out["bytes_identical"] = sum(ours.tensors[n].nbytes for n in ours.tensors
                                 if n in theirs.tensors and n not in differ and n not in out["type_differs"])
    out["bytes_total"] = sum(t.nbytes for t in ours.tensors.values())

    details = {}
    for name in differ:
        codec = CODECS.get(ours.type_name(name))
        a, b = ours.data(name), theirs.data(name)
        block = codec.block_bytes if codec else 1
        details[name] = {"type": ours.type_name(name),
                         "blocks_differ": int((a.reshape(-1, block) != b.reshape(-1, block)).any(axis=1).sum()),
                         "blocks": a.size // block}
    out["differ"] = details

    if job.get("folder") and differ:
        # Each differing tensor decoded piece by piece (an expert at a time) against the float32 weights.
        with Model(job["folder"], device="cpu") as model:
            weights, mapping = model.weights(), {t.name: t for t in mapping_for(model.arch).tensors()}
            for name, d in details.items():
                codec, width = CODECS[d["type"]], ours.shape(name)[-1]
                row_bytes = width // codec.block_size * codec.block_bytes
                rows_a = ours.data(name).reshape(-1, row_bytes)
                rows_b = theirs.data(name).reshape(-1, row_bytes)
                sums = dict.fromkeys(("w2", "err_quantkit", "err_llama", "err_bf16"), 0.0)
                max_delta = max_bf16 = 0.0
                start = 0
                for piece in mapping[name].pieces(weights):
                    w = piece.float()
                    end = start + w.shape[0]
                    qa = codec.decode(torch.from_numpy(np.array(rows_a[start:end])), width)
                    qb = codec.decode(torch.from_numpy(np.array(rows_b[start:end])), width)
                    bf16 = w.to(torch.bfloat16).float()
                    sums["w2"] += float(w.double().square().sum())
                    sums["err_quantkit"] += float((qa - w).double().square().sum())
                    sums["err_llama"] += float((qb - w).double().square().sum())
                    sums["err_bf16"] += float((bf16 - w).double().square().sum())
                    max_delta = max(max_delta, float((qa - qb).abs().max()))
                    max_bf16 = max(max_bf16, float((bf16 - w).abs().max()))
                    start = end
                d.update(sums, max_abs_delta=max_delta, max_abs_bf16_rounding=max_bf16,
                         rel_rmse_quantkit=(sums["err_quantkit"] / sums["w2"]) ** 0.5,
                         rel_rmse_llama=(sums["err_llama"] / sums["w2"]) ** 0.5,
                         rel_rmse_bf16_rounding=(sums["err_bf16"] / sums["w2"]) ** 0.5)

    if job.get("requant"):
        again = GGUFFile(job["requant"])
        out["requant_differ"] = sorted(n for n in theirs.tensors if n not in again.tensors
                                       or again.type_name(n) != theirs.type_name(n)
                                       or not np.array_equal(again.data(n), theirs.data(n)))
    return out


# ---- driver ----------------------------------------------------------------------------------------------

def _run(cmd: list[str], log: Path | None = None) -> dict:
    """Run cmd to completion (stderr to `log` if given); its own peak RSS and CPU time from wait4, wall time,
    sampled RssAnon / RssFile and process-tree PSS."""
    sampled = {"RssAnon": 0, "RssFile": 0, "TreePss": 0}
    done = threading.Event()
    load = os.getloadavg()[0]
    with log.open("w") if log else contextlib.nullcontext() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)

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
        tail = "\n".join(log.read_text().splitlines()[-20:]) if log else ""
        raise subprocess.CalledProcessError(proc.returncode, cmd, stdout, tail)
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


def _cli(source: Path, target: str, out: Path, threads: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli", "convert", str(source), "--to", f"gguf:{target}", "-o", str(out),
            "--device", "cpu", "--threads", str(threads), *extra]


def _worker(flag: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), flag, *args]


def _measured(m: dict, inner_baseline: int | None, output: Path) -> dict:
    """m with its baseline, peak above it and output size; inner_baseline: the worker's own (last stdout line)."""
    m.pop("stdout", None)
    baseline = m["baseline_rss"] if inner_baseline is None else inner_baseline
    return m | {"baseline_rss": baseline, "peak_above_baseline": m["peak"] - baseline,
                "output_bytes": output.stat().st_size}


def _inner(m: dict) -> dict:
    return json.loads(m["stdout"].splitlines()[-1])


def _bench_size(size_gb: float, folder: Path, args: argparse.Namespace, source: Path, detailed: bool) -> dict:
    job = {"folder": str(folder), "kind": "fp8", "size_gb": size_gb, "shards": args.shards}
    if args.overrides:
        job["overrides"] = args.overrides
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

    work = folder.parent
    q4, bf16, peer_out, requant = (work / f"{folder.name}-{name}.gguf" for name in
                                   ("quantkit-Q4_K_M", "llama-BF16", "llama-Q4_K_M", "requant-Q4_K_M"))
    requantized = None
    try:
        baseline = _run(_cli(folder, TARGET_TYPE, q4, args.threads, "--dry-run"))
        quantkit = _run(_cli(folder, TARGET_TYPE, q4, args.threads))
        quantkit = _measured(quantkit | {"baseline_rss": baseline["peak_rss"]}, None, q4)
        quantkit["peak_above_baseline"] = quantkit["peak"] - baseline["peak"]
        _report_step(size_gb, "quantkit", quantkit)

        step1 = _run(_worker("--convert-hf", str(source), str(folder), "--outtype", "bf16", "--outfile", str(bf16)),
                     log=work / f"{folder.name}-convert_hf.log")
        inner = _inner(step1)
        step1 = _measured(step1, inner["baseline_rss"], bf16) | {"gguf_py": inner["gguf_py"]}
        _report_step(size_gb, "llama.cpp convert_hf_to_gguf", step1)
        step2 = _run(_worker("--llama-quantize",
                             json.dumps({"src": str(bf16), "out": str(peer_out), "threads": args.threads})))
        step2 = _measured(step2, _inner(step2)["baseline_rss"], peer_out)
        _report_step(size_gb, "llama.cpp llama_model_quantize", step2)

        if detailed:  # quantkit's encoder on llama.cpp's own BF16 file: isolates the BF16 intermediate
            requantized = _measured(_run(_cli(bf16, TARGET_TYPE, requant, args.threads)) | {"baseline_rss": 0},
                                    None, requant)
            _report_step(size_gb, "quantkit from llama.cpp's BF16", requantized)
        bf16.unlink()
        compare = _run(_worker("--compare", json.dumps(
            {"quantkit": str(q4), "llama": str(peer_out)}
            | ({"folder": str(folder), "requant": str(requant)} if detailed else {}))))
        comparison = _inner(compare) | {"seconds": compare["seconds"]}
        print(f"[{size_gb:g} GB] {_comparison_line(comparison)}", flush=True)
    finally:
        for path in (q4, bf16, peer_out, requant):
            path.unlink(missing_ok=True)
        if not args.keep:  # one checkpoint on disk at a time (with its BF16 GGUF, about 3x its size)
            shutil.rmtree(folder, ignore_errors=True)
    total = {"seconds": step1["seconds"] + step2["seconds"], "cpu_seconds": step1["cpu_seconds"] + step2["cpu_seconds"],
             "peak": max(step1["peak"], step2["peak"]),
             "peak_above_baseline": max(step1["peak_above_baseline"], step2["peak_above_baseline"])}
    return {"requested_gb": size_gb, "generate_seconds": generate_seconds,
            **info, "gguf_largest_tensor_float32_bytes": stacked, "target_bytes": target,
            "quantkit": quantkit, "llama_cpp": {"convert_hf_to_gguf": step1, "llama_model_quantize": step2, **total,
                                                "intermediate_bytes": step1["output_bytes"]},
            "quantkit_from_llama_bf16": requantized, "comparison": comparison,
            "speedup": total["seconds"] / quantkit["seconds"],
            "speedup_cpu": total["cpu_seconds"] / quantkit["cpu_seconds"],
            "ratio_peak": quantkit["peak"] / total["peak"], "under_target": quantkit["peak"] < target,
            "speed_goal_met": total["seconds"] >= SPEEDUP_GOAL * quantkit["seconds"]}


def _report_step(size_gb: float, who: str, m: dict) -> None:
    print(f"[{size_gb:g} GB] {who}: peak {m['peak'] / MiB:.0f} MiB (+{m['peak_above_baseline'] / MiB:.0f} "
          f"above baseline; ru_maxrss {m['peak_rss'] / MiB:.0f}, process-tree PSS {m['sampled_tree_pss'] / MiB:.0f}, "
          f"sampled anon {m['sampled_rss_anon'] / MiB:.0f}, file {m['sampled_rss_file'] / MiB:.0f})  "
          f"{m['seconds']:.1f} s ({m['cpu_seconds']:.1f} s CPU, load {m['load_avg_1min']:.1f})", flush=True)


def _comparison_line(c: dict) -> str:
    line = (f"Q4_K_M files: {c['identical']} of {c['tensors']} tensors byte-identical "
            f"({c['bytes_identical'] / GB:.3f} of {c['bytes_total'] / GB:.3f} GB)")
    if c["missing"] or c["type_differs"]:
        line += f"; missing in one {c['missing']}, other type {c['type_differs']}"
    if c["differ"]:
        blocks = sum(d["blocks_differ"] for d in c["differ"].values())
        line += (f"; {len(c['differ'])} differ in {blocks} of {sum(d['blocks'] for d in c['differ'].values())} "
                 "of their blocks")
    if "requant_differ" in c:
        line += ("; quantkit from llama.cpp's BF16 = llama.cpp's Q4_K_M: "
                 + ("byte-identical" if not c["requant_differ"] else f"{len(c['requant_differ'])} tensors differ"))
    return line


def _git() -> dict:
    """The commit, and the files under quantkit/ that differ from it: the numbers are those of the working tree."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, stdout=subprocess.PIPE, text=True, check=True).stdout

    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "modified": [line[3:] for line in git("status", "--porcelain", "--", "quantkit").splitlines()]}


def _steps_table(sizes: list[dict]) -> list[str]:
    lines = ["| checkpoint | step | peak | above baseline | ru_maxrss / process-tree PSS | sampled anon / file RSS | "
             "time | CPU time | cores busy | load | writes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sizes:
        ll = r["llama_cpp"]
        rows = [("**quantkit** `convert --to gguf:Q4_K_M`", r["quantkit"]),
                ("llama.cpp 1: `convert_hf_to_gguf.py --outtype bf16`", ll["convert_hf_to_gguf"]),
                ("llama.cpp 2: `llama_model_quantize` Q4_K_M", ll["llama_model_quantize"])]
        for step, m in rows:
            lines.append(f"| {r['size_on_disk'] / GB:.2f} GB, {r['num_hidden_layers']} layers | {step} | "
                         f"{m['peak'] / MiB:.0f} MiB | {m['peak_above_baseline'] / MiB:.0f} MiB | "
                         f"{m['peak_rss'] / MiB:.0f} / {m['sampled_tree_pss'] / MiB:.0f} MiB | "
                         f"{m['sampled_rss_anon'] / MiB:.0f} / {m['sampled_rss_file'] / MiB:.0f} MiB | "
                         f"{m['seconds']:.1f} s | {m['cpu_seconds']:.1f} s | {m['cpu_seconds'] / m['seconds']:.2f} | "
                         f"{m['load_avg_1min']:.1f} | {m['output_bytes'] / GB:.3f} GB |")
        lines.append(f"| | **llama.cpp total** | {ll['peak'] / MiB:.0f} MiB | "
                     f"{ll['peak_above_baseline'] / MiB:.0f} MiB | | | {ll['seconds']:.1f} s | "
                     f"{ll['cpu_seconds']:.1f} s | | | |")
    return lines


def _summary_table(sizes: list[dict]) -> list[str]:
    lines = ["| checkpoint | quantkit | llama.cpp 1 + 2 | llama.cpp / quantkit, wall (CPU) | intermediate file "
             "(quantkit / llama.cpp) | peak (quantkit / llama.cpp) | goal >= 2x |", "|---|---|---|---|---|---|---|"]
    for r in sizes:
        q, ll = r["quantkit"], r["llama_cpp"]
        lines.append(f"| {r['size_on_disk'] / GB:.2f} GB, {r['num_hidden_layers']} layers | {q['seconds']:.1f} s | "
                     f"{ll['convert_hf_to_gguf']['seconds']:.1f} + {ll['llama_model_quantize']['seconds']:.1f} = "
                     f"{ll['seconds']:.1f} s | {r['speedup']:.2f}x ({r['speedup_cpu']:.2f}x) | none / "
                     f"{ll['intermediate_bytes'] / GB:.2f} GB BF16 GGUF | {q['peak'] / MiB:.0f} / "
                     f"{ll['peak'] / MiB:.0f} MiB | {'PASS' if r['speed_goal_met'] else 'FAIL'} |")
    return lines


def _kind(name: str) -> str:
    """blk.3.ffn_up_exps.weight -> ffn_up_exps (layers pooled)."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def _differences_table(c: dict) -> list[str]:
    """The differing tensors of a detailed comparison, pooled over layers by kind."""
    kinds: dict[str, dict] = {}
    for name, d in c["differ"].items():
        k = kinds.setdefault(_kind(name), {"types": set(), "n": 0, "blocks_differ": 0, "blocks": 0,
                                           "max_abs_delta": 0.0, "max_abs_bf16_rounding": 0.0,
                                           "w2": 0.0, "err_quantkit": 0.0, "err_llama": 0.0, "err_bf16": 0.0})
        k["n"] += 1
        k["types"].add(d["type"])  # one kind can fall back to different types by layer (Q6_K -> Q8_0)
        for key in ("blocks_differ", "blocks", "w2", "err_quantkit", "err_llama", "err_bf16"):
            k[key] += d.get(key, 0)
        for key in ("max_abs_delta", "max_abs_bf16_rounding"):
            k[key] = max(k[key], d.get(key, 0.0))
    lines = ["| tensor (layers pooled) | type | ggml blocks that differ | max abs difference of the dequantized "
             "weights | relative RMS error vs float32: quantkit / llama.cpp | "
             "BF16 rounding alone: relative RMS / max abs |",
             "|---|---|---|---|---|---|"]
    for kind, k in sorted(kinds.items()):
        rel = {key: (k[key] / k["w2"]) ** 0.5 if k["w2"] else float("nan")
               for key in ("err_quantkit", "err_llama", "err_bf16")}
        lines.append(f"| {kind} ({k['n']}) | {', '.join(sorted(k['types']))} | {k['blocks_differ']} of {k['blocks']} "
                     f"({100 * k['blocks_differ'] / k['blocks']:.1f}%) | {k['max_abs_delta']:.2e} | "
                     f"{rel['err_quantkit']:.5f} / {rel['err_llama']:.5f} | "
                     f"{rel['err_bf16']:.2e} / {k['max_abs_bf16_rounding']:.2e} |")
    return lines


def _verdicts(report: dict) -> list[str]:
    lines = []
    for r in report["sizes"]:
        peak = r["quantkit"]["peak"]
        lines.append(f"- {r['size_on_disk'] / GB:.2f} GB: llama.cpp's two steps take {r['speedup']:.2f}x quantkit's "
                     f"wall time (CPU {r['speedup_cpu']:.2f}x), goal >= {SPEEDUP_GOAL:g}x: "
                     f"{'PASS' if r['speed_goal_met'] else 'FAIL'}; quantkit's peak is {r['ratio_peak']:.2f}x "
                     f"llama.cpp's; quantkit peak {peak / MiB:.0f} MiB {'<' if r['under_target'] else '>='} "
                     f"{r['target_bytes'] / MiB:.0f} MiB target: {'PASS' if r['under_target'] else 'FAIL'}")
    g = report["growth"]
    lines.append(f"- growth of quantkit's peak from the smaller to the larger checkpoint: {g['bytes'] / MiB:+.0f} MiB "
                 f"(tolerance {g['tolerance_bytes'] / MiB:.0f} MiB): {'PASS' if g['ok'] else 'FAIL'}")
    return lines


def _markdown(report: dict) -> str:
    m, sizes = report["machine"], report["sizes"]
    first = sizes[0]
    loads = [x["load_avg_1min"] for r in sizes for x in (r["quantkit"], r["llama_cpp"]["convert_hf_to_gguf"],
                                                         r["llama_cpp"]["llama_model_quantize"])]
    lines = [
        "# FP8 checkpoint -> GGUF Q4_K_M end to end: quantkit's one command vs llama.cpp's two steps", "",
        f"Date: {report['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / GiB:.0f} GiB RAM, Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']}, llama-cpp-python {report['llama_cpp_version']}  ",
        f"Command: `{report['command']}`  ",
        f"Code: commit {report['git']['commit']}"
        + (f" with uncommitted changes to {', '.join(report['git']['modified'])}" if report["git"]["modified"] else "")
        + "  ",
        f"Page cache warm (inputs just written); one run per measurement; 1-min load average at the starts "
        f"{min(loads):.1f}-{max(loads):.1f} on {m['cores']} cores (other engineers' work shares the cores: wall "
        "time is noisy, CPU time less so)", "",
        "quantkit: `python -m quantkit.cli convert FOLDER --to gguf:Q4_K_M -o OUT.gguf --device cpu --threads "
        f"{report['threads']}` in a fresh process; baseline = the peak of the same command with `--dry-run` "
        "(imports, opens the checkpoint, plans). llama.cpp, each step in a fresh process: (1) "
        "`convert_hf_to_gguf.py FOLDER --outtype bf16 --outfile BF16.gguf` from the llama.cpp vendored in the "
        f"llama-cpp-python {LLAMA_CPP_PYTHON} sdist (`pip download`, cached), run by the same venv's python with "
        "its own gguf-py first on the path; baseline = VmRSS after its imports. (2) `llama_model_quantize` "
        f"(llama-cpp-python, {report['threads']} threads) from that BF16 file; baseline = VmRSS after importing "
        "llama_cpp; it mmaps its input, so its RSS includes the file pages it touched. Peak = the larger of wait4's "
        "ru_maxrss and the process tree's PSS sampled every 0.1 s (anon / file RSS: sampled, lower bounds).", "",
        f"Workaround in step 1: the tiny tokenizer's BPE pre-tokenizer hash is not in convert_hf_to_gguf's table "
        f"(PEERS.md pitfall 3), so `TextModel.get_vocab_base_pre` is patched to return `{PRE_TOKENIZER}` (what a real "
        "DeepSeek-V3 checkpoint gets). It changes one metadata string, no tensor.", "",
        f"Checkpoints: read_memory.py's DeepSeek-V3-shaped block-FP8 one, {first['shards']} shards, the same "
        f"per-layer shapes at both sizes; largest checkpoint tensor `{first['largest_tensor']}` "
        f"{first['largest_tensor_shape']} = {first['largest_tensor_float32_bytes'] / MiB:.0f} MiB float32 (target "
        f"1 GiB + 3x = {first['target_bytes'] / MiB:.0f} MiB); largest GGUF tensor, one layer's stacked routed "
        f"experts, {first['gguf_largest_tensor_float32_bytes'] / MiB:.0f} MiB float32. Tokenizer: the bundled "
        "tiny-deepseek's 3072 tokens, padded to the config's vocab of 32000 with unused [PAD] tokens.", "",
    ]
    for r in sizes:
        lines.append(f"- {r['size_on_disk'] / GB:.2f} GB on disk: {r['num_hidden_layers']} layers, "
                     f"{r['float32_bytes'] / GB:.2f} GB as float32; llama.cpp's intermediate BF16 GGUF "
                     f"{r['llama_cpp']['intermediate_bytes'] / GB:.2f} GB")
    busy = {who: [m["cpu_seconds"] / m["seconds"] for m in ms] for who, ms in (
        ("quantkit", [r["quantkit"] for r in sizes]),
        ("llama", [r["llama_cpp"]["llama_model_quantize"] for r in sizes]))}
    lines += ["", "## Time", "", *_summary_table(sizes), "",
              f"Wall time depends on what else runs: with {m['cores']} cores shared (load above), "
              f"llama_model_quantize's {report['threads']} threads kept "
              f"{min(busy['llama']):.2f}-{max(busy['llama']):.2f} cores busy on average and quantkit's "
              f"{min(busy['quantkit']):.2f}-{max(busy['quantkit']):.2f} (cores busy = CPU time / wall time). The "
              "CPU-time ratio is the figure that depends least on the load.", "",
              "## Every step", "", *_steps_table(sizes), "",
              "## Do the two Q4_K_M files agree?", ""]
    for r in sizes:
        lines.append(f"- {r['size_on_disk'] / GB:.2f} GB: {_comparison_line(r['comparison'])}")
    detailed = next((r for r in sizes if r["quantkit_from_llama_bf16"]), None)
    if detailed:
        c, rq = detailed["comparison"], detailed["quantkit_from_llama_bf16"]
        lines += ["", f"At {detailed['size_on_disk'] / GB:.2f} GB, quantkit requantizing llama.cpp's own BF16 GGUF "
                  f"(`quantkit convert BF16.gguf --to gguf:Q4_K_M`, {rq['seconds']:.1f} s, {rq['cpu_seconds']:.1f} s "
                  f"CPU) gives " + ("llama.cpp's Q4_K_M byte for byte: the encoders agree, and the tensors below "
                                     "differ only because llama.cpp's path rounds the FP8 x scale products to BF16 "
                                     "before quantizing, while quantkit quantizes the float32 products."
                                     if not c.get("requant_differ") else
                                     f"a file in which {len(c['requant_differ'])} tensors differ from llama.cpp's: "
                                     f"{', '.join(c['requant_differ'][:10])}."),
                  "The tensors that differ, against the float32 weights (FP8 x block scale):", "",
                  *_differences_table(c)]
    lines += ["", "## Verdicts", "", *_verdicts(report), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--convert-hf"]:  # step 1's worker: the rest is convert_hf_to_gguf.py's own command line
        print(json.dumps(_convert_hf(Path(argv[1]), argv[2:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", type=float, nargs=2, default=[1.3, 2.6], metavar=("SMALL", "LARGE"),
                        help="stored sizes of the two checkpoints in GB (default 1.3 2.6; nearest whole layer count)")
    parser.add_argument("--shards", type=int, default=4, help="safetensors shards per checkpoint (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="quantizing threads of both converters (default 2)")
    parser.add_argument("--workdir", type=Path, help="where to write checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the checkpoints; with --workdir a later run reuses them")
    parser.add_argument("--overrides", type=json.loads,
                        help="config overrides as JSON, e.g. '{\"n_routed_experts\": 8}', for a quick try of the "
                             "script (numbers not comparable to the defaults')")
    parser.add_argument("--out", type=Path, default=DEFAULT_JSON, help=f"JSON results (default {DEFAULT_JSON})")
    parser.add_argument("--md", type=Path, default=DEFAULT_MD, help=f"Markdown summary (default {DEFAULT_MD})")
    parser.add_argument("--llama-quantize", metavar="JOB", help=argparse.SUPPRESS)  # step 2's worker
    parser.add_argument("--compare", metavar="JOB", help=argparse.SUPPRESS)  # the byte comparison's worker
    args = parser.parse_args(argv)

    if args.llama_quantize:
        print(json.dumps(_llama_quantize(json.loads(args.llama_quantize))))
        return 0
    if args.compare:
        print(json.dumps(_compare(json.loads(args.compare))))
        return 0

    code = _git()  # before the runs: what they measure
    source = llama_cpp_source()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="quantkit-convert-memory-"))
    try:
        sizes = [_bench_size(size, workdir / f"fp8-{size:g}gb", args, source, detailed=i == 0)
                 for i, size in enumerate(args.sizes_gb)]
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    small, large = (r["quantkit"]["peak"] for r in sizes)
    tolerance = max(GROWTH_BYTES, GROWTH_FRACTION * small)
    growth = {"bytes": large - small, "tolerance_bytes": tolerance, "ok": large - small <= tolerance}
    llama_version = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                   stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    memory_pass = growth["ok"] and all(r["under_target"] for r in sizes)
    speed_pass = all(r["speed_goal_met"] for r in sizes)
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": shlex.join(["python", os.path.relpath(Path(__file__).resolve(), REPO), *argv]),
              "machine": _machine(), "git": code, "llama_cpp_version": llama_version,
              "llama_cpp_source": str(source), "pre_tokenizer_workaround": PRE_TOKENIZER, "threads": args.threads,
              "target_type": TARGET_TYPE, "growth_tolerance": {"bytes": GROWTH_BYTES, "fraction": GROWTH_FRACTION},
              "speedup_goal": SPEEDUP_GOAL, "sizes": sizes, "growth": growth, "memory_pass": memory_pass,
              "speed_pass": speed_pass, "pass": memory_pass and speed_pass}
    print()
    print("\n".join(_summary_table(sizes)))
    print("\n".join(_verdicts(report)))
    print(f"quantkit peak RSS under target and not growing with size: {'PASS' if memory_pass else 'FAIL'}; "
          f"llama.cpp's path >= {SPEEDUP_GOAL:g}x quantkit's time at both sizes: {'PASS' if speed_pass else 'FAIL'}")

    return write_results(report, _markdown(report), args.out, args.md)


if __name__ == "__main__":
    sys.exit(main())
