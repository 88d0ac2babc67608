/* What dsq's native kernels share (quant.c, qadamw.c, amx_gemm.cpp; C and C++): the block
   width of the GEMM driver's packed B, float bit patterns, bf16 rounding, the variant name.
   Built by dsq/native.py, whose cache digest covers this header. */
#ifndef DSQ_COMMON_H
#define DSQ_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* columns per block of the AMX GEMM driver's packed B (amx_gemm.cpp packs and reads it,
   quant.c writes quantized codes straight into it; dsq.quant.cpu_gemm.PACK_NB checks it) */
#define DSQ_PACK_NB 64

static inline uint32_t dsq_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float dsq_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* bf16 (its 16 bits) as fp32: exact */
static inline float dsq_bf16_to_f32(uint16_t h) { return dsq_bits_f32((uint32_t)h << 16); }

/* fp32 to bf16 bits: round to nearest even, NaN to the quiet 0x7FC0 (as PyTorch) */
static inline uint16_t dsq_f32_to_bf16(float f) {
    const uint32_t u = dsq_f32_bits(f);
    return isnan(f) ? (uint16_t)0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* the variant a file is compiled as (dsq.native.ISA_FLAGS give the macros) */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DSQ_ISA_NAME "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define DSQ_ISA_NAME "avx2"
#else
#define DSQ_ISA_NAME "portable"
#endif

#endif /* DSQ_COMMON_H */
