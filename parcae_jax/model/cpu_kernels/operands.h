// What one task works on: the call's shape, the thread's scratch memory, and the operands of
// the products packed from the model's [B, T, heads, D] rows (floats, or bf16 pairs).
// Part of attention.cc's translation unit.

#pragma once

#include "exp512.h"

// Mask of the 16 keys s0..s0+15 that query t (segment st) may read.
inline __mmask16 key_mask(int s0, int t, int st, const int32_t* seg) {
  const __m512i s = _mm512_add_epi32(_mm512_set1_epi32(s0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 causal = _mm512_cmple_epi32_mask(s, _mm512_set1_epi32(t));
  return _mm512_mask_cmpeq_epi32_mask(causal, _mm512_loadu_si512(seg + s0), _mm512_set1_epi32(st));
}

// ---- shapes and scratch ---------------------------------------------------------------------

struct Shape {
  int64_t B, T, H, G, D;
  int R() const { return static_cast<int>(H / G); }
};

// A thread's working memory, kept between calls (no allocation or zeroing per task).
struct Scratch {
  uint32_t *kt, *vt, *k, *v, *a, *a2, *qr, *dor, *pt, *tmp;
  float *s, *dp, *kp, *qp, *qn, *rk, *rq;  // processed rows (rope_norm.h): keys, queries scaled and not, their r
  std::unique_ptr<uint32_t[]> arena;
  size_t size = 0;

  void fit(const Shape& sh) {
    const size_t T = sh.T, D = sh.D, TD = T * D, QD = kQB * D, QT = kQB * T;
    const size_t TMP = std::max(QT, TD);  // a block's scores, or the keys' rows before transposing
    const size_t need = 5 * TD + 6 * QD + 3 * QT + TMP + T + kQB + 17 * 16;  // 17 buffers, each rounded up to 16
    if (need > size) arena.reset(new uint32_t[need]), size = need;
    uint32_t* p = arena.get();
    auto take = [&p](size_t n) { uint32_t* x = p; p += (n + 15) / 16 * 16; return x; };
    kt = take(TD), vt = take(TD), k = take(TD), v = take(TD);
    a = take(QD), a2 = take(QD), qr = take(QD), dor = take(QD);
    pt = take(QT), tmp = take(TMP);
    s = reinterpret_cast<float*>(take(QT)), dp = reinterpret_cast<float*>(take(QT));
    kp = reinterpret_cast<float*>(take(TD)), qp = reinterpret_cast<float*>(take(QD));
    qn = reinterpret_cast<float*>(take(QD)), rk = reinterpret_cast<float*>(take(T));
    rq = reinterpret_cast<float*>(take(kQB));
  }
};

Scratch& scratch(const Shape& sh) {
  static thread_local Scratch w;
  w.fit(sh);
  return w;
}

// An operand as the products read it: 32-bit elements (floats, or bf16 pairs) and a row stride.
struct Operand {
  const uint32_t* p;
  int ld;
};

inline const uint32_t* bits(const float* x) { return reinterpret_cast<const uint32_t*>(x); }

// n rows of D floats at x (row stride `stride`) as the left operand of a product contracting
// over D: the rows themselves, or their bf16 pairs in `out`.
template <bool BF16>
Operand left_rows(const float* x, int64_t stride, int n, int D, uint32_t* out) {
  if constexpr (!BF16) return {bits(x), static_cast<int>(stride)};
  for (int i = 0; i < n; ++i) row_to_bf16(x + i * stride, reinterpret_cast<uint16_t*>(out + i * D / 2), D);
  return {out, D / 2};
}

// y [n, D] (row stride `stride`) as the right operand of x y^T (contraction over D): [D, n]
// floats or [D/2, n] pairs in `out`; `tmp` holds n*D 32-bit elements (Scratch::tmp does).
template <bool BF16>
Operand right_transposed(const float* y, int64_t stride, int n, int D, uint32_t* tmp, uint32_t* out) {
  const Operand rows = left_rows<BF16>(y, stride, n, D, tmp);
  transpose32(rows.p, n, BF16 ? D / 2 : D, rows.ld, out, n);
  return {out, n};
}

// y [n, D] (row stride `stride`, n even) as the right operand of x y (contraction over n):
// y itself, or [n/2, D] pairs in `out`.
template <bool BF16>
Operand right_rows(const float* y, int64_t stride, int n, int D, uint32_t* out) {
  if constexpr (!BF16) {  // packed: strided rows of the 4 KiB-aliasing kind slow the products
    for (int i = 0; i < n; ++i) std::memcpy(out + i * D, y + i * stride, D * 4);
    return {out, D};
  }
  for (int i = 0; i < n; i += 2) rows_to_pairs(y + i * stride, y + (i + 1) * stride, out + (i / 2) * D, D);
  return {out, D};
}

// p [m, n] floats (m even with BF16) as the left operand of p^T z (contraction over m):
// [n, m] floats or [n, m/2] pairs in `out`; `tmp` holds m*n 32-bit elements.
template <bool BF16>
Operand left_transposed(const float* p, int m, int n, int ldp, uint32_t* tmp, uint32_t* out) {
  if constexpr (BF16) {
    for (int i = 0; i < m; i += 2) rows_to_pairs(p + i * ldp, p + (i + 1) * ldp, tmp + (i / 2) * n, n);
    transpose32(tmp, m / 2, n, n, out, m / 2);
    return {out, m / 2};
  }
  transpose32(bits(p), m, n, ldp, out, m);
  return {out, m};
}

constexpr int kw(bool bf16, int n) { return bf16 ? n / 2 : n; }

// Probabilities of row t over keys [0, n) in place (masked ones 0): exp(s - shift).
inline void masked_exp(float* s, int n, int t, const int32_t* seg, float shift, __m512* sum) {
  const __m512 c = _mm512_set1_ps(shift);
  for (int s0 = 0; s0 < n; s0 += 16) {
    const __m512 p = _mm512_maskz_mov_ps(key_mask(s0, t, seg[t], seg), exp512(_mm512_sub_ps(_mm512_loadu_ps(s + s0), c)));
    _mm512_storeu_ps(s + s0, p);
    if (sum) *sum = _mm512_add_ps(*sum, p);
  }
}

