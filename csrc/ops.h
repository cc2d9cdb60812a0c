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

// ---- obs_update (issue 5): the blocked OBS sweep of SparseGPT/GPTQ; see csrc/cpu/obs.cpp ----
// prune_counts: weights pruned per block (unstructured; empty otherwise); nm_m = 0: no N:M;
// bits = 0: no quantization. Returns (W_new, keep mask or None, losses).
std::tuple<torch::Tensor, std::optional<torch::Tensor>, torch::Tensor> obs_update_cpu(
    const torch::Tensor& W, const torch::Tensor& Hinv, int64_t blocksize, const std::vector<int64_t>& prune_counts,
    int64_t nm_n, int64_t nm_m, int64_t bits, int64_t group_size, bool sym);
// ---- end obs_update ----

#ifdef LMSQUEEZE_WITH_CUDA
int64_t col_sq_norm_update_cuda(torch::Tensor s, const torch::Tensor& x, int64_t nsamples,
                                const std::optional<torch::Tensor>& mask);
#endif

}  // namespace lmsqueeze
