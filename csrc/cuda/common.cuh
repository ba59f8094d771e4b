// Device helpers shared by the CUDA kernels: conversions to and from the accumulation
// type, 16-byte packs, the head / packs / tail split of a span for vectorised access,
// and deterministic warp and block sums (a fixed order, so results do not depend on
// scheduling).
//
// Half types are converted only with intrinsics (__half2float, __float2half_rn, ...),
// so the kernels also compile under torch's -D__CUDA_NO_HALF_CONVERSIONS__ and
// -D__CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace lipkernels {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kChunkBytes = 16384;  // bytes of input one block of an elementwise or reduction kernel takes
constexpr int kPacksPerThread = kChunkBytes / (16 * kThreads);  // 4: loads in flight per thread
static_assert(kPacksPerThread * 16 * kThreads == kChunkBytes, "chunk must be whole packs per thread");

// Elements of T in a 16-byte pack, and in one block's chunk.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));
template <typename T>
constexpr int64_t kChunkElems = kChunkBytes / static_cast<int64_t>(sizeof(T));

template <typename T>
struct alignas(16) Pack {
  T v[kVec<T>];
};

// ---------------------------------------------------------------- conversions

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float lk_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double lk_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float lk_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double lk_abs(double x) { return fabs(x); }

// max(x, eps) as std::max(x, eps) (x when x is NaN).
template <typename A>
__device__ __forceinline__ A floor_at(A x, A eps) {
  return x < eps ? eps : x;
}

// ---------------------------------------------------------------- spans

__device__ __forceinline__ unsigned misalignment(const void* p) {
  return static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
}

// Two pointers that can be walked with 16-byte packs at the same indices.
__device__ __forceinline__ bool same_misalignment(const void* a, const void* b) {
  return ((reinterpret_cast<uintptr_t>(a) ^ reinterpret_cast<uintptr_t>(b)) & 15u) == 0;
}

// [0, n) of a span that starts at p: scalar elements [0, head), 16-byte packs of
// elements [head, tail) (tail - head a multiple of kVec<T>), scalar elements [tail, n).
// With vec == false (or p not aligned to its element size) everything is the head.
struct Span {
  int64_t head, packs, tail;
};

template <typename T>
__device__ __forceinline__ Span split_span(const T* p, int64_t n, bool vec) {
  Span s;
  const unsigned mis = misalignment(p);
  if (!vec || mis % sizeof(T) != 0) {
    s.head = n;
    s.packs = 0;
    s.tail = n;
    return s;
  }
  int64_t head = mis == 0 ? 0 : static_cast<int64_t>((16u - mis) / sizeof(T));
  if (head > n) head = n;
  s.head = head;
  s.packs = (n - head) / kVec<T>;
  s.tail = head + s.packs * kVec<T>;
  return s;
}

// One 16-byte access (the GPU's 128-bit load / store; p must be 16-byte aligned).
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return LK_LOAD16(Pack<T>, p);
}
template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& x) {
  LK_STORE16(p, x);
}

// This thread's part of sum_i x_i * y_i (kDot) or sum_i x_i^2 over [0, n) of a span,
// the block's threads together; 16-byte loads where x and y allow them, with up to
// kPacksPerThread packs per thread in flight. The order of the additions depends only
// on n and on the pointers' alignment.
template <typename T, bool kDot>
__device__ __forceinline__ acc_t<T> reduce_span(const T* __restrict__ x, const T* __restrict__ y,
                                                int64_t n) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const Span sp = split_span(x, n, !kDot || same_misalignment(x, y));
  A acc = A(0);
  for (int64_t i = threadIdx.x; i < sp.head; i += kThreads) {
    const A a = to_acc(x[i]);
    if constexpr (kDot) acc += a * to_acc(y[i]);
    else acc += a * a;
  }
  const T* xv = x + sp.head;
  const T* yv = kDot ? y + sp.head : nullptr;
  int64_t q = threadIdx.x;
  for (; q + (kPacksPerThread - 1) * kThreads < sp.packs; q += kPacksPerThread * kThreads) {
    Pack<T> px[kPacksPerThread];
    Pack<T> py[kDot ? kPacksPerThread : 1];
#pragma unroll
    for (int u = 0; u < kPacksPerThread; ++u) {
      px[u] = load_pack(xv + (q + u * kThreads) * V);
      if constexpr (kDot) py[u] = load_pack(yv + (q + u * kThreads) * V);
    }
#pragma unroll
    for (int u = 0; u < kPacksPerThread; ++u) {
#pragma unroll
      for (int c = 0; c < V; ++c) {
        const A a = to_acc(px[u].v[c]);
        if constexpr (kDot) acc += a * to_acc(py[u].v[c]);
        else acc += a * a;
      }
    }
    if constexpr (!kDot) (void)py;
  }
  for (; q < sp.packs; q += kThreads) {
    const Pack<T> px = load_pack(xv + q * V);
    Pack<T> py;
    if constexpr (kDot) py = load_pack(yv + q * V);
#pragma unroll
    for (int c = 0; c < V; ++c) {
      const A a = to_acc(px.v[c]);
      if constexpr (kDot) acc += a * to_acc(py.v[c]);
      else acc += a * a;
    }
    if constexpr (!kDot) (void)py;
  }
  for (int64_t i = sp.tail + threadIdx.x; i < n; i += kThreads) {
    const A a = to_acc(x[i]);
    if constexpr (kDot) acc += a * to_acc(y[i]);
    else acc += a * a;
  }
  return acc;
}

// y_i = f(i, x_i) for i in [0, n) of a span (f in the accumulation type), the block's
// threads together; 16-byte loads and stores where x and y have the same alignment.
// y may be x (each element is read and written by the same thread).
template <typename T, typename F>
__device__ __forceinline__ void map_span(const T* x, T* y, int64_t n, F f) {
  constexpr int V = kVec<T>;
  const Span sp = split_span(x, n, same_misalignment(x, y));
  for (int64_t i = threadIdx.x; i < sp.head; i += kThreads) y[i] = from_acc<T>(f(i, to_acc(x[i])));
  const T* xv = x + sp.head;
  T* yv = y + sp.head;
  int64_t q = threadIdx.x;
  for (; q + (kPacksPerThread - 1) * kThreads < sp.packs; q += kPacksPerThread * kThreads) {
    Pack<T> p[kPacksPerThread];
#pragma unroll
    for (int u = 0; u < kPacksPerThread; ++u) p[u] = load_pack(xv + (q + u * kThreads) * V);
#pragma unroll
    for (int u = 0; u < kPacksPerThread; ++u) {
      const int64_t i0 = sp.head + (q + u * kThreads) * V;
#pragma unroll
      for (int c = 0; c < V; ++c) p[u].v[c] = from_acc<T>(f(i0 + c, to_acc(p[u].v[c])));
      store_pack(yv + (q + u * kThreads) * V, p[u]);
    }
  }
  for (; q < sp.packs; q += kThreads) {
    Pack<T> p = load_pack(xv + q * V);
    const int64_t i0 = sp.head + q * V;
#pragma unroll
    for (int c = 0; c < V; ++c) p.v[c] = from_acc<T>(f(i0 + c, to_acc(p.v[c])));
    store_pack(yv + q * V, p);
  }
  for (int64_t i = sp.tail + threadIdx.x; i < n; i += kThreads) y[i] = from_acc<T>(f(i, to_acc(x[i])));
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------- sums

// Butterfly sum over the warp: every lane ends with the same value (each step adds
// the same two numbers in every lane of a pair), so it is deterministic.
template <typename A>
__device__ __forceinline__ A warp_allreduce(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block, the same value in every thread. Every thread of the block must
// call it (it synchronises); red: kWarps values of shared memory, free again on return.
template <typename A>
__device__ __forceinline__ A block_allreduce(A v, A* red) {
  v = warp_allreduce(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  A s = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) s += red[w];
  __syncthreads();
  return s;
}

// Index of the last entry of begin[0..n) that is <= idx (begin ascending, begin[0] = 0
// <= idx): which layer or tensor of a table a block's index falls in.
__device__ __forceinline__ int find_entry(const int32_t* begin, int n, int32_t idx) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (begin[mid] <= idx)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

}  // namespace cuda
}  // namespace lipkernels
