// Probe kernels of the instrumented emulation's trace (include/emu_instrument.h), compiled
// with the kernels' instrumentation (tests/cuda_emu/build.py): tiny access patterns whose
// 32-byte sectors per warp access can be counted by hand (tests/test_cuda_emulated.py
// test_the_trace_counts_the_probe_kernels_by_hand). Each probe runs one block of two warps;
// warp w works on its own 2 KB (512 floats) of the buffer, at 512 w floats.
#include "emu_prelude.h"

namespace {

constexpr int kWarpFloats = 512;

__global__ void probe_scalar(float* a) {  // 4 B a lane, contiguous: 4 sectors read, 4 written
  const int lane = threadIdx.x & 31;
  float* w = a + kWarpFloats * (threadIdx.x >> 5);
  const float v = w[lane];
  w[256 + lane] = v + 1.f;
}

__global__ void probe_strided(float* a) {  // 4 B a lane, 32 B apart: 32 sectors read
  const int lane = threadIdx.x & 31;
  const float* w = a + kWarpFloats * (threadIdx.x >> 5);
  volatile float v = w[8 * lane];
  (void)v;
}

__global__ void probe_vec16(float* a, float* out) {  // one 16-byte load a lane, contiguous: 16 sectors
  const int lane = threadIdx.x & 31;
  const float* w = a + kWarpFloats * (threadIdx.x >> 5);
  const float4 x = *reinterpret_cast<const float4*>(w + 4 * lane);
  out[threadIdx.x] = x.x + x.y + x.z + x.w;  // out: a sector per 8 lanes, 4 per warp
}

__global__ void probe_vec16_pairs(float* a, float* out) {  // two 16-byte loads a lane, 32 B apart: 32 + 32
  const int lane = threadIdx.x & 31;
  const float* w = a + kWarpFloats * (threadIdx.x >> 5);
  float s = 0.f;
#pragma GCC unroll 2
  for (int e = 0; e < 8; e += 4) {
    const float4 x = *reinterpret_cast<const float4*>(w + 8 * lane + e);
    s += x.x + x.y + x.z + x.w;
  }
  out[threadIdx.x] = s;
}

__global__ void probe_half_store(float* a) {  // 2 B a lane, contiguous: 2 sectors written
  const int lane = threadIdx.x & 31;
  unsigned short* w = reinterpret_cast<unsigned short*>(a + kWarpFloats * (threadIdx.x >> 5));
  w[lane] = static_cast<unsigned short>(lane);
}

__global__ void probe_divergent(float* a, float* out) {  // lanes loop once or twice: 4 + 4 sectors
  const int lane = threadIdx.x & 31;
  const float* w = a + kWarpFloats * (threadIdx.x >> 5);
  float s = 0.f;
  for (int i = 0; i < 1 + (lane & 1); ++i) s += w[32 * i + lane];
  out[threadIdx.x] = s;
}

__global__ void probe_cp_async(float* a) {  // 16 B copies (16 sectors), then 4 B copies (4 sectors)
  const int lane = threadIdx.x & 31;
  const float* w = a + kWarpFloats * (threadIdx.x >> 5);
  float* sm = ::emu::dyn_smem<float>() + 256 * (threadIdx.x >> 5);
  __pipeline_memcpy_async(sm + 4 * lane, w + 4 * lane, 16);
  __pipeline_memcpy_async(sm + 128 + lane, w + 128 + lane, 4);
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

}  // namespace

// Runs every probe on buf (at least 4 KB, 32-byte aligned) and out (64 floats), both
// registered as global memory; the caller starts and takes the trace.
extern "C" void emu_probe_run(float* buf, size_t bytes, float* out) {
  ::emu::ins::global_range(buf, bytes);
  ::emu::ins::global_range(out, 64 * sizeof(float));
  const dim3 grid(1), block(64);
  ::emu::launch("probe_scalar", [&] { probe_scalar(buf); }, grid, block);
  ::emu::launch("probe_strided", [&] { probe_strided(buf); }, grid, block);
  ::emu::launch("probe_vec16", [&] { probe_vec16(buf, out); }, grid, block);
  ::emu::launch("probe_vec16_pairs", [&] { probe_vec16_pairs(buf, out); }, grid, block);
  ::emu::launch("probe_half_store", [&] { probe_half_store(buf); }, grid, block);
  ::emu::launch("probe_divergent", [&] { probe_divergent(buf, out); }, grid, block);
  ::emu::launch("probe_cp_async", [&] { probe_cp_async(buf); }, grid, block, 2 * 256 * sizeof(float));
}
