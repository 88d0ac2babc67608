/* The QAdamW update of complete blocks (dsq_rows) and of a block split across ranks
   (dsq_pass1 / dsq_pass2), plain C vectorized by the compiler for the variant's flags. Bound
   by dsq/optim/kernels.py (which documents the operations and formats); built per variant by
   dsq/native.py. */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#include "dsq_common.h"

#define TINY 1e-30f
#define CHUNK 4096
#define F32 32
enum { B1, OMB1, B2, OMB2, DECAY, STEP, INVBC2, EPS };
typedef int64_t i64;

/* the variant this library was compiled as (checked against the one asked for) */
const char *dsq_isa(void) { return DSQ_ISA_NAME; }

/* 4-bit codes: element 2k in the low nibble of byte k; m stored as code + 8 */
static inline void unpack_m(const uint8_t *restrict c, int8_t *restrict q, i64 n) {
    for (i64 k = 0; k < (n + 1) / 2; k++) {
        q[2 * k] = (int8_t)((c[k] & 15) - 8);
        q[2 * k + 1] = (int8_t)((c[k] >> 4) - 8);
    }
}
static inline void unpack_v(const uint8_t *restrict c, uint8_t *restrict q, i64 n) {
    for (i64 k = 0; k < (n + 1) / 2; k++) {
        q[2 * k] = c[k] & 15;
        q[2 * k + 1] = c[k] >> 4;
    }
}

/* Dequantize, AdamW update of p, fp32 moments to mbuf/vbuf (v or sqrt(v)), and the maxima of
   |m| and of the stored v quantity as float bit patterns (non-negative: integer max == float
   max, and the loop vectorizes). The operation order is the eager kernel's.
   A moment of 32 bits is fp32 (mf / vf): read from there, written back in place when WF, and
   it has no maximum (its code arguments are unused). */
static inline __attribute__((always_inline)) void update(
        float *restrict p, const float *restrict g, const int8_t *restrict qm,
        const uint8_t *restrict qv, float *restrict mf, float *restrict vf, float ms, float vs,
        i64 n, const int MB, const int VB, const int VSQRT, const int UPD, const int WF,
        const float *restrict h, float *restrict mbuf, float *restrict vbuf,
        uint32_t *am_out, uint32_t *av_out) {
    const float b1 = h[B1], omb1 = h[OMB1], b2 = h[B2], omb2 = h[OMB2], decay = h[DECAY];
    const float step = h[STEP], invbc2 = h[INVBC2], eps = h[EPS];
    uint32_t am = 0, av = 0;
    for (i64 i = 0; i < n; i++) {
        float gi = g[i];
        float m = MB == F32 ? mf[i] : (float)qm[i] * ms;
        float t1 = m * b1, t2 = gi * omb1;
        m = t1 + t2;
        float vr = VB == F32 ? vf[i] : (float)qv[i] * vs;
        float v = VSQRT ? vr * vr : vr;
        float gg = gi * gi;
        float t3 = v * b2, t4 = gg * omb2;
        v = t3 + t4;
        float r = sqrtf(v);
        if (UPD) {
            float d = r * invbc2;
            d = d + eps;
            float a = p[i] * decay;
            float u = m * step;
            u = u / d;
            p[i] = a - u;
        }
        float vq = VSQRT ? r : v;
        if (MB == F32) {
            if (WF) mf[i] = m;
        } else {
            mbuf[i] = m;
            uint32_t ba = dsq_f32_bits(m) & 0x7fffffffu;
            am = ba > am ? ba : am;
        }
        if (VB == F32) {
            if (WF) vf[i] = v;
        } else {
            vbuf[i] = vq;
            uint32_t bv = dsq_f32_bits(vq);
            av = bv > av ? bv : av;
        }
    }
    *am_out = am;
    *av_out = av;
}

static inline float qmax_m(const int b) { return b == 8 ? 127.0f : 7.0f; }
static inline float qmax_v(const int b) { return b == 8 ? 255.0f : 15.0f; }

/* codes of the quantized moments (an fp32 one is skipped) */
static inline __attribute__((always_inline)) void quantize(
        const float *restrict mbuf, const float *restrict vbuf, i64 n, float am, float av,
        const int MB, const int VB, int8_t *restrict qm, uint8_t *restrict qv) {
    const float Qm = qmax_m(MB), Qv = qmax_v(VB);
    am = am > TINY ? am : TINY;
    av = av > TINY ? av : TINY;
    const float im = Qm / am, iv = Qv / av;
    for (i64 i = 0; i < n; i++) {
        if (MB != F32) {
            float q = nearbyintf(mbuf[i] * im);
            q = q < -Qm ? -Qm : q;
            q = q > Qm ? Qm : q;
            qm[i] = (int8_t)q;
        }
        if (VB != F32) {
            float x = vbuf[i];
            float w = nearbyintf(x * iv);
            w = w > Qv ? Qv : w;
            w = (x > 0.0f && w < 1.0f) ? 1.0f : w;
            qv[i] = (uint8_t)w;
        }
    }
}

static inline void pack_m(const int8_t *restrict q, uint8_t *restrict c, i64 n) {
    for (i64 k = 0; k < n / 2; k++)
        c[k] = (uint8_t)((q[2 * k] + 8) | ((q[2 * k + 1] + 8) << 4));
    if (n & 1) c[n / 2] = (uint8_t)(q[n - 1] + 8);
}
static inline void pack_v(const uint8_t *restrict q, uint8_t *restrict c, i64 n) {
    for (i64 k = 0; k < n / 2; k++) c[k] = (uint8_t)(q[2 * k] | (q[2 * k + 1] << 4));
    if (n & 1) c[n / 2] = q[n - 1];
}

/* codes of elements [e0, e0 + n) of a piece (e0 even) as int8/uint8 arrays (NULL: fp32) */
static inline __attribute__((always_inline)) void load_codes(
        const void *mc, const void *vc, i64 e0, i64 n, const int MB, const int VB,
        int8_t *tm, uint8_t *tv, const int8_t **qm, const uint8_t **qv) {
    if (MB == 8) *qm = (const int8_t *)mc + e0;
    else if (MB == 4) { unpack_m((const uint8_t *)mc + e0 / 2, tm, n); *qm = tm; }
    else *qm = NULL;
    if (VB == 8) *qv = (const uint8_t *)vc + e0;
    else if (VB == 4) { unpack_v((const uint8_t *)vc + e0 / 2, tv, n); *qv = tv; }
    else *qv = NULL;
}
static inline __attribute__((always_inline)) void store_codes(
        void *mc, void *vc, i64 e0, i64 n, const int MB, const int VB,
        const int8_t *qm, const uint8_t *qv) {
    if (MB == 4) pack_m(qm, (uint8_t *)mc + e0 / 2, n);
    if (VB == 4) pack_v(qv, (uint8_t *)vc + e0 / 2, n);
}

/* storage of a moment from element e0 (even) on: codes (4-bit: two per byte) or fp32 */
static inline __attribute__((always_inline)) void *at(void *c, i64 e0, const int B) {
    return B == F32 ? (void *)((float *)c + e0) : (void *)((uint8_t *)c + (B == 4 ? e0 / 2 : e0));
}

/* The work of one block / chunk; the OpenMP loops over them are in the specialized functions
   below (SPECIALIZE), so that the formats are literal constants where the loops are compiled
   (OpenMP outlines a parallel region before inlining). */

/* complete block r of a rows x width piece (width <= 16384, even): one pass */
static inline __attribute__((always_inline)) void rows_block(
        float *p, const float *g, void *mc, float *ms, void *vc, float *vs, i64 r, i64 width,
        const int MB, const int VB, const int VSQRT, const float *h, float *mbuf, float *vbuf,
        int8_t *tm, int8_t *om, uint8_t *tv, uint8_t *ov) {
    const float Qm = qmax_m(MB), Qv = qmax_v(VB);
    void *mcr = at(mc, r * width, MB), *vcr = at(vc, r * width, VB);
    const int8_t *qm;
    const uint8_t *qv;
    load_codes(mcr, vcr, 0, width, MB, VB, tm, tv, &qm, &qv);
    uint32_t am, av;
    update(p + r * width, g + r * width, qm, qv, MB == F32 ? (float *)mcr : NULL,
           VB == F32 ? (float *)vcr : NULL, MB == F32 ? 0.0f : ms[r], VB == F32 ? 0.0f : vs[r],
           width, MB, VB, VSQRT, 1, 1, h, mbuf, vbuf, &am, &av);
    float fam = dsq_bits_f32(am), fav = dsq_bits_f32(av);
    int8_t *wm = MB == 8 ? (int8_t *)mcr : om;
    uint8_t *wv = VB == 8 ? (uint8_t *)vcr : ov;
    quantize(mbuf, vbuf, width, fam, fav, MB, VB, wm, wv);
    store_codes(mcr, vcr, 0, width, MB, VB, om, ov);
    fam = fam > TINY ? fam : TINY;
    fav = fav > TINY ? fav : TINY;
    if (MB != F32) ms[r] = fam / Qm;
    if (VB != F32) vs[r] = fav / Qv;
}

/* one block split over ranks (or too wide), phase 1, chunk c: update p, local maxima; the
   state is left untouched */
static inline __attribute__((always_inline)) void pass1_chunk(
        float *p, const float *g, const void *mc, float ms, const void *vc, float vs, i64 n,
        i64 c, const int MB, const int VB, const int VSQRT, const float *h, float *mbuf,
        float *vbuf, int8_t *tm, uint8_t *tv, uint32_t *a, uint32_t *b) {
    i64 e0 = c * CHUNK, len = n - e0 < CHUNK ? n - e0 : CHUNK;
    const int8_t *qm;
    const uint8_t *qv;
    load_codes(mc, vc, e0, len, MB, VB, tm, tv, &qm, &qv);
    update(p + e0, g + e0, qm, qv, MB == F32 ? (float *)mc + e0 : NULL,
           VB == F32 ? (float *)vc + e0 : NULL, ms, vs, len, MB, VB, VSQRT, 1, 0, h, mbuf, vbuf,
           a, b);
}

/* phase 2, chunk c: recompute the same moments from the unchanged state, requantize with the
   global maxima (an fp32 moment is written as computed) */
static inline __attribute__((always_inline)) void pass2_chunk(
        const float *g, void *mc, float ms, void *vc, float vs, i64 n, i64 c, const int MB,
        const int VB, const int VSQRT, const float *h, float am, float av, float *mbuf,
        float *vbuf, int8_t *tm, int8_t *om, uint8_t *tv, uint8_t *ov) {
    i64 e0 = c * CHUNK, len = n - e0 < CHUNK ? n - e0 : CHUNK;
    const int8_t *qm;
    const uint8_t *qv;
    load_codes(mc, vc, e0, len, MB, VB, tm, tv, &qm, &qv);
    uint32_t a, b;
    update(NULL, g + e0, qm, qv, MB == F32 ? (float *)mc + e0 : NULL,
           VB == F32 ? (float *)vc + e0 : NULL, ms, vs, len, MB, VB, VSQRT, 0, 1, h, mbuf, vbuf,
           &a, &b);
    int8_t *wm = MB == 8 ? (int8_t *)mc + e0 : om;
    uint8_t *wv = VB == 8 ? (uint8_t *)vc + e0 : ov;
    quantize(mbuf, vbuf, len, am, av, MB, VB, wm, wv);
    store_codes(mc, vc, e0, len, MB, VB, om, ov);
}

#define SPECIALIZE(MB, VB, VS)                                                               \
    static void rows_##MB##_##VB##_##VS(float *p, const float *g, void *mc, float *ms,        \
            void *vc, float *vs, i64 rows, i64 width, const float *h, int nt) {               \
        _Pragma("omp parallel num_threads(nt)")                                               \
        {                                                                                     \
            float mbuf[width], vbuf[width];                                                   \
            int8_t tm[width + 1], om[width + 1];                                              \
            uint8_t tv[width + 1], ov[width + 1];                                             \
            _Pragma("omp for schedule(static)")                                               \
            for (i64 r = 0; r < rows; r++)                                                    \
                rows_block(p, g, mc, ms, vc, vs, r, width, MB, VB, VS, h, mbuf, vbuf, tm, om, \
                           tv, ov);                                                           \
        }                                                                                     \
    }                                                                                         \
    static void pass1_##MB##_##VB##_##VS(float *p, const float *g, const void *mc,            \
            const float *msp, const void *vc, const float *vsp, i64 n, const float *h,        \
            int nt, float *out) {                                                             \
        const float ms = MB == F32 ? 0.0f : *msp, vs = VB == F32 ? 0.0f : *vsp;               \
        const i64 nch = (n + CHUNK - 1) / CHUNK;                                              \
        uint32_t am = 0, av = 0;                                                              \
        _Pragma("omp parallel num_threads(nt) reduction(max: am, av)")                        \
        {                                                                                     \
            float mbuf[CHUNK], vbuf[CHUNK];                                                   \
            int8_t tm[CHUNK];                                                                 \
            uint8_t tv[CHUNK];                                                                \
            _Pragma("omp for schedule(static)")                                               \
            for (i64 c = 0; c < nch; c++) {                                                   \
                uint32_t a, b;                                                                \
                pass1_chunk(p, g, mc, ms, vc, vs, n, c, MB, VB, VS, h, mbuf, vbuf, tm, tv,    \
                            &a, &b);                                                          \
                am = a > am ? a : am;                                                         \
                av = b > av ? b : av;                                                         \
            }                                                                                 \
        }                                                                                     \
        out[0] = dsq_bits_f32(am);                                                                   \
        out[1] = dsq_bits_f32(av);                                                                   \
    }                                                                                         \
    static void pass2_##MB##_##VB##_##VS(const float *g, void *mc, float *ms, void *vc,       \
            float *vs, i64 n, const float *h, float am, float av, int nt) {                   \
        const float ms0 = MB == F32 ? 0.0f : *ms, vs0 = VB == F32 ? 0.0f : *vs;               \
        const i64 nch = (n + CHUNK - 1) / CHUNK;                                              \
        _Pragma("omp parallel num_threads(nt)")                                               \
        {                                                                                     \
            float mbuf[CHUNK], vbuf[CHUNK];                                                   \
            int8_t tm[CHUNK], om[CHUNK];                                                      \
            uint8_t tv[CHUNK], ov[CHUNK];                                                     \
            _Pragma("omp for schedule(static)")                                               \
            for (i64 c = 0; c < nch; c++)                                                     \
                pass2_chunk(g, mc, ms0, vc, vs0, n, c, MB, VB, VS, h, am, av, mbuf, vbuf, tm, \
                            om, tv, ov);                                                      \
        }                                                                                     \
        am = am > TINY ? am : TINY;                                                           \
        av = av > TINY ? av : TINY;                                                           \
        if (MB != F32) *ms = am / qmax_m(MB);                                                 \
        if (VB != F32) *vs = av / qmax_v(VB);                                                 \
    }
/* (m bits, v bits, sqrt v): 32 = fp32; a fp32 v is never stored as its square root */
#define FORMATS(X)                                                                           \
    X(8, 8, 0) X(8, 8, 1) X(4, 8, 0) X(4, 8, 1) X(8, 4, 0) X(8, 4, 1) X(4, 4, 0) X(4, 4, 1)   \
    X(32, 8, 0) X(32, 8, 1) X(32, 4, 0) X(32, 4, 1) X(8, 32, 0) X(4, 32, 0)
FORMATS(SPECIALIZE)

#define CASE_ROWS(MB, VB, VS) if (mb == MB && vb == VB && vsq == VS) {                        \
        rows_##MB##_##VB##_##VS(p, g, mc, ms, vc, vs, rows, width, h, nt); return; }
#define CASE_PASS1(MB, VB, VS) if (mb == MB && vb == VB && vsq == VS) {                       \
        pass1_##MB##_##VB##_##VS(p, g, mc, ms, vc, vs, n, h, nt, out); return; }
#define CASE_PASS2(MB, VB, VS) if (mb == MB && vb == VB && vsq == VS) {                       \
        pass2_##MB##_##VB##_##VS(g, mc, ms, vc, vs, n, h, am, av, nt); return; }

/* mc / vc: the moment's codes, or its fp32 values (32 bits; then ms / vs are unused) */
void dsq_rows(float *p, const float *g, void *mc, float *ms, void *vc, float *vs, i64 rows,
              i64 width, int mb, int vb, int vsq, const float *h, int nt) {
    FORMATS(CASE_ROWS)
}
void dsq_pass1(float *p, const float *g, const void *mc, const float *ms, const void *vc,
               const float *vs, i64 n, int mb, int vb, int vsq, const float *h, int nt,
               float *out) {
    FORMATS(CASE_PASS1)
}
void dsq_pass2(const float *g, void *mc, float *ms, void *vc, float *vs, i64 n, int mb, int vb,
               int vsq, const float *h, float am, float av, int nt) {
    FORMATS(CASE_PASS2)
}
