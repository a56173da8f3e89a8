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

Several outputs share one run (GPTQStream each: GPTQ variants, round-to-nearest): every layer is read once for
all of them, and each calibrated stream carries its own activations. Each quantized linear goes to its stream's
sink at once (the format packs it) and only its runtime weight stays, replacing the float weight in the layer's
cache when no later stream needs that: a single output holds one layer of float32 weights at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
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
    """What a run did, layer by layer, for its summary and the output's report."""

    seconds_per_layer: dict[int, float] = field(default_factory=dict)
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)  # layer -> tokens per routed expert
    fallbacks: dict[int, list[str]] = field(default_factory=dict)  # experts calibrated by the fallback
    damp_retries: dict[int, dict[str, float]] = field(default_factory=dict)  # weight -> damping finally used
    rtn: dict[int, list[str]] = field(default_factory=dict)  # weights that got round-to-nearest (no usable Hessian)

    def layer_record(self, layer: int) -> dict:
        """One layer's facts, JSON-ready and deterministic (no times): what a resumed run must carry over."""
        record = {"expert_tokens": self.expert_tokens.get(layer), "fallback_experts": self.fallbacks.get(layer),
                  "damping_raised": self.damp_retries.get(layer), "round_to_nearest": self.rtn.get(layer)}
        return {k: v for k, v in record.items() if v}


# sink(layer, checkpoint weight name, result): takes each quantized linear as soon as it exists (e.g. packs it);
# the engine keeps only the runtime weight it needs for the quantized forward.
Sink = Callable[[int, str, GPTQResult], None]


@dataclass
class GPTQStream:
    """One output's quantization in a run: its settings, where it resumes (layers before `start_layer` were
    written by an earlier run; `restore(layer)` gives their runtime weights, which only advance its activations)
    and where its results go. `rtn`: round-to-nearest from the float weights, no calibration."""

    config: GPTQConfig
    sink: Sink
    rtn: bool = False
    start_layer: int = 0
    restore: Callable[[int], dict[str, torch.Tensor]] | None = None
    stats: GPTQStats = field(default_factory=GPTQStats)


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


class _LayerJob:
    """One stream's quantization of one layer: each linear quantized, handed to the sink, and its runtime weight
    kept for the quantized forward: in the layer's weight cache itself when no later stream needs the float
    weights (`in_place`, so the layer is held once), else beside it."""

    def __init__(self, layer: int, stream: GPTQStream, weights: LayerWeights, in_place: bool, keep_runtime: bool):
        self.layer, self.stream, self.weights = layer, stream, weights
        self.in_place, self.keep_runtime = in_place, keep_runtime
        self.runtime: dict[str, torch.Tensor] = {}

    def quantize(self, name: str, w: torch.Tensor, acc: HessianAccumulator | None) -> None:
        config, stats, layer = self.stream.config, self.stream.stats, self.layer
        if self.stream.rtn:
            result = rtn_quantize(w, config)
        elif acc is None or acc.n == 0:
            stats.rtn.setdefault(layer, []).append(name)
            result = rtn_quantize(w, config)
        else:
            try:
                result = gptq_quantize(w, acc.H, config)
            except QuantkitError as exc:  # an all-zero or unusable Hessian: the weight still gets quantized
                log.warning("%s: %s; using round-to-nearest", name, exc)
                stats.rtn.setdefault(layer, []).append(name)
                result = rtn_quantize(w, config)
            if result.damp_retries:
                log.warning("%s: Hessian not positive definite; damping raised to %g", name, result.damp_percent)
                stats.damp_retries.setdefault(layer, {})[name] = float(result.damp_percent)
        self.stream.sink(layer, name, result)
        if self.keep_runtime:
            weight = runtime_weight(result)
            if self.in_place:
                self.weights.replace(name, weight)
            else:
                self.runtime[name] = weight

    def quantized_weights(self) -> Callable[[str], torch.Tensor]:
        return self.weights if self.in_place else _overlay(self.runtime, self.weights)


def _quantize_experts(job: _LayerJob, groups: list[InputGroup], hessians: _Hessians, routing: _Routing,
                      min_tokens: int, fallback: str) -> None:
    weights, stats = job.weights, job.stream.stats
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
            stats.fallbacks.setdefault(job.layer, []).append(gate_name.rsplit(".", 2)[0])
            if fallback == "rtn":
                for name in (gate_name, up_name, down_name):
                    job.quantize(name, weights(name), None)
                continue
            x = tokens
        acc = HessianAccumulator(x.shape[-1], x.device)
        acc.add(x[None])
        gate, up = weights(gate_name), weights(up_name)  # the float ones, still needed for down's inputs
        job.quantize(gate_name, gate, acc)
        job.quantize(up_name, up, acc)
        acc = HessianAccumulator(gate.shape[0], x.device)
        acc.add((F.silu(x @ gate.T) * (x @ up.T))[None])  # the float MLP's down_proj input
        job.quantize(down_name, weights(down_name), acc)
    stats.expert_tokens[job.layer] = counts


def _calibrated_layer(job: _LayerJob, run: CalibrationRun, arch, device, min_tokens: int, fallback: str,
                      propagate: str) -> None:
    """Float pass with Hessians, every linear quantized, then the pass that gives the next layer's inputs."""
    groups = arch.layer_spec(job.layer).input_groups
    hessians, routing = _Hessians(groups, device), _Routing()
    has_router = hasattr(arch, "on_route")
    if has_router:
        arch.on_route = routing
    try:
        float_outputs = run.forward(job.weights, [hessians])
    finally:
        if has_router:
            arch.on_route = None
    for key, group in hessians.by_key.items():
        if key == hessians.router_key:
            continue  # the router stays unquantized
        acc = hessians.hessians.pop(key, None)
        for name in group.linears:
            job.quantize(name, job.weights(name), acc)
    if hessians.router_inputs:
        _quantize_experts(job, groups, hessians, routing, min_tokens, fallback)
    del hessians
    run.advance(float_outputs if propagate == "float" else run.forward(job.quantized_weights()))


def gptq_layers(model: Model, streams: Sequence[GPTQStream], samples: Sequence[torch.Tensor], *,
                min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS, fallback: str = "all",
                propagate: str = "quantized", progress: Callable[[int, int], None] | None = None) -> Iterator[int]:
    """Quantize every decoder layer for every stream, reading each layer's weights once for all of them: each
    calibrated stream keeps its own activations (its own quantized outputs feed its next layer). Yields each layer
    once every stream's sink has had that layer's linears (layers every stream restores are yielded too).
    Peak memory: one layer's float weights, plus one more layer of runtime weights when several calibrated
    streams share it, plus each stream's activations."""
    if fallback not in ("all", "rtn"):
        raise ConfigError(f"unknown expert fallback {fallback!r}; use 'all' (the layer's tokens) or 'rtn'")
    if propagate not in ("quantized", "float"):
        raise ConfigError(f"unknown propagation {propagate!r}; use 'quantized' or 'float'")
    for stream in streams:
        if stream.start_layer and stream.restore is None and not stream.rtn:
            raise ConfigError("resuming after layer 0 needs the finished layers' weights (restore)")
    arch = model.arch
    if getattr(arch, "fused_experts", False):
        raise ConfigError(f"{model.source.path}: routed experts are stored fused (transformers 5 layout); GPTQ "
                          "checkpoints name each expert's linears, so convert from the per-expert checkpoint")
    calibrated = [s for s in streams if not s.rtn]
    runs: dict[int, CalibrationRun] = {}
    if calibrated:
        first = CalibrationRun(arch, model.weights(), samples, model.device)
        runs = {id(s): first if i == 0 else first.fork() for i, s in enumerate(calibrated)}
    begin = min((s.start_layer for s in streams), default=arch.num_layers) if not calibrated else 0
    for layer in range(begin, arch.num_layers):
        weights = LayerWeights(model.weights())
        for stream in calibrated:
            if layer < stream.start_layer:
                run = runs[id(stream)]
                run.advance(run.forward(_overlay(stream.restore(layer), weights)))
        # round-to-nearest streams first: they only read the float weights the calibrated ones then replace
        active = sorted((s for s in streams if layer >= s.start_layer), key=lambda s: not s.rtn)
        for i, stream in enumerate(active):
            began = time.perf_counter()
            job = _LayerJob(layer, stream, weights, in_place=i == len(active) - 1,
                            keep_runtime=not stream.rtn and propagate == "quantized")
            if stream.rtn:
                for name in (lin.name for lin in arch.layer_spec(layer).linears):
                    job.quantize(name, weights(name), None)
            else:
                _calibrated_layer(job, runs[id(stream)], arch, model.device, min_expert_tokens, fallback, propagate)
            stream.stats.seconds_per_layer[layer] = time.perf_counter() - began
        weights.clear()
        if progress is not None:
            progress(layer + 1, arch.num_layers)
        yield layer
