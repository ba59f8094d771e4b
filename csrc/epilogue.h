// Per-sample epilogues of the gradient-norm family (docs/math.md sections 2-5).
//
// ATen-free and usable from host and device code: the CPU kernels and the CUDA
// kernels share these formulas, so the two backends cannot drift apart.
//
// Every op of the family is "n_i = ||g_i||, then a scalar function of (f_i, n_i)".
// The backward of every op is "dL/df_i = a scalar, dL/dg_ij = c_i * g_ij", with c_i
// the chain rule through n_i and dn_i/dg_ij = g_ij / n_i, which is defined as 0
// where n_i = 0 (the subgradient torch.linalg.vector_norm uses).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LK_HOST_DEVICE inline
#endif

namespace lipkernels {

enum class Epilogue : int {
  Norm = 0,  // out = n
  GN = 1,    // out = f / (n + |f|), defined as 0 where n + |f| = 0
  GraN = 2,  // out = f * n / (n^2 + eps), param = eps > 0
  GP = 3,    // out = (n - center)^2, param = center; the op averages over the batch
  R1 = 4,    // out = n^2; the op averages over the batch
};

template <typename acc_t>
LK_HOST_DEVICE acc_t epilogue_forward(Epilogue e, acc_t f, acc_t n, acc_t param) {
  switch (e) {
    case Epilogue::Norm:
      return n;
    case Epilogue::GN: {
      const acc_t d = n + (f < acc_t(0) ? -f : f);
      return d > acc_t(0) ? f / d : acc_t(0);
    }
    case Epilogue::GraN:
      return f * (n / (n * n + param));
    case Epilogue::GP: {
      const acc_t r = n - param;
      return r * r;
    }
    case Epilogue::R1:
      return n * n;
  }
  return acc_t(0);
}

// Given go = dL/dout_i, writes dL/df_i to *grad_f (0 for ops without f) and the
// per-sample coefficient c_i of dL/dg_ij = c_i * g_ij to *coef.
template <typename acc_t>
LK_HOST_DEVICE void epilogue_backward(
    Epilogue e, acc_t go, acc_t f, acc_t n, acc_t param, acc_t* grad_f, acc_t* coef) {
  const acc_t inv_n = n > acc_t(0) ? acc_t(1) / n : acc_t(0);
  switch (e) {
    case Epilogue::Norm:
      *grad_f = acc_t(0);
      *coef = go * inv_n;
      return;
    case Epilogue::GN: {
      // d out/d f = n / d^2, d out/d n = -f / d^2, d = n + |f|; both 0 where d = 0.
      const acc_t d = n + (f < acc_t(0) ? -f : f);
      if (d > acc_t(0)) {
        *grad_f = go * ((n / d) / d);
        *coef = -go * ((f / d) / d) * inv_n;
      } else {
        *grad_f = acc_t(0);
        *coef = acc_t(0);
      }
      return;
    }
    case Epilogue::GraN: {
      // d out/d f = n / q, d out/d n = f (eps - n^2) / q^2, q = n^2 + eps.
      const acc_t q = n * n + param;
      *grad_f = go * (n / q);
      *coef = go * f * (((param - n * n) / q) / q) * inv_n;
      return;
    }
    case Epilogue::GP:
      *grad_f = acc_t(0);
      *coef = go * acc_t(2) * (n - param) * inv_n;
      return;
    case Epilogue::R1:
      // d(n^2)/dg = 2 g exactly, also at n = 0.
      *grad_f = acc_t(0);
      *coef = go * acc_t(2);
      return;
  }
}

}  // namespace lipkernels
