// Output buffers of the emulated bindings (tests/cuda_emu/build.py rewrites at::empty and
// at::empty_like in csrc/bindings.cpp into these): NaN-filled unless DEMUL_EMU_POISON=0, so
// an element a kernel forgets to write reads as NaN (emu_adversary.h); integer buffers (the
// merge's ticket counter) all bits set (-1), so one that a kernel forgets to zero is not 0.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "emu_instrument.h"

namespace emu {

inline bool poison_outputs() {
  const char* p = std::getenv("DEMUL_EMU_POISON");
  return !(p && std::strcmp(p, "0") == 0);
}

inline at::Tensor poisoned(at::Tensor t) {
  if (poison_outputs() && t.is_floating_point() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  if (poison_outputs() && at::isIntegralType(t.scalar_type(), /*includeBool=*/false) && t.numel() > 0) t.fill_(-1);
  return t;
}

inline at::Tensor poisoned_empty(at::IntArrayRef size, at::TensorOptions options) {
  return poisoned(at::empty(size, options));
}

inline at::Tensor poisoned_empty_like(const at::Tensor& like) { return poisoned(at::empty_like(like)); }

inline at::Tensor poisoned_empty_like(const at::Tensor& like, at::TensorOptions options) {
  return poisoned(at::empty_like(like, options));
}

// The instrumented build rewrites each ``X.data_ptr<T>()`` of the bindings into
// ``gptr(X, X.data_ptr<T>())``: the tensor's bytes are registered as global memory for the
// trace (include/emu_instrument.h), the pointer passes through.
// While a trace runs the tensor's storage is held until the next trace starts: a registered
// range is never freed and reused by other heap memory (which the trace would then count as
// global traffic, more or less from run to run as the heap goes).
template <class P>
P gptr(const at::Tensor& t, P p) {
  static std::vector<c10::Storage> held;
  static unsigned held_trace = 0;
  if (const unsigned trace = ins::trace_generation(); trace != 0 && t.defined() && t.has_storage()) {
    if (trace != held_trace) {
      held.clear();
      held_trace = trace;
    }
    held.push_back(t.storage());
  }
  if (t.defined() && t.numel() > 0) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    ins::global_range(t.data_ptr(), static_cast<size_t>(last + 1) * t.element_size());
  }
  return p;
}

}  // namespace emu
