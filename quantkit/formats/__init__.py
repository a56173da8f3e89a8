"""Output formats, registered by name. Each is one module exposing `FORMAT`, an `OutputFormat` that parses its
`--to FORMAT:SPEC` targets, plans every tensor (quantkit.plan.Plan), writes all of its outputs from one read of
the source (streamed, `.part` + rename) and verifies what it wrote. `quantkit convert` only dispatches here.

A new format is one module plus one line in FORMAT_MODULES; it sees the source through `Model` (names and
shapes from the architecture, float32 weights from any input decoder, the calibration engine) and nothing of
another format.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import ConfigError
from quantkit.plan import Plan, format_plan

FORMAT_MODULES = {"gguf": "quantkit.formats.gguf.format", "gptq": "quantkit.formats.gptq",
                  "awq": "quantkit.formats.awq", "ct": "quantkit.formats.compressed_tensors"}


@dataclass(frozen=True)
class Target:
    """One requested output: its format and the format's canonical spelling of the spec (Q4_K_M, w4g128, ...)."""

    format: str
    spec: str

    def __str__(self) -> str:
        return f"{self.format}:{self.spec}"


@dataclass
class ConvertOptions:
    """Everything `quantkit convert` passes to a format besides the source and targets. Formats read the
    fields that apply to them; `tensor_types` are REGEX=SCHEME overrides in command-line order."""

    tensor_types: list[str] = field(default_factory=list)
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    imatrix: Path | None = None
    device: str = "cpu"
    threads: int | None = None
    force: bool = False
    split_max_size: str | None = None
    tokenizer_pre: str | None = None
    name: str | None = None
    progress: Callable | None = None
    # calibration of GPTQ-style formats: text file (None: the bundled calibration set), samples x tokens, and
    # the Hessian damping (None: the format's default)
    calib: Path | None = None
    calib_samples: int = 128
    calib_ctx: int = 512
    damp: float | None = None
    # HF-folder mixes that break a runtime rule: promote to the nearest valid mix (True) or refuse (False)
    fix_mix: bool = False
    # keep the decoder layers before a MoE model's first MoE layer unquantized (DeepSeek's dense layers)
    keep_first_dense: bool = False
    # automatic mixes (`auto` specs): the budget (quantkit.plan.allocate.Budget), the sensitivity file to reuse or
    # write (None: the statistics cache), the calibration samples it is measured on, and its method ("output":
    # every candidate at the model output; "proxy": one per tensor there, the rest from their layer's output;
    # None: the format's own, proxy for gguf:auto, output for ct/gptq)
    budget: object | None = None
    sensitivity: Path | None = None
    sensitivity_samples: int = 8
    sensitivity_method: str | None = None  # one of SENSITIVITY_METHODS


SENSITIVITY_METHODS = ("output", "proxy")


@dataclass(frozen=True)
class Job:
    """One output to write: what was asked, the plan for it, and where it goes. `options`: the target's own
    (its overrides, budget: what its plan was made with) when the targets of one pass differ in those."""

    target: Target
    plan: Plan
    path: Path
    options: ConvertOptions | None = None


class OutputFormat:
    name: str = ""
    example: str = ""  # a valid spec, for messages
    # Formats with the same pass name are written together: the first one's write() gets every job of them all.
    shared_pass: str | None = None

    def parse_spec(self, spec: str) -> Target:
        raise NotImplementedError

    def file_name(self, model_name: str, target: Target) -> str:
        """The output's name inside an output folder."""
        raise NotImplementedError

    def describe(self, plan: Plan) -> str:
        """The --dry-run table of a plan of this format."""
        return format_plan(plan)

    def prepare(self, source, options: ConvertOptions) -> None:
        """Load what every plan and write of this run shares (e.g. an importance matrix); once per run."""

    def reads_scheme(self, scheme: str) -> bool:
        """Whether a `--tensor-type REGEX=SCHEME` override's scheme is one of this format's (then it applies)."""
        return False

    def plan(self, source, target: Target, options: ConvertOptions) -> Plan:
        raise NotImplementedError

    def write(self, source, jobs: list[Job], options: ConvertOptions) -> list[list[Path]]:
        """Write every job (of this format, or of every format of its shared pass) from one pass over the source;
        returns each job's files (several when sharded),
        each re-read and checked against its plan before returning."""
        raise NotImplementedError


def get_format(name: str) -> OutputFormat:
    module = FORMAT_MODULES.get(name.strip().lower())
    if module is None:
        raise ConfigError(f"unknown output format {name!r}; quantkit writes {', '.join(FORMAT_MODULES)}")
    return importlib.import_module(module).FORMAT


def parse_target(spec: str) -> Target:
    """`FORMAT:SPEC`, e.g. gguf:Q4_K_M; the format validates and canonicalises SPEC."""
    fmt, sep, rest = spec.partition(":")
    if not sep or fmt.strip().lower() not in FORMAT_MODULES:
        examples = ", ".join(f"{n}:{get_format(n).example}" for n in FORMAT_MODULES)
        raise ConfigError(f"cannot read --to {spec!r}: expected FORMAT:SPEC with FORMAT one of "
                          f"{', '.join(FORMAT_MODULES)}, e.g. {examples}")
    return get_format(fmt).parse_spec(rest)


__all__ = ["FORMAT_MODULES", "ConvertOptions", "Job", "OutputFormat", "Target", "get_format", "parse_target"]
