// CUDA-on-CPU emulation: no device to guard.
#pragma once
namespace c10 {
namespace cuda {
struct OptionalCUDAGuard {
  template <class D>
  explicit OptionalCUDAGuard(const D&) {}
};
}  // namespace cuda
}  // namespace c10
