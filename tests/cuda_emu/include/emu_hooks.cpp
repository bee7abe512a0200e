// The hooks of the instrumented CUDA emulation (include/emu_instrument.h): GCC's
// kernel-address instrumentation of the kernels' translation units calls __asan_load<N>_noabort
// / __asan_store<N>_noabort before every access; they are defined here (this file is compiled
// without the instrumentation), with no ASan runtime. Only accesses made while a thread of an
// emulated block runs are looked at, and of those only shared memory (race check) and the
// registered tensors (trace); everything else (the fibers' stacks, the emulation's own state)
// passes.
#include <dlfcn.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "emu_prelude.h"

namespace emu {
namespace ins {
namespace {

constexpr uint64_t kSector = 32;
constexpr int kCollective = 1024;  // thread ids >= this: a whole warp inside a WMMA load/store

// Shadow of one byte of shared memory: the last write and the reads since it, in this block.
struct Shadow {
  uint64_t w_epoch = 0, r_epoch = 0;  // block epoch (barrier interval) of the write / the reads
  uint64_t w_wep = 0, r_wep = 0;      // the warp's barrier count at the write / the latest read
  uintptr_t w_pc = 0, ra_pc = 0, rb_pc = 0;
  int16_t w_tid = -1, ra_tid = -1, rb_tid = -1;  // ra: latest reader; rb: a reader other than ra
  int16_t r_warp = -1;                           // the readers' warp, -1 if several warps read
};

struct SharedRegion {
  uintptr_t lo, hi;
  const char* file;  // nullptr: the dynamic buffer
  int line;
  std::vector<Shadow>* shadow;
};

struct Group {  // one warp-level access: the sectors its lanes touch
  std::vector<uint64_t> sectors;
  bool write;
  uint64_t site = 0;     // the access's code address (relative to this library) << 1 | write
  uint64_t bytes = 0;    // the bytes its lanes asked for
  uint32_t accesses = 0;  // the lane accesses it groups
};

struct Site {  // one access site (code address) of the running launch, over its sampled blocks
  double groups = 0, accesses = 0, bytes = 0, sector_bytes = 0;  // weighted by the blocks they stand for
};

struct State {
  bool active = false, collective = false, race = true, tracing = false;
  unsigned generation = 0;  // traces started (emu_trace_start), for gptr's held storages
  int quiet = 0;  // > 0: the emulation's own bookkeeping runs (its heap may reuse a freed tensor's range)
  uintptr_t stack_lo = 0;       // the running fiber's stack: most accesses, none of interest
  uintptr_t collective_pc = 0;  // the kernel code that called the WMMA load/store
  int sample = 5;
  const char* kernel = "?";
  unsigned grid[3] = {1, 1, 1};
  int threads = 0;
  uint64_t epoch = 0, serial = 0;
  uint64_t warp_ep[32] = {};
  // shared memory
  std::unordered_map<uintptr_t, std::vector<Shadow>> shadows;  // by region start
  std::vector<SharedRegion> regions;
  size_t statics_seen = 0;
  uintptr_t dyn_lo = 0, dyn_hi = 0;
  // global memory
  std::vector<std::pair<uintptr_t, uintptr_t>> globals;  // registered tensors, sorted, disjoint
  // trace of the running launch
  std::vector<std::vector<double>> weights;  // per grid axis: sampled index -> blocks it stands for
  double block_weight = 1.0;
  uintptr_t base = 0;  // load address of this library: pcs are kept relative to it
  std::unordered_map<uint64_t, uint32_t> occurrence;  // (thread, pc, write) -> executions so far
  std::unordered_map<uint64_t, Group> groups;         // (warp, pc, write, occurrence) -> sectors
  double l2_read = 0, l2_write = 0;
  std::vector<uint64_t> read, written;  // sectors of the sampled blocks
  std::unordered_map<uint64_t, Site> sites;  // by Group::site
  int sampled = 0;
  std::string log;  // finished launches, one JSON object per line
};

State g_state;
inline State& st() { return g_state; }

std::string where(uintptr_t pc) {
  Dl_info info;
  if (pc == 0 || !dladdr(reinterpret_cast<void*>(pc), &info) || info.dli_fname == nullptr) return "?";
  char cmd[4096];
  std::snprintf(cmd, sizeof cmd, "addr2line -i -e '%s' 0x%" PRIxPTR " 2>/dev/null", info.dli_fname,
                pc - 1 - reinterpret_cast<uintptr_t>(info.dli_fbase));
  FILE* f = popen(cmd, "r");
  if (f == nullptr) return "?";
  std::string best, first;
  char line[4096];
  while (std::fgets(line, sizeof line, f) != nullptr) {  // innermost frame first
    std::string s(line);
    s = s.substr(0, s.find_first_of(" \n"));
    const std::string base = s.substr(s.find_last_of('/') + 1);
    if (first.empty()) first = base;
    const std::string ext = base.find('.') == std::string::npos ? "" : base.substr(base.find('.'));
    const bool kernel_source = ext == ".cu" || ext == ".cuh" || ext == ".h";  // not <vector>, cuda_bf16.hpp, ...
    const bool emulation = !kernel_source || base.rfind("emu_", 0) == 0 || base.rfind("mma.h", 0) == 0;
    if (best.empty() && !emulation && base.rfind("??", 0) != 0) best = base;
  }
  pclose(f);
  return best.empty() ? first : best;
}

int warp_of(int id) { return id >= kCollective ? id - kCollective : id >> 5; }

std::string who(int id) {
  return id >= kCollective ? "warp " + std::to_string(id - kCollective) + " (WMMA)" : "thread " + std::to_string(id);
}

[[noreturn]] void race(const SharedRegion& r, uintptr_t a, const char* first_kind, int first_tid, uintptr_t first_pc,
                       const char* second_kind, int second_tid, uintptr_t second_pc) {
  auto& s = st();
  const dim3 b = m().block_idx;
  char region[512];
  if (r.file != nullptr)
    std::snprintf(region, sizeof region, "__shared__ of %s:%d, byte %zu", r.file, r.line, static_cast<size_t>(a - r.lo));
  else
    std::snprintf(region, sizeof region, "dynamic shared memory, byte %zu", static_cast<size_t>(a - r.lo));
  std::fprintf(stderr,
               "emu: race in %s block (%u, %u, %u): %s: %s by %s at %s, then %s by %s at %s with no barrier between\n",
               s.kernel, b.x, b.y, b.z, region, first_kind, who(first_tid).c_str(), where(first_pc).c_str(),
               second_kind, who(second_tid).c_str(), where(second_pc).c_str());
  std::fflush(stderr);
  std::abort();
}

void refresh_regions() {
  auto& s = st();
  const auto& statics = adv::mode().statics;
  if (s.statics_seen == statics.size() && !s.regions.empty()) return;
  s.regions.clear();
  for (const auto& r : statics) {
    auto& sh = s.shadows[reinterpret_cast<uintptr_t>(r.p)];
    if (sh.size() < r.bytes) sh.resize(r.bytes);
    s.regions.push_back(SharedRegion{reinterpret_cast<uintptr_t>(r.p), reinterpret_cast<uintptr_t>(r.p) + r.bytes,
                                     r.file, r.line, &sh});
  }
  auto& dyn = s.shadows[0];
  if (dyn.size() < s.dyn_hi - s.dyn_lo) dyn.resize(s.dyn_hi - s.dyn_lo);
  s.regions.push_back(SharedRegion{s.dyn_lo, s.dyn_hi, nullptr, 0, &dyn});
  s.statics_seen = statics.size();
}

void check_shared(const SharedRegion& r, uintptr_t a, size_t n, bool write, int tid, uintptr_t pc) {
  auto& s = st();
  const int w = warp_of(tid);
  const uint64_t wep = s.warp_ep[w];
  const uintptr_t end = std::min<uintptr_t>(a + n, r.hi);
  for (uintptr_t x = a; x < end; ++x) {
    Shadow& e = (*r.shadow)[x - r.lo];
    if (e.w_epoch == s.epoch && e.w_tid != tid && !(warp_of(e.w_tid) == w && s.warp_ep[w] != e.w_wep))
      race(r, x, "written", e.w_tid, e.w_pc, write ? "written" : "read", tid, pc);
    if (write) {
      if (e.r_epoch == s.epoch) {
        const bool only_me = e.ra_tid == tid && e.rb_tid < 0;
        const bool my_warp_synced = e.r_warp == w && s.warp_ep[w] != e.r_wep;
        if (!only_me && !my_warp_synced) {
          const bool a_is_me = e.ra_tid == tid;
          race(r, x, "read", a_is_me ? e.rb_tid : e.ra_tid, a_is_me ? e.rb_pc : e.ra_pc, "written", tid, pc);
        }
      }
      e.w_epoch = s.epoch;
      e.w_tid = static_cast<int16_t>(tid);
      e.w_wep = wep;
      e.w_pc = pc;
      e.r_epoch = 0;
    } else if (e.r_epoch != s.epoch) {
      e.r_epoch = s.epoch;
      e.ra_tid = static_cast<int16_t>(tid);
      e.ra_pc = pc;
      e.rb_tid = -1;
      e.r_warp = static_cast<int16_t>(w);
      e.r_wep = wep;
    } else {
      if (e.ra_tid != tid) {
        e.rb_tid = e.ra_tid;
        e.rb_pc = e.ra_pc;
        e.ra_tid = static_cast<int16_t>(tid);
        e.ra_pc = pc;
      }
      if (e.r_warp != w) e.r_warp = -1;
      e.r_wep = wep;
    }
  }
}

void trace_global(uintptr_t a, size_t n, bool write, int tid, uintptr_t pc) {
  auto& s = st();
  const uint64_t rel = static_cast<uint64_t>(pc - s.base) & 0xffffffffull;
  const int thread = tid >= kCollective ? (tid - kCollective) * 32 : tid;
  const uint64_t okey = (static_cast<uint64_t>(thread) << 33) | (rel << 1) | (write ? 1 : 0);
  const uint32_t occ = s.occurrence[okey]++;
  const uint64_t gkey = (static_cast<uint64_t>(warp_of(tid)) << 58) ^ (static_cast<uint64_t>(occ) << 33) ^ (rel << 1) ^
                        (write ? 1 : 0);
  Group& g = s.groups[gkey];
  g.write = write;
  g.site = (rel << 1) | (write ? 1 : 0);
  g.bytes += n;
  ++g.accesses;
  for (uint64_t sec = a / kSector; sec <= (a + n - 1) / kSector; ++sec) g.sectors.push_back(sec);
}

inline bool in_globals(uintptr_t a) {
  const auto& g = st().globals;
  auto it = std::upper_bound(g.begin(), g.end(), std::make_pair(a, UINTPTR_MAX));
  return it != g.begin() && a < std::prev(it)->second;
}

inline void access(uintptr_t a, size_t n, bool write, uintptr_t pc) {
  auto& s = st();
  if (!s.active || s.quiet > 0 || n == 0 || a - s.stack_lo < kStack) return;
  if (s.collective && (m().current & 31) != 0) return;  // a WMMA load/store: every lane repeats lane 0's accesses
  const int tid = s.collective ? kCollective + (m().current >> 5) : m().current;
  if (s.collective) pc = s.collective_pc;
  if (s.race) {
    refresh_regions();
    for (const auto& r : s.regions)
      if (a < r.hi && a + n > r.lo) {
        check_shared(r, std::max(a, r.lo), std::min<uintptr_t>(a + n, r.hi) - std::max(a, r.lo), write, tid, pc);
        return;
      }
  } else if (a < s.dyn_hi && a + n > s.dyn_lo) {
    return;
  }
  if (s.tracing && in_globals(a)) trace_global(a, n, write, tid, pc);
}

std::vector<std::vector<double>> sample_axes(const unsigned* grid, int per_axis) {
  // benchmarks/compiled_trace.py sample_grid: per axis the first two, the last two and evenly
  // spaced ones between, each standing for its share of the rest (all of a short axis)
  std::vector<std::vector<double>> axes;
  for (int d = 0; d < 3; ++d) {
    const int64_t n = grid[d];
    std::vector<double> w(n, 0.0);
    if (per_axis <= 0 || n <= per_axis) {
      std::fill(w.begin(), w.end(), 1.0);
    } else {
      const int64_t inner = per_axis - 4;
      w[0] = w[1] = w[n - 2] = w[n - 1] = 1.0;
      std::vector<int64_t> mids;
      for (int64_t k = 0; k < inner; ++k) {
        const int64_t mid = 2 + (k * (n - 4)) / std::max<int64_t>(1, inner);
        if (mid != 0 && mid != 1 && mid != n - 2 && mid != n - 1) mids.push_back(mid);
      }
      std::sort(mids.begin(), mids.end());
      mids.erase(std::unique(mids.begin(), mids.end()), mids.end());
      for (int64_t mid : mids) w[mid] = static_cast<double>(n - 4) / static_cast<double>(mids.size());
    }
    axes.push_back(std::move(w));
  }
  return axes;
}

void sort_unique(std::vector<uint64_t>& v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
}

}  // namespace

void launch_begin(const char* kernel, unsigned gx, unsigned gy, unsigned gz, int threads) {
  auto& s = st();
  const char* r = std::getenv("DEMUL_EMU_RACE");
  s.race = !(r && std::strcmp(r, "0") == 0);
  s.kernel = kernel;
  s.grid[0] = gx;
  s.grid[1] = gy;
  s.grid[2] = gz;
  s.threads = threads;
  s.dyn_lo = reinterpret_cast<uintptr_t>(m().dyn.data());
  s.dyn_hi = s.dyn_lo + m().dyn.size() * sizeof(float);
  s.regions.clear();  // the dynamic buffer may have moved
  if (s.tracing) {
    s.weights = sample_axes(s.grid, s.sample);
    s.l2_read = s.l2_write = 0;
    s.read.clear();
    s.written.clear();
    s.sites.clear();
    s.sampled = 0;
  }
}

bool block_selected(int b) {
  auto& s = st();
  if (!s.tracing) return true;
  const unsigned x = b % s.grid[0], y = (b / s.grid[0]) % s.grid[1], z = b / (s.grid[0] * s.grid[1]);
  return s.weights[0][x] > 0 && s.weights[1][y] > 0 && s.weights[2][z] > 0;
}

void block_begin(int b) {
  auto& s = st();
  s.epoch = ++s.serial;
  for (auto& w : s.warp_ep) w = ++s.serial;
  if (s.tracing) {
    const unsigned x = b % s.grid[0], y = (b / s.grid[0]) % s.grid[1], z = b / (s.grid[0] * s.grid[1]);
    s.block_weight = s.weights[0][x] * s.weights[1][y] * s.weights[2][z];
    s.occurrence.clear();
    s.groups.clear();
    ++s.sampled;
  }
}

void block_end() {
  auto& s = st();
  if (!s.tracing) return;
  for (auto& kv : s.groups) {
    auto& g = kv.second;
    sort_unique(g.sectors);
    (g.write ? s.l2_write : s.l2_read) += s.block_weight * static_cast<double>(g.sectors.size() * kSector);
    Site& site = s.sites[g.site];
    site.groups += s.block_weight;
    site.accesses += s.block_weight * g.accesses;
    site.bytes += s.block_weight * static_cast<double>(g.bytes);
    site.sector_bytes += s.block_weight * static_cast<double>(g.sectors.size() * kSector);
    auto& all = g.write ? s.written : s.read;
    all.insert(all.end(), g.sectors.begin(), g.sectors.end());
  }
  s.groups.clear();
  s.occurrence.clear();
  sort_unique(s.read);
  sort_unique(s.written);
}

void launch_end() {
  auto& s = st();
  if (!s.tracing) return;
  // per registered tensor that the launch touched: its bytes and the distinct sectors read / written
  std::string ranges;
  auto count = [](const std::vector<uint64_t>& v, uint64_t lo, uint64_t hi) {
    return std::lower_bound(v.begin(), v.end(), hi) - std::lower_bound(v.begin(), v.end(), lo);
  };
  size_t seen_r = 0, seen_w = 0;
  for (const auto& g : s.globals) {
    const uint64_t lo = g.first / kSector, hi = (g.second - 1) / kSector + 1;
    const auto nr = count(s.read, lo, hi), nw = count(s.written, lo, hi);
    if (nr == 0 && nw == 0) continue;
    seen_r += nr;
    seen_w += nw;
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s[%" PRIu64 ", %ld, %ld]", ranges.empty() ? "" : ", ", hi - lo,
                  static_cast<long>(nr), static_cast<long>(nw));
    ranges += buf;
  }
  char head[1024];
  std::snprintf(head, sizeof head,
                "{\"kernel\": \"%s\", \"grid\": [%u, %u, %u], \"threads\": %d, \"sampled_blocks\": %d, "
                "\"l2_read_bytes\": %.1f, \"l2_write_bytes\": %.1f, \"outside_sectors\": [%zu, %zu], \"tensors\": [",
                s.kernel, s.grid[0], s.grid[1], s.grid[2], s.threads, s.sampled, s.l2_read, s.l2_write,
                s.read.size() - seen_r, s.written.size() - seen_w);
  // per access site: [code address relative to this library, write, warp accesses, lane
  // accesses, bytes asked, sector bytes moved], weighted as l2_*_bytes
  std::vector<std::pair<uint64_t, Site>> sites(s.sites.begin(), s.sites.end());
  std::sort(sites.begin(), sites.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::string per_site;
  for (const auto& kv : sites) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s[%" PRIu64 ", %d, %.1f, %.1f, %.1f, %.1f]", per_site.empty() ? "" : ", ",
                  kv.first >> 1, static_cast<int>(kv.first & 1), kv.second.groups, kv.second.accesses, kv.second.bytes,
                  kv.second.sector_bytes);
    per_site += buf;
  }
  s.log += head + ranges + "], \"sites\": [" + per_site + "]}\n";
  s.read.clear();
  s.written.clear();
  s.sites.clear();
}

void running(bool active) {
  auto& s = st();
  s.active = active;
  if (active) s.stack_lo = reinterpret_cast<uintptr_t>(m().stacks[m().current].data());
}

void block_barrier() {
  auto& s = st();
  s.epoch = ++s.serial;
}

void warp_barrier(int w) {
  auto& s = st();
  s.warp_ep[w] = ++s.serial;
}

void quiet(bool on) { st().quiet += on ? 1 : -1; }

void copy_access(const void* p, size_t bytes, bool write, const void* caller) {
  auto& s = st();
  const int saved = s.quiet;
  s.quiet = 0;
  access(reinterpret_cast<uintptr_t>(p), bytes, write, reinterpret_cast<uintptr_t>(caller));
  s.quiet = saved;
}

void collective(bool on, const void* caller) {
  st().collective = on;
  st().collective_pc = reinterpret_cast<uintptr_t>(caller);
}

unsigned trace_generation() { return st().tracing ? st().generation : 0; }

void global_range(const void* p, size_t bytes) {
  auto& g = st().globals;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p), hi = lo + bytes;
  // a new tensor replaces the stale ones it overlaps (freed storage reused)
  g.erase(std::remove_if(g.begin(), g.end(), [&](const auto& r) { return r.first < hi && lo < r.second; }), g.end());
  g.insert(std::upper_bound(g.begin(), g.end(), std::make_pair(lo, hi)), std::make_pair(lo, hi));
}

}  // namespace ins
}  // namespace emu

// ---------------------------------------------------------------- the compiler's calls
#define EMU_PC reinterpret_cast<uintptr_t>(__builtin_return_address(0))
#define EMU_HOOKS(N)                                                                                \
  extern "C" void __asan_load##N##_noabort(uintptr_t a) { emu::ins::access(a, N, false, EMU_PC); }  \
  extern "C" void __asan_store##N##_noabort(uintptr_t a) { emu::ins::access(a, N, true, EMU_PC); } \
  extern "C" void __asan_load##N(uintptr_t a) { emu::ins::access(a, N, false, EMU_PC); }            \
  extern "C" void __asan_store##N(uintptr_t a) { emu::ins::access(a, N, true, EMU_PC); }
EMU_HOOKS(1)
EMU_HOOKS(2)
EMU_HOOKS(4)
EMU_HOOKS(8)
EMU_HOOKS(16)
extern "C" void __asan_loadN_noabort(uintptr_t a, size_t n) { emu::ins::access(a, n, false, EMU_PC); }
extern "C" void __asan_storeN_noabort(uintptr_t a, size_t n) { emu::ins::access(a, n, true, EMU_PC); }
extern "C" void __asan_loadN(uintptr_t a, size_t n) { emu::ins::access(a, n, false, EMU_PC); }
extern "C" void __asan_storeN(uintptr_t a, size_t n) { emu::ins::access(a, n, true, EMU_PC); }
extern "C" void __asan_handle_no_return() {}

// ---------------------------------------------------------------- read by Python (ctypes)
extern "C" void emu_trace_start(int blocks_per_axis) {
  auto& s = emu::ins::st();
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&emu_trace_start), &info)) s.base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  s.tracing = true;
  s.sample = blocks_per_axis;
  s.log.clear();
  // Ranges registered before the trace may have been freed and reused by anything on the heap
  // (a launch's argument structs among them, which a GPU reads as kernel parameters, not global
  // memory): none is kept. During the trace gptr holds every registered tensor's storage, so
  // no registered range is freed and reused while it runs.
  s.globals.clear();
  ++s.generation;
}

// The finished launches since emu_trace_start (one JSON object per line); tracing stops.
extern "C" const char* emu_trace_take() {
  auto& s = emu::ins::st();
  s.tracing = false;
  static std::string out;
  out = s.log;
  s.log.clear();
  return out.c_str();
}
