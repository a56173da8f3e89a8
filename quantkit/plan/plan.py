"""A plan: which scheme every tensor of an output gets, decided before anything is quantized.

Format-neutral data: tensor name (in the output's naming) -> scheme, with its shape and stored bytes. A GGUF
scheme is a ggml type name (Q4_K, F32, ...); a GPTQ/AWQ/compressed-tensors scheme is a weight scheme (w4g128,
bf16 = kept, ...). llama.cpp's mixture rules, hand overrides and automatic allocation all produce plans; a
plan prints (`format_plan`), saves as JSON and loads back, so a chosen mix can be reviewed and reused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit.errors import ConfigError

PLAN_VERSION = 1


@dataclass(frozen=True)
class PlanEntry:
    name: str
    shape: tuple[int, ...]  # torch order
    scheme: str
    nbytes: int
    quantized: bool  # whether the format quantizes this tensor at all (norms, biases, routers stay float)
    note: str = ""  # why the scheme differs from the target's plain choice: "override", "fallback from Q4_K", ...

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Plan:
    format: str  # "gguf", ...
    target: str  # the format's name for the whole mix: a llama.cpp file type (Q4_K_M), a weight scheme, ...
    entries: tuple[PlanEntry, ...]  # in the order the format writes them
    schemes: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "schemes", {e.name: e.scheme for e in self.entries})

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def n_elements(self) -> int:
        return sum(e.n_elements for e in self.entries)

    @property
    def bpw(self) -> float:
        return bits_per_weight(self.total_bytes, self.n_elements)

    # ---- JSON ---------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, "format": self.format, "target": self.target,
                "total_bytes": self.total_bytes, "n_elements": self.n_elements, "bpw": self.bpw,
                "entries": [{**asdict(e), "shape": list(e.shape)} for e in self.entries]}

    @classmethod
    def from_json(cls, data: dict, origin: str = "plan") -> Plan:
        if data.get("version") != PLAN_VERSION:
            raise ConfigError(f"{origin}: plan version {data.get('version')!r} is not {PLAN_VERSION}; "
                              "write the plan again with this quantkit")
        try:
            entries = tuple(PlanEntry(e["name"], tuple(int(d) for d in e["shape"]), e["scheme"], int(e["nbytes"]),
                                      bool(e["quantized"]), e.get("note", "")) for e in data["entries"])
            return cls(data["format"], data["target"], entries)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: not a quantkit plan ({exc!r} is missing or malformed)") from None

    def save(self, path: Path) -> Path:
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(part, path)
        return path

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such plan file") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not JSON ({exc})") from None
        return cls.from_json(data, str(path))


def bits_per_weight(total_bytes: int, n_elements: int) -> float:
    """Stored bits per weight over every tensor: tensor data only, no file header, as llama.cpp's loader
    prints BPW (llama_model_loader: n_bytes * 8 / n_elements)."""
    return 8 * total_bytes / n_elements if n_elements else 0.0


def format_size(n: int) -> str:
    """Bytes for people: 1.25 GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_plan(plan: Plan, heading: str = "") -> str:
    """A text table (tensor, shape, scheme, bytes, note) with totals, for --dry-run."""
    rows = [(e.name, "[" + ", ".join(map(str, e.shape)) + "]", e.scheme, f"{e.nbytes:,}", e.note)
            for e in plan.entries]
    head = ("tensor", "shape", "type" if plan.format == "gguf" else "scheme", "bytes", "note")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]

    def line(r):
        return "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2]),
                          r[3].rjust(widths[3]), r[4]]).rstrip()

    out = [line(head), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows]
    counts: dict[str, int] = {}
    for e in plan.entries:
        counts[e.scheme] = counts.get(e.scheme, 0) + 1
    out.append("")
    out.append(f"{heading or plan.format + ' ' + plan.target}; tensors by {head[2]}: "
               + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())))
    out.append(f"total: {len(plan.entries)} tensors, {plan.n_elements:,} weights, {plan.total_bytes:,} bytes "
               f"({format_size(plan.total_bytes)}), {plan.bpw:.4f} bpw")
    return "\n".join(out) + "\n"
