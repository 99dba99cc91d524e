// The LM head's softmax cross-entropy and its logits' gradient in one pass over each row
// (parcae_head_xent), for x86 CPUs with AVX-512. Used by model/xent.py's custom VJP.
//
// Why: XLA:CPU reads the float32 [N, V] logits three times (the max, the sum of exponentials,
// then the gradient `softmax - onehot` cast to the compute dtype) and runs the last loop on one
// thread: ~6 ms per bench step on a 2-core Zen 4 at N = 2048, V = 4096. Here each row (16 KiB at
// V = 4096) is read from memory once and stays in cache for its three passes, on every thread.
//
// Per row, in float32: x = z * scale; m = max(x); e = exp(x - m); s = sum(e);
//   loss = m + log(s) - x[target]
//   d    = (e * (1 / s) - onehot(target)) * scale, rounded to the result's dtype (bf16 or f32).
// Where XLA computes exp(x - lse), this divides once per row instead: the two agree to a few
// units in the last place of float32. A NaN logit makes its row's loss and gradient NaN (the
// training step's guard then skips the step); so does a target outside [0, V).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifndef __AVX512F__
#error "the head cross-entropy kernel needs AVX-512 (library.py checks the CPU before compiling)"
#endif

namespace ffi = xla::ffi;

namespace {

#include "bf16_pack.h"
#include "exp512.h"
#include "parallel.h"

constexpr int64_t kRows = 8;  // rows per task

// Streaming stores: the gradient goes to memory without first reading the lines it overwrites,
// which would otherwise cost as much traffic again as writing it. They need aligned addresses,
// which every row has when the buffer does (XLA:CPU's temporaries are 64-byte aligned); the
// caller picks ordinary stores otherwise.
template <bool STREAM>
inline void store16(float* d, __m512 x) {
  if constexpr (STREAM) _mm512_stream_ps(d, x); else _mm512_storeu_ps(d, x);
}
template <bool STREAM>
inline void store16(uint16_t* d, __m512 x) {
  const __m256i h = cvt_bf16(x);
  if constexpr (STREAM) _mm256_stream_si256(reinterpret_cast<__m256i*>(d), h);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), h);
}

// One row of V floats (V % 16 == 0); e is V floats of scratch.
template <bool STREAM, typename Out>
void row(const float* z, int64_t V, int32_t target, float scale, float* e, float* loss, Out* d) {
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < V; i += 16)  // x first: a NaN x leaves the max alone, the sum catches it
    mx = _mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(z + i), sc), mx);
  const float m = _mm512_reduce_max_ps(mx);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < V; i += 16) {
    const __m512 p = exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(z + i), sc), mv));
    _mm512_storeu_ps(e + i, p);
    sum = _mm512_add_ps(sum, p);
  }
  const float s = _mm512_reduce_add_ps(sum);
  const bool valid = target >= 0 && target < V;
  *loss = valid ? m + std::log(s) - z[target] * scale : std::numeric_limits<float>::quiet_NaN();
  const __m512 inv = _mm512_set1_ps(valid ? 1.0f / s : std::numeric_limits<float>::quiet_NaN());
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < V; i += 16) {
    __m512 p = _mm512_mul_ps(_mm512_loadu_ps(e + i), inv);
    if (target >= i && target < i + 16) p = _mm512_mask_sub_ps(p, __mmask16(1u << (target - i)), p, one);
    store16<STREAM>(d + i, _mm512_mul_ps(p, sc));
  }
}

ffi::Error HeadXent(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::S32> target,
                    ffi::ResultBuffer<ffi::F32> loss, ffi::Result<ffi::AnyBuffer> d, float scale) {
  const auto dims = z.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("parcae head_xent: logits need a vocab axis");
  const int64_t V = dims.back(), N = static_cast<int64_t>(z.element_count()) / std::max<int64_t>(V, 1);
  if (V == 0 || V % 16 != 0) return ffi::Error::InvalidArgument("parcae head_xent: needs a vocab multiple of 16");
  if (static_cast<int64_t>(target.element_count()) != N || static_cast<int64_t>(loss->element_count()) != N ||
      static_cast<int64_t>(d->element_count()) != N * V)
    return ffi::Error::InvalidArgument("parcae head_xent: logits [N, V], targets [N], loss [N], gradient [N, V]");
  const bool bf16 = d->element_type() == ffi::DataType::BF16;
  // each row starts V * 2 (bf16) or V * 4 bytes on, a multiple of 32 or 64: aligned as the buffer is
  const bool stream = reinterpret_cast<uintptr_t>(d->untyped_data()) % (bf16 ? 32 : 64) == 0;
  if (!bf16 && d->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("parcae head_xent: the gradient is bfloat16 or float32");
  const float* zp = z.typed_data();
  const int32_t* tp = target.typed_data();
  float* lp = loss->typed_data();
  auto rows = [&](auto* dp) {  // the gradient typed as uint16_t (bf16) or float
    parallel_tasks(pool, (N + kRows - 1) / kRows, [&](int64_t task) {
      thread_local std::vector<float> e;
      if (static_cast<int64_t>(e.size()) < V) e.resize(V);
      for (int64_t r = task * kRows; r < std::min(N, (task + 1) * kRows); ++r) {
        if (stream) row<true>(zp + r * V, V, tp[r], scale, e.data(), lp + r, dp + r * V);
        else row<false>(zp + r * V, V, tp[r], scale, e.data(), lp + r, dp + r * V);
      }
      _mm_sfence();  // the streaming stores land before the task counts as done
    });
  };
  if (bf16) rows(static_cast<uint16_t*>(d->untyped_data()));
  else rows(static_cast<float*>(d->untyped_data()));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(parcae_head_xent, HeadXent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));
