// The device side of the CUDA binding (bindings.cpp): which tensors it accepts, the
// device guard and stream, how a tensor becomes a device pointer, and where the kernels
// register. Two variants:
//
//   real CUDA build        CUDA tensors, c10::cuda's guard and current stream, the
//                          tensors' own data pointers; the `lipkernels` operators'
//                          CUDA kernels.
//   emulation build        CPU tensors (the CUDA kernel sources compiled for the host,
//   (LIPKERNELS_CUDA_      emulation/), no guard, the null stream; every tensor handed
//    EMULATION)            to a launcher is device memory of exactly its bytes: a view
//                          into a larger allocation is copied into an allocation of its
//                          own (same address modulo 64, so alignment paths are kept) and
//                          copied back after the launch if written, so AddressSanitizer
//                          sees any access outside the tensor; the operators of the
//                          `lipkernels_cuda_emu` namespace, for CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#ifdef LIPKERNELS_CUDA_EMULATION
#include <cstdlib>
#include <cstring>

#include "emulation/counters.h"
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "kernels.h"

namespace lipkernels {
namespace cuda_binding {

#ifdef LIPKERNELS_CUDA_EMULATION

constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
constexpr const char* kTensorKind = "a CPU tensor (the emulated CUDA kernels run on CPU tensors)";

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline cudaStream_t current_stream() { return nullptr; }

inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }

// Device pointers of the tensors of one op call (see the header comment).
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    for (Buffer& b : buffers_) {
      if (b.written && b.shadow) std::memcpy(b.tensor_ptr, b.device_ptr, b.bytes);
      lk_emu::counters::unregister_device_range(b.device_ptr);
      if (b.shadow) {
#if defined(__SANITIZE_ADDRESS__)
        ASAN_UNPOISON_MEMORY_REGION(b.shadow, b.device_ptr - b.shadow);
#endif
        std::free(b.shadow);
      }
    }
  }

  // A tensor the kernels read.
  template <typename E>
  const E* in(const at::Tensor& t) {
    return reinterpret_cast<const E*>(map(t, false));
  }
  // A tensor the kernels write (or read and write).
  template <typename E>
  E* out(const at::Tensor& t) {
    return reinterpret_cast<E*>(map(t, true));
  }
  // A workspace of the kernels (their traffic to it is counted apart).
  template <typename E>
  E* scratch(const at::Tensor& t) {
    return reinterpret_cast<E*>(map(t, true, true));
  }

 private:
  struct Buffer {
    char* tensor_ptr;
    char* device_ptr;
    char* shadow;  // nullptr: the tensor's own allocation is exactly its bytes
    size_t bytes;
    bool written;
  };

  // Bytes from t's first element to one past its last (non-negative strides).
  static size_t span_bytes(const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      TORCH_CHECK(t.stride(d) >= 0, "lipkernels CUDA emulation: negative strides are not supported");
      last += (t.size(d) - 1) * t.stride(d);
    }
    return static_cast<size_t>(last + 1) * t.element_size();
  }

  char* map(const at::Tensor& t, bool write, bool scratch = false) {
    char* p = static_cast<char*>(write ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr()));
    if (t.numel() == 0) return p;
    const size_t bytes = span_bytes(t);
    for (Buffer& b : buffers_) {
      if (b.tensor_ptr == p) {
        TORCH_CHECK(bytes <= b.bytes, "lipkernels CUDA emulation: one pointer handed to a kernel with two sizes");
        b.written = b.written || write;
        return b.device_ptr;
      }
      TORCH_CHECK(p + bytes <= b.tensor_ptr || b.tensor_ptr + b.bytes <= p,
                  "lipkernels CUDA emulation: overlapping tensors handed to one kernel call");
    }
    const auto& storage = t.storage();
    const bool exact = storage.data() == p && storage.nbytes() == bytes;
    Buffer b{p, p, nullptr, bytes, write};
    if (!exact) {
      const size_t mis = reinterpret_cast<uintptr_t>(p) % 64;
      void* raw = nullptr;
      TORCH_CHECK(posix_memalign(&raw, 64, mis + bytes) == 0, "lipkernels CUDA emulation: out of memory");
      b.shadow = static_cast<char*>(raw);
      b.device_ptr = b.shadow + mis;
      std::memcpy(b.device_ptr, p, bytes);
#if defined(__SANITIZE_ADDRESS__)
      ASAN_POISON_MEMORY_REGION(b.shadow, mis);
#endif
    }
    lk_emu::counters::register_device_range(b.device_ptr, bytes, scratch);
    buffers_.push_back(b);
    return b.device_ptr;
  }

  std::vector<Buffer> buffers_;
};

#define LK_CUDA_BINDING_IMPL(m) TORCH_LIBRARY_IMPL(lipkernels_cuda_emu, CPU, m)

#else  // the real CUDA build

constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
constexpr const char* kTensorKind = "a CUDA tensor";

using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }

// The tensors' own data pointers.
class DeviceMemory {
 public:
  template <typename E>
  const E* in(const at::Tensor& t) {
    return reinterpret_cast<const E*>(t.const_data_ptr());
  }
  template <typename E>
  E* out(const at::Tensor& t) {
    return reinterpret_cast<E*>(t.mutable_data_ptr());
  }
  template <typename E>
  E* scratch(const at::Tensor& t) {
    return out<E>(t);
  }
};

#define LK_CUDA_BINDING_IMPL(m) TORCH_LIBRARY_IMPL(lipkernels, CUDA, m)

#endif

}  // namespace cuda_binding
}  // namespace lipkernels
