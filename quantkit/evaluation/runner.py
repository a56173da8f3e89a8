"""Score every variant against the baseline on the same tokens, window by window.

Baseline and targets advance in lockstep: each window's baseline logits are computed once and compared with
every target's at once, so nothing vocabulary-sized outlives a window (memory stays bounded whatever the text
length) and no baseline logits cache is needed.

Perplexity follows llama.cpp's `perplexity` exactly: non-overlapping windows of ctx tokens (the first token
replaced by BOS when the tokenizer adds one), the logits at positions ctx/2 .. ctx-2 scored against the next
token, so each window scores ctx/2 - 1 tokens whose context is at least half a window.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from quantkit import __version__
from quantkit.errors import ConfigError, QuantkitError
from quantkit.evaluation.report import FIELDS
from quantkit.evaluation.variants import Variant, open_variant
from quantkit.formats.gguf.tensors import mapping_for
from quantkit.progress import Progress, ProgressCallback

PPL_METHOD = ("llama.cpp perplexity: non-overlapping windows of ctx tokens, the first half context only, "
              "positions ctx/2 .. ctx-2 scored on the next token")
_LOGPROB_BUDGET = 1 << 26  # float32 log-probs per variant per step (256 MiB): sets the windows per step


def _fixed_mmap_threshold() -> None:
    """glibc raises its mmap threshold after large frees (up to 32 MiB); the per-window log-prob tensors then
    come from heap arenas that fragment, and RSS grew by ~60 MB per window step (8.6 GB on a full run of five
    variants). A fixed threshold keeps every large block an mmap, returned to the system when freed."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD = 4 MiB
    except (OSError, AttributeError):  # not glibc: its allocator, its behaviour
        pass


def windows(tokens: torch.Tensor, ctx: int, max_windows: int | None, bos: int | None) -> torch.Tensor:
    count = len(tokens) // ctx
    if count == 0:
        raise QuantkitError(f"the text has {len(tokens)} tokens, fewer than one window of --ctx {ctx}; give a "
                            "longer --text or a smaller --ctx")
    every = tokens[: count * ctx].view(count, ctx).clone()
    if max_windows is not None and max_windows < count:  # spread evenly over the whole text
        every = every[torch.linspace(0, count - 1, max_windows).round().long()]
    if bos is not None:
        every[:, 0] = bos
    return every


def check_compatible(baseline: Variant, target: Variant, ctx: int) -> None:
    if target.vocab_size != baseline.vocab_size:
        raise QuantkitError(f"{target.path}: vocabulary of {target.vocab_size} tokens, the baseline's has "
                            f"{baseline.vocab_size}; KL divergence needs the same vocabulary: compare variants of "
                            "the same model")
    problem = _model_mismatch(baseline, target)
    if problem is not None:
        raise QuantkitError(f"{target.path} is not a quantization of the baseline model {baseline.path}: {problem}; "
                            "give files converted from the baseline's checkpoint")
    ours, theirs = target.tokens(), baseline.tokens()
    if ours is not None and theirs is not None:
        n = min(len(ours), len(theirs))
        differ = next((i for i in range(n) if ours[i] != theirs[i]), None)
        if differ is not None:
            raise QuantkitError(f"{target.path}: token {differ} is {ours[differ]!r}, the baseline's is "
                                f"{theirs[differ]!r}; the variants must share the baseline's tokenizer")
    if target.max_context is not None and ctx > target.max_context:
        raise QuantkitError(f"{target.path}: --ctx {ctx} exceeds the model's context length "
                            f"{target.max_context}")


def _model_mismatch(baseline: Variant, target: Variant) -> str | None:
    """How the target differs from the model the baseline's architecture describes (for a GGUF: what quantkit
    would write from the baseline), or None. Caught here, before the forward asks for a tensor the other model
    lacks."""
    arch = baseline.arch
    if target.format == "gguf":
        gguf, mapping = target.gguf, mapping_for(arch)
        name = gguf.metadata("general.architecture")
        facts = [("architecture", name, mapping.gguf_arch),
                 ("block_count", gguf.metadata(f"{name}.block_count"), arch.num_layers),
                 ("embedding_length", gguf.metadata(f"{name}.embedding_length"), arch.hidden_size)]
        shapes = {tensor_name: t.shape for tensor_name, t in gguf.tensors.items()}
        expected = {t.name: t.shape for t in mapping.tensors()}
    else:
        facts = [("architecture", target.arch.config.get("model_type"), arch.config.get("model_type"))]
        shapes, expected = target.arch.tensor_shapes(), arch.tensor_shapes()
    for what, theirs, ours in facts:
        if theirs != ours:
            return f"its {what} is {theirs}, the baseline's {ours}"
    for tensor_name, shape in expected.items():
        if tensor_name not in shapes:
            return f"it has no tensor {tensor_name}, which the baseline's architecture has"
        if tuple(shapes[tensor_name]) != tuple(shape):
            return f"its tensor {tensor_name} is {list(shapes[tensor_name])}, the baseline's {list(shape)}"
    return None


class _Scores:
    """Per-variant accumulators over scored positions (KLD values kept per position: 4 bytes each)."""

    def __init__(self):
        self.window_nll: list[torch.Tensor] = []
        self.kld: list[torch.Tensor] = []
        self.top1: list[torch.Tensor] = []
        self.delta_p: list[torch.Tensor] = []

    def add(self, logprobs: torch.Tensor, targets: torch.Tensor, base: torch.Tensor | None) -> None:
        self.window_nll.append(-logprobs.gather(-1, targets[..., None])[..., 0].double().mean(-1))
        if base is not None:
            p = base.exp()
            self.kld.append((p * (base - logprobs)).sum(-1).flatten().clamp_min(0))
            top = base.argmax(-1, keepdim=True)
            self.top1.append((logprobs.argmax(-1, keepdim=True) == top).flatten())
            self.delta_p.append((logprobs.gather(-1, top).exp() - p.gather(-1, top)).flatten())


def _mc_items(tasks: Path | None, count: int | None) -> tuple[list[dict], str]:
    if tasks is None:
        from quantkit.bundled.tasks import next_line_items

        return next_line_items(count or 400), "bundled next-line task (quantkit.bundled.tasks)"
    if not tasks.is_file():
        raise QuantkitError(f"{tasks}: no such task file")
    items = []
    for number, line in enumerate(tasks.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not (isinstance(item["context"], str) and len(item["choices"]) >= 2
                    and 0 <= item["label"] < len(item["choices"])):
                raise ValueError("needs context, choices (2 or more) and a label indexing them")
        except (ValueError, KeyError, TypeError) as exc:
            raise QuantkitError(f"{tasks}:{number}: not a multiple-choice item ({exc})") from None
        items.append(item)
    return items[:count] if count else items, str(tasks)


def _mc_tokens(tokenizer, items: list[dict]) -> list[tuple[list[int], list[list[int]]]]:
    """Per item: context ids and each choice's ids, tokenized apart (as lm-eval does)."""
    return [(tokenizer.encode(item["context"], add_special_tokens=False).ids,
             [tokenizer.encode(c, add_special_tokens=False).ids for c in item["choices"]]) for item in items]


def _multiple_choice(variant: Variant, tokenized, items: list[dict], say: ProgressCallback) -> dict:
    """acc: the choice with the highest log-likelihood; acc_norm: per byte of the choice's text."""
    correct = correct_norm = 0
    for done, ((context, choices), item) in enumerate(zip(tokenized, items, strict=True)):
        say(Progress(f"multiple choice ({variant.name})", done, len(items), "items"))
        scores = variant.choice_logprobs(context, choices)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
        norm = [s / len(c.encode()) for s, c in zip(scores, item["choices"], strict=True)]
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item["label"])
    say(Progress(f"multiple choice ({variant.name})", len(items), len(items), "items"))
    return {"items": len(items), "acc": correct / len(items), "acc_norm": correct_norm / len(items)}


def evaluate(baseline_path: str | Path, target_paths: list[str | Path], *, text: str | None = None,
             text_name: str | None = None, tasks: Path | None = None, mc_items: int | None = 400,
             ctx: int = 512, max_windows: int | None = None, backend: str = "auto", device: str = "cpu",
             threads: int | None = None, progress: ProgressCallback | None = None) -> dict:
    """Measure every target against the baseline; returns the report dict (see quantkit.evaluation.report)."""
    from quantkit.bundled import resolve_model, textsets

    say = progress or (lambda _event: None)
    _fixed_mmap_threshold()
    baseline_path = resolve_model(str(baseline_path))
    if not (baseline_path / "config.json").is_file():
        raise ConfigError(f"{baseline_path}: the baseline must be an HF model folder (the source checkpoint, "
                          "BF16 or FP8, with its tokenizer.json)")
    variants: list[Variant] = []
    try:
        # the baseline is opened once: its Model carries the config, tokenizer and BOS every step below uses
        baseline = open_variant(baseline_path, "torch", config=None, n_ctx=ctx, device=device)
        variants.append(baseline)
        model = baseline.model
        tokenizer = model.tokenizer("tokenize the text with (once, with the baseline's tokenizer, for every "
                                    "variant)")
        if text is None:
            text, text_name = textsets.text("heldout"), f"bundled held-out text (Python {textsets.python_version()})"
        tokens = torch.tensor(tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)
        batches = windows(tokens, ctx, max_windows, model.bos)
        first = ctx // 2
        items, tasks_name = _mc_items(tasks, mc_items) if mc_items != 0 else ([], None)
        mc_tokens = _mc_tokens(tokenizer, items)
        longest = max([ctx] + [len(context) + max(map(len, choices)) for context, choices in mc_tokens])
        check_compatible(baseline, baseline, ctx)
        for path in target_paths:
            variant = open_variant(path, backend, config=model.config, n_ctx=longest, device=device,
                                   threads=threads)
            variants.append(variant)
            check_compatible(baseline, variant, ctx)
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"two variants are both named {next(n for n in names if names.count(n) > 1)!r}")

        scores = [_Scores() for _ in variants]
        seconds = [0.0] * len(variants)
        step = max(1, min(8, _LOGPROB_BUDGET // (ctx * baseline.vocab_size)))
        say(Progress("windows", 0, len(batches), "windows"))
        for start in range(0, len(batches), step):
            ids = batches[start:start + step]
            targets = ids[:, first + 1:]
            base = None
            for index, variant in enumerate(variants):
                began = time.perf_counter()
                logprobs = F.log_softmax(variant.logits(ids)[:, first:-1], dim=-1)
                seconds[index] += time.perf_counter() - began
                if base is None:
                    base = logprobs
                scores[index].add(logprobs, targets, None if index == 0 else base)
            say(Progress("windows", min(start + step, len(batches)), len(batches), "windows"))

        rows = []
        for index, variant in enumerate(variants):
            began = time.perf_counter()
            mc = _multiple_choice(variant, mc_tokens, items, say) if items else None
            seconds[index] += time.perf_counter() - began
            rows.append(_row(variant, scores[index], scores[0], mc, ctx, seconds[index]))
    finally:
        for variant in variants:
            variant.close()
    base_row, target_rows = rows[0], rows[1:]
    for row in target_rows:
        row["vram_saving_pct"] = 100 * (1 - row["vram"]["total"] / base_row["vram"]["total"])
    return {
        "quantkit_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"baseline": str(baseline_path), "text": text_name or "--text", "ctx": ctx,
                     "windows": len(batches), "scored_tokens": len(batches) * (ctx - first - 1),
                     "tasks": tasks_name, "mc_items": len(items), "ppl_method": PPL_METHOD, "device": device,
                     "backend": backend},
        "baseline": base_row,
        "variants": target_rows,
        "fields": FIELDS,
    }


def _row(variant: Variant, s: _Scores, base: _Scores, mc: dict | None, ctx: int, seconds: float) -> dict:
    nll = torch.cat(s.window_nll)
    row = variant.describe()
    row["ppl"] = math.exp(float(nll.mean()))
    if s is base:
        row.update(delta_ppl_pct=0.0, delta_ppl_pct_2sigma=0.0,
                   kld={"mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0}, top1_pct=100.0, delta_p_mean=0.0)
    else:
        diff = nll - torch.cat(base.window_nll)  # paired over windows
        # One window has no spread to estimate the error from: undefined, null in report.json.
        two_sigma = 2 * float(diff.std()) / math.sqrt(len(diff)) if len(diff) > 1 else None
        kld = torch.cat(s.kld)
        row.update(delta_ppl_pct=100 * (math.exp(float(diff.mean())) - 1),
                   delta_ppl_pct_2sigma=None if two_sigma is None else 100 * (math.exp(two_sigma) - 1),
                   kld={"mean": float(kld.mean()), "median": float(kld.median()),
                        "p99": float(kld.kthvalue(math.ceil(0.99 * len(kld))).values), "max": float(kld.max())},
                   top1_pct=100 * float(torch.cat(s.top1).double().mean()),
                   delta_p_mean=100 * float(torch.cat(s.delta_p).mean()))
    vram = variant.vram(ctx).as_dict()
    if variant.measured_peak() is not None:  # quantkit's torch forward on the GPU, dequantized float32 weights
        vram["measured_peak_torch"] = variant.measured_peak()
    row.update(mc=mc, size_bytes=variant.size_bytes(), bpw=variant.bpw(), vram=vram,
               vram_saving_pct=0.0, seconds=seconds)
    return row
