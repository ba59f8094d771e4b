// CPU kernels of the per-sample gradient-norm family: n_i = ||g_i||_2 fused with
// the GN / GraN / GP / R1 epilogues (one read of g), their backward (one read of
// g, one write of dL/dg), and the two helpers the double-differentiable backward is
// built from (sample_scale, sample_dot).
//
// Parallel with at::parallel_for. Large samples are split into fixed chunks whose
// partial sums are added in a fixed order, so results do not depend on the thread
// count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../bindings_common.h"
#include "../epilogue.h"
#include "output_cache.h"
#include "vec.h"

namespace lipkernels {
namespace cpu {
namespace {

// Elements per chunk of one sample, and the least work a thread is given.
constexpr int64_t kChunk = 32768;
constexpr int64_t kGrain = 32768;

// out[b] = sum over chunks c of partial(b, start_c, len_c), chunks of kChunk elements.
template <typename A, typename Partial>
void per_sample_reduce(int64_t B, int64_t N, A* out, const Partial& partial) {
  const int64_t nchunks = std::max<int64_t>(1, (N + kChunk - 1) / kChunk);
  if (nchunks == 1) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(N, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) out[b] = partial(b, 0, N);
    });
    return;
  }
  std::vector<A> parts(B * nchunks);
  at::parallel_for(0, B * nchunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nchunks, start = (i % nchunks) * kChunk;
      parts[i] = partial(b, start, std::min(kChunk, N - start));
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    A s = 0;
    for (int64_t c = 0; c < nchunks; ++c) s += parts[b * nchunks + c];
    out[b] = s;
  }
}

// out[b*N + j] = coef[b] * x[b*N + j] (with coef2: (x * coef[b]) * coef2[b]), split
// evenly over threads.
template <typename T>
void scale_samples(const T* x, const acc_t<T>* coef, int64_t B, int64_t N, T* out,
                   const acc_t<T>* coef2 = nullptr) {
  if (N == 0) return;
  at::parallel_for(0, B * N, kGrain, [&](int64_t begin, int64_t end) {
    int64_t b = begin / N;
    while (begin < end) {
      const int64_t stop = std::min(end, (b + 1) * N);
      if (coef2)
        scale2(coef[b], coef2[b], x + begin, out + begin, stop - begin);
      else
        scale(coef[b], x + begin, out + begin, stop - begin);
      begin = stop;
      ++b;
    }
  });
}

// norm[b] = ||g_b|| (accumulation type), out[b] = epilogue(f_b, norm[b]) computed in the
// accumulation type and stored as O (g's dtype, or the accumulation type for GP / R1).
template <typename T, typename O>
void norm_epilogue_forward_kernel(const T* g, int64_t B, int64_t N, const T* f, int64_t f_stride,
                                  Epilogue e, acc_t<T> param, O* out, acc_t<T>* norm) {
  using A = acc_t<T>;
  // One element per sample: n = |g_b| exactly, as torch.linalg.vector_norm gives (also
  // where g_b^2 would under- or overflow).
  if (N != 1)
    per_sample_reduce<A>(B, N, norm, [&](int64_t b, int64_t start, int64_t len) {
      return sum_squares(g + b * N + start, len);
    });
  for (int64_t b = 0; b < B; ++b) {
    norm[b] = N == 1 ? lk_abs(static_cast<A>(g[b])) : std::sqrt(norm[b]);
    const A fb = f ? static_cast<A>(f[b * f_stride]) : A(0);
    out[b] = static_cast<O>(epilogue_forward<A>(e, fb, norm[b], param));
  }
}

template <typename T>
void norm_epilogue_backward_kernel(const acc_t<T>* grad_out, int64_t go_stride, const T* g,
                                   int64_t B, int64_t N,
                                   const T* f, int64_t f_stride, const acc_t<T>* norm, Epilogue e,
                                   acc_t<T> param, T* grad_f, T* grad_g) {
  using A = acc_t<T>;
  // dL/dg_bj = (g_bj * f0[b]) * f1[b] (epilogue.h). One element per sample: dL/dg_b =
  // dL/dn_b * (g_b / n_b) (n_b = |g_b| may be subnormal, 1 / n_b overflow); R1's
  // 2 go g_b is exact as it is.
  std::vector<A> f0(B), f1(B);
  const bool single = N == 1 && e != Epilogue::R1;
  for (int64_t b = 0; b < B; ++b) {
    const A fb = f ? static_cast<A>(f[b * f_stride]) : A(0);
    A gf, coef;
    epilogue_backward<A>(e, grad_out[b * go_stride], fb, norm[b], param, &gf, &coef, &f0[b], &f1[b]);
    if (grad_f) grad_f[b] = static_cast<T>(gf);
    if (single) grad_g[b] = static_cast<T>(epilogue_single_grad<A>(f1[b], static_cast<A>(g[b]), norm[b]));
  }
  if (!single) scale_samples(g, f0.data(), B, N, grad_g, f1.data());
}

// ---------------------------------------------------------------- bindings
// Argument checks, layouts and outputs: bindings_common.h (shared with the CUDA bindings).

std::tuple<at::Tensor, at::Tensor> norm_epilogue(const at::Tensor& g_in,
                                                 const std::optional<at::Tensor>& f,
                                                 c10::string_view epilogue, double param) {
  auto c = prepare_norm_epilogue(g_in, f, epilogue, param, "lipkernels::_norm_epilogue");
  const bool use_f = c.f.defined();
  const bool out_acc = c.out.scalar_type() != c.g.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.g.scalar_type(), "norm_epilogue", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* f_ptr = use_f ? c.f.const_data_ptr<scalar_t>() : nullptr;
    const int64_t f_stride = use_f ? c.f.stride(0) : 0;
    if (out_acc)
      norm_epilogue_forward_kernel<scalar_t, A>(c.g.const_data_ptr<scalar_t>(), c.B, c.N, f_ptr,
                                                f_stride, c.e, static_cast<A>(param),
                                                c.out.mutable_data_ptr<A>(), c.norm.mutable_data_ptr<A>());
    else
      norm_epilogue_forward_kernel<scalar_t, scalar_t>(
          c.g.const_data_ptr<scalar_t>(), c.B, c.N, f_ptr, f_stride, c.e, static_cast<A>(param),
          c.out.mutable_data_ptr<scalar_t>(), c.norm.mutable_data_ptr<A>());
  });
  return {c.out, c.norm};
}

std::tuple<at::Tensor, at::Tensor> norm_epilogue_backward(
    const at::Tensor& grad_out, const at::Tensor& g_in, const std::optional<at::Tensor>& f,
    const at::Tensor& norm, c10::string_view epilogue, double param) {
  auto c = prepare_norm_epilogue_backward(grad_out, g_in, f, norm, epilogue, param, &empty_output_like,
                                          "lipkernels::_norm_epilogue_backward");
  const bool use_f = c.f.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.g.scalar_type(), "norm_epilogue_backward", [&] {
    using A = acc_t<scalar_t>;
    norm_epilogue_backward_kernel<scalar_t>(
        c.go.const_data_ptr<A>(), c.go_stride, c.g.const_data_ptr<scalar_t>(), c.B, c.N,
        use_f ? c.f.const_data_ptr<scalar_t>() : nullptr, use_f ? c.f.stride(0) : 0,
        c.norm.const_data_ptr<A>(), c.e, static_cast<A>(param),
        use_f ? c.grad_f.mutable_data_ptr<scalar_t>() : nullptr, c.grad_g.mutable_data_ptr<scalar_t>());
  });
  return {c.grad_f, c.grad_g};
}

at::Tensor sample_scale(const at::Tensor& g_in, const at::Tensor& c_in) {
  auto c = prepare_sample_scale(g_in, c_in, &empty_output_like, "lipkernels::sample_scale");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.g.scalar_type(), "sample_scale", [&] {
    scale_samples<scalar_t>(c.g.const_data_ptr<scalar_t>(), c.coef.const_data_ptr<acc_t<scalar_t>>(),
                            c.B, c.N, c.out.mutable_data_ptr<scalar_t>());
  });
  return c.out;
}

at::Tensor sample_dot(const at::Tensor& a_in, const at::Tensor& b_in) {
  auto c = prepare_sample_dot(a_in, b_in, "lipkernels::sample_dot");
  const int64_t B = c.B, N = c.N;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.a.scalar_type(), "sample_dot", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* pa = c.a.const_data_ptr<scalar_t>();
    const scalar_t* pb = c.b.const_data_ptr<scalar_t>();
    std::vector<A> acc(B);
    per_sample_reduce<A>(B, N, acc.data(), [&](int64_t s, int64_t start, int64_t len) {
      return dot(pa + s * N + start, pb + s * N + start, len);
    });
    scalar_t* po = c.out.mutable_data_ptr<scalar_t>();
    for (int64_t s = 0; s < B; ++s) po[s] = static_cast<scalar_t>(acc[s]);
  });
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lipkernels, CPU, m) {
  m.impl("_norm_epilogue", &norm_epilogue);
  m.impl("_norm_epilogue_backward", &norm_epilogue_backward);
  m.impl("sample_scale", &sample_scale);
  m.impl("sample_dot", &sample_dot);
}

}  // namespace cpu
}  // namespace lipkernels
