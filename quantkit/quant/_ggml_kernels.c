/* quantkit's compiled GGUF codecs: float32 rows (+ an optional importance vector) -> ggml's block bytes.

   Written for quantkit from its torch codecs (quantkit/quant/ggml_search.py, ggml_kquants.py, ggml_legacy.py,
   ggml_iq4.py), which are byte-exact with ggml; the algorithms are those of ggml-quants.c (ggml-org/llama.cpp,
   ggml/src/ggml-quants.c), the block layouts those of ggml-common.h. Nothing here is copied from ggml.

   Exactness rules (ARCHITECTURE.md, "Codec exactness rules"): every float operation is a separately rounded
   float32 operation in the C order of ggml's expressions; sums are sequential loops in element order; the
   build passes -ffp-contract=off and never -ffast-math, so no multiply-add is fused and nothing is reassociated.

   Speed: the scale searches run LN blocks side by side ("lanes", element-major [n][LN] arrays) on explicit
   4-lane GCC/Clang vectors (SSE2 / NEON, no -march): each lane is another block, whose own sums stay sequential,
   so the bytes are those of the one-block-at-a-time C code with four blocks per instruction.

   Entry point: qk_quantize(); it touches no Python object, so ctypes calls it with the GIL released. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_ggml_kernels.h"


#define QK_K 256
#define LN 8                  /* blocks searched side by side */
#define GROUP_MAX_EPS 1e-15f  /* ggml-quants.c */

/* ggml-common.h kvalues_iq4nl */
static const float KVALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* ---- numeric primitives ------------------------------------------------------------------------------------ */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE float32 -> binary16, round to nearest even (overflow to inf, NaN to a quiet NaN). */
uint16_t fp32_to_fp16(float f) {
    uint32_t x = f2u(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00;
    if (ax >= 0x477ff000u) return sign | 0x7c00;  /* 65520 and above round to inf */
    if (ax < 0x38800000u) {                        /* below 2^-14: a binary16 subnormal (or zero) */
        float scaled = u2f(ax) * 16777216.0f;      /* in units of 2^-24, exact */
        return sign | (uint16_t)nearest_int(scaled);
    }
    uint32_t r = ax - 0x38000000u;                 /* rebias the exponent 127 -> 15 */
    r += 0xfffu + ((r >> 13) & 1u);
    return sign | (uint16_t)(r >> 13);
}

static float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-08f; /* m * 2^-24, exact */
        return sign ? -v : v;
    }
    if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
    return u2f(sign | ((e + 112) << 23) | (m << 13));
}

static inline float f16_round(float f) { return fp16_to_fp32(fp32_to_fp16(f)); }

static inline void put_f16(uint8_t *p, float f) {
    uint16_t h = fp32_to_fp16(f);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

static inline float get_f16(const uint8_t *p) { return fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8))); }

/* C roundf (half away from zero) for |v| < 2^23: trunc(v + copysign(largest float below 0.5, v)); the sum
   never rounds up across an integer except where roundf does (quantkit.quant.codec.round_half_away). */
static inline int round_away(float v) { return (int)(v + copysignf(0.49999997f, v)); }

/* best_index_int8(16, kvalues_iq4nl, v): the nearest codebook entry, an exact midpoint to the higher one.
   The midpoints of this codebook are multiples of 1/2 and the differences ggml compares are exact near them,
   so the index is the number of midpoints <= v (quantkit.quant.ggml_iq4._Tables); NaN gives 15 as in C. */
static const float IQ4_MIDS[15] = {-115.5f, -93.5f, -74.f, -57.f, -42.f, -28.5f, -16.f, -4.5f, 7.f, 19.f, 31.5f,
                                   45.5f, 61.f, 79.f, 101.f};

static inline int iq4_index(float v) {
    int k = 0;
    for (int m = 0; m < 15; ++m) k += v >= IQ4_MIDS[m];
    return v != v ? 15 : k;
}

/* element-major lanes: dst[i * LN + b] = element i of block b (blocks of n elements, `stride` apart in src);
   blocks beyond `count` are zero */
static void to_lanes(float *dst, const float *src, int n, int stride, int count) {
    for (int b = 0; b < LN; ++b)
        for (int i = 0; i < n; ++i) dst[i * LN + b] = b < count ? src[b * stride + i] : 0.0f;
}

/* ---- lane vectors -------------------------------------------------------------------------------------------
   One vector holds element i of VL of the LN blocks searched together (the searches run over the LN / VL
   halves in turn). GCC/Clang vector extensions of 16 bytes are SSE2 on x86-64 and NEON on ARM64, no -march
   needed; each lane's arithmetic is the scalar IEEE operation. */

#define VL 4
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

#define INLINE static inline __attribute__((always_inline))

INLINE v4f vf(float f) { return (v4f){f, f, f, f}; }
INLINE v4i vi(int32_t i) { return (v4i){i, i, i, i}; }
INLINE v4f vload(const float *p) { v4f v; memcpy(&v, p, sizeof v); return v; }
INLINE v4f vsel(v4i m, v4f a, v4f b) { return (v4f)(((v4i)a & m) | ((v4i)b & ~m)); }
INLINE v4i vseli(v4i m, v4i a, v4i b) { return (a & m) | (b & ~m); }
INLINE v4f vabs(v4f a) { return (v4f)((v4i)a & vi(0x7fffffff)); }
INLINE v4i vnearest(v4f f) { return ((v4i)(f + vf(12582912.f)) & vi(0x007fffff)) - vi(0x00400000); }
INLINE v4i vclamp(v4i a, int lo, int hi) {
    a = vseli(a < vi(lo), vi(lo), a);
    return vseli(a > vi(hi), vi(hi), a);
}
INLINE v4f vlevel(v4f arg, int lo, int hi) { return __builtin_convertvector(vclamp(vnearest(arg), lo, hi), v4f); }
INLINE float lane(v4f v, int b) { return v[b]; }

/* ---- make_qx_quants(n, nmax, x, L, rmse_type = 1, qw) over LN blocks ---------------------------------------- */

INLINE void qx_sums(int n, int nmax, const float *x, const float *w, v4f iscale, v4f *sumlx, v4f *suml2) {
    v4f slx = vf(0), sl2 = vf(0);
    for (int i = 0; i < n; ++i) {
        v4f xv = vload(x + i * LN), wv = vload(w + i * LN);
        v4f l = vlevel(iscale * xv, -nmax, nmax - 1);
        slx += wv * xv * l;
        sl2 += wv * l * l;
    }
    *sumlx = slx;
    *suml2 = sl2;
}

/* x, w [n][LN] -> scale[LN], L[n][LN] (l + nmax; 0 for a block whose max |x| is below GROUP_MAX_EPS) */
static void make_qx_half(int n, int nmax, const float *x, const float *w, float *scale_out, uint8_t *L) {
    v4f mx = vf(0), amax = vf(0), sumlx, suml2;
    for (int i = 0; i < n; ++i) {
        v4f xv = vload(x + i * LN), ax = vabs(xv);
        v4i more = ax > amax;
        amax = vsel(more, ax, amax);
        mx = vsel(more, xv, mx);
    }
    v4f iscale = vf((float)(-nmax)) / mx;
    qx_sums(n, nmax, x, w, iscale, &sumlx, &suml2);
    v4f scale = vsel(suml2 != vf(0), sumlx / suml2, vf(0));
    v4f best = scale * sumlx, best_iscale = iscale;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = vf(-((float)nmax + 0.1f * (float)is)) / mx;
        qx_sums(n, nmax, x, w, iscale, &sumlx, &suml2);
        v4i take = (suml2 > vf(0)) & (sumlx * sumlx > best * suml2);
        best_iscale = vsel(take, iscale, best_iscale);
        scale = vsel(take, sumlx / suml2, scale);
        best = vsel(take, scale * sumlx, best);
    }
    v4i zero = amax < vf(GROUP_MAX_EPS);
    for (int i = 0; i < n; ++i) {
        v4i l = vseli(zero, vi(0), vclamp(vnearest(best_iscale * vload(x + i * LN)), -nmax, nmax - 1) + vi(nmax));
        for (int b = 0; b < VL; ++b) L[i * LN + b] = (uint8_t)l[b];
    }
    scale = vsel(zero, vf(0), scale);
    for (int b = 0; b < VL; ++b) scale_out[b] = lane(scale, b);
}

static void make_qx_lanes(int n, int nmax, const float *x, const float *w, float *scale_out, uint8_t *L) {
    for (int h = 0; h < LN; h += VL) make_qx_half(n, nmax, x + h, w + h, scale_out + h, L + h);
}

/* one block of n <= 32 through the lane search (lane 0; the others are zero blocks) */
static float make_qx_one(int n, int nmax, const float *x, const float *w, uint8_t *L) {
    float xl[32 * LN], wl[32 * LN], scale[LN];
    uint8_t Ll[32 * LN];
    to_lanes(xl, x, n, n, 1);
    to_lanes(wl, w, n, n, 1);
    make_qx_lanes(n, nmax, xl, wl, scale, Ll);
    for (int i = 0; i < n; ++i) L[i] = Ll[i * LN];
    return scale[0];
}

/* ---- make_qkx2_quants / make_qkx3_quants over LN blocks --------------------------------------------------- */

/* sum of w * |scale * L + min - x| (use_mad) or its square, L the levels of x at (iscale, level_min), in C's order */
INLINE v4f weighted_error(int n, int nmax, const float *x, const float *w, v4f iscale, v4f level_min, v4f scale,
                          v4f min, int use_mad) {
    v4f err = vf(0);
    for (int i = 0; i < n; ++i) {
        v4f xv = vload(x + i * LN);
        v4f l = vlevel(iscale * (xv - level_min), 0, nmax);
        v4f diff = scale * l + min - xv;
        diff = use_mad ? vabs(diff) : diff * diff;
        err += vload(w + i * LN) * diff;
    }
    return err;
}

/* x ~ scale * L + min (min <= 0). x, w [n][LN] -> scale[LN], the_min[LN] (= -min), L[n][LN] in 0..nmax.
   qkx3: the degenerate test is max <= min instead of max == min. An accepted step moves min, which the later
   steps use, as in C; the accepted levels are rebuilt at the end from the accepted (iscale, min). */
static void make_qkx_half(int n, int nmax, const float *x, const float *w, float rmin, float rdelta, int nstep,
                          int use_mad, int qkx3, float *scale_out, float *the_min, uint8_t *L) {
    v4f mn = vload(x), mx = mn, sum_w = vload(w), sum_x = sum_w * mn;
    for (int i = 1; i < n; ++i) {
        v4f xv = vload(x + i * LN), wv = vload(w + i * LN);
        mn = vsel(xv < mn, xv, mn);
        mx = vsel(xv > mx, xv, mx);
        sum_w += wv;
        sum_x += wv * xv;
    }
    mn = vsel(mn > vf(0), vf(0), mn);
    v4i degenerate = qkx3 ? (mx <= mn) : (mx == mn);
    v4f iscale = vf((float)nmax) / (mx - mn);
    v4f scale = vf(1) / iscale, cur_min = mn, best_iscale = iscale, best_min = mn;
    v4f best = weighted_error(n, nmax, x, w, iscale, mn, scale, mn, use_mad);
    for (int is = 0; is <= nstep; ++is) {
        iscale = vf(rmin + rdelta * (float)is + (float)nmax) / (mx - cur_min);
        v4f sum_l = vf(0), sum_l2 = vf(0), sum_xl = vf(0);
        for (int i = 0; i < n; ++i) {
            v4f xv = vload(x + i * LN), wv = vload(w + i * LN);
            v4f l = vlevel(iscale * (xv - cur_min), 0, nmax);
            sum_l += wv * l;
            sum_l2 += wv * l * l;
            sum_xl += wv * l * xv;
        }
        v4f det = sum_w * sum_l2 - sum_l * sum_l;
        v4f this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        v4f this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        v4i positive = this_min > vf(0);
        this_min = vsel(positive, vf(0), this_min);
        this_scale = vsel(positive, sum_xl / sum_l2, this_scale);
        v4f err = weighted_error(n, nmax, x, w, iscale, cur_min, this_scale, this_min, use_mad);
        v4i take = (det > vf(0)) & (err < best);
        best = vsel(take, err, best);
        scale = vsel(take, this_scale, scale);
        best_iscale = vsel(take, iscale, best_iscale);
        best_min = vsel(take, cur_min, best_min);
        cur_min = vsel(take, this_min, cur_min);
    }
    for (int i = 0; i < n; ++i) {
        v4i l = vclamp(vnearest(best_iscale * (vload(x + i * LN) - best_min)), 0, nmax);
        l = vseli(degenerate, vi(0), l);
        for (int b = 0; b < VL; ++b) L[i * LN + b] = (uint8_t)l[b];
    }
    scale = vsel(degenerate, vf(0), scale);
    v4f m = vsel(degenerate, -mn, -cur_min);
    for (int b = 0; b < VL; ++b) {
        scale_out[b] = lane(scale, b);
        the_min[b] = lane(m, b);
    }
}

static void make_qkx_lanes(int n, int nmax, const float *x, const float *w, float rmin, float rdelta, int nstep,
                           int use_mad, int qkx3, float *scale_out, float *the_min, uint8_t *L) {
    for (int h = 0; h < LN; h += VL)
        make_qkx_half(n, nmax, x + h, w + h, rmin, rdelta, nstep, use_mad, qkx3, scale_out + h, the_min + h, L + h);
}

/* ---- make_qp_quants: non-negative values (sub-block scales or mins) -> 0..nmax ------------------------------ */

float make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = x[i] > max ? x[i] : max;
    if (max < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = (float)nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale * L[i];
        best_mse += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float iscale_is = (0.1f * (float)is + (float)nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale_is * x[i]);
            l = l < nmax ? l : nmax;
            float diff = x[i] - scale_is * (float)l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = l < nmax ? l : nmax;
        L[i] = (uint8_t)l;
        float w = qw[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = qw[i];
            float slx = sumlx - w * x[i] * L[i];
            float sl2 = suml2 - w * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = new_l < nmax ? new_l : nmax;
                if (new_l != L[i]) {
                    slx += w * x[i] * (float)new_l;
                    sl2 += w * (float)new_l * (float)new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* ---- make_q3_quants(n, nmax, x, L, do_rmse = true) -------------------------------------------------------- */

static float make_q3_quants(int n, int nmax, const float *x, uint8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = (float)(-nmax) / max;
    int8_t Li[32];
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
        Li[i] = (int8_t)l;
        float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * Li[i];
            if (slx > 0) {
                float sl2 = suml2 - w * Li[i] * Li[i];
                int new_l = clampi(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
                if (new_l != Li[i]) {
                    slx += w * x[i] * (float)new_l;
                    sl2 += w * (float)new_l * (float)new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        Li[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)(Li[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* ---- shared k-quant pieces -------------------------------------------------------------------------------- */

/* sum of x*x over n elements, in order */
static inline float sum_sq(const float *x, int n) {
    float s = 0;
    for (int i = 0; i < n; ++i) s += x[i] * x[i];
    return s;
}

/* weight = qw * sqrtf(sigma2 + x*x) */
static inline void imatrix_weights(const float *x, const float *qw, float sigma2, float *w, int n) {
    for (int i = 0; i < n; ++i) w[i] = qw[i] * sqrtf(sigma2 + x[i] * x[i]);
}

/* 2-bit levels of a super-block -> qs[64]: byte 32h + l holds elements 128h + l + 32k at bits 2k */
static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
            const uint8_t *q = L + 128 * h + l;
            qs[32 * h + l] = (uint8_t)(q[0] | (q[32] << 2) | (q[64] << 4) | (q[96] << 6));
        }
}

/* Q4_K/Q5_K scales[12] from 8 six-bit scales and mins (uint8, spilling as the C packing does) */
static void pack_scale_min_k4(const uint8_t *ls, const uint8_t *lm, uint8_t *s) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            s[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            s[j] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
}

static void get_scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* move lane results of group g (sub-blocks LN*g ..) back to block order: L[sub * len + i] */
static void from_lanes_u8(uint8_t *dst, const uint8_t *lanes, int len, int g) {
    for (int b = 0; b < LN; ++b)
        for (int i = 0; i < len; ++i) dst[(g * LN + b) * len + i] = lanes[i * LN + b];
}

/* ---- Q6_K (quantize_row_q6_K_ref, and _impl with the importance used directly as weights) ----------------- */

static void q6_k_row(const float *x, uint8_t *y, int64_t n, const float *imp) {
    float xl[16 * LN], wl[16 * LN], scales[16];
    uint8_t L[QK_K], Ll[16 * LN];
    for (int64_t ib = 0; ib < n / QK_K; ++ib, x += QK_K, y += 210) {
        const float *qw = imp ? imp + ib * QK_K : NULL;
        for (int g = 0; g < 2; ++g) {
            to_lanes(xl, x + g * 128, 16, 16, LN);
            if (qw) to_lanes(wl, qw + g * 128, 16, 16, LN);
            else
                for (int k = 0; k < 16 * LN; ++k) wl[k] = xl[k] * xl[k];
            make_qx_lanes(16, 32, xl, wl, scales + g * LN, Ll);
            from_lanes_u8(L, Ll, 16, g);
        }
        float max_scale = 0, max_abs = 0;
        for (int j = 0; j < 16; ++j) {
            float a = fabsf(scales[j]);
            if (a > max_abs) { max_abs = a; max_scale = scales[j]; }
        }
        if (max_abs < GROUP_MAX_EPS) {
            memset(y, 0, 210);
            continue;
        }
        float iscale = -128.f / max_scale;
        float d = f16_round(1 / iscale);
        int8_t sc[16];
        for (int j = 0; j < 16; ++j) {
            int l = nearest_int(iscale * scales[j]);
            sc[j] = (int8_t)(l < 127 ? l : 127);
        }
        for (int j = 0; j < 16; ++j) {
            float dq = d * (float)sc[j];
            if (!dq) continue;
            for (int i = 0; i < 16; ++i)
                L[16 * j + i] = (uint8_t)(clampi(nearest_int(x[16 * j + i] / dq), -32, 31) + 32);
        }
        uint8_t *ql = y, *qh = y + 128;
        for (int h = 0; h < 2; ++h)
            for (int l = 0; l < 32; ++l) {
                const uint8_t *q = L + 128 * h + l;
                ql[64 * h + l] = (uint8_t)((q[0] & 0xF) | ((q[64] & 0xF) << 4));
                ql[64 * h + 32 + l] = (uint8_t)((q[32] & 0xF) | ((q[96] & 0xF) << 4));
                qh[32 * h + l] = (uint8_t)((q[0] >> 4) | ((q[32] >> 4) << 2) | ((q[64] >> 4) << 4) | ((q[96] >> 4) << 6));
            }
        memcpy(y + 192, sc, 16);
        put_f16(y + 208, d);
    }
}

/* ---- Q4_K / Q5_K ------------------------------------------------------------------------------------------ */

static void q45_k_row(const float *x, uint8_t *y, int64_t n, const float *imp, int nmax) {
    float xl[32 * LN], wl[32 * LN], w[QK_K], scales[8], mins[8];
    uint8_t L[QK_K], Ll[32 * LN], ls[8], lm[8];
    int bytes = nmax == 15 ? 144 : 176;
    for (int64_t ib = 0; ib < n / QK_K; ++ib, x += QK_K, y += bytes) {
        float d, dmin;
        to_lanes(xl, x, 32, 32, LN);
        if (!imp) { /* quantize_row_q{4,5}_K_ref */
            for (int j = 0; j < 8; ++j) {
                float av_x = sqrtf(sum_sq(x + 32 * j, 32) / 32);
                for (int i = 0; i < 32; ++i) w[32 * j + i] = av_x + fabsf(x[32 * j + i]);
            }
            to_lanes(wl, w, 32, 32, LN);
            if (nmax == 15) make_qkx_lanes(32, 15, xl, wl, -1.0f, 0.1f, 20, 0, 0, scales, mins, Ll);
            else make_qkx_lanes(32, 31, xl, wl, -0.5f, 0.1f, 15, 0, 0, scales, mins, Ll);
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 8; ++j) {
                if (scales[j] > max_scale) max_scale = scales[j];
                if (mins[j] > max_min) max_min = mins[j];
            }
            float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
            float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
            for (int j = 0; j < 8; ++j) {
                uint8_t a = (uint8_t)nearest_int(inv_scale * scales[j]);
                uint8_t m = (uint8_t)nearest_int(inv_min * mins[j]);
                ls[j] = a < 63 ? a : 63;
                lm[j] = m < 63 ? m : 63;
            }
            d = max_scale / 63.f;
            dmin = max_min / 63.f;
        } else { /* quantize_row_q{4,5}_K_impl */
            const float *qw = imp + ib * QK_K;
            float sigma2 = 2 * sum_sq(x, QK_K) / QK_K;
            float sw[8];
            imatrix_weights(x, qw, sigma2, w, QK_K);
            for (int j = 0; j < 8; ++j) {
                float s = 0;
                for (int i = 0; i < 32; ++i) s += w[32 * j + i];
                sw[j] = s;
            }
            to_lanes(wl, w, 32, 32, LN);
            make_qkx_lanes(32, nmax, xl, wl, -0.9f, 0.05f, 36, 0, 1, scales, mins, Ll);
            d = make_qp_quants(8, 63, scales, ls, sw);
            dmin = make_qp_quants(8, 63, mins, lm, sw);
            if (nmax == 31)
                for (int j = 0; j < 8; ++j) {
                    ls[j] = ls[j] < 63 ? ls[j] : 63;
                    lm[j] = lm[j] < 63 ? lm[j] : 63;
                }
        }
        from_lanes_u8(L, Ll, 32, 0);
        uint8_t *s = y + 4;
        pack_scale_min_k4(ls, lm, s);
        d = f16_round(d);
        dmin = f16_round(dmin);
        put_f16(y, d);
        put_f16(y + 2, dmin);
        for (int j = 0; j < 8; ++j) {
            int sc, m;
            get_scale_min_k4(j, s, &sc, &m);
            float dq = d * (float)sc;
            if (!dq) continue;
            float dm = dmin * (float)m;
            for (int i = 0; i < 32; ++i)
                L[32 * j + i] = (uint8_t)clampi(nearest_int((x[32 * j + i] + dm) / dq), 0, nmax);
        }
        if (nmax == 15) {
            uint8_t *qs = y + 16;
            for (int c = 0; c < 4; ++c)
                for (int l = 0; l < 32; ++l) qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
        } else {
            uint8_t *qh = y + 16, *qs = y + 48;
            memset(qh, 0, 32);
            for (int c = 0; c < 4; ++c)
                for (int l = 0; l < 32; ++l) {
                    uint8_t a = L[64 * c + l], b = L[64 * c + 32 + l];
                    qs[32 * c + l] = (uint8_t)((a & 0xF) | ((b & 0xF) << 4));
                    qh[l] |= (uint8_t)(((a >> 4) << (2 * c)) | ((b >> 4) << (2 * c + 1)));
                }
        }
    }
}

/* ---- Q2_K ------------------------------------------------------------------------------------------------- */

static void q2_k_row(const float *x, uint8_t *y, int64_t n, const float *imp) {
    float xl[16 * LN], wl[16 * LN], w[QK_K], scales[16], mins[16];
    uint8_t L[QK_K], Ll[16 * LN], sc[16];
    for (int64_t ib = 0; ib < n / QK_K; ++ib, x += QK_K, y += 84) {
        float d, dmin;
        if (!imp) { /* quantize_row_q2_K_ref */
            for (int i = 0; i < QK_K; ++i) w[i] = fabsf(x[i]);
        } else {
            imatrix_weights(x, imp + ib * QK_K, sum_sq(x, QK_K) / QK_K, w, QK_K);
        }
        for (int g = 0; g < 2; ++g) {
            to_lanes(xl, x + g * 128, 16, 16, LN);
            to_lanes(wl, w + g * 128, 16, 16, LN);
            if (!imp) make_qkx_lanes(16, 3, xl, wl, -0.5f, 0.1f, 15, 1, 0, scales + g * LN, mins + g * LN, Ll);
            else make_qkx_lanes(16, 3, xl, wl, -0.9f, 0.05f, 36, 0, 1, scales + g * LN, mins + g * LN, Ll);
            from_lanes_u8(L, Ll, 16, g);
        }
        if (!imp) {
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 16; ++j) {
                if (scales[j] > max_scale) max_scale = scales[j];
                if (mins[j] > max_min) max_min = mins[j];
            }
            if (max_scale > 0) {
                float iscale = 15.f / max_scale;
                for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)nearest_int(iscale * scales[j]);
                d = max_scale / 15.f;
            } else {
                memset(sc, 0, 16);
                d = 0;
            }
            if (max_min > 0) {
                float iscale = 15.f / max_min;
                for (int j = 0; j < 16; ++j) sc[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
                dmin = max_min / 15.f;
            } else {
                dmin = 0;
            }
        } else {
            float sw[16];
            uint8_t Ls[16], Lm[16];
            for (int j = 0; j < 16; ++j) {
                float s = 0;
                for (int i = 0; i < 16; ++i) s += w[16 * j + i];
                sw[j] = s;
            }
            d = make_qp_quants(16, 15, scales, Ls, sw);
            dmin = make_qp_quants(16, 15, mins, Lm, sw);
            for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
        }
        d = f16_round(d);
        dmin = f16_round(dmin);
        for (int j = 0; j < 16; ++j) {
            float dq = d * (float)(sc[j] & 0xF);
            if (!dq) continue;
            float dm = dmin * (float)(sc[j] >> 4);
            for (int i = 0; i < 16; ++i)
                L[16 * j + i] = (uint8_t)clampi(nearest_int((x[16 * j + i] + dm) / dq), 0, 3);
        }
        memcpy(y, sc, 16);
        pack_2bit(L, y + 16);
        put_f16(y + 80, d);
        put_f16(y + 82, dmin);
    }
}

/* ---- Q3_K ------------------------------------------------------------------------------------------------- */

static void q3_k_row(const float *x, uint8_t *y, int64_t n, const float *imp) {
    float xl[16 * LN], wl[16 * LN], w[QK_K], scales[16];
    uint8_t L[QK_K], Ll[16 * LN], l6[16];
    for (int64_t ib = 0; ib < n / QK_K; ++ib, x += QK_K, y += 110) {
        float d;
        if (!imp) { /* quantize_row_q3_K_ref */
            for (int j = 0; j < 16; ++j) scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
            float max_scale = 0, amax = 0;
            for (int j = 0; j < 16; ++j) {
                float a = fabsf(scales[j]);
                if (a > amax) { amax = a; max_scale = scales[j]; }
            }
            if (max_scale != 0) {
                float iscale = -32.f / max_scale;
                for (int j = 0; j < 16; ++j) {
                    int8_t l = (int8_t)nearest_int(iscale * scales[j]);
                    l6[j] = (uint8_t)(clampi(l, -32, 31) + 32);
                }
                d = 1 / iscale;
            } else {
                memset(l6, 0, 16);
                d = 0;
            }
        } else { /* quantize_row_q3_K_impl */
            float sigma2 = 2 * sum_sq(x, QK_K) / QK_K, sw[16];
            imatrix_weights(x, imp + ib * QK_K, sigma2, w, QK_K);
            for (int j = 0; j < 16; ++j) {
                float s = 0;
                for (int i = 0; i < 16; ++i) s += w[16 * j + i];
                sw[j] = s;
            }
            for (int g = 0; g < 2; ++g) {
                to_lanes(xl, x + g * 128, 16, 16, LN);
                to_lanes(wl, w + g * 128, 16, 16, LN);
                make_qx_lanes(16, 4, xl, wl, scales + g * LN, Ll);
                from_lanes_u8(L, Ll, 16, g);
            }
            d = make_qx_one(16, 32, scales, sw, l6);
        }
        d = f16_round(d);
        for (int j = 0; j < 16; ++j) {
            float dq = d * (float)((int)l6[j] - 32);
            if (!dq) continue;
            for (int i = 0; i < 16; ++i)
                L[16 * j + i] = (uint8_t)(clampi(nearest_int(x[16 * j + i] / dq), -4, 3) + 4);
        }
        uint8_t *hmask = y, *qs = y + 32, *s = y + 96;
        memset(hmask, 0, 32);
        uint8_t low[QK_K];
        for (int i = 0; i < QK_K; ++i) {
            hmask[i % 32] |= (uint8_t)((L[i] >> 2) << (i / 32));
            low[i] = L[i] & 3;
        }
        pack_2bit(low, qs);
        memset(s, 0, 12);
        for (int j = 0; j < 16; ++j) {
            uint8_t l = l6[j];
            if (j < 8) s[j] = l & 0xF;
            else s[j - 8] |= (uint8_t)((l & 0xF) << 4);
            s[8 + j % 4] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
        }
        put_f16(y + 108, d);
    }
}

/* ---- IQ4_NL / IQ4_XS (quantize_row_iq4_nl_impl, ntry = 7) --------------------------------------------------- */

#define IQ4_NTRY 7

/* kvalues_iq4nl[best_index_int8(v)] for a lane vector: -127 plus the codebook steps of every midpoint <= v
   (small integers: the float sum is exact); NaN takes the last entry, as iq4_index */
INLINE v4f iq4_value(v4f v) {
    v4f q = vf(KVALUES[0]);
    for (int m = 0; m < 15; ++m) q += vsel(v >= vf(IQ4_MIDS[m]), vf(KVALUES[m + 1] - KVALUES[m]), vf(0));
    return vsel(v != v, vf(KVALUES[15]), q);
}

/* per-sub-block scale search: x, w [32][LN] -> scale[LN] */
static void iq4_scales_half(const float *x, const float *w, float *scale_out) {
    v4f mx = vf(0), amax = vf(0), d = vf(0), best = vf(0);
    for (int i = 0; i < 32; ++i) {
        v4f xv = vload(x + i * LN), ax = vabs(xv);
        v4i more = ax > amax;
        amax = vsel(more, ax, amax);
        mx = vsel(more, xv, mx);
    }
    for (int itry = -IQ4_NTRY - 1; itry <= IQ4_NTRY; ++itry) {
        v4f id = itry < -IQ4_NTRY ? vf(1) / (-mx / vf(KVALUES[0])) : vf((float)itry + KVALUES[0]) / mx;
        v4f sumqx = vf(0), sumq2 = vf(0);
        for (int i = 0; i < 32; ++i) {
            v4f xv = vload(x + i * LN);
            v4f q = iq4_value(id * xv);
            v4f wq = vload(w + i * LN) * q;
            sumqx += wq * xv;
            sumq2 += wq * q;
        }
        if (itry < -IQ4_NTRY) {
            d = vsel(sumq2 > vf(0), sumqx / sumq2, vf(0));
            best = d * sumqx;
        } else {
            v4i take = (sumq2 > vf(0)) & (sumqx * sumqx > best * sumq2);
            d = vsel(take, sumqx / sumq2, d);
            best = vsel(take, d * sumqx, best);
        }
    }
    d = vsel(amax < vf(GROUP_MAX_EPS), vf(0), d);
    for (int b = 0; b < VL; ++b) scale_out[b] = lane(d, b);
}

static void iq4_scales_lanes(const float *x, const float *w, float *scale_out) {
    for (int h = 0; h < LN; h += VL) iq4_scales_half(x + h, w + h, scale_out + h);
}

static void iq4_pack(const float *x, float idl, uint8_t *qs) {
    for (int j = 0; j < 16; ++j)
        qs[j] = (uint8_t)(iq4_index(idl * x[j]) | (iq4_index(idl * x[j + 16]) << 4));
}

/* weights of `count` sub-blocks (32 each) into lanes: x*x, or qw * sqrtf(sigma2 + x*x) with sigma2 over each
   super-block of `super` elements */
static void iq4_weights(const float *x, const float *qw, int super, int count, float *w) {
    if (!qw) {
        for (int i = 0; i < 32 * count; ++i) w[i] = x[i] * x[i];
        return;
    }
    for (int s = 0; s < 32 * count; s += super)
        imatrix_weights(x + s, qw + s, sum_sq(x + s, super) * (2.f / (float)super), w + s, super);
}

static void iq4_nl_row(const float *x, uint8_t *y, int64_t n, const float *imp) {
    float xl[32 * LN], wl[32 * LN], w[32 * LN], scales[LN];
    int64_t nb = n / 32;
    for (int64_t b0 = 0; b0 < nb; b0 += LN) {
        int count = nb - b0 < LN ? (int)(nb - b0) : LN;
        const float *xb = x + 32 * b0;
        iq4_weights(xb, imp ? imp + 32 * b0 : NULL, 32, count, w);
        to_lanes(xl, xb, 32, 32, count);
        to_lanes(wl, w, 32, 32, count);
        iq4_scales_lanes(xl, wl, scales);
        for (int b = 0; b < count; ++b) {
            uint8_t *yb = y + 18 * (b0 + b);
            put_f16(yb, scales[b]);
            iq4_pack(xb + 32 * b, scales[b] ? 1 / scales[b] : 0.0f, yb + 2);
        }
    }
}

static void iq4_xs_row(const float *x, uint8_t *y, int64_t n, const float *imp) {
    float xl[32 * LN], wl[32 * LN], w[QK_K], scales[8];
    for (int64_t ib = 0; ib < n / QK_K; ++ib, x += QK_K, y += 136) {
        iq4_weights(x, imp ? imp + ib * QK_K : NULL, QK_K, 8, w);
        to_lanes(xl, x, 32, 32, LN);
        to_lanes(wl, w, 32, 32, LN);
        iq4_scales_lanes(xl, wl, scales);
        float max_scale = 0, amax = 0;
        for (int j = 0; j < 8; ++j) {
            float a = fabsf(scales[j]);
            if (a > amax) { amax = a; max_scale = scales[j]; }
        }
        float d = -max_scale / 32;
        put_f16(y, d);
        float id = d ? 1 / d : 0.f;
        uint16_t scales_h = 0;
        memset(y + 4, 0, 4);
        for (int j = 0; j < 8; ++j) {
            int l = clampi(nearest_int(id * scales[j]), -32, 31);
            float dl = d * (float)l;
            float idl = dl ? 1 / dl : 0.f;
            iq4_pack(x + 32 * j, idl, y + 8 + 16 * j);
            l += 32;
            y[4 + j / 2] |= (uint8_t)((l & 0xF) << (4 * (j % 2)));
            scales_h |= (uint16_t)((l >> 4) << (2 * j));
        }
        y[2] = (uint8_t)(scales_h & 0xff);
        y[3] = (uint8_t)(scales_h >> 8);
    }
}

/* ---- legacy 32-element types ------------------------------------------------------------------------------ */

static void q8_0_row(const float *x, uint8_t *y, int64_t n) {
    for (int64_t ib = 0; ib < n / 32; ++ib, x += 32, y += 34) {
        float amax = 0;
        for (int j = 0; j < 32; ++j) {
            float a = fabsf(x[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.f;
        float id = d ? 1.0f / d : 0.0f;
        put_f16(y, d);
        for (int j = 0; j < 32; ++j) y[2 + j] = (uint8_t)(int8_t)round_away(x[j] * id);
    }
}

/* the element of largest |x| with its sign (first on ties, +0 for zeros) */
static inline float signed_absmax(const float *x, int n) {
    float amax = 0, max = 0;
    for (int j = 0; j < n; ++j) {
        float a = fabsf(x[j]);
        if (a > amax) { amax = a; max = x[j]; }
    }
    return max;
}

static void pack_nibbles(const uint8_t *q, uint8_t *qs) {
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)(q[j] | (q[j + 16] << 4));
}

static void pack5(const uint8_t *q, uint8_t *y) { /* qh (4 bytes LE) then qs */
    uint32_t qh = 0;
    uint8_t low[32];
    for (int j = 0; j < 32; ++j) {
        qh |= (uint32_t)(q[j] >> 4) << j;
        low[j] = q[j] & 0xF;
    }
    for (int k = 0; k < 4; ++k) y[k] = (uint8_t)(qh >> (8 * k));
    pack_nibbles(low, y + 4);
}

/* Q4_0 (half 8) / Q5_0 (half 16), reference: d = max / -half; q = min(2half-1, (int8)(x * id + half + 0.5)) */
static void q_0_row(const float *x, uint8_t *y, int64_t n, int half) {
    int bytes = half == 8 ? 18 : 22;
    uint8_t q[32];
    for (int64_t ib = 0; ib < n / 32; ++ib, x += 32, y += bytes) {
        float d = signed_absmax(x, 32) / (float)(-half);
        float id = d ? 1.0f / d : 0.0f;
        put_f16(y, d);
        float off = (float)half + 0.5f;
        for (int j = 0; j < 32; ++j) {
            int v = (int8_t)(x[j] * id + off);
            q[j] = (uint8_t)(v < 2 * half - 1 ? v : 2 * half - 1);
        }
        if (half == 8) pack_nibbles(q, y + 2);
        else pack5(q, y + 2);
    }
}

/* Q4_1 (top 15) / Q5_1 (top 31), reference: d = (max - min) / top; q = (int)((x - min) * id + 0.5) */
static void q_1_row(const float *x, uint8_t *y, int64_t n, int top) {
    int bytes = top == 15 ? 20 : 24;
    uint8_t q[32];
    for (int64_t ib = 0; ib < n / 32; ++ib, x += 32, y += bytes) {
        float min = x[0], max = x[0];
        for (int j = 1; j < 32; ++j) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        float d = (max - min) / (float)top;
        float id = d ? 1.0f / d : 0.0f;
        put_f16(y, d);
        put_f16(y + 2, min);
        for (int j = 0; j < 32; ++j) {
            int v = (int8_t)((x[j] - min) * id + 0.5f);
            q[j] = (uint8_t)(v < top ? v : top);
        }
        if (top == 15) pack_nibbles(q, y + 4);
        else pack5(q, y + 4);
    }
}

/* the importance-weighted legacy types (quantize_row_q{4_0,4_1,5_0,5_1}_impl): sigma2 over the whole row,
   weight = qw * sqrtf(sigma2 + x*x); Q4_0/Q5_0 make_qx_quants(32, 8 | 16), Q4_1/Q5_1 make_qkx3_quants(32,
   15 | 31, -0.9, 0.05, 36); the levels are stored as the search leaves them */
static void legacy_impl_row(const float *x, uint8_t *y, int64_t n, const float *imp, int type) {
    int nmax = type == 2 ? 8 : type == 6 ? 16 : type == 3 ? 15 : 31;
    int bytes = type == 2 ? 18 : type == 6 ? 22 : type == 3 ? 20 : 24;
    int with_min = type == 3 || type == 7;
    float sigma2 = sum_sq(x, (int)n) / (float)n;
    float xl[32 * LN], wl[32 * LN], w[32 * LN], scale[LN], the_min[LN];
    uint8_t Ll[32 * LN], L[32 * LN];
    int64_t nb = n / 32;
    for (int64_t b0 = 0; b0 < nb; b0 += LN) {
        int count = nb - b0 < LN ? (int)(nb - b0) : LN;
        const float *xb = x + 32 * b0;
        imatrix_weights(xb, imp + 32 * b0, sigma2, w, 32 * count);
        to_lanes(xl, xb, 32, 32, count);
        to_lanes(wl, w, 32, 32, count);
        if (with_min) make_qkx_lanes(32, nmax, xl, wl, -0.9f, 0.05f, 36, 0, 1, scale, the_min, Ll);
        else make_qx_lanes(32, nmax, xl, wl, scale, Ll);
        from_lanes_u8(L, Ll, 32, 0);
        for (int b = 0; b < count; ++b) {
            uint8_t *yb = y + bytes * (b0 + b);
            put_f16(yb, scale[b]);
            int off = 2;
            if (with_min) {
                put_f16(yb + 2, -the_min[b]);
                off = 4;
            }
            if (nmax == 8 || nmax == 15) pack_nibbles(L + 32 * b, yb + off);
            else pack5(L + 32 * b, yb + off);
        }
    }
}

/* ---- entry points ----------------------------------------------------------------------------------------- */

/* The grid i-quants' codebook (level indices, `points` x values per point), once per type before its first
   encode; kernels.py takes it from gguf-py. */
int qk_iq_grid_init(int type, const uint8_t *levels, int points) {
    if (type == QK_IQ3_XXS || type == QK_IQ3_S) return qk_iq3_grid_init(type, levels, points);
    return qk_iq2_grid_init(type, levels, points);
}

/* ggml type ids this library encodes (ggml.h enum ggml_type) */
int qk_supported(int type) {
    switch (type) {
    case 2: case 3: case 6: case 7: case 8:     /* Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 */
    case 10: case 11: case 12: case 13: case 14: /* Q2_K Q3_K Q4_K Q5_K Q6_K */
    case 20: case 23:                            /* IQ4_NL IQ4_XS */
    case 18: case 21:                            /* IQ3_XXS IQ3_S (_ggml_iq3.c) */
    case 16: case 17: case 22: case 19: case 29: /* IQ2_XXS IQ2_XS IQ2_S IQ1_S IQ1_M (_ggml_iq2.c) */
        return 1;
    default:
        return 0;
    }
}

/* rows x n float32 (contiguous) -> the type's block bytes, row after row; `imp`: the importance vector [n]
   or NULL. Returns 0, or -1 for a type this library does not encode or n not a multiple of its block. */
int qk_quantize(int type, const float *x, const float *imp, uint8_t *y, int64_t rows, int64_t n) {
    if (!qk_supported(type)) return -1;
    if (type == QK_IQ3_XXS || type == QK_IQ3_S) return qk_iq3_quantize(type, x, imp, y, rows, n);
    if (qk_iq2_supported(type)) return qk_iq2_quantize(type, x, imp, y, rows, n);
    int super = (type >= 10 && type <= 14) || type == 23;
    if (n % (super ? QK_K : 32)) return -1;
    int64_t bytes;
    switch (type) {
    case 2: bytes = 18; break;
    case 3: bytes = 20; break;
    case 6: bytes = 22; break;
    case 7: bytes = 24; break;
    case 8: bytes = 34; break;
    case 10: bytes = 84; break;
    case 11: bytes = 110; break;
    case 12: bytes = 144; break;
    case 13: bytes = 176; break;
    case 14: bytes = 210; break;
    case 20: bytes = 18; break;
    default: bytes = 136; break;
    }
    int64_t row_bytes = n / (super ? QK_K : 32) * bytes;
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * n;
        uint8_t *yr = y + r * row_bytes;
        switch (type) {
        case 8: q8_0_row(xr, yr, n); break;
        case 2: case 6:
            if (imp) legacy_impl_row(xr, yr, n, imp, type);
            else q_0_row(xr, yr, n, type == 2 ? 8 : 16);
            break;
        case 3: case 7:
            if (imp) legacy_impl_row(xr, yr, n, imp, type);
            else q_1_row(xr, yr, n, type == 3 ? 15 : 31);
            break;
        case 10: q2_k_row(xr, yr, n, imp); break;
        case 11: q3_k_row(xr, yr, n, imp); break;
        case 12: q45_k_row(xr, yr, n, imp, 15); break;
        case 13: q45_k_row(xr, yr, n, imp, 31); break;
        case 14: q6_k_row(xr, yr, n, imp); break;
        case 20: iq4_nl_row(xr, yr, n, imp); break;
        case 23: iq4_xs_row(xr, yr, n, imp); break;
        }
    }
    return 0;
}
