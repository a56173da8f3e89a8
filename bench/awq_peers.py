"""AWQ quality and speed: quantkit vs AutoAWQ, GPTQModel and llm-compressor (issue 13), same tokens, settings and
machine.

    python bench/awq_peers.py [--models tiny-llama,tiny-qwen2,tiny-deepseek] [--groups 128,32]
                              [--autoawq-groups 128] [--samples 32] [--ctx 256] [--windows 64] [--work /tmp/awq-peers]

For each bundled model and each W4 group size (asymmetric with zero points, AutoAWQ's GEMM layout and defaults:
duo scaling, 20-point scale grid, clip search):

* calibration: the same token ids as bench/gptq_peers.py (quantkit.calib.data.calibration_samples on the bundled
  calibration split); quantkit computes them itself, the peers get them as lists;
* quantkit: `python -m quantkit.cli convert MODEL --to awq:w4g{G} --calib-samples N --calib-ctx L --device cpu
  --threads 2` from the bundled folder (tiny-deepseek: straight from its FP8 weights), defaults otherwise
  (quantized outputs propagated to the next layer);
* RTN: the same command with `awq:w4g{G}-rtn` (the same asymmetric group quantization, no scales or clipping);
* AutoAWQ 0.2.9, GPTQModel 7.7.0 and llm-compressor 0.14.0.1 (bench/peers/*_awq.py) in their cached venvs
  (tests/interop/envs/build_env.sh), from the bundled folder or, for tiny-deepseek, the float32 copy
  bench/peer_common.py writes; each driver says what was set to match. AutoAWQ's env file comes from the repo, or
  while it is only on branch awq-consumers, from that branch into --work (its venv cached there too). AutoAWQ is
  slow on CPU: it runs at --autoawq-groups only.

Quality: `quantkit eval` of every output against the bundled source (KLD mean, top-1, PPL on --windows windows of
512 tokens of the bundled held-out text, MC off). AWQ folders (quantkit, AutoAWQ, GPTQModel) are read as such;
llm-compressor's compressed-tensors output through the float32 folder its driver writes from the same in-memory
weights. Speed: wall time of each tool's whole process and of its quantize call (quantkit: the sum of its per-layer
AWQ times from its log; peers: their driver's timer around quantize()/oneshot()), 2 threads, one tool after the
other, the 1-min load average at each start (the machine is shared). Ratio = quantkit / peer (goal <= 0.5 of the
fastest). Results: bench/results/awq_peers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peer_common import (  # noqa: E402
    PEERS,
    THREADS,
    evaluate,
    fmt,
    model_inputs,
    peer_env,
    quantize_seconds,
    quantkit_env,
    report_head,
    timed,
    venv_python,
)

TOOLS = ("quantkit", "autoawq", "gptqmodel", "llmcompressor", "rtn")
PEER_TOOLS = TOOLS[1:4]
NOTES = [
    "quantkit `awq:w4g{G}`: defaults (AutoAWQ's: duo scaling, n_grid 20, clip search on every linear but q/k, "
    "clip over 512 subsampled tokens; scales judged on the whole self_attn for q/k/v and the whole MLP/MoE, router "
    "included, for gate/up via Architecture.norm_block), float32, quantized outputs propagated to the next layer.",
    "AutoAWQ 0.2.9 (bench/peers/autoawq_awq.py): its defaults (zero_point True, GEMM, duo_scaling True, n_grid 20, "
    "apply_clip True, max_chunk_memory 1 GiB), the token-id lists as calib_data, all samples in one batch, loaded "
    "in float32 (the config's bf16 otherwise), with its CPU-only scale-search aliasing bug patched (see below). It "
    "propagates float outputs to the next layer.",
    "GPTQModel 7.7.0 (bench/peers/gptqmodel_awq.py): AWQConfig bits 4, group G, sym False (zero points; its default "
    "writes zero_point false), duo scaling, n_grid 20, clip on (fixed in its AWQ processor), max_chunk_memory "
    "1 GiB, offload_to_disk False, batch 1, calibration order kept; bf16 (its AWQ rejects float32 on CPU), the "
    "saved bf16 scales cast to float16 exactly. bf16 matmuls are slow on this CPU: 80-100 s per tiny layer, so it "
    "ran at g128 on tiny-llama only (and tiny-deepseek, where it fails).",
    "llm-compressor 0.14.0.1 (bench/peers/llmcompressor_awq.py): AWQModifier(duo_scaling True, n_grid 20) with its "
    "built-in mappings, then int4 asymmetric group-G weights (W4A16_ASYM), min-max observer, lm_head and router "
    "ignored, sequential pipeline, routed-token expert calibration. Not matchable: it has no AWQ clip search.",
    "tiny-deepseek: quantkit reads the FP8 folder directly; the peers get a float32 HF copy of the FP8 blocks "
    "dequantized with quantkit's reader.",
    "Timing: tools run one after another on a machine shared with other jobs (see the load averages), so times are "
    "noisy; 'quantize call' for quantkit is the sum of its per-layer AWQ times from its log, for the peers the "
    "driver's timer around quantize() / oneshot(). GPTQModel's JIT kernels were compiled before the timed runs.",
]


def autoawq_python(work: Path) -> Path:
    """AutoAWQ's venv from the repo's env file, or, while that file is only on branch awq-consumers, from a copy of
    it beside a copy of build_env.sh in `work` (venv cached in `work` too)."""
    envs = REPO / "tests/interop/envs"
    if (envs / "autoawq.txt").exists():
        return venv_python("autoawq")
    tmp = work / "envs"
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(envs / "build_env.sh", tmp / "build_env.sh")
    text = subprocess.run(["git", "-C", str(REPO), "show", "awq-consumers:tests/interop/envs/autoawq.txt"],
                          capture_output=True, text=True, check=True).stdout
    (tmp / "autoawq.txt").write_text(text)
    return venv_python("autoawq", tmp, work / "envcache")


def run_model(name: str, args, report: dict) -> None:
    work = args.work / name
    src, calib, peer_src = model_inputs(name, work, args.samples, args.ctx)
    runs, targets = report["runs"].setdefault(name, {}), {}
    for group in args.groups:
        for tool in args.tools:
            if tool == "autoawq" and group not in args.autoawq_groups:
                continue
            key = f"{tool}-g{group}"
            r, targets[key] = run_tool(tool, group, src, peer_src, work, calib, args)
            runs[key] = r
            print(f"{name} {key}: {r['wall_s']:.1f} s (rc {r['rc']}) {r.get('error', '')}", flush=True)
            save(report, args)
    if not any(targets.values()):
        return
    ev = work / ("eval" if set(args.tools) == set(TOOLS) else "eval-" + "-".join(args.tools))
    settings = evaluate(src, targets, ev, work / "eval.log", args.windows, report["quality"].setdefault(name, {}))
    if settings is not None:
        report["eval_settings"] = settings
    save(report, args)


def run_tool(tool: str, group: int, src: Path, peer_src: Path, work: Path, calib: Path, args) -> tuple[dict, Path]:
    """One tool's run at one group size: its timings and the folder to evaluate (None if it failed)."""
    g = f"g{group}"
    out = work / f"{tool}-{g}"
    shutil.rmtree(out, ignore_errors=True)
    log = work / f"{tool}-{g}.log"
    if tool in ("quantkit", "rtn"):
        fmt_ = f"awq:w4{g}" + ("-rtn" if tool == "rtn" else "")
        r = timed([sys.executable, "-m", "quantkit.cli", "convert", str(src), "--to", fmt_, "-o", str(out),
                   "--calib-samples", str(args.samples), "--calib-ctx", str(args.ctx), "--device", "cpu",
                   "--threads", str(THREADS)], quantkit_env(), log)
        if (seconds := quantize_seconds(log)) is not None and tool == "quantkit":
            r["quantize_s"] = seconds
        return r, next(out.glob("*-AWQ-*"), None) if r["rc"] == 0 else None
    py = args.pythons[tool]
    env = peer_env(work / f"scratch-{tool}", py)
    if tool == "llmcompressor":
        dense = work / f"{tool}-{g}-dense"
        shutil.rmtree(dense, ignore_errors=True)
        r = timed([str(py), str(PEERS / "llmcompressor_awq.py"), str(peer_src), str(out), str(dense), str(calib),
                   str(group)], env, log)
        return r, dense if r["rc"] == 0 else None
    # GPTQModel writes logs/ into its working directory: keep that in the scratch dir
    r = timed([str(py), str(PEERS / f"{tool}_awq.py"), str(peer_src), str(out), str(calib), str(group)], env, log,
              cwd=work / f"scratch-{tool}")
    return r, out if r["rc"] == 0 else None


def markdown(report: dict) -> str:
    m = report["machine"]
    ev = report.get("eval_settings", {})
    lines = ["# AWQ quality and speed: quantkit vs AutoAWQ, GPTQModel and llm-compressor", "",
             f"Date: {report['date']}  ", f"Commit: {report['commit']}  ",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs: see the load averages); "
             f"Python {m['python']}, torch {m['torch']}; AutoAWQ 0.2.9 (transformers 4.51.3), GPTQModel 7.7.0 "
             "(transformers 5.23.0), llm-compressor 0.14.0.1 (transformers 5.17.0), each in its own venv with torch "
             "2.13.0+cpu  ",
             f"Command: `{report['command']}`", "",
             f"Settings: W4, asymmetric (zero points), group {'/'.join(map(str, report['groups']))}, AutoAWQ's "
             f"defaults (duo scaling, n_grid 20, clip search), {report['samples']} x {report['ctx']} calibration "
             "tokens from the bundled calibration split (the same ids for every tool, and as bench/gptq_peers.py), "
             f"{THREADS} threads, CPU. AutoAWQ at group {'/'.join(map(str, report['autoawq_groups']))} only (slow "
             "on CPU). Peer settings: bench/peers/*_awq.py and the notes below.  ",
             f"Quality: `quantkit eval` vs the bundled source, {ev.get('windows', '?')} windows of "
             f"{ev.get('ctx', '?')} tokens ({ev.get('scored_tokens', '?')} scored tokens) of the bundled held-out "
             "text. RTN = quantkit's `awq:w4g{G}-rtn`, the same asymmetric grid without AWQ's scales and clipping. "
             "llm-compressor is evaluated through a float32 copy of its dequantized weights.", "",
             "| model | group | tool | KLD mean | KLD / quantkit's | KLD / RTN's | top-1 % | PPL | wall (process) s "
             "| quantize call s | quantkit / tool (process) | quantkit / tool (quantize) | load 1-min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in report["runs"].items():
        q = report["quality"].get(name, {})
        for g in report["groups"]:
            ours_q = q.get(f"quantkit-g{g}", {}).get("kld_mean")
            rtn_q = q.get(f"rtn-g{g}", {}).get("kld_mean")
            ours = runs.get(f"quantkit-g{g}", {})
            for tool in TOOLS:
                key = f"{tool}-g{g}"
                r, v = runs.get(key, {}), q.get(key, {})
                if not r:
                    continue
                if r.get("rc"):
                    lines.append(f"| {name} | {g} | {tool} | failed: `{r.get('error', '?')}` | | | | | "
                                 f"{fmt(r.get('wall_s'))} | | | | {fmt(r.get('load_1min'), '{:.2f}')} |")
                    continue
                kld = v.get("kld_mean")
                rel = None if kld is None or not ours_q else kld / ours_q
                rel_rtn = None if kld is None or not rtn_q else kld / rtn_q
                timing = tool in PEER_TOOLS
                wall = ours.get("wall_s") / r["wall_s"] if timing and ours.get("wall_s") else None
                quant = (ours["quantize_s"] / r["quantize_s"]
                         if timing and ours.get("quantize_s") and r.get("quantize_s") else None)
                lines.append(
                    f"| {name} | {g} | {tool} | {fmt(kld, '{:.5f}')} | {fmt(rel, '{:.3f}')} | "
                    f"{fmt(rel_rtn, '{:.3f}')} | {fmt(v.get('top1_pct'), '{:.2f}')} | {fmt(v.get('ppl'), '{:.3f}')} | "
                    f"{fmt(r.get('wall_s'))} | {fmt(r.get('quantize_s'))} | {fmt(wall, '{:.2f}')} | "
                    f"{fmt(quant, '{:.2f}')} | {fmt(r.get('load_1min'), '{:.2f}')} |")
        if q.get("baseline_ppl"):
            lines.append(f"| {name} | | source (baseline) | 0 | | | 100.00 | {q['baseline_ppl']:.3f} | | | | | |")
        elif q.get("error"):
            lines.append(f"| {name} | | eval failed: `{q['error']}` | | | | | | | | | | |")
    lines += ["", "Ratios below 1 mean quantkit is faster (goal <= 0.5 x the fastest peer). RTN's wall time is its "
              "own quantkit process (no calibration).", ""]
    lines += [f"- {n}" for n in NOTES + report.get("notes", [])]
    return "\n".join(lines) + "\n"


def save(report: dict, args) -> None:
    stem = args.out
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-llama,tiny-qwen2,tiny-deepseek")
    parser.add_argument("--groups", default="128,32")
    parser.add_argument("--autoawq-groups", default="128", help="AutoAWQ takes minutes per model on CPU")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--windows", type=int, default=64, help="eval windows of 512 tokens per model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/awq-peers"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "awq_peers")
    parser.add_argument("--tools", default=",".join(TOOLS), help="a subset reruns only those tools")
    parser.add_argument("--merge", action="store_true", help="add to the existing .json instead of starting anew")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json (notes kept)")
    args = parser.parse_args(argv)
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return 0
    args.groups = [int(g) for g in args.groups.split(",")]
    args.autoawq_groups = [int(g) for g in args.autoawq_groups.split(",")]
    args.tools = args.tools.split(",")
    torch.set_num_threads(THREADS)
    args.pythons = {t: autoawq_python(args.work) if t == "autoawq" else venv_python(t)
                    for t in args.tools if t in PEER_TOOLS}
    report = report_head("awq_peers.py", argv) | {
        "samples": args.samples, "ctx": args.ctx, "groups": args.groups, "autoawq_groups": args.autoawq_groups,
        "runs": {}, "quality": {}, "notes": []}
    if args.merge:
        old = json.loads(args.out.with_suffix(".json").read_text())
        report = old | {"command": old["command"] + " + " + report["command"],
                        "groups": sorted(set(old["groups"]) | set(args.groups), reverse=True)}
    for name in args.models.split(","):
        run_model(name, args, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
