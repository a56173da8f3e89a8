"""DeepSeek-style block FP8: W[i, j] = float32(W_fp8[i, j]) * scale_inv[i // bo, j // bi].

The product of an fp8 value (4-bit significand) and a float32 scale is exact in float64, so this single
float32 multiply gives exactly the float64 result rounded to float32.
"""

from __future__ import annotations

import torch


def expected_scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    rows, cols = weight_shape
    return (-(-rows // block[0]), -(-cols // block[1]))


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Float32 weight from an fp8 weight and its per-block scales; ragged edge blocks are cropped.

    Works row-block by row-block on views, so the only temporary beyond the output is one row of scales
    expanded to the input width (no full-size scale tensor). A float32 `weight` is scaled in place.
    """
    rows, cols = weight.shape
    block_rows, block_cols = block
    out = weight.to(torch.float32)
    scale = scale_inv.to(device=out.device, dtype=torch.float32)
    column_scale = scale.repeat_interleave(block_cols, dim=1)[:, :cols]  # [row blocks, cols]
    full_rows = rows - rows % block_rows
    n_full = full_rows // block_rows
    if n_full:
        out[:full_rows].view(n_full, block_rows, cols).mul_(column_scale[:n_full, None, :])
    if full_rows < rows:
        out[full_rows:].mul_(column_scale[n_full])
    return out
