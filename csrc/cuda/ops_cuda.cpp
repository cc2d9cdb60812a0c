// torch glue for the CUDA kernels: checks, allocation, current stream. Built only with CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"
#include "ops.h"

namespace lmsqueeze {

namespace {
int dtype_code(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return LMSQ_F32;
    case torch::kBFloat16: return LMSQ_BF16;
    case torch::kHalf: return LMSQ_F16;
    default: TORCH_CHECK(false, "lmsqueeze CUDA kernels take float32, bfloat16 or float16, got ", t);
  }
  return -1;
}
}  // namespace

int64_t col_sq_norm_update_cuda(torch::Tensor s, const torch::Tensor& x_in, int64_t nsamples,
                                const std::optional<torch::Tensor>& mask_in) {
  TORCH_CHECK(s.is_cuda() && x_in.is_cuda(), "col_sq_norm_update_cuda: s and x must be CUDA tensors");
  TORCH_CHECK(s.scalar_type() == torch::kFloat32 && s.dim() == 1 && s.is_contiguous(),
              "col_sq_norm_update_cuda: s must be a contiguous 1-D float32 tensor");
  const int64_t d = x_in.size(-1);
  TORCH_CHECK(s.size(0) == d, "col_sq_norm_update_cuda: s has ", s.size(0), " entries but x has ", d, " columns");
  const c10::cuda::CUDAGuard guard(x_in.device());
  torch::Tensor x = x_in.reshape({-1, d});
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t rows = x.size(0);
  torch::Tensor mask;
  int64_t m = rows;
  if (mask_in.has_value() && mask_in->defined()) {
    TORCH_CHECK(mask_in->numel() == rows, "col_sq_norm_update_cuda: mask has ", mask_in->numel(),
                " entries but x has ", rows, " rows");
    mask = mask_in->reshape({-1}).to(torch::kUInt8).contiguous();
    m = mask.sum().item<int64_t>();
  }
  if (m == 0) return nsamples;
  const int splits = static_cast<int>(std::min<int64_t>(64, std::max<int64_t>(1, rows / 256)));
  auto partial = torch::empty({splits, d}, s.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = lmsqueeze_col_sq_norm_partial(
      x.data_ptr(), dtype_code(x.scalar_type()), mask.defined() ? mask.data_ptr<uint8_t>() : nullptr,
      partial.data_ptr<float>(), rows, d, x.stride(0), splits, stream.stream());
  TORCH_CHECK(err == cudaSuccess, "col_sq_norm_update_cuda: launch failed: ", cudaGetErrorString(err));
  const double keep = static_cast<double>(nsamples) / static_cast<double>(nsamples + m);
  s.mul_(keep).add_(partial.sum(0), 1.0 / static_cast<double>(nsamples + m));
  return nsamples + m;
}

}  // namespace lmsqueeze
