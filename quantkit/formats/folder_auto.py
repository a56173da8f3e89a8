"""`--to ct:auto[-gptq[-act]]` and `--to gptq:auto`: each decoder-layer linear's weight scheme in an HF folder
chosen from measured costs to a budget.

Groups follow the runtimes' rules (the format's runtime_sets): linears vLLM runs as one matmul (q/k/v, gate/up,
DeepSeek's q_a/kv_a) and routed experts (of every layer in compressed-tensors, of each layer in GPTQ) share one
scheme; every other decoder-layer linear is a group of its own. Candidates: the format's AUTO_CANDIDATES that the
linears' shapes allow, plus bf16 (kept, cost 0; not for routed experts). Costs are measured
(quantkit.calib.sensitivity) with the scales as the folder stores them and the method the output is written with:
round-to-nearest (`ct:auto`) or GPTQ from the Hessian of each layer's float inputs on the output's own
calibration samples (`ct:auto-gptq`, `gptq:auto`; its own measurement: GPTQ shrinks some groups' errors more than
others'; `-act` rounds in act-order, again a measurement of its own). The result is a plain mix, as
`--tensor-type` overrides would write it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from quantkit.calib.data import scoring_samples
from quantkit.calib.engine import LayerWeights
from quantkit.calib.gptq import CalibrationHessians, FloatLayerHessians, gptq_or_rtn, runtime_weight
from quantkit.calib.sensitivity import Group, measure_sensitivity
from quantkit.errors import ConfigError
from quantkit.formats.layerwise_folder import KEPT, WEIGHT_SCHEME, kept_globals, quantized_linears, runtime_units
from quantkit.model import Model
from quantkit.plan.allocate import Budget, BudgetError, Option, allocate
from quantkit.plan.vram import vram_plan
from quantkit.quant.gptq import rtn_quantize

log = logging.getLogger(__name__)

SAFETENSORS_ENTRY_BYTES = 256  # a generous bound on one tensor's entry in a safetensors JSON header


def groups_of(model: Model, sets: list[tuple[str, list[str]]]) -> list[tuple[str, int, list[str]]]:
    """(group name, layer, linears) for every decoder-layer linear: runtime sets first, the rest alone."""
    layer_of = {n: layer for layer, names, _ in quantized_linears(model) for n in names}
    return [(members[0] if len(members) == 1 else f"{members[0].rsplit('.', 2)[0]}.* ({len(members)} linears)",
             layer_of[members[0]], members) for members in runtime_units(layer_of, sets)]


def candidate(base, scheme: str):
    """`base` (the target's config) at a candidate's bits and group size (w4g128, w8, ...)."""
    match = WEIGHT_SCHEME.fullmatch(scheme)
    return replace(base, bits=int(match.group(1)), group_size=-1 if match.group(2) is None else int(match.group(2)))


@dataclass
class AutoGroups:
    """An automatic mix's choices: the groups to allocate (their candidates and bytes), each group's linears, the
    bytes of each group kept in BF16, the bytes fixed whatever the choice, and the model's weights."""

    groups: list[Group]
    free: dict[str, list[str]]
    kept: dict[str, int]
    fixed: int
    n_elements: int
    schemes: dict
    routed: set[str]  # the routed experts' linears

    def options(self, costs: dict[str, dict[str, float]] | None = None) -> dict[str, list[Option]]:
        """Each group's options (cost 0 without `costs`); kept BF16 too, but not for routed experts:
        transformers (5.17) would decompress kept ones of a compressed-tensors folder with the shared experts'
        scheme and leave them uninitialised (measured: logits 63% off)."""
        out = {g.name: [Option(s, b, costs[g.name][s] if costs else 0.0)
                        for s, b in zip(g.schemes, g.nbytes, strict=True)] for g in self.groups}
        for g in self.groups:
            if not self.routed.intersection(self.free[g.name]):
                out[g.name].append(Option(KEPT, self.kept[g.name], 0.0))
        return out

    def bounds(self) -> tuple[int, int]:
        """The bytes of the smallest and of the largest mix."""
        options = self.options()
        return (self.fixed + sum(min(o.nbytes for o in opts) for opts in options.values()),
                self.fixed + sum(max(o.nbytes for o in opts) for opts in options.values()))


def auto_groups(fmt, model, base, configs: dict, notes: dict) -> AutoGroups:
    """The groups of `fmt`'s runtime sets and single linears with the candidates their shapes allow; linears an
    override decided (in `notes`) are fixed, with the rest of their set (`configs`/`notes` updated)."""
    schemes = {s: candidate(base, s) for s in fmt.AUTO_CANDIDATES}
    shapes = model.arch.tensor_shapes()
    groups, free, fixed_bytes = [], {}, 0
    sets = fmt.runtime_sets(model)
    for label, layer, members in groups_of(model, sets):
        overridden = [n for n in members if n in notes]
        if overridden:
            for n in members:
                configs[n] = configs[overridden[0]]
                notes.setdefault(n, notes[overridden[0]])
            fixed_bytes += sum(_bytes(fmt, shapes[n], configs[n]) for n in members)
            continue
        candidates = [s for s in fmt.AUTO_CANDIDATES if all(_fits(fmt, n, shapes[n], schemes[s]) for n in members)]
        groups.append(Group(label, layer, tuple(candidates),
                            tuple(sum(_bytes(fmt, shapes[n], schemes[s]) for n in members) for s in candidates)))
        free[label] = members
    if not groups:
        raise ConfigError(f"{fmt.name}:auto has no linear left to choose a scheme for: the overrides decide them all")
    kept = {g.name: sum(2 * math.prod(shapes[n]) for n in free[g.name]) for g in groups}
    others = _others(model)
    n_elements = sum(math.prod(s) for s in others.values()) + sum(
        math.prod(shapes[n]) for _, names, _ in quantized_linears(model) for n in names)
    routed = {n for rule, names in sets if rule.startswith("MoE") for n in names}
    return AutoGroups(groups, free, kept, fixed_bytes + sum(2 * math.prod(s) for s in others.values()), n_elements,
                      schemes, routed)


def plan_auto_configs(fmt, model: Model, target, base, options, configs: dict, notes: dict
                      ) -> tuple[dict, dict, float, str]:
    """Each linear's config (None: kept) and plan note, the predicted KLD and the sensitivity key. `base`: the
    target's config; `configs`/`notes`: after --tensor-type overrides, which stay fixed (with the rest of their
    group)."""
    if options.sensitivity_method not in (None, "output"):
        raise ConfigError(f"{fmt.name}:auto measures every candidate at the model output: --sensitivity-method "
                          f"{options.sensitivity_method} is for gguf:auto only (a compressed-tensors group of routed "
                          "experts spans every layer; on gptq:auto the proxy chose worse mixes for MoE models)")
    budget: Budget = options.budget
    weights = model.weights()
    mix = auto_groups(fmt, model, base, configs, notes)
    groups, free, schemes = mix.groups, mix.free, mix.schemes
    floor = mix.bounds()[0]
    limit = tensor_budget(fmt, model, budget, mix.n_elements)
    if floor > limit:  # before measuring anything
        raise BudgetError(budget.refusal(f"{fmt.name}:auto", "linear", floor, limit, mix.n_elements))

    gptq = fmt.auto_calibrated(target)
    layer_of = {n: layer for layer, names, _ in quantized_linears(model) for n in names}
    hessians: dict[int, FloatLayerHessians] = {}  # by layer, for the stage being measured (gptq only)
    # encoded from the Hessians of the samples the output's GPTQ pass uses
    source = CalibrationHessians.of_calibration(model, options.calib, options.calib_samples,
                                                options.calib_ctx) if gptq else None

    def prepare(stage: int, layer) -> None:
        """The Hessians of every layer the stage's groups reach (compressed-tensors' routed experts are one group
        across layers: the layers after the stage's own from a source run ahead)."""
        last = max(layer_of[n] for g in groups if g.stage == stage for n in free[g.name])
        hessians.clear()
        hessians[stage] = source.layer(stage, layer)
        if last > stage:
            ahead = source.fork()
            for index in range(stage + 1, last + 1):
                hessians[index] = ahead.layer(index, LayerWeights(weights))

    def degrade(group: Group, scheme: str) -> dict[str, torch.Tensor]:
        config = fmt.gptq_config(schemes[scheme])
        if not gptq:
            return {n: runtime_weight(rtn_quantize(weights(n), config), fmt.scale_dtype) for n in free[group.name]}
        return {n: runtime_weight(gptq_or_rtn(weights(n), hessians[layer_of[n]][n], config)[0], fmt.scale_dtype)
                for n in free[group.name]}

    samples = scoring_samples(model, options.calib, options.sensitivity_samples, options.calib_ctx,
                              options.calib_samples if gptq else 0)
    encoding = fmt.gptq_config(base)
    measured = {"prepare": prepare, "method": "gptq", "damp": encoding.damp_percent,
                "hessians": source.setting} if gptq else {}
    if gptq and encoding.desc_act:  # absent otherwise: stored natural-order measurements stay valid
        measured |= {"desc_act": True, "static_groups": encoding.static_groups}
    sensitivity = measure_sensitivity(model, fmt.name, samples, groups, degrade, path=options.sensitivity,
                                      progress=options.progress,
                                      calib=str(options.calib) if options.calib else None, **measured)
    by_group = mix.options(sensitivity.costs)
    chosen = allocate(by_group, limit - mix.fixed)
    for label, option in chosen.items():
        for n in free[label]:
            configs[n] = None if option.scheme == KEPT else schemes[option.scheme]
            notes[n] = "auto"
    predicted = sum(o.cost for o in chosen.values())
    log.info("%s:auto %s: predicted KLD %.5f", fmt.name, budget.option, predicted)
    return configs, notes, predicted, sensitivity.key


def _fits(fmt, name: str, shape, config) -> bool:
    try:
        fmt.check_shape(name, tuple(shape), config)
    except ConfigError:
        return False
    return True


def _bytes(fmt, shape, config) -> int:
    return 2 * math.prod(shape) if config is None else fmt.packed_bytes(tuple(shape), config)


def _others(model: Model) -> dict[str, tuple[int, ...]]:
    """Every stored tensor that is not a decoder-layer linear (kept BF16 whatever the mix)."""
    out = dict(kept_globals(model))
    for _, _, others in quantized_linears(model):
        out.update(others)
    return out


def _overhead(model: Model, budget: Budget) -> int:
    """GPU memory besides the weights at the budget's context (vLLM-style: KV cache at exactly ctx, and each GPU's
    compute buffers), from quantkit.plan.vram on the model as shipped."""
    from quantkit.fit import shipped_plan

    estimate = vram_plan(model.arch, shipped_plan(model.arch), budget.ctx, budget.kv_type or "bf16")
    return estimate.kv_cache + budget.gpus * estimate.compute


def tensor_budget(fmt, model: Model, budget: Budget, n_elements: int) -> int:
    """The budget as bytes of tensor data (bpw over every tensor; the files less their headers; the VRAM less KV
    cache and compute buffers)."""
    if budget.bpw is not None:
        return int(budget.bpw * n_elements / 8)
    n_tensors = len(fmt.suffixes) * sum(len(names) for _, names, _ in quantized_linears(model)) + len(_others(model))
    if budget.size is not None:
        return budget.size - SAFETENSORS_ENTRY_BYTES * n_tensors
    return budget.gpus * budget.vram - _overhead(model, budget)
