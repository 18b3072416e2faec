/* RMSNorm over the last axis (CPU, fp32 or bf16), as Hugging Face computes it.
 *
 * out[t] = w * (x[t] / sqrt(mean(x[t]^2) + eps)), statistics in fp32. bf16: the normalised row
 * is rounded to bf16 before the weight multiplies it (the product rounded again), exactly the
 * order of transformers' LlamaRMSNorm for half-precision inputs. One call replaces the handful
 * of PyTorch operators the norm is made of (61 norms per token on the default model).
 * x rows have stride x_row (elements); w [H]; out [T, H] contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* One row; is_bf16 is a constant at each call site, so each entry point gets its own loop. */
static inline __attribute__((always_inline)) void norm_row(
        int is_bf16, const void *x, const void *w, void *out, int64_t H, float eps) {
    float s = 0.0f;
    if (is_bf16) {
        for (int64_t h = 0; h < H; h++) s += widen(((const bf16 *)x)[h]) * widen(((const bf16 *)x)[h]);
    } else {
#pragma omp simd reduction(+ : s)
        for (int64_t h = 0; h < H; h++) s += ((const float *)x)[h] * ((const float *)x)[h];
    }
    const float inv = 1.0f / sqrtf(s / (float)H + eps);
    if (is_bf16) {
        const bf16 *xr = x, *wr = w;
        for (int64_t h = 0; h < H; h++)
            ((bf16 *)out)[h] = narrow(widen(wr[h]) * widen(narrow(widen(xr[h]) * inv)));
    } else {
        const float *xr = x, *wr = w;
#pragma omp simd
        for (int64_t h = 0; h < H; h++) ((float *)out)[h] = wr[h] * (xr[h] * inv);
    }
}

#define ENTRY(NAME, T, IS_BF16)                                                                 \
    void NAME(const T *x, int64_t x_row, const T *w, T *out, int64_t T_, int64_t H, float eps,  \
              int64_t threads) {                                                                \
        _Pragma("omp parallel for num_threads(threads) if (T_ >= 32) schedule(static)")        \
        for (int64_t t = 0; t < T_; t++) norm_row(IS_BF16, x + t * x_row, w, out + t * H, H, eps); \
    }

ENTRY(rms_norm_f32, float, 0)
ENTRY(rms_norm_bf16, bf16, 1)

/* The residual add and the norm after it: sum = x + delta (rounded as PyTorch's add rounds),
 * out = RMSNorm(sum) by the same row function as above; x, delta, sum, out [T, H] contiguous. */
static inline __attribute__((always_inline)) void add_row(int is_bf16, const void *x,
        const void *delta, void *sum, int64_t H) {
    if (is_bf16) {
        const bf16 *a = x, *b = delta;
        for (int64_t h = 0; h < H; h++) ((bf16 *)sum)[h] = narrow(widen(a[h]) + widen(b[h]));
    } else {
        const float *a = x, *b = delta;
        for (int64_t h = 0; h < H; h++) ((float *)sum)[h] = a[h] + b[h];
    }
}

#define ADD_ENTRY(NAME, T, IS_BF16)                                                               \
    void NAME(const T *x, const T *delta, const T *w, T *sum, T *out, int64_t T_, int64_t H,     \
              float eps, int64_t threads) {                                                       \
        _Pragma("omp parallel for num_threads(threads) if (T_ >= 32) schedule(static)")          \
        for (int64_t t = 0; t < T_; t++) {                                                        \
            add_row(IS_BF16, x + t * H, delta + t * H, sum + t * H, H);                           \
            norm_row(IS_BF16, sum + t * H, w, out + t * H, H, eps);                               \
        }                                                                                         \
    }

ADD_ENTRY(add_rms_norm_f32, float, 0)
ADD_ENTRY(add_rms_norm_bf16, bf16, 1)
