// CUDA kernels of the per-sample gradient-norm family (docs/math.md sections 2-5): n_i =
// ||g_i|| fused with the GN / GraN / GP / R1 epilogues (one read of g), the backward
// (one read of g, one write of dL/dg), sample_scale and sample_dot.
//
// Grid: one block of 256 threads per 16 KiB chunk of a sample (B * chunks blocks), so a
// large sample is spread over many SMs: a (8, 3, 256, 256) float32 g runs on 384
// blocks. Reductions are two-stage and deterministic: each chunk's block sums its
// elements (16-byte loads where the alignment allows, 4 in flight per thread; a fixed
// per-thread order and a fixed warp / block tree), writes one partial, and a finishing
// kernel (one warp per sample) adds the partials in chunk order and applies the
// epilogue. A sample of one chunk is finished by its block directly: one launch.
//
// The backward is one launch: each block computes its sample's coefficient
// c_b = epilogue_backward(...) itself (a few flops), writes dL/df_b from the sample's
// first chunk, and scales its chunk of g.
#include "common.cuh"

namespace lipkernels {
namespace cuda {
namespace {

constexpr int64_t kMaxGrid = int64_t(1) << 30;  // blocks per launch; kernels loop over more

unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

template <typename T>
int64_t chunks_per_sample(int64_t N) {
  return N <= kChunkElems<T> ? 1 : (N + kChunkElems<T> - 1) / kChunkElems<T>;
}

// What the end of a per-sample sum does with sample b's total.
template <typename T>
struct SampleFinish {
  int dot;          // sample_dot: out[b] = total
  Epilogue e;       // otherwise norm[b] = sqrt(total), out[b] = epilogue(f_b, norm[b])
  acc_t<T> param;
  const T* f;       // nullptr: f_b = 0
  int64_t f_stride;
  acc_t<T>* norm;
  T* out;           // exactly one of out and out_acc is non-null
  acc_t<T>* out_acc;
};

template <typename T>
__device__ __forceinline__ void finish_sample(const SampleFinish<T>& fin, int64_t b,
                                              acc_t<T> total, const T* single = nullptr) {
  using A = acc_t<T>;
  if (fin.dot) {
    fin.out[b] = from_acc<T>(total);
    return;
  }
  // A one-element sample (single: its element): n = |g_b| exactly, as torch gives.
  const A n = single ? lk_abs(to_acc(*single)) : lk_sqrt(total);
  fin.norm[b] = n;
  const A fb = fin.f ? to_acc(fin.f[b * fin.f_stride]) : A(0);
  const A o = epilogue_forward<A>(fin.e, fb, n, fin.param);
  if (fin.out_acc)
    fin.out_acc[b] = o;
  else
    fin.out[b] = from_acc<T>(o);
}

// Block `blk` of B * nchunks sums chunk (blk % nchunks) of sample (blk / nchunks).
template <typename T, bool kDot>
__global__ void __launch_bounds__(kThreads)
    sample_reduce_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t N,
                         int64_t nchunks, int64_t nblocks, acc_t<T>* __restrict__ partials,
                         SampleFinish<T> fin) {
  using A = acc_t<T>;
  LK_SHARED(A, red, [kWarps]);
  for (int64_t blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
    const int64_t s = blk / nchunks, c = blk - s * nchunks;
    const int64_t start = c * kChunkElems<T>;
    const int64_t len = min64(kChunkElems<T>, N - start);
    const T* pa = a + s * N + start;
    const T* pb = kDot ? b + s * N + start : nullptr;
    A acc = reduce_span<T, kDot>(pa, pb, len);
    acc = block_allreduce(acc, red);
    if (threadIdx.x == 0) {
      if (nchunks == 1)
        finish_sample(fin, s, acc, (!kDot && N == 1) ? pa : nullptr);
      else
        partials[blk] = acc;
    }
  }
}

// One warp per sample: the sample's partials added in chunk order, then finished.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sample_finish_kernel(const acc_t<T>* __restrict__ partials, int64_t B, int64_t nchunks,
                         SampleFinish<T> fin) {
  using A = acc_t<T>;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (s >= B) return;  // the whole warp: s is the same in all its lanes
  A acc = A(0);
  for (int64_t c = lane; c < nchunks; c += 32) acc += partials[s * nchunks + c];
  acc = warp_allreduce(acc);
  if (lane == 0) finish_sample(fin, s, acc);
}

// Where the per-sample coefficient of out = c_b * g comes from.
template <typename T>
struct ScaleCoef {
  const acc_t<T>* coef;  // sample_scale: c_b = coef[b]; nullptr: from the epilogue below
  const acc_t<T>* grad_out;
  int64_t go_stride;
  const T* f;
  int64_t f_stride;
  const acc_t<T>* norm;
  Epilogue e;
  acc_t<T> param;
  T* grad_f;             // nullptr: not wanted
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sample_scale_kernel(const T* __restrict__ g, T* __restrict__ out, int64_t N, int64_t nchunks,
                        int64_t nblocks, ScaleCoef<T> cs) {
  using A = acc_t<T>;
  for (int64_t blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
    const int64_t s = blk / nchunks, c = blk - s * nchunks;
    // out = (g * a) * b: a = c given (b = 1), or the epilogue's two factors (epilogue.h:
    // 1/n and dL/dn, whose product can overflow where the result does not).
    A a = A(0), b = A(1);
    bool single = false;
    if (cs.coef) {
      a = cs.coef[s];
    } else {
      A gf = A(0), coef = A(0);
      const A fb = cs.f ? to_acc(cs.f[s * cs.f_stride]) : A(0);
      epilogue_backward<A>(cs.e, cs.grad_out[s * cs.go_stride], fb, cs.norm[s], cs.param, &gf, &coef, &a, &b);
      if (c == 0 && threadIdx.x == 0 && cs.grad_f) cs.grad_f[s] = from_acc<T>(gf);
      // One element per sample: dL/dn * (g / n), as 1 / n can overflow (epilogue.h).
      single = N == 1 && cs.e != Epilogue::R1;
    }
    const int64_t start = c * kChunkElems<T>;
    const int64_t len = min64(kChunkElems<T>, N - start);
    if (single) {
      if (threadIdx.x == 0)
        out[s] = from_acc<T>(epilogue_single_grad<A>(b, to_acc(g[s]), cs.norm[s]));
    } else {  // (x * a) * 1 = a x exactly for sample_scale's given c
      map_span(g + s * N + start, out + s * N + start, len,
               [a, b](int64_t, A x) { return (x * a) * b; });
    }
  }
}


}  // namespace

namespace {

// The per-sample reduction: one block per chunk; when a sample has several chunks, a
// finishing kernel adds its partials in order and applies fin.
template <typename T, bool DOT>
cudaError_t launch_sample_reduce(const T* a, const T* b, int64_t B, int64_t N, acc_t<T>* partials,
                                 const SampleFinish<T>& fin, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  const int64_t nchunks = chunks_per_sample<T>(N);
  const int64_t nblocks = B * nchunks;
  LK_RETURN_IF_ERROR(launch<sample_reduce_kernel<T, DOT>>(grid_for(nblocks), kThreads, 0, stream, a, b,
                                                          N, nchunks, nblocks, partials, fin));
  if (nchunks > 1) {
    LK_RETURN_IF_ERROR(launch<sample_finish_kernel<T>>(grid_for((B + kWarps - 1) / kWarps), kThreads, 0,
                                                       stream, partials, B, nchunks, fin));
  }
  return cudaSuccess;
}

// dL/dg (or c g) over all chunks of all samples: one launch.
template <typename T>
cudaError_t launch_sample_scale(const T* g, T* out, int64_t B, int64_t N, const ScaleCoef<T>& cs,
                                cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  const int64_t nchunks = chunks_per_sample<T>(N);
  const int64_t nblocks = B * nchunks;
  LK_RETURN_IF_ERROR(
      launch<sample_scale_kernel<T>>(grid_for(nblocks), kThreads, 0, stream, g, out, N, nchunks, nblocks, cs));
  return cudaSuccess;
}

}  // namespace

template <typename T>
int64_t sample_partials(int64_t B, int64_t N) {
  const int64_t c = chunks_per_sample<T>(N);
  return c > 1 ? B * c : 0;
}

template <typename T>
cudaError_t norm_epilogue_forward(const T* g, int64_t B, int64_t N, const T* f, int64_t f_stride,
                                  Epilogue e, acc_t<T> param, acc_t<T>* norm, T* out,
                                  acc_t<T>* out_acc, acc_t<T>* partials, cudaStream_t stream) {
  const SampleFinish<T> fin{0, e, param, f, f_stride, norm, out, out_acc};
  return launch_sample_reduce<T, false>(g, nullptr, B, N, partials, fin, stream);
}

template <typename T>
cudaError_t norm_epilogue_backward(const acc_t<T>* grad_out, int64_t go_stride, const T* g,
                                   int64_t B, int64_t N,
                                   const T* f, int64_t f_stride, const acc_t<T>* norm, Epilogue e,
                                   acc_t<T> param, T* grad_f, T* grad_g, cudaStream_t stream) {
  const ScaleCoef<T> cs{nullptr, grad_out, go_stride, f, f_stride, norm, e, param, grad_f};
  return launch_sample_scale<T>(g, grad_g, B, N, cs, stream);
}

template <typename T>
cudaError_t sample_scale(const T* g, const acc_t<T>* coef, int64_t B, int64_t N, T* out,
                         cudaStream_t stream) {
  const ScaleCoef<T> cs{coef, nullptr, 0, nullptr, 0, nullptr, Epilogue::Norm, acc_t<T>(0), nullptr};
  return launch_sample_scale<T>(g, out, B, N, cs, stream);
}

template <typename T>
cudaError_t sample_dot(const T* a, const T* b, int64_t B, int64_t N, T* out, acc_t<T>* partials,
                       cudaStream_t stream) {
  const SampleFinish<T> fin{1, Epilogue::Norm, acc_t<T>(0), nullptr, 0, nullptr, out, nullptr};
  return launch_sample_reduce<T, true>(a, b, B, N, partials, fin, stream);
}

#define LK_INSTANTIATE(T)                                                                          \
  template int64_t sample_partials<T>(int64_t, int64_t);                                           \
  template cudaError_t norm_epilogue_forward<T>(const T*, int64_t, int64_t, const T*, int64_t,     \
                                                Epilogue, acc_t<T>, acc_t<T>*, T*, acc_t<T>*,      \
                                                acc_t<T>*, cudaStream_t);                          \
  template cudaError_t norm_epilogue_backward<T>(const acc_t<T>*, int64_t, const T*, int64_t,   \
                                                 int64_t, const T*, int64_t, const acc_t<T>*,      \
                                                 Epilogue, acc_t<T>, T*, T*, cudaStream_t);        \
  template cudaError_t sample_scale<T>(const T*, const acc_t<T>*, int64_t, int64_t, T*,            \
                                       cudaStream_t);                                              \
  template cudaError_t sample_dot<T>(const T*, const T*, int64_t, int64_t, T*, acc_t<T>*,          \
                                     cudaStream_t);

LK_INSTANTIATE(float)
LK_INSTANTIATE(double)
LK_INSTANTIATE(__half)
LK_INSTANTIATE(__nv_bfloat16)

}  // namespace cuda
}  // namespace lipkernels
