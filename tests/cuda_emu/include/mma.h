// WMMA for the CUDA-on-CPU emulation (tests/cuda_emu/include/emu_prelude.h): every lane
// holds the whole 16 x 16 fragment as float32 and gets the whole product (computed once per
// warp when the lanes' operands are bitwise equal: MmaMemo below); the operand
// types are converted exactly (the kernels round their operands before loading them), the
// products accumulate in float32 as on the tensor cores (in another order).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu_prelude.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has 16 x 16 x 16 fragments only");
  float v[16][16];  // (row, column) of the fragment's matrix
};

// Checks of every WMMA call (emu_adversary.h): reached by the whole warp (a warp barrier:
// a divergent call cannot release it), a 32-byte aligned pointer, ldm a multiple of 16 bytes.
inline void emu_wmma_check(const void* p, unsigned ldm, size_t elem) {
  if (::emu::adv::mode().strict) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::emu::adv::fail("a WMMA pointer is not 32-byte aligned");
    if ((ldm * elem) % 16 != 0) ::emu::adv::fail("a WMMA ldm is not a multiple of 16 bytes");
  }
  __syncwarp();
}

inline float emu_to_float(float x) { return x; }
inline float emu_to_float(__half x) { return __half2float(x); }
inline float emu_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// noinline: the race check names the kernel line that called it (its return address).
template <class Use, class T, class Layout>
__attribute__((noinline)) void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  emu_wmma_check(p, ld, sizeof(T));
  ::emu::ins::collective(true, __builtin_return_address(0));  // ins: every lane reads the fragment; on a GPU the warp does, once
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = emu_to_float(std::is_same_v<Layout, row_major> ? p[r * ld + c] : p[c * ld + r]);
  ::emu::ins::collective(false);
}

template <class T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float x) {
  for (auto& row : f.v)
    for (auto& e : row) e = x;
}

// The last product computed per warp, by its operands' bits: every lane of a warp holds the
// same fragments (loaded by the whole warp from the same memory), so the first lane computes
// the product and the other 31 find its operands here and copy the result (the same bits: the
// product is a function of the operands' bits). Lanes whose operands differ (a kernel bug
// that loads per lane) compute their own, as before.
struct MmaMemo {
  bool valid = false;
  float a[16][16], b[16][16], c[16][16], d[16][16];
};

inline MmaMemo& emu_mma_memo() {
  static MmaMemo memo[32];  // per warp of the block (at most 1024 threads)
  return memo[(::emu::m().current / 32) % 32];
}

template <class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  __syncwarp();  // the whole warp takes part
  MmaMemo& memo = emu_mma_memo();
  if (memo.valid && std::memcmp(memo.a, a.v, sizeof memo.a) == 0 && std::memcmp(memo.b, b.v, sizeof memo.b) == 0 &&
      std::memcmp(memo.c, c.v, sizeof memo.c) == 0) {
    std::memcpy(d.v, memo.d, sizeof memo.d);
    return;
  }
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s = std::fma(a.v[i][k], b.v[k][j], s);
      out[i][j] = s;
    }
  std::memcpy(memo.a, a.v, sizeof memo.a);
  std::memcpy(memo.b, b.v, sizeof memo.b);
  std::memcpy(memo.c, c.v, sizeof memo.c);
  std::memcpy(memo.d, out, sizeof memo.d);
  memo.valid = true;
  std::memcpy(d.v, out, sizeof out);
}

__attribute__((noinline)) inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t l) {
  emu_wmma_check(p, ld, sizeof(float));
  ::emu::ins::collective(true, __builtin_return_address(0));  // ins
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[l == mem_row_major ? r * ld + c : c * ld + r] = f.v[r][c];
  ::emu::ins::collective(false);
}

}  // namespace wmma
}  // namespace nvcuda
