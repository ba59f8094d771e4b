#include "output_cache.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Under AddressSanitizer a cached block is poisoned while it waits in the cache (a use of
// an output after it was freed is reported) and, when handed out, only the output's own
// bytes are unpoisoned (an access past its end, into the block's rounding, is reported).
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define LK_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define LK_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define LK_POISON(p, n) ((void)(p), (void)(n))
#define LK_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace lipkernels {
namespace cpu {
namespace {

constexpr int64_t kMinBytes = int64_t(128) << 10;  // smaller outputs: at::empty
constexpr int64_t kHugePage = int64_t(2) << 20;     // blocks from here up: huge-page sized
constexpr int64_t kSmallUnit = int64_t(64) << 10;   // size unit of smaller blocks

int64_t block_size(int64_t bytes) {
  const int64_t unit = bytes >= kHugePage ? kHugePage : kSmallUnit;
  return (bytes + unit - 1) / unit * unit;
}

int64_t limit_bytes() {
  static const int64_t limit = [] {
    const char* env = std::getenv("LIPKERNELS_CPU_CACHE_MB");
    int64_t mb = 1024;
    if (env && *env) mb = std::max<int64_t>(0, std::atoll(env));
    return mb << 20;
  }();
  return limit;
}

// Freed blocks by size. Never destroyed: tensors may be freed during interpreter
// shutdown, after static destructors would have run.
struct Pool {
  std::mutex mu;
  std::multimap<int64_t, void*> free_blocks;
  int64_t cached = 0;
};
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void* take(int64_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.free_blocks.find(bytes);
    if (it != p.free_blocks.end()) {
      void* ptr = it->second;
      p.free_blocks.erase(it);
      p.cached -= bytes;
      return ptr;
    }
  }
  void* ptr = nullptr;
  const int64_t align = bytes >= kHugePage ? kHugePage : 4096;
  if (posix_memalign(&ptr, align, bytes) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kHugePage) madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
  return ptr;
}

void give_back(void* ptr, int64_t bytes) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  if (p.cached + bytes > limit_bytes()) {
    // Make room, largest blocks first; free this one if it still does not fit.
    while (!p.free_blocks.empty() && p.cached + bytes > limit_bytes()) {
      auto last = std::prev(p.free_blocks.end());
      LK_UNPOISON(last->second, last->first);
      std::free(last->second);
      p.cached -= last->first;
      p.free_blocks.erase(last);
    }
    if (p.cached + bytes > limit_bytes()) {
      LK_UNPOISON(ptr, bytes);
      std::free(ptr);
      return;
    }
  }
  LK_POISON(ptr, bytes);
  p.free_blocks.emplace(bytes, ptr);
  p.cached += bytes;
}

}  // namespace

at::Tensor empty_output_like(const at::Tensor& g) {
  const int64_t bytes = g.numel() * static_cast<int64_t>(g.element_size());
  if (bytes < kMinBytes || limit_bytes() == 0 || !g.device().is_cpu())
    return at::empty_like(g);
  const int64_t rounded = block_size(bytes);
  void* ptr = take(rounded);
  if (!ptr) return at::empty_like(g);
  LK_POISON(ptr, rounded);
  LK_UNPOISON(ptr, bytes);
  return at::from_blob(
      ptr, g.sizes(), g.strides(), [rounded](void* p) { give_back(p, rounded); },
      g.options().requires_grad(false));
}

int64_t output_cache_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  return p.cached;
}

void output_cache_clear() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  for (auto& kv : p.free_blocks) {
    LK_UNPOISON(kv.second, kv.first);
    std::free(kv.second);
  }
  p.free_blocks.clear();
  p.cached = 0;
}

}  // namespace cpu
}  // namespace lipkernels
