// The adversarial side of the CUDA-on-CPU emulation (tests/cuda_emu): what a real GPU may do
// and the plain emulation would not show. Everything is chosen at run time by environment
// variables, read at each launch, so one build serves every mode:
//
//   DEMUL_EMU_SCHEDULE = forward | reverse | shuffle:<seed> | lanes
//       the order in which blocks run (forward: x fastest; reverse; shuffled) and in which the
//       threads of a block run between two barriers (id order, reversed, shuffled anew at
//       every barrier, or "lanes": lane 0 of every warp, then lane 1, ..., so that warps
//       interleave). Outputs must be bitwise identical under every schedule: a kernel
//       whose result depends on the order has a race (tests/test_cuda_emulated.py).
//   DEMUL_EMU_POISON = 1 (default) | 0
//       NaN-fills (bytes 0xff: NaN in float32, float16 and bfloat16) the dynamic shared memory
//       and every static __shared__ variable at each block start, and every output buffer
//       the bindings allocate with at::empty before the launch (emu_alloc.h): a value read
//       before it is written, in this block, turns into NaN instead of a stale or zero one.
//   DEMUL_EMU_STRICT = 1 (default) | 0
//       a __syncthreads (or a warp barrier, a shuffle, a WMMA call) that some thread of the
//       block (warp) has exited before reaching aborts, naming the kernel's block; WMMA
//       pointers must be 32-byte aligned with a legal ldm; static shared memory of one
//       kernel must fit 48 KB.
//   DEMUL_EMU_SKIP_BARRIERS = <file>:<line>[,<file>:<line>...]
//       the __syncthreads / __syncwarp on those lines of csrc/ do nothing (build.py names
//       every barrier ::emu::block_sync / warp_sync("<file>", <line>)): one build serves every removed-barrier variant of
//       the sweep (tests/cuda_emu/race_probe.py). At exit the process prints on stderr how
//       often each listed barrier was skipped ("emu: skipped barrier <file>:<line> <n> times";
//       0: the runs never reached it).
//
// Static __shared__ variables are registered by tests/cuda_emu/build.py, which follows each
// __shared__ declaration of csrc/ with ::emu::adv::shared_static(&name, sizeof name, file, line).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "emu_instrument.h"

namespace emu {
namespace adv {

struct Region {
  void* p;
  size_t bytes;
  const char* file;
  int line;
};

struct Mode {
  std::string schedule = "forward";
  unsigned seed = 0;
  bool poison = true, strict = true;
  std::mt19937 rng;
  std::vector<Region> statics;        // every static __shared__ variable seen so far
  std::vector<const void*> touched;   // those declared by the running launch
  size_t touched_bytes = 0;
  std::string skip_spec;              // DEMUL_EMU_SKIP_BARRIERS as last parsed
  std::vector<std::pair<std::string, int>> skip;  // the barriers that do nothing
};

// The skipped barriers and how often each was met, printed at exit (see the head).
struct SkipHits {
  std::vector<std::pair<std::string, long>> hits;
  ~SkipHits() {
    for (const auto& h : hits) std::fprintf(stderr, "emu: skipped barrier %s %ld times\n", h.first.c_str(), h.second);
  }
};

inline SkipHits& skip_hits() {
  static SkipHits h;
  return h;
}

inline Mode& mode() {
  static Mode m;
  return m;
}

[[noreturn]] inline void fail(const char* what, const char* file = nullptr, int line = 0) {
  if (file != nullptr)
    std::fprintf(stderr, "emu: %s (%s:%d)\n", what, file, line);
  else
    std::fprintf(stderr, "emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// Read the environment at each launch.
inline void configure() {
  auto& m = mode();
  const char* s = std::getenv("DEMUL_EMU_SCHEDULE");
  m.schedule = s ? s : "forward";
  m.seed = 0;
  if (m.schedule.rfind("shuffle:", 0) == 0) {
    m.seed = static_cast<unsigned>(std::strtoul(m.schedule.c_str() + 8, nullptr, 10));
    m.schedule = "shuffle";
  }
  if (m.schedule != "forward" && m.schedule != "reverse" && m.schedule != "shuffle" && m.schedule != "lanes")
    fail("DEMUL_EMU_SCHEDULE must be forward, reverse, shuffle:<seed> or lanes");
  m.rng.seed(m.seed);
  const char* p = std::getenv("DEMUL_EMU_POISON");
  m.poison = !(p && std::strcmp(p, "0") == 0);
  const char* st = std::getenv("DEMUL_EMU_STRICT");
  m.strict = !(st && std::strcmp(st, "0") == 0);
  m.touched.clear();
  m.touched_bytes = 0;
  const char* sk = std::getenv("DEMUL_EMU_SKIP_BARRIERS");
  const std::string spec = sk ? sk : "";
  if (spec != m.skip_spec) {
    m.skip_spec = spec;
    m.skip.clear();
    size_t pos = 0;
    while (pos < spec.size()) {
      size_t end = spec.find(',', pos);
      if (end == std::string::npos) end = spec.size();
      const std::string item = spec.substr(pos, end - pos);
      const size_t colon = item.rfind(':');
      if (colon == std::string::npos || colon == 0 || colon + 1 == item.size())
        fail("DEMUL_EMU_SKIP_BARRIERS must be <file>:<line>[,<file>:<line>...]");
      m.skip.emplace_back(item.substr(0, colon), std::atoi(item.c_str() + colon + 1));
      bool known = false;
      for (const auto& h : skip_hits().hits) known |= h.first == item;
      if (!known) skip_hits().hits.emplace_back(item, 0);
      pos = end + 1;
    }
  }
}

// Whether the barrier at csrc/<file>:<line> is one of DEMUL_EMU_SKIP_BARRIERS (counted).
inline bool barrier_skipped(const char* file, int line) {
  auto& m = mode();
  if (m.skip.empty()) return false;
  for (const auto& s : m.skip) {
    if (s.second != line || s.first != file) continue;
    const std::string key = s.first + ":" + std::to_string(line);
    for (auto& h : skip_hits().hits)
      if (h.first == key) ++h.second;
    return true;
  }
  return false;
}

// The order of n items (blocks of a grid, or threads of a block for one round).
inline std::vector<int> order(int n, bool threads) {
  auto& m = mode();
  std::vector<int> o(n);
  std::iota(o.begin(), o.end(), 0);
  if (m.schedule == "reverse") {
    std::reverse(o.begin(), o.end());
  } else if (m.schedule == "shuffle") {
    std::shuffle(o.begin(), o.end(), m.rng);
  } else if (m.schedule == "lanes" && threads) {
    int k = 0;
    for (int lane = 0; lane < 32; ++lane)
      for (int w = 0; w * 32 + lane < n; ++w) o[k++] = w * 32 + lane;
  }
  return o;
}

// Not instrumented (include/emu_instrument.h): the poison is no thread's write.
__attribute__((no_sanitize_address, noinline)) inline void poison(void* p, size_t bytes) {
  if (mode().poison) std::memset(p, 0xff, bytes);
}

// Called by every thread at each static __shared__ declaration (build.py inserts it).
// The instrumented build does not see its accesses (the registration is no thread's access).
inline void shared_static_impl(void* p, size_t bytes, const char* file, int line);
inline void shared_static(void* p, size_t bytes, const char* file, int line) {
  ins::running(false);
  shared_static_impl(p, bytes, file, line);
  ins::running(true);
}

inline void shared_static_impl(void* p, size_t bytes, const char* file, int line) {
  auto& m = mode();
  if (m.strict && reinterpret_cast<uintptr_t>(p) % 16 != 0 && bytes >= 16)
    fail("a static __shared__ variable is not 16-byte aligned", file, line);
  bool known = false;
  for (const auto& r : m.statics) known |= r.p == p;
  if (!known) {
    m.statics.push_back(Region{p, bytes, file, line});
    poison(p, bytes);  // first use: no thread has written it yet (declarations come first)
  }
  for (const void* q : m.touched)
    if (q == p) return;
  m.touched.push_back(p);
  m.touched_bytes += bytes;
  if (m.strict && m.touched_bytes > 48 * 1024) fail("static shared memory of one kernel exceeds 48 KB", file, line);
}

// At each block start: every static __shared__ variable and the dynamic buffer to NaN.
inline void block_start(void* dyn, size_t dyn_bytes) {
  for (const auto& r : mode().statics) poison(r.p, r.bytes);
  poison(dyn, dyn_bytes);
}

}  // namespace adv
}  // namespace emu
