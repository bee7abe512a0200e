// Planted violations of the adversarial emulation's strict checks (include/emu_adversary.h),
// for tests/test_emu_strict_checks.py: one kernel of one block of 256 threads (8 warps) whose
// start carries every plant, each switched on at run time by DEMUL_PLANT=<name> (the
// emulation's "device" code is host code: it can read the environment). Compiled into every
// emulation build (tests/cuda_emu/build.py), so the checks are shown to fire in the very
// build the kernels' tests use, and no build of its own is needed. emu_plant_run(out) runs
// it once; with no plant every thread writes out[tid] = 1.
#include <mma.h>

#include <cstdlib>
#include <string>

#include "emu_prelude.h"

namespace {

struct alignas(32) PlantTile {
  __half v[16 * 32];
};

__global__ void plant_kernel(float* out) {
  const int tid = threadIdx.x, lane = tid & 31;
  const char* plant_env = std::getenv("DEMUL_PLANT");
  const std::string plant = plant_env ? plant_env : "";
  if (plant == "exit_then_barrier") {  // threads 16..255 return, 0..15 (half of warp 0) reach a barrier
    if (tid >= 16) return;
    __syncthreads();
  }
  if (plant == "exit_then_warp_barrier") {  // lanes 16..31 of every warp return, 0..15 reach __syncwarp
    if (lane >= 16) return;
    __syncwarp();
  }
  if (plant.rfind("wmma_", 0) == 0) {
    __shared__ PlantTile plant_tile;
    ::emu::adv::shared_static(&plant_tile, sizeof plant_tile, "emu_plants.cpp", __LINE__);
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> frag;
    if (plant == "wmma_partial_exit") {  // lanes 16..31 return, 0..15 call WMMA
      if (lane >= 16) return;
      nvcuda::wmma::load_matrix_sync(frag, plant_tile.v, 16);
    }
    if (plant == "wmma_divergent") {  // half a warp at WMMA, the other half at __syncthreads
      if (lane < 16)
        nvcuda::wmma::load_matrix_sync(frag, plant_tile.v, 16);
      else
        __syncthreads();
    }
    if (plant == "wmma_misaligned") nvcuda::wmma::load_matrix_sync(frag, plant_tile.v + 1, 16);  // 2 B off 32
    if (plant == "wmma_bad_ldm") nvcuda::wmma::load_matrix_sync(frag, plant_tile.v, 20);  // 40 B: not x16
  }
  if (plant == "static_smem") {  // 50,000 bytes of static shared memory: over 48 KB
    __shared__ float plant_big[12500];
    ::emu::adv::shared_static(&plant_big, sizeof plant_big, "emu_plants.cpp", __LINE__);
    plant_big[tid] = 0.f;
  }
  out[tid] = 1.f;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) void emu_plant_run(float* out) {
  ::emu::launch("plant_kernel", [&] { plant_kernel(out); }, dim3(1), dim3(256));
}
