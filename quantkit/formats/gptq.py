"""The GPTQ output format (AutoGPTQ / GPTQModel checkpoints, FORMATS.md §5): `--to gptq:w4g128[-act][-asym]...`.

The output is an HF folder (quantkit.formats.safetensors_folder): every decoder-layer linear as
`<module>.qweight` int32 [in*bits/32, out], `.qzeros` int32 [G, out*bits/32] (v1: stored zero = true zero - 1,
`checkpoint_format: gptq`), `.scales` float16 [G, out] and `.g_idx` int32 [in]; embeddings, lm_head, norms,
routers and biases in BF16; `quantkit_report.json` says how it was made and lists each layer's calibration facts
(routed tokens per expert, fallbacks). Quantization itself is the calibration side's (quantkit.calib.gptq, run by
quantkit.calib.layerwise): this module packs each result as it comes, writes a shard per layer, and reads finished
layers back for a resumed run. Every gptq target of one command is a stream of one pass over the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path

import torch

from quantkit import __version__
from quantkit.calib.gptq import DEFAULT_MIN_EXPERT_TOKENS, GPTQ
from quantkit.calib.layerwise import LayerStats, Stream
from quantkit.errors import ConfigError
from quantkit.formats import ConvertOptions, Job, OutputFormat, Target
from quantkit.formats.safetensors_folder import OTHER, FolderWriter
from quantkit.model import Model
from quantkit.plan import Plan, PlanEntry
from quantkit.progress import Progress
from quantkit.quant.gptq import BITS, MSE_NORM, GPTQConfig, GPTQResult, dequantize

log = logging.getLogger(__name__)

SPEC_RE = re.compile(r"w(\d+)(?:g(\d+))?((?:-[a-z]+)*)")
FLAGS = ("act", "asym", "static", "mse", "rtn")  # canonical order
GRAMMAR = ("w{bits}[g{group}][-act][-asym][-static][-mse][-rtn] with bits 2, 3, 4 or 8 and no g for one group "
           "per output row, e.g. w4g128, w4g128-act, w8, w4g32-asym; -rtn rounds to nearest without calibration "
           "(not with -act or -static)")
REPORT_NAME = "quantkit_report.json"
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
KEPT = "bf16"


# ---- packing (FORMATS.md §5.2-5.3): pure functions on int tensors ---------------------------------------------
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack codes 0..2^bits-1 along `dim` into int32 words: value i of the dim at bit i*bits of the little-endian
    bit stream of the words (the smallest index in the least significant bits; 3-bit values straddle words as
    AutoGPTQ's 3-word scheme does). The dim's length times `bits` must be a multiple of 32."""
    v = values.movedim(dim, -1).to(torch.int64)
    length = v.shape[-1]
    if length * bits % 32:
        raise ValueError(f"{length} {bits}-bit values do not fill whole 32-bit words")
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64, device=v.device) * bits
        words = (v.reshape(*v.shape[:-1], length // per, per) << shifts).sum(-1)
    else:
        weights = 1 << torch.arange(bits, dtype=torch.int64, device=v.device)
        stream = (v.unsqueeze(-1) // weights) % 2  # [..., length, bits], LSB first
        stream = stream.reshape(*v.shape[:-1], length * bits // 32, 32)
        words = (stream << torch.arange(32, dtype=torch.int64, device=v.device)).sum(-1)
    return _to_int32(words).movedim(-1, dim)


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of pack: int32 codes along `dim`."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:
        shifts = torch.arange(32 // bits, dtype=torch.int64, device=w.device) * bits
        values = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)
    else:
        stream = (w.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64, device=w.device)) & 1
        stream = stream.flatten(-2).reshape(*w.shape[:-1], -1, bits)
        values = (stream << torch.arange(bits, dtype=torch.int64, device=w.device)).sum(-1)
    return values.to(torch.int32).movedim(-1, dim)


def _ones_words(length: int, bits: int, device) -> torch.Tensor:
    return pack(torch.ones(length, dtype=torch.int32, device=device), bits, 0).to(torch.int64)


def pack_zeros_v1(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros [G, N*bits/32] from true zero points [N, G], v1: every field minus 1, done per word as GPTQModel's
    v2 -> v1 conversion does (subtract 0x11111111 for 4-bit, ...). For zeros >= 1 that is exactly "stored = zero - 1"
    field by field; an asymmetric true zero of 0 borrows from the next field, which GPTQModel's v1 -> v2 word
    addition undoes exactly, while a field-by-field reader sees a wrong zero (FORMATS.md §5.3: v1 is only safe for
    sym=True)."""
    words = pack(zeros.T, bits, 1).to(torch.int64)
    return _to_int32(words - _ones_words(zeros.shape[0], bits, zeros.device))


def unpack_zeros_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """True zero points [N, G] from v1 qzeros [G, N*bits/32] (the inverse of pack_zeros_v1)."""
    n = qzeros.shape[1] * 32 // bits
    return unpack(_to_int32(qzeros.to(torch.int64) + _ones_words(n, bits, qzeros.device)), bits, 1).T


def pack_result(result: GPTQResult, bits: int) -> dict[str, torch.Tensor]:
    """One linear's stored tensors by suffix: qweight, qzeros, scales (float16), g_idx."""
    return {"qweight": pack(result.q.T, bits, 0), "qzeros": pack_zeros_v1(result.zeros, bits),
            "scales": result.scales.T.to(torch.float16).contiguous(), "g_idx": result.g_idx.to(torch.int32)}


def dequantize_stored(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int) -> torch.Tensor:
    """The float32 [out, in] weight a stored linear means: quantkit.quant.gptq.dequantize on the unpacked codes and
    zeros with the stored (fp16) scales, the weight every GPTQ runtime multiplies with."""
    q = unpack(qweight, bits, 0).T
    return dequantize(q, scales.float().T, unpack_zeros_v1(qzeros, bits), g_idx)


def packed_bytes(shape: tuple[int, int], bits: int, group_size: int) -> int:
    out, columns = shape
    groups = 1 if group_size == -1 else -(-columns // group_size)
    return 4 * columns * bits // 32 * out + 4 * groups * out * bits // 32 + 2 * groups * out + 4 * columns


# ---- the format -------------------------------------------------------------------------------------------------
def gptq_config(target: Target, damp: float | None = None) -> GPTQConfig:
    bits, group, flags = _parse(target.spec)
    return GPTQConfig(bits=bits, group_size=group, sym="asym" not in flags, desc_act="act" in flags,
                      static_groups="static" in flags, mse="mse" in flags,
                      **({} if damp is None else {"damp_percent": damp}))


def _parse(spec: str) -> tuple[int, int, tuple[str, ...]]:
    match = SPEC_RE.fullmatch(spec.strip().lower())
    flags = tuple(match.group(3).split("-")[1:]) if match else ()
    if (match is None or int(match.group(1)) not in BITS or (match.group(2) is not None and int(match.group(2)) <= 0)
            or any(f not in FLAGS for f in flags) or len(set(flags)) != len(flags)
            or ("rtn" in flags and ("act" in flags or "static" in flags))):
        raise ConfigError(f"cannot read GPTQ spec {spec!r}: expected {GRAMMAR}")
    group = -1 if match.group(2) is None else int(match.group(2))
    return int(match.group(1)), group, tuple(f for f in FLAGS if f in flags)


def _quantized_linears(model: Model) -> list[tuple[int, list[str], dict[str, tuple[int, ...]]]]:
    """(layer, quantized linear names, every other tensor of the layer with its shape), layer by layer."""
    layers = []
    for spec in model.arch.layers():
        linears = [lin.name for lin in spec.linears]
        fused = [lin.name for lin in spec.linears if len(lin.shape) != 2]
        if fused:
            raise ConfigError(f"{model.source.path}: {fused[0]!r} holds every routed expert in one 3-D tensor "
                              "(transformers >= 5 layout); GPTQ checkpoints store each expert's linears under its "
                              "own name. Convert from the per-expert checkpoint (DeepSeek's original layout)")
        others = {n: s for n, s in spec.tensor_shapes().items() if n not in set(linears)}
        layers.append((spec.index, linears, others))
    return layers


def _module(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


class GPTQFormat(OutputFormat):
    name = "gptq"
    example = "w4g128"

    def parse_spec(self, spec: str) -> Target:
        bits, group, flags = _parse(spec)
        return Target(self.name, f"w{bits}" + (f"g{group}" if group != -1 else "") + "".join(f"-{f}" for f in flags))

    def file_name(self, model_name: str, target: Target) -> str:
        return f"{model_name}-GPTQ-{target.spec}"

    def _require_model(self, source) -> Model:
        if not isinstance(source, Model):
            raise ConfigError("GPTQ output needs an HF checkpoint as the source (a folder with config.json), not "
                              "a GGUF file")
        return source

    def plan(self, source, target: Target, options: ConvertOptions) -> Plan:
        model = self._require_model(source)
        config = gptq_config(target, options.damp)
        entries = [PlanEntry(n, s, KEPT, 2 * math.prod(s), False) for n, s in model.arch.global_shapes().items()]
        shapes = model.arch.tensor_shapes()
        for _, linears, others in _quantized_linears(model):
            for name in linears:
                out, columns = shapes[name]
                pf = 32 // config.bits if 32 % config.bits == 0 else 32
                if columns % pf or out % pf:
                    raise ConfigError(f"{model.source.path}: {name!r} has shape {[out, columns]}; {config.bits}-bit "
                                      f"GPTQ packing needs both sides divisible by {pf}")
                entries.append(PlanEntry(name, (out, columns), target.spec,
                                         packed_bytes((out, columns), config.bits, config.group_size), True))
            entries += [PlanEntry(n, s, KEPT, 2 * math.prod(s), False) for n, s in others.items()]
        return Plan(self.name, target.spec, tuple(entries))

    def write(self, source, jobs: list[Job], options: ConvertOptions) -> list[list[Path]]:
        """Every GPTQ target of the command in one pass over the model: each layer read once for all of them."""
        from quantkit.calib.data import calibration_samples
        from quantkit.calib.layerwise import run_layers  # looked up per call: tests interpose on it

        model = self._require_model(source)
        layers = _quantized_linears(model)
        kept = torch.bfloat16
        # Every output folder is opened (existing outputs and foreign OUT.part refused) before calibrating.
        outputs = [_Output(job, FolderWriter(job.path, model.folder, self._fingerprint(model, job, options),
                                             len(layers), force=options.force), gptq_config(job.target, options.damp))
                   for job in jobs]
        for out in outputs:
            if not out.writer.has(OTHER):
                out.writer.write(OTHER, {n: model.source.read(n).to(kept) for n in model.arch.global_shapes()})
        todo = [out for out in outputs if out.writer.start_layer < len(layers)]
        streams = [Stream(GPTQ(out.config, rtn=out.rtn), out.take, start_layer=out.writer.start_layer,
                          restore=out.restore(layers)) for out in todo]
        calibrated = any(s.method.calibrated for s in streams)
        samples = calibration_samples(model, options.calib, options.calib_samples, options.calib_ctx) \
            if calibrated else []
        progress = None if options.progress is None else (lambda done, total: options.progress(
            Progress("gptq " + ", ".join(out.job.target.spec for out in todo), done, total, "layers")))
        for index in run_layers(model, streams, samples, progress=progress):
            _, linears, others = layers[index]
            writing = [(out, s) for out, s in zip(todo, streams, strict=True) if index >= s.start_layer]
            kept_tensors = {n: model.source.read(n).to(kept) for n in others} if writing else {}
            for out, stream in writing:
                packed = out.pending
                missing = {f"{_module(n)}.qweight" for n in linears} - set(packed)
                if missing:
                    raise RuntimeError(f"layer {index}: GPTQ gave no result for {sorted(missing)}")
                out.writer.write(index, {**kept_tensors, **packed}, info=stream.stats.layer_record(index))
                out.pending = {}
        for out, stream in zip(todo, streams, strict=True):
            _log_summary(out.job, stream.stats)
        return [out.writer.finish({"quantization_config": self.quantization_config(out.config)},
                                  {"quantize_config.json": self.quantize_config(out.config),
                                   REPORT_NAME: self.report(out, options)})
                for out in outputs]

    def _fingerprint(self, model: Model, job: Job, options: ConvertOptions) -> str:
        settings = {"format": self.name, "spec": job.target.spec, "quantkit": __version__,
                    "files": model.source.file_identity(), "damp": options.damp}
        if "rtn" not in _parse(job.target.spec)[2]:
            calib = options.calib
            settings |= {"calib": [str(calib), calib.stat().st_size, calib.stat().st_mtime_ns] if calib else None,
                         "calib_samples": options.calib_samples, "calib_ctx": options.calib_ctx}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def report(out: _Output, options: ConvertOptions) -> dict:
        """quantkit_report.json: how the folder was made, and each layer's calibration facts (routed tokens per
        expert, experts that got the fallback, raised damping, weights left to round-to-nearest)."""
        calibration = None if out.rtn else {
            "text": options.calib.name if options.calib else "bundled calibration split",
            "samples": options.calib_samples, "ctx": options.calib_ctx,
            "expert_fallback": f"experts routed fewer than {DEFAULT_MIN_EXPERT_TOKENS} tokens are calibrated on "
                               "all of the layer's tokens"}
        return {"quantizer": f"quantkit {__version__}", "method": "round-to-nearest" if out.rtn else "gptq",
                "spec": out.job.target.spec, "calibration": calibration,
                "layers": {str(k): v for k, v in sorted(out.writer.infos().items())}}

    @staticmethod
    def quantization_config(config: GPTQConfig) -> dict:
        """config.json's quantization_config (FORMATS.md §5.4: what transformers, GPTQModel and vLLM read)."""
        return {"quant_method": "gptq", "bits": config.bits, "group_size": config.group_size,
                "desc_act": config.desc_act, "sym": config.sym, "static_groups": config.static_groups,
                "damp_percent": config.damp_percent, "true_sequential": False, "lm_head": False,
                "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32",
                "meta": {"quantizer": [f"quantkit:{__version__}"], "damp_percent": config.damp_percent,
                         "static_groups": config.static_groups, "true_sequential": False,
                         "mse": MSE_NORM if config.mse else 0.0}}

    @staticmethod
    def quantize_config(config: GPTQConfig) -> dict:
        """AutoGPTQ's quantize_config.json (FORMATS.md §5.4, BaseQuantizeConfig.to_dict)."""
        return {"bits": config.bits, "group_size": config.group_size, "damp_percent": config.damp_percent,
                "desc_act": config.desc_act, "static_groups": config.static_groups, "sym": config.sym,
                "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
                "quant_method": "gptq", "checkpoint_format": "gptq"}


FORMAT = GPTQFormat()


class _Output:
    """One GPTQ target being written: its folder, settings, and the current layer's packed tensors."""

    def __init__(self, job: Job, writer: FolderWriter, config: GPTQConfig):
        self.job, self.writer, self.config = job, writer, config
        self.rtn = "rtn" in _parse(job.target.spec)[2]
        self.pending: dict[str, torch.Tensor] = {}

    def take(self, layer: int, name: str, result: GPTQResult) -> None:
        """The stream's sink: pack each result as it comes, so the layer is held packed, not as int32 codes."""
        self.pending.update({f"{_module(name)}.{s}": t for s, t in pack_result(result, self.config.bits).items()})

    def restore(self, layers):
        def runtime_weights(layer: int) -> dict[str, torch.Tensor]:
            stored = self.writer.read(layer)
            return {name: dequantize_stored(*(stored[f"{_module(name)}.{s}"] for s in SUFFIXES), self.config.bits)
                    for name in layers[layer][1]}
        return runtime_weights


def _log_summary(job: Job, stats: LayerStats) -> None:
    """The end-of-run summary: time per layer, fallbacks and damping retries, expert token coverage."""
    seconds = list(stats.seconds_per_layer.values())
    if seconds:
        log.info("%s: %d layers, %.1f s per layer (max %.1f s)", job.target, len(seconds), sum(seconds) / len(seconds),
                 max(seconds))
    counts = sorted(c for per_layer in stats.expert_tokens.values() for c in per_layer)
    if counts:
        log.info("%s: routed tokens per expert: min %d, median %d, max %d", job.target, counts[0],
                 counts[len(counts) // 2], counts[-1])
    fallbacks = [name for names in stats.fallbacks.values() for name in names]
    if fallbacks:
        log.warning("%s: %d expert(s) got too few calibration tokens and were calibrated with the fallback (listed "
                    "in %s): %s", job.target, len(fallbacks), REPORT_NAME, ", ".join(fallbacks))
    for name, damp in stats.noted("damping_raised").items():
        log.warning("%s: %s needed damping %g", job.target, name, damp)
    rtn = list(stats.noted("round_to_nearest"))
    if rtn:
        log.warning("%s: round-to-nearest for %d weight(s) without a usable Hessian: %s", job.target, len(rtn),
                    ", ".join(rtn))
