/* quantkit's compiled grid i-quants: IQ2_XXS, IQ2_XS, IQ2_S (2-bit, 8-element grid points of levels 1, 3, 5 and
   a sign per element) and IQ1_S, IQ1_M (1-bit, grid points of -1, 0, 1 plus a shift per sub-block).

   Written for quantkit; the algorithms are those of ggml-quants.c (ggml-org/llama.cpp: iq2xs_init_impl,
   quantize_row_iq2_xxs_impl / _xs_impl / _s_impl, quantize_row_iq1_s_impl / _m_impl), the block layouts those
   of ggml-common.h. Nothing here is copied from ggml, and the grids are not in this file: quantkit/quant/
   ggml_iq2.py takes them from gguf-py and kernels.py passes them to qk_iq_grid_init() once per type.

   Exactness rules as in _ggml_kernels.c: every float operation a separately rounded float32 operation in the
   order of ggml's C expressions, sums sequential, no contraction (-ffp-contract=off). The neighbour lists are
   ordered by (distance, grid index) exactly as ggml's qsort orders them, so the searches visit candidates in
   ggml's order and keep the same first minimum. IQ1's sort of a sub-block by value uses libc's qsort with
   ggml's element layout and comparator: ties (equal values) then land in ggml's order, whatever that qsort
   does with them, because ggml calls the same qsort of the same C library in the same process. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_ggml_kernels.h"

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f
#define GROUP_MAX_EPS_IQ2_S 1e-8f
#define GROUP_MAX_EPS_IQ1_M 1e-7f
#define GROUP_MAX_EPS_IQ1_S 1e-12f
#define IQ1_DELTA 0.125f       /* IQ1S_DELTA == IQ1M_DELTA */
#define KMAP_SIZE 43692        /* 2-bit codes of 8 elements up to 0xAAAA (all levels 2), + 1, as ggml sizes it */
#define MAX_D2 (8 * 36 + 1)    /* squared distances between level vectors of 1, 3, 5, 7 */

/* ---- grids, code -> grid index map, neighbour lists (iq2xs_init_impl) --------------------------------------- */

typedef struct {
    int size;             /* grid points */
    int8_t *grid;         /* [size][8]: 2*level + 1 */
    int *map;             /* [KMAP_SIZE]: 2-bit code of 8 levels -> grid index, or -(offset + 1) into neighbours */
    uint16_t *neighbours; /* per off-grid code: count, then grid indices */
} Tables;

static Tables TABLES[4]; /* IQ2_XXS, IQ2_XS, IQ1_S and IQ1_M (one grid), IQ2_S */

static int table_slot(int type) {
    switch (type) {
    case QK_IQ2_XXS: return 0;
    case QK_IQ2_XS: return 1;
    case QK_IQ1_S: case QK_IQ1_M: return 2;
    case QK_IQ2_S: return 3;
    default: return -1;
    }
}

static int grid_size(int type) {
    switch (type) {
    case QK_IQ2_XXS: return 256;
    case QK_IQ2_XS: return 512;
    case QK_IQ1_S: case QK_IQ1_M: return 2048;
    case QK_IQ2_S: return 1024;
    default: return -1;
    }
}

/* nearest grid points kept per off-grid code: those at the nwant smallest distances */
static int nwant(int type) { return type == QK_IQ1_S || type == QK_IQ1_M ? 3 : type == QK_IQ2_S ? 1 : 2; }

static void free_tables(Tables *t) {
    free(t->grid);
    free(t->map);
    free(t->neighbours);
    memset(t, 0, sizeof(*t));
}

/* The neighbours of every code that is not a grid point: ggml sorts all grid points by (squared distance, index)
   and keeps those within the nwant smallest distinct distances. Distances are small integers, so counting
   them gives the same list without the sort: the kept distances in increasing order, each one's grid points in
   increasing index. */
static int build_neighbours(Tables *t, int want) {
    size_t cap = 1 << 16, used = 0;
    uint16_t *list = malloc(cap * sizeof(uint16_t));
    int *d2 = malloc((size_t)t->size * sizeof(int));
    if (!list || !d2) {
        free(list);
        free(d2);
        return -1;
    }
    for (int code = 0; code < KMAP_SIZE; ++code) {
        if (t->map[code] >= 0) continue;
        int pos[8], count[MAX_D2] = {0};
        for (int k = 0; k < 8; ++k) pos[k] = 2 * ((code >> 2 * k) & 3) + 1;
        for (int j = 0; j < t->size; ++j) {
            const int8_t *g = t->grid + 8 * j;
            int s = 0;
            for (int k = 0; k < 8; ++k) s += (g[k] - pos[k]) * (g[k] - pos[k]);
            d2[j] = s;
            ++count[s];
        }
        int kept = 0, limit = -1, n = 0;
        for (int s = 0; s < MAX_D2 && kept < want; ++s) {
            if (count[s]) {
                ++kept;
                limit = s;
                n += count[s];
            }
        }
        if (used + 1 + (size_t)n > cap) {
            while (used + 1 + (size_t)n > cap) cap *= 2;
            uint16_t *grown = realloc(list, cap * sizeof(uint16_t));
            if (!grown) {
                free(list);
                free(d2);
                return -1;
            }
            list = grown;
        }
        t->map[code] = -(int)(used + 1);
        list[used++] = (uint16_t)n;
        for (int s = 0; s <= limit; ++s) {
            if (!count[s]) continue;
            for (int j = 0; j < t->size; ++j) {
                if (d2[j] == s) list[used++] = (uint16_t)j;
            }
        }
    }
    free(d2);
    t->neighbours = list;
    return 0;
}

/* levels: n grid points of 8 levels each (0..2), in grid order. Returns 0 (also when already set up), -1 for a
   type or size this file does not know, -2 when out of memory. Not thread-safe: the caller initialises each
   type once, before encoding with it. */
int qk_iq2_grid_init(int type, const uint8_t *levels, int n) {
    int slot = table_slot(type);
    if (slot < 0 || n != grid_size(type)) return -1;
    Tables *t = &TABLES[slot];
    if (t->grid) return 0;
    t->size = n;
    t->grid = malloc((size_t)n * 8);
    t->map = malloc(KMAP_SIZE * sizeof(int));
    if (!t->grid || !t->map) {
        free_tables(t);
        return -2;
    }
    for (int i = 0; i < KMAP_SIZE; ++i) t->map[i] = -1;
    for (int j = 0; j < n; ++j) {
        int code = 0;
        for (int k = 0; k < 8; ++k) {
            int l = levels[8 * j + k];
            if (l > 2) {
                free_tables(t);
                return -1;
            }
            t->grid[8 * j + k] = (int8_t)(2 * l + 1);
            code |= l << 2 * k;
        }
        t->map[code] = j;
    }
    if (build_neighbours(t, nwant(type))) {
        free_tables(t);
        return -2;
    }
    return 0;
}

static inline const uint16_t *neighbours_of(const Tables *t, int code) {
    return t->neighbours - t->map[code] - 1;
}

static inline int level_code(const int8_t *L) {
    int code = 0;
    for (int i = 0; i < 8; ++i) code |= L[i] << 2 * i;
    return code;
}

/* ---- IQ2: grid search ---------------------------------------------------------------------------------------- */

/* The neighbour of least sum w*(scale*values[level] - x)^2, the first on ties (ggml's iq2_find_best_neighbour with
   values 1, 3, 5; iq1_find_best_neighbour2 with a group's IQ1 values); its levels into L. -1 if none compares
   below FLT_MAX (the sum overflows for |x| around 1e15, or the input is not finite): ggml aborts there, or for IQ1
   scans the whole grid reading x out of bounds. */
static int best_neighbour(const Tables *t, const uint16_t *nb, const float *x, const float *w, float scale,
                          const float *values, int8_t *L) {
    float best = FLT_MAX;
    int index = -1;
    for (int j = 1; j <= nb[0]; ++j) {
        const int8_t *g = t->grid + 8 * nb[j];
        float d2 = 0;
        for (int i = 0; i < 8; ++i) {
            float diff = scale * values[(g[i] - 1) / 2] - x[i];
            d2 += w[i] * diff * diff;
        }
        if (d2 < best) {
            best = d2;
            index = nb[j];
        }
    }
    if (index >= 0) {
        const int8_t *g = t->grid + 8 * index;
        for (int i = 0; i < 8; ++i) L[i] = (int8_t)((g[i] - 1) / 2);
    }
    return index;
}

static const float IQ2_VALUES[3] = {1, 3, 5};  /* the 2-bit grids' levels 0..2, as the stored 2l+1 */

/* Levels of the 8 values for 1/scale `id` (nearest of 1, 3, 5); off the grid, the best neighbour's levels.
   Returns whether the rounded point was on the grid, or -1 when no neighbour could be chosen. */
static int iq2_levels(const Tables *t, const float *xval, const float *waux, float id, float scale, int8_t *L) {
    for (int i = 0; i < 8; ++i) L[i] = (int8_t)clampi(nearest_int(0.5f * (id * xval[i] - 1)), 0, 2);
    int code = level_code(L);
    if (t->map[code] >= 0) return 1;
    return best_neighbour(t, neighbours_of(t, code), xval, waux, scale, IQ2_VALUES, L) < 0 ? -1 : 0;
}

/* sum w*x*q and sum w*q*q over n values with q = 2*L + 1 */
static void iq2_sums(int n, const float *w, const float *xval, const int8_t *L, float *sumqx, float *sumq2) {
    float sx = 0, s2 = 0;
    for (int i = 0; i < n; ++i) {
        float q = (float)(2 * L[i] + 1);
        sx += w[i] * xval[i] * q;
        s2 += w[i] * q * q;
    }
    *sumqx = sx;
    *sumq2 = s2;
}

static float sum_sq(const float *x, int n) {
    float s = 0;
    for (int i = 0; i < n; ++i) s += x[i] * x[i];
    return s;
}

/* |x| of each 8 values with the signs as bits; IQ2_XXS and IQ2_XS keep 7 sign bits per 8 values (an even number
   of negatives), so with an odd count the value of least w*x*x is taken with the wrong sign. */
static uint8_t iq2_signs(const float *xb, const float *w, float *xval, int even) {
    int nflip = 0;
    uint8_t s = 0;
    for (int i = 0; i < 8; ++i) {
        if (xb[i] >= 0) {
            xval[i] = xb[i];
        } else {
            xval[i] = -xb[i];
            ++nflip;
            s |= (uint8_t)(1 << i);
        }
    }
    if (even && nflip % 2) {
        int imin = 0;
        float min = w[0] * xb[0] * xb[0];
        for (int i = 1; i < 8; ++i) {
            float ax = w[i] * xb[i] * xb[i];
            if (ax < min) {
                min = ax;
                imin = i;
            }
        }
        xval[imin] = -xval[imin];
        s ^= (uint8_t)(1 << imin);
    }
    return s;
}

static inline void put_u16(uint8_t *p, unsigned v) {
    p[0] = (uint8_t)(v & 0xff);
    p[1] = (uint8_t)(v >> 8);
}

static inline void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; ++i) p[i] = (uint8_t)(v >> 8 * i);
}

/* a sub-block's scale as the level l of d * (2l + 1), rounded as ggml does: nearest_int(0.5 * (scale/d - 1)) */
static inline int iq_scale_level(float id, float scale, int top) {
    return clampi(nearest_int(0.5f * (id * scale - 1)), 0, top);
}

/* IQ2_XXS: 32-element sub-blocks: 4 grid indices (8 bits each), 4 x 7 sign bits and a 4-bit scale in two
   uint32; the super-block scale d = max/31. */
static int iq2_xxs_row(const Tables *t, const float *x, uint8_t *y, int64_t n, const float *imp) {
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *out = y + 66 * ibl;
        uint32_t q2[16] = {0};
        float scales[8], max_scale = 0;
        float sigma2 = sum_sq(xbl, QK_K) / QK_K;
        for (int ib = 0; ib < 8; ++ib) {
            const float *xb = xbl + 32 * ib, *qw = imp + QK_K * ibl + 32 * ib;
            float weight[32], waux[32], xval[32];
            int8_t L[32], Laux[32];
            uint8_t signs[4];
            for (int i = 0; i < 32; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
            for (int i = 0; i < 32; ++i) waux[i] = sqrtf(weight[i]);
            for (int k = 0; k < 4; ++k) signs[k] = iq2_signs(xb + 8 * k, weight + 8 * k, xval + 8 * k, 1) & 127;
            float max = xval[0];
            for (int i = 1; i < 32; ++i) max = maxf(max, xval[i]);
            scales[ib] = 0;
            if (max < GROUP_MAX_EPS) continue;
            float scale = make_qp_quants(32, 4, xval, (uint8_t *)L, weight);
            float eff_max = scale * 3;
            if (eff_max <= 0) continue;
            float best = 0;
            for (int is = -6; is <= 6; ++is) {
                float id = (5 + (float)is * 0.1f) / eff_max;
                float this_scale = 1 / id;
                for (int k = 0; k < 4; ++k) {
                    if (iq2_levels(t, xval + 8 * k, waux + 8 * k, id, this_scale, Laux + 8 * k) < 0) return -3;
                }
                float sumqx, sumq2;
                iq2_sums(32, weight, xval, Laux, &sumqx, &sumq2);
                if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                    scale = sumqx / sumq2;
                    best = scale * sumqx;
                    memcpy(L, Laux, 32);
                }
            }
            if (scale > 0) {
                float id = 1 / scale;
                for (int k = 0; k < 4; ++k) {
                    if (iq2_levels(t, xval + 8 * k, waux + 8 * k, id, scale, L + 8 * k) < 0) return -3;
                }
                float sumqx, sumq2;
                iq2_sums(32, weight, xval, L, &sumqx, &sumq2);
                if (sumq2 > 0) scale = sumqx / sumq2;
            }
            if (scale < 0) { /* a flipped sign can make the best fit negative: flip every sign instead */
                scale = -scale;
                for (int k = 0; k < 4; ++k) signs[k] = (uint8_t)(~signs[k] & 127);
            }
            for (int k = 0; k < 4; ++k) {
                int index = t->map[level_code(L + 8 * k)];
                if (index < 0) return -3;
                q2[2 * ib] |= (uint32_t)index << 8 * k;
                q2[2 * ib + 1] |= (uint32_t)signs[k] << 7 * k;
            }
            scales[ib] = scale;
            max_scale = maxf(max_scale, scale);
        }
        if (!max_scale) {
            memset(out, 0, 66);
            continue;
        }
        float d = max_scale / 31;
        put_u16(out, fp32_to_fp16(d));
        float id = 1 / d;
        for (int ib = 0; ib < 8; ++ib) q2[2 * ib + 1] |= (uint32_t)iq_scale_level(id, scales[ib], 15) << 28;
        for (int i = 0; i < 16; ++i) put_u32(out + 2 + 4 * i, q2[i]);
    }
    return 0;
}

/* The 16-element sub-block search shared by IQ2_XS and IQ2_S: scale and levels (L) of the best of 19 trial
   scales around max/5, the off-grid halves re-rounded with that scale. Returns 0, or -3. */
static int iq2_search16(const Tables *t, const float *xval, const float *weight, const float *waux, float max,
                        float *scale_out, int8_t *L) {
    int8_t Laux[16];
    int on_grid[2] = {1, 1}, on_grid_aux[2];
    float best = 0, scale = max / 5;
    memset(L, 0, 16);
    for (int is = -9; is <= 9; ++is) {
        float id = (5 + (float)is * 0.1f) / max;
        float this_scale = 1 / id;
        for (int k = 0; k < 2; ++k) {
            on_grid_aux[k] = iq2_levels(t, xval + 8 * k, waux + 8 * k, id, this_scale, Laux + 8 * k);
            if (on_grid_aux[k] < 0) return -3;
        }
        float sumqx, sumq2;
        iq2_sums(16, weight, xval, Laux, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, 16);
            on_grid[0] = on_grid_aux[0];
            on_grid[1] = on_grid_aux[1];
        }
    }
    if ((!on_grid[0] || !on_grid[1]) && scale > 0) {
        float id = 1 / scale;
        for (int k = 0; k < 2; ++k) {
            if (on_grid[k]) continue;
            if (iq2_levels(t, xval + 8 * k, waux + 8 * k, id, scale, L + 8 * k) < 0) return -3;
        }
        float sumqx, sumq2;
        iq2_sums(16, weight, xval, L, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    *scale_out = scale;
    return 0;
}

/* IQ2_XS: 16-element sub-blocks: per 8 values a uint16 of a 9-bit grid index and 7 sign bits; 4-bit scales. */
static int iq2_xs_row(const Tables *t, const float *x, uint8_t *y, int64_t n, const float *imp) {
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *out = y + 74 * ibl;
        uint16_t q2[32] = {0};
        float scales[16], max_scale = 0;
        float sigma2 = sum_sq(xbl, QK_K) / QK_K;
        for (int ib = 0; ib < 16; ++ib) {
            const float *xb = xbl + 16 * ib, *qw = imp + QK_K * ibl + 16 * ib;
            float weight[16], waux[16], xval[16], scale;
            int8_t L[16];
            uint8_t signs[2];
            for (int i = 0; i < 16; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
            for (int i = 0; i < 16; ++i) waux[i] = sqrtf(weight[i]);
            for (int k = 0; k < 2; ++k) signs[k] = iq2_signs(xb + 8 * k, weight + 8 * k, xval + 8 * k, 1) & 127;
            float max = xval[0];
            for (int i = 1; i < 16; ++i) max = maxf(max, xval[i]);
            scales[ib] = 0;
            if (max < GROUP_MAX_EPS) continue;
            if (iq2_search16(t, xval, weight, waux, max, &scale, L)) return -3;
            if (scale < 0) {
                scale = -scale;
                for (int k = 0; k < 2; ++k) signs[k] = (uint8_t)(~signs[k] & 127);
            }
            for (int k = 0; k < 2; ++k) {
                int index = t->map[level_code(L + 8 * k)];
                if (index < 0) return -3;
                q2[2 * ib + k] = (uint16_t)(index | signs[k] << 9);
            }
            scales[ib] = scale;
            max_scale = maxf(max_scale, scale);
        }
        memset(out, 0, 74);
        if (!max_scale) continue;
        float d = max_scale / 31;
        put_u16(out, fp32_to_fp16(d));
        float id = 1 / d;
        for (int ib = 0; ib < 16; ++ib) {
            out[66 + ib / 2] |= (uint8_t)(iq_scale_level(id, scales[ib], 15) << 4 * (ib % 2));
        }
        for (int i = 0; i < 32; ++i) put_u16(out + 2 + 2 * i, q2[i]);
    }
    return 0;
}

/* IQ2_S: as IQ2_XS with a 10-bit grid index (low byte in qs, 2 high bits in qh), 8 stored sign bits, weights
   without importance, and d = max/31 * 0.9875. */
static int iq2_s_row(const Tables *t, const float *x, uint8_t *y, int64_t n, const float *imp) {
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *out = y + 82 * ibl, *qs = out + 2, *sg = out + 34, *qh = out + 66, *sc = out + 74;
        memset(out, 0, 82);
        float scales[16], max_scale = 0;
        float sigma2 = 2 * sum_sq(xbl, QK_K) / QK_K;
        for (int ib = 0; ib < 16; ++ib) {
            const float *xb = xbl + 16 * ib;
            float weight[16], waux[16], xval[16], scale;
            int8_t L[16];
            uint8_t signs[2];
            if (imp) {
                const float *qw = imp + QK_K * ibl + 16 * ib;
                for (int i = 0; i < 16; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
            } else {
                for (int i = 0; i < 16; ++i) weight[i] = 0.25f * sigma2 + xb[i] * xb[i];
            }
            for (int i = 0; i < 16; ++i) waux[i] = sqrtf(weight[i]);
            for (int k = 0; k < 2; ++k) signs[k] = iq2_signs(xb + 8 * k, weight + 8 * k, xval + 8 * k, 0);
            float max = xval[0];
            for (int i = 1; i < 16; ++i) max = maxf(max, xval[i]);
            scales[ib] = 0;
            if (max < GROUP_MAX_EPS_IQ2_S) continue;
            if (iq2_search16(t, xval, weight, waux, max, &scale, L)) return -3;
            if (scale < 0) {
                scale = -scale;
                for (int k = 0; k < 2; ++k) signs[k] = (uint8_t)~signs[k];
            }
            for (int k = 0; k < 2; ++k) {
                int index = t->map[level_code(L + 8 * k)];
                if (index < 0) return -3;
                int i8 = 2 * ib + k;
                qs[i8] = (uint8_t)(index & 255);
                qh[i8 / 4] |= (uint8_t)((index >> 8) << 2 * (i8 % 4));
                sg[i8] = signs[k];
            }
            scales[ib] = scale;
            max_scale = maxf(max_scale, scale);
        }
        if (!max_scale) continue;
        float d = max_scale / 31;
        put_u16(out, fp32_to_fp16(d * 0.9875f));
        float id = 1 / d;
        for (int ib = 0; ib < 16; ++ib) {
            sc[ib / 2] |= (uint8_t)(iq_scale_level(id, scales[ib], 15) << 4 * (ib % 2));
        }
    }
    return 0;
}

/* ---- IQ1: exhaustive 3-level split, then the grid --------------------------------------------------------- */

/* ggml sorts a sub-block's values as (float value, int index) pairs with a comparator on the value alone */
typedef struct {
    float x;
    int32_t i;
} ValueIndex;

static int by_value(const void *a, const void *b) {
    float l = ((const ValueIndex *)a)->x, r = ((const ValueIndex *)b)->x;
    return l < r ? -1 : l > r ? 1 : 0;
}

/* indices of xb[0..n) in increasing value, ties in the order libc's qsort leaves them (as in ggml) */
static void sort_by_value(const float *xb, int n, int *order) {
    ValueIndex pairs[32];
    for (int j = 0; j < n; ++j) {
        pairs[j].x = xb[j];
        pairs[j].i = j;
    }
    qsort(pairs, (size_t)n, sizeof(ValueIndex), by_value);
    for (int j = 0; j < n; ++j) order[j] = pairs[j].i;
}

/* The grid points of L's groups of 8 (neighbours where L is off the grid: `all_on_grid` cleared), xx[k] the level
   values of group k. Returns 0 or -3. */
static int iq1_grid_points(const Tables *t, int groups, const float *xb, const float *w, float scale,
                           const float *const *xx, int8_t *L, int *index, int *all_on_grid) {
    *all_on_grid = 1;
    for (int k = 0; k < groups; ++k) {
        int code = level_code(L + 8 * k);
        index[k] = t->map[code];
        if (index[k] < 0) {
            *all_on_grid = 0;
            index[k] = best_neighbour(t, neighbours_of(t, code), xb + 8 * k, w + 8 * k, scale, xx[k], L + 8 * k);
            if (index[k] < 0) return -3;
        }
    }
    return 0;
}

/* the least-squares scale of x against the chosen points' level values: ggml's refit after an off-grid move */
static float iq1_refit(const Tables *t, int groups, const float *xb, const float *w, const float *const *xx,
                       const int *index, float scale) {
    float sumqx = 0, sumq2 = 0;
    for (int k = 0; k < groups; ++k) {
        const int8_t *g = t->grid + 8 * index[k];
        for (int j = 0; j < 8; ++j) {
            float q = xx[k][(g[j] - 1) / 2];
            sumqx += w[8 * k + j] * q * xb[8 * k + j];
            sumq2 += w[8 * k + j] * q * q;
        }
    }
    return sumqx > 0 && sumq2 > 0 ? sumqx / sumq2 : scale;
}

/* levels 0, 1, 2 of a sub-block from the two split points of its sorted order */
static void iq1_split_levels(const int *order, int n, int i1, int i2, int8_t *L) {
    for (int j = 0; j < n; ++j) L[order[j]] = (int8_t)(j < i1 ? 0 : j < i2 ? 1 : 2);
}

static const float X_P[3] = {-1 + IQ1_DELTA, IQ1_DELTA, 1 + IQ1_DELTA};  /* levels with shift +delta */
static const float X_M[3] = {-1 - IQ1_DELTA, -IQ1_DELTA, 1 - IQ1_DELTA}; /* and -delta */

/* IQ1_S: 32-element sub-blocks: 4 x 11-bit grid indices (low bytes in qs, 3 high bits each in qh), a 3-bit
   scale and the shift's sign in qh's top bits; d = max/15 * 1.125. */
static int iq1_s_row(const Tables *t, const float *x, uint8_t *y, int64_t n, const float *imp) {
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *out = y + 50 * ibl, *qs = out + 2;
        memset(out, 0, 50);
        uint16_t qh[8] = {0};
        float scales[8], max_scale = 0;
        int shifts[8];
        float sigma2 = 2 * sum_sq(xbl, QK_K) / QK_K;
        for (int ib = 0; ib < 8; ++ib) {
            const float *xb = xbl + 32 * ib, *qw = imp + QK_K * ibl + 32 * ib;
            float weight[32], sumx[33], sumw[33];
            int order[32], index[4], all_on_grid;
            int8_t L[32];
            for (int i = 0; i < 32; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
            float max = fabsf(xb[0]);
            for (int i = 1; i < 32; ++i) max = maxf(max, fabsf(xb[i]));
            scales[ib] = 0;
            shifts[ib] = 1;
            if (max < GROUP_MAX_EPS_IQ1_S) continue;
            sort_by_value(xb, 32, order);
            sumx[0] = sumw[0] = 0;
            for (int j = 0; j < 32; ++j) {
                int i = order[j];
                sumx[j + 1] = sumx[j] + weight[i] * xb[i];
                sumw[j + 1] = sumw[j] + weight[i];
            }
            /* every split into levels 0 | 1 | 2 of the sorted values, with either shift */
            float best_score = -FLT_MAX, scale = max;
            int besti1 = -1, besti2 = -1, best_shift = 0;
            for (int i1 = 0; i1 <= 32; ++i1) {
                for (int i2 = i1; i2 <= 32; ++i2) {
                    for (int shift = 1; shift >= -1; shift -= 2) {
                        const float *v = shift == 1 ? X_P : X_M;
                        float sumqx = (sumx[i1] - sumx[0]) * v[0] + (sumx[i2] - sumx[i1]) * v[1]
                                      + (sumx[32] - sumx[i2]) * v[2];
                        float sumq2 = (sumw[i1] - sumw[0]) * v[0] * v[0] + (sumw[i2] - sumw[i1]) * v[1] * v[1]
                                      + (sumw[32] - sumw[i2]) * v[2] * v[2];
                        if (sumq2 > 0 && sumqx * sumqx > best_score * sumq2) {
                            scale = sumqx / sumq2;
                            best_score = scale * sumqx;
                            besti1 = i1;
                            besti2 = i2;
                            best_shift = shift;
                        }
                    }
                }
            }
            if (besti1 < 0) continue;
            iq1_split_levels(order, 32, besti1, besti2, L);
            if (scale < 0) {
                for (int j = 0; j < 32; ++j) L[j] = (int8_t)(2 - L[j]);
                scale = -scale;
                best_shift = -best_shift;
            }
            const float *v = best_shift == 1 ? X_P : X_M;
            const float *xx[4] = {v, v, v, v};
            if (iq1_grid_points(t, 4, xb, weight, scale, xx, L, index, &all_on_grid)) return -3;
            if (!all_on_grid) scale = iq1_refit(t, 4, xb, weight, xx, index, scale);
            for (int k = 0; k < 4; ++k) {
                qs[4 * ib + k] = (uint8_t)(index[k] & 255);
                qh[ib] |= (uint16_t)((index[k] >> 8) << 3 * k);
            }
            scales[ib] = scale;
            shifts[ib] = best_shift;
            max_scale = maxf(max_scale, scale);
        }
        if (max_scale) {
            float d = max_scale / 15;
            put_u16(out, fp32_to_fp16(d * 1.125f));
            float id = 1 / d;
            for (int ib = 0; ib < 8; ++ib) {
                int l = iq_scale_level(id, scales[ib], 7) | (shifts[ib] == -1 ? 8 : 0);
                qh[ib] |= (uint16_t)(l << 12);
            }
        }
        for (int ib = 0; ib < 8; ++ib) put_u16(out + 34 + 2 * ib, qh[ib]);
    }
    return 0;
}

/* IQ1_M weights: qw * sqrtf(sigma2 + x*x), or x*x without importance */
static void iq1_m_weights(const float *xb, const float *qw, float sigma2, float *weight) {
    for (int i = 0; i < 16; ++i) weight[i] = qw ? qw[i] * sqrtf(sigma2 + xb[i] * xb[i]) : xb[i] * xb[i];
}

/* IQ1_M: 16-element sub-blocks, each half with its own shift sign (k: bit 1 the first half's, bit 0 the
   second's); 3-bit scales; the fp16 super-block scale spread over the top nibbles of the four scale words. */
static int iq1_m_row(const Tables *t, const float *x, uint8_t *y, int64_t n, const float *imp) {
    static const uint8_t masks[4] = {0x00, 0x80, 0x08, 0x88};
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl) {
        const float *xbl = x + QK_K * ibl;
        uint8_t *out = y + 56 * ibl, *qs = out, *qh = out + 32;
        memset(out, 0, 56);
        float scales[16], max_scale = 0;
        int shifts[16];
        float sigma2 = 2 * sum_sq(xbl, QK_K) / QK_K;
        for (int ib = 0; ib < 16; ++ib) {
            const float *xb = xbl + 16 * ib;
            float weight[16];
            int order[16], index[2], all_on_grid;
            int8_t L[16];
            iq1_m_weights(xb, imp ? imp + QK_K * ibl + 16 * ib : NULL, sigma2, weight);
            float max = fabsf(xb[0]);
            for (int i = 1; i < 16; ++i) max = maxf(max, fabsf(xb[i]));
            scales[ib] = 0;
            shifts[ib] = 0;
            if (max < GROUP_MAX_EPS_IQ1_M) continue;
            sort_by_value(xb, 16, order);
            /* prefix sums per half (in sorted order), as ggml keeps them */
            float px[2][17], pw[2][17];
            px[0][0] = px[1][0] = pw[0][0] = pw[1][0] = 0;
            for (int j = 0; j < 16; ++j) {
                int i = order[j], h = i < 8 ? 0 : 1;
                px[h][j + 1] = px[h][j] + weight[i] * xb[i];
                px[1 - h][j + 1] = px[1 - h][j];
                pw[h][j + 1] = pw[h][j] + weight[i];
                pw[1 - h][j + 1] = pw[1 - h][j];
            }
            const float txs[2] = {px[0][16], px[1][16]}, tws[2] = {pw[0][16], pw[1][16]};
            const float p2 = X_P[2], m2 = X_M[2];
            const float cp1 = X_P[0] * X_P[0] - X_P[1] * X_P[1], cp2 = X_P[1] * X_P[1] - X_P[2] * X_P[2];
            const float cm1 = X_M[0] * X_M[0] - X_M[1] * X_M[1], cm2 = X_M[1] * X_M[1] - X_M[2] * X_M[2];
            float best_score = -FLT_MAX, scale = max;
            int besti1 = -1, besti2 = -1, best_k = -1;
            for (int i1 = 0; i1 <= 16; ++i1) {
                for (int i2 = i1; i2 <= 16; ++i2) {
                    float qx_p[2], qx_m[2], q2_p[2], q2_m[2], sumqx[4], sumq2[4];
                    for (int h = 0; h < 2; ++h) {
                        float sx = px[h][i1] + px[h][i2];
                        qx_p[h] = txs[h] * p2 - sx;
                        qx_m[h] = txs[h] * m2 - sx;
                        q2_p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
                        q2_m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
                    }
                    sumqx[0] = qx_p[0] + qx_p[1];
                    sumqx[1] = qx_p[0] + qx_m[1];
                    sumqx[2] = qx_m[0] + qx_p[1];
                    sumqx[3] = qx_m[0] + qx_m[1];
                    sumq2[0] = q2_p[0] + q2_p[1];
                    sumq2[1] = q2_p[0] + q2_m[1];
                    sumq2[2] = q2_m[0] + q2_p[1];
                    sumq2[3] = q2_m[0] + q2_m[1];
                    for (int k = 0; k < 4; ++k) {
                        if (sumq2[k] > 0 && sumqx[k] * sumqx[k] > best_score * sumq2[k]) {
                            scale = sumqx[k] / sumq2[k];
                            best_score = scale * sumqx[k];
                            besti1 = i1;
                            besti2 = i2;
                            best_k = k;
                        }
                    }
                }
            }
            if (besti1 < 0) continue;
            iq1_split_levels(order, 16, besti1, besti2, L);
            if (scale < 0) {
                for (int j = 0; j < 16; ++j) L[j] = (int8_t)(2 - L[j]);
                scale = -scale;
                best_k = 3 - best_k; /* both halves' signs flip */
            }
            const float *xx[2] = {best_k < 2 ? X_P : X_M, best_k % 2 == 0 ? X_P : X_M};
            if (iq1_grid_points(t, 2, xb, weight, scale, xx, L, index, &all_on_grid)) return -3;
            if (!all_on_grid) scale = iq1_refit(t, 2, xb, weight, xx, index, scale);
            qs[2 * ib] = (uint8_t)(index[0] & 255);
            qs[2 * ib + 1] = (uint8_t)(index[1] & 255);
            qh[ib] = (uint8_t)((index[0] >> 8) | ((index[1] >> 8) << 4));
            scales[ib] = scale;
            shifts[ib] = best_k;
            max_scale = maxf(max_scale, scale);
        }
        if (!max_scale) continue;
        /* the super-block scale: least squares over the whole block with the 3-bit scales as stored */
        uint16_t sc[4] = {0};
        float d = max_scale / 15;
        float id = 1 / d;
        float sumqx = 0, sumq2 = 0;
        for (int ib = 0; ib < 16; ++ib) {
            const float *xb = xbl + 16 * ib;
            float weight[16];
            int l = iq_scale_level(id, scales[ib], 7);
            sc[ib / 4] |= (uint16_t)(l << 3 * (ib % 4));
            qh[ib] |= masks[shifts[ib]];
            iq1_m_weights(xb, imp ? imp + QK_K * ibl + 16 * ib : NULL, sigma2, weight);
            for (int k = 0; k < 2; ++k) {
                const float *xx = (k == 0 ? shifts[ib] < 2 : shifts[ib] % 2 == 0) ? X_P : X_M;
                const int8_t *g = t->grid + 8 * (qs[2 * ib + k] + ((qh[ib] << (8 - 4 * k)) & 0x700));
                for (int j = 0; j < 8; ++j) {
                    float q = xx[(g[j] - 1) / 2] * (float)(2 * l + 1);
                    sumqx += weight[8 * k + j] * q * xb[8 * k + j];
                    sumq2 += weight[8 * k + j] * q * q;
                }
            }
        }
        if (sumq2 > 0) d = sumqx / sumq2;
        uint16_t h = fp32_to_fp16(d * 1.1125f);
        sc[0] |= (uint16_t)((h & 0x000f) << 12);
        sc[1] |= (uint16_t)((h & 0x00f0) << 8);
        sc[2] |= (uint16_t)((h & 0x0f00) << 4);
        sc[3] |= (uint16_t)(h & 0xf000);
        for (int i = 0; i < 4; ++i) put_u16(out + 48 + 2 * i, sc[i]);
    }
    return 0;
}

/* ---- entry points ------------------------------------------------------------------------------------------ */

int qk_iq2_supported(int type) { return table_slot(type) >= 0; }

static int row_bytes_per_block(int type) {
    switch (type) {
    case QK_IQ2_XXS: return 66;
    case QK_IQ2_XS: return 74;
    case QK_IQ2_S: return 82;
    case QK_IQ1_S: return 50;
    case QK_IQ1_M: return 56;
    default: return 0;
    }
}

int qk_iq2_quantize(int type, const float *x, const float *imp, uint8_t *y, int64_t rows, int64_t n) {
    int slot = table_slot(type);
    if (slot < 0 || n % QK_K) return -1;
    if (!TABLES[slot].grid) return -2;
    if (!imp && type != QK_IQ2_S && type != QK_IQ1_M) return -4;
    const Tables *t = &TABLES[slot];
    int64_t row_bytes = n / QK_K * row_bytes_per_block(type);
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * n;
        uint8_t *yr = y + r * row_bytes;
        int status;
        switch (type) {
        case QK_IQ2_XXS: status = iq2_xxs_row(t, xr, yr, n, imp); break;
        case QK_IQ2_XS: status = iq2_xs_row(t, xr, yr, n, imp); break;
        case QK_IQ2_S: status = iq2_s_row(t, xr, yr, n, imp); break;
        case QK_IQ1_S: status = iq1_s_row(t, xr, yr, n, imp); break;
        default: status = iq1_m_row(t, xr, yr, n, imp); break;
        }
        if (status) return status;
    }
    return 0;
}
