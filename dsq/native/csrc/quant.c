/* C/OpenMP kernels of the integer-GEMM path on CPU: statistics, int8 codes, rescale.
   Bound by dsq/quant/cpu_kernels.py (which documents the operations and their contracts);
   built per variant by dsq/native.py. */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <float.h>
#include <omp.h>

#include "dsq_common.h"
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define TILE 64

/* offset of element (r, c) of an R x C matrix packed as the GEMM driver's B (K = R, N = C):
   blocks of DSQ_PACK_NB columns, block b at b * DSQ_PACK_NB * R, VNNI inside
   ([R / 4][width][4]) */
static inline int64_t packed_at(int64_t r, int64_t c, int64_t R, int64_t C) {
    const int64_t nb = DSQ_PACK_NB, b = c / nb, w = C - b * nb < nb ? C - b * nb : nb;
    return b * nb * R + (r / 4) * w * 4 + (c - b * nb) * 4 + (r % 4);
}

/* 4 rows of 16 codes (src, 16 apart) -> 64 bytes, 4 per column (the VNNI layout) */
static inline void interleave4(const int8_t *src, int8_t *dst) {
#if defined(__SSE2__)
    __m128i a0 = _mm_loadu_si128((const __m128i *)src), a1 = _mm_loadu_si128((const __m128i *)(src + 16));
    __m128i a2 = _mm_loadu_si128((const __m128i *)(src + 32)), a3 = _mm_loadu_si128((const __m128i *)(src + 48));
    __m128i t0 = _mm_unpacklo_epi8(a0, a1), t1 = _mm_unpackhi_epi8(a0, a1);
    __m128i t2 = _mm_unpacklo_epi8(a2, a3), t3 = _mm_unpackhi_epi8(a2, a3);
    if (((uintptr_t)dst & 63) == 0) {  /* a whole cache line: stream it (no read for ownership) */
        _mm_stream_si128((__m128i *)dst, _mm_unpacklo_epi16(t0, t2));
        _mm_stream_si128((__m128i *)(dst + 16), _mm_unpackhi_epi16(t0, t2));
        _mm_stream_si128((__m128i *)(dst + 32), _mm_unpacklo_epi16(t1, t3));
        _mm_stream_si128((__m128i *)(dst + 48), _mm_unpackhi_epi16(t1, t3));
        return;
    }
    _mm_storeu_si128((__m128i *)dst, _mm_unpacklo_epi16(t0, t2));
    _mm_storeu_si128((__m128i *)(dst + 16), _mm_unpackhi_epi16(t0, t2));
    _mm_storeu_si128((__m128i *)(dst + 32), _mm_unpacklo_epi16(t1, t3));
    _mm_storeu_si128((__m128i *)(dst + 48), _mm_unpackhi_epi16(t1, t3));
#else
    for (int j = 0; j < 16; j++)
        for (int r = 0; r < 4; r++) dst[4 * j + r] = src[16 * r + j];
#endif
}

/* dst[j * ldd + i] = src[i * 16 + j] for a 16 x 16 block of bytes (a row of src: 16 codes of
   one input row; a row of dst: 16 consecutive rows of one column) */
static inline void transpose16(const int8_t *src, int8_t *dst, int64_t ldd) {
#if defined(__SSE2__)
    __m128i a[16], b[16];
    for (int i = 0; i < 16; i++) a[i] = _mm_loadu_si128((const __m128i *)(src + 16 * i));
    for (int i = 0; i < 8; i++) { b[i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
                                  b[i + 8] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]); }
    for (int i = 0; i < 4; i++) { a[i] = _mm_unpacklo_epi16(b[2 * i], b[2 * i + 1]);
                                  a[i + 4] = _mm_unpackhi_epi16(b[2 * i], b[2 * i + 1]);
                                  a[i + 8] = _mm_unpacklo_epi16(b[8 + 2 * i], b[8 + 2 * i + 1]);
                                  a[i + 12] = _mm_unpackhi_epi16(b[8 + 2 * i], b[8 + 2 * i + 1]); }
    /* a[4q + m]: columns 4q..4q+3, rows 4m..4m+3 (one 32-bit group per column) */
    for (int q = 0; q < 4; q++)
        for (int i = 0; i < 2; i++) {
            b[4 * q + i] = _mm_unpacklo_epi32(a[4 * q + 2 * i], a[4 * q + 2 * i + 1]);
            b[4 * q + 2 + i] = _mm_unpackhi_epi32(a[4 * q + 2 * i], a[4 * q + 2 * i + 1]); }
    /* b[4q + 2h + i]: columns 4q+2h, 4q+2h+1 (64 bits each), rows 8i..8i+7 */
    for (int q = 0; q < 4; q++)
        for (int h = 0; h < 2; h++) {
            const __m128i lo = b[4 * q + 2 * h], hi = b[4 * q + 2 * h + 1];
            _mm_storeu_si128((__m128i *)(dst + (4 * q + 2 * h) * ldd), _mm_unpacklo_epi64(lo, hi));
            _mm_storeu_si128((__m128i *)(dst + (4 * q + 2 * h + 1) * ldd), _mm_unpackhi_epi64(lo, hi));
        }
#else
    for (int j = 0; j < 16; j++)
        for (int i = 0; i < 16; i++) dst[j * ldd + i] = src[i * 16 + j];
#endif
}

static inline float ld_f32(const void *p, int64_t i) { return ((const float *)p)[i]; }
static inline float ld_bf16(const void *p, int64_t i) {
    return dsq_bf16_to_f32(((const uint16_t *)p)[i]);
}
static inline void st_f32(void *p, int64_t i, float f) { ((float *)p)[i] = f; }
static inline void st_bf16(void *p, int64_t i, float f) {
    ((uint16_t *)p)[i] = dsq_f32_to_bf16(f);
}
/* bit pattern of |x| */
static inline uint32_t abs_f32(const void *p, int64_t i) {
    uint32_t u; memcpy(&u, (const float *)p + i, 4); return u & 0x7FFFFFFFu;
}
static inline uint32_t abs_bf16(const void *p, int64_t i) {
    return (((uint32_t)((const uint16_t *)p)[i]) << 16) & 0x7FFFFFFFu;
}

static inline int8_t qcode(float v, float qmin, float qmax) {
    float r = rintf(v);
    r = r < qmin ? qmin : r;
    r = r > qmax ? qmax : r;
    return (int8_t)(r == r ? r : 0.0f);
}

/* scale = max(stat / qmax, FLT_MIN), NaN kept (in place) */
void dsq_scale(float *v, int64_t n, float qmax) {
    for (int64_t i = 0; i < n; i++) {
        float s = v[i] / qmax;
        v[i] = s < FLT_MIN ? FLT_MIN : s;
    }
}

/* 16 lanes of fp32 as one AVX-512 register or two AVX2 ones: the same IEEE operations lane by
   lane in both (and in the scalar code below), so every variant gives the same bits */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define DSQ_VEC 1
typedef __m512 v16;
typedef __m512i v16i;
static inline v16 v16_f32(const void *p, int64_t i) { return _mm512_loadu_ps((const float *)p + i); }
static inline v16 v16_bf16(const void *p, int64_t i) {
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline v16 v16_set1(float f) { return _mm512_set1_ps(f); }
static inline v16 v16_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v16_store(float *p, v16 v) { _mm512_storeu_ps(p, v); }
static inline v16 v16_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
static inline v16 v16_divide(v16 a, v16 b) { return _mm512_div_ps(a, b); }
/* a / b correctly rounded from y = RN(1 / b): two Newton corrections with exact fma residuals
   (Markstein), so the codes equal those of a true division bit for bit at a fraction of its
   cost (one multiply and two pairs of fused operations). Where a step
   overflows or meets an infinity (a / b beyond FLT_MAX, a = inf, b = inf) the sequence gives
   NaN where the division does not: such vectors (never with a scale from the data's own
   absmax) are divided outright. */
static inline v16 vdiv(v16 a, v16 b, v16 y) {
    v16 q = _mm512_mul_ps(a, y);
    for (int k = 0; k < 2; k++) q = _mm512_fmadd_ps(_mm512_fnmadd_ps(q, b, a), y, q);
    if (__builtin_expect(_mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q) != 0, 0)) q = _mm512_div_ps(a, b);
    return q;
}
/* qcode on 16 lanes: rint (half to even), clamp, NaN -> 0, to int8 */
static inline __m128i vcode(v16 v, v16 qmin, v16 qmax) {
    v16 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __mmask16 ok = _mm512_cmp_ps_mask(r, r, _CMP_ORD_Q);
    r = _mm512_min_ps(_mm512_max_ps(r, qmin), qmax);
    return _mm512_cvtsepi32_epi8(_mm512_maskz_cvtps_epi32(ok, r));
}
static inline v16i v16i_zero(void) { return _mm512_setzero_si512(); }
static inline v16i v16i_load(const uint32_t *p) { return _mm512_loadu_si512(p); }
static inline void v16i_store(uint32_t *p, v16i v) { _mm512_storeu_si512(p, v); }
static inline v16i v16i_max(v16i a, v16i b) { return _mm512_max_epu32(a, b); }
static inline v16i v16_absbits(v16 v) {
    return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
}
static inline uint32_t v16i_hmax(v16i m) { return _mm512_reduce_max_epu32(m); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DSQ_VEC 1
typedef struct { __m256 lo, hi; } v16;
typedef struct { __m256i lo, hi; } v16i;
static inline v16 v16_f32(const void *p, int64_t i) {
    const float *f = (const float *)p + i;
    v16 v = {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)}; return v;
}
static inline __m256 v8_bf16(const uint16_t *h) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)h));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline v16 v16_bf16(const void *p, int64_t i) {
    const uint16_t *h = (const uint16_t *)p + i;
    v16 v = {v8_bf16(h), v8_bf16(h + 8)}; return v;
}
static inline v16 v16_set1(float f) { v16 v = {_mm256_set1_ps(f), _mm256_set1_ps(f)}; return v; }
static inline v16 v16_load(const float *p) { return v16_f32(p, 0); }
static inline void v16_store(float *p, v16 v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
static inline v16 v16_add(v16 a, v16 b) {
    v16 v = {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; return v;
}
static inline v16 v16_divide(v16 a, v16 b) {
    v16 v = {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; return v;
}
/* the AVX-512 variant's correctly rounded division (see there, NaN fallback included),
   8 lanes at a time */
static inline __m256 vdiv8(__m256 a, __m256 b, __m256 y) {
    __m256 q = _mm256_mul_ps(a, y);
    for (int k = 0; k < 2; k++) q = _mm256_fmadd_ps(_mm256_fnmadd_ps(q, b, a), y, q);
    if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(q, q, _CMP_UNORD_Q)) != 0, 0))
        q = _mm256_div_ps(a, b);
    return q;
}
static inline v16 vdiv(v16 a, v16 b, v16 y) {
    v16 v = {vdiv8(a.lo, b.lo, y.lo), vdiv8(a.hi, b.hi, y.hi)}; return v;
}
/* rint (half to even), clamp, NaN -> 0, as int32 */
static inline __m256i vcode8(__m256 v, __m256 qmin, __m256 qmax) {
    __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 ok = _mm256_cmp_ps(r, r, _CMP_ORD_Q);
    r = _mm256_min_ps(_mm256_max_ps(r, qmin), qmax);
    return _mm256_and_si256(_mm256_cvtps_epi32(r), _mm256_castps_si256(ok));
}
static inline __m128i vcode(v16 v, v16 qmin, v16 qmax) {
    __m256i a = vcode8(v.lo, qmin.lo, qmax.lo), b = vcode8(v.hi, qmin.hi, qmax.hi);
    __m256i p = _mm256_packs_epi32(a, b);               /* a0-3 b0-3 | a4-7 b4-7 */
    p = _mm256_permute4x64_epi64(p, _MM_SHUFFLE(3, 1, 2, 0));  /* a0-7 | b0-7 */
    return _mm_packs_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
}
static inline v16i v16i_zero(void) { v16i v = {_mm256_setzero_si256(), _mm256_setzero_si256()}; return v; }
static inline v16i v16i_load(const uint32_t *p) {
    v16i v = {_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)(p + 8))};
    return v;
}
static inline void v16i_store(uint32_t *p, v16i v) {
    _mm256_storeu_si256((__m256i *)p, v.lo); _mm256_storeu_si256((__m256i *)(p + 8), v.hi);
}
static inline v16i v16i_max(v16i a, v16i b) {
    v16i v = {_mm256_max_epu32(a.lo, b.lo), _mm256_max_epu32(a.hi, b.hi)}; return v;
}
static inline v16i v16_absbits(v16 v) {
    const __m256i m = _mm256_set1_epi32(0x7FFFFFFF);
    v16i r = {_mm256_and_si256(_mm256_castps_si256(v.lo), m),
              _mm256_and_si256(_mm256_castps_si256(v.hi), m)};
    return r;
}
static inline uint32_t v16i_hmax(v16i v) {
    __m256i m = _mm256_max_epu32(v.lo, v.hi);
    __m128i x = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    x = _mm_max_epu32(x, _mm_shuffle_epi32(x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = _mm_max_epu32(x, _mm_shuffle_epi32(x, _MM_SHUFFLE(2, 3, 0, 1)));
    return (uint32_t)_mm_cvtsi128_si32(x);
}
#else
#define DSQ_VEC 0
#endif

/* the variant this library was compiled as (checked against the one asked for) */
const char *dsq_isa(void) { return DSQ_ISA_NAME; }

#if DSQ_VEC
/* codes of 16 rows x 16 columns per step, each element read once for its row and column codes;
   column codes written transposed through transpose16 when tc. C % 16 == 0. */
#define DEFINE_TILES(SUF, V)                                                                 \
static void codes_tiles_##SUF(const void *x, int64_t R, int64_t C, const float *rs,          \
                              int64_t rstr, int8_t *qr, const float *cs, int64_t cstr,       \
                              int8_t *qc, int tc, float qmin, float qmax, int nt) {          \
    const v16 vmin = v16_set1(qmin), vmax = v16_set1(qmax);                                  \
    /* bands of 64 rows when transposing (a band writes whole 64-byte lines of qc's rows),  \
       else of 4 (few concurrent read streams for the prefetchers; one VNNI group) */        \
    const int64_t bh = tc == 1 ? 64 : 4, nb = (R + bh - 1) / bh;                             \
    _Pragma("omp parallel num_threads(nt)")                                                  \
    {                                                                                        \
    _Pragma("omp for schedule(static)")                                                      \
    for (int64_t bi = 0; bi < nb; bi++) {                                                    \
        const int64_t b0 = bi * bh, b1 = b0 + bh < R ? b0 + bh : R;                          \
        int8_t tile[256] __attribute__((aligned(64)));                                       \
        for (int64_t c0 = 0; c0 < C; c0 += 16) {                                             \
            const v16 sc = !qc ? vmax : cstr ? v16_load(cs + c0) : v16_set1(cs[0]);          \
            const v16 ic = v16_divide(v16_set1(1.0f), sc);                                   \
            for (int64_t r0 = b0; r0 < b1; r0 += 16) {                                       \
                const int64_t nr = b1 - r0 < 16 ? b1 - r0 : 16;                              \
                for (int64_t i = 0; i < nr; i++) {                                           \
                    const int64_t o = (r0 + i) * C + c0;                                     \
                    const v16 v = V(x, o);                                                   \
                    if (qr) {                                                                \
                        const float s = rs[(r0 + i) * rstr];                                 \
                        _mm_storeu_si128((__m128i *)(qr + o), vcode(vdiv(v,                  \
                            v16_set1(s), v16_set1(1.0f / s)), vmin, vmax));                  \
                    }                                                                        \
                    if (qc) {                                                                \
                        const __m128i q = vcode(vdiv(v, sc, ic), vmin, vmax);                \
                        if (tc) _mm_store_si128((__m128i *)(tile + 16 * i), q);              \
                        else _mm_storeu_si128((__m128i *)(qc + o), q);                       \
                    }                                                                        \
                }                                                                            \
                if (qc && tc == 1) {                                                         \
                    if (nr == 16) transpose16(tile, qc + c0 * R + r0, R);                    \
                    else for (int64_t j = 0; j < 16; j++)                                    \
                        for (int64_t i = 0; i < nr; i++)                                     \
                            qc[(c0 + j) * R + r0 + i] = tile[16 * i + j];                    \
                } else if (qc && tc == 2) { /* R % 4 == 0: groups of 4 rows */               \
                    for (int64_t i = 0; i < nr; i += 4)                                      \
                        interleave4(tile + 16 * i, qc + packed_at(r0 + i, c0, R, C));        \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    _mm_sfence();  /* packed lines are streamed: visible before the GEMM reads them */      \
    }                                                                                        \
}
DEFINE_TILES(f32, v16_f32)
DEFINE_TILES(bf16, v16_bf16)
#define TILES(SUF) codes_tiles_##SUF
/* one row of the statistics pass, 16 columns at a time (C % 16 == 0): |x| bit patterns'
   maximum into lm (per column) and the row's, x into ls (per column) */
#define DEFINE_STATS_ROW(SUF, V)                                                             \
static inline uint32_t stats_row_##SUF(const void *x, int64_t o, int64_t C, uint32_t *lm,    \
                                       float *ls) {                                          \
    v16i m = v16i_zero();                                                                    \
    for (int64_t c = 0; c < C; c += 16) {                                                    \
        const v16 v = V(x, o + c);                                                           \
        const v16i a = v16_absbits(v);                                                       \
        m = v16i_max(m, a);                                                                  \
        if (lm) v16i_store(lm + c, v16i_max(v16i_load(lm + c), a));                          \
        if (ls) v16_store(ls + c, v16_add(v16_load(ls + c), v));                             \
    }                                                                                        \
    return v16i_hmax(m);                                                                     \
}
DEFINE_STATS_ROW(f32, v16_f32)
DEFINE_STATS_ROW(bf16, v16_bf16)
#define STATS_ROW(SUF) stats_row_##SUF
#else
#define STATS_ROW(SUF) ((uint32_t (*)(const void *, int64_t, int64_t, uint32_t *, float *))0)
#define TILES(SUF) ((void (*)(const void *, int64_t, int64_t, const float *, int64_t, int8_t *, \
                              const float *, int64_t, int8_t *, int, float, float, int))0)
#endif

#define DEFINE(SUF, LD, ABS, ST)                                                                  \
void dsq_stats_##SUF(const void *x, int64_t R, int64_t C, float *ramax, float *camax,        \
                     float *csum, float *tamax, int nt) {                                    \
    /* absmax as the maximum of the bit patterns of |x| (unsigned order = float order for   \
       non-negative floats, and a NaN sorts above inf: NaN propagates as in torch.amax) */    \
    int want_cols = camax != NULL || csum != NULL;                                           \
    if (nt > 256) nt = 256;                                                                  \
    uint32_t *pm = NULL; float *ps = NULL;                                                   \
    if (want_cols) { pm = (uint32_t *)malloc(sizeof(uint32_t) * C * nt);                      \
                     ps = (float *)malloc(sizeof(float) * C * nt); }                          \
    uint32_t tpart[256];                                                                     \
    _Pragma("omp parallel num_threads(nt)")                                                  \
    {                                                                                        \
        int t = omp_get_thread_num(), n = omp_get_num_threads();                             \
        uint32_t *restrict lm = want_cols ? pm + C * t : NULL;                               \
        float *restrict ls = want_cols ? ps + C * t : NULL;                                  \
        if (want_cols) for (int64_t c = 0; c < C; c++) { lm[c] = 0; ls[c] = 0.0f; }          \
        uint32_t tm = 0;                                                                     \
        int64_t r0 = R * t / n, r1 = R * (t + 1) / n;                                        \
        for (int64_t r = r0; r < r1; r++) {                                                  \
            const int64_t o = r * C;                                                         \
            uint32_t m = 0;                                                                  \
            if (DSQ_VEC && C % 16 == 0) {                                                 \
                m = STATS_ROW(SUF)(x, o, C, camax ? lm : NULL, csum ? ls : NULL);            \
            } else if (want_cols) {                                                          \
                for (int64_t c = 0; c < C; c++) {                                            \
                    uint32_t a = ABS(x, o + c);                                              \
                    m = a > m ? a : m;                                                       \
                    lm[c] = a > lm[c] ? a : lm[c];                                           \
                    ls[c] += LD(x, o + c);                                                   \
                }                                                                            \
            } else {                                                                         \
                for (int64_t c = 0; c < C; c++) { uint32_t a = ABS(x, o + c);                \
                                                  m = a > m ? a : m; }                       \
            }                                                                                \
            if (ramax) ramax[r] = dsq_bits_f32(m);                                                 \
            tm = m > tm ? m : tm;                                                            \
        }                                                                                    \
        tpart[t] = tm;                                                                       \
        _Pragma("omp barrier")                                                               \
        if (want_cols) {                                                                     \
            int64_t c0 = C * t / n, c1 = C * (t + 1) / n;                                    \
            for (int64_t c = c0; c < c1; c++) {                                              \
                uint32_t m = 0; float s = 0.0f;                                              \
                for (int k = 0; k < n; k++) { uint32_t a = pm[C * k + c];                    \
                                              m = a > m ? a : m; s += ps[C * k + c]; }       \
                if (camax) camax[c] = dsq_bits_f32(m);                                             \
                if (csum) csum[c] = s;                                                       \
            }                                                                                \
        }                                                                                    \
        _Pragma("omp single")                                                                \
        if (tamax) { uint32_t m = 0;                                                         \
                     for (int k = 0; k < n; k++) m = tpart[k] > m ? tpart[k] : m;            \
                     *tamax = dsq_bits_f32(m); }                                                   \
    }                                                                                        \
    free(pm); free(ps);                                                                      \
}                                                                                            \
                                                                                             \
void dsq_codes_##SUF(const void *x, int64_t R, int64_t C, const float *rs, int64_t rstr,     \
                     int8_t *qr, const float *cs, int64_t cstr, int8_t *qc, int tc,          \
                     float qmin, float qmax, int nt) {                                       \
    if (DSQ_VEC && C % 16 == 0) {                                                         \
        TILES(SUF)(x, R, C, rs, rstr, qr, cs, cstr, qc, tc, qmin, qmax, nt);                 \
        return;                                                                              \
    }                                                                                        \
    if (tc != 1) {  /* row by row: each row's codes for both scalings from one read */      \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                         \
        for (int64_t r = 0; r < R; r++) {                                                    \
            const int64_t o = r * C;                                                         \
            if (qr) { const float s = rs[r * rstr];                                          \
                for (int64_t c = 0; c < C; c++)                                              \
                    qr[o + c] = qcode(LD(x, o + c) / s, qmin, qmax); }                       \
            if (qc && tc == 2) {  /* the GEMM driver's packed layout */                      \
                for (int64_t c = 0; c < C; c++)                                              \
                    qc[packed_at(r, c, R, C)] = qcode(LD(x, o + c) / cs[c * cstr],           \
                                                      qmin, qmax);                           \
            } else if (qc && cstr) {                                                         \
                for (int64_t c = 0; c < C; c++)                                              \
                    qc[o + c] = qcode(LD(x, o + c) / cs[c], qmin, qmax);                     \
            } else if (qc) { const float s = cs[0];                                          \
                for (int64_t c = 0; c < C; c++)                                              \
                    qc[o + c] = qcode(LD(x, o + c) / s, qmin, qmax); }                       \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    /* column codes transposed ([C, R]): 16 rows at a time, in 16 x 16 tiles transposed in     \
       registers; the rows' own codes from the same read */                                  \
    int64_t nrt = (R + 15) / 16;                                                             \
    _Pragma("omp parallel num_threads(nt)")                                                  \
    {                                                                                        \
        int8_t tile[16 * 16];                                                                \
        _Pragma("omp for schedule(static)")                                                  \
        for (int64_t rt = 0; rt < nrt; rt++) {                                               \
            const int64_t r0 = rt * 16, r1 = r0 + 16 < R ? r0 + 16 : R;                      \
            for (int64_t c0 = 0; c0 < C; c0 += 16) {                                         \
                const int64_t c1 = c0 + 16 < C ? c0 + 16 : C;                                \
                if (qr) for (int64_t r = r0; r < r1; r++) {                                  \
                    const int64_t o = r * C; const float s = rs[r * rstr];                   \
                    for (int64_t c = c0; c < c1; c++)                                        \
                        qr[o + c] = qcode(LD(x, o + c) / s, qmin, qmax);                     \
                }                                                                            \
                if (r1 - r0 == 16 && c1 - c0 == 16) {                                        \
                    float sc[16];                                                            \
                    for (int64_t j = 0; j < 16; j++) sc[j] = cs[(c0 + j) * cstr];            \
                    for (int64_t i = 0; i < 16; i++) {                                       \
                        const int64_t o = (r0 + i) * C + c0;                                 \
                        for (int64_t j = 0; j < 16; j++)                                     \
                            tile[i * 16 + j] = qcode(LD(x, o + j) / sc[j], qmin, qmax);      \
                    }                                                                        \
                    transpose16(tile, qc + c0 * R + r0, R);                                  \
                } else {                                                                     \
                    for (int64_t r = r0; r < r1; r++)                                        \
                        for (int64_t c = c0; c < c1; c++)                                    \
                            qc[c * R + r] = qcode(LD(x, r * C + c) / cs[c * cstr], qmin, qmax); \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
void dsq_rescale_##SUF(const int32_t *acc, int64_t M, int64_t N, const float *rs,           \
                       int64_t rstr, const float *cs, int64_t cstr, const void *bias,        \
                       void *out, int64_t ldo, int tr, int nt) {                             \
    if (!tr) {                                                                               \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                         \
        for (int64_t m = 0; m < M; m++) {                                                    \
            const float a = rs[m * rstr];                                                    \
            const int64_t o = m * N, p = m * ldo;                                            \
            if (bias) for (int64_t n = 0; n < N; n++)                                        \
                ST(out, p + n, (float)acc[o + n] * a * cs[n * cstr] + LD(bias, n));          \
            else for (int64_t n = 0; n < N; n++)                                             \
                ST(out, p + n, (float)acc[o + n] * a * cs[n * cstr]);                        \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    int64_t nmt = (M + TILE - 1) / TILE;                                                     \
    _Pragma("omp parallel num_threads(nt)")                                                  \
    {                                                                                        \
        float tile[TILE * TILE];                                                             \
        _Pragma("omp for schedule(static)")                                                  \
        for (int64_t mt = 0; mt < nmt; mt++) {                                               \
            int64_t m0 = mt * TILE, m1 = m0 + TILE < M ? m0 + TILE : M;                      \
            for (int64_t n0 = 0; n0 < N; n0 += TILE) {                                       \
                int64_t n1 = n0 + TILE < N ? n0 + TILE : N;                                  \
                for (int64_t m = m0; m < m1; m++) {                                          \
                    const float a = rs[m * rstr];                                            \
                    for (int64_t n = n0; n < n1; n++) {                                      \
                        float y = (float)acc[m * N + n] * a * cs[n * cstr];                  \
                        if (bias) y = y + LD(bias, n);                                       \
                        tile[(n - n0) * TILE + (m - m0)] = y;                                \
                    }                                                                        \
                }                                                                            \
                for (int64_t n = n0; n < n1; n++)                                            \
                    for (int64_t m = m0; m < m1; m++)                                        \
                        ST(out, n * ldo + m, tile[(n - n0) * TILE + (m - m0)]);              \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}

DEFINE(f32, ld_f32, abs_f32, st_f32)
DEFINE(bf16, ld_bf16, abs_bf16, st_bf16)
