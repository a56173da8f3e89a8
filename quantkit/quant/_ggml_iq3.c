/* ggml's 3-bit lattice types: IQ3_XXS (ggml type 18, 98 bytes per 256 values) and IQ3_S (type 21, 110 bytes).

   Written for quantkit from ggml-quants.c (quantize_row_iq3_xxs_impl, quantize_row_iq3_s_impl, iq3xs_init_impl;
   ggml-org/llama.cpp) and the block layouts of ggml-common.h; the arithmetic is ggml's, operation by operation,
   under the exactness rules of _ggml_kernels.c (separately rounded float32 operations in C order, sequential
   sums, no contraction). No grid is stored here: kernels.py passes the grids from gguf-py once per type
   (qk_iq3_grid_init), and the neighbour lists are derived from them as ggml derives its own, so every search
   visits candidates in ggml's order.

   Each group of 4 magnitudes is coded as a point of a lattice: 4 levels l in 0..7 (value 2l+1), only some of
   the 8^4 combinations allowed (256 for IQ3_XXS, 512 for IQ3_S). A combination off the lattice is replaced by
   the best of its neighbours: the allowed points at the nearest few squared distances. */

#include "_ggml_kernels.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define QK_K 256
#define SUB 32                 /* values per sub-block (one 4-bit scale) */
#define MAP_SIZE 4096          /* 4 levels of 3 bits */
#define EPS_IQ3_XXS 1e-8f      /* ggml-quants.c GROUP_MAX_EPS_IQ3_XXS */

typedef struct {
    int size;                  /* allowed points: 256 or 512; 0 until qk_iq3_grid_init */
    int8_t grid[512][4];       /* each point's values 2l+1 */
    int map[MAP_SIZE];         /* levels (l0 | l1<<3 | l2<<6 | l3<<9) -> point, or -(1 + offset in neighbours) */
    uint16_t *neighbours;      /* per off-lattice combination: a count, then points, nearest first */
} Lattice;

static Lattice LATTICES[2];

static Lattice *lattice(int type) { return type == 18 ? &LATTICES[0] : type == 21 ? &LATTICES[1] : NULL; }

/* ---- the lattice tables ------------------------------------------------------------------------------------ */

typedef struct { int d2, point; } Candidate;

static int by_distance(const void *a, const void *b) {  /* (distance, point): a total order, as ggml sorts */
    const Candidate *l = a, *r = b;
    if (l->d2 != r->d2) return l->d2 < r->d2 ? -1 : 1;
    return (l->point > r->point) - (l->point < r->point);
}

/* levels: `points` x 4 level indices 0..7, point-major. Builds the point map and, for every combination
   off the lattice, the points at its `nwant` nearest distinct squared distances (2 for IQ3_XXS, 3 for IQ3_S),
   sorted by (distance, point). Returns 0, or -1 for a wrong type, size or level. Not thread-safe: kernels.py
   calls it once per type, under a lock, before any encode of that type. */
int qk_iq3_grid_init(int type, const uint8_t *levels, int points) {
    Lattice *g = lattice(type);
    int size = type == 18 ? 256 : 512;
    if (!g || points != size) return -1;
    if (g->size) return 0;
    for (int k = 0; k < 4 * size; ++k)
        if (levels[k] > 7) return -1;
    for (int u = 0; u < MAP_SIZE; ++u) g->map[u] = -1;
    for (int p = 0; p < size; ++p) {
        int u = 0;
        for (int i = 0; i < 4; ++i) {
            g->grid[p][i] = (int8_t)(2 * levels[4 * p + i] + 1);
            u |= levels[4 * p + i] << (3 * i);
        }
        g->map[u] = p;
    }
    const int nwant = size == 256 ? 2 : 3;
    Candidate *c = malloc(size * sizeof *c);
    size_t cap = (size_t)MAP_SIZE * 16, used = 0;
    uint16_t *list = malloc(cap * sizeof *list);
    if (!c || !list) { free(c); free(list); return -1; }
    for (int u = 0; u < MAP_SIZE; ++u) {
        if (g->map[u] >= 0) continue;
        for (int p = 0; p < size; ++p) {
            int d2 = 0;
            for (int i = 0; i < 4; ++i) {
                int diff = g->grid[p][i] - (2 * ((u >> (3 * i)) & 7) + 1);
                d2 += diff * diff;
            }
            c[p].d2 = d2;
            c[p].point = p;
        }
        qsort(c, size, sizeof *c, by_distance);
        int n = 0, distinct = 1;
        for (; n < size; ++n) {
            if (c[n].d2 > c[n ? n - 1 : 0].d2 && ++distinct > nwant) break;
        }
        if (used + 1 + n > cap) {
            cap = 2 * cap + 1 + n;
            uint16_t *grown = realloc(list, cap * sizeof *list);
            if (!grown) { free(c); free(list); return -1; }
            list = grown;
        }
        g->map[u] = -(int)(used + 1);
        list[used++] = (uint16_t)n;
        for (int j = 0; j < n; ++j) list[used++] = (uint16_t)c[j].point;
    }
    free(c);
    g->neighbours = list;
    g->size = size;
    return 0;
}

/* ---- quantization ------------------------------------------------------------------------------------------ */

/* The combination nearest to 4 magnitudes at inverse scale id: l = nearest_int(0.5 (id x - 1)) in 0..7. */
static inline int levels_of(const float *xv, float id, int8_t *L) {
    int u = 0;
    for (int i = 0; i < 4; ++i) {
        int l = nearest_int(0.5f * (id * xv[i] - 1));
        l = l > 7 ? 7 : l;
        l = l < 0 ? 0 : l;
        L[i] = (int8_t)l;
        u |= l << (3 * i);
    }
    return u;
}

/* iq3_find_best_neighbour: the neighbour of off-lattice combination u with the least sum of w (scale q - x)^2,
   the first on ties; its levels go to L. -1 when no distance is below FLT_MAX (ggml aborts there). */
static int best_neighbour(const Lattice *g, int u, const float *xv, const float *w, float scale, int8_t *L) {
    const uint16_t *list = g->neighbours + (-g->map[u] - 1);
    float best = FLT_MAX;
    int found = -1;
    for (int j = 1; j <= list[0]; ++j) {
        const int8_t *p = g->grid[list[j]];
        float d2 = 0;
        for (int i = 0; i < 4; ++i) {
            float diff = scale * (float)p[i] - xv[i];
            d2 += w[i] * diff * diff;
        }
        if (d2 < best) {
            best = d2;
            found = list[j];
        }
    }
    if (found >= 0)
        for (int i = 0; i < 4; ++i) L[i] = (int8_t)((g->grid[found][i] - 1) / 2);
    return found;
}

static inline void weighted_sums(const float *w, const float *xv, const int8_t *L, float *sumqx, float *sumq2) {
    float sx = 0, s2 = 0;
    for (int i = 0; i < SUB; ++i) {
        float q = (float)(2 * L[i] + 1);
        sx += w[i] * xv[i] * q;
        s2 += w[i] * q * q;
    }
    *sumqx = sx;
    *sumq2 = s2;
}

/* One sub-block's scale and lattice points (levels in L), from magnitudes xval, weights w and their square
   roots wr (the neighbour search's weights). IQ3_XXS (xxs): 31 trial scales, groups that were on the lattice
   keep their points in the final pass; IQ3_S: 19 trial scales, every group re-picked. Returns -1 where a
   neighbour search finds nothing. */
static int sub_block(const Lattice *g, int xxs, const float *xval, const float *w, const float *wr, float max,
                     int8_t *L, float *scale_out) {
    int8_t Laux[SUB];
    int on[8], on_aux[8];
    const int ntry = xxs ? 15 : 9;
    float best = 0, scale = max / 15;
    for (int k = 0; k < 8; ++k) on[k] = xxs;
    for (int is = -ntry; is <= ntry; ++is) {
        float id = (15 + is * 0.2f) / max;
        float this_scale = 1 / id;
        for (int k = 0; k < 8; ++k) {
            int u = levels_of(xval + 4 * k, id, Laux + 4 * k);
            on_aux[k] = g->map[u] >= 0;
            if (!on_aux[k] && best_neighbour(g, u, xval + 4 * k, wr + 4 * k, this_scale, Laux + 4 * k) < 0)
                return -1;
        }
        float sumqx, sumq2;
        weighted_sums(w, xval, Laux, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, SUB);
            memcpy(on, on_aux, sizeof on);
        }
    }
    int off = 0;
    for (int k = 0; k < 8; ++k) off += !on[k];
    if (off > 0 && scale > 0) {
        float id = 1 / scale;
        for (int k = 0; k < 8; ++k) {
            if (xxs && on[k]) continue;
            int u = levels_of(xval + 4 * k, id, L + 4 * k);
            if (g->map[u] < 0 && best_neighbour(g, u, xval + 4 * k, wr + 4 * k, scale, L + 4 * k) < 0) return -1;
        }
        float sumqx, sumq2;
        weighted_sums(w, xval, L, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    *scale_out = scale;
    return 0;
}

static inline int point_of(const Lattice *g, const int8_t *L) {
    return g->map[L[0] | (L[1] << 3) | (L[2] << 6) | (L[3] << 9)];
}

/* One super-block of 256 values; qw: its 256 importance values or NULL. */
static int super_block(const Lattice *g, int xxs, const float *x, const float *qw, uint8_t *y) {
    float w[SUB], wr[SUB], xval[SUB], scales[QK_K / SUB];
    int8_t L[SUB];
    uint8_t signs[4];
    /* IQ3_XXS: qs[64] then one 32-bit word per sub-block (4 x 7 sign bits, 4-bit scale on top).
       IQ3_S: qs[64], qh[8], signs[32], scales[4]. */
    uint8_t q[108];
    uint32_t words[QK_K / SUB] = {0};
    memset(q, 0, sizeof q);
    int qs_at = 0, signs_at = 0;  /* IQ3_S: a skipped (all-zero) sub-block does not advance these, as in ggml */

    float sumx2 = 0;
    for (int i = 0; i < QK_K; ++i) sumx2 += x[i] * x[i];
    float sigma2 = 2 * sumx2 / QK_K;
    float max_scale = 0;

    for (int ib = 0; ib < QK_K / SUB; ++ib) {
        const float *xb = x + SUB * ib;
        if (qw) {
            for (int i = 0; i < SUB; ++i) w[i] = qw[SUB * ib + i] * sqrtf(sigma2 + xb[i] * xb[i]);
        } else {
            for (int i = 0; i < SUB; ++i) w[i] = xb[i] * xb[i];
        }
        for (int i = 0; i < SUB; ++i) wr[i] = sqrtf(w[i]);
        for (int k = 0; k < 4; ++k) {
            int nflip = 0;
            uint8_t s = 0;
            for (int i = 0; i < 8; ++i) {
                float v = xb[8 * k + i];
                if (v >= 0) {
                    xval[8 * k + i] = v;
                } else {
                    xval[8 * k + i] = -v;
                    ++nflip;
                    s |= (uint8_t)(1 << i);
                }
            }
            if (xxs && nflip % 2) {
                /* IQ3_XXS stores 7 sign bits per 8 values (the 8th is their parity): an odd count of negatives
                   flips the value of least w x^2 instead, which then enters the search as a negative magnitude */
                int imin = 0;
                float min = w[8 * k] * xb[8 * k] * xb[8 * k];
                for (int i = 1; i < 8; ++i) {
                    float a = w[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                    if (a < min) {
                        min = a;
                        imin = i;
                    }
                }
                xval[8 * k + imin] = -xval[8 * k + imin];
                s ^= (uint8_t)(1 << imin);
            }
            signs[k] = xxs ? (uint8_t)(s & 127) : s;
        }
        float max = xval[0];
        for (int i = 1; i < SUB; ++i) max = maxf(max, xval[i]);
        memset(L, 0, SUB);
        if (xxs ? max < EPS_IQ3_XXS : !max) {
            scales[ib] = 0;
            continue;
        }
        float scale;
        if (sub_block(g, xxs, xval, w, wr, max, L, &scale)) return -1;
        if (scale < 0) {  /* "should never happen" in ggml: the scale made positive, the signs flipped */
            scale = -scale;
            for (int k = 0; k < 4; ++k) signs[k] = xxs ? (uint8_t)(~signs[k] & 127) : (uint8_t)~signs[k];
        }
        for (int k = 0; k < 8; ++k) {
            int p = point_of(g, L + 4 * k);
            if (xxs) {
                q[8 * ib + k] = (uint8_t)p;
            } else {
                q[qs_at++] = (uint8_t)(p & 255);
                q[64 + ib] |= (uint8_t)((p >> 8) << k);
            }
        }
        if (xxs) {
            words[ib] = signs[0] | (uint32_t)signs[1] << 7 | (uint32_t)signs[2] << 14 | (uint32_t)signs[3] << 21;
        } else {
            memcpy(q + 72 + signs_at, signs, 4);
            signs_at += 4;
        }
        scales[ib] = scale;
        max_scale = maxf(max_scale, scale);
    }

    uint16_t dh = 0;
    if (max_scale) {
        float d = max_scale / 31;
        dh = fp32_to_fp16(d * (xxs ? 1.0125f : 1.033f));
        float id = 1 / d;
        for (int ib = 0; ib < QK_K / SUB; ++ib) {
            int l = nearest_int(0.5f * (id * scales[ib] - 1));
            l = l > 15 ? 15 : l;
            l = l < 0 ? 0 : l;
            if (xxs) words[ib] |= (uint32_t)l << 28;
            else q[104 + ib / 2] |= (uint8_t)(l << (4 * (ib % 2)));
        }
    } else if (xxs) {
        memset(q, 0, sizeof q);  /* ggml clears the whole IQ3_XXS block; IQ3_S keeps what it placed */
        memset(words, 0, sizeof words);
    }
    y[0] = (uint8_t)(dh & 255);
    y[1] = (uint8_t)(dh >> 8);
    if (xxs) {
        memcpy(y + 2, q, 64);
        for (int ib = 0; ib < QK_K / SUB; ++ib)
            for (int b = 0; b < 4; ++b) y[66 + 4 * ib + b] = (uint8_t)(words[ib] >> (8 * b));
    } else {
        memcpy(y + 2, q, 108);
    }
    return 0;
}

/* rows x n float32 -> IQ3 blocks. Returns 0; -1 for another type or n not a multiple of 256; -2 before
   qk_iq3_grid_init of this type; -3 where a neighbour search finds no finite distance (values near the float32
   limit: ggml aborts the process there). */
int qk_iq3_quantize(int type, const float *x, const float *imp, uint8_t *y, int64_t rows, int64_t n) {
    const Lattice *g = lattice(type);
    if (!g || n % QK_K) return -1;
    if (!g->size) return -2;
    const int xxs = type == 18, bytes = xxs ? 98 : 110;
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t b = 0; b < n / QK_K; ++b) {
            const float *qw = imp ? imp + b * QK_K : NULL;
            if (super_block(g, xxs, x + r * n + b * QK_K, qw, y + (r * (n / QK_K) + b) * bytes)) return -3;
        }
    }
    return 0;
}
