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
 * Three ways to compute; each gives every output the same arithmetic whatever the batch (a
 * row's result never depends on the rows beside it):
 *  - codes as floats (fp32 activations, or bf16 widened): one fp32 FMA per code and row, one
 *    sum per group in input order, then y += scale * sum (+ offset * sum of the group's
 *    inputs). Per 16 multiply-adds a row of one panel takes a shift or two and a conversion
 *    besides the FMA: at batch 1 this path is bound by those instructions, not by memory.
 *    FP8 codes, and U4 / S8 codes on CPUs without AVX-512 VNNI, always take it.
 *  - digits (the default for U4 / S8 codes on VNNI CPUs; qlinear_int.c): per block of 32
 *    inputs of a row, x = 2^t (65536 d0 + 256 d1 + d2) + e with 2^t a power of two chosen so
 *    the block's largest |x| / 2^t lies in (DIGITS_MAX / 2, DIGITS_MAX] (DIGITS_MAX =
 *    127 * 65793, the largest three balanced bytes hold), the d_i signed bytes, |e| <= 2^(t-1):
 *    each input kept to 22-23 bits of its block's largest, fp32-class. Each byte plane meets
 *    the codes in an exact integer dot product (vpdpbusd, 64 multiply-adds an instruction,
 *    three per 64 codes and row), then per block f = 65536 acc0 + (256 acc1 + acc2) in fp32
 *    (two roundings) and y += (scale * 2^t) * f (+ offset * sum of the group's represented
 *    inputs). The result is the represented row's exact product to fp32 rounding, and a small
 *    change of x moves it by about as much (no rounding steps that an ulp can cross, unlike
 *    int8 activations): the engine's greedy output stays the same with and without
 *    speculation and prefix caching, whose attention differs in the last bits.
 *  - int8 activations (--int8-activations, VNNI; qlinear_*_i8): each row of x quantized per
 *    block of 32 inputs to int8 with one fp32 scale (as llama.cpp does), one vpdpbusd per 64
 *    codes and row, then y += (scale * x_scale) * sum (+ offset * sum of the group's quantized
 *    inputs). Fastest, but activation rounding costs perplexity and token identity.
 * S8 and table codes enter vpdpbusd as unsigned bytes, code + 128; the accumulators start at
 * -128 x the activation bytes' sum to undo it.
 * x [M, K] with row stride x_row; bias [N] or NULL (the output's dtype); y [M, N] contiguous.
 */
#include "qlinear.h"

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

static inline float scale_at(const qweight *w, const void *base, int64_t at) {
    if (!w->scale16) return ((const float *)base)[at];
    v16u h = {0};
    h[0] = ((const uint16_t *)base)[at];
    return half_to_float(h)[0];
}

/* ---- float activations ------------------------------------------------------------------- */

static inline __attribute__((always_inline)) v16u load_block(const uint8_t *p) {
    v16u d;
    memcpy(&d, p, sizeof d);
    return d;
}

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
                __builtin_prefetch(codes + p * pb + (b + PREFETCH) * BLOCK_BYTES);
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

#define FTILE(MR, NP)                                                                         \
    ftile(kind, has_lut, MR, NP, w, x + m0 * xs, xs, xsum + m0 * groups, pp, out);            \
    STORE_TILE(MR, NP)

/* Rows [0, rows) against panels [pa, pb): one or two rows against four panels at a time, three
 * or four rows against two. */
static inline __attribute__((always_inline)) void float_rows(int kind, int has_lut, int y16,
        const qweight *w, const float *x, int64_t xs, const float *xsum, int64_t rows,
        int64_t pa, int64_t pb, const void *bias, void *y) {
    const int64_t N = w->n, groups = w->k / w->group;
    v16f out[4][4];
    WALK_TILES(rows, pa, pb, 4, 4, 2, 2, FTILE)
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
        int64_t xs;
        const float *xb = fp32_rows(x, x_row, m0, rows, K, y16, xf, &xs);
        if (w->offsets) group_sums(xb, xs, rows, K, w->group, xsum);
        float_block(w, xb, xs, xsum, rows, bias, (char *)y + m0 * w->n * (y16 ? 2 : 4), y16, threads);
    }
    free(xsum);
    free(xf);
    return 0;
}

/* ---- entry points ------------------------------------------------------------------------ */

/* Whether the digit path takes this weight: U4 / S8 codes, groups of 16 or a multiple of 32
 * inputs (activation blocks of 32 hold whole groups or whole blocks of 32 hold groups). */
static int digits_apply(const qweight *w) {
    return int_products_built() && (w->kind == U4 || w->kind == S8) && w->k % ACT_BLOCK == 0 &&
           (w->group == 16 || w->group % ACT_BLOCK == 0);
}

/* fp32 / bf16 activations at fp32 precision, the default: three base-256 digits where VNNI
 * and the weight allow it, else codes as floats. All entry points return 0, or 1 when scratch
 * memory cannot be allocated, or 2 (the int8 ones) where this build has no VNNI. */
int qlinear_f32(const float *x, int64_t x_row, const qweight *w, const float *bias, float *y,
                int64_t M, int64_t threads) {
    if (digits_apply(w)) return int_product(w, x, x_row, bias, y, M, 0, 1, threads);
    return float_product(w, x, x_row, bias, y, M, 0, threads);
}

int qlinear_bf16(const bf16 *x, int64_t x_row, const qweight *w, const bf16 *bias, bf16 *y,
                 int64_t M, int64_t threads) {
    if (digits_apply(w)) return int_product(w, x, x_row, bias, y, M, 1, 1, threads);
    return float_product(w, x, x_row, bias, y, M, 1, threads);
}

/* Codes as floats whatever the machine (tests and benchmarks compare the two paths). */
int qlinear_f32_float(const float *x, int64_t x_row, const qweight *w, const float *bias,
                      float *y, int64_t M, int64_t threads) {
    return float_product(w, x, x_row, bias, y, M, 0, threads);
}

int qlinear_bf16_float(const bf16 *x, int64_t x_row, const qweight *w, const bf16 *bias,
                       bf16 *y, int64_t M, int64_t threads) {
    return float_product(w, x, x_row, bias, y, M, 1, threads);
}

/* int8 activations (--int8-activations): U4 and S8 weights as for the digits. */
int qlinear_f32_i8(const float *x, int64_t x_row, const qweight *w, const float *bias, float *y,
                   int64_t M, int64_t threads) {
    return int_product(w, x, x_row, bias, y, M, 0, 0, threads);
}

int qlinear_bf16_i8(const bf16 *x, int64_t x_row, const qweight *w, const bf16 *bias, bf16 *y,
                    int64_t M, int64_t threads) {
    return int_product(w, x, x_row, bias, y, M, 1, 0, threads);
}

/* 1 where this build has the integer-activation products (AVX-512 VNNI). */
int qlinear_has_i8(void) { return int_products_built(); }

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
