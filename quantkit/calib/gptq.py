"""GPTQ on the calibration engine: one decoder layer at a time, Hessians per input group, quantized outputs
propagated to the next layer (GPTQ's sequential mode), MoE experts calibrated on the tokens routed to them.

Per layer: every sample runs through the float layer while one HessianAccumulator per input group collects
2·XᵀX/n; routed experts are not accumulated during that pass (DeepSeek-V3 would need 256 x 7168² floats per
layer): the router's input and each sample's routing decisions are kept instead, and each expert's Hessians
are built from its routed tokens when that expert is quantized, then dropped. An expert that received fewer
than `min_expert_tokens` tokens gets the fallback: its Hessian from all of the layer's tokens (as GPTQModel's
bypass and llm-compressor's all-expert calibration do), or plain round-to-nearest. Then the layer runs again
with its quantized weights, dequantized exactly as a runtime does (fp16 scales), and those outputs become the
next layer's inputs (`propagate="float"` keeps the float outputs instead).

Layer-level sequential: all of a layer's groups are quantized from that layer's float pass (no sub-layer
"true sequential" ordering).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quantkit.arch.base import InputGroup
from quantkit.calib.engine import CalibrationRun, LayerWeights, Observer
from quantkit.errors import ConfigError, QuantkitError
from quantkit.model import Model
from quantkit.quant.gptq import GPTQConfig, GPTQResult, HessianAccumulator, dequantize, gptq_quantize, rtn_quantize

log = logging.getLogger(__name__)

DEFAULT_MIN_EXPERT_TOKENS = 16  # fewer routed tokens than this: the expert gets the fallback


@dataclass
class GPTQStats:
    """What a run did, for its summary and the output's metadata."""

    seconds_per_layer: dict[int, float] = field(default_factory=dict)
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)  # layer -> tokens per routed expert
    fallbacks: list[str] = field(default_factory=list)  # expert (or group) names calibrated by the fallback
    damp_retries: list[tuple[str, float]] = field(default_factory=list)  # weight, damping finally used
    rtn: list[str] = field(default_factory=list)  # weights that got round-to-nearest (no usable Hessian)


def runtime_weight(result: GPTQResult) -> torch.Tensor:
    """The weight a runtime computes from the stored checkpoint: codes, zero points and fp16 scales."""
    return dequantize(result.q, result.scales.half().float(), result.zeros, result.g_idx)


class _Hessians(Observer):
    """One HessianAccumulator per input group of the layer, except routed experts, whose router input and
    routing decisions are kept to build their Hessians one expert at a time."""

    def __init__(self, groups: list[InputGroup], device: torch.device):
        self.device = device
        self.by_key = {g.key: g for g in groups if g.expert is None}
        self.router_key = next((g.key for g in groups if g.key.endswith("mlp.gate")), None)
        self.hessians: dict[str, HessianAccumulator] = {}
        self.router_inputs: list[torch.Tensor] = []

    def observe(self, layer: int, key: str, x: torch.Tensor, index: int, count: int) -> None:
        if key == self.router_key:
            self.router_inputs.append(x)
        elif key in self.by_key:
            acc = self.hessians.get(key)
            if acc is None:
                acc = self.hessians[key] = HessianAccumulator(x.shape[-1], self.device)
            acc.add(x[None])


class _Routing:
    """Routing decisions of every sample of one layer (the architecture's on_route hook)."""

    def __init__(self):
        self.indices: list[torch.Tensor] = []

    def __call__(self, layer: int, indices: torch.Tensor) -> None:
        self.indices.append(indices)


def _overlay(replaced: dict[str, torch.Tensor], weights: LayerWeights) -> Callable[[str], torch.Tensor]:
    """The layer's weights with the quantized ones in place of their float originals."""
    return lambda name: replaced[name] if name in replaced else weights(name)


def _quantize(name: str, w: torch.Tensor, acc: HessianAccumulator | None, config: GPTQConfig,
              stats: GPTQStats) -> GPTQResult:
    if acc is None or acc.n == 0:
        stats.rtn.append(name)
        return rtn_quantize(w, config)
    try:
        result = gptq_quantize(w, acc.H, config)
    except QuantkitError as exc:  # an all-zero or unusable Hessian: the weight still gets quantized
        log.warning("%s: %s; using round-to-nearest", name, exc)
        stats.rtn.append(name)
        return rtn_quantize(w, config)
    if result.damp_retries:
        log.warning("%s: Hessian not positive definite; damping raised to %g", name, result.damp_percent)
        stats.damp_retries.append((name, float(result.damp_percent)))
    return result


def _quantize_experts(layer: int, groups: list[InputGroup], weights: LayerWeights, hessians: _Hessians,
                      routing: _Routing, config: GPTQConfig, min_tokens: int, fallback: str, stats: GPTQStats,
                      results: dict[str, GPTQResult]) -> None:
    tokens = torch.cat([x.reshape(-1, x.shape[-1]) for x in hessians.router_inputs])
    choices = torch.cat([i.reshape(-1, i.shape[-1]) for i in routing.indices]).to(tokens.device)
    by_expert = {g.expert: g for g in groups if g.expert is not None and g.key.endswith("gate_proj")}
    downs = {g.expert: g for g in groups if g.expert is not None and g.key.endswith("down_proj")}
    counts = []
    for expert in sorted(by_expert):
        gate_name, up_name = by_expert[expert].linears
        (down_name,) = downs[expert].linears
        mine = (choices == expert).any(-1)
        counts.append(int(mine.sum()))
        x = tokens[mine]
        if len(x) < min_tokens:
            stats.fallbacks.append(gate_name.rsplit(".", 2)[0])
            if fallback == "rtn":
                for name in (gate_name, up_name, down_name):
                    results[name] = rtn_quantize(weights(name), config)
                continue
            x = tokens
        acc = HessianAccumulator(x.shape[-1], x.device)
        acc.add(x[None])
        gate, up = weights(gate_name), weights(up_name)
        results[gate_name] = _quantize(gate_name, gate, acc, config, stats)
        results[up_name] = _quantize(up_name, up, acc, config, stats)
        acc = HessianAccumulator(gate.shape[0], x.device)
        acc.add((F.silu(x @ gate.T) * (x @ up.T))[None])  # the float MLP's down_proj input
        results[down_name] = _quantize(down_name, weights(down_name), acc, config, stats)
    stats.expert_tokens[layer] = counts


def gptq_layers(model: Model, config: GPTQConfig, samples: list[torch.Tensor], *, start_layer: int = 0,
                restore: Callable[[int], dict[str, torch.Tensor]] | None = None, stats: GPTQStats | None = None,
                min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS, fallback: str = "all",
                propagate: str = "quantized",
                progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, dict[str, GPTQResult]]]:
    """Yield (layer, {checkpoint weight name: GPTQResult}) for every decoder layer from `start_layer` on, in
    order. Layers before `start_layer` were quantized by an earlier run: `restore(layer)` gives their
    dequantized weights, which only advance the hidden states."""
    if fallback not in ("all", "rtn"):
        raise ConfigError(f"unknown expert fallback {fallback!r}; use 'all' (the layer's tokens) or 'rtn'")
    if propagate not in ("quantized", "float"):
        raise ConfigError(f"unknown propagation {propagate!r}; use 'quantized' or 'float'")
    if start_layer and restore is None:
        raise ConfigError("resuming after layer 0 needs the finished layers' weights (restore)")
    stats = stats if stats is not None else GPTQStats()
    arch = model.arch
    if getattr(arch, "fused_experts", False):
        raise ConfigError(f"{model.source.path}: routed experts are stored fused (transformers 5 layout); GPTQ "
                          "checkpoints name each expert's linears, so convert from the per-expert checkpoint")
    run = CalibrationRun(arch, model.weights(), samples, model.device)
    for layer in range(arch.num_layers):
        began = time.perf_counter()
        weights = LayerWeights(model.weights())
        if layer < start_layer:
            restored = restore(layer)
            run.advance(run.forward(_overlay(restored, weights)))
            weights.clear()
            continue
        groups = arch.layer_spec(layer).input_groups
        hessians, routing = _Hessians(groups, model.device), _Routing()
        has_router = hasattr(arch, "on_route")
        if has_router:
            arch.on_route = routing
        try:
            float_outputs = run.forward(weights, [hessians])
        finally:
            if has_router:
                arch.on_route = None
        results: dict[str, GPTQResult] = {}
        for key, group in hessians.by_key.items():
            if key == hessians.router_key:
                continue  # the router stays unquantized
            for name in group.linears:
                results[name] = _quantize(name, weights(name), hessians.hessians.get(key), config, stats)
        if hessians.router_inputs:
            _quantize_experts(layer, groups, weights, hessians, routing, config, min_expert_tokens, fallback, stats,
                              results)
        del hessians
        if propagate == "float":
            outputs = float_outputs
        else:
            quantized = {name: runtime_weight(r) for name, r in results.items()}
            outputs = run.forward(_overlay(quantized, weights))
        weights.clear()
        run.advance(outputs)
        stats.seconds_per_layer[layer] = time.perf_counter() - began
        if progress is not None:
            progress(layer + 1, arch.num_layers)
        yield layer, results
