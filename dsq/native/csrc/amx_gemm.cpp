// Scaled int8 GEMM on CPUs with AMX: out = (A @ B) * row_scale * col_scale (+ bias), one pass.
//
// A[M, K] int8 row-major, B[K, N] int8 in either layout (row-major, or B^T row-major), int32
// accumulation by oneDNN's AMX micro-kernel (at::native::cpublas::brgemm, the one PyTorch's own
// CPU GEMM templates use), and the rescale (+ bias) applied to each output tile while it is
// still in cache: no int32 matrix is ever written to memory. Output fp32 or bf16, optionally
// transposed. Bound by dsq/quant/cpu_gemm.py; built by dsq/native.py.

// GCC 12.1/12.2's AVX-512 headers trip -Wmaybe-uninitialized inside every intrinsic built on
// _mm512_undefined_*() (GCC bug 105593, fixed in 12.3): silenced for those headers only
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <ATen/native/CPUBlas.h>
#include <c10/core/ScalarType.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "dsq_common.h"

namespace {

constexpr int64_t NB = DSQ_PACK_NB;  // columns per micro-kernel call (and packed B block)
constexpr int64_t MB = 64;   // rows per micro-kernel call

inline float ld_out(const void* p, int64_t i, int bf16) {
  if (!bf16) return static_cast<const float*>(p)[i];
  return dsq_bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

struct Buf {  // a per-thread scratch buffer that only grows (no allocation per call)
  void* p = nullptr;
  size_t n = 0;
  void* get(size_t bytes) {
    if (bytes > n) {
      std::free(p);
      n = (bytes + 4095) / 4096 * 4096;
      p = std::aligned_alloc(64, n);
    }
    return p;
  }
  ~Buf() { std::free(p); }
};

// r[k] <- column k of the 16 x 16 matrix whose rows are r[0..15]
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {  // r[4g + c], lane L: column 4L + c of rows 4g..4g+3
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; c++) {
    const __m512 ab_lo = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);
    const __m512 ab_hi = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 cd_lo = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 cd_hi = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    t[c + 0] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0x88);
    t[c + 4] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0xDD);
    t[c + 8] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0x88);
    t[c + 12] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0xDD);
  }
  for (int i = 0; i < 16; i++) r[i] = t[i];
}

// Pack columns [n0, n0 + nb) of B (element (k, n) at B[k * sk + n * sn]) into the VNNI layout
// the micro-kernel reads: dst[((k / 4) * nb + j) * 4 + k % 4].
void pack_block(const int8_t* B, int64_t sk, int64_t sn, int64_t K, int64_t n0, int64_t nb,
                int8_t* dst) {
  const int64_t K4 = K / 4;
  if (sk == 1) {  // B^T row-major: each column's 4 consecutive k are one 32-bit word, so
    // packing is a transpose of 32-bit words, 16 x 16 at a time in registers
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    const int64_t nb16 = nb / 16 * 16, k16 = K4 / 16 * 16;
    for (int64_t j0 = 0; j0 < nb16; j0 += 16) {
      for (int64_t q0 = 0; q0 < k16; q0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; i++)
          r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(B + (n0 + j0 + i) * sn + 4 * q0));
        transpose16x16(r);
        for (int q = 0; q < 16; q++)
          _mm512_storeu_si512(d + (q0 + q) * nb + j0, _mm512_castps_si512(r[q]));
      }
    }
    for (int64_t j = 0; j < nb; j++) {  // the rest, a word at a time
      const int8_t* col = B + (n0 + j) * sn;
      for (int64_t k4 = (j < nb16 ? k16 : 0); k4 < K4; k4++) {
        uint32_t w;
        std::memcpy(&w, col + 4 * k4, 4);
        d[k4 * nb + j] = w;
      }
    }
    return;
  }
  // B row-major: interleave 4 rows, 64 columns at a time (bytes within 128-bit lanes, then a
  // 4 x 4 transpose of the lanes), 16 at a time for the rest
  for (int64_t k4 = 0; k4 < K4; k4++) {
    const int8_t* r0 = B + (4 * k4) * sk + n0;
    const int8_t* r1 = r0 + sk;
    const int8_t* r2 = r1 + sk;
    const int8_t* r3 = r2 + sk;
    int8_t* d = dst + k4 * nb * 4;
    int64_t j = 0;
    for (; j + 64 <= nb; j += 64) {
      const __m512i a0 = _mm512_loadu_si512(r0 + j), a1 = _mm512_loadu_si512(r1 + j);
      const __m512i a2 = _mm512_loadu_si512(r2 + j), a3 = _mm512_loadu_si512(r3 + j);
      const __m512i t0 = _mm512_unpacklo_epi8(a0, a1), t1 = _mm512_unpackhi_epi8(a0, a1);
      const __m512i t2 = _mm512_unpacklo_epi8(a2, a3), t3 = _mm512_unpackhi_epi8(a2, a3);
      const __m512i o0 = _mm512_unpacklo_epi16(t0, t2), o1 = _mm512_unpackhi_epi16(t0, t2);
      const __m512i o2 = _mm512_unpacklo_epi16(t1, t3), o3 = _mm512_unpackhi_epi16(t1, t3);
      const __m512i u0 = _mm512_shuffle_i32x4(o0, o1, 0x44), u1 = _mm512_shuffle_i32x4(o0, o1, 0xEE);
      const __m512i u2 = _mm512_shuffle_i32x4(o2, o3, 0x44), u3 = _mm512_shuffle_i32x4(o2, o3, 0xEE);
      __m512i* o = reinterpret_cast<__m512i*>(d + 4 * j);
      _mm512_storeu_si512(o + 0, _mm512_shuffle_i32x4(u0, u2, 0x88));
      _mm512_storeu_si512(o + 1, _mm512_shuffle_i32x4(u0, u2, 0xDD));
      _mm512_storeu_si512(o + 2, _mm512_shuffle_i32x4(u1, u3, 0x88));
      _mm512_storeu_si512(o + 3, _mm512_shuffle_i32x4(u1, u3, 0xDD));
    }
    for (; j + 16 <= nb; j += 16) {
      __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + j));
      __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + j));
      __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r2 + j));
      __m128i a3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r3 + j));
      __m128i t0 = _mm_unpacklo_epi8(a0, a1), t1 = _mm_unpackhi_epi8(a0, a1);
      __m128i t2 = _mm_unpacklo_epi8(a2, a3), t3 = _mm_unpackhi_epi8(a2, a3);
      __m128i* o = reinterpret_cast<__m128i*>(d + 4 * j);
      _mm_storeu_si128(o + 0, _mm_unpacklo_epi16(t0, t2));
      _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(t0, t2));
      _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(t1, t3));
      _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(t1, t3));
    }
    for (; j < nb; j++) {
      d[4 * j + 0] = r0[j];
      d[4 * j + 1] = r1[j];
      d[4 * j + 2] = r2[j];
      d[4 * j + 3] = r3[j];
    }
  }
}

// 16 floats to bf16, round to nearest even, NaN -> 0x7FC0 (as dsq_f32_to_bf16 and PyTorch)
inline __m256i bf16x16_exact(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

inline __m256i bf16x16(__m512 y) {
#if defined(__AVX512BF16__)
  // the BF16 unit rounds to nearest even too, but flushes denormals and keeps NaN payloads:
  // those (rare) vectors take the exact path
  if (_mm512_fpclass_ps_mask(y, 0x01 | 0x20 | 0x80) == 0)
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(y));
#endif
  return bf16x16_exact(y);
}

inline __m512 ld16(const void* p, int64_t i, int bf16, __mmask16 k) {
  if (!bf16) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p) + i);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// out tile = C * rs * cs (+ bias): the arithmetic of dsq's rescale, operation for operation
// ((float(acc) * rs) * cs + bias, no fused multiply-add), 16 columns at a time
void epilogue(const int32_t* C, int64_t mb, int64_t nb, int64_t m0, int64_t n0,
              const float* rs, int64_t rstr, const float* cs, int64_t cstr, const void* bias,
              void* out, int64_t ldo, int bf16, int tr, bool stream) {
  if (!tr) {
    // row by row: a full 64-column tile row is 2 (bf16) or 4 (fp32) whole cache lines, which a
    // large output streams to memory (no read for ownership) when they are aligned
    const int64_t esz = bf16 ? 2 : 4;
    const bool nt = stream && nb == NB &&
                    (reinterpret_cast<uintptr_t>(out) + (m0 * ldo + n0) * esz) % 64 == 0 &&
                    (ldo * esz) % 64 == 0;
    __m512 s[NB / 16], b[NB / 16];
    __mmask16 km[NB / 16];
    for (int64_t q = 0; q * 16 < nb; q++) {
      const int64_t j = 16 * q;
      km[q] = nb - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                           : static_cast<__mmask16>((1u << (nb - j)) - 1);
      s[q] = cstr ? _mm512_maskz_loadu_ps(km[q], cs + n0 + j) : _mm512_set1_ps(cs[0]);
      b[q] = bias ? ld16(bias, n0 + j, bf16, km[q]) : _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < mb; i++) {
      const __m512 a = _mm512_set1_ps(rs[(m0 + i) * rstr]);
      const int64_t o = (m0 + i) * ldo + n0;
      for (int64_t q = 0; q * 16 < nb; q++) {
        const int64_t j = 16 * q;
        const __m512 c = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(km[q], C + i * NB + j));
        __m512 y = _mm512_mul_ps(_mm512_mul_ps(c, a), s[q]);
        if (bias) y = _mm512_add_ps(y, b[q]);
        if (bf16) {
          uint16_t* p = static_cast<uint16_t*>(out) + o + j;
          if (nt)
            _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16x16(y));
          else
            _mm256_mask_storeu_epi16(p, km[q], bf16x16(y));
        } else {
          float* p = static_cast<float*>(out) + o + j;
          if (nt)
            _mm512_stream_ps(p, y);
          else
            _mm512_mask_storeu_ps(p, km[q], y);
        }
      }
    }
    return;
  }
  // transposed: out[n, m], in 16 x 16 blocks transposed in registers (tails element-wise)
  const int64_t mb16 = mb / 16 * 16, nb16 = nb / 16 * 16;
  for (int64_t j0 = 0; j0 < nb16; j0 += 16) {
    const __m512 s = cstr ? _mm512_loadu_ps(cs + n0 + j0) : _mm512_set1_ps(cs[0]);
    const __m512 b = bias ? ld16(bias, n0 + j0, bf16, 0xFFFF) : _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < mb16; i0 += 16) {
      __m512 y[16];
      for (int i = 0; i < 16; i++) {
        const __m512 a = _mm512_set1_ps(rs[(m0 + i0 + i) * rstr]);
        const __m512 c = _mm512_cvtepi32_ps(_mm512_loadu_si512(C + (i0 + i) * NB + j0));
        y[i] = _mm512_mul_ps(_mm512_mul_ps(c, a), s);
        if (bias) y[i] = _mm512_add_ps(y[i], b);
      }
      transpose16x16(y);
      for (int k = 0; k < 16; k++) {
        const int64_t o = (n0 + j0 + k) * ldo + m0 + i0;
        if (bf16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + o),
                              bf16x16(y[k]));
        else
          _mm512_storeu_ps(static_cast<float*>(out) + o, y[k]);
      }
    }
  }
  for (int64_t j = 0; j < nb; j++) {
    const float b = cs[(n0 + j) * cstr];
    const float bb = bias ? ld_out(bias, n0 + j, bf16) : 0.0f;
    for (int64_t i = (j < nb16 ? mb16 : 0); i < mb; i++) {
      float y = static_cast<float>(C[i * NB + j]) * rs[(m0 + i) * rstr] * b;
      if (bias) y = y + bb;
      if (bf16)
        static_cast<uint16_t*>(out)[(n0 + j) * ldo + m0 + i] = dsq_f32_to_bf16(y);
      else
        static_cast<float*>(out)[(n0 + j) * ldo + m0 + i] = y;
    }
  }
}

thread_local Buf pack_buf;

}  // namespace

extern "C" {

int64_t dsq_pack_block_n() { return NB; }

// B[K, N] (element (k, n) at B[k * sbk + n * sbn]) into the driver's layout: blocks of NB
// columns, block b at dst + b * NB * K, VNNI inside ([K / 4][width][4])
void dsq_pack_s8(int64_t K, int64_t N, const int8_t* B, int64_t sbk, int64_t sbn, int8_t* dst,
                 int nt) {
  const int64_t nnb = (N + NB - 1) / NB;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < nnb; b++) {
    const int64_t n0 = b * NB, nb = std::min(NB, N - n0);
    pack_block(B, sbk, sbn, K, n0, nb, dst + b * NB * K);
  }
}

int dsq_amx_ready() { return at::native::cpublas::could_pack(c10::ScalarType::Char) ? 1 : 0; }

// out (M x N, or N x M with tr) = (A @ B) * rs * cs (+ bias). K % 4 == 0, K <= 65536.
// B with sbk == sbn == 0: B is already packed (dsq_pack_s8's layout, e.g. written so by the
// quantization kernel).
void dsq_gemm_s8(int64_t M, int64_t N, int64_t K, const int8_t* A, int64_t lda, const int8_t* B,
                 int64_t sbk, int64_t sbn, const float* rs, int64_t rstr, const float* cs,
                 int64_t cstr, const void* bias, void* out, int64_t ldo, int bf16, int tr,
                 int nt) {
  const int64_t nnb = (N + NB - 1) / NB;
  const int8_t* Bp = B;
  Buf once;  // a large B (one not packed in advance: rare) gets a buffer of its own
  const size_t pbytes = static_cast<size_t>(nnb * NB * K);
  if (sbk || sbn) {
    int8_t* buf = static_cast<int8_t*>(pbytes <= (4u << 20) ? pack_buf.get(pbytes)
                                                             : once.get(pbytes));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < nnb; b++) {
      const int64_t n0 = b * NB, nb = std::min(NB, N - n0);
      pack_block(B, sbk, sbn, K, n0, nb, buf + b * NB * K);
    }
    Bp = buf;
  }
  // panels of B that stay in L2 while a thread's rows stream through them
  int64_t pn = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, K * NB));
  pn = std::min(pn, nnb);
  const int64_t nmb = (M + MB - 1) / MB;
  // threads split the rows when B is the smaller operand (each thread reads all of B), the
  // columns when A is (each reads all of A): the larger operand is read from memory once
  const bool split_n = N > M && nnb > 1;
  // outputs much larger than the caches go to memory without a read for ownership
  const bool stream = M * N * (bf16 ? 2 : 4) >= (16 << 20);
#pragma omp parallel num_threads(nt)
  {
    alignas(64) int32_t C[MB * NB];
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t mb0 = split_n ? 0 : nmb * t / T, mb1 = split_n ? nmb : nmb * (t + 1) / T;
    const int64_t nb0 = split_n ? nnb * t / T : 0, nb1 = split_n ? nnb * (t + 1) / T : nnb;
    for (int64_t p0 = nb0; p0 < nb1; p0 += pn) {
      const int64_t p1 = std::min(nb1, p0 + pn);
      for (int64_t mi = mb0; mi < mb1; mi++) {
        const int64_t m0 = mi * MB, mb = std::min(MB, M - m0);
        for (int64_t b = p0; b < p1; b++) {
          const int64_t n0 = b * NB, nb = std::min(NB, N - n0);
          at::native::cpublas::brgemm(mb, nb, K, lda, nb, NB, false,
                                      reinterpret_cast<const signed char*>(A + m0 * lda),
                                      reinterpret_cast<const signed char*>(Bp + b * NB * K), C,
                                      true);
          epilogue(C, mb, nb, m0, n0, rs, rstr, cs, cstr, bias, out, ldo, bf16, tr, stream);
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
    if (stream) _mm_sfence();  // the streamed lines, before anyone reads the output
  }
}

}  // extern "C"
