// Running squared column norms of the layer inputs (what Wanda needs), on the CPU.
//
// Memory-bound: every element of x is read once and costs one FMA, so the kernel is a streaming
// read at the machine's bandwidth. Threads own contiguous row ranges and accumulate into a private
// fp32 row of length d (16 KiB at d = 4096: stays in L1/L2); the partial rows are summed once.
// bf16 -> fp32 is a 16-bit shift and fp16 -> fp32 one vcvtph2ps, so mixed inputs cost nothing extra.
#include <immintrin.h>
#include <omp.h>

#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "ops.h"

namespace lmsqueeze {

namespace {

// ---- generic C++ (any CPU; auto-vectorized with the baseline ISA) --------------------------------
template <typename T>
void accum_sq_generic(const T* __restrict__ row,  // [d]
                      float* __restrict__ acc,    // [d]
                      int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    const float v = static_cast<float>(row[j]);
    acc[j] += v * v;
  }
}

// ---- AVX-512 ------------------------------------------------------------------------------------
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16_f32(const float* p) {
  return _mm512_loadu_ps(p);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16_f32(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16_f32(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void accum_sq_avx512(const T* __restrict__ row,  // [d]
                                                                       float* __restrict__ acc,    // [d]
                                                                       int64_t d) {
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    const __m512 a = load16_f32(row + j);
    const __m512 b = load16_f32(row + j + 16);
    _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(a, a, _mm512_loadu_ps(acc + j)));
    _mm512_storeu_ps(acc + j + 16, _mm512_fmadd_ps(b, b, _mm512_loadu_ps(acc + j + 16)));
  }
  for (; j + 16 <= d; j += 16) {
    const __m512 a = load16_f32(row + j);
    _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(a, a, _mm512_loadu_ps(acc + j)));
  }
  for (; j < d; ++j) {
    const float v = static_cast<float>(row[j]);
    acc[j] += v * v;
  }
}

// ---- AVX2 ---------------------------------------------------------------------------------------
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_f32(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_f32(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) void accum_sq_avx2(const T* __restrict__ row,  // [d]
                                                          float* __restrict__ acc,    // [d]
                                                          int64_t d) {
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const __m256 a = load8_f32(row + j);
    _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(a, a, _mm256_loadu_ps(acc + j)));
  }
  for (; j < d; ++j) {
    const float v = static_cast<float>(row[j]);
    acc[j] += v * v;
  }
}

template <typename T>
void col_sq_norm_impl(float* __restrict__ s,            // [d]
                      const T* __restrict__ x,          // [rows, d], row stride `stride`
                      const bool* __restrict__ mask,    // [rows] or nullptr
                      int64_t rows, int64_t d, int64_t stride, int64_t n, int64_t m) {
  const Isa isa = active_isa();
  auto accum = isa == kAvx512 ? accum_sq_avx512<T> : (isa == kAvx2 ? accum_sq_avx2<T> : accum_sq_generic<T>);
  const int nthreads = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>((rows + 63) / 64)));
  std::vector<float> partial(static_cast<size_t>(nthreads) * d, 0.0f);  // [nthreads, d]
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num();
    float* acc = partial.data() + static_cast<int64_t>(t) * d;
    const int64_t lo = rows * t / nthreads, hi = rows * (t + 1) / nthreads;
    for (int64_t r = lo; r < hi; ++r) {
      if (mask != nullptr && !mask[r]) continue;
      accum(x + r * stride, acc, d);
    }
  }
  // The old mean keeps weight n/(n+m); the new sum enters with 1/(n+m). Folded into one pass.
  const float keep = static_cast<float>(static_cast<double>(n) / static_cast<double>(n + m));
  const float add = static_cast<float>(1.0 / static_cast<double>(n + m));
  for (int64_t j = 0; j < d; ++j) {
    float total = 0.0f;
    for (int t = 0; t < nthreads; ++t) total += partial[static_cast<int64_t>(t) * d + j];
    s[j] = s[j] * keep + total * add;
  }
}

}  // namespace

int64_t col_sq_norm_update_cpu(torch::Tensor s, const torch::Tensor& x_in, int64_t nsamples,
                               const std::optional<torch::Tensor>& mask_in) {
  TORCH_CHECK(s.device().is_cpu() && x_in.device().is_cpu(), "col_sq_norm_update_cpu: s and x must be CPU tensors");
  TORCH_CHECK(s.scalar_type() == torch::kFloat32, "col_sq_norm_update_cpu: s must be float32, got ", s.scalar_type());
  TORCH_CHECK(s.dim() == 1 && s.is_contiguous(), "col_sq_norm_update_cpu: s must be a contiguous 1-D tensor");
  TORCH_CHECK(x_in.dim() >= 1, "col_sq_norm_update_cpu: x must have at least one dimension");
  TORCH_CHECK(nsamples >= 0, "col_sq_norm_update_cpu: nsamples must be >= 0, got ", nsamples);
  const int64_t d = x_in.size(-1);
  TORCH_CHECK(s.size(0) == d, "col_sq_norm_update_cpu: s has ", s.size(0), " entries but x has ", d, " columns");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kHalf,
              "col_sq_norm_update_cpu: x must be float32, bfloat16 or float16, got ", dtype);
  torch::Tensor x = x_in.reshape({-1, d});
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t rows = x.size(0);
  torch::Tensor mask;
  int64_t m = rows;
  if (mask_in.has_value() && mask_in->defined()) {
    TORCH_CHECK(mask_in->numel() == rows, "col_sq_norm_update_cpu: mask has ", mask_in->numel(),
                " entries but x has ", rows, " rows");
    mask = mask_in->reshape({-1}).to(torch::kBool).contiguous();
    m = mask.sum().item<int64_t>();
  }
  if (m == 0) return nsamples;
  const bool* mptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  switch (dtype) {
    case torch::kFloat32:
      col_sq_norm_impl<float>(s.data_ptr<float>(), x.data_ptr<float>(), mptr, rows, d, x.stride(0), nsamples, m);
      break;
    case torch::kBFloat16:
      col_sq_norm_impl<c10::BFloat16>(s.data_ptr<float>(), x.data_ptr<c10::BFloat16>(), mptr, rows, d, x.stride(0),
                                      nsamples, m);
      break;
    default:
      col_sq_norm_impl<c10::Half>(s.data_ptr<float>(), x.data_ptr<c10::Half>(), mptr, rows, d, x.stride(0), nsamples,
                                  m);
  }
  return nsamples + m;
}

}  // namespace lmsqueeze
