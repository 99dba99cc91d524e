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
// Semantics (those of attention.py's XLA path): q and k are RoPE'd and qk-normed on the way in
// where the call asks (rope_norm.h), and q is scaled by `scale` (1/sqrt(D)); with
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

// One translation unit in eight files (each header says what it holds).
#include "bf16_pack.h"
#include "gemm.h"
#include "operands.h"
#include "parallel.h"
#include "rope_norm.h"
#include "tasks.h"
#include "passes.h"

using F32 = ffi::Buffer<ffi::F32>;
using Out32 = ffi::ResultBuffer<ffi::F32>;

InRows rows_of(const F32& x, int64_t offset) { return {x.typed_data(), x.dimensions().back(), offset}; }

ffi::Error Forward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, ffi::Buffer<ffi::S32> seg, F32 cos, F32 sin, Out32 out,
                   Out32 lse, bool bf16, bool bounded, bool rope, bool norm, float eps, float scale, int64_t heads,
                   int64_t kv_heads, int64_t head_dim, int64_t q_off, int64_t k_off, int64_t v_off) {
  const Heads hd{heads, kv_heads, head_dim, q_off, k_off, v_off};
  Shape sh;
  if (auto e = shape_of(q.dimensions(), k.dimensions(), v.dimensions(), hd, sh); e.failure()) return e;
  const auto [B, T, H, G, D] = sh;
  if (auto e = check(same(seg.dimensions(), {B, T}) && same(out->dimensions(), {B, T, H, D}) &&
                     same(lse->dimensions(), {B, H, T}));
      e.failure())
    return e;
  Prep prep;
  if (auto e = prep_of(sh, cos, sin, rope, norm, eps, prep); e.failure()) return e;
  const InRows qr = rows_of(q, q_off), kr = rows_of(k, k_off), vr = rows_of(v, v_off);
  const OutRows o{out->typed_data(), H * D, 0};
  const int32_t* sp = seg.typed_data();
  float* lp = lse->typed_data();
  return run_tasks(pool, sh, [&](Scratch& w, int64_t b, int64_t g) {
    if (bf16) {
      forward_task<true>(sh, b, g, bounded, prep, scale, qr, kr, vr, sp, o, lp, w);
    } else {
      forward_task<false>(sh, b, g, bounded, prep, scale, qr, kr, vr, sp, o, lp, w);
    }
  });
}

// A generation prefill: Forward without the log-sum-exp, and each task also writes its keys
// (processed) and values into rows 0..T-1 of the cache slots kc, vc [B*G, S, D] (aliased with
// their inputs, so rows from T on keep what they held): XLA would otherwise transpose and pad
// every layer's keys and values into the slots in loops of its own.
ffi::Error Prefill(ffi::ThreadPool pool, F32 q, F32 k, F32 v, ffi::Buffer<ffi::S32> seg, F32 cos, F32 sin, F32 kc_in,
                   F32 vc_in, Out32 out, Out32 kc, Out32 vc, bool bf16, bool bounded, bool rope, bool norm, float eps,
                   float scale, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t q_off, int64_t k_off,
                   int64_t v_off) {
  const Heads hd{heads, kv_heads, head_dim, q_off, k_off, v_off};
  Shape sh;
  if (auto e = shape_of(q.dimensions(), k.dimensions(), v.dimensions(), hd, sh); e.failure()) return e;
  const auto [B, T, H, G, D] = sh;
  const auto cd = kc_in.dimensions();
  const int64_t S = cd.size() == 3 ? cd[1] : 0;
  if (auto e = check(same(seg.dimensions(), {B, T}) && same(out->dimensions(), {B, T, H, D}) && S >= T &&
                     same(cd, {B * G, S, D}) && same(vc_in.dimensions(), {B * G, S, D}) &&
                     same(kc->dimensions(), {B * G, S, D}) && same(vc->dimensions(), {B * G, S, D}));
      e.failure())
    return e;
  Prep prep;
  if (auto e = prep_of(sh, cos, sin, rope, norm, eps, prep); e.failure()) return e;
  const InRows qr = rows_of(q, q_off), kr = rows_of(k, k_off), vr = rows_of(v, v_off);
  const OutRows o{out->typed_data(), H * D, 0};
  const int32_t* sp = seg.typed_data();
  float *kcp = kc->typed_data(), *vcp = vc->typed_data();
  return run_tasks(pool, sh, [&](Scratch& w, int64_t b, int64_t g) {
    if (bf16) {
      forward_task<true>(sh, b, g, bounded, prep, scale, qr, kr, vr, sp, o, nullptr, w);
    } else {
      forward_task<false>(sh, b, g, bounded, prep, scale, qr, kr, vr, sp, o, nullptr, w);
    }
    float* krow = kcp + (b * G + g) * S * D;  // the task's slot rows
    float* vrow = vcp + (b * G + g) * S * D;
    for (int t = 0; t < T; ++t) {  // forward_task left the processed keys in w.kp
      std::memcpy(krow + t * D, prep.active() ? w.kp + t * D : kr.at(T, b, t, g, D), D * 4);
      std::memcpy(vrow + t * D, vr.at(T, b, t, g, D), D * 4);
    }
  });
}

// The gradients go to d0, d1, d2: dq, dk, dv [B, T, heads * D] each, or with `packed` all three
// into d0, shaped like q (the projection's output, where dq, dk, dv sit at q_off, k_off, dv_off
// and fill it), and dv also into d1 [B, T, G * D] when v is a buffer of its own (else d1 is empty).
ffi::Error Backward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, ffi::Buffer<ffi::S32> seg, F32 cos, F32 sin, F32 out,
                    F32 lse, F32 dout, Out32 d0, Out32 d1, Out32 d2, bool bf16, bool rope, bool norm, float eps,
                    float scale, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t q_off, int64_t k_off,
                    int64_t v_off, bool packed, int64_t dv_off) {
  const Heads hd{heads, kv_heads, head_dim, q_off, k_off, v_off};
  Shape sh;
  if (auto e = shape_of(q.dimensions(), k.dimensions(), v.dimensions(), hd, sh); e.failure()) return e;
  const auto [B, T, H, G, D] = sh;
  const int64_t F = q.dimensions().back();
  bool ok = same(seg.dimensions(), {B, T}) && same(out.dimensions(), {B, T, H, D}) &&
            same(lse.dimensions(), {B, H, T}) && same(dout.dimensions(), {B, T, H, D});
  const bool v_own = packed && same(d1->dimensions(), {B, T, G * D});
  if (packed)  // d0 is the whole projection: q, k, v side by side, nothing else
    ok = ok && F == (H + 2 * G) * D && q_off == 0 && k_off == H * D && dv_off == (H + G) * D &&
         same(d0->dimensions(), {B, T, F}) && (v_own || same(d1->dimensions(), {0}));
  else
    ok = ok && same(d0->dimensions(), {B, T, H * D}) && same(d1->dimensions(), {B, T, G * D}) &&
         same(d2->dimensions(), {B, T, G * D});
  if (auto e = check(ok); e.failure()) return e;
  Prep prep;
  if (auto e = prep_of(sh, cos, sin, rope, norm, eps, prep); e.failure()) return e;
  const InRows qr = rows_of(q, q_off), kr = rows_of(k, k_off), vr = rows_of(v, v_off);
  const InRows o{out.typed_data(), H * D, 0}, go{dout.typed_data(), H * D, 0};
  OutRows dq{d0->typed_data(), H * D, 0}, dk{d1->typed_data(), G * D, 0}, dv{d2->typed_data(), G * D, 0};
  float* dv2 = nullptr;
  if (packed) {
    dq = {d0->typed_data(), F, q_off}, dk = {d0->typed_data(), F, k_off}, dv = {d0->typed_data(), F, dv_off};
    dv2 = v_own ? d1->typed_data() : nullptr;
  }
  const int32_t* sp = seg.typed_data();
  const float* lp = lse.typed_data();
  return run_tasks(pool, sh, [&](Scratch& w, int64_t b, int64_t g) {
    if (bf16) {
      backward_task<true>(sh, b, g, prep, scale, qr, kr, vr, sp, o, lp, go, dq, dk, dv, dv2, w);
    } else {
      backward_task<false>(sh, b, g, prep, scale, qr, kr, vr, sp, o, lp, go, dq, dk, dv, dv2, w);
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
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("bf16")
                                  .Attr<bool>("bounded")
                                  .Attr<bool>("rope")
                                  .Attr<bool>("norm")
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("head_dim")
                                  .Attr<int64_t>("q_off")
                                  .Attr<int64_t>("k_off")
                                  .Attr<int64_t>("v_off"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(parcae_attention_prefill, Prefill,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("bf16")
                                  .Attr<bool>("bounded")
                                  .Attr<bool>("rope")
                                  .Attr<bool>("norm")
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("head_dim")
                                  .Attr<int64_t>("q_off")
                                  .Attr<int64_t>("k_off")
                                  .Attr<int64_t>("v_off"));

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
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("bf16")
                                  .Attr<bool>("rope")
                                  .Attr<bool>("norm")
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("head_dim")
                                  .Attr<int64_t>("q_off")
                                  .Attr<int64_t>("k_off")
                                  .Attr<int64_t>("v_off")
                                  .Attr<bool>("packed")
                                  .Attr<int64_t>("dv_off"));
