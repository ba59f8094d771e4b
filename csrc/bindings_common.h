// The device-independent half of every kernel binding: argument checks, layout
// handling and output allocation, shared by the CPU bindings (cpu/*.cpp) and the
// CUDA bindings (cuda/bindings.cpp), so that both backends accept and return exactly
// the same things. A binding calls prepare_*, then hands the pointers and sizes of
// the prepared tensors to its device's kernels.
//
// Outputs of the size of an input (dL/dg, W_sn, dL/dW) come from the device's
// EmptyLike: the CPU output cache on CPU, torch's caching allocator on CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "binding_utils.h"
#include "epilogue.h"

namespace lipkernels {

// An uninitialised tensor with the sizes and strides of a dense, non-overlapping t.
using EmptyLike = at::Tensor (*)(const at::Tensor&);

// A parameter the kernels convert to the accumulation type (float32 for float32 and
// half-precision inputs) must stay finite there, and non-zero if it is non-zero: the
// same check, and message, as lipkernels/ops/_validate.py's fits(). Thresholds: the
// least |x| that rounds to Inf in float32 (FLT_MAX + half an ulp), the largest that
// rounds to 0 (half the least subnormal).
inline void check_param_fits(double x, at::ScalarType dtype, const char* op, const char* name) {
  if (acc_type_of(dtype) == at::kDouble || x == 0 || x != x) return;
  const double mag = x < 0 ? -x : x;
  TORCH_CHECK(mag < 0x1.ffffffp+127, op, ": ", name, " = ", x,
              " overflows float32, the dtype the op computes in for ", dtype, " inputs");
  TORCH_CHECK(mag > 0x1p-150, op, ": ", name, " = ", x,
              " underflows to 0 in float32, the dtype the op computes in for ", dtype, " inputs");
}

inline void check_epilogue_param(Epilogue e, double param, at::ScalarType dtype, const char* op) {
  if (e == Epilogue::GraN) check_param_fits(param, dtype, op, "eps");
  if (e == Epilogue::GP) check_param_fits(param, dtype, op, "center");
}

// ------------------------------------------------------------ per-sample norm family

inline void check_epilogue_f(Epilogue e, const std::optional<at::Tensor>& f, const at::Tensor& g,
                             c10::string_view epilogue, const char* op) {
  const bool use_f = epilogue_uses_f(e);
  TORCH_CHECK(use_f == (f.has_value() && f->defined()), op, ": epilogue '", std::string(epilogue),
              use_f ? "' needs f" : "' takes no f");
  if (use_f) check_per_sample(*f, g, op, "f");
}

struct NormEpilogueCall {
  Epilogue e;
  at::Tensor g;     // (B, ...) with sample blocks: sample b is [b*N, (b+1)*N) from g's pointer
  at::Tensor f;     // (B,) of g's dtype, any stride; undefined when the epilogue takes no f
  int64_t B, N;
  at::Tensor out;   // (B,) of epilogue_out_dtype(e, g's dtype)
  at::Tensor norm;  // (B,) contiguous, accumulation type
};

inline NormEpilogueCall prepare_norm_epilogue(const at::Tensor& g_in,
                                              const std::optional<at::Tensor>& f,
                                              c10::string_view epilogue, double param,
                                              const char* op) {
  check_batched(g_in, op, "g");
  const Epilogue e = parse_epilogue(epilogue);
  check_epilogue_f(e, f, g_in, epilogue, op);
  check_epilogue_param(e, param, g_in.scalar_type(), op);
  NormEpilogueCall c;
  c.e = e;
  c.g = as_sample_blocks(g_in);
  if (epilogue_uses_f(e)) c.f = *f;
  c.B = c.g.size(0);
  c.N = sample_numel(c.g);
  const auto dtype = c.g.scalar_type();
  c.norm = at::empty({c.B}, c.g.options().dtype(acc_type_of(dtype)));
  c.out = at::empty({c.B}, c.g.options().dtype(epilogue_out_dtype(e, dtype)));
  return c;
}

struct NormEpilogueBackwardCall {
  Epilogue e;
  at::Tensor g, f;  // as in NormEpilogueCall
  at::Tensor go;    // dL/dout: (B,) of the accumulation type, any stride (go_stride): a
                   // sum's or mean's backward gives one stride-0 value, read in place
  int64_t go_stride;
  at::Tensor norm;  // (B,) contiguous, accumulation type
  int64_t B, N;
  at::Tensor grad_f;  // (B,) of g's dtype; (0,) when the epilogue takes no f
  at::Tensor grad_g;  // g's sizes and strides
};

inline NormEpilogueBackwardCall prepare_norm_epilogue_backward(
    const at::Tensor& grad_out, const at::Tensor& g_in, const std::optional<at::Tensor>& f,
    const at::Tensor& norm, c10::string_view epilogue, double param, EmptyLike empty_like,
    const char* op) {
  check_batched(g_in, op, "g");
  const Epilogue e = parse_epilogue(epilogue);
  check_epilogue_f(e, f, g_in, epilogue, op);
  check_epilogue_param(e, param, g_in.scalar_type(), op);
  check_floating(grad_out, op, "grad_out");
  check_same_device(grad_out, g_in, op, "grad_out", "g");
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == g_in.size(0), op,
              ": grad_out must have shape (B,), got ", grad_out.sizes());
  const int64_t B = g_in.size(0);
  TORCH_CHECK(norm.dim() == 1 && norm.size(0) == B && norm.is_contiguous() &&
                  norm.scalar_type() == acc_type_of(g_in.scalar_type()),
              op, ": norm must be the contiguous (B,) accumulation-type norm returned by _norm_epilogue");
  check_same_device(norm, g_in, op, "norm", "g");
  NormEpilogueBackwardCall c;
  c.e = e;
  c.g = as_sample_blocks(g_in);
  if (epilogue_uses_f(e)) c.f = *f;
  c.norm = norm;
  c.B = B;
  c.N = sample_numel(c.g);
  c.grad_g = empty_like(c.g);
  c.grad_f = epilogue_uses_f(e) ? at::empty({B}, c.g.options()) : at::empty({0}, c.g.options());
  c.go = grad_out.to(acc_type_of(c.g.scalar_type()));
  c.go_stride = c.go.stride(0);
  return c;
}

struct SampleScaleCall {
  at::Tensor g;     // sample blocks
  at::Tensor coef;  // (B,) contiguous, accumulation type
  int64_t B, N;
  at::Tensor out;   // g's sizes and strides
};

inline SampleScaleCall prepare_sample_scale(const at::Tensor& g_in, const at::Tensor& c,
                                            EmptyLike empty_like, const char* op) {
  check_batched(g_in, op, "g");
  check_floating(c, op, "c");
  check_same_device(c, g_in, op, "c", "g");
  TORCH_CHECK(c.dim() == 1 && c.size(0) == g_in.size(0), op,
              ": c must have shape (B,) with B = g.shape[0] = ", g_in.size(0), ", got ", c.sizes());
  SampleScaleCall call;
  call.g = as_sample_blocks(g_in);
  call.B = call.g.size(0);
  call.N = sample_numel(call.g);
  call.coef = c.to(acc_type_of(call.g.scalar_type())).contiguous();
  call.out = empty_like(call.g);
  return call;
}

struct SampleDotCall {
  at::Tensor a, b;  // sample blocks, same strides
  int64_t B, N;
  at::Tensor out;   // (B,) of a's dtype
};

inline SampleDotCall prepare_sample_dot(const at::Tensor& a_in, const at::Tensor& b_in,
                                        const char* op) {
  check_batched(a_in, op, "a");
  check_floating(b_in, op, "b");
  check_same_device(a_in, b_in, op, "a", "b");
  TORCH_CHECK(a_in.sizes() == b_in.sizes() && a_in.scalar_type() == b_in.scalar_type(), op,
              ": a and b must have the same shape and dtype, got ", a_in.sizes(), " ",
              a_in.scalar_type(), " and ", b_in.sizes(), " ", b_in.scalar_type());
  SampleDotCall call;
  std::tie(call.a, call.b) = as_matching_sample_blocks(a_in, b_in);
  call.B = call.a.size(0);
  call.N = sample_numel(call.a);
  call.out = at::empty({call.B}, call.a.options());
  return call;
}

// ------------------------------------------------------------ spectral normalization

inline void check_iteration_args(const char* op, int64_t n_power_iterations, double eps) {
  TORCH_CHECK(n_power_iterations >= 0, op, ": n_power_iterations must be >= 0, got ",
              n_power_iterations);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
}

// Elements of the flat vector tensor u_0, v_0, u_1, v_1, ... of a list of weights.
inline int64_t flat_uv_size(at::TensorList weights) {
  int64_t n = 0;
  for (const auto& w : weights) n += w.size(0) + w.numel() / w.size(0);
  return n;
}

struct PowerIterationCall {
  std::vector<at::Tensor> weights;  // contiguous; empty: nothing to do, return sigmas
  at::Tensor sigmas;                // (L,) accumulation type
};

inline PowerIterationCall prepare_power_iteration(at::TensorList weights_in, at::TensorList us,
                                                  at::TensorList vs, int64_t n_power_iterations,
                                                  double eps, const char* op) {
  check_spectral_batch(weights_in, us, vs, op);
  check_iteration_args(op, n_power_iterations, eps);
  if (!weights_in.empty()) check_param_fits(eps, weights_in[0].scalar_type(), op, "eps");
  PowerIterationCall call;
  if (weights_in.empty()) {
    call.sigmas = at::empty({0}, at::kFloat);
    return call;
  }
  call.weights = contiguous_all(weights_in);
  call.sigmas = at::empty({static_cast<int64_t>(call.weights.size())},
                          call.weights[0].options().dtype(acc_type_of(call.weights[0].scalar_type())));
  return call;
}

struct SnForwardCall {
  std::vector<at::Tensor> weights;  // contiguous
  std::vector<at::Tensor> outs;     // W_sn, one per weight, the weight's sizes and strides
  at::Tensor sigmas;                // (L,) accumulation type
  at::Tensor uv;                    // (sum of m + k,) of the weights' dtype, uninitialised
};

inline SnForwardCall prepare_sn_forward(at::TensorList weights_in, at::TensorList us,
                                        at::TensorList vs, int64_t n_power_iterations, double eps,
                                        EmptyLike empty_like, const char* op) {
  check_spectral_batch(weights_in, us, vs, op);
  check_iteration_args(op, n_power_iterations, eps);
  if (!weights_in.empty()) check_param_fits(eps, weights_in[0].scalar_type(), op, "eps");
  SnForwardCall call;
  call.weights = contiguous_all(weights_in);
  const auto opts = call.weights.empty() ? at::TensorOptions(at::kFloat) : call.weights[0].options();
  const auto dtype = opts.dtype().toScalarType();
  call.sigmas = at::empty({static_cast<int64_t>(call.weights.size())}, opts.dtype(acc_type_of(dtype)));
  call.uv = at::empty({flat_uv_size(call.weights)}, opts);
  for (const auto& w : call.weights) call.outs.push_back(empty_like(w));
  return call;
}

// Returns the total number of elements of us and vs (= uv.numel()).
inline int64_t check_sn_store_vectors(at::TensorList us, at::TensorList vs, const at::Tensor& uv,
                                      const char* op) {
  TORCH_CHECK(us.size() == vs.size(), op, ": us and vs must have the same length");
  int64_t n = 0;
  for (size_t i = 0; i < us.size(); ++i) {
    TORCH_CHECK(us[i].is_contiguous() && vs[i].is_contiguous() &&
                    us[i].scalar_type() == uv.scalar_type() && vs[i].scalar_type() == uv.scalar_type(),
                op, ": us[", i, "] and vs[", i, "] must be contiguous, of uv's dtype");
    TORCH_CHECK(us[i].device() == uv.device() && vs[i].device() == uv.device(), op, ": us[", i,
                "] and vs[", i, "] must be on uv's device (", uv.device(), ")");
    n += us[i].numel() + vs[i].numel();
  }
  TORCH_CHECK(uv.dim() == 1 && uv.is_contiguous() && uv.numel() == n, op,
              ": uv must be contiguous with ", n, " elements, got ", uv.sizes());
  return n;
}

struct SnBackwardCall {
  std::vector<at::Tensor> weights, grads;  // contiguous; empty: nothing to do
  std::vector<at::Tensor> outs;            // dL/dW, the weights' sizes and strides
};

inline SnBackwardCall prepare_sn_backward(at::TensorList grads_in, at::TensorList weights_in,
                                          const at::Tensor& uv, const at::Tensor& sigmas,
                                          double eps, EmptyLike empty_like, const char* op) {
  TORCH_CHECK(grads_in.size() == weights_in.size(), op, ": expected ", weights_in.size(),
              " grads, got ", grads_in.size());
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  SnBackwardCall call;
  if (weights_in.empty()) return call;
  call.weights = contiguous_all(weights_in);
  call.grads = contiguous_all(grads_in);
  const auto& weights = call.weights;
  const auto& grads = call.grads;
  const auto dtype = weights[0].scalar_type();
  check_param_fits(eps, dtype, op, "eps");
  for (size_t i = 0; i < weights.size(); ++i) {
    check_floating(weights[i], op, "weights[i]");
    TORCH_CHECK(weights[i].dim() >= 2 && weights[i].scalar_type() == dtype &&
                    weights[i].device() == weights[0].device(),
                op, ": weights must have rank >= 2 and share one dtype and device");
    TORCH_CHECK(grads[i].sizes() == weights[i].sizes() && grads[i].scalar_type() == dtype &&
                    grads[i].device() == weights[i].device(),
                op, ": grads[", i, "] must match weights[", i, "] in shape, dtype and device");
  }
  TORCH_CHECK(uv.dim() == 1 && uv.size(0) == flat_uv_size(weights) && uv.is_contiguous() &&
                  uv.scalar_type() == dtype && uv.device() == weights[0].device(),
              op, ": uv must be the flat (u_0, v_0, u_1, ...) tensor returned by _sn_forward");
  TORCH_CHECK(sigmas.dim() == 1 && sigmas.size(0) == static_cast<int64_t>(weights.size()) &&
                  sigmas.is_contiguous() && sigmas.scalar_type() == acc_type_of(dtype) &&
                  sigmas.device() == weights[0].device(),
              op, ": sigmas must be the contiguous (L,) tensor returned by _sn_forward");
  for (const auto& w : weights) call.outs.push_back(empty_like(w));
  return call;
}

// ------------------------------------------------------------ weight clipping

// Checks clip_'s arguments for a kernel on `device_type` tensors; returns the offsets
// of every tensor in the concatenation of all (offsets[i] .. offsets[i + 1]).
inline std::vector<int64_t> check_clip(at::TensorList tensors, double c, c10::DeviceType device_type,
                                       const char* op) {
  TORCH_CHECK(c > 0, op, ": c must be > 0, got ", c);
  std::vector<int64_t> offsets(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_floating(tensors[i], op, "tensors[i]");
    TORCH_CHECK(tensors[i].is_contiguous() && tensors[i].device().type() == device_type, op,
                ": tensors[", i, "] must be a contiguous ", c10::DeviceTypeName(device_type),
                " tensor");
    if (i > 0)
      TORCH_CHECK(tensors[i].device() == tensors[0].device(), op, ": tensors[", i, "] is on ",
                  tensors[i].device(), " but tensors[0] is on ", tensors[0].device());
    offsets[i + 1] = offsets[i] + tensors[i].numel();
  }
  return offsets;
}

}  // namespace lipkernels
