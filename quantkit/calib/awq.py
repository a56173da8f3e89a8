"""AWQ on the calibration engine, a quantkit.calib.layerwise method: one decoder layer at a time, AutoAWQ's
order within the layer (FORMATS.md §6.4).

Per layer: one float pass keeps every input group's inputs (per sample, so attention can be rerun). The layer's
input groups, joined by what produces their input, are the scaling units: a norm feeding several linears (q/k/v,
gate/up; DeepSeek's q_a + kv_a_with_mqa, and the router with every routed and shared expert's gate/up), a norm
feeding one linear (q_a_layernorm -> q_b, kv_a_layernorm -> kv_b), a linear feeding one (v -> o where the shapes
allow, up -> down, each expert's up -> its down). An attention producer (o_proj under GQA or MLA) has nothing
to fold into: unscaled. Each unit's scales are searched against the output of the block its norm feeds (the
attention, MLP or whole MoE: Architecture.norm_block) or of its single linear, then folded: the producer's
output channels divided (a norm's weight, a linear's rows and bias), every consumer's input columns multiplied.
The router reads the same norm as the experts, so its columns are multiplied too: it stays unquantized and the
folded float model computes exactly what the source does. The cached inputs of the unit are divided alike.
Then every linear's clip is searched (not q/k projections, as AutoAWQ), the weights quantized (asymmetric,
zero points) and emitted, with the scaled norms, routers and biases the output must store instead of the
source's. Routed experts use the tokens routed to them; one under `min_expert_tokens` uses all of the layer's
tokens for its clip and down-projection scales (the GPTQ fallback), listed in the stats.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantkit.arch.base import InputGroup
from quantkit.calib.engine import CalibrationRun, Observer, Routing
from quantkit.calib.gptq import DEFAULT_MIN_EXPERT_TOKENS
from quantkit.calib.layerwise import LayerJob
from quantkit.errors import ConfigError
from quantkit.quant.awq import (
    AWQConfig,
    activation_mean,
    clip,
    quantize,
    runtime_weight,
    search_clip,
    search_scales,
)

# AutoAWQ leaves the query/key projections unclipped (their errors are squared through the attention scores)
UNCLIPPED = ("q_", "k_", "query", "key", "Wqkv")


@dataclass
class ScalingUnit:
    """Linears whose shared input one producer makes, and what judges their scales."""

    producer: str
    kind: str  # "norm" | "linear"
    groups: list[InputGroup]

    @property
    def linears(self) -> list[str]:
        return [name for g in self.groups for name in g.linears]


def scaling_units(groups: list[InputGroup]) -> list[ScalingUnit]:
    """The layer's input groups joined by producer, in order; attention-produced inputs are left out."""
    units: dict[str, ScalingUnit] = {}
    for g in groups:
        if g.kind == "attention":
            continue
        unit = units.setdefault(g.producer, ScalingUnit(g.producer, g.kind, []))
        unit.groups.append(g)
    return list(units.values())


class _Inputs(Observer):
    """Every input group's input, per forward call (one sample, or one expert's routed tokens of a sample)."""

    def __init__(self, keys: set[str]):
        self.keys = keys
        self.inputs: dict[str, list[torch.Tensor]] = {}

    def observe(self, layer: int, key: str, x: torch.Tensor, index: int, count: int) -> None:
        if key in self.keys:
            self.inputs.setdefault(key, []).append(x)


class AWQ:
    """AWQ as a layerwise Stream's method; `rtn` is the same asymmetric group quantization without scales or
    clipping (no calibration). `configs`: per-linear settings replacing `config` (None: left unquantized, still
    scaled with its unit, stored in `kept_dtype`). Notes in the stream's stats: "awq_scale_ratio" (unit producer ->
    chosen ratio)."""

    def __init__(self, config: AWQConfig, *, rtn: bool = False, min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
                 propagate: str = "quantized", kept_dtype: torch.dtype | None = None,
                 scale_dtype: torch.dtype = torch.float16, configs: Mapping[str, AWQConfig | None] | None = None):
        if propagate not in ("quantized", "float"):
            raise ConfigError(f"unknown propagation {propagate!r}; use 'quantized' or 'float'")
        self.config, self.rtn, self.min_expert_tokens, self.propagate = config, rtn, min_expert_tokens, propagate
        # the dtype the output stores the scaled norms and routers in: the quantized forward uses them so rounded,
        # as a runtime (and a resumed run, which reads them back) does
        self.kept_dtype, self.scale_dtype = kept_dtype, scale_dtype  # the latter: of the stored group scales
        self.configs = configs or {}
        self.keep = frozenset(n for n, c in self.configs.items() if c is None)
        self.calibrated = not rtn

    def quantize_layer(self, job: LayerJob, run: CalibrationRun | None) -> None:
        began = time.perf_counter()
        spec = job.arch.layer_spec(job.layer)
        if run is None:
            for lin in spec.linears:
                if lin.name in self.keep:
                    self._keep(job, lin.name)
                else:
                    self._emit(job, lin.name, job(lin.name))
        else:
            self._calibrated_layer(job, run, spec)
        job.stream.stats.seconds_per_layer[job.layer] = time.perf_counter() - began

    def _config(self, name: str) -> AWQConfig:
        return self.configs.get(name) or self.config

    def _emit(self, job: LayerJob, name: str, w: torch.Tensor) -> None:
        config = self._config(name)
        result = quantize(w, config)
        job.emit(name, result)
        if self.calibrated and self.propagate == "quantized":
            job.set(name, runtime_weight(result, config.group_size, self.scale_dtype))

    def _keep(self, job: LayerJob, name: str) -> None:
        """A tensor stored unquantized instead of the source's: the forward uses it as stored."""
        if self.kept_dtype is not None:
            job.set(name, job(name).to(self.kept_dtype).float())
        job.emit(name, job(name))

    def _calibrated_layer(self, job: LayerJob, run: CalibrationRun, spec) -> None:
        quantized = {lin.name for lin in spec.linears} - self.keep
        roles = {lin.name: lin.role for lin in spec.linears}
        float_outputs, cached = self.observe(job, run)
        if self.propagate != "float":
            float_outputs = None  # one activation copy fewer while the layer is quantized
        changed = self.fold_scales(job, cached)
        for group in spec.input_groups:
            x = cached.get(group.key)
            for name in group.linears:
                if name not in quantized:
                    continue
                w = job(name)
                if x and not any(tag in roles[name] for tag in UNCLIPPED):
                    config = self._config(name)
                    w = clip(w, search_clip(w, torch.cat(x), config), config.group_size)
                self._emit(job, name, w)
        # scaled norms, routers and biases, and the kept linears, replace the source's
        for name in sorted((changed - quantized) | (self.keep & {lin.name for lin in spec.linears})):
            self._keep(job, name)
        run.advance(float_outputs if self.propagate == "float" else run.forward(job))

    def observe(self, job: LayerJob, run: CalibrationRun) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """The layer's float outputs and every input group's inputs (experts under the threshold given all of the
        layer's tokens)."""
        arch = job.arch
        spec = arch.layer_spec(job.layer)
        inputs, routing = _Inputs({g.key for g in spec.input_groups}), Routing()
        has_router = hasattr(arch, "on_route")
        if has_router:
            arch.on_route = routing
        try:
            float_outputs = run.forward(job, [inputs])
        finally:
            if has_router:
                arch.on_route = None
        self._expert_coverage(job, spec.input_groups, inputs.inputs, routing)
        return float_outputs, inputs.inputs

    def fold_scales(self, job: LayerJob, cached: dict[str, list[torch.Tensor]]) -> set[str]:
        """Search and fold every scaling unit's scales into the job's layer (and the cached inputs); returns the
        names of the tensors changed. The folded float layer computes what the source layer does."""
        spec = job.arch.layer_spec(job.layer)
        quantized = {lin.name for lin in spec.linears} - self.keep
        changed: set[str] = set()
        for unit in scaling_units(spec.input_groups):
            self._scale(job, unit, cached, quantized, changed)
        return changed

    def _expert_coverage(self, job: LayerJob, groups: list[InputGroup], cached: dict[str, list[torch.Tensor]],
                         routing: Routing) -> None:
        """Tokens per routed expert; an expert under the threshold gets its inputs from all of the layer's tokens
        (its down projection's computed through its float gate and up)."""
        experts = sorted({g.expert for g in groups if g.expert is not None})
        if not experts:
            return
        router = next(g for g in groups if g.key.endswith("mlp.gate"))
        tokens = torch.cat(cached[router.key])
        choices = torch.cat([i.reshape(-1, i.shape[-1]) for i in routing.indices]).to(tokens.device)
        counts = [int((choices == e).any(-1).sum()) for e in experts]
        job.stream.stats.expert_tokens[job.layer] = counts
        for expert, count in zip(experts, counts, strict=True):
            if count >= self.min_expert_tokens:
                continue
            gate_group, down_group = (g for g in groups if g.expert == expert)
            gate, up = (job(n) for n in gate_group.linears)
            cached[gate_group.key] = [tokens]
            cached[down_group.key] = [F.silu(tokens @ gate.T) * (tokens @ up.T)]
            job.stream.stats.fallbacks.setdefault(job.layer, []).append(gate_group.linears[0].rsplit(".", 2)[0])

    def _scale(self, job: LayerJob, unit: ScalingUnit, cached: dict[str, list[torch.Tensor]], quantized: set[str],
               changed: set[str]) -> None:
        names = [n for n in unit.linears if n in quantized]
        # the unit's input: a group that sees every token of it (an expert's down unit is its one group)
        whole = [g for g in unit.groups if g.expert is None] or unit.groups[:1]
        x = cached.get(whole[0].key)
        if not names or not x:
            return
        if all(".mlp." in n for n in unit.linears):
            # a feed-forward block works token by token: all tokens in one batch, so that each candidate weight is
            # computed once and dropped (a MoE unit's candidates together are a whole layer)
            batches = [torch.cat([xi.reshape(-1, xi.shape[-1]) for xi in x])[None]]
        else:
            batches = _batches(x, self.config.inspect_tokens)
        if len(unit.linears) == 1:
            (name,) = names
            bias = _bias(job, name)

            def inspect(ws: Sequence[torch.Tensor]) -> list[torch.Tensor]:
                w = ws[0]
                return [F.linear(xb, w, bias) for xb in batches]
        else:
            index = {n: i for i, n in enumerate(names)}

            def inspect(ws: Sequence[torch.Tensor]) -> list[torch.Tensor]:
                def weights(name: str) -> torch.Tensor:
                    return ws[index[name]] if name in index else job(name)
                return [job.arch.norm_block(job.layer, unit.producer, weights, xb,
                                            torch.arange(xb.shape[1], device=xb.device)) for xb in batches]
        found = search_scales(activation_mean(x), [job(n) for n in names], inspect,
                              [self._config(n) for n in names])
        s = found.scales
        job.stream.stats.note(job.layer, "awq_scale_ratio", unit.producer, found.ratio)
        producer = job(unit.producer)
        if unit.kind == "norm":
            job.set(unit.producer, producer / s)
        else:  # a linear's output rows (the last len(s), as AutoAWQ) and its bias
            job.set(unit.producer, torch.cat([producer[:-len(s)], producer[-len(s):] / s[:, None]]))
            bias_name = unit.producer.removesuffix(".weight") + ".bias"
            if _has(job, bias_name):
                job.set(bias_name, job(bias_name) / s)
                changed.add(bias_name)
        changed.add(unit.producer)
        for name in unit.linears:
            job.set(name, job(name) * s)
            changed.add(name)
        for group in unit.groups:
            if group.key in cached:
                cached[group.key] = [xi / s for xi in cached[group.key]]


def _batches(samples: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    """Consecutive equal-length samples [t, in] stacked into [b, t, in] batches of at most max_tokens tokens (at
    least one sample each): a few large matmuls instead of one small one per sample."""
    batches: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    for xi in samples:
        if run and (xi.shape != run[0].shape or (len(run) + 1) * len(xi) > max_tokens):
            batches.append(torch.stack(run))
            run = []
        run.append(xi)
    if run:
        batches.append(torch.stack(run))
    return batches


def _has(job: LayerJob, name: str) -> bool:
    return name in job.arch.layer_spec(job.layer).tensor_shapes()


def _bias(job: LayerJob, weight_name: str) -> torch.Tensor | None:
    name = weight_name.removesuffix(".weight") + ".bias"
    return job(name) if _has(job, name) else None
