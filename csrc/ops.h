// Declarations of every op lmsqueeze._C exposes; bindings.cpp is the one list of the op surface.
#pragma once
#include <torch/extension.h>

#include <optional>

namespace lmsqueeze {

// s <- s * n / (n + m) + (1 / (n + m)) * sum_t x[t, :]^2 over the m valid rows; returns n + m.
int64_t col_sq_norm_update_cpu(torch::Tensor s, const torch::Tensor& x, int64_t nsamples,
                               const std::optional<torch::Tensor>& mask);

#ifdef LMSQUEEZE_WITH_CUDA
int64_t col_sq_norm_update_cuda(torch::Tensor s, const torch::Tensor& x, int64_t nsamples,
                                const std::optional<torch::Tensor>& mask);
#endif

}  // namespace lmsqueeze
