"""GPTQ inside ggml's blocks: tensors of plain llama.cpp types whose levels are chosen with GPTQ's error feedback
instead of each rounded to its nearest.

Given the Hessian H of the tensor's inputs, GPTQ (Frantar et al., 2022) rounds one input column at a time and moves
the rounding error onto the columns not yet rounded so as to minimise the layer's output error. For types with
per-element levels under block headers (scales, mins), the columns go in act-order (descending H diagonal) under
fixed headers, as GPTQ's act-order with static groups: the headers are first ggml's own search over the weights
(with the importance vector, as llama-quantize would), then, HEADER_REFITS times, ggml's search over the values
GPTQ actually rounded in the previous pass (the weights plus the feedback they had received), each row keeping the
pass with the lowest output error. The output is ggml's block layout with other headers and levels, so every
llama.cpp build reads it; it is not byte-identical to llama-quantize's (that is the point).

Measured on tiny-deepseek's linears with their calibration Hessians (32 x 512 tokens), the output error relative
to an in-order pass that searches each block's headers when it reaches it, geometric mean over tensors by type:
act-order alone x0.65-0.74, with two refits x0.55-0.68 (a third changes it by under 1%); attention and the first
layer gain most (down to x0.08), routed experts least (about x0.9); the 32-column legacy types and IQ4_NL lose up
to 2% on a few tensors.

Types without per-element levels (the grid i-quants IQ1..IQ3) are encoded a block at a time in natural order by
ggml's search, and the block's joint error is fed forward exactly: with U the upper Cholesky factor of H^-1,
rounding columns Q together to W_Q - E leaves the rest the update -E U_QQ^-1 U_QR.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.codec import Codec
from quantkit.quant.gptq import inverse_cholesky

DEFAULT_DAMP_PERCENT = 0.01
HEADER_REFITS = 2
# names the encoding in the keys of what is stored from it (calibration spools, sensitivity measurements)
ENCODING = f"act-order, static headers, {HEADER_REFITS} header refits"
_LAZY_COLUMNS = 128  # columns whose feedback is applied to the rest at once (GPTQ's lazy batch update)


def supports(codec: type[Codec]) -> bool:
    """Whether GPTQ can choose this type's levels (else it only feeds whole blocks' errors forward)."""
    return codec.level_values is not None


@torch.no_grad()
def gptq_encode(codec: type[Codec], W: torch.Tensor, H: torch.Tensor, importance: torch.Tensor | None = None,
                damp_percent: float = DEFAULT_DAMP_PERCENT, header_refits: int = HEADER_REFITS) -> torch.Tensor:
    """W [out, in] float -> uint8 [out, in / block_size * block_bytes], ggml's layout of `codec`. H [in, in]: the
    Hessian of W's inputs (quantkit.quant.gptq.HessianAccumulator.H). `importance` [in]: what ggml's search weights
    the block headers with (the imatrix entry); None: H's diagonal, the same statistic up to scale. Inputs that
    were always zero get weight 0 (they never reach the output). `header_refits`: searches of the headers over the
    values the previous pass rounded (0: ggml's headers of W)."""
    rows, columns = W.shape
    if columns % codec.block_size:
        raise QuantkitError(f"{codec.name} needs rows whose length is a multiple of {codec.block_size}; got {columns}")
    if H.shape != (columns, columns):
        raise ValueError(f"Hessian of shape {list(H.shape)} for a weight with {columns} input columns")
    W = W.detach().to(torch.float32, copy=True)
    H = H.detach().to(device=W.device, dtype=torch.float32, copy=True)
    if not (torch.isfinite(W).all() and torch.isfinite(H).all()):
        raise QuantkitError(f"{codec.name} with GPTQ: the weight or its Hessian holds NaN or infinite values")
    dead = torch.diagonal(H) == 0
    if importance is None:
        importance = torch.diagonal(H).clone()
    importance = importance.to(device=W.device, dtype=torch.float32)
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True)  # act-order, dead inputs last
    torch.diagonal(H)[dead] = 1
    W[:, dead] = 0
    if not supports(codec):
        U, _, _ = inverse_cholesky(H, damp_percent)
        return _grid_blocks(codec, W, U, importance)
    U, _, _ = inverse_cholesky(H[order][:, order], damp_percent)
    del H
    data = codec.encode(W, importance).reshape(rows, -1)
    data, loss, rounded = _act_order_pass(codec, W, U, order, data)
    for _ in range(header_refits):
        refit, refit_loss, refit_rounded = _act_order_pass(codec, W, U, order,
                                                           codec.encode(rounded, importance).reshape(rows, -1))
        better = refit_loss < loss
        data = torch.where(better[:, None], refit, data)
        loss = torch.where(better, refit_loss, loss)
        rounded = torch.where(better[:, None], refit_rounded, rounded)
    return data


def _act_order_pass(codec, W: torch.Tensor, U: torch.Tensor, order: torch.Tensor, data: torch.Tensor):
    """GPTQ over W's columns in `order` under data's headers (U: the factor of the permuted Hessian). Returns the
    data with the chosen levels, each row's output error (GPTQ's loss: the sum of its squared scaled errors) and
    the values each element had when rounded (natural order)."""
    rows, columns = W.shape
    blocks = data.reshape(rows * (columns // codec.block_size), -1)
    scale, offset, levels = (t.reshape(rows, columns)[:, order] for t in codec.levels(blocks))
    levels = levels.clone()
    values = torch.tensor(codec.level_values, dtype=torch.float32, device=W.device)
    midpoints = (values[1:] + values[:-1]) / 2
    work = W[:, order]
    rounded = torch.empty_like(work)
    loss = torch.zeros(rows, dtype=torch.float32, device=W.device)
    for c0 in range(0, columns, _LAZY_COLUMNS):
        c1 = min(c0 + _LAZY_COLUMNS, columns)
        batch, U_batch = work[:, c0:c1], U[c0:c1, c0:c1]
        feedback = torch.empty_like(batch)
        for j in range(c1 - c0):
            i = c0 + j
            w, s, o = batch[:, j], scale[:, i], offset[:, i]
            usable = s != 0  # a zero scale: every level decodes to the offset; keep the search's
            nearest = torch.bucketize((w - o) / torch.where(usable, s, 1), midpoints)
            levels[:, i] = torch.where(usable, nearest, levels[:, i])
            rounded[:, i] = w
            err = (w - (s * values[levels[:, i]] + o)) / U_batch[j, j]
            batch[:, j:] -= torch.outer(err, U_batch[j, j:])
            feedback[:, j] = err
        work[:, c1:] -= feedback @ U[c0:c1, c1:]
        loss += feedback.pow(2).sum(1)
    inverse = torch.argsort(order)
    levels = levels[:, inverse].reshape(blocks.shape[0], codec.block_size)
    return codec.with_levels(blocks, levels).reshape(rows, -1), loss, rounded[:, inverse]


def _grid_blocks(codec, W: torch.Tensor, U: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Blocks in natural order, each ggml's encoding of the fed-back weights, its joint error fed forward."""
    rows, columns = W.shape
    width = codec.block_size
    encoded = []
    for b0 in range(0, columns, width):
        b1 = b0 + width
        block = W[:, b0:b1]
        data = codec.encode(block, importance[b0:b1]).reshape(rows, -1)
        error = block - codec.decode_blocks(data.reshape(rows * (width // codec.block_size), -1)).reshape(rows, width)
        feedback = torch.linalg.solve_triangular(U[b0:b1, b0:b1], error, upper=True, left=False)
        W[:, b1:] -= feedback @ U[b0:b1, b1:]
        encoded.append(data)
    return torch.cat(encoded, dim=1)
