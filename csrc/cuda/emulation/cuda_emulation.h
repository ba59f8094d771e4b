// The CUDA emulation layer: what csrc/cuda/*.cu use of CUDA, for host C++ (g++ / clang++),
// so the same kernel sources run on the CPU, on CPU tensors, where sanitizers can watch
// them (LIPKERNELS_CUDA_EMULATION builds; csrc/cuda/runtime.h picks this header or the
// real CUDA headers).
//
// Execution model (executor.cpp):
//   * A launch runs its blocks in a shuffled order (seeded: LIPKERNELS_EMU_SEED), several
//     blocks at once (LIPKERNELS_EMU_CONCURRENT_BLOCKS, default 2). A launch returns when
//     all its blocks have finished (stream order is kept trivially).
//   * Each warp of a block runs on its own OS thread; the warps of a block run
//     concurrently and meet at __syncthreads() through a real barrier.
//   * The 32 lanes of a warp are fibers on their warp's thread: a lane runs until it
//     reaches a warp-synchronous point (__shfl_*_sync, __syncwarp), a __syncthreads() or
//     its end; then the next lane runs (in a shuffled order). A warp-wide operation
//     completes when every lane named in its mask has reached it (with the same mask and
//     operation), so a shuffle exchanges values only among the lanes of its warp.
//     Under ThreadSanitizer every lane is a TSan fiber of its own: no happens-before
//     between lanes except what __syncthreads / __syncwarp / __threadfence establish, so a
//     missing __syncthreads is a data race TSan reports, between lanes of one warp or of
//     different warps.
//   * Static and dynamic shared memory is allocated per block, exactly sized, and filled
//     with 0xFF bytes (NaN for floating types) instead of zeroes.
//   * Misuse that is undefined on a GPU and would otherwise pass silently stops the
//     process with a message (like a sanitizer report): a lane missing from a warp-wide
//     operation's mask, lanes of one warp at different warp operations, __syncthreads()
//     reached at different call sites by one block, a deadlock.
//
// Only what the kernels use is provided; a use of anything else is a compile error.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------- qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)

// ---------------------------------------------------------------- runtime types

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t err);
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream = nullptr);

// ---------------------------------------------------------------- half types

// Storage types with the conversion intrinsics only (as torch builds CUDA code, with
// __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__): round to nearest
// even, NaN kept (quiet), overflow to infinity.
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "half types are 2 bytes");

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.__x, 2);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // round to nearest even
  __half h;
  std::memcpy(&h.__x, &v, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = static_cast<uint32_t>(b.__x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  __nv_bfloat16 b;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep the sign, make it quiet
    b.__x = static_cast<unsigned short>((bits >> 16) | 0x40u);
    return b;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  b.__x = static_cast<unsigned short>(bits >> 16);
  return b;
}

// ---------------------------------------------------------------- the executor's interface

namespace lk_emu {

// The built-in variables of the lane now running on this OS thread. Read through these
// functions (defined in the uninstrumented executor, returning copies), so that a kernel
// compiled under ThreadSanitizer never reads the runtime's own memory.
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

[[noreturn]] void fatal(const char* what);

void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
void threadfence();

enum WarpOp : int { kShflXor = 1, kShfl = 2, kShflDown = 3, kShflUp = 4, kBallot = 5 };
// One warp-wide exchange of up to 8 bytes per lane (see the shuffle intrinsics below).
uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file,
                       int line);

// A static __shared__ declaration (one per declaration site and template instance).
struct SharedDecl {
  size_t bytes;
  size_t align;
  const char* name;
};
void* shared_var(const SharedDecl* decl);
void* dynamic_shared();

// Runs kernel(ctx) on every thread of every block; returns the launch's error.
cudaError_t launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream,
                   void (*kernel)(void*), void* ctx);

// "lipkernels::cuda::{anonymous}::sn_pass_kernel<float, false>" from a __PRETTY_FUNCTION__
// of kernel_name<K>() below.
const char* intern_kernel_name(const char* pretty);

template <auto Kernel>
const char* kernel_name() {
  static const char* name = intern_kernel_name(__PRETTY_FUNCTION__);
  return name;
}

}  // namespace lk_emu

// ---------------------------------------------------------------- built-in variables

#define threadIdx (::lk_emu::thread_idx())
#define blockIdx (::lk_emu::block_idx())
#define blockDim (::lk_emu::block_dim())
#define gridDim (::lk_emu::grid_dim())
constexpr int warpSize = 32;

// ---------------------------------------------------------------- synchronisation

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::lk_emu::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::lk_emu::syncwarp(mask, file, line);
}
inline void __threadfence() { ::lk_emu::threadfence(); }

template <typename T>
inline T lk_emu_exchange(::lk_emu::WarpOp op, unsigned mask, T var, int arg, int width,
                         const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp shuffles move up to 8 bytes of a trivially copyable type");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = ::lk_emu::warp_exchange(op, mask, bits, arg, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return lk_emu_exchange(::lk_emu::kShflXor, mask, var, lane_mask, width, file, line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return lk_emu_exchange(::lk_emu::kShfl, mask, var, src_lane, width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return lk_emu_exchange(::lk_emu::kShflDown, mask, var, static_cast<int>(delta), width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return lk_emu_exchange(::lk_emu::kShflUp, mask, var, static_cast<int>(delta), width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(
      ::lk_emu::warp_exchange(::lk_emu::kBallot, mask, predicate != 0, 0, 32, file, line));
}

// ---------------------------------------------------------------- memory and arithmetic

// Device atomics are relaxed read-modify-writes (ordering comes from __threadfence).
inline unsigned atomicAdd(unsigned* address, unsigned val) {
  return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
}
inline int atomicAdd(int* address, int val) { return __atomic_fetch_add(address, val, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long val) {
  return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
}

// Cache-hint loads are plain loads here.
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}

// sqrt, sqrtf, fabs, fabsf: <cmath>'s.

// ---------------------------------------------------------------- 16-byte accesses

// As a GPU's 128-bit load / store: one 16-byte access (one hook call in a traffic-counting
// build), and a misaligned address is an error, as it is on the GPU.
namespace lk_emu {
typedef char Bytes16 __attribute__((vector_size(16), aligned(16)));
[[noreturn]] void misaligned16(const void* p);
template <typename P>
inline P load16(const void* p) {
  static_assert(sizeof(P) == 16 && std::is_trivially_copyable<P>::value, "a 16-byte type");
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) misaligned16(p);
  const Bytes16 v = *static_cast<const Bytes16*>(p);
  P out;
  std::memcpy(&out, &v, 16);
  return out;
}
template <typename P>
inline void store16(void* p, const P& x) {
  static_assert(sizeof(P) == 16 && std::is_trivially_copyable<P>::value, "a 16-byte type");
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) misaligned16(p);
  Bytes16 v;
  std::memcpy(&v, &x, 16);
  *static_cast<Bytes16*>(p) = v;
}
}  // namespace lk_emu
#define LK_LOAD16(type, p) (::lk_emu::load16<type>(p))
#define LK_STORE16(p, x) (::lk_emu::store16((p), (x)))

// ---------------------------------------------------------------- shared memory and launches

#define LK_EMU_CAT_(a, b) a##b
#define LK_EMU_CAT(a, b) LK_EMU_CAT_(a, b)

namespace lk_emu {
template <typename T>
using shared_ref = T&;
}  // namespace lk_emu

// `LK_SHARED(float, red, [8]);` declares `__shared__ float red[8];` (runtime.h): a
// reference to the block's instance of this declaration.
#define LK_SHARED(type, name, dims)                                                         \
  static constexpr ::lk_emu::SharedDecl LK_EMU_CAT(lk_shared_decl_, name){                  \
      sizeof(type dims), alignof(type dims), #name};                                        \
  ::lk_emu::shared_ref<type dims> name = *static_cast<std::add_pointer_t<type dims>>(        \
      ::lk_emu::shared_var(&LK_EMU_CAT(lk_shared_decl_, name)))
// `LK_EXTERN_SHARED(unsigned char, smem, 16);` declares the launch's dynamic shared memory.
#define LK_EXTERN_SHARED(type, name, align) \
  type* const name = static_cast<type*>(::lk_emu::dynamic_shared())

namespace lipkernels {
namespace cuda {

namespace emu_detail {
template <auto Kernel, typename Tuple>
struct KernelCall {
  static void run(void* ctx) { std::apply(Kernel, *static_cast<const Tuple*>(ctx)); }
};
}  // namespace emu_detail

// The launch of csrc/cuda/runtime.h: the grid runs before this returns.
template <auto Kernel, typename... Args>
cudaError_t launch(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream, Args&&... args) {
  using Tuple = std::tuple<std::decay_t<Args>...>;
  const Tuple packed(std::forward<Args>(args)...);
  return ::lk_emu::launch(::lk_emu::kernel_name<Kernel>(), grid, block, dynamic_smem, stream,
                          &emu_detail::KernelCall<Kernel, Tuple>::run,
                          const_cast<void*>(static_cast<const void*>(&packed)));
}

}  // namespace cuda
}  // namespace lipkernels
