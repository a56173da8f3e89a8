"""Issue 15's 4.0 bpw bar counted as EXL3 counts bits: automatic GGUF with its repeating layers at 4.0 bpw against
uniform Q4_K_M (imatrix), both with Q4_K_M's own token_embd and output types.

    python bench/layer_bpw.py [--models tiny-qwen2,tiny-llama,tiny-deepseek] [--layer-bpw 4.0,4.5]
                              [--windows 60] [--ctx 256] [--work /tmp/layer-bpw] [--report-only]

The bar ("at 4.0 bpw it matches or beats Q4_K_M with imatrix, the bar EXL3 sets with its own format") comes from
EXL3's comparisons, whose bpw is that of the decoder layers: exllamav3's eval/compare_q_llamacpp.py sums the bits
of every GGUF `.weight` tensor but token_embd and output over their elements and reports the head apart (ik_llama.cpp
prints the same "repeating layers" bpw; the quantization literature leaves embedding and head out too).
llama.cpp's own bpw (file bytes over all elements, the one bench/auto_quality.py and bench/gguf_gptq_quality.py
use) counts them, and on the bundled models token_embd and output (3072 x 256 each) are 20-40% of the elements.

Per model, one calibration for everything: the bundled llama-imatrix file as --imatrix, convert's defaults for the
sensitivity measurement (the proxy method) and the GPTQ pass. Q4_K_M is written first; its token_embd and output
types are then fixed (--token-embedding-type, --output-tensor-type) for gguf:auto and gguf:auto-gptq, whose
--target-bpw is the file bpw that leaves the repeating layers --layer-bpw (the head's and the other non-layer
tensors' bytes counted at Q4_K_M's). All scored by one `quantkit eval` (llama.cpp backend, held-out text, --ctx
tokens, --windows windows), as bench/auto_quality.py scores them. Where a model's Q4_K_M layers sit elsewhere than
DeepSeek-R1's (from the catalog's plans: tiny-deepseek's 4 layers put them at 5.03 bpw against R1's 4.82),
gguf:auto-gptq also runs as far below them as 4.0 is below R1's ("R1's gap").

Results: bench/results/layer_bpw.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from auto_quality import IMATRIX, MATCH, score_files  # noqa: E402
from gguf_gptq_quality import convert  # noqa: E402
from peer_common import model_bench_args, per_model_report, write_results  # noqa: E402

from quantkit.inspection import GGUF_HEAD as HEAD  # noqa: E402
from quantkit.inspection import gguf_bits, inspect_gguf  # noqa: E402

R1 = "deepseek-ai/DeepSeek-R1"
GAP_APART = 0.05  # a model whose Q4_K_M layers sit within this of R1's needs no run at R1's gap besides --layer-bpw
SPECS = ("auto", "auto-gptq")


def bit_split(path: Path) -> dict:
    """EXL3's accounting of a GGUF (quantkit.inspection.inspect_gguf): the repeating layers' bpw (every `.weight`
    but the head's), the head's types and bytes, the other tensors' bytes (biases, norms outside the layers' count),
    all elements."""
    r = inspect_gguf(path)
    head_bytes = sum(h["bytes"] for h in r["head"].values())
    return {"layer_bpw": r["bpw"]["repeating_layers"], "layer_elements": r["repeating_layers"]["elements"],
            "head_bytes": head_bytes, "head_types": {name: h["type"] for name, h in r["head"].items()},
            "other_bytes": r["tensor_bytes"] - r["repeating_layers"]["bytes"] - head_bytes, "elements": r["parameters"]}


def catalog_q4km() -> list[dict]:
    """Uniform Q4_K_M of every catalog model in both accountings (its plan, no weights): is a bundled model's
    Q4_K_M representative of the real ones'?"""
    from quantkit import catalog
    from quantkit.formats.gguf.format import model_facts
    from quantkit.formats.gguf.mixtures import plan_types
    from quantkit.formats.gguf.tensors import mapping_for

    rows = []
    for repo in catalog.names():
        model = catalog.load(repo)
        plan = plan_types({t.name: t.shape for t in mapping_for(model.arch).tensors()}, model_facts(model), "Q4_K_M")
        bits = gguf_bits((e.name, e.shape, e.nbytes, e.scheme) for e in plan.entries)
        rows.append({"repo": repo, "layer_bpw": bits["bpw"]["repeating_layers"], "file_bpw": bits["bpw"]["file"],
                     "head_share": 1 - bits["repeating_layers"]["elements"] / bits["parameters"]})
    return rows


def file_bpw_for(split: dict, layer_bpw: float) -> float:
    """The --target-bpw (tensor bytes x 8 over all elements) that leaves the repeating layers `layer_bpw`."""
    fixed_bits = 8 * (split["head_bytes"] + split["other_bytes"])
    return (fixed_bits + layer_bpw * split["layer_elements"]) / split["elements"]


def run(name: str, args, models: dict) -> None:
    m = models.setdefault(name, {})
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    imatrix = REPO / "tests" / "data" / "llama_imatrix" / IMATRIX[name]
    convert(name, ["gguf:Q4_K_M"], imatrix, work, [], work / "Q4_K_M.log")
    q4km = work / f"{name}-Q4_K_M.gguf"
    split = bit_split(q4km)
    heads = [a for flag, tensor in (("--token-embedding-type", "token_embd.weight"),
                                    ("--output-tensor-type", "output.weight")) if tensor in split["head_types"]
             for a in (flag, split["head_types"][tensor])]
    files = {"Q4_K_M (imatrix)": {"path": str(q4km), "kind": "uniform"}}
    m["commands"] = {}
    # R1's saving: where this model's Q4_K_M layers sit elsewhere than R1's, auto-gptq at the same distance below
    at_gap = split["layer_bpw"] - args.r1_gap
    runs = [(b, SPECS, f"{b:.1f}") for b in args.layer_bpw]
    if min(abs(at_gap - b) for b in args.layer_bpw) >= GAP_APART:
        runs.append((at_gap, ("auto-gptq",), f"{at_gap:.2f}, R1's gap"))
    for layer_bpw, specs, label in runs:
        target = float(f"{file_bpw_for(split, layer_bpw):.6f}")  # as given on the command line
        extra = ["--target-bpw", str(target), *heads]
        r = convert(name, [f"gguf:{s}" for s in specs], imatrix, work, extra, work / f"auto-{layer_bpw:.2f}.log")
        m["commands"][label] = r["command"]
        for spec in specs:
            files[f"{spec} (layers {label})"] = {
                "path": str(work / f"{name}-{spec}-{target:.2f}bpw.gguf"), "kind": spec, "layer_target": layer_bpw,
                "file_target": target}
    score_files(files, name, work, args, m)
    for f in files.values():
        f |= bit_split(Path(f["path"]))
    base = files["Q4_K_M (imatrix)"]
    m["verdicts"] = {key: {"mean_ratio": f["kld_mean"] / base["kld_mean"], "p99_ratio": f["kld_p99"] / base["kld_p99"],
                           "beats": f["kld_mean"] < base["kld_mean"] and f["kld_p99"] < base["kld_p99"],
                           "matches": f["kld_mean"] <= MATCH * base["kld_mean"]}
                     for key, f in files.items() if f["kind"] != "uniform"}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# The 4.0 bpw bar in EXL3's accounting: automatic GGUF's repeating layers at 4.0 bpw vs Q4_K_M\n",
             f"Date: {report['date']}  ", f"Commit: {report['commit']}  ", f"Machine: {report['machine']}  ",
             f"Command: `{report['command']}`\n",
             *(p.replace("\n", " ") + "\n" for p in __doc__.split("\n\n")[2:4]),
             f"Eval: {s['windows']} windows of {s['ctx']} tokens of the bundled held-out text, llama.cpp backend. "
             "layer bpw: EXL3's (repeating layers); file bpw: llama.cpp's (all tensors).\n"]
    for name, m in report["models"].items():
        lines += [f"## {name} (baseline PPL {m['baseline_ppl']:.3f})\n",
                  "| file | layer bpw | file bpw | token_embd / output | KLD mean | KLD p99 | top-1 % | PPL |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, f in m["files"].items():
            head = " / ".join(f["head_types"].get(t, "(tied)") for t in HEAD)
            lines.append(f"| {key} | {f['layer_bpw']:.3f} | {f['bpw']:.3f} | {head} | {f['kld_mean']:.5f} | "
                         f"{f['kld_p99']:.4f} | {f['top1_pct']:.2f} | {f['ppl']:.3f} |")
        lines.append("")
        base = m["files"]["Q4_K_M (imatrix)"]
        for key, v in m["verdicts"].items():
            lines.append(f"- {key} vs Q4_K_M (layers {base['layer_bpw']:.2f} bpw): mean KLD x{v['mean_ratio']:.2f}, "
                         f"p99 x{v['p99_ratio']:.2f}: beats on both **{'yes' if v['beats'] else 'no'}**, matches "
                         f"(mean within {MATCH - 1:.0%}) **{'yes' if v['matches'] else 'no'}**.")
        lines += [f"- command (layers {k}): `quantkit {_shown(c)}`" for k, c in m["commands"].items()]
        lines.append("")
    keys = list(dict.fromkeys(k for m in report["models"].values() for k in m["verdicts"]))
    lines += ["## Summary (mean KLD x, p99 x of Q4_K_M's; **bold**: beats it on both)\n",
              "| model | Q4_K_M layer bpw | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, m in report["models"].items():
        cells = ["—" if v is None else ("**{}**" if v["beats"] else "{}").format(
                 f"x{v['mean_ratio']:.2f}, x{v['p99_ratio']:.2f}") for v in (m["verdicts"].get(k) for k in keys)]
        lines.append(f"| {name} | {m['files']['Q4_K_M (imatrix)']['layer_bpw']:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["Uniform Q4_K_M of the catalog models in both accountings (arithmetic from their plans, no weights; "
              "head share: token_embd and output's part of all elements):\n",
              "| model | layer bpw | file bpw | head share |", "|---|---|---|---|"]
    lines += [f"| {r['repo'].split('/')[-1]} | {r['layer_bpw']:.3f} | {r['file_bpw']:.3f} | {r['head_share']:.1%} |"
              for r in report["catalog_q4km"]]
    lines.append("")
    lines += [f"- {n}" for n in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def _shown(command: str) -> str:
    """A convert command as a user types it, paths inside the repository relative."""
    return command.split(" -m quantkit.cli ", 1)[-1].replace(str(REPO) + "/", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_bench_args(parser, "/tmp/layer-bpw", "layer_bpw")
    parser.add_argument("--layer-bpw", default="4.0,4.5", help="the repeating layers' targets, comma-separated")
    args = parser.parse_args(argv)
    args.layer_bpw = [float(b) for b in args.layer_bpw.split(",")]
    settings = {"windows": args.windows, "ctx": args.ctx, "layer_bpw": args.layer_bpw}
    catalog_rows = catalog_q4km()  # arithmetic: recomputed on --report-only too
    args.r1_gap = next(r["layer_bpw"] for r in catalog_rows if r["repo"] == R1) - 4.0
    settings["r1_gap"] = args.r1_gap
    report = per_model_report(args, "layer_bpw.py", argv, settings, run)
    report["catalog_q4km"] = catalog_rows
    write_results(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
