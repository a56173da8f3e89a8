"""GPTQ inside ggml's blocks: tensors of plain llama.cpp types whose levels are chosen with GPTQ's error feedback
instead of each rounded to its nearest.

ggml's encoders pick each block's header (scales, mins) by a search over the block's weights, then round every
element to its nearest level. Given the Hessian H of the tensor's inputs, GPTQ (Frantar et al., 2022) rounds one
input column at a time and moves the rounding error onto the columns not yet rounded so as to minimise the
layer's output error. Here the blocks of `block_size` input columns are taken in order: ggml's own search picks a
block's headers from the columns as they stand after the earlier blocks' feedback (with the importance vector,
as llama-quantize would), then each column of the block is rounded to its nearest level under those headers and
its error fed forward, within the block and beyond it. The output is ggml's block layout with other levels, so
every llama.cpp build reads it; it is not byte-identical to llama-quantize's (that is the point).

Types without per-element levels (the grid i-quants IQ1..IQ3) are encoded a block at a time by ggml's search,
and the block's joint error is fed forward exactly: with U the upper Cholesky factor of H^-1, rounding columns Q
together to W_Q - E leaves the rest the update -E U_QQ^-1 U_QR.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.codec import Codec
from quantkit.quant.gptq import inverse_cholesky

DEFAULT_DAMP_PERCENT = 0.01


def supports(codec: type[Codec]) -> bool:
    """Whether GPTQ can choose this type's levels (else it only feeds whole blocks' errors forward)."""
    return codec.level_values is not None


@torch.no_grad()
def gptq_encode(codec: type[Codec], W: torch.Tensor, H: torch.Tensor, importance: torch.Tensor | None = None,
                damp_percent: float = DEFAULT_DAMP_PERCENT) -> torch.Tensor:
    """W [out, in] float -> uint8 [out, in / block_size * block_bytes], ggml's layout of `codec`. H [in, in]: the
    Hessian of W's inputs (quantkit.quant.gptq.HessianAccumulator.H). `importance` [in]: what ggml's search weights
    the block headers with (the imatrix entry); None: H's diagonal, the same statistic up to scale. Inputs that
    were always zero get weight 0 (they never reach the output)."""
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
    torch.diagonal(H)[dead] = 1
    W[:, dead] = 0
    U, _, _ = inverse_cholesky(H, damp_percent)
    del H
    values = None
    if supports(codec):
        values = torch.tensor(codec.level_values, dtype=torch.float32, device=W.device)
        midpoints = (values[1:] + values[:-1]) / 2
    width = codec.block_size
    encoded = []
    for b0 in range(0, columns, width):
        b1 = b0 + width
        block = W[:, b0:b1].clone()
        data = codec.encode(block, importance[b0:b1]).reshape(rows * (width // codec.block_size), -1)
        U_block = U[b0:b1, b0:b1]
        if values is None:
            error = block - codec.decode_blocks(data).reshape(rows, width)
            feedback = torch.linalg.solve_triangular(U_block, error, upper=True, left=False)
        else:
            scale, offset, levels = (t.reshape(rows, width) for t in codec.levels(data))
            levels = levels.clone()
            feedback = torch.empty_like(block)
            for i in range(width):
                w, s, o = block[:, i], scale[:, i], offset[:, i]
                usable = s != 0  # a zero scale: every level decodes to the offset; keep the search's
                nearest = torch.bucketize((w - o) / torch.where(usable, s, 1), midpoints)
                levels[:, i] = torch.where(usable, nearest, levels[:, i])
                err = (w - (s * values[levels[:, i]] + o)) / U_block[i, i]
                block[:, i:] -= torch.outer(err, U_block[i, i:])
                feedback[:, i] = err
            data = codec.with_levels(data, levels.reshape(data.shape[0], codec.block_size))
        W[:, b1:] -= feedback @ U[b0:b1, b1:]
        encoded.append(data.reshape(rows, -1))
    return torch.cat(encoded, dim=1)
