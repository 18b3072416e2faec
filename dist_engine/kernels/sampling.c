/* Gumbel noise for sampling, from a counter-based generator (see dist_engine/worker/sampler.py).
 *
 * The noise of token k in a row with key K (derived from the request's seed and the position
 * being sampled) is g = -log(-log(u)) with u = (h >> 12) * 2^-52 + 2^-53 and h the SplitMix64
 * finaliser of K + (k + 1) * 0x9E3779B97F4A7C15: any token's noise can be computed on its own,
 * in any order, on any thread, and a row's noise never depends on the batch. u lies in
 * [2^-53, 1 - 2^-53], so g stays finite and reaches ~36.7 (no realistic logit gap is cut off).
 * The logarithms are taken in double precision and the result rounded to float once.
 */
#include <math.h>
#include <stdint.h>

/* glibc's vector log (libmvec) declared without -ffast-math, which would change the process's
 * floating-point mode (flush-to-zero) when the library loads */
__attribute__((__simd__("notinbranch"))) double log(double);

static const uint64_t GOLDEN = 0x9E3779B97F4A7C15ull;

static inline double uniform(uint64_t key, uint64_t k) {
    uint64_t z = key + (k + 1) * GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    /* 52 bits as the mantissa of a double in [1, 2), shifted to [2^-53, 1 - 2^-53] (exact) */
    union { uint64_t u; double d; } c = {.u = 0x3FF0000000000000ull | (z >> 12)};
    return c.d - (1.0 - 0x1.0p-53);
}

/* out [N, V]: the noise of rows with keys[N], on up to `threads` threads */
void gumbel_noise(const uint64_t *keys, int64_t N, int64_t V, float *out, int64_t threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t r = 0; r < N; r++)
        for (int64_t c = 0; c < V; c += 4096) {
            const int64_t end = c + 4096 < V ? c + 4096 : V;
            float *o = out + r * V;
#pragma omp simd
            for (int64_t k = c; k < end; k++) o[k] = (float)-log(-log(uniform(keys[r], (uint64_t)k)));
        }
}
