// What the emulated CUDA kernels did, counted: launches (and memsets) per kernel, and,
// in a traffic-counting build (LK_EMU_COUNT_TRAFFIC: the kernel translation units
// compiled with -fsanitize=thread, whose per-access hooks __tsan_read4, __tsan_write16,
// ... are defined by counters.cpp instead of the TSan runtime), the bytes every kernel
// loads and stores in device memory and the 32-byte sectors its warps touch.
//
// Device memory is what the binding registers (DeviceMemory in binding.h: the exact bytes
// of every tensor handed to a launcher); stacks, shared memory and kernel parameters are
// not counted. A warp-wide access is the k-th execution of one load or store instruction
// (the call site of the hook) by the lanes of a warp; its sectors are the distinct 32-byte
// segments its lanes touch, as a GPU's memory system fetches them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_emulation.h"

namespace lk_emu {
namespace counters {

// One launch (or memset) as recorded.
struct LaunchRecord {
  std::string name;          // kernel name, or "cudaMemsetAsync"
  unsigned grid[3] = {0, 0, 0};
  unsigned block[3] = {0, 0, 0};
  size_t dynamic_smem = 0;
  int error = 0;             // cudaError_t of the launch
  uint64_t load_bytes = 0;   // device memory bytes loaded by the kernel's lanes
  uint64_t store_bytes = 0;  // ... and stored (atomics count as both)
  uint64_t load_requests = 0;   // warp-wide loads
  uint64_t load_sectors = 0;    // 32-byte sectors those loads touch
  uint64_t store_requests = 0;
  uint64_t store_sectors = 0;
};

// Whether traffic is counted by this build (the kernels were compiled with the hooks).
bool traffic_counted();

// Recording on or off (off by default: launches are then only counted in total).
void set_recording(bool on);
bool recording();
std::vector<LaunchRecord> take_records();  // the records since the last call, then cleared
uint64_t total_launches();

// Device memory ranges, registered by the binding for the duration of one op call.
void register_device_range(const void* p, size_t bytes);
void unregister_device_range(const void* p);

// A launch that failed its configuration checks (it ran nothing).
void record_launch(const char* name, dim3 grid, dim3 block, size_t smem, cudaError_t err);
void record_memset(const void* p, size_t bytes);
class LaunchCounter;
// A launch that ran: its shape and what its counter counted.
void finish_launch(const LaunchCounter& c, dim3 grid, dim3 block, size_t smem);

// The counts of one launch while it runs.
class LaunchCounter {
 public:
  void begin(const char* name);
  void end();
  void add(const LaunchRecord& part);
  bool active() const { return active_; }
  const LaunchRecord& totals() const { return totals_; }
  // Sorted device ranges [begin, end), a snapshot taken when the launch starts.
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;

 private:
  std::mutex mu_;
  LaunchRecord totals_;
  bool active_ = false;
};

// The counts of one warp while it runs (touched by that warp's thread only).
class WarpCounter {
 public:
  void begin(LaunchCounter* launch, int nlanes);
  void end();
  void set_lane(int lane) { lane_ = lane; }
  void access(const void* addr, size_t size, bool store, const void* pc);

 private:
  struct Group {
    uint32_t lanes = 0;  // bit i: lane i took part
    bool store = false;
    uint64_t bytes = 0;
    std::vector<uint64_t> sectors;
  };
  void finish(Group& g);
  LaunchCounter* launch_ = nullptr;
  int nlanes_ = 0;
  int lane_ = 0;
  std::unordered_map<const void*, std::vector<uint32_t>> executions_;  // pc -> per-lane count
  std::unordered_map<uint64_t, Group> open_;  // (pc index, execution k) -> group
  std::unordered_map<const void*, uint32_t> pc_index_;
  LaunchRecord part_;
};

// The counter of the warp running on this thread (nullptr outside kernels).
extern thread_local WarpCounter* tls_counter;

}  // namespace counters
}  // namespace lk_emu
