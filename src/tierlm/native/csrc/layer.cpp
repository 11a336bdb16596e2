// One decoder layer in one call (the decode step's hot loop without Python), and the matmul entry point, bound
// to Python. It mirrors tierlm/model/llama.py op for op — RMSNorm, fused QKV, rotate-half rope, the K/V write
// into the paged pool, attention over the sequence's blocks read where they lie (no gather copy), output
// projection, SwiGLU MLP, residual adds — with fp32 arithmetic between the matmuls (llama.py rounds to the
// compute dtype there; these are other numerics, versioned in the KV salt). The residual stream keeps its dtype.
// Gemma 3's layer (model/gemma3.py) is the same call with its extras: RMSNorms over each q and k head before
// rope, norms on each sublayer's output before its residual add, GeGLU (tanh gelu), a sliding window of keys on
// local layers and its own score scale.
//
// Every row is computed on its own, in a fixed order (each token's attention sums its keys in position order),
// so a token gets the same bits alone, batched, or prefilled in any chunk.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "ggml_dot.h"
#include "qgemm.h"

namespace tierlm {

// (kind, q, d, m, dch) as tierlm.quant.intdot packs a QuantTensor. Kinds 4 and 8: the integer-dot kernels' form
// (qgemm.h). Kinds TORCH_INT4 / TORCH_INT8: torch's fused weight-only form (q in its int4pack layout or int8,
// d = kernel_scales in the activation dtype: [K/g, N, 2] or [N]), multiplied by torch's own kernels. Kind GGML: a
// matrix in GGUF's own blocks (ggml_dot.cpp): q = the rows' bytes (uint8, 1-D), d = int64 [S, 3] runs of rows
// (ggml type, rows, K) in row order.
using MatArg = std::tuple<int64_t, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                          c10::optional<at::Tensor>>;
constexpr int64_t TORCH_INT4 = 104, TORCH_INT8 = 108, GGML = 200;

struct Mat {  // a layer matrix in any form
  QMat q;  // the integer-dot form (q.kind 4 / 8), or only n, k for torch's and GGML
  int64_t torch_kind = 0;
  at::Tensor weight, scales;
  std::vector<GMat> runs;  // GGML: the runs of rows, pointers into weight
};

// A GGML matrix's runs, checked against its bytes.
static Mat to_ggml(const at::Tensor& q, const at::Tensor& segs) {
  TORCH_CHECK(q.is_contiguous() && q.dim() == 1 && q.scalar_type() == at::kByte, "ggml blocks must be contiguous uint8 [bytes]");
  TORCH_CHECK(segs.scalar_type() == at::kLong && segs.dim() == 2 && segs.size(1) == 3, "ggml runs must be int64 [S, 3]");
  const at::Tensor sc = segs.contiguous();
  const int64_t* s = sc.data_ptr<int64_t>();
  Mat m;
  m.weight = q;
  int64_t off = 0;
  for (int64_t i = 0; i < sc.size(0); ++i) {
    GMat g;
    g.type = int(s[3 * i]), g.n = s[3 * i + 1], g.k = s[3 * i + 2];
    const int64_t rb = ggml_row_bytes(g.type, g.k);
    TORCH_CHECK(rb > 0, "ggml type ", g.type, " with K ", g.k, " is not supported");
    TORCH_CHECK(i == 0 || g.k == m.q.k, "ggml runs of one matrix must share K");
    g.q = static_cast<const uint8_t*>(q.data_ptr()) + off;
    off += g.n * rb;
    m.q.n += g.n, m.q.k = g.k;
    m.runs.push_back(g);
  }
  TORCH_CHECK(off == q.numel(), "ggml blocks hold ", q.numel(), " bytes, the runs ", off);
  m.torch_kind = GGML;
  return m;
}

// y [rows, N] (row stride N) = x [rows, K] @ W^T for a GGML matrix, run by run into its columns.
static void ggml_matmul(const Mat& mat, const float* x, int64_t rows, float* y, const float* bias) {
  int64_t col = 0;
  for (const GMat& g : mat.runs) {
    ggml_gemm(g, x, rows, g.k, y + col, mat.q.n, bias ? bias + col : nullptr);
    col += g.n;
  }
}

static QMat to_qmat(const MatArg& a) {
  QMat w;
  w.kind = int(std::get<0>(a));
  const at::Tensor& q = std::get<1>(a);
  TORCH_CHECK(q.is_contiguous() && q.dim() == 2 && q.element_size() == 1, "qweight must be a contiguous 8-bit matrix");
  w.n = q.size(0);
  w.k = w.kind == 4 ? 2 * q.size(1) : q.size(1);
  TORCH_CHECK(w.k % 32 == 0, "K must be a multiple of 32");
  w.q = static_cast<const uint8_t*>(q.data_ptr());
  auto half = [&](const c10::optional<at::Tensor>& t) -> const uint16_t* {
    if (!t) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == w.n * (w.k / 32),
                "scales must be contiguous fp16 [N, K/32]");
    return static_cast<const uint16_t*>(t->data_ptr());
  };
  w.d = half(std::get<2>(a));
  w.m = half(std::get<3>(a));
  if (std::get<4>(a)) {
    const at::Tensor& c = *std::get<4>(a);
    TORCH_CHECK(c.scalar_type() == at::kFloat && c.is_contiguous() && c.numel() == w.n, "per-channel scales: fp32 [N]");
    w.dch = c.data_ptr<float>();
  }
  TORCH_CHECK(w.kind == 8 ? (w.d != nullptr) != (w.dch != nullptr) : (w.d && w.m), "scales do not match the kind");
  return w;
}

static Mat to_mat(const MatArg& a) {
  Mat m;
  m.torch_kind = std::get<0>(a);
  if (m.torch_kind == GGML) return to_ggml(std::get<1>(a), *std::get<2>(a));
  if (m.torch_kind != TORCH_INT4 && m.torch_kind != TORCH_INT8) {
    m.torch_kind = 0;
    m.q = to_qmat(a);
    return m;
  }
  m.weight = std::get<1>(a);
  m.scales = *std::get<2>(a);
  m.q.n = m.weight.size(0);
  m.q.k = m.torch_kind == TORCH_INT4 ? 2 * m.weight.size(1) : m.weight.size(1);
  return m;
}

static at::Tensor f32(const c10::optional<at::Tensor>& t) {
  return t ? t->to(at::kFloat).contiguous() : at::Tensor();
}

// Buffers of a step over R rows, carved out of the caller's scratch (fp32 unless said).
struct Scratch {
  float *h, *qkv, *att, *y, *gu, *act;
  QAct qa;
};

static int64_t scratch_floats(int64_t r, int64_t h, int64_t qkv, int64_t att, int64_t inter) {
  const int64_t kmax = std::max({h, att, inter});
  return r * (2 * h + qkv + att + 3 * inter) + r * (kmax / 4 + 2 * (kmax / 32) + kmax / 4) + 64;
}

static void matmul(const Mat& mat, const float* x, int64_t rows, float* y, const float* bias, bool exact, QAct& qa) {
  const QMat& w = mat.q;
  if (mat.torch_kind == GGML) return ggml_matmul(mat, x, rows, y, bias);  // its own activation quantisation
  if (mat.torch_kind) {  // torch's kernel: activations in its scales' dtype, the product back to fp32
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    const at::Tensor xin = at::from_blob(const_cast<float*>(x), {rows, w.k}, opts).to(mat.scales.scalar_type());
    const at::Tensor out = mat.torch_kind == TORCH_INT4
        ? at::_weight_int4pack_mm_for_cpu(xin, mat.weight, w.k / mat.scales.size(0), mat.scales)
        : at::_weight_int8pack_mm(xin, mat.weight, mat.scales);  // [rows, N]
    at::Tensor dst = at::from_blob(y, {rows, w.n}, opts);
    dst.copy_(out);
    if (bias) dst.add_(at::from_blob(const_cast<float*>(bias), {w.n}, opts));
    return;
  }
  if (exact) return fgemm(w, x, rows, w.k, y, w.n, bias);
  qa.layout = w.kind, qa.m = rows, qa.k = w.k;
  quantize_act(x, w.k, qa);
  qgemm(w, qa, y, w.n, bias);
}

at::Tensor linear(const at::Tensor& x, const MatArg& wa, const c10::optional<at::Tensor>& bias, bool exact) {
  const QMat w = to_qmat(wa);
  TORCH_CHECK(x.size(-1) == w.k, "x has ", x.size(-1), " columns, the matrix ", w.k);
  const at::Tensor x2 = x.reshape({-1, w.k}).to(at::kFloat).contiguous();
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, w.n}, x2.options());
  const at::Tensor b = f32(bias);
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  {
    pybind11::gil_scoped_release nogil;
    if (exact) {
      fgemm(w, x2.data_ptr<float>(), m, w.k, y.data_ptr<float>(), w.n, bp);
    } else {
      at::Tensor q = at::empty({m, w.k}, x2.options().dtype(at::kChar));
      at::Tensor s = at::empty({3, m, w.k / 4}, x2.options());
      QAct qa{w.kind, m, w.k, q.data_ptr<int8_t>(), s[0].data_ptr<float>(), s[1].data_ptr<float>(), s[2].data_ptr<float>()};
      quantize_act(x2.data_ptr<float>(), w.k, qa);
      qgemm(w, qa, y.data_ptr<float>(), w.n, bp);
    }
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.n;
  return y.to(x.scalar_type()).view(shape);
}

// x [..., K] @ W^T (+ bias) for a matrix in GGUF's blocks (q uint8 [bytes], runs int64 [S, 3]), in x's dtype.
at::Tensor ggml_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& runs, const c10::optional<at::Tensor>& bias) {
  const Mat mat = to_ggml(q, runs);
  const int64_t k = mat.q.k, n = mat.q.n;
  TORCH_CHECK(x.size(-1) == k, "x has ", x.size(-1), " columns, the matrix ", k);
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x2.size(0), n}, x2.options());
  const at::Tensor b = f32(bias);
  {
    pybind11::gil_scoped_release nogil;
    ggml_matmul(mat, x2.data_ptr<float>(), x2.size(0), y.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return y.to(x.scalar_type()).view(shape);
}

static inline float load(const void* p, bool bf16, int64_t i) {
  return bf16 ? bf2f(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}
static inline void store(void* p, bool bf16, int64_t i, float v) {
  if (bf16) static_cast<uint16_t*>(p)[i] = f2bf(v);
  else static_cast<float*>(p)[i] = v;
}

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w, fp32, over rows of h values at stride `ld`; x in bf16 or fp32
// (read in place), w in the compute dtype (wbf16). out may be x (fp32, in place).
static void rms_norm(const void* x, bool bf16, const void* w, bool wbf16, int64_t rows, int64_t h, double eps,
                     float* out, int64_t ld = 0) {
  ld = ld ? ld : h;
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* o = out + r * ld;
      for (int64_t i = 0; i < h; ++i) o[i] = load(x, bf16, r * ld + i);
      const float inv = 1.f / std::sqrt(fixed_dot(o, o, h) / float(h) + float(eps));
      for (int64_t i = 0; i < h; ++i) o[i] = o[i] * inv * load(w, wbf16, i);
    }
  });
}

// Gemma 3: every q head (weights qn [hd]) and k head (kn) of each row of qkv normed in place
static void head_norms(float* qkv, int64_t rows, int64_t nh, int64_t nkv, int64_t hd, const void* qn,
                       const void* kn, bool wbf16, double eps) {
  const int64_t width = (nh + 2 * nkv) * hd;
  for (int64_t r = 0; r < rows; ++r) {
    rms_norm(qkv + r * width, false, qn, wbf16, nh, hd, eps, qkv + r * width, hd);
    rms_norm(qkv + r * width + nh * hd, false, kn, wbf16, nkv, hd, eps, qkv + r * width + nh * hd, hd);
  }
}

static void add_residual(void* x, bool bf16, const float* y, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) store(x, bf16, i, load(x, bf16, i) + y[i]);
  });
}

struct Paged {  // one layer's K/V pool [nkv, cap, bs, hd] and the step's block tables
  void *k, *v;
  bool bf16;
  int64_t cap, bs, nb;
  const int32_t* tables;  // [B, nb]
  const int64_t* pos;     // [R]: the position of each row's token
  int64_t t;              // rows per sequence
  int64_t at(int64_t r, int64_t kvh, int64_t p) const {  // element offset of key p of row r's sequence
    return ((kvh * cap + tables[(r / t) * nb + p / bs]) * bs + p % bs);
  }
};

// rope on q and k heads of every row (in place), then K and V into the pool at each row's position
static void rope_and_store(float* qkv, int64_t rows, int64_t nh, int64_t nkv, int64_t hd, const float* cos,
                           const float* sin, const Paged& kv) {
  const int64_t width = (nh + 2 * nkv) * hd, half = hd / 2;
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    std::vector<float> tmp(hd);
    for (int64_t r = r0; r < r1; ++r) {
      const float *c = cos + kv.pos[r] * hd, *s = sin + kv.pos[r] * hd;
      for (int64_t head = 0; head < nh + nkv; ++head) {
        float* x = qkv + r * width + head * hd;
        for (int64_t i = 0; i < half; ++i) tmp[i] = x[i] * c[i] - x[i + half] * s[i];
        for (int64_t i = half; i < hd; ++i) tmp[i] = x[i] * c[i] + x[i - half] * s[i];
        std::copy(tmp.begin(), tmp.end(), x);
      }
      for (int64_t j = 0; j < nkv; ++j) {
        const int64_t off = kv.at(r, j, kv.pos[r]) * hd;
        const float *kr = qkv + r * width + (nh + j) * hd, *vr = qkv + r * width + (nh + nkv + j) * hd;
        for (int64_t i = 0; i < hd; ++i) store(kv.k, kv.bf16, off + i, kr[i]), store(kv.v, kv.bf16, off + i, vr[i]);
      }
    }
  });
}

// att[r, head] = softmax(q . keys * scale) . values over keys p0..pos[r] of row r's sequence, read in the pool:
// p0 = 0, or with a sliding window the keys after pos[r] - window (Gemma 3's local layers). Up to QT consecutive
// rows of one sequence (a prefill chunk) share each key and value read from the pool, and so do the query heads
// of one task (a kv head's group, split into parts when a step has too few tasks for the threads: a decode of
// one sequence with one kv head would run on one core). Every (row, head) still sums its own keys in position
// order with the same operations (fixed_dots: fixed_dot's bits, four at a time), so its bits depend neither on
// the tile nor on the split (row-invariant).
constexpr int64_t QT = 4;

static void attention(const float* qkv, int64_t rows, int64_t nh, int64_t nkv, int64_t hd, const Paged& kv, float* att,
                      float scale, int64_t window) {
  const int64_t width = (nh + 2 * nkv) * hd, g = nh / nkv, tiles = (kv.t + QT - 1) / QT, seqs = rows / kv.t;
  const int64_t base = seqs * tiles * nkv, want = 4 * at::get_num_threads();
  const int64_t split = std::min(g, (want + base - 1) / base), per = (g + split - 1) / split;
  const int64_t parts = (g + per - 1) / per;  // parts of `per` heads (the last may hold fewer), none empty
  at::parallel_for(0, base * parts, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> sc, kf(hd), o(QT * per * hd), z(QT * per);
    std::vector<const float*> qs(QT * per);  // the (row, head) queries that see key p
    std::vector<float*> dst(QT * per);       // where each one's score of key p goes
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t part = it % parts, j = it / parts % nkv, tile = it / parts / nkv % tiles;
      const int64_t r0 = it / parts / nkv / tiles * kv.t + tile * QT;
      const int64_t h0 = part * per, gh = std::min(g, h0 + per) - h0;  // this task's heads of kv head j's group
      const int64_t m = std::min(QT, (r0 / kv.t + 1) * kv.t - r0);  // the tile's rows r0 .. r0 + m - 1
      int64_t p0[QT], n[QT], lo = INT64_MAX, hi = 0, nmax = 0;
      for (int64_t u = 0; u < m; ++u) {
        p0[u] = window > 0 ? std::max<int64_t>(0, kv.pos[r0 + u] - window + 1) : 0, n[u] = kv.pos[r0 + u] + 1 - p0[u];
        lo = std::min(lo, p0[u]), hi = std::max(hi, kv.pos[r0 + u] + 1), nmax = std::max(nmax, n[u]);
      }
      sc.resize(m * gh * nmax);
      auto score = [&](int64_t u, int64_t h) { return sc.data() + (u * gh + h) * nmax; };  // [n[u]] of (row, head)
      float dots[4];
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t off = kv.at(r0, j, p) * hd;  // one block table: the tile's rows are one sequence's
        for (int64_t i = 0; i < hd; ++i) kf[i] = load(kv.k, kv.bf16, off + i);
        int64_t cnt = 0;
        for (int64_t u = 0; u < m; ++u) {
          if (p < p0[u] || p >= p0[u] + n[u]) continue;
          for (int64_t h = 0; h < gh; ++h)
            qs[cnt] = qkv + (r0 + u) * width + (j * g + h0 + h) * hd, dst[cnt++] = score(u, h) + (p - p0[u]);
        }
        int64_t c = 0;
        for (; c + 4 <= cnt; c += 4) {
          fixed_dots<4>(qs.data() + c, kf.data(), hd, dots);
          for (int e = 0; e < 4; ++e) *dst[c + e] = dots[e] * scale;
        }
        for (; c < cnt; ++c) *dst[c] = fixed_dot(qs[c], kf.data(), hd) * scale;
      }
      std::fill(z.begin(), z.end(), 0.f);
      for (int64_t u = 0; u < m; ++u)
        for (int64_t h = 0; h < gh; ++h) {
          float* s = score(u, h);
          float mx = s[0];
          for (int64_t p = 1; p < n[u]; ++p) mx = std::max(mx, s[p]);
          for (int64_t p = 0; p < n[u]; ++p) s[p] = std::exp(s[p] - mx), z[u * gh + h] += s[p];
        }
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t off = kv.at(r0, j, p) * hd;
        for (int64_t i = 0; i < hd; ++i) kf[i] = load(kv.v, kv.bf16, off + i);
        for (int64_t u = 0; u < m; ++u) {
          if (p < p0[u] || p >= p0[u] + n[u]) continue;
          for (int64_t h = 0; h < gh; ++h) {
            const float e = score(u, h)[p - p0[u]];
            float* ou = o.data() + (u * gh + h) * hd;
            for (int64_t i = 0; i < hd; ++i) ou[i] += e * kf[i];
          }
        }
      }
      for (int64_t u = 0; u < m; ++u)
        for (int64_t h = 0; h < gh; ++h)
          for (int64_t i = 0; i < hd; ++i)
            att[(r0 + u) * nh * hd + (j * g + h0 + h) * hd + i] = o[(u * gh + h) * hd + i] / z[u * gh + h];
    }
  });
}

int64_t scratch_bytes(int64_t rows, int64_t h, int64_t qkv, int64_t att, int64_t inter) {
  return 4 * scratch_floats(rows, h, qkv, att, inter);
}

void layer_step(at::Tensor x, const at::Tensor& attn_norm, const at::Tensor& ffn_norm, const MatArg& wqkv,
                const c10::optional<at::Tensor>& bqkv, const MatArg& wo, const c10::optional<at::Tensor>& bo,
                const MatArg& wgu, const MatArg& wdown, const at::Tensor& cos, const at::Tensor& sin,
                const at::Tensor& positions, const at::Tensor& tables, at::Tensor kpool, at::Tensor vpool,
                int64_t nh, int64_t nkv, double eps, bool exact, at::Tensor scratch,
                const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                const c10::optional<at::Tensor>& post_attn_norm, const c10::optional<at::Tensor>& post_ffn_norm,
                bool gelu, int64_t window, double scale) {
  const Mat mqkv = to_mat(wqkv), mo = to_mat(wo), mgu = to_mat(wgu), md = to_mat(wdown);
  const QMat &Wqkv = mqkv.q, &Wo = mo.q, &Wgu = mgu.q, &Wd = md.q;
  const int64_t h = x.size(-1), rows = x.numel() / h, hd = cos.size(1), inter = Wd.k, b = tables.size(0);
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat), "x: bf16|fp32");
  TORCH_CHECK(Wqkv.k == h && Wqkv.n == (nh + 2 * nkv) * hd && Wo.k == nh * hd && Wo.n == h && Wgu.k == h &&
              Wgu.n == 2 * inter && Wd.n == h, "layer matrices do not match the config");
  TORCH_CHECK(positions.numel() == rows && positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions [B, T]");
  TORCH_CHECK(tables.scalar_type() == at::kInt && tables.is_contiguous() && rows % b == 0, "tables: int32 [B, nb]");
  TORCH_CHECK(kpool.is_contiguous() && vpool.is_contiguous() && kpool.scalar_type() == vpool.scalar_type() &&
              (kpool.scalar_type() == at::kBFloat16 || kpool.scalar_type() == at::kFloat) && kpool.size(3) == hd,
              "pool: [nkv, cap, bs, hd] bf16|fp32");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "rope tables: fp32");
  TORCH_CHECK(scratch.nbytes() >= size_t(scratch_bytes(rows, h, Wqkv.n, Wo.k, inter)), "scratch too small");
  TORCH_CHECK(attn_norm.scalar_type() == x.scalar_type() && ffn_norm.scalar_type() == x.scalar_type() &&
              attn_norm.is_contiguous() && ffn_norm.is_contiguous(), "norm weights: contiguous, in x's dtype");
  for (const auto* t : {&q_norm, &k_norm}) TORCH_CHECK(!*t || ((*t)->scalar_type() == x.scalar_type() &&
      (*t)->is_contiguous() && (*t)->numel() == hd), "q/k norm weights: contiguous [hd], in x's dtype");
  for (const auto* t : {&post_attn_norm, &post_ffn_norm}) TORCH_CHECK(!*t || ((*t)->scalar_type() == x.scalar_type() &&
      (*t)->is_contiguous() && (*t)->numel() == h), "post norm weights: contiguous [H], in x's dtype");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q and k norms come together");
  const at::Tensor bq = f32(bqkv), bb = f32(bo);  // Qwen2 / attention-bias models only
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  Paged kv{kpool.data_ptr(), vpool.data_ptr(), kpool.scalar_type() == at::kBFloat16, kpool.size(1), kpool.size(2),
           tables.size(1), tables.data_ptr<int32_t>(), positions.data_ptr<int64_t>(), rows / b};

  pybind11::gil_scoped_release nogil;
  float* f = static_cast<float*>(scratch.data_ptr());
  const int64_t kmax = std::max({h, Wo.k, inter});
  Scratch s;
  s.h = f, f += rows * h;
  s.qkv = f, f += rows * Wqkv.n;
  s.att = f, f += rows * Wo.k;
  s.y = f, f += rows * h;
  s.gu = f, f += rows * 2 * inter;
  s.act = f, f += rows * inter;
  s.qa.q = reinterpret_cast<int8_t*>(f), f += rows * kmax / 4;
  s.qa.dx = f, f += rows * (kmax / 32);
  s.qa.sx = f, f += rows * (kmax / 32);
  s.qa.dxe = f;

  // a sublayer's output y [R, H] into the residual stream, through its post norm where the model has one
  auto add_output = [&](const c10::optional<at::Tensor>& post) {
    if (post) rms_norm(s.y, false, post->data_ptr(), bf16, rows, h, eps, s.y);
    add_residual(x.data_ptr(), bf16, s.y, rows * h);
  };
  rms_norm(x.data_ptr(), bf16, attn_norm.data_ptr(), bf16, rows, h, eps, s.h);  // [R, H]
  matmul(mqkv, s.h, rows, s.qkv, bq.defined() ? bq.data_ptr<float>() : nullptr, exact, s.qa);  // [R, (nh+2nkv)*hd]
  if (q_norm) head_norms(s.qkv, rows, nh, nkv, hd, q_norm->data_ptr(), k_norm->data_ptr(), bf16, eps);
  rope_and_store(s.qkv, rows, nh, nkv, hd, cos.data_ptr<float>(), sin.data_ptr<float>(), kv);
  attention(s.qkv, rows, nh, nkv, hd, kv, s.att, scale > 0 ? float(scale) : 1.f / std::sqrt(float(hd)), window);
  matmul(mo, s.att, rows, s.y, bb.defined() ? bb.data_ptr<float>() : nullptr, exact, s.qa);  // [R, H]
  add_output(post_attn_norm);
  rms_norm(x.data_ptr(), bf16, ffn_norm.data_ptr(), bf16, rows, h, eps, s.h);
  matmul(mgu, s.h, rows, s.gu, nullptr, exact, s.qa);  // [R, 2I]: gate then up
  constexpr float GELU_C = 0.7978845608028654f;  // sqrt(2 / pi): the tanh gelu
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < inter; ++i) {
        const float g = s.gu[r * 2 * inter + i], up = s.gu[r * 2 * inter + inter + i];
        const float a = gelu ? 0.5f * g * (1.f + std::tanh(GELU_C * (g + 0.044715f * g * g * g))) : g / (1.f + std::exp(-g));
        s.act[r * inter + i] = a * up;
      }
  });
  matmul(md, s.act, rows, s.y, nullptr, exact, s.qa);  // [R, H]
  add_output(post_ffn_norm);
}

}  // namespace tierlm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tierlm native kernels: integer-dot int4/int8 matmuls and a one-call decoder layer";
  m.def("linear", &tierlm::linear, "x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype");
  m.def("ggml_linear", &tierlm::ggml_linear, "x [..., K] @ W^T (+ bias) for W in GGUF blocks (uint8 bytes, int64 [S, 3] runs)");
  m.def("ggml_row_bytes", &tierlm::ggml_row_bytes);
  m.def("layer_step", &tierlm::layer_step, "one decoder layer over a paged step, in place on x");
  m.def("scratch_bytes", &tierlm::scratch_bytes, "scratch a layer_step over `rows` rows needs");
  m.def("set_isa", &tierlm::set_isa);
  m.def("isa", [] { return std::string(tierlm::isa_name(tierlm::current_isa())); });
  m.def("best_isa", [] { return tierlm::best_isa(); });
}
