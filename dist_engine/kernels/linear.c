/* Dense products y = x W^T (+ b) on CPU for fp32, bf16 and fp16 weights, from a panel layout.
 *
 * The weight [N, K] is repacked once (linear.py) into panels of 16 output rows stored k-major:
 * panel p holds W[16p .. 16p+15, k] contiguously for k = 0, 1, ..., so one sequential stream
 * feeds 16 outputs. bf16 panels store the 16 values of one k pair-interleaved (n0, n8, n1, n9,
 * ...): read as eight 32-bit words, a left shift by 16 gives rows 0-7 as fp32 and masking the
 * low half gives rows 8-15, two instructions for sixteen conversions.
 *
 * A tile is up to 6 rows of x against one panel: 12 accumulators of 8 lanes, each k adds
 * x[m, k] * W[n, k] into output (m, n). Every output is one fp32 sum in k order, whatever the
 * number of rows, the tile it falls in or the thread that computes it, so a row's result does
 * not depend on the batch it is in. Threads split the panels; rows come in blocks of ROW_BLOCK
 * so the activations of a block stay in cache while the weight streams through once.
 *
 * Written with GCC vector extensions (no intrinsics): with -march=native this compiles to AVX2
 * FMA on x86 and NEON on ARM; where AVX-512 is available, 16-lane tiles replace the 8-lane
 * ones (further down). At one row the product streams the weight at memory bandwidth
 * (17-26 GB/s on two Zen 3 cores, all 121 products of the default model, against 7-12 GB/s for
 * oneDNN's packed fp32 product); at 16-64 rows it runs 1.3-1.5x faster than oneDNN and at 256
 * rows on par (docs/performance.md has the table).
 * x [M, K] with row stride x_row; bias [N] or NULL (the output's dtype); y [M, N] contiguous.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef _Float16 v8h __attribute__((vector_size(16)));

#define PANEL 16
/* What a product reads and writes: bit 0 set for 16-bit weight panels, bit 1 for bf16 output and
 * bias, bit 2 for fp16 (not bf16) panels. fp32 is F32, bf16 is BF16, MIXED reads bf16 panels
 * and HALF fp16 panels into fp32 activations and output (the arithmetic is fp32 in every mode;
 * bf16 activations are widened first, 16-bit weights exactly). */
#define F32 0
#define MIXED 1
#define BF16 3
#define HALF 5
#define W16(mode) ((mode) & 1)
#define Y16(mode) (((mode) >> 1) & 1)
/* the weight panels' kind for load_k / load_z: 0 fp32, 1 bf16, 2 fp16 */
#define WKIND(mode) (W16(mode) ? ((mode) & 4 ? 2 : 1) : 0)
#define ROW_BLOCK 240 /* rows of x per pass over the weight (a multiple of 4 and of 6) */

/* Sixteen weights of one k as two fp32 vectors (rows 0-7, rows 8-15 of the panel). kind: 0
 * fp32, 1 bf16 (pair-interleaved), 2 fp16 (rows in order; a hardware conversion where the CPU
 * has one, F16C on x86). */
static inline __attribute__((always_inline)) void load_k(int kind, const void *panel,
                                                        int64_t k, v8f *lo, v8f *hi) {
    if (kind == 2) {
        const uint16_t *h = (const uint16_t *)panel + k * PANEL;
#if defined(__F16C__)
        *lo = (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
        *hi = (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 8)));
#else
        v8h a, b;
        memcpy(&a, h, sizeof a);
        memcpy(&b, h + 8, sizeof b);
        *lo = __builtin_convertvector(a, v8f);
        *hi = __builtin_convertvector(b, v8f);
#endif
    } else if (kind == 1) {
        v8u v;
        memcpy(&v, (const bf16 *)panel + k * PANEL, sizeof v);
        *lo = (v8f)(v << 16);
        *hi = (v8f)(v & 0xffff0000u);
    } else {
        memcpy(lo, (const float *)panel + k * PANEL, sizeof *lo);
        memcpy(hi, (const float *)panel + k * PANEL + 8, sizeof *hi);
    }
}

/* Output row m of a tile: add the bias, narrow for bf16, store the panel's valid columns. */
static inline __attribute__((always_inline)) void store_row(int is_bf16, v8f lo, v8f hi,
        const void *bias, void *y_row, int64_t n0, int64_t valid) {
    float o[PANEL];
    memcpy(o, &lo, sizeof lo);
    memcpy(o + 8, &hi, sizeof hi);
    if (bias)
        for (int64_t j = 0; j < valid; j++)
            o[j] += is_bf16 ? widen(((const bf16 *)bias)[n0 + j]) : ((const float *)bias)[n0 + j];
    if (is_bf16)
        for (int64_t j = 0; j < valid; j++) ((bf16 *)y_row)[n0 + j] = narrow(o[j]);
    else
        memcpy((float *)y_row + n0, o, valid * sizeof(float));
}

/* Rows x[0 .. MR) (fp32, stride xs) against one panel; MR is a constant at each call site. The
 * accumulators are named variables, not an array, so the compiler keeps all twelve in
 * registers (an array of vectors is written back to the stack every k). */
#define ROW(m, A, B)                                                                          \
    if (MR > m) {                                                                             \
        const float xv = x[m * xs + k];                                                       \
        A += lo * xv;                                                                         \
        B += hi * xv;                                                                         \
    }
#define OUT(m, A, B) \
    if (MR > m) store_row(Y16(mode), A, B, bias, (char *)y + m * y_row_bytes, n0, valid);

static inline __attribute__((always_inline)) void tile(int mode, int MR, const float *x,
        int64_t xs, const void *panel, int64_t K, const void *bias, void *y,
        int64_t y_row_bytes, int64_t n0, int64_t valid) {
    v8f a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0};
    v8f a3 = {0}, b3 = {0}, a4 = {0}, b4 = {0}, a5 = {0}, b5 = {0};
    for (int64_t k = 0; k < K; k++) {
        v8f lo, hi;
        load_k(WKIND(mode), panel, k, &lo, &hi);
        ROW(0, a0, b0) ROW(1, a1, b1) ROW(2, a2, b2) ROW(3, a3, b3) ROW(4, a4, b4) ROW(5, a5, b5)
    }
    OUT(0, a0, b0) OUT(1, a1, b1) OUT(2, a2, b2) OUT(3, a3, b3) OUT(4, a4, b4) OUT(5, a5, b5)
}

/* One row of x against four consecutive panels: eight accumulators and four weight streams
 * in flight instead of two and one, which lets a lone row (batch-1 decode) pull the weight
 * ~10% faster. The arithmetic of each output is the same as in tile(). */
static inline __attribute__((always_inline)) void row_x4(int mode, const float *x,
        const void *panel, int64_t K, const void *bias, void *y, int64_t N, int64_t n0) {
    const int64_t stride = K * PANEL * (W16(mode) ? 2 : 4);
    const char *p0 = panel, *p1 = p0 + stride, *p2 = p1 + stride, *p3 = p2 + stride;
    v8f a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
    for (int64_t k = 0; k < K; k++) {
        v8f lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3;
        load_k(WKIND(mode), p0, k, &lo0, &hi0);
        load_k(WKIND(mode), p1, k, &lo1, &hi1);
        load_k(WKIND(mode), p2, k, &lo2, &hi2);
        load_k(WKIND(mode), p3, k, &lo3, &hi3);
        const float xv = x[k];
        a0 += lo0 * xv; b0 += hi0 * xv; a1 += lo1 * xv; b1 += hi1 * xv;
        a2 += lo2 * xv; b2 += hi2 * xv; a3 += lo3 * xv; b3 += hi3 * xv;
    }
    store_row(Y16(mode), a0, b0, bias, y, n0, PANEL);
    store_row(Y16(mode), a1, b1, bias, y, n0 + PANEL, PANEL);
    store_row(Y16(mode), a2, b2, bias, y, n0 + 2 * PANEL, PANEL);
    store_row(Y16(mode), a3, b3, bias, y, n0 + 3 * PANEL, N - n0 - 3 * PANEL < PANEL ? N - n0 - 3 * PANEL : PANEL);
}

/* Up to GROUP_ROWS rows of x against three consecutive panels, for few-row products
 * (verifying 1-3 drafts feeds 2-4 rows per sequence): three weight streams and six
 * accumulators per row. With AVX2's sixteen vector registers a group is two rows (twelve
 * accumulators); against two panels at a time, best of 16-30 alternating passes over all
 * products of the default model (fp32, two Zen 3 cores): 2 rows 29.9 vs 31.4 ms (1 row: 29.1
 * ms), 3 rows 33.8 vs 37.0, 4 rows 34.6 vs 37.3; bf16 2 rows 18.3 vs 19.4 ms. There each pair of
 * rows is one more pass over the panels, slower than six-row tiles from 5 rows on (bf16: 3).
 * (AVX-512 builds use the 16-lane tiles further down instead; docs/performance.md has the
 * four-row groups they replaced.) */
#define GROUP_ROWS 2
#define GROUPED_MAX(W_BF16) ((W_BF16) ? 2 : 4)
#define ROW3(m, A0, B0, A1, B1, A2, B2)                                                       \
    if (MR > m) {                                                                             \
        const float xv = x[m * xs + k];                                                       \
        A0 += lo0 * xv;                                                                       \
        B0 += hi0 * xv;                                                                       \
        A1 += lo1 * xv;                                                                       \
        B1 += hi1 * xv;                                                                       \
        A2 += lo2 * xv;                                                                       \
        B2 += hi2 * xv;                                                                       \
    }
#define OUT3(m, A0, B0, A1, B1, A2, B2)                                                       \
    if (MR > m) {                                                                             \
        store_row(Y16(mode), A0, B0, bias, (char *)y + m * y_row_bytes, n0, PANEL);             \
        store_row(Y16(mode), A1, B1, bias, (char *)y + m * y_row_bytes, n0 + PANEL, PANEL);     \
        store_row(Y16(mode), A2, B2, bias, (char *)y + m * y_row_bytes, n0 + 2 * PANEL, valid2); \
    }

static inline __attribute__((always_inline)) void rows_x3(int mode, int MR, const float *x,
        int64_t xs, const void *panel, int64_t K, const void *bias, void *y,
        int64_t y_row_bytes, int64_t N, int64_t n0) {
    const int64_t stride = K * PANEL * (W16(mode) ? 2 : 4);
    const char *p0 = panel, *p1 = p0 + stride, *p2 = p1 + stride;
    const int64_t valid2 = N - n0 - 2 * PANEL < PANEL ? N - n0 - 2 * PANEL : PANEL;
    v8f a0 = {0}, b0 = {0}, c0 = {0}, d0 = {0}, e0 = {0}, f0 = {0};
    v8f a1 = {0}, b1 = {0}, c1 = {0}, d1 = {0}, e1 = {0}, f1 = {0};
    for (int64_t k = 0; k < K; k++) {
        v8f lo0, hi0, lo1, hi1, lo2, hi2;
        load_k(WKIND(mode), p0, k, &lo0, &hi0);
        load_k(WKIND(mode), p1, k, &lo1, &hi1);
        load_k(WKIND(mode), p2, k, &lo2, &hi2);
        ROW3(0, a0, b0, c0, d0, e0, f0) ROW3(1, a1, b1, c1, d1, e1, f1)
    }
    OUT3(0, a0, b0, c0, d0, e0, f0) OUT3(1, a1, b1, c1, d1, e1, f1)
}

/* Rows [0, rows) of x against three panels, a group of GROUP_ROWS at a time. */
static inline __attribute__((always_inline)) void rows_x3_groups(int mode, const float *x,
        int64_t xs, const void *panel, int64_t K, const void *bias, void *y, int64_t N,
        int64_t n0, int64_t rows) {
    const int64_t y_row_bytes = N * (Y16(mode) ? 2 : 4);
    for (int64_t m = 0; m < rows; m += GROUP_ROWS) {
        const float *xm = x + m * xs;
        char *ym = (char *)y + m * y_row_bytes;
        switch (rows - m) { /* a constant row count at each call, so the accumulators stay registers */
        case 1: rows_x3(mode, 1, xm, xs, panel, K, bias, ym, y_row_bytes, N, n0); break;
        default: rows_x3(mode, GROUP_ROWS, xm, xs, panel, K, bias, ym, y_row_bytes, N, n0);
        }
    }
}

#if defined(__AVX512F__)
/* AVX-512: one k of a panel is one 512-bit vector, so a row's product with a panel is one FMA
 * per k (two with 8-lane vectors) and a tile of four rows against four panels keeps sixteen
 * accumulators and four weight streams in registers (of thirty-two). Each output is still one
 * fp32 sum in k order, lane for lane the same FMAs as the 8-lane code, so results are bitwise
 * those of the paths above and independent of the batch. All 121 products of the default
 * model (fp32, weights out of cache, two AVX-512 Xeon vCPUs), median of 7 alternating passes,
 * 8-lane paths vs these tiles: 1 row 23.6 vs 21.9 ms, 4 rows 28.1 vs 26.4, 8 rows 33.9 vs
 * 30.1, 16 rows 48.1 vs 38.6, 64 rows 138 vs 84, 240 rows 468 vs 270 ms. bf16 panels widen
 * each k into two 8-lane halves first, so the gain there is smaller: bf16 activations 4 / 16 /
 * 64 rows 19.3 vs 17.2, 57.2 vs 47.1, 213 vs 173 ms; fp32 activations (the draft path) 4 rows
 * 16.3 vs 15.3 ms, on par from 16 rows; a lone row keeps the 8-lane loop (14.1 vs 14.5 ms). */
typedef float v16f __attribute__((vector_size(64)));
#define Z_PANELS 4
#define Z_ROWS 4

static inline __attribute__((always_inline)) v16f load_z(int kind, const void *panel, int64_t k) {
    if (kind == 0) {
        v16f w;
        memcpy(&w, (const float *)panel + k * PANEL, sizeof w);
        return w;
    }
    if (kind == 2) /* one conversion of the sixteen halves */
        return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)panel + k * PANEL)));
    v8f lo, hi; /* rows 0-7 and 8-15, side by side: the panel's rows in order */
    load_k(1, panel, k, &lo, &hi);
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

static inline __attribute__((always_inline)) void store_z(int is_bf16, v16f c, const void *bias,
        void *y_row, int64_t n0, int64_t valid) {
    store_row(is_bf16, __builtin_shufflevector(c, c, 0, 1, 2, 3, 4, 5, 6, 7),
              __builtin_shufflevector(c, c, 8, 9, 10, 11, 12, 13, 14, 15), bias, y_row, n0, valid);
}

#define ZACC(m) v16f c##m##0 = {0}, c##m##1 = {0}, c##m##2 = {0}, c##m##3 = {0};
#define ZROW(m)                                                                               \
    if (MR > m) {                                                                             \
        const float xv = x[m * xs + k];                                                       \
        c##m##0 += w0 * xv;                                                                   \
        if (NP > 1) { c##m##1 += w1 * xv; c##m##2 += w2 * xv; c##m##3 += w3 * xv; }           \
    }
#define ZOUT(m, j)                                                                            \
    if (MR > m && NP > j)                                                                     \
        store_z(Y16(mode), c##m##j, bias, (char *)y + m * y_row_bytes, n0 + j * PANEL,         \
                N - n0 - j * PANEL < PANEL ? N - n0 - j * PANEL : PANEL);

/* Rows x[0 .. MR) against NP (1 or 4) consecutive panels from column n0; both constants at
 * each call site, so the accumulators stay in registers. Of the last, partial panel only the
 * valid columns are stored. */
static inline __attribute__((always_inline)) void ztile(int mode, int MR, int NP, const float *x,
        int64_t xs, const void *panel, int64_t K, const void *bias, void *y, int64_t y_row_bytes,
        int64_t N, int64_t n0) {
    const int64_t stride = K * PANEL * (W16(mode) ? 2 : 4);
    const char *p0 = panel, *p1 = p0 + stride, *p2 = p1 + stride, *p3 = p2 + stride;
    ZACC(0) ZACC(1) ZACC(2) ZACC(3)
    for (int64_t k = 0; k < K; k++) {
        const v16f w0 = load_z(WKIND(mode), p0, k);
        v16f w1 = {0}, w2 = {0}, w3 = {0};
        if (NP > 1) {
            w1 = load_z(WKIND(mode), p1, k);
            w2 = load_z(WKIND(mode), p2, k);
            w3 = load_z(WKIND(mode), p3, k);
        }
        ZROW(0) ZROW(1) ZROW(2) ZROW(3)
    }
    ZOUT(0, 0) ZOUT(0, 1) ZOUT(0, 2) ZOUT(0, 3) ZOUT(1, 0) ZOUT(1, 1) ZOUT(1, 2) ZOUT(1, 3)
    ZOUT(2, 0) ZOUT(2, 1) ZOUT(2, 2) ZOUT(2, 3) ZOUT(3, 0) ZOUT(3, 1) ZOUT(3, 2) ZOUT(3, 3)
}

/* Rows [0, rows) of x against NP panels, Z_ROWS rows at a time. */
static inline __attribute__((always_inline)) void ztiles(int mode, int NP, const float *x,
        int64_t xs, const void *panel, int64_t K, const void *bias, void *y, int64_t N,
        int64_t n0, int64_t rows) {
    const int64_t y_row_bytes = N * (Y16(mode) ? 2 : 4);
    for (int64_t m = 0; m < rows; m += Z_ROWS) {
        const float *xm = x + m * xs;
        char *ym = (char *)y + m * y_row_bytes;
        switch (rows - m) {
        case 1: ztile(mode, 1, NP, xm, xs, panel, K, bias, ym, y_row_bytes, N, n0); break;
        case 2: ztile(mode, 2, NP, xm, xs, panel, K, bias, ym, y_row_bytes, N, n0); break;
        case 3: ztile(mode, 3, NP, xm, xs, panel, K, bias, ym, y_row_bytes, N, n0); break;
        default: ztile(mode, Z_ROWS, NP, xm, xs, panel, K, bias, ym, y_row_bytes, N, n0);
        }
    }
}
#endif

/* Rows [m0, m1) of x against panel p: full tiles of six, then one tile for the rest. */
static inline __attribute__((always_inline)) void rows_x_panel(int mode, const float *x,
        int64_t xs, const void *panels, const void *bias, void *y, int64_t m0, int64_t m1,
        int64_t N, int64_t K, int64_t p) {
    const int64_t wsz = W16(mode) ? 2 : 4, ysz = Y16(mode) ? 2 : 4;
    const int64_t n0 = p * PANEL, valid = N - n0 < PANEL ? N - n0 : PANEL;
    const void *panel = (const char *)panels + p * K * PANEL * wsz;
    int64_t m = m0;
#define TILE(MR) tile(mode, MR, x + m * xs, xs, panel, K, bias, (char *)y + m * N * ysz, N * ysz, n0, valid)
    for (; m + 6 <= m1; m += 6) TILE(6);
    switch (m1 - m) {
    case 5: TILE(5); break;
    case 4: TILE(4); break;
    case 3: TILE(3); break;
    case 2: TILE(2); break;
    case 1: TILE(1); break;
    }
#undef TILE
}

/* Rows [0, rows) of x (at most ROW_BLOCK) against every panel, into y. Each thread takes a
 * contiguous run of panels (a balanced split, so small products use both cores evenly); a
 * single row goes four panels at a time; two to four rows (bf16: two) go three panels at a time
 * in pairs, other rows and the panels left over in six-row tiles against one panel. With
 * AVX-512, tiles of up to four rows against four panels, then against single panels (a lone row
 * against bf16 panels first takes the four-panel loop). */
#if defined(__AVX512F__)
#define BLOCK(MODE, X, XS, rows, Y)                                                             \
    _Pragma("omp parallel num_threads(n_panels >= 4 ? threads : 1)")                            \
    {                                                                                           \
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();                      \
        const int64_t end = n_panels * (t + 1) / T;                                             \
        int64_t p = n_panels * t / T;                                                           \
        if (rows == 1 && WKIND(MODE) == 1) /* a lone row against bf16 panels: the 8-lane loop */ \
            for (; p + 4 <= end; p += 4)                                                        \
                row_x4(MODE, X, at + p * K * PANEL * esz, K, bias, Y, N, p * PANEL);            \
        for (; p + Z_PANELS <= end; p += Z_PANELS)                                              \
            ztiles(MODE, Z_PANELS, X, XS, at + p * K * PANEL * esz, K, bias, Y, N, p * PANEL, rows); \
        for (; p < end; p++)                                                                    \
            ztiles(MODE, 1, X, XS, at + p * K * PANEL * esz, K, bias, Y, N, p * PANEL, rows);   \
    }
#else
#define BLOCK(MODE, X, XS, rows, Y)                                                             \
    _Pragma("omp parallel num_threads(n_panels >= 4 ? threads : 1)")                            \
    {                                                                                           \
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();                      \
        const int64_t end = n_panels * (t + 1) / T;                                             \
        int64_t p = n_panels * t / T;                                                           \
        if (rows == 1)                                                                          \
            for (; p + 4 <= end; p += 4)                                                        \
                row_x4(MODE, X, at + p * K * PANEL * esz, K, bias, Y, N, p * PANEL);            \
        if (rows >= 2 && rows <= GROUPED_MAX(W16(MODE)))                                        \
            for (; p + 3 <= end; p += 3)                                                        \
                rows_x3_groups(MODE, X, XS, at + p * K * PANEL * esz, K, bias, Y, N, p * PANEL, rows); \
        for (; p < end; p++) rows_x_panel(MODE, X, XS, panels, bias, Y, 0, rows, N, K, p);      \
    }
#endif

/* fp32 activations and output against fp32 (F32) or bf16 (MIXED) panels; the mode is a
 * constant at each entry point below, so each gets its own specialised loops. */
static inline __attribute__((always_inline)) int f32_rows(int mode, const float *x, int64_t x_row,
        const void *panels, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
        int64_t threads) {
    const int64_t n_panels = (N + PANEL - 1) / PANEL, esz = W16(mode) ? 2 : 4;
    const char *at = (const char *)panels;
    for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
        const int64_t rows = M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK;
        const float *xb = x + m0 * x_row;
        float *yb = y + m0 * N;
        BLOCK(mode, xb, x_row, rows, yb)
    }
    return 0;
}

/* The entry points return 0, or 1 when scratch memory cannot be allocated (bf16 only). */
int linear_f32(const float *x, int64_t x_row, const float *panels, const float *bias, float *y,
               int64_t M, int64_t N, int64_t K, int64_t threads) {
    return f32_rows(F32, x, x_row, panels, bias, y, M, N, K, threads);
}

/* bf16 activations are widened a block of rows at a time into an fp32 copy (exact), then
 * broadcast like fp32. Returns 1 when that copy cannot be allocated. */
int linear_bf16(const bf16 *x, int64_t x_row, const bf16 *panels, const bf16 *bias, bf16 *y,
                int64_t M, int64_t N, int64_t K, int64_t threads) {
    const int64_t n_panels = (N + PANEL - 1) / PANEL, esz = 2;
    const char *at = (const char *)panels;
    float *xf = malloc(sizeof(float) * (size_t)(M < ROW_BLOCK ? M : ROW_BLOCK) * (size_t)K);
    if (!xf) return 1;
    for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
        const int64_t rows = M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK;
        for (int64_t m = 0; m < rows; m++)
            for (int64_t k = 0; k < K; k++) xf[m * K + k] = widen(x[(m0 + m) * x_row + k]);
        bf16 *yb = y + m0 * N;
        BLOCK(BF16, xf, K, rows, yb)
    }
    free(xf);
    return 0;
}

/* fp32 activations against bf16 panels, fp32 output and bias: half the weight bytes of an fp32
 * product with fp32 activations (the MTP layer and draft head of an fp32 model). */
int linear_f32_bf16w(const float *x, int64_t x_row, const bf16 *panels, const float *bias,
                     float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    return f32_rows(MIXED, x, x_row, panels, bias, y, M, N, K, threads);
}

/* fp32 activations against fp16 panels: an fp16 checkpoint's weights (GGUF F16, fp16
 * safetensors) kept at their own 2 bytes, the values exact, the arithmetic fp32. */
int linear_f32_f16w(const float *x, int64_t x_row, const uint16_t *panels, const float *bias,
                    float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    return f32_rows(HALF, x, x_row, panels, bias, y, M, N, K, threads);
}
