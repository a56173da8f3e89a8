"""The units of a recipe run, as executors run them: in a worker process of this machine or a Ray worker of a
cluster. A Task is plain data (picklable, paths as text) and `execute` needs nothing but the shared run directory,
so any executor can run it; what it returns is the checksummed files the driver records in the state file.

Kinds: `imatrix` (one per model, shared by its GGUF variants), `convert` (the variants of a model that share their
convert options: one read of the source, one calibration pass), `eval` (every variant of a model against the source
in one report), `cards` (each variant's model card from that report).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantkit import __version__
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

VARIANT_FILE = "variant.json"
EVAL_DIR = "eval"
IMATRIX_FILE = "imatrix.gguf"
CARD_FILE = "README.md"
PLOT_FILE = "quality_vs_vram.png"


@dataclass(frozen=True)
class Task:
    id: str  # "MODEL/imatrix", "MODEL/convert:VARIANT+VARIANT", "MODEL/eval", "MODEL/cards"
    kind: str
    run_dir: str
    heavy: bool  # holds a model's calibration activations: one at a time
    threads: int
    device: str
    params: dict = field(default_factory=dict)
    version: str = __version__  # the driver's: its fingerprints assume the worker runs the same quantkit


def execute(task: Task) -> dict:
    """Run one task; returns {"records": {state id: {relative path: file record}}, "facts": {state id: what the
    driver keeps beside the record (a variant's artifact name and files)}, "seconds": float}."""
    import torch

    if task.version != __version__:
        raise QuantkitError(f"this worker runs quantkit {__version__}, the driver {task.version}: install the same "
                            "quantkit on every node (its bytes would not be the ones the run records)")
    torch.set_num_threads(task.threads)
    # Paths inside the run are relative to it: what an output records of them (the imatrix file GGUFs name,
    # report rows) is then the same wherever the run directory is.
    previous = os.getcwd()
    os.chdir(task.run_dir)
    try:
        began = time.perf_counter()
        records, facts = _KINDS[task.kind](task, Path(task.run_dir))
    finally:
        os.chdir(previous)
    return {"records": records, "facts": facts, "seconds": time.perf_counter() - began}


def _progress():
    from quantkit.progress import CliProgress

    return CliProgress(tty=False)  # workers log: several tasks may share one terminal


def _imatrix(task: Task, run_dir: Path) -> dict:
    from quantkit.calib import collect_imatrix, tokenize_file
    from quantkit.calib.cache import StatisticsCache
    from quantkit.calib.data import read_calibration
    from quantkit.model import Model
    from quantkit.recipe.state import file_records

    p = task.params
    out = run_dir / p["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    text, dataset = read_calibration(Path(p["text"]) if p["text"] else None)
    with Model(p["source"], device=task.device) as model, _progress() as show:
        tokens = tokenize_file(model, text)
        result = collect_imatrix(model, tokens, ctx=p["ctx"], max_chunks=p["chunks"], dataset=dataset,
                                 progress=show, cache=StatisticsCache())
    result.save(out)
    return {task.id: file_records(run_dir, [out])}, {}


def _convert(task: Task, run_dir: Path) -> dict:
    from quantkit.convert import convert, name_auto_targets
    from quantkit.formats import get_format, parse_target
    from quantkit.recipe.schema import Budget
    from quantkit.recipe.state import file_records

    p = task.params
    options = dict(p["options"])
    for key in ("imatrix", "calib"):
        if options[key] is not None:
            options[key] = Path(options[key])
    own = [{**v["options"], "budget": Budget(**v["options"]["budget"]).build()} for v in p["variants"]]
    targets = name_auto_targets([parse_target(v["to"]) for v in p["variants"]], [o["budget"] for o in own])
    paths = [run_dir / v["dir"] / get_format(t.format).file_name(p["model"], t)
             for v, t in zip(p["variants"], targets, strict=True)]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    with _progress() as show:
        written = convert(p["source"], [v["to"] for v in p["variants"]], paths=paths, target_options=own,
                          threads=task.threads, device=task.device, progress=show, **options)
    records, facts = {}, {}
    for variant, (path, _plan) in zip(p["variants"], written, strict=True):
        folder = run_dir / variant["dir"]
        files = sorted(folder.iterdir())
        records[variant["id"]] = file_records(run_dir, files)
        facts[variant["id"]] = {"artifact": path.name,
                                "artifact_files": sorted(Path(rel).relative_to(variant["dir"]).as_posix()
                                                for rel in records[variant["id"]])}
    return records, facts


def _eval(task: Task, run_dir: Path) -> dict:
    from quantkit.evaluation.report import write_report
    from quantkit.evaluation.runner import evaluate
    from quantkit.recipe.state import file_records

    p = task.params
    text = text_name = None
    if p["text"]:
        text, text_name = Path(p["text"]).read_text(encoding="utf-8", errors="replace"), p["text"]
    with _progress() as show:
        report = evaluate(p["source"], [run_dir / a for a in p["artifacts"]], text=text, text_name=text_name,
                          tasks=Path(p["tasks"]) if p["tasks"] else None, mc_items=p["mc_items"], ctx=p["ctx"],
                          max_windows=p["windows"], backend=p["backend"], device=task.device, threads=task.threads,
                          progress=show)
    # A run's report is reproducible: the same run gives the same bytes, so the wall-clock facts (date, seconds
    # per variant) go to the log and the state file instead.
    report.pop("date", None)
    for row in (report["baseline"], *report["variants"]):
        log.info("%s: scored in %.1f s", row["name"], row.pop("seconds"))
    for row in (report["baseline"], *report["variants"]):  # paths relative to the run directory
        path = Path(row["path"])
        if path.is_absolute() and path.is_relative_to(run_dir):
            row["path"] = path.relative_to(run_dir).as_posix()
    files = write_report(report, run_dir / p["out"])
    return {task.id: file_records(run_dir, list(files.values()))}, {}


def _cards(task: Task, run_dir: Path) -> dict:
    """Beside each variant's files: variant.json (what it is and how it was made, what `quantkit publish` reads),
    its model card (README.md) and the plot the card shows."""
    from quantkit.publish.card import render_card
    from quantkit.recipe.state import file_records

    p = task.params
    written = []
    for folder, info in p["variants"].items():
        variant_dir = run_dir / folder
        _write_json(variant_dir / VARIANT_FILE, info)
        plot = variant_dir / PLOT_FILE
        shutil.copyfile(run_dir / p["plot"], plot.with_name(PLOT_FILE + ".tmp"))
        plot.with_name(PLOT_FILE + ".tmp").replace(plot)
        card = variant_dir / CARD_FILE
        card.with_name(CARD_FILE + ".tmp").write_text(render_card(variant_dir, p["repo_ids"][folder]))
        card.with_name(CARD_FILE + ".tmp").replace(card)
        written += [variant_dir / VARIANT_FILE, card, plot]
    return {task.id: file_records(run_dir, written)}, {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


_KINDS = {"imatrix": _imatrix, "convert": _convert, "eval": _eval, "cards": _cards}
