"""The files `quantkit eval` leaves behind: report.json (the measurements as measured), report.md (settings and
one table) and quality_vs_vram.png (KLD and ΔPPL against VRAM, with each panel's Pareto front)."""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from quantkit.errors import QuantkitError

FILES = {"json": "report.json", "markdown": "report.md", "plot": "quality_vs_vram.png"}
MISSING = "—"
# What each measure of a report.json row means, in which unit; evaluate() writes it into the report ("fields").
FIELDS = {
    "ppl": "perplexity of the scored tokens (settings.ppl_method)",
    "delta_ppl_pct": "perplexity change against the baseline's, in percent (paired over windows)",
    "delta_ppl_pct_2sigma": "two standard errors of delta_ppl_pct, in percent; null with a single window",
    "kld": "KL divergence of the variant's next-token distribution from the baseline's, in nats (natural log): "
           "mean, median, p99 and max over the scored tokens",
    "top1_pct": "percent of scored tokens where the variant's most likely token is the baseline's",
    "delta_p_mean": "mean change of the probability of the baseline's most likely token, in percentage points "
                    "(100 x the difference of probabilities; negative: the variant gives it less)",
    "mc": "multiple choice: items, acc and acc_norm (per byte of the choice's text), fractions 0..1",
    "size_bytes": "bytes on disk",
    "bpw": "bits per weight: 8 x tensor bytes / elements over all tensors (llama.cpp's BPW)",
    "vram": "estimated bytes at settings.ctx: weights, kv_cache, compute, total",
    "vram_saving_pct": "percent of the baseline's vram.total saved",
    "seconds": "seconds spent scoring the variant",
    "null": "not measured, or undefined",
}
_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
# Where a point's label may go, in points from it, in order of preference: right, left, then further out.
_LABEL_OFFSETS = ((5, 5), (5, -5), (-5, 5), (-5, -5), (5, 14), (5, -14), (-5, 14), (-5, -14))


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md and quality_vs_vram.png into `out_dir` (made if missing); return their paths.

    All three are rendered and staged under temporary names in `out_dir` before any is renamed into place, so a
    failure while rendering or writing (a plot that raises, a full disk) replaces none of them; a file under a
    final name is never half-written, and temporary files are removed whatever happens."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "json": (json.dumps(_json_safe(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode(),
        "markdown": render_markdown(report).encode(),
        "plot": render_plot(report),
    }
    staged: list[Path] = []
    try:
        for data in contents.values():
            # Not mkstemp: its files are mode 0600; these get 0666 less the umask, like any file the user makes.
            tmp = out_dir / f".report-{uuid.uuid4().hex}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            staged.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        paths = {key: out_dir / FILES[key] for key in contents}
        for tmp, key in zip(staged, contents, strict=True):
            os.replace(tmp, paths[key])
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    return paths


def check_output(out_dir: Path, force: bool = False) -> None:
    """Refuse, before any measuring, a report folder that cannot be written, or one that already holds a report
    (unless `force`): both used to surface only when the report was written, after the whole evaluation."""
    out_dir = Path(out_dir)
    existing = [name for name in FILES.values() if (out_dir / name).exists()]
    if existing and not force:
        raise QuantkitError(f"{out_dir} already holds a report ({', '.join(existing)}); give another -o folder, or "
                            "--force to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".report-{uuid.uuid4().hex}.tmp"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as exc:
        raise QuantkitError(f"{out_dir}: cannot write the report there ({exc.strerror or exc}); give a writable "
                            "-o folder") from None


def _json_safe(value):
    """NaN/Inf (an undefined metric) as null: json.dumps would write bare NaN, which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (<= on both coordinates, < on one), by x then y.

    Equal points do not dominate each other, so duplicates on the front are all kept."""
    front = [
        i for i, (x, y) in enumerate(points)
        if not any(ox <= x and oy <= y and (ox < x or oy < y) for ox, oy in points)
    ]
    return sorted(front, key=lambda i: (points[i][0], points[i][1], i))


def ordered_rows(report: dict) -> list[tuple[dict, bool]]:
    """(variant, is_baseline): the baseline first, then the variants by size, largest first (unknown last)."""
    variants = sorted(report["variants"], key=lambda v: (v.get("size_bytes") is None, -(v.get("size_bytes") or 0)))
    return [(report["baseline"], True)] + [(v, False) for v in variants]


def render_markdown(report: dict) -> str:
    """Title, a settings paragraph, one table (a row per variant, the baseline first) and the plot."""
    s = report.get("settings", {})
    ctx = s.get("ctx")
    rows = ordered_rows(report)
    columns = _columns(rows, ctx)
    tasks = f"{s['tasks']} ({_text(s.get('mc_items'))} items)" if s.get("tasks") else "none"
    lines = [
        f"# quantkit eval: quality vs VRAM of {_text(report['baseline'].get('name'))}",
        "",
        f"Baseline: {_text(s.get('baseline'))}. Text: {_text(s.get('text'))}. "
        f"Perplexity over {_text(s.get('windows'))} windows of {_text(ctx)} tokens "
        f"({_text(s.get('scored_tokens'))} scored tokens); method: {_text(s.get('ppl_method'))}. "
        f"Multiple-choice tasks: {tasks}. Device: {_text(s.get('device'))}. "
        f"quantkit {_text(report.get('quantkit_version'))}, {_text(report.get('date'))}.",
        "",
        f"KLD, top-1 and Δp compare each variant's next-token distribution with the baseline's on the same tokens: "
        f"KLD in nats (natural log), Δp the change of the probability of the baseline's top token in percentage "
        f"points (pp); ΔPPL is relative to the baseline's perplexity, ±2σ. VRAM @{_text(ctx)}: weights + KV cache "
        f"+ compute buffers at a {_text(ctx)}-token context; the saving is against the baseline's. "
        f"Rows: the baseline first, then the variants by size, largest first. {MISSING} = not measured.",
        "",
        _table_row([header for header, _ in columns]),
        _table_row(["---"] * len(columns)),
    ]
    for variant, is_baseline in rows:
        cells = [cell(variant) for _, cell in columns]
        if is_baseline:
            cells[0] += " (baseline)"
        lines.append(_table_row(cells))
    lines += ["", f"![quality vs VRAM]({FILES['plot']})", ""]
    return "\n".join(lines)


def render_plot(report: dict) -> bytes:
    """PNG bytes: KLD mean (left) and ΔPPL % (right) against VRAM at ctx, 12x5 inches at 120 dpi."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise QuantkitError("the quality-vs-VRAM plot needs matplotlib: pip install matplotlib") from e

    ctx = report.get("settings", {}).get("ctx")
    rows = ordered_rows(report)
    unit, divisor = _unit([(v.get("vram") or {}).get("total") for v, _ in rows], smallest="MiB")
    # Short labels (the type) unless two variants share a type, then the full name tells them apart.
    type_counts = Counter(v.get("type") for v, _ in rows)
    labels = [v["name"] if not v.get("type") or type_counts[v.get("type")] > 1 else v["type"] for v, _ in rows]
    # (title, y label, y of a row, its error bar); the baseline's own deltas may be stored as None, but against
    # itself they are 0 by definition.
    panels = [
        ("KLD mean", "KLD mean vs baseline (nats)", lambda v, base: 0.0 if base else (v.get("kld") or {}).get("mean"),
         None),
        ("ΔPPL %", "ΔPPL % vs baseline (±2σ)",
         lambda v, base: (v.get("delta_ppl_pct") or 0.0) if base else v.get("delta_ppl_pct"),
         lambda v, base: 0.0 if base else v.get("delta_ppl_pct_2sigma") or 0.0),
    ]

    # A bare Figure on an Agg canvas: no display, no pyplot global state shared with the caller.
    fig = Figure(figsize=(12, 5), dpi=120)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.86, bottom=0.2, wspace=0.22)
    fig.suptitle(f"Quality vs VRAM at ctx {_text(ctx)}: baseline {_text(report['baseline'].get('name'))}")
    notes = []
    for k, (title, ylabel, measure, error) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        points, names, errors, is_base = [], [], [], []
        for (variant, base), label in zip(rows, labels, strict=True):
            x, y = (variant.get("vram") or {}).get("total"), measure(variant, base)
            if x is None or y is None:
                continue  # not measured: nothing to place
            points.append((x / divisor, y))
            names.append(label + (" (baseline)" if base else ""))
            errors.append(error(variant, base) if error else 0.0)
            is_base.append(base)
        front = pareto_front(points)
        if front:
            ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="0.5",
                    linestyle="--", linewidth=1, label="Pareto front", zorder=1)
        quant = [i for i in range(len(points)) if not is_base[i]]
        ax.scatter([points[i][0] for i in quant], [points[i][1] for i in quant], color="C0", s=30, zorder=3,
                   label="variant")
        if any(errors):
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=errors, fmt="none", ecolor="C0",
                        elinewidth=1, capsize=3, zorder=2)
        base = [i for i in range(len(points)) if is_base[i]]
        ax.scatter([points[i][0] for i in base], [points[i][1] for i in base], color="C3", marker="*", s=160,
                   zorder=4, label="baseline")
        if k == 0:
            positive = [y for _, y in points if y > 0]
            # Log only pays when the KLDs span decades; symlog keeps the baseline's 0 on the axis, and a
            # threshold on a power of ten keeps the 0 tick a decade away from the first log tick.
            if len(positive) > 1 and max(positive) > 100 * min(positive):
                linthresh = 10 ** math.floor(math.log10(min(positive)))
                ax.set_yscale("symlog", linthresh=linthresh)
                ylabel += " (symlog)"
                notes.append(f"KLD axis linear below {linthresh:g}, logarithmic above.")
        else:
            ax.axhline(0, color="0.7", linewidth=0.8, zorder=0)
        ax.set_xlabel(f"VRAM at ctx {_text(ctx)} ({unit}): weights + KV cache + compute")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} at ctx {_text(ctx)}")
        ax.grid(alpha=0.3)
        ax.margins(0.12)
        # Upper right is high VRAM and poor quality: a corner no sensible variant occupies.
        legend = ax.legend(loc="upper right", fontsize=8)
        _place_labels(ax, points, names, [legend])
    fig.text(0.5, 0.02, " ".join(["Lower left is better. Dashed step: the Pareto front (no other point has both "
                                  "less VRAM and a lower value).", *notes]), ha="center", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def _place_labels(ax, points: list[tuple[float, float]], names: list[str], avoid: list) -> None:
    """Label each point on the first side where the text stays inside the axes and clear of the markers,
    `avoid` and the labels placed before it; quantized variants bunch up near the baseline's quality."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [artist.get_window_extent(renderer) for artist in avoid]
    for x, y in points:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - 4, py - 4, px + 4, py + 4))

    def label(xy, name, dx, dy):
        text = ax.annotate(name, xy, xytext=(dx, dy), textcoords="offset points", fontsize=8,
                           ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top")
        return text, text.get_window_extent(renderer)

    for xy, name in zip(points, names, strict=True):
        for dx, dy in _LABEL_OFFSETS:
            text, box = label(xy, name, dx, dy)
            if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) \
                    and not any(box.padded(3).overlaps(other) for other in taken):
                break
            text.remove()
        else:  # crowded on every side: the first choice is the least surprising
            text, box = label(xy, name, *_LABEL_OFFSETS[0])
        taken.append(box)


def _columns(rows: list[tuple[dict, bool]], ctx) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell) per table column; sizes share one unit per column, named in the header."""
    size_unit, size_div = _unit([v.get("size_bytes") for v, _ in rows])
    vram_unit, vram_div = _unit([(v.get("vram") or {}).get("total") for v, _ in rows])

    def scaled(value, divisor):
        return None if value is None else value / divisor

    def delta_ppl(v):
        cell = _num(v.get("delta_ppl_pct"), 2, sign=True)
        sigma = v.get("delta_ppl_pct_2sigma")
        return cell if sigma is None or cell == MISSING else f"{cell} ± {sigma:.2f}"

    def mc(v):
        m = v.get("mc")
        return MISSING if m is None else f"{_num(m.get('acc'), 3)} / {_num(m.get('acc_norm'), 3)}"

    return [
        ("Variant", lambda v: _text(v.get("name"))),
        ("Format/type", lambda v: f"{_text(v.get('format'))}/{_text(v.get('type'))}"),
        ("Backend", lambda v: _text(v.get("backend"))),
        (f"Size ({size_unit})", lambda v: _num(scaled(v.get("size_bytes"), size_div), 2)),
        ("bpw", lambda v: _num(v.get("bpw"), 2)),
        (f"VRAM @{_text(ctx)} ({vram_unit})", lambda v: _num(scaled((v.get("vram") or {}).get("total"), vram_div), 2)),
        ("VRAM saving %", lambda v: _num(v.get("vram_saving_pct"), 1)),
        ("PPL", lambda v: _num(v.get("ppl"), 3)),
        ("ΔPPL % (±2σ)", delta_ppl),
        ("KLD mean (nats)", lambda v: _num((v.get("kld") or {}).get("mean"), 5)),
        ("KLD p99 (nats)", lambda v: _num((v.get("kld") or {}).get("p99"), 5)),
        ("Top-1 %", lambda v: _num(v.get("top1_pct"), 2)),
        ("Δp mean (pp)", lambda v: _num(v.get("delta_p_mean"), 4, sign=True)),
        ("MC acc / acc_norm", mc),
    ]


def _unit(values, smallest: str = "KiB") -> tuple[str, int]:
    """The largest binary unit the biggest value reaches (at least `smallest`), so a column reads 1..1023."""
    top = max((v for v in values if v is not None), default=0)
    names = [name for name, _ in _UNITS]
    candidates = _UNITS[: names.index(smallest) + 1]
    return next((unit for unit in candidates if top >= unit[1]), candidates[-1])


def _num(value, digits: int, sign: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _text(value) -> str:
    return MISSING if value is None else str(value)


def _table_row(cells: list[str]) -> str:
    # A "|" inside a name would split the cell; Markdown's escape keeps it one.
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
