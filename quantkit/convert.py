"""`quantkit convert`: one source checkpoint -> one or more outputs, sharing one read of the source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from quantkit.calib.imatrix import Imatrix
from quantkit.errors import ConfigError
from quantkit.formats import gguf
from quantkit.formats.gguf_file import Value, string, u32
from quantkit.model import Model
from quantkit.output import check_writable
from quantkit.plan import ModelFacts, Plan, file_type, plan_types
from quantkit.progress import ProgressCallback
from quantkit.source.gguf_file import GGUFFile

FORMATS = ("gguf",)


@dataclass(frozen=True)
class Target:
    format: str
    type: str  # canonical llama.cpp file type name for gguf


@dataclass
class MixtureOptions:
    """llama-quantize's per-tensor options (see quantkit.plan.ggml_mixtures for their precedence)."""

    tensor_types: list[str] = field(default_factory=list)  # "REGEX=TYPE"
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False


def parse_target(spec: str) -> Target:
    fmt, sep, type_name = spec.partition(":")
    fmt = fmt.strip().lower()
    if not sep or fmt not in FORMATS:
        raise ConfigError(f"cannot read --to {spec!r}: expected FORMAT:TYPE with FORMAT one of "
                          f"{', '.join(FORMATS)}, e.g. gguf:Q4_K_M")
    return Target(fmt, file_type(type_name).name)


def output_paths(model_name: str, targets: list[Target], output: Path | None) -> list[Path]:
    """One --to: -o is the file. Several: -o is a folder (default: the current one) of <model>-<TYPE>.gguf."""
    if output is not None and len(targets) == 1 and output.suffix == ".gguf":
        return [output]
    folder = output if output is not None else Path.cwd()
    return [folder / f"{model_name}-{t.type}.{t.format}" for t in targets]


def model_facts(model: Model) -> ModelFacts:
    arch = model.arch
    hp = {k.split(".", 1)[1]: v.value for k, v in arch.gguf_hparams().items()}
    return ModelFacts(arch=arch.gguf_arch, n_layer=arch.num_layers, n_head=hp["attention.head_count"],
                      n_head_kv=hp.get("attention.head_count_kv", hp["attention.head_count"]),
                      n_expert=hp.get("expert_count", 0), has_output=not arch.tie_word_embeddings)


def gguf_facts(source: GGUFFile) -> ModelFacts:
    """ModelFacts from a GGUF file's metadata (what llama-quantize reads from its input)."""
    arch = source.metadata("general.architecture")

    def first(key, default=0):
        value = source.metadata(f"{arch}.{key}")
        return value[0] if isinstance(value, list) else (default if value is None else value)

    return ModelFacts(arch=arch, n_layer=first("block_count"), n_head=first("attention.head_count"),
                      n_head_kv=first("attention.head_count_kv", first("attention.head_count")),
                      n_expert=first("expert_count"), has_output="output.weight" in source.tensors)


def plan_gguf(shapes: dict[str, tuple[int, ...]], facts: ModelFacts, target: Target, options: MixtureOptions,
              imatrix: bool = False) -> Plan:
    return plan_types(shapes, facts, target.type, imatrix=imatrix,
                      tensor_types=options.tensor_types, output_tensor_type=options.output_tensor_type,
                      token_embedding_type=options.token_embedding_type, pure=options.pure)


def imatrix_metadata(path: Path, imatrix: Imatrix) -> dict[str, Value]:
    """The provenance keys llama-quantize writes when it uses an imatrix (tools/quantize/quantize.cpp)."""
    meta = {"quantize.imatrix.file": string(str(path)),
            "quantize.imatrix.entries_count": u32(len(imatrix.sums)),
            "quantize.imatrix.chunks_count": u32(imatrix.chunk_count)}
    if imatrix.datasets:
        meta["quantize.imatrix.dataset"] = string(imatrix.datasets[0])
    return meta


def convert(model_path: str | Path, targets: list[str], output: Path | None = None, *,
            options: MixtureOptions | None = None, imatrix: Path | None = None, device: str = "cpu",
            threads: int | None = None, force: bool = False, dry_run: bool = False, split_max_size: str | None = None,
            tokenizer_pre: str | None = None, name: str | None = None,
            progress: ProgressCallback | None = None) -> list[tuple[Path, Plan]]:
    """Plan (and unless dry_run, write) every target. Returns (path, plan) per target; with split output
    the path is the first shard's."""
    parsed = [parse_target(t) for t in targets]
    if not parsed:
        raise ConfigError("nothing to do: give at least one --to FORMAT:TYPE, e.g. --to gguf:Q4_K_M")
    if not dry_run:  # every output shares one folder; one we cannot write fails now, not after the work
        check_writable(output_paths("model", parsed, output)[0].parent)
    options = options or MixtureOptions()
    loaded = Imatrix.load(imatrix) if imatrix is not None else None
    importance = loaded.importances() if loaded is not None else None
    extra = imatrix_metadata(imatrix, loaded) if loaded is not None else {}
    split = gguf.parse_size(split_max_size) if split_max_size else None
    if str(model_path).endswith(".gguf"):  # requantize an F32/F16/BF16 GGUF, as llama-quantize does
        source = GGUFFile(model_path)
        shapes = {n: source.shape(n) for n in source.tensors}
        paths = output_paths(name or Path(model_path).stem, parsed, output)
        plans = [plan_gguf(shapes, gguf_facts(source), t, options, importance is not None) for t in parsed]
        if dry_run:
            return list(zip(paths, plans, strict=True))
        outputs = [gguf.GGUFOutput(path, plan.ftype, plan.types, extra)
                   for path, plan in zip(paths, plans, strict=True)]
        written = gguf.requantize(source, outputs, importance=importance, split_max_bytes=split, force=force,
                                  device=device, threads=threads, progress=progress)
        return [(files[0], plan) for files, plan in zip(written, plans, strict=True)]
    with Model(model_path, device=device) as model:
        model_name = name or model.source.path.name
        paths = output_paths(model_name, parsed, output)
        shapes = {t.name: t.shape for t in model.arch.gguf_tensors()}
        plans = [plan_gguf(shapes, model_facts(model), t, options, importance is not None) for t in parsed]
        if dry_run:
            return list(zip(paths, plans, strict=True))
        outputs = [gguf.GGUFOutput(path, plan.ftype, plan.types, extra)
                   for path, plan in zip(paths, plans, strict=True)]
        written = gguf.convert(model, outputs, importance=importance, name=model_name,
                               tokenizer_pre=tokenizer_pre, split_max_bytes=split, force=force, threads=threads,
                               progress=progress)
    return [(files[0], plan) for files, plan in zip(written, plans, strict=True)]
