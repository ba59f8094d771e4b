// Host launchers of the CUDA kernels. ATen-free: plain pointers, sizes and a stream,
// so that every .cu file compiles with nvcc alone (the CI compile check), or as host C++
// against the emulation layer (runtime.h), and the binding (bindings.cpp) is the only
// code that knows about at::Tensor.
//
// Every launcher enqueues its kernels on `stream` and returns the cudaGetLastError()
// after its last launch (cudaSuccess, or the first launch error). None synchronises
// with the host, copies between host and device, or reads device values on the host.
//
// Element types: float, double, __half, __nv_bfloat16 (explicit instantiations in the
// .cu files). Sums are accumulated in acc_t<T>: double for double, float otherwise.
#pragma once

#include <cstdint>

#include "runtime.h"

#include "../epilogue.h"

namespace lipkernels {
namespace cuda {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// ---------------------------------------------------------------- per-sample norm family
//
// A batch of B samples of N elements each: sample b is the dense block [b*N, (b+1)*N)
// from the data pointer (any element alignment). Each sample is cut into chunks of 16
// KiB; one block reduces one chunk. With one chunk per sample a single kernel does
// everything; otherwise the chunks write partial sums (`partials`, the number of
// elements sample_partials() returns) and a finishing kernel adds them in chunk order.

// acc_t<T> elements of `partials` the reductions need for B samples of N elements
// (0: none, pass nullptr).
template <typename T>
int64_t sample_partials(int64_t B, int64_t N);

// norm[b] = ||g_b||, out[b] = epilogue(f_b, norm[b]) for every sample b (epilogue.h).
// f: nullptr or (B,) with stride f_stride. Exactly one of out (g's type) and out_acc
// (the accumulation type, for GP and R1 outputs of half types) is non-null.
template <typename T>
cudaError_t norm_epilogue_forward(const T* g, int64_t B, int64_t N, const T* f, int64_t f_stride,
                                  Epilogue e, acc_t<T> param, acc_t<T>* norm, T* out,
                                  acc_t<T>* out_acc, acc_t<T>* partials, cudaStream_t stream);

// grad_g[b, j] = c_b * g[b, j] and grad_f[b] (when grad_f is non-null), with
// (grad_f[b], c_b) = epilogue_backward(grad_out[b * go_stride], f_b, norm[b]). grad_g has
// g's layout.
template <typename T>
cudaError_t norm_epilogue_backward(const acc_t<T>* grad_out, int64_t go_stride, const T* g,
                                   int64_t B, int64_t N,
                                   const T* f, int64_t f_stride, const acc_t<T>* norm, Epilogue e,
                                   acc_t<T> param, T* grad_f, T* grad_g, cudaStream_t stream);

// out[b, j] = coef[b] * g[b, j]; out has g's layout.
template <typename T>
cudaError_t sample_scale(const T* g, const acc_t<T>* coef, int64_t B, int64_t N, T* out,
                         cudaStream_t stream);

// out[b] = sum_j a[b, j] * b[b, j]; a and b have the same layout.
template <typename T>
cudaError_t sample_dot(const T* a, const T* b, int64_t B, int64_t N, T* out, acc_t<T>* partials,
                       cudaStream_t stream);

// ---------------------------------------------------------------- spectral normalization
//
// A list of layers, each a row-major (m, k) matrix W with vectors u (m,) and v (k,).
// The kernels take the list in groups of up to kMaxSnLayers layers, whose pointers and
// sizes travel to the device in the kernel parameters (no device table, no copy); each
// group runs in a fixed number of launches, whatever its number of layers.

constexpr int kMaxSnLayers = 24;

template <typename T>
struct SnLayer {
  const T* w;       // (m, k) row-major, contiguous
  int64_t m, k;
  const T* u_in;    // u read by the n_power_iterations == 0 pass (sigma = u^T W v)
  const T* v_in;    // v read by the first pass
  T* u;             // where the updated u goes; the backward reads u here
  T* v;             // where the updated v goes; later passes and the backward read v here
  T* out;           // forward: W_sn (nullptr: not wanted); backward: dL/dW
  const T* grad;    // backward: dL/dW_sn (m, k)
};

// Bytes of device workspace sn_forward / sn_backward need for these layers on the
// current device (the work plan depends on the layer shapes and the device's SM count).
template <typename T>
size_t sn_forward_workspace(const SnLayer<T>* layers, int64_t L, int64_t n_power_iterations);
template <typename T>
size_t sn_backward_workspace(const SnLayer<T>* layers, int64_t L);

// n_power_iterations >= 1: that many iterations of u <- normalize(W v), v <- normalize(W^T u)
// (torch's order), one read of W each; sigma = ||W^T u|| without another pass (docs/math.md §1).
// n_power_iterations == 0: sigma = u_in^T W v_in, and u_in, v_in are copied to u, v
// where those differ. Then W_sn = W / sigma_eff (sigma_eff = eps where |sigma| < eps)
// for every layer with out != nullptr. sigmas: (L,) accumulation type.
template <typename T>
cudaError_t sn_forward(const SnLayer<T>* layers, int64_t L, int64_t n_power_iterations,
                       acc_t<T> eps, acc_t<T>* sigmas, void* workspace, cudaStream_t stream);

// out = (grad - <grad, W> / sigma_eff^2 * u v^T) / sigma_eff, the correction 0 where
// |sigma| < eps; u, v read from layers[i].u / .v, sigmas from the forward.
template <typename T>
cudaError_t sn_backward(const SnLayer<T>* layers, int64_t L, const acc_t<T>* sigmas, acc_t<T> eps,
                        void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------- multi-tensor ops
//
// `count` tensors per call, in launches of up to kMaxMultiTensors tensors each (the
// pointers travel in the kernel parameters).

constexpr int kMaxMultiTensors = 64;

// dst[i][0, n[i]) = src[i][0, n[i]) for every i.
template <typename T>
cudaError_t copy_many(const T* const* src, T* const* dst, const int64_t* n, int64_t count,
                      cudaStream_t stream);

// ptrs[i][0, n[i]) clamped to [-c, c] in place for every i (NaN stays NaN).
template <typename T>
cudaError_t clip_many(T* const* ptrs, const int64_t* n, int64_t count, double c,
                      cudaStream_t stream);

}  // namespace cuda
}  // namespace lipkernels
