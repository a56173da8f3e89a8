"""The `quantkit` command: parse arguments, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats import SENSITIVITY_METHODS
from quantkit.progress import CliProgress


class _Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that partial outputs are removed on the way out."""


SIGNAL_LINES = {signal.SIGINT: "error: interrupted (Ctrl-C)", signal.SIGTERM: "error: terminated (SIGTERM)"}
_received: int | None = None  # the signal that stopped the command


def _on_signal(signum, frame):
    global _received
    _received = signum
    raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated


class _Group(click.Group):
    """Prints QuantkitError as one line, without a traceback, and exits 2; Ctrl-C and SIGTERM as one line
    with the shell's codes (130, 143)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (Exception, KeyboardInterrupt, _Terminated) as exc:
            signum = _received
            if isinstance(exc, KeyboardInterrupt | _Terminated):
                signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
            # after a signal, whatever exception arrives is the signal's: one raised inside threading's lock code
            # can fail on the way out (Condition.wait: "cannot release un-acquired lock") and replace it
            if signum is not None:
                click.echo(SIGNAL_LINES[signum], err=True)
                sys.exit(128 + signum)
            if isinstance(exc, QuantkitError):
                click.echo(f"error: {exc}", err=True)
                sys.exit(2)
            raise


class _StderrHandler(logging.Handler):
    """Log records as lines on the current sys.stderr (looked up per record, as click does)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="quantkit")
def main():
    """Quantize LLM checkpoints and measure what each variant costs and saves."""
    global _received
    _received = None  # one process can run several commands (click's test runner)
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the shell has it ignored
        signal.signal(signal.SIGINT, _on_signal)
    log = logging.getLogger("quantkit")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)  # the progress lines of batch runs (stderr not a terminal) are INFO


@main.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the full report, including every tensor, as JSON.")
def inspect(model, as_json):
    """Architecture, parameters, dtypes, FP8 layout and quantizable weights of MODEL (a HF folder, a
    .safetensors file, or a bundled model: tiny-qwen2, tiny-llama, tiny-deepseek); for a GGUF file, its tensor
    types, bits per weight (over all tensors as llama.cpp counts, and over the repeating layers as EXL3 and
    papers count), each layer's bpw and types, and how it was quantized. Reads headers only."""
    from quantkit.bundled import resolve_model
    from quantkit.inspection import inspect_checkpoint, inspect_gguf

    path = resolve_model(model)
    gguf = path.suffix == ".gguf"
    report = inspect_gguf(path) if gguf else inspect_checkpoint(path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for label, value in (_gguf_summary_lines if gguf else _summary_lines)(report):
        click.echo(f"{label:<13}{value}")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--to", "targets", multiple=True, required=True, metavar="FORMAT:SPEC",
              help="Output format and spec. gguf:TYPE with a llama.cpp file type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                   "Q5_0, Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, IQ4_NL, IQ4_XS), or gguf:auto (a type per "
                   "tensor from measured costs, to --target-bpw, --target-size or --fit-vram); "
                   "gptq:w{bits}[g{group}][-act][-asym][-static][-mse][-rtn] (bits 2/3/4/8; no g: one group per "
                   "row; act: act-order; asym: zero points; static: static groups; mse: clipping search; rtn: "
                   "round-to-nearest, no calibration), e.g. gptq:w4g128, or gptq:auto; awq:w4g{group}[-rtn] (group "
                   "32/64/128; AutoAWQ GEMM layout); ct:w{bits}[g{group}][-asym][-gptq|-awq][-act][-mse] (bits 4/8; "
                   "compressed-tensors pack-quantized, e.g. ct:w4g128, ct:w8, ct:w4g128-gptq, ct:w4g128-awq), or "
                   "ct:auto / ct:auto-gptq[-act]. Repeat for several outputs from one read of the source.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output file (one --to, ending in .gguf) or folder (default: the current folder), where files "
                   "are named <model>-<TYPE>.gguf.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=SCHEME",
              help="Per-tensor scheme (repeatable; the first matching pattern wins): a ggml type for gguf: targets "
                   "(GGUF names, replacing the mixture's rule, as llama-quantize), a weight scheme w8, w4g128, "
                   "w4g32[-asym] or bf16 (keep) for ct: and gptq: targets (checkpoint names, e.g. 'self_attn=w8'; "
                   "gptq: writes the mix as GPTQModel's dynamic); awq: folders hold one scheme (use ct:...-awq).")
@click.option("--keep-first-dense", is_flag=True,
              help="Keep a MoE model's leading dense layers (DeepSeek's first_k_dense_replace) in BF16, in every "
                   "target; applied before --tensor-type overrides.")
@click.option("--fix-mix", is_flag=True,
              help="A ct: or gptq: mix that breaks a runtime rule (q/k/v, gate/up or the routed experts with "
                   "different schemes) is promoted to each set's most precise scheme instead of refused.")
@click.option("--output-tensor-type", metavar="TYPE", help="ggml type of output.weight.")
@click.option("--token-embedding-type", metavar="TYPE", help="ggml type of token_embd.weight.")
@click.option("--pure", is_flag=True, help="Every quantizable tensor gets the file type's base type (no mixture "
                                           "rules; row-size fallbacks still apply).")
@click.option("--imatrix", type=click.Path(path_type=Path),
              help="Importance matrix (quantkit imatrix or llama-imatrix output, GGUF or legacy .dat).")
@click.option("--dry-run", is_flag=True, help="Print the plan (tensor, shape, type, bytes, bpw); write nothing.")
@click.option("--save-plan", "plan_file", type=click.Path(path_type=Path),
              help="Also save each output's plan as JSON (several --to: <output stem>.<NAME>).")
@click.option("--force", is_flag=True, help="Replace existing output files (only once the new one is complete).")
@click.option("--split-max-size", metavar="SIZE", help="Write gguf-split shards of at most SIZE (e.g. 2G).")
@click.option("--device", default=None, help="Device to quantize on (default: cuda if available, else cpu).")
@click.option("--threads", type=int, default=None,
              help="CPU workers for quantizing, one core each; k-quant and IQ4 chunks use worker processes "
                   "(default: all cores).")
@click.option("--tokenizer-pre", metavar="NAME",
              help="llama.cpp pre-tokenizer name, when quantkit cannot tell it from tokenizer.json.")
@click.option("--name", help="general.name and file name stem (default: the model folder's name).")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration text for GPTQ: plain text, or JSON lines with a \"text\" field (default: the "
                   "bundled calibration split).")
@click.option("--calib-samples", type=int, default=128, show_default=True, help="GPTQ calibration samples.")
@click.option("--calib-ctx", type=int, default=512, show_default=True, help="Tokens per calibration sample.")
@click.option("--damp", type=float, help="GPTQ Hessian damping, a fraction of its mean diagonal (default 0.01, "
                                         "as AutoGPTQ); raised automatically where a Hessian needs more.")
@click.option("--target-bpw", type=float, help="Budget of an auto target: bits per weight over every tensor.")
@click.option("--target-size", metavar="SIZE", help="Budget of an auto target: the written file's size (20GB, 8GiB).")
@click.option("--fit-vram", metavar="SIZE", help="Budget of an auto target: fit --gpus GPUs of SIZE each at --ctx, "
                                                 "by the runtime's accounting (KV cache and compute buffers "
                                                 "included).")
@click.option("--ctx", type=int, default=4096, show_default=True, help="Context length --fit-vram must hold.")
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs --fit-vram splits the model over.")
@click.option("--kv-type", default=None, help="KV cache type --fit-vram counts (llama.cpp: f16, q8_0, q4_0).")
@click.option("--sensitivity", type=click.Path(path_type=Path),
              help="Sensitivity file of an auto target: reused when measured on the same model, text and "
                   "candidates, else measured and written there (default: kept in the statistics cache).")
@click.option("--sensitivity-samples", type=int, default=8, show_default=True,
              help="Calibration samples (of --calib-ctx tokens) the sensitivity is measured on.")
@click.option("--sensitivity-method", type=click.Choice(SENSITIVITY_METHODS),
              help="How candidates are measured: every one's KLD at the model output, or (proxy, gguf:auto only) one "
                   "type's per tensor, the others scaled by how much they change their layer's output: one "
                   "layer-forward per candidate instead of about half the layers. Default: proxy for gguf:auto, "
                   "output for ct:auto and gptq:auto.")
def convert(model, targets, output, tensor_types, keep_first_dense, fix_mix, output_tensor_type, token_embedding_type,
            pure, imatrix, dry_run, plan_file, force, split_max_size, device, threads, tokenizer_pre, name, calib,
            calib_samples, calib_ctx, damp, target_bpw, target_size, fit_vram, ctx, gpus, kv_type, sensitivity,
            sensitivity_samples, sensitivity_method):
    """Convert MODEL (a HF folder with BF16/F16/F32 or FP8 safetensors, or a bundled model name) to
    quantized files, streaming one tensor at a time."""
    import torch

    from quantkit import convert as api
    from quantkit.bundled import resolve_model
    from quantkit.formats import get_format
    from quantkit.plan.allocate import Budget

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with CliProgress() as show:
        results = api.convert(resolve_model(model), list(targets), output, dry_run=dry_run,
                              tensor_types=list(tensor_types), keep_first_dense=keep_first_dense, fix_mix=fix_mix,
                              output_tensor_type=output_tensor_type,
                              token_embedding_type=token_embedding_type, pure=pure, imatrix=imatrix, device=device,
                              threads=threads, force=force, split_max_size=split_max_size,
                              tokenizer_pre=tokenizer_pre, name=name, calib=calib, calib_samples=calib_samples,
                              calib_ctx=calib_ctx, damp=damp, sensitivity=sensitivity,
                              sensitivity_samples=sensitivity_samples, sensitivity_method=sensitivity_method,
                              budget=Budget.from_options(target_bpw, target_size, fit_vram, ctx, gpus, kv_type),
                              progress=show)
    for path, plan in results:
        if dry_run:
            click.echo(f"# {path}")
            click.echo(get_format(plan.format).describe(plan))
        else:
            click.echo(f"wrote {path} ({plan.format}:{plan.target}, {_bytes(plan.total_bytes)} of tensors, "
                       f"{plan.bpw:.2f} bpw)")
        if plan_file is not None:
            plan.save(plan_file if len(results) == 1 else plan_file.with_name(f"{path.stem}.{plan_file.name}"))


@main.command()
@click.argument("model", type=click.Path())
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration text file (default: the bundled standard-library calibration text).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("imatrix.gguf"), show_default=True,
              help="Output file: GGUF (llama-imatrix's format) or, for a .dat name, its legacy format.")
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=int, help="Use at most this many chunks.")
@click.option("--device", default=None, help="Device (default: cuda if available, else cpu).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--no-cache", is_flag=True, help="Compute the statistics even when the cache holds them for the same "
                                                 "model files, text and settings ($QUANTKIT_CACHE, default "
                                                 "~/.cache/quantkit).")
def imatrix(model, calib, output, ctx, chunks, device, force, no_cache):
    """Compute llama.cpp's importance matrix for MODEL with quantkit's layer-by-layer forward."""
    import torch

    from quantkit.bundled import resolve_model
    from quantkit.calib import collect_imatrix, tokenize_file
    from quantkit.calib.cache import StatisticsCache
    from quantkit.calib.data import read_calibration
    from quantkit.model import Model
    from quantkit.output import check_writable

    if output.exists() and not force:
        raise QuantkitError(f"{output} already exists; pass --force to replace it")
    check_writable(output.parent)
    text, dataset = read_calibration(calib)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with Model(resolve_model(model), device=device) as m:
        tokens = tokenize_file(m, text)
        with CliProgress() as show:
            result = collect_imatrix(m, tokens, ctx=ctx, max_chunks=chunks, dataset=dataset, progress=show,
                                     cache=None if no_cache else StatisticsCache())
    result.save(output)
    click.echo(f"wrote {output}: {len(result.sums)} entries from {result.chunk_count} chunks of {ctx} tokens")
    for name, counts in result.expert_counts().items():
        if name.endswith("ffn_down_exps.weight"):
            click.echo(f"  {name[:-len('.ffn_down_exps.weight')]} tokens per expert: {counts}")


@main.command("eval")
@click.argument("targets", nargs=-1, required=True)
@click.option("--baseline", required=True,
              help="The source model every target is compared with: an HF folder (BF16 or FP8) or a bundled name.")
@click.option("--text", "text_file", type=click.Path(path_type=Path),
              help="Text to score (default: the bundled held-out standard-library text).")
@click.option("--tasks", type=click.Path(path_type=Path),
              help="Multiple-choice items, JSON lines {context, choices, label} (default: the bundled next-line "
                   "task).")
@click.option("--mc-items", type=int, default=400, show_default=True, help="Use at most this many items (0: none).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Window length for perplexity and KLD.")
@click.option("--windows", type=int, help="Score at most this many windows, spread evenly over the text.")
@click.option("--backend", type=click.Choice(["auto", "torch", "llama.cpp"]), default="auto", show_default=True,
              help="For GGUF targets: llama.cpp (llama-cpp-python; what auto picks when installed) or torch "
                   "(quantkit's forward on the dequantized weights). HF folders always run on torch.")
@click.option("--device", default=None, help="Device for the torch backend (default: cuda if available, else cpu).")
@click.option("--threads", type=int, help="CPU threads for llama.cpp (default: torch's).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("eval-report"), show_default=True,
              help="Folder for report.json, report.md and quality_vs_vram.png.")
@click.option("--force", is_flag=True, help="Replace a report already in the -o folder.")
def evaluate(targets, baseline, text_file, tasks, mc_items, ctx, windows, backend, device, threads, output, force):
    """Measure TARGETS (GGUF files, HF folders) against the baseline: perplexity, KL divergence, top-1
    agreement, multiple-choice accuracy, size and VRAM at --ctx, in one comparable report."""
    import torch

    from quantkit.evaluation.report import check_output, write_report
    from quantkit.evaluation.runner import evaluate as run

    text = text_name = None
    if text_file is not None:
        if not text_file.is_file():
            raise QuantkitError(f"{text_file}: no such text file")
        text, text_name = text_file.read_text(encoding="utf-8", errors="replace"), str(text_file)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_output(output, force)
    with CliProgress() as show:
        report = run(baseline, list(targets), text=text, text_name=text_name, tasks=tasks, mc_items=mc_items,
                     ctx=ctx, max_windows=windows, backend=backend, device=device, threads=threads, progress=show)
    files = write_report(report, output)
    click.echo(files["markdown"].read_text())
    click.echo(f"wrote {', '.join(str(p) for p in files.values())}")


@main.command("plan")
@click.argument("model", required=False)
@click.option("--vram", default="24GiB", show_default=True, help="Memory per GPU (24GiB, 80GB, 141G: GiB powers "
                                                                    "of 1024, GB and G of 1000).")
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs the model is split over.")
@click.option("--ctx", type=int, default=32768, show_default=True, help="Context length to hold in the KV cache.")
@click.option("--kv-type", default=None, help="KV cache type: f16 (default), q8_0, q4_0 for llama.cpp; bf16 "
                                              "(default) or fp8 for vLLM (gptq, awq, ct).")
@click.option("--format", "fmt", type=click.Choice(["gguf", "gptq", "awq", "ct"]), default="gguf",
              show_default=True, help="Which variants to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the variants as a JSON list.")
@click.option("--list", "list_catalog", is_flag=True, help="List the catalog's models and exit.")
@click.option("--report", "reports", multiple=True, type=click.Path(exists=True, dir_okay=True, path_type=Path),
              help="A `quantkit eval` report (report.json or its folder) of this model's variants: their measured "
                   "KLD and perplexity are shown beside them (repeatable).")
def plan(model, vram, gpus, ctx, kv_type, fmt, as_json, list_catalog, reports):
    """What fits MODEL on --gpus GPUs of --vram at --ctx: every variant of --format with its weights, KV cache,
    compute buffers and total, the best fitting one marked. MODEL: an HF folder, a GGUF file, a bundled name, or
    a catalog name (DeepSeek-V3/R1 and the R1-Distill models, configs only: no download needed)."""
    import json

    from quantkit import catalog
    from quantkit.bundled import resolve_model
    from quantkit.fit import add_measured, variants
    from quantkit.model import Model
    from quantkit.plan.vram import parse_bytes
    from quantkit.source.gguf_file import GGUFFile

    if list_catalog:
        click.echo("\n".join(catalog.names()))
        return
    if model is None:
        raise QuantkitError("give a MODEL (a folder, a .gguf, a bundled name or one of `quantkit plan --list`)")
    kv = kv_type or ("f16" if fmt == "gguf" else "bf16")
    path = resolve_model(model)
    if path.is_file() and path.suffix == ".gguf":
        source = GGUFFile(path)
    elif path.exists():
        source = Model(path)
    else:  # a catalog name, or an error listing the names
        source = catalog.load(model)
    try:
        rows = variants(source, fmt, ctx, kv, parse_bytes(vram), gpus)
    finally:
        if isinstance(source, Model):
            source.close()
    add_measured(rows, [_read_report(p) for p in reports])
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=1))
        return
    click.echo(f"{model}: {gpus} x {vram} at ctx {ctx}, KV {kv}")
    header = ("variant", "bpw", "weights", "KV cache", "compute", "total", "fits")
    table = [header] + [(r.name + (" <- best" if r.best else ""), f"{r.bpw:.2f}", _bytes(r.weights_bytes),
                         _bytes(r.kv_bytes), _bytes(r.compute_bytes), _bytes(r.total_bytes), "yes" if r.fits else "no")
                        for r in rows]
    if reports:
        header += ("KLD mean", "KLD p99", "PPL")
        table = [table[0] + header[-3:]] + [
            row + tuple("-" if v is None else f"{v:.4f}" if i < 2 else f"{v:.3f}"
                        for i, v in enumerate((r.kld_mean, r.kld_p99, r.ppl)))
            for row, r in zip(table[1:], rows, strict=True)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        click.echo("  ".join(cells))
    if not any(r.fits for r in rows):
        smallest = min(rows, key=lambda r: r.total_bytes)
        raise QuantkitError(f"nothing fits {gpus} x {vram} at ctx {ctx}: the smallest variant, {smallest.name}, "
                            f"needs {_bytes(smallest.total_bytes)}; add GPUs, shorten --ctx or pick a smaller "
                            "KV type")


@main.command()
@click.argument("variant_dir", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, metavar="USER/NAME", help="Hugging Face model repo to publish to.")
@click.option("-o", "--output", "staging_dir", type=click.Path(path_type=Path),
              help="Staging folder: the repo's files, checksummed (default: <RUN_DIR>/publish/<model>-<variant>).")
@click.option("--dry-run", is_flag=True, help="Stage and list what would be uploaded (path, bytes, sha256); "
                                              "upload nothing. The staging folder is kept for inspection.")
@click.option("--max-shard-size", default="48GB", show_default=True, metavar="SIZE",
              help="A GGUF larger than this is re-split into gguf-split shards of at most SIZE of tensor data "
                   "(the Hub refuses files over 50GB).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--token", help="Hugging Face token (default: HF_TOKEN, or the login `hf auth login` stored).")
def publish(variant_dir, repo_id, staging_dir, dry_run, max_shard_size, private, token):
    """Publish VARIANT_DIR (one variant of a `quantkit run`: RUN_DIR/<model>/<variant>) to the Hugging Face Hub:
    model card with its measured quality and VRAM, SHA256SUMS and the artifact, uploaded in one commit."""
    from quantkit import publish as api
    from quantkit.plan.vram import parse_bytes

    api.check_repo_id(repo_id)
    max_bytes = parse_bytes(max_shard_size)
    if not dry_run:  # before staging, which may copy or re-split hundreds of GB
        token = api.resolve_token(token)
    staging_dir = staging_dir or api.default_staging_dir(variant_dir)
    staged = api.stage(variant_dir, staging_dir, repo_id, max_shard_bytes=max_bytes)
    total = sum(f.size for f in staged)
    if dry_run:
        click.echo(f"would upload {len(staged)} files ({total} bytes) to https://huggingface.co/{repo_id}:")
        width = max(len(f.path) for f in staged)
        for f in staged:
            click.echo(f"{f.path.ljust(width)}  {f.size:>14}  {f.sha256}")
        click.echo(f"staged in {staging_dir} (dry run: nothing uploaded)")
        return
    url = api.upload(staging_dir, repo_id, token=token, private=private)
    click.echo(f"uploaded {len(staged)} files ({_bytes(total)}) to {url}")

@main.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--output", "run_dir", type=click.Path(path_type=Path),
              help="Run directory (default: runs/<recipe name>). Rerunning on it resumes: finished work is skipped.")
@click.option("--only", metavar="NAME", help="Only this model, variant, or MODEL/VARIANT (and what it needs).")
@click.option("--dry-run", is_flag=True, help="Print what the run will compute (passes, variants, planned sizes, "
                                              "what is finished already); compute nothing.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes on this machine; ray: tasks on a Ray cluster (--address).")
@click.option("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance).")
@click.option("--jobs", type=int, help="Local tasks at once (default: one per 4 cores); one calibration at a time.")
@click.option("--threads", type=int, help="Threads per task (default: cores / jobs). Give the same number to "
                                          "reproduce a run's bytes on another machine or executor.")
@click.option("--device", default=None, help="Device for calibration and quantization (default: cuda if "
                                              "available, else cpu).")
def run(recipe, run_dir, only, dry_run, executor, address, jobs, threads, device):
    """Run RECIPE (YAML: models x variants, shared calibration and evaluation): every variant of every model,
    one read and one calibration pass per model for its variants, evaluated into one report per model and an
    index; resumable after a kill, locally or on a Ray cluster."""
    from quantkit.recipe import RunSettings, describe_run, load_recipe, run_recipe

    loaded = load_recipe(recipe)
    run_dir = run_dir or Path("runs") / loaded.name
    if dry_run:
        click.echo(describe_run(loaded, run_dir, only))
        return
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    for value, name in ((jobs, "--jobs"), (threads, "--threads")):
        if value is not None and value < 1:
            raise QuantkitError(f"{name} must be at least 1")
    run_recipe(loaded, RunSettings(run_dir, executor, address, jobs, threads, device), only)
    click.echo(f"finished: {run_dir / 'index.md'}")

def _summary_lines(r: dict):
    yield "model", r["path"]
    if r["architecture"] is None:
        yield "architecture", "unknown (no config.json)"
    else:
        skipped = r["skipped_tensors"]
        extra = f"; {skipped['count']} MTP tensors skipped ({_count(skipped['parameters'])} params)" if skipped else ""
        declared = ", ".join(r["hf_architectures"] or [])
        yield "architecture", f"{r['architecture']} ({declared}), {r['layers']} layers{extra}"
    params = r["parameters"]
    active = params.get("active")
    yield "parameters", _count(params["total"]) + (
        f" total, {_count(active)} active per token" if active is not None and active != params["total"] else "")
    yield "dtypes", ", ".join(f"{d}: {v['tensors']} tensors, {_bytes(v['bytes'])}" for d, v in r["dtypes"].items())
    fp8 = r["fp8"]
    yield "fp8", (f"yes, {fp8['block_size'][0]}x{fp8['block_size'][1]} block scales (weight_scale_inv)"
                  if fp8["detected"] else "no")
    yield "on disk", f"{_bytes(r['size_on_disk'])} in {r['files']} file(s)"
    if r["architecture"] is not None:
        q = r["quantizable"]
        roles = ", ".join(f"{role} x{n}" for role, n in q["by_role"].items())
        yield "quantizable", f"{q['linear_weights']} linear weights, {_count(q['parameters'])} params: {roles}"
        yield "embeddings", ", ".join(r["embeddings"]) + " (GGUF mixtures quantize these; GPTQ/AWQ keep them)"


def _gguf_summary_lines(r: dict):
    yield "model", r["path"]
    mix = " (a gguf:auto mix, named after its main type)" if "auto.budget" in r["quantize"] else ""
    yield "format", (f"GGUF, {r['files']} file(s), {_bytes(r['size_on_disk'])}; {r['architecture']} "
                     f"{r['name']!r}, file type {r['file_type']}{mix}")
    yield "parameters", f"{_count(r['parameters'])} in {r['tensors']} tensors"
    bpw = r["bpw"]
    if bpw["file"] is None:
        yield "bpw", "no tensors (a vocabulary-only file)"
        return
    yield "bpw", f"{bpw['file']:.3f} over all tensors (llama.cpp's)" + (
        "" if bpw["repeating_layers"] is None else
        f"; {bpw['repeating_layers']:.3f} over the repeating layers (token_embd and output left out, as EXL3 and "
        "papers count)")
    yield "head", ", ".join(f"{name} {h['type']} ({h['bpw']:.2f} bpw)" for name, h in r["head"].items()) + (
        "" if "output.weight" in r["head"] else " (tied: also the output)")
    yield "types", ", ".join(f"{t} x{v['tensors']} ({v['elements'] / r['parameters']:.1%} of weights)"
                             for t, v in r["types"].items())
    for layer in r["layers"]:
        yield f"blk.{layer['layer']}", f"{layer['bpw']:.2f} bpw: " + ", ".join(
            f"{t} x{n}" for t, n in layer["types"].items())
    if r["quantize"]:
        yield "quantize", "; ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in r["quantize"].items())


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _read_report(path: Path) -> dict:
    import json

    file = path / "report.json" if path.is_dir() else path
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantkitError(f"{file}: not a quantkit eval report.json ({exc}); give the report.json `quantkit "
                            "eval` wrote, or its folder") from None


if __name__ == "__main__":
    main()
