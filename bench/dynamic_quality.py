"""Issue 18: the dynamic (Unsloth-style) MoE mixes of recipes/r1-671b.yaml vs uniform i-quants and gguf:auto at
equal size, on the bundled MoE model tiny-deepseek.

    python bench/dynamic_quality.py [--recipe recipes/r1-671b.yaml] [--windows 60] [--ctx 256]
                                    [--work /tmp/dynamic-quality] [--reuse-sensitivity] [--report-only]

A separate script rather than a mode of bench/auto_quality.py: that one's outputs, claims (auto at <= 4.5 bpw vs
Q4_K_M), table and cost extrapolation are all built around one reference file per model; here the references are
four hand mixes, each with its own equal-size auto file and nearest ladder file. What they share is imported from
it: the imatrix files, the sensitivity settings, the timed sensitivity measurement (measure_timed), the per-file
facts (gguf_facts) and the MATCH threshold.

Everything uses one calibration: the bundled llama-imatrix file (tests/data/llama_imatrix) as `--imatrix`, and one
sensitivity measurement (convert's defaults, 8 x 512 tokens; on this MoE model with the i-quants as candidates for
every tensor the imatrix covers) stored in the work folder and reused by every gguf:auto file. Outputs:
- the uniform llama.cpp ladder with the imatrix, i-quants IQ1_S..IQ3_M plus Q2_K, Q3_K_M and IQ4_XS (the hand
  mixes weigh 4.0-4.5 bpw here, so the ladder reaches past them);
- the recipe's `dynamic-*` variants (their `to`, tensor_types, output_tensor_type and token_embedding_type read
  from the YAML), with their layer ranges moved from R1's first_k_dense_replace to the model's (adapt_rules);
- per hand mix, `--to gguf:auto --target-size <the hand mix's file size in bytes>`.
One `quantkit eval` (llama.cpp backend) scores all of them against the FP8 source on the bundled held-out text.

Results: bench/results/dynamic_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from auto_quality import IMATRIX, MATCH, SENS_CTX, SENS_SAMPLES, gguf_facts, measure_timed, score_files  # noqa: E402
from peer_common import fmt, report_head, write_results  # noqa: E402

MODEL = "tiny-deepseek"
LADDER = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "Q2_K",
          "Q3_K_M", "IQ4_XS")
EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")


# ---- the hand mixes -----------------------------------------------------------------------------------------
def first_dense(config: dict) -> int:
    return int(config.get("first_k_dense_replace") or 0)


def adapt_rules(rules: list[str], k_from: int, k_to: int) -> tuple[list[str], list[str]]:
    """The recipe's rules with R1's layer ranges moved to a model whose first k_to layers are dense: the dense
    range [0-(k_from-1)] becomes [0-(k_to-1)], and a range starting at the first MoE layer (k_from) becomes the
    model's first MoE layer alone. Returns the rules and what was changed."""
    dense = re.escape(rf"^blk\.[0-{k_from - 1}]\.")
    first_moe = re.escape(rf"^blk\.[{k_from}-") + r"\d\]\\\."
    out, changes = [], []
    for rule in rules:
        new = re.sub(dense, lambda _: (rf"^blk\.[0-{k_to - 1}]\." if k_to > 1 else r"^blk\.0\."), rule)
        new = re.sub(first_moe, lambda _: rf"^blk\.{k_to}\.", new)
        if new != rule:
            changes.append(f"{rule} -> {new}")
        out.append(new)
    return out, changes


def hand_mixes(recipe_path: Path, k_to: int) -> list[dict]:
    from quantkit.recipe.schema import load_recipe

    recipe = load_recipe(recipe_path)
    catalog = json.loads((REPO / "quantkit" / "catalog" / "models.json").read_text())
    k_from = first_dense(catalog[recipe.models[0].path])
    mixes = []
    for v in recipe.variants:
        if not v.name.startswith("dynamic-"):
            continue
        rules, changes = adapt_rules(list(v.tensor_types), k_from, k_to)
        if len(changes) != 2:
            raise SystemExit(f"{v.name}: expected to move the dense range and the first-MoE range, moved {changes}")
        mixes.append({"name": v.name, "to": v.to, "recipe_rules": list(v.tensor_types), "rules": rules,
                      "changes": changes, "output_tensor_type": v.output_tensor_type,
                      "token_embedding_type": v.token_embedding_type, "r1_first_k_dense": k_from})
    return mixes


def verbatim_check(src: Path, imatrix: Path, mix: dict) -> str | None:
    """Whether the recipe's rules as written (R1's layer numbers) plan on this model; the error if not."""
    from quantkit.convert import convert
    from quantkit.errors import QuantkitError

    try:
        convert(src, [mix["to"]], None, dry_run=True, imatrix=imatrix, target_options=[
            {"tensor_types": mix["recipe_rules"], "output_tensor_type": mix["output_tensor_type"],
             "token_embedding_type": mix["token_embedding_type"]}])
    except QuantkitError as exc:
        return str(exc)
    return None


def expert_types(path: Path) -> dict[str, str]:
    """The routed experts' types per layer: {'2': 'gate IQ1_S, up IQ1_S, down IQ2_XXS', ...}."""
    from quantkit.source.gguf_file import GGUFFile

    f = GGUFFile(path)
    layers: dict[str, list[str]] = {}
    for n in f.tensors:
        m = EXPERTS.match(n)
        if m:
            layers.setdefault(m.group(1), []).append(f"{m.group(2)} {f.type_name(n)}")
    return {k: ", ".join(sorted(v, key=lambda s: ("gate", "up", "down").index(s.split()[0])))
            for k, v in sorted(layers.items())}


# ---- run ----------------------------------------------------------------------------------------------------
def run(args, m: dict) -> None:
    from quantkit.bundled import resolve_model
    from quantkit.convert import convert
    from quantkit.plan.allocate import Budget

    src = resolve_model(MODEL)
    imatrix = REPO / "tests" / "data" / "llama_imatrix" / IMATRIX[MODEL]
    work = args.work / MODEL
    work.mkdir(parents=True, exist_ok=True)
    sens, timing_file = work / "sensitivity.json", work / "sensitivity_timing.json"
    m["imatrix"] = str(imatrix.relative_to(REPO))
    if args.reuse_sensitivity and sens.is_file() and timing_file.is_file():
        m["cost"] = json.loads(timing_file.read_text())
    else:
        m["cost"] = measure_timed(MODEL, src, imatrix, sens)
        timing_file.write_text(json.dumps(m["cost"], indent=1))
    print(f"sensitivity {m['cost']['measure_s']:.0f} s, {m['cost']['candidates']} candidates", flush=True)

    config = json.loads((Path(src) / "config.json").read_text())
    m["first_k_dense_replace"] = first_dense(config)
    mixes = hand_mixes(args.recipe, m["first_k_dense_replace"])
    m["verbatim_error"] = verbatim_check(src, imatrix, mixes[0])
    began = time.perf_counter()
    ladder = convert(src, [f"gguf:{t}" for t in LADDER], work / "ladder", imatrix=imatrix, force=True)
    files = {f"{t} (imatrix)": {"kind": "ladder", "type": t, "path": str(p)}
             for t, (p, _) in zip(LADDER, ladder, strict=True)}
    written = convert(src, [x["to"] for x in mixes], None, imatrix=imatrix, force=True,
                      paths=[work / "hand" / f"{MODEL}-{x['name']}.gguf" for x in mixes],
                      target_options=[{"tensor_types": x["rules"], "output_tensor_type": x["output_tensor_type"],
                                       "token_embedding_type": x["token_embedding_type"]} for x in mixes])
    for x, (p, _) in zip(mixes, written, strict=True):
        size = p.stat().st_size
        files[x["name"]] = {"kind": "hand", "path": str(p), "mix": x}
        ((path, _),) = convert(src, ["gguf:auto"], work / "auto", imatrix=imatrix, sensitivity=sens, device="cpu",
                               sensitivity_samples=SENS_SAMPLES, calib_ctx=SENS_CTX, sensitivity_method="output",
                               budget=Budget(size=size, given=str(size)), force=True)
        files[f"auto = {x['name']}"] = {"kind": "auto", "path": str(path), "target_size": size, "equal_to": x["name"]}
    m["convert_s"] = time.perf_counter() - began
    costs = {g["name"]: {c["scheme"]: c["kld"] for c in g["candidates"]}
             for g in json.loads(sens.read_text())["groups"]}
    for v in files.values():
        v |= gguf_facts(Path(v["path"]), costs) | {"experts": expert_types(Path(v["path"]))}
    print(f"convert {m['convert_s']:.0f} s; eval of {len(files)} files", flush=True)
    score_files(files, src, work, args, m)
    print(f"eval {m['eval_s']:.0f} s", flush=True)


# ---- analysis -----------------------------------------------------------------------------------------------
def verdicts(files: dict) -> list[dict]:
    ladder = [(k, v) for k, v in files.items() if v["kind"] == "ladder"]
    out = []
    for key, h in files.items():
        if h["kind"] != "hand":
            continue
        larger = [(k, v) for k, v in ladder if v["size_bytes"] >= h["size_bytes"]]
        near_key, near = min(ladder, key=lambda kv: abs(kv[1]["size_bytes"] - h["size_bytes"]))
        auto = next(v for v in files.values() if v["kind"] == "auto" and v["equal_to"] == key)
        ratio = auto["kld_mean"] / h["kld_mean"]
        out.append({
            "hand": key, "size_bytes": h["size_bytes"], "bpw": h["bpw"], "kld_mean": h["kld_mean"],
            "larger_ladder": [k for k, _ in larger],
            "beats_larger": [k for k, v in larger if h["kld_mean"] < v["kld_mean"]],
            "beats_all_larger": bool(larger) and all(h["kld_mean"] < v["kld_mean"] for _, v in larger),
            "smaller_ladder_beating_it": [k for k, v in ladder if v["size_bytes"] < h["size_bytes"]
                                          and v["kld_mean"] <= h["kld_mean"]],
            "nearest": near_key, "nearest_size_rel": near["size_bytes"] / h["size_bytes"] - 1,
            "nearest_mean_ratio": h["kld_mean"] / near["kld_mean"], "nearest_p99_ratio": h["kld_p99"] / near["kld_p99"],
            "named_uniform": h["mix"]["to"].split(":")[1],
            "named_uniform_mean_ratio": h["kld_mean"] / files[f"{h['mix']['to'].split(':')[1]} (imatrix)"]["kld_mean"],
            "auto_size_bytes": auto["size_bytes"], "auto_mean_ratio": ratio,
            "auto_p99_ratio": auto["kld_p99"] / h["kld_p99"], "auto_top1_delta": auto["top1_pct"] - h["top1_pct"],
            "auto_verdict": "beats" if ratio < 1 else ("matches" if ratio <= MATCH else "no")})
    return out


def share(files: dict) -> dict:
    """The routed experts' share of all elements, and of each hand mix's tensor bytes."""
    from quantkit.source.gguf_file import GGUFFile

    out = {}
    for key, v in files.items():
        if v["kind"] not in ("hand", "ladder") or (v["kind"] == "ladder" and out):
            continue
        f = GGUFFile(Path(v["path"]))
        if "experts_elements" not in out:
            out["experts_elements"] = (sum(math.prod(f.shape(n)) for n in f.tensors if EXPERTS.match(n))
                                       / sum(math.prod(f.shape(n)) for n in f.tensors))
        if v["kind"] == "hand":
            out[key] = (sum(f.tensors[n].nbytes for n in f.tensors if EXPERTS.match(n))
                        / sum(t.nbytes for t in f.tensors.values()))
    return out


def markdown(report: dict) -> str:
    m, s = report["model"], report["settings"]
    files = m["files"]
    k = m["cost"]
    prior = report.get("auto_quality_cost")
    lines = ["# Dynamic MoE mixes vs uniform i-quants vs gguf:auto at equal size (tiny-deepseek, issue 18)", "",
             f"Date: {report['date']}  ", f"Commit: {report['commit']}  ",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores (shared with other work); "
             f"Python {report['machine']['python']}, torch {report['machine']['torch']}  ",
             f"Command: `{report['command']}`", "",
             "One calibration for every file: the bundled llama-imatrix file (`" + m["imatrix"] + "`) as `--imatrix`, "
             f"and one sensitivity measurement ({SENS_SAMPLES} x {SENS_CTX} tokens of the bundled calibration split, "
             "convert's defaults; the i-quants IQ1_S..IQ3_S are candidates for every tensor the imatrix covers) "
             "reused by every gguf:auto file. One `quantkit eval` of all files on the bundled held-out text, "
             f"llama.cpp backend, {s['windows']} windows of {s['ctx']} tokens, against the FP8 source (the same "
             "setting as bench/results/auto_quality.md, whose Q2_K / Q3_K_M / IQ4_XS files recur here). bpw: "
             "llama.cpp's (tensor bytes x 8 / all elements); size: the file's bytes.", "",
             "Files: `X (imatrix)` is llama.cpp's file type X; `dynamic-*` the hand mixes of "
             "recipes/r1-671b.yaml (their `to`, tensor_types, output and token-embedding types read from the YAML); "
             "`auto = dynamic-*` is `--to gguf:auto --target-size <that hand mix's file size in bytes>`.", "",
             "## How the R1 recipe maps onto tiny-deepseek", "",
             f"R1's first {m['hand_mixes'][0]['r1_first_k_dense']} layers are dense (first_k_dense_replace), "
             f"tiny-deepseek's first {m['first_k_dense_replace']} of 4; its layers 2-3 are MoE (8 routed experts + "
             "a shared expert). The recipe's rules name R1's layers: `^blk\\.[0-2]\\.ffn_` (dense layers) would "
             "also take all of tiny-deepseek's layer 2 to Q6_K, routed experts included (half of its routed "
             "experts), and `^blk\\.[3-5]\\.ffn_down_exps` would hit its last MoE layer. As written the recipe "
             "does not even plan here: " + (f"`{m['verbatim_error']}`" if m["verbatim_error"] else "(it planned)") +
             ". So the layer ranges are moved by the model's first_k_dense_replace (everything else is the "
             "recipe's text):", ""]
    lines += [f"- `{c}`" for c in m["hand_mixes"][0]["changes"]]
    lines += ["", "i.e. dense layers 0-1 and every shared expert and `attn_kv_a_mqa` at Q6_K, the rest of MLA "
              "attention at Q4_K, the output at Q6_K, token_embd at Q4_K, and of the routed experts only the "
              "first MoE layer's ffn_down_exps a step up. R1 steps up 3 of its 58 MoE layers' down projections; "
              "here it is 1 of 2.", "",
              "Sizes behave differently from R1: there the routed experts are ~88% of the weights, so the mixes "
              "weigh 1.6-2.5 bpw; here they are " + fmt(100 * m["share"]["experts_elements"]
                                                       if m["share"]["experts_elements"] else None, "{:.0f}") +
              "% of all elements, and token_embd and output (3072 x 256 each) are large, so the four hand mixes "
              "weigh " + f"{min(v['bpw'] for v in files.values() if v['kind'] == 'hand'):.2f}-"
              f"{max(v['bpw'] for v in files.values() if v['kind'] == 'hand'):.2f} bpw, "
              "above every uniform IQ1/IQ2 file; the uniform file of their size is an IQ3 or Q3_K_M. "
              "'dynamic-IQ1_S beats uniform IQ1_S' is therefore no equal-size comparison on this model; the "
              "equal-size ones are below.", "",
              f"## Results (baseline PPL {m['baseline_ppl']:.3f}), sorted by size", "",
              "| file | bpw | size (bytes) | KLD mean | KLD p99 | top-1 % | PPL | predicted KLD | token_embd / output "
              "| routed experts (layer 2; layer 3) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in sorted(files.items(), key=lambda kv: (kv[1]["size_bytes"], kv[0])):
        pred = v["predicted_recorded"] if v["kind"] == "auto" else v["predicted_sum"]
        name = f"**{key}**" if v["kind"] == "hand" else (f"*{key}*" if v["kind"] == "auto" else key)
        ex = "; ".join(v["experts"].values())
        lines.append(f"| {name} | {v['bpw']:.3f} | {v['size_bytes']:,} | {v['kld_mean']:.5f} | {v['kld_p99']:.4f} | "
                     f"{v['top1_pct']:.2f} | {v['ppl']:.3f} | {fmt(pred, '{:.5f}')}"
                     f"{'' if v['kind'] == 'auto' or pred is None else ' (sum)'} | "
                     f"{v['token_embd']} / {v['output']} | {ex} |")
    lines += ["", "Predicted KLD: auto files, the plan's quantize.auto.predicted_kld; the others, the same per-tensor "
              "sum of the measured costs formed from their types (— where a type was not measured).", "",
              "## Verdicts", "",
              "| hand mix | size | KLD mean | uniform files >= its size | beats them all? | nearest uniform (size) "
              "| mean KLD / nearest's | vs its namesake uniform (mean KLD x) | auto at its size: mean x, p99 x, "
              "top-1 | auto verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in m["verdicts"]:
        lost = ", ".join(x.split()[0] for x in d["larger_ladder"] if x not in d["beats_larger"])
        beats = "**yes**" if d["beats_all_larger"] else "**no**" + (f" (loses to {lost})" if lost else "")
        lines.append(f"| {d['hand']} | {d['size_bytes']:,} | {d['kld_mean']:.5f} | "
                     f"{', '.join(x.split()[0] for x in d['larger_ladder']) or 'none'} | "
                     f"{beats} | "
                     f"{d['nearest'].split()[0]} ({d['nearest_size_rel']:+.1%}) | x{d['nearest_mean_ratio']:.2f} | "
                     f"{d['named_uniform']}: x{d['named_uniform_mean_ratio']:.2f} | x{d['auto_mean_ratio']:.2f}, "
                     f"x{d['auto_p99_ratio']:.2f}, {d['auto_top1_delta']:+.2f} pts | **{d['auto_verdict']}** |")
    lines += ["", f"'matches': auto's mean KLD within {MATCH - 1:.0%} of the hand mix's (auto_quality's MATCH); "
              "'beats': lower. The namesake column compares with the much smaller uniform file the mix is named "
              "after (not equal size).", ""]
    smaller = [(d["hand"], d["smaller_ladder_beating_it"]) for d in m["verdicts"] if d["smaller_ladder_beating_it"]]
    if smaller:
        lines += ["Uniform files smaller than a hand mix with a mean KLD as low or lower: " +
                  "; ".join(f"{h}: {', '.join(x.split()[0] for x in s)}" for h, s in smaller) + ".", ""]
    lines += ["## Cost of the sensitivity measurement", "",
              "Wall time of quantkit.calib.sensitivity.measure alone (auto_quality.measure_timed: the same timers, "
              "quantkit unchanged), torch on 2 threads, the machine shared (1-minute load at the end given).", "",
              "| run | groups | candidates | measure s | codec s | layer forwards (n) s | head s | other s | load |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = [("this run (with the i-quant candidates)", k)]
    if prior:
        rows.append((f"auto_quality.md, {prior['date']} ({prior['commit']}; no i-quant candidates)", prior["cost"]))
    for label, c in rows:
        lines.append(f"| {label} | {c['groups']} | {c['candidates']} | {c['measure_s']:.0f} | {c['codec_s']:.0f} | "
                     f"{c['layer_forward_s'] + c['embed_s']:.0f} ({c['layer_forwards']}) | {c['head_s']:.0f} | "
                     f"{c['other_s']:.0f} | {c['load_1min']:.1f} |")
    if prior:
        lines += ["", f"x{k['measure_s'] / prior['cost']['measure_s']:.2f} the time for x"
                  f"{k['candidates'] / prior['cost']['candidates']:.2f} the candidates (both on the shared machine; "
                  "the loads differ, so the ratio is rough)."]
    lines += ["", "Codec time per type in this measurement (encode + decode with the imatrix):", "",
              "| type | elements | s | elements/s |", "|---|---|---|---|"]
    for t, c in sorted(k["codec"].items(), key=lambda kv: kv[1]["elements_per_s"]):
        lines.append(f"| {t} | {c['elements']:,} | {c['encode_s'] + c['decode_s']:.1f} | "
                     f"{c['elements_per_s'] / 1e6:.2f} M |")
    lines += ["", f"Converts of all files: {m['convert_s']:.0f} s; the eval: {m['eval_s']:.0f} s.", ""]
    lines += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "r1-671b.yaml")
    parser.add_argument("--windows", type=int, default=60)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dynamic-quality"))
    parser.add_argument("--reuse-sensitivity", action="store_true",
                        help="reuse the work folder's sensitivity file and its timing instead of measuring again")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the results from the work folder's raw.json")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dynamic_quality")
    parser.add_argument("--note", action="append", default=[], help="a remark for the results (repeatable)")
    args = parser.parse_args(argv)
    raw = args.work / "raw.json"
    if args.report_only:
        report = json.loads(raw.read_text())
        report["notes"] = args.note or report.get("notes", [])
    else:
        report = report_head("dynamic_quality.py", argv) | {"model": {}, "notes": args.note}
        report["settings"] = {"windows": args.windows, "ctx": args.ctx, "ladder": LADDER,
                              "recipe": str(args.recipe.resolve().relative_to(REPO))}
        args.work.mkdir(parents=True, exist_ok=True)
        run(args, report["model"])
        raw.write_text(json.dumps(report, indent=1))
    m = report["model"]
    from quantkit.bundled import resolve_model

    m["hand_mixes"] = hand_mixes(REPO / report["settings"]["recipe"],
                                 first_dense(json.loads((Path(resolve_model(MODEL)) / "config.json").read_text())))
    m["verdicts"] = verdicts(m["files"])
    m["share"] = share(m["files"])
    prior = REPO / "bench" / "results" / "auto_quality.json"
    if prior.is_file():
        p = json.loads(prior.read_text())
        if MODEL in p.get("models", {}):
            report["auto_quality_cost"] = {"date": p["date"], "commit": p["commit"], "cost": p["models"][MODEL]["cost"]}
    write_results(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
