"""GPTQ on the calibration engine: one decoder layer at a time, Hessians per input group, quantized outputs
propagated to the next layer (GPTQ's sequential mode), MoE experts calibrated on the tokens routed to them.

Per layer: every sample runs through the float layer while one HessianAccumulator per input group collects
2·XᵀX/n; routed experts are not accumulated during that pass (DeepSeek-V3 would need 256 x 7168² floats per
layer): the router's input and each sample's routing decisions are kept instead, and each expert's Hessians
are built from its routed tokens when that expert is quantized, then dropped. Each routed token counts with the
square of its gate (the weight the expert's output is summed with), so an expert's Hessian is that of its share
of the MoE output's error rather than of its own output's (MoEQuant's affinity-guided GPTQ; GPTQModel and
llm-compressor weigh every routed token alike), where the gates leave enough effective tokens for the Hessian
(MIN_GATED_TOKENS_PER_COLUMN). An expert that received fewer
than `min_expert_tokens` tokens gets the fallback: its Hessian from all of the layer's tokens (as GPTQModel's
bypass and llm-compressor's all-expert calibration do), or plain round-to-nearest. Then the layer runs again
with its quantized weights, dequantized exactly as a runtime does (fp16 scales), and those outputs become the
next layer's inputs (`propagate="float"` keeps the float outputs instead).

Layer-level sequential: all of a layer's groups are quantized from that layer's float pass (no sub-layer
"true sequential" ordering).

GPTQ is a method of quantkit.calib.layerwise (several outputs in one pass over the model, each layer read once):
each quantized linear goes to its stream's sink at once and only its runtime weight stays, in place of the float
one when no later stream needs that.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from quantkit.arch.base import InputGroup, Weights
from quantkit.calib.engine import CalibrationRun, LayerWeights, Observer, Routing
from quantkit.calib.layerwise import LayerJob
from quantkit.errors import ConfigError, QuantkitError
from quantkit.quant.gptq import GPTQConfig, GPTQResult, HessianAccumulator, dequantize, gptq_quantize, rtn_quantize

log = logging.getLogger(__name__)

DEFAULT_MIN_EXPERT_TOKENS = 16  # fewer routed tokens than this: the expert gets the fallback
# Gate weighting shrinks an expert's effective token count, (sum g²)² / sum g⁴, to about half; below this many
# effective tokens per input column the noisier Hessian cost more than the better objective gained (tiny-deepseek:
# 2-7 per column at 32 x 256 calibration tokens, 1-4% worse KLD; 19-53 at 128 x 512, 1-6% better), so every routed
# token then counts alike. DeepSeek-V3's experts (7168 columns, about 2k routed tokens at 128 x 512) stay unweighted.
MIN_GATED_TOKENS_PER_COLUMN = 16
# What the Hessians are, for the keys of stored results made from them
HESSIANS = f"experts-by-gate-squared-from-{MIN_GATED_TOKENS_PER_COLUMN}-per-column"


def runtime_weight(result: GPTQResult, scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The weight a runtime computes from the stored checkpoint: codes, zero points and the scales as stored (fp16
    in GPTQ checkpoints, the model's dtype in compressed-tensors ones)."""
    return dequantize(result.q, result.scales.to(scale_dtype).float(), result.zeros, result.g_idx)


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


class HessianLayers:
    """Base of the layerwise methods (quantkit.calib.layerwise) that quantize each linear from the Hessian of its
    inputs: the float pass that collects them, routed experts' Hessians from their routed tokens, the pass that
    gives the next layer's inputs. Subclasses implement `quantize(job, name, w, acc)` (acc None: no calibration).
    Routed experts under `min_expert_tokens` get the `fallback` ("all" of the layer's tokens, or "rtn": no
    Hessian); `propagate` "quantized" (GPTQ's sequential mode: the layer's weights as the subclass set them) or
    "float" outputs to the next layer."""

    calibrated = True

    def __init__(self, *, min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS, fallback: str = "all",
                 propagate: str = "quantized"):
        if fallback not in ("all", "rtn"):
            raise ConfigError(f"unknown expert fallback {fallback!r}; use 'all' (the layer's tokens) or 'rtn'")
        if propagate not in ("quantized", "float"):
            raise ConfigError(f"unknown propagation {propagate!r}; use 'quantized' or 'float'")
        self.min_expert_tokens, self.fallback, self.propagate = min_expert_tokens, fallback, propagate

    def quantize(self, job: LayerJob, name: str, w: torch.Tensor, acc: HessianAccumulator | None) -> None:
        raise NotImplementedError

    def quantize_layer(self, job: LayerJob, run: CalibrationRun | None) -> None:
        began = time.perf_counter()
        arch = job.arch
        if getattr(arch, "fused_experts", False):
            raise ConfigError("routed experts are stored fused (transformers 5 layout); calibrated quantization "
                              "calibrates each expert's linears by name, so convert from the per-expert checkpoint")
        if not self.calibrated:
            for lin in arch.layer_spec(job.layer).linears:
                self.quantize(job, lin.name, job(lin.name), None)
        else:
            self._calibrated_layer(job, run)
        job.stream.stats.seconds_per_layer[job.layer] = time.perf_counter() - began

    def _calibrated_layer(self, job: LayerJob, run: CalibrationRun) -> None:
        """Float pass with Hessians, every linear quantized, then the pass that gives the next layer's inputs."""
        arch = job.arch
        groups = arch.layer_spec(job.layer).input_groups
        hessians, routing = _Hessians(groups, job.device), Routing()
        has_router = hasattr(arch, "on_route")
        if has_router:
            arch.on_route = routing
        try:
            float_outputs = run.forward(job, [hessians])
            if self.propagate != "float":
                float_outputs = None  # one activation copy fewer while the layer is quantized
        finally:
            if has_router:
                arch.on_route = None
        for key, group in hessians.by_key.items():
            if key == hessians.router_key:
                continue  # the router stays unquantized
            acc = hessians.hessians.pop(key, None)
            for name in group.linears:
                self.quantize(job, name, job(name), acc)
        if hessians.router_inputs:
            self._quantize_experts(job, groups, hessians, routing)
        del hessians
        run.advance(float_outputs if self.propagate == "float" else run.forward(job))

    def _quantize_experts(self, job: LayerJob, groups: list[InputGroup], hessians: _Hessians,
                          routing: Routing) -> None:
        stats = job.stream.stats
        experts = RoutedTokens(groups, hessians, routing)
        counts = []
        for expert in sorted(experts.gate_up):
            gate_name, up_name = experts.gate_up[expert]
            down_name = experts.down[expert]
            x, gates, routed = experts.inputs(expert, self.min_expert_tokens)
            counts.append(routed)
            if x is None:
                stats.fallbacks.setdefault(job.layer, []).append(gate_name.rsplit(".", 2)[0])
                if self.fallback == "rtn":
                    for name in (gate_name, up_name, down_name):
                        self.quantize(job, name, job(name), None)
                    continue
                x = experts.tokens
            acc = input_hessian(x, gates)
            gate, up = job(gate_name), job(up_name)  # the float ones, still needed for down's inputs
            self.quantize(job, gate_name, gate, acc)
            self.quantize(job, up_name, up, acc)
            self.quantize(job, down_name, job(down_name), down_hessian(x, gate, up, gates))
        stats.expert_tokens[job.layer] = counts


class RoutedTokens:
    """One MoE layer's router inputs and routing decisions, and its experts' linears: what each expert's Hessians
    are built from, one expert at a time."""

    def __init__(self, groups: list[InputGroup], hessians: _Hessians, routing: Routing):
        self.tokens = torch.cat([x.reshape(-1, x.shape[-1]) for x in hessians.router_inputs])
        hessians.router_inputs.clear()  # held once, concatenated
        self.choices = torch.cat([i.reshape(-1, i.shape[-1]) for i in routing.indices]).to(self.tokens.device)
        self.gates = torch.cat([g.reshape(-1, g.shape[-1]) for g in routing.gates]).to(self.tokens.device)
        self.gate_up = {g.expert: g.linears for g in groups if g.expert is not None and g.key.endswith("gate_proj")}
        self.down = {g.expert: g.linears[0] for g in groups if g.expert is not None and g.key.endswith("down_proj")}
        self.expert_of = {name: e for e, linears in self.gate_up.items() for name in (*linears, self.down[e])}

    def inputs(self, expert: int, min_tokens: int) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(the tokens routed to `expert` and their gates for it, both None when fewer than `min_tokens`; how many
        were routed)."""
        chosen = self.choices == expert
        mine = chosen.any(-1)
        routed = int(mine.sum())
        if routed < min_tokens:
            return None, None, routed
        return self.tokens[mine], (self.gates * chosen).sum(-1)[mine], routed


def input_hessian(x: torch.Tensor, weights: torch.Tensor | None = None) -> HessianAccumulator:
    """The Hessian of a linear whose inputs are the rows of x [tokens, in], as one batch; `weights` [tokens]
    scales each token's error (its term counts weight²) where they leave MIN_GATED_TOKENS_PER_COLUMN effective
    tokens per column, else every token counts alike."""
    acc = HessianAccumulator(x.shape[-1], x.device)
    if weights is not None:
        squared = weights.double() ** 2
        if squared.sum() ** 2 < MIN_GATED_TOKENS_PER_COLUMN * x.shape[-1] * (squared ** 2).sum():
            weights = None
    acc.add((x if weights is None else x * weights[:, None].to(x.dtype))[None])
    return acc


def down_hessian(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                 weights: torch.Tensor | None = None) -> HessianAccumulator:
    """The Hessian of an expert's down_proj: its inputs in the float MLP (SwiGLU) on tokens x."""
    return input_hessian(F.silu(x @ gate.T) * (x @ up.T), weights)


class FloatLayerHessians:
    """Every linear's Hessian in one decoder layer from given float inputs, as HessianLayers would build it for
    that linear (routed experts from their routed tokens, with the same fallback): what a measurement of GPTQ-
    encoded candidates (quantkit.calib.sensitivity's `prepare`) encodes each linear with. `hidden`: the layer's
    inputs, one tensor per forward ([batch, tokens, hidden]), each moved to `device` (default: where the first
    is) for its forward; `outputs` keeps the layer's outputs where their inputs were. Shared input groups are
    accumulated in that forward; experts' are built when asked, so only one expert's are held at a time."""

    def __init__(self, arch, index: int, layer: Weights, hidden: Sequence[torch.Tensor], *,
                 device: torch.device | None = None, min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
                 fallback: str = "all"):
        groups = arch.layer_spec(index).input_groups
        device = device or hidden[0].device
        hessians, routing = _Hessians(groups, device), Routing()
        has_router = hasattr(arch, "on_route")
        arch.observe = lambda key, x, i, count: hessians.observe(index, key, x, i, count)
        if has_router:
            arch.on_route = routing
        try:
            with torch.no_grad():
                self.outputs = [arch.layer_forward(index, layer, h.to(device), torch.arange(h.shape[1], device=device))
                                .to(h.device) for h in hidden]
        finally:
            arch.observe = None
            if has_router:
                arch.on_route = None
        self.layer, self.min_expert_tokens, self.fallback = layer, min_expert_tokens, fallback
        self.dense = {name: hessians.hessians.get(key) for key, group in hessians.by_key.items()
                      if key != hessians.router_key for name in group.linears}
        self.experts = RoutedTokens(groups, hessians, routing) if hessians.router_inputs else None

    def __contains__(self, name: str) -> bool:
        """Whether HessianLayers quantizes `name` from a Hessian (the router is left as it is)."""
        return name in self.dense or (self.experts is not None and name in self.experts.expert_of)

    def __getitem__(self, name: str) -> HessianAccumulator | None:
        """The linear's Hessian; None when it gets no calibration (an expert under the threshold with "rtn")."""
        if name in self.dense:
            return self.dense[name]
        if name not in self:
            raise KeyError(f"{name} is no linear of this layer")
        experts = self.experts
        expert = experts.expert_of[name]
        x, gates, _ = experts.inputs(expert, self.min_expert_tokens)
        if x is None:
            if self.fallback == "rtn":
                return None
            x = experts.tokens
        if name == experts.down[expert]:
            gate_name, up_name = experts.gate_up[expert]
            return down_hessian(x, self.layer(gate_name).float(), self.layer(up_name).float(), gates)
        return input_hessian(x, gates)


class CalibrationHessians:
    """The float Hessians of each decoder layer (FloatLayerHessians) and of the head, on the calibration samples an
    output's own GPTQ pass encodes from: what an automatic mix's GPTQ candidates are encoded with, so that a
    candidate's measured cost is that of the encoding written rather than of one fitted to the few tokens the
    measurement scores it on. The samples go through the float model one layer at a time, as far as asked, from
    the first ask (a measurement reused from its file asks nothing)."""

    def __init__(self, arch, weights: Weights, samples: Sequence[torch.Tensor], device: torch.device | str = "cpu"):
        self._start = (arch, weights, samples, device)
        self._run: CalibrationRun | None = None
        # what a stored measurement's key records of them
        self.setting = f"{HESSIANS} on {len(samples)}x{len(samples[0]) if samples else 0}"

    @classmethod
    def of_calibration(cls, model, calib, samples: int, ctx: int) -> CalibrationHessians:
        """On the calibration text's samples an output's GPTQ pass takes (--calib, --calib-samples, --calib-ctx)."""
        from quantkit.calib.data import calibration_samples

        return cls(model.arch, model.weights(), calibration_samples(model, calib, samples, ctx), model.device)

    @property
    def run(self) -> CalibrationRun:
        if self._run is None:
            self._run = CalibrationRun(*self._start)
        return self._run

    def fork(self) -> CalibrationHessians:
        """A second source from the same point, to run ahead of this one (this one's position is kept)."""
        twin = copy.copy(self)
        twin._run = self.run.fork()
        return twin

    def _advance_to(self, index: int) -> None:
        run = self.run
        if run.layer > index:
            raise ValueError(f"the calibration samples are past layer {index} (at {run.layer}); ask in layer order")
        while run.layer < index:
            layer = LayerWeights(run.weights)
            run.advance(run.forward(layer))
            layer.clear()

    def layer(self, index: int, weights: Weights) -> FloatLayerHessians:
        """Layer `index`'s Hessians with its weights `weights`; the samples move past it."""
        self._advance_to(index)
        run = self.run
        hessians = FloatLayerHessians(run.arch, index, weights, run.hidden, device=run.device)
        run.advance(hessians.outputs)
        del hessians.outputs
        return hessians

    def head(self, weights: Weights) -> HessianAccumulator:
        """The head's Hessian: the last layer's float outputs through the final norm."""
        run = self.run
        self._advance_to(run.arch.num_layers)
        acc = HessianAccumulator(run.arch.hidden_size, run.device)
        for hidden in run.hidden:
            acc.add(run.arch.final_norm(weights, hidden.to(run.device)))
        return acc


def gptq_or_rtn(w: torch.Tensor, acc: HessianAccumulator | None, config: GPTQConfig) -> tuple[GPTQResult, str | None]:
    """GPTQ from acc's Hessian, or round-to-nearest where there is no usable one (no calibration input; an
    all-zero or unusable Hessian): (result, why it was rounded to nearest, or None)."""
    if acc is None or acc.n == 0:
        return rtn_quantize(w, config), "no calibration input"
    try:
        return gptq_quantize(w, acc.H, config), None
    except QuantkitError as exc:
        return rtn_quantize(w, config), str(exc)


class GPTQ(HessianLayers):
    """The GPTQ method of a layerwise Stream: `rtn` rounds to nearest instead, with no calibration. Notes in the
    stream's stats: "round_to_nearest" (weights without a usable Hessian), "damping_raised" (weight -> damping).
    `scale_dtype`: the dtype the output stores scales in (the quantized forward uses them so rounded). `configs`:
    per-linear settings replacing `config` (None: the linear stays unquantized, stored and used in `kept_dtype`)."""

    def __init__(self, config: GPTQConfig, *, rtn: bool = False, min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
                 fallback: str = "all", propagate: str = "quantized", scale_dtype: torch.dtype = torch.float16,
                 configs: Mapping[str, GPTQConfig | None] | None = None, kept_dtype: torch.dtype = torch.bfloat16):
        super().__init__(min_expert_tokens=min_expert_tokens, fallback=fallback, propagate=propagate)
        self.config, self.rtn, self.scale_dtype = config, rtn, scale_dtype
        self.configs, self.kept_dtype = configs or {}, kept_dtype
        self.calibrated = not rtn

    def quantize(self, job: LayerJob, name: str, w: torch.Tensor, acc: HessianAccumulator | None) -> None:
        config, stats, layer = self.configs.get(name, self.config), job.stream.stats, job.layer
        if config is None:  # kept: stored as the runtime will use it
            job.set(name, w.to(self.kept_dtype).float())
            job.emit(name, job(name))
            return
        if self.rtn:
            result = rtn_quantize(w, config)
        else:
            result, why = gptq_or_rtn(w, acc, config)
            if why is not None:
                if acc is not None and acc.n:
                    log.warning("%s: %s; using round-to-nearest", name, why)
                stats.note(layer, "round_to_nearest", name, why)
            if result.damp_retries:
                log.warning("%s: Hessian not positive definite; damping raised to %g", name, result.damp_percent)
                stats.note(layer, "damping_raised", name, float(result.damp_percent))
        job.emit(name, result)
        if self.calibrated and self.propagate == "quantized":
            job.set(name, runtime_weight(result, self.scale_dtype))

