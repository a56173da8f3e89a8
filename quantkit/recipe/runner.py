"""`quantkit run RECIPE`: every variant of every model of a recipe, evaluated, in a resumable run directory.

Per model: one importance matrix shared by its GGUF variants; one `convert` per set of variants with the same
options (one read of the source, one calibration pass for all of them: convert's shared passes); one evaluation of
every variant against the source; each variant's model card. The driver (this module) orders those tasks, hands
them to an executor (worker processes, or Ray), and records each finished one in state.json under a fingerprint of
everything its output depends on. A rerun skips what is recorded and intact and redoes the rest; a changed
recipe changes the fingerprints of exactly the tasks it affects. Layout of a run directory:

    RUN_DIR/recipe.yaml, state.json, index.md, index.json
    RUN_DIR/MODEL/imatrix.gguf
    RUN_DIR/MODEL/VARIANT/{artifact, variant.json, README.md}
    RUN_DIR/MODEL/eval/{report.json, report.md, quality_vs_vram.png}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.plan.plan import format_size
from quantkit.recipe.schema import Recipe, Variant, locate_model
from quantkit.recipe.state import RunState
from quantkit.recipe.tasks import EVAL_DIR, IMATRIX_FILE, Task, execute

log = logging.getLogger(__name__)

RECIPE_COPY = "recipe.yaml"
INDEX_JSON, INDEX_MD = "index.json", "index.md"


# ---- what a run consists of ------------------------------------------------------------------------------------

@dataclass
class Step:
    """A task before it is ready: its fingerprint needs the records of the steps it depends on."""

    id: str
    kind: str
    model: str
    heavy: bool
    after: tuple[str, ...] = ()
    variants: list[Variant] = field(default_factory=list)  # convert: its variants; eval/cards: the model's
    options: dict = field(default_factory=dict)  # convert: the pass options its variants share


@dataclass
class ModelRun:
    name: str
    source: Path | str  # an HF folder, or a catalog repo id (dry runs only)
    entry: object
    variants: list[Variant]
    steps: list[Step]

    @property
    def is_catalog(self) -> bool:
        return isinstance(self.source, str)


def variant_id(model: str, variant: Variant) -> str:
    return f"{model}/{variant.name}"


def uses_calibration(variant: Variant) -> bool:
    """Whether the variant's bytes depend on the calibration text: GPTQ/AWQ methods and automatic mixes."""
    from quantkit.formats import get_format, parse_target

    target = parse_target(variant.to)
    if target.spec.startswith("auto"):
        return True
    return target.format != "gguf" and not get_format(target.format).is_rtn(target)


def uses_imatrix(variant: Variant) -> bool:
    return variant.format == "gguf" and variant.imatrix


# ConvertOptions fields a target's plan reads (convert takes them per target) vs. those of the whole pass
TARGET_OPTIONS = ("tensor_types", "output_tensor_type", "token_embedding_type", "pure", "keep_first_dense",
                  "fix_mix", "budget", "damp")


def convert_options(recipe: Recipe, variant: Variant) -> dict:
    """The ConvertOptions fields of a variant (JSON-able: its convert task carries them)."""
    cal = recipe.calibration
    options = {"tensor_types": list(variant.tensor_types), "output_tensor_type": variant.output_tensor_type,
               "token_embedding_type": variant.token_embedding_type, "pure": variant.pure,
               "keep_first_dense": variant.keep_first_dense, "fix_mix": variant.fix_mix,
               "split_max_size": variant.split_max_size, "budget": asdict(variant.budget),
               "imatrix": None, "calib": None, "calib_samples": cal.samples, "calib_ctx": cal.ctx,
               "damp": cal.damp, "sensitivity_samples": cal.sensitivity_samples,
               "sensitivity_method": cal.sensitivity_method}
    if uses_imatrix(variant):
        options["imatrix"] = "IMATRIX"  # the model's, placed when the task is made
    if uses_calibration(variant) and cal.text is not None:
        options["calib"] = str(cal.text)
    return options


def pass_options(options: dict) -> dict:
    """What variants must share to be written in one convert: one read of the source, one calibration pass."""
    return {k: v for k, v in options.items() if k not in TARGET_OPTIONS}


def build(recipe: Recipe, only: str | None = None) -> list[ModelRun]:
    """The models and steps of a run (restricted by --only to a model, a variant, or MODEL/VARIANT)."""
    runs = []
    for entry in recipe.models:
        variants = recipe.model_variants(entry.name)
        if only is not None:
            if only != entry.name:
                variants = [v for v in variants if only in (v.name, variant_id(entry.name, v))]
            if not variants:
                continue
        runs.append(_model_run(recipe, entry, variants))
    if not runs:
        names = [m.name for m in recipe.models] + [v.name for v in recipe.variants]
        raise QuantkitError(f"--only {only!r} names no model or variant of {recipe.path.name} "
                            f"({', '.join(dict.fromkeys(names))})")
    return runs


def _model_run(recipe: Recipe, entry, variants: list[Variant]) -> ModelRun:
    source = locate_model(recipe.path, entry)
    steps: list[Step] = []
    imatrix_id = f"{entry.name}/imatrix"
    if any(uses_imatrix(v) for v in variants):
        steps.append(Step(imatrix_id, "imatrix", entry.name, heavy=True))
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(json.dumps(pass_options(convert_options(recipe, v)), sort_keys=True), []).append(v)
    converts = []
    for key, members in groups.items():
        options = json.loads(key)
        step = Step(f"{entry.name}/convert:{'+'.join(v.name for v in members)}", "convert", entry.name,
                    heavy=any(uses_calibration(v) for v in members),
                    after=(imatrix_id,) if options["imatrix"] else (), variants=members, options=options)
        converts.append(step)
    steps += converts
    if recipe.evaluation.enabled:
        eval_id = f"{entry.name}/eval"
        steps.append(Step(eval_id, "eval", entry.name, heavy=True, after=tuple(s.id for s in converts),
                          variants=variants))
        steps.append(Step(f"{entry.name}/cards", "cards", entry.name, heavy=False, after=(eval_id,),
                          variants=variants))
    return ModelRun(entry.name, source, entry, variants, steps)


# ---- fingerprints: what each output depends on --------------------------------------------------------------------

def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def folder_identity(folder: Path) -> list:
    """(name, size, mtime_ns) of every file of a source folder: a changed checkpoint changes it."""
    return [(p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()]


def file_identity(path: Path | None):
    """A text file's identity, or for the bundled text (None) the interpreter whose standard library it is."""
    if path is None:
        from quantkit.bundled.textsets import python_version

        return ["bundled", python_version()]
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _records_digest(record: dict) -> dict:
    return {rel: info["sha256"] for rel, info in record["files"].items()}


class _Fingerprints:
    def __init__(self, recipe: Recipe, model: ModelRun, state: RunState):
        self.recipe, self.model, self.state = recipe, model, state
        self.source = folder_identity(model.source)

    def imatrix(self) -> str:
        cal = self.recipe.calibration
        return _digest({"quantkit": __version__, "kind": "imatrix", "source": self.source,
                        "text": file_identity(cal.text), "ctx": cal.imatrix_ctx, "chunks": cal.imatrix_chunks})

    def variant(self, variant: Variant) -> str:
        options = convert_options(self.recipe, variant)
        if options["imatrix"]:
            options["imatrix"] = _records_digest(self.state.tasks[f"{self.model.name}/imatrix"])
        if uses_calibration(variant):
            options["calib"] = file_identity(self.recipe.calibration.text)
        else:
            for key in ("calib", "calib_samples", "calib_ctx", "damp", "sensitivity_samples", "sensitivity_method"):
                options.pop(key)
        return _digest({"quantkit": __version__, "kind": "variant", "source": self.source, "to": variant.to,
                        "options": options})

    def evaluation(self, step: Step) -> str:
        ev = self.recipe.evaluation
        variants = {v.name: _records_digest(self.state.tasks[variant_id(self.model.name, v)]) for v in step.variants}
        return _digest({"quantkit": __version__, "kind": "eval", "source": self.source, "ctx": ev.ctx,
                        "windows": ev.windows, "mc_items": ev.mc_items, "backend": ev.backend,
                        "text": file_identity(ev.text), "tasks": file_identity(ev.tasks), "variants": variants})

    def cards(self, step: Step) -> str:
        report = _records_digest(self.state.tasks[f"{self.model.name}/eval"])
        variants = {v.name: [_records_digest(self.state.tasks[variant_id(self.model.name, v)]),
                             card_facts(self.recipe, self.model, v)] for v in step.variants}
        return _digest({"quantkit": __version__, "kind": "cards", "report": report, "variants": variants,
                        "publish": asdict(self.recipe.publish)})


def card_facts(recipe: Recipe, model: ModelRun, variant: Variant) -> dict:
    """What variant.json records besides the artifact: what a model card and `quantkit publish` need (the cards
    task writes it, so a change here redoes the cards, not the variant)."""
    from quantkit.formats import parse_target

    return {"recipe": recipe.path.name, "model": model.name, "source": str(model.source),
            "base_model": model.entry.base_model, "license": model.entry.license, "variant": variant.name,
            "to": variant.to, "format": parse_target(variant.to).format,
            "command": equivalent_command(model, variant, convert_options(recipe, variant)),
            "tags": sorted({*recipe.publish.tags, *variant.tags}),
            "eval_ctx": recipe.evaluation.ctx if recipe.evaluation.enabled else None}


def equivalent_command(model: ModelRun, variant: Variant, options: dict) -> str:
    """The one-model `quantkit convert` that makes the same bytes (with the run's importance matrix)."""
    from quantkit.formats import parse_target

    args = ["quantkit", "convert", str(model.entry.path), "--to", variant.to]
    if options["imatrix"]:
        args += ["--imatrix", f"{model.name}/{IMATRIX_FILE}"]
    for text in options["tensor_types"]:
        args += ["--tensor-type", text]
    for key in ("output_tensor_type", "token_embedding_type", "split_max_size"):
        if options[key]:
            args += [f"--{key.replace('_', '-')}", options[key]]
    for key in ("pure", "keep_first_dense", "fix_mix"):
        if options[key]:
            args.append(f"--{key.replace('_', '-')}")
    if uses_calibration(variant):
        if options["calib"]:
            args += ["--calib", Path(options["calib"]).name]
        args += ["--calib-samples", str(options["calib_samples"]), "--calib-ctx", str(options["calib_ctx"])]
        if options["damp"] is not None:
            args += ["--damp", str(options["damp"])]
        if parse_target(variant.to).spec.startswith("auto"):
            args += ["--sensitivity-samples", str(options["sensitivity_samples"])]
            if options["sensitivity_method"] is not None:
                args += ["--sensitivity-method", options["sensitivity_method"]]
    budget = variant.budget
    for key in ("target_bpw", "target_size", "fit_vram"):
        if getattr(budget, key) is not None:
            args += [f"--{key.replace('_', '-')}", str(getattr(budget, key))]
            if key == "fit_vram":
                args += ["--ctx", str(budget.ctx), "--gpus", str(budget.gpus)]
                if budget.kv_type:
                    args += ["--kv-type", budget.kv_type]
    return shlex.join(args)


# ---- running -------------------------------------------------------------------------------------------------

@dataclass
class RunSettings:
    run_dir: Path
    executor: str = "local"
    address: str | None = None
    jobs: int | None = None
    threads: int | None = None
    device: str = "cpu"


def default_jobs() -> int:
    """Tasks at once on this machine: one per 4 cores (each task is itself multi-threaded), at least one."""
    return max(1, (os.cpu_count() or 1) // 4)


def run_recipe(recipe: Recipe, settings: RunSettings, only: str | None = None) -> list[ModelRun]:
    runs = build(recipe, only)
    catalog = [m for m in runs if m.is_catalog]
    if catalog:
        raise QuantkitError(f"{recipe.path.name}: model {catalog[0].name!r} is a catalog entry ({catalog[0].source}),"
                            " a config without weights: download it and give its folder as `path:` (a dry run "
                            "works without it)")
    with RunState(settings.run_dir) as state:
        _copy_recipe(recipe, settings.run_dir)
        driver = _Driver(recipe, runs, state, settings)
        try:
            driver.run()
        finally:
            driver.close()
        write_index(settings.run_dir, runs, state)
    return runs


def _executor(settings: RunSettings):
    from quantkit.recipe.executors import LocalExecutor, RayExecutor

    if settings.executor == "ray":
        return RayExecutor(settings.address)
    if settings.executor != "local":
        raise QuantkitError(f"unknown executor {settings.executor!r}: local or ray")
    return LocalExecutor(settings.jobs or default_jobs())


def _copy_recipe(recipe: Recipe, run_dir: Path) -> None:
    tmp = run_dir / (RECIPE_COPY + ".tmp")
    shutil.copyfile(recipe.path, tmp)
    tmp.replace(run_dir / RECIPE_COPY)


class _Driver:
    def __init__(self, recipe, runs, state, settings):
        self.recipe, self.runs, self.state, self.settings = recipe, runs, state, settings
        self._executor = None
        self.fingerprints = {m.name: _Fingerprints(recipe, m, state) for m in runs}
        self.models = {m.name: m for m in runs}
        self.done: set[str] = set()
        self._known: dict[str, dict[str, str]] = {}  # step id -> its records' fingerprints
        self._logged: set[str] = set()

    def run(self) -> None:
        pending = [s for m in self.runs for s in m.steps]
        total = len(pending)
        self._began, self._finished_here = time.monotonic(), 0
        running: dict[str, Step] = {}
        log.info("run %s: %d tasks in %s (%s executor)", self.recipe.name, total, self.settings.run_dir,
                 self.settings.executor)
        failure: Exception | None = None
        while pending or running:
            for step in list(pending):
                if failure is not None or not all(dep in self.done for dep in step.after):
                    continue
                if self._is_finished(step):
                    pending.remove(step)
                    self.done.add(step.id)
                    continue
                if not self._has_room(step, running):
                    continue
                log.info("start %s", step.id)
                pending.remove(step)
                if step.kind == "cards":  # a few small files: not worth a worker's start (torch's import)
                    task = self._start(step)
                    self._finish(step, task, execute(task), total - len(pending) - len(running), total)
                    continue
                self.executor.submit(self._start(step))
                running[step.id] = step
            if not running:
                if pending and failure is None:
                    raise RuntimeError(f"no task can start: {[s.id for s in pending]}")
                break
            for task, outcome in self.executor.wait():
                step = running.pop(task.id)
                if isinstance(outcome, Exception):
                    failure = failure or outcome
                    log.error("%s failed", step.id)
                    continue
                self._finish(step, task, outcome, total - len(pending) - len(running), total)
        if failure is not None:
            raise failure

    @property
    def executor(self):
        """Made when a task first needs it: a rerun with nothing to do needs no worker, nor a reachable cluster."""
        if self._executor is None:
            self._executor = _executor(self.settings)
            self.threads = self.settings.threads or self._executor.default_threads()
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()

    def _finish(self, step: Step, task: Task, outcome: dict, finished: int, total: int) -> None:
        self._record(task, outcome)
        self.done.add(step.id)
        self._finished_here += 1
        elapsed = time.monotonic() - self._began
        left = total - finished
        eta = f", ETA {_duration(elapsed / self._finished_here * left)}" if left else ""
        log.info("done %s in %s [%d/%d tasks%s]", step.id, _duration(outcome["seconds"]), finished, total, eta)

    def _has_room(self, step: Step, running: dict[str, Step]) -> bool:
        if self.executor.jobs is not None and self.executor.running >= self.executor.jobs:
            return False
        limit = self.executor.heavy_limit
        return not (step.heavy and limit is not None and sum(s.heavy for s in running.values()) >= limit)

    def _fingerprints(self, step: Step) -> dict[str, str]:
        """State id -> fingerprint of everything the step records (a convert: each of its variants)."""
        if step.id not in self._known:
            fp = self.fingerprints[step.model]
            if step.kind == "convert":
                self._known[step.id] = {variant_id(step.model, v): fp.variant(v) for v in step.variants}
            elif step.kind == "imatrix":
                self._known[step.id] = {step.id: fp.imatrix()}
            elif step.kind == "eval":
                self._known[step.id] = {step.id: fp.evaluation(step)}
            else:
                self._known[step.id] = {step.id: fp.cards(step)}
        return self._known[step.id]

    def _is_finished(self, step: Step) -> bool:
        """Whether every record of the step is finished and intact (logged once: skipped, or why it is redone)."""
        todo = []
        for record_id, fingerprint in self._fingerprints(step).items():
            if self.state.finished(record_id, fingerprint) is not None:
                if record_id not in self._logged:
                    log.info("skip %s: finished before, files intact", record_id)
            else:
                todo.append(record_id)
                if record_id in self.state.tasks and record_id not in self._logged:
                    why = ("the recipe or its inputs changed" if self.state.tasks[record_id]["fingerprint"]
                           != fingerprint else "its files changed")
                    log.info("redo %s: %s", record_id, why)
            self._logged.add(record_id)
        return not todo

    def _start(self, step: Step) -> Task:
        model, run_dir = self.models[step.model], self.settings.run_dir
        fingerprints = self._fingerprints(step)
        if step.kind == "convert":
            todo = [v for v in step.variants
                    if self.state.finished(variant_id(step.model, v), fingerprints[variant_id(step.model, v)]) is None]
            for v in todo:
                self._restart_variant(step.model, v, fingerprints[variant_id(step.model, v)])
            options = dict(step.options)
            if options["imatrix"]:
                options["imatrix"] = f"{step.model}/{IMATRIX_FILE}"
            variants = [{"id": variant_id(step.model, v), "name": v.name, "to": v.to, "dir": f"{step.model}/{v.name}",
                         "options": {k: o for k, o in convert_options(self.recipe, v).items() if k in TARGET_OPTIONS}}
                        for v in todo]
            return self._task(step, {"source": str(model.source), "model": step.model, "variants": variants,
                                     "options": options})
        fingerprint = fingerprints[step.id]
        self.state.start(step.id, fingerprint)
        params: dict = {}
        if step.kind == "imatrix":
            (run_dir / step.model / IMATRIX_FILE).unlink(missing_ok=True)
            cal = self.recipe.calibration
            params |= {"source": str(model.source), "out": f"{step.model}/{IMATRIX_FILE}",
                       "text": str(cal.text) if cal.text else None, "ctx": cal.imatrix_ctx,
                       "chunks": cal.imatrix_chunks}
        elif step.kind == "eval":
            ev = self.recipe.evaluation
            params |= {"source": str(model.source), "out": f"{step.model}/{EVAL_DIR}",
                       "artifacts": [f"{step.model}/{v.name}/{self._artifact(step.model, v)}"
                                     for v in step.variants],
                       "text": str(ev.text) if ev.text else None, "tasks": str(ev.tasks) if ev.tasks else None,
                       "mc_items": ev.mc_items, "ctx": ev.ctx, "windows": ev.windows, "backend": ev.backend}
        else:
            params |= {"variants": {f"{step.model}/{v.name}": {
                           **card_facts(self.recipe, model, v),
                           "artifact": self.state.tasks[variant_id(step.model, v)]["artifact"],
                           "files": self.state.tasks[variant_id(step.model, v)]["artifact_files"]}
                           for v in step.variants},
                       "plot": f"{step.model}/{EVAL_DIR}/quality_vs_vram.png",
                       "repo_ids": {f"{step.model}/{v.name}": self._repo_id(step.model, v) for v in step.variants}}
        return self._task(step, params)

    def _task(self, step: Step, params: dict) -> Task:
        threads = 1 if step.kind == "cards" else self.threads  # the cards run in the driver
        return Task(step.id, step.kind, str(self.settings.run_dir.resolve()), step.heavy, threads,
                    self.settings.device, params)

    def _repo_id(self, model: str, variant: Variant) -> str | None:
        template = self.recipe.publish.repo_id
        return template.format(model=model, variant=variant.name, format=variant.format) if template else None

    def _artifact(self, model: str, variant: Variant) -> str:
        return self.state.tasks[variant_id(model, variant)]["artifact"]

    def _restart_variant(self, model: str, variant: Variant, fingerprint: str) -> None:
        """Clear the variant's folder for a new attempt. A killed attempt of the same fingerprint keeps its
        OUT.part (GPTQ/AWQ/ct folders resume after their last finished layer); anything else there is stale."""
        task_id = variant_id(model, variant)
        previous = self.state.start(task_id, fingerprint)
        folder = self.settings.run_dir / model / variant.name
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if previous == fingerprint and path.is_dir() and path.name.endswith(".part"):
                log.info("resume %s from %s", task_id, path.name)
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _record(self, task: Task, outcome: dict) -> None:
        fingerprints = self._known[task.id]
        for record_id, files in outcome["records"].items():
            self.state.finish(record_id, fingerprints[record_id], files, seconds=round(outcome["seconds"], 3),
                              **outcome["facts"].get(record_id, {}))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# ---- the index over all models ------------------------------------------------------------------------------------

def write_index(run_dir: Path, runs: list[ModelRun], state: RunState) -> None:
    """index.json / index.md: every model's variants with their measured quality, from the eval reports."""
    models = []
    for m in runs:
        report_path = run_dir / m.name / EVAL_DIR / "report.json"
        report = json.loads(report_path.read_text()) if f"{m.name}/eval" in state.tasks else None
        rows = {r["name"]: r for r in report["variants"]} if report else {}
        variants = []
        for v in m.variants:
            record = state.tasks.get(variant_id(m.name, v))
            if record is None:
                continue
            row = rows.get(record["artifact"].removesuffix(".gguf"), {})
            variants.append({"variant": v.name, "to": v.to, "path": f"{m.name}/{v.name}/{record['artifact']}",
                             "size_bytes": row.get("size_bytes"), "bpw": row.get("bpw"),
                             "kld_mean": (row.get("kld") or {}).get("mean"),
                             "kld_p99": (row.get("kld") or {}).get("p99"), "top1_pct": row.get("top1_pct"),
                             "delta_ppl_pct": row.get("delta_ppl_pct"),
                             "vram_total": (row.get("vram") or {}).get("total")})
        models.append({"model": m.name, "source": str(m.entry.path),
                       "report": f"{m.name}/{EVAL_DIR}/report.md" if report else None,
                       "baseline_ppl": report["baseline"]["ppl"] if report else None, "variants": variants})
    index = {"quantkit_version": __version__, "models": models}
    _write_atomic(run_dir / INDEX_JSON, json.dumps(index, indent=1) + "\n")
    _write_atomic(run_dir / INDEX_MD, _index_markdown(index))


def _index_markdown(index: dict) -> str:
    lines = ["# Run index", ""]
    for m in index["models"]:
        lines.append(f"## {m['model']}")
        lines.append("")
        base = f", baseline perplexity {m['baseline_ppl']:.3f}" if m["baseline_ppl"] is not None else ""
        report = f" ([report]({m['report']}))" if m["report"] else " (not evaluated)"
        lines.append(f"Source `{m['source']}`{base}{report}.")
        lines.append("")
        lines.append("| variant | to | bpw | size | KLD mean | KLD p99 | top-1 % | ΔPPL % | VRAM |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for v in m["variants"]:
            lines.append("| " + " | ".join([
                f"[{v['variant']}]({m['model']}/{v['variant']}/)", f"`{v['to']}`", _fmt(v["bpw"], ".2f"),
                _size(v["size_bytes"]),
                _fmt(v["kld_mean"], ".5f"), _fmt(v["kld_p99"], ".4f"), _fmt(v["top1_pct"], ".2f"),
                _fmt(v["delta_ppl_pct"], "+.2f"), _size(v["vram_total"])]) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _size(n: int | None) -> str:
    return "—" if n is None else format_size(n)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
