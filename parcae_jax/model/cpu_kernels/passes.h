// The two passes of one task, a (batch, kv head) pair: the forward (scores, masked softmax,
// value product, per block of queries) and the backward (the probabilities recomputed from the
// log-sum-exp). Part of attention.cc's translation unit (inside its anonymous namespace).

#pragma once

// Where an operand's rows live: head j of token t of row b starts at
// base + (b T + t) stride + offset + j D. Separate q, k, v are [B, T, heads * D] (offset 0);
// the projection's [B, T, (H + 2G) D] output holds all three at their offsets.
template <typename P>
struct Rows {
  P* base;
  int64_t stride, offset;
  P* at(int64_t T, int64_t b, int64_t t, int64_t head, int D) const { return base + (b * T + t) * stride + offset + head * D; }
};
using InRows = Rows<const float>;
using OutRows = Rows<float>;

// ---- forward --------------------------------------------------------------------------------

template <bool BF16>
void forward_task(const Shape& sh, int64_t b, int64_t g, bool bounded, const Prep& prep, float scale,
                  InRows q, InRows k, InRows v, const int32_t* seg_all, OutRows out, float* lse, Scratch& w) {
  const int T = sh.T, D = sh.D, R = sh.R();
  const int32_t* seg = seg_all + b * T;
  const bool prep_q = prep.active() || scale != 1.0f;
  const float* kb = k.at(T, b, 0, g, D);
  int64_t kstride = k.stride;
  if (prep.active()) {  // the keys processed once per task, into rows of their own
    for (int t = 0; t < T; ++t) prep_row(prep, b, t, kb + t * k.stride, D, 1.0f, w.kp + t * D);
    kb = w.kp, kstride = D;
  }
  const Operand kt = right_transposed<BF16>(kb, kstride, T, D, w.tmp, w.kt);
  const Operand vr = right_rows<BF16>(v.at(T, b, 0, g, D), v.stride, T, D, w.v);
  for (int r = 0; r < R; ++r) {
    const int64_t h = g * R + r;
    for (int t0 = 0; t0 < T; t0 += kQB) {
      const int m = std::min(kQB, T - t0), n = t0 + m;  // keys 0..n-1 (causal)
      const float* qrow = q.at(T, b, t0, h, D);
      int64_t qstride = q.stride;
      if (prep_q) {
        for (int i = 0; i < m; ++i) prep_row(prep, b, t0 + i, qrow + i * q.stride, D, scale, w.qp + i * D);
        qrow = w.qp, qstride = D;
      }
      const Operand qa = left_rows<BF16>(qrow, qstride, m, D, w.a);
      gemm<BF16>(m, n, kw(BF16, D), qa.p, qa.ld, kt.p, kt.ld, w.s, n, false);
      float l_row[kQB];
      for (int i = 0; i < m; ++i) {
        const int t = t0 + i;
        float* s = w.s + i * n;
        float mx = 0.0f;
        if (!bounded) {
          __m512 vm = _mm512_set1_ps(-INFINITY);
          for (int s0 = 0; s0 < n; s0 += 16)
            vm = _mm512_mask_max_ps(vm, key_mask(s0, t, seg[t], seg), vm, _mm512_loadu_ps(s + s0));
          mx = _mm512_reduce_max_ps(vm);
        }
        __m512 sum = _mm512_setzero_ps();
        masked_exp(s, n, t, seg, mx, &sum);
        l_row[i] = _mm512_reduce_add_ps(sum);
        if (lse) lse[(b * sh.H + h) * T + t] = mx + std::log(l_row[i]);  // none for a prefill
      }
      const Operand pa = left_rows<BF16>(w.s, n, m, n, w.pt);
      float* o = out.at(T, b, t0, h, D);
      const int64_t os = out.stride;
      gemm<BF16>(m, D, kw(BF16, n), pa.p, pa.ld, vr.p, vr.ld, o, static_cast<int>(os), false);
      for (int i = 0; i < m; ++i) {  // the denominator after the value product, as the XLA path
        const __m512 inv = _mm512_set1_ps(1.0f / l_row[i]);
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(o + i * os + d, _mm512_mul_ps(_mm512_loadu_ps(o + i * os + d), inv));
      }
    }
  }
}

// ---- backward -------------------------------------------------------------------------------

// dq, dk, dv go where `dq`, `dk`, `dv` say; `dv2` (dense [B, T, G D], or null) gets dv too.
template <bool BF16>
void backward_task(const Shape& sh, int64_t b, int64_t g, const Prep& prep, float scale, InRows q, InRows k,
                   InRows v, const int32_t* seg_all, InRows out, const float* lse, InRows dout, OutRows dq,
                   OutRows dk, OutRows dv, float* dv2, Scratch& w) {
  const int T = sh.T, D = sh.D, R = sh.R();
  const int32_t* seg = seg_all + b * T;
  const bool prep_q = prep.active() || scale != 1.0f;
  const float* kraw = k.at(T, b, 0, g, D);
  const float* kb = kraw;
  int64_t kstride = k.stride;
  if (prep.active()) {  // the forward's processed keys, recomputed, and their r for the keys' backward
    for (int t = 0; t < T; ++t) w.rk[t] = prep_row(prep, b, t, kraw + t * k.stride, D, 1.0f, w.kp + t * D);
    kb = w.kp, kstride = D;
  }
  const Operand kt = right_transposed<BF16>(kb, kstride, T, D, w.tmp, w.kt);                // K^T
  const Operand vt = right_transposed<BF16>(v.at(T, b, 0, g, D), v.stride, T, D, w.tmp, w.vt);  // V^T
  const Operand kr = right_rows<BF16>(kb, kstride, T, D, w.k);                               // K, for dS K
  float* dkb = dk.at(T, b, 0, g, D);  // this task owns these rows of dk and dv
  float* dvb = dv.at(T, b, 0, g, D);
  const int last = (T - 1) / kQB * kQB;  // the last block of queries reads every key
  for (int r = 0; r < R; ++r) {
    const int64_t h = g * R + r;
    for (int t0 = last; t0 >= 0; t0 -= kQB) {  // last first: its dk, dv products write every row
      const int m = std::min(kQB, T - t0), n = t0 + m;
      const bool acc = r > 0 || t0 != last;
      const float *qraw = q.at(T, b, t0, h, D), *dorow = dout.at(T, b, t0, h, D), *orow = out.at(T, b, t0, h, D);
      const int64_t ds = dout.stride, os = out.stride;
      float* dqrow = dq.at(T, b, t0, h, D);
      for (int i = 0; i < m; ++i)  // the forward's output rows, read after the two products below
        for (int d = 0; d < D; d += 16) _mm_prefetch(reinterpret_cast<const char*>(orow + i * os + d), _MM_HINT_T0);
      const float* qrow = qraw;
      int64_t qstride = q.stride;
      if (prep_q) {  // n (for the backward through the prep) and n * scale (the products' q)
        const __m512 vs = _mm512_set1_ps(scale);
        for (int i = 0; i < m; ++i) {
          w.rq[i] = prep_row(prep, b, t0 + i, qraw + i * q.stride, D, 1.0f, w.qn + i * D);
          for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(w.qp + i * D + d, _mm512_mul_ps(_mm512_loadu_ps(w.qn + i * D + d), vs));
        }
        qrow = w.qp, qstride = D;
      }
      const Operand qa = left_rows<BF16>(qrow, qstride, m, D, w.a);
      const Operand da = left_rows<BF16>(dorow, ds, m, D, w.a2);
      gemm<BF16>(m, n, kw(BF16, D), qa.p, qa.ld, kt.p, kt.ld, w.s, n, false);   // S
      gemm<BF16>(m, n, kw(BF16, D), da.p, da.ld, vt.p, vt.ld, w.dp, n, false);  // dO V^T
      for (int i = 0; i < m; ++i) {
        const int t = t0 + i;
        __m512 dl = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16)
          dl = _mm512_fmadd_ps(_mm512_loadu_ps(dorow + i * ds + d), _mm512_loadu_ps(orow + i * os + d), dl);
        const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(dl));
        float* s = w.s + i * n;
        float* dp = w.dp + i * n;
        masked_exp(s, n, t, seg, lse[(b * sh.H + h) * T + t], nullptr);  // P
        for (int s0 = 0; s0 < n; s0 += 16)  // dS = P (dP - delta)
          _mm512_storeu_ps(dp + s0, _mm512_mul_ps(_mm512_loadu_ps(s + s0), _mm512_sub_ps(_mm512_loadu_ps(dp + s0), delta)));
      }
      // dV += P^T dO and dK += dS^T Q, contracting over this block's queries.
      const Operand dor = right_rows<BF16>(dorow, ds, m, D, w.dor);
      const Operand qr = right_rows<BF16>(qrow, qstride, m, D, w.qr);
      const Operand pt = left_transposed<BF16>(w.s, m, n, n, w.tmp, w.pt);
      gemm<BF16>(n, D, kw(BF16, m), pt.p, pt.ld, dor.p, dor.ld, dvb, static_cast<int>(dv.stride), acc);
      const Operand dst = left_transposed<BF16>(w.dp, m, n, n, w.tmp, w.pt);
      gemm<BF16>(n, D, kw(BF16, m), dst.p, dst.ld, qr.p, qr.ld, dkb, static_cast<int>(dk.stride), acc);
      // dQ = dS K, straight into dq[b, t0:t0+m, h, :].
      const Operand dsa = left_rows<BF16>(w.dp, n, m, n, w.tmp);
      gemm<BF16>(m, D, kw(BF16, n), dsa.p, dsa.ld, kr.p, kr.ld, dqrow, static_cast<int>(dq.stride), false);
      if (prep_q)  // through the scale, the norm and the rotation, back to the raw rows
        for (int i = 0; i < m; ++i)
          prep_row_backward(prep, b, t0 + i, w.qn + i * D, w.rq[i], D, scale, dqrow + i * dq.stride);
    }
  }
  if (prep.active())  // dk is complete: every query of the group has added to it
    for (int t = 0; t < T; ++t) prep_row_backward(prep, b, t, w.kp + t * D, w.rk[t], D, 1.0f, dkb + t * dk.stride);
  if (dv2)
    for (int t = 0; t < T; ++t) std::memcpy(dv2 + ((b * T + t) * sh.G + g) * D, dvb + t * dv.stride, D * 4);
}
