"""Peak memory of `quantkit convert --to gptq:w4g128` (GPTQ with calibration; --spec for another layerwise spec,
e.g. awq:w4g128) from a DeepSeek-V3-shaped FP8 checkpoint, at two model sizes (issue 12: peak <= 1 GiB + one
decoder layer in float32 + the calibration activations, flat in the model's size).

The checkpoints are convert_memory.py's (read_memory.py's DeepSeek-V3-shaped block-FP8 one, 4 shards, the
bundled tiny-deepseek's tokenizer): the same per-layer shapes at both sizes, more layers in the larger.
--experts and --dense-layers change its routed expert count and first_k_dense_replace, so that a run fits a
small machine's time (GPTQ on CPU costs minutes per MoE layer); the per-layer shapes stay those of one
checkpoint for both sizes. For each size, each command in a fresh process:

* `python -m quantkit.cli convert FOLDER --to SPEC -o OUT --device cpu --threads T --calib-samples S
  --calib-ctx L` (bundled calibration text). Peak = the larger of its ru_maxrss (os.wait4) and its sampled
  process-tree PSS; RssAnon / RssFile are sampled every 0.1 s to tell heap from mapped file pages.
* the same command with --dry-run (imports, opens the checkpoint, plans; no calibration): the baseline.

Target per size: 1 GiB + the largest decoder layer's weights in float32 (quantkit holds one layer's weights,
dequantized, while it calibrates and quantizes it) + ACTIVATION_COPIES x S x L x hidden x 4 bytes of hidden
states. ACTIVATION_COPIES = 4, from quantkit/calib (engine.CalibrationRun, gptq.gptq_layers): while a MoE layer's
experts are quantized, the layer's inputs (CalibrationRun.hidden), its float outputs, the router inputs kept
for the experts' Hessians and their concatenation (`tokens`) are alive; at the quantized re-run, inputs, float
outputs and quantized outputs. Per-sample intermediates of the forward (batch 1) are small next to these.
Other specs (--spec) are held to the same target.
PASS when both sizes are under target and the larger's peak exceeds the smaller's by at most max(64 MiB, 10%);
the exit status is 1 otherwise. Results go to bench/results/FORMAT_memory.{json,md} (FORMAT: the spec's, e.g.
gptq_memory, awq_memory) unless --out / --md say otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

# Stdlib only in the driver (read_memory explains why: an exec'd child starts from its parent's ru_maxrss).
from convert_memory import GROWTH_BYTES, GROWTH_FRACTION, TOKENIZER, _git, _run
from read_memory import GB, REPO, GiB, MiB, _describe_checkpoint, _machine, _prepare, write_results

SPEC = "gptq:w4g128"
ACTIVATION_COPIES = 4


def _layer_bytes(folder: str) -> dict:
    """Worker: float32 bytes of each decoder layer's weights, and the hidden size."""
    from quantkit.source import open_checkpoint

    ckpt = open_checkpoint(folder)
    sizes: dict[int, int] = {}
    for info in ckpt.tensors():
        if info.name.startswith("model.layers."):
            layer = int(info.name.split(".")[2])
            sizes[layer] = sizes.get(layer, 0) + 4 * info.numel
    return {"layer_float32_bytes": [sizes[i] for i in sorted(sizes)]}


def _format(spec: str) -> str:
    """The spec's format: "gptq" for gptq:w4g128; it names the result files and the per-size result key."""
    return spec.split(":")[0]


def _cli(folder: Path, out: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli", "convert", str(folder), "--to", args.spec, "-o", str(out),
            "--device", "cpu", "--threads", str(args.threads), "--calib-samples", str(args.calib_samples),
            "--calib-ctx", str(args.calib_ctx), *extra]


def _bench_size(size_gb: float, folder: Path, args: argparse.Namespace) -> dict:
    overrides = {"n_routed_experts": args.experts, "first_k_dense_replace": args.dense_layers}
    job = {"folder": str(folder), "kind": "fp8", "size_gb": size_gb, "shards": args.shards, "overrides": overrides}
    print(f"[{size_gb:g} GB] preparing under {folder}", flush=True)
    generate_seconds = _prepare(folder, job)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    info = _describe_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    layers = _run([sys.executable, str(Path(__file__).resolve()), "--layer-bytes", str(folder)])
    layer_bytes = json.loads(layers["stdout"].splitlines()[-1])["layer_float32_bytes"]
    activations = args.calib_samples * args.calib_ctx * config["hidden_size"] * 4
    target = GiB + max(layer_bytes) + ACTIVATION_COPIES * activations
    print(f"[{size_gb:g} GB] {info['size_on_disk'] / GB:.2f} GB on disk, {info['num_hidden_layers']} layers, largest "
          f"layer {max(layer_bytes) / MiB:.0f} MiB float32 (generated in {generate_seconds:.0f} s)", flush=True)

    key = _format(args.spec)
    out = folder.parent / f"{key}-out"
    try:
        baseline = _run(_cli(folder, out, args, "--dry-run"))
        shutil.rmtree(out, ignore_errors=True)
        result = _run(_cli(folder, out, args))  # the spec's run
        result.update(baseline_rss=baseline["peak"], peak_above_baseline=result["peak"] - baseline["peak"],
                      output_bytes=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()))
    finally:
        for path in (out, out.with_name(out.name + ".part")):
            shutil.rmtree(path, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"[{size_gb:g} GB] peak {result['peak'] / MiB:.0f} MiB (baseline {baseline['peak'] / MiB:.0f}; ru_maxrss "
          f"{result['peak_rss'] / MiB:.0f}, tree PSS {result['sampled_tree_pss'] / MiB:.0f}, anon "
          f"{result['sampled_rss_anon'] / MiB:.0f}, file {result['sampled_rss_file'] / MiB:.0f}) target "
          f"{target / MiB:.0f} MiB; {result['seconds']:.0f} s ({result['cpu_seconds']:.0f} s CPU, load "
          f"{result['load_avg_1min']:.1f})", flush=True)
    return {"requested_gb": size_gb, "generate_seconds": generate_seconds, **info, "overrides": overrides,
            "hidden_size": config["hidden_size"], "moe_intermediate_size": config["moe_intermediate_size"],
            "layer_float32_bytes": layer_bytes, "activation_bytes": activations, "target_bytes": target,
            "baseline": baseline, key: result, "under_target": result["peak"] <= target}


def _markdown(report: dict) -> str:
    m, sizes, spec = report["machine"], report["sizes"], report["spec"]
    first, s, key = sizes[0], report["settings"], _format(spec)
    loads = [r[key]["load_avg_1min"] for r in sizes]
    lines = [
        f"# FP8 checkpoint -> {key.upper()} {spec.split(':', 1)[1]} (calibrated): peak memory", "",
        f"Date: {report['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / GiB:.0f} GiB RAM, Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']}  ",
        f"Command: `{report['command']}`  ",
        f"Code: commit {report['git']['commit']}"
        + (f" with uncommitted changes to {', '.join(report['git']['modified'])}" if report["git"]["modified"] else "")
        + "  ",
        f"One run per measurement; 1-min load average at the starts {min(loads):.1f}-{max(loads):.1f} on "
        f"{m['cores']} cores", "",
        f"quantkit: `python -m quantkit.cli convert FOLDER --to {spec} -o OUT --device cpu --threads {s['threads']} "
        f"--calib-samples {s['calib_samples']} --calib-ctx {s['calib_ctx']}` (bundled calibration text) in a fresh "
        "process; peak = max(`ru_maxrss`, sampled process-tree PSS); baseline = the same command with `--dry-run`. "
        "Anon / file RSS sampled every 0.1 s (lower bounds of their peaks).", "",
        f"Checkpoints: read_memory.py's DeepSeek-V3-shaped block-FP8 one (hidden {first['hidden_size']}, "
        f"{s['experts']} routed experts of {first['moe_intermediate_size']}, first_k_dense_replace "
        f"{s['dense_layers']}), {first['shards']} shards, the same per-layer shapes at both sizes. Target = 1 GiB + "
        f"largest layer in float32 ({max(first['layer_float32_bytes']) / MiB:.0f} MiB) + {ACTIVATION_COPIES} x "
        f"{s['calib_samples']} x {s['calib_ctx']} x hidden x 4 B of hidden states "
        f"({ACTIVATION_COPIES * first['activation_bytes'] / MiB:.0f} MiB) = {first['target_bytes'] / MiB:.0f} MiB.",
        "", "| checkpoint | peak | baseline | above baseline | ru_maxrss / tree PSS | sampled anon / file RSS | "
        "target | time | CPU time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sizes:
        g = r[key]
        lines.append(f"| {r['size_on_disk'] / GB:.2f} GB, {r['num_hidden_layers']} layers | "
                     f"{g['peak'] / MiB:.0f} MiB | {g['baseline_rss'] / MiB:.0f} MiB | "
                     f"{g['peak_above_baseline'] / MiB:.0f} MiB | "
                     f"{g['peak_rss'] / MiB:.0f} / {g['sampled_tree_pss'] / MiB:.0f} MiB | "
                     f"{g['sampled_rss_anon'] / MiB:.0f} / {g['sampled_rss_file'] / MiB:.0f} MiB | "
                     f"{r['target_bytes'] / MiB:.0f} MiB | {g['seconds']:.0f} s | {g['cpu_seconds']:.0f} s |")
    lines += ["", *_verdicts(report), ""]
    return "\n".join(lines)


def _verdicts(report: dict) -> list[str]:
    lines = []
    for r in report["sizes"]:
        peak, target = r[_format(report["spec"])]["peak"], r["target_bytes"]
        lines.append(f"- {r['size_on_disk'] / GB:.2f} GB: peak {peak / MiB:.0f} MiB "
                     f"{'<=' if r['under_target'] else '>'} target {target / MiB:.0f} MiB "
                     f"({peak / max(r['layer_float32_bytes']):.2f}x the largest float32 layer): "
                     f"{'PASS' if r['under_target'] else 'FAIL'}")
    g = report["growth"]
    lines.append(f"- growth of the peak from the smaller to the larger checkpoint: {g['bytes'] / MiB:+.0f} MiB "
                 f"(tolerance {g['tolerance_bytes'] / MiB:.0f} MiB): {'PASS' if g['ok'] else 'FAIL'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=SPEC, help=f"layerwise spec to convert to (default {SPEC}; e.g. awq:w4g128)")
    parser.add_argument("--sizes-gb", type=float, nargs=2, default=[1.3, 2.6], metavar=("SMALL", "LARGE"),
                        help="stored sizes of the two checkpoints in GB (default 1.3 2.6; nearest whole layer count)")
    parser.add_argument("--experts", type=int, default=64,
                        help="routed experts per MoE layer (default 64, convert_memory's checkpoint)")
    parser.add_argument("--dense-layers", type=int, default=1, help="first_k_dense_replace (default 1)")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration samples (default 16)")
    parser.add_argument("--calib-ctx", type=int, default=256, help="tokens per sample (default 256)")
    parser.add_argument("--shards", type=int, default=4, help="safetensors shards per checkpoint (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="quantkit's --threads (default 2)")
    parser.add_argument("--workdir", type=Path, help="where to write checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the checkpoints; with --workdir a later run reuses them")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/FORMAT_memory.json, FORMAT the "
                        "spec's: gptq_memory.json for gptq:w4g128)")
    parser.add_argument("--md", type=Path, help="Markdown summary (default bench/results/FORMAT_memory.md)")
    parser.add_argument("--layer-bytes", metavar="FOLDER", help=argparse.SUPPRESS)  # the worker
    args = parser.parse_args(argv)

    if args.layer_bytes:
        print(json.dumps(_layer_bytes(args.layer_bytes)))
        return 0

    key = _format(args.spec)
    args.out = args.out or REPO / "bench" / "results" / f"{key}_memory.json"
    args.md = args.md or REPO / "bench" / "results" / f"{key}_memory.md"
    code = _git()  # before the runs: what they measure
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"quantkit-{key}-memory-"))
    try:
        sizes = [_bench_size(size, workdir / f"fp8-{size:g}gb", args) for size in args.sizes_gb]
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    small, large = (r[key]["peak"] for r in sizes)
    tolerance = max(GROWTH_BYTES, GROWTH_FRACTION * small)
    growth = {"bytes": large - small, "tolerance_bytes": tolerance, "ok": large - small <= tolerance}
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": shlex.join(["python", os.path.relpath(Path(__file__).resolve(), REPO), *sys.argv[1:]]),
              "machine": _machine(), "git": code, "spec": args.spec,
              "settings": {k: getattr(args, k) for k in ("experts", "dense_layers", "calib_samples", "calib_ctx",
                                                         "threads")},
              "activation_copies": ACTIVATION_COPIES,
              "growth_tolerance": {"bytes": GROWTH_BYTES, "fraction": GROWTH_FRACTION},
              "sizes": sizes, "growth": growth, "pass": growth["ok"] and all(r["under_target"] for r in sizes)}
    print("\n".join(_verdicts(report)))
    print(f"{key.upper()} peak RSS under target and not growing with size: {'PASS' if report['pass'] else 'FAIL'}")
    return write_results(report, _markdown(report), args.out, args.md)


if __name__ == "__main__":
    sys.exit(main())
