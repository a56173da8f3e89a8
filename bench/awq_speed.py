"""AWQ speed (issue 13): quantkit's `awq:w4g128` vs the fastest peers on the bundled models, and its time per
decoder layer at DeepSeek-V3's real shapes, extrapolated to 61 layers.

    python bench/awq_speed.py [--models tiny-llama,tiny-qwen2,tiny-deepseek] [--tools llmcompressor,autoawq]
                              [--rounds 3] [--samples 32] [--ctx 256] [--work /tmp/awq-speed]
    python bench/awq_speed.py --v3 [--calib-samples 16] [--calib-ctx 512] [--threads 2]

Results: bench/results/awq_speed.{json,md}; each part replaces its own section and keeps the other's.

Part 1, peers (default): for each model, quantkit and each peer in --tools (llm-compressor, the fastest peer in
bench/results/awq_peers.md, and optionally AutoAWQ) run one after the other, the order alternating, for --rounds
rounds, through bench/awq_peers.py's run_tool: the same token ids (quantkit.calib.data.calibration_samples, the
same as awq_peers.py and gptq_peers.py), W4 group 128 with zero points, duo scaling, n_grid 20, CPU, 2 threads;
tiny-deepseek: quantkit from its FP8 folder, the peers from the float32 copy (peer_common.float_copy). No quality
eval (awq_peers.py has it). Per tool: the median wall time of its whole process and the median time of its
quantize call (quantkit: the sum of its per-layer AWQ times from its log; peers: their driver's timer around
quantize()/oneshot()); ratio = quantkit / peer (goal <= 0.5 x the fastest). llm-compressor has no AWQ clip search
(quantkit and AutoAWQ search a clip for every linear but q/k): it does strictly less work.

Part 2, --v3: one fresh process times the pieces of quantkit's AWQ (quantkit/calib/awq.py) on one decoder layer at
DeepSeek-V3's shapes (gptq_speed.V3: hidden 7168, MLA q/kv ranks 1536/512, 128 heads, routed experts of 2048, 8
active + 1 shared) with random float32 weights (x 0.02, norms of ones, router bias 0), the architecture from
read_memory._sized_config + quantkit.arch.load_architecture with N = 16 routed experts (grouped routing needs
N >= 16). Forwards run on ONE sample of L = --calib-ctx tokens and scale linearly with S = --calib-samples (the
inspected forwards batch up to inspect_tokens = 4096 tokens, so they are about S x one sample's). T = S x L
tokens; per routed expert at 256 experts, on average t_e = 8 T / 256 in all and 8 L / 256 per sample; clip
searches keep every (tokens // clip_tokens)-th input row (512 of T; all t_e). With n = n_grid = 20, the cost
model (what AWQ._calibrated_layer runs):

    fixed   = 2 S x layer_fwd                                   float observe pass + quantized pass
            + S (n+1) x attn_block + n x (pq(q_a) + pq(kv_a))      unit input_layernorm -> q_a, kv_a_with_mqa
            + S (n+1) x lin(q_b, L)   + n x pq(q_b)                unit q_a_layernorm -> q_b
            + S (n+1) x lin(kv_b, L)  + n x pq(kv_b)               unit kv_a_layernorm -> kv_b
            + S (n+1) x moe_block + n x 2 pq(shared gate/up)       unit post_attention_layernorm (router + all
                                                                     experts' and the shared gate/up)
            + S (n+1) x lin(shared down, L) + n x pq(shared down)  unit shared up -> shared down
            + clip(kv_a, T) + clip(kv_b, T) + clip(o, T) + 2 clip(shared gate/up, T) + clip(shared down, T)
            + quantize of q_a, q_b, kv_a, kv_b, o, shared gate, up, down
    per_expert = n x 2 pq(expert gate/up)                          its share of the post_attention unit
               + S (n+1) x lin(expert down, 8L/256) + n x pq(expert down)  unit expert up -> expert down
                                                                     (one small matmul per sample)
               + 2 clip(expert gate/up, t_e) + clip(expert down, t_e) + 3 quantize(expert)
    MoE layer(256) = fixed + 256 x per_expert,    model = 3 x dense layer + 58 x MoE layer(256)

(q_a and q_b are not clipped: UNCLIPPED holds "q_"; o_proj has no scaling unit under MLA.) moe_block is the
post-attention MoE block on one sample: every token runs the router, 8 routed experts and the shared one whatever
N is, so its time does not depend on N; layer_fwd is one sample's whole-layer forward. lin(name, t) is one
F.linear of t tokens at that weight's shape, pq one candidate's pseudo_quantize(w * s) / s, clip one search_clip
+ clip on its token count (t_e for a routed expert: 256 tokens at S = 16; timed on up to CLIP_ROWS = 2048 output
rows, the search being independent per block of clip_batch rows, and scaled to all rows), quantize one quantize()
+ runtime_weight() (the weight the quantized pass uses); each is timed once per distinct shape and token count.
The dense layer (MLP intermediate 18432) swaps the MoE unit for the MLP's: S (n+1) x mlp_block + n x 2 pq(gate/up
18432 x 7168), S (n+1) x lin(down 7168 x 18432, L) + n x pq(down), clip and quantize of gate/up/down; its attention
part is the MoE layer's, its 2 S layer forwards are measured. Not included: reading and dequantizing the FP8
weights, the scale folds and cached-input divisions (elementwise), activation_mean / weight_mean, the loss
sums, packing and writing, and the allocator's time at 45 GB: the result is a floor for what the CLI would take.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peer_common import THREADS, fmt, report_head  # noqa: E402

OUT = REPO / "bench" / "results" / "awq_speed"
GROUP = 128
PEER_TOOLS = ("llmcompressor", "autoawq")
GOAL = 0.5
PEER_NOTES = [
    "llm-compressor has no AWQ clip search (AutoAWQ's apply_clip): it quantizes with min-max group ranges, so it "
    "does strictly less work than quantkit, which searches a clip for every linear but q/k as AutoAWQ does. Its "
    "scale search is the same: n_grid 20 ratios, each judged by a forward of the whole block over all calibration "
    "tokens.",
    "quantkit's quantize time is the sum of its per-layer AWQ times from its log; the peers' is their driver's timer "
    "around quantize() / oneshot() (bench/peers/*_awq.py). Process time includes imports, loading and saving.",
    "tiny-deepseek: quantkit reads the FP8 folder directly; the peers read a float32 copy (peer_common.float_copy).",
    "The machine (2 cores) is shared with another engineer's jobs. The 1-min load average is read at each run's "
    "start; it includes this benchmark's own previous run (2 threads: about 2 with nothing else running), so "
    "values well above 2 mean other jobs shared the cores.",
]


# ---- part 1: peers ---------------------------------------------------------------------------------------

def _peers(args: argparse.Namespace, argv: list[str] | None) -> dict:
    import torch
    from awq_peers import autoawq_python, run_tool
    from peer_common import model_inputs, venv_python

    torch.set_num_threads(THREADS)
    peers = [t for t in args.tools.split(",") if t]
    unknown = set(peers) - set(PEER_TOOLS)
    if unknown:
        raise SystemExit(f"unknown peer tool(s) {sorted(unknown)}; choose from {PEER_TOOLS}")
    pythons = {t: autoawq_python(args.work) if t == "autoawq" else venv_python(t) for t in peers}
    part = report_head("awq_speed.py", argv) | {
        "samples": args.samples, "ctx": args.ctx, "group": GROUP, "rounds": args.rounds, "tools": peers,
        "models": {}}
    for name in args.models.split(","):
        work = args.work / name
        src, calib, peer_src = model_inputs(name, work, args.samples, args.ctx)
        run_args = SimpleNamespace(samples=args.samples, ctx=args.ctx, pythons=pythons)
        runs: dict[str, list[dict]] = {t: [] for t in ["quantkit", *peers]}
        order = ["quantkit", *peers]
        for round_ in range(args.rounds):
            for tool in order if round_ % 2 == 0 else order[::-1]:  # alternate who goes first
                r, _ = run_tool(tool, GROUP, src, peer_src, work, calib, run_args)
                r = {k: v for k, v in r.items() if k in ("wall_s", "quantize_s", "load_1min", "rc", "error",
                                                         "command")} | {"round": round_ + 1}
                runs[tool].append(r)
                print(f"{name} round {round_ + 1} {tool}: {r['wall_s']:.1f} s process, "
                      f"{fmt(r.get('quantize_s'))} s quantize (load {r['load_1min']:.2f}, rc {r['rc']}) "
                      f"{r.get('error', '')}", flush=True)
        part["models"][name] = _summarize(runs)
        save({"peers": part}, args.out)
    return part


def _summarize(runs: dict[str, list[dict]]) -> dict:
    tools = {}
    for tool, rs in runs.items():
        ok = [r for r in rs if r["rc"] == 0]
        quant = [r["quantize_s"] for r in ok if r.get("quantize_s") is not None]
        tools[tool] = {"runs": rs, "ok": len(ok),
                       "median_wall_s": statistics.median(r["wall_s"] for r in ok) if ok else None,
                       "median_quantize_s": statistics.median(quant) if quant else None}
    ours = tools["quantkit"]
    for tool, t in tools.items():
        if tool != "quantkit":
            t["ratio_wall"] = _ratio(ours["median_wall_s"], t["median_wall_s"])
            t["ratio_quantize"] = _ratio(ours["median_quantize_s"], t["median_quantize_s"])
    return {"tools": tools}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _peers_markdown(p: dict) -> list[str]:
    m = p["machine"]
    lines = ["## Peers: quantkit vs " + ", ".join(p["tools"]) + " on the bundled models", "",
             f"Date: {p['date']}  ", f"Commit: {p['commit']}  ",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs: see the load averages); Python "
             f"{m['python']}, torch {m['torch']}  ", f"Command: `{p['command']}`", "",
             f"Settings: W4 asymmetric group {p['group']}, duo scaling, n_grid 20, {p['samples']} x {p['ctx']} "
             f"calibration tokens (the same ids for every tool), CPU, {THREADS} threads, {p['rounds']} rounds with "
             "the tools alternating (the order reversed every other round); no quality eval. Medians over the "
             "rounds; ratio = quantkit / peer (goal <= 0.5).", "",
             "| model | tool | process s (median) | quantize s (median) | quantkit / tool (process) | "
             "quantkit / tool (quantize) | runs: process / quantize s (1-min load) |",
             "|---|---|---|---|---|---|---|"]
    for name, model in p["models"].items():
        for tool, t in model["tools"].items():
            each = ", ".join(f"{r['wall_s']:.1f} / {fmt(r.get('quantize_s'))} ({r['load_1min']:.2f})"
                             if r["rc"] == 0 else f"failed ({r.get('error', '?')[:80]})" for r in t["runs"])
            lines.append(f"| {name} | {tool} | {fmt(t['median_wall_s'])} | {fmt(t['median_quantize_s'])} | "
                         f"{fmt(t.get('ratio_wall'), '{:.2f}')} | {fmt(t.get('ratio_quantize'), '{:.2f}')} | "
                         f"{each} |")
    return lines + [""]


def markdown(report: dict) -> str:
    lines = ["# AWQ speed: quantkit vs peers, and DeepSeek-V3-shape layers", "",
             "bench/awq_speed.py (issue 13's speed item). The cost model and what is measured: the script's "
             "docstring.", ""]
    if "verdict" in report:
        lines += ["## Verdict", "", *[f"- {v}" for v in report["verdict"]], ""]
    if "peers" in report:
        lines += _peers_markdown(report["peers"])
        lines += [f"- {n}" for n in PEER_NOTES + report["peers"].get("notes", [])] + [""]
    if "v3" in report:
        lines += _v3_markdown(report["v3"])
    return "\n".join(lines).rstrip() + "\n"


def save(update: dict, out: Path) -> dict:
    """Merge one part into the results (the other part and the verdict kept) and rewrite both files."""
    path = out.with_suffix(".json")
    report = json.loads(path.read_text()) if path.exists() else {}
    report.update(update)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    return report


# ---- part 2: DeepSeek-V3 shapes --------------------------------------------------------------------------

V3_EXPERTS_ALL = 256
V3_MEASURED_EXPERTS = 16  # V3's grouped routing (4 of 8 groups, 8 experts chosen) needs >= 16 routed experts
CLIP_ROWS = 2048  # search_clip runs clip_batch output rows at a time, independently: timed on this many, scaled


def _v3_pieces(job: dict) -> dict:
    """Seconds of each piece (see the module docstring), each timed once per distinct shape / token count, in a
    fresh process: {name: {seconds, load_1min, ...}}."""
    import torch
    import torch.nn.functional as F
    from gptq_speed import V3, _v3_config
    from read_memory import _sized_config

    overrides = job.get("overrides", {})  # smaller dimensions, to check the code path quickly
    V3 = {**V3, **overrides}

    from quantkit.arch import load_architecture
    from quantkit.quant.awq import AWQConfig, clip, pseudo_quantize, quantize, runtime_weight, search_clip

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    config = AWQConfig()
    S, L = job["samples"], job["ctx"]
    T = S * L
    routed = V3["num_experts_per_tok"]
    pieces: dict[str, dict] = {}

    def timed(name: str, fn, **info) -> float:
        """fn's seconds (a short piece: the mean of repeats over >= 0.5 s, after one warm-up call)."""
        load = os.getloadavg()[0]
        with torch.no_grad():
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            if seconds < 0.2:
                repeats = max(2, math.ceil(0.5 / max(seconds, 1e-4)))
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                seconds = (time.perf_counter() - start) / repeats
        pieces[name] = {"seconds": seconds, "load_1min": load, **info}
        print(f"{name}: {seconds:.3f} s (load {load:.2f})", file=sys.stderr, flush=True)
        return seconds

    def randn(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape) * scale

    def layer_weights(spec) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in spec.tensor_shapes().items():
            if name.endswith("correction_bias"):
                out[name] = torch.zeros(shape)
            elif len(shape) == 1:
                out[name] = torch.ones(shape)
            else:
                out[name] = randn(*shape)
        return out

    def blocks(kind: str, dense: bool) -> None:
        """One sample's layer forward, attention block (MoE layer only: the dense layer's is the same) and
        MLP/MoE block, on L tokens."""
        arch = load_architecture(_sized_config("fp8", 0, _v3_config(V3_MEASURED_EXPERTS, dense) | overrides, 1))
        w = layer_weights(arch.layer_spec(0))
        x, positions = torch.randn(1, L, V3["hidden_size"]), torch.arange(L)
        p = "model.layers.0."
        info = {"tokens": L, "routed_experts": None if dense else V3_MEASURED_EXPERTS}
        timed(f"layer_fwd_{kind}", lambda: arch.layer_forward(0, w.__getitem__, x * 0.1, positions), **info)
        if not dense:
            timed("attn_block", lambda: arch.norm_block(0, p + "input_layernorm.weight", w.__getitem__, x,
                                                        positions), **info)
        timed(f"{kind}_block", lambda: arch.norm_block(0, p + "post_attention_layernorm.weight", w.__getitem__, x,
                                                       positions), **info)

    def lin(name: str, shape: tuple[int, int], tokens: int) -> None:
        W, x = randn(*shape), torch.randn(tokens, shape[1])
        timed(f"lin_{name}", lambda: F.linear(x, W), shape=list(shape), tokens=tokens)

    def pq(name: str, shape: tuple[int, int]) -> None:
        W, s = randn(*shape), torch.rand(shape[1]) + 0.5
        timed(f"pq_{name}", lambda: pseudo_quantize(W * s, config) / s, shape=list(shape))

    def clip_search(name: str, shape: tuple[int, int], tokens: int) -> None:
        """search_clip + clip on `tokens` input rows (it keeps every (tokens // clip_tokens)-th), timed on
        min(out, CLIP_ROWS) output rows and scaled to out."""
        rows = len(range(0, tokens, max(1, tokens // config.clip_tokens)))
        timed_rows = min(shape[0], CLIP_ROWS)
        W, x = randn(timed_rows, shape[1]), torch.randn(rows, shape[1])
        timed(f"clip_{name}", lambda: clip(W, search_clip(W, x, config), config.group_size), shape=list(shape),
              tokens=tokens, rows_searched=rows, rows_timed=timed_rows)
        pieces[f"clip_{name}"]["seconds"] *= shape[0] / timed_rows

    def quant(name: str, shape: tuple[int, int]) -> None:
        W = randn(*shape)
        timed(f"quantize_{name}", lambda: runtime_weight(quantize(W, config), config.group_size), shape=list(shape))

    h, r, inter, dense_inter = V3["hidden_size"], V3["q_lora_rank"], V3["moe_intermediate_size"], \
        V3["intermediate_size"]
    heads = V3["num_attention_heads"]
    shapes = {"q_a": (r, h), "kv_a": (V3["kv_lora_rank"] + V3["qk_rope_head_dim"], h),
              "q_b": (heads * (V3["qk_nope_head_dim"] + V3["qk_rope_head_dim"]), r),
              "kv_b": (heads * (V3["qk_nope_head_dim"] + V3["v_head_dim"]), V3["kv_lora_rank"]),
              "o": (h, heads * V3["v_head_dim"]), "expert_gate_up": (inter, h), "expert_down": (h, inter),
              "dense_gate_up": (dense_inter, h), "dense_down": (h, dense_inter)}
    expert_tokens = T * routed // V3_EXPERTS_ALL  # per routed expert at 256 experts, on average
    blocks("moe", False)
    lin("q_b", shapes["q_b"], L)
    lin("kv_b", shapes["kv_b"], L)
    lin("shared_down", shapes["expert_down"], L)
    lin("expert_down", shapes["expert_down"], L * routed // V3_EXPERTS_ALL)  # one sample's routed tokens
    for name, shape in shapes.items():
        if not name.startswith("dense"):
            pq(name, shape)
            quant(name, shape)
    for name in ("kv_a", "kv_b", "o"):
        clip_search(name, shapes[name], T)
    clip_search("shared_gate_up", shapes["expert_gate_up"], T)
    clip_search("shared_down", shapes["expert_down"], T)
    clip_search("expert_gate_up", shapes["expert_gate_up"], expert_tokens)
    clip_search("expert_down", shapes["expert_down"], expert_tokens)
    if job["dense"]:
        blocks("dense", True)
        lin("dense_down", shapes["dense_down"], L)
        for name in ("dense_gate_up", "dense_down"):
            pq(name, shapes[name])
            quant(name, shapes[name])
            clip_search(name, shapes[name], T)
    return {"pieces": pieces, "shapes": {k: list(v) for k, v in shapes.items()}, "expert_tokens": expert_tokens,
            "peak_rss_bytes": _peak_rss()}


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _v3_model(pieces: dict, S: int, n: int, dense: bool) -> dict:
    """The cost model of the module docstring: (term, piece, count) rows per part, and the totals."""
    inspected = S * (n + 1)
    attention = [("float observe + quantized pass: layer forwards", "layer_fwd_moe", 2 * S),
                 ("input_layernorm unit: attention block inspections", "attn_block", inspected),
                 ("input_layernorm unit: pseudo-quantize q_a", "pq_q_a", n),
                 ("input_layernorm unit: pseudo-quantize kv_a", "pq_kv_a", n),
                 ("q_a_layernorm unit: q_b inspections", "lin_q_b", inspected),
                 ("q_a_layernorm unit: pseudo-quantize q_b", "pq_q_b", n),
                 ("kv_a_layernorm unit: kv_b inspections", "lin_kv_b", inspected),
                 ("kv_a_layernorm unit: pseudo-quantize kv_b", "pq_kv_b", n),
                 ("clip kv_a", "clip_kv_a", 1), ("clip kv_b", "clip_kv_b", 1), ("clip o", "clip_o", 1),
                 *[(f"quantize {k}", f"quantize_{k}", 1) for k in ("q_a", "q_b", "kv_a", "kv_b", "o")]]
    fixed = attention + [
        ("post_attention_layernorm unit: MoE block inspections", "moe_block", inspected),
        ("post_attention_layernorm unit: pseudo-quantize shared gate/up", "pq_expert_gate_up", 2 * n),
        ("shared up -> down unit: inspections", "lin_shared_down", inspected),
        ("shared up -> down unit: pseudo-quantize", "pq_expert_down", n),
        ("clip shared gate/up", "clip_shared_gate_up", 2), ("clip shared down", "clip_shared_down", 1),
        ("quantize shared gate/up", "quantize_expert_gate_up", 2), ("quantize shared down", "quantize_expert_down", 1)]
    per_expert = [
        ("post_attention_layernorm unit: pseudo-quantize gate/up", "pq_expert_gate_up", 2 * n),
        ("up -> down unit: inspections (each sample's routed tokens)", "lin_expert_down", inspected),
        ("up -> down unit: pseudo-quantize down", "pq_expert_down", n),
        ("clip gate/up (routed tokens)", "clip_expert_gate_up", 2), ("clip down", "clip_expert_down", 1),
        ("quantize gate/up", "quantize_expert_gate_up", 2), ("quantize down", "quantize_expert_down", 1)]
    parts = {"fixed": fixed, "per_expert": per_expert}
    if dense:
        parts["dense"] = [(t, "layer_fwd_dense" if p == "layer_fwd_moe" else p, c) for t, p, c in attention] + [
            ("post_attention_layernorm unit: MLP block inspections", "dense_block", inspected),
            ("post_attention_layernorm unit: pseudo-quantize gate/up", "pq_dense_gate_up", 2 * n),
            ("up -> down unit: inspections", "lin_dense_down", inspected),
            ("up -> down unit: pseudo-quantize down", "pq_dense_down", n),
            ("clip gate/up", "clip_dense_gate_up", 2), ("clip down", "clip_dense_down", 1),
            ("quantize gate/up", "quantize_dense_gate_up", 2), ("quantize down", "quantize_dense_down", 1)]
    out = {}
    for part, rows in parts.items():
        table = [{"term": t, "piece": p, "seconds_each": pieces[p]["seconds"], "count": c,
                  "total_seconds": pieces[p]["seconds"] * c} for t, p, c in rows]
        out[part] = {"rows": table, "seconds": sum(r["total_seconds"] for r in table)}
    return out


def _v3(args: argparse.Namespace, argv: list[str] | None) -> dict:
    from gptq_speed import V3, V3_DENSE_LAYERS, V3_MOE_LAYERS
    from read_memory import _machine

    from quantkit.quant.awq import AWQConfig

    job = {"threads": args.threads, "samples": args.calib_samples, "ctx": args.calib_ctx, "dense": True}
    began = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                          stdout=subprocess.PIPE, text=True, check=True, cwd=REPO)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    n = AWQConfig().n_grid
    model = _v3_model(measured["pieces"], args.calib_samples, n, dense=True)
    moe = model["fixed"]["seconds"] + V3_EXPERTS_ALL * model["per_expert"]["seconds"]
    dense = model["dense"]["seconds"]
    total = V3_DENSE_LAYERS * dense + V3_MOE_LAYERS * moe
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    part = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit, "machine": _machine(),
            "command": shlex.join(["python", "bench/awq_speed.py", *(sys.argv[1:] if argv is None else argv)]),
            "settings": {"threads": args.threads, "calib_samples": args.calib_samples, "calib_ctx": args.calib_ctx,
                         "n_grid": n, "measured_routed_experts": V3_MEASURED_EXPERTS, "clip_rows_timed": CLIP_ROWS,
                         "spec": f"awq:w4g{GROUP}"},
            "v3": V3, "measured": measured, "model": model, "moe_layer_seconds": moe, "dense_layer_seconds": dense,
            "model_seconds": total, "model_hours": total / 3600, "run_seconds": time.perf_counter() - began}
    save({"v3": part}, args.out)
    return part


V3_NOTES = [
    "A floor, not a CLI run: the pieces are quantkit's own functions (Architecture.norm_block / layer_forward, "
    "F.linear as AWQ's single-linear inspect, pseudo_quantize, search_clip + clip, quantize + runtime_weight) "
    "timed outside the layerwise engine; FP8 reads, the scale folds, activation_mean / weight_mean (one pass over "
    "the unit's weights), packing and writing are left out.",
    "Random weights and inputs: routing is near-uniform (real routing is skewed; an expert under "
    "min_expert_tokens = 16 routed tokens would get all of the layer's tokens for its clip and down scales).",
    "The MoE block is timed with 16 routed experts: every token still runs 8 routed + 1 shared expert, the same "
    "FLOPs as at 256, but at 256 each expert's matmuls are 16x smaller (more per-call overhead).",
    "Forwards timed on one 512-token sample and multiplied by S; the real inspections stack equal-length samples "
    "into batches of up to inspect_tokens = 4096 tokens (slightly faster per token), except an expert's down "
    "inspections, one small matmul per sample (as timed).",
    "Memory at the real shapes (not measured here): the post-attention unit's search concatenates all 514 "
    "gate/up weights for weight_mean (~30 GB float32) and holds every candidate's pseudo-quantized copy of them "
    "(~30 GB) beside the 45 GB layer.",
]


def _v3_markdown(v: dict) -> list[str]:
    m, s, meas = v["machine"], v["settings"], v["measured"]
    S, L = s["calib_samples"], s["calib_ctx"]
    lines = ["## DeepSeek-V3 shapes: time per decoder layer, extrapolated to 61 layers", "",
             f"Date: {v['date']}  ", f"Commit: {v['commit']}  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2 ** 30:.0f} GiB RAM; Python "
             f"{m['python']}, torch {m['torch']}  ", f"Command: `{v['command']}`  ",
             f"{s['spec']}, n_grid {s['n_grid']}, CPU, {s['threads']} threads; calibration {S} x {L} tokens "
             f"({S * L} tokens, {meas['expert_tokens']} per routed expert on average at 256 experts); forwards "
             f"timed on one sample of {L} tokens with {s['measured_routed_experts']} routed experts; clip searches "
             f"timed on up to {s['clip_rows_timed']} output rows and scaled; peak RSS of the measuring process "
             f"{meas['peak_rss_bytes'] / 2 ** 30:.1f} GiB; the whole part took {v['run_seconds'] / 60:.1f} min.", "",
             "Pieces (each timed once; short ones are the mean of repeats):", "",
             "| piece | shape [out, in] | tokens | seconds | 1-min load |", "|---|---|---|---|---|"]
    for name, p in meas["pieces"].items():
        shape = p.get("shape")
        lines.append(f"| {name} | {shape if shape else '-'} | {p.get('tokens', '-')} | {p['seconds']:.3f} | "
                     f"{p['load_1min']:.2f} |")
    titles = {"fixed": "MoE layer, fixed part", "per_expert": "MoE layer, per routed expert (x 256)",
              "dense": "dense layer (MLP 18432)"}
    for part, t in v["model"].items():
        lines += ["", f"{titles[part]}: {t['seconds']:.0f} s", "", "| term | piece | seconds each | count | total s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['term']} | {r['piece']} | {r['seconds_each']:.3f} | {r['count']} | {r['total_seconds']:.1f} |"
                  for r in t["rows"]]
    fixed, per = v["model"]["fixed"]["seconds"], v["model"]["per_expert"]["seconds"]
    lines += ["", f"- MoE layer(N) = {fixed:.0f} s + N x {per:.1f} s; at 256 experts {v['moe_layer_seconds']:.0f} s "
              f"= {v['moe_layer_seconds'] / 3600:.2f} h",
              f"- dense layer: {v['dense_layer_seconds']:.0f} s = {v['dense_layer_seconds'] / 3600:.2f} h",
              f"- 61 layers (3 dense + 58 MoE): {v['model_hours']:.1f} h = {v['model_hours'] / 24:.1f} days "
              f"(this 2-core CPU, {S} x {L} tokens)", ""]
    lines += ["Caveats:", *[f"- {n}" for n in V3_NOTES + v.get("notes", [])]]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-llama,tiny-qwen2,tiny-deepseek")
    parser.add_argument("--tools", default="llmcompressor", help=f"peers, comma-separated, of {PEER_TOOLS}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/awq-speed"))
    parser.add_argument("--v3", action="store_true", help="the DeepSeek-V3-shape part instead of the peers")
    parser.add_argument("--calib-samples", type=int, default=16, help="--v3: calibration samples S (default 16)")
    parser.add_argument("--calib-ctx", type=int, default=512, help="--v3: tokens per sample L (default 512)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"--v3: torch threads (default {THREADS})")
    parser.add_argument("--out", type=Path, default=OUT, help=f"results stem (default {OUT})")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_v3_pieces(json.loads(args.worker))))
        return 0
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return 0
    if args.v3:
        _v3(args, argv)
    else:
        _peers(args, argv)
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
