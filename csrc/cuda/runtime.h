// The CUDA API the kernels (csrc/cuda/*.cu) and their launchers use, from one place:
// the real CUDA headers, or, in an emulation build (LIPKERNELS_CUDA_EMULATION), the host
// emulation layer of emulation/cuda_emulation.h, so the same sources also run on the CPU
// under sanitizers. Beside the CUDA API itself, the kernels use only:
//
//   LK_SHARED(type, name, dims)          __shared__ type name dims;
//   LK_EXTERN_SHARED(type, name, align)  extern __shared__ __align__(align) type name[];
//   LK_LOAD16(type, p), LK_STORE16(p, x)
//                                        one 16-byte access of a 16-byte type at an aligned p
//   launch<kernel>(grid, block, dynamic_smem, stream, args...)
//                                        kernel<<<grid, block, dynamic_smem, stream>>>(args...),
//                                        returning the launch's error (cudaGetLastError())
//
// so that both builds share every kernel and launcher line.
#pragma once

#ifdef LIPKERNELS_CUDA_EMULATION

#include "emulation/cuda_emulation.h"

#else  // the real CUDA build

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>
#include <utility>

#define LK_SHARED(type, name, dims) __shared__ type name dims
#define LK_EXTERN_SHARED(type, name, align) extern __shared__ __align__(align) type name[]
#define LK_LOAD16(type, p) (*reinterpret_cast<const type*>(p))
#define LK_STORE16(p, x) (*reinterpret_cast<std::remove_const_t<std::remove_reference_t<decltype(x)>>*>(p) = (x))

namespace lipkernels {
namespace cuda {

#ifdef __CUDACC__
template <auto Kernel, typename... Args>
cudaError_t launch(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream, Args&&... args) {
  Kernel<<<grid, block, dynamic_smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}
#endif

}  // namespace cuda
}  // namespace lipkernels

#endif  // LIPKERNELS_CUDA_EMULATION

// In a launcher returning cudaError_t: return the error of the expression (a launch, a
// memset), if any. Variadic: a launch's template arguments hold commas.
#define LK_RETURN_IF_ERROR(...)                   \
  do {                                            \
    const cudaError_t lk_err_ = (__VA_ARGS__);    \
    if (lk_err_ != cudaSuccess) return lk_err_;   \
  } while (0)
