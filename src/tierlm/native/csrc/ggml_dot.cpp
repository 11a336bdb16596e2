// y = x @ W^T for W in GGUF's own blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL,
// IQ4_XS), as llama.cpp computes
// it: the activations are quantised per row to 8 bits, the products of a block are summed as exact integers,
// and the block's scales are folded in with one float multiply-add.
//
// Numerics (what a test can hold the kernels to):
//  - activations: Q8_0 blocks (32 columns) for the 32-value types, Q8_K blocks (256 columns) for the K-quants;
//    d = amax / 127 (fp32), q = nearbyint(x * (127 / amax)) clamped to [-127, 127] (an all-zero block: d = 0,
//    q = 0). Per block the sum of q (Q8_0) or of each 16 q (Q8_K's bsums) is kept as an int32. (llama.cpp
//    differs in the last bits: its Q8_0 activation scale is fp16 and its Q8_K scale is -127 / the signed
//    extreme; the integer parts are the same kind of numbers.)
//  - weights: read from their bytes exactly as ggml dequantises them (w = d * q + m, or d * sc * q - dmin * m
//    for K-quants); Q4_0 / Q5_0 decode to signed values (q - 8, q - 16), Q6_K's -32 and the K-quants' and
//    Q4_1 / Q5_1's mins go through the activation sums.
//  - a row's result is sum over blocks of (its integer dot with the block's sub-block scales) * d_w * d_x plus
//    the min/offset term, accumulated in fp32 in a fixed order: lane-wise over the row's blocks (8 lanes), then
//    a fixed horizontal sum, then the min terms. Exact = the dequantised weights times the dequantised
//    activations, up to fp32 rounding of the sum (the integer parts are exact; a Q6_K lane's integer sum can
//    pass 2^24 before its one conversion to fp32).
//  - row-invariant: output (m, n) is one sequence of operations whatever M is, however the rows are tiled and
//    whichever thread runs it; the ISA (avx512-vnni: 256-bit vpdpbusd; avx2: vpmaddubsw; scalar) is chosen once
//    per process (qgemm.cpp's current_isa, which tests pin with set_isa). The ISAs agree on every integer; the
//    float sums differ only in order.
#include "ggml_dot.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "qgemm.h"

namespace tierlm {

#define GTGT2 __attribute__((target("avx2,fma,f16c")))
#define GTGT512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni,avx2,fma,f16c")))

namespace {

struct Info {
  int qk, bytes;
  bool k_act;  // activations as Q8_K (256 columns) rather than Q8_0
};

constexpr Info info(int t) {
  switch (t) {
    case G_Q4_0: return {32, 18, false};
    case G_Q4_1: return {32, 20, false};
    case G_Q5_0: return {32, 22, false};
    case G_Q5_1: return {32, 24, false};
    case G_Q8_0: return {32, 34, false};
    case G_Q2_K: return {256, 84, true};
    case G_Q3_K: return {256, 110, true};
    case G_Q4_K: return {256, 144, true};
    case G_Q5_K: return {256, 176, true};
    case G_Q6_K: return {256, 210, true};
    case G_IQ4_NL: return {32, 18, false};
    case G_IQ4_XS: return {256, 136, true};
    default: return {0, 0, false};
  }
}

// Activations of M rows quantised for one block size: q [M, K], d [M, K/qk], s [M, K/16 or K/32] sums.
struct Act {
  int64_t k = 0;
  bool kq = false;  // Q8_K (d per 256, s per 16) or Q8_0 (d and s per 32)
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s;
};

void quantize(const float* x, int64_t m, int64_t ldx, int64_t k, bool kq, Act& a) {
  const int64_t qk = kq ? 256 : 32, sg = kq ? 16 : 32;
  a.k = k, a.kq = kq;
  a.q.resize(size_t(m * k)), a.d.resize(size_t(m * (k / qk))), a.s.resize(size_t(m * (k / sg)));
  at::parallel_for(0, m, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t r = m0; r < m1; ++r) {
      const float* xr = x + r * ldx;
      for (int64_t b = 0; b < k / qk; ++b) {
        float amax = 0.f;
        for (int64_t t = 0; t < qk; ++t) amax = std::max(amax, std::fabs(xr[b * qk + t]));
        const float id = amax > 0.f ? 127.f / amax : 0.f;
        a.d[r * (k / qk) + b] = amax / 127.f;
        for (int64_t t = 0; t < qk; ++t) {
          const int v = std::min(127, std::max(-127, int(std::nearbyint(xr[b * qk + t] * id))));
          a.q[r * k + b * qk + t] = int8_t(v);
        }
      }
      for (int64_t g = 0; g < k / sg; ++g) {
        int32_t sum = 0;
        for (int64_t t = 0; t < sg; ++t) sum += a.q[r * k + g * sg + t];
        a.s[r * (k / sg) + g] = sum;
      }
    }
  });
}

// fp16 -> fp32: F16C where the build has it (-march=native on any AVX2 CPU), else qgemm.h's portable h2f.
inline float half(const uint8_t* p) {
  const uint16_t h = uint16_t(p[0] | p[1] << 8);
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  return h2f(h);
#endif
}

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& mn) {
  if (j < 4) {
    sc = q[j] & 63, mn = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// What a block contributes beside its 32-value chunks: F * dx * (sum over chunks of the scaled integer dots)
// + G * dx * S, S an integer from the activation sums. sc: int scale per 16 values (1 for the 32-value types).
struct Block {
  float f, g;
  int sc[16];
  int mn[16];  // Q4_K/Q5_K: mins per 32 values; Q2_K: per 16
};

// IQ4_NL / IQ4_XS: the 16 values a nibble indexes (ggml's kvalues_iq4nl).
constexpr int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

template <int T>
inline void block_info(const uint8_t* b, Block& o) {
  if constexpr (T == G_Q2_K) {  // scales [16] (scale | min << 4), qs [64], d, dmin
    o.f = half(b + 80), o.g = -half(b + 82);
    for (int j = 0; j < 16; ++j) o.sc[j] = b[j] & 15, o.mn[j] = b[j] >> 4;
  } else if constexpr (T == G_Q3_K) {  // hmask [32], qs [64], 12 bytes of 6-bit scales (- 32), d
    o.f = half(b + 108), o.g = 0.f;
    const uint8_t* sc = b + 96;
    for (int j = 0; j < 16; ++j) {
      const int lo = j < 8 ? sc[j] & 15 : sc[j - 8] >> 4;
      const int hi = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
      o.sc[j] = (lo | hi << 4) - 32;
    }
  } else if constexpr (T == G_IQ4_XS) {  // d, scales_h (2 bits per sub-block), scales_l (4 bits), qs: scale - 32
    o.f = half(b), o.g = 0.f;
    const int hi = b[2] | b[3] << 8;
    for (int j = 0; j < 8; ++j)
      o.sc[2 * j] = o.sc[2 * j + 1] = (((b[4 + j / 2] >> (4 * (j % 2))) & 15) | (((hi >> (2 * j)) & 3) << 4)) - 32;
  } else if constexpr (T == G_IQ4_NL) {
    o.f = half(b), o.g = 0.f;
    o.sc[0] = o.sc[1] = 1;
  } else if constexpr (T == G_Q4_K || T == G_Q5_K) {
    o.f = half(b), o.g = -half(b + 2);
    for (int j = 0; j < 8; ++j) {
      int sc, mn;
      scale_min_k4(j, b + 4, sc, mn);
      o.sc[2 * j] = o.sc[2 * j + 1] = sc, o.mn[j] = mn;
    }
  } else if constexpr (T == G_Q6_K) {
    o.f = half(b + 208);
    o.g = -32.f * o.f;
    for (int j = 0; j < 16; ++j) o.sc[j] = int8_t(b[192 + j]);
  } else {
    o.f = half(b);
    o.g = T == G_Q4_1 || T == G_Q5_1 ? half(b + 2) : 0.f;  // Q4_0/Q5_0: the offset is in the signed values
    o.sc[0] = o.sc[1] = 1;
  }
}

// The side term's integer S of a block for one activation row (s: that block's activation sums).
template <int T>
inline int side_sum(const Block& o, const int32_t* s) {
  if constexpr (T == G_Q2_K) {
    int r = 0;
    for (int j = 0; j < 16; ++j) r += o.mn[j] * s[j];
    return r;
  } else if constexpr (T == G_Q4_K || T == G_Q5_K) {
    int r = 0;
    for (int j = 0; j < 8; ++j) r += o.mn[j] * (s[2 * j] + s[2 * j + 1]);
    return r;
  } else if constexpr (T == G_Q6_K) {
    int r = 0;
    for (int j = 0; j < 16; ++j) r += o.sc[j] * s[j];
    return r;
  } else {
    return T == G_Q4_1 || T == G_Q5_1 ? s[0] : 0;
  }
}

// Types whose values decode signed (int8): Q8_0's own, Q4_0 / Q5_0 / Q3_K with their offset (-8, -16, -4)
// applied, IQ4's.
template <int T>
constexpr bool is_signed() {
  return T == G_Q8_0 || T == G_Q4_0 || T == G_Q5_0 || T == G_Q3_K || T == G_IQ4_NL || T == G_IQ4_XS;
}

// Chunk c (32 values) of a block as bytes: unsigned 0..63, or signed (is_signed), value t of the chunk in byte t.
template <int T>
inline void decode_scalar(const uint8_t* b, int c, uint8_t* u) {
  if constexpr (T == G_Q4_0 || T == G_Q4_1 || T == G_Q5_0 || T == G_Q5_1) {
    const int off = T == G_Q4_0 ? 2 : T == G_Q4_1 ? 4 : T == G_Q5_0 ? 6 : 8;
    uint32_t qh = 0;
    if constexpr (T == G_Q5_0 || T == G_Q5_1) std::memcpy(&qh, b + off - 4, 4);
    const int bias = T == G_Q4_0 ? 8 : T == G_Q5_0 ? 16 : 0;  // signed values: the offset applied here
    for (int t = 0; t < 16; ++t) {
      u[t] = uint8_t(((b[off + t] & 15) | (((qh >> t) & 1) << 4)) - bias);
      u[t + 16] = uint8_t(((b[off + t] >> 4) | (((qh >> (t + 16)) & 1) << 4)) - bias);
    }
  } else if constexpr (T == G_Q8_0) {
    std::memcpy(u, b + 2, 32);
  } else if constexpr (T == G_Q2_K || T == G_Q3_K) {  // 2 bits at 2 * (c % 4) of qs[32 * (c / 4) + t]
    const uint8_t* qs = b + (T == G_Q2_K ? 16 : 32) + 32 * (c / 4);
    for (int t = 0; t < 32; ++t) {
      int v = (qs[t] >> (2 * (c % 4))) & 3;
      if constexpr (T == G_Q3_K) v = (v | (((b[t] >> c) & 1) << 2)) - 4;  // hmask bit c set: no -4
      u[t] = uint8_t(v);
    }
  } else if constexpr (T == G_IQ4_NL || T == G_IQ4_XS) {
    const uint8_t* qs = T == G_IQ4_NL ? b + 2 : b + 8 + 16 * c;
    for (int t = 0; t < 16; ++t) u[t] = uint8_t(IQ4_VALUES[qs[t] & 15]), u[t + 16] = uint8_t(IQ4_VALUES[qs[t] >> 4]);
  } else if constexpr (T == G_Q4_K || T == G_Q5_K) {
    const uint8_t* qs = b + (T == G_Q4_K ? 16 : 48) + 32 * (c / 2);
    for (int t = 0; t < 32; ++t) {
      int v = c % 2 ? qs[t] >> 4 : qs[t] & 15;
      if constexpr (T == G_Q5_K) v |= ((b[16 + t] >> c) & 1) << 4;
      u[t] = uint8_t(v);
    }
  } else {  // Q6_K: ql [128], qh [64], scales [16], d
    const int h = c / 4, j = c % 4;
    const uint8_t* ql = b + 64 * h + (j & 1) * 32;
    const uint8_t* qh = b + 128 + 32 * h;
    for (int t = 0; t < 32; ++t) u[t] = uint8_t(((j < 2 ? ql[t] & 15 : ql[t] >> 4)) | (((qh[t] >> (2 * j)) & 3) << 4));
  }
}

template <int T, int MT>
void rows_scalar(const uint8_t* row, const Act& a, int64_t m0, float* out) {
  constexpr Info in = info(T);
  const int64_t nb = a.k / in.qk, sg = a.kq ? 16 : 32;
  float acc[MT] = {}, side[MT] = {};
  Block o;
  uint8_t u[32];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * in.bytes;
    block_info<T>(blk, o);
    int isum[MT] = {};
    for (int c = 0; c < in.qk / 32; ++c) {
      decode_scalar<T>(blk, c, u);
      for (int i = 0; i < MT; ++i) {
        const int8_t* x = a.q.data() + (m0 + i) * a.k + b * in.qk + 32 * c;
        int lo = 0, hi = 0;
        for (int t = 0; t < 16; ++t) {
          lo += (is_signed<T>() ? int(int8_t(u[t])) : int(u[t])) * x[t];
          hi += (is_signed<T>() ? int(int8_t(u[t + 16])) : int(u[t + 16])) * x[t + 16];
        }
        isum[i] += o.sc[(2 * c) % 16] * lo + o.sc[(2 * c + 1) % 16] * hi;
      }
    }
    for (int i = 0; i < MT; ++i) {
      const float dx = a.d[(m0 + i) * nb + b];
      acc[i] = std::fma(float(isum[i]), o.f * dx, acc[i]);
      side[i] = std::fma(o.g * dx, float(side_sum<T>(o, a.s.data() + (m0 + i) * (a.k / sg) + b * (in.qk / sg))), side[i]);
    }
  }
  for (int i = 0; i < MT; ++i) out[i] = acc[i] + side[i];
}

// ---- AVX2 / AVX-512 VNNI -----------------------------------------------------------------------------------
template <int T>
GTGT2 inline __m256i decode_avx(const uint8_t* b, int c) {
  const __m256i m4 = _mm256_set1_epi8(15);
  if constexpr (T == G_Q4_0 || T == G_Q4_1 || T == G_Q5_0 || T == G_Q5_1) {
    const int off = T == G_Q4_0 ? 2 : T == G_Q4_1 ? 4 : T == G_Q5_0 ? 6 : 8;
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + off));
    __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
    if constexpr (T == G_Q5_0 || T == G_Q5_1) {  // bit t of qh -> bit 4 of value t
      uint32_t qh;
      std::memcpy(&qh, b + off - 4, 4);
      const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
      const __m256i bits = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));
      __m256i h = _mm256_shuffle_epi8(_mm256_set1_epi32(int(qh)), shuf);
      h = _mm256_cmpeq_epi8(_mm256_and_si256(h, bits), bits);
      v = _mm256_or_si256(v, _mm256_and_si256(h, _mm256_set1_epi8(16)));
    }
    if constexpr (T == G_Q4_0 || T == G_Q5_0) v = _mm256_sub_epi8(v, _mm256_set1_epi8(T == G_Q4_0 ? 8 : 16));
    return v;
  } else if constexpr (T == G_Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  } else if constexpr (T == G_Q2_K || T == G_Q3_K) {
    const __m128i sh = _mm_cvtsi32_si128(2 * (c % 4));
    const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (T == G_Q2_K ? 16 : 32) + 32 * (c / 4)));
    __m256i v = _mm256_and_si256(_mm256_srl_epi16(qs, sh), _mm256_set1_epi8(3));
    if constexpr (T == G_Q3_K) {
      const __m256i hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
      const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(c)), _mm256_set1_epi8(1));
      v = _mm256_sub_epi8(_mm256_or_si256(v, _mm256_slli_epi16(bit, 2)), _mm256_set1_epi8(4));
    }
    return v;
  } else if constexpr (T == G_IQ4_NL || T == G_IQ4_XS) {  // nibbles index the 16 values (one pshufb)
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(T == G_IQ4_NL ? b + 2 : b + 8 + 16 * c));
    const __m128i tab = _mm_loadu_si128(reinterpret_cast<const __m128i*>(IQ4_VALUES));
    const __m256i idx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
    return _mm256_shuffle_epi8(_mm256_set_m128i(tab, tab), idx);
  } else if constexpr (T == G_Q4_K || T == G_Q5_K) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (T == G_Q4_K ? 16 : 48) + 32 * (c / 2)));
    __m256i v = _mm256_and_si256(c % 2 ? _mm256_srli_epi16(raw, 4) : raw, m4);
    if constexpr (T == G_Q5_K) {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
      const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(c)), _mm256_set1_epi8(1));
      v = _mm256_or_si256(v, _mm256_slli_epi16(bit, 4));
    }
    return v;
  } else {
    const int h = c / 4, j = c % 4;
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + (j & 1) * 32));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
    const __m256i lo = _mm256_and_si256(j < 2 ? ql : _mm256_srli_epi16(ql, 4), m4);
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j)), _mm256_set1_epi8(3));
    return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
  }
}

GTGT2 inline float hsum_f(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 int32 lanes whose sum is sc_lo * dot(values 0-15) + sc_hi * dot(values 16-31).
template <bool SIGNED, bool SCALED>
GTGT512 inline __m256i dot_chunk512(__m256i w, __m256i wa, __m256i x, int sc_lo, int sc_hi) {
  if constexpr (SIGNED) x = _mm256_sign_epi8(x, w);  // wa = |w|: unsigned times signed, the signs moved to x
  __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wa, x);
  if constexpr (SCALED) p = _mm256_mullo_epi32(p, _mm256_set_m128i(_mm_set1_epi32(sc_hi), _mm_set1_epi32(sc_lo)));
  return p;
}
template <bool SIGNED, bool SCALED>
GTGT2 inline __m256i dot_chunk2(__m256i w, __m256i wa, __m256i x, int sc_lo, int sc_hi) {
  if constexpr (SIGNED) x = _mm256_sign_epi8(x, w);
  const __m256i p = _mm256_maddubs_epi16(wa, x);  // pairs: at most 2 * 128 * 127, no saturation
  const __m256i s = SCALED ? _mm256_set_m128i(_mm_set1_epi16(short(sc_hi)), _mm_set1_epi16(short(sc_lo)))
                           : _mm256_set1_epi16(1);
  return _mm256_madd_epi16(p, s);
}

#define ROWS_AVX(NAME, TGT, DOT)                                                                          \
  template <int T, int MT>                                                                                \
  TGT void NAME(const uint8_t* row, const Act& a, int64_t m0, float* out) {                              \
  constexpr bool SIGNED = is_signed<T>(), SCALED = info(T).qk == 256;                  \
  constexpr Info in = info(T);                                                                                     \
  const int64_t nb = a.k / in.qk, sg = a.kq ? 16 : 32;                                                         \
  __m256 acc[MT];                                                                                              \
  float side[MT] = {};                                                                                         \
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();                                                   \
  Block o;                                                                                                     \
  for (int64_t b = 0; b < nb; ++b) {                                                                           \
    const uint8_t* blk = row + b * in.bytes;                                                                   \
    _mm_prefetch(reinterpret_cast<const char*>(blk) + 1024, _MM_HINT_T0); /* ahead of the streamer: +10% */ \
    block_info<T>(blk, o);                                                                                     \
    __m256i isum[MT];                                                                                          \
    for (int i = 0; i < MT; ++i) isum[i] = _mm256_setzero_si256();                                             \
    for (int c = 0; c < in.qk / 32; ++c) {                                                                     \
      const __m256i w = decode_avx<T>(blk, c), wa = SIGNED ? _mm256_abs_epi8(w) : w;                          \
      const int lo = o.sc[(2 * c) % 16], hi = o.sc[(2 * c + 1) % 16];                                          \
      for (int i = 0; i < MT; ++i) {                                                                           \
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + (m0 + i) * a.k + b * in.qk + 32 * c)); \
        const __m256i p = DOT<SIGNED, SCALED>(w, wa, x, lo, hi);                                               \
        isum[i] = _mm256_add_epi32(isum[i], p);                                                                \
      }                                                                                                        \
    }                                                                                                          \
    for (int i = 0; i < MT; ++i) {                                                                             \
      const float dx = a.d[(m0 + i) * nb + b];                                                                 \
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_set1_ps(o.f * dx), acc[i]);                 \
      if constexpr (T == G_Q4_1 || T == G_Q5_1 || T == G_Q2_K || T == G_Q4_K || T == G_Q5_K || T == G_Q6_K)  \
        side[i] = std::fma(o.g * dx, float(side_sum<T>(o, a.s.data() + (m0 + i) * (a.k / sg) + b * (in.qk / sg))), side[i]); \
    }                                                                                                          \
  }                                                                                                            \
  for (int i = 0; i < MT; ++i) out[i] = hsum_f(acc[i]) + side[i];                                              \
}

// AVX2 and AVX-512 VNNI: one body, each compiled for its own target (an intrinsic cannot inline across targets).
ROWS_AVX(rows_avx2, GTGT2, dot_chunk2)
ROWS_AVX(rows_vnni, GTGT512, dot_chunk512)
#undef ROWS_AVX

constexpr int MT = 4;  // activation rows per decoded weight chunk
constexpr int64_t NB = 16;  // weight rows per thread task

template <int T>
void gemm_t(const GMat& w, const Act& a, int64_t m, float* y, int64_t ldy, const float* bias) {
  const int isa = current_isa();
  const int64_t rb = ggml_row_bytes(T, w.k);
  at::parallel_for(0, (w.n + NB - 1) / NB, 1, [&](int64_t b0, int64_t b1) {
    float out[MT];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * NB, n1 = std::min(w.n, n0 + NB);
      for (int64_t m0 = 0; m0 < m; m0 += MT) {
        const int mt = int(std::min<int64_t>(MT, m - m0));
        for (int64_t n = n0; n < n1; ++n) {
          const uint8_t* row = w.q + n * rb;
#define GROWS(fn)                                  \
  switch (mt) {                                    \
    case 4: fn<T, 4>(row, a, m0, out); break;      \
    case 3: fn<T, 3>(row, a, m0, out); break;      \
    case 2: fn<T, 2>(row, a, m0, out); break;      \
    default: fn<T, 1>(row, a, m0, out); break;     \
  }
          if (isa == ISA_AVX512) { GROWS(rows_vnni) }
          else if (isa == ISA_AVX2) { GROWS(rows_avx2) }
          else { GROWS(rows_scalar) }
#undef GROWS
          for (int i = 0; i < mt; ++i) y[(m0 + i) * ldy + n] = out[i] + (bias ? bias[n] : 0.f);
        }
      }
    }
  });
}

}  // namespace

bool ggml_supported(int type) { return info(type).qk != 0; }

int64_t ggml_row_bytes(int type, int64_t k) {
  const Info in = info(type);
  return in.qk == 0 || k % in.qk ? 0 : k / in.qk * in.bytes;
}

void ggml_gemm(const GMat& w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy, const float* bias) {
  Act a;
  quantize(x, m, ldx, w.k, info(w.type).k_act, a);
  switch (w.type) {
    case G_Q4_0: return gemm_t<G_Q4_0>(w, a, m, y, ldy, bias);
    case G_Q4_1: return gemm_t<G_Q4_1>(w, a, m, y, ldy, bias);
    case G_Q5_0: return gemm_t<G_Q5_0>(w, a, m, y, ldy, bias);
    case G_Q5_1: return gemm_t<G_Q5_1>(w, a, m, y, ldy, bias);
    case G_Q8_0: return gemm_t<G_Q8_0>(w, a, m, y, ldy, bias);
    case G_Q2_K: return gemm_t<G_Q2_K>(w, a, m, y, ldy, bias);
    case G_Q3_K: return gemm_t<G_Q3_K>(w, a, m, y, ldy, bias);
    case G_Q4_K: return gemm_t<G_Q4_K>(w, a, m, y, ldy, bias);
    case G_Q5_K: return gemm_t<G_Q5_K>(w, a, m, y, ldy, bias);
    case G_Q6_K: return gemm_t<G_Q6_K>(w, a, m, y, ldy, bias);
    case G_IQ4_NL: return gemm_t<G_IQ4_NL>(w, a, m, y, ldy, bias);
    case G_IQ4_XS: return gemm_t<G_IQ4_XS>(w, a, m, y, ldy, bias);
    default: return;
  }
}

}  // namespace tierlm
