"""gguf:auto's two sensitivity methods on the bundled models: `--sensitivity-method output` (every candidate type of
every tensor measured at the model output) vs `proxy` (each tensor's Q3_K measured there, its other types scaled by
how much they change their layer's output), for gguf:auto and gguf:auto-gptq. Same quality of mix for less
measurement? (issue 15: "cost").

    python bench/sensitivity_proxy.py [--models tiny-qwen2,tiny-llama,tiny-deepseek] [--bpw 4.0,4.5]
                                      [--windows 60] [--ctx 256] [--work /tmp/sensitivity-proxy]

Per model: the bundled llama-imatrix file as --imatrix, convert's default calibration for the measurement
(--sensitivity-samples 8 x --calib-ctx 512 of the bundled calibration split), each method measured afresh into
the work folder (its wall time is the measurement's own, Sensitivity.seconds). gguf:auto and gguf:auto-gptq files
(each spec measures its own candidates) from each measurement at every --bpw and at uniform Q4_K_M's own bpw, plus
Q4_K_M itself; all scored by one `quantkit eval`
(llama.cpp backend, held-out text, --ctx tokens, --windows windows), as bench/auto_quality.py scores them.
Predicted KLD: the file's quantize.auto.predicted_kld (its measurement's summed costs).

Extrapolation (arithmetic from the catalog configs, no run): each method's layer-forwards, CPU and GPU hours for
catalog models, by bench/auto_quality.py's extrapolation (output: per candidate, its layer and every later one;
proxy: the anchors so, every other candidate its own layer; both: the float pass, 2 x layers; the head's passes
counted apart) at the rates it measured (its results).

Results: bench/results/sensitivity_proxy.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from auto_quality import (  # noqa: E402
    EXTRAPOLATE,
    IMATRIX,
    SENS_CTX,
    SENS_SAMPLES,
    _geomean,
    extrapolate,
    score_files,
)
from peer_common import fmt, model_bench_args, per_model_report, write_results  # noqa: E402

METHODS = ("output", "proxy")
AUTO_QUALITY = REPO / "bench" / "results" / "auto_quality.json"  # the CPU matmul and codec rates it measured
SPECS = ("auto", "auto-gptq")


def run_model(name: str, args, result: dict) -> None:
    from quantkit.bundled import resolve_model
    from quantkit.convert import convert
    from quantkit.plan.allocate import Budget
    from quantkit.source.gguf_file import GGUFFile

    src = resolve_model(name)
    imatrix = REPO / "tests" / "data" / "llama_imatrix" / IMATRIX[name]
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    m = result.setdefault(name, {"imatrix": str(imatrix.relative_to(REPO)), "measure_s": {}})
    ((q4km, ladder),) = convert(src, ["gguf:Q4_K_M"], work / "ladder", imatrix=imatrix, force=True)
    files = {"Q4_K_M (imatrix)": {"method": None, "path": str(q4km)}}
    budgets = sorted({*args.bpw, ladder.bpw})
    for spec in SPECS:
        for method in METHODS:
            sens = work / f"{spec}-{method}.sensitivity.json"
            sens.unlink(missing_ok=True)  # measured afresh: its time is part of the result
            for bpw in budgets:
                ((path, plan),) = convert(src, [f"gguf:{spec}"], work / method, imatrix=imatrix, sensitivity=sens,
                                          sensitivity_method=method, budget=Budget(bpw=bpw), force=True)
                named = path.with_name(f"{path.stem}-{method}.gguf")  # both methods name their files alike
                path.rename(named)
                label = "Q4_K_M's" if bpw == ladder.bpw else f"{bpw:.2f}"
                files[f"{spec} {method} {label}"] = {
                    "spec": spec, "method": method, "label": label, "target_bpw": bpw, "path": str(named),
                    "predicted_kld": GGUFFile(named).metadata("quantize.auto.predicted_kld")}
            m["measure_s"][f"{spec} {method}"] = json.loads(sens.read_text())["seconds"]
            print(f"{name}: {spec} {method} measurement {m['measure_s'][f'{spec} {method}']:.0f} s", flush=True)
    score_files(files, src, work, args, m)


def extrapolation(repo: str, rates: dict) -> dict:
    """Each method's layer-forwards, forward and encode hours for a catalog model: bench/auto_quality.py's
    extrapolation (the head's passes counted apart), at the CPU matmul and codec rates it measured (`rates`: its
    results' extrapolation)."""
    tokens, ctx = SENS_SAMPLES * SENS_CTX, SENS_CTX
    runs = {method: extrapolate(repo, rates["codec_eps"], rates["cpu_flops"], tokens, ctx, method)
            for method in METHODS}
    return {"repo": repo, "layers": runs["output"]["layers"],
            **{method: e["layer_forwards"] for method, e in runs.items()},
            "ratio": runs["output"]["layer_forwards"] / runs["proxy"]["layer_forwards"],
            "hours": {method: {k: e[k] for k in ("forward_flops", "cpu_forward_h", "cpu_encode_h", "gpu_forward_h")}
                      for method, e in runs.items()}}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# gguf:auto's sensitivity methods: output vs proxy\n",
             f"Date: {report['date']}  ", f"Commit: {report['commit']}  ",
             f"Machine: {report['machine']}  ", f"Command: `{report['command']}`\n",
             __doc__.split("\n\n")[2].replace("\n", " ") + "\n",
             f"Eval: {s['windows']} windows of {s['ctx']} tokens of the bundled held-out text, llama.cpp backend.\n"]
    for name, m in report["models"].items():
        lines.append(f"## {name} (baseline PPL {m['baseline_ppl']:.3f})\n")
        for spec in SPECS:
            t = m["measure_s"]
            lines += [f"gguf:{spec}: measurement output {t[f'{spec} output']:.0f} s, proxy {t[f'{spec} proxy']:.0f} s "
                      f"(x{t[f'{spec} output'] / t[f'{spec} proxy']:.1f} faster).\n",
                      "| budget | output: KLD mean | p99 | measured / predicted | proxy: KLD mean | p99 | "
                      "measured / predicted | proxy / output (mean) | bpw |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for pair in _pairs(m["files"], spec):
                o, p = pair["output"], pair["proxy"]
                lines.append(f"| {o['label']} | {o['kld_mean']:.5f} | {o['kld_p99']:.4f} | "
                             f"{o['kld_mean'] / o['predicted_kld']:.2f} | {p['kld_mean']:.5f} | {p['kld_p99']:.4f} | "
                             f"{p['kld_mean'] / p['predicted_kld']:.2f} | {p['kld_mean'] / o['kld_mean']:.2f} | "
                             f"{p['bpw']:.3f} |")
            lines.append("")
        q = m["files"]["Q4_K_M (imatrix)"]
        lines.append(f"Uniform Q4_K_M (imatrix): {q['bpw']:.3f} bpw, KLD mean {q['kld_mean']:.5f}, "
                     f"p99 {q['kld_p99']:.4f}.\n")
    lines.append("## Summary\n")
    for spec in SPECS:
        ratios = [pair["proxy"]["kld_mean"] / pair["output"]["kld_mean"]
                  for m in report["models"].values() for pair in _pairs(m["files"], spec)]
        lines += [f"- gguf:{spec}: proxy / output mean KLD over {len(ratios)} files: {min(ratios):.2f} .. "
                  f"{max(ratios):.2f} (geometric mean {fmt(_geomean(ratios), '{:.3f}')}); measurement time, output / "
                  "proxy: " + ", ".join(f"{n} x{m['measure_s'][f'{spec} output'] / m['measure_s'][f'{spec} proxy']:.1f}"
                                        for n, m in report["models"].items()) + "."]
    lines += ["",
              "Extrapolated layer-forwards (forward work, bench/auto_quality.py's count: the head's passes apart; the "
              "encoding of every candidate is the same in both):\n",
              "| model | layers | output method | proxy method | ratio |", "|---|---|---|---|---|"]
    for e in report["extrapolation"]:
        lines.append(f"| {e['repo'].split('/')[-1]} | {e['layers']} | {e['output']:,} | {e['proxy']:,} | "
                     f"x{e['ratio']:.1f} |")
    if "extrapolation_rates" in report:
        r = report["extrapolation_rates"]
        lines += ["", f"Extrapolated hours (arithmetic, not a run): bench/auto_quality.py's extrapolation with each "
                  f"method's forward work, at the rates it measured on this CPU ({r['from']}, commit {r['commit']}: "
                  f"torch.mm float32 {r['cpu_flops'] / 1e9:.1f} GFLOP/s on 2 threads, the codecs' per-type throughput "
                  f"with the imatrix); GPU: the forward FLOPs at an assumed {r['gpu_flops_assumed'] / 1e12:.1f} "
                  "TFLOP/s float32, no GPU measured, encoding not included.\n",
                  "| model | method | forward PFLOP | CPU forward h | CPU encode h | CPU total h | GPU forward h |",
                  "|---|---|---|---|---|---|---|"]
        for e in report["extrapolation"]:
            for method, h in e["hours"].items():
                lines.append(f"| {e['repo'].split('/')[-1]} | {method} | {h['forward_flops'] / 1e15:.1f} | "
                             f"{h['cpu_forward_h']:,.1f} | {h['cpu_encode_h']:,.1f} | "
                             f"{h['cpu_forward_h'] + h['cpu_encode_h']:,.1f} | {h['gpu_forward_h']:.2f} |")
        lines.append("")
    lines += [f"- {n}" for n in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def _pairs(files: dict, spec: str) -> list[dict]:
    """The output and proxy files of one spec at each budget."""
    by = {(v["method"], v["label"]): v for v in files.values() if v.get("spec") == spec}
    return [{"output": by["output", label], "proxy": by["proxy", label]}
            for label in dict.fromkeys(label for _, label in by)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_bench_args(parser, "/tmp/sensitivity-proxy", "sensitivity_proxy")
    parser.add_argument("--bpw", default="4.0,4.5")
    args = parser.parse_args(argv)
    args.bpw = [float(b) for b in args.bpw.split(",")]
    settings = {"windows": args.windows, "ctx": args.ctx, "bpw": args.bpw}
    report = per_model_report(args, "sensitivity_proxy.py", argv, settings, run_model)
    measured = json.loads(AUTO_QUALITY.read_text())  # arithmetic from its rates: recomputed on --report-only too
    rates = measured["extrapolation"]
    report["extrapolation"] = [extrapolation(repo, rates) for repo in EXTRAPOLATE]
    report["extrapolation_rates"] = {"from": str(AUTO_QUALITY.relative_to(REPO)), "commit": measured["commit"],
                                     "cpu_flops": rates["cpu_flops"], "gpu_flops_assumed": rates["gpu_flops_assumed"]}
    write_results(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
