"""GPTQ quality and speed: quantkit vs GPTQModel and llm-compressor (issue 12), same tokens, settings and machine.

    python bench/gptq_peers.py [--models tiny-llama,tiny-qwen2,tiny-deepseek] [--groups 128,32]
                               [--samples 32] [--ctx 256] [--windows 64] [--work /tmp/gptq-peers]

For each bundled model and each W4 group size (symmetric, no act-order, damp 0.01 everywhere):

* calibration: quantkit.calib.data.calibration_samples(model, None, samples, ctx) (the bundled calibration
  split), written as token-id lists; quantkit computes the same ids itself, the peers get these lists as
  input_ids/attention_mask dicts;
* quantkit: `python -m quantkit.cli convert MODEL --to gptq:w4g{G} --calib-samples N --calib-ctx L --device cpu
  --threads 2`, from the bundled folder (tiny-deepseek: straight from its FP8 weights);
* GPTQModel 7.7.0 (bench/peers/gptqmodel_gptq.py) and llm-compressor 0.14.0.1 (bench/peers/llmcompressor_gptq.py)
  in their cached venvs (tests/interop/envs/build_env.sh), from the bundled folder, or for tiny-deepseek from a
  float32 HF copy this bench writes by dequantizing the FP8 weights with quantkit's reader (the copy quantkit
  itself never needs); the drivers say which peer defaults were changed to match;
* RTN: quantkit.quant.gptq.rtn_quantize on the same linears quantkit's GPTQ output holds, dequantized with fp16
  scales (what a runtime computes), written as a float32 HF folder.

Quality: `python -m quantkit.cli eval` of every output against the bundled source (KLD mean, top-1, PPL on
--windows windows of 512 tokens of the bundled held-out text). quantkit and GPTQModel outputs are read as GPTQ
folders; llm-compressor's compressed-tensors output, which quantkit cannot read, through the float32 folder its
driver writes from the same in-memory weights (codes x scales, identical to the saved checkpoint).
Speed: wall time of each tool's whole process and of its quantize call alone (quantkit: the sum of its
per-layer GPTQ times; peers: their driver's timer around quantize()/oneshot()), all on 2 threads, one after the
other, with the 1-min load average at each start (the machine is shared). Ratio = quantkit / peer (goal <= 0.5).
Results: bench/results/gptq_peers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peer_common import (  # noqa: E402
    PEERS,
    THREADS,
    float_copy_meta,
    model_inputs,
    peer_env,
    quantize_seconds,
    quantkit_env,
    report_head,
    timed,
    venv_python,
)
from peer_common import evaluate as evaluate_outputs  # noqa: E402
from peer_common import fmt as _f  # noqa: E402

from quantkit.calib.gptq import runtime_weight  # noqa: E402
from quantkit.model import Model  # noqa: E402
from quantkit.quant.gptq import GPTQConfig, rtn_quantize  # noqa: E402

TOOLS = ("quantkit", "gptqmodel", "llmcompressor", "rtn")
# Written under the table: what each peer was set to (and why), and what could not be matched.
NOTES = [
    "GPTQModel 7.7.0 (bench/peers/gptqmodel_gptq.py): bits 4, group_size G, sym True, desc_act False, "
    "act_group_aware False (its default True for GPTQ: group-aware reordering), damp_percent 0.01 (default 0.05), "
    "true_sequential False (default True; quantkit is layer-level sequential), static_groups False, mse 0.0, "
    "offload_to_disk False (default True: a disk round trip quantkit does not make), format gptq (v1), float32, "
    "batch 1, calibration_sort None (keeps the given order). Its low-sample fallback (RTN below 0.5% of the tokens) "
    "stays on; no expert falls under it with these samples. It propagates quantized layer outputs, as quantkit does.",
    "llm-compressor 0.14.0.1 (bench/peers/llmcompressor_gptq.py): GPTQModifier with int4 symmetric group-G weights, "
    "minmax observer, actorder None (default static), dampening_frac 0.01, block_size 128, ignore lm_head, the "
    "sequential pipeline (layer by layer, quantized outputs propagated), moe_calibrate_all_experts False "
    "(default True). Not matchable: it takes every group's scale from the original weight before GPTQ runs "
    "(AutoGPTQ's static_groups), where quantkit and GPTQModel take it from the updated weight when GPTQ reaches "
    "the group.",
    "tiny-deepseek: quantkit reads the FP8 folder directly; the peers get a float32 HF copy the bench writes "
    "by dequantizing the FP8 blocks with quantkit's reader (the copy quantkit avoids).",
    "Timing: tools run one after another on a machine shared with other jobs (1-min load averages 4.7-8 on 2 cores "
    "during the run), so times are noisy; GPTQModel's JIT kernels were compiled before the run (cached beside "
    "its venv). 'quantize call' for quantkit is the sum of its per-layer GPTQ times from its log; for the peers "
    "the driver's timer around quantize() / oneshot().",
]


def rtn_folder(model: Model, gptq_dir: Path, group: int, dst: Path) -> dict:
    """RTN of every linear quantkit's GPTQ output quantized, as a float32 HF folder."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    began = time.perf_counter()
    quantized = set()
    for shard in gptq_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            quantized |= {k.removesuffix(".qweight") + ".weight" for k in f.keys() if k.endswith(".qweight")}
    config = GPTQConfig(bits=4, group_size=group)
    tensors = {}
    for t in model.source.tensors():
        w = model.source.read(t.name)
        tensors[t.name] = (runtime_weight(rtn_quantize(w, config)) if t.name in quantized else w).contiguous()
    float_copy_meta(model, dst)
    save_file(tensors, str(dst / "model.safetensors"))
    return {"wall_s": time.perf_counter() - began, "rc": 0, "linears": len(quantized)}


def run_model(name: str, args, pythons: dict, report: dict) -> None:
    work = args.work / name
    src, calib, peer_src = model_inputs(name, work, args.samples, args.ctx)
    qk_env = quantkit_env()
    runs, targets = report["runs"].setdefault(name, {}), {}
    for group in args.groups:
        runs_group(name, group, src, peer_src, work, calib, qk_env, args, pythons, runs, targets)
        save(report, args)
    evaluate(name, src, work, targets, args, report)


def runs_group(name, group, src, peer_src, work, calib, qk_env, args, pythons, runs, targets) -> None:
    """Run the selected tools for one group size; record timings in `runs` and outputs to evaluate in `targets`."""
    g = f"g{group}"
    out = work / f"quantkit-{g}"
    if "quantkit" in args.tools:
        shutil.rmtree(out, ignore_errors=True)
        r = timed([sys.executable, "-m", "quantkit.cli", "convert", str(src), "--to", f"gptq:w4{g}", "-o", str(out),
                   "--calib-samples", str(args.samples), "--calib-ctx", str(args.ctx), "--device", "cpu",
                   "--threads", str(THREADS)], qk_env, work / f"quantkit-{g}.log")
        if (seconds := quantize_seconds(work / f"quantkit-{g}.log")) is not None:
            r["quantize_s"] = seconds
        runs[f"quantkit-{g}"] = r
        print(f"{name} quantkit {g}: {r['wall_s']:.1f} s (rc {r['rc']})", flush=True)
    qk_dir = next(out.glob("*-GPTQ-*"), None)
    if "quantkit" in args.tools:
        targets[f"quantkit-{g}"] = qk_dir
    if "gptqmodel" in args.tools:
        gm = work / f"gptqmodel-{g}"
        shutil.rmtree(gm, ignore_errors=True)
        py = pythons["gptqmodel"]
        r = timed([str(py), str(PEERS / "gptqmodel_gptq.py"), str(peer_src), str(gm), str(calib), str(group)],
                  peer_env(work / "scratch-gm", py), work / f"gptqmodel-{g}.log")
        runs[f"gptqmodel-{g}"] = r
        targets[f"gptqmodel-{g}"] = gm if r["rc"] == 0 else None
        print(f"{name} gptqmodel {g}: {r['wall_s']:.1f} s (rc {r['rc']}) {r.get('error', '')}", flush=True)

    if "llmcompressor" in args.tools:
        lc, lc_dense = work / f"llmcompressor-{g}", work / f"llmcompressor-{g}-dense"
        shutil.rmtree(lc, ignore_errors=True)
        shutil.rmtree(lc_dense, ignore_errors=True)
        py = pythons["llmcompressor"]
        r = timed([str(py), str(PEERS / "llmcompressor_gptq.py"), str(peer_src), str(lc), str(lc_dense), str(calib),
                   str(group)], peer_env(work / "scratch-lc", py), work / f"llmcompressor-{g}.log")
        runs[f"llmcompressor-{g}"] = r
        targets[f"llmcompressor-{g}"] = lc_dense if r["rc"] == 0 else None
        print(f"{name} llmcompressor {g}: {r['wall_s']:.1f} s (rc {r['rc']}) {r.get('error', '')}", flush=True)

    if "rtn" in args.tools and qk_dir is not None:
        with Model(src, device="cpu") as model:
            runs[f"rtn-{g}"] = rtn_folder(model, qk_dir, group, work / f"rtn-{g}")
        targets[f"rtn-{g}"] = work / f"rtn-{g}"


def evaluate(name, src, work, targets, args, report) -> None:
    """One `quantkit eval` over this run's outputs; entries already in the report for other tools are kept."""
    ev = work / ("eval" if set(args.tools) == set(TOOLS) else "eval-" + "-".join(args.tools))
    settings = evaluate_outputs(src, targets, ev, work / "eval.log", args.windows,
                                report["quality"].setdefault(name, {}))
    if settings is not None:
        report["eval_settings"] = settings
    save(report, args)


def markdown(report: dict) -> str:
    m = report["machine"]
    ev = report.get("eval_settings", {})
    lines = ["# GPTQ quality and speed: quantkit vs GPTQModel and llm-compressor", "",
             f"Date: {report['date']}  ", f"Commit: {report['commit']}  ",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs: see the load averages); "
             f"Python {m['python']}, torch {m['torch']}; GPTQModel 7.7.0 (transformers 5.23.0), llm-compressor "
             "0.14.0.1 (transformers 5.17.0), each in its own venv with torch 2.13.0+cpu  ",
             f"Command: `{report['command']}`", "",
             f"Settings: W4, symmetric, group {'/'.join(map(str, report['groups']))}, no act-order, damp 0.01, "
             f"{report['samples']} x {report['ctx']} calibration tokens from the bundled calibration split (the same "
             f"ids for every tool), {THREADS} threads, CPU. Peer settings: see bench/peers/*.py and the notes "
             "below.  ",
             f"Quality: `quantkit eval` vs the bundled source, {ev.get('windows', '?')} windows of "
             f"{ev.get('ctx', '?')} "
             f"tokens ({ev.get('scored_tokens', '?')} scored tokens) of the bundled held-out text. "
             "RTN = round-to-nearest on the same grid. llm-compressor is evaluated through a float32 copy of its "
             "dequantized weights.", "",
             "| model | group | tool | KLD mean | KLD / quantkit's | top-1 % | PPL | wall (process) s "
             "| quantize call s | quantkit / tool (process) | quantkit / tool (quantize) | load 1-min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in report["runs"].items():
        q = report["quality"].get(name, {})
        for g in report["groups"]:
            ours_q = q.get(f"quantkit-g{g}", {}).get("kld_mean")
            ours = runs.get(f"quantkit-g{g}", {})
            for tool in TOOLS:
                key = f"{tool}-g{g}"
                r, v = runs.get(key, {}), q.get(key, {})
                if not r:
                    continue
                if r.get("rc"):
                    lines.append(f"| {name} | {g} | {tool} | failed: `{r.get('error', '?')}` | | | | "
                                 f"{_f(r.get('wall_s'))} | | | | {_f(r.get('load_1min'), '{:.2f}')} |")
                    continue
                kld = v.get("kld_mean")
                rel = None if kld is None or not ours_q else kld / ours_q
                timing = tool not in ("quantkit", "rtn")
                wall = ours.get("wall_s") / r["wall_s"] if timing and ours.get("wall_s") else None
                quant = (ours["quantize_s"] / r["quantize_s"]
                         if timing and ours.get("quantize_s") and r.get("quantize_s") else None)
                lines.append(
                    f"| {name} | {g} | {tool} | {_f(kld, '{:.5f}')} | {_f(rel, '{:.3f}')} | "
                    f"{_f(v.get('top1_pct'), '{:.2f}')} | {_f(v.get('ppl'), '{:.3f}')} | {_f(r.get('wall_s'))} | "
                    f"{_f(r.get('quantize_s'))} | "
                    f"{_f(wall, '{:.2f}')} | {_f(quant, '{:.2f}')} | "
                    f"{_f(r.get('load_1min'), '{:.2f}')} |")
        if q.get("baseline_ppl"):
            lines.append(f"| {name} | | source (baseline) | 0 | | 100.00 | {q['baseline_ppl']:.3f} | | | | | |")
    lines += ["", "Ratios below 1 mean quantkit is faster (goal <= 0.5). RTN's wall time is the in-process "
              "quantization inside this bench, not a tool run.", ""]
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
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--windows", type=int, default=64, help="eval windows of 512 tokens per model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptq-peers"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gptq_peers")
    parser.add_argument("--tools", default=",".join(TOOLS), help="a subset reruns only those tools")
    parser.add_argument("--merge", action="store_true", help="add to the existing .json instead of starting anew")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json (notes kept)")
    args = parser.parse_args(argv)
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return 0
    args.groups = [int(g) for g in args.groups.split(",")]
    args.tools = args.tools.split(",")
    torch.set_num_threads(THREADS)
    pythons = {name: venv_python(name) for name in ("gptqmodel", "llmcompressor") if name in args.tools}
    report = report_head("gptq_peers.py", argv) | {
        "samples": args.samples, "ctx": args.ctx, "groups": args.groups, "runs": {}, "quality": {}, "notes": []}
    if args.merge:
        old = json.loads(args.out.with_suffix(".json").read_text())
        report = old | {"command": old["command"] + " + " + report["command"]}
    for name in args.models.split(","):
        run_model(name, args, pythons, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
