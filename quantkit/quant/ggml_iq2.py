"""ggml's 2-bit grid i-quants IQ2_XXS (2.06 bpw), IQ2_XS (2.31 bpw) and IQ2_S (2.56 bpw): each 8 weights are one
point of a fixed grid of level vectors (levels 1, 3, 5, stored as bytes 0x08, 0x19, 0x2b) times a sign per
weight, scaled per 32- or 16-element sub-block by d * (0.5 + 4-bit scale) / 4. Layouts: ggml-common.h
`block_iq2_xxs`, `block_iq2_xs`, `block_iq2_s`.

Encoding is ggml's neighbour search (quantize_row_iq2_*_impl in ggml-quants.c), compiled only
(quantkit/quant/_ggml_iq2.c): scalar and branchy per 8 weights, nothing to vectorise in torch. Decoding is torch
table lookups, on any device. The grids are not restated here: they come from gguf-py (`gguf.quants.IQ2_XXS.grid`
and the like, the tables of ggml-common.h) and reach the C code as level indices through kernels.register_grid.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import quants as gguf_quants

from quantkit.quant import kernels
from quantkit.quant.codec import Codec, f16_from


@functools.cache
def grid_levels(name: str) -> np.ndarray:
    """The grid of ggml type `name` as level indices, uint8 [points, 8]: the position of each element's value in
    gguf-py's grid_map (for the 2-bit grids 0x08, 0x19, 0x2b; for IQ1's -1, 0, 1)."""
    table = getattr(gguf_quants, name)
    table.init_grid()
    values = np.asarray(table.grid, dtype=np.float32).reshape(table.grid_shape)
    levels = np.array(table.grid_map, dtype=np.float32)
    match = values[..., None] == levels
    if not match.any(-1).all():
        raise ValueError(f"gguf-py's {name} grid holds values outside its grid_map")
    return match.argmax(-1).astype(np.uint8)


@functools.cache
def grid_values(name: str, device: torch.device) -> torch.Tensor:
    """float32 [points, 8]: the grid's element values as ggml's dequantizers read them."""
    table = getattr(gguf_quants, name)
    values = np.array(table.grid_map, dtype=np.float32)[grid_levels(name)]
    return torch.from_numpy(values).to(device)


def _bits(v: torch.Tensor, width: int) -> torch.Tensor:
    """Integer tensor [...] -> its low `width` bits [..., width], bit 0 first."""
    return (v[..., None] >> torch.arange(width, device=v.device)) & 1


def u16(data: torch.Tensor) -> torch.Tensor:
    """Little-endian bytes [..., 2k] -> int64 [..., k]."""
    b = data.to(torch.int64)
    return b[..., 0::2] | (b[..., 1::2] << 8)


def _nibbles(data: torch.Tensor) -> torch.Tensor:
    """[blocks, k] bytes -> int64 [blocks, 2k]: low nibble of byte i at 2i, high nibble at 2i + 1."""
    b = data.to(torch.int64)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(b.shape[0], -1)


def _decode(name: str, d: torch.Tensor, sub_scales: torch.Tensor, index: torch.Tensor,
            negative: torch.Tensor) -> torch.Tensor:
    """d [blocks, 1] fp16 scale, sub_scales [blocks, S] 4-bit, index [blocks, 32] grid points, negative
    [blocks, 32, 8] sign bits -> float32 [blocks, 256]: d * (0.5 + s) * 0.25 * grid value * sign."""
    db = d * (sub_scales.to(torch.float32) + 0.5) * 0.25  # [blocks, S]
    db = db.repeat_interleave(32 // sub_scales.shape[1], dim=1)  # one per group of 8
    grid = grid_values(name, index.device)[index]  # [blocks, 32, 8]
    y = db[..., None] * grid
    return torch.where(negative.bool(), -y, y).reshape(-1, 256)


def _with_parity(bits7: torch.Tensor) -> torch.Tensor:
    """7 stored sign bits -> all 8 (ggml's ksigns_iq2xs: the 8th makes the count of negatives even)."""
    bits = _bits(bits7, 7)
    return torch.cat((bits, bits.sum(-1, keepdim=True) & 1), dim=-1)


class IQ2_XXS(Codec):
    name, type_id, block_size, block_bytes = "IQ2_XXS", 16, 256, 66
    kernel_only = requires_importance = True

    @classmethod
    def decode_blocks(cls, data):
        d = f16_from(data[:, :2])
        q = data[:, 2:].reshape(-1, 8, 8)  # per 32 weights: 4 grid-index bytes, then a uint32 of signs + scale
        aux = u16(q[..., 4:])
        aux = aux[..., 0] | (aux[..., 1] << 16)  # [blocks, 8]
        index = q[..., :4].to(torch.int64).reshape(-1, 32)
        signs = (aux[..., None] >> (7 * torch.arange(4, device=data.device))) & 127  # [blocks, 8, 4]
        return _decode(cls.name, d, aux >> 28, index, _with_parity(signs).reshape(-1, 32, 8))


class IQ2_XS(Codec):
    name, type_id, block_size, block_bytes = "IQ2_XS", 17, 256, 74
    kernel_only = requires_importance = True

    @classmethod
    def decode_blocks(cls, data):
        d = f16_from(data[:, :2])
        q = u16(data[:, 2:66])  # [blocks, 32]: 9-bit grid index | 7 sign bits << 9
        return _decode(cls.name, d, _nibbles(data[:, 66:74]), q & 511, _with_parity(q >> 9))


class IQ2_S(Codec):
    name, type_id, block_size, block_bytes = "IQ2_S", 22, 256, 82
    kernel_only = True  # without importance ggml weights by 0.25*sigma2 + x*x

    @classmethod
    def decode_blocks(cls, data):
        d = f16_from(data[:, :2])
        qh = data[:, 66:74].to(torch.int64).repeat_interleave(4, dim=1)  # [blocks, 32]: 2 bits per group
        shift = 2 * torch.arange(32, device=data.device) % 8
        index = data[:, 2:34].to(torch.int64) | (((qh >> shift) & 3) << 8)
        negative = _bits(data[:, 34:66].to(torch.int64), 8)
        return _decode(cls.name, d, _nibbles(data[:, 74:82]), index, negative)


for _codec in (IQ2_XXS, IQ2_XS, IQ2_S):
    kernels.register_grid(_codec.type_id, functools.partial(grid_levels, _codec.name))
