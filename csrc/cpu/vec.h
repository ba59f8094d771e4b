// Inner loops of the CPU kernels: dot products, sums of squares and row updates
// written with independent lane accumulators, which the compiler turns into SIMD
// code without reassociating any single sum (no -ffast-math needed). The
// accumulation type is float for float/half/bfloat16 inputs and double for double.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lipkernels {
namespace cpu {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Independent accumulators per sum: 64 float32 lanes are four AVX-512 (eight AVX2)
// registers, enough to hide the latency of the fused multiply-adds that a single
// accumulator register would serialize on.
constexpr int kLanes = 64;

template <typename A>
inline A sum_lanes(const A* s) {
  A r = 0;
  for (int l = 0; l < kLanes; ++l) r += s[l];
  return r;
}

// sum_j x_j^2
template <typename T>
inline acc_t<T> sum_squares(const T* x, int64_t n) {
  using A = acc_t<T>;
  A s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const A a = static_cast<A>(x[j + l]);
      s[l] += a * a;
    }
  A r = sum_lanes(s);
  for (; j < n; ++j) {
    const A a = static_cast<A>(x[j]);
    r += a * a;
  }
  return r;
}

// sum_j x_j y_j, with y of type Y (the input type or the accumulation type)
template <typename T, typename Y>
inline acc_t<T> dot(const T* x, const Y* y, int64_t n) {
  using A = acc_t<T>;
  A s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l)
      s[l] += static_cast<A>(x[j + l]) * static_cast<A>(y[j + l]);
  A r = sum_lanes(s);
  for (; j < n; ++j) r += static_cast<A>(x[j]) * static_cast<A>(y[j]);
  return r;
}

// t_r = sum_j w[r*k + j] y_j for R consecutive rows of a row-major matrix, sharing
// the loads of y across the rows.
template <int R, typename T, typename Y>
inline void dot_rows(const T* w, int64_t k, const Y* y, acc_t<T>* t) {
  using A = acc_t<T>;
  A s[R][kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= k; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const A yl = static_cast<A>(y[j + l]);
      for (int r = 0; r < R; ++r) s[r][l] += static_cast<A>(w[r * k + j + l]) * yl;
    }
  for (int r = 0; r < R; ++r) {
    A acc = sum_lanes(s[r]);
    for (int64_t jj = j; jj < k; ++jj) acc += static_cast<A>(w[r * k + jj]) * static_cast<A>(y[jj]);
    t[r] = acc;
  }
}

// acc_j += sum_r t_r w[r*k + j] for R consecutive rows: one load and store of acc
// per R rows.
template <int R, typename T>
inline void axpy_rows(const acc_t<T>* t, const T* w, int64_t k, acc_t<T>* acc) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < k; ++j) {
    A s = acc[j];
    for (int r = 0; r < R; ++r) s += t[r] * static_cast<A>(w[r * k + j]);
    acc[j] = s;
  }
}

// out_j = a * x_j
template <typename T>
inline void scale(acc_t<T> a, const T* x, T* out, int64_t n) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(a * static_cast<A>(x[j]));
}

// out_j = (x_j * a) * b: two factors whose product may overflow where the result does not
template <typename T>
inline void scale2(acc_t<T> a, acc_t<T> b, const T* x, T* out, int64_t n) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>((static_cast<A>(x[j]) * a) * b);
}

// out_j = a * x_j - b * y_j   (y in the accumulation type)
template <typename T>
inline void axpby(acc_t<T> a, const T* x, acc_t<T> b, const acc_t<T>* y, T* out, int64_t n) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(a * static_cast<A>(x[j]) - b * y[j]);
}

#if defined(__AVX512F__)
// float32 versions with streaming stores: the output goes to memory without being
// read first or evicting the inputs from cache. Call stream_fence() before the
// results are read by another thread.
inline void scale_stream(float a, const float* x, float* out, int64_t n) {
  int64_t j = 0;
  for (; j < n && (reinterpret_cast<uintptr_t>(out + j) & 63); ++j) out[j] = a * x[j];
  const __m512 va = _mm512_set1_ps(a);
  for (; j + 16 <= n; j += 16) _mm512_stream_ps(out + j, _mm512_mul_ps(va, _mm512_loadu_ps(x + j)));
  for (; j < n; ++j) out[j] = a * x[j];
}
inline void axpby_stream(float a, const float* x, float b, const float* y, float* out, int64_t n) {
  int64_t j = 0;
  for (; j < n && (reinterpret_cast<uintptr_t>(out + j) & 63); ++j) out[j] = a * x[j] - b * y[j];
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  for (; j + 16 <= n; j += 16)
    _mm512_stream_ps(out + j, _mm512_fnmadd_ps(vb, _mm512_loadu_ps(y + j),
                                               _mm512_mul_ps(va, _mm512_loadu_ps(x + j))));
  for (; j < n; ++j) out[j] = a * x[j] - b * y[j];
}
inline void stream_fence() { _mm_sfence(); }
#endif

}  // namespace cpu
}  // namespace lipkernels
