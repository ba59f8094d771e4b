// CPU kernels of batched spectral normalization (docs/math.md section 1) for a whole
// list of layers at once: the single-pass power iteration (one read of every W per
// iteration, sigma without a further pass), W_sn = W / sigma, and its backward
// (G - <G, W_sn> u v^T) / sigma.
//
// Work is cut into items of whole rows of one layer (about kItemElems elements),
// and all items of a group of layers run in one at::parallel_for. Each item keeps
// its own partial sums, which are then added in item order: results do not depend
// on the thread count.
//
// Layers are taken in cache groups (consecutive layers whose weights fit in a
// quarter of the last-level cache), and every pass of one group runs before the
// next group starts: the second read of W in the forward (for W_sn) and of G in the
// backward then come from cache, not from memory.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../bindings_common.h"
#include "output_cache.h"
#include "vec.h"

namespace lipkernels {
namespace cpu {
namespace {

constexpr int64_t kItemElems = 65536;  // elements of W per work item
constexpr int kRowBlock = 4;           // rows whose dot products and W^T t updates go together
constexpr int64_t kColBlock = 2048;    // columns per task when adding the items' W^T t
constexpr int64_t kParallelElems = 32768;  // plans smaller than this run single-threaded

int64_t cache_group_bytes() {
  static const int64_t bytes = [] {
    long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 > 0 ? static_cast<int64_t>(l3) / 4 : int64_t(4) << 20;
  }();
  return bytes;
}

template <typename T>
struct Layer {
  const T* w;  // row-major (m, k)
  int64_t m, k;
  T* u;        // (m,)
  T* v;        // (k,)
};

struct Item {
  int64_t layer, row_begin, row_end;
  int64_t scratch;  // offset of this item's (k,) partial W^T t in the scratch buffer
};

struct ColBlock {
  int64_t layer, col_begin, col_end;
};

// Consecutive ranges [begin, end) of layers whose weights fit in one cache group.
template <typename T>
std::vector<std::pair<int64_t, int64_t>> cache_groups(const std::vector<Layer<T>>& layers) {
  std::vector<std::pair<int64_t, int64_t>> groups;
  const int64_t budget = cache_group_bytes();
  int64_t begin = 0, bytes = 0;
  for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) {
    const int64_t b = layers[l].m * layers[l].k * static_cast<int64_t>(sizeof(T));
    if (l > begin && bytes + b > budget) {
      groups.push_back({begin, l});
      begin = l;
      bytes = 0;
    }
    bytes += b;
  }
  if (begin < static_cast<int64_t>(layers.size())) groups.push_back({begin, static_cast<int64_t>(layers.size())});
  return groups;
}

// The work plan of one cache group: its layers, their row items and column blocks.
template <typename T>
struct Plan {
  std::vector<Layer<T>> layers;
  std::vector<Item> items;
  std::vector<int64_t> first_item;  // items of layer l: [first_item[l], first_item[l + 1])
  std::vector<int64_t> v_off, t_off;  // offsets of layer l in flat (k) and (m) buffers
  std::vector<ColBlock> col_blocks;
  int64_t scratch_size = 0;
  int64_t elems = 0;  // elements of all weights of the plan

  // Grain for a parallel loop over n tasks of the plan: small plans run on the
  // calling thread (waking the other threads would cost more than the work).
  int64_t grain(int64_t n) const { return elems < kParallelElems ? std::max<int64_t>(n, 1) : 1; }

  explicit Plan(std::vector<Layer<T>> ls) : layers(std::move(ls)) {
    const int64_t L = layers.size();
    first_item.assign(L + 1, 0);
    v_off.assign(L + 1, 0);
    t_off.assign(L + 1, 0);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t m = layers[l].m, k = layers[l].k;
      const int64_t rows = std::max<int64_t>(1, kItemElems / std::max<int64_t>(k, 1));
      elems += m * k;
      first_item[l] = items.size();
      for (int64_t r = 0; r < m; r += rows) {
        items.push_back({l, r, std::min(m, r + rows), scratch_size});
        scratch_size += k;
      }
      for (int64_t c = 0; c < k; c += kColBlock) col_blocks.push_back({l, c, std::min(k, c + kColBlock)});
      v_off[l + 1] = v_off[l] + k;
      t_off[l + 1] = t_off[l] + m;
    }
    first_item[L] = items.size();
  }
  int64_t num_items() const { return items.size(); }
};

// Scratch memory reused across calls (per thread), so repeated calls do not pay for
// fresh pages.
template <typename A>
A* workspace(int slot, int64_t n) {
  thread_local std::vector<A> buffers[4];
  auto& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// The effective divisor: sigma, or eps where |sigma| < eps (so W = 0 gives W_sn = 0).
template <typename A>
inline A effective_sigma(A sigma, A eps) {
  return std::abs(sigma) < eps ? eps : sigma;
}

// sigma = u^T W v from the stored vectors: one read of W.
template <typename T>
void sigma_from_vectors(const Plan<T>& p, acc_t<T>* sigmas) {
  using A = acc_t<T>;
  A* item_sum = workspace<A>(0, p.num_items());
  at::parallel_for(0, p.num_items(), p.grain(p.num_items()), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = p.items[i];
      const Layer<T>& ly = p.layers[it.layer];
      A s = 0;
      for (int64_t r = it.row_begin; r < it.row_end; ++r)
        s += static_cast<A>(ly.u[r]) * dot(ly.w + r * ly.k, ly.v, ly.k);
      item_sum[i] = s;
    }
  });
  for (size_t l = 0; l < p.layers.size(); ++l) {
    A s = 0;
    for (int64_t i = p.first_item[l]; i < p.first_item[l + 1]; ++i) s += item_sum[i];
    sigmas[l] = s;
  }
}

// One power iteration of every layer of the plan, in place; sigma of each layer.
template <typename T>
void power_iteration_step(const Plan<T>& p, acc_t<T> eps, acc_t<T>* sigmas) {
  using A = acc_t<T>;
  const int64_t L = p.layers.size();
  A* item_sum = workspace<A>(0, p.num_items());
  A* vbuf = workspace<A>(1, p.v_off[L]);
  A* tbuf = workspace<A>(2, p.t_off[L]);
  A* scratch = workspace<A>(3, p.scratch_size);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t j = 0; j < p.layers[l].k; ++j) vbuf[p.v_off[l] + j] = static_cast<A>(p.layers[l].v[j]);

  // One read of W: t_r = W_r . v, and W^T t accumulated from the same rows.
  at::parallel_for(0, p.num_items(), p.grain(p.num_items()), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = p.items[i];
      const Layer<T>& ly = p.layers[it.layer];
      const A* v = vbuf + p.v_off[it.layer];
      A* part = scratch + it.scratch;
      A* t = tbuf + p.t_off[it.layer];
      std::fill(part, part + ly.k, A(0));
      int64_t r = it.row_begin;
      for (; r + kRowBlock <= it.row_end; r += kRowBlock) {
        dot_rows<kRowBlock>(ly.w + r * ly.k, ly.k, v, t + r);
        axpy_rows<kRowBlock>(t + r, ly.w + r * ly.k, ly.k, part);
      }
      for (; r < it.row_end; ++r) {
        dot_rows<1>(ly.w + r * ly.k, ly.k, v, t + r);
        axpy_rows<1>(t + r, ly.w + r * ly.k, ly.k, part);
      }
      A tsq = 0;
      for (r = it.row_begin; r < it.row_end; ++r) tsq += t[r] * t[r];
      item_sum[i] = tsq;
    }
  });

  // u = t / max(||t||, eps); s = W^T u = (sum of the items' W^T t) / max(||t||, eps);
  // v = s / max(||s||, eps); sigma = u^T W v = ||s||^2 / max(||s||, eps).
  std::vector<A> tden(L);
  for (int64_t l = 0; l < L; ++l) {
    A tsq = 0;
    for (int64_t i = p.first_item[l]; i < p.first_item[l + 1]; ++i) tsq += item_sum[i];
    tden[l] = std::max(std::sqrt(tsq), eps);
  }
  at::parallel_for(0, p.col_blocks.size(), p.grain(p.col_blocks.size()), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const ColBlock& cb = p.col_blocks[c];
      A* s = vbuf + p.v_off[cb.layer] + cb.col_begin;
      const int64_t len = cb.col_end - cb.col_begin;
      std::fill(s, s + len, A(0));
      for (int64_t i = p.first_item[cb.layer]; i < p.first_item[cb.layer + 1]; ++i) {
        const A* part = scratch + p.items[i].scratch + cb.col_begin;
        for (int64_t j = 0; j < len; ++j) s[j] += part[j];
      }
      const A den = tden[cb.layer];
      for (int64_t j = 0; j < len; ++j) s[j] /= den;
    }
  });
  at::parallel_for(0, L, p.grain(L), [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      const Layer<T>& ly = p.layers[l];
      const A* t = tbuf + p.t_off[l];
      for (int64_t r = 0; r < ly.m; ++r) ly.u[r] = static_cast<T>(t[r] / tden[l]);
      const A* s = vbuf + p.v_off[l];
      const A snorm = std::sqrt(sum_squares(s, ly.k));
      const A sden = std::max(snorm, eps);
      for (int64_t j = 0; j < ly.k; ++j) ly.v[j] = static_cast<T>(s[j] / sden);
      sigmas[l] = snorm >= eps ? snorm : snorm * snorm / eps;
    }
  });
}

// out = W / sigma_eff for every layer of the plan.
template <typename T>
void divide(const Plan<T>& p, const acc_t<T>* sigmas, acc_t<T> eps, T* const* outs) {
  using A = acc_t<T>;
  at::parallel_for(0, p.num_items(), p.grain(p.num_items()), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = p.items[i];
      const Layer<T>& ly = p.layers[it.layer];
      const A inv = A(1) / effective_sigma(sigmas[it.layer], eps);
      const int64_t off = it.row_begin * ly.k;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {
        scale_stream(inv, ly.w + off, outs[it.layer] + off, (it.row_end - it.row_begin) * ly.k);
        continue;
      }
#endif
      scale(inv, ly.w + off, outs[it.layer] + off, (it.row_end - it.row_begin) * ly.k);
    }
#if defined(__AVX512F__)
    stream_fence();
#endif
  });
}

// Power iteration (n_iter >= 0) for all layers, updating each layer's u and v where
// they point, then, when outs is given, W_sn.
template <typename T>
void spectral_forward(const std::vector<Layer<T>>& layers, int64_t n_iter, double eps_d,
                      acc_t<T>* sigmas, T* const* outs) {
  using A = acc_t<T>;
  const A eps = static_cast<A>(eps_d);
  for (const auto& [g0, g1] : cache_groups(layers)) {
    const Plan<T> p(std::vector<Layer<T>>(layers.begin() + g0, layers.begin() + g1));
    if (n_iter == 0) sigma_from_vectors(p, sigmas + g0);
    for (int64_t it = 0; it < n_iter; ++it) power_iteration_step(p, eps, sigmas + g0);
    if (outs) divide(p, sigmas + g0, eps, outs + g0);
  }
}

// dW_l = (G_l - <G_l, W_l / sigma_l> u_l v_l^T) / sigma_l; where sigma was clamped to
// eps it is a constant and dW_l = G_l / eps.
template <typename T>
void spectral_backward(const std::vector<Layer<T>>& layers, const T* const* grads,
                       const acc_t<T>* sigmas, double eps_d, T* const* outs) {
  using A = acc_t<T>;
  const A eps = static_cast<A>(eps_d);
  for (const auto& [g0, g1] : cache_groups(layers)) {
    const Plan<T> p(std::vector<Layer<T>>(layers.begin() + g0, layers.begin() + g1));
    const int64_t L = p.layers.size();
    A* item_dot = workspace<A>(0, p.num_items());
    at::parallel_for(0, p.num_items(), p.grain(p.num_items()), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Item& it = p.items[i];
        const Layer<T>& ly = p.layers[it.layer];
        const int64_t off = it.row_begin * ly.k;
        item_dot[i] = dot(grads[g0 + it.layer] + off, ly.w + off, (it.row_end - it.row_begin) * ly.k);
      }
    });
    A* vbuf = workspace<A>(1, p.v_off[L]);
    std::vector<A> inv_sigma(L), corr(L);
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t j = 0; j < p.layers[l].k; ++j) vbuf[p.v_off[l] + j] = static_cast<A>(p.layers[l].v[j]);
      A gw = 0;
      for (int64_t i = p.first_item[l]; i < p.first_item[l + 1]; ++i) gw += item_dot[i];
      const A sigma = sigmas[g0 + l];
      const A s = effective_sigma(sigma, eps);
      inv_sigma[l] = A(1) / s;
      // <G, W_sn> / sigma = <G, W> / sigma^2; zero where sigma was clamped.
      corr[l] = std::abs(sigma) < eps ? A(0) : gw / (s * s);
    }
    at::parallel_for(0, p.num_items(), p.grain(p.num_items()), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Item& it = p.items[i];
        const Layer<T>& ly = p.layers[it.layer];
        const A* v = vbuf + p.v_off[it.layer];
        for (int64_t r = it.row_begin; r < it.row_end; ++r) {
          const int64_t off = r * ly.k;
#if defined(__AVX512F__)
          if constexpr (std::is_same_v<T, float>) {
            axpby_stream(inv_sigma[it.layer], grads[g0 + it.layer] + off,
                         corr[it.layer] * static_cast<A>(ly.u[r]), v, outs[g0 + it.layer] + off, ly.k);
            continue;
          }
#endif
          axpby(inv_sigma[it.layer], grads[g0 + it.layer] + off,
                corr[it.layer] * static_cast<A>(ly.u[r]), v, outs[g0 + it.layer] + off, ly.k);
        }
      }
#if defined(__AVX512F__)
      stream_fence();
#endif
    });
  }
}

template <typename T>
std::vector<Layer<T>> make_layers(const std::vector<at::Tensor>& weights, at::TensorList us,
                                  at::TensorList vs) {
  std::vector<Layer<T>> layers;
  layers.reserve(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t m = weights[i].size(0);
    layers.push_back({weights[i].const_data_ptr<T>(), m, weights[i].numel() / m,
                      const_cast<T*>(us[i].const_data_ptr<T>()),
                      const_cast<T*>(vs[i].const_data_ptr<T>())});
  }
  return layers;
}

// Layers whose u and v are read from one flat (sum of m + k,) tensor: u_0, v_0, u_1, ...
template <typename T>
std::vector<Layer<T>> make_layers_flat(const std::vector<at::Tensor>& weights, const at::Tensor& uv) {
  std::vector<Layer<T>> layers;
  T* p = const_cast<T*>(uv.const_data_ptr<T>());
  for (const auto& w : weights) {
    const int64_t m = w.size(0), k = w.numel() / m;
    layers.push_back({w.const_data_ptr<T>(), m, k, p, p + m});
    p += m + k;
  }
  return layers;
}

// ---------------------------------------------------------------- bindings
// Argument checks, layouts and outputs: bindings_common.h (shared with the CUDA bindings).

at::Tensor power_iteration(at::TensorList weights_in, at::TensorList us, at::TensorList vs,
                           int64_t n_power_iterations, double eps) {
  auto c = prepare_power_iteration(weights_in, us, vs, n_power_iterations, eps,
                                   "lipkernels::power_iteration");
  if (c.weights.empty()) return c.sigmas;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.weights[0].scalar_type(), "power_iteration", [&] {
    spectral_forward<scalar_t>(make_layers<scalar_t>(c.weights, us, vs), n_power_iterations, eps,
                               c.sigmas.mutable_data_ptr<acc_t<scalar_t>>(), nullptr);
  });
  return c.sigmas;
}

// Functional: us and vs are read, not written; the updated vectors are returned in
// uv (u_0, v_0, u_1, v_1, ...) for _sn_store_vectors_ and for the backward.
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> sn_forward(
    at::TensorList weights_in, at::TensorList us, at::TensorList vs, int64_t n_power_iterations,
    double eps) {
  auto c = prepare_sn_forward(weights_in, us, vs, n_power_iterations, eps, &empty_output_like,
                              "lipkernels::_sn_forward");
  if (c.weights.empty()) return {c.outs, c.sigmas, c.uv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.weights[0].scalar_type(), "sn_forward", [&] {
    scalar_t* p = c.uv.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < c.weights.size(); ++i) {
      std::copy_n(us[i].const_data_ptr<scalar_t>(), us[i].numel(), p);
      p += us[i].numel();
      std::copy_n(vs[i].const_data_ptr<scalar_t>(), vs[i].numel(), p);
      p += vs[i].numel();
    }
    std::vector<scalar_t*> po;
    for (auto& o : c.outs) po.push_back(o.mutable_data_ptr<scalar_t>());
    spectral_forward<scalar_t>(make_layers_flat<scalar_t>(c.weights, c.uv), n_power_iterations, eps,
                               c.sigmas.mutable_data_ptr<acc_t<scalar_t>>(), po.data());
  });
  return {c.outs, c.sigmas, c.uv};
}

// us[i], vs[i] <- the vectors of layer i in uv.
void sn_store_vectors_(at::TensorList us, at::TensorList vs, const at::Tensor& uv) {
  check_sn_store_vectors(us, vs, uv, "lipkernels::_sn_store_vectors_");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, uv.scalar_type(), "sn_store_vectors_", [&] {
    const scalar_t* p = uv.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < us.size(); ++i) {
      std::copy_n(p, us[i].numel(), us[i].mutable_data_ptr<scalar_t>());
      p += us[i].numel();
      std::copy_n(p, vs[i].numel(), vs[i].mutable_data_ptr<scalar_t>());
      p += vs[i].numel();
    }
  });
}

std::vector<at::Tensor> sn_backward(at::TensorList grads_in, at::TensorList weights_in,
                                    const at::Tensor& uv, const at::Tensor& sigmas, double eps) {
  auto c = prepare_sn_backward(grads_in, weights_in, uv, sigmas, eps, &empty_output_like,
                               "lipkernels::_sn_backward");
  if (c.weights.empty()) return {};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.weights[0].scalar_type(), "sn_backward", [&] {
    std::vector<scalar_t*> po;
    std::vector<const scalar_t*> pg;
    for (auto& o : c.outs) po.push_back(o.mutable_data_ptr<scalar_t>());
    for (auto& g : c.grads) pg.push_back(g.const_data_ptr<scalar_t>());
    spectral_backward<scalar_t>(make_layers_flat<scalar_t>(c.weights, uv), pg.data(),
                                sigmas.const_data_ptr<acc_t<scalar_t>>(), eps, po.data());
  });
  return c.outs;
}

void clip_(at::TensorList tensors, double c) {
  const std::vector<int64_t> offsets = check_clip(tensors, c, c10::DeviceType::CPU, "lipkernels::clip_");
  // One parallel region over the elements of every tensor.
  at::parallel_for(0, offsets.back(), 32768, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[t].scalar_type(), "clip_", [&] {
        scalar_t* p = tensors[t].mutable_data_ptr<scalar_t>() - offsets[t];
        const auto lo = static_cast<acc_t<scalar_t>>(-c), hi = static_cast<acc_t<scalar_t>>(c);
        for (int64_t j = begin; j < stop; ++j) {
          const auto x = static_cast<acc_t<scalar_t>>(p[j]);
          p[j] = static_cast<scalar_t>(x < lo ? lo : (x > hi ? hi : x));
        }
      });
      begin = stop;
      ++t;
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lipkernels, CPU, m) {
  m.impl("power_iteration", &power_iteration);
  m.impl("_sn_forward", &sn_forward);
  m.impl("_sn_store_vectors_", &sn_store_vectors_);
  m.impl("_sn_backward", &sn_backward);
  m.impl("clip_", &clip_);
}

}  // namespace cpu
}  // namespace lipkernels
