/* Decode / verification attention straight over the paged KV cache (CPU, fp32 or bf16).
 *
 * Built on first use by dist_engine/kernels/__init__.py (cc -O3 -march=native -fopenmp) and
 * called through ctypes with tensor data pointers. One task per (sequence, chunk of 256 keys):
 * the task reads each slot of its chunk once through the block table (all KV heads of the slot)
 * for all of the sequence's query tokens and query heads; chunks merge by log-sum-exp. With
 * fewer such pairs than threads (a lone sequence) each pair's KV heads are split over tasks.
 * Chunks wholly outside a sliding window are skipped (they would add nothing). No gather into a
 * padded batch, no mask tensor: query token i of a sequence with context length L and Q queries
 * sits at position L - Q + i and sees keys 0 .. L - Q + i (and, with a sliding window W, only
 * the last W of them).
 * A task's result depends only on its own sequence, never on what else is in the batch.
 *
 * Layouts (element strides):
 *   q     [T, Hq, D], row stride q_row (the [Hq, D] part contiguous)
 *   out   [T, Hq, D], contiguous
 *   k, v  [num_slots, Hk, D], contiguous; slot = block * block_size + offset
 *   q_start, q_len, ctx  [B]: first query token, number of queries, context length
 *   tables [B, max_blocks]: block ids
 * Scores and softmax in fp32; bf16 inputs are widened, outputs rounded to nearest even.
 *
 * TurboQuant caches (the *_tq entry points; kernels/tq.h, layers/tq_cache.py): K and V are rows
 * of codes with an fp16 scale instead of k and v, and q and out are in each KV head's rotated
 * basis. A key's row is looked up in the codebook (eight codes per permute) and its dot product
 * with the query times its |scale| is the score, less the query's dot product with the rotated
 * mean key for a key stored uncentred (sign bit of its scale); a task decodes its chunk's value
 * rows once (times their scales) before the value phase, which then reads them as an fp32 cache.
 *
 * FP8 caches (the *_fp8 entry points; layers/kv_cache.py): K and V are float8_e4m3fn bytes with
 * one scale per layer each; keys are widened through a 256-entry table into the score tiles, and
 * a chunk's value rows are widened once, like TurboQuant's, before the value phase.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "tq.h"

/* glibc's vector expf (libmvec) for the softmax loop, declared without -ffast-math (which would
 * change the process's floating-point mode when the library loads) */
__attribute__((__simd__("notinbranch"))) float expf(float);

/* one row of D elements -> float */
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

static inline void load_row(const void *base, int64_t index, int64_t D, int is_bf16, float *dst) {
    if (is_bf16) {
        const bf16 *src = (const bf16 *)base + index;
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) { /* eight at a time: zero-extend, shift into the high half */
            u16x8 h;
            memcpy(&h, src + d, sizeof h);
            const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
            memcpy(dst + d, &w, sizeof w);
        }
        for (; d < D; d++) dst[d] = widen(src[d]);
    } else {
        memcpy(dst, (const float *)base + index, (size_t)D * sizeof(float));
    }
}

#define TILE 8
typedef float vec8 __attribute__((vector_size(32))); /* AVX on x86, two NEON registers on ARM */

static inline vec8 load8(const float *p) {
    vec8 x;
    memcpy(&x, p, sizeof x);
    return x;
}

/* dots[t] = a . b[t] for TILE rows b[t] of D floats: TILE independent accumulators */
static inline void dot_tile(const float *a, const float *const *b, int64_t D, float *dots) {
    if (D % 8 == 0) {
        vec8 acc[TILE] = {0};
        for (int64_t d = 0; d < D; d += 8) {
            const vec8 x = load8(a + d);
            for (int t = 0; t < TILE; t++) acc[t] += x * load8(b[t] + d);
        }
        for (int t = 0; t < TILE; t++) {
            const vec8 v = acc[t];
            dots[t] = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
        }
        return;
    }
    for (int t = 0; t < TILE; t++) {
        float s = 0.0f;
        for (int64_t d = 0; d < D; d++) s += a[d] * b[t][d];
        dots[t] = s;
    }
}

/* Keys are split into chunks of this many (a property of the sequence alone, so a sequence's
 * result never depends on the rest of the batch); chunks run in parallel and are merged. */
#define KEY_CHUNK 256

typedef struct {
    const void *q, *k, *v;
    void *out;
    int64_t q_row, Hq, Hk, D, bs, window;
    float scale;
    int is_bf16;
    const TQRows *tk, *tv; /* TurboQuant K and V; NULL for plain caches */
    float k_scale, v_scale; /* FP8: stored = x / scale */
} Args;

/* float8_e4m3fn -> float, filled when the library loads (no NaN is ever stored: writes clamp) */
static float e4m3[256];

__attribute__((constructor)) static void fill_e4m3(void) {
    for (int b = 0; b < 256; b++) {
        const int e = (b >> 3) & 15, m = b & 7;
        const float x = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
        e4m3[b] = (e == 15 && m == 7) ? NAN : (b & 128 ? -x : x);
    }
}

static inline void fp8_row(const void *base, int64_t index, int64_t D, float scale, float *dst) {
    const uint8_t *src = (const uint8_t *)base + index;
    for (int64_t d = 0; d < D; d++) dst[d] = e4m3[src[d]] * scale;
}

/* The key loop of the value phase around BODY (which adds x * the value row vr). */
#define VALUE_LOOP(...)                                                                          \
    for (int64_t j = 0; j < n; j++) {                                                            \
        if (w[j] == 0.0f) continue;                                                              \
        const int64_t at = (slot[j] * Hk + h) * D + d0;                                          \
        const float *vr = (const float *)a->v + at;                                              \
        if (tq || fp8) { /* the chunk's decoded rows */                                         \
            vr = vdec + ((h - h0) * n + j) * D + d0;                                             \
        } else if (is_bf16) {                                                                    \
            load_row(a->v, at, width, 1, row);                                                   \
            vr = row;                                                                            \
        }                                                                                        \
        const vec8 x = {w[j], w[j], w[j], w[j], w[j], w[j], w[j], w[j]};                         \
        __VA_ARGS__                                                                              \
    }

/* Partial attention of the query rows of one sequence whose KV head is in [h0, h1) over keys
 * [j0, j1): per row the running max m, the sum of exp(score - m) and the unnormalised output
 * acc = sum exp(score - m) v. Rows are (query token, query head), token major; other rows are
 * left alone. Returns -1 when out of memory. */
static inline __attribute__((always_inline)) int attend_chunk(
        const Args *a, int is_bf16, int tq, int fp8, int64_t qs, int64_t Q, int64_t L, const int64_t *table,
        int64_t j0, int64_t j1, int64_t h0, int64_t h1, float *m_out, float *s_out, float *acc) {
    const int64_t Hq = a->Hq, Hk = a->Hk, D = a->D, bs = a->bs, G = Hq / Hk, R = Q * Hq;
    const int64_t n = j1 - j0;
    /* TurboQuant and FP8: the chunk's value rows (and TurboQuant's q . shift per row) */
    const int64_t decoded = tq || fp8 ? (h1 - h0) * n * D + R : 0;
    const int64_t floats = (R * D + R * n + D + TILE * D + decoded + 1) / 2 * 2; /* even: slots align */
    float *qf = malloc((size_t)floats * sizeof(float) + (size_t)n * sizeof(int64_t));
    if (qf == NULL) return -1;
    float *scores = qf + R * D; /* [R, n] */
    float *row = scores + R * n; /* [D]: one widened value */
    float *kbuf = row + D;       /* [TILE, D]: widened keys */
    float *vdec = kbuf + TILE * D; /* [h1 - h0, n, D]: decoded values (TurboQuant, FP8) */
    float *qshift = vdec + (h1 - h0) * n * D; /* [R]: each query row . its head's key shift */
    int64_t *slot = (int64_t *)(qf + floats); /* [n]: cache slot of each key, for K and V */
    for (int64_t j = j0; j < j1; j++) slot[j - j0] = table[j / bs] * bs + j % bs;
    for (int64_t i = 0; i < Q; i++)
        for (int64_t hq = h0 * G; hq < h1 * G; hq++) {
            float *dst = qf + (i * Hq + hq) * D;
            load_row(a->q, (qs + i) * a->q_row + hq * D, D, is_bf16, dst);
            for (int64_t d = 0; d < D; d++) dst[d] *= a->scale;
            if (tq && a->tk->shift != NULL) { /* what an uncentred key's score is less */
                const float *sh = a->tk->shift + hq / G * D;
                float x = 0.0f;
                for (int64_t d = 0; d < D; d++) x += dst[d] * sh[d];
                qshift[i * Hq + hq] = x;
            }
        }
    /* scores: TILE keys at a time per KV head (independent accumulators) */
    for (int64_t t0 = j0; t0 < j1; t0 += TILE) {
        const int64_t nt = j1 - t0 < TILE ? j1 - t0 : TILE;
        for (int64_t h = h0; h < h1; h++) {
            const float *kp[TILE];
            float ks[TILE]; /* TurboQuant: each key's |scale|, and whether it is shifted */
            int kshift[TILE];
            for (int64_t t = 0; t < TILE; t++) {
                const int64_t j = t0 + (t < nt ? t : 0); /* past the end: key t0 again, unused */
                const int64_t at = (slot[j - j0] * Hk + h) * D;
                if (tq) {
                    const int64_t tr = slot[j - j0] * Hk + h;
                    tq_lookup(a->tk->codes + tr * a->tk->row_bytes, a->tk->bits, a->tk->centroids,
                              0, D, kbuf + t * D);
                    kp[t] = kbuf + t * D;
                    ks[t] = tq_abs_half(a->tk->scales[tr]);
                    kshift[t] = a->tk->shift != NULL && tq_shifted(a->tk->scales[tr]);
                } else if (fp8) {
                    fp8_row(a->k, at, D, a->k_scale, kbuf + t * D);
                    kp[t] = kbuf + t * D;
                } else if (is_bf16) {
                    load_row(a->k, at, D, 1, kbuf + t * D);
                    kp[t] = kbuf + t * D;
                } else {
                    kp[t] = (const float *)a->k + at;
                }
            }
            for (int64_t i = 0; i < Q; i++) {
                const int64_t pos = L - Q + i; /* this query's position */
                for (int64_t g = 0; g < G; g++) {
                    const int64_t r = i * Hq + h * G + g;
                    float dots[TILE];
                    dot_tile(qf + r * D, kp, D, dots);
                    for (int64_t t = 0; t < nt; t++) {
                        const int64_t j = t0 + t;
                        const int visible = j <= pos && (a->window <= 0 || j > pos - a->window);
                        const float score = tq ? dots[t] * ks[t] - (kshift[t] ? qshift[r] : 0.0f) : dots[t];
                        scores[r * n + (j - j0)] = visible ? score : -INFINITY;
                    }
                }
            }
        }
    }
    for (int64_t r = 0; r < R; r++) {
        if ((r % Hq) / G < h0 || (r % Hq) / G >= h1) continue;
        float m = -INFINITY, s = 0.0f;
        float *sr = scores + r * n;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; j++) m = sr[j] > m ? sr[j] : m;
        const float base = m == -INFINITY ? 0.0f : m; /* no visible key: every weight is 0 */
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n; j++) {
            sr[j] = expf(sr[j] - base);
            s += sr[j];
        }
        m_out[r] = m;
        s_out[r] = s;
    }
    if (tq || fp8) /* each value row once (not once per query row), scaled */
        for (int64_t h = h0; h < h1; h++)
            for (int64_t j = 0; j < n; j++) {
                float *dst = vdec + ((h - h0) * n + j) * D;
                if (tq) tq_row(a->tv, slot[j] * Hk + h, h, D, dst);
                else fp8_row(a->v, (slot[j] * Hk + h) * D, D, a->v_scale, dst);
            }
    /* values: per row, the weighted sum over the chunk's keys in key order, 64 columns at a
     * time in eight vector accumulators that stay in registers (accumulating into memory made
     * every key wait on a store of the previous one: 3/4 of a lone sequence's time) */
    for (int64_t r = 0; r < R; r++) {
        const int64_t h = (r % Hq) / G;
        if (h < h0 || h >= h1) continue;
        const float *w = scores + r * n;
        float *o = acc + r * D;
        if (D % 8) { /* odd head sizes: plain loop */
            memset(o, 0, (size_t)D * sizeof(float));
            for (int64_t j = 0; j < n; j++) {
                if (w[j] == 0.0f) continue;
                load_row(a->v, (slot[j] * Hk + h) * D, D, is_bf16, row);
                for (int64_t d = 0; d < D; d++) o[d] += w[j] * row[d];
            }
            continue;
        }
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
            const int64_t width = D - d0 < 64 ? D - d0 : 64;
            vec8 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}, c4 = {0}, c5 = {0}, c6 = {0}, c7 = {0};
            if (width == 64) /* the common head size: no per-key width tests */
                VALUE_LOOP(c0 += x * load8(vr); c1 += x * load8(vr + 8); c2 += x * load8(vr + 16);
                           c3 += x * load8(vr + 24); c4 += x * load8(vr + 32);
                           c5 += x * load8(vr + 40); c6 += x * load8(vr + 48);
                           c7 += x * load8(vr + 56);)
            else
                VALUE_LOOP(c0 += x * load8(vr); if (width > 8) c1 += x * load8(vr + 8);
                           if (width > 16) c2 += x * load8(vr + 16);
                           if (width > 24) c3 += x * load8(vr + 24);
                           if (width > 32) c4 += x * load8(vr + 32);
                           if (width > 40) c5 += x * load8(vr + 40);
                           if (width > 48) c6 += x * load8(vr + 48);)
            const vec8 c[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
            memcpy(o + d0, c, (size_t)width * sizeof(float));
        }
    }
    free(qf);
    return 0;
}

/* Leading key chunks no query of the sequence can see (sliding window): the first visible key
 * of the earliest query (position L - Q) is L - Q - window + 1. */
static inline int64_t skipped(int64_t L, int64_t Q, int64_t window) {
    if (window <= 0 || L - Q - window + 1 <= 0) return 0;
    return (L - Q - window + 1) / KEY_CHUNK;
}

/* Returns 0 on success, -1 if a task could not allocate its scratch memory. Inlined into each
 * entry point, so the element type and the cache format are constants there. */
static inline __attribute__((always_inline)) int run(
        int is_bf16, int tq, int fp8, const void *q, int64_t q_row, const void *k, const void *v,
        const TQRows *tk, const TQRows *tv, float k_scale, float v_scale, void *out, const int64_t *q_start,
        const int64_t *q_len, const int64_t *ctx, const int64_t *tables, int64_t max_blocks,
        int64_t B, int64_t Hq, int64_t Hk, int64_t D, int64_t bs, int64_t window, float scale,
        int64_t threads) {
    const Args a = {q, k, v, out, q_row, Hq, Hk, D, bs, window, scale, is_bf16, tk, tv, k_scale, v_scale};
    /* task list: (sequence, key chunk[, KV heads]); partial results at per-pair offsets */
    int64_t *first = malloc((size_t)(B + 1) * 2 * sizeof(int64_t)); /* first task, first row */
    if (first == NULL) return -1;
    int64_t *row0 = first + B + 1;
    first[0] = row0[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t all = ctx[b] > 0 ? (ctx[b] + KEY_CHUNK - 1) / KEY_CHUNK : 1;
        const int64_t chunks = all - skipped(ctx[b], q_len[b], window);
        first[b + 1] = first[b] + chunks;
        row0[b + 1] = row0[b] + chunks * q_len[b] * Hq;
    }
    /* fewer (sequence, chunk) pairs than threads (a lone sequence's decode or verification):
     * each pair's KV heads split over tasks too. A row's arithmetic is the same either way. */
    const int64_t split = first[B] < threads ? Hk : 1;
    const int64_t tasks = first[B] * split, rows = row0[B];
    float *part = malloc((size_t)(rows * (D + 2)) * sizeof(float));
    if (part == NULL) {
        free(first);
        return -1;
    }
    float *pm = part, *ps = part + rows, *pacc = part + 2 * rows;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t pair = t / split, part_h = t % split;
            int64_t b = 0;
            while (first[b + 1] <= pair) b++;
            const int64_t c = pair - first[b], R = q_len[b] * Hq, r = row0[b] + c * R;
            const int64_t h0 = part_h * Hk / split, h1 = (part_h + 1) * Hk / split;
            const int64_t j0 = (c + skipped(ctx[b], q_len[b], window)) * KEY_CHUNK;
            const int64_t j1 = ctx[b] < j0 + KEY_CHUNK ? ctx[b] : j0 + KEY_CHUNK;
            failed |= attend_chunk(&a, is_bf16, tq, fp8, q_start[b], q_len[b], ctx[b],
                                   tables + b * max_blocks, j0, j1, h0, h1, pm + r, ps + r,
                                   pacc + r * D) != 0;
        }
        /* merge each sequence's chunks in chunk order and normalise */
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) {
            const int64_t C = first[b + 1] - first[b], R = q_len[b] * Hq;
            for (int64_t r = 0; r < R; r++) {
                float M = -INFINITY;
                for (int64_t c = 0; c < C; c++) M = pm[row0[b] + c * R + r] > M ? pm[row0[b] + c * R + r] : M;
                float total = 0.0f;
                float *o = pacc + (row0[b] + r) * D; /* chunk 0's row collects the sum */
                for (int64_t c = 0; c < C; c++) {
                    const int64_t pr = row0[b] + c * R + r;
                    const float f = M == -INFINITY ? 0.0f : expf(pm[pr] - M);
                    total += f * ps[pr];
                    if (c == 0) {
                        for (int64_t d = 0; d < D; d++) o[d] *= f;
                    } else {
                        const float *x = pacc + pr * D;
                        for (int64_t d = 0; d < D; d++) o[d] += f * x[d];
                    }
                }
                const float inv = total > 0.0f ? 1.0f / total : 0.0f;
                const int64_t i = r / Hq, hq = r % Hq, at = ((q_start[b] + i) * Hq + hq) * D;
                for (int64_t d = 0; d < D; d++) {
                    const float x = o[d] * inv;
                    if (is_bf16) ((bf16 *)out)[at + d] = narrow(x);
                    else ((float *)out)[at + d] = x;
                }
            }
        }
    }
    free(part);
    free(first);
    return failed ? -1 : 0;
}

/* The exported entry points, one per element type (arguments as in the header comment). */
#define ENTRY(NAME, T, IS_BF16)                                                                   \
    int NAME(const T *q, int64_t q_row, const T *k, const T *v, T *out, const int64_t *q_start,  \
             const int64_t *q_len, const int64_t *ctx, const int64_t *tables, int64_t max_blocks, \
             int64_t B, int64_t Hq, int64_t Hk, int64_t D, int64_t bs, int64_t window,           \
             float scale, int64_t threads) {                                                      \
        return run(IS_BF16, 0, 0, q, q_row, k, v, NULL, NULL, 1.0f, 1.0f, out, q_start, q_len,  \
                   ctx, tables, max_blocks, B, Hq, Hk, D, bs, window, scale, threads);            \
    }

ENTRY(paged_attention_f32, float, 0)
ENTRY(paged_attention_bf16, bf16, 1)

/* FP8 caches: K and V float8_e4m3fn bytes with their scales (D a multiple of 8). */
#define ENTRY_FP8(NAME, T, IS_BF16)                                                               \
    int NAME(const T *q, int64_t q_row, const uint8_t *k, const uint8_t *v, float k_scale,       \
             float v_scale, T *out, const int64_t *q_start, const int64_t *q_len,                 \
             const int64_t *ctx, const int64_t *tables, int64_t max_blocks, int64_t B,            \
             int64_t Hq, int64_t Hk, int64_t D, int64_t bs, int64_t window, float scale,          \
             int64_t threads) {                                                                   \
        if (D % 8) return -2;                                                                    \
        return run(IS_BF16, 0, 1, q, q_row, k, v, NULL, NULL, k_scale, v_scale, out, q_start,    \
                   q_len, ctx, tables, max_blocks, B, Hq, Hk, D, bs, window, scale, threads);     \
    }

ENTRY_FP8(paged_attention_fp8_f32, float, 0)
ENTRY_FP8(paged_attention_fp8_bf16, bf16, 1)

/* TurboQuant caches: K and V as TQRows, q and out in the rotated basis (D a multiple of 8). */
#define ENTRY_TQ(NAME, T, IS_BF16)                                                                \
    int NAME(const T *q, int64_t q_row, const TQRows *tk, const TQRows *tv, T *out,              \
             const int64_t *q_start, const int64_t *q_len, const int64_t *ctx,                   \
             const int64_t *tables, int64_t max_blocks, int64_t B, int64_t Hq, int64_t Hk,       \
             int64_t D, int64_t bs, int64_t window, float scale, int64_t threads) {              \
        if (D % 8) return -2;                                                                    \
        return run(IS_BF16, 1, 0, q, q_row, NULL, NULL, tk, tv, 1.0f, 1.0f, out, q_start, q_len, \
                   ctx, tables, max_blocks, B, Hq, Hk, D, bs, window, scale, threads);            \
    }

ENTRY_TQ(paged_attention_tq_f32, float, 0)
ENTRY_TQ(paged_attention_tq_bf16, bf16, 1)
