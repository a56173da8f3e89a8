"""ggml's k-quants Q2_K..Q6_K (256-element super-blocks), bit-exact with ggml-quants.c: without importance
the `quantize_row_q*_K_ref` algorithms, with it the `quantize_row_q*_K_impl` ones (what
`ggml_quantize_chunk` runs); layouts from ggml-common.h. Everything is vectorised over super-blocks; the
per-element loops of the C code run over contiguous [blocks] rows (see ggml_search)."""

from __future__ import annotations

import torch

from quantkit.quant.codec import Codec, divide, f16_bytes, f16_from
from quantkit.quant.ggml_search import (
    fdiv,
    iround,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    seqsum,
    signed_absmax,
    sqrtf,
    wrap_i8,
    wrap_u8,
)

QK_K = 256
# super-blocks searched together: on CPU small enough for the working set to stay in cache, on GPUs large
# enough to amortise the kernel launches of the many small per-element steps
_CHUNK_CPU, _CHUNK_GPU = 1024, 32768


def _f16(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))."""
    return x.to(torch.float16).to(torch.float32)


def _running_max(t: torch.Tensor) -> torch.Tensor:
    """`float m = 0; for (j) if (t[j] > m) m = t[j];` over dim 1: +0 unless some value is positive."""
    top = t.amax(dim=1)
    return torch.where(top > 0, top, torch.zeros_like(top))


def _elem_major(x: torch.Tensor, n: int) -> torch.Tensor:
    """[S, 256] super-blocks -> [n, S * 256 / n]: sub-blocks of n elements, element index first."""
    return x.reshape(-1, n).t().contiguous()


def _block_major(t: torch.Tensor, per_super: int) -> torch.Tensor:
    """Back from element-major: [n, B] levels -> [S, per_super, n]; [B] per-sub-block values -> [S, per_super]."""
    if t.dim() == 1:
        return t.reshape(-1, per_super)
    return t.t().reshape(-1, per_super, t.shape[0])


def _sigma2(xs: torch.Tensor, factor: int) -> torch.Tensor:
    """`sumx2 += x[j]*x[j]` over the super-block, then factor*sumx2/QK_K (factor 1 for Q2_K, 2 otherwise)."""
    xt = _elem_major(xs, QK_K)
    sumx2 = seqsum(xt * xt)
    return (sumx2 * factor if factor != 1 else sumx2) / QK_K


def _imatrix_weights(xs: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """weight = qw * sqrtf(sigma2 + x*x)."""
    return qw * sqrtf(sigma2[:, None] + xs * xs)


def _requant_asym(xsub, levels, d, dmin, sc, m, nmax):
    """Second pass of Q2_K/Q4_K/Q5_K: with the fp16 super-scales, l = nearest_int((x + dm)/d) clamped to
    0..nmax, sub-blocks whose d*sc is zero keep the search's levels. xsub/levels [S, nsub, len]."""
    dq = (d[:, None] * sc.to(torch.float32))[..., None]
    dmq = (dmin[:, None] * m.to(torch.float32))[..., None]
    requant = iround((xsub + dmq) / dq, 0, nmax)
    return torch.where(dq == 0, levels, requant)


def _requant_sym(xsub, levels, d, sc, lo, hi):
    """Second pass of Q3_K/Q6_K: l = nearest_int(x / (d*sc)) clamped to lo..hi, offset by -lo."""
    dq = (d[:, None] * sc.to(torch.float32))[..., None]
    requant = iround(xsub / dq, lo, hi) - lo
    return torch.where(dq == 0, levels, requant)


def _shifts(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _pack_2bit(levels: torch.Tensor) -> torch.Tensor:
    """[S, 256] values 0..3 -> qs[64]: byte 32h + l holds elements 128h + l + 32k at bits 2k."""
    q = levels.to(torch.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """qs[64] -> [S, 256] values 0..3."""
    return ((qs.reshape(-1, 2, 1, 32) >> _shifts([0, 2, 4, 6], qs.device).reshape(1, 1, 4, 1)) & 3).reshape(-1, 256)


def _per_element(t: torch.Tensor) -> torch.Tensor:
    """[S, nsub] or [S, nsub, 1] sub-block values -> [S, 256]."""
    t = t.reshape(t.shape[0], -1, 1)
    return t.expand(-1, -1, QK_K // t.shape[1]).reshape(-1, QK_K)


def _bit_planes(bits: torch.Tensor) -> torch.Tensor:
    """[S, 8, 32] bits -> [S, 32] bytes, bit j of byte l = bits[:, j, l] (Q3_K's hmask, Q5_K's qh)."""
    return (bits << torch.arange(8, dtype=torch.uint8, device=bits.device).reshape(1, 8, 1)).sum(1, dtype=torch.uint8)


def _from_bit_planes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of _bit_planes: [S, 32] bytes -> [S, 8, 32] bits."""
    return (planes.reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=planes.device).reshape(1, 8, 1)) & 1


class _SymmetricLevels:
    """levels()/with_levels() of Q3_K and Q6_K: element = d * sc * level (no offset); the levels fill the block up to
    `scales_at`, the scales and d follow."""

    scales_at: int

    @classmethod
    def levels(cls, data):
        dl = _per_element(cls._scales(data))
        return dl, torch.zeros_like(dl), cls._unpack_levels(data).long()

    @classmethod
    def with_levels(cls, data, L):
        return torch.cat((cls._pack_levels(L), data[:, cls.scales_at:]), dim=1)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K scales[12] from 8 scales and 8 mins (int tensors [S, 8]), with the same uint8 truncation as
    the C packing loop (values above 63 spill exactly as they do there)."""
    ls = wrap_u8(ls)
    lm = wrap_u8(lm)
    lo = torch.cat((ls[:, :4], lm[:, :4]), dim=1)
    top = torch.cat(((ls[:, 4:] >> 4) << 6, (lm[:, 4:] >> 4) << 6), dim=1)
    first = wrap_u8(lo | top)
    last = wrap_u8((ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4))
    return torch.cat((first, last), dim=1).to(torch.uint8)


def _unpack_scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: scales[12] uint8 -> (sc, m) int32 [S, 8]."""
    q = scales.to(torch.int32)
    sc = torch.cat((q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)), dim=1)
    m = torch.cat((q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)), dim=1)
    return sc, m


def _pack_q3_scales(levels6: torch.Tensor) -> torch.Tensor:
    """Q3_K scales[12] from 16 six-bit values [S, 16] (already offset by +32)."""
    q = levels6.to(torch.uint8)
    low, high = q & 0xF, q >> 4
    first = low[:, :8] | (low[:, 8:] << 4)
    hi = (high.reshape(-1, 4, 4) << _shifts([0, 2, 4, 6], q.device).reshape(1, 4, 1)).sum(1, dtype=torch.uint8)
    return torch.cat((first, hi), dim=1)


def _unpack_q3_scales(scales: torch.Tensor) -> torch.Tensor:
    """Q3_K scales[12] -> the 16 six-bit values (int32, before the -32)."""
    q = scales.to(torch.int32)
    low = torch.cat((q[:, :8] & 0xF, q[:, :8] >> 4), dim=1)
    high = (q[:, 8:12].reshape(-1, 1, 4) >> torch.tensor([0, 2, 4, 6], device=q.device).reshape(1, 4, 1)) & 3
    return low | (high.reshape(-1, 16) << 4)


class _KQuant:
    """encode_rows for the k-quants: chunks of super-blocks, each through `_encode_superblocks`."""

    block_bytes: int
    chunk_cpu: int = _CHUNK_CPU
    scale_search = True

    @classmethod
    def encode_rows(cls, x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        xs = x.reshape(-1, QK_K)
        per_row = x.shape[1] // QK_K
        out = torch.empty(xs.shape[0], cls.block_bytes, dtype=torch.uint8, device=x.device)
        chunk = cls.chunk_cpu if x.device.type == "cpu" else _CHUNK_GPU
        for s in range(0, xs.shape[0], chunk):
            chunk_qw = None
            if importance is not None:  # super-block i of a row takes importance[256 i : 256 (i + 1)]
                columns = torch.arange(s, min(s + chunk, xs.shape[0]), device=x.device) % per_row
                chunk_qw = importance.reshape(per_row, QK_K)[columns]
            out[s:s + chunk] = cls._encode_superblocks(xs[s:s + chunk].contiguous(), chunk_qw)
        return out

    @classmethod
    def _encode_superblocks(cls, xs: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class Q2_K(_KQuant, Codec):
    name, type_id, block_size, block_bytes = "Q2_K", 10, 256, 84

    @classmethod
    def _encode_superblocks(cls, xs, qw):
        nsb = xs.shape[0]
        xe = _elem_major(xs, 16)
        if qw is None:  # quantize_row_q2_K_ref
            scales, mins, levels = make_qkx_quants(xe, xe.abs(), 3, -0.5, 0.1, 15, use_mad=True)
            scales, mins = _block_major(scales, 16), _block_major(mins, 16)
            max_scale = _running_max(scales)
            max_min = _running_max(mins)
            has_scale, has_min = max_scale > 0, max_min > 0
            ls = nearest_int(fdiv(15.0, max_scale)[:, None] * scales)
            lm = nearest_int(fdiv(15.0, max_min)[:, None] * mins)
            ls = torch.where(has_scale[:, None], ls, torch.zeros_like(ls))
            lm = torch.where(has_min[:, None], lm, torch.zeros_like(lm))
            d = torch.where(has_scale, divide(max_scale, 15), torch.zeros_like(max_scale))
            dmin = torch.where(has_min, divide(max_min, 15), torch.zeros_like(max_min))
        else:  # quantize_row_q2_K_impl
            weight = _imatrix_weights(xs, qw, _sigma2(xs, 1))
            we = _elem_major(weight, 16)
            sw = _block_major(seqsum(we), 16).t().contiguous()
            scales, mins, levels = make_qkx_quants(xe, we, 3, -0.9, 0.05, 36, use_mad=False, qkx3=True)
            d, ls = make_qp_quants(_block_major(scales, 16).t().contiguous(), 15, sw)
            dmin, lm = make_qp_quants(_block_major(mins, 16).t().contiguous(), 15, sw)
            ls, lm = ls.t().to(torch.int32), lm.t().to(torch.int32)
        sc_bytes = wrap_u8(ls | (lm << 4))
        d, dmin = _f16(d), _f16(dmin)
        levels = _requant_asym(xs.reshape(nsb, 16, 16), _block_major(levels, 16), d, dmin, sc_bytes & 0xF,
                               sc_bytes >> 4, 3)
        return torch.cat((sc_bytes.to(torch.uint8), _pack_2bit(levels.reshape(nsb, 256)), f16_bytes(d[:, None]),
                          f16_bytes(dmin[:, None])), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        dl, ml = cls._scales(data)
        q = _unpack_2bit(data[:, 16:80]).reshape(-1, 16, 16).to(torch.float32)
        return (dl * q - ml).reshape(-1, 256)

    @classmethod
    def _scales(cls, data):
        sc = data[:, :16]
        d, dmin = f16_from(data[:, 80:82]), f16_from(data[:, 82:84])
        return (d * (sc & 0xF).to(torch.float32))[..., None], (dmin * (sc >> 4).to(torch.float32))[..., None]

    level_values = tuple(range(4))

    @classmethod
    def levels(cls, data):
        dl, ml = cls._scales(data)
        return _per_element(dl), -_per_element(ml), _unpack_2bit(data[:, 16:80]).long()

    @classmethod
    def with_levels(cls, data, L):
        return torch.cat((data[:, :16], _pack_2bit(L), data[:, 80:84]), dim=1)


class Q3_K(_SymmetricLevels, _KQuant, Codec):
    name, type_id, block_size, block_bytes = "Q3_K", 11, 256, 110
    chunk_cpu = 2048  # mostly the element-by-element descent on [blocks] rows: larger rows amortise better

    @classmethod
    def _encode_superblocks(cls, xs, qw):
        nsb = xs.shape[0]
        xe = _elem_major(xs, 16)
        if qw is None:  # quantize_row_q3_K_ref
            scales, levels = make_q3_quants(xe, 4)
            scales = _block_major(scales, 16)
            max_scale, _ = signed_absmax(scales.t())
            nonzero = max_scale != 0
            iscale = fdiv(-32.0, max_scale)
            l6 = wrap_i8(nearest_int(iscale[:, None] * scales)).clamp_(-32, 31) + 32
            l6 = torch.where(nonzero[:, None], l6, torch.zeros_like(l6))
            d = torch.where(nonzero, iscale.reciprocal(), torch.zeros_like(iscale))
        else:  # quantize_row_q3_K_impl
            weight = _imatrix_weights(xs, qw, _sigma2(xs, 2))
            we = _elem_major(weight, 16)
            sw = _block_major(seqsum(we), 16).t().contiguous()
            scales, levels = make_qx_quants(xe, 4, qw=we)
            d, l6 = make_qx_quants(_block_major(scales, 16).t().contiguous(), 32, qw=sw)
            l6 = l6.t().to(torch.int32)
        d = _f16(d)
        levels = _requant_sym(xs.reshape(nsb, 16, 16), _block_major(levels, 16), d, l6 - 32, -4, 3)
        return torch.cat((cls._pack_levels(levels.reshape(nsb, 256)), _pack_q3_scales(l6), f16_bytes(d[:, None])),
                         dim=1)

    @staticmethod
    def _pack_levels(levels: torch.Tensor) -> torch.Tensor:
        """[S, 256] levels 0..7 -> hmask (the third bits) and qs (the low two)."""
        levels = levels.to(torch.uint8)
        return torch.cat((_bit_planes((levels >> 2).reshape(-1, 8, 32)), _pack_2bit(levels & 3)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        q = cls._unpack_levels(data) - 4
        return (cls._scales(data) * q.reshape(-1, 16, 16).to(torch.float32)).reshape(-1, 256)

    @classmethod
    def _scales(cls, data):
        d = f16_from(data[:, 108:110])
        return (d * (_unpack_q3_scales(data[:, 96:108]) - 32).to(torch.float32))[..., None]

    @classmethod
    def _unpack_levels(cls, data):
        """The stored 0..7 levels (value level - 4) [S, 256]."""
        hbit = _from_bit_planes(data[:, :32]).reshape(-1, 256).to(torch.int32)
        return _unpack_2bit(data[:, 32:96]).to(torch.int32) + 4 * hbit

    level_values, scales_at = tuple(range(-4, 4)), 96


class _Q45K(_KQuant):
    """Q4_K and Q5_K share everything but the level count and the search parameters."""

    nmax: int
    ref_search: tuple[float, float, int]

    @classmethod
    def _levels(cls, xs, qw):
        nsb = xs.shape[0]
        xe = _elem_major(xs, 32)
        if qw is None:  # quantize_row_q{4,5}_K_ref
            sum_x2 = seqsum(xe * xe)
            av_x = sqrtf(sum_x2 / 32)
            weights = av_x + xe.abs()
            scales, mins, levels = make_qkx_quants(xe, weights, cls.nmax, *cls.ref_search, use_mad=False)
            scales, mins = _block_major(scales, 8), _block_major(mins, 8)
            max_scale = _running_max(scales)
            max_min = _running_max(mins)
            inv_scale = torch.where(max_scale > 0, fdiv(63.0, max_scale), torch.zeros_like(max_scale))
            inv_min = torch.where(max_min > 0, fdiv(63.0, max_min), torch.zeros_like(max_min))
            ls = wrap_u8(nearest_int(inv_scale[:, None] * scales)).clamp_(max=63)
            lm = wrap_u8(nearest_int(inv_min[:, None] * mins)).clamp_(max=63)
            d, dmin = divide(max_scale, 63), divide(max_min, 63)
        else:  # quantize_row_q{4,5}_K_impl
            weight = _imatrix_weights(xs, qw, _sigma2(xs, 2))
            we = _elem_major(weight, 32)
            sw = _block_major(seqsum(we), 8).t().contiguous()
            scales, mins, levels = make_qkx_quants(xe, we, cls.nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
            d, ls = make_qp_quants(_block_major(scales, 8).t().contiguous(), 63, sw)
            dmin, lm = make_qp_quants(_block_major(mins, 8).t().contiguous(), 63, sw)
            ls, lm = ls.t().to(torch.int32), lm.t().to(torch.int32)
            if cls.nmax == 31:  # only the Q5_K impl clamps (Q4_K's packs the uint8 as is)
                ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        scale_bytes = _pack_scale_min_k4(ls, lm)
        sc, m = _unpack_scale_min_k4(scale_bytes)
        d, dmin = _f16(d), _f16(dmin)
        levels = _requant_asym(xs.reshape(nsb, 8, 32), _block_major(levels, 8), d, dmin, sc, m, cls.nmax)
        head = torch.cat((f16_bytes(d[:, None]), f16_bytes(dmin[:, None]), scale_bytes), dim=1)
        return head, levels.reshape(nsb, 4, 2, 32).to(torch.uint8)

    @classmethod
    def _decode_scales(cls, data):
        d, dmin = f16_from(data[:, 0:2]), f16_from(data[:, 2:4])
        sc, m = _unpack_scale_min_k4(data[:, 4:16])
        return (d * sc.to(torch.float32))[..., None], (dmin * m.to(torch.float32))[..., None]

    @classmethod
    def _encode_superblocks(cls, xs, qw):
        head, q = cls._levels(xs, qw)
        return torch.cat((head, cls._pack_levels(q)), dim=1)

    @classmethod
    def decode_blocks(cls, data):
        dl, ml = cls._decode_scales(data)
        return (dl * cls._unpack_levels(data).to(torch.float32) - ml).reshape(-1, 256)

    @classmethod
    def levels(cls, data):
        dl, ml = cls._decode_scales(data)
        return _per_element(dl), -_per_element(ml), cls._unpack_levels(data).reshape(-1, 256).long()

    @classmethod
    def with_levels(cls, data, L):
        return torch.cat((data[:, :16], cls._pack_levels(L.to(torch.uint8).reshape(-1, 4, 2, 32))), dim=1)


def _unpack_nibble_pairs(qs: torch.Tensor) -> torch.Tensor:
    """[S, 128] bytes -> [S, 8, 32]: byte 32j + l holds elements 64j + l (low nibble) and 64j + 32 + l."""
    return ((qs.reshape(-1, 4, 1, 32) >> _shifts([0, 4], qs.device).reshape(1, 1, 2, 1)) & 0xF).reshape(-1, 8, 32)


class Q4_K(_Q45K, Codec):
    name, type_id, block_size, block_bytes = "Q4_K", 12, 256, 144
    nmax, ref_search = 15, (-1.0, 0.1, 20)
    level_values = tuple(range(16))

    @staticmethod
    def _pack_levels(q):
        """[S, 4, 2, 32] levels -> qs[128]."""
        return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)

    @staticmethod
    def _unpack_levels(data):
        return _unpack_nibble_pairs(data[:, 16:144])


class Q5_K(_Q45K, Codec):
    name, type_id, block_size, block_bytes = "Q5_K", 13, 256, 176
    nmax, ref_search = 31, (-0.5, 0.1, 15)
    level_values = tuple(range(32))

    @staticmethod
    def _pack_levels(q):
        """[S, 4, 2, 32] levels -> qh[32] (the fifth bits), qs[128] (the low nibbles)."""
        low = q & 0xF
        qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
        return torch.cat((_bit_planes((q >> 4).reshape(-1, 8, 32)), qs), dim=1)

    @staticmethod
    def _unpack_levels(data):
        return _unpack_nibble_pairs(data[:, 48:176]) | (_from_bit_planes(data[:, 16:48]) << 4)


class Q6_K(_SymmetricLevels, _KQuant, Codec):
    name, type_id, block_size, block_bytes = "Q6_K", 14, 256, 210

    @classmethod
    def _encode_superblocks(cls, xs, qw):
        # quantize_row_q6_K_ref, or quantize_row_q6_K_impl with the importance used directly as weights
        nsb = xs.shape[0]
        xe = _elem_major(xs, 16)
        scales, levels = make_qx_quants(xe, 32, qw=None if qw is None else _elem_major(qw, 16))
        scales = _block_major(scales, 16)
        max_scale, max_abs = signed_absmax(scales.t())
        zero = max_abs < 1e-15
        iscale = fdiv(-128.0, max_scale)
        d = _f16(iscale.reciprocal())
        sc = wrap_i8(nearest_int(iscale[:, None] * scales).clamp_(max=127))
        levels = _requant_sym(xs.reshape(nsb, 16, 16), _block_major(levels, 16), d, sc, -32, 31)
        out = torch.cat((cls._pack_levels(levels), wrap_u8(sc).to(torch.uint8), f16_bytes(d[:, None])), dim=1)
        return torch.where(zero[:, None], torch.zeros_like(out), out)

    @staticmethod
    def _pack_levels(levels: torch.Tensor) -> torch.Tensor:
        """Levels 0..63 (any shape of S x 256) -> ql[128] (low nibbles), qh[64] (high two bits)."""
        q = levels.reshape(-1, 2, 4, 32).to(torch.uint8)
        low, high = q & 0xF, q >> 4
        ql = torch.cat((low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)), dim=2)
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        return torch.cat((ql.reshape(-1, 128), qh.reshape(-1, 64)), dim=1)

    @staticmethod
    def _unpack_levels(data):
        ql = data[:, :128].reshape(-1, 2, 1, 64)
        qh = data[:, 128:192].reshape(-1, 2, 1, 32)
        low = ((ql >> _shifts([0, 4], data.device).reshape(1, 1, 2, 1)) & 0xF).reshape(-1, 2, 4, 32)
        high = ((qh >> _shifts([0, 2, 4, 6], data.device).reshape(1, 1, 4, 1)) & 3).reshape(-1, 2, 4, 32)
        return (low | (high << 4)).reshape(-1, 256)

    @staticmethod
    def _scales(data):
        sc = data[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        return (f16_from(data[:, 208:210]) * sc)[..., None]

    @classmethod
    def decode_blocks(cls, data):
        q = cls._unpack_levels(data).to(torch.float32) - 32
        return (cls._scales(data) * q.reshape(-1, 16, 16)).reshape(-1, 256)

    level_values, scales_at = tuple(range(-32, 32)), 192
