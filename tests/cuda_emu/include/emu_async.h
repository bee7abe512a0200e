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
// In the instrumented build (include/emu_instrument.h) a copy is one access of the kernel's
// thread at the kernel line that issued it (the global read at the issue, for the trace; the
// shared write at the issue and at the covering wait, for the race check: named by the caller's return
// address, hence noinline); the queues' own accesses are not traced (ins::quiet).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "emu_instrument.h"

#include <cstddef>
#include <cstring>
#include <vector>

#include "emu_adversary.h"

// cuda_pipeline.h and its primitives header are replaced by the definitions below.
#define _CUDA_PIPELINE_H_
#define _CUDA_PIPELINE_PRIMITIVES_H_

namespace emu {
namespace async {

struct Quiet {  // the queues' bookkeeping: heap accesses of the emulation, not of the kernel
  Quiet() { ::emu::ins::quiet(true); }
  ~Quiet() { ::emu::ins::quiet(false); }
  Quiet(const Quiet&) = delete;
  Quiet& operator=(const Quiet&) = delete;
};

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

__attribute__((noinline)) inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align,
                                                               size_t zfill = 0) {
  if (!(size_and_align == 4 || size_and_align == 8 || size_and_align == 16))
    ::emu::adv::fail("__pipeline_memcpy_async: size must be 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(dst) % size_and_align != 0 || reinterpret_cast<uintptr_t>(src) % size_and_align != 0)
    ::emu::adv::fail("__pipeline_memcpy_async: a pointer is not aligned to the copy size");
  if (zfill > size_and_align) ::emu::adv::fail("__pipeline_memcpy_async: zfill larger than the copy");
  // ins: the global read happens at the issue (the trace), at the kernel line that issued it;
  // the destination may be written from the issue on (the race check; again at the wait)
  const void* caller = __builtin_return_address(0);
  ::emu::ins::copy_access(src, size_and_align - zfill, false, caller);
  ::emu::ins::copy_access(dst, size_and_align, true, caller);
  ::emu::async::Quiet quiet;
  auto& q = emu_async_queue();
  q.open.push_back({dst, src, size_and_align - zfill, size_and_align});
  ::emu::adv::poison(dst, size_and_align);  // adv: unreadable until waited for
}

inline void __pipeline_commit() {
  ::emu::async::Quiet quiet;
  auto& q = emu_async_queue();
  q.groups.push_back(std::move(q.open));
  q.open.clear();
}

__attribute__((noinline)) inline void __pipeline_wait_prior(size_t prior) {
  const void* caller = __builtin_return_address(0);
  ::emu::async::Quiet quiet;
  auto& q = emu_async_queue();
  while (q.groups.size() > prior) {
    for (const auto& c : q.groups.front()) {
      // ins: the race check: the shared destination is written by the wait that covers it
      ::emu::ins::copy_access(c.dst, c.size, true, caller);
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
