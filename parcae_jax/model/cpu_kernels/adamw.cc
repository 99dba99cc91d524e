// AdamW's update with the training step's non-finite guard, over every parameter leaf in one
// XLA FFI call (parcae_adamw), for x86 CPUs with AVX-512. Used by training/fused_adamw.py.
//
// Why: XLA:CPU runs the update as three loops per leaf (parameter, first and second moment),
// then checks every new value with an is-finite loop and a reduction per leaf, then copies
// the new values into the state's buffers (the guard's conditional cannot write in place):
// about 25 ms at 9M parameters on a 2-core Zen 4, 6% of the bench step. Here a first pass
// computes the new values in registers only to see whether all are finite, and a second pass,
// only when they are, computes them again and writes them in place: 4 reads and 3 writes per
// element, plus 4 reads for the check.
//
// Semantics (optax's scale_by_adam, add_decayed_weights and the step's -lr scale and apply,
// as make_optimizer chains them), per element, in float32:
//   g = grad / denom * clip
//   m = fma(1 - b1, g, b1 * m)            (XLA:CPU contracts these two the same way)
//   v = fma(1 - b2, g * g, b2 * v)
//   u = (m / bc1) / (sqrt(v / bc2 + eps_root) + eps) + weight_decay * p
//   p = p + neg_lr * u
// with bc1 = 1 - b1^t and bc2 = 1 - b2^t computed by the caller. Every operation rounds once
// (IEEE division and square root); XLA:CPU multiplies by reciprocals of bc1 and bc2 instead
// and contracts differently, so the two paths agree to a few units in the last place.
// The update happens only when the caller's flag (the gradient and loss were finite) is set
// and every new p, m and v is finite; otherwise nothing is written and the returned flag is 0.
// Each result is its operand's buffer (input_output_aliases), so unwritten means unchanged.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifndef __AVX512F__
#error "the AdamW kernel needs AVX-512 (library.py checks the CPU before compiling)"
#endif

namespace ffi = xla::ffi;

namespace {

#include "parallel.h"

constexpr int64_t kChunk = 16384;  // elements per task: 64 KiB of each operand

struct Constants {
  __m512 denom, clip, neg_lr, bc1, bc2, b1, omb1, b2, omb2, eps, eps_root, wd;
};

// One vector of 16 elements (fewer under the mask k): the new p, m and v, stored when STORE,
// else tested; returns the lanes where one of them is not finite.
template <bool STORE>
inline __mmask16 update16(const Constants& c, const float* g_in, const float* p_in, const float* m_in,
                          const float* v_in, float* p_out, float* m_out, float* v_out, __mmask16 k) {
  const __m512 g = _mm512_mul_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(k, g_in), c.denom), c.clip);
  const __m512 p = _mm512_maskz_loadu_ps(k, p_in);
  const __m512 m = _mm512_fmadd_ps(c.omb1, g, _mm512_mul_ps(c.b1, _mm512_maskz_loadu_ps(k, m_in)));
  const __m512 v = _mm512_fmadd_ps(c.omb2, _mm512_mul_ps(g, g), _mm512_mul_ps(c.b2, _mm512_maskz_loadu_ps(k, v_in)));
  const __m512 den = _mm512_add_ps(_mm512_sqrt_ps(_mm512_add_ps(_mm512_div_ps(v, c.bc2), c.eps_root)), c.eps);
  const __m512 u = _mm512_add_ps(_mm512_div_ps(_mm512_div_ps(m, c.bc1), den), _mm512_mul_ps(c.wd, p));
  const __m512 p_new = _mm512_add_ps(p, _mm512_mul_ps(c.neg_lr, u));
  if constexpr (STORE) {
    _mm512_mask_storeu_ps(p_out, k, p_new);
    _mm512_mask_storeu_ps(m_out, k, m);
    _mm512_mask_storeu_ps(v_out, k, v);
    return 0;
  } else {  // x - x is 0 for a finite x and NaN (unordered) for an infinity or a NaN
    const __m512 zero = _mm512_setzero_ps();
    return _mm512_mask_cmp_ps_mask(k, _mm512_sub_ps(p_new, p_new), zero, _CMP_NEQ_UQ) |
           _mm512_mask_cmp_ps_mask(k, _mm512_sub_ps(m, m), zero, _CMP_NEQ_UQ) |
           _mm512_mask_cmp_ps_mask(k, _mm512_sub_ps(v, v), zero, _CMP_NEQ_UQ);
  }
}

struct Leaf {
  const float *g, *p, *m, *v;
  float *p_out, *m_out, *v_out;
  int64_t size;
};

// Elements [begin, end) of a leaf; returns whether all new values there are finite (STORE: true).
template <bool STORE>
bool run(const Constants& c, const Leaf& l, int64_t begin, int64_t end) {
  __mmask16 bad = 0;
  for (int64_t j = begin; j < end; j += 16) {
    const __mmask16 k = end - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (end - j)) - 1);
    bad |= update16<STORE>(c, l.g + j, l.p + j, l.m + j, l.v + j, l.p_out + j, l.m_out + j, l.v_out + j, k);
  }
  return bad == 0;
}

ffi::Error AdamW(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                 ffi::RemainingRets rets, int64_t leaves, float b1, float one_minus_b1, float b2,
                 float one_minus_b2, float eps, float eps_root, float weight_decay) {
  const int64_t n = leaves;
  if (n < 0 || scalars.element_count() != 6 || int64_t(args.size()) != 4 * n || int64_t(rets.size()) != 3 * n + 1)
    return ffi::Error::InvalidArgument("parcae adamw: needs 6 scalars, 4 x leaves operands, 3 x leaves + 1 results");
  std::vector<Leaf> L(n);
  for (int64_t i = 0; i < n; ++i) {
    auto g = args.get<ffi::Buffer<ffi::F32>>(i), p = args.get<ffi::Buffer<ffi::F32>>(n + i);
    auto m = args.get<ffi::Buffer<ffi::F32>>(2 * n + i), v = args.get<ffi::Buffer<ffi::F32>>(3 * n + i);
    auto po = rets.get<ffi::Buffer<ffi::F32>>(i), mo = rets.get<ffi::Buffer<ffi::F32>>(n + i);
    auto vo = rets.get<ffi::Buffer<ffi::F32>>(2 * n + i);
    if (!g || !p || !m || !v || !po || !mo || !vo)
      return ffi::Error::InvalidArgument("parcae adamw: every operand and result must be float32");
    const int64_t size = g->element_count();
    const bool same = p->element_count() == size && m->element_count() == size && v->element_count() == size &&
                      (*po)->element_count() == size && (*mo)->element_count() == size &&
                      (*vo)->element_count() == size;
    if (!same) return ffi::Error::InvalidArgument("parcae adamw: a leaf's gradient, parameter and moments differ in size");
    if ((*po)->typed_data() != p->typed_data() || (*mo)->typed_data() != m->typed_data() ||
        (*vo)->typed_data() != v->typed_data())  // a skipped update leaves the state as it is
      return ffi::Error::InvalidArgument("parcae adamw: parameters and moments must be aliased with their results");
    L[i] = {g->typed_data(), p->typed_data(),    m->typed_data(),    v->typed_data(),
            (*po)->typed_data(), (*mo)->typed_data(), (*vo)->typed_data(), size};
  }
  auto flag = rets.get<ffi::Buffer<ffi::S32>>(3 * n);
  if (!flag || (*flag)->element_count() != 1)
    return ffi::Error::InvalidArgument("parcae adamw: the last result must be one int32");

  const float* s = scalars.typed_data();  // denom, clip, neg_lr, bc1, bc2, ok
  const Constants c{_mm512_set1_ps(s[0]), _mm512_set1_ps(s[1]), _mm512_set1_ps(s[2]), _mm512_set1_ps(s[3]),
                    _mm512_set1_ps(s[4]), _mm512_set1_ps(b1), _mm512_set1_ps(one_minus_b1), _mm512_set1_ps(b2),
                    _mm512_set1_ps(one_minus_b2), _mm512_set1_ps(eps), _mm512_set1_ps(eps_root),
                    _mm512_set1_ps(weight_decay)};
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (leaf, first element)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t a = 0; a < L[i].size; a += kChunk) tasks.emplace_back(i, a);
  const int64_t count = int64_t(tasks.size());
  auto span = [&](int64_t t) { return std::pair(tasks[t].second, std::min(tasks[t].second + kChunk, L[tasks[t].first].size)); };

  bool ok = s[5] != 0.0f;
  if (ok) {
    std::atomic<bool> bad{false};
    parallel_tasks(pool, count, [&](int64_t t) {
      if (bad.load(std::memory_order_relaxed)) return;  // the answer is known: skip the rest
      const auto [a, b] = span(t);
      if (!run<false>(c, L[tasks[t].first], a, b)) bad.store(true, std::memory_order_relaxed);
    });
    ok = !bad.load();
  }
  if (ok) {
    parallel_tasks(pool, count, [&](int64_t t) {
      const auto [a, b] = span(t);
      run<true>(c, L[tasks[t].first], a, b);
    });
  }
  (*flag)->typed_data()[0] = ok ? 1 : 0;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(parcae_adamw, AdamW,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("leaves")
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root")
                                  .Attr<float>("weight_decay"));
