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

#include "../binding_utils.h"
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

// out[b*N + j] = coef[b] * x[b*N + j], split evenly over threads.
template <typename T>
void scale_samples(const T* x, const acc_t<T>* coef, int64_t B, int64_t N, T* out) {
  if (N == 0) return;
  at::parallel_for(0, B * N, kGrain, [&](int64_t begin, int64_t end) {
    int64_t b = begin / N;
    while (begin < end) {
      const int64_t stop = std::min(end, (b + 1) * N);
      scale(coef[b], x + begin, out + begin, stop - begin);
      begin = stop;
      ++b;
    }
  });
}

// norm[b] = ||g_b||, out[b] = epilogue(f_b, norm[b]) (both in the accumulation type).
template <typename T>
void norm_epilogue_forward_kernel(const T* g, int64_t B, int64_t N, const T* f, int64_t f_stride,
                                  Epilogue e, acc_t<T> param, acc_t<T>* out, acc_t<T>* norm) {
  using A = acc_t<T>;
  per_sample_reduce<A>(B, N, norm, [&](int64_t b, int64_t start, int64_t len) {
    return sum_squares(g + b * N + start, len);
  });
  for (int64_t b = 0; b < B; ++b) {
    norm[b] = std::sqrt(norm[b]);
    const A fb = f ? static_cast<A>(f[b * f_stride]) : A(0);
    out[b] = epilogue_forward<A>(e, fb, norm[b], param);
  }
}

template <typename T>
void norm_epilogue_backward_kernel(const acc_t<T>* grad_out, const T* g, int64_t B, int64_t N,
                                   const T* f, int64_t f_stride, const acc_t<T>* norm, Epilogue e,
                                   acc_t<T> param, T* grad_f, T* grad_g) {
  using A = acc_t<T>;
  std::vector<A> coef(B);
  for (int64_t b = 0; b < B; ++b) {
    const A fb = f ? static_cast<A>(f[b * f_stride]) : A(0);
    A gf;
    epilogue_backward<A>(e, grad_out[b], fb, norm[b], param, &gf, &coef[b]);
    if (grad_f) grad_f[b] = static_cast<T>(gf);
  }
  scale_samples(g, coef.data(), B, N, grad_g);
}

// ---------------------------------------------------------------- bindings

std::tuple<at::Tensor, at::Tensor> norm_epilogue(const at::Tensor& g_in,
                                                 const std::optional<at::Tensor>& f,
                                                 c10::string_view epilogue, double param) {
  constexpr const char* op = "lipkernels::_norm_epilogue";
  check_batched(g_in, op, "g");
  const Epilogue e = parse_epilogue(epilogue);
  const bool use_f = epilogue_uses_f(e);
  TORCH_CHECK(use_f == (f.has_value() && f->defined()), op, ": epilogue '", std::string(epilogue),
              use_f ? "' needs f" : "' takes no f");
  if (use_f) check_per_sample(*f, g_in, op, "f");
  const at::Tensor g = as_sample_blocks(g_in);
  const int64_t B = g.size(0), N = g.numel() / B;
  const auto acc = acc_type_of(g.scalar_type());
  auto norm = at::empty({B}, g.options().dtype(acc));
  auto out_acc = at::empty({B}, g.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "norm_epilogue", [&] {
    using A = acc_t<scalar_t>;
    norm_epilogue_forward_kernel<scalar_t>(
        g.const_data_ptr<scalar_t>(), B, N, use_f ? f->const_data_ptr<scalar_t>() : nullptr,
        use_f ? f->stride(0) : 0, e, static_cast<A>(param), out_acc.mutable_data_ptr<A>(),
        norm.mutable_data_ptr<A>());
  });
  return {out_acc.to(epilogue_out_dtype(e, g.scalar_type())), norm};
}

std::tuple<at::Tensor, at::Tensor> norm_epilogue_backward(
    const at::Tensor& grad_out, const at::Tensor& g_in, const std::optional<at::Tensor>& f,
    const at::Tensor& norm, c10::string_view epilogue, double param) {
  constexpr const char* op = "lipkernels::_norm_epilogue_backward";
  check_batched(g_in, op, "g");
  const Epilogue e = parse_epilogue(epilogue);
  const bool use_f = epilogue_uses_f(e);
  TORCH_CHECK(use_f == (f.has_value() && f->defined()), op, ": epilogue '", std::string(epilogue),
              use_f ? "' needs f" : "' takes no f");
  if (use_f) check_per_sample(*f, g_in, op, "f");
  check_floating(grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == g_in.size(0), op,
              ": grad_out must have shape (B,), got ", grad_out.sizes());
  const int64_t B = g_in.size(0);
  TORCH_CHECK(norm.dim() == 1 && norm.size(0) == B && norm.is_contiguous() &&
                  norm.scalar_type() == acc_type_of(g_in.scalar_type()),
              op, ": norm must be the contiguous (B,) accumulation-type norm returned by _norm_epilogue");
  const at::Tensor g = as_sample_blocks(g_in);
  const int64_t N = g.numel() / B;
  auto grad_g = empty_output_like(g);
  auto grad_f = use_f ? at::empty({B}, g.options()) : at::empty({0}, g.options());
  const at::Tensor go = grad_out.to(acc_type_of(g.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "norm_epilogue_backward", [&] {
    using A = acc_t<scalar_t>;
    norm_epilogue_backward_kernel<scalar_t>(
        go.const_data_ptr<A>(), g.const_data_ptr<scalar_t>(), B, N,
        use_f ? f->const_data_ptr<scalar_t>() : nullptr, use_f ? f->stride(0) : 0,
        norm.const_data_ptr<A>(), e, static_cast<A>(param),
        use_f ? grad_f.mutable_data_ptr<scalar_t>() : nullptr, grad_g.mutable_data_ptr<scalar_t>());
  });
  return {grad_f, grad_g};
}

at::Tensor sample_scale(const at::Tensor& g_in, const at::Tensor& c) {
  constexpr const char* op = "lipkernels::sample_scale";
  check_batched(g_in, op, "g");
  check_floating(c, op, "c");
  check_same_device(c, g_in, op, "c", "g");
  TORCH_CHECK(c.dim() == 1 && c.size(0) == g_in.size(0), op,
              ": c must have shape (B,) with B = g.shape[0] = ", g_in.size(0), ", got ", c.sizes());
  const at::Tensor g = as_sample_blocks(g_in);
  const int64_t B = g.size(0), N = g.numel() / B;
  const at::Tensor coef = c.to(acc_type_of(g.scalar_type())).contiguous();
  auto out = empty_output_like(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sample_scale", [&] {
    scale_samples<scalar_t>(g.const_data_ptr<scalar_t>(), coef.const_data_ptr<acc_t<scalar_t>>(), B,
                            N, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor sample_dot(const at::Tensor& a_in, const at::Tensor& b_in) {
  constexpr const char* op = "lipkernels::sample_dot";
  check_batched(a_in, op, "a");
  check_floating(b_in, op, "b");
  check_same_device(a_in, b_in, op, "a", "b");
  TORCH_CHECK(a_in.sizes() == b_in.sizes() && a_in.scalar_type() == b_in.scalar_type(), op,
              ": a and b must have the same shape and dtype, got ", a_in.sizes(), " ",
              a_in.scalar_type(), " and ", b_in.sizes(), " ", b_in.scalar_type());
  auto [a, b] = as_matching_sample_blocks(a_in, b_in);
  const int64_t B = a.size(0), N = a.numel() / B;
  auto out = at::empty({B}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sample_dot", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    std::vector<A> acc(B);
    per_sample_reduce<A>(B, N, acc.data(), [&](int64_t s, int64_t start, int64_t len) {
      return dot(pa + s * N + start, pb + s * N + start, len);
    });
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    for (int64_t s = 0; s < B; ++s) po[s] = static_cast<scalar_t>(acc[s]);
  });
  return out;
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
