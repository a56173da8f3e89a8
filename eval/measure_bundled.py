"""Measure the bundled models: did they learn, and does quantization visibly cost quality?

    python -m eval.measure_bundled [--models DIR...] [--windows N] [--write-readmes]

For each model, on the held-out split (quantkit's reference forward, float32):
- perplexity the llama.cpp way: non-overlapping windows of --ctx tokens (--windows of them, spread evenly
  over the held-out text), only the second half of each window scored; the unigram baseline of the same
  tokenizer (train-split counts, add-one) on the same positions;
- llama.cpp's file types Q8_0, Q6_K, Q4_K_M and Q4_0 (its mixture rules: output.weight stays Q6_K), and
  Q4_0 --pure (every weight matrix plain 4-bit round-to-nearest), through quantkit's ggml codecs (byte-exact
  with llama-quantize): each weight is what a llama.cpp user would hold. For each: perplexity change with a
  paired 2-sigma interval over windows, KL divergence from the full model, top-1 agreement;
- multiple-choice accuracy on eval/tasks/stdlib_nextline.jsonl (acc and byte-length-normalised acc);
- for MoE models, tokens routed to each expert of each MoE layer.
Results go to eval/results/bundled_models.json.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from eval.train_models import CONTEXT, RECIPES
from quantkit.bundled import textsets
from quantkit.model import Model
from quantkit.testing.tokenizer import EOS

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "quantkit" / "bundled" / "models"
TASKS = ROOT / "eval" / "tasks" / "stdlib_nextline.jsonl"
RESULTS = ROOT / "eval" / "results" / "bundled_models.json"


# ---- llama.cpp's types, through quantkit's ggml codecs and mixture rules ------------------------------------
VARIANTS = {  # label -> (llama.cpp file type, --pure)
    "Q8_0": ("Q8_0", False),
    "Q6_K": ("Q6_K", False),
    "Q4_K_M": ("Q4_K_M", False),
    "Q4_0": ("Q4_0", False),  # llama.cpp's Q4_0 file: output.weight (or the tied embedding) stays Q6_K
    "Q4_0 pure": ("Q4_0", True),  # plain round-to-nearest 4-bit for every weight matrix
}


def quantized_weights(model: Model, file_type: str, pure: bool) -> Callable[[str], torch.Tensor]:
    """Checkpoint tensors after a GGUF round trip of this file type: each GGUF tensor is encoded with the type
    llama-quantize would give it and decoded again (exactly what llama.cpp would hold)."""
    from quantkit.formats import ConvertOptions, get_format
    from quantkit.formats.gguf.tensors import mapping_for
    from quantkit.quant import get_codec

    gguf_format, mapping = get_format("gguf"), mapping_for(model.arch)
    options = ConvertOptions(pure=pure)
    gguf_format.prepare(model, options)
    plan = gguf_format.plan(model, gguf_format.parse_spec(file_type), options)
    source = model.weights()
    gguf: dict[str, torch.Tensor] = {}
    for t in mapping.tensors():
        codec = get_codec(plan.schemes[t.name])
        pieces = [codec.decode(codec.encode(p), p.shape[-1]) for p in t.pieces(source)]
        gguf[t.name] = torch.cat(pieces).reshape(t.shape)
    return mapping.weights_from_gguf(gguf.__getitem__)


# ---- evaluation ------------------------------------------------------------------------------------------
def cached_weights(model: Model, transform=None) -> Callable[[str], torch.Tensor]:
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in cache:
            w = model.source.read(name)
            cache[name] = transform(name, w) if transform and w.dim() >= 2 else w
        return cache[name]

    return get


def windows(tokens: torch.Tensor, ctx: int, count: int) -> torch.Tensor:
    """`count` non-overlapping windows spread evenly over the whole text (all of them if fewer fit)."""
    every = tokens[: len(tokens) // ctx * ctx].view(-1, ctx)
    picks = torch.linspace(0, len(every) - 1, min(count, len(every))).round().long()
    return every[picks]


@torch.no_grad()
def score(model: Model, weights, batches: torch.Tensor, ref_logprobs=None, batch_size: int = 8) -> dict:
    """Per-window mean NLL of the second half; with ref_logprobs, KLD and top-1 agreement against them."""
    ctx = batches.shape[1]
    first = ctx // 2
    nll, kld, agree, logprobs = [], [], [], []
    for start in range(0, len(batches), batch_size):
        ids = batches[start:start + batch_size]
        logits = model.arch.forward(weights, ids)[:, first - 1:-1].float()
        lp = F.log_softmax(logits, dim=-1)
        target = ids[:, first:]
        nll.append(-lp.gather(-1, target[..., None])[..., 0].mean(-1))
        logprobs.append(lp)
        if ref_logprobs is not None:
            ref = ref_logprobs[start // batch_size]
            kld.append((ref.exp() * (ref - lp)).sum(-1).flatten())
            agree.append((ref.argmax(-1) == lp.argmax(-1)).float().flatten())
    out = {"window_nll": torch.cat(nll), "logprobs": logprobs}
    if ref_logprobs is not None:
        out["kld"] = torch.cat(kld)
        out["top1"] = torch.cat(agree)
    return out


def unigram_nll(train_tokens: torch.Tensor, batches: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_tokens, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    scored = batches[:, batches.shape[1] // 2:]
    return float(-logp[scored].mean())


@torch.no_grad()
def multiple_choice(model: Model, weights, tokenizer: Tokenizer, items: list[dict]) -> dict:
    correct = correct_norm = 0
    for item in items:
        ctx_ids = tokenizer.encode(item["context"]).ids
        scores, norm = [], []
        for choice in item["choices"]:
            choice_ids = tokenizer.encode(choice).ids
            ids = torch.tensor([ctx_ids + choice_ids])
            lp = F.log_softmax(model.arch.forward(weights, ids)[0, len(ctx_ids) - 1:-1], dim=-1)
            total = float(lp.gather(-1, torch.tensor(choice_ids)[:, None]).sum())
            scores.append(total)
            norm.append(total / len(choice.encode()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item["label"])
    return {"items": len(items), "acc": correct / len(items), "acc_norm": correct_norm / len(items)}


def expert_counts(model: Model, weights, batches: torch.Tensor) -> dict[int, list[int]] | None:
    arch = model.arch
    if not hasattr(arch, "on_route"):
        return None
    counts: dict[int, torch.Tensor] = {}

    def record(layer: int, indices: torch.Tensor) -> None:
        counts.setdefault(layer, torch.zeros(arch.n_routed_experts, dtype=torch.long))
        counts[layer] += torch.bincount(indices.flatten(), minlength=arch.n_routed_experts)

    arch.on_route = record
    with torch.no_grad():
        for start in range(0, len(batches), 8):
            arch.forward(weights, batches[start:start + 8])
    arch.on_route = None
    return {layer: c.tolist() for layer, c in sorted(counts.items())}


def measure(folder: Path, ctx: int, n_windows: int, mc_items: list[dict]) -> dict:
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tokenizer.token_to_id(EOS)

    def stream(split):
        ids = []
        for doc in textsets.documents(split):
            ids += tokenizer.encode(doc).ids + [eos]
        return torch.tensor(ids)

    heldout, train = stream("heldout"), stream("train")
    batches = windows(heldout, ctx, n_windows)
    with Model(folder) as model:
        full_weights = cached_weights(model)
        base = score(model, full_weights, batches)
        base_nll = float(base["window_nll"].mean())
        result = {
            "model": folder.name,
            "python": textsets.python_version(),
            "token_counts": {"train": len(train), "calibration": len(stream("calibration")),
                             "heldout": len(heldout)},
            "scored_tokens": batches.numel() // 2,
            "ctx": ctx,
            "ppl": math.exp(base_nll),
            "unigram_ppl": math.exp(unigram_nll(train, batches, model.arch.vocab_size)),
            "multiple_choice": multiple_choice(model, full_weights, tokenizer, mc_items),
            "experts": expert_counts(model, full_weights, batches),
            "quantized": {},
        }
        for name, (file_type, pure) in VARIANTS.items():
            q = score(model, quantized_weights(model, file_type, pure), batches, ref_logprobs=base["logprobs"])
            diff = q["window_nll"] - base["window_nll"]  # paired over windows
            half_width = 2 * float(diff.std()) / math.sqrt(len(diff))
            result["quantized"][name] = {
                "ppl": math.exp(float(q["window_nll"].mean())),
                "delta_ppl_pct": 100 * (math.exp(float(diff.mean())) - 1),
                "delta_ppl_pct_2sigma": 100 * (math.exp(half_width) - 1),
                "kld_mean": float(q["kld"].mean()),
                "top1_agreement_pct": 100 * float(q["top1"].mean()),
            }
    return result


def write_model_readme(folder: Path, r: dict) -> None:
    config = json.loads((folder / "config.json").read_text())
    recipe = RECIPES[folder.name]
    hardware = "2 CPU cores" if recipe.device == "cpu" else (
        f"an NVIDIA H100 (86 s; that machine's Python lacked tkinter, so the text came from Python {r['python']}'s "
        "Lib/ through QUANTKIT_STDLIB, and `--tokenizer` reused the bundled tokenizer)")
    mc = r["multiple_choice"]
    rows = "\n".join(f"| {name} | {q['ppl']:.3f} | {q['delta_ppl_pct']:+.2f}% ± {q['delta_ppl_pct_2sigma']:.2f} | "
                     f"{q['kld_mean']:.5f} | {q['top1_agreement_pct']:.2f}% |" for name, q in r["quantized"].items())
    fmt = ("DeepSeek's FP8 layout (F8_E4M3 linear weights with 128x128 `weight_scale_inv` blocks, per-expert "
           "tensors; embeddings, head, norms and router in BF16, correction bias in F32) — this FP8 folder is the "
           "model's reference, as the official V3/R1 weights are" if "quantization_config" in config else "BF16")
    experts = ""
    if r["experts"]:
        experts = "\nHeld-out tokens routed to each expert (MoE layers):\n\n" + "\n".join(
            f"- layer {layer}: {counts}" for layer, counts in r["experts"].items()) + "\n"
    text = f"""# {folder.name}

A small trained {config['model_type']} model bundled with quantkit for tests, benchmarks and the demo
(no download needed). Architecture: {config['architectures'][0]}, hidden {config['hidden_size']},
{config['num_hidden_layers']} layers, vocab {config['vocab_size']}; weights stored as {fmt}.

Made by `python -m eval.train_models --models {folder.name}` (seed 0, {recipe.steps} steps of {recipe.batch}x{CONTEXT}
tokens, AdamW with no weight decay and the learning rate annealed to zero, bfloat16 autocast on {hardware}) on the
standard-library train split of Python {r['python']}
(`quantkit.bundled.textsets`, {r['token_counts']['train']} tokens), with a byte-level BPE tokenizer using
Qwen2's pre-tokenizer regex.

## Measured (`python -m eval.measure_bundled`, quantkit's reference forward, float32)

- Held-out perplexity: **{r['ppl']:.3f}** (llama.cpp method: {r['ctx']}-token windows, second half scored,
  {r['scored_tokens']} tokens scored); unigram baseline of the same tokenizer on the same tokens:
  {r['unigram_ppl']:.1f}.
- Multiple choice (eval/tasks/stdlib_nextline.jsonl, {mc['items']} items, chance 25%): acc {100 * mc['acc']:.1f}%,
  length-normalised {100 * mc['acc_norm']:.1f}%.

llama.cpp's file types, quantized with quantkit's ggml codecs and llama-quantize's mixture rules (the weights a
llama.cpp user would hold; "Q4_0 pure" is plain 4-bit round-to-nearest for every weight matrix, output included),
against this model:

| variant | perplexity | ΔPPL (2σ over windows) | KL divergence | top-1 agreement |
|---|---|---|---|---|
| reference | {r['ppl']:.3f} | | | |
{rows}
{experts}"""
    (folder / "README.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", type=Path,
                        default=[BUNDLED / n for n in ("tiny-qwen2", "tiny-llama", "tiny-deepseek")])
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--windows", type=int, default=300)
    parser.add_argument("--mc-items", type=int, default=400)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write-readmes", action="store_true", help="(re)write each model folder's README.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    items = [json.loads(line) for line in TASKS.read_text().splitlines()][: args.mc_items]
    results = []
    for folder in args.models:
        r = measure(folder, args.ctx, args.windows, items)
        results.append(r)
        print(f"{r['model']}: ppl {r['ppl']:.3f} (unigram {r['unigram_ppl']:.1f}), "
              f"MC acc {r['multiple_choice']['acc']:.3f} / norm {r['multiple_choice']['acc_norm']:.3f}")
        for name, q in r["quantized"].items():
            print(f"  {name:8} ppl {q['ppl']:.3f}  dPPL {q['delta_ppl_pct']:+.2f}% ±{q['delta_ppl_pct_2sigma']:.2f}  "
                  f"KLD {q['kld_mean']:.5f}  top1 {q['top1_agreement_pct']:.2f}%")
        if r["experts"]:
            for layer, counts in r["experts"].items():
                print(f"  layer {layer} tokens per expert: {counts}")
        if args.write_readmes:
            write_model_readme(folder, r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
