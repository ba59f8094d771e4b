// What differs between the torch versions lipkernels is built against (README: "Tested
// torch versions"); the one place the C++ sources look at the torch version. Its Python
// counterpart is lipkernels/_compat.py.
#pragma once

#include <memory>
#include <type_traits>

#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/function.h>

namespace lipkernels {
namespace compat {

// torch < 2.13 holds autograd nodes by std::shared_ptr (Node derives from
// std::enable_shared_from_this), torch >= 2.13 by c10::intrusive_ptr; set_history and
// collect_next_edges take whichever the installed torch uses.
constexpr bool kSharedNodes =
    std::is_base_of_v<std::enable_shared_from_this<torch::autograd::Node>, torch::autograd::Node>;

template <class T>
auto make_node() {
  if constexpr (kSharedNodes) {
    return std::make_shared<T>();
  } else {
    return c10::make_intrusive<T>();
  }
}

}  // namespace compat
}  // namespace lipkernels
