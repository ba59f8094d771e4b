// Counting what the emulated kernels do (counters.h), and, in a traffic-counting build,
// the memory-access hooks that the kernels' -fsanitize=thread instrumentation calls.
// Compiled without instrumentation.
#include "counters.h"

#include <algorithm>
#include <atomic>
#include <map>

namespace lk_emu {
namespace counters {

thread_local WarpCounter* tls_counter = nullptr;

namespace {

std::atomic<bool> g_recording{false};
std::atomic<uint64_t> g_launches{0};
std::mutex g_mu;                     // guards g_records and g_ranges
std::vector<LaunchRecord> g_records;
std::map<uintptr_t, std::pair<uintptr_t, bool>> g_ranges;  // begin -> (end, scratch)
constexpr uint64_t kScratchBit = uint64_t(1) << 63;

void append(LaunchRecord r) {
  std::lock_guard<std::mutex> g(g_mu);
  g_records.push_back(std::move(r));
}

}  // namespace

bool traffic_counted() {
#if defined(LK_EMU_COUNT_TRAFFIC)
  return true;
#else
  return false;
#endif
}

void set_recording(bool on) { g_recording.store(on); }
bool recording() { return g_recording.load(); }
uint64_t total_launches() { return g_launches.load(); }

std::vector<LaunchRecord> take_records() {
  std::lock_guard<std::mutex> g(g_mu);
  std::vector<LaunchRecord> out;
  out.swap(g_records);
  return out;
}

void register_device_range(const void* p, size_t bytes, bool scratch) {
  if (p == nullptr || bytes == 0) return;
  std::lock_guard<std::mutex> g(g_mu);
  const uintptr_t b = reinterpret_cast<uintptr_t>(p);
  auto it = g_ranges.find(b);
  const uintptr_t end = std::max(it != g_ranges.end() ? it->second.first : b, b + bytes);
  g_ranges[b] = {end, scratch};
}

void unregister_device_range(const void* p) {
  std::lock_guard<std::mutex> g(g_mu);
  g_ranges.erase(reinterpret_cast<uintptr_t>(p));
}

void record_launch(const char* name, dim3 grid, dim3 block, size_t smem, cudaError_t err) {
  g_launches.fetch_add(1);
  if (!recording()) return;
  LaunchRecord r;
  r.name = name;
  r.grid[0] = grid.x, r.grid[1] = grid.y, r.grid[2] = grid.z;
  r.block[0] = block.x, r.block[1] = block.y, r.block[2] = block.z;
  r.dynamic_smem = smem;
  r.error = err;
  append(std::move(r));
}

void record_memset(const void* p, size_t bytes) {
  (void)p;
  g_launches.fetch_add(1);
  if (!recording()) return;
  LaunchRecord r;
  r.name = "cudaMemsetAsync";
  r.store_bytes = bytes;
  r.store_requests = 1;
  r.store_sectors = (bytes + 31) / 32;
  r.dram_store_bytes = 32 * r.store_sectors;
  append(std::move(r));
}

// ---------------------------------------------------------------- per launch

void LaunchCounter::begin(const char* name) {
  active_ = recording() && traffic_counted();
  totals_ = LaunchRecord{};
  totals_.name = name;
  if (active_) {
    std::lock_guard<std::mutex> g(g_mu);
    ranges.clear();
    for (const auto& kv : g_ranges) ranges.push_back({kv.first, kv.second.first, kv.second.second});
  }
}

void LaunchCounter::add(const LaunchRecord& p) {
  std::lock_guard<std::mutex> g(mu_);
  totals_.load_bytes += p.load_bytes;
  totals_.store_bytes += p.store_bytes;
  totals_.load_requests += p.load_requests;
  totals_.load_unique_bytes += p.load_unique_bytes;
  totals_.load_sectors += p.load_sectors;
  totals_.store_requests += p.store_requests;
  totals_.store_sectors += p.store_sectors;
  totals_.dram_load_bytes += p.dram_load_bytes;
  totals_.dram_store_bytes += p.dram_store_bytes;
  totals_.dram_scratch_bytes += p.dram_scratch_bytes;
}

// ---------------------------------------------------------------- per block

namespace {
// Sorts v and keeps one of each value; returns how many.
uint64_t distinct(std::vector<uint64_t>& v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v.size();
}
}  // namespace

void LaunchCounter::add_sectors(const std::vector<uint64_t>& loads, const std::vector<uint64_t>& stores) {
  std::lock_guard<std::mutex> g(mu_);
  loads_.insert(loads_.end(), loads.begin(), loads.end());
  stores_.insert(stores_.end(), stores.begin(), stores.end());
}

void LaunchCounter::finish_dram() {
  totals_.dram_load_bytes = 32 * distinct(loads_);
  totals_.dram_store_bytes = 32 * distinct(stores_);
  totals_.dram_scratch_bytes = 0;
  for (const auto* v : {&loads_, &stores_})
    for (uint64_t s : *v)
      if (s & kScratchBit) totals_.dram_scratch_bytes += 32;
  loads_.clear();
  stores_.clear();
}

void LaunchCounter::end() {
  active_ = false;
  ranges.clear();
}

void finish_launch(LaunchCounter& c, dim3 grid, dim3 block, size_t smem) {
  if (c.active()) c.finish_dram();
  g_launches.fetch_add(1);
  if (!recording()) return;
  LaunchRecord r;
  r.name = c.totals().name;
  r.grid[0] = grid.x, r.grid[1] = grid.y, r.grid[2] = grid.z;
  r.block[0] = block.x, r.block[1] = block.y, r.block[2] = block.z;
  r.dynamic_smem = smem;
  r.load_bytes = c.totals().load_bytes;
  r.store_bytes = c.totals().store_bytes;
  r.load_requests = c.totals().load_requests;
  r.load_unique_bytes = c.totals().load_unique_bytes;
  r.dram_load_bytes = c.totals().dram_load_bytes;
  r.dram_store_bytes = c.totals().dram_store_bytes;
  r.dram_scratch_bytes = c.totals().dram_scratch_bytes;
  r.load_sectors = c.totals().load_sectors;
  r.store_requests = c.totals().store_requests;
  r.store_sectors = c.totals().store_sectors;
  append(std::move(r));
}

// ---------------------------------------------------------------- per warp

void WarpCounter::begin(LaunchCounter* launch, int nlanes) {
  launch_ = launch;
  block_loads_.clear();
  block_stores_.clear();
  nlanes_ = nlanes;
  lane_ = 0;
  executions_.clear();
  open_.clear();
  pc_index_.clear();
  part_ = LaunchRecord{};
  tls_counter = launch->active() ? this : nullptr;
}

void WarpCounter::finish(Group& g) {
  // Distinct bytes (lanes reading the same address share them) and sectors.
  std::sort(g.ranges.begin(), g.ranges.end());
  uint64_t unique = 0, end = 0;
  std::vector<uint64_t> sectors;
  for (const auto& r : g.ranges) {
    const uint64_t b = std::max(r.first, end);
    if (r.second > b) unique += r.second - b;
    end = std::max(end, r.second);
    for (uint64_t s = r.first / 32; s <= (r.second - 1) / 32; ++s) sectors.push_back(s);
  }
  const uint64_t n = distinct(sectors);
  auto& block = g.store ? block_stores_ : block_loads_;
  for (uint64_t i = 0; i < n; ++i) block.push_back(g.scratch ? sectors[i] | kScratchBit : sectors[i]);
  if (g.store) {
    part_.store_bytes += g.bytes;
    part_.store_requests += 1;
    part_.store_sectors += n;
  } else {
    part_.load_bytes += g.bytes;
    part_.load_unique_bytes += unique;
    part_.load_requests += 1;
    part_.load_sectors += n;
  }
}

void WarpCounter::end() {
  if (tls_counter == this) {
    for (auto& kv : open_) finish(kv.second);
    open_.clear();
    launch_->add(part_);
    launch_->add_sectors(block_loads_, block_stores_);
  }
  tls_counter = nullptr;
}

void WarpCounter::access(const void* addr, size_t size, bool store, const void* pc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  const auto& r = launch_->ranges;
  auto it = std::upper_bound(r.begin(), r.end(), a,
                             [](uintptr_t x, const LaunchCounter::Range& y) { return x < y.begin; });
  if (it == r.begin()) return;
  --it;
  if (a >= it->end) return;  // not device memory
  auto& ex = executions_[pc];
  if (ex.empty()) ex.assign(32, 0);
  const uint32_t k = ex[lane_]++;
  const uint32_t pci = pc_index_.emplace(pc, static_cast<uint32_t>(pc_index_.size())).first->second;
  const uint64_t key = (static_cast<uint64_t>(pci) << 32) | k;
  Group& g = open_[key];
  g.store = store;
  g.scratch = it->scratch;
  g.lanes |= 1u << lane_;
  g.bytes += size;
  g.ranges.emplace_back(a, a + size);
  if (__builtin_popcount(g.lanes) == nlanes_) {
    finish(g);
    open_.erase(key);
  }
}

}  // namespace counters
}  // namespace lk_emu

// ---------------------------------------------------------------- the access hooks

#if defined(LK_EMU_COUNT_TRAFFIC)

namespace {
inline void hook(const void* addr, size_t size, bool store, const void* pc) {
  lk_emu::counters::WarpCounter* c = lk_emu::counters::tls_counter;
  if (c != nullptr && size != 0) c->access(addr, size, store, pc);
}
}  // namespace

#define LK_PC __builtin_return_address(0)
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_read_range(void* p, unsigned long n) { hook(p, n, false, LK_PC); }
void __tsan_write_range(void* p, unsigned long n) { hook(p, n, true, LK_PC); }
#define LK_HOOKS(N)                                                                         \
  void __tsan_read##N(void* p) { hook(p, N, false, LK_PC); }                                \
  void __tsan_write##N(void* p) { hook(p, N, true, LK_PC); }                                \
  void __tsan_unaligned_read##N(void* p) { hook(p, N, false, LK_PC); }                      \
  void __tsan_unaligned_write##N(void* p) { hook(p, N, true, LK_PC); }                      \
  void __tsan_volatile_read##N(void* p) { hook(p, N, false, LK_PC); }                       \
  void __tsan_volatile_write##N(void* p) { hook(p, N, true, LK_PC); }                       \
  void __tsan_unaligned_volatile_read##N(void* p) { hook(p, N, false, LK_PC); }             \
  void __tsan_unaligned_volatile_write##N(void* p) { hook(p, N, true, LK_PC); }
LK_HOOKS(1)
LK_HOOKS(2)
LK_HOOKS(4)
LK_HOOKS(8)
LK_HOOKS(16)

// Atomics: performed here (relaxed is what the kernels ask for; honour any order with
// seq_cst), counted as a load and a store.
#define LK_ATOMICS(BITS, T)                                                                 \
  T __tsan_atomic##BITS##_load(const volatile T* a, int) {                                  \
    hook(const_cast<T*>(a), sizeof(T), false, LK_PC);                                       \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                            \
  }                                                                                         \
  void __tsan_atomic##BITS##_store(volatile T* a, T v, int) {                               \
    hook(const_cast<T*>(a), sizeof(T), true, LK_PC);                                        \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                               \
  }                                                                                         \
  T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int) {                               \
    hook(const_cast<T*>(a), sizeof(T), false, LK_PC);                                       \
    hook(const_cast<T*>(a), sizeof(T), true, static_cast<const char*>(LK_PC) + 1);          \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                     \
  }                                                                                         \
  T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int) {                              \
    hook(const_cast<T*>(a), sizeof(T), false, LK_PC);                                       \
    hook(const_cast<T*>(a), sizeof(T), true, static_cast<const char*>(LK_PC) + 1);          \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                      \
  }                                                                                         \
  T __tsan_atomic##BITS##_fetch_sub(volatile T* a, T v, int) {                              \
    hook(const_cast<T*>(a), sizeof(T), false, LK_PC);                                       \
    hook(const_cast<T*>(a), sizeof(T), true, static_cast<const char*>(LK_PC) + 1);          \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                      \
  }                                                                                         \
  int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {   \
    hook(const_cast<T*>(a), sizeof(T), false, LK_PC);                                       \
    hook(const_cast<T*>(a), sizeof(T), true, static_cast<const char*>(LK_PC) + 1);          \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
  }                                                                                         \
  int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {     \
    return __tsan_atomic##BITS##_compare_exchange_strong(a, c, v, 0, 0);                    \
  }
LK_ATOMICS(8, char)
LK_ATOMICS(16, short)
LK_ATOMICS(32, int)
LK_ATOMICS(64, long)
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}  // extern "C"

#endif  // LK_EMU_COUNT_TRAFFIC
