"""ggml's 4-bit non-linear types IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks of eight
32-element sub-blocks), bit-exact with `quantize_iq4_nl` / `quantize_iq4_xs` in ggml-quants.c, which is what
ggml_quantize_chunk (and so llama-quantize) runs, with or without an importance vector. Both go through
`quantize_row_iq4_nl_impl` with ntry = 7; layouts: ggml-common.h `block_iq4_nl`, `block_iq4_xs`.

Everything is vectorised over blocks. Float32 arithmetic follows the C expressions operation by operation
(libggml is built without FMA contraction), and the C sums, which are sequential float32 loops, are
accumulated element by element in the same order rather than with torch's tree reductions.

Internally a chunk of rows is laid out sub-block-major: xs[j, r, b] = element j of sub-block b of row r, so
that the per-element loops of the C code read contiguous slices."""

from __future__ import annotations

import torch

from quantkit.quant.codec import Codec, divide, f16_bytes, f16_from, pack_nibbles, unpack_nibbles
from quantkit.quant.ggml_search import sqrtf

# ggml-common.h kvalues_iq4nl: the 16-entry codebook, sorted ascending.
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NTRY = 7  # what quantize_iq4_nl / quantize_iq4_xs pass to quantize_row_iq4_nl_impl
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: sub-blocks whose max |x| is below this get scale 0
SUB = 32  # sub-block size (the `block_size` argument of quantize_row_iq4_nl_impl)

# Elements of x per internal chunk; the candidate search holds ~16 float32/int32 copies of a chunk at a time.
_CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 22}


class _Tables:
    """The codebook as lookup tables indexed by floor(2*v) + 256 (clamped to 0..512), for v = id*x.

    ggml's best_index_int8(16, kvalues, v) picks the nearest codebook entry, an exact midpoint going to the
    higher one; it compares `v - val[mu-1] < val[mu] - v` in float32. Near every midpoint of this codebook both
    differences are exact in float32 (they lie in the binade of v or below it), and float rounding is monotonic
    elsewhere, so that comparison equals `v < midpoint`: the index is the number of midpoints <= v. The
    midpoints are all multiples of 1/2, so that count depends only on floor(2*v), and a table lookup replaces
    the search. NaN maps to 15 like the C code, +-inf and everything beyond the codebook to 15 / 0."""

    def __init__(self, device: torch.device):
        self.kv = torch.tensor(KVALUES, dtype=torch.float32, device=device)
        mids = (self.kv[:-1] + self.kv[1:]) / 2
        half_steps = torch.arange(-256, 257, dtype=torch.float32, device=device) / 2
        index = (mids[None, :] <= half_steps[:, None]).sum(1)  # [513]
        self.value = self.kv[index]
        self.index = index.to(torch.uint8)
        self.lo = torch.tensor(0.0, device=device)
        self.hi = torch.tensor(512.0, device=device)

    def _slot(self, ids: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """int32 table slots for v = ids * xs (broadcast), i.e. clamp(floor(2v) + 256, 0, 512)."""
        ids2 = ids * 2
        if bool(torch.isfinite(ids2).all()) and bool(torch.isfinite(xs).all()):
            # Fast path. fl(2id * x) == 2 fl(id * x) except on overflow (both clamp alike) and in the subnormal
            # range (|v| < 2^-125: slot 255 or 256 either way, both index 8); no NaN can arise.
            v = (ids2 * xs).floor_().add_(256).clamp_(0, 512)
        else:
            # Non-finite factors (garbage in): the plain product, and fmin before fmax sends NaN to the top slot.
            v = (ids * xs).mul_(2).floor_().add_(256)
            v = torch.fmax(torch.fmin(v, self.hi, out=v), self.lo, out=v)
        return v.to(torch.int32)

    def best_index(self, ids: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """best_index_int8(16, kvalues_iq4nl, ids * xs), elementwise (ids broadcast against xs)."""
        return self._lookup(self.index, self._slot(ids, xs))

    def best_value(self, ids: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """kvalues_iq4nl[best_index_int8(16, kvalues_iq4nl, ids * xs)], elementwise."""
        return self._lookup(self.value, self._slot(ids, xs))

    @staticmethod
    def _lookup(table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return torch.index_select(table, 0, slots.reshape(-1)).reshape(slots.shape)  # int32 slots: fast on CPU


def _seq_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """C's `float s = 0; for (k...) s += t[k];` along `dim`, vectorised over the other dimensions."""
    t = t.movedim(dim, 0)
    acc = torch.zeros_like(t[0])
    for k in range(t.shape[0]):
        acc.add_(t[k])
    return acc


def _weights(x: torch.Tensor, xs: torch.Tensor, importance: torch.Tensor | None, super_size: int) -> torch.Tensor:
    """The per-element weights of quantize_row_iq4_nl_impl, laid out like xs [32, rows, sub-blocks]."""
    if importance is None:
        return xs * xs  # weight[j] = xb[j]*xb[j]
    rows, n = x.shape
    # sigma2 = sum over the super-block of x*x (in element order), then *= 2.f/super_block_size (a power of 2)
    xsup = x.reshape(rows, n // super_size, super_size).permute(2, 0, 1).contiguous()
    sigma2 = _seq_sum(xsup * xsup, 0) * (2.0 / super_size)
    sigma2 = sigma2.repeat_interleave(super_size // SUB, dim=1)  # [rows, sub-blocks]
    qw = importance.reshape(n // SUB, SUB).T[:, None, :]  # [32, 1, sub-blocks]
    return qw * sqrtf(sigma2 + xs * xs)  # weight[j] = qw[j] * sqrtf(sigma2 + xb[j]*xb[j])


def _subblock_scales(xs: torch.Tensor, w: torch.Tensor, tables: _Tables) -> torch.Tensor:
    """The per-sub-block scale search of quantize_row_iq4_nl_impl (ntry = 7): xs, w [32, *B] -> scales [*B]."""
    shape = (-1,) + (1,) * (xs.dim() - 1)
    # max = the signed element of largest |x|, the first one on ties (strict `>` in C); argmax keeps the first.
    xmax = xs.gather(0, xs.abs().argmax(dim=0, keepdim=True))[0]
    valid = xmax.abs() >= torch.tensor(GROUP_MAX_EPS, dtype=torch.float32, device=xs.device)
    xmax = torch.where(valid, xmax, torch.ones_like(xmax))

    # Candidate inverse scales: first id = 1/d with d = -max/values[0]; then, for itry = -ntry..ntry,
    # id = (itry + values[0])/max (the numerator is an exact integer).
    id0 = 1 / divide(-xmax, KVALUES[0])
    num = torch.arange(-NTRY, NTRY + 1, device=xs.device).add(KVALUES[0]).to(torch.float32)
    ids = torch.cat((id0[None], num.view(shape) / xmax[None]))  # [1 + 2*ntry, *B]

    # For every candidate: L = best_index_int8(id*x), q = values[L], sumqx += w*q*x, sumq2 += w*q*q.
    q = tables.best_value(ids[:, None], xs[None])  # [T, 32, *B]
    wq = w[None] * q
    sumqx = _seq_sum(wq * xs[None], 1)
    sumq2 = _seq_sum(wq.mul_(q), 1)
    del q, wq

    zero = torch.zeros_like(xmax)
    d = torch.where(sumq2[0] > 0, sumqx[0] / sumq2[0], zero)
    best = d * sumqx[0]
    for t in range(1, ids.shape[0]):  # in itry order: each candidate is judged against the best so far
        sx, s2 = sumqx[t], sumq2[t]
        better = (s2 > 0) & (sx * sx > best * s2)
        d = torch.where(better, sx / s2, d)
        best = torch.where(better, d * sx, best)
    return torch.where(valid, d, zero)


def _inverse(v: torch.Tensor) -> torch.Tensor:
    """C's `v ? 1/v : 0`."""
    return torch.where(v != 0, 1 / v, torch.zeros_like(v))


def _split(x: torch.Tensor) -> torch.Tensor:
    """[rows, n] -> sub-block-major xs [32, rows, n/32] (contiguous)."""
    rows, n = x.shape
    return x.reshape(rows, n // SUB, SUB).permute(2, 0, 1).contiguous()


def _pack_indices(L: torch.Tensor) -> torch.Tensor:
    """[32, rows, sub-blocks] indices -> [rows * sub-blocks, 16] bytes: low nibble j, high nibble j + 16."""
    return pack_nibbles(L.permute(1, 2, 0).reshape(-1, SUB))


def _chunks(x: torch.Tensor):
    rows, n = x.shape
    step = max(1, _CHUNK_ELEMS.get(x.device.type, _CHUNK_ELEMS["cpu"]) // n)
    for r in range(0, rows, step):
        yield x[r:r + step]


class IQ4_NL(Codec):
    name, type_id, block_size, block_bytes = "IQ4_NL", 20, 32, 18
    scale_search = True

    @classmethod
    def encode_rows(cls, x, importance):
        tables = _Tables(x.device)
        out = []
        for xc in _chunks(x):
            xs = _split(xc)
            scale = _subblock_scales(xs, _weights(xc, xs, importance, SUB), tables)  # [rows, blocks]
            # Stored d = fp16(scale); the indices are re-picked with the float32 1/scale (ntry > 0 branch).
            L = tables.best_index(_inverse(scale)[None], xs)
            out.append(torch.cat((f16_bytes(scale.reshape(-1, 1)), _pack_indices(L)), dim=1))
        return torch.cat(out)

    @classmethod
    def decode_blocks(cls, data):
        kv = torch.tensor(KVALUES, dtype=torch.float32, device=data.device)
        return f16_from(data[:, :2]) * kv[unpack_nibbles(data[:, 2:]).long()]

    level_values = KVALUES

    @classmethod
    def levels(cls, data):
        d = f16_from(data[:, :2]).expand(-1, SUB)
        return d, torch.zeros_like(d), unpack_nibbles(data[:, 2:]).long()

    @classmethod
    def with_levels(cls, data, L):
        return torch.cat((data[:, :2], pack_nibbles(L)), dim=1)


class IQ4_XS(Codec):
    name, type_id, block_size, block_bytes = "IQ4_XS", 23, 256, 136
    scale_search = True

    @classmethod
    def encode_rows(cls, x, importance):
        tables = _Tables(x.device)
        nsub = cls.block_size // SUB
        out = []
        for xc in _chunks(x):
            rows, n = xc.shape
            xs = _split(xc)
            scales = _subblock_scales(xs, _weights(xc, xs, importance, cls.block_size), tables)
            scales = scales.reshape(rows, n // cls.block_size, nsub)
            # max_scale = the signed sub-scale of largest |.| (first on ties; +0 when all are zero)
            smax = scales.gather(-1, scales.abs().argmax(dim=-1, keepdim=True))
            smax = torch.where(smax.abs() > 0, smax, torch.zeros_like(smax))
            d = -smax / 32  # stored as fp16; -0.0 for an all-zero super-block, as in C
            lq = torch.round(_inverse(d) * scales).clamp(-32, 31)  # nearest_int (half to even), then clamp
            dl = d * lq
            L = tables.best_index(_inverse(dl).reshape(1, rows, -1), xs)

            ls = (lq + 32).to(torch.int32)  # [rows, super-blocks, 8], 0..63
            shifts = torch.arange(0, 2 * nsub, 2, dtype=torch.int32, device=x.device)
            h = ((ls >> 4) << shifts).sum(-1, dtype=torch.int32)  # disjoint bits: sum == or
            scales_h = torch.stack((h & 0xFF, h >> 8), dim=-1).to(torch.uint8)
            lo = (ls & 0xF).to(torch.uint8)
            scales_l = lo[..., 0::2] | (lo[..., 1::2] << 4)
            out.append(torch.cat((f16_bytes(d.reshape(-1, 1)), scales_h.reshape(-1, 2), scales_l.reshape(-1, 4),
                                  _pack_indices(L).reshape(-1, cls.block_size // 2)), dim=1))
        return torch.cat(out)

    @classmethod
    def decode_blocks(cls, data):
        kv = torch.tensor(KVALUES, dtype=torch.float32, device=data.device)
        return (cls._scales(data)[..., None] * kv[cls._unpack_levels(data)]).reshape(-1, cls.block_size)

    @classmethod
    def _scales(cls, data):
        """dl = d * (ls - 32) per sub-block [blocks, 8]."""
        nsub = cls.block_size // SUB
        d = f16_from(data[:, :2])  # [blocks, 1]
        h = data[:, 2].to(torch.int32) | (data[:, 3].to(torch.int32) << 8)
        ib = torch.arange(nsub, device=data.device)
        low = (data[:, 4:8].to(torch.int32)[:, ib // 2] >> (4 * (ib % 2))) & 0xF
        ls = low | (((h[:, None] >> (2 * ib)) & 3) << 4)
        return d * (ls - 32).to(torch.float32)

    @classmethod
    def _unpack_levels(cls, data):
        qs = data[:, 8:].reshape(-1, cls.block_size // SUB, SUB // 2)
        return torch.cat((qs & 0xF, qs >> 4), dim=-1).long()  # [blocks, 8, 32]

    level_values = KVALUES

    @classmethod
    def levels(cls, data):
        dl = cls._scales(data)[..., None].expand(-1, -1, SUB).reshape(-1, cls.block_size)
        return dl, torch.zeros_like(dl), cls._unpack_levels(data).reshape(-1, cls.block_size)

    @classmethod
    def with_levels(cls, data, L):
        return torch.cat((data[:, :8], pack_nibbles(L.reshape(-1, SUB)).reshape(-1, cls.block_size // 2)), dim=1)
