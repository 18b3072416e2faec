/* TurboQuant rows on CPU (layers/turboquant.py has the maths and the PyTorch reference):
 * rotating rows into and out of their KV head's basis, quantizing K/V rows into the cache, and
 * decoding gathered rows for the PyTorch attention path.
 *
 * Built on first use by dist_engine/kernels/__init__.py and called through ctypes. Every row is
 * computed alone in a fixed order, so its result never depends on the other rows of a call: a
 * token gets the same codes in a prefill chunk, a decode step or a verification step (prefix
 * caching and speculation stay exact), and a query the same rotation.
 *
 * Layouts (element strides): rows x [N, H * G, D] with row stride x_row between tokens (the
 * [H * G, D] part contiguous); matrices M [H, D, D]; cache codes [num_slots, H, D * bits / 8],
 * scales [num_slots, H] fp16; slots [N].
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "tq.h"

#define MAX_D 1024 /* rows are staged on the stack */

static inline void load(const void *x, int64_t at, int64_t D, int is_bf16, float *dst) {
    if (is_bf16)
        for (int64_t d = 0; d < D; d++) dst[d] = widen(((const bf16 *)x)[at + d]);
    else
        memcpy(dst, (const float *)x + at, (size_t)D * sizeof(float));
}

/* out[e] = sum_d x[d] M[d][e], accumulated in d order (M = R^T rotates into a head's basis,
 * M = R back out of it). */
static inline void rotate_row(const float *x, const float *M, int64_t D, float *out) {
    memset(out, 0, (size_t)D * sizeof(float));
    for (int64_t d = 0; d < D; d++) {
        const float xd = x[d];
        const float *m = M + d * D;
        for (int64_t e = 0; e < D; e++) out[e] += xd * m[e];
    }
}

/* Every row of x through its head's matrix: row (n, h * G + g) uses M[h]. */
static int rotate(int is_bf16, const void *x, int64_t x_row, void *out, int64_t N, int64_t H,
                  int64_t G, int64_t D, const float *M, int64_t threads) {
    if (D > MAX_D) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < N * H * G; r++) {
        const int64_t n = r / (H * G), hg = r % (H * G);
        float row[MAX_D], rot[MAX_D];
        load(x, n * x_row + hg * D, D, is_bf16, row);
        rotate_row(row, M + hg / G * D * D, D, rot);
        if (is_bf16)
            for (int64_t d = 0; d < D; d++) ((bf16 *)out)[r * D + d] = narrow(rot[d]);
        else
            memcpy((float *)out + r * D, rot, (size_t)D * sizeof(float));
    }
    return 0;
}

/* Quantize rows x [N, H, D] into the cache at slots: rotate (Rt = R^T per head), divide by the
 * norm, code each coordinate by the number of boundaries below it, pack; the scale is the norm,
 * or with norm correction the norm over the centroid vector's norm. With shift [H, D] (keys:
 * the rotated mean), a row is stored less its head's shift unless it is shorter as it is: then
 * as it is, with the scale's sign bit set. */
static int encode(int is_bf16, const void *x, int64_t x_row, int64_t N, int64_t H, int64_t D,
                  const float *Rt, const float *centroids, const float *bounds, int64_t bits,
                  int64_t norm_correction, const float *shift, const int64_t *slots,
                  uint8_t *codes, uint16_t *scales, int64_t threads) {
    if (D > MAX_D || D % 8) return -1;
    const int64_t levels = (int64_t)1 << bits, row_bytes = D * bits / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < N * H; r++) {
        const int64_t n = r / H, h = r % H;
        float row[MAX_D], y[MAX_D];
        load(x, n * x_row + h * D, D, is_bf16, row);
        rotate_row(row, Rt + h * D * D, D, y);
        float sq = 0.0f;
        for (int64_t d = 0; d < D; d++) sq += y[d] * y[d];
        int raw = 0;
        if (shift != NULL) {
            const float *sh = shift + h * D;
            float csq = 0.0f;
            for (int64_t d = 0; d < D; d++) csq += (y[d] - sh[d]) * (y[d] - sh[d]);
            raw = sq < csq;
            if (!raw) {
                for (int64_t d = 0; d < D; d++) y[d] -= sh[d];
                sq = csq;
            }
        }
        const float norm = sqrtf(sq), div = norm > 0.0f ? norm : 1.17549435e-38f;
        uint8_t *out = codes + (slots[n] * H + h) * row_bytes;
        float csq = 0.0f;
        for (int64_t g = 0; g < D / 8; g++) {
            uint32_t word = 0;
            for (int64_t i = 0; i < 8; i++) {
                const float u = y[8 * g + i] / div;
                uint32_t c = 0;
                for (int64_t k = 0; k < levels - 1; k++) c += u > bounds[k];
                csq += centroids[c] * centroids[c];
                word |= c << (bits * i);
            }
            for (int64_t b = 0; b < bits; b++) out[g * bits + b] = (uint8_t)(word >> (8 * b));
        }
        const uint16_t scale = tq_to_half(norm_correction ? norm / sqrtf(csq) : norm);
        scales[slots[n] * H + h] = raw ? scale | 0x8000 : scale;
    }
    return 0;
}

/* Decode the rows of slots [N] into out [N, H, D], in their heads' rotated basis: |scale| times
 * the centroids, less shift [H, D] (may be NULL) where the scale's sign bit is set. */
static int gather(int is_bf16, const uint8_t *codes, const uint16_t *scales, const int64_t *slots,
                  int64_t N, int64_t H, int64_t D, const float *centroids, int64_t bits,
                  const float *shift, void *out, int64_t threads) {
    if (D > MAX_D || D % 8) return -1;
    const int64_t row_bytes = D * bits / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < N * H; r++) {
        const TQRows t = {codes, scales, centroids, bits, row_bytes, shift};
        float row[MAX_D];
        tq_row(&t, slots[r / H] * H + r % H, r % H, D, row);
        if (is_bf16)
            for (int64_t d = 0; d < D; d++) ((bf16 *)out)[r * D + d] = narrow(row[d]);
        else
            memcpy((float *)out + r * D, row, (size_t)D * sizeof(float));
    }
    return 0;
}

/* Exported entry points, one per element type of the rows. */
#define ENTRIES(SUFFIX, T, IS_BF16)                                                              \
    int tq_rotate_##SUFFIX(const T *x, int64_t x_row, T *out, int64_t N, int64_t H, int64_t G,   \
                           int64_t D, const float *M, int64_t threads) {                         \
        return rotate(IS_BF16, x, x_row, out, N, H, G, D, M, threads);                           \
    }                                                                                            \
    int tq_encode_##SUFFIX(const T *x, int64_t x_row, int64_t N, int64_t H, int64_t D,           \
                           const float *Rt, const float *centroids, const float *bounds,         \
                           int64_t bits, int64_t norm_correction, const float *shift,            \
                           const int64_t *slots, uint8_t *codes, uint16_t *scales,               \
                           int64_t threads) {                                                    \
        return encode(IS_BF16, x, x_row, N, H, D, Rt, centroids, bounds, bits, norm_correction, \
                      shift, slots, codes, scales, threads);                                     \
    }                                                                                            \
    int tq_gather_##SUFFIX(const uint8_t *codes, const uint16_t *scales, const int64_t *slots,   \
                           int64_t N, int64_t H, int64_t D, const float *centroids, int64_t bits, \
                           const float *shift, T *out, int64_t threads) {                        \
        return gather(IS_BF16, codes, scales, slots, N, H, D, centroids, bits, shift, out,        \
                      threads);                                                                  \
    }

ENTRIES(f32, float, 0)
ENTRIES(bf16, bf16, 1)
