"""Unquantized ggml types: F32, F16 (IEEE round to nearest even) and BF16 (ggml's rounding, quiet NaNs)."""

from __future__ import annotations

import torch

from quantkit.quant.codec import Codec


class F32(Codec):
    name, type_id, block_size, block_bytes = "F32", 0, 1, 4

    @classmethod
    def encode_blocks(cls, blocks):
        return blocks.contiguous().view(torch.uint8)

    @classmethod
    def decode_blocks(cls, data):
        return data.contiguous().view(torch.float32)


class F16(Codec):
    name, type_id, block_size, block_bytes = "F16", 1, 1, 2

    @classmethod
    def encode_blocks(cls, blocks):
        return blocks.to(torch.float16).view(torch.uint8)

    @classmethod
    def decode_blocks(cls, data):
        return data.contiguous().view(torch.float16).to(torch.float32)


class BF16(Codec):
    name, type_id, block_size, block_bytes = "BF16", 30, 1, 2

    @classmethod
    def encode_blocks(cls, blocks):
        # ggml_compute_fp32_to_bf16: NaN -> quiet NaN; otherwise round to nearest even on the upper 16 bits.
        # torch's float32 -> bfloat16 cast rounds the same way and keeps NaNs NaN; set the quiet bit as ggml does.
        bits = blocks.contiguous().view(torch.int32)
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = blocks.to(torch.bfloat16).view(torch.int16)
        quiet_nan = ((bits >> 16) | 64).to(torch.int16)
        return torch.where(is_nan, quiet_nan, rounded).view(torch.uint8)

    @classmethod
    def decode_blocks(cls, data):
        return data.contiguous().view(torch.bfloat16).to(torch.float32)
