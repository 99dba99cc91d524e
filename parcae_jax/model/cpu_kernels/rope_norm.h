// RoPE and the weightless qk-norm, applied to a q or k row as the kernel packs it, and their
// backward. Part of attention.cc's translation unit (inside its anonymous namespace).
//
// Why here: in XLA these are ~10 element-wise loops and reductions per layer over q and k
// (forward and backward), which ran beside the matmuls and took ~8% of the bench_cpu step.
// The kernel reads every q and k row anyway; processing a row on the way costs a few dozen
// vector operations, and nothing processed is written back to memory.
//
// Semantics (attention.py's apply_rope, then qk_norm, then the scale): u = RoPE(x) on
// channels (m, m + D/2) (the model keeps q and k channels in that order), n = u * r with
// r = 1 / sqrt(mean(u^2) + eps), y = n * scale (scale 1/sqrt(D) for queries, 1 for keys).

#pragma once

struct Prep {
  const float* cos = nullptr;  // [Bc, T, D/2] float32; nullptr: no RoPE
  const float* sin = nullptr;
  int64_t batch_stride = 0;    // T * D/2, or 0 when one table serves every row (Bc == 1)
  bool norm = false;
  float eps = 0.0f;

  bool active() const { return cos != nullptr || norm; }
};

// The first n <= 16 floats at p (D % 16 == 0, so a half row is 16k or 16k + 8 floats).
inline __mmask16 first(int n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }
inline __m512 load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline void store_n(float* p, __m512 x, int n) { _mm512_mask_storeu_ps(p, first(n), x); }

// Rotates the h channel pairs (m, m + h) of x into y by the angles of row t of batch b (by
// their negatives: the transpose, with `inverse`). y may be x.
inline void rotate(const Prep& p, int64_t b, int t, const float* x, int h, bool inverse, float* y) {
  const int64_t row = b * p.batch_stride + static_cast<int64_t>(t) * h;
  const float *c = p.cos + row, *s = p.sin + row;
  for (int m = 0; m < h; m += 16) {
    const int n = h - m;
    const __m512 x0 = load_n(x + m, n), x1 = load_n(x + h + m, n), cm = load_n(c + m, n);
    const __m512i sign = _mm512_set1_epi32(inverse ? INT32_MIN : 0);  // -s exactly, -0 included
    const __m512 sm = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(load_n(s + m, n)), sign));
    store_n(y + m, _mm512_sub_ps(_mm512_mul_ps(x0, cm), _mm512_mul_ps(x1, sm)), n);
    store_n(y + h + m, _mm512_add_ps(_mm512_mul_ps(x1, cm), _mm512_mul_ps(x0, sm)), n);
  }
}

inline float sum_of_products(const float* a, const float* b, int D) {
  __m512 acc = _mm512_setzero_ps();
  for (int m = 0; m < D; m += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + m), _mm512_loadu_ps(b + m), acc);
  return _mm512_reduce_add_ps(acc);
}

// y = prep(x) * scale for one row of D floats (row t of batch b); returns r (1 without norm).
// x and y may not alias.
inline float prep_row(const Prep& p, int64_t b, int t, const float* x, int D, float scale, float* y) {
  if (p.cos) {
    rotate(p, b, t, x, D / 2, false, y);
  } else {
    std::memcpy(y, x, D * 4);
  }
  float r = 1.0f;
  if (p.norm) r = 1.0f / std::sqrt(sum_of_products(y, y, D) / static_cast<float>(D) + p.eps);
  if (p.norm || scale != 1.0f) {
    const __m512 vr = _mm512_set1_ps(r), vs = _mm512_set1_ps(scale);
    for (int m = 0; m < D; m += 16)  // two roundings, as the XLA path
      _mm512_storeu_ps(y + m, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(y + m), vr), vs));
  }
  return r;
}

// g (the gradient with respect to prep_row's y) becomes the gradient with respect to x, in place,
// from n and r: the row prep_row made with scale 1 and what it returned.
inline void prep_row_backward(const Prep& p, int64_t b, int t, const float* n, float r, int D, float scale, float* g) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int m = 0; m < D; m += 16) _mm512_storeu_ps(g + m, _mm512_mul_ps(_mm512_loadu_ps(g + m), vs));
  if (p.norm) {  // dn -> du = r (dn - n mean(dn n))
    const __m512 mu = _mm512_set1_ps(sum_of_products(g, n, D) / static_cast<float>(D)), vr = _mm512_set1_ps(r);
    for (int m = 0; m < D; m += 16)
      _mm512_storeu_ps(g + m, _mm512_mul_ps(vr, _mm512_sub_ps(_mm512_loadu_ps(g + m),
                                                              _mm512_mul_ps(_mm512_loadu_ps(n + m), mu))));
  }
  if (p.cos) rotate(p, b, t, g, D / 2, true, g);
}
