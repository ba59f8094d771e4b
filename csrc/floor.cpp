// The per-call floor (benchmark calibration, docs/math.md section 12): the
// lipkernels_floor namespace has the schemas and the autograd of the lipkernels ops
// (ops.cpp) and, on CPU and CUDA, kernel ops that only allocate their outputs, as the
// real kernels do (the CPU output cache, torch's allocators), and compute nothing.
// torch.ops.lipkernels_floor.gn_normalize(f, g) is thus the same call through the same
// dispatch and autograd with empty kernels: what a C++ autograd op costs before its
// kernels run. `lipkernels bench` times it beside
// the ops; its outputs are uninitialised memory, never a result.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "bindings_common.h"
#include "cpu/output_cache.h"

namespace lipkernels {
namespace {

void check_floor_input(const at::Tensor& g, const char* op) {
  TORCH_CHECK(g.defined() && g.dim() >= 1 && g.is_contiguous(), op,
              ": the floor op takes a contiguous g (it is a benchmark calibration, not an op)");
}

std::tuple<at::Tensor, at::Tensor> floor_norm_epilogue(const at::Tensor& g,
                                                       const std::optional<at::Tensor>& f,
                                                       c10::string_view epilogue, double param) {
  (void)f;
  (void)param;
  check_floor_input(g, "lipkernels_floor::_norm_epilogue");
  const Epilogue e = parse_epilogue(epilogue);
  const auto dtype = g.scalar_type();
  return {at::empty({g.size(0)}, g.options().dtype(epilogue_out_dtype(e, dtype))),
          at::empty({g.size(0)}, g.options().dtype(acc_type_of(dtype)))};
}

std::tuple<at::Tensor, at::Tensor> floor_norm_epilogue_backward(
    const at::Tensor& grad_out, const at::Tensor& g, const std::optional<at::Tensor>& f,
    const at::Tensor& norm, c10::string_view epilogue, double param) {
  (void)grad_out;
  (void)norm;
  (void)param;
  check_floor_input(g, "lipkernels_floor::_norm_epilogue_backward");
  const Epilogue e = parse_epilogue(epilogue);
  const int64_t B = epilogue_uses_f(e) && f.has_value() ? g.size(0) : 0;
  return {at::empty({B}, g.options()), cpu::empty_output_like(g)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipkernels_floor, CPU, m) {
  m.impl("_norm_epilogue", &floor_norm_epilogue);
  m.impl("_norm_epilogue_backward", &floor_norm_epilogue_backward);
}

TORCH_LIBRARY_IMPL(lipkernels_floor, CUDA, m) {
  m.impl("_norm_epilogue", &floor_norm_epilogue);
  m.impl("_norm_epilogue_backward", &floor_norm_epilogue_backward);
}

}  // namespace lipkernels
