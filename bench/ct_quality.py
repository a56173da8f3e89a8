"""Quality vs bits of compressed-tensors outputs (issue 14): uniform W4 g128, the mix (attention W8, MLP W4 g128,
lm_head BF16 as in every ct output) and uniform W8, each with round-to-nearest, GPTQ and AWQ weights, on the
bundled models; and (issue 15) ct:auto / ct:auto-gptq at the size of uniform W4 g128 and of the mix, the same in
act-order (ct:w4g128-gptq-act, ct:auto-gptq-act: llm-compressor's GPTQ default), and the same for GPTQ folders
(gptq:w4g128, its mix as GPTQModel `dynamic`, gptq:auto at each one's size).

    python bench/ct_quality.py [--models tiny-llama,tiny-qwen2,tiny-deepseek] [--samples 32] [--ctx 256]
                               [--windows 128] [--eval-ctx 256] [--work /tmp/ct-quality] [--auto-only]

--auto-only adds the automatic variants and the GPTQ folders to the stored results (same eval settings) instead
of redoing the rest; --merge redoes every variant of --models only, the other models' results kept (each rerun
model records its commit).

Per model: one `quantkit convert` for the uniform variants (one calibration pass for all of them), one per mix
(`--tensor-type self_attn=w8`; AWQ, which quantizes in groups: `self_attn=w8g128`), then one `quantkit eval` of
every folder against the bundled source (KLD mean, top-1, PPL on --windows windows of --eval-ctx tokens of the
bundled held-out text; 256 by default: the bundled models were trained on 256-token windows, eval scores the second
half of each window, and at 512 every scored position would lie beyond what the models saw in training). Bits: the
decoder-layer linears' stored bits per weight (packed codes, scales, zero points; kept linears at 16) from each
output's plan, and llama.cpp's BPW over every tensor (embeddings and lm_head BF16 included, a large share in these
tiny models). Results: bench/results/ct_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peer_common import evaluate, fmt, quantkit_env, report_head, timed, write_results  # noqa: E402

from quantkit.bundled import resolve_model  # noqa: E402
from quantkit.convert import convert  # noqa: E402

METHODS = {"rtn": "", "gptq": "-gptq", "awq": "-awq"}
# variant -> (spec without the method flag, overrides); AWQ needs grouped schemes
LAYOUTS = {"W4 g128": ("w4g128", []), "mix: attention W8, MLP W4 g128": ("w4g128", ["self_attn=w8"]),
           "W8": ("w8", [])}
AWQ_LAYOUTS = {"W4 g128": ("w4g128", []), "mix: attention W8, MLP W4 g128": ("w4g128", ["self_attn=w8g128"]),
               "W8": ("w8g128", [])}


# automatic mixes at the size of a layout above: (layout name, the layout it is sized as, method -> spec)
AUTO = {"auto at W4 g128's size": "W4 g128", "auto at the mix's size": "mix: attention W8, MLP W4 g128"}
GPTQ_FOLDER = "gptq folder"  # GPTQ weights in a GPTQ (GPTQModel) folder rather than a compressed-tensors one
GPTQ_ACT = "gptq act"  # act-order GPTQ, static groups: llm-compressor's GPTQ default (actorder "weight")
AUTO_SPECS = {"rtn": "ct:auto", "gptq": "ct:auto-gptq", GPTQ_ACT: "ct:auto-gptq-act", GPTQ_FOLDER: "gptq:auto"}


def variants() -> list[tuple[str, str, str, list[str]]]:
    """(layout, method, spec, overrides) for every variant."""
    out = []
    for method, flag in METHODS.items():
        for layout, (spec, overrides) in (AWQ_LAYOUTS if method == "awq" else LAYOUTS).items():
            out.append((layout, method, f"ct:{spec}{flag}", overrides))
    return out


def linear_bpw(src: Path, spec: str, overrides: list[str]) -> float:
    ((_, plan),) = convert(src, [spec], None, dry_run=True, tensor_types=overrides)
    linears = [e for e in plan.entries if e.name.startswith("model.layers.") and len(e.shape) == 2
               and not e.name.endswith("mlp.gate.weight")]
    return 8 * sum(e.nbytes for e in linears) / sum(e.n_elements for e in linears)


def auto_variants(src: Path) -> list[tuple[str, str, str, list[str]]]:
    """(layout, method, spec, options): the GPTQ folders' own W4 g128 and mix and ct's act-order W4 g128 (the other
    ct ones are measured by run_model), and each AUTO layout at its reference's bpw over every tensor, in its own
    format."""
    out = [(layout, GPTQ_FOLDER, f"gptq:{spec}", overrides) for layout, (spec, overrides) in LAYOUTS.items()
           if layout in AUTO.values()]
    out.append(("W4 g128", GPTQ_ACT, "ct:w4g128-gptq-act", []))
    for layout, reference in AUTO.items():
        spec, overrides = LAYOUTS[reference]
        for method, auto in AUTO_SPECS.items():
            fmt = auto.split(":")[0]
            ((_, plan),) = convert(src, [f"{fmt}:{spec}"], None, dry_run=True, tensor_types=overrides)
            out.append((layout, method, auto, ["--target-bpw", f"{plan.bpw:.4f}"]))
    return out


def run_auto(name: str, args, report: dict) -> None:
    """The automatic variants: one convert per budget and method (one sensitivity measurement per model, reused),
    then one eval of them all."""
    src = resolve_model(name)
    work = args.work / name / "auto"
    work.mkdir(parents=True, exist_ok=True)
    calib = ["--calib-samples", str(args.samples), "--calib-ctx", str(args.ctx), "--device", "cpu"]
    folders, runs = {}, report["runs"].setdefault(name, [])
    for index, (layout, method, spec, options) in enumerate(auto_variants(src)):
        tag = method.replace(" ", "-")
        out = work / f"{index}-{tag}"
        # one stored measurement per method, reused by its second budget
        extra = ["--sensitivity", str(work / f"sensitivity-{tag}.json")] if "auto" in spec else []
        extra += options if "auto" in spec else [a for o in options for a in ("--tensor-type", o)]
        if options and "auto" not in spec:  # eval names variants by folder: the mix's must differ
            extra += ["--name", f"{src.name}-mix"]
        cmd = [sys.executable, "-m", "quantkit.cli", "convert", str(src), "--to", spec, "-o", str(out), "--force",
               *calib, *extra]
        r = timed(cmd, quantkit_env(), out.with_suffix(".log"))
        runs.append(r)
        print(f"{name}: {spec} {' '.join(options)}: {r['wall_s']:.0f} s (rc {r['rc']})", flush=True)
        if r["rc"]:
            raise SystemExit(f"convert failed: see {out.with_suffix('.log')}")
        [folder] = list(out.iterdir())
        folders[f"{method} | {layout}"] = (folder, layout, method, spec, options)
    quality = report["quality"].setdefault(name, {})
    measured: dict = {}
    if evaluate(src, {k: v[0] for k, v in folders.items()}, work / "eval", work / "eval.log", args.windows,
                measured, args.eval_ctx) is None:
        raise SystemExit(f"eval failed: {measured.get('error')}")
    eval_report = json.loads((work / "eval" / "report.json").read_text())
    by_path = {v["path"]: v for v in eval_report["variants"]}
    shapes = _linear_shapes(src)
    for key, (folder, layout, method, spec, options) in folders.items():
        auto = json.loads((folder / "quantkit_report.json").read_text()).get("auto")
        quality[key] = measured[key] | {"layout": layout, "method": method, "spec": spec, "overrides": options,
                                        "linear_bpw": _folder_linear_bits(folder, shapes) / sum(
                                            a * b for a, b in shapes.values()),
                                        "file_bpw": by_path[str(folder)]["bpw"],
                                        "predicted_kld": auto["predicted_kld"] if auto else None}


def _linear_shapes(src: Path) -> dict[str, tuple[int, int]]:
    ((_, plan),) = convert(src, ["ct:w8"], None, dry_run=True)
    return {e.name: e.shape for e in plan.entries if e.name.startswith("model.layers.") and len(e.shape) == 2
            and not e.name.endswith("mlp.gate.weight")}


def _folder_linear_bits(folder: Path, shapes: dict[str, tuple[int, int]]) -> int:
    """Stored bits of the decoder-layer linears in a written folder: every tensor of their modules (packed codes,
    scales, zero points, g_idx; a kept linear's BF16 weight)."""
    from quantkit.source.safetensors_file import SafetensorsFile

    modules = {n.removesuffix(".weight") for n in shapes}
    total = 0
    for path in folder.glob("*.safetensors"):
        file = SafetensorsFile(path)
        total += sum(8 * e.nbytes for name, e in file.entries.items() if name.rsplit(".", 1)[0] in modules)
        file.close()
    return total


def run_model(name: str, args, report: dict) -> None:
    src = resolve_model(name)
    work = args.work / name
    calib = ["--calib-samples", str(args.samples), "--calib-ctx", str(args.ctx), "--device", "cpu"]
    plain = [v for v in variants() if not v[3]]
    commands = [([t for _, _, spec, _ in plain for t in ("--to", spec)], work / "uniform", [])]
    commands += [(["--to", spec, "--name", f"{src.name}-mix"], work / f"mix-{method}", overrides)
                 for _, method, spec, overrides in variants() if overrides]
    work.mkdir(parents=True, exist_ok=True)
    runs = report["runs"].setdefault(name, [])
    for targets, out, overrides in commands:
        cmd = [sys.executable, "-m", "quantkit.cli", "convert", str(src), *targets, "-o", str(out), "--force", *calib,
               *[a for o in overrides for a in ("--tensor-type", o)]]
        r = timed(cmd, quantkit_env(), out.with_suffix(".log"))
        runs.append(r)
        print(f"{name}: {' '.join(targets + overrides)}: {r['wall_s']:.0f} s (rc {r['rc']})", flush=True)
        if r["rc"]:
            raise SystemExit(f"convert failed: see {out.with_suffix('.log')}")
    folders = {}
    for layout, method, spec, overrides in variants():
        stem = f"mix-{method}/{src.name}-mix" if overrides else f"uniform/{src.name}"
        folders[f"{method} | {layout}"] = work / f"{stem}-CT-{spec.removeprefix('ct:')}"
    quality = report["quality"].setdefault(name, {})
    settings = evaluate(src, folders, work / "eval", work / "eval.log", args.windows, quality, args.eval_ctx)
    if settings is None:
        raise SystemExit(f"eval failed: {quality.get('error')}")
    report["eval_settings"] = settings
    eval_report = json.loads((work / "eval" / "report.json").read_text())
    by_path = {v["path"]: v for v in eval_report["variants"]}
    for (layout, method, spec, overrides), (key, folder) in zip(variants(), folders.items(), strict=True):
        quality[key] |= {"layout": layout, "method": method, "spec": spec, "overrides": overrides,
                         "linear_bpw": linear_bpw(src, spec, overrides), "file_bpw": by_path[str(folder)]["bpw"]}


def markdown(report: dict) -> str:
    lines = ["# compressed-tensors and GPTQ folders: quality vs bits (uniform W4, the mix, uniform W8, automatic "
             "mixes; RTN, GPTQ, AWQ weights)", "",
             f"Date: {report['date']}  ", f"Commit: {report['commit']}  ",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; Python "
             f"{report['machine']['python']}, torch {report['machine']['torch']}  ", f"Command: `{report['command']}`",
             "", f"Calibration: {report['samples']} x {report['ctx']} tokens of the bundled calibration split (GPTQ "
             "and AWQ). Quality: `quantkit eval` against the bundled source on the bundled held-out text "
             f"({report['eval_settings'].get('windows')} windows of {report['eval_settings'].get('ctx')} tokens). "
             "Linear bpw: stored bits per weight of the decoder-layer linears (codes, scales: BF16 in ct folders, "
             "FP16 in GPTQ ones, zero points, GPTQ's g_idx); "
             "file bpw: llama.cpp's BPW over every tensor (BF16 embeddings and lm_head included).", ""]
    for model, quality in report["quality"].items():
        lines += [f"## {model} (baseline PPL {fmt(quality.get('baseline_ppl'), '{:.3f}')})", ""]
        if model in report.get("reruns", {}):
            rerun = report["reruns"][model]
            lines += [f"Rerun on its own: commit {rerun['commit']}, {rerun['date']}, `{rerun['command']}`.", ""]
        lines += ["| weights | layout | spec | linear bpw | file bpw | KLD mean | KLD p99 | top-1 % | PPL |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rows = sorted((v for k, v in quality.items() if isinstance(v, dict) and "layout" in v),
                      key=lambda v: (v["linear_bpw"], v["method"]))
        for v in rows:
            spec = v["spec"] + ("".join(f" --tensor-type {o}" for o in v["overrides"]) if "auto" not in v["spec"]
                                else " " + " ".join(v["overrides"]) + f" (predicted KLD {v['predicted_kld']:.5f})")
            lines.append(f"| {v['method']} | {v['layout']} | `{spec}` | {v['linear_bpw']:.2f} | {v['file_bpw']:.2f} | "
                         f"{v['kld_mean']:.5f} | {v['kld_p99']:.4f} | {v['top1_pct']:.2f} | {v['ppl']:.3f} |")
        lines.append("")
    lines += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny-llama,tiny-qwen2,tiny-deepseek")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--windows", type=int, default=128, help="eval windows per model")
    parser.add_argument("--eval-ctx", type=int, default=256, help="tokens per eval window")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ct-quality"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ct_quality")
    parser.add_argument("--note", action="append", default=[], help="a remark for the results (repeatable)")
    parser.add_argument("--auto-only", action="store_true",
                        help="add the automatic variants and GPTQ folders to the stored results")
    parser.add_argument("--merge", action="store_true",
                        help="redo --models in the stored results, keeping the other models'")
    args = parser.parse_args(argv)
    if args.merge:
        report = json.loads(args.out.with_suffix(".json").read_text())
        if report["eval_settings"].get("ctx") != args.eval_ctx:
            raise SystemExit(f"the stored results were evaluated at ctx {report['eval_settings'].get('ctx')}; "
                             "--merge needs the same --eval-ctx")
        for name in args.models.split(","):
            report["runs"].pop(name, None)
            report["quality"].pop(name, None)
            report.setdefault("reruns", {})[name] = report_head("ct_quality.py", argv)
        report["notes"] += args.note
    elif args.auto_only:
        report = json.loads(args.out.with_suffix(".json").read_text())
        if report["eval_settings"].get("ctx") != args.eval_ctx:
            raise SystemExit(f"the stored results were evaluated at ctx {report['eval_settings'].get('ctx')}; "
                             "--auto-only needs the same --eval-ctx")
        report["auto"] = report_head("ct_quality.py", argv)
        report["notes"] += args.note
    else:
        report = report_head("ct_quality.py", argv) | {"samples": args.samples, "ctx": args.ctx, "runs": {},
                                                       "quality": {}, "notes": args.note}
    for name in args.models.split(","):
        if not args.auto_only:  # --merge too
            run_model(name, args, report)
        run_auto(name, args, report)
    write_results(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
