"""AWQ (Lin et al., 2023) as AutoAWQ computes it: activation-aware scale search per scaling group, clip search per
linear, asymmetric group-wise quantization with zero points. Pure tensor algorithms, no I/O.

Follows FORMATS.md §6.4 ([AutoAWQ] awq/quantize/quantizer.py, scale.py): the scale grid of 20 ratios over the
mean |x| per input channel and the normalised mean |w| ("duo scaling"), each candidate judged by the error of the
module the group feeds ("module2inspect": the caller's `inspect`); clipping by shrinking each group's max |w| in
20 steps down to half, judged on a subsample of the linear's inputs. Everything in float32 on the tensors'
device (AutoAWQ runs the same arithmetic in fp16).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from quantkit.errors import ConfigError, QuantkitError

GROUP_SIZES = (32, 64, 128)
BITS = (4, 8)  # AutoAWQ's GEMM layout stores 4; compressed-tensors also 8


@dataclass(frozen=True)
class AWQConfig:
    """AutoAWQ's settings (its defaults): 4-bit with zero points (8-bit too for layouts that store it)."""

    bits: int = 4
    group_size: int = 128
    n_grid: int = 20  # scale ratios 0, 1/20, ..., 19/20
    duo_scaling: bool = True  # s = x_mean^r / w_mean^(1-r); False: x_mean^r alone (the original llm-awq)
    clip_grid: int = 20
    max_shrink: float = 0.5  # clipping tries max |w| * (1 - i/clip_grid) for i < max_shrink * clip_grid
    clip_tokens: int = 512  # input rows the clip search subsamples down to
    clip_batch: int = 256  # output rows per clip-search batch (memory only: results do not depend on it)
    inspect_tokens: int = 4096  # calibration tokens per inspected forward (memory only, up to float rounding)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ConfigError(f"AWQ quantizes to {' or '.join(map(str, BITS))} bits; got {self.bits!r}")
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ConfigError(f"AWQ group_size must be one of {', '.join(map(str, GROUP_SIZES))}; got "
                              f"{self.group_size!r}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1


@dataclass
class AWQResult:
    """A quantized [out, in] weight in natural column order. Stored (FORMATS.md §6.1) as codes and zeros
    transposed and packed along the output dim, scales [G, out] in float16."""

    q: torch.Tensor  # int32 [out, in], codes 0..maxq
    scales: torch.Tensor  # float32 [out, G]
    zeros: torch.Tensor  # int32 [out, G]


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, columns = w.shape
    if columns % group_size:
        raise ConfigError(f"AWQ needs input widths divisible by the group size; {columns} columns and group "
                          f"{group_size}")
    return w.reshape(out, columns // group_size, group_size)


def group_params(w: torch.Tensor, config: AWQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [out, G] of AutoAWQ's zero-point quantizer: the group's min and max (0 need not be
    inside), scale = (max - min) / maxq (at least 1e-5), zero = clamp(-round(min / scale), 0, maxq)."""
    lo, hi = torch.aminmax(_grouped(w, config.group_size), dim=-1)
    scales = (hi - lo).clamp(min=1e-5) / config.maxq
    zeros = (-torch.round(lo / scales)).clamp(0, config.maxq)
    return scales, zeros


def _codes(w: torch.Tensor, config: AWQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [out, G, g] (float, 0..maxq), scales and zero points [out, G] of AutoAWQ's zero-point quantizer."""
    scales, zeros = group_params(w, config)
    q = (torch.round(_grouped(w, config.group_size) / scales[..., None]) + zeros[..., None]).clamp(0, config.maxq)
    return q, scales, zeros


def pseudo_quantize(w: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """w quantized and dequantized (AutoAWQ's pseudo_quantize_tensor): _codes' arithmetic in place, one buffer
    for the whole chain (the scale search runs this on every candidate's weights: half its time at V3's shapes)."""
    scales, zeros = group_params(w, config)
    s, z = scales[..., None], zeros[..., None]
    q = _grouped(w, config.group_size) / s
    return q.round_().add_(z).clamp_(0, config.maxq).sub_(z).mul_(s).reshape(w.shape)


def quantize(w: torch.Tensor, config: AWQConfig) -> AWQResult:
    """The stored form of pseudo_quantize(w): exact codes, float32 scales, integer zeros."""
    if not torch.isfinite(w).all():
        raise QuantkitError("the weight to quantize holds NaN or infinite values; the checkpoint is damaged or was "
                            "not dequantized correctly")
    q, scales, zeros = _codes(w, config)
    return AWQResult(q.reshape(w.shape).to(torch.int32), scales, zeros.to(torch.int32))


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """w[o, i] = (q[o, i] - zeros[o, i // g]) * scales[o, i // g], in float32."""
    g = _grouped(q.float(), group_size)
    return ((g - zeros.float()[..., None]) * scales.float()[..., None]).reshape(q.shape)


def runtime_weight(result: AWQResult, group_size: int, scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """What a runtime computes from the stored checkpoint (scales as stored: fp16 in AutoAWQ's layout)."""
    return dequantize(result.q, result.scales.to(scale_dtype).float(), result.zeros, group_size)


def weight_mean(weights: Sequence[torch.Tensor], group_sizes: int | Sequence[int]) -> torch.Tensor:
    """Per input channel: the mean over every output row of the group's linears of |w| / (max |w| of its
    quantization group + 1e-6), each weight grouped by its own group size; one weight at a time (a MoE unit's
    weights together are a whole layer)."""
    sizes = [group_sizes] * len(weights) if isinstance(group_sizes, int) else list(group_sizes)
    total, rows = None, 0
    for w, size in zip(weights, sizes, strict=True):
        g = _grouped(w.abs(), size)
        part = (g / (g.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape).sum(0)
        total = part if total is None else total + part
        rows += w.shape[0]
    return total / rows


class Candidates(Sequence):
    """A scale candidate's weights, pseudo-quantized when indexed (not kept): an inspected forward that reads each
    once holds one at a time, not a copy of every weight of the unit."""

    def __init__(self, weights: Sequence[torch.Tensor], s: torch.Tensor, configs: Sequence[AWQConfig]):
        self.weights, self.s, self.configs = weights, s, configs

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, i: int) -> torch.Tensor:
        return pseudo_quantize(self.weights[i] * self.s, self.configs[i]) / self.s


def activation_mean(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per input channel: mean |x| over every token of every input [..., in] (accumulated in float32)."""
    total, count = None, 0
    for x in inputs:
        rows = x.reshape(-1, x.shape[-1]).float()
        part = rows.abs().sum(0)
        total = part if total is None else total + part
        count += rows.shape[0]
    if not count:
        raise QuantkitError("AWQ's scale search got no input tokens")
    return total / count


@dataclass
class ScaleSearch:
    scales: torch.Tensor  # [in]: W[:, j] *= s_j, the producer's output channel j /= s_j
    ratio: float
    losses: list[float]  # per ratio, in grid order


def search_scales(x_mean: torch.Tensor, weights: Sequence[torch.Tensor],
                  inspect: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                  config: AWQConfig | Sequence[AWQConfig]) -> ScaleSearch:
    """AutoAWQ's _compute_best_scale. `inspect(ws)` runs the inspected module on the group's cached inputs with
    the group's weights replaced by `ws` (in order; computed when indexed, so index each once) and returns its
    outputs; the loss of a ratio is the mean
    squared difference from the outputs with the unquantized weights, over all their elements. `config`: one for
    every weight, or one per weight (a mixed unit; the grid settings are the first one's)."""
    configs = [config] * len(weights) if isinstance(config, AWQConfig) else list(config)
    config = configs[0]
    reference = inspect(list(weights))
    elements = sum(r.numel() for r in reference)
    w_mean = weight_mean(weights, [c.group_size for c in configs]) if config.duo_scaling else None
    best, losses = None, []
    for step in range(config.n_grid):
        ratio = step / config.n_grid
        s = x_mean.pow(ratio)
        if w_mean is not None:
            s = s / (w_mean.pow(1 - ratio) + 1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        outputs = inspect(Candidates(weights, s, configs))
        loss = float(sum((r - o).float().pow(2).sum() for r, o in zip(reference, outputs, strict=True)) / elements)
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, ratio, s)
    if best is None or not torch.isfinite(torch.tensor(best[0])):
        raise QuantkitError(f"AWQ's scale search found no finite loss (losses {losses[:3]}...); the calibration "
                            "inputs or weights hold NaN/Inf")
    return ScaleSearch(best[2], best[1], losses)


def search_clip(w: torch.Tensor, x: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """AutoAWQ's _compute_best_clip: per output row and quantization group, the max |w| (shrunk from the group's
    own by 0..max_shrink in clip_grid steps) whose clamped, quantized weights best keep the group's partial dot
    products with the inputs x [tokens, in] (every step-th token, step = tokens // clip_tokens). Returns
    max_val [out, G]; apply with clip()."""
    rows = x.reshape(-1, x.shape[-1]).float()
    rows = rows[::max(1, rows.shape[0] // config.clip_tokens)]
    feats = _grouped(rows, config.group_size)  # [tokens, G, g]
    grouped = _grouped(w.float(), config.group_size)  # [out, G, g]
    best_all = []
    for start in range(0, grouped.shape[0], config.clip_batch):
        g = grouped[start:start + config.clip_batch]
        org_max = g.abs().amax(-1, keepdim=True)  # [b, G, 1]
        org_out = torch.einsum("tgk,bgk->btg", feats, g)
        best, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for step in range(int(config.max_shrink * config.clip_grid)):
            max_val = org_max * (1 - step / config.clip_grid)
            clamped = torch.maximum(torch.minimum(g, max_val), -max_val)
            q = pseudo_quantize(clamped.reshape(len(g), -1), config).reshape(g.shape)
            err = (torch.einsum("tgk,bgk->btg", feats, q) - org_out).pow(2).mean(1)[..., None]  # [b, G, 1]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, max_val, best)
        best_all.append(best[..., 0])
    return torch.cat(best_all)


def clip(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """w with each quantization group clamped to [-max_val, max_val] (AutoAWQ's apply_clip)."""
    g = _grouped(w, group_size)
    return torch.maximum(torch.minimum(g, max_val[..., None]), -max_val[..., None]).reshape(w.shape)
