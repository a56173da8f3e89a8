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
        d = _signed_absmax(blocks) / -8
        q = (blocks * _inverse(d) + 8.5).trunc().clamp(max=15)
        return torch.cat((f16_bytes(d), pack_nibbles(q)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * (unpack_nibbles(data[:, 2:]).to(torch.float32) - 8)


class Q4_1(Codec):
    name, type_id, block_size, block_bytes = "Q4_1", 3, 32, 20

    @classmethod
    def encode_blocks(cls, blocks):
        lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
        d = (hi - lo) / 15
        q = ((blocks - lo) * _inverse(d) + 0.5).trunc().clamp(max=15)
        return torch.cat((f16_bytes(d), f16_bytes(lo), pack_nibbles(q)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * unpack_nibbles(data[:, 4:]).to(torch.float32) + f16_from(data[:, 2:4])


class Q5_0(Codec):
    name, type_id, block_size, block_bytes = "Q5_0", 6, 32, 22

    @classmethod
    def encode_blocks(cls, blocks):
        d = _signed_absmax(blocks) / -16
        q = (blocks * _inverse(d) + 16.5).trunc().clamp(max=31).to(torch.uint8)
        return torch.cat((f16_bytes(d), pack_bits_le(q >> 4), pack_nibbles(q & 0x0F)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        q = unpack_nibbles(data[:, 6:]) | (unpack_bits_le(data[:, 2:6]) << 4)
        return f16_from(data[:, :2]) * (q.to(torch.float32) - 16)


class Q5_1(Codec):
    name, type_id, block_size, block_bytes = "Q5_1", 7, 32, 24

    @classmethod
    def encode_blocks(cls, blocks):
        lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
        d = (hi - lo) / 31
        q = ((blocks - lo) * _inverse(d) + 0.5).trunc().to(torch.uint8)  # the C code does not clamp here
        return torch.cat((f16_bytes(d), f16_bytes(lo), pack_bits_le(q >> 4), pack_nibbles(q & 0x0F)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        q = unpack_nibbles(data[:, 8:]) | (unpack_bits_le(data[:, 4:8]) << 4)
        return f16_from(data[:, :2]) * q.to(torch.float32) + f16_from(data[:, 2:4])
