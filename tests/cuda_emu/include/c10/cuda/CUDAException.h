// CUDA-on-CPU emulation: launches run synchronously on the host; nothing to check.
#pragma once
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
