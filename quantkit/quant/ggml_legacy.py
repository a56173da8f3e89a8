"""ggml's legacy 32-element block types, bit-exact with the reference quantizers in ggml-quants.c
(`quantize_row_q{4_0,4_1,5_0,5_1,8_0}_ref`; layouts: ggml-common.h). The scale is chosen in float32 and
stored as fp16; q is computed with the float32 scale, exactly as the C code does."""

from __future__ import annotations

import torch

from quantkit.quant.codec import (
    Codec,
    f16_bytes,
    f16_from,
    pack_bits_le,
    pack_nibbles,
    round_half_away,
    unpack_bits_le,
    unpack_nibbles,
)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d.where(d != 0, torch.ones_like(d)))


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude with its sign; the first one on ties, as ggml's strict `<` loop."""
    return blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))


def _offset_quants(blocks: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 (half 8) / Q5_0 (half 16): d = signed absmax / -half, q = trunc(x / d + half + 0.5)."""
    d = _signed_absmax(blocks) / -half
    q = (blocks * _inverse(d) + (half + 0.5)).trunc().clamp(max=2 * half - 1)
    return d, q.to(torch.uint8)


def _min_quants(blocks: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 (top 15) / Q5_1 (top 31): d = (max - min) / top, q = trunc((x - min) / d + 0.5)."""
    lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    d = (hi - lo) / top
    # ggml clamps Q4_1 but not Q5_1; (x - min) / d + 0.5 stays below top + 1, so the clamp never binds.
    q = ((blocks - lo) * _inverse(d) + 0.5).trunc().clamp(max=top)
    return d, lo, q.to(torch.uint8)


def _pack5(q: torch.Tensor) -> torch.Tensor:
    """5-bit values -> qh (the 5th bits, 4 bytes LE) followed by qs (low nibbles)."""
    return torch.cat((pack_bits_le(q >> 4), pack_nibbles(q & 0x0F)), dim=1)


def _unpack5(packed: torch.Tensor) -> torch.Tensor:
    return (unpack_nibbles(packed[:, 4:]) | (unpack_bits_le(packed[:, :4]) << 4)).to(torch.float32)


class Q8_0(Codec):
    name, type_id, block_size, block_bytes = "Q8_0", 8, 32, 34

    @classmethod
    def encode_blocks(cls, blocks):
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        q = round_half_away(blocks * _inverse(d)).to(torch.int8)
        return torch.cat((f16_bytes(d), q.view(torch.uint8)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * data[:, 2:].contiguous().view(torch.int8).to(torch.float32)


class Q4_0(Codec):
    name, type_id, block_size, block_bytes = "Q4_0", 2, 32, 18

    @classmethod
    def encode_blocks(cls, blocks):
        d, q = _offset_quants(blocks, 8)
        return torch.cat((f16_bytes(d), pack_nibbles(q)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * (unpack_nibbles(data[:, 2:]).to(torch.float32) - 8)


class Q4_1(Codec):
    name, type_id, block_size, block_bytes = "Q4_1", 3, 32, 20

    @classmethod
    def encode_blocks(cls, blocks):
        d, lo, q = _min_quants(blocks, 15)
        return torch.cat((f16_bytes(d), f16_bytes(lo), pack_nibbles(q)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * unpack_nibbles(data[:, 4:]).to(torch.float32) + f16_from(data[:, 2:4])


class Q5_0(Codec):
    name, type_id, block_size, block_bytes = "Q5_0", 6, 32, 22

    @classmethod
    def encode_blocks(cls, blocks):
        d, q = _offset_quants(blocks, 16)
        return torch.cat((f16_bytes(d), _pack5(q)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * (_unpack5(data[:, 2:]) - 16)


class Q5_1(Codec):
    name, type_id, block_size, block_bytes = "Q5_1", 7, 32, 24

    @classmethod
    def encode_blocks(cls, blocks):
        d, lo, q = _min_quants(blocks, 31)
        return torch.cat((f16_bytes(d), f16_bytes(lo), _pack5(q)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * _unpack5(data[:, 4:]) + f16_from(data[:, 2:4])
