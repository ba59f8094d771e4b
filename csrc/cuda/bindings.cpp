// CUDA bindings of the kernel ops (compiled only in builds with CUDA kernels, real or
// emulated): the checks, layouts and outputs of bindings_common.h (the same as the CPU
// bindings'), then the ATen-free launchers of kernels.h on the current stream of the
// tensors' device. Nothing here synchronises with the device or reads device values.
// What differs between the real build and the emulation build (the tensors' device,
// guard, stream, device pointers, registration) is in binding_device.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../bindings_common.h"
#include "binding_device.h"
#include "kernels.h"

namespace lipkernels {
namespace cuda_binding {
namespace {

using cuda::acc_t;
using cuda::SnLayer;

// The kernels' element type of a torch scalar type.
template <typename S>
struct Native {
  using type = S;
};
template <>
struct Native<at::Half> {
  using type = __half;
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename S>
using native_t = typename Native<S>::type;

// Device pointers of the kernels' element type (DeviceMemory: binding_device.h).
template <typename S>
const native_t<S>* cptr(DeviceMemory& dev, const at::Tensor& t) {
  return dev.in<native_t<S>>(t);
}
template <typename S>
native_t<S>* mptr(DeviceMemory& dev, const at::Tensor& t) {  // written, or updated in place
  return dev.out<native_t<S>>(t);
}

at::Tensor empty_like_cuda(const at::Tensor& t) {
  return at::empty_strided(t.sizes(), t.strides(), t.options());
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(on_device(t), op, ": ", name, " must be ", kTensorKind, ", got one on ", t.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

// ---------------------------------------------------------------- per-sample norm family

std::tuple<at::Tensor, at::Tensor> norm_epilogue(const at::Tensor& g_in,
                                                 const std::optional<at::Tensor>& f,
                                                 c10::string_view epilogue, double param) {
  constexpr const char* op = "lipkernels::_norm_epilogue";
  check_cuda(g_in, op, "g");
  auto c = prepare_norm_epilogue(g_in, f, epilogue, param, op);
  DeviceMemory dev;
  const DeviceGuard guard(c.g.device());
  const bool use_f = c.f.defined();
  const bool out_acc = c.out.scalar_type() != c.g.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.g.scalar_type(), "norm_epilogue_cuda", [&] {
    using T = native_t<scalar_t>;
    using A = acc_t<T>;
    const int64_t np = cuda::sample_partials<T>(c.B, c.N);
    const at::Tensor partials = at::empty({np}, c.norm.options());
    check_launch(cuda::norm_epilogue_forward<T>(
                     cptr<scalar_t>(dev, c.g), c.B, c.N, use_f ? cptr<scalar_t>(dev, c.f) : nullptr,
                     use_f ? c.f.stride(0) : 0, c.e, static_cast<A>(param), dev.out<A>(c.norm),
                     out_acc ? nullptr : mptr<scalar_t>(dev, c.out), out_acc ? dev.out<A>(c.out) : nullptr,
                     np > 0 ? dev.scratch<A>(partials) : nullptr, current_stream()),
                 op);
  });
  return {c.out, c.norm};
}

std::tuple<at::Tensor, at::Tensor> norm_epilogue_backward(
    const at::Tensor& grad_out, const at::Tensor& g_in, const std::optional<at::Tensor>& f,
    const at::Tensor& norm, c10::string_view epilogue, double param) {
  constexpr const char* op = "lipkernels::_norm_epilogue_backward";
  check_cuda(g_in, op, "g");
  auto c = prepare_norm_epilogue_backward(grad_out, g_in, f, norm, epilogue, param, &empty_like_cuda, op);
  DeviceMemory dev;
  const DeviceGuard guard(c.g.device());
  const bool use_f = c.f.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.g.scalar_type(), "norm_epilogue_backward_cuda", [&] {
    using T = native_t<scalar_t>;
    using A = acc_t<T>;
    check_launch(cuda::norm_epilogue_backward<T>(
                     dev.in<A>(c.go), c.go_stride, cptr<scalar_t>(dev, c.g), c.B, c.N,
                     use_f ? cptr<scalar_t>(dev, c.f) : nullptr, use_f ? c.f.stride(0) : 0,
                     dev.in<A>(c.norm), c.e, static_cast<A>(param),
                     use_f ? mptr<scalar_t>(dev, c.grad_f) : nullptr, mptr<scalar_t>(dev, c.grad_g), current_stream()),
                 op);
  });
  return {c.grad_f, c.grad_g};
}

at::Tensor sample_scale(const at::Tensor& g_in, const at::Tensor& c_in) {
  constexpr const char* op = "lipkernels::sample_scale";
  check_cuda(g_in, op, "g");
  auto c = prepare_sample_scale(g_in, c_in, &empty_like_cuda, op);
  DeviceMemory dev;
  const DeviceGuard guard(c.g.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.g.scalar_type(), "sample_scale_cuda", [&] {
    using T = native_t<scalar_t>;
    check_launch(cuda::sample_scale<T>(cptr<scalar_t>(dev, c.g), dev.in<acc_t<T>>(c.coef), c.B, c.N,
                                 mptr<scalar_t>(dev, c.out), current_stream()),
                 op);
  });
  return c.out;
}

at::Tensor sample_dot(const at::Tensor& a_in, const at::Tensor& b_in) {
  constexpr const char* op = "lipkernels::sample_dot";
  check_cuda(a_in, op, "a");
  auto c = prepare_sample_dot(a_in, b_in, op);
  DeviceMemory dev;
  const DeviceGuard guard(c.a.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.a.scalar_type(), "sample_dot_cuda", [&] {
    using T = native_t<scalar_t>;
    using A = acc_t<T>;
    const int64_t np = cuda::sample_partials<T>(c.B, c.N);
    const at::Tensor partials = at::empty({np}, c.a.options().dtype(acc_type_of(c.a.scalar_type())));
    check_launch(cuda::sample_dot<T>(cptr<scalar_t>(dev, c.a), cptr<scalar_t>(dev, c.b), c.B, c.N,
                               mptr<scalar_t>(dev, c.out), np > 0 ? dev.scratch<A>(partials) : nullptr,
                               current_stream()),
                 op);
  });
  return c.out;
}

// ---------------------------------------------------------------- spectral normalization

// The kernels index a layer's elements with 32-bit integers.
void check_layer_sizes(const std::vector<at::Tensor>& weights, const char* op) {
  for (size_t i = 0; i < weights.size(); ++i)
    TORCH_CHECK(weights[i].numel() <= std::numeric_limits<int32_t>::max(), op, ": weights[", i,
                "] has ", weights[i].numel(), " elements; the CUDA kernels take at most 2^31 - 1 per layer");
}

template <typename S>
SnLayer<native_t<S>> make_layer(DeviceMemory& dev, const at::Tensor& w) {
  SnLayer<native_t<S>> ly{};
  ly.w = cptr<S>(dev, w);
  ly.m = w.size(0);
  ly.k = w.numel() / ly.m;
  return ly;
}

at::Tensor workspace_tensor(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// Power iteration of every layer, then W_sn into *outs when given. The updated vectors
// go to *uv (u_0, v_0, u_1, v_1, ...) when given, else into us and vs in place.
template <typename scalar_t>
void launch_sn_forward(DeviceMemory& dev, const std::vector<at::Tensor>& weights, at::TensorList us,
                       at::TensorList vs,
                       const at::Tensor* uv, const std::vector<at::Tensor>* outs,
                       int64_t n_power_iterations, double eps, const at::Tensor& sigmas,
                       const char* op) {
  using T = native_t<scalar_t>;
  using A = acc_t<T>;
  std::vector<SnLayer<T>> layers;
  T* p = uv ? mptr<scalar_t>(dev, *uv) : nullptr;
  for (size_t i = 0; i < weights.size(); ++i) {
    SnLayer<T> ly = make_layer<scalar_t>(dev, weights[i]);
    ly.u_in = cptr<scalar_t>(dev, us[i]);
    ly.v_in = cptr<scalar_t>(dev, vs[i]);
    if (p) {
      ly.u = p;
      ly.v = p + ly.m;
      p += ly.m + ly.k;
    } else {  // in place (power_iteration's Tensor(a!)[] us, Tensor(b!)[] vs)
      ly.u = mptr<scalar_t>(dev, us[i]);
      ly.v = mptr<scalar_t>(dev, vs[i]);
    }
    if (outs) ly.out = mptr<scalar_t>(dev, (*outs)[i]);
    layers.push_back(ly);
  }
  const int64_t L = static_cast<int64_t>(layers.size());
  const at::Tensor ws =
      workspace_tensor(cuda::sn_forward_workspace<T>(layers.data(), L, n_power_iterations), weights[0]);
  check_launch(cuda::sn_forward<T>(layers.data(), L, n_power_iterations, static_cast<A>(eps),
                                   dev.out<A>(sigmas), dev.scratch<unsigned char>(ws), current_stream()),
               op);
}

at::Tensor power_iteration(at::TensorList weights_in, at::TensorList us, at::TensorList vs,
                           int64_t n_power_iterations, double eps) {
  constexpr const char* op = "lipkernels::power_iteration";
  auto c = prepare_power_iteration(weights_in, us, vs, n_power_iterations, eps, op);
  if (c.weights.empty()) return c.sigmas;
  check_cuda(c.weights[0], op, "weights[0]");
  check_layer_sizes(c.weights, op);
  DeviceMemory dev;
  const DeviceGuard guard(c.weights[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.weights[0].scalar_type(), "power_iteration_cuda", [&] {
    launch_sn_forward<scalar_t>(dev, c.weights, us, vs, nullptr, nullptr, n_power_iterations, eps, c.sigmas, op);
  });
  return c.sigmas;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> sn_forward(
    at::TensorList weights_in, at::TensorList us, at::TensorList vs, int64_t n_power_iterations,
    double eps) {
  constexpr const char* op = "lipkernels::_sn_forward";
  auto c = prepare_sn_forward(weights_in, us, vs, n_power_iterations, eps, &empty_like_cuda, op);
  if (c.weights.empty()) return {c.outs, c.sigmas, c.uv};
  check_cuda(c.weights[0], op, "weights[0]");
  check_layer_sizes(c.weights, op);
  DeviceMemory dev;
  const DeviceGuard guard(c.weights[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.weights[0].scalar_type(), "sn_forward_cuda", [&] {
    launch_sn_forward<scalar_t>(dev, c.weights, us, vs, &c.uv, &c.outs, n_power_iterations, eps, c.sigmas, op);
  });
  return {c.outs, c.sigmas, c.uv};
}

void sn_store_vectors_(at::TensorList us, at::TensorList vs, const at::Tensor& uv) {
  constexpr const char* op = "lipkernels::_sn_store_vectors_";
  check_cuda(uv, op, "uv");
  check_sn_store_vectors(us, vs, uv, op);
  if (us.empty()) return;
  DeviceMemory dev;
  const DeviceGuard guard(uv.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, uv.scalar_type(), "sn_store_vectors_cuda", [&] {
    using T = native_t<scalar_t>;
    std::vector<const T*> src;
    std::vector<T*> dst;
    std::vector<int64_t> n;
    const T* p = cptr<scalar_t>(dev, uv);
    for (size_t i = 0; i < us.size(); ++i) {
      for (const at::Tensor* t : {&us[i], &vs[i]}) {
        src.push_back(p);
        dst.push_back(mptr<scalar_t>(dev, *t));
        n.push_back(t->numel());
        p += t->numel();
      }
    }
    check_launch(cuda::copy_many<T>(src.data(), dst.data(), n.data(), static_cast<int64_t>(n.size()),
                              current_stream()),
                 op);
  });
}

std::vector<at::Tensor> sn_backward(at::TensorList grads_in, at::TensorList weights_in,
                                       const at::Tensor& uv, const at::Tensor& sigmas, double eps) {
  constexpr const char* op = "lipkernels::_sn_backward";
  auto c = prepare_sn_backward(grads_in, weights_in, uv, sigmas, eps, &empty_like_cuda, op);
  if (c.weights.empty()) return {};
  check_cuda(c.weights[0], op, "weights[0]");
  check_layer_sizes(c.weights, op);
  DeviceMemory dev;
  const DeviceGuard guard(c.weights[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.weights[0].scalar_type(), "sn_backward_cuda", [&] {
    using T = native_t<scalar_t>;
    using A = acc_t<T>;
    std::vector<SnLayer<T>> layers;
    T* p = const_cast<T*>(cptr<scalar_t>(dev, uv));  // read only
    for (size_t i = 0; i < c.weights.size(); ++i) {
      SnLayer<T> ly = make_layer<scalar_t>(dev, c.weights[i]);
      ly.u = p;
      ly.v = p + ly.m;
      ly.grad = cptr<scalar_t>(dev, c.grads[i]);
      ly.out = mptr<scalar_t>(dev, c.outs[i]);
      p += ly.m + ly.k;
      layers.push_back(ly);
    }
    const int64_t L = static_cast<int64_t>(layers.size());
    const at::Tensor ws = workspace_tensor(cuda::sn_backward_workspace<T>(layers.data(), L), c.weights[0]);
    check_launch(cuda::sn_backward<T>(layers.data(), L, dev.in<A>(sigmas), static_cast<A>(eps),
                                dev.scratch<unsigned char>(ws), current_stream()),
                 op);
  });
  return c.outs;
}

// ---------------------------------------------------------------- weight clipping

void clip_(at::TensorList tensors, double c) {
  constexpr const char* op = "lipkernels::clip_";
  check_clip(tensors, c, kDeviceType, op);
  if (tensors.empty()) return;
  DeviceMemory dev;
  const DeviceGuard guard(tensors[0].device());
  // One launch per dtype present (per kMaxMultiTensors tensors).
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<at::Tensor> group;
    for (const auto& t : tensors)
      if (t.scalar_type() == dtype && t.numel() > 0) group.push_back(t);
    if (group.empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "clip_cuda", [&] {
      using T = native_t<scalar_t>;
      std::vector<T*> ptrs;
      std::vector<int64_t> n;
      for (const auto& t : group) {
        ptrs.push_back(mptr<scalar_t>(dev, t));
        n.push_back(t.numel());
      }
      check_launch(cuda::clip_many<T>(ptrs.data(), n.data(), static_cast<int64_t>(n.size()), c,
                                current_stream()),
                   op);
    });
  }
}

}  // namespace

LK_CUDA_BINDING_IMPL(m) {
  m.impl("_norm_epilogue", &norm_epilogue);
  m.impl("_norm_epilogue_backward", &norm_epilogue_backward);
  m.impl("sample_scale", &sample_scale);
  m.impl("sample_dot", &sample_dot);
  m.impl("power_iteration", &power_iteration);
  m.impl("_sn_forward", &sn_forward);
  m.impl("_sn_store_vectors_", &sn_store_vectors_);
  m.impl("_sn_backward", &sn_backward);
  m.impl("clip_", &clip_);
}

}  // namespace cuda_binding
}  // namespace lipkernels
