// CUDA-on-CPU emulation: the stream and device properties the bindings ask for; the launch
// plans are made for an H200 (132 SMs, 227 KB of opt-in shared memory per block), as on the GPU
// the kernels were written for. $DEMUL_EMU_SMEM_OPTIN (bytes, read once per process) emulates a
// device with less shared memory (101376: the 99 KB of sm_86/89).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdlib>
namespace at {
namespace cuda {
struct EmuStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream() { return {}; }
struct EmuProperties {
  int multiProcessorCount = 132;
  size_t sharedMemPerBlockOptin = std::getenv("DEMUL_EMU_SMEM_OPTIN")
                                      ? std::strtoull(std::getenv("DEMUL_EMU_SMEM_OPTIN"), nullptr, 10)
                                      : 232448;
};
inline const EmuProperties* getCurrentDeviceProperties() {
  static const EmuProperties props;
  return &props;
}
}  // namespace cuda
}  // namespace at
