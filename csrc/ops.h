// Declarations of every op lmsqueeze._C exposes; bindings.cpp is the one list of the op surface.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lmsqueeze {

// s <- s * n / (n + m) + (1 / (n + m)) * sum_t x[t, :]^2 over the m valid rows; returns n + m.
int64_t col_sq_norm_update_cpu(torch::Tensor s, const torch::Tensor& x, int64_t nsamples,
                               const std::optional<torch::Tensor>& mask);

// y [rows, out] = x [rows, in] @ W.T + bias for a 2:4 W stored as values [out, in/2] and meta [out, in/16]
// int16 (format: lmsqueeze/kernels/sparse24.py); float32 or bfloat16.
torch::Tensor sparse24_matmul_cpu(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& meta,
                                  const std::optional<torch::Tensor>& bias);
// H <- H * n / (n + m) + (2 / (n + m)) * X^T X over the m valid rows, LOWER triangle only; returns n + m.
int64_t hessian_update_cpu(torch::Tensor H, const torch::Tensor& x, int64_t nsamples,
                           const std::optional<torch::Tensor>& mask);
// Mirror the lower triangle of H onto the upper one, in place.
void hessian_finalize_cpu(torch::Tensor H);
// The AMX path (bf16 x) with its tile instructions emulated in scalar C++: tests of the packing, blocking and
// fold on CPUs without AMX. Slow; not a backend.
int64_t hessian_update_tiles_emulated_cpu(torch::Tensor H, const torch::Tensor& x, int64_t nsamples,
                                          const std::optional<torch::Tensor>& mask);
// Which kernel hessian_update_cpu runs for x of `dtype` ("bfloat16", ...) now: amx, avx512-bf16 or fp32-gemm.
std::string hessian_update_cpu_path(const std::string& dtype);

// KEEP masks (true = kept). Ties: among equal scores the lower column index is pruned first.
// rowwise: prune exactly k entries per row of scores [rows, cols] (fp32).
torch::Tensor rowwise_mask_cpu(const torch::Tensor& scores, int64_t k, const std::optional<torch::Tensor>& out);
// N:M: keep the n highest of every m consecutive entries along the last dimension (fp32).
torch::Tensor nm_mask_cpu(const torch::Tensor& scores, int64_t n, int64_t m, const std::optional<torch::Tensor>& out);
// Fused Wanda: scores |W| * sqrt(col_sq_norm) computed on the fly, then rowwise (k >= 0) or N:M (n, m).
torch::Tensor wanda_mask_cpu(const torch::Tensor& W, const torch::Tensor& col_sq_norm, int64_t k, int64_t n,
                             int64_t m, const std::optional<torch::Tensor>& out);
// ---- obs_update (issue 5): the blocked OBS sweep of SparseGPT/GPTQ; see csrc/cpu/obs.cpp ----
// prune_counts: weights pruned per block (unstructured; empty otherwise); nm_m = 0: no N:M;
// bits = 0: no quantization. Returns (W_new, keep mask or None, losses).
std::tuple<torch::Tensor, std::optional<torch::Tensor>, torch::Tensor> obs_update_cpu(
    const torch::Tensor& W, const torch::Tensor& Hinv, int64_t blocksize, const std::vector<int64_t>& prune_counts,
    int64_t nm_n, int64_t nm_m, int64_t bits, int64_t group_size, bool sym);
// ---- end obs_update ----

// ---- quant_matmul (issue 19): group-quantized weights; formats in lmsqueeze/kernels/quant.py ----
// y [rows, out] = x [rows, in] @ W.T + bias, W = scales * (codes - zeros) per group; x float32 or bfloat16.
// qweight [out, ceil(in*bits/32)] int32, scales [out, ngroups] float32, zeros [out, ngroups] uint8,
// perm [in] int64 or None (packed column j is input column perm[j]).
torch::Tensor quant_matmul_cpu(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                               const torch::Tensor& zeros, const std::optional<torch::Tensor>& perm, int64_t in,
                               int64_t bits, int64_t group_size, const std::optional<torch::Tensor>& bias,
                               bool act_int8);
// 2:4 + 4-bit: qvalues [out, in/16] int32 (codes of the kept values), meta [out, in/16] int16 (sparse24's).
// act_int8: 1..16 rows of x rounded to int8 per 32 columns, int8 dot products (4-bit, in and group % 64 == 0).
torch::Tensor sparse24_quant_matmul_cpu(const torch::Tensor& x, const torch::Tensor& qvalues, const torch::Tensor& meta,
                                        const torch::Tensor& scales, const torch::Tensor& zeros, int64_t bits,
                                        int64_t group_size, const std::optional<torch::Tensor>& bias, bool act_int8);
// ---- end quant_matmul ----

#ifdef LMSQUEEZE_WITH_CUDA
int64_t col_sq_norm_update_cuda(torch::Tensor s, const torch::Tensor& x, int64_t nsamples,
                                const std::optional<torch::Tensor>& mask);
#endif

}  // namespace lmsqueeze
