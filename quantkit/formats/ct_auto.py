"""`--to ct:auto[-gptq]`: each compressed-tensors linear's weight scheme chosen from measured costs to a budget.

Groups follow the runtimes' rules (quantkit.formats.compressed_tensors.runtime_sets): linears vLLM runs as one
matmul (q/k/v, gate/up, DeepSeek's q_a/kv_a) and the routed experts of every layer share one scheme; every other
decoder-layer linear is a group of its own. Candidates: CANDIDATES, symmetric on compressed-tensors' grid, plus bf16
(kept, cost 0; not for routed experts). Costs are measured (quantkit.calib.sensitivity) with the BF16 scales the
runtime uses and the method the output is written with: round-to-nearest for `ct:auto`, GPTQ from the Hessian of
each layer's float inputs for `ct:auto-gptq` (its own measurement: GPTQ shrinks some groups' errors more than
others'). The result is a plain mix of config groups, as `--tensor-type` overrides would write it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch

from quantkit.calib.data import calibration_samples
from quantkit.calib.gptq import FloatLayerHessians, gptq_or_rtn, runtime_weight
from quantkit.calib.sensitivity import Group, measure_sensitivity
from quantkit.errors import ConfigError
from quantkit.formats.layerwise_folder import KEPT, KEPT_DTYPE, quantized_linears
from quantkit.model import Model
from quantkit.plan.allocate import Budget, BudgetError, Option, allocate
from quantkit.plan.vram import vram_plan
from quantkit.quant.gptq import rtn_quantize

log = logging.getLogger(__name__)

CANDIDATES = ("w4", "w4g128", "w4g64", "w4g32", "w8")
METHODS = ("rtn", "gptq")
SAFETENSORS_ENTRY_BYTES = 256  # a generous bound on one tensor's entry in a safetensors JSON header


def auto_method(spec: str) -> str:
    """`auto-4.00bpw` -> rtn, `auto-gptq-4.00bpw` -> gptq."""
    parts = spec.split("-")
    return parts[1] if len(parts) > 1 and parts[1] in METHODS else "rtn"


def groups_of(model: Model, sets: list[tuple[str, list[str]]]) -> list[tuple[str, int, list[str]]]:
    """(group name, layer, linears) for every decoder-layer linear: runtime sets first, the rest alone."""
    in_set = {n: names for _, names in sets for n in names}
    out, seen = [], set()
    for layer, linears, _ in quantized_linears(model):
        for name in linears:
            if name in seen:
                continue
            members = in_set.get(name, [name])
            seen.update(members)
            label = name if len(members) == 1 else f"{name.rsplit('.', 2)[0]}.* ({len(members)} linears)"
            out.append((label, layer, members))
    return out


def plan_auto_configs(fmt, model: Model, base, budget: Budget, options, configs: dict, notes: dict
                      ) -> tuple[dict, dict, float, str]:
    """Each linear's Scheme (None: kept) and plan note, the predicted KLD and the sensitivity key. `base`: the
    method's Scheme; `configs`/`notes`: after --tensor-type overrides, which stay fixed (with the rest of their
    group)."""
    from quantkit.formats.compressed_tensors import EXPERT, parse_scheme, runtime_sets

    schemes = {s: parse_scheme(s) for s in CANDIDATES}
    shapes = model.arch.tensor_shapes()
    weights = model.weights()
    groups, free, fixed_bytes = [], {}, 0
    for label, layer, members in groups_of(model, runtime_sets(model)):
        overridden = [n for n in members if n in notes]
        if overridden:
            for n in members:
                configs[n] = configs[overridden[0]]
                notes.setdefault(n, notes[overridden[0]])
            fixed_bytes += sum(_bytes(fmt, shapes[n], configs[n]) for n in members)
            continue
        candidates = [s for s in CANDIDATES if all(_fits(shapes[n], schemes[s]) for n in members)]
        groups.append(Group(label, layer, tuple(candidates),
                            tuple(sum(_bytes(fmt, shapes[n], schemes[s]) for n in members) for s in candidates)))
        free[label] = members
    if not groups:
        raise ConfigError("ct:auto has no linear left to choose a scheme for: the overrides decide them all")
    kept = {g.name: sum(2 * math.prod(shapes[n]) for n in free[g.name]) for g in groups}
    others = _others(model)
    plan_fixed = fixed_bytes + sum(2 * math.prod(s) for s in others.values())
    n_elements = sum(math.prod(s) for s in others.values()) + sum(
        math.prod(shapes[n]) for _, names, _ in quantized_linears(model) for n in names)
    floor = plan_fixed + sum(min(g.nbytes) for g in groups)  # bf16 is never the smallest
    limit = _limit(model, budget, n_elements)
    if floor > limit:  # before measuring anything
        raise BudgetError(budget.refusal("ct:auto", "linear", floor, limit, n_elements))

    gptq = base.method == "gptq"
    hessians: list[FloatLayerHessians] = []  # the stage being measured (gptq only)

    def prepare(stage: int, layer, inputs: torch.Tensor, positions: torch.Tensor) -> None:
        hessians[:] = [FloatLayerHessians(model.arch, stage, layer, inputs, positions)]

    def degrade(group: Group, scheme: str) -> dict[str, torch.Tensor]:
        if not gptq:
            config = schemes[scheme].gptq()
            return {n: runtime_weight(rtn_quantize(weights(n), config), KEPT_DTYPE) for n in free[group.name]}
        config = replace(base, bits=schemes[scheme].bits, group_size=schemes[scheme].group_size).gptq()
        return {n: runtime_weight(gptq_or_rtn(weights(n), hessians[0][n], config)[0], KEPT_DTYPE)
                for n in free[group.name]}

    samples = calibration_samples(model, options.calib, options.sensitivity_samples, options.calib_ctx)
    sensitivity = measure_sensitivity(model, "ct", samples, groups, degrade, path=options.sensitivity,
                                      progress=options.progress,
                                      calib=str(options.calib) if options.calib else None,
                                      **({"prepare": prepare, "method": "gptq", "damp": base.damp} if gptq else {}))
    by_group = {g.name: [Option(s, b, sensitivity.costs[g.name][s]) for s, b in zip(g.schemes, g.nbytes, strict=True)]
                for g in groups}
    for g in groups:
        # routed experts stay quantized: transformers (5.17) would decompress kept ones with the shared experts'
        # scheme and leave them uninitialised (measured: logits 63% off)
        if not all(EXPERT.search(n) for n in free[g.name]):
            by_group[g.name].append(Option(KEPT, kept[g.name], 0.0))
    chosen = allocate(by_group, limit - plan_fixed)
    for label, option in chosen.items():
        for n in free[label]:
            configs[n] = None if option.scheme == KEPT else replace(base, bits=schemes[option.scheme].bits,
                                                                  group_size=schemes[option.scheme].group_size)
            notes[n] = "auto"
    predicted = sum(o.cost for o in chosen.values())
    log.info("ct:auto %s: predicted KLD %.5f", budget.option, predicted)
    return configs, notes, predicted, sensitivity.key


def _fits(shape, scheme) -> bool:
    return scheme.group_size == -1 or shape[1] % scheme.group_size == 0


def _bytes(fmt, shape, scheme) -> int:
    return 2 * math.prod(shape) if scheme is None else fmt.packed_bytes(tuple(shape), scheme)


def _others(model: Model) -> dict[str, tuple[int, ...]]:
    """Every stored tensor that is not a decoder-layer linear (kept BF16 whatever the mix)."""
    from quantkit.formats.layerwise_folder import kept_globals

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


def _limit(model: Model, budget: Budget, n_elements: int) -> int:
    if budget.bpw is not None:
        return int(budget.bpw * n_elements / 8)
    n_tensors = 5 * sum(len(names) for _, names, _ in quantized_linears(model)) + len(_others(model))
    if budget.size is not None:
        return budget.size - SAFETENSORS_ENTRY_BYTES * n_tensors
    return budget.gpus * budget.vram - _overhead(model, budget)
