// C entry points of the CUDA kernels. The .cu files include no torch header, so nvcc can
// compile-check them on any machine; ops_cuda.cpp calls these with torch's current stream.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

extern "C" {

// dtype codes shared by every launcher
enum LmsqueezeDtype : int { LMSQ_F32 = 0, LMSQ_BF16 = 1, LMSQ_F16 = 2 };

// partial[split, j] = sum over rows r of split `split` (mask[r] != 0) of x[r, j]^2
cudaError_t lmsqueeze_col_sq_norm_partial(const void* x,          // [rows, d], row stride `stride`
                                          int dtype,              // LmsqueezeDtype
                                          const uint8_t* mask,    // [rows] or nullptr
                                          float* partial,         // [splits, d]
                                          int64_t rows, int64_t d, int64_t stride, int splits,
                                          cudaStream_t stream);
}
