/* Element-wise steps of a decoder layer fused into single calls (CPU, fp32 or bf16).
 *
 * Between its products a Llama-family layer runs a dozen small PyTorch operators: rotary
 * embedding (chunk, four multiplies, a subtract, an add, a concatenation), the K/V cache
 * writes, SiLU times up. At decode each costs more in dispatch than in arithmetic, so they are
 * done here in two calls (the residual add joins the norm after it in rms_norm.c). Every result equals the PyTorch operators'
 * bit for bit where those are exactly rounded (products, sums, copies): bf16 rounds after each
 * operation as PyTorch does, and this file is compiled without FMA contraction so that a*b - c*d
 * rounds each product as PyTorch does. SiLU uses glibc's vector expf, which may differ from
 * PyTorch's vectorised exp in the last bit.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* glibc's vector expf (libmvec) for the SiLU loop, declared without -ffast-math (which would
 * change the process's floating-point mode when the library loads) */
__attribute__((__simd__("notinbranch"))) float expf(float);

/* Element access for either dtype; is_bf16 is a constant at every call site. */
#define GET(is_bf16, p, i) ((is_bf16) ? widen(((const bf16 *)(p))[i]) : ((const float *)(p))[i])
#define ROUND(is_bf16, x) ((is_bf16) ? widen(narrow(x)) : (x))
#define PUT(is_bf16, p, i, x)                                        \
    do {                                                             \
        if (is_bf16) ((bf16 *)(p))[i] = narrow(x);                   \
        else ((float *)(p))[i] = (x);                                \
    } while (0)

/* Rotary embedding (halves rotated: x1 * cos - x2 * sin, x2 * cos + x1 * sin) of one head of D
 * values from src into dst; cs, sn: the position's D/2 cosines and sines. */
static inline __attribute__((always_inline)) void rotate_head(int is_bf16, const void *src,
        void *dst, const void *cs, const void *sn, int64_t D) {
    const int64_t h = D / 2;
    for (int64_t d = 0; d < h; d++) {
        const float x1 = GET(is_bf16, src, d), x2 = GET(is_bf16, src, d + h);
        const float c = GET(is_bf16, cs, d), s = GET(is_bf16, sn, d);
        const float a = ROUND(is_bf16, x1 * c), b = ROUND(is_bf16, x2 * s);
        const float e = ROUND(is_bf16, x2 * c), f = ROUND(is_bf16, x1 * s);
        PUT(is_bf16, dst, d, a - b);
        PUT(is_bf16, dst, d + h, e + f);
    }
}

/* Token t of qkv [T, (Hq + 2 Hk) * D] (row stride qkv_row): q heads, k heads, v heads. Rotates q
 * into q_out [T, Hq, D]; rotates k and copies v into the caches [num_slots, Hk, D] at slots[t].
 * cos, sin: [positions, D/2] tables in the same dtype, read at positions[t]. */
static inline __attribute__((always_inline)) void rope_store(int is_bf16, const void *qkv,
        int64_t qkv_row, int64_t t, int64_t Hq, int64_t Hk, int64_t D, const int64_t *positions,
        const void *cos, const void *sin, const int64_t *slots, void *k_cache, void *v_cache,
        void *q_out) {
    const int64_t esz = is_bf16 ? 2 : 4, half = D / 2;
    const char *row = (const char *)qkv + t * qkv_row * esz;
    const char *cs = (const char *)cos + positions[t] * half * esz;
    const char *sn = (const char *)sin + positions[t] * half * esz;
    char *kc = (char *)k_cache + slots[t] * Hk * D * esz;
    for (int64_t h = 0; h < Hq; h++)
        rotate_head(is_bf16, row + h * D * esz, (char *)q_out + (t * Hq + h) * D * esz, cs, sn, D);
    for (int64_t h = 0; h < Hk; h++)
        rotate_head(is_bf16, row + (Hq + h) * D * esz, kc + h * D * esz, cs, sn, D);
    memcpy((char *)v_cache + slots[t] * Hk * D * esz, row + (Hq + Hk) * D * esz, Hk * D * esz);
}

/* Row t: gate_up [T, 2 I] (gate then up) -> out [T, I] = silu(gate) * up, silu rounded first. */
static inline __attribute__((always_inline)) void silu_mul(int is_bf16, const void *gate_up,
        void *out, int64_t t, int64_t I) {
    const int64_t esz = is_bf16 ? 2 : 4;
    const char *g = (const char *)gate_up + t * 2 * I * esz, *u = g + I * esz;
    void *o = (char *)out + t * I * esz;
#pragma omp simd
    for (int64_t i = 0; i < I; i++) {
        const float x = GET(is_bf16, g, i);
        const float s = ROUND(is_bf16, x / (1.0f + expf(-x)));
        PUT(is_bf16, o, i, s * GET(is_bf16, u, i));
    }
}

/* Rows (tokens) are independent: long prefill chunks spread them over the threads. */
#define ROWS(T) _Pragma("omp parallel for num_threads(threads) if (T >= 16) schedule(static)") \
    for (int64_t t = 0; t < T; t++)

#define ENTRIES(SUFFIX, T_, IS_BF16)                                                              \
    void rope_store_##SUFFIX(const T_ *qkv, int64_t qkv_row, int64_t T, int64_t Hq, int64_t Hk,  \
                             int64_t D, const int64_t *positions, const T_ *cos, const T_ *sin,  \
                             const int64_t *slots, T_ *k_cache, T_ *v_cache, T_ *q_out,          \
                             int64_t threads) {                                                   \
        ROWS(T) rope_store(IS_BF16, qkv, qkv_row, t, Hq, Hk, D, positions, cos, sin, slots,      \
                           k_cache, v_cache, q_out);                                              \
    }                                                                                             \
    void silu_mul_##SUFFIX(const T_ *gate_up, T_ *out, int64_t T, int64_t I, int64_t threads) {   \
        ROWS(T) silu_mul(IS_BF16, gate_up, out, t, I);                                            \
    }

ENTRIES(f32, float, 0)
ENTRIES(bf16, bf16, 1)
