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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from quantkit import __version__
from quantkit.calib.gptq import DEFAULT_MIN_EXPERT_TOKENS, HESSIANS
from quantkit.calib.layerwise import LayerStats, Method, Stream
from quantkit.errors import ConfigError
from quantkit.formats import ConvertOptions, Job, OutputFormat, Target, get_format
from quantkit.formats.overrides import parse_overrides, resolve
from quantkit.formats.safetensors_folder import OTHER, FolderWriter
from quantkit.model import Model
from quantkit.plan import Plan, PlanEntry
from quantkit.progress import Progress
from quantkit.quant.gptq import GPTQConfig

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
    auto_specs: tuple[str, ...] = ()  # specs whose schemes are chosen to a budget (quantkit.formats.folder_auto)
    scale_dtype = KEPT_DTYPE  # the dtype the folder stores scales in (the runtime computes with them so rounded)

    def __init__(self):
        self._auto: dict[tuple, tuple] = {}  # an auto target's choice -> (configs, notes, auto report)

    def prepare(self, source, options: ConvertOptions) -> None:
        self._auto = {}  # the format is a module-level object: a choice made for another model must not be reused

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

    def runtime_sets(self, model: Model) -> list[tuple[str, list[str]]]:
        """(rule, linears) the runtimes need to share one scheme (only formats that store mixes have any)."""
        return []

    def mix_label(self, config: Any) -> str:
        """A linear's scheme in a broken rule's message (bf16: kept)."""
        raise NotImplementedError

    def check_mix(self, model: Model, configs: dict[str, Any], fix: bool) -> dict[str, str]:
        """Check (with `fix`, change in place) a per-linear mix against the runtime's rules; returns notes for the
        plan by linear."""
        notes = {}
        for rule, names in self.runtime_sets(model):
            schemes = {configs[n] for n in names}
            if len(schemes) == 1:
                continue
            if not fix:
                common = max(schemes, key=lambda c: sum(configs[n] == c for n in names))
                names = sorted(names, key=lambda n: configs[n] == common)  # the odd ones first
                listed = ", ".join(f"{n} ({self.mix_label(configs[n])})" for n in names[:6])
                raise ConfigError(f"this mix breaks a runtime rule: {rule}; {listed}"
                                  f"{f' and {len(names) - 6} more' if len(names) > 6 else ''}. Give them one scheme, "
                                  "or pass --fix-mix to promote each such set to its most precise scheme")
            best = max(schemes, key=_precision)
            for n in names:
                if configs[n] != best:
                    notes[n] = f"promoted from {self.mix_label(configs[n])}: {rule.split(':')[0]}"
                    configs[n] = best
        return notes

    def gptq_config(self, config: Any) -> GPTQConfig:
        """The GPTQ / round-to-nearest settings that fill a linear of this config (automatic mixes measure with
        them)."""
        raise NotImplementedError

    def is_auto(self, target: Target) -> bool:
        return target.spec.split("-")[0] == "auto" and bool(self.auto_specs)

    def auto_calibrated(self, target: Target) -> bool:
        """Whether an automatic target's weights come from GPTQ (else round-to-nearest)."""
        return not self.is_rtn(target)

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
        if not self.is_auto(target):
            return config, configs, notes
        if options.budget is None:
            raise ConfigError(f"{self.name}:auto needs a budget: --target-bpw 4.0, --target-size 20GB or "
                              "--fit-vram 24GiB --ctx 32768")
        choice = _auto_key(target, options)
        if choice not in self._auto:  # measured and chosen once, for the plan and the write alike
            from quantkit.formats.folder_auto import plan_auto_configs

            configs, notes, predicted, key = plan_auto_configs(self, model, target, config, options, configs, notes)
            self.check_mix(model, configs, fix=False)
            self._auto[choice] = (configs, notes, {"budget": options.budget.option,
                                                   "predicted_kld": predicted, "sensitivity_key": key})
        configs, notes, _ = self._auto[choice]
        return config, dict(configs), dict(notes)

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
                         "calib_samples": options.calib_samples, "calib_ctx": options.calib_ctx,
                         "hessians": HESSIANS}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def report(self, out: _Output, options: ConvertOptions) -> dict:
        """quantkit_report.json: how the folder was made, and each layer's calibration facts (routed tokens per
        expert, experts that got the fallback, the method's notes, tensors the method changed)."""
        calibration = None if out.rtn else {
            "text": options.calib.name if options.calib else "bundled calibration split",
            "samples": options.calib_samples, "ctx": options.calib_ctx,
            "expert_fallback": f"experts routed fewer than {DEFAULT_MIN_EXPERT_TOKENS} tokens are calibrated on "
                               "all of the layer's tokens"}
        report = {"quantizer": f"quantkit {__version__}", "method": "round-to-nearest" if out.rtn else self.name,
                  "spec": out.job.target.spec, "calibration": calibration,
                  "layers": {str(k): v for k, v in sorted(out.writer.infos().items())}}
        choice = _auto_key(out.job.target, out.job.options or options)
        if choice in self._auto:
            report["auto"] = {**self._auto[choice][2],
                              "schemes": {e.name: e.scheme for e in out.job.plan.entries if e.note == "auto"}}
        return report


def _auto_key(target: Target, options: ConvertOptions) -> tuple:
    """An automatic choice depends on the target (its budget is in the spec) and what is fixed around it."""
    return target.spec, tuple(options.tensor_types), options.fix_mix


def runtime_sets(model: Model, experts_per_layer: bool) -> list[tuple[str, list[str]]]:
    """The linears the runtimes run as one: (rule, names) per fused input group, and the routed experts of each
    layer (`experts_per_layer`: vLLM's fused MoE layer) or of the whole model (transformers' fused expert
    parameters of compressed-tensors checkpoints)."""
    sets, experts = [], []
    for spec in model.arch.layers():
        linears = {lin.name for lin in spec.linears}
        for group in spec.input_groups:
            names = [n for n in group.linears if n in linears]
            if group.expert is None and len(names) > 1:
                sets.append(("fused linears: vLLM runs linears reading one input (q/k/v as qkv_proj, gate/up as "
                             "gate_up_proj, DeepSeek's q_a/kv_a as fused_qkv_a_proj) as one matmul with one scheme",
                             names))
        layer_experts = [lin.name for lin in spec.linears if lin.expert is not None]
        if layer_experts and experts_per_layer:
            sets.append(("MoE experts: vLLM's fused MoE runs a layer's routed experts (gate, up and down) with one "
                         "scheme", layer_experts))
        experts += layer_experts
    if experts and not experts_per_layer:
        sets.append(("MoE experts: the runtimes' fused MoE runs the routed experts (gate, up and down) with one "
                     "scheme, in every layer for transformers' fused expert parameters", experts))
    return sets


def runtime_units(linears: Iterable[str], sets: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every linear once, in order: with the rest of its runtime set (`sets` from runtime_sets), else alone."""
    in_set = {n: names for _, names in sets for n in names}
    units, seen = [], set()
    for name in linears:
        if name not in seen:
            units.append(in_set.get(name, [name]))
            seen.update(units[-1])
    return units


def _precision(config: Any) -> tuple:
    """Order of schemes by precision (for --fix-mix): kept, then more bits, smaller groups, zero points."""
    if config is None:
        return (1, 0, 0, 0)
    group = config.group_size if config.group_size != -1 else 1 << 30
    return (0, config.bits, -group, not config.sym)


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
