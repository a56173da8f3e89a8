"""ggml's legacy 32-element block types, bit-exact with the reference quantizers in ggml-quants.c
(`quantize_row_q{4_0,4_1,5_0,5_1,8_0}_ref`; layouts: ggml-common.h). The scale is chosen in float32 and
stored as fp16; q is computed with the float32 scale, exactly as the C code does.

With an importance vector, Q4_0/Q4_1/Q5_0/Q5_1 follow `quantize_row_q{4_0,4_1,5_0,5_1}_impl` instead: per-row
sigma2 = sum(x^2)/n, weights importance * sqrt(sigma2 + x^2), and the weighted scale searches of
ggml_search (make_qx_quants for the symmetric types, make_qkx3_quants for the ones with a min). Q8_0
ignores importance, as in ggml."""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantkit.quant.codec import (
    Codec,
    divide,
    f16_bytes,
    f16_from,
    pack_bits_le,
    pack_nibbles,
    round_half_away,
    unpack_bits_le,
    unpack_nibbles,
)
from quantkit.quant.ggml_search import make_qkx_quants, make_qx_quants, seqsum, sqrtf

_CHUNK_BLOCKS_CPU, _CHUNK_BLOCKS_GPU = 8192, 262144  # 32-element blocks searched together (see ggml_kquants)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d.where(d != 0, torch.ones_like(d)))


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude with its sign; the first one on ties, as ggml's strict `<` loop, and
    +0 for a block of (possibly negative) zeros, where the loop never leaves its `max = 0.0f` start."""
    ax = blocks.abs()
    idx = ax.argmax(dim=1, keepdim=True)
    return torch.where(ax.gather(1, idx) > 0, blocks.gather(1, idx), torch.zeros_like(blocks[:, :1]))


def _offset_quants(blocks: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 (half 8) / Q5_0 (half 16): d = signed absmax / -half, q = trunc(x / d + half + 0.5)."""
    d = _signed_absmax(blocks) / -half
    q = (blocks * _inverse(d) + (half + 0.5)).trunc().clamp(max=2 * half - 1)
    return d, q.to(torch.uint8)


def _min_quants(blocks: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 (top 15) / Q5_1 (top 31): d = (max - min) / top, q = trunc((x - min) / d + 0.5)."""
    # the first minimal / maximal element (strict `<` / `>` loops): the sign of a zero matters for d and m
    lo = blocks.gather(1, blocks.argmin(dim=1, keepdim=True))
    hi = blocks.gather(1, blocks.argmax(dim=1, keepdim=True))
    d = divide(hi - lo, top)
    # ggml clamps Q4_1 but not Q5_1; (x - min) / d + 0.5 stays below top + 1, so the clamp never binds.
    q = ((blocks - lo) * _inverse(d) + 0.5).trunc().clamp(max=top)
    return d, lo, q.to(torch.uint8)


def _pack5(q: torch.Tensor) -> torch.Tensor:
    """5-bit values -> qh (the 5th bits, 4 bytes LE) followed by qs (low nibbles)."""
    return torch.cat((pack_bits_le(q >> 4), pack_nibbles(q & 0x0F)), dim=1)


def _unpack5(packed: torch.Tensor) -> torch.Tensor:
    return (unpack_nibbles(packed[:, 4:]) | (unpack_bits_le(packed[:, :4]) << 4)).to(torch.float32)


def _per_element(values: torch.Tensor) -> torch.Tensor:
    """[blocks, 1] block values -> [blocks, 32]."""
    return values.expand(-1, 32)


def _row_sigma2(x: torch.Tensor) -> torch.Tensor:
    """[rows, n] -> [rows]: `sum_x2 += x[j]*x[j]` over the whole row, sigma2 = sum_x2/n_per_row."""
    xt = x.t().contiguous()
    return divide(seqsum(xt * xt), x.shape[1])


def _weighted_blocks(x: torch.Tensor, importance: torch.Tensor, encode_chunk) -> torch.Tensor:
    """Run encode_chunk(blocks [32, B] element-major, weights [32, B]) -> bytes [B, block_bytes] over chunks of
    blocks, with weight = qw * sqrtf(sigma2 + x*x) (sigma2 of the block's row)."""
    blocks = x.reshape(-1, 32)
    per_row = x.shape[1] // 32
    sigma2 = _row_sigma2(x)
    qw = importance.reshape(per_row, 32)
    chunk = _CHUNK_BLOCKS_CPU if x.device.type == "cpu" else _CHUNK_BLOCKS_GPU
    parts = []
    for s in range(0, blocks.shape[0], chunk):
        index = torch.arange(s, min(s + chunk, blocks.shape[0]), device=x.device)
        xb = blocks[s:s + chunk]
        weights = qw[index % per_row] * sqrtf(sigma2[index // per_row][:, None] + xb * xb)
        parts.append(encode_chunk(xb.t().contiguous(), weights.t().contiguous()))
    return torch.cat(parts, dim=0)


def _symmetric_impl(nmax: int, pack):
    """quantize_row_q4_0_impl (nmax 8) / q5_0_impl (nmax 16): d = make_qx_quants(32, nmax, x, L, 1, weight),
    the levels L (0..2*nmax-1) stored as they are (no requantization with the fp16 scale)."""
    def encode_chunk(xe, we):
        d, levels = make_qx_quants(xe, nmax, qw=we)
        return torch.cat((f16_bytes(d[:, None]), pack(levels.t().to(torch.uint8))), dim=1)
    return encode_chunk


def _min_impl(nmax: int, pack):
    """quantize_row_q4_1_impl (nmax 15) / q5_1_impl (nmax 31): make_qkx3_quants(32, nmax, x, weight, L, &min,
    Laux, -0.9, 0.05, 36, false); stored d and m = -min."""
    def encode_chunk(xe, we):
        d, the_min, levels = make_qkx_quants(xe, we, nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        return torch.cat((f16_bytes(d[:, None]), f16_bytes(-the_min[:, None]), pack(levels.t().to(torch.uint8))),
                         dim=1)
    return encode_chunk


class _Weighted:
    """encode_rows for the legacy types ggml quantizes with importance (`quantize_row_*_impl`): the reference
    rounding without it, `weighted` (a block encoder from _symmetric_impl / _min_impl) with it."""

    weighted: Callable

    @classmethod
    def encode_rows(cls, x, importance):
        if importance is None:
            return cls.encode_blocks(x.reshape(-1, cls.block_size))
        return _weighted_blocks(x, importance, cls.weighted)

    @classmethod
    def _searches(cls, importance):
        return importance is not None


class Q8_0(Codec):
    name, type_id, block_size, block_bytes = "Q8_0", 8, 32, 34

    @classmethod
    def encode_blocks(cls, blocks):
        low, high = torch.aminmax(blocks, dim=1, keepdim=True)  # one pass, no |blocks| copy
        d = divide(torch.maximum(high, -low).abs_(), 127)  # abs_: +0 for blocks of -0, as fabsf gives
        q = round_half_away(blocks * _inverse(d)).to(torch.int8)
        return torch.cat((f16_bytes(d), q.view(torch.uint8)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * data[:, 2:].contiguous().view(torch.int8).to(torch.float32)

    level_values = tuple(range(-128, 128))

    @classmethod
    def levels(cls, data):
        d = _per_element(f16_from(data[:, :2]))
        return d, torch.zeros_like(d), data[:, 2:].contiguous().view(torch.int8).long() + 128

    @classmethod
    def with_levels(cls, data, L):
        return torch.cat((data[:, :2], (L - 128).to(torch.int8).view(torch.uint8)), dim=1)


class Q4_0(_Weighted, Codec):
    name, type_id, block_size, block_bytes = "Q4_0", 2, 32, 18
    weighted = staticmethod(_symmetric_impl(8, pack_nibbles))

    @classmethod
    def encode_blocks(cls, blocks):
        d, q = _offset_quants(blocks, 8)
        return torch.cat((f16_bytes(d), pack_nibbles(q)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * (unpack_nibbles(data[:, 2:]).to(torch.float32) - 8)

    level_values = tuple(range(-8, 8))

    @classmethod
    def levels(cls, data):
        d = _per_element(f16_from(data[:, :2]))
        return d, torch.zeros_like(d), unpack_nibbles(data[:, 2:]).long()

    @classmethod
    def with_levels(cls, data, L):
        return torch.cat((data[:, :2], pack_nibbles(L)), dim=1)


class Q4_1(_Weighted, Codec):
    name, type_id, block_size, block_bytes = "Q4_1", 3, 32, 20
    weighted = staticmethod(_min_impl(15, pack_nibbles))

    @classmethod
    def encode_blocks(cls, blocks):
        d, lo, q = _min_quants(blocks, 15)
        return torch.cat((f16_bytes(d), f16_bytes(lo), pack_nibbles(q)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * unpack_nibbles(data[:, 4:]).to(torch.float32) + f16_from(data[:, 2:4])

    level_values = tuple(range(16))

    @classmethod
    def levels(cls, data):
        return (_per_element(f16_from(data[:, :2])), _per_element(f16_from(data[:, 2:4])),
                unpack_nibbles(data[:, 4:]).long())

    @classmethod
    def with_levels(cls, data, L):
        return torch.cat((data[:, :4], pack_nibbles(L)), dim=1)


class Q5_0(_Weighted, Codec):
    name, type_id, block_size, block_bytes = "Q5_0", 6, 32, 22
    weighted = staticmethod(_symmetric_impl(16, _pack5))

    @classmethod
    def encode_blocks(cls, blocks):
        d, q = _offset_quants(blocks, 16)
        return torch.cat((f16_bytes(d), _pack5(q)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * (_unpack5(data[:, 2:]) - 16)

    level_values = tuple(range(-16, 16))

    @classmethod
    def levels(cls, data):
        d = _per_element(f16_from(data[:, :2]))
        return d, torch.zeros_like(d), _unpack5(data[:, 2:]).long()

    @classmethod
    def with_levels(cls, data, L):
        return torch.cat((data[:, :2], _pack5(L.to(torch.uint8))), dim=1)


class Q5_1(_Weighted, Codec):
    name, type_id, block_size, block_bytes = "Q5_1", 7, 32, 24
    weighted = staticmethod(_min_impl(31, _pack5))

    @classmethod
    def encode_blocks(cls, blocks):
        d, lo, q = _min_quants(blocks, 31)
        return torch.cat((f16_bytes(d), f16_bytes(lo), _pack5(q)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        return f16_from(data[:, :2]) * _unpack5(data[:, 4:]) + f16_from(data[:, 2:4])

    level_values = tuple(range(32))

    @classmethod
    def levels(cls, data):
        return (_per_element(f16_from(data[:, :2])), _per_element(f16_from(data[:, 2:4])),
                _unpack5(data[:, 4:]).long())

    @classmethod
    def with_levels(cls, data, L):
        return torch.cat((data[:, :4], _pack5(L.to(torch.uint8))), dim=1)
