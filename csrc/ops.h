// Declarations of every op lmsqueeze._C exposes; bindings.cpp is the one list of the op surface.
#pragma once
#include <torch/extension.h>

#include <optional>

namespace lmsqueeze {

// s <- s * n / (n + m) + (1 / (n + m)) * sum_t x[t, :]^2 over the m valid rows; returns n + m.
int64_t col_sq_norm_update_cpu(torch::Tensor s, const torch::Tensor& x, int64_t nsamples,
                               const std::optional<torch::Tensor>& mask);

// y [rows, out] = x [rows, in] @ W.T + bias for a 2:4 W stored as values [out, in/2] and meta [out, in/16]
// int16 (format: lmsqueeze/kernels/sparse24.py); float32 or bfloat16.
torch::Tensor sparse24_matmul_cpu(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& meta,
                                  const std::optional<torch::Tensor>& bias);

#ifdef LMSQUEEZE_WITH_CUDA
int64_t col_sq_norm_update_cuda(torch::Tensor s, const torch::Tensor& x, int64_t nsamples,
                                const std::optional<torch::Tensor>& mask);
#endif

}  // namespace lmsqueeze
