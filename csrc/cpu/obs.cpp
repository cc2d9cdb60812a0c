// The blocked OBS sweep of SparseGPT / GPTQ on the CPU (contract: lmsqueeze/kernels/obs.py).
//
// Per block of columns [i1, i2):
//   1. unstructured pruning only: the block's saliency w^2 / Hinv[j, j]^2 for every (row, column),
//      the k smallest (ties: lower row-major index first, what a stable sort does) are pruned;
//   2. rows are independent for the rest of the block, so OpenMP threads own row ranges and sweep
//      the block's columns while the rows sit in L1/L2: N:M choice every m columns, group
//      scale/zero at a group's first column, q, err = (w - q) / d, and the rank-1 update of the
//      remaining block columns with Hinv row i. AVX-512: 16 rows at once, one per lane
//      (sweep_tile16); generic C++: one row at a time (sweep_row);
//   3. one BLAS call for the trailing columns: W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:] (addmm_).
// Every step rounds as the reference does (product, then difference; IEEE division; round half to
// even), so W and the mask come out bit-identical to obs_update_ref on the dev box (tests allow
// 1e-5 * max|W| for BLAS summation order); only the loss sums differ in summation order.
// Measured on the shared 2-core dev box, 1 thread, 4096 x 4096: reference 7.4-9.5 s, this 1.3-1.7 s,
// of which ~1.1 s is the trailing GEMMs both share; the rest of the reference is ~10 small torch
// ops per column.
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

// Float saliency (>= 0) and row-major index packed so that integer order is (value, index) order.
inline uint64_t sal_key(float s, uint64_t idx) {
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  return (static_cast<uint64_t>(bits) << 32) | idx;
}

// Generic C++: one row's sweep of block [i1, i1 + bs). row: the row of W (in place; columns >= i1 + bs are
// read for group parameters only); Hb [bs, bs] = Hinv[i1:i2, i1:i2]; keep: the row of the mask.
void sweep_row(float* __restrict__ row,          // [cols]
               uint8_t* __restrict__ keep,       // [cols] or nullptr
               float* __restrict__ err_out,      // [bs], row r of Err1
               float* __restrict__ q_buf,        // [bs] scratch
               const float* __restrict__ Hb,     // [bs, bs]
               const float* __restrict__ dsq,    // [bs] Hinv[j, j]^2
               int64_t cols, int64_t i1, int64_t bs, int nm_n, int nm_m, const Grid& g, float* scale,
               float* zero, double* loss) {
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
    if (i + 1 < bs) rank1_generic(wb + i + 1, Hb + i * bs + i + 1, err, bs - i - 1);
  }
  std::memcpy(wb, q_buf, sizeof(float) * bs);
}

// ---- AVX-512: 16 rows at once, one row per lane ---------------------------------------------------
// A row alone is a latency chain (column i+1 waits for column i's update through a division and a
// store), measured at ~5 GFLOP/s; 16 rows in the lanes of one vector make every step independent
// work and the rank-1 update a loop of broadcast-multiply-subtracts over the block's columns.
constexpr int kLanes = 16;

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 round_even(__m512 x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// find_params on 16 rows at once from their min and max (before the clamp to contain 0)
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void grid_from_range(__m512 xmin, __m512 xmax,
                                                                                const Grid& g, __m512* scale,
                                                                                __m512* zero) {
  const __m512 z = _mm512_setzero_ps();
  xmin = _mm512_min_ps(xmin, z);
  xmax = _mm512_max_ps(xmax, z);
  if (g.sym) {
    xmax = _mm512_max_ps(_mm512_abs_ps(xmin), xmax);
    const __mmask16 neg = _mm512_cmp_ps_mask(xmin, z, _CMP_LT_OQ);
    xmin = _mm512_mask_sub_ps(xmin, neg, z, xmax);
  }
  const __mmask16 empty = _mm512_cmp_ps_mask(xmin, z, _CMP_EQ_OQ) & _mm512_cmp_ps_mask(xmax, z, _CMP_EQ_OQ);
  xmin = _mm512_mask_blend_ps(empty, xmin, _mm512_set1_ps(-1.0f));
  xmax = _mm512_mask_blend_ps(empty, xmax, _mm512_set1_ps(1.0f));
  *scale = _mm512_div_ps(_mm512_sub_ps(xmax, xmin), _mm512_set1_ps(g.maxq));
  *zero = g.sym ? _mm512_set1_ps((g.maxq + 1.0f) / 2.0f) : round_even(_mm512_div_ps(_mm512_sub_ps(z, xmin), *scale));
}

// Rows r0 .. r0+nr-1 (nr <= 16) of block [i1, i1 + bs). T, Q, E: [bs, 16] scratch; K: [bs] lane masks.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void sweep_tile16(
    float* __restrict__ Wp,            // [rows, cols]
    uint8_t* __restrict__ keep,        // [rows, cols] or nullptr
    float* __restrict__ Ep,            // [rows, bs], Err1
    const float* __restrict__ Hb,      // [bs, bs]
    const float* __restrict__ dsq,     // [bs]
    float* __restrict__ scale_rows,    // [rows], the current group's grid, carried across blocks
    float* __restrict__ zero_rows,     // [rows]
    double* __restrict__ loss_rows,    // [rows]
    float* __restrict__ T, float* __restrict__ Q, float* __restrict__ E, __mmask16* __restrict__ K,
    int64_t r0, int nr, int64_t cols, int64_t i1, int64_t bs, int nm_n, int nm_m, const Grid& g) {
  const __mmask16 live = static_cast<__mmask16>((1u << nr) - 1u);
  for (int64_t j = 0; j < bs; ++j) {
    __mmask16 kj = 0xFFFF;
    for (int l = 0; l < kLanes; ++l) {
      const bool in = l < nr;
      T[j * kLanes + l] = in ? Wp[(r0 + l) * cols + i1 + j] : 0.0f;
      if (in && keep != nullptr && !keep[(r0 + l) * cols + i1 + j]) kj &= static_cast<__mmask16>(~(1u << l));
    }
    K[j] = kj;
  }
  __m512 scale = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), live, scale_rows + r0);
  __m512 zero = _mm512_maskz_loadu_ps(live, zero_rows + r0);
  __m512d loss_lo = _mm512_setzero_pd(), loss_hi = _mm512_setzero_pd();
  const __m512 two = _mm512_set1_ps(2.0f);
  for (int64_t i = 0; i < bs; ++i) {
    const int64_t c = i1 + i;
    if (nm_m > 0 && i % nm_m == 0) {
      __m512 s[64];
      for (int a = 0; a < nm_m; ++a) {
        const __m512 w = _mm512_loadu_ps(T + (i + a) * kLanes);
        s[a] = _mm512_div_ps(_mm512_mul_ps(w, w), _mm512_set1_ps(dsq[i + a]));
      }
      for (int a = 0; a < nm_m; ++a) {
        __m512i rank = _mm512_setzero_si512();
        const __m512i one = _mm512_set1_epi32(1);
        for (int b = 0; b < nm_m; ++b) {
          if (b == a) continue;
          const __mmask16 lower = b < a ? _mm512_cmp_ps_mask(s[b], s[a], _CMP_LE_OQ)   // ties: lower column first
                                        : _mm512_cmp_ps_mask(s[b], s[a], _CMP_LT_OQ);
          rank = _mm512_mask_add_epi32(rank, lower, rank, one);
        }
        K[i + a] = _mm512_cmp_epi32_mask(rank, _mm512_set1_epi32(nm_m - nm_n), _MM_CMPINT_NLT);
      }
    }
    const __m512 w = _mm512_loadu_ps(T + i * kLanes);
    const __m512 d = _mm512_set1_ps(Hb[i * bs + i]);
    __m512 q = w;
    if (g.bits) {
      if (g.group != -1 && c % g.group == 0) {
        const int64_t end = std::min(c + g.group, cols);
        __m512 xmin = w, xmax = w;
        for (int64_t j = i + 1; j < std::min(end - i1, bs); ++j) {
          xmin = _mm512_min_ps(xmin, _mm512_loadu_ps(T + j * kLanes));
          xmax = _mm512_max_ps(xmax, _mm512_loadu_ps(T + j * kLanes));
        }
        if (end > i1 + bs) {  // the group reaches past the block: those columns are in W, not updated yet
          alignas(64) float lo[kLanes], hi[kLanes];
          _mm512_store_ps(lo, xmin);
          _mm512_store_ps(hi, xmax);
          for (int l = 0; l < nr; ++l) {
            const float* row = Wp + (r0 + l) * cols;
            for (int64_t j = i1 + bs; j < end; ++j) {
              lo[l] = std::min(lo[l], row[j]);
              hi[l] = std::max(hi[l], row[j]);
            }
          }
          xmin = _mm512_load_ps(lo);
          xmax = _mm512_load_ps(hi);
        }
        grid_from_range(xmin, xmax, g, &scale, &zero);
      }
      __m512 qi = _mm512_add_ps(round_even(_mm512_div_ps(w, scale)), zero);
      qi = _mm512_min_ps(_mm512_max_ps(qi, _mm512_setzero_ps()), _mm512_set1_ps(g.maxq));
      q = _mm512_mul_ps(scale, _mm512_sub_ps(qi, zero));
    }
    q = _mm512_maskz_mov_ps(K[i], q);
    _mm512_storeu_ps(Q + i * kLanes, q);
    const __m512 diff = _mm512_sub_ps(w, q);
    const __m512 term = _mm512_div_ps(_mm512_div_ps(_mm512_mul_ps(diff, diff), _mm512_mul_ps(d, d)), two);
    loss_lo = _mm512_add_pd(loss_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(term)));
    loss_hi = _mm512_add_pd(loss_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(term), 1))));
    const __m512 err = _mm512_div_ps(diff, d);
    _mm512_storeu_ps(E + i * kLanes, err);
    const float* h = Hb + i * bs;
    for (int64_t j = i + 1; j < bs; ++j) {
      __m512 p = _mm512_mul_ps(err, _mm512_set1_ps(h[j]));
      __asm__("" : "+v"(p));  // no FMA: match the reference's rounding
      _mm512_storeu_ps(T + j * kLanes, _mm512_sub_ps(_mm512_loadu_ps(T + j * kLanes), p));
    }
  }
  _mm512_mask_storeu_ps(scale_rows + r0, live, scale);
  _mm512_mask_storeu_ps(zero_rows + r0, live, zero);
  alignas(64) double acc[kLanes];
  _mm512_store_pd(acc, loss_lo);
  _mm512_store_pd(acc + 8, loss_hi);
  for (int l = 0; l < nr; ++l) {
    loss_rows[r0 + l] += acc[l];
    float* row = Wp + (r0 + l) * cols + i1;
    float* erow = Ep + (r0 + l) * bs;
    for (int64_t j = 0; j < bs; ++j) {
      row[j] = Q[j * kLanes + l];
      erow[j] = E[j * kLanes + l];
      if (keep != nullptr) keep[(r0 + l) * cols + i1 + j] = (K[j] >> l) & 1u;
    }
  }
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
    if (avx512) {
      const int64_t tiles = (rows + kLanes - 1) / kLanes;
#pragma omp parallel num_threads(nthreads)
      {
        std::vector<float> T(bs * kLanes), Qs(bs * kLanes), Es(bs * kLanes);
        std::vector<__mmask16> K(bs);
        const int t = omp_get_thread_num();
        for (int64_t tile = tiles * t / nthreads; tile < tiles * (t + 1) / nthreads; ++tile) {
          const int64_t r0 = tile * kLanes;
          sweep_tile16(Wp, keep, Ep, Hb, dsq.data(), scale.data(), zero.data(), loss.data(), T.data(), Qs.data(),
                       Es.data(), K.data(), r0, static_cast<int>(std::min<int64_t>(kLanes, rows - r0)), cols, i1, bs,
                       static_cast<int>(nm_n), static_cast<int>(nm_m), g);
        }
      }
    } else {
#pragma omp parallel num_threads(nthreads)
      {
        std::vector<float> q_buf(bs);
        const int t = omp_get_thread_num();
        const int64_t lo = rows * t / nthreads, hi = rows * (t + 1) / nthreads;
        for (int64_t r = lo; r < hi; ++r) {
          sweep_row(Wp + r * cols, keep ? keep + r * cols : nullptr, Ep + r * bs, q_buf.data(), Hb, dsq.data(), cols,
                    i1, bs, static_cast<int>(nm_n), static_cast<int>(nm_m), g, &scale[r], &zero[r], &loss[r]);
        }
      }
    }
    if (i2 < cols) {
      // W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]. In place through addmm_ (beta 1, alpha -1): BLAS
      // rounds C - acc once from the same fp32 accumulator as the reference's product-then-subtract,
      // so the result is bit-identical (checked), without the [rows, cols - i2] temporary and its
      // extra pass (4096 x 4096: 0.07 s instead of 0.12 s per block, 1 thread). One row goes
      // through gemv, whose summation differs between the two forms: keep the reference's ops there.
      torch::Tensor trail = W.slice(1, i2);
      torch::Tensor Hs = Hinv.slice(0, i1, i2).slice(1, i2);
      if (rows > 1)
        trail.addmm_(Err1, Hs, 1.0, -1.0);
      else
        trail.sub_(at::matmul(Err1, Hs));
    }
  }
  torch::Tensor losses = torch::empty({rows}, W.options());
  float* lp = losses.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) lp[r] = static_cast<float>(loss[r]);
  return {W, mask, losses};
}

}  // namespace lmsqueeze
