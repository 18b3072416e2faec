/* What qlinear.c (float path, entry points) and qlinear_int.c (integer activations) share: the
 * packed weight, its scales, storing an output tile, and the walk of a block of rows in tiles.
 * The layout and the arithmetic are described at the top of qlinear.c. */
#pragma once
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define PANEL 16
#define BLOCK_BYTES 64
#define ROW_BLOCK 192 /* rows of x per pass over the weight */
#define ACT_BLOCK 32  /* inputs per activation scale of the integer paths */
/* Code blocks a tile asks the memory for ahead of its loads, per panel: at decode the weights
 * stream from DRAM faster than the hardware prefetcher keeps up with on its own (32 blocks,
 * 2 KiB: products of 4 rows 1.15-1.3x faster on the default model's 30 layers, 2 threads). */
#define PREFETCH 32
enum { U4 = 0, S8 = 1, E4M3 = 2 };

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int8_t v64b __attribute__((vector_size(64)));

/* The weight as the packer left it (qlinear.py's QWeight mirrors this struct). */
typedef struct {
    const uint8_t *codes;  /* [panels, K / block_k, 64] */
    const void *scales;    /* [panels, K / G, 16] fp32, or fp16 with scale16 */
    const void *offsets;   /* the same layout and type, or NULL */
    const int8_t *lut;     /* U4 only: 16 signed values the codes stand for, or NULL (0..15) */
    int64_t n, k, group, kind, scale16;
} qweight;

static inline int64_t block_k(int64_t kind) { return kind == U4 ? 8 : 4; }
static inline int64_t panel_bytes(const qweight *w) { return w->k / block_k(w->kind) * BLOCK_BYTES; }

/* Sixteen fp16 bit patterns (low halves of the lanes) as floats. */
static inline __attribute__((always_inline)) v16f half_to_float(v16u h) {
#if defined(__AVX512F__)
    return (v16f)_mm512_cvtph_ps(_mm512_cvtepi32_epi16((__m512i)h));
#elif defined(__F16C__) && defined(__AVX2__)
    v16f out;
    for (int half = 0; half < 2; half++) {
        __m256i v;
        memcpy(&v, (const char *)&h + 32 * half, 32);
        /* pack the low 16 bits of 8 lanes into 8 words */
        const __m256i pick = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                              0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
        v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, pick), 0x08);
        __m256 f = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
        memcpy((char *)&out + 32 * half, &f, 32);
    }
    return out;
#else
    v16f out;
    for (int i = 0; i < 16; i++) {
        const uint32_t b = h[i], e = (b >> 10) & 31, m = b & 1023;
        float v = e ? ldexpf((float)(m | 1024), (int)e - 25) : ldexpf((float)m, -24);
        out[i] = (b & 0x8000) ? -v : v;
    }
    return out;
#endif
}

/* Sixteen scales (or offsets) of one group of a panel: fp32, or fp16 widened (exact). */
static inline __attribute__((always_inline)) v16f load_scales(const qweight *w, const void *base,
                                                             int64_t at) {
    v16f v;
    if (!w->scale16) {
        memcpy(&v, (const float *)base + at, sizeof v);
        return v;
    }
#if defined(__AVX512F__)
    __m256i h;
    memcpy(&h, (const uint16_t *)base + at, sizeof h);
    return (v16f)_mm512_cvtph_ps(h);
#else
    v16u h;
    for (int i = 0; i < 16; i++) h[i] = ((const uint16_t *)base)[at + i];
    return half_to_float(h);
#endif
}


/* Rows [m0, m0 + rows) of x as fp32 with their row stride (*xs): fp32 x in place, bf16 x widened
 * into xf ([rows, K]; exact). */
static inline const float *fp32_rows(const void *x, int64_t x_row, int64_t m0, int64_t rows, int64_t K,
                                     int y16, float *xf, int64_t *xs) {
    if (!y16) {
        *xs = x_row;
        return (const float *)x + m0 * x_row;
    }
    for (int64_t m = 0; m < rows; m++)
        for (int64_t k = 0; k < K; k++) xf[m * K + k] = widen(((const bf16 *)x)[(m0 + m) * x_row + k]);
    *xs = K;
    return xf;
}
/* Output row of one panel: add the bias, narrow for bf16, store the valid columns. */
static inline __attribute__((always_inline)) void store(int y16, v16f v, const void *bias,
                                                       void *y_row, int64_t n0, int64_t N) {
    float o[PANEL];
    const int64_t valid = N - n0 < PANEL ? N - n0 : PANEL;
    memcpy(o, &v, sizeof o);
    if (bias)
        for (int64_t j = 0; j < valid; j++)
            o[j] += y16 ? widen(((const bf16 *)bias)[n0 + j]) : ((const float *)bias)[n0 + j];
    if (y16)
        for (int64_t j = 0; j < valid; j++) ((bf16 *)y_row)[n0 + j] = narrow(o[j]);
    else
        memcpy((float *)y_row + n0, o, valid * sizeof(float));
}

/* The tile out[MR][NP] of rows m0.. and panels pp.. into y (variables of the walk below). */
#define STORE_TILE(MR, NP)                                                                    \
    for (int m = 0; m < MR; m++)                                                              \
        for (int p = 0; p < NP; p++)                                                          \
            store(y16, out[m][p], bias, (char *)y + (m0 + m) * N * (y16 ? 2 : 4),             \
                  (pp + p) * PANEL, N);

/* Rows [0, rows) against panels [pa, pb) in tiles: TILE(MR, NP) computes and stores the tile
 * of rows m0.. and panels pp... One row goes against NP1 panels at a time, two against NP2,
 * three against NP3, four against NP4; the panels left over one at a time. Every loop bound in
 * a tile is then a constant, so its accumulators stay in registers. */
#define WALK_TILES(rows, pa, pb, NP1, NP2, NP3, NP4, TILE)                                    \
    for (int64_t m0 = 0; m0 < (rows);) {                                                      \
        const int64_t left = (rows) - m0;                                                     \
        int64_t pp = (pa);                                                                    \
        if (left == 1) {                                                                      \
            for (; pp + NP1 <= (pb); pp += NP1) { TILE(1, NP1) }                              \
            for (; pp < (pb); pp++) { TILE(1, 1) }                                            \
            m0 += 1;                                                                          \
        } else if (left == 2) {                                                               \
            for (; pp + NP2 <= (pb); pp += NP2) { TILE(2, NP2) }                              \
            for (; pp < (pb); pp++) { TILE(2, 1) }                                            \
            m0 += 2;                                                                          \
        } else if (left == 3) {                                                               \
            for (; pp + NP3 <= (pb); pp += NP3) { TILE(3, NP3) }                              \
            for (; pp < (pb); pp++) { TILE(3, 1) }                                            \
            m0 += 3;                                                                          \
        } else {                                                                              \
            for (; pp + NP4 <= (pb); pp += NP4) { TILE(4, NP4) }                              \
            for (; pp < (pb); pp++) { TILE(4, 1) }                                            \
            m0 += 4;                                                                          \
        }                                                                                     \
    }

/* qlinear_int.c: products with integer activations (AVX-512 VNNI builds only). digits = 0:
 * int8 activations; 1: three base-256 digits. Returns 0, 1 without scratch memory, 2 where the
 * build has no VNNI. */
int int_product(const qweight *w, const void *x, int64_t x_row, const void *bias, void *y,
                int64_t M, int y16, int digits, int64_t threads);
int int_products_built(void);
