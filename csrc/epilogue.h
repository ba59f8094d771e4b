// Per-sample epilogues of the gradient-norm family (docs/math.md sections 2-5).
//
// ATen-free and usable from host and device code: the CPU kernels and the CUDA
// kernels share these formulas, so the two backends cannot drift apart.
//
// Every op of the family is "n_i = ||g_i||, then a scalar function of (f_i, n_i)".
// The backward of every op is "dL/df_i = a scalar, dL/dg_ij = c_i * g_ij", with c_i
// the chain rule through n_i and dn_i/dg_ij = g_ij / n_i, which is defined as 0
// where n_i = 0 (the subgradient torch.linalg.vector_norm uses).
//
// Special values (docs/math.md section 10): NaN and Inf propagate as the plain
// formula's do (forward) and as autograd of the plain formula does (backward; the
// reference functions are that plain formula). The only redefined case is GN's 0/0.
// Where every input is finite the backward uses the better-conditioned form of the
// same derivative; where one is not, it evaluates the plain formula's chain rule, so
// that exactly the same outputs are NaN or infinite on every backend.
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
  GN = 1,    // out = f / (n + |f|), defined as 0 where n + |f| = 0 (only: NaN stays NaN)
  GraN = 2,  // out = f * n / (n^2 + eps), param = eps > 0
  GP = 3,    // out = (n - center)^2, param = center; the op averages over the batch
  R1 = 4,    // out = n^2; the op averages over the batch
};

// x is neither NaN nor infinite (x - x is NaN for both; no -ffast-math anywhere).
template <typename acc_t>
LK_HOST_DEVICE bool lk_finite(acc_t x) {
  return x - x == acc_t(0);
}

// |x| (with |-0| = 0, NaN for NaN).
template <typename acc_t>
LK_HOST_DEVICE acc_t lk_abs(acc_t x) {
  return x < acc_t(0) ? -x : (x == acc_t(0) ? acc_t(0) : x);
}

// torch.sgn for real x: -1, 0 or 1, NaN for NaN.
template <typename acc_t>
LK_HOST_DEVICE acc_t lk_sgn(acc_t x) {
  return x > acc_t(0) ? acc_t(1) : (x < acc_t(0) ? acc_t(-1) : x * acc_t(0));
}

template <typename acc_t>
LK_HOST_DEVICE acc_t epilogue_forward(Epilogue e, acc_t f, acc_t n, acc_t param) {
  switch (e) {
    case Epilogue::Norm:
      return n;
    case Epilogue::GN: {
      const acc_t d = n + (f < acc_t(0) ? -f : f);
      return d == acc_t(0) ? acc_t(0) : f / d;
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
// per-sample coefficient c_i of dL/dg_ij = c_i * g_ij to *coef; and, when scale_a and
// scale_b are given, two factors with dL/dg_ij = (g_ij * *scale_a) * *scale_b: 1/n_i and
// dL/dn_i (1 and 2 go for R1, whose c_i = 2 go is exact also at n_i = 0). The fused backward
// kernels multiply by the two factors in that order: g_ij / n_i is at most 1, so the
// product overflows only where dL/dg_ij does, while c_i itself can (dL/dn_i = 1e22 over
// n_i = 1e-18 in float32).
//
// A one-element sample has n_i = |g_i|, which can be subnormal, so 1/n_i can overflow:
// its kernels write dL/dg_i = dL/dn_i * (g_i / n_i) instead (epilogue_single_grad).
template <typename acc_t>
LK_HOST_DEVICE void epilogue_backward(
    Epilogue e, acc_t go, acc_t f, acc_t n, acc_t param, acc_t* grad_f, acc_t* coef,
    acc_t* scale_a = nullptr, acc_t* scale_b = nullptr) {
  // 1/n, masked to 0 where n = 0 (a NaN n stays NaN). For a sample of several elements
  // n is a square root of a sum of squares in acc_t, 0 or >= the square root of the
  // least subnormal, so 1/n is finite.
  const acc_t inv_n = n == acc_t(0) ? acc_t(0) : acc_t(1) / n;
  acc_t gf = acc_t(0), dn = acc_t(0);
  switch (e) {
    case Epilogue::Norm:
      dn = go;
      break;
    case Epilogue::GN: {
      // d out/d f = n / d^2, d out/d n = -f / d^2, d = n + |f|; both 0 where d = 0.
      const acc_t d = n + (f < acc_t(0) ? -f : f);
      if (d == acc_t(0)) break;
      dn = -go * ((f / d) / d);  // autograd's d(f/d)/d(d)
      if (lk_finite(d))
        gf = (go * (n / d)) / d;  // n / d <= 1: 0 (not NaN) for go = 0 where 1 / d overflows
      else  // n or f infinite or NaN: autograd's go/d + dn * sgn(f)
        gf = go / d + dn * lk_sgn(f);
      break;
    }
    case Epilogue::GraN: {
      // d out/d f = n / q, d out/d n = f (eps - n^2) / q^2, q = n^2 + eps.
      const acc_t q = n * n + param;
      const acc_t r = n / q;
      const acc_t grad_r = go * f;
      gf = go * r;
      if (lk_finite(q) && lk_finite(grad_r))
        dn = grad_r * (((param - n * n) / q) / q);
      else  // autograd of f * (n / (n * n + eps)): grad_r / q + 2 n grad_q
        dn = grad_r / q - acc_t(2) * (grad_r * (r / q)) * n;
      break;
    }
    case Epilogue::GP:
      dn = go * acc_t(2) * (n - param);
      break;
    case Epilogue::R1:
      // d(n^2)/dg = 2 g exactly, also at n = 0.
      dn = go * acc_t(2) * n;
      break;
  }
  *grad_f = gf;
  *coef = e == Epilogue::R1 ? go * acc_t(2) : dn * inv_n;
  if (scale_a) *scale_a = e == Epilogue::R1 ? acc_t(1) : inv_n;
  if (scale_b) *scale_b = e == Epilogue::R1 ? go * acc_t(2) : dn;
}

// dL/dg_i of a one-element sample: dL/dn_i * (g_i / n_i), 0 where n_i = 0 (as torch's
// norm backward masks g / n; a NaN dL/dn_i stays NaN).
template <typename acc_t>
LK_HOST_DEVICE acc_t epilogue_single_grad(acc_t grad_n, acc_t x, acc_t n) {
  return grad_n * (n == acc_t(0) ? acc_t(0) : x / n);
}

}  // namespace lipkernels
