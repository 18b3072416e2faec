/* TurboQuant rows for the CPU kernels (layers/turboquant.py has the maths): a row is D codes of
 * 3 or 4 bits plus an fp16 scale. Codes are packed in groups of eight; a group takes `bits`
 * bytes, code i of the group in bits bits*i .. bits*i + bits - 1 of its little-endian word. */
#pragma once
#include <stdint.h>
#include <string.h>

/* One side (K or V) of a layer's cache, as attention reads it. A row whose scale has its sign
 * bit set is |scale| * centroids less shift[h] (keys stored uncentred; layers/turboquant.py). */
typedef struct {
    const uint8_t *codes;    /* [num_slots, Hk, row_bytes] */
    const uint16_t *scales;  /* [num_slots, Hk] fp16 */
    const float *centroids;  /* [2^bits], ascending */
    int64_t bits, row_bytes; /* row_bytes = D * bits / 8 */
    const float *shift;      /* [Hk, D]: the rotated mean key; NULL: no row is shifted */
} TQRows;

typedef float tq_vec8 __attribute__((vector_size(32)));
typedef uint32_t tq_u32x8 __attribute__((vector_size(32)));

static inline float tq_half(uint16_t h) {
    _Float16 x;
    memcpy(&x, &h, sizeof x);
    return (float)x;
}

/* |scale| of a stored fp16 scale, and whether its row is shifted (sign bit set) */
static inline float tq_abs_half(uint16_t h) { return tq_half(h & 0x7fff); }
static inline int tq_shifted(uint16_t h) { return h >> 15; }

static inline uint16_t tq_to_half(float f) {
    const _Float16 x = (_Float16)(f > 65504.0f ? 65504.0f : f); /* saturate, never inf */
    uint16_t h;
    memcpy(&h, &x, sizeof h);
    return h;
}

/* Eight codes of a group's word -> their centroids: one permute with GCC (vpermi2ps on AVX-512,
 * a table lookup on NEON), element by element elsewhere (clang has no run-time shuffle). */
static inline tq_vec8 tq_eight(uint32_t w, int64_t bits, const float *centroids) {
#if defined(__GNUC__) && !defined(__clang__)
    tq_vec8 lo, hi;
    memcpy(&lo, centroids, sizeof lo);
    if (bits == 4) {
        static const tq_u32x8 shift = {0, 4, 8, 12, 16, 20, 24, 28};
        memcpy(&hi, centroids + 8, sizeof hi);
        return __builtin_shuffle(lo, hi, ((tq_u32x8){w, w, w, w, w, w, w, w} >> shift) & 15);
    }
    static const tq_u32x8 shift = {0, 3, 6, 9, 12, 15, 18, 21};
    return __builtin_shuffle(lo, ((tq_u32x8){w, w, w, w, w, w, w, w} >> shift) & 7);
#else
    tq_vec8 v;
    for (int i = 0; i < 8; i++) v[i] = centroids[(w >> (bits * i)) & ((1u << bits) - 1)];
    return v;
#endif
}

/* The word of group g of a packed row (3 bits: three bytes read one by one, as the last group
 * ends the tensor). */
static inline uint32_t tq_word(const uint8_t *row, int64_t bits, int64_t g) {
    if (bits == 4) {
        uint32_t w;
        memcpy(&w, row + 4 * g, sizeof w);
        return w;
    }
    const uint8_t *p = row + 3 * g;
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
}

/* dst[0 .. n) = centroids[code] of codes d0 .. d0 + n of a packed row (d0, n multiples of 8). */
static inline void tq_lookup(const uint8_t *row, int64_t bits, const float *centroids, int64_t d0,
                             int64_t n, float *dst) {
    if (bits == 4) { /* two loops so that each has its width fixed */
        for (int64_t g = d0 / 8; g < (d0 + n) / 8; g++) {
            const tq_vec8 v = tq_eight(tq_word(row, 4, g), 4, centroids);
            memcpy(dst + 8 * g - d0, &v, sizeof v);
        }
    } else {
        for (int64_t g = d0 / 8; g < (d0 + n) / 8; g++) {
            const tq_vec8 v = tq_eight(tq_word(row, 3, g), 3, centroids);
            memcpy(dst + 8 * g - d0, &v, sizeof v);
        }
    }
}

/* Row tr (slot * Hk + h) of a side decoded into dst [D]: |scale| * centroids, less shift[h] if
 * its scale's sign bit is set. */
static inline void tq_row(const TQRows *t, int64_t tr, int64_t h, int64_t D, float *dst) {
    tq_lookup(t->codes + tr * t->row_bytes, t->bits, t->centroids, 0, D, dst);
    const uint16_t sc = t->scales[tr];
    const float s = tq_abs_half(sc);
    for (int64_t d = 0; d < D; d++) dst[d] *= s;
    if (t->shift != NULL && tq_shifted(sc))
        for (int64_t d = 0; d < D; d++) dst[d] -= t->shift[h * D + d];
}
