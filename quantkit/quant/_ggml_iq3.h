/* The IQ3 lattice codecs (_ggml_iq3.c), reached through qk_quantize in _ggml_kernels.c. */
#ifndef QK_GGML_IQ3_H
#define QK_GGML_IQ3_H

#include <stdint.h>

int qk_iq3_grid_init(int type, const uint8_t *levels, int count);
int qk_iq3_quantize(int type, const float *x, const float *imp, uint8_t *y, int64_t rows, int64_t n);

#endif
