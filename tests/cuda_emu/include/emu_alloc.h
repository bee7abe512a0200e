// Output buffers of the emulated bindings (tests/cuda_emu/build.py rewrites at::empty and
// at::empty_like in csrc/bindings.cpp into these): NaN-filled unless DEMUL_EMU_POISON=0, so
// an element a kernel forgets to write reads as NaN (emu_adversary.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace emu {

inline bool poison_outputs() {
  const char* p = std::getenv("DEMUL_EMU_POISON");
  return !(p && std::strcmp(p, "0") == 0);
}

inline at::Tensor poisoned(at::Tensor t) {
  if (poison_outputs() && t.is_floating_point() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline at::Tensor poisoned_empty(at::IntArrayRef size, at::TensorOptions options) {
  return poisoned(at::empty(size, options));
}

inline at::Tensor poisoned_empty_like(const at::Tensor& like) { return poisoned(at::empty_like(like)); }

inline at::Tensor poisoned_empty_like(const at::Tensor& like, at::TensorOptions options) {
  return poisoned(at::empty_like(like, options));
}

}  // namespace emu
