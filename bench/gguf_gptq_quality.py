"""GPTQ inside ggml's blocks (`--to gguf:TYPE-gptq`, `gguf:auto-gptq`) against llama-quantize's encoding of the
same types (issue 15's bar: automatic GGUF at <= 4.5 bpw beats uniform Q4_K_M with imatrix; at 4.0 matches it).

    python bench/gguf_gptq_quality.py [--models tiny-qwen2,tiny-llama,tiny-deepseek] [--bpw 4.0,4.5]
                                      [--windows 60] [--ctx 256] [--work /tmp/gguf-gptq] [--report-only]

Per model, one calibration for everything: the bundled llama-imatrix file as --imatrix of every output, convert's
default calibration (the bundled calibration split, 128 x 512 tokens) for the GPTQ pass, and one sensitivity
measurement (convert's defaults) per candidate set: gguf:auto's with the writer's encoding (and, on MoE models, the
grid i-quants), gguf:auto-gptq's with each candidate encoded as the -gptq pass encodes it (GPTQ from the Hessian
of the layer's float inputs on the GPTQ pass's calibration samples), so the two files of a budget have their own
per-tensor types. Outputs: Q4_K_M and IQ4_XS with and without -gptq, and gguf:auto / gguf:auto-gptq at each --bpw.
All scored by one `quantkit eval` (llama.cpp backend) against the bundled source on the bundled held-out text, as
bench/auto_quality.py does.

Results: bench/results/gguf_gptq_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from auto_quality import IMATRIX, MATCH, score_files  # noqa: E402
from peer_common import fmt, quantkit_env, report_head, timed  # noqa: E402

UNIFORM = ("Q4_K_M", "IQ4_XS")


def convert(src: str, targets: list[str], imatrix: Path, out: Path, extra: list[str], log: Path) -> dict:
    r = timed([sys.executable, "-m", "quantkit.cli", "convert", src, *(a for t in targets for a in ("--to", t)),
               "--imatrix", str(imatrix), "-o", str(out), "--force", *extra], quantkit_env(), log)
    if r["rc"]:
        raise SystemExit(f"convert failed: {r.get('error')} (see {log})")
    return r


def run(name: str, args, m: dict) -> None:
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    imatrix = REPO / "tests" / "data" / "llama_imatrix" / IMATRIX[name]
    files, times = {}, {}
    for t in UNIFORM:  # apart, so each -gptq file's time is its own
        for spec in (t, f"{t}-gptq"):
            times[spec] = convert(name, [f"gguf:{spec}"], imatrix, work, [], work / f"{spec}.log")["wall_s"]
            files[spec] = {"path": str(work / f"{name}-{spec}.gguf"), "kind": "gptq" if "gptq" in spec else "plain"}
    for bpw in args.bpw:
        label = f"{bpw:.2f}bpw"
        r = convert(name, ["gguf:auto", "gguf:auto-gptq"], imatrix, work,
                    ["--target-bpw", str(bpw), "--sensitivity-method", "output"],
                    work / f"auto-{label}.log")
        times[f"auto {label} + auto-gptq {label}"] = r["wall_s"]
        files[f"auto {bpw:.1f}"] = {"path": str(work / f"{name}-auto-{label}.gguf"), "kind": "plain"}
        files[f"auto-gptq {bpw:.1f}"] = {"path": str(work / f"{name}-auto-gptq-{label}.gguf"), "kind": "gptq"}
    m["convert_s"] = times
    score_files(files, name, work, args, m)


def verdicts(files: dict, bpws: list[float]) -> dict:
    base = files["Q4_K_M"]
    out = {}
    for bpw in bpws:
        f = files[f"auto-gptq {bpw:.1f}"]
        mean, p99 = f["kld_mean"] / base["kld_mean"], f["kld_p99"] / base["kld_p99"]
        out[f"{bpw:.1f}"] = {"mean_ratio": mean, "p99_ratio": p99, "beats": mean < 1 and p99 < 1,
                             "matches": mean <= MATCH}
    return out


def markdown(report: dict) -> str:
    lines = ["# GPTQ inside ggml's blocks vs llama-quantize's encoding", "",
             f"Date: {report['date']}  ", f"Commit: {report['commit']}  ", f"Machine: {report['machine']}  ",
             f"Command: `{report['command']}`", "", __doc__.split("\n\n", 2)[2].rsplit("\n\nResults", 1)[0], ""]
    for name, m in report["models"].items():
        s = m["eval_settings"]
        lines += [f"## {name} (baseline PPL {m['baseline_ppl']:.3f}; {s['windows']} windows of {s['ctx']} tokens; "
                  f"commit {m['commit']}, {m['date']})", "",
                  "| file | bpw | KLD mean | KLD p99 | top-1 % | PPL |", "|---|---|---|---|---|---|"]
        for key, f in m["files"].items():
            bold = "**" if f["kind"] == "gptq" else ""
            lines.append(f"| {bold}{key}{bold} | {f['bpw']:.3f} | {f['kld_mean']:.5f} | {f['kld_p99']:.4f} | "
                         f"{f['top1_pct']:.2f} | {f['ppl']:.3f} |")
        lines.append("")
        for t in UNIFORM:
            plain, gptq = m["files"][t], m["files"][f"{t}-gptq"]
            lines.append(f"- {t}: -gptq's mean KLD x{gptq['kld_mean'] / plain['kld_mean']:.2f}, p99 "
                         f"x{gptq['kld_p99'] / plain['kld_p99']:.2f} of llama-quantize's (same types, same imatrix).")
        for bpw, v in m["verdicts"].items():
            lines.append(f"- auto-gptq {bpw} bpw vs Q4_K_M (imatrix, {m['files']['Q4_K_M']['bpw']:.2f} bpw): mean KLD "
                         f"x{v['mean_ratio']:.2f}, p99 x{v['p99_ratio']:.2f}: beats on both **"
                         f"{'yes' if v['beats'] else 'no'}**, matches (mean within {MATCH - 1:.0%}) "
                         f"**{'yes' if v['matches'] else 'no'}**.")
        lines.append("- convert wall time (s, shared machine): " + ", ".join(
            f"{k} {fmt(v, '{:.0f}')}" for k, v in m["convert_s"].items()))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny-qwen2,tiny-llama,tiny-deepseek")
    p.add_argument("--bpw", default="4.0,4.5")
    p.add_argument("--windows", type=int, default=60)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--work", default="/tmp/gguf-gptq")
    p.add_argument("--report-only", action="store_true", help="render the stored JSON again")
    args = p.parse_args(argv)
    args.bpw = [float(b) for b in args.bpw.split(",")]
    results = REPO / "bench" / "results"
    store = results / "gguf_gptq_quality.json"
    if args.report_only:
        report = json.loads(store.read_text())
    else:
        report = report_head("gguf_gptq_quality.py", argv)
        # models not run this time keep their stored results (each model records its own commit and date)
        report["models"] = json.loads(store.read_text())["models"] if store.is_file() else {}
        for name in args.models.split(","):
            m = report["models"][name] = {"commit": report["commit"], "date": report["date"]}
            run(name, args, m)
            m["verdicts"] = verdicts(m["files"], args.bpw)
            store.write_text(json.dumps(report, indent=1))
    (results / "gguf_gptq_quality.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
