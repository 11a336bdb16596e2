// Integer-dot GEMM/GEMV for tierlm's quantised weights (see qgemm.cpp) and the shared helpers of the native
// layer step (layer.cpp). Plain pointers in, no torch types: the Python-facing glue is in bindings.cpp.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace tierlm {

enum Isa : int { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

// One quantised matrix [N, K] (torch Linear layout). kind 4: q = uint8 [N, K/2], GGUF Q4 nibble order (byte t of
// a 32-column group holds column t in its low nibble, t + 16 in its high one), w = q * d + m with d, m fp16
// [N, K/32]. kind 8: q = int8 [N, K], w = q * d with d fp16 [N, K/32] (Q8_0) or dch fp32 [N] (per channel).
struct QMat {
  int kind = 4;
  int64_t n = 0, k = 0;
  const uint8_t* q = nullptr;
  const uint16_t* d = nullptr;
  const uint16_t* m = nullptr;
  const float* dch = nullptr;
};

// Activations quantised per 32-column block to int8 (llama.cpp's Q8_0/Q8_1 for its int-dot kernels):
// x ~ q * dx; sx = dx * sum(q) (the int4 min term); dxe: dx spread over the 16 int32 lanes of one 512-bit
// chunk (int4 layout: 4 groups x 4 lanes per 128 columns; int8 layout: 2 groups x 8 lanes per 64 columns).
// int4 layout: within each whole 128-column chunk, the low halves (columns 0-15) of its 4 groups come first,
// then their high halves, to meet the nibbles as they unpack; columns past the last whole chunk keep their order.
struct QAct {
  int layout = 4;  // the weight kind it is laid out for
  int64_t m = 0, k = 0;
  int8_t* q = nullptr;   // [M, K]
  float* dx = nullptr;   // [M, K/32]
  float* sx = nullptr;   // [M, K/32]
  float* dxe = nullptr;  // [M, K/4]
};

int best_isa();
int current_isa();
void set_isa(int isa);  // tests: pin a lower path (clamped to what the CPU has)
const char* isa_name(int isa);

// x fp32 [M, K] (row stride ldx) -> a (buffers sized by the caller: q M*K, dx/sx M*K/32, dxe M*K/4).
void quantize_act(const float* x, int64_t ldx, QAct& a);
// y [M, N] (row stride ldy) = a @ W^T (+ bias); row (m, n) is computed the same whatever M or the threads.
void qgemm(const QMat& w, const QAct& a, float* y, int64_t ldy, const float* bias);
// The exact path: fp32 activations, weights dequantised per row in fp32 (W4A32 / W8A32).
void fgemm(const QMat& w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy, const float* bias);

inline float h2f(uint16_t h) {
  uint32_t s = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, f;
  if (e == 0) {
    if (m == 0) {
      f = s;
    } else {  // subnormal: normalise
      int sh = 0;
      while (!(m & 0x400u)) { m <<= 1; ++sh; }
      f = s | (uint32_t(113 - sh) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (e == 31) {
    f = s | 0x7f800000u | (m << 13);
  } else {
    f = s | ((e + 112) << 23) | (m << 13);
  }
  float r;
  std::memcpy(&r, &f, 4);
  return r;
}

inline float bf2f(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

inline uint16_t f2bf(float f) {  // round to nearest even, as torch's float -> bfloat16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// fixed_dot of C vectors a[0..C-1] with one b, interleaved so the FMA chains overlap: each result is 16 running
// partials (lane l takes elements l, l + 16, ...) then a fixed tree, so its bits are the same for any C and
// whatever else is computed (row-invariant), and the compiler vectorises the lanes (the pragmas make GCC do it).
template <int C>
inline void fixed_dots(const float* const* a, const float* b, int64_t n, float* out) {
  float p[C][16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const float* bi = b + i;
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const float* ai = a[c] + i;
      float* pc = p[c];
#pragma GCC ivdep
      for (int l = 0; l < 16; ++l) pc[l] = std::fma(ai[l], bi[l], pc[l]);
    }
  }
  for (int c = 0; c < C; ++c) {
    for (int64_t j = i, l = 0; j < n; ++j, ++l) p[c][l] = std::fma(a[c][j], b[j], p[c][l]);
    for (int w = 8; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) p[c][l] += p[c][l + w];
    out[c] = p[c][0];
  }
}

inline float fixed_dot(const float* a, const float* b, int64_t n) {
  float r;
  fixed_dots<1>(&a, b, n, &r);
  return r;
}

}  // namespace tierlm
