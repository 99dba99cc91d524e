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

inline float sum_of_products(const float* a, const float* b, int D) {
  __m512 acc = _mm512_setzero_ps();
  for (int m = 0; m < D; m += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + m), _mm512_loadu_ps(b + m), acc);
  return _mm512_reduce_add_ps(acc);
}

// y = prep(x) * scale for one row of D floats (row t of batch b); returns r (1 without norm).
// x and y may not alias.
inline float prep_row(const Prep& p, int64_t b, int t, const float* x, int D, float scale, float* y) {
  const int h = D / 2;
  if (p.cos) {
    const float* c = p.cos + b * p.batch_stride + static_cast<int64_t>(t) * h;
    const float* s = p.sin + b * p.batch_stride + static_cast<int64_t>(t) * h;
    for (int m = 0; m < h; m += 16) {
      const int n = h - m;
      const __m512 x0 = load_n(x + m, n), x1 = load_n(x + h + m, n), cm = load_n(c + m, n), sm = load_n(s + m, n);
      store_n(y + m, _mm512_sub_ps(_mm512_mul_ps(x0, cm), _mm512_mul_ps(x1, sm)), n);
      store_n(y + h + m, _mm512_add_ps(_mm512_mul_ps(x1, cm), _mm512_mul_ps(x0, sm)), n);
    }
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
  const int h = D / 2;
  const __m512 vs = _mm512_set1_ps(scale);
  for (int m = 0; m < D; m += 16) _mm512_storeu_ps(g + m, _mm512_mul_ps(_mm512_loadu_ps(g + m), vs));
  if (p.norm) {  // dn -> du = r (dn - n mean(dn n))
    const __m512 mu = _mm512_set1_ps(sum_of_products(g, n, D) / static_cast<float>(D)), vr = _mm512_set1_ps(r);
    for (int m = 0; m < D; m += 16)
      _mm512_storeu_ps(g + m, _mm512_mul_ps(vr, _mm512_sub_ps(_mm512_loadu_ps(g + m),
                                                              _mm512_mul_ps(_mm512_loadu_ps(n + m), mu))));
  }
  if (p.cos) {  // the rotation's transpose
    const float* c = p.cos + b * p.batch_stride + static_cast<int64_t>(t) * h;
    const float* s = p.sin + b * p.batch_stride + static_cast<int64_t>(t) * h;
    for (int m = 0; m < h; m += 16) {
      const int k = h - m;
      const __m512 g0 = load_n(g + m, k), g1 = load_n(g + h + m, k), cm = load_n(c + m, k), sm = load_n(s + m, k);
      store_n(g + m, _mm512_add_ps(_mm512_mul_ps(g0, cm), _mm512_mul_ps(g1, sm)), k);
      store_n(g + h + m, _mm512_sub_ps(_mm512_mul_ps(g1, cm), _mm512_mul_ps(g0, sm)), k);
    }
  }
}
