// The instrumented CUDA emulation (tests/cuda_emu/build.py, ``build(instrument=True)``): the
// kernels' translation units are compiled with GCC's kernel-address instrumentation
// (-fsanitize=kernel-address, every access through a call), and include/emu_hooks.cpp defines
// the __asan_* functions those calls reach: no ASan runtime. The emulation reports here
// which launch, block and thread runs and where the barriers release; the hooks keep only
// the accesses to shared memory (the static __shared__ variables and the dynamic buffer) and
// to the tensors the bindings pass to the launches (registered by ``gptr``), for
//  * a shadow-memory race check of shared memory between barriers (on unless
//    DEMUL_EMU_RACE=0): an address written by one thread and read or written by another with
//    no barrier between (__syncthreads; for two lanes of one warp also __syncwarp, a
//    shuffle or a WMMA call) aborts, naming the kernel and the csrc file:line of both accesses;
//  * a trace of global memory (emu_trace_start / emu_trace_take, read by
//    benchmarks/compiled_cuda.py): per warp-level access (the lanes of a warp at the same
//    instruction, the same time) the 32-byte sectors it touches, summed over the blocks (L2
//    bytes), and the distinct sectors per tensor (HBM bytes), loads and stores apart; and
//    per access site (code address) the warp accesses, lane accesses, bytes and sectors.
//    An "instruction" is the CPU code's access: build.py compiles the kernels with
//    -fno-tree-sra so that a 16-byte vector access (float4, uint4) stays one access, as on the
//    GPU, instead of four 4-byte ones (tests/test_cuda_emulated.py checks this on the probe
//    kernels of include/emu_probe.cu, whose sectors are counted by hand).
// In the plain build every function here is an empty inline function.
#pragma once

#include <cstddef>
#include <cstdint>

namespace emu {
namespace ins {

#ifdef DEMUL_EMU_INSTRUMENT
void launch_begin(const char* kernel, unsigned gx, unsigned gy, unsigned gz, int threads);
bool block_selected(int block);  // false: the trace samples blocks and skips this one
void block_begin(int block);
void block_end();
void launch_end();
void running(bool active);       // a thread (fiber) of the block runs / the scheduler does
void block_barrier();            // a __syncthreads released
void warp_barrier(int warp);     // a __syncwarp / shuffle / WMMA call released that warp
void collective(bool on, const void* caller = nullptr);  // inside a WMMA load/store: the warp acts as one
void global_range(const void* p, size_t bytes);  // a tensor the bindings pass to a launch
unsigned trace_generation();  // 0 when not tracing, else the number of the running trace
void quiet(bool on);  // the emulation's own bookkeeping runs (include/emu_async.h's queues): not the kernel's accesses
void copy_access(const void* p, size_t bytes, bool write, const void* caller);  // an emulated cp.async's
                                                                               // global read / shared write
#else
inline void launch_begin(const char*, unsigned, unsigned, unsigned, int) {}
inline bool block_selected(int) { return true; }
inline void block_begin(int) {}
inline void block_end() {}
inline void launch_end() {}
inline void running(bool) {}
inline void block_barrier() {}
inline void warp_barrier(int) {}
inline void collective(bool, const void* = nullptr) {}
inline void global_range(const void*, size_t) {}
inline unsigned trace_generation() { return 0; }
inline void quiet(bool) {}
inline void copy_access(const void*, size_t, bool, const void*) {}
#endif

}  // namespace ins
}  // namespace emu
