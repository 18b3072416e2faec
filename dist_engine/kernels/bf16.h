/* bf16 <-> fp32 for the CPU kernels: widening is exact; narrowing rounds to nearest even (NaN
 * stays NaN), as PyTorch's conversion does. */
#pragma once
#include <stdint.h>

typedef uint16_t bf16;

static inline float widen(bf16 x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}

static inline bf16 narrow(float f) {
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (bf16)((c.u >> 16) | 0x40); /* quiet NaN */
    c.u += 0x7fffu + ((c.u >> 16) & 1u);
    return (bf16)(c.u >> 16);
}
