// CUDA kernels of batched spectral normalization (docs/math.md section 1) for a list of
// layers: the single-pass power iteration (one read of every W per iteration, sigma
// without a further pass), W_sn = W / sigma, and the backward
// (G - <G, W_sn> u v^T) / sigma. Semantics are those of csrc/cpu/spectral_norm.cpp.
//
// The layer table. Layers go in groups of up to kMaxSnLayers; a group's table (every
// layer's pointers, sizes and work split, SnTable below, ~3 KiB) is a kernel parameter
// (__grid_constant__), so it reaches the device with the launch itself: no device
// buffer, no host-to-device copy, nothing to keep alive. Each kernel's blocks are a
// flat list of work items over all layers of the group (in the spirit of grouped GEMM
// and multi_tensor_apply); a block finds its layer by binary search in the table's
// prefix sums.
//
// Work items:
//   pass items      whole rows [r0, r1) of one layer (about 2 items per SM over the group)
//   column blocks   256 columns of one layer
//   spans           16 KiB of one layer's flat W (elementwise passes)
//
// Forward, n_power_iterations = n >= 1, per iteration (2 launches):
//   pass       for each row r of the item: t_r = W_r . v (groups of 32..256 threads per
//              row, chosen per layer from k), then the same row, still in L1, is
//              accumulated into the item's partial W^T t (in shared memory, or for very
//              wide layers in global scratch); writes t, the item's sum of t_r^2 and its
//              (k,) partial. One read of W from memory.
//   col-reduce s_j = (sum over the layer's items of the partials, in item order) / ||t||,
//              and per block sum s_j^2. The last block of each layer (a counter, after
//              __threadfence: the classic threadfence reduction) adds the blocks' sums in
//              block order, writes sigma = ||s||^2 / max(||s||, eps), v = s / max(||s||,
//              eps) and u = t / max(||t||, eps).
// then W_sn = W / sigma_eff (1 launch, skipped by power_iteration): 2n + 1 launches.
// n = 0 (eval): a pass computing sum_r u_r (W_r . v) per item, a tiny per-layer kernel
// (sigma in item order; u, v copied to the outputs), W_sn: 3 launches.
// Backward: a memset of the per-layer counters, <G, W> per span (the last span block
// of a layer forms 1/sigma_eff and the rank-1 coefficient), then the scaling pass:
// 2 launches and a memset.
//
// Every sum has a fixed order given the layer shapes and the device's SM count, so
// results are deterministic run to run on one device.
#include "common.cuh"

namespace lipkernels {
namespace cuda {
namespace {

// ---------------------------------------------------------------- work plan constants

constexpr int kItemsPerSM = 2;              // target pass items per SM over a group's layers
constexpr int64_t kMinItemElems = 8192;     // elements of W per pass item: at least ...
constexpr int64_t kMaxItemElems = 131072;   // ... and at most
// Rows per pass item at least (where the layer has them): each item writes a (k,)
// partial of W^T t that the column reduction reads back, (4 / rows) * 4 / sizeof(T) of
// W's bytes for float accumulation; 4 rows keep that at <= 25% for float32.
constexpr int64_t kMinRowsPerItem = 4;
constexpr int kRowPacksPerThread = 4;       // a row's 16-byte packs per thread that set the group width
constexpr size_t kPassSmemLimit = 47 * 1024;  // dynamic shared memory of the pass (default limit 48 KiB)
constexpr int kColBlock = kThreads;         // columns per col-reduce block, one per thread

template <typename T>
struct SnEntry {
  const T* w;
  const T* grad;
  T* out;
  const T* u_in;
  const T* v_in;
  T* u;
  T* v;
  int64_t m, k;
  int64_t scratch_off;    // this layer's first item's (k,) partial in scratch
  int64_t t_off;          // this layer's t (m,) in tbuf
  int64_t s_off;          // this layer's s (k,) in sbuf
  int32_t rows_per_item;
  int32_t group;          // threads per row in the pass: 32, 64, 128 or 256
  int32_t acc_global;     // the pass accumulates W^T t in scratch (k too wide for shared memory)
  int32_t vec;            // W 16-byte aligned and k a multiple of the pack: 16-byte loads in the pass
  int32_t vec_v;          // ... and v read in 16-byte packs as well: bit 0 where v_in is 16-byte
                          // aligned (the first iteration reads it), bit 1 where v is (the later ones)
  uint32_t div_magic;     // row of a flat index: (umulhi(i, magic) + i) >> shift = i / k
  uint32_t div_shift;
};

template <typename T>
struct SnTable {
  SnEntry<T> e[kMaxSnLayers];
  int32_t item_begin[kMaxSnLayers + 1];  // pass items of layer l: [item_begin[l], item_begin[l + 1])
  int32_t col_begin[kMaxSnLayers + 1];   // column blocks
  int32_t span_begin[kMaxSnLayers + 1];  // spans
  int32_t n_layers;
  int32_t first;                         // the pass reads v_in (first iteration), else v
  acc_t<T> eps;
  acc_t<T>* sigmas;                      // (n_layers,)
  acc_t<T>* scratch;                     // items' (k,) partials of W^T t
  acc_t<T>* tbuf;                        // t of every layer
  acc_t<T>* sbuf;                        // s of every layer
  acc_t<T>* part;                        // per item (pass) or per span (backward) sums
  acc_t<T>* colsq;                       // per column block sum of s_j^2
  acc_t<T>* coef;                        // backward: 1 / sigma_eff and the rank-1 coefficient per layer
  unsigned* counters;                    // per layer: blocks done (last-block detection)
};

// Kernel parameters stay within the 4 KiB every CUDA version accepts.
static_assert(sizeof(SnTable<double>) <= 4096, "SnTable must fit the 4 KiB kernel parameter limit");
static_assert(sizeof(SnTable<float>) <= 4096, "SnTable must fit the 4 KiB kernel parameter limit");

__device__ __forceinline__ uint32_t div_by_k(uint32_t i, uint32_t magic, uint32_t shift) {
  return (__umulhi(i, magic) + i) >> shift;
}

template <typename A>
__device__ __forceinline__ A effective_sigma(A sigma, A eps) {
  return lk_abs(sigma) < eps ? eps : sigma;
}

// Sum over a group of G threads (G = 32, 64, 128 or 256, the same in the whole block;
// groups are consecutive threads), the same value in every thread of the group. All
// threads of the block must call it.
template <typename A>
__device__ __forceinline__ A group_allreduce(A v, int G, A* red) {
  v = warp_allreduce(v);
  if (G <= 32) return v;
  if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  const int wpg = G / 32, first = static_cast<int>(threadIdx.x / G) * wpg;
  A s = red[first];
  for (int w = 1; w < wpg; ++w) s += red[first + w];
  __syncthreads();
  return s;
}

// A row's columns owned by thread `lane` of a group of G: the packs q = lane, lane + G, ...
// of kVec<T> columns (fixed ownership, whatever the row, so the accumulator entries of
// a thread are only ever touched by that thread).

// sum_j row_j v_j over the thread's columns.
template <typename T>
__device__ __forceinline__ acc_t<T> row_dot(const T* __restrict__ row, const T* __restrict__ v,
                                            int64_t k, int lane, int G, bool vec, bool vec_v) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t nq = (k + V - 1) / V;
  A d = A(0);
  if (vec_v) {
#pragma unroll 2
    for (int64_t q = lane; q < nq; q += G) {
      const Pack<T> p = load_pack(row + q * V);
      const Pack<T> pv = load_pack(v + q * V);
#pragma unroll
      for (int c = 0; c < V; ++c) d += to_acc(p.v[c]) * to_acc(pv.v[c]);
    }
  } else if (vec) {
#pragma unroll 2
    for (int64_t q = lane; q < nq; q += G) {
      const Pack<T> p = load_pack(row + q * V);
#pragma unroll
      for (int c = 0; c < V; ++c) d += to_acc(p.v[c]) * to_acc(v[q * V + c]);
    }
  } else {
    for (int64_t q = lane; q < nq; q += G) {
#pragma unroll
      for (int c = 0; c < V; ++c) {
        const int64_t j = q * V + c;
        if (j < k) d += to_acc(row[j]) * to_acc(v[j]);
      }
    }
  }
  return d;
}

// acc_j += t * row_j over the thread's columns (the row is read again: from L1 / L2,
// it was just loaded by the same thread).
template <typename T>
__device__ __forceinline__ void row_axpy(const T* __restrict__ row, acc_t<T> t, acc_t<T>* acc,
                                         int64_t k, int lane, int G, bool vec) {
  constexpr int V = kVec<T>;
  const int64_t nq = (k + V - 1) / V;
  if (vec) {
#pragma unroll 2
    for (int64_t q = lane; q < nq; q += G) {
      const Pack<T> p = load_pack(row + q * V);
#pragma unroll
      for (int c = 0; c < V; ++c) acc[q * V + c] += t * to_acc(p.v[c]);
    }
  } else {
    for (int64_t q = lane; q < nq; q += G) {
#pragma unroll
      for (int c = 0; c < V; ++c) {
        const int64_t j = q * V + c;
        if (j < k) acc[j] += t * to_acc(row[j]);
      }
    }
  }
}

// ---------------------------------------------------------------- kernels

// One pass over the rows of a pass item. At most 64 registers (4 blocks per SM: 50 %
// occupancy on sm_80 / sm_90) without spills: the row loops are unrolled twice, not four
// times (ptxas, left to choose, capped this kernel at 64 registers and spilled). kSigmaOnly: part[item] = sum_r u_in[r] t_r.
// Otherwise: tbuf[r] = t_r, part[item] = sum_r t_r^2, and the item's (k,) partial
// sum_r t_r W_r in scratch; zeroes the layer's counter for the col-reduce that follows.
template <typename T, bool kSigmaOnly>
__global__ void __launch_bounds__(kThreads, 4) sn_pass_kernel(const __grid_constant__ SnTable<T> tab) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  LK_EXTERN_SHARED(unsigned char, smem_raw, 16);
  LK_SHARED(A, red, [kWarps]);
  LK_SHARED(A, group_sum, [kWarps]);
  const int item = blockIdx.x;
  const int l = find_entry(tab.item_begin, tab.n_layers, item);
  const SnEntry<T>& e = tab.e[l];
  const int64_t k = e.k;
  const int local = item - tab.item_begin[l];
  const int64_t r0 = static_cast<int64_t>(local) * e.rows_per_item;
  const int64_t r1 = min64(e.m, r0 + e.rows_per_item);
  const int G = e.group, NG = kThreads / G;
  const int grp = threadIdx.x / G, lane = threadIdx.x % G;
  const bool vec = e.vec != 0;
  const T* __restrict__ v = (kSigmaOnly || tab.first) ? e.v_in : e.v;
  const int v_bit = (kSigmaOnly || tab.first) ? 1 : 2;
  A* acc = nullptr;
  if constexpr (!kSigmaOnly) {
    if (local == 0 && threadIdx.x == 0) tab.counters[l] = 0u;
    acc = e.acc_global ? tab.scratch + e.scratch_off + static_cast<int64_t>(local) * k
                       : reinterpret_cast<A*>(smem_raw) + static_cast<int64_t>(grp) * k;
    const int64_t nq = (k + V - 1) / V;
    for (int64_t q = lane; q < nq; q += G) {
#pragma unroll
      for (int c = 0; c < V; ++c) {
        const int64_t j = q * V + c;
        if (j < k) acc[j] = A(0);
      }
    }
  }
  A gsum = A(0);
  const int64_t rounds = (r1 - r0 + NG - 1) / NG;
  for (int64_t rd = 0; rd < rounds; ++rd) {
    const int64_t r = r0 + rd * NG + grp;
    const bool active = r < r1;
    A dot = A(0);
    if (active) dot = row_dot(e.w + r * k, v, k, lane, G, vec, (e.vec_v & v_bit) != 0);
    const A t = group_allreduce(dot, G, red);  // every thread of the block
    if (active) {
      if constexpr (kSigmaOnly) {
        gsum += to_acc(e.u_in[r]) * t;
      } else {
        gsum += t * t;
        row_axpy(e.w + r * k, t, acc, k, lane, G, vec);
        if (lane == 0) tab.tbuf[e.t_off + r] = t;
      }
    }
  }
  if (lane == 0) group_sum[grp] = gsum;
  __syncthreads();  // also: every thread's accumulator entries are written
  if (threadIdx.x == 0) {
    A s = group_sum[0];
    for (int g = 1; g < NG; ++g) s += group_sum[g];
    tab.part[item] = s;
  }
  if constexpr (!kSigmaOnly) {
    if (!e.acc_global) {
      const A* accs = reinterpret_cast<const A*>(smem_raw);
      A* dst = tab.scratch + e.scratch_off + static_cast<int64_t>(local) * k;
      for (int64_t j = threadIdx.x; j < k; j += kThreads) {
        A s = accs[j];
        for (int g = 1; g < NG; ++g) s += accs[static_cast<int64_t>(g) * k + j];
        dst[j] = s;
      }
    }
  }
}

// s_j for 256 columns of one layer; the layer's last block finishes the iteration.
template <typename T>
__global__ void __launch_bounds__(kThreads) sn_colreduce_kernel(const __grid_constant__ SnTable<T> tab) {
  using A = acc_t<T>;
  LK_SHARED(A, red, [kWarps]);
  LK_SHARED(A, sh_tden, );
  LK_SHARED(A, sh_sden, );
  LK_SHARED(int, sh_last, );
  const int cb = blockIdx.x;
  const int l = find_entry(tab.col_begin, tab.n_layers, cb);
  const SnEntry<T>& e = tab.e[l];
  const int local = cb - tab.col_begin[l];
  const int n_cb = tab.col_begin[l + 1] - tab.col_begin[l];
  const int i0 = tab.item_begin[l], n_items = tab.item_begin[l + 1] - i0;
  const int64_t k = e.k;
  const A eps = tab.eps;
  if (threadIdx.x == 0) {  // ||t|| from the items' sums, in item order (the same in every block)
    A tsq = A(0);
    for (int i = 0; i < n_items; ++i) tsq += tab.part[i0 + i];
    sh_tden = floor_at(lk_sqrt(tsq), eps);
  }
  __syncthreads();
  const A tden = sh_tden;
  const int64_t j = static_cast<int64_t>(local) * kColBlock + threadIdx.x;
  A sq = A(0);
  if (j < k) {
    const A* p = tab.scratch + e.scratch_off + j;
    A S = A(0);
    int i = 0;
    for (; i + 4 <= n_items; i += 4) {
      const A a0 = p[static_cast<int64_t>(i) * k], a1 = p[static_cast<int64_t>(i + 1) * k];
      const A a2 = p[static_cast<int64_t>(i + 2) * k], a3 = p[static_cast<int64_t>(i + 3) * k];
      S += a0;
      S += a1;
      S += a2;
      S += a3;
    }
    for (; i < n_items; ++i) S += p[static_cast<int64_t>(i) * k];
    const A s = S / tden;
    tab.sbuf[e.s_off + j] = s;
    sq = s * s;
  }
  sq = block_allreduce(sq, red);
  if (threadIdx.x == 0) tab.colsq[cb] = sq;
  // Publish sbuf and colsq before counting this block done.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) sh_last = atomicAdd(&tab.counters[l], 1u) == static_cast<unsigned>(n_cb - 1);
  __syncthreads();
  if (!sh_last) return;
  // The last block of the layer: every other block's sbuf and colsq are visible now
  // (read with __ldcg, past L1).
  __threadfence();
  if (threadIdx.x == 0) {
    A ssq = A(0);
    for (int c = 0; c < n_cb; ++c) ssq += __ldcg(&tab.colsq[tab.col_begin[l] + c]);
    const A snorm = lk_sqrt(ssq);
    sh_sden = floor_at(snorm, eps);
    tab.sigmas[l] = snorm >= eps ? snorm : snorm * snorm / eps;
  }
  __syncthreads();
  const A sden = sh_sden;
  for (int64_t jj = threadIdx.x; jj < k; jj += kThreads)
    e.v[jj] = from_acc<T>(__ldcg(&tab.sbuf[e.s_off + jj]) / sden);
  for (int64_t r = threadIdx.x; r < e.m; r += kThreads)
    e.u[r] = from_acc<T>(tab.tbuf[e.t_off + r] / tden);
}

// n_power_iterations == 0: sigma = the items' sums in item order; u, v copied out.
template <typename T>
__global__ void __launch_bounds__(kThreads) sn_finish0_kernel(const __grid_constant__ SnTable<T> tab) {
  using A = acc_t<T>;
  const int l = blockIdx.x;
  const SnEntry<T>& e = tab.e[l];
  if (threadIdx.x == 0) {
    A s = A(0);
    for (int i = tab.item_begin[l]; i < tab.item_begin[l + 1]; ++i) s += tab.part[i];
    tab.sigmas[l] = s;
  }
  if (e.u != e.u_in)
    for (int64_t r = threadIdx.x; r < e.m; r += kThreads) e.u[r] = e.u_in[r];
  if (e.v != e.v_in)
    for (int64_t j = threadIdx.x; j < e.k; j += kThreads) e.v[j] = e.v_in[j];
}

// out = W / sigma_eff over one span.
template <typename T>
__global__ void __launch_bounds__(kThreads) sn_divide_kernel(const __grid_constant__ SnTable<T> tab) {
  using A = acc_t<T>;
  const int sp = blockIdx.x;
  const int l = find_entry(tab.span_begin, tab.n_layers, sp);
  const SnEntry<T>& e = tab.e[l];
  if (e.out == nullptr) return;
  const int64_t start = static_cast<int64_t>(sp - tab.span_begin[l]) * kChunkElems<T>;
  const int64_t len = min64(kChunkElems<T>, e.m * e.k - start);
  const A inv = A(1) / effective_sigma(tab.sigmas[l], tab.eps);
  map_span(e.w + start, e.out + start, len, [inv](int64_t, A x) { return inv * x; });
}

// part[span] = <G, W> over one span; the layer's last span block forms the coefficients.
template <typename T>
__global__ void __launch_bounds__(kThreads) sn_backward_dot_kernel(const __grid_constant__ SnTable<T> tab) {
  using A = acc_t<T>;
  LK_SHARED(A, red, [kWarps]);
  LK_SHARED(int, sh_last, );
  const int sp = blockIdx.x;
  const int l = find_entry(tab.span_begin, tab.n_layers, sp);
  const SnEntry<T>& e = tab.e[l];
  const int s0 = tab.span_begin[l], n_sp = tab.span_begin[l + 1] - s0;
  const int64_t start = static_cast<int64_t>(sp - s0) * kChunkElems<T>;
  const int64_t len = min64(kChunkElems<T>, e.m * e.k - start);
  A d = reduce_span<T, true>(e.grad + start, e.w + start, len);
  d = block_allreduce(d, red);
  if (threadIdx.x == 0) tab.part[sp] = d;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) sh_last = atomicAdd(&tab.counters[l], 1u) == static_cast<unsigned>(n_sp - 1);
  __syncthreads();
  if (!sh_last) return;
  if (threadIdx.x == 0) {
    __threadfence();
    A gw = A(0);
    for (int i = 0; i < n_sp; ++i) gw += __ldcg(&tab.part[s0 + i]);
    const A sigma = tab.sigmas[l];
    const A s = effective_sigma(sigma, tab.eps);
    tab.coef[2 * l] = A(1) / s;
    // <G, W_sn> / sigma = <G, W> / sigma^2; zero where sigma was clamped.
    tab.coef[2 * l + 1] = lk_abs(sigma) < tab.eps ? A(0) : gw / (s * s);
  }
}

// out = G / sigma_eff - (coef * u_r) v_j over one span.
template <typename T>
__global__ void __launch_bounds__(kThreads) sn_backward_scale_kernel(const __grid_constant__ SnTable<T> tab) {
  using A = acc_t<T>;
  const int sp = blockIdx.x;
  const int l = find_entry(tab.span_begin, tab.n_layers, sp);
  const SnEntry<T>& e = tab.e[l];
  const int64_t start = static_cast<int64_t>(sp - tab.span_begin[l]) * kChunkElems<T>;
  const int64_t len = min64(kChunkElems<T>, e.m * e.k - start);
  const A inv = tab.coef[2 * l], corr = tab.coef[2 * l + 1];
  const T* u = e.u;
  const T* v = e.v;
  const int64_t k = e.k;
  const uint32_t magic = e.div_magic, shift = e.div_shift;
  map_span(e.grad + start, e.out + start, len, [=](int64_t i, A g) {
    const uint32_t flat = static_cast<uint32_t>(start + i);  // < 2^31: checked on the host
    const uint32_t r = div_by_k(flat, magic, shift);
    const int64_t j = static_cast<int64_t>(flat) - static_cast<int64_t>(r) * k;
    return inv * g - (corr * to_acc(u[r])) * to_acc(v[j]);
  });
}

// ---------------------------------------------------------------- host: the plan

// SM count of the current device (the work plan's target number of items), cached per
// thread and device.
int device_sms() {
  thread_local int cached_dev = -1, cached_sms = 0;
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();  // not a launch error of ours: clear it
    return 108;
  }
  if (dev == cached_dev) return cached_sms;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    return 108;
  }
  cached_dev = dev;
  cached_sms = n;
  return n;
}

void int_divider(uint32_t d, uint32_t* magic, uint32_t* shift) {
  uint32_t s = 0;
  while (s < 32 && (uint64_t(1) << s) < d) ++s;
  const uint64_t one = 1;
  *magic = static_cast<uint32_t>(((one << 32) * ((one << s) - d)) / d + 1);
  *shift = s;
}

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

enum class Mode { Iterate, Sigma, Backward };

// A group's table, the launch sizes, and the workspace regions it needs.
template <typename T>
struct GroupPlan {
  SnTable<T> tab;
  int n_items, n_cols, n_spans;
  size_t pass_smem;
  bool any_out;
  size_t off_scratch, off_tbuf, off_sbuf, off_part, off_colsq, off_coef, off_counters, bytes;
};

// Plans layers[0, L) (L <= kMaxSnLayers). Returns false when a size is out of range.
template <typename T>
bool plan_group(const SnLayer<T>* layers, int L, Mode mode, int sms, GroupPlan<T>* p) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  *p = GroupPlan<T>{};
  SnTable<T>& tab = p->tab;
  tab.n_layers = L;
  int64_t total = 0;
  for (int l = 0; l < L; ++l) total += layers[l].m * layers[l].k;
  int64_t item_elems = total / (static_cast<int64_t>(kItemsPerSM) * sms);
  item_elems = item_elems < kMinItemElems ? kMinItemElems : (item_elems > kMaxItemElems ? kMaxItemElems : item_elems);
  int64_t items = 0, cols = 0, spans = 0, scratch = 0, tsz = 0, ssz = 0;
  size_t smem = 0;
  for (int l = 0; l < L; ++l) {
    const SnLayer<T>& ly = layers[l];
    const int64_t m = ly.m, k = ly.k;
    if (m < 1 || k < 1 || m * k > INT32_MAX) return false;
    SnEntry<T>& e = tab.e[l];
    e.w = ly.w;
    e.grad = ly.grad;
    e.out = ly.out;
    e.u_in = ly.u_in;
    e.v_in = ly.v_in;
    e.u = ly.u;
    e.v = ly.v;
    e.m = m;
    e.k = k;
    int64_t rows = (item_elems + k - 1) / k;
    if (rows < kMinRowsPerItem) rows = kMinRowsPerItem;
    if (rows > m) rows = m;
    e.rows_per_item = static_cast<int32_t>(rows);
    const int64_t n_items = (m + rows - 1) / rows;
    const int64_t packs = (k + V - 1) / V;
    int G = 32;
    while (G < kThreads && static_cast<int64_t>(G) * kRowPacksPerThread < packs) G *= 2;
    size_t need = static_cast<size_t>(kThreads / G) * static_cast<size_t>(k) * sizeof(A);
    if (need > kPassSmemLimit) {
      G = kThreads;
      need = static_cast<size_t>(k) * sizeof(A);
    }
    e.acc_global = need > kPassSmemLimit ? 1 : 0;
    if (!e.acc_global && need > smem) smem = need;
    e.group = G;
    e.vec = (reinterpret_cast<uintptr_t>(ly.w) % 16 == 0 && k % V == 0) ? 1 : 0;
    // The packed (u, v) outputs of a batch leave a layer's v unaligned after a layer
    // whose m + k is not a multiple of 4: the first iteration still reads v_in in packs.
    e.vec_v = e.vec ? ((reinterpret_cast<uintptr_t>(ly.v_in) % 16 == 0 ? 1 : 0) |
                       (reinterpret_cast<uintptr_t>(ly.v) % 16 == 0 ? 2 : 0))
                    : 0;
    int_divider(static_cast<uint32_t>(k), &e.div_magic, &e.div_shift);
    e.scratch_off = scratch;
    e.t_off = tsz;
    e.s_off = ssz;
    tab.item_begin[l] = static_cast<int32_t>(items);
    tab.col_begin[l] = static_cast<int32_t>(cols);
    tab.span_begin[l] = static_cast<int32_t>(spans);
    items += n_items;
    cols += (k + kColBlock - 1) / kColBlock;
    spans += (m * k + kChunkElems<T> - 1) / kChunkElems<T>;
    scratch += n_items * k;
    tsz += m;
    ssz += k;
    if (ly.out) p->any_out = true;
    if (items > INT32_MAX || cols > INT32_MAX || spans > INT32_MAX) return false;
  }
  tab.item_begin[L] = static_cast<int32_t>(items);
  tab.col_begin[L] = static_cast<int32_t>(cols);
  tab.span_begin[L] = static_cast<int32_t>(spans);
  p->n_items = static_cast<int>(items);
  p->n_cols = static_cast<int>(cols);
  p->n_spans = static_cast<int>(spans);
  p->pass_smem = smem;
  // Workspace regions (sizes 0 where the mode does not use them).
  const bool iterate = mode == Mode::Iterate;
  size_t off = 0;
  auto region = [&off](size_t bytes) {
    const size_t at = off;
    off += align_up(bytes);
    return at;
  };
  p->off_scratch = region(iterate ? static_cast<size_t>(scratch) * sizeof(A) : 0);
  p->off_tbuf = region(iterate ? static_cast<size_t>(tsz) * sizeof(A) : 0);
  p->off_sbuf = region(iterate ? static_cast<size_t>(ssz) * sizeof(A) : 0);
  p->off_part = region(static_cast<size_t>(mode == Mode::Backward ? spans : items) * sizeof(A));
  p->off_colsq = region(iterate ? static_cast<size_t>(cols) * sizeof(A) : 0);
  p->off_coef = region(mode == Mode::Backward ? 2 * static_cast<size_t>(L) * sizeof(A) : 0);
  p->off_counters = region(mode != Mode::Sigma ? static_cast<size_t>(L) * sizeof(unsigned) : 0);
  p->bytes = off;
  return true;
}

template <typename T>
void bind_workspace(GroupPlan<T>* p, void* workspace, acc_t<T>* sigmas) {
  using A = acc_t<T>;
  unsigned char* base = static_cast<unsigned char*>(workspace);
  SnTable<T>& tab = p->tab;
  tab.sigmas = sigmas;
  tab.scratch = reinterpret_cast<A*>(base + p->off_scratch);
  tab.tbuf = reinterpret_cast<A*>(base + p->off_tbuf);
  tab.sbuf = reinterpret_cast<A*>(base + p->off_sbuf);
  tab.part = reinterpret_cast<A*>(base + p->off_part);
  tab.colsq = reinterpret_cast<A*>(base + p->off_colsq);
  tab.coef = reinterpret_cast<A*>(base + p->off_coef);
  tab.counters = reinterpret_cast<unsigned*>(base + p->off_counters);
}

template <typename T>
size_t workspace_bytes(const SnLayer<T>* layers, int64_t L, Mode mode) {
  const int sms = device_sms();
  size_t bytes = 0;
  for (int64_t l0 = 0; l0 < L; l0 += kMaxSnLayers) {
    const int n = static_cast<int>(L - l0 < kMaxSnLayers ? L - l0 : kMaxSnLayers);
    GroupPlan<T> p;
    if (!plan_group(layers + l0, n, mode, sms, &p)) return 0;
    if (p.bytes > bytes) bytes = p.bytes;
  }
  return bytes;
}


}  // namespace

template <typename T>
size_t sn_forward_workspace(const SnLayer<T>* layers, int64_t L, int64_t n_power_iterations) {
  return workspace_bytes(layers, L, n_power_iterations > 0 ? Mode::Iterate : Mode::Sigma);
}

template <typename T>
size_t sn_backward_workspace(const SnLayer<T>* layers, int64_t L) {
  return workspace_bytes(layers, L, Mode::Backward);
}

template <typename T>
cudaError_t sn_forward(const SnLayer<T>* layers, int64_t L, int64_t n_power_iterations,
                       acc_t<T> eps, acc_t<T>* sigmas, void* workspace, cudaStream_t stream) {
  if (L <= 0) return cudaSuccess;
  const Mode mode = n_power_iterations > 0 ? Mode::Iterate : Mode::Sigma;
  const int sms = device_sms();
  for (int64_t l0 = 0; l0 < L; l0 += kMaxSnLayers) {
    const int n = static_cast<int>(L - l0 < kMaxSnLayers ? L - l0 : kMaxSnLayers);
    GroupPlan<T> p;
    if (!plan_group(layers + l0, n, mode, sms, &p)) return cudaErrorInvalidValue;
    bind_workspace(&p, workspace, sigmas + l0);
    p.tab.eps = eps;
    if (mode == Mode::Sigma) {
      p.tab.first = 1;
      LK_RETURN_IF_ERROR(launch<sn_pass_kernel<T, true>>(p.n_items, kThreads, 0, stream, p.tab));
      LK_RETURN_IF_ERROR(launch<sn_finish0_kernel<T>>(n, kThreads, 0, stream, p.tab));
    } else {
      for (int64_t it = 0; it < n_power_iterations; ++it) {
        p.tab.first = it == 0 ? 1 : 0;
        LK_RETURN_IF_ERROR(launch<sn_pass_kernel<T, false>>(p.n_items, kThreads, p.pass_smem, stream, p.tab));
        LK_RETURN_IF_ERROR(launch<sn_colreduce_kernel<T>>(p.n_cols, kThreads, 0, stream, p.tab));
      }
    }
    if (p.any_out) LK_RETURN_IF_ERROR(launch<sn_divide_kernel<T>>(p.n_spans, kThreads, 0, stream, p.tab));
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t sn_backward(const SnLayer<T>* layers, int64_t L, const acc_t<T>* sigmas, acc_t<T> eps,
                        void* workspace, cudaStream_t stream) {
  if (L <= 0) return cudaSuccess;
  const int sms = device_sms();
  for (int64_t l0 = 0; l0 < L; l0 += kMaxSnLayers) {
    const int n = static_cast<int>(L - l0 < kMaxSnLayers ? L - l0 : kMaxSnLayers);
    GroupPlan<T> p;
    if (!plan_group(layers + l0, n, Mode::Backward, sms, &p)) return cudaErrorInvalidValue;
    // The kernels only read sigmas in the backward.
    bind_workspace(&p, workspace, const_cast<acc_t<T>*>(sigmas + l0));
    p.tab.eps = eps;
    LK_RETURN_IF_ERROR(cudaMemsetAsync(p.tab.counters, 0, n * sizeof(unsigned), stream));
    LK_RETURN_IF_ERROR(launch<sn_backward_dot_kernel<T>>(p.n_spans, kThreads, 0, stream, p.tab));
    LK_RETURN_IF_ERROR(launch<sn_backward_scale_kernel<T>>(p.n_spans, kThreads, 0, stream, p.tab));
  }
  return cudaSuccess;
}

#define LK_INSTANTIATE(T)                                                                        \
  template size_t sn_forward_workspace<T>(const SnLayer<T>*, int64_t, int64_t);                  \
  template size_t sn_backward_workspace<T>(const SnLayer<T>*, int64_t);                          \
  template cudaError_t sn_forward<T>(const SnLayer<T>*, int64_t, int64_t, acc_t<T>, acc_t<T>*,   \
                                     void*, cudaStream_t);                                       \
  template cudaError_t sn_backward<T>(const SnLayer<T>*, int64_t, const acc_t<T>*, acc_t<T>,     \
                                      void*, cudaStream_t);

LK_INSTANTIATE(float)
LK_INSTANTIATE(double)
LK_INSTANTIATE(__half)
LK_INSTANTIATE(__nv_bfloat16)

}  // namespace cuda
}  // namespace lipkernels
