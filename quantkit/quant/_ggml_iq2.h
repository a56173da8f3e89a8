/* The grid i-quants of _ggml_iq2.c (IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M) as _ggml_kernels.c dispatches them,
   and the two primitives of _ggml_kernels.c they share. */

#ifndef QK_GGML_IQ2_H
#define QK_GGML_IQ2_H

#include <stdint.h>

/* from _ggml_kernels.c */
uint16_t fp32_to_fp16(float f);
float make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *qw);

/* ggml type ids (ggml.h enum ggml_type) */
enum { QK_IQ2_XXS = 16, QK_IQ2_XS = 17, QK_IQ1_S = 19, QK_IQ2_S = 22, QK_IQ1_M = 29 };

int qk_iq2_supported(int type);
int qk_iq_grid_init(int type, const uint8_t *levels, int n);
/* qk_quantize for these types: 0, -1 (type or n), -2 (grid not initialised: qk_iq_grid_init), -3 (no grid
   point scores below FLT_MAX: |x| around 1e15 and up, or non-finite input, where ggml aborts), -4 (importance
   required but NULL) */
int qk_iq2_quantize(int type, const float *x, const float *imp, uint8_t *y, int64_t rows, int64_t n);

#endif
