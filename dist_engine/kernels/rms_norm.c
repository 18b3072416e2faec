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

typedef uint16_t bf16;

static inline float widen(bf16 x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}

static inline bf16 narrow(float f) {
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (bf16)((c.u >> 16) | 0x40); /* quiet NaN */
    c.u += 0x7fffu + ((c.u >> 16) & 1u);
    return (bf16)(c.u >> 16);
}

void rms_norm_f32(const float *x, int64_t x_row, const float *w, float *out, int64_t T, int64_t H,
                  float eps, int64_t threads) {
#pragma omp parallel for num_threads(threads) if (T >= 32) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * x_row;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t h = 0; h < H; h++) s += xr[h] * xr[h];
        const float inv = 1.0f / sqrtf(s / (float)H + eps);
        float *o = out + t * H;
#pragma omp simd
        for (int64_t h = 0; h < H; h++) o[h] = w[h] * (xr[h] * inv);
    }
}

void rms_norm_bf16(const bf16 *x, int64_t x_row, const bf16 *w, bf16 *out, int64_t T, int64_t H,
                   float eps, int64_t threads) {
#pragma omp parallel for num_threads(threads) if (T >= 32) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const bf16 *xr = x + t * x_row;
        float s = 0.0f;
        for (int64_t h = 0; h < H; h++) s += widen(xr[h]) * widen(xr[h]);
        const float inv = 1.0f / sqrtf(s / (float)H + eps);
        bf16 *o = out + t * H;
        for (int64_t h = 0; h < H; h++) o[h] = narrow(widen(w[h]) * widen(narrow(widen(xr[h]) * inv)));
    }
}
