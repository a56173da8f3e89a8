"""ggml's 3-bit lattice types IQ3_XXS (3.0625 bpw) and IQ3_S (3.4375 bpw): 256-value super-blocks of eight
32-value sub-blocks, each group of 4 magnitudes one point of a lattice (gguf-py's grids, as for the IQ2 types:
ggml_iq2.grid_levels), signs and a 4-bit sub-block scale beside it. Layouts: ggml-common.h `block_iq3_xxs`,
`block_iq3_s`.

Encoding is the compiled kernels' only (quantkit/quant/_ggml_iq3.c, byte-exact with quantize_iq3_xxs /
quantize_iq3_s, with and without importance: both fall back to weights x^2 without one); decoding is torch,
equal to gguf-py's dequantizers (and ggml's dequantize_row_iq3_*) on any device."""

from __future__ import annotations

import functools

import torch

from quantkit.quant import kernels
from quantkit.quant.codec import Codec, f16_from, unpack_bits_le
from quantkit.quant.ggml_iq2 import grid_levels, grid_values

SUB = 32  # values per sub-block scale


def _le32(data: torch.Tensor) -> torch.Tensor:
    """[blocks, 4k] bytes -> int64 [blocks, k] little-endian 32-bit words."""
    b = data.to(torch.int64).reshape(data.shape[0], -1, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


class IQ3_XXS(Codec):
    name, type_id, block_size, block_bytes = "IQ3_XXS", 18, 256, 98
    kernel_only = True

    @classmethod
    def decode_blocks(cls, data):
        grid = grid_values(cls.name, data.device)
        d = f16_from(data[:, :2])  # [blocks, 1]
        points = grid[data[:, 2:66].long()].reshape(-1, 8, SUB)  # [blocks, sub-blocks, 32]
        words = _le32(data[:, 66:98])  # [blocks, 8]: 4 x 7 sign bits, the 4-bit scale on top
        db = d * (0.5 + (words >> 28).to(torch.float32)) * 0.5
        # 7 stored sign bits per 8 values; the 8th makes their count even (ggml's ksigns_iq2xs)
        seven = (words[..., None] >> torch.arange(0, 28, 7, device=data.device)) & 127  # [blocks, 8, 4]
        parity = seven.clone()
        for shift in (4, 2, 1):
            parity ^= parity >> shift
        signs = (seven | ((parity & 1) << 7)).to(torch.uint8).reshape(-1, 32)
        sign = 1 - 2 * unpack_bits_le(signs).to(torch.float32).reshape(-1, 8, SUB)
        return (db[..., None] * points * sign).reshape(-1, cls.block_size)


class IQ3_S(Codec):
    name, type_id, block_size, block_bytes = "IQ3_S", 21, 256, 110
    kernel_only = True

    @classmethod
    def decode_blocks(cls, data):
        grid = grid_values(cls.name, data.device)
        d = f16_from(data[:, :2])
        high = unpack_bits_le(data[:, 66:74]).long()  # bit 8 of each point index
        points = grid[data[:, 2:66].long() | (high << 8)].reshape(-1, 8, SUB)
        nibbles = torch.stack((data[:, 106:110] & 0xF, data[:, 106:110] >> 4), dim=-1).reshape(-1, 8)
        db = d * (1 + 2 * nibbles.to(torch.float32))
        sign = 1 - 2 * unpack_bits_le(data[:, 74:106]).to(torch.float32).reshape(-1, 8, SUB)
        return (db[..., None] * points * sign).reshape(-1, cls.block_size)


for _codec in (IQ3_XXS, IQ3_S):
    kernels.register_grid(_codec.type_id, functools.partial(grid_levels, _codec.name))
