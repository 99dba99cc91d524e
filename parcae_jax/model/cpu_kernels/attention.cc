// Fused causal attention for x86 CPUs with AVX-512 (and AVX512-BF16 for bfloat16 products),
// as two XLA FFI handlers: parcae_attention_fwd and parcae_attention_bwd.
//
// Why: XLA:CPU runs softmax attention as ~20 separate loops and dots per call (scores, mask,
// exp, sums, casts, transposes, concatenations of query chunks, gradient pads and adds); at
// head dim 64 that glue costs more thread time than the products. Here one (batch, kv head)
// pair is one task: its keys and values are packed once into the layout the products read,
// then each block of 64 queries of each query head in the group computes its scores, masked
// softmax and value product in cache, reading the model's [B, T, H, D] activations in place.
//
// Semantics (those of attention.py's XLA path): q arrives already scaled by 1/sqrt(D); with
// `bf16` the products take bfloat16 operands (round to nearest even) with float32
// accumulation, the softmax is float32; query t attends key s iff s <= t and both carry the
// same segment id; `bounded` skips the max subtraction (qk-normed scores cannot overflow exp).
// The forward also returns the row log-sum-exp; the backward recomputes the probabilities.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <new>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#include "xla/ffi/api/ffi.h"

#ifndef __AVX512F__
#error "the CPU attention kernel needs AVX-512 (library.py checks the CPU before compiling)"
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kQB = 64;   // queries per block
constexpr int kMaxD = 256;

// One translation unit in four files (each header says what it holds).
#include "bf16_pack.h"
#include "gemm.h"
#include "operands.h"

// ---- forward --------------------------------------------------------------------------------

template <bool BF16>
void forward_task(const Shape& sh, int64_t b, int64_t g, bool bounded, const float* q, const float* k,
                  const float* v, const int32_t* seg_all, float* out, float* lse, Scratch& w) {
  const int T = sh.T, D = sh.D, R = sh.R();
  const int64_t qs = sh.H * D, ks = sh.G * D;  // row strides
  const int32_t* seg = seg_all + b * T;
  const Operand kt = right_transposed<BF16>(k + (b * T * sh.G + g) * D, ks, T, D, w.tmp, w.kt);
  const Operand vr = right_rows<BF16>(v + (b * T * sh.G + g) * D, ks, T, D, w.v);
  for (int r = 0; r < R; ++r) {
    const int64_t h = g * R + r;
    for (int t0 = 0; t0 < T; t0 += kQB) {
      const int m = std::min(kQB, T - t0), n = t0 + m;  // keys 0..n-1 (causal)
      const Operand qa = left_rows<BF16>(q + ((b * T + t0) * sh.H + h) * D, qs, m, D, w.a);
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
        lse[(b * sh.H + h) * T + t] = mx + std::log(l_row[i]);
      }
      const Operand pa = left_rows<BF16>(w.s, n, m, n, w.pt);
      float* o = out + ((b * T + t0) * sh.H + h) * D;
      gemm<BF16>(m, D, kw(BF16, n), pa.p, pa.ld, vr.p, vr.ld, o, static_cast<int>(qs), false);
      for (int i = 0; i < m; ++i) {  // the denominator after the value product, as the XLA path
        const __m512 inv = _mm512_set1_ps(1.0f / l_row[i]);
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(o + i * qs + d, _mm512_mul_ps(_mm512_loadu_ps(o + i * qs + d), inv));
      }
    }
  }
}

// ---- backward -------------------------------------------------------------------------------

template <bool BF16>
void backward_task(const Shape& sh, int64_t b, int64_t g, const float* q, const float* k, const float* v,
                   const int32_t* seg_all, const float* out, const float* lse, const float* dout, float* dq,
                   float* dk, float* dv, Scratch& w) {
  const int T = sh.T, D = sh.D, R = sh.R();
  const int64_t qs = sh.H * D, ks = sh.G * D;
  const int32_t* seg = seg_all + b * T;
  const float* kb = k + (b * T * sh.G + g) * D;
  const Operand kt = right_transposed<BF16>(kb, ks, T, D, w.tmp, w.kt);                       // K^T
  const Operand vt = right_transposed<BF16>(v + (b * T * sh.G + g) * D, ks, T, D, w.tmp, w.vt);  // V^T
  const Operand kr = right_rows<BF16>(kb, ks, T, D, w.k);                                      // K, for dS K
  float* dkb = dk + (b * T * sh.G + g) * D;  // this task owns these rows of dk and dv
  float* dvb = dv + (b * T * sh.G + g) * D;
  for (int t = 0; t < T; ++t) std::memset(dkb + t * ks, 0, D * 4), std::memset(dvb + t * ks, 0, D * 4);
  for (int r = 0; r < R; ++r) {
    const int64_t h = g * R + r;
    for (int t0 = 0; t0 < T; t0 += kQB) {
      const int m = std::min(kQB, T - t0), n = t0 + m;
      const int64_t row0 = ((b * T + t0) * sh.H + h) * D;
      const float *qrow = q + row0, *dorow = dout + row0, *orow = out + row0;
      const Operand qa = left_rows<BF16>(qrow, qs, m, D, w.a);
      const Operand da = left_rows<BF16>(dorow, qs, m, D, w.a2);
      gemm<BF16>(m, n, kw(BF16, D), qa.p, qa.ld, kt.p, kt.ld, w.s, n, false);   // S
      gemm<BF16>(m, n, kw(BF16, D), da.p, da.ld, vt.p, vt.ld, w.dp, n, false);  // dO V^T
      for (int i = 0; i < m; ++i) {
        const int t = t0 + i;
        __m512 dl = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16)
          dl = _mm512_fmadd_ps(_mm512_loadu_ps(dorow + i * qs + d), _mm512_loadu_ps(orow + i * qs + d), dl);
        const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(dl));
        float* s = w.s + i * n;
        float* dp = w.dp + i * n;
        masked_exp(s, n, t, seg, lse[(b * sh.H + h) * T + t], nullptr);  // P
        for (int s0 = 0; s0 < n; s0 += 16)  // dS = P (dP - delta)
          _mm512_storeu_ps(dp + s0, _mm512_mul_ps(_mm512_loadu_ps(s + s0), _mm512_sub_ps(_mm512_loadu_ps(dp + s0), delta)));
      }
      // dV += P^T dO and dK += dS^T Q, contracting over this block's queries.
      const Operand dor = right_rows<BF16>(dorow, qs, m, D, w.dor);
      const Operand qr = right_rows<BF16>(qrow, qs, m, D, w.qr);
      const Operand pt = left_transposed<BF16>(w.s, m, n, n, w.tmp, w.pt);
      gemm<BF16>(n, D, kw(BF16, m), pt.p, pt.ld, dor.p, dor.ld, dvb, static_cast<int>(ks), true);
      const Operand dst = left_transposed<BF16>(w.dp, m, n, n, w.tmp, w.pt);
      gemm<BF16>(n, D, kw(BF16, m), dst.p, dst.ld, qr.p, qr.ld, dkb, static_cast<int>(ks), true);
      // dQ = dS K, straight into dq[b, t0:t0+m, h, :].
      const Operand dsa = left_rows<BF16>(w.dp, n, m, n, w.tmp);
      gemm<BF16>(m, D, kw(BF16, n), dsa.p, dsa.ld, kr.p, kr.ld, dq + row0, static_cast<int>(qs), false);
    }
  }
}

// ---- tasks over the XLA:CPU intra-op pool ---------------------------------------------------

// Runs fn(task) for task in [0, n) on the calling thread and the pool's threads. Helpers
// claim tasks from a shared counter, so a helper that starts late finds nothing and returns;
// the state lives on the heap because such a helper may outlive this call. The caller then
// sleeps (a futex, not a spin) until tasks a helper is still running are done: with more busy
// threads than cores (test workers, other processes) a spinning caller would take the core
// the helper needs.
template <typename Fn>
void parallel_tasks(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  const Fn* f = &fn;
  auto work = [st, f, n]() {
    for (int64_t i; (i = st->next.fetch_add(1)) < n;) {
      (*f)(i);
      if (st->done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) st->done.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  for (int64_t d; (d = st->done.load(std::memory_order_acquire)) < n;) st->done.wait(d, std::memory_order_acquire);
}

bool fits(const Shape& sh) {
  return sh.T % 16 == 0 && sh.D % 16 == 0 && sh.D <= kMaxD && sh.G > 0 && sh.H % sh.G == 0;
}

bool same(ffi::AnyBuffer::Dimensions d, std::initializer_list<int64_t> want) {
  return d.size() == want.size() && std::equal(want.begin(), want.end(), d.begin());
}

// The call's shape from q and k, every other operand checked against it: the kernel trusts
// nothing it reads past.
ffi::Error shape_of(ffi::AnyBuffer::Dimensions qd, ffi::AnyBuffer::Dimensions kd, Shape& sh) {
  if (qd.size() != 4 || kd.size() != 4) return ffi::Error::InvalidArgument("parcae attention: q and k need rank 4");
  sh = Shape{qd[0], qd[1], qd[2], kd[2], qd[3]};
  if (!fits(sh) || kd[0] != sh.B || kd[1] != sh.T || kd[3] != sh.D)
    return ffi::Error::InvalidArgument("parcae attention: needs T % 16 == 0, D % 16 == 0, D <= 256, H % G == 0");
  return ffi::Error::Success();
}

ffi::Error check(bool ok) {
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument("parcae attention: operand shapes disagree");
}

// Runs the tasks; an allocation that fails in one becomes an error, not a terminated process.
template <typename Fn>
ffi::Error run_tasks(ffi::ThreadPool& pool, const Shape& sh, const Fn& fn) {
  std::atomic<bool> failed{false};
  parallel_tasks(pool, sh.B * sh.G, [&](int64_t i) {
    try {
      fn(scratch(sh), i / sh.G, i % sh.G);
    } catch (const std::bad_alloc&) {
      failed.store(true);
    }
  });
  if (failed.load()) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "parcae attention: out of memory");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> seg, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                   bool bf16, bool bounded) {
  Shape sh;
  if (auto e = shape_of(q.dimensions(), k.dimensions(), sh); e.failure()) return e;
  const auto [B, T, H, G, D] = sh;
  if (auto e = check(same(v.dimensions(), {B, T, G, D}) && same(seg.dimensions(), {B, T}) &&
                     same(out->dimensions(), {B, T, H, D}) && same(lse->dimensions(), {B, H, T}));
      e.failure())
    return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* sp = seg.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  return run_tasks(pool, sh, [&](Scratch& w, int64_t b, int64_t g) {
    if (bf16) {
      forward_task<true>(sh, b, g, bounded, qp, kp, vp, sp, op, lp, w);
    } else {
      forward_task<false>(sh, b, g, bounded, qp, kp, vp, sp, op, lp, w);
    }
  });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, bool bf16) {
  Shape sh;
  if (auto e = shape_of(q.dimensions(), k.dimensions(), sh); e.failure()) return e;
  const auto [B, T, H, G, D] = sh;
  if (auto e = check(same(v.dimensions(), {B, T, G, D}) && same(seg.dimensions(), {B, T}) &&
                     same(out.dimensions(), {B, T, H, D}) && same(lse.dimensions(), {B, H, T}) &&
                     same(dout.dimensions(), {B, T, H, D}) && same(dq->dimensions(), {B, T, H, D}) &&
                     same(dk->dimensions(), {B, T, G, D}) && same(dv->dimensions(), {B, T, G, D}));
      e.failure())
    return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = dout.typed_data();
  const int32_t* sp = seg.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  return run_tasks(pool, sh, [&](Scratch& w, int64_t b, int64_t g) {
    if (bf16) {
      backward_task<true>(sh, b, g, qp, kp, vp, sp, op, lp, gp, dqp, dkp, dvp, w);
    } else {
      backward_task<false>(sh, b, g, qp, kp, vp, sp, op, lp, gp, dqp, dkp, dvp, w);
    }
  });
}

}  // namespace

// Queries per block: query block c reads keys up to its own end (describe.py counts them).
extern "C" int parcae_attention_query_block() { return kQB; }

// What this build runs: 1 float32 and bfloat16, 2 bfloat16 dots in AVX512-BF16, 4 on AMX tiles. Turns
// AMX on when `allow_amx` and the CPU and kernel grant it (tests turn it off to check the
// AVX512-BF16 path on AMX machines).

extern "C" int parcae_attention_init(int allow_amx) {
  int features = 1;
#ifdef __AVX512BF16__
  features |= 2;
#endif
#ifdef __AMX_BF16__
  if (allow_amx && amx_ready()) features |= 4;
#endif
  g_use_amx.store((features & 4) != 0);
  return features;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(parcae_attention_fwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("bf16")
                                  .Attr<bool>("bounded"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(parcae_attention_bwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("bf16"));
