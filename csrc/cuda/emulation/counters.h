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
// segments its lanes touch, as a GPU's memory system fetches them (coalescing: the
// distinct bytes the lanes use over the bytes of those sectors). The DRAM model: a kernel
// fetches every sector it touches once and writes every sector it stores to once (re-reads
// within a launch hit the caches: an H100's L2 holds 50 MB), nothing is kept from one
// launch to the next.
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
  uint64_t load_bytes = 0;   // device memory bytes loaded by the kernel's lanes (each lane's)
  uint64_t store_bytes = 0;  // ... and stored (atomics count as both)
  uint64_t load_requests = 0;   // warp-wide loads
  uint64_t load_unique_bytes = 0;  // distinct bytes of each warp-wide load, summed
  uint64_t load_sectors = 0;    // 32-byte sectors those loads touch
  uint64_t store_requests = 0;
  uint64_t store_sectors = 0;
  uint64_t dram_load_bytes = 0;   // the DRAM model: 32 x distinct sectors loaded
  uint64_t dram_store_bytes = 0;  // ... stored
  uint64_t dram_scratch_bytes = 0;  // of those (loads and stores), in workspace buffers
};

// Whether traffic is counted by this build (the kernels were compiled with the hooks).
bool traffic_counted();

// Recording on or off (off by default: launches are then only counted in total).
void set_recording(bool on);
bool recording();
std::vector<LaunchRecord> take_records();  // the records since the last call, then cleared
uint64_t total_launches();

// Device memory ranges, registered by the binding for the duration of one op call;
// scratch: a workspace (partial sums passed from one kernel to the next).
void register_device_range(const void* p, size_t bytes, bool scratch = false);
void unregister_device_range(const void* p);

// A launch that failed its configuration checks (it ran nothing).
void record_launch(const char* name, dim3 grid, dim3 block, size_t smem, cudaError_t err);
void record_memset(const void* p, size_t bytes);
class LaunchCounter;
// A launch that ran: its shape and what its counter counted.
void finish_launch(LaunchCounter& c, dim3 grid, dim3 block, size_t smem);

// The counts of one launch while it runs.
class LaunchCounter {
 public:
  void begin(const char* name);
  void end();
  void add(const LaunchRecord& part);
  // A warp's sectors (scratch ones with their top bit set), for the DRAM model.
  void add_sectors(const std::vector<uint64_t>& loads, const std::vector<uint64_t>& stores);
  // The DRAM model's bytes from the sectors added.
  void finish_dram();
  bool active() const { return active_; }
  const LaunchRecord& totals() const { return totals_; }
  // Sorted device ranges, a snapshot taken when the launch starts.
  struct Range {
    uintptr_t begin, end;
    bool scratch;
  };
  std::vector<Range> ranges;

 private:
  std::mutex mu_;
  LaunchRecord totals_;
  std::vector<uint64_t> loads_, stores_;
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
    bool scratch = false;
    uint64_t bytes = 0;
    std::vector<std::pair<uint64_t, uint64_t>> ranges;  // [begin, end) of each lane's access
  };
  void finish(Group& g);
  LaunchCounter* launch_ = nullptr;
  // Sectors: this warp's part of the launch's (scratch sectors have their top bit set).
  std::vector<uint64_t> block_loads_, block_stores_;
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
