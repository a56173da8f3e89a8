"""What the calibrated HF-folder outputs (GPTQ, AWQ) share: a plan of packed linears and BF16 rest, one
quantkit.calib.layerwise pass for every GPTQ and AWQ target in the command (each layer read once for all), a
FolderWriter per target (resume, refusal, atomic completion), each result packed as the method emits it, and
`quantkit_report.json`.

A format subclass says how its spec reads, which method quantizes, how a result packs and unpacks, and what
config files describe the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from quantkit import __version__
from quantkit.calib.gptq import DEFAULT_MIN_EXPERT_TOKENS
from quantkit.calib.layerwise import LayerStats, Method, Stream
from quantkit.errors import ConfigError
from quantkit.formats import ConvertOptions, Job, OutputFormat, Target, get_format
from quantkit.formats.overrides import parse_overrides, resolve
from quantkit.formats.safetensors_folder import OTHER, FolderWriter
from quantkit.model import Model
from quantkit.plan import Plan, PlanEntry
from quantkit.progress import Progress

log = logging.getLogger(__name__)

REPORT_NAME = "quantkit_report.json"
KEPT = "bf16"
# a --tensor-type scheme of the HF-folder formats: w{bits}[g{group}][-asym]
WEIGHT_SCHEME = re.compile(r"w(\d+)(?:g(\d+))?(-asym)?")
KEPT_DTYPE = torch.bfloat16
EMBEDDING, TIED_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def module_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def kept_globals(model: Model) -> dict[str, tuple[int, ...]]:
    """The tensors outside the decoder layers, stored BF16. A tied lm_head is written too, as a copy of the
    embedding: AutoGPTQ's and AutoAWQ's loaders (accelerate) re-tie the pair to whichever tensor the file holds
    and leave both uninitialised without it, as their own checkpoints always carry it."""
    shapes = dict(model.arch.global_shapes())
    if model.arch.tie_word_embeddings:
        shapes[TIED_HEAD] = shapes[EMBEDDING]
    return shapes


def _read_global(model: Model, name: str) -> torch.Tensor:
    return model.source.read(EMBEDDING if name == TIED_HEAD and model.arch.tie_word_embeddings else name)


def quantized_linears(model: Model) -> list[tuple[int, list[str], dict[str, tuple[int, ...]]]]:
    """(layer, quantized linear names, every other tensor of the layer with its shape), layer by layer."""
    layers = []
    for spec in model.arch.layers():
        linears = [lin.name for lin in spec.linears]
        fused = [lin.name for lin in spec.linears if len(lin.shape) != 2]
        if fused:
            raise ConfigError(f"{model.source.path}: {fused[0]!r} holds every routed expert in one 3-D tensor "
                              "(transformers >= 5 layout); GPTQ and AWQ checkpoints store each expert's linears "
                              "under its own name. Convert from the per-expert checkpoint (DeepSeek's original "
                              "layout)")
        quantized = set(linears)
        others = {n: s for n, s in spec.tensor_shapes().items() if n not in quantized}
        layers.append((spec.index, linears, others))
    return layers


class LayerwiseFolderFormat(OutputFormat):
    """Base of the formats written by a layerwise calibration pass into an HF folder."""

    label = ""  # GPTQ, AWQ: file names and messages
    shared_pass = "layerwise"
    suffixes: tuple[str, ...] = ()  # the tensors stored per quantized linear

    # ---- what a subclass provides ------------------------------------------------------------------------
    def config(self, target: Target, options: ConvertOptions) -> Any:
        raise NotImplementedError

    def is_rtn(self, target: Target) -> bool:
        raise NotImplementedError

    def method(self, config: Any, rtn: bool, configs: dict[str, Any]) -> Method:
        """The stream's method; `configs`: each quantized linear's config (None: kept unquantized)."""
        raise NotImplementedError

    def reads_scheme(self, scheme: str) -> bool:
        """`--tensor-type` schemes: a weight scheme (w8, w4g128, ...) or bf16 (keep)."""
        return scheme.lower() == KEPT or WEIGHT_SCHEME.fullmatch(scheme.lower()) is not None

    def override_config(self, config: Any, scheme: str) -> Any:
        """One linear's config for an override's scheme (None: kept BF16)."""
        raise ConfigError(f"{self.name}: folders store one scheme for every linear (their loaders read one "
                          f"quantization_config), so --tensor-type ...={scheme} cannot apply; write per-tensor "
                          "schemes as compressed-tensors config groups instead: --to ct:SPEC (e.g. ct:w4g128-gptq)")

    def scheme_name(self, config: Any, target: Target) -> str:
        """A linear's scheme in the plan."""
        return target.spec

    def check_mix(self, model: Model, configs: dict[str, Any], fix: bool) -> dict[str, str]:
        """Check (with `fix`, change in place) a per-linear mix against the runtime's rules; returns notes for the
        plan by linear."""
        return {}

    def check_model(self, model: Model, config: Any) -> None:
        """Raise ConfigError when the method cannot handle this model at all (before any work)."""

    def check_shape(self, name: str, shape: tuple[int, int], config: Any) -> None:
        """Raise ConfigError when the linear cannot be stored in this layout."""

    def packed_bytes(self, shape: tuple[int, int], config: Any) -> int:
        raise NotImplementedError

    def pack(self, result: Any, config: Any) -> dict[str, torch.Tensor]:
        """suffix -> stored tensor of one quantized linear."""
        raise NotImplementedError

    def unpack(self, stored: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
        """The runtime (float32) weight of one stored linear: suffix -> tensor."""
        raise NotImplementedError

    def config_files(self, config: Any, model: Model, configs: dict[str, Any]) -> tuple[dict, dict[str, dict]]:
        """(what config.json adds, other JSON files by name)."""
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------------------------
    def file_name(self, model_name: str, target: Target) -> str:
        return f"{model_name}-{self.label}-{target.spec}"

    def _require_model(self, source) -> Model:
        if not isinstance(source, Model):
            raise ConfigError(f"{self.label} output needs an HF checkpoint as the source (a folder with "
                              "config.json), not a GGUF file")
        return source

    def linear_configs(self, model: Model, target: Target, options: ConvertOptions) -> tuple[Any, dict, dict]:
        """The target's config, each decoder-layer linear's config after `--tensor-type` overrides and the
        runtime's rules (None: kept BF16), and the plan note of each linear an override or a rule decided."""
        config = self.config(target, options)
        linears = [name for _, names, _ in quantized_linears(model) for name in names]
        configs: dict[str, Any] = dict.fromkeys(linears, config)
        notes = {}
        for name, override in resolve(linears, parse_overrides(options.tensor_types), self.reads_scheme).items():
            configs[name] = self.override_config(config, override.scheme)
            notes[name] = override.note()
        for name, note in self.check_mix(model, configs, options.fix_mix).items():
            notes[name] = ", ".join(filter(None, (notes.get(name), note)))
        return config, configs, notes

    def plan(self, source, target: Target, options: ConvertOptions) -> Plan:
        from quantkit.catalog import CatalogModel  # a catalog entry plans like a model (quantkit plan)

        model = source if isinstance(source, CatalogModel) else self._require_model(source)
        config, configs, notes = self.linear_configs(model, target, options)
        self.check_model(model, config)
        # embeddings and lm_head stay BF16: a bf16 override naming them is honoured as it stands
        kept_by = resolve(kept_globals(model), parse_overrides(options.tensor_types), lambda s: s.lower() == KEPT)
        entries = [PlanEntry(n, s, KEPT, 2 * math.prod(s), False, kept_by[n].note() if n in kept_by else "")
                   for n, s in kept_globals(model).items()]
        shapes = model.arch.tensor_shapes()
        for _, linears, others in quantized_linears(model):
            for name in linears:
                shape, own = tuple(shapes[name]), configs[name]
                if own is None:
                    entries.append(PlanEntry(name, shape, KEPT, 2 * math.prod(shape), False, notes.get(name, "")))
                    continue
                self.check_shape(name, shape, own)
                entries.append(PlanEntry(name, shape, self.scheme_name(own, target), self.packed_bytes(shape, own),
                                         True, notes.get(name, "")))
            entries += [PlanEntry(n, s, KEPT, 2 * math.prod(s), False) for n, s in others.items()]
        return Plan(self.name, target.spec, tuple(entries))

    def write(self, source, jobs: list[Job], options: ConvertOptions) -> list[list[Path]]:
        """Every GPTQ and AWQ target in the command in one pass over the model: each layer read once. Each job is
        handled by its own format (jobs may mix formats of this pass)."""
        from quantkit.calib.data import calibration_samples
        from quantkit.calib.layerwise import run_layers  # looked up per call: tests interpose on it

        model = self._require_model(source)
        layers = quantized_linears(model)
        # Every output folder is opened (existing outputs and foreign OUT.part refused) before calibrating.
        outputs = []
        for job in jobs:
            fmt = get_format(job.target.format)
            own = job.options or options
            writer = FolderWriter(job.path, model.folder, fmt._fingerprint(model, job, own), len(layers),
                                  force=options.force)
            outputs.append(_Output(fmt, job, writer, own, model))
        for out in outputs:
            if not out.writer.has(OTHER):
                out.writer.write(OTHER, {n: _read_global(model, n).to(KEPT_DTYPE) for n in kept_globals(model)})
        todo = [out for out in outputs if out.writer.start_layer < len(layers)]
        streams = [Stream(out.fmt.method(out.config, out.rtn, out.configs), out.take,
                          start_layer=out.writer.start_layer, restore=out.restore(layers)) for out in todo]
        samples = calibration_samples(model, options.calib, options.calib_samples, options.calib_ctx) \
            if any(s.method.calibrated for s in streams) else []
        progress = None if options.progress is None else (lambda done, total: options.progress(
            Progress(", ".join(str(out.job.target) for out in todo), done, total, "layers")))
        for index in run_layers(model, streams, samples, progress=progress):
            _, linears, others = layers[index]
            writing = [(out, s) for out, s in zip(todo, streams, strict=True) if index >= s.start_layer]
            kept = {n: model.source.read(n).to(KEPT_DTYPE) for n in others} if writing else {}
            for out, stream in writing:
                missing = {f"{module_name(n)}.{out.fmt.suffixes[0]}" if out.configs[n] is not None else n
                           for n in linears} - set(out.pending)
                if missing:
                    raise RuntimeError(f"layer {index}: {out.fmt.label} gave no result for {sorted(missing)}")
                info = stream.stats.layer_record(index)
                if out.replaced:
                    info["replaced_tensors"] = sorted(out.replaced)
                out.writer.write(index, {**kept, **out.pending}, info=info)
                out.pending, out.replaced = {}, set()
        for out, stream in zip(todo, streams, strict=True):
            log_summary(out.job, stream.stats)
        results = []
        for out in outputs:
            config_json, files = out.fmt.config_files(out.config, model, out.configs)
            results.append(out.writer.finish(config_json, {**files, REPORT_NAME: out.fmt.report(out, options)}))
        return results

    def _fingerprint(self, model: Model, job: Job, options: ConvertOptions) -> str:
        settings = {"format": self.name, "spec": job.target.spec, "quantkit": __version__,
                    "files": model.source.file_identity(), "damp": options.damp}
        if any(e.note for e in job.plan.entries):  # overrides and mix fixes
            settings["mix"] = {e.name: [e.scheme, e.note] for e in job.plan.entries if e.note}
        if not self.is_rtn(job.target):
            calib = options.calib
            settings |= {"calib": [str(calib), calib.stat().st_size, calib.stat().st_mtime_ns] if calib else None,
                         "calib_samples": options.calib_samples, "calib_ctx": options.calib_ctx}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def report(self, out: _Output, options: ConvertOptions) -> dict:
        """quantkit_report.json: how the folder was made, and each layer's calibration facts (routed tokens per
        expert, experts that got the fallback, the method's notes, tensors the method changed)."""
        calibration = None if out.rtn else {
            "text": options.calib.name if options.calib else "bundled calibration split",
            "samples": options.calib_samples, "ctx": options.calib_ctx,
            "expert_fallback": f"experts routed fewer than {DEFAULT_MIN_EXPERT_TOKENS} tokens are calibrated on "
                               "all of the layer's tokens"}
        return {"quantizer": f"quantkit {__version__}", "method": "round-to-nearest" if out.rtn else self.name,
                "spec": out.job.target.spec, "calibration": calibration,
                "layers": {str(k): v for k, v in sorted(out.writer.infos().items())}}


class _Output:
    """One target being written: its folder, settings, and the current layer's packed tensors."""

    def __init__(self, fmt: LayerwiseFolderFormat, job: Job, writer: FolderWriter, options: ConvertOptions,
                 model: Model):
        self.fmt, self.job, self.writer = fmt, job, writer
        self.config, self.configs, _ = fmt.linear_configs(model, job.target, options)
        self.rtn = fmt.is_rtn(job.target)
        self.pending: dict[str, torch.Tensor] = {}
        self.replaced: set[str] = set()

    def take(self, layer: int, name: str, result: Any) -> None:
        """The stream's sink: a quantized linear is packed at once (the layer is held packed, not as codes); a
        plain tensor is one the method changed (an AWQ-scaled norm) or kept, stored instead of the source's."""
        if isinstance(result, torch.Tensor):
            self.pending[name] = result.to(KEPT_DTYPE)
            self.replaced.add(name)
        else:
            packed = self.fmt.pack(result, self.configs[name])
            self.pending.update({f"{module_name(name)}.{s}": t for s, t in packed.items()})

    def restore(self, layers):
        def runtime_weights(layer: int) -> dict[str, torch.Tensor]:
            stored = self.writer.read(layer)
            weights = {name: self.fmt.unpack({s: stored[key] for s in self.fmt.suffixes
                                              if (key := f"{module_name(name)}.{s}") in stored}, self.configs[name])
                       for name in layers[layer][1] if self.configs[name] is not None}
            replaced = self.writer.infos().get(layer, {}).get("replaced_tensors", [])
            return weights | {name: stored[name].float() for name in replaced}
        return runtime_weights


def log_summary(job: Job, stats: LayerStats) -> None:
    """The end-of-run summary: time per layer, expert token coverage, fallbacks, the method's warnings."""
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
