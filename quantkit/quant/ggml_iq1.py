"""ggml's 1-bit grid i-quants IQ1_S (1.56 bpw) and IQ1_M (1.75 bpw): each 8 weights are one point of a grid of
ternary vectors (-1, 0, 1), shifted by +-1/8 and scaled per 32-element (IQ1_S) or 16-element (IQ1_M)
sub-block by d * (2 * 3-bit scale + 1). Layouts: ggml-common.h `block_iq1_s`, `block_iq1_m`; IQ1_M has no
separate d: its fp16 bits sit in the top nibbles of the four scale words.

Encoding is ggml's exhaustive split search plus grid neighbours (quantize_row_iq1_s_impl / _m_impl), compiled
only (quantkit/quant/_ggml_iq2.c), with the grid from gguf-py as for the IQ2 types (ggml_iq2.grid_levels).
IQ1_S needs an importance vector (ggml asserts one); IQ1_M without one weights by x*x, as ggml does."""

from __future__ import annotations

import functools

import torch

from quantkit.quant import kernels
from quantkit.quant.codec import Codec, f16_from
from quantkit.quant.ggml_iq2 import grid_levels, grid_values, u16

DELTA = 0.125  # IQ1S_DELTA == IQ1M_DELTA


def _decode(name: str, dl: torch.Tensor, index: torch.Tensor, negative_shift: torch.Tensor) -> torch.Tensor:
    """dl [blocks, 32] per group of 8, index [blocks, 32] grid points, negative_shift [blocks, 32] -> float32
    [blocks, 256]: dl * (grid value + delta)."""
    delta = torch.where(negative_shift.bool(), -DELTA, DELTA).to(torch.float32)
    grid = grid_values(name, index.device)[index]  # [blocks, 32, 8]
    return (dl[..., None] * (grid + delta[..., None])).reshape(-1, 256)


class IQ1_S(Codec):
    name, type_id, block_size, block_bytes = "IQ1_S", 19, 256, 50
    kernel_only = requires_importance = True

    @classmethod
    def decode_blocks(cls, data):
        d = f16_from(data[:, :2])
        qh = u16(data[:, 34:50]).repeat_interleave(4, dim=1)  # [blocks, 32]: one word per 4 groups
        shift = 3 * (torch.arange(32, device=data.device) % 4)
        index = data[:, 2:34].to(torch.int64) | (((qh >> shift) & 7) << 8)
        dl = d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)
        return _decode(cls.name, dl, index, qh >> 15)


class IQ1_M(Codec):
    name, type_id, block_size, block_bytes = "IQ1_M", 29, 256, 56
    kernel_only = True

    @classmethod
    def decode_blocks(cls, data):
        sc = u16(data[:, 48:56])  # [blocks, 4]: 3-bit scales of sub-blocks 4i..4i+3, then a nibble of d's bits
        bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
        d = f16_from(torch.stack((bits & 0xFF, bits >> 8), dim=1).to(torch.uint8))
        sub = torch.arange(16, device=data.device)
        scale = (sc[:, sub // 4] >> 3 * (sub % 4)) & 7  # [blocks, 16]
        dl = (d * (2 * scale + 1).to(torch.float32)).repeat_interleave(2, dim=1)  # per group of 8
        qh = data[:, 32:48].to(torch.int64).repeat_interleave(2, dim=1)  # [blocks, 32]: a nibble per group
        qh = qh >> 4 * (torch.arange(32, device=data.device) % 2)
        index = data[:, :32].to(torch.int64) | ((qh & 7) << 8)
        return _decode(cls.name, dl, index, qh & 8)


for _codec in (IQ1_S, IQ1_M):
    kernels.register_grid(_codec.type_id, functools.partial(grid_levels, _codec.name))
