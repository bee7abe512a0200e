// CUDA-on-CPU emulation: the stream and device properties the bindings ask for; the launch
// plans are made for an H200 (132 SMs), as on the GPU the kernels were written for.
#pragma once
#include <cuda_runtime_api.h>
namespace at {
namespace cuda {
struct EmuStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream() { return {}; }
struct EmuProperties {
  int multiProcessorCount = 132;
};
inline const EmuProperties* getCurrentDeviceProperties() {
  static const EmuProperties props;
  return &props;
}
}  // namespace cuda
}  // namespace at
