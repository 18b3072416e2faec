/* A stack of Llama-family decoder layers run from C on CPU: the fixed cost per token.
 *
 * At decode a layer's work is a dozen kernel calls (two norms, four products, rotary + K/V
 * store, attention, SiLU x up, two residual adds), each done in C already. Called from Python
 * one by one they cost more in interpreter and dispatch than the small ones do in arithmetic:
 * ~8 ms of a ~22 ms token on two cores for the default model. This file calls the same
 * kernels, in the same order and with the same arguments, for every layer in one call: the
 * results are bitwise those of the Python path (the tests compare them), only the glue goes.
 *
 * The kernels live in their own libraries; decoder.py passes their addresses. Products are
 * either dense panels (linear.c: x, x_row, panels, bias, y, M, N, K, threads) or quantized
 * weights (qlinear.c: x, x_row, qweight, bias, y, M, threads).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

typedef int (*dense_fn)(const void *, int64_t, const void *, const void *, void *, int64_t,
                        int64_t, int64_t, int64_t);
typedef int (*quant_fn)(const void *, int64_t, const void *, const void *, void *, int64_t, int64_t);
typedef void (*norm_fn)(const void *, int64_t, const void *, void *, int64_t, int64_t, float, int64_t);
typedef void (*add_norm_fn)(const void *, const void *, const void *, void *, void *, int64_t,
                            int64_t, float, int64_t);
typedef void (*rope_fn)(const void *, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t *,
                        const void *, const void *, const int64_t *, void *, void *, void *, int64_t);
typedef void (*silu_fn)(const void *, void *, int64_t, int64_t, int64_t);
typedef int (*attn_fn)(const void *, int64_t, const void *, const void *, void *, const int64_t *,
                       const int64_t *, const int64_t *, const int64_t *, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, float, int64_t);

/* One product: fn is a dense_fn when quant is 0, a quant_fn otherwise. */
typedef struct {
    void *fn;
    int64_t quant;
    const void *weight; /* panels, or the qweight struct */
    const void *bias;   /* or NULL */
    int64_t n, k;
} product;

typedef struct {
    const void *in_norm, *post_norm; /* [H] */
    product qkv, o, gate_up, down;
    void *k_cache, *v_cache;         /* [slots, Hk, D] */
} layer;

typedef struct {
    void *rms_norm, *add_rms_norm, *rope_store, *silu_mul, *attention;
    int64_t n_layers, H, Hq, Hk, D, I, esz;
    float eps, scale;
    const layer *layers;
    const void *cos, *sin; /* [positions, D / 2] */
    /* this step */
    int64_t T;
    const int64_t *positions, *slots;
    const int64_t *q_start, *q_len, *ctx, *tables;
    int64_t width, B, block_size, window, threads;
} decoder;

static int run_product(const product *p, const void *x, void *y, int64_t T, int64_t threads) {
    if (p->quant) return ((quant_fn)p->fn)(x, p->k, p->weight, p->bias, y, T, threads);
    return ((dense_fn)p->fn)(x, p->k, p->weight, p->bias, y, T, p->n, p->k, threads);
}

/* x [T, H]: the residual stream in, the stream after the last layer out (the final norm stays
 * with the caller). Returns 0, 1 when a kernel ran out of memory, 2 for scratch memory. */
int decoder_layers(const decoder *a, void *x) {
    const int64_t T = a->T, H = a->H, D = a->D, esz = a->esz, th = a->threads;
    const int64_t qkv_n = (a->Hq + 2 * a->Hk) * D, qn = a->Hq * D;
    char *buf = malloc((size_t)(T * (4 * H + qkv_n + 2 * qn + 3 * a->I) * esz));
    if (!buf) return 2;
    char *h = buf, *qkv = h + T * H * esz, *q = qkv + T * qkv_n * esz, *att = q + T * qn * esz;
    char *o = att + T * qn * esz, *gu = o + T * H * esz, *act = gu + T * 2 * a->I * esz;
    char *x2 = act + T * a->I * esz, *d = x2 + T * H * esz;
    int rc = 0;
    for (int64_t i = 0; i < a->n_layers && !rc; i++) {
        const layer *l = &a->layers[i];
        ((norm_fn)a->rms_norm)(x, H, l->in_norm, h, T, H, a->eps, th);
        if ((rc = run_product(&l->qkv, h, qkv, T, th))) break;
        ((rope_fn)a->rope_store)(qkv, qkv_n, T, a->Hq, a->Hk, D, a->positions, a->cos, a->sin,
                                 a->slots, l->k_cache, l->v_cache, q, th);
        if ((rc = ((attn_fn)a->attention)(q, qn, l->k_cache, l->v_cache, att, a->q_start, a->q_len,
                                          a->ctx, a->tables, a->width, a->B, a->Hq, a->Hk, D,
                                          a->block_size, a->window, a->scale, th) ? 1 : 0)) break;
        if ((rc = run_product(&l->o, att, o, T, th))) break;
        ((add_norm_fn)a->add_rms_norm)(x, o, l->post_norm, x2, h, T, H, a->eps, th);
        if ((rc = run_product(&l->gate_up, h, gu, T, th))) break;
        ((silu_fn)a->silu_mul)(gu, act, T, a->I, th);
        if ((rc = run_product(&l->down, act, d, T, th))) break;
        /* x = x2 + d, rounded as PyTorch's add rounds */
        if (esz == 2) {
            bf16 *out = x;
            const bf16 *p = (const bf16 *)x2, *r = (const bf16 *)d;
            for (int64_t j = 0; j < T * H; j++) out[j] = narrow(widen(p[j]) + widen(r[j]));
        } else {
            float *out = x;
            const float *p = (const float *)x2, *r = (const float *)d;
            for (int64_t j = 0; j < T * H; j++) out[j] = p[j] + r[j];
        }
    }
    free(buf);
    return rc;
}
