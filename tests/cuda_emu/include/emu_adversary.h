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
};

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
