"""The `quantkit` command: parse arguments, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys

import click

from quantkit import __version__
from quantkit.errors import QuantkitError


class _Group(click.Group):
    """Prints QuantkitError as one line, without a traceback, and exits 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QuantkitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="quantkit")
def main():
    """Quantize LLM checkpoints and measure what each variant costs and saves."""


@main.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the full report, including every tensor, as JSON.")
def inspect(model, as_json):
    """Architecture, parameters, dtypes, FP8 layout and quantizable weights of MODEL (a HF folder, a
    .safetensors file, or a bundled model: tiny-qwen2, tiny-llama, tiny-deepseek). Reads headers only."""
    from quantkit.bundled import resolve_model
    from quantkit.inspection import inspect_checkpoint

    report = inspect_checkpoint(resolve_model(model))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for label, value in _summary_lines(report):
        click.echo(f"{label:<13}{value}")


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


if __name__ == "__main__":
    main()
