"""Bit packing of integer codes into int32 words, shared by the GPTQ and AWQ layouts (FORMATS.md §5.2, §6.1)."""

from __future__ import annotations

import torch


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack codes 0..2^bits-1 along `dim` into int32 words: value i of the dim at bit i*bits of the little-endian
    bit stream of the words (the smallest index in the least significant bits; 3-bit values straddle words as
    AutoGPTQ's 3-word scheme does). The dim's length times `bits` must be a multiple of 32."""
    v = values.movedim(dim, -1).to(torch.int64)
    length = v.shape[-1]
    if length * bits % 32:
        raise ValueError(f"{length} {bits}-bit values do not fill whole 32-bit words")
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64, device=v.device) * bits
        words = (v.reshape(*v.shape[:-1], length // per, per) << shifts).sum(-1)
    else:
        weights = 1 << torch.arange(bits, dtype=torch.int64, device=v.device)
        stream = (v.unsqueeze(-1) // weights) % 2  # [..., length, bits], LSB first
        stream = stream.reshape(*v.shape[:-1], length * bits // 32, 32)
        words = (stream << torch.arange(32, dtype=torch.int64, device=v.device)).sum(-1)
    return to_int32(words).movedim(-1, dim)


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of pack: int32 codes along `dim`."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:
        shifts = torch.arange(32 // bits, dtype=torch.int64, device=w.device) * bits
        values = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)
    else:
        stream = (w.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64, device=w.device)) & 1
        stream = stream.flatten(-2).reshape(*w.shape[:-1], -1, bits)
        values = (stream << torch.arange(bits, dtype=torch.int64, device=w.device)).sum(-1)
    return values.to(torch.int32).movedim(-1, dim)
