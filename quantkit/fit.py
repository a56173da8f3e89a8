"""`quantkit plan`: which variant of a model fits a GPU budget at a context length.

For each variant of the chosen format (GGUF: llama.cpp's file types with an importance matrix; ct/gptq/awq: their
weight schemes; plus the model as shipped) the plan is the one `quantkit convert --dry-run` makes, and its memory
is quantkit.plan.vram's: llama.cpp's accounting for GGUF (n_ctx padded to 256, MLA caching only the latent and
rope key), a GPU runtime's (vLLM: KV at exactly ctx) for the others. With several GPUs the weights and the KV
cache are split, and every GPU holds its own compute buffers: a variant fits when
weights + kv + gpus x compute <= gpus x vram. The best variant is the one with the most bits per weight that fits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from quantkit.errors import ConfigError
from quantkit.plan.plan import Plan, PlanEntry
from quantkit.plan.vram import vram_gguf, vram_plan

GGUF_LADDER = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")
FOLDER_LADDER = {"ct": ("w8", "w4g128"), "gptq": ("w8", "w4g128"), "awq": ("w4g128",)}
FORMATS = ("gguf", *FOLDER_LADDER)
LLAMA_CPP_KV = ("f16", "bf16", "q8_0", "q4_0", "f32")
GPU_RUNTIME_KV = {"f16": "f16", "bf16": "bf16", "fp8": "fp8"}
@dataclass
class Variant:
    name: str
    format: str
    spec: str
    bpw: float
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    total_bytes: int
    fits: bool
    best: bool = False
    # measured quality from an eval report (quantkit eval) of this very variant; None when not measured
    kld_mean: float | None = None
    kld_p99: float | None = None
    ppl: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def shipped_plan(arch) -> Plan:
    """The model as its repo ships it, from the architecture alone: linears of a block-FP8 config one byte per
    weight plus a float32 scale per block, everything else BF16 (MTP layers left out)."""
    qc = arch.config.get("quantization_config") or {}
    block = qc.get("weight_block_size") if qc.get("quant_method") == "fp8" else None
    linears = {lin.name for spec in arch.layers() for lin in spec.linears}
    entries = []
    for name, shape in arch.tensor_shapes().items():
        if arch.is_skipped(name):
            continue
        if block and name in linears and len(shape) == 2:
            scales = math.ceil(shape[0] / block[0]) * math.ceil(shape[1] / block[1])
            entries.append(PlanEntry(name, tuple(shape), "fp8", math.prod(shape) + 4 * scales, False))
        else:
            entries.append(PlanEntry(name, tuple(shape), "bf16", 2 * math.prod(shape), False))
    return Plan("hf", "fp8" if block else "bf16", tuple(entries))


def _kv_type(fmt: str, kv_type: str) -> str:
    kv = kv_type.lower()
    if fmt == "gguf" and kv not in LLAMA_CPP_KV:
        raise ConfigError(f"llama.cpp's KV cache types are {', '.join(LLAMA_CPP_KV)}; got {kv_type!r}")
    if fmt != "gguf" and kv not in GPU_RUNTIME_KV:
        raise ConfigError(f"vLLM's KV cache is {', '.join(GPU_RUNTIME_KV)} (--kv-type); got {kv_type!r}")
    return kv


def variants(source, fmt: str, ctx: int, kv_type: str, vram: int, gpus: int = 1) -> list[Variant]:
    """Every variant of `source` (a quantkit Model, a catalog model, or a GGUF file) in format `fmt`, with its
    memory at `ctx` and whether it fits `gpus` GPUs of `vram` bytes each; the best one marked."""
    from quantkit.source.gguf_file import GGUFFile

    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; plan knows {', '.join(FORMATS)}")
    if gpus < 1 or vram <= 0 or ctx <= 0:
        raise ConfigError("--vram, --gpus and --ctx must be positive")
    kv = _kv_type("gguf" if isinstance(source, GGUFFile) else fmt, kv_type)
    rows: list[tuple[str, str, str, Plan | None, object]] = []
    if isinstance(source, GGUFFile):
        estimate = vram_gguf(source, ctx, kv)
        rows.append((Path(source.path).name, "gguf", "as is", None, estimate))
    else:
        shipped = shipped_plan(source.arch)  # served as is by a GPU runtime
        rows.append((f"as shipped ({shipped.target})", "hf", shipped.target, shipped,
                     vram_plan(source.arch, shipped, ctx, "fp8" if kv == "fp8" else "bf16")))
        for plan in _plans(source, fmt):
            rows.append((f"{fmt}:{plan.target}", fmt, plan.target, plan, vram_plan(source.arch, plan, ctx, kv)))
    out = []
    for name, row_fmt, spec, plan, estimate in rows:
        bpw = plan.bpw if plan is not None else 8 * estimate.weights / max(1, _gguf_elements(source))
        need = estimate.weights + estimate.kv_cache + gpus * estimate.compute
        out.append(Variant(name, row_fmt, spec, round(bpw, 3), estimate.weights, estimate.kv_cache, estimate.compute,
                           need, need <= gpus * vram))
    fitting = [v for v in out if v.fits]
    if fitting:
        max(fitting, key=lambda v: v.bpw).best = True
    if fmt == "gguf" and not isinstance(source, GGUFFile):
        out.append(_auto_fit(source, ctx, kv, vram, gpus))
    elif fmt in ("ct", "gptq"):
        out.append(_folder_auto_fit(source, fmt, ctx, kv, vram, gpus))
    return out


def _auto_fit(source, ctx: int, kv: str, vram: int, gpus: int) -> Variant:
    """What `convert --to gguf:auto --fit-vram` would make: the largest automatic mix that fits (its size; its
    quality needs the sensitivity measurement, so it is never marked best). Between every quantizable tensor at
    its smallest candidate and at its largest."""
    from quantkit.formats.gguf.auto import CANDIDATES
    from quantkit.formats.gguf.format import model_facts
    from quantkit.formats.gguf.mixtures import plan_types, row_fallback, tensor_nbytes
    from quantkit.formats.gguf.tensors import mapping_for

    base = plan_types({t.name: t.shape for t in mapping_for(source.arch).tensors()}, model_facts(source), "Q8_0",
                      imatrix=True, pure=True)
    fixed = least = most = 0
    for e in base.entries:
        if not e.quantized:
            fixed += e.nbytes
            continue
        sizes = [tensor_nbytes(row_fallback(e.name, e.shape[-1], c), e.shape) for c in CANDIDATES]
        least, most = least + min(sizes), most + max(sizes)
    estimate = vram_plan(source.arch, base, ctx, kv)
    room = gpus * vram - estimate.kv_cache - gpus * estimate.compute - fixed
    weights = fixed + max(least, min(most, room))
    need = weights + estimate.kv_cache + gpus * estimate.compute
    return Variant("gguf:auto --fit-vram", "gguf", "auto", round(8 * weights / base.n_elements, 3), weights,
                   estimate.kv_cache, estimate.compute, need, room >= least)


def _folder_auto_fit(source, fmt: str, ctx: int, kv: str, vram: int, gpus: int) -> Variant:
    """What `convert --to ct:auto (gptq:auto) --fit-vram` would make: the largest automatic mix within the budget
    convert gives it (never marked best, as for gguf:auto). Between every linear at its smallest candidate and at
    its largest (BF16 where it may be kept)."""
    from quantkit.formats import ConvertOptions, get_format, parse_target
    from quantkit.formats.folder_auto import auto_groups, tensor_budget
    from quantkit.plan.allocate import Budget

    folder = get_format(fmt)
    mix = auto_groups(folder, source, folder.config(parse_target(f"{fmt}:auto"), ConvertOptions()), {}, {})
    least, most = mix.bounds()
    limit = tensor_budget(folder, source, Budget(vram=vram, ctx=ctx, gpus=gpus, kv_type=kv), mix.n_elements)
    weights = max(least, min(most, limit))
    estimate = vram_plan(source.arch, shipped_plan(source.arch), ctx, kv)
    need = weights + estimate.kv_cache + gpus * estimate.compute
    return Variant(f"{fmt}:auto --fit-vram", fmt, "auto", round(8 * weights / mix.n_elements, 3), weights,
                   estimate.kv_cache, estimate.compute, need, limit >= least)


# how `quantkit eval` names a folder's storage (its input decoder's label) per output format
_EVAL_LABELS = {"ct": "compressed-tensors ", "gptq": "GPTQ ", "awq": "AWQ "}


def add_measured(rows: list[Variant], reports: list[dict]) -> None:
    """Fill each variant's measured quality from eval reports (report.json of `quantkit eval`): a GGUF row by its
    file type, a folder row by its scheme, the last report naming it winning."""
    for report in reports:
        for measured in report.get("variants", []):
            for row in rows:
                if _same_variant(row, measured):
                    kld = measured.get("kld") or {}
                    row.kld_mean, row.kld_p99, row.ppl = kld.get("mean"), kld.get("p99"), measured.get("ppl")


def _same_variant(row: Variant, measured: dict) -> bool:
    if row.format == "gguf":
        return measured.get("format") == "gguf" and measured.get("type") == row.spec
    label = _EVAL_LABELS.get(row.format)
    return label is not None and measured.get("format") == "hf" and measured.get("type") == label + row.spec


def _gguf_elements(gguf) -> int:
    return sum(math.prod(gguf.shape(n)) for n in gguf.tensors)


def _plans(source, fmt: str) -> list[Plan]:
    from quantkit.formats import ConvertOptions, get_format, parse_target

    if fmt == "gguf":
        from quantkit.formats.gguf.format import model_facts
        from quantkit.formats.gguf.mixtures import plan_types
        from quantkit.formats.gguf.tensors import mapping_for

        shapes = {t.name: t.shape for t in mapping_for(source.arch).tensors()}
        facts = model_facts(source)
        return [plan_types(shapes, facts, ft, imatrix=True) for ft in GGUF_LADDER]
    options, out = ConvertOptions(), []
    for spec in FOLDER_LADDER[fmt]:
        target = parse_target(f"{fmt}:{spec}")
        out.append(get_format(fmt).plan(source, target, options))
    return out


__all__ = ["FORMATS", "Variant", "add_measured", "shipped_plan", "variants"]
