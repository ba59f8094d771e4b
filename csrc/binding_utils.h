// Argument checks and layout helpers shared by the CPU and CUDA bindings (the thin
// layer that turns at::Tensor into pointers and sizes for the kernels).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>
#include <utility>
#include <vector>

#include "epilogue.h"

namespace lipkernels {

inline Epilogue parse_epilogue(c10::string_view name) {
  if (name == "norm") return Epilogue::Norm;
  if (name == "gn") return Epilogue::GN;
  if (name == "gran") return Epilogue::GraN;
  if (name == "gp") return Epilogue::GP;
  if (name == "r1") return Epilogue::R1;
  TORCH_CHECK(false, "lipkernels: unknown epilogue '", std::string(name),
              "', expected one of norm, gn, gran, gp, r1");
}

inline bool epilogue_uses_f(Epilogue e) {
  return e == Epilogue::GN || e == Epilogue::GraN;
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor (float64, float32, float16 or bfloat16), got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ", name_b,
              " is on ", b.device(), "; both must be on the same device");
}

// The per-sample gradient g: rank >= 2, batch first (B = 0 is an empty batch).
inline void check_batched(const at::Tensor& g, const char* op, const char* name) {
  check_floating(g, op, name);
  TORCH_CHECK(g.dim() >= 2, op, ": ", name,
              " must have shape (B, ...) with rank >= 2 (one row per sample), got rank ", g.dim());
}

// Elements of one sample of a (B, ...) tensor (also for B = 0).
inline int64_t sample_numel(const at::Tensor& g) {
  int64_t n = 1;
  for (int64_t d = 1; d < g.dim(); ++d) n *= g.size(d);
  return n;
}

// f: shape (B,), same dtype and device as g.
inline void check_per_sample(const at::Tensor& f, const at::Tensor& g, const char* op,
                             const char* name) {
  check_floating(f, op, name);
  check_same_device(f, g, op, name, "g");
  TORCH_CHECK(f.dim() == 1 && f.size(0) == g.size(0), op, ": ", name,
              " must have shape (B,) with B = g.shape[0] = ", g.size(0), ", got ", f.sizes());
  TORCH_CHECK(f.scalar_type() == g.scalar_type(), op, ": ", name, " has dtype ", f.scalar_type(),
              " but g has dtype ", g.scalar_type(), "; they must match");
}

// True when every sample of t is one dense block of numel/B elements in memory
// (contiguous, channels-last, any dense permutation that keeps the batch outermost),
// so a kernel can walk sample b as the block [b*N, (b+1)*N) from the data pointer.
inline bool has_sample_blocks(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  if (!t.is_non_overlapping_and_dense()) return false;
  const int64_t B = t.size(0);
  return B == 1 || t.stride(0) * B == t.numel();
}

inline at::Tensor as_sample_blocks(const at::Tensor& t) {
  return has_sample_blocks(t) ? t : t.contiguous();
}

// Two tensors walked element by element in the same memory order.
inline std::pair<at::Tensor, at::Tensor> as_matching_sample_blocks(const at::Tensor& a,
                                                                   const at::Tensor& b) {
  if (has_sample_blocks(a) && has_sample_blocks(b) && a.strides() == b.strides()) return {a, b};
  return {a.contiguous(), b.contiguous()};
}

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-sample outputs have g's dtype, except the penalties' squared norms, which
// would overflow float16: those (and the penalties) are in the accumulation type.
inline at::ScalarType epilogue_out_dtype(Epilogue e, at::ScalarType g_dtype) {
  return (e == Epilogue::GP || e == Epilogue::R1) ? acc_type_of(g_dtype) : g_dtype;
}

// Spectral-norm batches: lists of weights (viewed as matrices w.flatten(1), shape
// (m, k)), and their vectors u (m,) and v (k,), all of one dtype and device.
inline void check_spectral_batch(at::TensorList weights, at::TensorList us, at::TensorList vs,
                                 const char* op) {
  TORCH_CHECK(us.size() == weights.size() && vs.size() == weights.size(), op,
              ": weights, us and vs must have the same length, got ", weights.size(), ", ",
              us.size(), " and ", vs.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    check_floating(w, op, "weights[i]");
    TORCH_CHECK(w.dim() >= 2, op, ": weights[", i, "] must have rank >= 2 (viewed as w.flatten(1)), got rank ",
                w.dim());
    TORCH_CHECK(w.numel() > 0, op, ": weights[", i, "] is empty, shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == weights[0].scalar_type() && w.device() == weights[0].device(),
                op, ": all weights must share one dtype and device; weights[", i, "] is ",
                w.scalar_type(), " on ", w.device(), ", weights[0] is ", weights[0].scalar_type(),
                " on ", weights[0].device());
    const int64_t m = w.size(0), k = w.numel() / m;
    const at::Tensor& u = us[i];
    const at::Tensor& v = vs[i];
    TORCH_CHECK(u.dim() == 1 && u.size(0) == m, op, ": us[", i, "] must have shape (", m,
                ",) for weights[", i, "] of shape ", w.sizes(), ", got ", u.sizes());
    TORCH_CHECK(v.dim() == 1 && v.size(0) == k, op, ": vs[", i, "] must have shape (", k,
                ",) for weights[", i, "] of shape ", w.sizes(), ", got ", v.sizes());
    TORCH_CHECK(u.scalar_type() == w.scalar_type() && v.scalar_type() == w.scalar_type(), op,
                ": us[", i, "] and vs[", i, "] must have the dtype of weights[", i, "] (",
                w.scalar_type(), ")");
    TORCH_CHECK(u.device() == w.device() && v.device() == w.device(), op, ": us[", i, "] and vs[",
                i, "] must be on the device of weights[", i, "] (", w.device(), ")");
    TORCH_CHECK(u.is_contiguous() && v.is_contiguous(), op, ": us[", i, "] and vs[", i,
                "] must be contiguous (they are updated in place)");
  }
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace lipkernels
