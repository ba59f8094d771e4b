// Multi-tensor kernels: WGAN weight clipping of many tensors (clip_) and the copies
// of _sn_store_vectors_, each in one launch per kMaxMultiTensors tensors.
//
// The tensors' pointers and sizes travel in the kernel parameters (MultiTable, ~1.8
// KiB, __grid_constant__), as in apex's multi_tensor_apply; every block takes one 16
// KiB chunk of one tensor (16-byte loads and stores where the alignment allows) and
// finds its tensor by binary search in the table's prefix sums of blocks.
#include "common.cuh"

namespace lipkernels {
namespace cuda {
namespace {

constexpr int64_t kMaxBlocksPerLaunch = int64_t(1) << 30;

template <typename T>
struct MultiTable {
  const T* src[kMaxMultiTensors];  // copy: the source; clip: unused
  T* dst[kMaxMultiTensors];        // copy: the destination; clip: the tensor
  int64_t n[kMaxMultiTensors];
  int32_t block_begin[kMaxMultiTensors + 1];  // blocks of tensor i: [block_begin[i], block_begin[i + 1])
  int32_t count;
  acc_t<T> lo, hi;  // clip bounds
};

static_assert(sizeof(MultiTable<double>) <= 4096, "MultiTable must fit the 4 KiB kernel parameter limit");

template <typename T, bool kClip>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const __grid_constant__ MultiTable<T> tab) {
  using A = acc_t<T>;
  const int b = blockIdx.x;
  const int t = find_entry(tab.block_begin, tab.count, b);
  const int64_t start = static_cast<int64_t>(b - tab.block_begin[t]) * kChunkElems<T>;
  const int64_t len = min64(kChunkElems<T>, tab.n[t] - start);
  T* dst = tab.dst[t] + start;
  if constexpr (kClip) {
    const A lo = tab.lo, hi = tab.hi;
    map_span(dst, dst, len, [lo, hi](int64_t, A x) { return x < lo ? lo : (x > hi ? hi : x); });
  } else {
    map_span(tab.src[t] + start, dst, len, [](int64_t, A x) { return x; });
  }
}

template <typename T, bool kClip>
cudaError_t launch_many(const T* const* src, T* const* dst, const int64_t* n, int64_t count,
                        acc_t<T> lo, acc_t<T> hi, cudaStream_t stream) {
  MultiTable<T> tab{};
  tab.lo = lo;
  tab.hi = hi;
  int64_t blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (blocks > 0) {
      tab.block_begin[tab.count] = static_cast<int32_t>(blocks);
      LK_RETURN_IF_ERROR(
          launch<multi_tensor_kernel<T, kClip>>(static_cast<unsigned>(blocks), kThreads, 0, stream, tab));
    }
    tab.count = 0;
    blocks = 0;
    return cudaSuccess;
  };
  for (int64_t i = 0; i < count; ++i) {
    int64_t done = 0;  // elements of tensor i already given to a launch
    while (done < n[i]) {
      int64_t take = n[i] - done;
      const int64_t room = (kMaxBlocksPerLaunch - blocks) * kChunkElems<T>;
      if (take > room) take = room;
      tab.src[tab.count] = src ? src[i] + done : nullptr;
      tab.dst[tab.count] = dst[i] + done;
      tab.n[tab.count] = take;
      tab.block_begin[tab.count] = static_cast<int32_t>(blocks);
      blocks += (take + kChunkElems<T> - 1) / kChunkElems<T>;
      ++tab.count;
      done += take;
      if (tab.count == kMaxMultiTensors || blocks == kMaxBlocksPerLaunch) {
        const cudaError_t err = flush();
        if (err != cudaSuccess) return err;
      }
    }
  }
  return flush();
}

}  // namespace

template <typename T>
cudaError_t copy_many(const T* const* src, T* const* dst, const int64_t* n, int64_t count,
                      cudaStream_t stream) {
  return launch_many<T, false>(src, dst, n, count, acc_t<T>(0), acc_t<T>(0), stream);
}

template <typename T>
cudaError_t clip_many(T* const* ptrs, const int64_t* n, int64_t count, double c,
                      cudaStream_t stream) {
  return launch_many<T, true>(nullptr, ptrs, n, count, static_cast<acc_t<T>>(-c),
                              static_cast<acc_t<T>>(c), stream);
}

#define LK_INSTANTIATE(T)                                                                  \
  template cudaError_t copy_many<T>(const T* const*, T* const*, const int64_t*, int64_t,   \
                                    cudaStream_t);                                         \
  template cudaError_t clip_many<T>(T* const*, const int64_t*, int64_t, double, cudaStream_t);

LK_INSTANTIATE(float)
LK_INSTANTIATE(double)
LK_INSTANTIATE(__half)
LK_INSTANTIATE(__nv_bfloat16)

}  // namespace cuda
}  // namespace lipkernels
