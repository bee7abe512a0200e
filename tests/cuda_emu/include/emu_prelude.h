// CUDA-on-CPU emulation of the kernels of csrc/ (tests/test_cuda_emulated.py).
//
// Each .cu file of csrc/ is compiled by the host C++ compiler with this prelude first: a
// block runs as one fiber (ucontext) per thread, scheduled in thread order; __syncthreads
// and __syncwarp switch fibers and release when every live thread of the block / warp has
// arrived (a barrier that can never release aborts with a message: a divergent barrier),
// warp shuffles go through a per-warp buffer between two warp barriers, __shared__
// variables are static (one copy for the block; blocks run one after another), and WMMA
// (include/mma.h) multiplies whole 16 x 16 fragments in float32 on every lane. The kernel
// source is the one the GPU build compiles; only its launches (<<<...>>>) are rewritten
// into emu::launch calls by tests/cuda_emu/build.py.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "emu_adversary.h"  // schedules, poisoning, strict barriers (hooks marked "adv:" below)
#include "emu_instrument.h"  // race check and trace of the instrumented build (marked "ins:" below)

using std::isfinite;
using std::max;
using std::min;

namespace emu {

enum class State { kRun, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  State state;
};

constexpr size_t kStack = 256 * 1024;

struct Machine {
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  ucontext_t sched;
  int current = 0;
  dim3 grid, block, block_idx;
  const std::function<void()>* body = nullptr;
  std::vector<float> dyn;  // dynamic shared memory (float-aligned)
  float shfl[32][32];      // one exchange buffer per warp
};

inline Machine& m() {
  static Machine machine;
  return machine;
}

inline dim3 thread_idx() {
  const auto& s = m();
  const unsigned i = static_cast<unsigned>(s.current);
  return dim3(i % s.block.x, (i / s.block.x) % s.block.y, i / (s.block.x * s.block.y));
}

inline void wait(State s) {
  auto& mm = m();
  mm.fibers[mm.current].state = s;
  swapcontext(&mm.fibers[mm.current].ctx, &mm.sched);
}

inline void trampoline() {
  (*m().body)();
  m().fibers[m().current].state = State::kDone;  // returns to the scheduler (uc_link)
}

[[noreturn]] inline void deadlock(const char* why) {
  auto& mm = m();
  std::fprintf(stderr, "emu: block (%u, %u, %u): %s\n", mm.block_idx.x, mm.block_idx.y, mm.block_idx.z, why);
  std::abort();
}

inline void run_block(int n) {
  auto& mm = m();
  mm.fibers.assign(n, Fiber{});
  while (static_cast<int>(mm.stacks.size()) < n) mm.stacks.emplace_back(kStack);
  for (int i = 0; i < n; ++i) {
    getcontext(&mm.fibers[i].ctx);
    mm.fibers[i].ctx.uc_stack.ss_sp = mm.stacks[i].data();
    mm.fibers[i].ctx.uc_stack.ss_size = kStack;
    mm.fibers[i].ctx.uc_link = &mm.sched;
    makecontext(&mm.fibers[i].ctx, trampoline, 0);
    mm.fibers[i].state = State::kRun;
  }
  adv::block_start(mm.dyn.data(), mm.dyn.size() * sizeof(float));  // adv: NaN shared memory
  for (;;) {
    for (int i : adv::order(n, true)) {  // adv: the schedule of this round
      if (mm.fibers[i].state != State::kRun) continue;
      mm.current = i;
      ins::running(true);  // ins
      swapcontext(&mm.sched, &mm.fibers[i].ctx);
      ins::running(false);  // ins
    }
    bool released = false;
    for (int w = 0; w * 32 < n; ++w) {  // a warp barrier releases when its live lanes all wait on it
      int live = 0, waiting = 0;
      for (int i = 32 * w; i < std::min(n, 32 * w + 32); ++i) {
        live += mm.fibers[i].state != State::kDone;
        waiting += mm.fibers[i].state == State::kWarpBarrier;
      }
      if (waiting > 0 && waiting == live) {
        if (adv::mode().strict && live < std::min(n, 32 * w + 32) - 32 * w)  // adv
          deadlock("a warp barrier / shuffle / WMMA call after some lanes of the warp exited");
        for (int i = 32 * w; i < std::min(n, 32 * w + 32); ++i)
          if (mm.fibers[i].state == State::kWarpBarrier) mm.fibers[i].state = State::kRun;
        ins::warp_barrier(w);  // ins
        released = true;
      } else if (waiting > 0) {
        bool others_at_block = false;
        for (int i = 32 * w; i < std::min(n, 32 * w + 32); ++i)
          others_at_block |= mm.fibers[i].state == State::kBlockBarrier;
        if (others_at_block) deadlock("a warp waits at __syncwarp/shuffle while some of its lanes wait at __syncthreads");
      }
    }
    if (released) continue;
    int live = 0, waiting = 0;
    for (const auto& f : mm.fibers) {
      live += f.state != State::kDone;
      waiting += f.state == State::kBlockBarrier;
    }
    if (live == 0) return;
    if (waiting != live) deadlock("threads wait at different barriers");
    if (adv::mode().strict && live < n) deadlock("__syncthreads after some threads of the block exited");  // adv
    for (auto& f : mm.fibers)
      if (f.state == State::kBlockBarrier) f.state = State::kRun;
    ins::block_barrier();  // ins
  }
}

// kernel<<<grid, block, smem, stream>>>(args) becomes
// launch("kernel", [&] { kernel(args); }, grid, block, smem, stream).
template <class F>
void launch(const char* kernel, F&& body, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  auto& mm = m();
  const std::function<void()> fn = body;
  mm.body = &fn;
  mm.grid = grid;
  mm.block = block;
  mm.dyn.assign((smem + sizeof(float) - 1) / sizeof(float) + 1, 0.f);
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n > 1024) deadlock("more than 1024 threads per block");
  adv::configure();  // adv: the environment's schedule and checks, for this launch
  const int blocks = static_cast<int>(grid.x * grid.y * grid.z);
  ins::launch_begin(kernel, grid.x, grid.y, grid.z, n);  // ins
  for (int b : adv::order(blocks, false)) {
    if (!ins::block_selected(b)) continue;  // ins: a trace that samples blocks
    mm.block_idx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y));
    ins::block_begin(b);  // ins
    run_block(n);
    ins::block_end();  // ins
  }
  ins::launch_end();  // ins
  mm.body = nullptr;
}

template <class T>
T* dyn_smem() {
  return reinterpret_cast<T*>(m().dyn.data());
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::m().block_idx)
#define blockDim (::emu::m().block)
#define gridDim (::emu::m().grid)

inline void __syncthreads() { emu::wait(emu::State::kBlockBarrier); }
namespace emu {
// Every __syncthreads of csrc/ (build.py names its file and line): a no-op when listed in
// DEMUL_EMU_SKIP_BARRIERS (emu_adversary.h), the barrier otherwise.
inline void block_sync(const char* file, int line) {
  if (adv::barrier_skipped(file, line)) return;
  wait(State::kBlockBarrier);
}
// Every __syncwarp() of csrc/ alike.
inline void warp_sync(const char* file, int line) {
  if (adv::barrier_skipped(file, line)) return;
  wait(State::kWarpBarrier);
}
}  // namespace emu
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::State::kWarpBarrier); }

// Global atomics and fences: one fiber runs at a time and blocks run one after another, so a
// read-modify-write is atomic as it stands and every store is visible to later blocks.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline void __threadfence() {}

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  auto& mm = emu::m();
  const int lane = mm.current & 31, warp = mm.current >> 5;
  mm.shfl[warp][lane] = v;
  __syncwarp();
  const float r = mm.shfl[warp][lane ^ lane_mask];
  __syncwarp();
  return r;
}

// The CUDA qualifiers, for host code.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#include "emu_async.h"  // cp.async (cuda_pipeline.h) and the dynamic shared memory opt-in
