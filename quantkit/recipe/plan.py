"""`quantkit run --dry-run`: what a run will compute, before any of it. Per model: the passes its variants share
(the importance matrix, each convert's read of the source and calibration), every variant's planned size and bits
per weight (the same plans convert makes; from the catalog's config when the weights are not here), the evaluation,
and, for a run directory that exists, what is finished already."""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.formats import ConvertOptions, get_format, parse_target
from quantkit.plan.plan import Plan, format_size
from quantkit.recipe.runner import (
    ModelRun,
    build,
    convert_options,
    uses_calibration,
    uses_imatrix,
    variant_id,
)
from quantkit.recipe.schema import Recipe, Variant
from quantkit.recipe.state import STATE_NAME, RunState


def plan_options(recipe: Recipe, variant: Variant) -> ConvertOptions:
    from quantkit.recipe.schema import Budget

    options = convert_options(recipe, variant)
    budget = options.pop("budget")
    return ConvertOptions(**{**options, "imatrix": Path("imatrix.gguf") if options["imatrix"] else None,
                             "calib": Path(options["calib"]) if options["calib"] else None},
                          budget=Budget(**budget).build())


def variant_plans(recipe: Recipe, model: ModelRun) -> dict[str, Plan | None]:
    """Variant name -> its plan (None for an automatic mix: its choice needs the sensitivity measurement)."""
    from quantkit import catalog
    from quantkit.convert import check_overrides_used, keep_first_dense
    from quantkit.model import Model

    source = catalog.load(model.source) if model.is_catalog else Model(model.source)
    plans: dict[str, Plan | None] = {}
    try:
        for step in model.steps:
            if step.kind != "convert":
                continue
            own = [plan_options(recipe, v) for v in step.variants]
            for options in own:
                if options.keep_first_dense:
                    options.tensor_types = [keep_first_dense(source), *options.tensor_types]
            targets = [parse_target(v.to) for v in step.variants]
            for fmt in {t.format for t in targets}:
                get_format(fmt).prepare(source, ConvertOptions())
            for v, target, options in zip(step.variants, targets, own, strict=True):
                plans[v.name] = (None if target.spec.startswith("auto")
                                 else get_format(target.format).plan(source, target, options))
            # overrides are checked as convert checks them (an auto target's when it runs)
            checked = [i for i, v in enumerate(step.variants) if plans[v.name] is not None]
            check_overrides_used([targets[i] for i in checked], [plans[step.variants[i].name] for i in checked],
                                  [own[i] for i in checked])
    except QuantkitError as exc:
        raise QuantkitError(f"{model.name}: {exc}") from None
    finally:
        if isinstance(source, Model):
            source.close()
    return plans


def describe_run(recipe: Recipe, run_dir: Path, only: str | None = None) -> str:
    runs = build(recipe, only)
    state = _existing_state(run_dir)
    lines = [f"recipe {recipe.name} ({recipe.path}): {len(runs)} model(s), "
             f"{sum(len(m.variants) for m in runs)} variant(s) -> {run_dir}"]
    cal, ev = recipe.calibration, recipe.evaluation
    text = cal.text.name if cal.text else "the bundled calibration text"
    for model in runs:
        plans = variant_plans(recipe, model)
        where = f"catalog config of {model.source}: plan only, no weights here" if model.is_catalog \
            else str(model.source)
        lines += ["", f"{model.name} ({where})"]
        imatrix_users = [v.name for v in model.variants if uses_imatrix(v)]
        if imatrix_users:
            chunks = f"{cal.imatrix_chunks} chunks" if cal.imatrix_chunks else "every chunk"
            lines.append(f"  imatrix: {chunks} of {cal.imatrix_ctx} tokens of {text}, shared by "
                         f"{len(imatrix_users)} GGUF variant(s)  [{_status(state, model, f'{model.name}/imatrix')}]")
        passes = [s for s in model.steps if s.kind == "convert"]
        for i, step in enumerate(passes, 1):
            calibrated = [v.name for v in step.variants if uses_calibration(v)]
            what = f"one read of the source for {', '.join(v.name for v in step.variants)}"
            if calibrated:
                what += (f"; one calibration pass ({cal.samples} x {cal.ctx} tokens of {text}) shared by "
                         f"{', '.join(calibrated)}")
            lines.append(f"  pass {i}: {what}")
        lines.append(f"  {'variant':<24} {'to':<28} {'bpw':>6} {'tensors':>11}  status")
        total = 0
        for v in model.variants:
            plan = plans[v.name]
            size = _auto_size(v) if plan is None else format_size(plan.total_bytes)
            bpw = "auto" if plan is None else f"{plan.bpw:.2f}"
            total += plan.total_bytes if plan is not None else 0
            lines.append(f"  {v.name:<24} {v.to:<28} {bpw:>6} {size:>11}  "
                         f"{_status(state, model, variant_id(model.name, v))}")
        lines.append(f"  {'total (planned)':<24} {'':<28} {'':>6} {format_size(total):>11}")
        if ev.enabled:
            windows = f"{ev.windows} windows" if ev.windows else "every window"
            lines.append(f"  eval: every variant against the source, ctx {ev.ctx}, {windows}, "
                         f"{ev.mc_items} multiple-choice items  [{_status(state, model, f'{model.name}/eval')}]")
    return "\n".join(lines)


def _auto_size(v: Variant) -> str:
    b = v.budget
    return f"<= {b.target_bpw} bpw" if b.target_bpw else f"<= {b.target_size or b.fit_vram}"


def _existing_state(run_dir: Path) -> RunState | None:
    if not (run_dir / STATE_NAME).is_file():
        return None
    state = RunState(run_dir)
    state.load()  # read only: a dry run takes no lock and writes nothing
    return state


def _status(state: RunState | None, model: ModelRun, record_id: str) -> str:
    """finished / todo from the state file's records (their fingerprints are checked when the run starts)."""
    if state is None or model.is_catalog:
        return "todo"
    record = state.tasks.get(record_id)
    if record is None:
        return "todo" if record_id not in state.started else "started, unfinished"
    return "finished" if all((state.run_dir / rel).is_file() for rel in record["files"]) else "todo"
