/* Products y = x W^T (+ b) on CPU against quantized weights (kernels/qlinear.py packs them).
 *
 * Every format the engine keeps quantized is repacked at load into one of three code kinds,
 * with a scale (and optionally an offset; fp32, or fp16 where exact) per group of G consecutive inputs of an
 * output row, so that W[n, k] = scale[n, g] * code[n, k] + offset[n, g] with g = k / G:
 *   U4    4-bit codes 0..15, or through a 16-entry table of signed values (E2M1 for FP4);
 *   S8    signed 8-bit codes;
 *   E4M3  FP8 bytes (their value is the fp16 with the same sign and the bits shifted in, times
 *         2^8; the packer folds the 2^8 into the scales).
 * Output rows come in panels of 16. Within a panel the codes of 4 (S8, E4M3) or 8 (U4)
 * consecutive inputs of the 16 rows form one 64-byte block: byte 4 j + t holds row j's code for
 * input t (U4: input t in the low nibble, input t + 4 in the high one). Read as sixteen 32-bit
 * lanes, lane j is row j: one load feeds sixteen outputs.
 *
 * Two ways to compute (both give every output the same arithmetic whatever the batch):
 *  - float activations (fp32, or bf16 widened): codes become floats, one fp32 sum per group
 *    in input order, then y += scale * sum (+ offset * sum of the group's inputs);
 *  - int8 activations (AVX-512 VNNI, qlinear_*_i8): each row of x is quantized per block of
 *    32 inputs to int8 with one fp32 scale (as llama.cpp does), an exact integer dot product
 *    per block of codes (vpdpbusd: 64 multiply-adds per instruction), then
 *    y += (scale * x_scale) * sum (+ offset * sum of the group's quantized inputs). About five
 *    times fewer instructions than the float path, which makes 4-bit decode memory-bound.
 * x [M, K] with row stride x_row; bias [N] or NULL (the output's dtype); y [M, N] contiguous.
 */
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
#define ACT_BLOCK 32  /* inputs per int8 activation scale */
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

static inline __attribute__((always_inline)) v16u load_block(const uint8_t *p) {
    v16u d;
    memcpy(&d, p, sizeof d);
    return d;
}

/* 64 bytes looked up in a 16-entry table (the table replicated in each 16-byte lane). */
static inline __attribute__((always_inline)) v64b lookup(v64b table, v64b idx) {
#if defined(__AVX512BW__)
    return (v64b)_mm512_shuffle_epi8((__m512i)table, (__m512i)idx);
#elif defined(__AVX2__)
    v64b out;
    __m256i lo, hi, t;
    memcpy(&t, &table, 32);
    memcpy(&lo, &idx, 32);
    memcpy(&hi, (const char *)&idx + 32, 32);
    lo = _mm256_shuffle_epi8(t, lo);
    hi = _mm256_shuffle_epi8(t, hi);
    memcpy(&out, &lo, 32);
    memcpy((char *)&out + 32, &hi, 32);
    return out;
#else
    v64b out;
    for (int i = 0; i < 64; i++) out[i] = table[idx[i] & 15];
    return out;
#endif
}

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

static inline float scale_at(const qweight *w, const void *base, int64_t at) {
    if (!w->scale16) return ((const float *)base)[at];
    v16u h = {0};
    h[0] = ((const uint16_t *)base)[at];
    return half_to_float(h)[0];
}

/* ---- float activations ------------------------------------------------------------------- */

/* Input i of a block as sixteen floats (one per row of the panel). d: the block; lo, hi: the
 * U4 table lookups of its low and high nibbles (only with a table). */
static inline __attribute__((always_inline)) v16f lane(int kind, int has_lut, v16u d, v16u lo,
                                                      v16u hi, int i) {
    if (kind == U4 && !has_lut)
        return __builtin_convertvector((v16i)((d >> (8 * (i & 3) + 4 * (i >> 2))) & 15), v16f);
    if (kind == U4) { /* the looked-up bytes are signed codes laid out as S8 */
        const v16u s = i < 4 ? lo : hi;
        return __builtin_convertvector((v16i)(s << (24 - 8 * (i & 3))) >> 24, v16f);
    }
    if (kind == S8) return __builtin_convertvector((v16i)(d << (24 - 8 * i)) >> 24, v16f);
    const v16u b = d >> (8 * i); /* E4M3: sign to bit 15, exponent and mantissa to bits 7-14 */
    return half_to_float(((b << 8) & 0x8000) | ((b << 7) & 0x3f80));
}

/* Rows x[0 .. MR) against panels p0 .. p0 + NP (constants at each call site). xsum [MR][K / G]:
 * each row's group sums (only read with offsets). Accumulators stay in registers: every loop
 * over m, p and i has a constant bound and is unrolled. */
static inline __attribute__((always_inline)) void ftile(int kind, int has_lut, int MR, int NP,
        const qweight *w, const float *x, int64_t xs, const float *xsum, int64_t p0,
        v16f out[4][4]) {
    const int64_t K = w->k, G = w->group, groups = K / G, bk = block_k(kind);
    const int64_t pb = panel_bytes(w);
    const uint8_t *codes = w->codes + p0 * pb;
    const int64_t s0 = p0 * groups * PANEL; /* this tile's first scale */
    const void *sc = w->scales, *of = w->offsets;
    v64b table = {0};
    if (has_lut)
        for (int i = 0; i < 64; i++) table[i] = w->lut[i & 15];
#pragma GCC unroll 4
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
        for (int p = 0; p < NP; p++) out[m][p] = (v16f){0};
    for (int64_t g = 0; g < groups; g++) {
        v16f acc[4][4];
#pragma GCC unroll 4
        for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
            for (int p = 0; p < NP; p++) acc[m][p] = (v16f){0};
        for (int64_t b = g * G / bk; b < (g + 1) * G / bk; b++) {
            v16u d[4], lo[4], hi[4];
#pragma GCC unroll 4
            for (int p = 0; p < NP; p++) {
                d[p] = load_block(codes + p * pb + b * BLOCK_BYTES);
                if (has_lut) {
                    lo[p] = (v16u)lookup(table, (v64b)(d[p] & 0x0f0f0f0f));
                    hi[p] = (v16u)lookup(table, (v64b)((d[p] >> 4) & 0x0f0f0f0f));
                }
            }
#pragma GCC unroll 8
            for (int i = 0; i < bk; i++) {
                const int64_t k = b * bk + i;
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++) {
                    const v16f wv = lane(kind, has_lut, d[p], lo[p], hi[p], i);
#pragma GCC unroll 4
                    for (int m = 0; m < MR; m++) acc[m][p] += wv * x[m * xs + k];
                }
            }
        }
#pragma GCC unroll 4
        for (int p = 0; p < NP; p++) {
            const v16f s = load_scales(w, sc, s0 + (p * groups + g) * PANEL);
            const v16f z = of ? load_scales(w, of, s0 + (p * groups + g) * PANEL) : (v16f){0};
#pragma GCC unroll 4
            for (int m = 0; m < MR; m++) {
                out[m][p] += s * acc[m][p];
                if (of) out[m][p] += z * xsum[m * groups + g];
            }
        }
    }
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

#define STORE_TILE(MR, NP)                                                                    \
    for (int m = 0; m < MR; m++)                                                              \
        for (int p = 0; p < NP; p++)                                                          \
            store(y16, out[m][p], bias, (char *)y + (m0 + m) * N * (y16 ? 2 : 4),             \
                  (pp + p) * PANEL, N);

/* Rows [0, rows) against panels [pa, pb) in tiles: one or two rows against four panels, up
 * to four rows against two, what is left against one. */
static inline __attribute__((always_inline)) void float_rows(int kind, int has_lut, int y16,
        const qweight *w, const float *x, int64_t xs, const float *xsum, int64_t rows,
        int64_t pa, int64_t pb, const void *bias, void *y) {
    const int64_t N = w->n, groups = w->k / w->group;
    v16f out[4][4];
    for (int64_t m0 = 0; m0 < rows;) {
        const int64_t left = rows - m0;
        const float *xm = x + m0 * xs, *sm = xsum + m0 * groups;
        int64_t pp = pa;
        if (left == 1) {
            for (; pp + 4 <= pb; pp += 4) { ftile(kind, has_lut, 1, 4, w, xm, xs, sm, pp, out); STORE_TILE(1, 4) }
            for (; pp < pb; pp++) { ftile(kind, has_lut, 1, 1, w, xm, xs, sm, pp, out); STORE_TILE(1, 1) }
            m0 += 1;
        } else if (left == 2) {
            for (; pp + 4 <= pb; pp += 4) { ftile(kind, has_lut, 2, 4, w, xm, xs, sm, pp, out); STORE_TILE(2, 4) }
            for (; pp < pb; pp++) { ftile(kind, has_lut, 2, 1, w, xm, xs, sm, pp, out); STORE_TILE(2, 1) }
            m0 += 2;
        } else if (left == 3) {
            for (; pp + 2 <= pb; pp += 2) { ftile(kind, has_lut, 3, 2, w, xm, xs, sm, pp, out); STORE_TILE(3, 2) }
            for (; pp < pb; pp++) { ftile(kind, has_lut, 3, 1, w, xm, xs, sm, pp, out); STORE_TILE(3, 1) }
            m0 += 3;
        } else {
            for (; pp + 2 <= pb; pp += 2) { ftile(kind, has_lut, 4, 2, w, xm, xs, sm, pp, out); STORE_TILE(4, 2) }
            for (; pp < pb; pp++) { ftile(kind, has_lut, 4, 1, w, xm, xs, sm, pp, out); STORE_TILE(4, 1) }
            m0 += 4;
        }
    }
}

/* Each thread takes a contiguous run of panels (balanced), every row of the block. */
static void float_block(const qweight *w, const float *x, int64_t xs, const float *xsum,
                        int64_t rows, const void *bias, void *y, int y16, int64_t threads) {
    const int64_t n_panels = (w->n + PANEL - 1) / PANEL;
    const int has_lut = w->kind == U4 && w->lut != NULL;
#pragma omp parallel num_threads(n_panels >= 4 ? threads : 1)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t pa = n_panels * t / T, pb = n_panels * (t + 1) / T;
        if (w->kind == U4 && !has_lut) float_rows(U4, 0, y16, w, x, xs, xsum, rows, pa, pb, bias, y);
        else if (w->kind == U4) float_rows(U4, 1, y16, w, x, xs, xsum, rows, pa, pb, bias, y);
        else if (w->kind == S8) float_rows(S8, 0, y16, w, x, xs, xsum, rows, pa, pb, bias, y);
        else float_rows(E4M3, 0, y16, w, x, xs, xsum, rows, pa, pb, bias, y);
    }
}

/* Group sums of rows [0, rows) of x: xsum[m * groups + g], each one fp32 sum in input order. */
static void group_sums(const float *x, int64_t xs, int64_t rows, int64_t K, int64_t G, float *xsum) {
    const int64_t groups = K / G;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += x[m * xs + k];
            xsum[m * groups + g] = s;
        }
}

/* fp32 (y16 = 0) or bf16 (y16 = 1, x widened a block at a time) activations. */
static int float_product(const qweight *w, const void *x, int64_t x_row, const void *bias,
                         void *y, int64_t M, int y16, int64_t threads) {
    const int64_t K = w->k, groups = K / w->group, rb = M < ROW_BLOCK ? M : ROW_BLOCK;
    float *xsum = malloc(sizeof(float) * (size_t)(rb * groups));
    float *xf = y16 ? malloc(sizeof(float) * (size_t)(rb * K)) : NULL;
    if (!xsum || (y16 && !xf)) {
        free(xsum);
        free(xf);
        return 1;
    }
    for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
        const int64_t rows = M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK;
        const float *xb = (const float *)x + m0 * x_row;
        int64_t xs = x_row;
        if (y16) {
            for (int64_t m = 0; m < rows; m++)
                for (int64_t k = 0; k < K; k++) xf[m * K + k] = widen(((const bf16 *)x)[(m0 + m) * x_row + k]);
            xb = xf;
            xs = K;
        }
        if (w->offsets) group_sums(xb, xs, rows, K, w->group, xsum);
        float_block(w, xb, xs, xsum, rows, bias, (char *)y + m0 * w->n * (y16 ? 2 : 4), y16, threads);
    }
    free(xsum);
    free(xf);
    return 0;
}

/* The entry points return 0, or 1 when scratch memory cannot be allocated. */
int qlinear_f32(const float *x, int64_t x_row, const qweight *w, const float *bias, float *y,
                int64_t M, int64_t threads) {
    return float_product(w, x, x_row, bias, y, M, 0, threads);
}

int qlinear_bf16(const bf16 *x, int64_t x_row, const qweight *w, const bf16 *bias, bf16 *y,
                 int64_t M, int64_t threads) {
    return float_product(w, x, x_row, bias, y, M, 1, threads);
}

/* ---- int8 activations (AVX-512 VNNI) ------------------------------------------------------ */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_I8 1

/* A block of x quantized: codes [rows, K], one scale per ACT_BLOCK inputs [rows, K / 32], the
 * codes' sum per unit (min(G, 32) inputs) [rows, K / unit]. */
typedef struct {
    int8_t *q;
    float *scale;
    int32_t *qsum;
} qact;

static void quantize_rows(const float *x, int64_t xs, int64_t rows, int64_t K, int64_t unit, qact *a) {
    for (int64_t m = 0; m < rows; m++)
        for (int64_t b = 0; b < K / ACT_BLOCK; b++) {
            const float *xb = x + m * xs + b * ACT_BLOCK;
            float amax = 0.0f;
            for (int i = 0; i < ACT_BLOCK; i++) amax = fmaxf(amax, fabsf(xb[i]));
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int8_t *q = a->q + m * K + b * ACT_BLOCK;
            for (int i = 0; i < ACT_BLOCK; i++) q[i] = (int8_t)lrintf(xb[i] * inv);
            a->scale[m * (K / ACT_BLOCK) + b] = amax / 127.0f;
            for (int64_t u = 0; u < ACT_BLOCK / unit; u++) {
                int32_t s = 0;
                for (int64_t i = u * unit; i < (u + 1) * unit; i++) s += q[i];
                a->qsum[m * (K / unit) + b * (ACT_BLOCK / unit) + u] = s;
            }
        }
}

/* Sums of each group's quantized inputs (x_scale * code sum per unit, in unit order), which
 * the offsets multiply: the product is then exactly that of the quantized row, whose rounding
 * errors meet the weights as they are (centred near zero). Exact float sums instead let the
 * errors meet the bare codes (0..15, all of one sign): on a Q4_1 layer of the default model
 * that made the product's relative error 2.4x that of the quantized row's own product (1.60%
 * against 0.68%). llama.cpp's Q8_1 block sums do the same as this. */
static void quantized_group_sums(const qact *a, int64_t rows, int64_t K, int64_t G, int64_t unit, float *xsum) {
    const int64_t groups = K / G, units = K / unit;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t u = g * G / unit; u < (g + 1) * G / unit; u++)
                s += a->scale[m * (K / ACT_BLOCK) + u * unit / ACT_BLOCK] * (float)a->qsum[m * units + u];
            xsum[m * groups + g] = s;
        }
}

/* The codes of one block as unsigned bytes for vpdpbusd: S8 and table codes are shifted by
 * +128 (the product subtracts 128 x the activations' sum again); plain U4 codes are 0..15. */
static inline __attribute__((always_inline)) void u8_codes(int kind, int has_lut, __m512i d,
        __m512i table, __m512i *lo, __m512i *hi) {
    const __m512i nib = _mm512_set1_epi8(0x0f);
    if (kind == S8) {
        *lo = _mm512_xor_si512(d, _mm512_set1_epi8((char)0x80));
    } else if (has_lut) {
        *lo = _mm512_shuffle_epi8(table, _mm512_and_si512(d, nib));
        *hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(d, 4), nib));
    } else {
        *lo = _mm512_and_si512(d, nib);
        *hi = _mm512_and_si512(_mm512_srli_epi16(d, 4), nib);
    }
}

static inline __attribute__((always_inline)) void itile(int kind, int has_lut, int MR, int NP,
        const qweight *w, const qact *a, int64_t K, const float *xsum, int64_t p0, v16f out[4][4]) {
    const int64_t G = w->group, groups = K / G, bk = block_k(kind), pb = panel_bytes(w);
    const int64_t unit = G < ACT_BLOCK ? G : ACT_BLOCK, units = K / unit;
    const int shifted = kind == S8 || has_lut; /* codes carry +128 */
    const uint8_t *codes = w->codes + p0 * pb;
    const int64_t s0 = p0 * groups * PANEL;
    const void *sc = w->scales, *of = w->offsets;
    __m512i table = _mm512_setzero_si512();
    if (has_lut) {
        int8_t t[64];
        for (int i = 0; i < 64; i++) t[i] = (int8_t)(w->lut[i & 15] + 128);
        memcpy(&table, t, 64);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
        for (int p = 0; p < NP; p++) out[m][p] = (v16f){0};
    for (int64_t g = 0; g < groups; g++) {
        v16f s[4];
#pragma GCC unroll 4
        for (int p = 0; p < NP; p++) s[p] = load_scales(w, sc, s0 + (p * groups + g) * PANEL);
        for (int64_t u = g * G / unit; u < (g + 1) * G / unit; u++) {
            /* two accumulators per output where a lone row would chain each one's vpdpbusd on
             * the last (U4: low / high nibbles; S8: even / odd blocks) */
            __m512i acc[4][4], acc2[4][4];
#pragma GCC unroll 4
            for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++) acc[m][p] = acc2[m][p] = _mm512_setzero_si512();
            const int64_t b0 = u * unit / bk, b1 = (u + 1) * unit / bk;
            for (int64_t b = b0; b < b1; b++) {
                const int64_t k = b * bk;
                const int second = MR == 1 && kind == S8 && ((b - b0) & 1);
                __m512i xl[4], xh[4];
#pragma GCC unroll 4
                for (int m = 0; m < MR; m++) {
                    int32_t x4;
                    memcpy(&x4, a->q + m * K + k, 4);
                    xl[m] = _mm512_set1_epi32(x4);
                    if (kind == U4) {
                        memcpy(&x4, a->q + m * K + k + 4, 4);
                        xh[m] = _mm512_set1_epi32(x4);
                    }
                }
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++) {
                    __m512i lo, hi = _mm512_setzero_si512();
                    u8_codes(kind, has_lut, _mm512_loadu_si512(codes + p * pb + b * BLOCK_BYTES), table, &lo, &hi);
#pragma GCC unroll 4
                    for (int m = 0; m < MR; m++) {
                        if (second) acc2[m][p] = _mm512_dpbusd_epi32(acc2[m][p], lo, xl[m]);
                        else acc[m][p] = _mm512_dpbusd_epi32(acc[m][p], lo, xl[m]);
                        if (kind == U4 && MR == 1) acc2[m][p] = _mm512_dpbusd_epi32(acc2[m][p], hi, xh[m]);
                        else if (kind == U4) acc[m][p] = _mm512_dpbusd_epi32(acc[m][p], hi, xh[m]);
                    }
                }
            }
            if (MR == 1)
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++) acc[0][p] = _mm512_add_epi32(acc[0][p], acc2[0][p]);
#pragma GCC unroll 4
            for (int m = 0; m < MR; m++) {
                const float xscale = a->scale[m * (K / ACT_BLOCK) + u * unit / ACT_BLOCK];
                const int32_t corr = shifted ? 128 * a->qsum[m * units + u] : 0;
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++) {
                    const v16f f = (v16f)_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][p], _mm512_set1_epi32(corr)));
                    out[m][p] += (s[p] * xscale) * f;
                }
            }
        }
        if (of) {
#pragma GCC unroll 4
            for (int p = 0; p < NP; p++) {
                const v16f z = load_scales(w, of, s0 + (p * groups + g) * PANEL);
#pragma GCC unroll 4
                for (int m = 0; m < MR; m++) out[m][p] += z * xsum[m * groups + g];
            }
        }
    }
}

#define ITILE(MR, NP) itile(kind, has_lut, MR, NP, w, &am, K, sm, pp, out); STORE_TILE(MR, NP)

static inline __attribute__((always_inline)) void int_rows(int kind, int has_lut, int y16,
        const qweight *w, const qact *a, const float *xsum, int64_t rows, int64_t pa, int64_t pb,
        const void *bias, void *y) {
    const int64_t N = w->n, K = w->k, groups = K / w->group;
    const int64_t unit = w->group < ACT_BLOCK ? w->group : ACT_BLOCK;
    v16f out[4][4];
    for (int64_t m0 = 0; m0 < rows;) {
        const int64_t left = rows - m0;
        const qact am = {a->q + m0 * K, a->scale + m0 * (K / ACT_BLOCK), a->qsum + m0 * (K / unit)};
        const float *sm = xsum + m0 * groups;
        int64_t pp = pa;
        if (left == 1) {
            for (; pp + 4 <= pb; pp += 4) { ITILE(1, 4) }
            for (; pp < pb; pp++) { ITILE(1, 1) }
            m0 += 1;
        } else if (left == 2) {
            for (; pp + 4 <= pb; pp += 4) { ITILE(2, 4) }
            for (; pp < pb; pp++) { ITILE(2, 1) }
            m0 += 2;
        } else if (left == 3) {
            for (; pp + 2 <= pb; pp += 2) { ITILE(3, 2) }
            for (; pp < pb; pp++) { ITILE(3, 1) }
            m0 += 3;
        } else {
            for (; pp + 2 <= pb; pp += 2) { ITILE(4, 2) }
            for (; pp < pb; pp++) { ITILE(4, 1) }
            m0 += 4;
        }
    }
}

static int int_product(const qweight *w, const void *x, int64_t x_row, const void *bias, void *y,
                       int64_t M, int y16, int64_t threads) {
    const int64_t K = w->k, G = w->group, groups = K / G, rb = M < ROW_BLOCK ? M : ROW_BLOCK;
    const int64_t unit = G < ACT_BLOCK ? G : ACT_BLOCK;
    const int64_t n_panels = (w->n + PANEL - 1) / PANEL;
    const int has_lut = w->kind == U4 && w->lut != NULL;
    float *xsum = malloc(sizeof(float) * (size_t)(rb * groups));
    float *xf = y16 ? malloc(sizeof(float) * (size_t)(rb * K)) : NULL;
    qact a = {malloc((size_t)(rb * K)), malloc(sizeof(float) * (size_t)(rb * K / ACT_BLOCK)),
              malloc(sizeof(int32_t) * (size_t)(rb * K / unit))};
    int failed = !xsum || (y16 && !xf) || !a.q || !a.scale || !a.qsum;
    for (int64_t m0 = 0; m0 < M && !failed; m0 += ROW_BLOCK) {
        const int64_t rows = M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK;
        const float *xb = (const float *)x + m0 * x_row;
        int64_t xs = x_row;
        if (y16) {
            for (int64_t m = 0; m < rows; m++)
                for (int64_t k = 0; k < K; k++) xf[m * K + k] = widen(((const bf16 *)x)[(m0 + m) * x_row + k]);
            xb = xf;
            xs = K;
        }
        quantize_rows(xb, xs, rows, K, unit, &a);
        if (w->offsets) quantized_group_sums(&a, rows, K, G, unit, xsum);
        void *yb = (char *)y + m0 * w->n * (y16 ? 2 : 4);
#pragma omp parallel num_threads(n_panels >= 4 ? threads : 1)
        {
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            const int64_t pa = n_panels * t / T, pb = n_panels * (t + 1) / T;
            if (w->kind == U4 && !has_lut) int_rows(U4, 0, y16, w, &a, xsum, rows, pa, pb, bias, yb);
            else if (w->kind == U4) int_rows(U4, 1, y16, w, &a, xsum, rows, pa, pb, bias, yb);
            else int_rows(S8, 0, y16, w, &a, xsum, rows, pa, pb, bias, yb);
        }
    }
    free(xsum);
    free(xf);
    free(a.q);
    free(a.scale);
    free(a.qsum);
    return failed;
}
#endif

/* 1 where this build has the int8-activation products (AVX-512 VNNI). */
int qlinear_has_i8(void) {
#ifdef HAVE_I8
    return 1;
#else
    return 0;
#endif
}

/* int8 activations: U4 and S8 weights whose groups are 16 or a multiple of 32 inputs, K a
 * multiple of 32 (the caller checks); returns 2 where this build has no VNNI. */
int qlinear_f32_i8(const float *x, int64_t x_row, const qweight *w, const float *bias, float *y,
                   int64_t M, int64_t threads) {
#ifdef HAVE_I8
    return int_product(w, x, x_row, bias, y, M, 0, threads);
#else
    return 2;
#endif
}

int qlinear_bf16_i8(const bf16 *x, int64_t x_row, const qweight *w, const bf16 *bias, bf16 *y,
                    int64_t M, int64_t threads) {
#ifdef HAVE_I8
    return int_product(w, x, x_row, bias, y, M, 1, threads);
#else
    return 2;
#endif
}

/* ---- dequantization ---------------------------------------------------------------------- */

/* Rows ids[0 .. count) of W as fp32 into out [count, K] (embedding lookups, other devices). */
void qdequant_rows(const qweight *w, const int64_t *ids, int64_t count, float *out) {
    const int64_t K = w->k, G = w->group, groups = K / G, bk = block_k(w->kind), pb = panel_bytes(w);
    for (int64_t r = 0; r < count; r++) {
        const int64_t n = ids[r], p = n / PANEL, j = n % PANEL;
        const uint8_t *c = w->codes + p * pb;
        for (int64_t k = 0; k < K; k++) {
            const int64_t b = k / bk, i = k % bk, g = k / G;
            const uint8_t byte = c[b * BLOCK_BYTES + 4 * j + (i & 3)];
            float v;
            if (w->kind == U4) {
                const int nib = i < 4 ? (byte & 15) : (byte >> 4);
                v = w->lut ? (float)w->lut[nib] : (float)nib;
            } else if (w->kind == S8) {
                v = (float)(int8_t)byte;
            } else {
                v16u h = {0};
                h[0] = ((uint32_t)(byte & 0x80) << 8) | ((uint32_t)(byte & 0x7f) << 7);
                v = half_to_float(h)[0];
            }
            const int64_t at = (p * groups + g) * PANEL + j;
            out[r * K + k] = scale_at(w, w->scales, at) * v + (w->offsets ? scale_at(w, w->offsets, at) : 0.0f);
        }
    }
}
