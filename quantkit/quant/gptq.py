"""GPTQ (Frantar et al., 2022) and round-to-nearest on AutoGPTQ's integer grid. Pure tensor algorithms, no I/O.

Follows FORMATS.md §5.5 ([IST-gptq] gptq.py/quant.py, [AutoGPTQ] quantization/gptq.py/quantizer.py; [GPTQModel]
gptq.py does the same math), including the references' quirks, so that a checkpoint quantized here is the one
those tools would have produced from the same Hessian:
- with group_size -1 the per-row grid is found on W before dead columns are zeroed;
- a group's grid is found when the loop enters its first column, from W as the lazy batch updates left it: error
  feedback from earlier blocks is in, feedback from earlier columns of the current block (held in the block's
  copy) is not, so block_size changes results whenever a group starts inside a block;
- a group with no negative value keeps xmin = 0 when sym=True: scale = xmax / maxq around the midpoint zero, so
  values above (maxq - 1) / 2 steps (about half of xmax) clamp there.
Everything runs in float32 on W's device, deterministically (ties in act-order sort by column index). CUDA
matmuls must be in true float32 (torch's default; the references switch TF32 off globally).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from quantkit.errors import ConfigError, QuantkitError

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
# The MSE range search of [AutoGPTQ] quantizer.py Quantizer.configure (its defaults): shrink factors
# p = 1 - i / grid for i < maxshrink * grid (1.00, 0.99, ..., 0.21), error sum(|dequant(x) - x| ** norm) per row.
MSE_NORM = 2.4
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
# A Hessian whose damped Cholesky fails is retried with damp_percent x10, up to this many times.
DAMP_GROWTH = 10.0
DAMP_RETRIES = 4


@dataclass(frozen=True)
class GPTQConfig:
    """One Linear's GPTQ settings, named as in quantize_config.json. Defaults are FORMATS.md §5.4's widely
    compatible block (4-bit, group 128, symmetric, no act-order) with AutoGPTQ's damping and block size."""

    bits: int = 4
    group_size: int = 128  # input columns per scale/zero (the last group may be short); -1 = one per output row
    sym: bool = True
    desc_act: bool = False  # act-order: quantize columns by descending Hessian diagonal
    static_groups: bool = False  # grids from W before any update, natural groups (matters with desc_act)
    damp_percent: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    block_size: int = 128  # columns per lazy batch update
    mse: bool = False  # shrink each grid's range to minimise the MSE_NORM error (see MSE_* above)
    # sym grids always span [-max |w|, max |w|] (compressed-tensors' min-max grid); False keeps AutoGPTQ's quirk
    # of xmin = 0 for a group without negative values
    full_sym_range: bool = False

    def __post_init__(self) -> None:
        for name in ("sym", "desc_act", "static_groups", "mse", "full_sym_range"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"GPTQ {name} must be true or false, got {getattr(self, name)!r}")
        if _not_int(self.bits) or self.bits not in BITS:
            raise ConfigError(f"GPTQ bits must be one of {', '.join(map(str, BITS))}; got {self.bits!r}")
        if _not_int(self.group_size) or (self.group_size != -1 and self.group_size <= 0):
            raise ConfigError(f"GPTQ group_size must be -1 (one group per output row) or a positive number of "
                              f"input columns such as 32, 64 or 128; got {self.group_size!r}")
        if (isinstance(self.damp_percent, bool) or not isinstance(self.damp_percent, int | float)
                or not 0 < self.damp_percent < 1):
            raise ConfigError(f"GPTQ damp_percent must be between 0 and 1 (a fraction of the Hessian's mean "
                              f"diagonal, e.g. 0.01); got {self.damp_percent!r}")
        if _not_int(self.block_size) or self.block_size <= 0:
            raise ConfigError(f"GPTQ block_size must be a positive number of columns (128 as the references); "
                              f"got {self.block_size!r}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def group_width(self, columns: int) -> int:
        return columns if self.group_size == -1 else self.group_size


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


@dataclass
class GPTQResult:
    """A quantized [out, in] weight; every tensor on W's device.

    Storage (FORMATS.md §5.1-5.3): qweight packs `q.T` along the input dim; scales are stored `scales.T.half()`
    ([G, N] float16); qzeros packs `zeros.T` along the output dim, minus 1 for checkpoint_format "gptq" (v1), as is
    for "gptq_v2"; g_idx is stored as is. Take q from here: it is exact, whereas AutoGPTQ re-derives it from the
    float weight and the fp16 scales. A runtime dequantizes with the fp16 scales, so its weight differs from w_hat
    by the scales' fp16 rounding (relative 2^-11); a scale below fp16's smallest subnormal (6e-8) would store as 0."""

    q: torch.Tensor  # int32 [out, in], codes 0..maxq in original column order
    scales: torch.Tensor  # float32 [out, n_groups]
    zeros: torch.Tensor  # int32 [out, n_groups]: true zero points (sym: 2^(bits-1))
    g_idx: torch.Tensor  # int32 [in]: group of each input column
    w_hat: torch.Tensor  # float32 [out, in] = dequantize(q, scales, zeros, g_idx)
    # GPTQ: sum over all weights of (w - w_hat)^2 / U[i, i]^2 / 2 (U: upper Cholesky factor of H^-1), the references'
    # loss; it scales with H, so with HessianAccumulator's sample count. RTN: None
    loss: float | None
    damp_percent: float | None  # damping actually used (config's, or raised by retries); RTN: None
    damp_retries: int = 0  # how many times the damped Cholesky failed before one succeeded


class HessianAccumulator:
    """H = 2/n * sum(x x^T) over a Linear's calibration inputs, in float32 on `device`, accumulated batch by batch
    as the references do (running average: H *= n / (n + m); x *= sqrt(2 / (n + m)); H += x^T x)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor, samples: int | None = None) -> None:
        """Add the inputs x [..., in] of one forward. `samples` is what the batch counts towards n; by default
        AutoGPTQ's count: the batch dimension of a 3-D [batch, seq, in] input, 1 for a 2-D [tokens, in] one. Pass
        the token count to average per token as GPTQModel does (the scale of H changes the reported loss only;
        damping is relative). A batch without rows (an MoE expert no token was routed to) changes nothing."""
        columns = self.H.shape[0]
        if x.shape[-1] != columns:
            raise ValueError(f"Hessian of {columns} columns got inputs of shape {list(x.shape)}")
        if samples is None:
            samples = x.shape[0] if x.dim() == 3 else 1
        rows = x.reshape(-1, columns)
        if rows.shape[0] == 0 or samples == 0:
            return
        self.H *= self.n / (self.n + samples)
        self.n += samples
        rows = math.sqrt(2 / self.n) * rows.to(device=self.H.device, dtype=torch.float32)
        self.H += rows.T @ rows


def find_params(x: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each row of x [rows, cols]: scale and zero point [rows, 1], float32 (the zero an integer)."""
    maxq = config.maxq
    xmin = x.amin(1).clamp(max=0)
    xmax = x.amax(1).clamp(min=0)
    if config.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax if config.full_sym_range else torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if config.sym else torch.round(-xmin / scale)
    if config.mse:
        best = torch.full_like(scale, math.inf)
        for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
            p = 1 - i / MSE_GRID
            xmin1, xmax1 = p * xmin, p * xmax
            scale1 = (xmax1 - xmin1) / maxq
            zero1 = zero if config.sym else torch.round(-xmin1 / scale1)
            err = (_fake_quantize(x, scale1[:, None], zero1[:, None], maxq) - x).abs_().pow_(MSE_NORM).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, scale1, scale)
            zero = torch.where(better, zero1, zero)
    return scale[:, None], zero[:, None]


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return scale * (_codes(x, scale, zero, maxq) - zero)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """What a GPTQ runtime computes: w[:, k] = scales[:, g_idx[k]] * (q[:, k] - zeros[:, g_idx[k]])."""
    g = g_idx.long()
    return scales[:, g] * (q.to(torch.float32) - zeros[:, g].to(torch.float32))


def _group_params(W: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids of consecutive column groups (the last one may be short): scales, zeros [rows, n_groups]."""
    rows, columns = W.shape
    width = config.group_width(columns)
    full = columns // width * width
    parts = []
    if full:  # all full groups of all rows in one [rows * groups, width] call
        s, z = find_params(W[:, :full].reshape(rows * (full // width), width), config)
        parts.append((s.reshape(rows, -1), z.reshape(rows, -1)))
    if full < columns:
        parts.append(find_params(W[:, full:], config))
    return torch.cat([s for s, _ in parts], 1), torch.cat([z for _, z in parts], 1)


def _result(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, loss: float | None,
            damp_percent: float | None, damp_retries: int) -> GPTQResult:
    return GPTQResult(q=q.to(torch.int32), scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx,
                      w_hat=dequantize(q, scales, zeros, g_idx), loss=loss, damp_percent=damp_percent,
                      damp_retries=damp_retries)


def _check_weight(W: torch.Tensor) -> torch.Tensor:
    if W.dim() != 2:
        raise ValueError(f"GPTQ quantizes 2-D [out, in] weights, got shape {list(W.shape)}")
    W = W.detach().to(torch.float32, copy=True)
    if not torch.isfinite(W).all():
        raise QuantkitError("the weight to quantize holds NaN or infinite values; the checkpoint is damaged or was "
                            "not dequantized correctly")
    return W


@torch.no_grad()
def rtn_quantize(W: torch.Tensor, config: GPTQConfig) -> GPTQResult:
    """Round-to-nearest on the same grids as gptq_quantize, groups in natural column order (desc_act, static_groups,
    damp_percent and block_size have no meaning without a Hessian). The baseline GPTQ must beat, and the fallback
    for a Linear without usable calibration (an MoE expert that saw too few tokens)."""
    W = _check_weight(W)
    columns = W.shape[1]
    scales, zeros = _group_params(W, config)
    g_idx = torch.arange(columns, device=W.device) // config.group_width(columns)
    q = _codes(W, scales[:, g_idx], zeros[:, g_idx], config.maxq)
    return _result(q, scales, zeros, g_idx.to(torch.int32), None, None, 0)


def inverse_cholesky(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp * I)^-1, damp = damp_percent * mean(diag(H)), retrying with more damping
    while either factorisation fails. Returns the factor, the damp_percent used and the number of retries."""
    mean = torch.diagonal(H).mean()
    if not mean > 0:  # also catches NaN
        raise QuantkitError(f"GPTQ cannot use this Hessian: its mean diagonal is {mean.item():g} (a sum of squared "
                            f"inputs must be positive); the calibration inputs were empty or corrupt")
    percent = damp_percent
    for retry in range(DAMP_RETRIES + 1):
        damped = H.clone()
        torch.diagonal(damped).add_(percent * mean)
        L, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                if retry:
                    log.warning("GPTQ: Hessian not positive definite with damp_percent %g; used %g (%d retries)",
                                damp_percent, percent, retry)
                return U, percent, retry
        percent *= DAMP_GROWTH
    raise QuantkitError(f"GPTQ cannot use this Hessian: it is not positive definite even with damp_percent "
                        f"{percent / DAMP_GROWTH:g} ({DAMP_RETRIES} retries from {damp_percent:g}); recollect the "
                        f"calibration statistics, or quantize this layer with round-to-nearest")


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, config: GPTQConfig) -> GPTQResult:
    """GPTQ of W [out, in] given the Hessian H [in, in] of its inputs (HessianAccumulator.H); computed on W's device.

    g_idx and q are in original column order. Without static_groups, act-order groups are runs of gs columns in
    the permuted order: scales[:, k] belongs to permuted positions k*gs..(k+1)*gs-1 and g_idx[c] is the position of
    column c // gs. With static_groups, groups are natural (g_idx[c] = c // gs) and found before any update.

    A Hessian whose damped Cholesky fails is retried with damp_percent x10 (DAMP_RETRIES times; damp_retries and a
    warning say so). QuantkitError if that never works, if H is not finite or has no positive mean diagonal, or if H
    is all zero (no calibration input reached the layer: the references would zero the whole weight; use
    rtn_quantize)."""
    W = _check_weight(W)
    columns = W.shape[1]
    if H.shape != (columns, columns):
        raise ValueError(f"Hessian of shape {list(H.shape)} for a weight with {columns} input columns")
    H = H.detach().to(device=W.device, dtype=torch.float32, copy=True)
    if not torch.isfinite(H).all():
        raise QuantkitError("GPTQ cannot use this Hessian: it holds NaN or infinite values (calibration inputs "
                            "overflowed or were corrupt)")
    maxq, width = config.maxq, config.group_width(columns)
    grouped = config.group_size != -1
    static = grouped and config.static_groups

    if not grouped:
        scales, zeros = find_params(W, config)
    dead = torch.diagonal(H) == 0  # inputs that were always zero: any weight works, 0 is the one to keep
    if dead.all():
        raise QuantkitError("GPTQ cannot use an all-zero Hessian (no calibration input reached this layer; GPTQ would "
                            "zero the whole weight): quantize it with round-to-nearest instead")
    torch.diagonal(H)[dead] = 1
    W[:, dead] = 0
    if static:
        scales, zeros = _group_params(W, config)

    perm = None
    if config.desc_act:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp_percent, retries = inverse_cholesky(H, config.damp_percent)
    del H

    # the group (column of scales/zeros) each permuted position uses
    position = torch.arange(columns, device=W.device)
    group_of = (perm if static and perm is not None else position) // width
    groups = group_of.tolist()
    q = torch.empty_like(W)
    column_loss = torch.empty(columns, dtype=torch.float32, device=W.device)
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i1 in range(0, columns, config.block_size):
        i2 = min(i1 + config.block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if grouped and not static:
                if j % width == 0:
                    found.append(find_params(W[:, j:j + width], config))  # outer W: see the module docstring
                scale, zero = found[-1]
            elif grouped:
                scale, zero = scales[:, groups[j], None], zeros[:, groups[j], None]
            else:
                scale, zero = scales, zeros
            w = W1[:, i, None]
            qj = _codes(w, scale, zero, maxq)
            err = (w - scale * (qj - zero))[:, 0]
            d = Hinv1[i, i]
            column_loss[j] = (err ** 2 / d ** 2).sum() / 2
            err /= d
            W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
            q[:, j] = qj[:, 0]
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if grouped and not static:
        scales = torch.cat([s for s, _ in found], 1)
        zeros = torch.cat([z for _, z in found], 1)
    g_idx = group_of if grouped else torch.zeros_like(position)
    if perm is not None:
        invperm = torch.argsort(perm)
        q, g_idx = q[:, invperm], g_idx[invperm]
    return _result(q, scales, zeros, g_idx.to(torch.int32), column_loss.double().sum().item(), damp_percent, retries)
