// Large outputs of the CPU kernels (dL/dg, W_sn, dL/dW) come from a small cache of
// freed blocks instead of fresh memory: a training loop asks for the same sizes every
// step, and fresh memory costs a page fault per page on first touch, which on a
// virtual machine can take longer than the kernel itself. Outputs of >= 128 KiB are
// cached, in blocks of 64 KiB units, or, from 2 MiB up, of 2 MiB-aligned huge pages.
//
// At most LIPKERNELS_CPU_CACHE_MB (default 1024; 0 turns the cache off) MiB are kept;
// lipkernels.empty_cache() releases them. Smaller outputs use at::empty as usual.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>

namespace lipkernels {
namespace cpu {

// An uninitialised tensor of g's sizes and strides (g dense and non-overlapping).
at::Tensor empty_output_like(const at::Tensor& g);

// Bytes held by freed blocks waiting for reuse; and releasing them.
int64_t output_cache_bytes();
void output_cache_clear();

}  // namespace cpu
}  // namespace lipkernels
