// y = x @ W.T + bias for a 2:4 weight W in the compressed format of lmsqueeze/kernels/sparse24.py:
// values [out, in/2] (the kept pair of every group of 4 along `in`), meta [out, in/16] int16
// (4 bits per group: i0 in bits 0-1, i1 in bits 2-3; group 4w + k of word w at bits 4k..4k+3).
//
// Decode (1 to 16 rows of x) is memory-bound: a dense bf16 GEMV reads 2 bytes per weight, this
// kernel 1 (value) + 1/8 (meta), so at the same bandwidth it is up to 1.78x faster. The work per
// weight must stay small enough to keep up with the memory:
//
// AVX-512-BF16, per 64 input columns of one output row (16 groups, 32 kept values, 4 meta words):
//   idx  = 4 * (l / 2) + ((meta_word[l / 8] >> 2 * (l % 8)) & 3)   for the 32 16-bit lanes l
//          (vpermw to spread the words, vpsrlvw, vpand, vpaddw: 4 instructions, once per chunk)
//   xs_b = vpermt2w(x_b[0:32], idx, x_b[32:64])     the x values that meet the kept weights
//   acc_b = vdpbf16ps(acc_b, values, xs_b)           32 products, exact in fp32, fp32 sums
// x is small (a few KiB) and stays in L1; the decoded idx is reused by every row of x in a tile.
// fp32 on AVX-512 does the same on 32-column chunks with vpermt2ps and FMA. AVX2 (and bf16 on
// AVX-512 without the BF16 extension) converts x to fp32 once and gathers it with vgatherdps;
// generic C++ covers everything else and the column tails (in % 64 or in % 32).
//
// Tried and dropped: for 4+ rows of x, expanding each row of W to dense bf16 in L1 once and using two
// plain vdpbf16ps per 64 columns (no vpermt2w) ran slower here (4096x11008, one thread: 4 rows
// 10.0 ms vs 7.8 ms, 16 rows 25.7 ms vs 18.9 ms); the dot products, not the permutes, bound it.
//
// Threads split the output rows (static, contiguous ranges), so each streams its own slab of values
// and meta once; batches larger than a tile re-read a row's compressed weights from L1.
#include <immintrin.h>
#include <omp.h>

#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "ops.h"

namespace lmsqueeze {

namespace {

constexpr int kTile = 4;  // rows of x sharing one decode; 2 chunks x 4 accumulators fit the 32 zmm registers

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }

// Scalar dot of one output row's kept values over columns [c0, in) against one fp32 row of x.
template <typename T>
float dot_tail(const T* __restrict__ vals,        // [in/2] one output row
               const uint16_t* __restrict__ meta,  // [in/16]
               const float* __restrict__ x,        // [in]
               int64_t c0, int64_t in) {
  float s = 0.0f;
  for (int64_t g = c0 / 4; g < in / 4; ++g) {
    const unsigned code = (meta[g / 4] >> (4 * (g % 4))) & 15u;
    s += to_f32(vals[2 * g]) * x[4 * g + (code & 3u)];
    s += to_f32(vals[2 * g + 1]) * x[4 * g + (code >> 2)];
  }
  return s;
}

template <typename T>
void store_row(T* __restrict__ y, int64_t out, int64_t o, int64_t b, float v) {
  y[b * out + o] = static_cast<T>(v);
}

// ---- generic C++ --------------------------------------------------------------------------------
template <typename T>
void rows_generic(const T* __restrict__ vals,        // [out, in/2]
                  const uint16_t* __restrict__ meta,  // [out, in/16]
                  const float* __restrict__ xf,       // [rows, in] fp32
                  const T* __restrict__ bias,         // [out] or nullptr
                  T* __restrict__ y,                  // [rows, out]
                  int64_t o0, int64_t o1, int64_t rows, int64_t in, int64_t out) {
  for (int64_t o = o0; o < o1; ++o) {
    const T* v = vals + o * (in / 2);
    const uint16_t* m = meta + o * (in / 16);
    const float b0 = bias ? to_f32(bias[o]) : 0.0f;
    for (int64_t b = 0; b < rows; ++b) store_row(y, out, o, b, b0 + dot_tail(v, m, xf + b * in, 0, in));
  }
}

// ---- AVX2 (+ FMA): fp32 x, gathered ---------------------------------------------------------------
__attribute__((target("avx2,fma"))) inline __m256 load8_vals(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8_vals(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const T* __restrict__ vals,        // [out, in/2]
                                                   const uint16_t* __restrict__ meta,  // [out, in/16]
                                                   const float* __restrict__ xf,       // [rows, in] fp32
                                                   const T* __restrict__ bias,         // [out] or nullptr
                                                   T* __restrict__ y,                  // [rows, out]
                                                   int64_t o0, int64_t o1, int64_t rows, int64_t in,
                                                   int64_t out) {
  // 16 columns = 4 groups = 8 kept values = one meta word; lane l: 4 * (l / 2) + ((m >> 2l) & 3)
  const __m256i shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3);
  const int64_t words = in / 16;
  for (int64_t o = o0; o < o1; ++o) {
    const T* v = vals + o * (in / 2);
    const uint16_t* m = meta + o * words;
    const float b0 = bias ? to_f32(bias[o]) : 0.0f;
    for (int64_t b = 0; b < rows; b += kTile) {
      const int nb = static_cast<int>(rows - b < kTile ? rows - b : kTile);
      __m256 acc[kTile];
      for (int t = 0; t < kTile; ++t) acc[t] = _mm256_setzero_ps();
      for (int64_t w = 0; w < words; ++w) {
        const __m256i idx = _mm256_add_epi32(
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(m[w]), shift), three), base);
        const __m256 vv = load8_vals(v + 8 * w);
        for (int t = 0; t < nb; ++t) {
          const __m256 xs = _mm256_i32gather_ps(xf + (b + t) * in + 16 * w, idx, 4);
          acc[t] = _mm256_fmadd_ps(vv, xs, acc[t]);
        }
      }
      for (int t = 0; t < nb; ++t) store_row(y, out, o, b + t, b0 + hsum256(acc[t]));
    }
  }
}

// ---- AVX-512 fp32: 32 columns per chunk, x permuted in registers ----------------------------------
__attribute__((target("avx512f,avx512bw,avx512vl"))) void rows_avx512_f32(
    const float* __restrict__ vals,     // [out, in/2]
    const uint16_t* __restrict__ meta,  // [out, in/16]
    const float* __restrict__ x,        // [rows, in], row stride sx
    const float* __restrict__ bias,     // [out] or nullptr
    float* __restrict__ y,              // [rows, out]
    int64_t o0, int64_t o1, int64_t rows, int64_t in, int64_t sx, int64_t out) {
  // lane l (0..15) of a 32-column chunk: group l / 2, word l / 8 of the 2 words broadcast as one dword
  const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  const int64_t chunks = in / 32;
  for (int64_t o = o0; o < o1; ++o) {
    const float* v = vals + o * (in / 2);
    const uint16_t* m = meta + o * (in / 16);
    const float b0 = bias ? bias[o] : 0.0f;
    for (int64_t b = 0; b < rows; b += kTile) {
      const int nb = static_cast<int>(rows - b < kTile ? rows - b : kTile);
      __m512 acc[kTile];
      for (int t = 0; t < kTile; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        uint32_t m32;
        std::memcpy(&m32, m + 2 * c, 4);
        const __m512i idx = _mm512_add_epi32(
            _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(m32)), shift), three), base);
        const __m512 vv = _mm512_loadu_ps(v + 16 * c);
        for (int t = 0; t < nb; ++t) {
          const float* xr = x + (b + t) * sx + 32 * c;
          const __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(xr), idx, _mm512_loadu_ps(xr + 16));
          acc[t] = _mm512_fmadd_ps(vv, xs, acc[t]);
        }
      }
      for (int t = 0; t < nb; ++t) {
        const float tail = dot_tail(v, m, x + (b + t) * sx, 32 * chunks, in);
        y[(b + t) * out + o] = b0 + _mm512_reduce_add_ps(acc[t]) + tail;
      }
    }
  }
}

// ---- AVX-512-BF16: 64 columns per chunk, vpermt2w + vdpbf16ps -----------------------------------
// The 32 x positions (0..63) that meet the 32 kept values of 64-column chunk c.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i decode_bf16(
    const uint16_t* __restrict__ m,  // [in/16]
    int64_t c, __m512i word_of, __m512i shift, __m512i base, __m512i three) {
  uint64_t m64;
  std::memcpy(&m64, m + 4 * c, 8);
  const __m512i w = _mm512_permutexvar_epi16(word_of, _mm512_set1_epi64(static_cast<long long>(m64)));
  return _mm512_add_epi16(_mm512_and_si512(_mm512_srlv_epi16(w, shift), three), base);
}

template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void tile_bf16(
    const uint16_t* __restrict__ v,  // [in/2] one output row (bf16 bits)
    const uint16_t* __restrict__ m,  // [in/16]
    const uint16_t* __restrict__ x,  // [NB, in] (bf16 bits), row stride sx
    int64_t in, int64_t sx, float* __restrict__ sums) {  // sums: [NB]
  // lane l (0..31): group l / 2 of the chunk, meta word l / 8, 2 bits at 2 * (l % 8)
  const __m512i word_of = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                           1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i shift = _mm512_set_epi16(14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0,
                                         14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i base = _mm512_set_epi16(60, 60, 56, 56, 52, 52, 48, 48, 44, 44, 40, 40, 36, 36, 32, 32,
                                        28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  const __m512i three = _mm512_set1_epi16(3);
  __m512 acc0[NB], acc1[NB];  // two chunks in flight: the dpbf16 latency is hidden by the second chain
  for (int t = 0; t < NB; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  const int64_t chunks = in / 64;
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2) {
    const __m512i idx0 = decode_bf16(m, c, word_of, shift, base, three), idx1 = decode_bf16(m, c + 1, word_of, shift, base, three);
    const __m512i v0 = _mm512_loadu_si512(v + 32 * c), v1 = _mm512_loadu_si512(v + 32 * c + 32);
    for (int t = 0; t < NB; ++t) {
      const uint16_t* xr = x + t * sx + 64 * c;
      const __m512i xs0 = _mm512_permutex2var_epi16(_mm512_loadu_si512(xr), idx0, _mm512_loadu_si512(xr + 32));
      const __m512i xs1 =
          _mm512_permutex2var_epi16(_mm512_loadu_si512(xr + 64), idx1, _mm512_loadu_si512(xr + 96));
      acc0[t] = _mm512_dpbf16_ps(acc0[t], (__m512bh)v0, (__m512bh)xs0);
      acc1[t] = _mm512_dpbf16_ps(acc1[t], (__m512bh)v1, (__m512bh)xs1);
    }
  }
  for (; c < chunks; ++c) {
    const __m512i idx0 = decode_bf16(m, c, word_of, shift, base, three);
    const __m512i v0 = _mm512_loadu_si512(v + 32 * c);
    for (int t = 0; t < NB; ++t) {
      const uint16_t* xr = x + t * sx + 64 * c;
      const __m512i xs0 = _mm512_permutex2var_epi16(_mm512_loadu_si512(xr), idx0, _mm512_loadu_si512(xr + 32));
      acc0[t] = _mm512_dpbf16_ps(acc0[t], (__m512bh)v0, (__m512bh)xs0);
    }
  }
  for (int t = 0; t < NB; ++t) sums[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
}

inline float bf16_bits_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void rows_avx512_bf16(
    const c10::BFloat16* __restrict__ vals,  // [out, in/2]
    const uint16_t* __restrict__ meta,       // [out, in/16]
    const c10::BFloat16* __restrict__ x,     // [rows, in], row stride sx
    const c10::BFloat16* __restrict__ bias,  // [out] or nullptr
    c10::BFloat16* __restrict__ y,           // [rows, out]
    int64_t o0, int64_t o1, int64_t rows, int64_t in, int64_t sx, int64_t out) {
  const int64_t chunks = in / 64;
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x);
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* v = reinterpret_cast<const uint16_t*>(vals) + o * (in / 2);
    const uint16_t* m = meta + o * (in / 16);
    const float b0 = bias ? static_cast<float>(bias[o]) : 0.0f;
    for (int64_t b = 0; b < rows; b += kTile) {
      const int nb = static_cast<int>(rows - b < kTile ? rows - b : kTile);
      float sums[kTile];
      const uint16_t* xt = xb + b * sx;
      switch (nb) {
        case 4: tile_bf16<4>(v, m, xt, in, sx, sums); break;
        case 3: tile_bf16<3>(v, m, xt, in, sx, sums); break;
        case 2: tile_bf16<2>(v, m, xt, in, sx, sums); break;
        default: tile_bf16<1>(v, m, xt, in, sx, sums);
      }
      for (int t = 0; t < nb; ++t) {
        float tail = 0.0f;  // columns past the last full 64 (in % 64 is 16, 32 or 48)
        for (int64_t g = chunks * 16; g < in / 4; ++g) {
          const unsigned code = (m[g / 4] >> (4 * (g % 4))) & 15u;
          const uint16_t* xr = xt + t * sx + 4 * g;
          tail += bf16_bits_to_f32(v[2 * g]) * bf16_bits_to_f32(xr[code & 3u]);
          tail += bf16_bits_to_f32(v[2 * g + 1]) * bf16_bits_to_f32(xr[code >> 2]);
        }
        y[(b + t) * out + o] = static_cast<c10::BFloat16>(b0 + sums[t] + tail);
      }
    }
  }
}

// Output rows per thread block: contiguous slabs so each thread streams its own part of the weight.
template <typename F>
void parallel_rows(int64_t out, int64_t work_per_row, F&& body) {
  const int64_t min_rows = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(),
                                                                                 (out + min_rows - 1) / min_rows)));
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    body(out * t / n, out * (t + 1) / n);
  }
}

}  // namespace

torch::Tensor sparse24_matmul_cpu(const torch::Tensor& x_in, const torch::Tensor& values, const torch::Tensor& meta,
                                  const std::optional<torch::Tensor>& bias_in) {
  TORCH_CHECK(x_in.device().is_cpu() && values.device().is_cpu() && meta.device().is_cpu(),
              "sparse24_matmul_cpu: x, values and meta must be CPU tensors");
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(), "sparse24_matmul_cpu: values must be a contiguous [out, in/2]");
  TORCH_CHECK(meta.dim() == 2 && meta.is_contiguous() && meta.scalar_type() == torch::kInt16,
              "sparse24_matmul_cpu: meta must be a contiguous int16 [out, in/16]");
  const int64_t out = values.size(0), in = values.size(1) * 2;
  TORCH_CHECK(in % 16 == 0 && meta.size(0) == out && meta.size(1) == in / 16, "sparse24_matmul_cpu: values ",
              values.sizes(), " and meta ", meta.sizes(), " do not describe a 2:4 weight [out, in] with in % 16 == 0");
  const auto dtype = values.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16,
              "sparse24_matmul_cpu: values must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(x_in.scalar_type() == dtype, "sparse24_matmul_cpu: x is ", x_in.scalar_type(), " but values are ", dtype);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == in, "sparse24_matmul_cpu: x must be [rows, ", in, "], got ",
              x_in.sizes());
  torch::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  torch::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out && bias.scalar_type() == dtype,
                "sparse24_matmul_cpu: bias must be [", out, "] ", dtype);
  }
  const int64_t rows = x.size(0);
  torch::Tensor y = torch::empty({rows, out}, x.options().memory_format(c10::MemoryFormat::Contiguous));
  if (rows == 0 || out == 0) return y;
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(meta.data_ptr<int16_t>());
  const Isa isa = active_isa();
  const int64_t work = rows * in;

  if (dtype == torch::kBFloat16 && isa == kAvx512 && cpu_features().avx512_bf16) {
    const auto* vp = values.data_ptr<c10::BFloat16>();
    const auto* xp = x.data_ptr<c10::BFloat16>();
    const auto* bp = bias.defined() ? bias.data_ptr<c10::BFloat16>() : nullptr;
    auto* yp = y.data_ptr<c10::BFloat16>();
    parallel_rows(out, work, [&](int64_t o0, int64_t o1) {
      rows_avx512_bf16(vp, mp, xp, bp, yp, o0, o1, rows, in, x.stride(0), out);
    });
    return y;
  }
  if (dtype == torch::kFloat32 && isa == kAvx512) {
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    parallel_rows(out, work, [&](int64_t o0, int64_t o1) {
      rows_avx512_f32(values.data_ptr<float>(), mp, x.data_ptr<float>(), bp, y.data_ptr<float>(), o0, o1, rows, in,
                      x.stride(0), out);
    });
    return y;
  }
  // AVX2 and generic read x as dense fp32 rows (converted once; x is small next to the weight).
  torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  const float* xfp = xf.data_ptr<float>();
  auto run = [&](auto* vp, auto* bp, auto* yp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(vp)>>;
    parallel_rows(out, work, [&](int64_t o0, int64_t o1) {
      if (isa >= kAvx2) rows_avx2<T>(vp, mp, xfp, bp, yp, o0, o1, rows, in, out);
      else rows_generic<T>(vp, mp, xfp, bp, yp, o0, o1, rows, in, out);
    });
  };
  if (dtype == torch::kFloat32) {
    run(values.data_ptr<float>(), bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>());
  } else {
    run(values.data_ptr<c10::BFloat16>(), bias.defined() ? bias.data_ptr<c10::BFloat16>() : nullptr,
        y.data_ptr<c10::BFloat16>());
  }
  return y;
}

}  // namespace lmsqueeze
