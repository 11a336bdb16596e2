// Integer-dot matmuls on GGUF matrices held in the file's own blocks (ggml_dot.cpp). Plain pointers, no torch.
#pragma once
#include <cstdint>

namespace tierlm {

// ggml type ids (ggml.h's enum ggml_type) of the block formats the kernels read.
enum GgmlType : int {
  G_Q4_0 = 2, G_Q4_1 = 3, G_Q5_0 = 6, G_Q5_1 = 7, G_Q8_0 = 8, G_Q2_K = 10, G_Q3_K = 11, G_Q4_K = 12, G_Q5_K = 13, G_Q6_K = 14,
  G_IQ4_NL = 20, G_IQ4_XS = 23
};

bool ggml_supported(int type);
int64_t ggml_row_bytes(int type, int64_t k);  // bytes of one row of k values; 0: type unsupported or k not whole blocks

// One run of rows of one type: rows [n, K] as n * ggml_row_bytes(type, k) consecutive bytes.
struct GMat {
  int type = 0;
  int64_t n = 0, k = 0;
  const uint8_t* q = nullptr;
};

// y [M, n] (row stride ldy) = x [M, K] (row stride ldx) @ W^T (+ bias [n]); activations quantised per row to
// Q8_0 (32-column blocks) or Q8_K (256-column blocks) as the type wants. Row (m, n) is computed by the same
// operations whatever M, the threads or the ISA's tiling.
void ggml_gemm(const GMat& w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy, const float* bias);

}  // namespace tierlm
