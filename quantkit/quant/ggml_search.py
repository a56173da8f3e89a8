"""ggml's scale-search helpers (ggml-quants.c `make_qx_quants`, `make_q3_quants`, `make_qkx2_quants`,
`make_qkx3_quants`, `make_qp_quants`), vectorised over many blocks at once and bit-exact with the C code.

Layout: every helper takes its blocks ELEMENT-MAJOR, as [n, B] tensors (B blocks of n elements, x[i] is the
i-th element of every block), so that the C loops over the n elements of a block become python loops over
contiguous [B] rows. Results are per-block [B] scales and [n, B] quant levels (float32 holding integers).

Exactness rules followed throughout (ggml is compiled without FMA contraction or fast-math):
- every operation is a separately rounded float32 op in the C order and association (`w*x*l` is `(w*x)*l`);
- C sums are sequential loops, so sums are accumulated element by element (`seqsum`), never with `.sum()`;
- `sqrtf` goes through float64 (torch's float32 sqrt is not correctly rounded on CPU);
- `scalar / tensor` is never written in python (torch turns it into `reciprocal(t) * scalar`, two roundings);
- `tensor / number` goes through `codec.divide` unless the number is a power of two (CUDA multiplies by the
  number's rounded reciprocal);
- `nearest_int` reproduces the C bit trick, including its result for arguments outside +-2^22 and NaN;
- integers the C code stores in uint8 / int8 arrays are wrapped the same way before they are reused.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15

_MAGIC = 12582912.0  # 1.5 * 2**23


def f32(value: float) -> float:
    """The float32 value of a C float constant/expression result, as a python float (exact)."""
    return float(np.float32(value))


def fdiv(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """float32 `numerator / t` with a single rounding."""
    return torch.full_like(t, numerator).div_(t)


def sqrtf(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (C sqrtf). torch's float32 CPU sqrt is not (it is off by an ulp for
    ~15% of inputs); a float64 sqrt within an ulp rounds to the correct float32, as a float32's square root is
    never that close to a float32 rounding boundary."""
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int on float32 values: round half to even for |v| <= 4194303, and the same bit
    pattern arithmetic outside that range. Returns int32."""
    i = (v + _MAGIC).view(torch.int32)
    return i.bitwise_and_(0x007FFFFF).sub_(0x00400000)


def iround(v: torch.Tensor, lo: int | None, hi: int | None) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(v))) as float32."""
    return nearest_int(v).clamp_(lo, hi).to(torch.float32)


def wrap_u8(i: torch.Tensor) -> torch.Tensor:
    """An int stored into a uint8_t."""
    return i.bitwise_and(0xFF)


def wrap_i8(i: torch.Tensor) -> torch.Tensor:
    """An int stored into an int8_t."""
    return (i + 128).bitwise_and_(0xFF).sub_(128)


def seqsum(t: torch.Tensor, start_zero: bool = True) -> torch.Tensor:
    """Sequential float32 sum over dim 0 of [n, ...]: `float s = 0; for (i) s += t[i];` (start_zero) or
    `float s = t[0]; for (i = 1..) s += t[i];`. Stack independent sums along a second dim to share the loop."""
    rows = t.unbind(0)  # all row views in one call: indexing t[i] before each add cost Q4_K 12%
    acc = torch.zeros_like(rows[0]) if start_zero else rows[0].clone()
    for row in rows[0 if start_zero else 1:]:
        acc.add_(row)
    return acc


def signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`float max = 0, amax = 0; for (i) if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }` over dim 0
    of [n, B]: (max, amax); the first element on ties, +0 for a block of (possibly negative) zeros."""
    amax = torch.zeros_like(x[0])
    mx = torch.zeros_like(x[0])
    for xi, ai in zip(x.unbind(0), x.abs().unbind(0), strict=True):
        more = ai > amax
        amax = torch.where(more, ai, amax)
        mx = torch.where(more, xi, mx)
    return mx, amax


def first_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`min = max = x[0]; for (i = 1..) { if (x[i] < min) min = x[i]; if (x[i] > max) max = x[i]; }` over dim 0."""
    rows = x.unbind(0)
    mn, mx = rows[0].clone(), rows[0].clone()
    for xi in rows[1:]:
        mn = torch.where(xi < mn, xi, mn)
        mx = torch.where(xi > mx, xi, mx)
    return mn, mx


def _round_sym(arg: torch.Tensor, nmax: int) -> torch.Tensor:
    """MAX(-nmax, MIN(nmax-1, nearest_int(iscale*x))) where iscale = -c/max and |x| <= |max| (c <= nmax + 1):
    |arg| stays far inside nearest_int's exact range, so plain round-half-even is bit-exact (blocks with
    max ~ 0 give inf/nan here, but they are the all-zero blocks every caller masks)."""
    return arg.round_().clamp_(-nmax, nmax - 1)


# ---- make_qx_quants -----------------------------------------------------------------------------------------
def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None,
                   rmse_type: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale search. x [n, B]; qw [n, B] or None. Returns (scale [B], L [n, B] in 0..2*nmax-1).
    rmse_type 0 (plain rounding) and 1..4 (weighted search, qw overriding the weights) as in C; the
    negative "return early" variants are not needed by any quantizer here."""
    if rmse_type < 0:
        raise NotImplementedError("make_qx_quants: negative rmse_type is not used by the ported quantizers")
    mx, amax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    iscale = fdiv(-nmax, mx)
    lv = _round_sym(iscale * x, nmax)
    if rmse_type == 0:
        scale = iscale.reciprocal()
    else:
        if qw is not None:
            w = qw
        elif rmse_type == 1:
            w = x * x
        elif rmse_type == 2:
            w = torch.ones_like(x)
        elif rmse_type == 3:
            w = x.abs()
        else:
            w = sqrtf(x.abs())
        wx = w * x
        prods = torch.empty(x.shape[0], 2, x.shape[1], dtype=x.dtype, device=x.device)

        def sums(lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """sumlx += w*x[i]*l; suml2 += w*l*l"""
            torch.mul(wx, lv, out=prods[:, 0])
            torch.mul(w, lv, out=prods[:, 1]).mul_(lv)
            return seqsum(prods).unbind(0)

        sumlx, suml2 = sums(lv)
        scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
        best = scale * sumlx
        best_iscale = iscale  # L is rebuilt from the accepted iscale once at the end, as C does on acceptance
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = fdiv(-f32(np.float32(nmax) + np.float32(0.1) * np.float32(step)), mx)
            sumlx, suml2 = sums(_round_sym(iscale * x, nmax))
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            best_iscale = torch.where(take, iscale, best_iscale)
            scale = torch.where(take, sumlx / suml2, scale)
            best = torch.where(take, scale * sumlx, best)
        lv = _round_sym(best_iscale * x, nmax)
    levels = torch.where(zero, torch.zeros_like(lv), lv + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), levels


# ---- the coordinate descent shared by make_q3_quants and make_qp_quants ---------------------------------------
def _coordinate_descent(x: torch.Tensor, w: torch.Tensor, lv: torch.Tensor, sumlx: torch.Tensor,
                        suml2: torch.Tensor, lo: int | None, hi: int,
                        qp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to 5 passes over the elements; element i moves to nearest_int(x*sl2/slx) (clamped) when that
    raises sumlx^2/suml2. make_q3_quants (qp False): needs slx > 0, accepts only with sl2 > 0 afterwards.
    make_qp_quants (qp True): needs slx > 0 and sl2 > 0 before, and keeps L in a uint8_t (the sums use the
    unwrapped value). A block stops after a pass without changes, as in C; the blocks still moving are
    compacted after every pass, so the later passes only touch the few that need them."""
    wx = w * x
    idx = None  # the active blocks (None: all of them)
    cx, cw, cwx, clv, cslx, csl2 = x, w, wx, lv, sumlx, suml2
    for _ in range(5):
        rows = list(clv.unbind(0))
        changed = torch.zeros_like(cslx, dtype=torch.bool)
        for i, (xi, wi, wxi) in enumerate(zip(cx.unbind(0), cw.unbind(0), cwx.unbind(0), strict=True)):
            li = rows[i]
            slx = cslx - wxi * li
            sl2 = csl2 - wi * li * li
            new_int = nearest_int(xi * sl2 / slx).clamp_(lo, hi)
            new = new_int.to(torch.float32)
            slx_new = slx + wxi * new
            sl2_new = sl2 + wi * new * new
            take = (slx > 0) & (new != li) & (slx_new * slx_new * csl2 > cslx * cslx * sl2_new)
            take &= (sl2 > 0) if qp else (sl2_new > 0)
            rows[i] = torch.where(take, wrap_u8(new_int).to(torch.float32) if qp else new, li)
            cslx = torch.where(take, slx_new, cslx)
            csl2 = torch.where(take, sl2_new, csl2)
            changed |= take
        clv = torch.stack(rows)
        if idx is None:
            lv, sumlx, suml2 = clv, cslx, csl2
        else:
            lv[:, idx], sumlx[idx], suml2[idx] = clv, cslx, csl2
        sel = changed.nonzero().squeeze(1)
        if sel.numel() == 0:
            break
        idx = sel if idx is None else idx[sel]
        cx, cw, cwx, clv, cslx, csl2 = cx[:, sel], cw[:, sel], cwx[:, sel], clv[:, sel], cslx[sel], csl2[sel]
    return lv, sumlx, suml2


# ---- make_q3_quants (do_rmse = true, as Q3_K's reference quantizer calls it) ---------------------------------
def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, B] -> (scale [B], L [n, B] in 0..2*nmax-1) with the coordinate-descent refinement."""
    mx, amax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    iscale = fdiv(-nmax, mx)
    lv = iround(iscale * x, -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = seqsum(wx * lv)
    suml2 = seqsum(w * lv * lv)
    lv, sumlx, suml2 = _coordinate_descent(x, w, lv, sumlx, suml2, -nmax, nmax - 1, qp=False)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    levels = torch.where(zero, torch.zeros_like(lv), lv + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), levels


# ---- make_qkx2_quants / make_qkx3_quants ----------------------------------------------------------------------
def make_qkx_quants(x: torch.Tensor, w: torch.Tensor | None, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool, qkx3: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric search x ~ scale*L + min (min <= 0). x, w [n, B] (w None: x*x, make_qkx3 only).
    Returns (scale [B], the_min = -min [B], L [n, B] in 0..nmax). make_qkx2 (qkx3 False) and make_qkx3
    differ only in the degenerate-block test (`max == min` vs `max <= min`), which agree for finite x.
    Note that an accepted step moves `min`, which the following steps use for their levels (as in C)."""
    n, nblocks = x.shape
    if w is None:
        w = x * x
    x_min, mx = first_min_max(x)
    sums = seqsum(torch.stack((w, w * x), dim=1), start_zero=False)  # sum_w = w[0]; sum_x = w[0]*x[0]; ...
    sum_w, sum_x = sums[0], sums[1]
    mn = torch.where(x_min > 0, torch.zeros_like(x_min), x_min)
    degenerate = (mx <= mn) if qkx3 else (mx == mn)

    def levels(iscale: torch.Tensor, cur_min: torch.Tensor) -> torch.Tensor:
        arg = (x - cur_min).mul_(iscale)
        # |arg| <= iscale * max(max - min, min - x_min): in nearest_int's exact range unless a block is
        # pathological (then take the bit-exact route for this step)
        bound = iscale * torch.maximum(mx - cur_min, cur_min - x_min)
        if bool((degenerate | (bound < 4.0e6)).all()):
            return arg.round_().clamp_(0, nmax)
        return iround(arg, 0, nmax)

    def error(scale: torch.Tensor, cur_min: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = (lv * scale).add_(cur_min).sub_(x)  # scale*L + min - x
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return seqsum(diff.mul_(w))

    iscale = fdiv(nmax, mx - mn)
    scale = iscale.reciprocal()
    best = error(scale, mn, levels(iscale, mn))
    cur_min = mn
    # the accepted levels are levels(iscale, min) of the accepted step: remember those two per block and
    # rebuild L once at the end instead of selecting [n, B] levels at every step
    best_iscale, best_min = iscale, mn
    prods = torch.empty(n, 3, nblocks, dtype=x.dtype, device=x.device)
    for step in range(nstep + 1):
        num = f32(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = fdiv(num, mx - cur_min)
        cand = levels(iscale, cur_min)
        wl = torch.mul(w, cand, out=prods[:, 0])
        torch.mul(wl, cand, out=prods[:, 1])
        torch.mul(wl, x, out=prods[:, 2])
        sum_l, sum_l2, sum_xl = seqsum(prods).unbind(0)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        cur_err = error(this_scale, this_min, cand)
        take = (det > 0) & (cur_err < best)  # blocks with D <= 0 computed garbage that `take` masks
        best = torch.where(take, cur_err, best)
        scale = torch.where(take, this_scale, scale)
        best_iscale = torch.where(take, iscale, best_iscale)
        best_min = torch.where(take, cur_min, best_min)
        cur_min = torch.where(take, this_min, cur_min)
    lv = levels(torch.where(degenerate, torch.ones_like(best_iscale), best_iscale), best_min)
    zeros = torch.zeros_like(scale)
    return (torch.where(degenerate, zeros, scale), torch.where(degenerate, -mn, -cur_min),
            torch.where(degenerate, torch.zeros_like(lv), lv))


# ---- make_qp_quants -----------------------------------------------------------------------------------------
def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize non-negative values (sub-block scales or mins) x [n, B] to 0..nmax with weights qw [n, B].
    Returns (super-block scale [B], L [n, B]); L holds what C's uint8_t L[] holds (wrapped to 0..255)."""
    mx = x.amax(dim=0).clamp_min(0)
    zero = mx < GROUP_MAX_EPS
    iscale = fdiv(nmax, mx)
    lv = wrap_u8(nearest_int(iscale * x)).to(torch.float32)  # L[i] = nearest_int(...) into uint8_t
    scale = iscale.reciprocal()
    diff = x - scale * lv
    best = seqsum(qw * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = fdiv(f32(np.float32(0.1) * np.float32(step) + np.float32(nmax)), mx)
        scale_is = iscale_is.reciprocal()
        cand = iround(iscale_is * x, None, nmax)
        diff = x - scale_is * cand
        mse = seqsum(qw * diff * diff)
        take = mse < best
        best = torch.where(take, mse, best)
        iscale = torch.where(take, iscale_is, iscale)
    lint = nearest_int(iscale * x).clamp_(max=nmax)
    lv = lint.to(torch.float32)
    wx = qw * x
    sumlx = seqsum(wx * lv)
    suml2 = seqsum(qw * lv * lv)
    lv, sumlx, suml2 = _coordinate_descent(x, qw, wrap_u8(lint).to(torch.float32), sumlx, suml2, None, nmax,
                                           qp=True)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, torch.zeros_like(lv), lv)
