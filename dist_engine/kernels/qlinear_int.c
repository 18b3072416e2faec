/* Quantized products with integer activations (AVX-512 VNNI), built into the qlinear library
 * with qlinear.c (whose header comment gives the layout and the arithmetic of each path).
 *
 * Each row of x is turned, per block of 32 inputs, into ND signed bytes per input:
 *  - int8 activations (ND = 1): one code, scale max|x| / 127 (llama.cpp's Q8 rounding);
 *  - digits (ND = 3): x = 2^t (65536 d0 + 256 d1 + d2) + (at most 2^(t-1)), d_i in -128..127.
 * The weight codes meet each byte plane in exact integer dot products (vpdpbusd: 64 multiply-
 * adds an instruction); a 32-block's planes are then combined in fp32 and scaled. A row holding
 * inf or NaN gives NaN outputs with digits (the float path's give inf or NaN), and only that row.
 */
#include <float.h>
#include <limits.h>

#include "qlinear.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

/* The largest |v| that three balanced base-256 digits hold: 127 * (65536 + 256 + 1). */
#define DIGITS_MAX 8355711

/* A block of rows of x in integers, ND bytes per input:
 *   q        [rows, ND, K]        the byte planes (digits: most significant first)
 *   scale    [rows, K / 32]       per block: int8 max|x| / 127; digits 2^(t - top)
 *   qsum     [rows, ND, K / unit] each plane's sum per unit (min(G, 32) inputs)
 *   rowscale [rows]               digits: 2^top, top the row's largest t (NaN: inf / NaN in x) */
typedef struct {
    int8_t *q;
    float *scale;
    int32_t *qsum;
    float *rowscale;
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

/* Digits: per 32-block the exponent t with max|x| / 2^t <= DIGITS_MAX and above half of it
 * (the digits keep 22-23 bits of the block's largest input; 2^t >= 2^-149, where subnormal
 * inputs are whole multiples), v = x / 2^t rounded to the nearest integer, ties to even (exact:
 * a power of two), split into balanced digits. A power of two keeps the represented input,
 * 2^t v, exact in fp32, and scaling a row by 2^k moves its t alone. Block scales are stored
 * relative to the row's largest (2^(t - top) <= 1) and 2^top multiplies the result once:
 * products of tiny or huge rows neither underflow nor overflow before the result would. */
static inline int block_exponent(float amax) {
    uint32_t bits;
    memcpy(&bits, &amax, 4);
    const uint32_t E = bits >> 23, mant = bits & 0x7fffff;
    if (E == 0) return -149 + (mant > DIGITS_MAX); /* subnormal: max|x| 2^149 = mant */
    return (int)E - 149 + (((1u << 23) | mant) > 2 * DIGITS_MAX); /* max|x| 2^-t = significand / 2 */
}

/* 2^e as a float (e <= 0; 0 below the smallest subnormal). */
static inline float pow2f(int e) {
    if (e < -126) return ldexpf(1.0f, e);
    const uint32_t bits = (uint32_t)(127 + e) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Sixteen inputs times 2^-t (exact) rounded to integers, as three planes of bytes. */
static inline __attribute__((always_inline)) void digits16(__m512 x, int t, int8_t *q0, int8_t *q1,
                                                          int8_t *q2, __m512i d[3]) {
    if (t < -127) x = _mm512_mul_ps(x, _mm512_set1_ps(0x1p64f)); /* 2^-t beyond fp32: two steps */
    const int shift = t < -127 ? -t - 64 : -t;
    const __m512 p2 = _mm512_castsi512_ps(_mm512_set1_epi32((127 + shift) << 23));
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(x, p2)); /* the current rounding: even */
    d[2] = _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24);
    const __m512i r = _mm512_srai_epi32(_mm512_sub_epi32(v, d[2]), 8);
    d[1] = _mm512_srai_epi32(_mm512_slli_epi32(r, 24), 24);
    d[0] = _mm512_srai_epi32(_mm512_sub_epi32(r, d[1]), 8);
    _mm_storeu_si128((__m128i *)q0, _mm512_cvtepi32_epi8(d[0]));
    _mm_storeu_si128((__m128i *)q1, _mm512_cvtepi32_epi8(d[1]));
    _mm_storeu_si128((__m128i *)q2, _mm512_cvtepi32_epi8(d[2]));
}

static void digitize_rows(const float *x, int64_t xs, int64_t rows, int64_t K, int64_t unit, qact *a) {
    const int64_t blocks = K / ACT_BLOCK, units = K / unit;
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    int t[blocks];
    for (int64_t m = 0; m < rows; m++) {
        const float *xm = x + m * xs;
        int8_t *q0 = a->q + 3 * m * K, *q1 = q0 + K, *q2 = q1 + K;
        int32_t *sums = a->qsum + 3 * m * units;
        int finite = 1, top = INT_MIN;
        for (int64_t b = 0; b < blocks; b++) {
            const __m512 lo = _mm512_and_ps(_mm512_loadu_ps(xm + b * ACT_BLOCK), abs_mask);
            const __m512 hi = _mm512_and_ps(_mm512_loadu_ps(xm + b * ACT_BLOCK + 16), abs_mask);
            const __m512 big = _mm512_set1_ps(FLT_MAX);
            finite &= (_mm512_cmp_ps_mask(lo, big, _CMP_LE_OQ) & _mm512_cmp_ps_mask(hi, big, _CMP_LE_OQ)) == 0xffff;
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(lo, hi));
            t[b] = amax > 0.0f ? block_exponent(amax) : INT_MIN;
            top = t[b] > top ? t[b] : top;
        }
        if (!finite || top == INT_MIN) { /* NaN results (inf or NaN in the row), or a zero row */
            memset(q0, 0, (size_t)(3 * K));
            memset(sums, 0, sizeof(int32_t) * (size_t)(3 * units));
            memset(a->scale + m * blocks, 0, sizeof(float) * (size_t)blocks);
            a->rowscale[m] = finite ? 1.0f : NAN;
            continue;
        }
        a->rowscale[m] = ldexpf(1.0f, top); /* top >= -149: a float */
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t k = b * ACT_BLOCK, u = k / unit;
            const int tb = t[b] == INT_MIN ? 0 : t[b]; /* a zero block: any t gives zero digits */
            __m512i lo[3], hi[3];
            a->scale[m * blocks + b] = t[b] == INT_MIN ? 0.0f : pow2f(t[b] - top);
            digits16(_mm512_loadu_ps(xm + k), tb, q0 + k, q1 + k, q2 + k, lo);
            digits16(_mm512_loadu_ps(xm + k + 16), tb, q0 + k + 16, q1 + k + 16, q2 + k + 16, hi);
            for (int d = 0; d < 3; d++) {
                if (unit == ACT_BLOCK) {
                    sums[d * units + u] = _mm512_reduce_add_epi32(_mm512_add_epi32(lo[d], hi[d]));
                } else { /* groups of 16 */
                    sums[d * units + u] = _mm512_reduce_add_epi32(lo[d]);
                    sums[d * units + u + 1] = _mm512_reduce_add_epi32(hi[d]);
                }
            }
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

/* The same for digits (in units of the row's 2^top, as the tiles accumulate): exact in double,
 * rounded once. */
static void digit_group_sums(const qact *a, int64_t rows, int64_t K, int64_t G, int64_t unit, float *xsum) {
    const int64_t groups = K / G, units = K / unit;
    for (int64_t m = 0; m < rows; m++) {
        const int32_t *s = a->qsum + 3 * m * units;
        for (int64_t g = 0; g < groups; g++) {
            double sum = 0.0;
            for (int64_t u = g * G / unit; u < (g + 1) * G / unit; u++)
                sum += (double)a->scale[m * (K / ACT_BLOCK) + u * unit / ACT_BLOCK] *
                       (65536.0 * s[u] + 256.0 * s[units + u] + s[2 * units + u]);
            xsum[m * groups + g] = (float)sum;
        }
    }
}

/* The codes of one block as unsigned bytes for vpdpbusd: S8 and table codes are shifted by
 * +128 (the accumulators start at -128 x the activations' sum to undo it); plain U4 codes are
 * 0..15. */
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

/* Rows a[0 .. MR) against panels p0 .. p0 + NP, ND bytes per input (constants at each call
 * site, so the loops unroll and the MR x NP x ND accumulators stay in registers). */
static inline __attribute__((always_inline)) void itile(int kind, int has_lut, int ND, int MR, int NP,
        const qweight *w, const qact *a, int64_t K, const float *xsum, int64_t p0, v16f out[4][4]) {
    const int64_t G = w->group, groups = K / G, bk = block_k(kind), pb = panel_bytes(w);
    const int64_t unit = G < ACT_BLOCK ? G : ACT_BLOCK, units = K / unit;
    const int shifted = kind == S8 || has_lut; /* codes carry +128 */
    /* a lone int8 row would chain each output's vpdpbusd on the last: two accumulators (U4:
     * low / high nibbles; S8: even / odd blocks), added at the end of the unit */
    const int split = ND == 1 && MR == 1;
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
            __m512i acc[4][4][3];
#pragma GCC unroll 4
            for (int m = 0; m < MR; m++)
#pragma GCC unroll 3
                for (int d = 0; d < 3; d++) {
                    const int32_t c = shifted && d < ND ? -128 * a->qsum[(m * ND + d) * units + u] : 0;
#pragma GCC unroll 4
                    for (int p = 0; p < NP; p++) acc[m][p][d] = _mm512_set1_epi32(c);
                }
            const int64_t b0 = u * unit / bk, b1 = (u + 1) * unit / bk;
            for (int64_t b = b0; b < b1; b++) {
                const int64_t k = b * bk;
                const int second = split && kind == S8 && ((b - b0) & 1);
                __m512i xl[4][3], xh[4][3];
#pragma GCC unroll 4
                for (int m = 0; m < MR; m++)
#pragma GCC unroll 3
                    for (int d = 0; d < ND; d++) {
                        int32_t x4;
                        memcpy(&x4, a->q + (m * ND + d) * K + k, 4);
                        xl[m][d] = _mm512_set1_epi32(x4);
                        if (kind == U4) {
                            memcpy(&x4, a->q + (m * ND + d) * K + k + 4, 4);
                            xh[m][d] = _mm512_set1_epi32(x4);
                        }
                    }
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++) {
                    __builtin_prefetch(codes + p * pb + (b + PREFETCH) * BLOCK_BYTES);
                    __m512i lo, hi = _mm512_setzero_si512();
                    u8_codes(kind, has_lut, _mm512_loadu_si512(codes + p * pb + b * BLOCK_BYTES), table, &lo, &hi);
#pragma GCC unroll 4
                    for (int m = 0; m < MR; m++) {
                        if (ND == 3) {
#pragma GCC unroll 3
                            for (int d = 0; d < 3; d++) {
                                acc[m][p][d] = _mm512_dpbusd_epi32(acc[m][p][d], lo, xl[m][d]);
                                if (kind == U4) acc[m][p][d] = _mm512_dpbusd_epi32(acc[m][p][d], hi, xh[m][d]);
                            }
                            continue;
                        }
                        if (second) acc[m][p][1] = _mm512_dpbusd_epi32(acc[m][p][1], lo, xl[m][0]);
                        else acc[m][p][0] = _mm512_dpbusd_epi32(acc[m][p][0], lo, xl[m][0]);
                        if (kind == U4 && split) acc[m][p][1] = _mm512_dpbusd_epi32(acc[m][p][1], hi, xh[m][0]);
                        else if (kind == U4) acc[m][p][0] = _mm512_dpbusd_epi32(acc[m][p][0], hi, xh[m][0]);
                    }
                }
            }
#pragma GCC unroll 4
            for (int m = 0; m < MR; m++) {
                const float xscale = a->scale[m * (K / ACT_BLOCK) + u * unit / ACT_BLOCK];
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++) {
                    __m512 f;
                    if (ND == 3) { /* 65536 acc0 + (256 acc1 + acc2): the sum below 2^28, exact */
                        const __m512i low = _mm512_add_epi32(_mm512_slli_epi32(acc[m][p][1], 8), acc[m][p][2]);
                        f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][p][0]), _mm512_set1_ps(65536.0f),
                                            _mm512_cvtepi32_ps(low));
                    } else {
                        f = _mm512_cvtepi32_ps(split ? _mm512_add_epi32(acc[m][p][0], acc[m][p][1]) : acc[m][p][0]);
                    }
                    out[m][p] += (s[p] * xscale) * (v16f)f;
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
    if (ND == 3)
#pragma GCC unroll 4
        for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
            for (int p = 0; p < NP; p++) out[m][p] *= a->rowscale[m];
}

/* The panels [pa, pb) for rows m0 .. m0 + MR of the block: tiles of NP panels, then single
 * panels for what is left. */
static inline __attribute__((always_inline)) void panel_walk(int kind, int has_lut, int ND, int MR, int NP,
        int y16, const qweight *w, const qact *a, const float *xsum, int64_t m0, int64_t pa, int64_t pb,
        const void *bias, void *y) {
    const int64_t N = w->n, K = w->k, groups = K / w->group;
    const int64_t unit = w->group < ACT_BLOCK ? w->group : ACT_BLOCK;
    const qact am = {a->q + m0 * ND * K, a->scale + m0 * (K / ACT_BLOCK), a->qsum + m0 * ND * (K / unit),
                     a->rowscale + m0};
    v16f out[4][4];
    int64_t pp = pa;
    for (; pp + NP <= pb; pp += NP) {
        itile(kind, has_lut, ND, MR, NP, w, &am, K, xsum + m0 * groups, pp, out);
        STORE_TILE(MR, NP)
    }
    for (; pp < pb; pp++) {
        itile(kind, has_lut, ND, MR, 1, w, &am, K, xsum + m0 * groups, pp, out);
        STORE_TILE(MR, 1)
    }
}

/* One compiled function per code form, activation form and tile height: compiled together in
 * one function the tiles' code came out up to 1.3x slower, differently with every change. */
typedef void (*walk_fn)(int, const qweight *, const qact *, const float *, int64_t, int64_t, int64_t,
                        const void *, void *);
#define WALK_FN(NAME, KIND, LUT, ND, MR, NP)                                                  \
    static __attribute__((noinline)) void NAME(int y16, const qweight *w, const qact *a,      \
            const float *xsum, int64_t m0, int64_t pa, int64_t pb, const void *bias, void *y) { \
        panel_walk(KIND, LUT, ND, MR, NP, y16, w, a, xsum, m0, pa, pb, bias, y);              \
    }
/* NAME[r - 1]: the tiles of r rows; NPr panels a tile (a tile's MR x NP x ND accumulators and
 * its codes must fit the 32 vector registers). Measured on the default model's 30 layers
 * (weights from DRAM, 2 threads): digits of 2-4 rows one panel at a time beat 2 x 2 and 4 x 2
 * tiles (s8 at 4 rows: 1.07x the float path against 1.04x and 0.71x). */
#define WALKS(NAME, KIND, LUT, ND, NP1, NP2, NP3, NP4)                                        \
    WALK_FN(NAME##_1, KIND, LUT, ND, 1, NP1)                                                  \
    WALK_FN(NAME##_2, KIND, LUT, ND, 2, NP2)                                                  \
    WALK_FN(NAME##_3, KIND, LUT, ND, 3, NP3)                                                  \
    WALK_FN(NAME##_4, KIND, LUT, ND, 4, NP4)                                                  \
    static const walk_fn NAME[4] = {NAME##_1, NAME##_2, NAME##_3, NAME##_4};
WALKS(walk_u4_i8, U4, 0, 1, 4, 4, 2, 2)
WALKS(walk_lut_i8, U4, 1, 1, 4, 4, 2, 2)
WALKS(walk_s8_i8, S8, 0, 1, 4, 4, 2, 2)
WALKS(walk_u4_d, U4, 0, 3, 4, 1, 1, 1)
WALKS(walk_lut_d, U4, 1, 3, 4, 1, 1, 1)
WALKS(walk_s8_d, S8, 0, 3, 4, 1, 1, 1)

int int_product(const qweight *w, const void *x, int64_t x_row, const void *bias, void *y,
                int64_t M, int y16, int digits, int64_t threads) {
    const int64_t K = w->k, G = w->group, groups = K / G, rb = M < ROW_BLOCK ? M : ROW_BLOCK;
    const int64_t unit = G < ACT_BLOCK ? G : ACT_BLOCK, ND = digits ? 3 : 1;
    const int64_t n_panels = (w->n + PANEL - 1) / PANEL;
    const int has_lut = w->kind == U4 && w->lut != NULL;
    float *xsum = malloc(sizeof(float) * (size_t)(rb * groups));
    float *xf = y16 ? malloc(sizeof(float) * (size_t)(rb * K)) : NULL;
    qact a = {malloc((size_t)(ND * rb * K)), malloc(sizeof(float) * (size_t)(rb * K / ACT_BLOCK)),
              malloc(sizeof(int32_t) * (size_t)(ND * rb * K / unit)), malloc(sizeof(float) * (size_t)rb)};
    int failed = !xsum || (y16 && !xf) || !a.q || !a.scale || !a.qsum || !a.rowscale;
    for (int64_t m0 = 0; m0 < M && !failed; m0 += ROW_BLOCK) {
        const int64_t rows = M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK;
        int64_t xs;
        const float *xb = fp32_rows(x, x_row, m0, rows, K, y16, xf, &xs);
        if (digits) digitize_rows(xb, xs, rows, K, unit, &a);
        else quantize_rows(xb, xs, rows, K, unit, &a);
        if (w->offsets && digits) digit_group_sums(&a, rows, K, G, unit, xsum);
        else if (w->offsets) quantized_group_sums(&a, rows, K, G, unit, xsum);
        void *yb = (char *)y + m0 * w->n * (y16 ? 2 : 4);
#pragma omp parallel num_threads(n_panels >= 4 ? threads : 1)
        {
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            const int64_t pa = n_panels * t / T, pb = n_panels * (t + 1) / T;
            const walk_fn *walk = digits ? (w->kind == S8 ? walk_s8_d : has_lut ? walk_lut_d : walk_u4_d)
                                         : (w->kind == S8 ? walk_s8_i8 : has_lut ? walk_lut_i8 : walk_u4_i8);
            for (int64_t m0 = 0, mr; m0 < rows; m0 += mr) {
                mr = rows - m0 < 4 ? rows - m0 : 4;
                walk[mr - 1](y16, w, &a, xsum, m0, pa, pb, bias, yb);
            }
        }
    }
    free(xsum);
    free(xf);
    free(a.q);
    free(a.scale);
    free(a.qsum);
    free(a.rowscale);
    return failed;
}

int int_products_built(void) { return 1; }

#else

int int_product(const qweight *w, const void *x, int64_t x_row, const void *bias, void *y,
                int64_t M, int y16, int digits, int64_t threads) {
    (void)w, (void)x, (void)x_row, (void)bias, (void)y, (void)M, (void)y16, (void)digits, (void)threads;
    return 2;
}

int int_products_built(void) { return 0; }

#endif
