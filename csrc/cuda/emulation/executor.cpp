// The executor of the CUDA emulation layer (cuda_emulation.h describes the model).
//
// Structure: a launch hands its blocks, in a shuffled order, to up to
// LIPKERNELS_EMU_CONCURRENT_BLOCKS block slots; a block's warps run on pool threads,
// one OS thread per warp; a warp's lanes are fibers (their own stacks, switched by
// lk_emu_switch below) scheduled by that thread.
//
// This file is compiled without ThreadSanitizer instrumentation even in the TSan build
// (the runtime's own bookkeeping is not the kernels' business): what TSan learns about
// the kernels' synchronisation comes only from the annotations below
// (__tsan_acquire / __tsan_release at barriers, fences, launch begin and end), and every
// lane is a TSan fiber switched to without synchronisation.
#include "cuda_emulation.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include <sys/mman.h>

#include "counters.h"

#if defined(LK_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
// Exported by the TSan runtime, not declared by its header: while on, the calling thread's
// (fiber's) accesses, and the allocations it makes, are not recorded.
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define LK_EMU_ASAN 1
#endif

// ---------------------------------------------------------------- context switch

#if defined(__x86_64__)
// void lk_emu_switch(void** save_sp, void* new_sp): saves the callee-saved registers, the
// SSE and x87 control words on the current stack, stores the stack pointer in *save_sp,
// and resumes the context whose stack pointer is new_sp. A new context's stack is laid
// out by make_context(): its first "return" enters lk_emu_fiber_start, which calls
// r13(r12).
asm(R"(
  .text
  .globl lk_emu_switch
  .hidden lk_emu_switch
  .type lk_emu_switch,@function
lk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lk_emu_switch, .-lk_emu_switch

  .globl lk_emu_fiber_start
  .hidden lk_emu_fiber_start
  .type lk_emu_fiber_start,@function
lk_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size lk_emu_fiber_start, .-lk_emu_fiber_start
)");
extern "C" void lk_emu_switch(void** save_sp, void* new_sp);
extern "C" void lk_emu_fiber_start();
#else
#error "the CUDA emulation's fibers are written for x86-64"
#endif

namespace lk_emu {

namespace {

// The built-in variables of a lane.
struct LaneView {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The lane now running on this OS thread (set by its warp's scheduler).
thread_local const LaneView* tls_lane = nullptr;

// ---------------------------------------------------------------- configuration

long env_long(const char* name, long fallback, long lo, long hi) {
  const char* s = std::getenv(name);
  if (!s || !*s) return fallback;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (*end != '\0' || v < lo || v > hi) {
    std::fprintf(stderr, "lipkernels CUDA emulation: ignoring %s=%s (expected an integer in [%ld, %ld])\n",
                 name, s, lo, hi);
    return fallback;
  }
  return v;
}

struct Config {
  int concurrent_blocks = static_cast<int>(env_long("LIPKERNELS_EMU_CONCURRENT_BLOCKS", 2, 1, 64));
  int sms = static_cast<int>(env_long("LIPKERNELS_EMU_SMS", 132, 1, 4096));  // an H100 SXM's
  uint64_t seed = static_cast<uint64_t>(env_long("LIPKERNELS_EMU_SEED", 0x5eed, 0, 1L << 62));
  size_t stack_bytes = static_cast<size_t>(env_long("LIPKERNELS_EMU_STACK_KB", 256, 64, 65536)) * 1024;
};

// The runtime's singletons are made when the library is loaded, by the loading thread,
// before any pool thread exists (and never destroyed: detached pool threads may outlive
// exit). A function-local static would be initialised by whichever pool thread came first,
// through a guard ThreadSanitizer cannot see in this uninstrumented file.
const Config& config() {
  static const Config* c = new Config();
  return *c;
}

constexpr size_t kMaxDynamicSmem = 48 * 1024;  // the default limit without cudaFuncSetAttribute
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned char kSharedPoison = 0xff;

// ---------------------------------------------------------------- error state

thread_local cudaError_t tls_last_error = cudaSuccess;

void set_error(cudaError_t e) {
  if (e != cudaSuccess) tls_last_error = e;
}

// ---------------------------------------------------------------- TSan / ASan glue

#if defined(LK_EMU_TSAN)
inline void tsan_release(const void* a) { __tsan_release(const_cast<void*>(a)); }
inline void tsan_acquire(const void* a) { __tsan_acquire(const_cast<void*>(a)); }
#else
inline void tsan_release(const void*) {}
inline void tsan_acquire(const void*) {}
#endif

// While one lives, ThreadSanitizer records nothing the current thread or fiber does
// (allocations then start with a clean history): for the runtime's own work done on a
// lane's fiber.
struct TsanIgnore {
#if defined(LK_EMU_TSAN)
  TsanIgnore() { __tsan_ignore_thread_begin(); }
  ~TsanIgnore() { __tsan_ignore_thread_end(); }
#else
  TsanIgnore() {}  // (user-provided: no unused-variable warning)
#endif
};

// Ranges that ThreadSanitizer must see as fresh (never written): shared memory.
void* fresh_alloc(size_t bytes) {
  void* p;
  {
    TsanIgnore ignore;
    p = std::malloc(bytes == 0 ? 1 : bytes);
    if (p && bytes) std::memset(p, kSharedPoison, bytes);
  }
#if defined(LK_EMU_ASAN)
  // A zero-byte request: any access is out of bounds.
  if (p && bytes == 0) ASAN_POISON_MEMORY_REGION(p, 1);
#endif
  return p;
}

void fresh_free(void* p) {
#if defined(LK_EMU_ASAN)
  if (p) ASAN_UNPOISON_MEMORY_REGION(p, 1);
#endif
  TsanIgnore ignore;
  std::free(p);
}

// A spin lock invisible to ThreadSanitizer (uninstrumented atomics): the runtime's own
// bookkeeping must not create happens-before edges between lanes.
class SpinLock {
 public:
  void lock() {
    while (flag_.exchange(true, std::memory_order_acquire)) std::this_thread::yield();
  }
  void unlock() { flag_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> flag_{false};
};

// ---------------------------------------------------------------- the model

struct Launch;
struct Block;
struct Warp;

enum class LaneState { Runnable, AtWarpOp, AtBarrier, Done };

struct Lane {
  LaneView view{};
  Warp* warp = nullptr;
  int lane = 0;
  LaneState state = LaneState::Runnable;
  void* sp = nullptr;  // saved stack pointer while suspended
  char* stack = nullptr;
  // The warp operation this lane waits at.
  WarpOp op = kShflXor;
  bool is_syncwarp = false;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  const char* file = "";
  int line = 0;
  uint64_t barriers = 0;  // __syncthreads passed (its parity picks the TSan sync object)
  uint64_t syncwarps = 0;
#if defined(LK_EMU_TSAN)
  void* tsan_fiber = nullptr;
#endif
#if defined(LK_EMU_ASAN)
  void* asan_fake_stack = nullptr;
#endif
};

struct Warp {
  Block* block = nullptr;
  int index = 0;
  int nlanes = 0;
  Lane lanes[32];
  void* sched_sp = nullptr;
  Lane* current = nullptr;
  std::mt19937_64 rng;
  char tsan_syncwarp[2] = {0, 0};  // sync objects of __syncwarp, by parity
#if defined(LK_EMU_TSAN)
  void* tsan_sched_fiber = nullptr;
#endif
#if defined(LK_EMU_ASAN)
  void* asan_sched_fake_stack = nullptr;
  const void* asan_sched_bottom = nullptr;
  size_t asan_sched_size = 0;
#endif
  counters::WarpCounter counter;
};

struct Block {
  Launch* launch = nullptr;
  uint3 idx{};
  int nwarps = 0;
  std::unique_ptr<Warp[]> warps;
  // __syncthreads among the block's warps.
  std::mutex mu;
  std::condition_variable cv;
  int expected = 0;  // warps with live lanes
  int arrived = 0;
  uint64_t generation = 0;
  const char* site_file = nullptr;
  int site_line = 0;
  char tsan_sync[2] = {0, 0};  // sync objects of __syncthreads, by parity
  // Shared memory.
  SpinLock shared_lock;
  std::vector<std::pair<const SharedDecl*, void*>> shared;
  void* dynamic = nullptr;
  // Completion.
  std::atomic<int> warps_running{0};
  int slot = 0;
};

struct Launch {
  const char* name = "";
  dim3 grid, block;
  size_t smem = 0;
  void (*kernel)(void*) = nullptr;
  void* ctx = nullptr;
  int warps_per_block = 0;
  std::vector<uint64_t> order;  // linear block indices, shuffled
  std::atomic<size_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int slots_running = 0;
  char tsan_begin = 0, tsan_end = 0;
  uint64_t seed = 0;
  counters::LaunchCounter counter;
};

// The global sync object of __threadfence (a fence orders this lane's earlier writes
// before its later ones for every other thread; modelled as release + acquire).
char g_tsan_fence = 0;

// ---------------------------------------------------------------- fiber stacks

// The 32 lane stacks (and, under ThreadSanitizer, lane fibers) of a pool thread, made on
// first use and reused for every warp the thread runs: lane i of every warp a thread runs
// is the same TSan fiber on the same stack. (So TSan orders lane i of a block before lane
// i of a later block run by the same thread, and misses a race between just those two;
// fresh fibers and stacks per block would cost ~1 ms per lane.)
struct LaneResources {
  char* stack[32] = {};
#if defined(LK_EMU_TSAN)
  void* fiber[32] = {};
#endif
};

thread_local LaneResources tls_resources;

char* lane_stack(int i) {
  char*& s = tls_resources.stack[i];
  if (s == nullptr) {
    void* p = mmap(nullptr, config().stack_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fatal("cannot map a fiber stack");
    s = static_cast<char*>(p);
  }
  return s;
}

#if defined(LK_EMU_TSAN)
void* lane_fiber(int i) {
  void*& f = tls_resources.fiber[i];
  if (f == nullptr) f = __tsan_create_fiber(0);
  return f;
}
#endif

void lane_main(Lane* l);

// Lays out a fresh stack whose first switch enters lane_main(l).
void make_context(Lane* l) {
  uintptr_t top = reinterpret_cast<uintptr_t>(l->stack) + config().stack_bytes;
  top &= ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 8;
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpcw) << 32);
  sp[1] = 0;                                       // r15
  sp[2] = 0;                                       // r14
  sp[3] = reinterpret_cast<uint64_t>(&lane_main);  // r13: entry
  sp[4] = reinterpret_cast<uint64_t>(l);           // r12: its argument
  sp[5] = 0;                                       // rbx
  sp[6] = 0;                                       // rbp
  sp[7] = reinterpret_cast<uint64_t>(&lk_emu_fiber_start);
  l->sp = sp;
}

// From the warp's scheduler into lane l, until l yields.
void resume(Warp& w, Lane& l) {
  w.current = &l;
  w.counter.set_lane(l.lane);
  tls_lane = &l.view;
#if defined(LK_EMU_TSAN)
  __tsan_switch_to_fiber(l.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(LK_EMU_ASAN)
  __sanitizer_start_switch_fiber(&w.asan_sched_fake_stack, l.stack, config().stack_bytes);
#endif
  lk_emu_switch(&w.sched_sp, l.sp);
#if defined(LK_EMU_ASAN)
  __sanitizer_finish_switch_fiber(w.asan_sched_fake_stack, nullptr, nullptr);
#endif
  tls_lane = nullptr;
  w.current = nullptr;
}

// From the running lane back to its warp's scheduler. `dying`: it never resumes.
void yield(Lane& l, bool dying = false) {
  Warp& w = *l.warp;
#if defined(LK_EMU_TSAN)
  __tsan_switch_to_fiber(w.tsan_sched_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(LK_EMU_ASAN)
  __sanitizer_start_switch_fiber(dying ? nullptr : &l.asan_fake_stack, w.asan_sched_bottom,
                                 w.asan_sched_size);
#else
  (void)dying;
#endif
  lk_emu_switch(&l.sp, w.sched_sp);
#if defined(LK_EMU_ASAN)
  __sanitizer_finish_switch_fiber(l.asan_fake_stack, nullptr, nullptr);
#endif
}

Lane& current_lane() {
  if (tls_lane == nullptr) fatal("a device function was called outside a kernel");
  // LaneView is the first member of Lane.
  return *const_cast<Lane*>(reinterpret_cast<const Lane*>(tls_lane));
}

void lane_main(Lane* l) {
#if defined(LK_EMU_ASAN)
  // The first switch into this stack: learn the scheduler's stack for the way back.
  __sanitizer_finish_switch_fiber(nullptr, &l->warp->asan_sched_bottom, &l->warp->asan_sched_size);
#endif
  Launch& launch = *l->warp->block->launch;
  // What the launcher wrote (the kernel's arguments, its inputs) happens before the lane
  // runs. Nothing else does: the lane reads the runtime's memory only in this file, which
  // TSan does not watch, and never acquires from its scheduler (which, having freed
  // earlier blocks, would order those blocks before this one).
  tsan_acquire(&launch.tsan_begin);
  launch.kernel(launch.ctx);
  tsan_release(&launch.tsan_end);
  l->state = LaneState::Done;
  yield(*l, /*dying=*/true);
  fatal("a finished lane was resumed");
}

// ---------------------------------------------------------------- diagnostics

std::string where(const Lane& l) {
  char buf[256];
  const Launch& launch = *l.warp->block->launch;
  std::snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", launch.name,
                l.view.block_idx.x, l.view.block_idx.y, l.view.block_idx.z, l.view.thread_idx.x,
                l.view.thread_idx.y, l.view.thread_idx.z);
  return buf;
}

[[noreturn]] void fatal_at(const Lane& l, const std::string& what) {
  fatal((what + " (" + where(l) + ")").c_str());
}

const char* op_name(const Lane& l) {
  if (l.is_syncwarp) return "__syncwarp";
  switch (l.op) {
    case kShflXor: return "__shfl_xor_sync";
    case kShfl: return "__shfl_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflUp: return "__shfl_up_sync";
    case kBallot: return "__ballot_sync";
  }
  return "?";
}

std::string describe_warp(const Warp& w) {
  std::string s;
  for (int i = 0; i < w.nlanes; ++i) {
    const Lane& l = w.lanes[i];
    char buf[200];
    switch (l.state) {
      case LaneState::Runnable: std::snprintf(buf, sizeof buf, "\n  lane %d: runnable", i); break;
      case LaneState::Done: std::snprintf(buf, sizeof buf, "\n  lane %d: exited", i); break;
      case LaneState::AtBarrier:
        std::snprintf(buf, sizeof buf, "\n  lane %d: at __syncthreads (%s:%d)", i, l.file, l.line);
        break;
      case LaneState::AtWarpOp:
        std::snprintf(buf, sizeof buf, "\n  lane %d: at %s mask 0x%08x (%s:%d)", i, op_name(l), l.mask,
                      l.file, l.line);
        break;
    }
    s += buf;
  }
  return s;
}

// ---------------------------------------------------------------- warp-wide operations

uint64_t exchange_result(const Warp& w, const Lane& l) {
  const int lane = l.lane;
  const int width = l.width;
  const uint64_t poison = ~uint64_t(0);  // the value of an undefined source lane
  auto from = [&](int src) -> uint64_t {
    if (src < 0 || src >= w.nlanes || !((l.mask >> src) & 1u)) return poison;
    return w.lanes[src].value;
  };
  const int seg = (lane / width) * width;
  switch (l.op) {
    case kShflXor: {
      const int src = lane ^ l.arg;
      return src >= seg + width ? l.value : from(src);
    }
    case kShfl: return from(seg + ((l.arg % width) + width) % width);
    case kShflDown: {
      const int src = lane + l.arg;
      return src >= seg + width ? l.value : from(src);
    }
    case kShflUp: {
      const int src = lane - l.arg;
      return src < seg ? l.value : from(src);
    }
    case kBallot: {
      uint64_t bits = 0;
      for (int i = 0; i < w.nlanes; ++i)
        if (((l.mask >> i) & 1u) && w.lanes[i].value) bits |= uint64_t(1) << i;
      return bits;
    }
  }
  return poison;
}

// Completes every warp operation whose mask's lanes have all arrived; false when none can.
bool complete_warp_ops(Warp& w) {
  bool any = false;
  for (int i = 0; i < w.nlanes; ++i) {
    Lane& l = w.lanes[i];
    if (l.state != LaneState::AtWarpOp) continue;
    if (!((l.mask >> l.lane) & 1u)) fatal_at(l, std::string(op_name(l)) + ": the calling lane is not in its mask");
    bool ready = true;
    for (int j = 0; j < 32; ++j) {
      if (!((l.mask >> j) & 1u)) continue;
      if (j >= w.nlanes) fatal_at(l, std::string(op_name(l)) + ": its mask names a lane the block does not have");
      const Lane& o = w.lanes[j];
      if (o.state == LaneState::Done)
        fatal_at(l, std::string(op_name(l)) + ": its mask names lane " + std::to_string(j) +
                        ", which has exited" + describe_warp(w));
      if (o.state != LaneState::AtWarpOp) {
        ready = false;
        break;
      }
      if (o.mask != l.mask || o.is_syncwarp != l.is_syncwarp || (!l.is_syncwarp && o.op != l.op))
        fatal_at(l, "lanes of one warp wait at different warp operations" + describe_warp(w));
    }
    if (!ready) continue;
    for (int j = 0; j < w.nlanes; ++j)
      if ((l.mask >> j) & 1u) w.lanes[j].result = l.is_syncwarp ? 0 : exchange_result(w, w.lanes[j]);
    for (int j = 0; j < w.nlanes; ++j)
      if ((l.mask >> j) & 1u) w.lanes[j].state = LaneState::Runnable;
    any = true;
  }
  return any;
}

// ---------------------------------------------------------------- __syncthreads among warps

// All live lanes of warp w wait at a __syncthreads: wait for the other warps of the block.
void block_barrier(Warp& w) {
  Block& b = *w.block;
  const Lane* first = nullptr;
  for (int i = 0; i < w.nlanes; ++i) {
    const Lane& l = w.lanes[i];
    if (l.state != LaneState::AtBarrier) continue;
    if (!first) first = &l;
    else if (l.line != first->line || std::strcmp(l.file, first->file) != 0)
      fatal_at(l, "lanes of one block reach different __syncthreads() (" + std::string(l.file) + ":" +
                      std::to_string(l.line) + " and " + first->file + ":" + std::to_string(first->line) +
                      ")" + describe_warp(w));
  }
  std::unique_lock<std::mutex> lock(b.mu);
  if (b.arrived == 0) {
    b.site_file = first->file;
    b.site_line = first->line;
  } else if (b.site_line != first->line || std::strcmp(b.site_file, first->file) != 0) {
    fatal_at(*first, "warps of one block reach different __syncthreads() (" + std::string(first->file) +
                         ":" + std::to_string(first->line) + " and " + b.site_file + ":" +
                         std::to_string(b.site_line) + ")");
  }
  const uint64_t gen = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    b.cv.notify_all();
  } else {
    b.cv.wait(lock, [&] { return b.generation != gen; });
  }
}

// Warp w has no live lane left: it no longer takes part in the block's barriers.
void block_warp_exited(Warp& w) {
  Block& b = *w.block;
  std::lock_guard<std::mutex> lock(b.mu);
  --b.expected;
  if (b.arrived > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    b.cv.notify_all();
  }
}

// ---------------------------------------------------------------- a warp's scheduler

void run_warp(Warp& w) {
  Block& b = *w.block;
  Launch& launch = *b.launch;
  const int base = w.index * 32;
  const unsigned nthreads = launch.block.x * launch.block.y * launch.block.z;
  w.nlanes = static_cast<int>(std::min<unsigned>(32, nthreads - base));
  w.rng.seed(launch.seed ^ (uint64_t(b.idx.x) * 0x9e3779b97f4a7c15ull) ^ (uint64_t(b.idx.y) << 40) ^
             (uint64_t(b.idx.z) << 52) ^ (uint64_t(w.index) << 32));
#if defined(LK_EMU_TSAN)
  w.tsan_sched_fiber = __tsan_get_current_fiber();
#endif
  tls_lane = nullptr;
  counters::tls_counter = nullptr;
  for (int i = 0; i < w.nlanes; ++i) {
    Lane& l = w.lanes[i];
    l = Lane{};
    l.warp = &w;
    l.lane = i;
    const unsigned t = static_cast<unsigned>(base + i);
    l.view.thread_idx = uint3{t % launch.block.x, (t / launch.block.x) % launch.block.y,
                              t / (launch.block.x * launch.block.y)};
    l.view.block_idx = b.idx;
    l.view.block_dim = launch.block;
    l.view.grid_dim = launch.grid;
    l.stack = lane_stack(i);
#if defined(LK_EMU_TSAN)
    l.tsan_fiber = lane_fiber(i);
#endif
    make_context(&l);
  }
  w.counter.begin(&launch.counter, w.nlanes);
  int order[32];
  for (;;) {
    // Run every runnable lane, in a shuffled order, until none is.
    for (;;) {
      int n = 0;
      for (int i = 0; i < w.nlanes; ++i)
        if (w.lanes[i].state == LaneState::Runnable) order[n++] = i;
      if (n == 0) break;
      std::shuffle(order, order + n, w.rng);
      for (int k = 0; k < n; ++k) resume(w, w.lanes[order[k]]);
    }
    bool all_done = true, all_at_barrier = true;
    for (int i = 0; i < w.nlanes; ++i) {
      const LaneState s = w.lanes[i].state;
      all_done = all_done && s == LaneState::Done;
      all_at_barrier = all_at_barrier && (s == LaneState::AtBarrier || s == LaneState::Done);
    }
    if (all_done) break;
    if (complete_warp_ops(w)) continue;
    if (all_at_barrier) {
      block_barrier(w);
      for (int i = 0; i < w.nlanes; ++i)
        if (w.lanes[i].state == LaneState::AtBarrier) w.lanes[i].state = LaneState::Runnable;
      continue;
    }
    fatal(("lipkernels CUDA emulation: deadlock in kernel " + std::string(launch.name) + ", block (" +
           std::to_string(b.idx.x) + "," + std::to_string(b.idx.y) + "," + std::to_string(b.idx.z) +
           "), warp " + std::to_string(w.index) + ":" + describe_warp(w))
              .c_str());
  }
  block_warp_exited(w);
  w.counter.end();
}

// ---------------------------------------------------------------- the thread pool

class Pool {
 public:
  void submit(std::function<void()> job) {
    std::unique_lock<std::mutex> lock(mu_);
    jobs_.push_back(std::move(job));
    // Every job must get a thread now: a warp's job waits at barriers for the other
    // warps of its block, so a queued job would never run.
    if (jobs_.size() > static_cast<size_t>(idle_)) {
      std::thread(&Pool::work, this).detach();
      ++threads_;
    } else {
      cv_.notify_one();
    }
  }

 private:
  void work() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      ++idle_;
      cv_.wait(lock, [&] { return !jobs_.empty(); });
      --idle_;
      std::function<void()> job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      job();
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  int idle_ = 0;
  int threads_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

// Made at load time (see config()).
const bool g_singletons_made = (config(), pool(), true);

void start_next_block(Launch& launch, int slot);

void finish_block(Block* b) {
  Launch& launch = *b->launch;
  for (auto& s : b->shared) fresh_free(s.second);
  fresh_free(b->dynamic);
  const int slot = b->slot;
  delete b;
  start_next_block(launch, slot);
}

// Starts the next block of the launch's order in `slot`, or retires the slot.
void start_next_block(Launch& launch, int slot) {
  const size_t i = launch.next.fetch_add(1);
  if (i >= launch.order.size()) {
    std::lock_guard<std::mutex> lock(launch.mu);
    if (--launch.slots_running == 0) launch.cv.notify_all();
    return;
  }
  const uint64_t lin = launch.order[i];
  Block* b = new Block();
  b->launch = &launch;
  b->slot = slot;
  b->idx = uint3{static_cast<unsigned>(lin % launch.grid.x),
                 static_cast<unsigned>((lin / launch.grid.x) % launch.grid.y),
                 static_cast<unsigned>(lin / (uint64_t(launch.grid.x) * launch.grid.y))};
  b->nwarps = launch.warps_per_block;
  b->expected = b->nwarps;
  b->warps.reset(new Warp[b->nwarps]);
  b->dynamic = fresh_alloc(launch.smem);
  const int nwarps = b->nwarps;  // b is deleted by its last warp: not read after the last submit
  b->warps_running.store(nwarps);
  for (int wi = 0; wi < nwarps; ++wi) {
    Warp* w = &b->warps[wi];
    w->block = b;
    w->index = wi;
    pool().submit([w, b] {
      run_warp(*w);
      // The block is freed by its last warp's thread: what the others did to it happens
      // before (for ThreadSanitizer, which cannot see this file's atomics).
      tsan_release(b);
      if (b->warps_running.fetch_sub(1) == 1) {
        tsan_acquire(b);
        finish_block(b);
      }
    });
  }
}

}  // namespace

// ---------------------------------------------------------------- public entry points

uint3 thread_idx() { return current_lane().view.thread_idx; }
uint3 block_idx() { return current_lane().view.block_idx; }
dim3 block_dim() { return current_lane().view.block_dim; }
dim3 grid_dim() { return current_lane().view.grid_dim; }

void fatal(const char* what) {
  std::fprintf(stderr, "\nlipkernels CUDA emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

void syncthreads(const char* file, int line) {
  Lane& l = current_lane();
  Block& b = *l.warp->block;
  const int parity = static_cast<int>(l.barriers++ & 1);
  tsan_release(&b.tsan_sync[parity]);
  l.state = LaneState::AtBarrier;
  l.file = file;
  l.line = line;
  yield(l);
  tsan_acquire(&b.tsan_sync[parity]);
}

void syncwarp(unsigned mask, const char* file, int line) {
  Lane& l = current_lane();
  Warp& w = *l.warp;
  const int parity = static_cast<int>(l.syncwarps++ & 1);
  tsan_release(&w.tsan_syncwarp[parity]);
  l.state = LaneState::AtWarpOp;
  l.is_syncwarp = true;
  l.mask = mask;
  l.file = file;
  l.line = line;
  yield(l);
  tsan_acquire(&w.tsan_syncwarp[parity]);
}

void threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  tsan_release(&g_tsan_fence);
  tsan_acquire(&g_tsan_fence);
}

uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file,
                       int line) {
  Lane& l = current_lane();
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fatal_at(l, "warp shuffle width must be a power of two in [1, 32], got " + std::to_string(width));
  l.state = LaneState::AtWarpOp;
  l.is_syncwarp = false;
  l.op = op;
  l.mask = mask;
  l.value = value;
  l.arg = arg;
  l.width = width;
  l.file = file;
  l.line = line;
  yield(l);
  return l.result;
}

void* shared_var(const SharedDecl* decl) {
  Block& b = *current_lane().warp->block;
  TsanIgnore ignore;  // the table's allocations, on a lane's fiber
  std::lock_guard<SpinLock> g(b.shared_lock);
  for (auto& s : b.shared)
    if (s.first == decl) return s.second;
  void* p = fresh_alloc(decl->bytes);
  if (reinterpret_cast<uintptr_t>(p) % decl->align != 0) fatal("misaligned shared memory allocation");
  b.shared.emplace_back(decl, p);
  return p;
}

void* dynamic_shared() { return current_lane().warp->block->dynamic; }

void misaligned16(const void* p) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "misaligned 16-byte access at %p (a GPU faults on it)", p);
  fatal_at(current_lane(), buf);
}

const char* intern_kernel_name(const char* pretty) {
  static std::mutex mu;
  static std::unordered_set<std::string>* names = new std::unordered_set<std::string>();
  std::string s(pretty);
  const char* key = "Kernel = ";
  size_t at = s.find(key);
  if (at != std::string::npos) {
    s = s.substr(at + std::strlen(key));
    // Up to the end of the template argument: "]" or ";" at nesting depth 0.
    int depth = 0;
    size_t end = 0;
    for (; end < s.size(); ++end) {
      const char c = s[end];
      if (c == '<' || c == '(') ++depth;
      else if (c == '>' || c == ')') --depth;
      else if ((c == ']' || c == ';') && depth == 0) break;
    }
    s = s.substr(0, end);
    for (const char* prefix : {"lipkernels::cuda::", "{anonymous}::", "(anonymous namespace)::"}) {
      size_t p;
      while ((p = s.find(prefix)) != std::string::npos) s.erase(p, std::strlen(prefix));
    }
  }
  std::lock_guard<std::mutex> g(mu);
  return names->insert(s).first->c_str();
}

cudaError_t launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream,
                   void (*kernel)(void*), void* ctx) {
  (void)stream;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  cudaError_t err = cudaSuccess;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535 || block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 ||
      block.y > 1024 || block.z > 64 || threads > kMaxThreadsPerBlock)
    err = cudaErrorInvalidConfiguration;
  else if (dynamic_smem > kMaxDynamicSmem)
    err = cudaErrorInvalidValue;
  if (err != cudaSuccess) {
    counters::record_launch(name, grid, block, dynamic_smem, err);
    set_error(err);
    return err;
  }
  Launch l;
  l.name = name;
  l.grid = grid;
  l.block = block;
  l.smem = dynamic_smem;
  l.kernel = kernel;
  l.ctx = ctx;
  l.warps_per_block = static_cast<int>((threads + 31) / 32);
  static std::atomic<uint64_t> launches{0};
  l.seed = config().seed * 0x2545f4914f6cdd1dull + launches.fetch_add(1);
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  l.order.resize(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) l.order[i] = i;
  std::mt19937_64 rng(l.seed);
  std::shuffle(l.order.begin(), l.order.end(), rng);
  l.counter.begin(name);
  tsan_release(&l.tsan_begin);
  const int slots = static_cast<int>(std::min<uint64_t>(config().concurrent_blocks, nblocks));
  l.slots_running = slots;
  for (int s = 0; s < slots; ++s) start_next_block(l, s);
  {
    std::unique_lock<std::mutex> lock(l.mu);
    l.cv.wait(lock, [&] { return l.slots_running == 0; });
  }
  tsan_acquire(&l.tsan_end);
  counters::finish_launch(l.counter, grid, block, dynamic_smem);
  l.counter.end();
  return cudaSuccess;
}

int emulated_sms() { return config().sms; }

}  // namespace lk_emu

// ---------------------------------------------------------------- the CUDA runtime API

cudaError_t cudaGetLastError() {
  const cudaError_t e = lk_emu::tls_last_error;
  lk_emu::tls_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return lk_emu::tls_last_error; }

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) {
    lk_emu::set_error(cudaErrorInvalidDevice);
    return cudaErrorInvalidDevice;
  }
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = lk_emu::emulated_sms(); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
  }
  lk_emu::set_error(cudaErrorInvalidValue);
  return cudaErrorInvalidValue;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream) {
  (void)stream;
  if (count == 0) return cudaSuccess;
  if (ptr == nullptr) {
    lk_emu::set_error(cudaErrorInvalidValue);
    return cudaErrorInvalidValue;
  }
  std::memset(ptr, value, count);
  lk_emu::counters::record_memset(ptr, count);
  return cudaSuccess;
}
