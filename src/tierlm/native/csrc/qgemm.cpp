// Integer-dot GEMM/GEMV for int4 (GGUF Q4_0/Q4_1 blocks: w = q * d + m, q in 0..15) and int8 (Q8_0, or one
// scale per row) weights against activations quantised per 32 columns to int8, as llama.cpp computes them:
// the products and their sums within a 32-column block are exact integers (AVX-512 VNNI `vpdpbusd`, AVX2
// `vpmaddubsw`, or plain C++), one float multiply-add per block folds in the two scales.
//
// Why our own: torch's CPU int4 kernel dequantises to float and FMAs (compute-bound at ~12 Gparam/s here);
// torchao's CPU paths and _dyn_quant_matmul_4bit target AMX / ARM (see the closing note).
//
// Row invariance (exactness needs it: a token must get the same bits decoded alone, in a batch, or prefilled in
// a chunk): output (m, n) is one sequence of operations over K whatever M is, however rows are tiled and
// whichever thread runs it. The ISA is chosen once per process (set_isa pins it for tests). Scalar sums are
// explicit std::fma: the compiler vectorises a tile's rows as it likes, and contracting a*b+c in one lane and
// not another changed the last bit of one row in four.
#include "qgemm.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace tierlm {

#define TGT512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define TGT2 __attribute__((target("avx2,fma,f16c")))

int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni"))
    return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return ISA_AVX2;
  return ISA_SCALAR;
}

static int g_isa = -1;  // chosen once; set_isa lowers it (tests)
int current_isa() {
  if (g_isa < 0) g_isa = best_isa();
  return g_isa;
}
void set_isa(int isa) { g_isa = std::min(std::max(isa, 0), best_isa()); }
const char* isa_name(int isa) { return isa == ISA_AVX512 ? "avx512-vnni" : isa == ISA_AVX2 ? "avx2" : "scalar"; }

// ---- activations -------------------------------------------------------------------------------------------
static inline int64_t q4_pos(int64_t col, int64_t full) {  // where column `col` goes in the int4 layout
  int64_t c = col / 128;
  if (c >= full) return col;
  int64_t r = col % 128, j = r / 32, t = r % 32;
  return c * 128 + (t < 16 ? 16 * j + t : 64 + 16 * j + t - 16);
}

void quantize_act(const float* x, int64_t ldx, QAct& a) {
  const int64_t K = a.k, G = K / 32, full4 = K / 128;
  at::parallel_for(0, a.m, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * ldx;
      int8_t* q = a.q + m * K;
      for (int64_t g = 0; g < G; ++g) {
        float amax = 0.f;
        for (int t = 0; t < 32; ++t) amax = std::max(amax, std::fabs(xr[32 * g + t]));
        const float d = amax / 127.f, id = d > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int t = 0; t < 32; ++t) {
          int v = int(std::nearbyint(xr[32 * g + t] * id));
          v = std::min(127, std::max(-127, v));
          sum += v;
          const int64_t col = 32 * g + t;
          q[a.layout == 4 ? q4_pos(col, full4) : col] = int8_t(v);
        }
        a.dx[m * G + g] = d;
        a.sx[m * G + g] = d * float(sum);
      }
      float* e = a.dxe + m * (K / 4);  // 16 lanes per chunk: int4 4 groups x 4, int8 2 groups x 8
      const int per = a.layout == 4 ? 4 : 2, chunks = int(a.layout == 4 ? full4 : K / 64);
      for (int c = 0; c < chunks; ++c)
        for (int l = 0; l < 16; ++l) e[16 * c + l] = a.dx[m * G + c * per + l / (16 / per)];
    }
  });
}

// ---- per-row kernels: out[i] = row n of W . row (m0 + i) of a, for i < MT ---------------------------------
static inline float wscale(const QMat& w, int64_t n, int64_t g) { return w.d ? h2f(w.d[n * (w.k / 32) + g]) : w.dch[n]; }

template <int MT>
static void row_scalar(const QMat& w, int64_t n, const QAct& a, int64_t m0, float* out) {
  const int64_t K = w.k, G = K / 32, full4 = K / 128;
  for (int i = 0; i < MT; ++i) {
    const int8_t* x = a.q + (m0 + i) * K;
    const float* dx = a.dx + (m0 + i) * G;
    float acc = 0.f, mins = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      int isum = 0;
      if (w.kind == 4) {
        const uint8_t* b = w.q + n * (K / 2) + 16 * g;
        for (int t = 0; t < 16; ++t) {
          isum += int(b[t] & 15) * x[q4_pos(32 * g + t, full4)];
          isum += int(b[t] >> 4) * x[q4_pos(32 * g + 16 + t, full4)];
        }
        mins = std::fma(h2f(w.m[n * G + g]), a.sx[(m0 + i) * G + g], mins);
      } else {
        const int8_t* b = reinterpret_cast<const int8_t*>(w.q) + n * K + 32 * g;
        for (int t = 0; t < 32; ++t) isum += int(b[t]) * x[32 * g + t];
      }
      acc = std::fma(float(isum), wscale(w, n, g) * dx[g], acc);
    }
    out[i] = acc + mins;
  }
}

TGT2 static inline int hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

TGT2 static inline float hsum8f(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// one 32-column group as 32 bytes [q of columns 0-15 | 16-31] (int4) or its 32 int8 values and the matching
// activations: the exact integer dot product (AVX2)
TGT2 static inline __m256i q4_group(const uint8_t* b) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), m4 = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_and_si128(raw, m4));
}
TGT2 static inline __m256i act_group(const int8_t* x, int64_t g, int64_t full4, int layout) {
  if (layout == 4 && g / 4 < full4) {
    const int8_t* base = x + (g / 4) * 128 + 16 * (g % 4);
    return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(base + 64), reinterpret_cast<const __m128i*>(base));
  }
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * g));
}
TGT2 static inline int dot_group_avx2(const QMat& w, int64_t n, int64_t g, __m256i xv) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (w.kind == 4) return hsum8(_mm256_madd_epi16(_mm256_maddubs_epi16(q4_group(w.q + n * (w.k / 2) + 16 * g), xv), ones));
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q + n * w.k + 32 * g));
  return hsum8(_mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)), ones));
}

template <int MT>
TGT2 static void row_avx2(const QMat& w, int64_t n, const QAct& a, int64_t m0, float* out) {
  const int64_t K = w.k, G = K / 32, full4 = K / 128;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MT];
  float mins[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps(), mins[i] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    __m256i wv, aw;
    if (w.kind == 4) {
      wv = q4_group(w.q + n * (K / 2) + 16 * g);
    } else {
      wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q + n * K + 32 * g));
      aw = _mm256_abs_epi8(wv);
    }
    const float ws = wscale(w, n, g), wm = w.kind == 4 ? h2f(w.m[n * G + g]) : 0.f;
    for (int i = 0; i < MT; ++i) {
      const int64_t m = m0 + i;
      const __m256i xv = act_group(a.q + m * K, g, full4, a.layout);
      const __m256i p = w.kind == 4 ? _mm256_maddubs_epi16(wv, xv) : _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_set1_ps(ws * a.dx[m * G + g]), acc[i]);
      mins[i] = std::fma(wm, a.sx[m * G + g], mins[i]);
    }
  }
  for (int i = 0; i < MT; ++i) out[i] = hsum8f(acc[i]) + mins[i];
}

// AVX-512: NR weight rows x MT activation rows per visit. A chunk (128 columns int4 = 4 groups, 64 int8 = 2) of
// each weight row is unpacked once and serves every activation row; each activation chunk is loaded once and
// serves every weight row. Every (row, column) pair runs the same intrinsics in the same order whatever NR and
// MT are (so tiles change speed, not bits). Template flags, not run-time branches, pick int4 / int8 and
// per-group / per-row scales: the inner loop has no branches.
template <bool Q4, bool PERCH, int NR, int MT>
TGT512 static void tile_avx512(const QMat& w, int64_t n0, const QAct& a, int64_t m0, float (*out)[4]) {
  const int64_t K = w.k, G = K / 32, width = Q4 ? 128 : 64, chunks = K / width, per = Q4 ? 4 : 2;
  const int64_t wrow = Q4 ? K / 2 : K;
  const __m512i zero = _mm512_setzero_si512(), m4 = _mm512_set1_epi8(15);
  const __m512i spread = Q4 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                            : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i lo[NR], hi[NR];
    __mmask64 neg[NR];
    __m512 dv[NR];
    for (int r = 0; r < NR; ++r) {
      const __m512i wb = _mm512_loadu_si512(w.q + (n0 + r) * wrow + c * 64);
      if constexpr (Q4) {
        lo[r] = _mm512_and_si512(wb, m4);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(wb, 4), m4);
      } else {
        lo[r] = _mm512_abs_epi8(wb);
        neg[r] = _mm512_movepi8_mask(wb);
      }
      if constexpr (PERCH) {
        dv[r] = _mm512_set1_ps(w.dch[n0 + r]);
      } else {
        const uint16_t* d = w.d + (n0 + r) * G + c * per;
        const __m128i raw = Q4 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(d))
                               : _mm_cvtsi32_si128(*reinterpret_cast<const int*>(d));
        dv[r] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(raw)));
      }
    }
    for (int i = 0; i < MT; ++i) {
      const int8_t* x = a.q + (m0 + i) * K + c * width;
      const __m512i x0 = _mm512_loadu_si512(x);
      const __m512i x1 = Q4 ? _mm512_loadu_si512(x + 64) : zero;
      const __m512 e = _mm512_loadu_ps(a.dxe + (m0 + i) * (K / 4) + 16 * c);
      for (int r = 0; r < NR; ++r) {
        __m512i isum;
        if constexpr (Q4) isum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[r], x0), hi[r], x1);
        else isum = _mm512_dpbusd_epi32(zero, lo[r], _mm512_mask_sub_epi8(x0, neg[r], zero, x0));
        acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dv[r], e), acc[r][i]);
      }
    }
  }
  float tail[NR][MT] = {}, mins[NR][MT] = {};
  for (int64_t g = chunks * per; g < G; ++g)  // groups past the last whole chunk (exact integers, AVX2)
    for (int r = 0; r < NR; ++r) {
      const float ws = wscale(w, n0 + r, g);
      for (int i = 0; i < MT; ++i) {
        const int64_t m = m0 + i;
        const int isum = dot_group_avx2(w, n0 + r, g, act_group(a.q + m * K, g, K / 128, a.layout));
        tail[r][i] = std::fma(float(isum), ws * a.dx[m * G + g], tail[r][i]);
      }
    }
  if constexpr (Q4) {  // sum over groups of min * dx * sum(q): 16 groups at a time, then the rest
    __m512 macc[NR][MT];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i) macc[r][i] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16)
      for (int r = 0; r < NR; ++r) {
        const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.m + (n0 + r) * G + g)));
        for (int i = 0; i < MT; ++i) macc[r][i] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(a.sx + (m0 + i) * G + g), macc[r][i]);
      }
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i) {
        mins[r][i] = _mm512_reduce_add_ps(macc[r][i]);
        for (int64_t q = g; q < G; ++q) mins[r][i] = std::fma(h2f(w.m[(n0 + r) * G + q]), a.sx[(m0 + i) * G + q], mins[r][i]);
      }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MT; ++i) out[r][i] = _mm512_reduce_add_ps(acc[r][i]) + tail[r][i] + mins[r][i];
}

// One block of weight rows [n0, n1) against every activation row, on AVX-512: with several activation rows, 4
// weight rows x 2 activation rows at a time (8 accumulators, 12 unpacked weight vectors); with one, a weight row
// at a time (4 interleaved rows streamed a 22016 x 4096 matrix from DRAM at 7.9 GB/s, one at 13.6).
template <bool Q4, bool PERCH>
static void block_avx512(const QMat& w, int64_t n0, int64_t n1, const QAct& a, float* y, int64_t ldy, const float* bias) {
  float out[4][4];
  const int64_t step = a.m == 1 ? 1 : 2;
  for (int64_t m0 = 0; m0 < a.m; m0 += step) {
    const bool two = m0 + 1 < a.m && step == 2;
    for (int64_t n = n0; n < n1;) {
      const int nr = a.m > 1 && n + 4 <= n1 ? 4 : 1;  // one row at a time streams better from DRAM (measured)
      if (nr == 4) two ? tile_avx512<Q4, PERCH, 4, 2>(w, n, a, m0, out) : tile_avx512<Q4, PERCH, 4, 1>(w, n, a, m0, out);
      else two ? tile_avx512<Q4, PERCH, 1, 2>(w, n, a, m0, out) : tile_avx512<Q4, PERCH, 1, 1>(w, n, a, m0, out);
      for (int r = 0; r < nr; ++r)
        for (int i = 0; i < (two ? 2 : 1); ++i) y[(m0 + i) * ldy + n + r] = out[r][i] + (bias ? bias[n + r] : 0.f);
      n += nr;
    }
  }
}

constexpr int MT = 4;  // activation rows per weight-row visit: a decoded weight chunk serves 4 rows
static void run_row(int isa, int mt, const QMat& w, int64_t n, const QAct& a, int64_t m0, float* out) {
#define TIER(fn)                                  \
  switch (mt) {                                   \
    case 4: return fn<4>(w, n, a, m0, out);       \
    case 3: return fn<3>(w, n, a, m0, out);       \
    case 2: return fn<2>(w, n, a, m0, out);       \
    default: return fn<1>(w, n, a, m0, out);      \
  }
  if (isa == ISA_AVX2) { TIER(row_avx2) }
  TIER(row_scalar)
#undef TIER
}

// Rows of W are visited in blocks of NB (kept in L1/L2 while every tile of MT activation rows passes them);
// threads take whole blocks. Which thread or tile computes (m, n) never changes its operations.
constexpr int64_t NB = 16;

void qgemm(const QMat& w, const QAct& a, float* y, int64_t ldy, const float* bias) {
  const int isa = current_isa();
  const int64_t blocks = (w.n + NB - 1) / NB;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    float out[MT];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, n1 = std::min(w.n, n0 + NB);
      if (isa == ISA_AVX512) {
        if (w.kind == 4) block_avx512<true, false>(w, n0, n1, a, y, ldy, bias);
        else if (w.dch) block_avx512<false, true>(w, n0, n1, a, y, ldy, bias);
        else block_avx512<false, false>(w, n0, n1, a, y, ldy, bias);
        continue;
      }
      for (int64_t m0 = 0; m0 < a.m; m0 += MT) {
        const int mt = int(std::min<int64_t>(MT, a.m - m0));
        for (int64_t n = n0; n < n1; ++n) {
          run_row(isa, mt, w, n, a, m0, out);
          for (int i = 0; i < mt; ++i) y[(m0 + i) * ldy + n] = out[i] + (bias ? bias[n] : 0.f);
        }
      }
    }
  });
}

// ---- the exact path ----------------------------------------------------------------------------------------
static void dequant_row(const QMat& w, int64_t n, float* out) {
  const int64_t K = w.k, G = K / 32;
  for (int64_t g = 0; g < G; ++g) {
    const float d = wscale(w, n, g);
    if (w.kind == 4) {
      const float mn = h2f(w.m[n * G + g]);
      const uint8_t* b = w.q + n * (K / 2) + 16 * g;
      for (int t = 0; t < 16; ++t) {
        out[32 * g + t] = float(b[t] & 15) * d + mn;
        out[32 * g + 16 + t] = float(b[t] >> 4) * d + mn;
      }
    } else {
      const int8_t* b = reinterpret_cast<const int8_t*>(w.q) + n * K + 32 * g;
      for (int t = 0; t < 32; ++t) out[32 * g + t] = float(b[t]) * d;
    }
  }
}

void fgemm(const QMat& w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy, const float* bias) {
  const int64_t blocks = (w.n + NB - 1) / NB;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> wf(size_t(NB * w.k));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, n1 = std::min(w.n, n0 + NB);
      for (int64_t n = n0; n < n1; ++n) dequant_row(w, n, wf.data() + (n - n0) * w.k);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t n = n0; n < n1; ++n)
          y[r * ldy + n] = fixed_dot(wf.data() + (n - n0) * w.k, x + r * ldx, w.k) + (bias ? bias[n] : 0.f);
    }
  });
}

}  // namespace tierlm
