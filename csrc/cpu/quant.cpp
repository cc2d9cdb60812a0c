// y = x @ W.T + bias for group-quantized weights (formats: lmsqueeze/kernels/quant.py):
//   quant_matmul_cpu           dense W, 4- or 8-bit codes packed little-endian in int32 words
//                              [out, ceil(in*bits/32)], fp32 scales and uint8 zeros [out, ngroups],
//                              optional perm [in] (act-order: packed column j is input column perm[j])
//   sparse24_quant_matmul_cpu  2:4 W: 4-bit codes of the kept values [out, in/16] int32, sparse24's
//                              meta [out, in/16] int16, scales/zeros per group of input columns
// w = s * (q - z) for code q of a column in group g of row n (s = scales[n, g], z = zeros[n, g]).
//
// Decode (1..16 rows of x) is memory-bound: each packed weight is read once from DRAM (0.54 bytes a
// weight for 4-bit g128, 0.41 for 2:4 + 4-bit, against 2 for bf16) and unpacked in registers:
//   4-bit, AVX-512, 32 columns (16 bytes): vpmovzxbd -> and 15 (even columns) / srl 4 (odd columns)
//          -> vcvtdq2ps -> 2 fp32 FMAs per row of x. x is rearranged once per call into the same
//          order (each 32-column chunk: even columns, then odd columns), so no shuffles per weight.
//   8-bit: two vpmovzxbd per 32 columns, x in natural order.
//   AVX2:  the same on 16-column chunks (8 lanes).
// The zero point is not subtracted per weight: sum_k s (q_k - z) x_k = s * sum_k q_k x_k - s z * xsum_g,
// with xsum_g (the sum of x over the group) computed once per call and row of x.
// 2:4 + 4-bit, AVX-512, 64 columns (16 groups of 4, 32 kept values = 16 bytes of codes, 4 meta words):
//   codes as above (low nibbles: first kept value of each group, high: second), minus z in integers
//   (z cannot be folded into a per-group x sum: which x meet the kept values differs per row);
//   x is stored per chunk as 4 vectors x_r[l] = x[4l + r] (position r in group l) and the kept
//   positions pick among them with 2 masked blends per vector (masks from the meta nibbles by
//   vptestmd), so one chunk costs 4 blends + 2 FMAs per row of x. AVX2 does the same on 32-column
//   chunks (8 groups, 8 bytes of codes) with vblendvps on the meta bits shifted into the sign bit.
// The dev machine of this commit (AMD EPYC, 2 cores) has AVX2 but no AVX-512: the AVX-512 paths are
// compiled and written to the same layouts, but only the AVX2 and generic paths were run there
// (tests/kernels/test_quant.py runs whichever the machine has, and caps the ISA to reach the others).
// Accumulation is fp32 throughout (products of small integers and x are exact in fp32; only the
// summation order differs from the reference). That fp32 path costs ~2.4 cycles per 8 weights on an
// AVX2 core (cvt + FMA per weight), which holds a 4-bit GEMV to ~55% of DRAM bandwidth at one thread;
// the int8-activation kernels below (act_int8: x rounded to int8 per 32 columns, integer dot products)
// take ~1/3 of that and are the default for 4-bit where shapes allow (lmsqueeze/kernels/quant.py,
// "Activations"; the error on SmolLM2 is in docs/benchmarks.md, issue 19).
//
// Batches above 16 rows dequantize tiles of output rows (fp32, then x's dtype) and call the dense
// GEMM (at::mm / addmm: oneDNN, with AMX or AVX-512-BF16 where the CPU has them); for bf16 x the
// tile is rounded to bf16 as the dense bf16 model's weight is.
//
// Threads split the output rows (static, contiguous ranges), each streaming its own slab once.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "ops.h"

namespace lmsqueeze {

namespace {

constexpr int64_t kMaxGemvRows = 16;  // above: dequantized tiles + dense GEMM
constexpr int kTile = 8;              // rows of x per pass over one output row's codes

inline int code_at(const uint8_t* __restrict__ qb, int64_t j, int bits) {
  return bits == 4 ? (qb[j >> 1] >> ((j & 1) << 2)) & 15 : qb[j];
}

// Slot of column u (0..C-1) of a C-column chunk in the kernel's x order: 4-bit chunks unpack even
// columns (low nibbles) into the first C/2 lanes and odd columns (high nibbles) into the rest.
inline int64_t chunk_slot(int64_t u, int64_t C, int bits) {
  if (bits == 8 || C == 1) return u;
  return (u & 1) ? C / 2 + (u >> 1) : (u >> 1);
}

// xb [rows, in] fp32 in kernel order: perm applied, then in each group the whole C-column chunks
// rearranged by chunk_slot (the group's last (group width % C) columns stay in order).
// xs [rows, ngroups]: the sum of x over each group (double accumulation).
template <typename T>
void build_x(const T* __restrict__ x,          // [rows, in], row stride sx
             int64_t sx,
             const int64_t* __restrict__ perm,  // [in] or nullptr
             int64_t rows, int64_t in, int64_t gs, int64_t C, int bits,
             float* __restrict__ xb,            // [rows, in]
             float* __restrict__ xs) {          // [rows, ngroups]
  const int64_t ngroups = (in + gs - 1) / gs;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t c0 = g * gs, c1 = std::min(c0 + gs, in), full = (c1 - c0) / C * C;
      double s = 0.0;
      for (int64_t j = c0; j < c1; ++j) {
        const float v = static_cast<float>(x[r * sx + (perm ? perm[j] : j)]);
        s += v;
        const int64_t u = j - c0;
        const int64_t dst = u < full ? c0 + (u / C) * C + chunk_slot(u % C, C, bits) : j;
        xb[r * in + dst] = v;
      }
      xs[r * ngroups + g] = static_cast<float>(s);
    }
  }
}

// ---- generic C++ ----------------------------------------------------------------------------------
void row_generic(const uint8_t* __restrict__ qb,  // [row bytes] one output row's codes
                 const float* __restrict__ sc,    // [ngroups]
                 const uint8_t* __restrict__ zp,  // [ngroups]
                 const float* __restrict__ xb,    // [nb, in] natural (C = 1) order
                 const float* __restrict__ xs,    // [nb, ngroups]
                 int nb, int64_t in, int64_t gs, int64_t ngroups, int bits, float* __restrict__ res) {  // res [nb]
  for (int t = 0; t < nb; ++t) {
    float y = 0.0f;
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t c0 = g * gs, c1 = std::min(c0 + gs, in);
      float a = 0.0f;
      for (int64_t k = c0; k < c1; ++k) a += static_cast<float>(code_at(qb, k, bits)) * xb[t * in + k];
      y += sc[g] * a - sc[g] * static_cast<float>(zp[g]) * xs[t * ngroups + g];
    }
    res[t] = y;
  }
}

// ---- AVX-512: 32 columns a chunk ----------------------------------------------------------------
template <int BITS>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void unpack32(const uint8_t* __restrict__ qb, int64_t j,
                                                                           __m512& lo, __m512& hi) {
  if (BITS == 4) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + j / 2)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(d, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4));
  } else {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + j))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + j + 16))));
  }
}

// NB rows of x against one output row; U chunks in flight (independent FMA chains hide latency when NB is small).
template <int NB, int U, int BITS>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void row_avx512(
    const uint8_t* __restrict__ qb,  // [row bytes] one output row's codes
    const float* __restrict__ sc,    // [ngroups]
    const uint8_t* __restrict__ zp,  // [ngroups]
    const float* __restrict__ xb,    // [NB, in] kernel order (C = 32)
    const float* __restrict__ xs,    // [NB, ngroups]
    int64_t in, int64_t gs, int64_t ngroups, float* __restrict__ res) {  // res [NB]
  __m512 yacc[NB];
  float ysc[NB];
  for (int t = 0; t < NB; ++t) yacc[t] = _mm512_setzero_ps(), ysc[t] = 0.0f;
  for (int64_t g = 0; g < ngroups; ++g) {
  const int64_t row_bytes = (in * BITS + 31) / 32 * 4;  // next output row
    const int64_t c0 = g * gs, c1 = std::min(c0 + gs, in);
    // the next output row's bytes of this group, one row (in * bits / 8 bytes) ahead of the loads
    for (int64_t p = c0 * BITS / 8; p < (c1 * BITS + 7) / 8; p += 64) _mm_prefetch(reinterpret_cast<const char*>(qb + row_bytes + p), _MM_HINT_T0);
    __m512 acc[NB][2 * U];
    for (int t = 0; t < NB; ++t)
      for (int u = 0; u < 2 * U; ++u) acc[t][u] = _mm512_setzero_ps();
    int64_t j = c0;
    for (; j + 32 * U <= c1; j += 32 * U) {
      __m512 lo[U], hi[U];
      for (int u = 0; u < U; ++u) unpack32<BITS>(qb, j + 32 * u, lo[u], hi[u]);
      for (int t = 0; t < NB; ++t) {
        const float* xr = xb + t * in + j;
        for (int u = 0; u < U; ++u) {
          acc[t][2 * u] = _mm512_fmadd_ps(lo[u], _mm512_loadu_ps(xr + 32 * u), acc[t][2 * u]);
          acc[t][2 * u + 1] = _mm512_fmadd_ps(hi[u], _mm512_loadu_ps(xr + 32 * u + 16), acc[t][2 * u + 1]);
        }
      }
    }
    for (; j + 32 <= c1; j += 32) {
      __m512 lo, hi;
      unpack32<BITS>(qb, j, lo, hi);
      for (int t = 0; t < NB; ++t) {
        acc[t][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + t * in + j), acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + t * in + j + 16), acc[t][1]);
      }
    }
    float tail[NB];
    for (int t = 0; t < NB; ++t) tail[t] = 0.0f;
    for (int64_t k = j; k < c1; ++k) {
      const float q = static_cast<float>(code_at(qb, k, BITS));
      for (int t = 0; t < NB; ++t) tail[t] += q * xb[t * in + k];
    }
    const float s = sc[g], m = -s * static_cast<float>(zp[g]);
    const __m512 sv = _mm512_set1_ps(s);
    for (int t = 0; t < NB; ++t) {
      __m512 a = acc[t][0];
      for (int u = 1; u < 2 * U; ++u) a = _mm512_add_ps(a, acc[t][u]);
      yacc[t] = _mm512_fmadd_ps(sv, a, yacc[t]);
      ysc[t] += s * tail[t] + m * xs[t * ngroups + g];
    }
  }
  for (int t = 0; t < NB; ++t) res[t] = _mm512_reduce_add_ps(yacc[t]) + ysc[t];
}

// ---- AVX2 (+ FMA): 16 columns a chunk -----------------------------------------------------------
template <int BITS>
__attribute__((target("avx2,fma"))) inline void unpack16(const uint8_t* __restrict__ qb, int64_t j, __m256& lo,
                                                         __m256& hi) {
  if (BITS == 4) {
    const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + j / 2)));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(d, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(d, 4));
  } else {
    lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + j))));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + j + 8))));
  }
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int NB, int U, int BITS>
__attribute__((target("avx2,fma"))) void row_avx2(
    const uint8_t* __restrict__ qb,  // [row bytes]
    const float* __restrict__ sc,    // [ngroups]
    const uint8_t* __restrict__ zp,  // [ngroups]
    const float* __restrict__ xb,    // [NB, in] kernel order (C = 16)
    const float* __restrict__ xs,    // [NB, ngroups]
    int64_t in, int64_t gs, int64_t ngroups, float* __restrict__ res) {  // res [NB]
  __m256 yacc[NB];
  float ysc[NB];
  for (int t = 0; t < NB; ++t) yacc[t] = _mm256_setzero_ps(), ysc[t] = 0.0f;
  for (int64_t g = 0; g < ngroups; ++g) {
  const int64_t row_bytes = (in * BITS + 31) / 32 * 4;  // next output row
    const int64_t c0 = g * gs, c1 = std::min(c0 + gs, in);
    // the next output row's bytes of this group, one row (in * bits / 8 bytes) ahead of the loads
    for (int64_t p = c0 * BITS / 8; p < (c1 * BITS + 7) / 8; p += 64) _mm_prefetch(reinterpret_cast<const char*>(qb + row_bytes + p), _MM_HINT_T0);
    __m256 acc[NB][2 * U];
    for (int t = 0; t < NB; ++t)
      for (int u = 0; u < 2 * U; ++u) acc[t][u] = _mm256_setzero_ps();
    int64_t j = c0;
    for (; j + 16 * U <= c1; j += 16 * U) {
      __m256 lo[U], hi[U];
      for (int u = 0; u < U; ++u) unpack16<BITS>(qb, j + 16 * u, lo[u], hi[u]);
      for (int t = 0; t < NB; ++t) {
        const float* xr = xb + t * in + j;
        for (int u = 0; u < U; ++u) {
          acc[t][2 * u] = _mm256_fmadd_ps(lo[u], _mm256_loadu_ps(xr + 16 * u), acc[t][2 * u]);
          acc[t][2 * u + 1] = _mm256_fmadd_ps(hi[u], _mm256_loadu_ps(xr + 16 * u + 8), acc[t][2 * u + 1]);
        }
      }
    }
    for (; j + 16 <= c1; j += 16) {
      __m256 lo, hi;
      unpack16<BITS>(qb, j, lo, hi);
      for (int t = 0; t < NB; ++t) {
        acc[t][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xb + t * in + j), acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xb + t * in + j + 8), acc[t][1]);
      }
    }
    float tail[NB];
    for (int t = 0; t < NB; ++t) tail[t] = 0.0f;
    for (int64_t k = j; k < c1; ++k) {
      const float q = static_cast<float>(code_at(qb, k, BITS));
      for (int t = 0; t < NB; ++t) tail[t] += q * xb[t * in + k];
    }
    const float s = sc[g], m = -s * static_cast<float>(zp[g]);
    const __m256 sv = _mm256_set1_ps(s);
    for (int t = 0; t < NB; ++t) {
      __m256 a = acc[t][0];
      for (int u = 1; u < 2 * U; ++u) a = _mm256_add_ps(a, acc[t][u]);
      yacc[t] = _mm256_fmadd_ps(sv, a, yacc[t]);
      ysc[t] += s * tail[t] + m * xs[t * ngroups + g];
    }
  }
  for (int t = 0; t < NB; ++t) res[t] = hsum256(yacc[t]) + ysc[t];
}

using RowFn = void (*)(const uint8_t*, const float*, const uint8_t*, const float*, const float*, int64_t, int64_t,
                       int64_t, float*);

// U: chunks in flight; 1-2 rows of x need more independent FMA chains than 3+ rows.
#define LMSQ_ROW_TABLE(FN, BITS)                                                                      \
  {FN<1, 4, BITS>, FN<2, 2, BITS>, FN<3, 1, BITS>, FN<4, 1, BITS>, FN<5, 1, BITS>, FN<6, 1, BITS>, \
   FN<7, 1, BITS>, FN<8, 1, BITS>}

RowFn pick_row(Isa isa, int bits, int nb) {
  static const RowFn a512_4[kTile] = LMSQ_ROW_TABLE(row_avx512, 4);
  static const RowFn a512_8[kTile] = LMSQ_ROW_TABLE(row_avx512, 8);
  // AVX2: 16 registers; tiles of at most 4 rows, 2 chunks in flight for 1-2 rows (acc + lo/hi fit)
  static const RowFn a2_4[4] = {row_avx2<1, 2, 4>, row_avx2<2, 1, 4>, row_avx2<3, 1, 4>, row_avx2<4, 1, 4>};
  static const RowFn a2_8[4] = {row_avx2<1, 2, 8>, row_avx2<2, 1, 8>, row_avx2<3, 1, 8>, row_avx2<4, 1, 8>};
  if (isa == kAvx512) return (bits == 4 ? a512_4 : a512_8)[nb - 1];
  return (bits == 4 ? a2_4 : a2_8)[nb - 1];
}

// ---- 2:4 + 4-bit, AVX-512: 64 columns a chunk ---------------------------------------------------
// One 64-column chunk at column jj: 32 kept values (16 bytes of codes) against NB rows of x, into acc[t][2u], acc[t][2u+1].
template <int NB, int W>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void s24_chunk(
    const uint8_t* __restrict__ qb,   // [in/4] codes of one output row's kept values
    const uint16_t* __restrict__ mw,  // [in/16] meta words
    const float* __restrict__ xb,     // [NB, in] kernel order
    int64_t in, int64_t jj, int u, __m512i zv, __m512 (&acc)[NB][W]) {
  // lane l (group l of the chunk): its 4 meta bits sit in dword l / 8 of the chunk's 64 meta bits, at 4 * (l % 8)
  const __m512i dword_of = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i shift = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + jj / 4)));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(d, _mm512_set1_epi32(15)), zv));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(d, 4), zv));
  uint64_t m64;
  std::memcpy(&m64, mw + jj / 16, 8);
  const __m512i nib = _mm512_srlv_epi32(
      _mm512_permutexvar_epi32(dword_of, _mm512_set1_epi64(static_cast<long long>(m64))), shift);
  // i0 = bits 0-1 (0..2), i1 = bits 2-3 (1..3) of each group's nibble
  const __mmask16 a0 = _mm512_test_epi32_mask(nib, _mm512_set1_epi32(1));
  const __mmask16 a1 = _mm512_test_epi32_mask(nib, _mm512_set1_epi32(2));
  const __mmask16 b0 = _mm512_test_epi32_mask(nib, _mm512_set1_epi32(4));
  const __mmask16 b1 = _mm512_test_epi32_mask(nib, _mm512_set1_epi32(8));
  for (int t = 0; t < NB; ++t) {
    const float* xr = xb + t * in + jj;
    const __m512 x0 = _mm512_loadu_ps(xr), x1 = _mm512_loadu_ps(xr + 16), x2 = _mm512_loadu_ps(xr + 32),
                 x3 = _mm512_loadu_ps(xr + 48);
    const __m512 xl = _mm512_mask_blend_ps(a1, _mm512_mask_blend_ps(a0, x0, x1), x2);
    const __m512 xh = _mm512_mask_blend_ps(b1, x1, _mm512_mask_blend_ps(b0, x2, x3));
    acc[t][2 * u] = _mm512_fmadd_ps(lo, xl, acc[t][2 * u]);
    acc[t][2 * u + 1] = _mm512_fmadd_ps(hi, xh, acc[t][2 * u + 1]);
  }
}

template <int NB, int U>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void row_s24_avx512(
    const uint8_t* __restrict__ qb,   // [in/4] codes of one output row's kept values (2 per byte)
    const uint16_t* __restrict__ mw,  // [in/16] meta words
    const float* __restrict__ sc,     // [ngroups]
    const uint8_t* __restrict__ zp,   // [ngroups]
    const float* __restrict__ xb,     // [NB, in] kernel order: per 64-column chunk x_r[l] = x[4l + r] at 16r + l
    int64_t in, int64_t gs, int64_t ngroups, float* __restrict__ res) {  // res [NB]
  __m512 yacc[NB];
  for (int t = 0; t < NB; ++t) yacc[t] = _mm512_setzero_ps();
  float ysc[NB];
  for (int t = 0; t < NB; ++t) ysc[t] = 0.0f;
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t c0 = g * gs, c1 = std::min(c0 + gs, in);
    // the next output row's codes and meta of this group, one row ahead of the loads
    for (int64_t p = c0 / 4; p < c1 / 4; p += 64) _mm_prefetch(reinterpret_cast<const char*>(qb + in / 4 + p), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(mw + in / 16 + c0 / 16), _MM_HINT_T0);
    const int z = zp[g];
    const __m512i zv = _mm512_set1_epi32(z);
    __m512 acc[NB][2 * U];
    for (int t = 0; t < NB; ++t)
      for (int u = 0; u < 2 * U; ++u) acc[t][u] = _mm512_setzero_ps();
    int64_t j = c0;
    for (; j + 64 * U <= c1; j += 64 * U)
      for (int u = 0; u < U; ++u) s24_chunk<NB, 2 * U>(qb, mw, xb, in, j + 64 * u, u, zv, acc);
    for (; j + 64 <= c1; j += 64) s24_chunk<NB, 2 * U>(qb, mw, xb, in, j, 0, zv, acc);
    float tail[NB];
    for (int t = 0; t < NB; ++t) tail[t] = 0.0f;
    for (int64_t k = j; k < c1; k += 4) {  // whole groups of 4 (c1 - j is a multiple of 16)
      const int64_t grp = k / 4;
      const unsigned code = (mw[grp / 4] >> (4 * (grp % 4))) & 15u;
      const float q0 = static_cast<float>(code_at(qb, 2 * grp, 4) - z);
      const float q1 = static_cast<float>(code_at(qb, 2 * grp + 1, 4) - z);
      for (int t = 0; t < NB; ++t) tail[t] += q0 * xb[t * in + k + (code & 3u)] + q1 * xb[t * in + k + (code >> 2)];
    }
    const float s = sc[g];
    const __m512 sv = _mm512_set1_ps(s);
    for (int t = 0; t < NB; ++t) {
      __m512 a = acc[t][0];
      for (int u = 1; u < 2 * U; ++u) a = _mm512_add_ps(a, acc[t][u]);
      yacc[t] = _mm512_fmadd_ps(sv, a, yacc[t]);
      ysc[t] += s * tail[t];
    }
  }
  for (int t = 0; t < NB; ++t) res[t] = _mm512_reduce_add_ps(yacc[t]) + ysc[t];
}

using S24RowFn = void (*)(const uint8_t*, const uint16_t*, const float*, const uint8_t*, const float*, int64_t,
                          int64_t, int64_t, float*);

S24RowFn pick_s24_row(int nb) {
  static const S24RowFn table[kTile] = {row_s24_avx512<1, 2>, row_s24_avx512<2, 1>, row_s24_avx512<3, 1>,
                                        row_s24_avx512<4, 1>, row_s24_avx512<5, 1>, row_s24_avx512<6, 1>,
                                        row_s24_avx512<7, 1>, row_s24_avx512<8, 1>};
  return table[nb - 1];
}

// ---- 2:4 + 4-bit, AVX2: 32 columns a chunk (8 groups, 16 kept values = 8 bytes, 2 meta words) --------
template <int NB>
__attribute__((target("avx2,fma"), always_inline)) inline void s24_chunk_avx2(
    const uint8_t* __restrict__ qb,   // [in/4] codes of one output row's kept values
    const uint16_t* __restrict__ mw,  // [in/16] meta words
    const float* __restrict__ xb,     // [NB, in] kernel order: per 32-column chunk x_r[l] = x[4l + r] at 8r + l
    int64_t in, int64_t jj, __m256i zv, __m256 (&acc)[NB][2]) {
  const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + jj / 4)));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(d, _mm256_set1_epi32(15)), zv));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(d, 4), zv));
  uint32_t m32;
  std::memcpy(&m32, mw + jj / 16, 4);
  const __m256i nib = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(m32)),
                                        _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
  // blendv reads the sign bit: move each meta bit there (i0: bits 0-1, i1: bits 2-3 of the nibble)
  const __m256 a0 = _mm256_castsi256_ps(_mm256_slli_epi32(nib, 31)), a1 = _mm256_castsi256_ps(_mm256_slli_epi32(nib, 30));
  const __m256 b0 = _mm256_castsi256_ps(_mm256_slli_epi32(nib, 29)), b1 = _mm256_castsi256_ps(_mm256_slli_epi32(nib, 28));
  for (int t = 0; t < NB; ++t) {
    const float* xr = xb + t * in + jj;
    const __m256 x0 = _mm256_loadu_ps(xr), x1 = _mm256_loadu_ps(xr + 8), x2 = _mm256_loadu_ps(xr + 16),
                 x3 = _mm256_loadu_ps(xr + 24);
    const __m256 xl = _mm256_blendv_ps(_mm256_blendv_ps(x0, x1, a0), x2, a1);
    const __m256 xh = _mm256_blendv_ps(x1, _mm256_blendv_ps(x2, x3, b0), b1);
    acc[t][0] = _mm256_fmadd_ps(lo, xl, acc[t][0]);
    acc[t][1] = _mm256_fmadd_ps(hi, xh, acc[t][1]);
  }
}

template <int NB>
__attribute__((target("avx2,fma"))) void row_s24_avx2(
    const uint8_t* __restrict__ qb,   // [in/4]
    const uint16_t* __restrict__ mw,  // [in/16]
    const float* __restrict__ sc,     // [ngroups]
    const uint8_t* __restrict__ zp,   // [ngroups]
    const float* __restrict__ xb,     // [NB, in] kernel order (32-column chunks)
    int64_t in, int64_t gs, int64_t ngroups, float* __restrict__ res) {  // res [NB]
  __m256 yacc[NB];
  float ysc[NB];
  for (int t = 0; t < NB; ++t) yacc[t] = _mm256_setzero_ps(), ysc[t] = 0.0f;
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t c0 = g * gs, c1 = std::min(c0 + gs, in);
    // the next output row's codes and meta of this group, one row ahead of the loads
    for (int64_t p = c0 / 4; p < c1 / 4; p += 64) _mm_prefetch(reinterpret_cast<const char*>(qb + in / 4 + p), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(mw + in / 16 + c0 / 16), _MM_HINT_T0);
    const int z = zp[g];
    const __m256i zv = _mm256_set1_epi32(z);
    __m256 acc[NB][2];
    for (int t = 0; t < NB; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    int64_t j = c0;
    for (; j + 32 <= c1; j += 32) s24_chunk_avx2<NB>(qb, mw, xb, in, j, zv, acc);
    float tail[NB];
    for (int t = 0; t < NB; ++t) tail[t] = 0.0f;
    for (int64_t k = j; k < c1; k += 4) {  // whole groups of 4 (c1 - j is a multiple of 16)
      const int64_t grp = k / 4;
      const unsigned code = (mw[grp / 4] >> (4 * (grp % 4))) & 15u;
      const float q0 = static_cast<float>(code_at(qb, 2 * grp, 4) - z);
      const float q1 = static_cast<float>(code_at(qb, 2 * grp + 1, 4) - z);
      for (int t = 0; t < NB; ++t) tail[t] += q0 * xb[t * in + k + (code & 3u)] + q1 * xb[t * in + k + (code >> 2)];
    }
    const float s = sc[g];
    const __m256 sv = _mm256_set1_ps(s);
    for (int t = 0; t < NB; ++t) {
      yacc[t] = _mm256_fmadd_ps(sv, _mm256_add_ps(acc[t][0], acc[t][1]), yacc[t]);
      ysc[t] += s * tail[t];
    }
  }
  for (int t = 0; t < NB; ++t) res[t] = hsum256(yacc[t]) + ysc[t];
}

S24RowFn pick_s24_row_avx2(int nb) {
  static const S24RowFn table[4] = {row_s24_avx2<1>, row_s24_avx2<2>, row_s24_avx2<3>, row_s24_avx2<4>};
  return table[nb - 1];
}

void row_s24_generic(const uint8_t* __restrict__ qb,   // [in/4]
                     const uint16_t* __restrict__ mw,  // [in/16]
                     const float* __restrict__ sc,     // [ngroups]
                     const uint8_t* __restrict__ zp,   // [ngroups]
                     const float* __restrict__ xb,     // [nb, in] natural order
                     int nb, int64_t in, int64_t gs, int64_t ngroups, float* __restrict__ res) {  // res [nb]
  for (int t = 0; t < nb; ++t) {
    float y = 0.0f;
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t c0 = g * gs, c1 = std::min(c0 + gs, in);
      const int z = zp[g];
      float a = 0.0f;
      for (int64_t k = c0; k < c1; k += 4) {
        const int64_t grp = k / 4;
        const unsigned code = (mw[grp / 4] >> (4 * (grp % 4))) & 15u;
        a += static_cast<float>(code_at(qb, 2 * grp, 4) - z) * xb[t * in + k + (code & 3u)];
        a += static_cast<float>(code_at(qb, 2 * grp + 1, 4) - z) * xb[t * in + k + (code >> 2)];
      }
      y += sc[g] * a;
    }
    res[t] = y;
  }
}

// x for the 2:4 kernel: fp32, per group the whole C-column chunks transposed (x_r[l] = x[4l + r] at (C/4) r + l);
// C = 64 (AVX-512), 32 (AVX2) or 0 (natural order).
template <typename T>
void build_x_s24(const T* __restrict__ x,  // [rows, in], row stride sx
                 int64_t sx, int64_t rows, int64_t in, int64_t gs, int64_t C,
                 float* __restrict__ xb) {  // [rows, in]
  const int64_t ngroups = (in + gs - 1) / gs;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t c0 = g * gs, c1 = std::min(c0 + gs, in), full = C ? (c1 - c0) / C * C : 0;
      for (int64_t j = c0; j < c1; ++j) {
        const int64_t u = j - c0;
        const int64_t dst = u < full ? c0 + (u / C) * C + (C / 4) * (u % 4) + (u % C) / 4 : j;
        xb[r * in + dst] = static_cast<float>(x[r * sx + j]);
      }
    }
}

// ---- int8 activations: x quantized per block of 32 columns, 4-bit codes x int8 dot products (AVX2) ----
// x_k ~= d_b * xq_k with d_b = max |x| over block b (32 consecutive columns, in the packed order) / 127 and
// xq_k = round-half-even(x_k / d_b) in [-127, 127]. Then for a group g of row n:
//   sum_k s (q_k - z) xhat_k = s * sum_b d_b * (sum_{k in b} q_k xq_k) - s z xs_g,  xs_g = sum_{b in g} d_b sum xq_k
// and sum q_k xq_k is exact in integers: vpmaddubsw (unsigned codes 0..15 x signed int8, pairs into int16:
// at most 2 * 15 * 127, no saturation) then vpmaddwd by ones (int16 pairs into int32). Per 64 columns and
// row of x that is 2 maddubs + 1 add + 1 madd + 1 cvt + 1 FMA, against 8 cvt + 8 FMA on the fp32 path.
// The only error is x's rounding to int8 (relative 1/254 of a block's largest |x| at most); the reference
// (quant_matmul_ref with act="int8") rounds x the same way, and docs/benchmarks.md gives the error on
// SmolLM2's weights and activations. Needs bits == 4, in and the group size multiples of 64. On AVX-512
// machines the same 256-bit code runs (no VNNI path: no machine here to test one).
//
// Dense kernel order of xq (per 64-column chunk, matching one 32-byte load of codes): the 32 even columns,
// then the 32 odd ones (low and high nibbles). The int32 lane m of a chunk then sums columns [8m, 8m + 8),
// so xd holds d per 8 columns: [d_A x4, d_B x4] for the chunk's two 32-column blocks A, B.
// 2:4 kernel order (per 64-column chunk = 16 groups of 4): x_r[l] = x[4l + r] at 16 r + l, as bytes; the
// kept value of group l is picked among x_0..x_3 by two vpblendvb whose masks come from the meta nibbles;
// int32 lane m (and 4 + m) sums groups 4m..4m+3 = columns [16m, 16m + 16): xd = [d_A, d_A, d_B, d_B] x 2.
// The 2:4 codes are made signed (q - z in [-15, 15]; z cannot be folded into a per-group x sum, as above),
// and vpmaddubsw takes |q - z| with x's sign flipped where q - z < 0 (vpsignb).
constexpr int64_t kXBlock = 32;  // columns of x per int8 scale
constexpr int64_t kI8Chunk = 64;

bool i8_eligible(int64_t bits, int64_t in, int64_t gs) {
  return bits == 4 && in % kI8Chunk == 0 && gs % kI8Chunk == 0 && active_isa() >= kAvx2;
}

// Kernel position of column u (0..63) of a chunk.
inline int64_t i8_slot(int64_t u, bool s24) { return s24 ? 16 * (u % 4) + u / 4 : ((u & 1) ? 32 + u / 2 : u / 2); }

// xq [rows, in] int8 kernel order, xd [rows, in/8] scales per 8 columns (kernel lanes, see above),
// xs [rows, ngroups] (dense only, may be null): per group sum of xhat.
template <typename T>
void build_x_i8(const T* __restrict__ x,          // [rows, in], row stride sx
                int64_t sx,
                const int64_t* __restrict__ perm,  // [in] or nullptr
                int64_t rows, int64_t in, int64_t gs, bool s24,
                int8_t* __restrict__ xq, float* __restrict__ xd, float* __restrict__ xs) {
  const int64_t ngroups = (in + gs - 1) / gs;
  for (int64_t r = 0; r < rows; ++r) {
    if (xs) std::fill(xs + r * ngroups, xs + (r + 1) * ngroups, 0.0f);
    for (int64_t b0 = 0; b0 < in; b0 += kXBlock) {
      float v[kXBlock];
      float amax = 0.0f;
      for (int64_t i = 0; i < kXBlock; ++i) {
        v[i] = static_cast<float>(x[r * sx + (perm ? perm[b0 + i] : b0 + i)]);
        amax = std::max(amax, std::fabs(v[i]));
      }
      const float d = amax / 127.0f;
      int isum = 0;
      const int64_t c = b0 / kI8Chunk * kI8Chunk;
      for (int64_t i = 0; i < kXBlock; ++i) {
        const int q = d > 0.0f ? static_cast<int>(std::nearbyint(std::min(127.0f, std::max(-127.0f, v[i] / d)))) : 0;
        isum += q;
        xq[r * in + c + i8_slot(b0 + i - c, s24)] = static_cast<int8_t>(q);
      }
      float* dd = xd + r * (in / 8) + c / 8;
      const int half = static_cast<int>((b0 - c) / kXBlock);
      if (s24)
        dd[2 * half] = dd[2 * half + 1] = dd[4 + 2 * half] = dd[5 + 2 * half] = d;
      else
        for (int i = 0; i < 4; ++i) dd[4 * half + i] = d;
      if (xs) xs[r * ngroups + b0 / gs] += d * static_cast<float>(isum);
    }
  }
}

template <int NB>
__attribute__((target("avx2,fma"))) void row_i8_avx2(
    const uint8_t* __restrict__ qb,  // [in/2] one output row's codes
    const float* __restrict__ sc,    // [ngroups]
    const uint8_t* __restrict__ zp,  // [ngroups]
    const int8_t* __restrict__ xq,   // [NB, in] dense kernel order
    const float* __restrict__ xd,    // [NB, in/8]
    const float* __restrict__ xs,    // [NB, ngroups]
    int64_t in, int64_t gs, int64_t ngroups, float* __restrict__ res) {  // res [NB]
  const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 yacc[NB];
  float ysc[NB];
  for (int t = 0; t < NB; ++t) yacc[t] = _mm256_setzero_ps(), ysc[t] = 0.0f;
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t c0 = g * gs, c1 = std::min(c0 + gs, in);
    // the next output row's bytes of this group, one row (in / 2 bytes) ahead of the loads
    for (int64_t p = c0 / 2; p < c1 / 2; p += 64) _mm_prefetch(reinterpret_cast<const char*>(qb + in / 2 + p), _MM_HINT_T0);
    __m256 acc[NB];
    for (int t = 0; t < NB; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t j = c0; j < c1; j += kI8Chunk) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + j / 2));
      const __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
      for (int t = 0; t < NB; ++t) {
        const int8_t* xr = xq + t * in + j;
        const __m256i p = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))),
            _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32))));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)),
                                 _mm256_loadu_ps(xd + t * (in / 8) + j / 8), acc[t]);
      }
    }
    const float s = sc[g], m = -s * static_cast<float>(zp[g]);
    const __m256 sv = _mm256_set1_ps(s);
    for (int t = 0; t < NB; ++t) {
      yacc[t] = _mm256_fmadd_ps(sv, acc[t], yacc[t]);
      ysc[t] += m * xs[t * ngroups + g];
    }
  }
  for (int t = 0; t < NB; ++t) res[t] = hsum256(yacc[t]) + ysc[t];
}

template <int NB>
__attribute__((target("avx2,fma"))) void row_s24_i8_avx2(
    const uint8_t* __restrict__ qb,   // [in/4] codes of one output row's kept values
    const uint16_t* __restrict__ mw,  // [in/16] meta words
    const float* __restrict__ sc,     // [ngroups]
    const uint8_t* __restrict__ zp,   // [ngroups]
    const int8_t* __restrict__ xq,    // [NB, in] 2:4 kernel order
    const float* __restrict__ xd,     // [NB, in/8]
    int64_t in, int64_t gs, int64_t ngroups, float* __restrict__ res) {  // res [NB]
  const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  // byte l of each lane <- meta byte l/2 (group l's nibble); the field of the lane's kept position and the
  // values that pick x_1/x_2 (first kept, i0 in 0..2) or x_2/x_3 (second kept, i1 in 1..3)
  const __m256i spread = _mm256_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7,
                                          0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m256i field = _mm256_setr_epi8(3, 0x30, 3, 0x30, 3, 0x30, 3, 0x30, 3, 0x30, 3, 0x30, 3, 0x30, 3, 0x30,
                                         0xC, -64, 0xC, -64, 0xC, -64, 0xC, -64, 0xC, -64, 0xC, -64, 0xC, -64, 0xC, -64);
  const __m256i pick1 = _mm256_setr_epi8(1, 0x10, 1, 0x10, 1, 0x10, 1, 0x10, 1, 0x10, 1, 0x10, 1, 0x10, 1, 0x10,
                                         8, -128, 8, -128, 8, -128, 8, -128, 8, -128, 8, -128, 8, -128, 8, -128);
  const __m256i pick2 = _mm256_setr_epi8(2, 0x20, 2, 0x20, 2, 0x20, 2, 0x20, 2, 0x20, 2, 0x20, 2, 0x20, 2, 0x20,
                                         0xC, -64, 0xC, -64, 0xC, -64, 0xC, -64, 0xC, -64, 0xC, -64, 0xC, -64, 0xC, -64);
  __m256 yacc[NB];
  for (int t = 0; t < NB; ++t) yacc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t c0 = g * gs, c1 = std::min(c0 + gs, in);
    for (int64_t p = c0 / 4; p < c1 / 4; p += 64) _mm_prefetch(reinterpret_cast<const char*>(qb + in / 4 + p), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(mw + in / 16 + c0 / 16), _MM_HINT_T0);
    const __m256i zv = _mm256_set1_epi8(static_cast<char>(zp[g]));
    __m256 acc[NB];
    for (int t = 0; t < NB; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t j = c0; j < c1; j += kI8Chunk) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + j / 4));
      const __m256i w = _mm256_sub_epi8(
          _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(c, 4), c), m4), zv);  // q - z: lane 0 first kept, lane 1 second
      const __m256i aw = _mm256_abs_epi8(w);
      uint64_t m64;
      std::memcpy(&m64, mw + j / 16, 8);
      const __m256i f = _mm256_and_si256(
          _mm256_shuffle_epi8(_mm256_set1_epi64x(static_cast<long long>(m64)), spread), field);
      const __m256i sel1 = _mm256_cmpeq_epi8(f, pick1), sel2 = _mm256_cmpeq_epi8(f, pick2);
      for (int t = 0; t < NB; ++t) {
        const int8_t* xr = xq + t * in + j;
        const __m256i P = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));        // [x_0 | x_1]
        const __m256i Q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16));   // [x_1 | x_2]
        const __m256i R = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32));   // [x_2 | x_3]
        const __m256i xk = _mm256_blendv_epi8(_mm256_blendv_epi8(P, Q, sel1), R, sel2);
        const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xk, w));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)),
                                 _mm256_loadu_ps(xd + t * (in / 8) + j / 8), acc[t]);
      }
    }
    const __m256 sv = _mm256_set1_ps(sc[g]);
    for (int t = 0; t < NB; ++t) yacc[t] = _mm256_fmadd_ps(sv, acc[t], yacc[t]);
  }
  for (int t = 0; t < NB; ++t) res[t] = hsum256(yacc[t]);
}

using I8RowFn = void (*)(const uint8_t*, const float*, const uint8_t*, const int8_t*, const float*, const float*,
                         int64_t, int64_t, int64_t, float*);
using S24I8RowFn = void (*)(const uint8_t*, const uint16_t*, const float*, const uint8_t*, const int8_t*,
                            const float*, int64_t, int64_t, int64_t, float*);
constexpr int kI8Tile = 4;  // rows of x per pass: 4 accumulators + codes + constants fit AVX2's 16 registers

I8RowFn pick_i8_row(int nb) {
  static const I8RowFn table[kI8Tile] = {row_i8_avx2<1>, row_i8_avx2<2>, row_i8_avx2<3>, row_i8_avx2<4>};
  return table[nb - 1];
}

S24I8RowFn pick_s24_i8_row(int nb) {
  static const S24I8RowFn table[kI8Tile] = {row_s24_i8_avx2<1>, row_s24_i8_avx2<2>, row_s24_i8_avx2<3>,
                                            row_s24_i8_avx2<4>};
  return table[nb - 1];
}

// Per-thread scratch for x's kernel forms: grows to the largest call and stays (no allocation per call).
struct XScratch {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};
XScratch& x_scratch(int64_t rows, int64_t in, int64_t ngroups) {
  thread_local XScratch sc;
  if (static_cast<int64_t>(sc.q.size()) < rows * in) sc.q.resize(rows * in);
  if (static_cast<int64_t>(sc.d.size()) < rows * (in / 8)) sc.d.resize(rows * (in / 8));
  if (static_cast<int64_t>(sc.s.size()) < rows * ngroups) sc.s.resize(rows * ngroups);
  return sc;
}

// y [rows, out] in x's dtype from the kernel's fp32 results, bias (fp32 or null) added.
inline void store_y(void* y, bool bf16, int64_t idx, float v) {
  if (bf16)
    static_cast<c10::BFloat16*>(y)[idx] = c10::BFloat16(v);
  else
    static_cast<float*>(y)[idx] = v;
}

template <typename F>
void parallel_rows(int64_t out, int64_t work_per_row, F&& body) {
  const int64_t min_rows = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
  const int nthreads = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(omp_get_max_threads(), (out + min_rows - 1) / min_rows)));
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    body(out * t / n, out * (t + 1) / n);
  }
}

// Output rows per dequantized tile: about 4 MiB of fp32 weights, at least 64 rows.
int64_t gemm_tile_rows(int64_t in) { return std::max<int64_t>(64, (int64_t{4} << 20) / (4 * std::max<int64_t>(1, in))); }

torch::Tensor finish(torch::Tensor yf, const torch::Tensor& bias, c10::ScalarType dtype) {
  if (bias.defined()) yf.add_(bias.to(torch::kFloat32));
  return dtype == torch::kFloat32 ? yf : yf.to(dtype);
}

void check_common(const char* op, const torch::Tensor& x, const torch::Tensor& scales, const torch::Tensor& zeros,
                  int64_t out, int64_t ngroups, const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && scales.device().is_cpu() && zeros.device().is_cpu(), op,
              ": every tensor must be on the CPU");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [rows, in], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == out && scales.size(1) == ngroups,
              op, ": scales must be a contiguous float32 [out=", out, ", ngroups=", ngroups, "], got ",
              scales.sizes(), " ", scales.scalar_type());
  TORCH_CHECK(zeros.scalar_type() == torch::kUInt8 && zeros.is_contiguous() && zeros.dim() == 2 &&
                  zeros.size(0) == out && zeros.size(1) == ngroups,
              op, ": zeros must be a contiguous uint8 [out=", out, ", ngroups=", ngroups, "], got ", zeros.sizes(),
              " ", zeros.scalar_type());
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out && bias->device().is_cpu(), op, ": bias must be [", out,
                "] on the CPU, got ", bias->sizes());
}

}  // namespace

torch::Tensor quant_matmul_cpu(const torch::Tensor& x_in, const torch::Tensor& qweight, const torch::Tensor& scales,
                               const torch::Tensor& zeros, const std::optional<torch::Tensor>& perm_in, int64_t in,
                               int64_t bits, int64_t group_size, const std::optional<torch::Tensor>& bias_in,
                               bool act_int8) {
  const char* op = "quant_matmul_cpu";
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(in >= 0 && group_size >= 1, op, ": need in >= 0 and group_size >= 1, got in=", in, ", group_size=",
              group_size);
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == torch::kInt32 && qweight.dim() == 2 &&
                  qweight.is_contiguous(),
              op, ": qweight must be a contiguous int32 [out, ceil(in*bits/32)] CPU tensor");
  const int64_t out = qweight.size(0), words = (in * bits + 31) / 32, ngroups = (in + group_size - 1) / group_size;
  TORCH_CHECK(qweight.size(1) == words, op, ": qweight ", qweight.sizes(), " does not hold ", bits, "-bit codes of ",
              in, " columns: need [out, ", words, "]");
  check_common(op, x_in, scales, zeros, out, ngroups, bias_in);
  TORCH_CHECK(x_in.size(1) == in, op, ": x must be [rows, ", in, "], got ", x_in.sizes());
  torch::Tensor perm;
  if (perm_in.has_value() && perm_in->defined()) {
    perm = perm_in->contiguous();
    TORCH_CHECK(perm.scalar_type() == torch::kInt64 && perm.dim() == 1 && perm.size(0) == in && perm.device().is_cpu(),
                op, ": perm must be int64 [", in, "], got ", perm.sizes(), " ", perm.scalar_type());
    TORCH_CHECK(in == 0 || (perm.min().item<int64_t>() >= 0 && perm.max().item<int64_t>() < in), op,
                ": perm values must lie in [0, ", in, ")");
  }
  torch::Tensor bias = bias_in.has_value() ? *bias_in : torch::Tensor();
  const auto dtype = x_in.scalar_type();
  torch::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t rows = x.size(0);
  const int64_t row_bytes = words * 4;
  const auto* qb = reinterpret_cast<const uint8_t*>(qweight.data_ptr<int32_t>());
  const float* sp = scales.data_ptr<float>();
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  if (rows == 0 || out == 0) return torch::zeros({rows, out}, x.options());

  if (rows > kMaxGemvRows) {
    // dequantized tiles in packed column order; x permuted to match once
    torch::Tensor xp = perm.defined() ? x.index_select(1, perm) : x;
    torch::Tensor y = torch::empty({rows, out}, x.options());
    const int64_t T = gemm_tile_rows(in);
    for (int64_t o0 = 0; o0 < out; o0 += T) {
      const int64_t n = std::min(T, out - o0);
      torch::Tensor Wf = torch::empty({n, in}, x.options().dtype(torch::kFloat32));
      float* wp = Wf.data_ptr<float>();
      parallel_rows(n, in, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = o0 + r;
          const uint8_t* q = qb + o * row_bytes;
          for (int64_t g = 0; g < ngroups; ++g) {
            const int64_t c0 = g * group_size, c1 = std::min(c0 + group_size, in);
            const float s = sp[o * ngroups + g], z = static_cast<float>(zp[o * ngroups + g]);
            for (int64_t k = c0; k < c1; ++k) wp[r * in + k] = s * (static_cast<float>(code_at(q, k, bits)) - z);
          }
        }
      });
      torch::Tensor Wt = dtype == torch::kFloat32 ? Wf : Wf.to(dtype);
      torch::Tensor yt = bias.defined() ? torch::addmm(bias.narrow(0, o0, n).to(dtype), xp, Wt.t())
                                        : torch::mm(xp, Wt.t());
      y.narrow(1, o0, n).copy_(yt);
    }
    return y;
  }

  if (act_int8) {
    TORCH_CHECK(i8_eligible(bits, in, group_size), op, ": int8 activations need 4-bit codes, in and group_size "
                "multiples of 64 and an AVX2 CPU; got bits=", bits, ", in=", in, ", group_size=", group_size,
                ", isa=", isa_name(active_isa()));
    XScratch& xsc = x_scratch(rows, in, ngroups);
    const int64_t* pp = perm.defined() ? perm.data_ptr<int64_t>() : nullptr;
    if (dtype == torch::kFloat32)
      build_x_i8(x.data_ptr<float>(), x.stride(0), pp, rows, in, group_size, false, xsc.q.data(), xsc.d.data(),
                 xsc.s.data());
    else
      build_x_i8(x.data_ptr<c10::BFloat16>(), x.stride(0), pp, rows, in, group_size, false, xsc.q.data(),
                 xsc.d.data(), xsc.s.data());
    torch::Tensor y = torch::empty({rows, out}, x.options());
    torch::Tensor bf = bias.defined() ? bias.to(torch::kFloat32).contiguous() : torch::Tensor();
    const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
    void* yp = y.data_ptr();
    const bool ybf = dtype == torch::kBFloat16;
    parallel_rows(out, rows * in, [&](int64_t o0, int64_t o1) {
      float res[kI8Tile];
      for (int64_t o = o0; o < o1; ++o) {
        for (int64_t b = 0; b < rows; b += kI8Tile) {
          const int nb = static_cast<int>(std::min<int64_t>(kI8Tile, rows - b));
          pick_i8_row(nb)(qb + o * row_bytes, sp + o * ngroups, zp + o * ngroups, xsc.q.data() + b * in,
                          xsc.d.data() + b * (in / 8), xsc.s.data() + b * ngroups, in, group_size, ngroups, res);
          for (int t = 0; t < nb; ++t) store_y(yp, ybf, (b + t) * out + o, res[t] + (bp ? bp[o] : 0.0f));
        }
      }
    });
    return y;
  }

  Isa isa = active_isa();
  if (bits == 4 && group_size % 2 != 0) isa = kGeneric;  // vector chunks must start on a byte
  const int64_t C = isa == kAvx512 ? 32 : isa == kAvx2 ? 16 : 1;
  torch::Tensor xb = torch::empty({rows, in}, x.options().dtype(torch::kFloat32));
  torch::Tensor xs = torch::empty({rows, ngroups}, x.options().dtype(torch::kFloat32));
  const int64_t* pp = perm.defined() ? perm.data_ptr<int64_t>() : nullptr;
  if (dtype == torch::kFloat32)
    build_x(x.data_ptr<float>(), x.stride(0), pp, rows, in, group_size, C, bits, xb.data_ptr<float>(),
            xs.data_ptr<float>());
  else
    build_x(x.data_ptr<c10::BFloat16>(), x.stride(0), pp, rows, in, group_size, C, bits, xb.data_ptr<float>(),
            xs.data_ptr<float>());
  torch::Tensor yf = torch::empty({rows, out}, x.options().dtype(torch::kFloat32));
  const float* xbp = xb.data_ptr<float>();
  const float* xsp = xs.data_ptr<float>();
  float* yp = yf.data_ptr<float>();
  const int tile = isa == kAvx512 ? kTile : 4;  // AVX2 has 16 vector registers
  parallel_rows(out, rows * in, [&](int64_t o0, int64_t o1) {
    float res[kTile];
    for (int64_t o = o0; o < o1; ++o) {
      const uint8_t* q = qb + o * row_bytes;
      for (int64_t b = 0; b < rows; b += tile) {
        const int nb = static_cast<int>(std::min<int64_t>(tile, rows - b));
        if (isa == kGeneric)
          row_generic(q, sp + o * ngroups, zp + o * ngroups, xbp + b * in, xsp + b * ngroups, nb, in, group_size,
                      ngroups, static_cast<int>(bits), res);
        else
          pick_row(isa, static_cast<int>(bits), nb)(q, sp + o * ngroups, zp + o * ngroups, xbp + b * in,
                                                    xsp + b * ngroups, in, group_size, ngroups, res);
        for (int t = 0; t < nb; ++t) yp[(b + t) * out + o] = res[t];
      }
    }
  });
  return finish(yf, bias, dtype);
}

torch::Tensor sparse24_quant_matmul_cpu(const torch::Tensor& x_in, const torch::Tensor& qvalues,
                                        const torch::Tensor& meta, const torch::Tensor& scales,
                                        const torch::Tensor& zeros, int64_t bits, int64_t group_size,
                                        const std::optional<torch::Tensor>& bias_in, bool act_int8) {
  const char* op = "sparse24_quant_matmul_cpu";
  TORCH_CHECK(bits == 4, op, ": only 4-bit codes are supported, got bits=", bits);
  TORCH_CHECK(qvalues.device().is_cpu() && qvalues.scalar_type() == torch::kInt32 && qvalues.dim() == 2 &&
                  qvalues.is_contiguous(),
              op, ": qvalues must be a contiguous int32 [out, in/16] CPU tensor");
  TORCH_CHECK(meta.device().is_cpu() && meta.scalar_type() == torch::kInt16 && meta.dim() == 2 && meta.is_contiguous(),
              op, ": meta must be a contiguous int16 [out, in/16] CPU tensor");
  const int64_t out = qvalues.size(0), in = qvalues.size(1) * 16;
  TORCH_CHECK(meta.size(0) == out && meta.size(1) == in / 16, op, ": qvalues ", qvalues.sizes(), " and meta ",
              meta.sizes(), " must both be [out, in/16]");
  TORCH_CHECK(group_size >= 16 && group_size % 16 == 0, op, ": group_size must be a positive multiple of 16, got ",
              group_size);
  const int64_t ngroups = (in + group_size - 1) / group_size;
  check_common(op, x_in, scales, zeros, out, ngroups, bias_in);
  TORCH_CHECK(x_in.size(1) == in, op, ": x must be [rows, ", in, "], got ", x_in.sizes());
  torch::Tensor bias = bias_in.has_value() ? *bias_in : torch::Tensor();
  const auto dtype = x_in.scalar_type();
  torch::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t rows = x.size(0);
  if (rows == 0 || out == 0) return torch::zeros({rows, out}, x.options());
  const auto* qb = reinterpret_cast<const uint8_t*>(qvalues.data_ptr<int32_t>());
  const auto* mp = reinterpret_cast<const uint16_t*>(meta.data_ptr<int16_t>());
  const float* sp = scales.data_ptr<float>();
  const uint8_t* zp = zeros.data_ptr<uint8_t>();

  if (rows > kMaxGemvRows) {
    torch::Tensor y = torch::empty({rows, out}, x.options());
    const int64_t T = gemm_tile_rows(in);
    for (int64_t o0 = 0; o0 < out; o0 += T) {
      const int64_t n = std::min(T, out - o0);
      torch::Tensor Wf = torch::zeros({n, in}, x.options().dtype(torch::kFloat32));
      float* wp = Wf.data_ptr<float>();
      parallel_rows(n, in, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = o0 + r;
          const uint8_t* q = qb + o * (in / 4);
          const uint16_t* m = mp + o * (in / 16);
          for (int64_t grp = 0; grp < in / 4; ++grp) {
            const int64_t g = 4 * grp / group_size;
            const float s = sp[o * ngroups + g], z = static_cast<float>(zp[o * ngroups + g]);
            const unsigned code = (m[grp / 4] >> (4 * (grp % 4))) & 15u;
            wp[r * in + 4 * grp + (code & 3u)] = s * (static_cast<float>(code_at(q, 2 * grp, 4)) - z);
            wp[r * in + 4 * grp + (code >> 2)] = s * (static_cast<float>(code_at(q, 2 * grp + 1, 4)) - z);
          }
        }
      });
      torch::Tensor Wt = dtype == torch::kFloat32 ? Wf : Wf.to(dtype);
      torch::Tensor yt = bias.defined() ? torch::addmm(bias.narrow(0, o0, n).to(dtype), x, Wt.t())
                                        : torch::mm(x, Wt.t());
      y.narrow(1, o0, n).copy_(yt);
    }
    return y;
  }

  if (act_int8) {
    TORCH_CHECK(i8_eligible(bits, in, group_size), op, ": int8 activations need in and group_size multiples of 64 "
                "and an AVX2 CPU; got in=", in, ", group_size=", group_size, ", isa=", isa_name(active_isa()));
    XScratch& xsc = x_scratch(rows, in, 0);
    if (dtype == torch::kFloat32)
      build_x_i8(x.data_ptr<float>(), x.stride(0), nullptr, rows, in, group_size, true, xsc.q.data(), xsc.d.data(),
                 nullptr);
    else
      build_x_i8(x.data_ptr<c10::BFloat16>(), x.stride(0), nullptr, rows, in, group_size, true, xsc.q.data(),
                 xsc.d.data(), nullptr);
    torch::Tensor y = torch::empty({rows, out}, x.options());
    torch::Tensor bf = bias.defined() ? bias.to(torch::kFloat32).contiguous() : torch::Tensor();
    const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
    void* yp = y.data_ptr();
    const bool ybf = dtype == torch::kBFloat16;
    parallel_rows(out, rows * in / 2, [&](int64_t o0, int64_t o1) {
      float res[kI8Tile];
      for (int64_t o = o0; o < o1; ++o) {
        for (int64_t b = 0; b < rows; b += kI8Tile) {
          const int nb = static_cast<int>(std::min<int64_t>(kI8Tile, rows - b));
          pick_s24_i8_row(nb)(qb + o * (in / 4), mp + o * (in / 16), sp + o * ngroups, zp + o * ngroups,
                              xsc.q.data() + b * in, xsc.d.data() + b * (in / 8), in, group_size, ngroups, res);
          for (int t = 0; t < nb; ++t) store_y(yp, ybf, (b + t) * out + o, res[t] + (bp ? bp[o] : 0.0f));
        }
      }
    });
    return y;
  }

  const Isa isa = active_isa();
  const int64_t C = isa == kAvx512 ? 64 : isa == kAvx2 ? 32 : 0;
  const int tile = isa == kAvx512 ? kTile : 4;  // AVX2 has 16 vector registers
  torch::Tensor xb = torch::empty({rows, in}, x.options().dtype(torch::kFloat32));
  if (dtype == torch::kFloat32)
    build_x_s24(x.data_ptr<float>(), x.stride(0), rows, in, group_size, C, xb.data_ptr<float>());
  else
    build_x_s24(x.data_ptr<c10::BFloat16>(), x.stride(0), rows, in, group_size, C, xb.data_ptr<float>());
  torch::Tensor yf = torch::empty({rows, out}, x.options().dtype(torch::kFloat32));
  const float* xbp = xb.data_ptr<float>();
  float* yp = yf.data_ptr<float>();
  parallel_rows(out, rows * in, [&](int64_t o0, int64_t o1) {
    float res[kTile];
    for (int64_t o = o0; o < o1; ++o) {
      const uint8_t* q = qb + o * (in / 4);
      const uint16_t* m = mp + o * (in / 16);
      for (int64_t b = 0; b < rows; b += tile) {
        const int nb = static_cast<int>(std::min<int64_t>(tile, rows - b));
        if (isa == kAvx512)
          pick_s24_row(nb)(q, m, sp + o * ngroups, zp + o * ngroups, xbp + b * in, in, group_size, ngroups, res);
        else if (isa == kAvx2)
          pick_s24_row_avx2(nb)(q, m, sp + o * ngroups, zp + o * ngroups, xbp + b * in, in, group_size, ngroups, res);
        else
          row_s24_generic(q, m, sp + o * ngroups, zp + o * ngroups, xbp + b * in, nb, in, group_size, ngroups, res);
        for (int t = 0; t < nb; ++t) yp[(b + t) * out + o] = res[t];
      }
    }
  });
  return finish(yf, bias, dtype);
}

}  // namespace lmsqueeze
