"""`quantkit convert`: one source checkpoint -> one or more outputs, in any registered format, each format (or
each group of formats sharing a pass: GPTQ and AWQ) writing all of its outputs from one read of the source."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from quantkit.errors import ConfigError
from quantkit.formats import ConvertOptions, Job, Target, get_format, parse_target
from quantkit.formats.overrides import check_all_used, parse_overrides
from quantkit.model import Model
from quantkit.output import check_writable
from quantkit.plan import Plan
from quantkit.source.gguf_file import GGUFFile


def output_paths(model_name: str, targets: list[Target], output: Path | None) -> list[Path]:
    """One --to: -o is the file when it has the format's suffix. Otherwise -o is a folder (default: the current
    one) holding each output under the format's own name for it (<model>-<TYPE>.gguf, ...)."""
    if output is not None and len(targets) == 1:
        name = get_format(targets[0].format).file_name(model_name, targets[0])
        if output.suffix and output.suffix == Path(name).suffix:
            return [output]
    folder = output if output is not None else Path.cwd()
    return [folder / get_format(t.format).file_name(model_name, t) for t in targets]


def keep_first_dense(source) -> str:
    """`--keep-first-dense` as the override it stands for (named sets come before --tensor-type overrides): the
    dense layers before the first MoE layer kept BF16, matched by checkpoint and GGUF names alike."""
    arch = getattr(source, "arch", None)  # a GGUF source has none
    moe = [arch.is_moe_layer(i) for i in range(arch.num_layers)] if hasattr(arch, "is_moe_layer") else []
    dense = moe.index(True) if True in moe else 0
    if not dense or any(not m for m in moe[dense:]):
        raise ConfigError("--keep-first-dense needs an HF checkpoint of a MoE model whose first layers are dense "
                          "(DeepSeek-V3/R1: first_k_dense_replace); this source has none")
    return rf"^(?:model\.layers|blk)\.(?:{'|'.join(map(str, range(dense)))})\.=bf16"


def name_auto_targets(targets: list[Target], budgets: list) -> list[Target]:
    """An `auto` target is named after its budget (gguf:auto -> gguf:auto-4.00bpw, written as
    <model>-auto-4.00bpw.gguf; ct:auto-gptq -> ct:auto-gptq-4.00bpw)."""
    named = []
    for target, budget in zip(targets, budgets, strict=True):
        if target.spec.split("-")[0] != "auto":
            named.append(target)
        elif budget is None:
            raise ConfigError(f"{target} needs a budget: --target-bpw 4.0, --target-size 20GB or "
                              "--fit-vram 24GiB --ctx 32768")
        else:
            named.append(Target(target.format, f"{target.spec}-{budget.label}"))
    return named


def check_overrides_used(parsed: list[Target], plans: list[Plan], options: list[ConvertOptions]) -> None:
    """Every --tensor-type override decides some tensor of the targets it was given for."""
    by_overrides: dict[tuple[str, ...], list[int]] = {}
    for i, own in enumerate(options):
        by_overrides.setdefault(tuple(own.tensor_types), []).append(i)
    for overrides, indices in by_overrides.items():
        check_all_used(parse_overrides(overrides), (e.note for i in indices for e in plans[i].entries),
                       lambda o, ix=indices: any(get_format(parsed[i].format).reads_scheme(o.scheme) for i in ix))


def _open_source(path: str | Path, device: str):
    if str(path).endswith(".gguf"):  # requantize an F32/F16/BF16 GGUF, as llama-quantize does
        return GGUFFile(path)
    return Model(path, device=device)


def convert(model_path: str | Path, targets: list[str], output: Path | None = None, *, dry_run: bool = False,
            paths: list[Path] | None = None, target_options: list[dict] | None = None,
            **options) -> list[tuple[Path, Plan]]:
    """Plan (and unless dry_run, write) every target; `options` are ConvertOptions fields (imatrix=...,
    force=..., threads=...). A recipe run passes, per target, its output path (`paths`, instead of `output`) and
    the options only its plan reads (`target_options`: overrides, keep_first_dense, fix_mix, budget, damp), so
    targets that differ only in those still share one read of the source and one calibration pass. Returns
    (path, plan) per target in the order given: a folder output's folder, or a file output's file (with sharded
    output, the first shard)."""
    parsed = [parse_target(t) for t in targets]
    if not parsed:
        raise ConfigError("nothing to do: give at least one --to FORMAT:SPEC, e.g. --to gguf:Q4_K_M")
    options = ConvertOptions(**options)
    for given in (paths, target_options):
        if given is not None and len(given) != len(parsed):
            raise ValueError(f"{len(given)} paths or option sets for {len(parsed)} targets")
    own = [replace(options, **(target_options[i] if target_options else {})) for i in range(len(parsed))]
    if options.budget is not None and not any(t.spec.split("-")[0] == "auto" for t in parsed):
        raise ConfigError(f"{options.budget.option} applies to automatic mixes only: add --to gguf:auto (or ct:auto, "
                          "gptq:auto)")
    parsed = name_auto_targets(parsed, [o.budget for o in own])
    if not dry_run:  # before reading anything: an unwritable location is found now, not after the work
        for folder in {p.parent for p in paths} if paths else {output_paths("model", parsed, output)[0].parent}:
            check_writable(folder)
    source = _open_source(model_path, options.device)
    try:
        model_name = options.name or (Path(model_path).stem if isinstance(source, GGUFFile)
                                      else source.source.path.name)
        paths = list(paths) if paths is not None else output_paths(model_name, parsed, output)
        for o in own:
            if o.keep_first_dense:
                o.tensor_types = [keep_first_dense(source), *o.tensor_types]
        by_format: dict[str, list[int]] = {}
        for index, target in enumerate(parsed):
            by_format.setdefault(target.format, []).append(index)
        plans: list[Plan | None] = [None] * len(parsed)
        for name, indices in by_format.items():
            fmt = get_format(name)
            fmt.prepare(source, options)
            for i in indices:
                plans[i] = fmt.plan(source, parsed[i], own[i])
        check_overrides_used(parsed, plans, own)
        if dry_run:
            return list(zip(paths, plans, strict=True))
        by_pass: dict[str, list[int]] = {}
        for name, indices in by_format.items():
            by_pass.setdefault(get_format(name).shared_pass or name, []).extend(indices)
        written: list[Path | None] = [None] * len(parsed)
        for indices in by_pass.values():
            jobs = [Job(parsed[i], plans[i], paths[i], own[i]) for i in indices]
            writer = get_format(parsed[indices[0]].format)
            for i, files in zip(indices, writer.write(source, jobs, options), strict=True):
                written[i] = paths[i] if paths[i].is_dir() else files[0]  # a folder format: the folder
        return list(zip(written, plans, strict=True))
    finally:
        if isinstance(source, Model):
            source.close()
