"""gguf:auto vs the uniform llama.cpp ladder at equal bits (issue 15: "quality per bit" and "cost"), on the bundled
models.

    python bench/auto_quality.py [--models tiny-qwen2,tiny-llama,tiny-deepseek] [--bpw 3.5,4.0,4.5,5.5]
                                 [--windows 60] [--ctx 256] [--work /tmp/auto-quality] [--reuse-sensitivity]
                                 [--report-only]

Per model, one calibration for everything: the bundled calibration split, the bundled llama-imatrix file
(tests/data/llama_imatrix) as the importance matrix of every output, and one sensitivity measurement (convert's
defaults: --sensitivity-samples 8, --calib-ctx 512) stored in the work folder and reused by every gguf:auto output.
Outputs: the uniform ladder with the imatrix (Q2_K, Q3_K_M, IQ4_XS, Q4_K_M, Q5_K_M, Q6_K) and gguf:auto at every
--bpw target plus at each ladder file's own bpw (equal tensor bytes). All are scored by one `quantkit eval` against
the bundled source on the bundled held-out text (llama.cpp backend, --ctx tokens, --windows windows, no
multiple-choice items): mean / p99 KLD, top-1, PPL, bpw, size.

Prediction: the quantize.auto.predicted_kld of each auto file (the summed per-tensor costs measured on calibration
text) against its measured mean KLD on held-out text; the same sum is also formed for each ladder file from its
tensor types (every ladder type is a measured candidate), so the rank correlation covers both.

Cost: the sensitivity measurement is run in this process with timers wrapped around quantkit's functions (no
quantkit code changed): the codecs' encode and decode of every candidate, the rest of each candidate's
preparation (rebuilding checkpoint tensors), the layer forwards, the head + KLD. Codec throughput (elements/s per
type) and this CPU's float32 matmul rate then extrapolate the measurement to catalog models (quantkit.catalog)
from their shapes; GPU figures are arithmetic at stated rates, not measurements.

Results: bench/results/auto_quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as quantkit/__init__ does; peer_common imports torch first

import torch  # noqa: E402
from peer_common import fmt, model_bench_args, per_model_report, quantkit_env, timed, write_results  # noqa: E402

LADDER = ("Q2_K", "Q3_K_M", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K")
IMATRIX = {"tiny-qwen2": "tiny-qwen2.imatrix.gguf", "tiny-llama": "tiny-llama.imatrix.gguf",
           "tiny-deepseek": "tiny-deepseek.imatrix.gguf"}
EXTRAPOLATE = ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-ai/DeepSeek-R1")
SENS_SAMPLES, SENS_CTX = 8, 512  # convert's defaults (--sensitivity-samples, --calib-ctx)
# GPU arithmetic (no GPU measured here): float32 forward at half of an H100 SXM's 67 TFLOPS non-tensor FP32
GPU_FLOPS = 0.5 * 67e12
MATCH = 1.05  # "matches": mean KLD within 5% of Q4_K_M's (a reporting threshold, stated in the results)


# ---- timing the sensitivity measurement --------------------------------------------------------------------
class Timers:
    def __init__(self):
        self.t: dict[str, list[float]] = {}  # key -> [seconds, calls, elements]

    def add(self, key: str, seconds: float, elements: int = 0) -> None:
        row = self.t.setdefault(key, [0.0, 0, 0])
        row[0] += seconds
        row[1] += 1
        row[2] += elements

    def wrap(self, key, fn, elements=None):
        def wrapped(*a, **k):
            began = time.perf_counter()
            out = fn(*a, **k)
            self.add(key, time.perf_counter() - began, elements(*a, **k) if elements else 0)
            return out
        return wrapped


class _CodecProxy:
    def __init__(self, codec, scheme: str, timers: Timers):
        self._codec = codec
        self.encode = timers.wrap(f"encode {scheme}", codec.encode, lambda x, *a, **k: x.numel())
        self.decode = timers.wrap(f"decode {scheme}", codec.decode)

    def __getattr__(self, name):
        return getattr(self._codec, name)


class _ArchProxy:
    def __init__(self, arch, timers: Timers):
        self._arch = arch
        self.layer_forward = timers.wrap("layer_forward", arch.layer_forward)
        self.head = timers.wrap("head", arch.head)
        self.embed = timers.wrap("embed", arch.embed)

    def __getattr__(self, name):
        return getattr(self._arch, name)


def measure_timed(name: str, src: Path, imatrix: Path, sens: Path) -> dict:
    """The sensitivity measurement exactly as `quantkit convert --to gguf:auto` makes it (a dry run stores it to
    `sens`), with timers around its parts."""
    import quantkit.calib.sensitivity as sensitivity_mod
    import quantkit.formats.gguf.auto as auto_mod
    from quantkit.convert import convert
    from quantkit.plan.allocate import Budget

    timers = Timers()
    saved = (auto_mod.get_codec, auto_mod.Candidates.degrade, sensitivity_mod.measure)
    get_codec, degrade, measure = saved
    auto_mod.get_codec = lambda scheme: _CodecProxy(get_codec(scheme), scheme, timers)
    auto_mod.Candidates.degrade = timers.wrap("degrade", degrade)
    sensitivity_mod.measure = timers.wrap("measure", lambda arch, *a, **k: measure(_ArchProxy(arch, timers), *a, **k))
    sens.unlink(missing_ok=True)
    began = time.perf_counter()
    try:
        convert(src, ["gguf:auto"], None, dry_run=True, imatrix=imatrix, sensitivity=sens, device="cpu",
                sensitivity_samples=SENS_SAMPLES, calib_ctx=SENS_CTX, budget=Budget(bpw=4.0))
    finally:
        auto_mod.get_codec, auto_mod.Candidates.degrade, sensitivity_mod.measure = saved
    t = timers.t
    encode = {k.split()[1]: v for k, v in t.items() if k.startswith("encode ")}
    decode = {k.split()[1]: v for k, v in t.items() if k.startswith("decode ")}
    codec_s = sum(v[0] for v in encode.values()) + sum(v[0] for v in decode.values())
    measure_s = t["measure"][0]
    forward_s = t["layer_forward"][0] + t["embed"][0]
    stored = json.loads(sens.read_text())
    return {"convert_dry_run_s": time.perf_counter() - began, "measure_s": measure_s,
            "sensitivity_seconds_recorded": stored["seconds"], "tokens": stored["tokens"],
            "groups": len(stored["groups"]), "candidates": sum(len(g["candidates"]) for g in stored["groups"]),
            "degrade_s": t["degrade"][0], "codec_s": codec_s, "rebuild_s": t["degrade"][0] - codec_s,
            "layer_forward_s": t["layer_forward"][0], "layer_forwards": t["layer_forward"][1],
            "embed_s": t["embed"][0], "head_s": t["head"][0], "head_calls": t["head"][1],
            "other_s": measure_s - t["degrade"][0] - forward_s - t["head"][0],
            "forward_share_pct": 100 * (forward_s + t["head"][0]) / measure_s,
            "codec": {s: {"elements": encode[s][2], "encode_s": encode[s][0], "decode_s": decode[s][0],
                          "elements_per_s": encode[s][2] / (encode[s][0] + decode[s][0])} for s in encode},
            "load_1min": os.getloadavg()[0]}


# ---- outputs and evaluation --------------------------------------------------------------------------------
def gguf_facts(path: Path, costs: dict[str, dict[str, float]]) -> dict:
    """Per-tensor types of a written file, its predicted KLD as recorded, and the same sum formed from the
    sensitivity (None when a tensor has a type that was not measured)."""
    from quantkit.source.gguf_file import GGUFFile

    f = GGUFFile(path)
    types = {n: f.type_name(n) for n in f.tensors}
    summed, missing = 0.0, []
    for n, c in costs.items():
        if types.get(n) in c:
            summed += c[types[n]]
        else:
            missing.append(f"{n}:{types.get(n)}")
    recorded = f.metadata("quantize.auto.predicted_kld")
    counts: dict[str, int] = {}
    for n, ty in types.items():
        if n in costs:
            counts[ty] = counts.get(ty, 0) + 1
    return {"predicted_recorded": None if recorded is None else float(recorded),
            "predicted_sum": None if missing else summed, "unmeasured_types": missing, "type_counts": counts,
            "token_embd": types.get("token_embd.weight"), "output": types.get("output.weight")}


def run_model(name: str, args, result: dict) -> None:
    from quantkit.bundled import resolve_model
    from quantkit.convert import convert
    from quantkit.plan.allocate import Budget

    src = resolve_model(name)
    imatrix = REPO / "tests" / "data" / "llama_imatrix" / IMATRIX[name]
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    sens, timing_file = work / "sensitivity.json", work / "sensitivity_timing.json"
    m = result.setdefault(name, {"imatrix": str(imatrix.relative_to(REPO))})
    if args.reuse_sensitivity and sens.is_file() and timing_file.is_file():
        m["cost"] = json.loads(timing_file.read_text())
    else:
        m["cost"] = measure_timed(name, src, imatrix, sens)
        timing_file.write_text(json.dumps(m["cost"], indent=1))
    print(f"{name}: sensitivity {m['cost']['measure_s']:.0f} s", flush=True)
    began = time.perf_counter()
    ladder = convert(src, [f"gguf:{t}" for t in LADDER], work / "ladder", imatrix=imatrix, force=True)
    files = {f"{t} (imatrix)": {"kind": "ladder", "type": t, "path": str(p), "plan_bpw": plan.bpw}
             for t, (p, plan) in zip(LADDER, ladder, strict=True)}
    targets = {f"auto {b:.2f}": b for b in args.bpw}
    for _, plan in ladder:
        targets.setdefault(f"auto {plan.bpw:.2f}", plan.bpw)  # equal size to this ladder point
    for key, bpw in sorted(targets.items(), key=lambda kv: kv[1]):
        ((path, plan),) = convert(src, ["gguf:auto"], work / "auto", imatrix=imatrix, sensitivity=sens,
                                  device="cpu", sensitivity_samples=SENS_SAMPLES, calib_ctx=SENS_CTX,
                                  sensitivity_method="output",
                                  budget=Budget(bpw=bpw), force=True)
        files[key] = {"kind": "auto", "target_bpw": bpw, "path": str(path), "plan_bpw": plan.bpw,
                      "equal_to": [f"{t} (imatrix)" for t, (_, p) in zip(LADDER, ladder, strict=True)
                                   if f"{p.bpw:.2f}" == f"{bpw:.2f}"]}
    m["convert_s"] = time.perf_counter() - began
    costs = {g["name"]: {c["scheme"]: c["kld"] for c in g["candidates"]}
             for g in json.loads(sens.read_text())["groups"]}
    for v in files.values():
        v |= gguf_facts(Path(v["path"]), costs)
    score_files(files, src, work, args, m)
    print(f"{name}: convert {m['convert_s']:.0f} s, eval {m['eval_s']:.0f} s", flush=True)


# ---- analysis ----------------------------------------------------------------------------------------------
def spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def score_files(files: dict, src, work: Path, args, m: dict) -> None:
    """One `quantkit eval` (llama.cpp backend, no multiple choice) of every file against `src`: each file's
    record gains its KLD, top-1, PPL, bpw and size; `m` the eval's time, settings and baseline PPL."""
    ev = work / "eval"
    r = timed([sys.executable, "-m", "quantkit.cli", "eval", *(v["path"] for v in files.values()), "--baseline",
               str(src), "--ctx", str(args.ctx), "--windows", str(args.windows), "--mc-items", "0", "--backend",
               "llama.cpp", "--device", "cpu", "-o", str(ev), "--force"], quantkit_env(), work / "eval.log")
    if r["rc"]:
        raise SystemExit(f"eval failed: {r.get('error')} (see {work / 'eval.log'})")
    m["eval_s"] = r["wall_s"]
    data = json.loads((ev / "report.json").read_text())
    m["eval_settings"] = data["settings"]
    m["baseline_ppl"] = data["baseline"]["ppl"]
    by_path = {v["path"]: v for v in data["variants"]}
    for v in files.values():
        e = by_path[v["path"]]
        v |= {"kld_mean": e["kld"]["mean"], "kld_p99": e["kld"]["p99"], "top1_pct": e["top1_pct"],
              "ppl": e["ppl"], "delta_ppl_pct": e["delta_ppl_pct"], "bpw": e["bpw"], "size_bytes": e["size_bytes"]}
    m["files"] = files


def prediction(files: dict) -> dict:
    """How the summed calibration costs predict the measured held-out mean KLD."""
    auto = [v for v in files.values() if v["kind"] == "auto"]
    every = [v for v in files.values() if v["predicted_sum"] is not None]
    ratios = [v["kld_mean"] / v["predicted_recorded"] for v in auto]
    return {"auto_ratio_min": min(ratios), "auto_ratio_max": max(ratios),
            "auto_ratio_geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)),
            "auto_spearman": spearman([v["predicted_recorded"] for v in auto], [v["kld_mean"] for v in auto]),
            "all_spearman": spearman([v["predicted_sum"] for v in every], [v["kld_mean"] for v in every]),
            "all_n": len(every),
            "ladder_ratio_geomean": _geomean([v["kld_mean"] / v["predicted_sum"] for v in every
                                              if v["kind"] == "ladder"]),
            "recorded_vs_sum_max_rel": max(abs(v["predicted_recorded"] - v["predicted_sum"]) / v["predicted_sum"]
                                           for v in auto if v["predicted_sum"])}


def _geomean(xs: list[float]) -> float | None:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def claims(files: dict) -> dict:
    q4 = files["Q4_K_M (imatrix)"]
    auto = sorted((v for v in files.values() if v["kind"] == "auto"), key=lambda v: v["bpw"])
    both = [v for v in auto if v["bpw"] <= 4.5 and v["kld_mean"] < q4["kld_mean"] and v["kld_p99"] < q4["kld_p99"]]
    at4 = next((v for v in auto if abs(v["target_bpw"] - 4.0) < 1e-9), None)
    eq = next((v for v in auto if "Q4_K_M (imatrix)" in v["equal_to"]), None)
    out = {"q4_bpw": q4["bpw"], "q4_kld_mean": q4["kld_mean"], "q4_kld_p99": q4["kld_p99"],
           "le45_beats_both": bool(both), "le45_smallest_beating": both[0]["bpw"] if both else None}
    if at4:
        r = at4["kld_mean"] / q4["kld_mean"]
        out |= {"at4_mean_ratio": r, "at4_p99_ratio": at4["kld_p99"] / q4["kld_p99"],
                "at4_verdict": "beats" if r < 1 else ("matches" if r <= MATCH else "no")}
    if eq:
        out |= {"equal_mean_ratio": eq["kld_mean"] / q4["kld_mean"], "equal_p99_ratio": eq["kld_p99"] / q4["kld_p99"],
                "equal_top1_delta": eq["top1_pct"] - q4["top1_pct"]}
    return out


# ---- cost extrapolation ------------------------------------------------------------------------------------
def cpu_sgemm_flops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    began = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - began)


def layer_flops_per_token(arch, index: int, ctx: int, shapes: dict) -> float:
    """Multiply-adds x 2 of one decoder layer per token: its linears (routed experts: the active ones only) and the
    causal attention (on average ctx/2 keys per query)."""
    n_experts = getattr(arch, "n_routed_experts", 0) or 0
    active = (getattr(arch, "experts_per_token", 0) or 0) / n_experts if n_experts else 1.0
    flops = 0.0
    for name in arch.layer_weight_names(index):
        shape = shapes.get(name)
        if shape is None or len(shape) < 2 or "norm" in name:
            continue
        n = math.prod(shape) * (active if ".experts." in name and "shared" not in name else 1.0)
        flops += 2 * n
    heads = getattr(arch, "num_heads", None) or arch.config["num_attention_heads"]
    qk = getattr(arch, "qk_head_dim", None) or arch.config.get("head_dim") or arch.hidden_size // heads
    v = getattr(arch, "v_head_dim", None) or qk
    return flops + 2 * heads * (qk + v) * ctx / 2


def catalog_groups(repo: str):
    """A catalog model's architecture, its GGUF shapes and gguf:auto's groups as it measures them:
    (tensor, stage, candidate types after the row fallback, elements)."""
    from quantkit import catalog
    from quantkit.formats.gguf.auto import CANDIDATES, stage_of
    from quantkit.formats.gguf.format import model_facts
    from quantkit.formats.gguf.mixtures import allows_quantization, plan_types, row_fallback
    from quantkit.formats.gguf.tensors import mapping_for

    cat = catalog.load(repo)
    shapes = {t.name: t.shape for t in mapping_for(cat.arch).tensors()}
    base = plan_types(shapes, model_facts(cat), "Q8_0")
    groups = [(e.name, stage_of(e.name, cat.arch.num_layers),
               list(dict.fromkeys(row_fallback(e.name, e.shape[-1], c) for c in CANDIDATES)), math.prod(e.shape))
              for e in base.entries if e.quantized and allows_quantization(e.name, e.shape)]
    return cat.arch, shapes, groups


def extrapolate(repo: str, codec_eps: dict[str, float], cpu_flops: float, tokens: int, ctx: int,
                method: str = "output") -> dict:
    """`method` "proxy": each group's anchor runs to the output, its other candidates their own stage only (the
    embedding's: a lookup, no layer), except the head's, all measured at the output (calib/sensitivity.py)."""
    from quantkit.calib.sensitivity import EMBEDDING

    arch, shapes, groups = catalog_groups(repo)
    L = arch.num_layers
    hf_shapes = arch.tensor_shapes()
    per_layer = [layer_flops_per_token(arch, i, ctx, hf_shapes) for i in range(L)]
    after = [sum(per_layer[i:]) for i in range(L + 1)]  # flops of layers i..L-1
    head = 2 * arch.vocab_size * arch.hidden_size
    candidates = sum(len(s) for _, _, s, _ in groups)

    def at_output(stage: int, types: int) -> int:
        """How many of a group's candidates run from their stage to the output."""
        return types if method == "output" or stage == L else 1

    cand_layer_flops = sum(at_output(st, len(s)) * after[0 if st == EMBEDDING else st]
                           + (len(s) - at_output(st, len(s))) * (per_layer[st] if 0 <= st < L else 0)
                           for _, st, s, _ in groups)
    layer_forwards = sum(at_output(st, len(s)) * (L if st == EMBEDDING else L - st)
                         + (0 if st == EMBEDDING else len(s) - at_output(st, len(s))) for _, st, s, _ in groups)
    # the measurement's batches (calib/sensitivity.py: 1 GiB of candidates' hidden states per batch, per stage);
    # each batch of candidates measured at the output recomputes the reference head once and reads every later
    # layer once
    batch = max(1, (1 << 30) // (4 * tokens * arch.hidden_size))
    by_stage: dict[int, int] = {}
    for _, st, s, _ in groups:
        by_stage[st] = by_stage.get(st, 0) + at_output(st, len(s))
    n_batches = {st: math.ceil(n / batch) for st, n in by_stage.items()}
    layer_reads = sum(nb * (L if st == EMBEDDING else L - st) for st, nb in n_batches.items())
    # a batch also holds each candidate's decoded weights (float32) until its KLD is known
    per_stage: dict[int, list[int]] = {}
    for _, st, s, n in groups:
        per_stage.setdefault(st, []).extend([n] * len(s))
    batch_f32 = max(4 * sum(c[i:i + batch]) for c in per_stage.values() for i in range(0, len(c), batch))
    head_passes = sum(by_stage.values()) + sum(n_batches.values())
    flops = tokens * (2 * after[0] + cand_layer_flops + head * head_passes)
    elements = {}
    for _, _, s, n in groups:
        for scheme in s:
            elements[scheme] = elements.get(scheme, 0) + n
    # a type none of the bundled models measured (row fallbacks of narrow tensors: Q4_0, IQ4_NL, Q5_0, Q5_1) is
    # costed at the pooled rate of all measured types
    missing = [s for s in elements if s not in codec_eps]
    pooled = codec_eps.get("all", min(codec_eps.values()))
    encode_s = sum(n / codec_eps.get(s, pooled) for s, n in elements.items())
    layer_params = sum(math.prod(shapes[n]) for n in shapes if n.startswith("blk.")) / L
    largest = max(n for _, _, _, n in groups)
    return {"repo": repo, "layers": L, "gguf_tensors_measured": len(groups), "candidates": candidates,
            "method": method,
            "layer_forwards": layer_forwards + 2 * L, "head_forwards": head_passes,
            "tokens": tokens, "ctx": ctx, "flops_per_token_all_layers": after[0], "head_flops_per_token": head,
            "forward_flops": flops, "elements_encoded": sum(elements.values()), "elements_by_type": elements,
            "unmeasured_types": missing, "cpu_forward_h": flops / cpu_flops / 3600, "cpu_encode_h": encode_s / 3600,
            "gpu_forward_h": flops / GPU_FLOPS / 3600, "batch": batch, "batches": sum(n_batches.values()),
            "layer_reads": layer_reads, "params_per_layer_avg": layer_params,
            "layer_reads_f32_tb": 4 * layer_reads * layer_params / 1e12,
            "largest_tensor_f32_gb": 4 * largest / 1e9, "batch_replaced_f32_gb": batch_f32 / 1e9}


# ---- report ------------------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    models = list(report["models"])
    fig = Figure(figsize=(5 * len(models), 4.6), dpi=120)
    for i, name in enumerate(models):
        ax = fig.add_subplot(1, len(models), i + 1)
        files = report["models"][name]["files"]
        for kind, style, label in (("ladder", "o-", "uniform ladder (imatrix)"), ("auto", "s-", "gguf:auto")):
            rows = sorted((v for v in files.values() if v["kind"] == kind), key=lambda v: v["bpw"])
            line, = ax.plot([v["bpw"] for v in rows], [v["kld_mean"] for v in rows], style, label=label + " mean")
            ax.plot([v["bpw"] for v in rows], [v["kld_p99"] for v in rows], style[0] + ":", color=line.get_color(),
                    alpha=0.6, label=label + " p99")
            if kind == "ladder":
                for v in rows:
                    ax.annotate(v["type"], (v["bpw"], v["kld_mean"]), xytext=(4, 4), textcoords="offset points",
                                fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (all tensors)")
        ax.set_ylabel("KLD vs BF16 source (held-out text)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle("gguf:auto vs uniform llama.cpp types with the same imatrix: KLD vs bpw", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# gguf:auto vs the uniform ladder: quality per bit, and the cost of measuring", "",
             f"Date: {report['date']}  ", f"Commit: {report['commit']}  ",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores (shared with other work); "
             f"Python {report['machine']['python']}, torch {report['machine']['torch']}  ",
             f"Command: `{report['command']}`", "",
             f"Same calibration for every output of a model: the bundled llama-imatrix file as `--imatrix`, and one "
             f"sensitivity measurement ({SENS_SAMPLES} samples x {SENS_CTX} tokens of the bundled calibration split, "
             "convert's defaults) reused by every gguf:auto file. Same held-out text for every file: `quantkit "
             f"eval` on the bundled held-out text, llama.cpp backend, {s['windows']} windows of {s['ctx']} tokens, "
             "against the BF16 (tiny-deepseek: FP8) source. bpw: llama.cpp's (tensor bytes x 8 / all elements). "
             "`auto X` is `--to gguf:auto --target-bpw X`; the non-round targets are the ladder files' own bpw "
             "(equal tensor bytes).", "",
             "On these tiny models the token embedding and output matrices (3072 x 256 each; tied in tiny-qwen2) "
             "are a large share of all weights, and llama.cpp's mixtures keep them at high types (output Q6_K), so "
             "uniform Q4_K_M is about 5.1 bpw here, not the ~4.8 of a 7B model. Every bpw below counts them.", ""]
    for name, m in report["models"].items():
        files, c, p = m["files"], m["claims"], m["prediction"]
        lines += [f"## {name} (baseline PPL {m['baseline_ppl']:.3f})", "",
                  "| file | bpw | size (KiB) | KLD mean | KLD p99 | top-1 % | PPL | predicted KLD | measured / "
                  "predicted | token_embd / output |", "|---|---|---|---|---|---|---|---|---|---|"]
        for key, v in sorted(files.items(), key=lambda kv: (kv[1]["bpw"], kv[1]["kind"] != "ladder")):
            pred = v["predicted_recorded"] if v["kind"] == "auto" else v["predicted_sum"]
            eq = f" (= {', '.join(x.split()[0] for x in v['equal_to'])})" if v.get("equal_to") else ""
            lines.append(f"| {'**' + key + '**' if v['kind'] == 'auto' else key}{eq} | {v['bpw']:.3f} | "
                         f"{v['size_bytes'] / 1024:.0f} | {v['kld_mean']:.5f} | {v['kld_p99']:.4f} | "
                         f"{v['top1_pct']:.2f} | {v['ppl']:.3f} | {fmt(pred, '{:.5f}')}"
                         f"{'' if v['kind'] == 'auto' else ' (sum)'} | "
                         f"{fmt(v['kld_mean'] / pred if pred else None, '{:.2f}')} | "
                         f"{v['token_embd']} / {v['output'] or '(tied)'} |")
        verdict45 = (f"**yes**: from {c['le45_smallest_beating']:.2f} bpw" if c["le45_beats_both"] else "**no**")
        lines += ["", f"- Uniform Q4_K_M (imatrix): {c['q4_bpw']:.2f} bpw, KLD mean {c['q4_kld_mean']:.5f}, "
                      f"p99 {c['q4_kld_p99']:.4f}.",
                  f"- gguf:auto at <= 4.5 bpw beats Q4_K_M on both mean and p99 KLD: {verdict45}.",
                  f"- gguf:auto at 4.0 bpw vs Q4_K_M: mean KLD x{c['at4_mean_ratio']:.2f}, p99 x"
                  f"{c['at4_p99_ratio']:.2f}: **{c['at4_verdict']}** ('matches': mean within {MATCH - 1:.0%}).",
                  f"- At Q4_K_M's size (auto {c['q4_bpw']:.2f}): mean KLD x{c['equal_mean_ratio']:.2f}, p99 x"
                  f"{c['equal_p99_ratio']:.2f}, top-1 {c['equal_top1_delta']:+.2f} points.",
                  f"- Prediction (auto files): measured held-out mean KLD / predicted = {p['auto_ratio_min']:.2f} .. "
                  f"{p['auto_ratio_max']:.2f} (geometric mean {p['auto_ratio_geomean']:.2f}); Spearman "
                  f"{fmt(p['auto_spearman'], '{:.2f}')} over the auto files, {fmt(p['all_spearman'], '{:.2f}')} over "
                  f"all {p['all_n']} files (ladder: the same per-tensor sum from its types; its ratio "
                  f"{fmt(p['ladder_ratio_geomean'], '{:.2f}')}).", ""]
    lines += ["## Summary", "", "| model | Q4_K_M bpw | auto <= 4.5 beats Q4_K_M (mean and p99) | auto 4.0 / Q4_K_M "
              "mean, p99 | auto at Q4_K_M size / Q4_K_M mean, p99 | measured / predicted (auto) | Spearman auto, all |",
              "|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        c, p = m["claims"], m["prediction"]
        lines.append(f"| {name} | {c['q4_bpw']:.2f} | "
                     f"{'yes, from ' + format(c['le45_smallest_beating'], '.2f') if c['le45_beats_both'] else 'no'} | "
                     f"{c['at4_mean_ratio']:.2f}, {c['at4_p99_ratio']:.2f} ({c['at4_verdict']}) | "
                     f"{c['equal_mean_ratio']:.2f}, {c['equal_p99_ratio']:.2f} | {p['auto_ratio_min']:.2f}..."
                     f"{p['auto_ratio_max']:.2f} | {fmt(p['auto_spearman'], '{:.2f}')}, "
                     f"{fmt(p['all_spearman'], '{:.2f}')} |")
    lines += ["", "![KLD vs bpw](auto_quality.png)", "", "## Cost of the sensitivity measurement", "",
              "Measured here: wall time of quantkit.calib.sensitivity.measure alone (not the convert around it), "
              "split by timers wrapped around quantkit's functions in this process (quantkit unchanged): codec "
              "encode + decode of every candidate, the rest of preparing it (rebuilding the checkpoint tensors the "
              "forward reads), layer forwards (+ embedding), head (lm_head on every sample, per candidate and per "
              "batch reference), other (log-softmax/KLD arithmetic, bookkeeping). Torch on 2 threads; the machine "
              "was shared, the 1-minute load at the end of each measurement is given.", "",
              "| model | groups | candidates | tokens | measure s | codec s | rebuild s | layer forwards (n) s "
              "| head s | other s | forward share | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        k = m["cost"]
        lines.append(f"| {name} | {k['groups']} | {k['candidates']} | {k['tokens']} | {k['measure_s']:.0f} | "
                     f"{k['codec_s']:.0f} | {k['rebuild_s']:.1f} | {k['layer_forward_s'] + k['embed_s']:.0f} "
                     f"({k['layer_forwards']}) | {k['head_s']:.0f} | {k['other_s']:.0f} | "
                     f"{k['forward_share_pct']:.0f}% | {k['load_1min']:.1f} |")
    x = report["extrapolation"]
    lines += ["", "Codec throughput measured in those runs (encode + decode with the imatrix, all three models' "
              "candidates pooled; rows of 256..768 elements):", "",
              "| type | elements | elements/s |", "|---|---|---|"]
    for s, e in x["codec_eps"].items():
        n = x["codec_elements"].get(s, sum(x["codec_elements"].values()))
        lines.append(f"| {s} | {n:,} | {e / 1e6:.2f} M |")
    lines += ["", f"This CPU's float32 matmul rate (torch.mm 2048^3, 2 threads): {x['cpu_flops'] / 1e9:.0f} GFLOP/s; "
              f"the tiny models' layer forwards reached {x['tiny_flops'] / 1e9:.1f} GFLOP/s (tiny matrices).", "",
              "Extrapolation (arithmetic from the catalog configs, not a run): candidates = every quantizable GGUF "
              "tensor x its distinct candidate types after llama.cpp's row fallback (7); layer-forwards = per "
              "candidate the layers from its own to the last (the embedding's: all), plus the float pass (2 x "
              "layers); FLOPs per layer-forward per token = 2 x its linear weights (MoE: shared experts, router and "
              "the 8 active of 256 routed experts) + causal attention at ctx/2 keys; plus, per candidate and per "
              f"batch reference, the lm_head over all tokens; {SENS_SAMPLES} x {SENS_CTX} = "
              f"{SENS_SAMPLES * SENS_CTX} calibration tokens. CPU forward hours at the matmul rate above (a lower "
              "bound: real layer forwards reach less); encode hours from the measured per-type throughput (k-quant "
              "scale searches with the imatrix, in torch). Not counted: reading and dequantizing the float layers "
              "(`layer reads` below: each batch of candidates re-reads every later layer).", "",
              "| model | layers | GGUF tensors | candidates | layer-forwards | forward PFLOP | encoded elements | "
              "CPU forward h | CPU encode h | CPU total h | GPU forward h (arithmetic) | batch / batches | "
              "layer reads | largest tensor f32 GB (largest batch's decoded weights) |", "|---" * 14 + "|"]
    for r in x["models"]:
        lines.append(f"| {r['repo'].split('/')[1]} | {r['layers']} | {r['gguf_tensors_measured']} | "
                     f"{r['candidates']:,} | {r['layer_forwards']:,} | {r['forward_flops'] / 1e15:.1f} | "
                     f"{r['elements_encoded'] / 1e9:,.0f} G | {r['cpu_forward_h']:,.1f} | {r['cpu_encode_h']:,.1f} | "
                     f"{r['cpu_forward_h'] + r['cpu_encode_h']:,.1f} | {r['gpu_forward_h']:.2f} | "
                     f"{r['batch']} / {r['batches']} | {r['layer_reads']:,} ({r['layer_reads_f32_tb']:,.0f} TB f32) | "
                     f"{r['largest_tensor_f32_gb']:.1f} ({r['batch_replaced_f32_gb']:.0f}) |")
    for r in x["models"]:
        if r["unmeasured_types"]:
            lines += ["", f"{r['repo'].split('/')[1]}: the row fallbacks {', '.join(r['unmeasured_types'])} (narrow "
                      "tensors) were not measured on the bundled models; costed at the pooled rate of all types."]
    lines += ["", f"GPU column: the forward FLOPs at {GPU_FLOPS / 1e12:.1f} TFLOP/s (half of an H100 SXM's 67 TFLOP/s "
              "FP32, the measurement runs float32): arithmetic, no GPU was used. The encode part on a GPU was not "
              "measured (the codecs run on CUDA, but at an unknown rate); on this CPU it is "
              + " and ".join(f"{100 * r['cpu_encode_h'] / (r['cpu_forward_h'] + r['cpu_encode_h']):.0f}% "
                             f"({r['repo'].split('/')[1]})" for r in x["models"]) + " of the total.", "",
              "Layer reads: each batch of candidates reads (and for FP8 sources dequantizes) every later layer in "
              "float32 once; `largest batch's decoded weights`: the float32 weights of the candidates one batch "
              "holds at once (the batch size bounds only their hidden states, 1 GiB), besides one float32 layer.",
              ""]
    lines += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def analyse(report: dict) -> None:
    pooled: dict[str, list[float]] = {}
    tiny_flops = tiny_s = 0.0
    from quantkit.bundled import resolve_model
    from quantkit.model import Model

    for name, m in report["models"].items():
        m["claims"] = claims(m["files"])
        m["prediction"] = prediction(m["files"])
        for s, c in m["cost"]["codec"].items():
            row = pooled.setdefault(s, [0, 0.0])
            row[0] += c["elements"]
            row[1] += c["encode_s"] + c["decode_s"]
        with Model(resolve_model(name), device="cpu") as model:
            hf_shapes = model.arch.tensor_shapes()
            per_tok = sum(layer_flops_per_token(model.arch, i, SENS_CTX, hf_shapes)
                          for i in range(model.arch.num_layers))
            tiny_flops += per_tok / model.arch.num_layers * m["cost"]["layer_forwards"] * m["cost"]["tokens"]
        tiny_s += m["cost"]["layer_forward_s"]
    eps = {s: n / t for s, (n, t) in pooled.items()}
    eps["all"] = sum(n for n, _ in pooled.values()) / sum(t for _, t in pooled.values())
    cpu = report.get("extrapolation", {}).get("cpu_flops") or cpu_sgemm_flops()  # --report-only: the run's rate
    report["extrapolation"] = {
        "codec_eps": eps, "codec_elements": {s: n for s, (n, _) in pooled.items()}, "cpu_flops": cpu,
        "tiny_flops": tiny_flops / tiny_s, "gpu_flops_assumed": GPU_FLOPS,
        "models": [extrapolate(r, eps, cpu, SENS_SAMPLES * SENS_CTX, SENS_CTX) for r in EXTRAPOLATE]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_bench_args(parser, "/tmp/auto-quality", "auto_quality")
    parser.add_argument("--bpw", default="3.5,4.0,4.5,5.5", help="gguf:auto targets besides the ladder's own bpw")
    parser.add_argument("--reuse-sensitivity", action="store_true",
                        help="reuse the work folder's sensitivity file and its timing instead of measuring again")
    args = parser.parse_args(argv)
    args.bpw = [float(b) for b in args.bpw.split(",")]
    settings = {"windows": args.windows, "ctx": args.ctx, "bpw": args.bpw, "ladder": LADDER}
    report = per_model_report(args, "auto_quality.py", argv, settings, run_model)
    analyse(report)
    write_results(args.out, report, markdown(report))
    plot(report, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
