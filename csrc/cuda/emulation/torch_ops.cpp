// Operators of the emulation build for Python (lipkernels_cuda_emu namespace): what the
// emulated kernels did (counters.h), and how the emulation runs.
//
//   _emu_set_recording(bool on)   record every launch and memset (and, in a
//                                 traffic-counting build, their device-memory traffic)
//   _emu_take_records() -> str    the records since the last call, as JSON, then cleared
//   _emu_info() -> str            JSON: traffic_counted, sanitizer, total_launches, and the
//                                 LIPKERNELS_EMU_* settings in force
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "counters.h"

namespace lipkernels {
namespace {

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

std::string take_records() {
  std::string s = "[";
  bool first = true;
  for (const auto& r : lk_emu::counters::take_records()) {
    char buf[768];
    std::snprintf(buf, sizeof buf,
                  "\"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], \"dynamic_smem\": %zu, \"error\": %d, "
                  "\"load_bytes\": %llu, \"store_bytes\": %llu, \"load_requests\": %llu, "
                  "\"load_sectors\": %llu, \"store_requests\": %llu, \"store_sectors\": %llu, "
                  "\"load_unique_bytes\": %llu, \"dram_load_bytes\": %llu, \"dram_store_bytes\": %llu, "
                  "\"dram_scratch_bytes\": %llu}",
                  r.grid[0], r.grid[1], r.grid[2], r.block[0], r.block[1], r.block[2], r.dynamic_smem,
                  r.error, (unsigned long long)r.load_bytes, (unsigned long long)r.store_bytes,
                  (unsigned long long)r.load_requests, (unsigned long long)r.load_sectors,
                  (unsigned long long)r.store_requests, (unsigned long long)r.store_sectors,
                  (unsigned long long)r.load_unique_bytes, (unsigned long long)r.dram_load_bytes,
                  (unsigned long long)r.dram_store_bytes, (unsigned long long)r.dram_scratch_bytes);
    s += (first ? "" : ", ") + std::string("{\"name\": ") + json_string(r.name) + ", " + buf;
    first = false;
  }
  return s + "]";
}

std::string setting(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return json_string(v && *v ? v : fallback);
}

std::string info() {
  const char* sanitizer =
#if defined(LK_EMU_TSAN)
      "thread";
#elif defined(__SANITIZE_ADDRESS__)
      "address,undefined";
#else
      "";
#endif
  return std::string("{\"traffic_counted\": ") + (lk_emu::counters::traffic_counted() ? "true" : "false") +
         ", \"sanitizer\": " + json_string(sanitizer) +
         ", \"total_launches\": " + std::to_string(lk_emu::counters::total_launches()) +
         ", \"concurrent_blocks\": " + setting("LIPKERNELS_EMU_CONCURRENT_BLOCKS", "2") +
         ", \"sms\": " + setting("LIPKERNELS_EMU_SMS", "132") +
         ", \"seed\": " + setting("LIPKERNELS_EMU_SEED", "24301") + "}";
}

void set_recording(bool on) { lk_emu::counters::set_recording(on); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(lipkernels_cuda_emu, m) {
  m.def("_emu_set_recording(bool on) -> ()", &set_recording);
  m.def("_emu_take_records() -> str", &take_records);
  m.def("_emu_info() -> str", &info);
}

}  // namespace lipkernels
