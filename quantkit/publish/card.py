"""The model card (README.md) of a published variant: Hugging Face front matter, then what the variant is, its
measured quality beside the baseline's (numbers from the model's eval report.json), VRAM at a few contexts, how to
run it and how it was made. The same inputs give the same bytes: no dates, no local paths beyond what the run
recorded as its command and recipe."""

from __future__ import annotations

from pathlib import Path

import yaml

from quantkit.errors import PublishError
from quantkit.publish.variant import PLOT, VariantDir, load_variant

VRAM_CONTEXTS = (4096, 16384, 32768)
MISSING = "—"
FORMAT_TAGS = {"gguf": "gguf", "gptq": "gptq", "awq": "awq", "ct": "compressed-tensors"}
_RUNTIME_PACKAGES = {
    "gptq": "transformers loads GPTQ checkpoints through gptqmodel (`pip install gptqmodel`)",
    "awq": "transformers loads AWQ checkpoints through autoawq or gptqmodel (`pip install gptqmodel`)",
    "ct": "transformers loads compressed-tensors checkpoints through `pip install compressed-tensors`",
}


def render_card(variant_dir: str | Path | VariantDir, repo_id: str | None = None, *,
                artifact_files: list[str] | None = None, contexts: tuple[int, ...] = VRAM_CONTEXTS) -> str:
    """README.md for the variant in `variant_dir`, to be uploaded as `repo_id` (None: usage refers to local
    files). `artifact_files`: the artifact's paths in the repo as staged (a re-split GGUF's shards); default the
    variant's own files."""
    v = variant_dir if isinstance(variant_dir, VariantDir) else load_variant(variant_dir)
    files = artifact_files if artifact_files is not None else list(v.files)
    info, row, base = v.info, v.row, v.report["baseline"]
    title = repo_id.split("/")[1] if repo_id else v.label
    parts = [
        "---\n" + front_matter(v) + "---",
        f"# {title}",
        _intro(v),
        "## Quality against the source model",
        _measured_intro(v.report, v.row),
        _quality_table(row, base, v.report.get("settings", {}).get("ctx", info["eval_ctx"])),
        f"The plot places this variant among every variant of {info['model']} measured in the same run "
        "(left: KLD mean, right: ΔPPL %, against VRAM; each panel's Pareto front drawn):",
        f"![quality vs VRAM]({PLOT})",
        "## VRAM",
        _vram_section(v, contexts),
        "## Usage",
        _usage(v, repo_id, files),
        "## How it was made",
        _provenance(v),
        "## Files",
        _files_section(v, files),
    ]
    return "\n\n".join(parts) + "\n"


def front_matter(v: VariantDir) -> str:
    """The YAML between the card's `---` lines (yaml.safe_dump, so it parses back as written)."""
    info = v.info
    meta: dict = {}
    if info["base_model"]:
        # The relation qualifies base_model; without one there is nothing for it to describe.
        meta["base_model"] = info["base_model"]
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "gguf" if v.is_gguf else "transformers"
    license_ = info["license"] or source_license(info["source"])
    if license_:
        meta["license"] = license_
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(dict.fromkeys([FORMAT_TAGS[info["format"]], "quantized", "quantkit",
                                       *map(str, info["tags"])]))
    meta["quantized_by"] = "quantkit"
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)


def source_license(source: str | None) -> str | None:
    """The `license:` of the source folder's README.md front matter, if it has one (a folder that is gone, or a
    README without front matter, has none)."""
    if not source:
        return None
    readme = Path(source) / "README.md"
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---\n"):
        return None
    end = text.find("\n---", 4)
    try:
        meta = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def _intro(v: VariantDir) -> str:
    info, row = v.info, v.row
    base = info["base_model"]
    source = f"[{base}](https://huggingface.co/{base})" if base else f"{info['model']}"
    kind = {"gguf": f"a GGUF file for llama.cpp ({_text(row.get('type'))})",
            "gptq": "a GPTQ checkpoint (AutoGPTQ / GPTQModel layout)",
            "awq": "an AWQ checkpoint (AutoAWQ GEMM layout)",
            "ct": "a compressed-tensors checkpoint (pack-quantized, for vLLM and transformers)"}[info["format"]]
    return (f"The **{info['variant']}** quantization (`--to {info['to']}`) of {source}: {kind}, made and measured "
            f"by quantkit from the recipe `{info['recipe']}`. {_num(row.get('bpw'), 3)} bits per weight, "
            f"{_size(row.get('size_bytes'))} on disk.")


def _measured_intro(report: dict, row: dict) -> str:
    s = report.get("settings", {})
    tasks = f"{_text(s.get('tasks'))} ({_text(s.get('mc_items'))} items)" if s.get("tasks") else "none"
    return (f"Measured by `quantkit eval` (quantkit {_text(report.get('quantkit_version'))}) against the source "
            f"model on {_text(s.get('text'))}: {_text(s.get('windows'))} windows of {_text(s.get('ctx'))} tokens, "
            f"{_text(s.get('scored_tokens'))} scored tokens (method: {_text(s.get('ppl_method'))}), this variant "
            f"run by {_text(row.get('backend'))}. Multiple choice: {tasks}. KLD is the KL divergence of this "
            "variant's next-token distribution from the source's, in nats; top-1 the share of tokens where both "
            "pick the same most likely token; ΔPPL is paired over windows, ±2σ. VRAM: weights + KV cache + compute "
            f"buffers at the eval context. {MISSING}: not measured.")


def _quality_table(row: dict, base: dict, ctx) -> str:
    def delta_ppl(r):
        cell = _num(r.get("delta_ppl_pct"), 2, sign=True)
        sigma = r.get("delta_ppl_pct_2sigma")
        return cell if sigma is None or cell == MISSING else f"{cell} ± {sigma:.2f}"

    def mc(r, key):
        m = r.get("mc")
        return MISSING if not m else _num(m.get(key), 3)

    measures = [
        ("Perplexity", lambda r: _num(r.get("ppl"), 4)),
        ("ΔPPL %", delta_ppl),
        ("KLD mean (nats)", lambda r: _num((r.get("kld") or {}).get("mean"), 6)),
        ("KLD p99 (nats)", lambda r: _num((r.get("kld") or {}).get("p99"), 6)),
        ("Top-1 agreement %", lambda r: _num(r.get("top1_pct"), 2)),
        ("MC accuracy", lambda r: mc(r, "acc")),
        ("MC accuracy (length-normalised)", lambda r: mc(r, "acc_norm")),
        ("Size", lambda r: _size(r.get("size_bytes"))),
        ("Bits per weight", lambda r: _num(r.get("bpw"), 3)),
        (f"VRAM @{_text(ctx)} tokens", lambda r: _size((r.get("vram") or {}).get("total"))),
    ]
    lines = [_table_row(["Measure", f"{_text(row.get('name'))} (this)", f"{_text(base.get('name'))} (baseline)"]),
             _table_row(["---", "---:", "---:"])]
    lines += [_table_row([label, cell(row), cell(base)]) for label, cell in measures]
    return "\n".join(lines)


def vram_at(v: VariantDir, contexts: tuple[int, ...]) -> list:
    """VramEstimate of the variant at each context: llama.cpp's accounting for a GGUF (f16 KV cache), a GPU
    runtime's for an HF folder (bf16 KV cache)."""
    from quantkit.errors import QuantkitError
    from quantkit.plan.vram import vram_checkpoint, vram_gguf

    try:
        if v.is_gguf:  # a gguf-split set through its first shard, as llama.cpp loads it
            from quantkit.source.gguf_file import GGUFFile

            gguf = GGUFFile(sorted(v.files.values())[0])
            return [vram_gguf(gguf, ctx) for ctx in contexts]
        from quantkit.model import Model

        with Model(v.path / v.info["artifact"]) as model:
            return [vram_checkpoint(model, ctx) for ctx in contexts]
    except QuantkitError as exc:
        raise PublishError(f"cannot estimate the VRAM of {v.path / v.info['artifact']}: {exc}") from None


def _vram_section(v: VariantDir, contexts: tuple[int, ...]) -> str:
    how = ("llama.cpp's own accounting (quantkit plan): the whole model on one device, an f16 KV cache"
           if v.is_gguf else "a GPU runtime's (vLLM, transformers): weights as stored, a bf16 KV cache of exactly "
                             "the context")
    lines = [f"Estimated by quantkit from the files themselves, by {how}; the compute buffers are an estimate.", "",
             _table_row(["Context", "Weights", "KV cache", "Compute", "Total"]),
             _table_row(["---:", "---:", "---:", "---:", "---:"])]
    for ctx, e in zip(contexts, vram_at(v, contexts), strict=True):
        lines.append(_table_row([str(ctx), _size(e.weights), _size(e.kv_cache), _size(e.compute), _size(e.total)]))
    return "\n".join(lines)


def _usage(v: VariantDir, repo_id: str | None, files: list[str]) -> str:
    if v.is_gguf:
        first = sorted(files)[0]
        if repo_id is None:
            return (f"With llama.cpp (a gguf-split set loads from its first shard):\n\n```bash\n"
                    f"llama-cli -m {first}\nllama-server -m {first}\n```")
        tag = v.info["to"].split(":", 1)[-1]
        # llama.cpp's -hf REPO:TAG picks the file whose name carries TAG; without it in the name, it cannot.
        ref = f"{repo_id}:{tag}" if tag.lower() in first.lower() else repo_id
        local = repo_id.split("/")[1]
        return (f"With llama.cpp, straight from the Hub:\n\n```bash\nllama-cli -hf {ref}\nllama-server -hf {ref}\n"
                f"```\n\nOr download and serve the file (a gguf-split set loads from its first shard):\n\n```bash\n"
                f"hf download {repo_id} --local-dir {local}\n"
                f"llama-server -m {local}/{first}\n```")
    where = repo_id or f"./{v.info['artifact']}"
    return (f"With vLLM:\n\n```bash\nvllm serve {where}\n```\n\nWith transformers "
            f"({_RUNTIME_PACKAGES[v.info['format']]}):\n\n```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{where}", device_map="auto")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n```')


def _provenance(v: VariantDir) -> str:
    info = v.info
    text = [f"By quantkit's `quantkit run {info['recipe']}`; for this variant it ran the equivalent of:",
            f"```bash\n{info['command']}\n```"]
    if v.is_gguf and (v.model_dir / "imatrix.gguf").is_file():
        text.append("with the importance matrix (imatrix.gguf) the run computed for the model.")
    if v.recipe.is_file():
        try:
            recipe = v.recipe.read_text(encoding="utf-8").rstrip("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise PublishError(f"{v.recipe}: unreadable ({exc}); restore the run's recipe.yaml") from None
        text += ["The recipe, as run:", f"```yaml\n{recipe}\n```"]
    return "\n\n".join(text)


def _files_section(v: VariantDir, files: list[str]) -> str:
    listing = "\n".join(f"- `{f}`" for f in sorted(files))
    return (f"The {'GGUF' if v.is_gguf else 'checkpoint'}:\n\n{listing}\n\nbeside this README.md and {PLOT}. "
            "`SHA256SUMS` holds the SHA-256 of every other file in the repo; after downloading, check them with\n\n"
            "```bash\nsha256sum -c SHA256SUMS\n```")


def _num(value, digits: int, sign: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _size(n) -> str:
    from quantkit.plan.plan import format_size

    return MISSING if n is None else format_size(n)


def _text(value) -> str:
    return MISSING if value is None else str(value)


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
