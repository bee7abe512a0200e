// Asynchronous copies for the CUDA-on-CPU emulation (included by emu_prelude.h): the
// primitives of cuda_pipeline.h (__pipeline_memcpy_async / __pipeline_commit /
// __pipeline_wait_prior, cp.async on sm_80+) and the opt-in to more than 48 KB of dynamic
// shared memory (cudaFuncSetAttribute), so that csrc/ includes and calls them unchanged.
//
// A copy is not done when it is issued: each thread keeps its own queue of committed
// groups, and __pipeline_wait_prior(n) performs every group but the newest n, in order (as
// cp.async.wait_group n guarantees). When poisoning is on (emu_adversary.h), the
// destination is NaN-filled at the issue, so a read of the shared memory before the wait
// that covers it sees NaN instead of the data (a missing or too weak wait is caught).
// Groups still pending when a block ends are dropped (their destination stays poisoned).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#ifdef DEMUL_EMU_INSTRUMENT  // include/emu_hooks.cpp: the copies below are accesses of the kernel's
extern "C" void __asan_loadN_noabort(uintptr_t, size_t);   // thread, which the instrumentation
extern "C" void __asan_storeN_noabort(uintptr_t, size_t);  // cannot see inside std::memcpy
#endif

#include <cstddef>
#include <cstring>
#include <vector>

#include "emu_adversary.h"

// cuda_pipeline.h and its primitives header are replaced by the definitions below.
#define _CUDA_PIPELINE_H_
#define _CUDA_PIPELINE_PRIMITIVES_H_

namespace emu {
namespace async {

struct Copy {
  void* dst;
  const void* src;
  size_t bytes;  // copied from src; the rest of `size` is zero-filled
  size_t size;
};

struct Queue {
  const void* owner = nullptr;  // the launch and block it belongs to (see emu_async_queue)
  unsigned long long launch = 0;
  std::vector<Copy> open;                // issued, not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

struct State {
  std::vector<Queue> threads;
};

inline State& state() {
  static State s;
  return s;
}

}  // namespace async
}  // namespace emu

// The running thread's queue (emu_prelude.h includes this header at its end, after its
// Machine). A queue left by another block starts empty again; in strict mode a thread that
// left copies it never waited for fails there (none of csrc/ ends a block so).
inline emu::async::Queue& emu_async_queue() {
  auto& mm = ::emu::m();
  auto& threads = ::emu::async::state().threads;
  if (threads.size() <= static_cast<size_t>(mm.current)) threads.resize(mm.current + 1);
  auto& q = threads[mm.current];
  const unsigned long long id = (static_cast<unsigned long long>(mm.block_idx.z) << 42) ^
                                (static_cast<unsigned long long>(mm.block_idx.y) << 21) ^ mm.block_idx.x;
  if (q.owner != static_cast<const void*>(mm.body) || q.launch != id) {
    bool pending = !q.open.empty();
    for (const auto& g : q.groups) pending |= !g.empty();
    if (pending && ::emu::adv::mode().strict)
      ::emu::adv::fail("a thread ended its block with asynchronous copies it never waited for");
    q = ::emu::async::Queue{};
    q.owner = mm.body;
    q.launch = id;
  }
  return q;
}

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align, size_t zfill = 0) {
  if (!(size_and_align == 4 || size_and_align == 8 || size_and_align == 16))
    ::emu::adv::fail("__pipeline_memcpy_async: size must be 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(dst) % size_and_align != 0 || reinterpret_cast<uintptr_t>(src) % size_and_align != 0)
    ::emu::adv::fail("__pipeline_memcpy_async: a pointer is not aligned to the copy size");
  if (zfill > size_and_align) ::emu::adv::fail("__pipeline_memcpy_async: zfill larger than the copy");
#ifdef DEMUL_EMU_INSTRUMENT  // the trace: the global read happens at the issue (include/emu_instrument.h)
  __asan_loadN_noabort(reinterpret_cast<uintptr_t>(src), size_and_align - zfill);
#endif
  auto& q = emu_async_queue();
  q.open.push_back({dst, src, size_and_align - zfill, size_and_align});
  ::emu::adv::poison(dst, size_and_align);  // adv: unreadable until waited for
}

inline void __pipeline_commit() {
  auto& q = emu_async_queue();
  q.groups.push_back(std::move(q.open));
  q.open.clear();
}

inline void __pipeline_wait_prior(size_t prior) {
  auto& q = emu_async_queue();
  while (q.groups.size() > prior) {
    for (const auto& c : q.groups.front()) {
#ifdef DEMUL_EMU_INSTRUMENT  // the race check: the shared destination is written by the wait that covers it
      __asan_storeN_noabort(reinterpret_cast<uintptr_t>(c.dst), c.size);
#endif
      std::memcpy(c.dst, c.src, c.bytes);
      if (c.size > c.bytes) std::memset(static_cast<char*>(c.dst) + c.bytes, 0, c.size - c.bytes);
    }
    q.groups.erase(q.groups.begin());
  }
}

// Dynamic shared memory is a host buffer of any size here; the opt-in is checked against the
// emulated device's limit (ATen/cuda/CUDAContext.h), as the driver refuses more than it has.
namespace emu {
inline cudaError_t func_set_attribute(cudaFuncAttribute attr, int value) {
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize && static_cast<size_t>(value) > optin) {
    std::fprintf(stderr, "emu: a kernel asks for %d bytes of dynamic shared memory, over the device's opt-in limit of %zu\n",
                 value, optin);
    std::abort();
  }
  return cudaSuccess;
}
}  // namespace emu
#define cudaFuncSetAttribute(kernel, attr, value) (::emu::func_set_attribute((attr), (value)))
#ifndef C10_CUDA_CHECK
#define C10_CUDA_CHECK(expr) ((void)(expr))  // the opt-in above cannot fail here
#endif
