// The blocked OBS sweep of SparseGPT / GPTQ on the CPU (contract: lmsqueeze/kernels/obs.py).
//
// Per block of columns [i1, i2):
//   1. unstructured pruning only: the block's saliency w^2 / Hinv[j, j]^2 for every (row, column),
//      the k smallest (ties: lower row-major index first, what a stable sort does) are pruned;
//   2. rows are independent for the rest of the block, so OpenMP threads own row ranges and each
//      row sweeps the block's columns while its 4*bs bytes sit in L1: N:M choice every m columns,
//      group scale/zero at a group's first column, q, err = (w - q) / d, and the rank-1 update of
//      the row's remaining block columns with Hinv row i (AVX-512 over j);
//   3. one BLAS call for the trailing columns: W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:].
// Every step rounds as the reference does (product, then difference; IEEE division; round half to
// even), and step 3 is the very same at::matmul the reference calls, so with the same thread count
// W and the mask come out bit-identical to obs_update_ref; only the loss sums differ in summation order.
// Measured on the shared 2-core dev box: the in-block work drops from ~90% of the reference's time
// (about ten small torch ops per column) to a few percent; the trailing GEMM is what is left.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "ops.h"

namespace lmsqueeze {

namespace {

struct Grid {
  int bits = 0;          // 0: no quantization
  int64_t group = -1;    // columns per scale, -1: one group per row
  bool sym = false;
  float maxq = 0.0f;
};

// Scale and zero of the min/max grid over w[0:k], exactly as find_params computes them in fp32.
inline void find_params_row(const float* __restrict__ w,  // [k]
                            int64_t k, const Grid& g, float* scale, float* zero) {
  float xmin = w[0], xmax = w[0];
  for (int64_t j = 1; j < k; ++j) {
    xmin = std::min(xmin, w[j]);
    xmax = std::max(xmax, w[j]);
  }
  xmin = std::min(xmin, 0.0f);
  xmax = std::max(xmax, 0.0f);
  if (g.sym) {
    xmax = std::max(std::fabs(xmin), xmax);
    if (xmin < 0.0f) xmin = -xmax;
  }
  if (xmin == 0.0f && xmax == 0.0f) {
    xmin = -1.0f;
    xmax = 1.0f;
  }
  *scale = (xmax - xmin) / g.maxq;
  *zero = g.sym ? (g.maxq + 1.0f) / 2.0f : std::nearbyint(-xmin / *scale);
}

inline float quantize_one(float w, float scale, float zero, float maxq) {
  float q = std::nearbyint(w / scale) + zero;  // torch.round: half to even, like nearbyint's default mode
  q = std::min(std::max(q, 0.0f), maxq);
  return scale * (q - zero);
}

// row[j] -= err * h[j] for j in [0, n): product rounded, then the difference (the reference's two ops).
// The empty asm statements keep GCC from contracting the pair into one FMA (it does so even for
// intrinsics under -ffp-contract=fast), which would round once and drift from the reference.
void rank1_generic(float* __restrict__ row, const float* __restrict__ h, float err, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float p = err * h[j];
    __asm__("" : "+x"(p));
    row[j] = row[j] - p;
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void rank1_avx512(float* __restrict__ row,
                                                                      const float* __restrict__ h, float err,
                                                                      int64_t n) {
  const __m512 e = _mm512_set1_ps(err);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 p = _mm512_mul_ps(e, _mm512_loadu_ps(h + j));  // no FMA: match the reference's rounding
    __asm__("" : "+v"(p));
    _mm512_storeu_ps(row + j, _mm512_sub_ps(_mm512_loadu_ps(row + j), p));
  }
  if (j < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1u);
    __m512 p = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(k, h + j));
    __asm__("" : "+v"(p));
    _mm512_mask_storeu_ps(row + j, k, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + j), p));
  }
}

// Float saliency (>= 0) and row-major index packed so that integer order is (value, index) order.
inline uint64_t sal_key(float s, uint64_t idx) {
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  return (static_cast<uint64_t>(bits) << 32) | idx;
}

// One row's sweep of block [i1, i1 + bs). row: the row of W (in place; columns >= i1 + bs are
// read for group parameters only); Hb [bs, bs] = Hinv[i1:i2, i1:i2]; keep: the row of the mask.
void sweep_row(float* __restrict__ row,          // [cols]
               uint8_t* __restrict__ keep,       // [cols] or nullptr
               float* __restrict__ err_out,      // [bs], row r of Err1
               float* __restrict__ q_buf,        // [bs] scratch
               const float* __restrict__ Hb,     // [bs, bs]
               const float* __restrict__ dsq,    // [bs] Hinv[j, j]^2
               int64_t cols, int64_t i1, int64_t bs, int nm_n, int nm_m, const Grid& g, float* scale,
               float* zero, double* loss, bool avx512) {
  float* wb = row + i1;
  for (int64_t i = 0; i < bs; ++i) {
    const int64_t c = i1 + i;
    if (nm_m > 0 && i % nm_m == 0) {
      // drop the m - n lowest w^2 / d^2 among columns c .. c+m-1, ties to the lower column
      float s[64];
      for (int a = 0; a < nm_m; ++a) s[a] = (wb[i + a] * wb[i + a]) / dsq[i + a];
      for (int a = 0; a < nm_m; ++a) {
        int rank = 0;
        for (int b = 0; b < nm_m; ++b) rank += (s[b] < s[a]) || (s[b] == s[a] && b < a);
        keep[c + a] = rank >= nm_m - nm_n;
      }
    }
    const float w = wb[i];
    const float d = Hb[i * bs + i];
    float q = w;
    if (g.bits) {
      if (g.group != -1 && c % g.group == 0) find_params_row(row + c, std::min(g.group, cols - c), g, scale, zero);
      q = quantize_one(w, *scale, *zero, g.maxq);
    }
    if (keep != nullptr && !keep[c]) q = 0.0f;
    q_buf[i] = q;
    const float diff = w - q;
    *loss += static_cast<double>(((diff * diff) / (d * d)) / 2.0f);
    const float err = diff / d;
    err_out[i] = err;
    if (i + 1 < bs) {
      if (avx512)
        rank1_avx512(wb + i + 1, Hb + i * bs + i + 1, err, bs - i - 1);
      else
        rank1_generic(wb + i + 1, Hb + i * bs + i + 1, err, bs - i - 1);
    }
  }
  std::memcpy(wb, q_buf, sizeof(float) * bs);
}

}  // namespace

std::tuple<torch::Tensor, std::optional<torch::Tensor>, torch::Tensor> obs_update_cpu(
    const torch::Tensor& W_in, const torch::Tensor& Hinv, int64_t blocksize, const std::vector<int64_t>& prune_counts,
    int64_t nm_n, int64_t nm_m, int64_t bits, int64_t group_size, bool sym) {
  TORCH_CHECK(W_in.device().is_cpu() && Hinv.device().is_cpu(), "obs_update_cpu: W and Hinv must be CPU tensors");
  TORCH_CHECK(W_in.dim() == 2 && W_in.scalar_type() == torch::kFloat32, "obs_update_cpu: W must be 2-D float32");
  const int64_t rows = W_in.size(0), cols = W_in.size(1);
  TORCH_CHECK(Hinv.dim() == 2 && Hinv.size(0) == cols && Hinv.size(1) == cols && Hinv.scalar_type() == torch::kFloat32,
              "obs_update_cpu: Hinv must be float32 [", cols, ", ", cols, "]");
  TORCH_CHECK(blocksize >= 1, "obs_update_cpu: blocksize must be >= 1, got ", blocksize);
  const int64_t nblocks = (cols + blocksize - 1) / blocksize;
  const bool unstructured = !prune_counts.empty();
  TORCH_CHECK(!unstructured || static_cast<int64_t>(prune_counts.size()) == nblocks,
              "obs_update_cpu: prune_counts needs one count per block (", nblocks, "), got ", prune_counts.size());
  TORCH_CHECK(nm_m == 0 || (nm_m <= 64 && nm_n >= 0 && nm_n <= nm_m && blocksize % nm_m == 0 && cols % nm_m == 0),
              "obs_update_cpu: N:M needs m <= 64 dividing blocksize and cols, got ", nm_n, ":", nm_m);
  TORCH_CHECK(!(unstructured && nm_m > 0), "obs_update_cpu: unstructured and N:M pruning are exclusive");
  TORCH_CHECK(bits == 0 || (bits >= 2 && bits <= 8), "obs_update_cpu: bits must be 0 (none) or 2..8, got ", bits);
  TORCH_CHECK(group_size == -1 || group_size >= 1, "obs_update_cpu: group_size must be -1 or >= 1");
  TORCH_CHECK(unstructured || nm_m > 0 || bits > 0, "obs_update_cpu: nothing to do (no prune, no quant)");
  TORCH_CHECK(rows * std::min(blocksize, cols) < (int64_t(1) << 32), "obs_update_cpu: block too large");

  torch::Tensor W = W_in.contiguous().clone();  // [rows, cols]
  float* Wp = W.data_ptr<float>();
  const bool pruning = unstructured || nm_m > 0;
  std::optional<torch::Tensor> mask;
  uint8_t* keep = nullptr;  // [rows, cols], bool storage
  if (pruning) {
    mask = torch::ones({rows, cols}, W.options().dtype(torch::kBool));
    keep = reinterpret_cast<uint8_t*>(mask->data_ptr<bool>());
  }
  Grid g;
  g.bits = static_cast<int>(bits);
  g.group = group_size;
  g.sym = sym;
  g.maxq = static_cast<float>((1 << bits) - 1);
  std::vector<float> scale(rows, 0.0f), zero(rows, 0.0f);  // current group's grid per row
  if (bits && group_size == -1) {
    for (int64_t r = 0; r < rows; ++r) find_params_row(Wp + r * cols, cols, g, &scale[r], &zero[r]);
  }
  std::vector<double> loss(rows, 0.0);
  const bool avx512 = active_isa() == kAvx512;
  const int nthreads = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>((rows + 7) / 8)));

  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t i1 = b * blocksize, i2 = std::min(i1 + blocksize, cols), bs = i2 - i1;
    torch::Tensor Hb_t = Hinv.slice(0, i1, i2).slice(1, i1, i2).contiguous();  // [bs, bs]
    const float* Hb = Hb_t.data_ptr<float>();
    std::vector<float> dsq(bs);
    for (int64_t j = 0; j < bs; ++j) dsq[j] = Hb[j * bs + j] * Hb[j * bs + j];

    if (unstructured && prune_counts[b] > 0) {
      // the k smallest (saliency, row-major index) keys of the block: a stable sort's first k
      const int64_t n = rows * bs, k = std::min(prune_counts[b], n);
      std::vector<uint64_t> keys(n);
#pragma omp parallel for num_threads(nthreads) schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        const float* w = Wp + r * cols + i1;
        for (int64_t j = 0; j < bs; ++j) keys[r * bs + j] = sal_key((w[j] * w[j]) / dsq[j], r * bs + j);
      }
      std::vector<uint64_t> sel(keys);
      std::nth_element(sel.begin(), sel.begin() + (k - 1), sel.end());
      const uint64_t kth = sel[k - 1];
#pragma omp parallel for num_threads(nthreads) schedule(static)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < bs; ++j) keep[r * cols + i1 + j] = keys[r * bs + j] > kth;
    }

    torch::Tensor Err1 = torch::empty({rows, bs}, W.options());  // [rows, bs]
    float* Ep = Err1.data_ptr<float>();
#pragma omp parallel num_threads(nthreads)
    {
      std::vector<float> q_buf(bs);
      const int t = omp_get_thread_num();
      const int64_t lo = rows * t / nthreads, hi = rows * (t + 1) / nthreads;
      for (int64_t r = lo; r < hi; ++r) {
        sweep_row(Wp + r * cols, keep ? keep + r * cols : nullptr, Ep + r * bs, q_buf.data(), Hb, dsq.data(), cols,
                  i1, bs, static_cast<int>(nm_n), static_cast<int>(nm_m), g, &scale[r], &zero[r], &loss[r], avx512);
      }
    }
    if (i2 < cols) {
      // the same two ops as the reference (not a fused addmm_), so the trailing columns round alike
      W.slice(1, i2).sub_(at::matmul(Err1, Hinv.slice(0, i1, i2).slice(1, i2)));
    }
  }
  torch::Tensor losses = torch::empty({rows}, W.options());
  float* lp = losses.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) lp[r] = static_cast<float>(loss[r]);
  return {W, mask, losses};
}

}  // namespace lmsqueeze
