/* What the files of the compiled codecs share: ggml's numeric primitives (defined in _ggml_kernels.c or inline
   here) and the entry points of the i-quant files that qk_quantize / qk_iq_grid_init in _ggml_kernels.c
   dispatch to. */

#ifndef QK_GGML_KERNELS_H
#define QK_GGML_KERNELS_H

#include <stdint.h>
#include <string.h>

/* ggml's nearest_int: add 1.5 * 2^23 in float32 and read the low mantissa bits (round half to even inside
   +-2^22, the same bit arithmetic outside it). */
static inline int nearest_int(float f) {
    float v = f + 12582912.f;
    uint32_t u;
    memcpy(&u, &v, 4);
    return (int)(u & 0x007fffff) - 0x00400000;
}

/* ggml's MAX(a, b) = a > b ? a : b: which operand wins on NaN matters */
static inline float maxf(float a, float b) { return a > b ? a : b; }
static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

uint16_t fp32_to_fp16(float f);
float make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *qw);

/* ggml type ids (ggml.h enum ggml_type) of the i-quants */
enum { QK_IQ2_XXS = 16, QK_IQ2_XS = 17, QK_IQ3_XXS = 18, QK_IQ1_S = 19, QK_IQ3_S = 21, QK_IQ2_S = 22,
       QK_IQ1_M = 29 };

/* _ggml_iq2.c: IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M. _ggml_iq3.c: IQ3_XXS, IQ3_S.
   *_grid_init: the type's grid as level indices, `points` x values per point; 0, or -1 (type, size or level),
   -2 (no memory). *_quantize: 0, -1 (type or n), -2 (grid not initialised), -3 (no grid point scores below
   FLT_MAX: |x| around 1e15 and up, or non-finite input, where ggml aborts), -4 (importance required but NULL). */
int qk_iq2_supported(int type);
int qk_iq2_grid_init(int type, const uint8_t *levels, int points);
int qk_iq2_quantize(int type, const float *x, const float *imp, uint8_t *y, int64_t rows, int64_t n);
int qk_iq3_grid_init(int type, const uint8_t *levels, int points);
int qk_iq3_quantize(int type, const float *x, const float *imp, uint8_t *y, int64_t rows, int64_t n);

#endif
