// The lipkernels operator library: every schema is declared here, once; the
// device kernels register under these schemas in cpu/ (and cuda/), the fake
// (meta) kernels in lipkernels/ops/_registry.py.
//
// Public ops (differentiable, autograd in C++ below):
//   sample_norm, gn_normalize, gran_normalize, gradient_penalty, r1_penalty,
//   sample_scale, sample_dot, spectral_normalize
// Kernel ops (one per device kernel, no derivative):
//   _norm_epilogue, _norm_epilogue_backward, power_iteration, _sn_forward, _sn_store_vectors_,
//   _sn_backward, clip_
//
// Backward passes are exact. When a backward runs with create_graph=True it is
// built from differentiable ops (sample_norm, sample_scale, sample_dot, ATen), so
// every public op supports derivatives of any order; otherwise it runs the fused
// single-pass backward kernel.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/outer.h>
#include <ATen/ops/where.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "binding_utils.h"
#include "cpu/output_cache.h"
#include "epilogue.h"
#include "torch_compat.h"

#ifndef LIPKERNELS_VERSION
#define LIPKERNELS_VERSION unknown
#endif
#ifndef LIPKERNELS_CUDA_ARCHS
#define LIPKERNELS_CUDA_ARCHS
#endif
// Why a build has no CUDA kernels, as a code that lipkernels/_extension.py explains:
// disabled_by_env, torch_without_cuda, nvcc_not_found, cmake_option_off.
#ifndef LIPKERNELS_NO_CUDA_REASON
#define LIPKERNELS_NO_CUDA_REASON unknown
#endif
#define LK_STR_(x) #x
#define LK_STR(x) LK_STR_(x)

namespace lipkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;
using at::Tensor;

const char* epilogue_name(Epilogue e) {
  switch (e) {
    case Epilogue::Norm: return "norm";
    case Epilogue::GN: return "gn";
    case Epilogue::GraN: return "gran";
    case Epilogue::GP: return "gp";
    case Epilogue::R1: return "r1";
  }
  return "?";
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").typed<Sig>();
}

// The operator namespaces: the library's own, and in an emulation build
// (LIPKERNELS_CUDA_EMULATION) a second one with the same schemas whose kernels are the
// CUDA kernel sources compiled for the host, for CPU tensors (cuda/bindings.cpp). The
// autograd below is written once, for both: Ns names the namespace whose kernel ops
// an op's autograd calls.
struct MainNs {
  static constexpr const char* name = "lipkernels";
};
struct CudaEmulationNs {
  static constexpr const char* name = "lipkernels_cuda_emu";
};
// The per-call floor's namespace: these autograd kernels over kernel ops that only
// allocate their outputs (floor.cpp; a benchmark calibration).
struct FloorNs {
  static constexpr const char* name = "lipkernels_floor";
};

#define LK_OP(fn, op_name, sig)                                                           \
  template <class Ns>                                                                     \
  const c10::TypedOperatorHandle<sig>& fn() {                                             \
    static const auto handle = find_op<sig>(std::string(Ns::name) + "::" op_name);         \
    return handle;                                                                        \
  }

using TensorPair = std::tuple<Tensor, Tensor>;
LK_OP(norm_epilogue_op, "_norm_epilogue",
      TensorPair(const Tensor&, const std::optional<Tensor>&, c10::string_view, double))
LK_OP(norm_epilogue_backward_op, "_norm_epilogue_backward",
      TensorPair(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                 c10::string_view, double))
LK_OP(sample_norm_op, "sample_norm", Tensor(const Tensor&))
LK_OP(sample_scale_op, "sample_scale", Tensor(const Tensor&, const Tensor&))
LK_OP(sample_dot_op, "sample_dot", Tensor(const Tensor&, const Tensor&))
LK_OP(power_iteration_op, "power_iteration",
      Tensor(at::TensorList, at::TensorList, at::TensorList, int64_t, double))
using SnForwardResult = std::tuple<std::vector<Tensor>, Tensor, Tensor>;
LK_OP(sn_forward_op, "_sn_forward",
      SnForwardResult(at::TensorList, at::TensorList, at::TensorList, int64_t, double))
LK_OP(sn_store_vectors_op, "_sn_store_vectors_",
      void(at::TensorList, at::TensorList, const Tensor&))
LK_OP(clip_op, "clip_", void(at::TensorList, double))
LK_OP(sn_backward_op, "_sn_backward",
      std::vector<Tensor>(at::TensorList, at::TensorList, const Tensor&, const Tensor&, double))

// ------------------------------------------------- per-sample norm family

// The epilogue's backward written with differentiable ops (used under create_graph).
// Mirrors epilogue_backward() in epilogue.h (special values included); guarded
// divisions keep the unused branch of every where() finite for finite input, so no
// NaN leaks into higher derivatives.
// (dL/df, c, dL/dn) with dL/dg = c g (dL/dn * g / n for one-element samples).
std::tuple<Tensor, Tensor, Tensor> epilogue_backward_differentiable(Epilogue e, const Tensor& go,
                                                                    const Tensor& f, const Tensor& n,
                                                                    double param) {
  // 1/n masked to 0 where n = 0; a NaN n stays NaN (as in epilogue.h).
  const Tensor nz = n != 0;
  const Tensor inv_n = nz.to(n.scalar_type()) / at::where(nz, n, at::ones_like(n));
  switch (e) {
    case Epilogue::Norm:
      return {Tensor(), go * inv_n, go};
    case Epilogue::GN: {
      const Tensor d = n + f.abs();
      const Tensor dzero = d == 0;
      const Tensor d_safe = at::where(dzero, at::ones_like(d), d);
      const Tensor grad_d = at::where(dzero, at::zeros_like(d), -go * ((f / d_safe) / d_safe));
      const Tensor grad_f = at::where(
          dzero, at::zeros_like(d),
          at::where(d.isfinite(), (go * (n / d_safe)) / d_safe, go / d_safe + grad_d * f.sgn()));
      return {grad_f, grad_d * inv_n, grad_d};
    }
    case Epilogue::GraN: {
      const Tensor q = n * n + param;
      const Tensor r = n / q;
      const Tensor grad_r = go * f;
      const Tensor grad_n =
          at::where(q.isfinite() & grad_r.isfinite(), grad_r * (((param - n * n) / q) / q),
                    grad_r / q - 2 * (grad_r * (r / q)) * n);
      return {go * r, grad_n * inv_n, grad_n};
    }
    case Epilogue::GP: {
      const Tensor grad_n = go * 2 * (n - param);
      return {Tensor(), grad_n * inv_n, grad_n};
    }
    case Epilogue::R1:
      return {Tensor(), go * 2, Tensor()};
  }
  return {};
}

// The autograd node of the per-sample ops, written as ATen's generated nodes are (a
// Node with SavedVariables, attached with set_history) rather than as a
// torch::autograd::Function: the Function's bookkeeping (the saved_data map, output
// wrapping, its backward's checks) made an op with empty kernels cost 30 us per forward +
// backward at (64, 3, 32, 32) against 22 us, as much as the kernels (docs/math.md
// section 12).
// mean_: the op returns the batch mean of the per-sample values (gradient_penalty,
// r1_penalty), so the backward's dL/dout_i is go / B (as MeanBackward gives it).
template <class Ns>
struct NormEpilogueBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable g_, f_, norm_;
  Epilogue e_ = Epilogue::Norm;
  double param_ = 0.0;
  bool mean_ = false;

  std::string name() const override { return "lipkernels::NormEpilogueBackward"; }

  void release_variables() override {
    g_.reset_data();
    f_.reset_data();
    norm_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const Tensor g = g_.unpack();
    const Tensor f = f_.unpack();
    const Tensor norm = norm_.unpack();
    variable_list out(2);
    if (!grads[0].defined()) return out;  // no gradient reached this output: zero
    const Tensor go = mean_ ? (grads[0] / g.size(0)).expand({g.size(0)}) : grads[0];
    const Epilogue e = e_;
    const double param = param_;
    Tensor grad_f, grad_g;
    if (torch::autograd::GradMode::is_enabled()) {
      // Recompute n with the differentiable op so that d/dg of this backward sees n(g).
      const Tensor n = sample_norm_op<Ns>().call(g);
      Tensor coef, grad_n;
      std::tie(grad_f, coef, grad_n) = epilogue_backward_differentiable(e, go, f, n, param);
      if (g.numel() == g.size(0) && e != Epilogue::R1) {
        // One element per sample: dL/dn * (g / n), as 1 / n can overflow (epilogue.h).
        const Tensor x = g.reshape({g.size(0)});
        const Tensor nz = n != 0;
        const Tensor unit = at::where(nz, x / at::where(nz, n, at::ones_like(n)), at::zeros_like(n));
        grad_g = (grad_n * unit).to(g.scalar_type()).reshape(g.sizes());
      } else if (e == Epilogue::R1) {
        grad_g = sample_scale_op<Ns>().call(g, coef);
      } else {
        // (g / n) * dL/dn: coef = dL/dn / n can overflow where the result does not.
        const Tensor nz = n != 0;
        const Tensor inv_n = nz.to(n.scalar_type()) / at::where(nz, n, at::ones_like(n));
        grad_g = sample_scale_op<Ns>().call(sample_scale_op<Ns>().call(g, inv_n), grad_n);
      }
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      const std::optional<Tensor> fo = f.defined() ? std::optional<Tensor>(f) : std::nullopt;
      std::tie(grad_f, grad_g) =
          norm_epilogue_backward_op<Ns>().call(go, g, fo, norm, epilogue_name(e), param);
    }
    if (should_compute_output(0)) out[0] = std::move(grad_g);
    if (f.defined() && should_compute_output(1)) out[1] = std::move(grad_f);
    return out;
  }
};

// The per-sample values of epilogue e (their batch mean when mean), with the node above
// attached when g or f requires grad.
template <class Ns>
Tensor apply_norm_epilogue(const Tensor& g, const std::optional<Tensor>& f, Epilogue e,
                           double param, bool mean = false) {
  Tensor out, norm;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out, norm) = norm_epilogue_op<Ns>().call(g, f, epilogue_name(e), param);
    if (mean) out = out.mean();
  }
  const Tensor fv = f.has_value() ? *f : Tensor();
  if (torch::autograd::compute_requires_grad(g, fv)) {
    auto node = compat::make_node<NormEpilogueBackward<Ns>>();
    node->set_next_edges(torch::autograd::collect_next_edges(g, fv));
    node->g_ = torch::autograd::SavedVariable(g, false);
    node->f_ = torch::autograd::SavedVariable(fv, false);
    node->norm_ = torch::autograd::SavedVariable(norm, false);
    node->e_ = e;
    node->param_ = param;
    node->mean_ = mean;
    torch::autograd::set_history(out, node);
  }
  return out;
}

template <class Ns>
Tensor forward_norm_epilogue(const Tensor& g, const std::optional<Tensor>& f, Epilogue e,
                             double param) {
  return std::get<0>(norm_epilogue_op<Ns>().call(g, f, epilogue_name(e), param));
}

void check_gran_eps(double eps) {
  TORCH_CHECK(eps > 0, "lipkernels::gran_normalize: eps must be > 0, got ", eps);
}

// Autograd kernels of the public ops.
template <class Ns>
Tensor sample_norm_autograd(const Tensor& g) {
  return apply_norm_epilogue<Ns>(g, std::nullopt, Epilogue::Norm, 0.0);
}
template <class Ns>
Tensor gn_normalize_autograd(const Tensor& f, const Tensor& g) {
  return apply_norm_epilogue<Ns>(g, f, Epilogue::GN, 0.0);
}
template <class Ns>
Tensor gran_normalize_autograd(const Tensor& f, const Tensor& g, double eps) {
  check_gran_eps(eps);
  return apply_norm_epilogue<Ns>(g, f, Epilogue::GraN, eps);
}
template <class Ns>
Tensor gradient_penalty_autograd(const Tensor& g, double center) {
  return apply_norm_epilogue<Ns>(g, std::nullopt, Epilogue::GP, center, true);
}
template <class Ns>
Tensor r1_penalty_autograd(const Tensor& g) {
  return apply_norm_epilogue<Ns>(g, std::nullopt, Epilogue::R1, 0.0, true);
}

// Forward-only kernels of the same ops (inference mode, and below autograd).
template <class Ns>
Tensor sample_norm_forward(const Tensor& g) {
  return forward_norm_epilogue<Ns>(g, std::nullopt, Epilogue::Norm, 0.0);
}
template <class Ns>
Tensor gn_normalize_forward(const Tensor& f, const Tensor& g) {
  return forward_norm_epilogue<Ns>(g, f, Epilogue::GN, 0.0);
}
template <class Ns>
Tensor gran_normalize_forward(const Tensor& f, const Tensor& g, double eps) {
  check_gran_eps(eps);
  return forward_norm_epilogue<Ns>(g, f, Epilogue::GraN, eps);
}
template <class Ns>
Tensor gradient_penalty_forward(const Tensor& g, double center) {
  return forward_norm_epilogue<Ns>(g, std::nullopt, Epilogue::GP, center).mean();
}
template <class Ns>
Tensor r1_penalty_forward(const Tensor& g) {
  return forward_norm_epilogue<Ns>(g, std::nullopt, Epilogue::R1, 0.0).mean();
}

// out_ij = c_i g_ij. d/dg = c_i grad_ij, d/dc_i = sum_j grad_ij g_ij: both public
// differentiable ops, so this closes under differentiation.
template <class Ns>
struct SampleScaleFn : public Function<SampleScaleFn<Ns>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& c) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({g, c});
    return sample_scale_op<Ns>().call(g, c);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &g = saved[0], &c = saved[1];
    return {sample_scale_op<Ns>().call(grads[0], c),
            sample_dot_op<Ns>().call(grads[0], g).to(c.scalar_type())};
  }
};

template <class Ns>
struct SampleDotFn : public Function<SampleDotFn<Ns>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({a, b});
    return sample_dot_op<Ns>().call(a, b);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {sample_scale_op<Ns>().call(saved[1], grads[0]), sample_scale_op<Ns>().call(saved[0], grads[0])};
  }
};

template <class Ns>
Tensor sample_scale_autograd(const Tensor& g, const Tensor& c) { return SampleScaleFn<Ns>::apply(g, c); }
template <class Ns>
Tensor sample_dot_autograd(const Tensor& a, const Tensor& b) { return SampleDotFn<Ns>::apply(a, b); }

// ------------------------------------------------- spectral normalization

// Whether a backward receives vmapped gradients (torch.autograd.grad(...,
// is_grads_batched=True) and gradcheck's batched-gradient check use the legacy vmap).
bool any_batched(const variable_list& ts) {
  for (const auto& t : ts)
    if (t.defined() && (t.key_set().has(c10::DispatchKey::Batched) ||
                        t.key_set().has(c10::DispatchKey::FuncTorchBatched)))
      return true;
  return false;
}

// W_sn = W / sigma with sigma = u^T W v after the power iteration; u and v are
// constants for the derivative (as in torch.nn.utils.parametrizations.spectral_norm),
// so dL/dW = (G - <G, W_sn> u v^T) / sigma.
template <class Ns>
struct SpectralNormalizeFn : public Function<SpectralNormalizeFn<Ns>> {
  static variable_list forward(AutogradContext* ctx, at::TensorList weights,
                               const std::vector<Tensor>& us, const std::vector<Tensor>& vs,
                               int64_t n_power_iterations, double eps, bool training) {
    for (size_t i = 0; i < us.size(); ++i)
      TORCH_CHECK(!us[i].requires_grad() && !(i < vs.size() && vs[i].requires_grad()),
                  "lipkernels::spectral_normalize: us[", i, "] and vs[", i,
                  "] are updated in place and must not require grad");
    const int64_t iters = training ? n_power_iterations : 0;
    std::vector<Tensor> w_sn;
    Tensor sigmas, uv;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      // uv: the updated vectors, kept for the backward (a later forward updates us, vs
      // in place before this backward runs).
      std::tie(w_sn, sigmas, uv) = sn_forward_op<Ns>().call(weights, us, vs, iters, eps);
      if (iters > 0) sn_store_vectors_op<Ns>().call(us, vs, uv);
    }
    if (iters > 0) {
      for (const auto& u : us) torch::autograd::increment_version(u);
      for (const auto& v : vs) torch::autograd::increment_version(v);
    }
    variable_list to_save(weights.begin(), weights.end());
    to_save.push_back(uv);
    to_save.push_back(sigmas);
    ctx->save_for_backward(to_save);
    ctx->saved_data["eps"] = eps;
    return w_sn;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const size_t L = grads.size();
    const std::vector<Tensor> weights(saved.begin(), saved.begin() + L);
    const Tensor& uv = saved[L];
    const Tensor& sigmas = saved[L + 1];
    const double eps = ctx->saved_data["eps"].toDouble();
    variable_list out;
    if (torch::autograd::GradMode::is_enabled() || any_batched(grads)) {
      // Differentiable form: sigma recomputed from W so that d/dW of this sees sigma(W).
      // Also for batched gradients (gradcheck's check_batched_grad, is_grads_batched: the
      // legacy vmap, which has no rule for an op returning Tensor[]): ATen ops batch.
      int64_t off = 0;
      for (size_t l = 0; l < L; ++l) {
        const Tensor& W = weights[l];
        const int64_t m = W.size(0), k = W.numel() / m;
        const Tensor u = uv.narrow(0, off, m), v = uv.narrow(0, off + m, k);
        off += m + k;
        const Tensor sigma = at::dot(u, at::mv(W.reshape({m, k}), v));
        const Tensor clamped = sigma.abs() < eps;
        const Tensor s_eff = at::where(clamped, at::full_like(sigma, eps), sigma);
        const Tensor c = at::where(clamped, at::zeros_like(sigma), (grads[l] * (W / s_eff)).sum());
        out.push_back((grads[l] - c * at::outer(u, v).view_as(W)) / s_eff);
      }
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = sn_backward_op<Ns>().call(grads, weights, uv, sigmas, eps);
    }
    for (int i = 0; i < 5; ++i) out.emplace_back();  // us, vs, n_power_iterations, eps, training
    return out;
  }
};

template <class Ns>
std::vector<Tensor> spectral_normalize_autograd(at::TensorList weights, at::TensorList us,
                                                at::TensorList vs, int64_t n_power_iterations,
                                                double eps, bool training) {
  return SpectralNormalizeFn<Ns>::apply(weights, us.vec(), vs.vec(), n_power_iterations, eps,
                                    training);
}

template <class Ns>
std::vector<Tensor> spectral_normalize_forward(at::TensorList weights, at::TensorList us,
                                               at::TensorList vs, int64_t n_power_iterations,
                                               double eps, bool training) {
  const int64_t iters = training ? n_power_iterations : 0;
  auto [w_sn, sigmas, uv] = sn_forward_op<Ns>().call(weights, us, vs, iters, eps);
  if (iters > 0) sn_store_vectors_op<Ns>().call(us, vs, uv);
  return w_sn;
}

// ------------------------------------------------- in-place kernel ops

// Autograd kernels of the ops that update tensors in place and have no derivative:
// refuse inputs that would need one, run the kernel, and bump the version counters of
// what changed (so a graph that saved those tensors notices).
void bump_versions(at::TensorList ts) {
  for (const auto& t : ts) torch::autograd::increment_version(t);
}

void check_no_grad(at::TensorList ts, const char* op, const char* name) {
  if (!torch::autograd::GradMode::is_enabled()) return;
  for (size_t i = 0; i < ts.size(); ++i)
    TORCH_CHECK(!ts[i].requires_grad(), op, ": ", name, "[", i,
                "] requires grad; this op is not differentiable (call it under torch.no_grad())");
}

template <class Ns>
Tensor power_iteration_autograd(at::TensorList weights, at::TensorList us, at::TensorList vs,
                                int64_t n_power_iterations, double eps) {
  check_no_grad(weights, "lipkernels::power_iteration", "weights");
  check_no_grad(us, "lipkernels::power_iteration", "us");
  check_no_grad(vs, "lipkernels::power_iteration", "vs");
  Tensor sigmas;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    sigmas = power_iteration_op<Ns>().call(weights, us, vs, n_power_iterations, eps);
  }
  if (n_power_iterations > 0) {
    bump_versions(us);
    bump_versions(vs);
  }
  return sigmas;
}

template <class Ns>
void sn_store_vectors_autograd(at::TensorList us, at::TensorList vs, const Tensor& uv) {
  check_no_grad(us, "lipkernels::_sn_store_vectors_", "us");
  check_no_grad(vs, "lipkernels::_sn_store_vectors_", "vs");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    sn_store_vectors_op<Ns>().call(us, vs, uv);
  }
  bump_versions(us);
  bump_versions(vs);
}

template <class Ns>
void clip_autograd(at::TensorList tensors, double c) {
  check_no_grad(tensors, "lipkernels::clip_", "tensors");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    clip_op<Ns>().call(tensors, c);
  }
  bump_versions(tensors);
}

// ------------------------------------------------- build information

std::string build_info() {
  std::string s = "{\"version\": \"" LK_STR(LIPKERNELS_VERSION) "\", \"cpu\": true";
#ifdef _OPENMP
  s += ", \"openmp\": true";
#else
  s += ", \"openmp\": false";
#endif
#ifdef LIPKERNELS_WITH_CUDA
  s += ", \"cuda\": true, \"cuda_archs\": \"" LK_STR(LIPKERNELS_CUDA_ARCHS) "\", \"cuda_reason\": \"\"";
#else
  s += ", \"cuda\": false, \"cuda_archs\": \"\", \"cuda_reason\": \"" LK_STR(LIPKERNELS_NO_CUDA_REASON) "\"";
#endif
#ifdef LIPKERNELS_CUDA_EMULATION
  s += ", \"cuda_emulation\": true";
#else
  s += ", \"cuda_emulation\": false";
#endif
  s += "}";
  return s;
}

// The schemas of the ops, defined in each operator namespace.
void define_ops(torch::Library& m) {
  // Per-sample gradient norm family. g: (B, ...), f: (B,).
  m.def("sample_norm(Tensor g) -> Tensor");
  m.def("gn_normalize(Tensor f, Tensor g) -> Tensor");
  m.def("gran_normalize(Tensor f, Tensor g, float eps) -> Tensor");
  m.def("gradient_penalty(Tensor g, float center) -> Tensor");
  m.def("r1_penalty(Tensor g) -> Tensor");
  m.def("sample_scale(Tensor g, Tensor c) -> Tensor");
  m.def("sample_dot(Tensor a, Tensor b) -> Tensor");
  m.def("_norm_epilogue(Tensor g, Tensor? f, str epilogue, float param) -> (Tensor, Tensor)");
  m.def(
      "_norm_epilogue_backward(Tensor grad_out, Tensor g, Tensor? f, Tensor norm, str epilogue, "
      "float param) -> (Tensor, Tensor)");
  // Spectral normalization of a list of layers; weights viewed as w.flatten(1).
  m.def(
      "power_iteration(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int n_power_iterations, "
      "float eps) -> Tensor");
  m.def(
      "spectral_normalize(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, "
      "int n_power_iterations, float eps, bool training) -> Tensor[]");
  // Power iteration + W_sn, functional: returns (W_sn list, sigmas (L,), the updated
  // vectors flattened as u_0, v_0, u_1, v_1, ...), which _sn_store_vectors_ writes back.
  m.def(
      "_sn_forward(Tensor[] weights, Tensor[] us, Tensor[] vs, int n_power_iterations, "
      "float eps) -> (Tensor[], Tensor, Tensor)");
  m.def("_sn_store_vectors_(Tensor(a!)[] us, Tensor(b!)[] vs, Tensor uv) -> ()");
  m.def("_sn_backward(Tensor[] grads, Tensor[] weights, Tensor uv, Tensor sigmas, float eps) -> Tensor[]");
  // WGAN weight clipping of many tensors in one call.
  m.def("clip_(Tensor(a!)[] tensors, float c) -> ()");
}

template <class Ns>
void register_autograd(torch::Library& m) {
  m.impl("sample_norm", &sample_norm_autograd<Ns>);
  m.impl("gn_normalize", &gn_normalize_autograd<Ns>);
  m.impl("gran_normalize", &gran_normalize_autograd<Ns>);
  m.impl("gradient_penalty", &gradient_penalty_autograd<Ns>);
  m.impl("r1_penalty", &r1_penalty_autograd<Ns>);
  m.impl("sample_scale", &sample_scale_autograd<Ns>);
  m.impl("sample_dot", &sample_dot_autograd<Ns>);
  m.impl("spectral_normalize", &spectral_normalize_autograd<Ns>);
  m.impl("power_iteration", &power_iteration_autograd<Ns>);
  m.impl("_sn_store_vectors_", &sn_store_vectors_autograd<Ns>);
  m.impl("clip_", &clip_autograd<Ns>);
  for (const char* name : {"_norm_epilogue", "_norm_epilogue_backward", "_sn_forward", "_sn_backward"})
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
}

template <class Ns>
void register_forward(torch::Library& m) {
  m.impl("sample_norm", &sample_norm_forward<Ns>);
  m.impl("gn_normalize", &gn_normalize_forward<Ns>);
  m.impl("gran_normalize", &gran_normalize_forward<Ns>);
  m.impl("gradient_penalty", &gradient_penalty_forward<Ns>);
  m.impl("r1_penalty", &r1_penalty_forward<Ns>);
  m.impl("spectral_normalize", &spectral_normalize_forward<Ns>);
}

}  // namespace

TORCH_LIBRARY(lipkernels, m) {
  define_ops(m);
  m.def("_build_info() -> str", &build_info);
  // The CPU kernels' cache of freed output blocks (cpu/output_cache.h).
  m.def("_cpu_output_cache_bytes() -> int", &cpu::output_cache_bytes);
  m.def("_cpu_output_cache_clear() -> ()", &cpu::output_cache_clear);
}

TORCH_LIBRARY_IMPL(lipkernels, Autograd, m) { register_autograd<MainNs>(m); }
TORCH_LIBRARY_IMPL(lipkernels, CompositeExplicitAutograd, m) { register_forward<MainNs>(m); }

// The per-call floor (floor.cpp): the same schemas and autograd, empty kernels.
TORCH_LIBRARY(lipkernels_floor, m) { define_ops(m); }
TORCH_LIBRARY_IMPL(lipkernels_floor, Autograd, m) { register_autograd<FloorNs>(m); }
TORCH_LIBRARY_IMPL(lipkernels_floor, CompositeExplicitAutograd, m) { register_forward<FloorNs>(m); }

#ifdef LIPKERNELS_CUDA_EMULATION
// The emulated CUDA kernels' namespace (their CPU-tensor kernels: cuda/bindings.cpp).
TORCH_LIBRARY(lipkernels_cuda_emu, m) { define_ops(m); }
TORCH_LIBRARY_IMPL(lipkernels_cuda_emu, Autograd, m) { register_autograd<CudaEmulationNs>(m); }
TORCH_LIBRARY_IMPL(lipkernels_cuda_emu, CompositeExplicitAutograd, m) {
  register_forward<CudaEmulationNs>(m);
}
#endif

}  // namespace lipkernels
