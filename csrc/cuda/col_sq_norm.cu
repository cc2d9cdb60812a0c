// Squared column norms on the GPU: a streaming read of x, one FMA per element.
// Threads of a block own consecutive columns, so each row read is coalesced; the grid's second
// dimension splits the rows so that a narrow layer (d = 576) still fills the machine. Each split
// writes its own partial row (deterministic; no atomics), summed on the host side in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

namespace {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T>
__global__ void col_sq_norm_partial_kernel(const T* __restrict__ x,           // [rows, d]
                                           const uint8_t* __restrict__ mask,  // [rows] or nullptr
                                           float* __restrict__ partial,       // [splits, d]
                                           int64_t rows, int64_t d, int64_t stride) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int64_t splits = gridDim.y;
  const int64_t lo = rows * blockIdx.y / splits, hi = rows * (blockIdx.y + 1) / splits;
  float acc = 0.0f;
  for (int64_t r = lo; r < hi; ++r) {
    if (mask != nullptr && mask[r] == 0) continue;
    const float v = to_f32(x[r * stride + j]);
    acc = fmaf(v, v, acc);
  }
  partial[blockIdx.y * d + j] = acc;
}

}  // namespace

extern "C" cudaError_t lmsqueeze_col_sq_norm_partial(const void* x, int dtype, const uint8_t* mask, float* partial,
                                                     int64_t rows, int64_t d, int64_t stride, int splits,
                                                     cudaStream_t stream) {
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>((d + kThreads - 1) / kThreads), static_cast<unsigned>(splits));
  switch (dtype) {
    case LMSQ_F32:
      col_sq_norm_partial_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(x), mask, partial,
                                                                      rows, d, stride);
      break;
    case LMSQ_BF16:
      col_sq_norm_partial_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(x), mask, partial, rows, d, stride);
      break;
    case LMSQ_F16:
      col_sq_norm_partial_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(x), mask, partial,
                                                                       rows, d, stride);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
