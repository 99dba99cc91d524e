// A transpose [M, N] -> [N, M] of bfloat16 (parcae_transpose), for x86 CPUs with AVX-512. Used by model/matmul.py for the row-major copies its weight gradients read.
//
// Why: XLA:CPU fuses the copy into the loop that produces its operand (an RMSNorm, a cast to
// bfloat16) and writes the transposed output element by element, reading the operand with a
// stride: ~0.35 ms for a [2048, 256] bfloat16 activation on a 2-core Zen 4, 35 of them per
// bench step. Here the operand is whatever XLA materialised and the copy goes by 16 x 16
// blocks of 32-bit words in registers (bf16_pack.h's transpose16).
//
// Two rows t, t + 1 are interleaved into 32-bit words (x[t][k], x[t + 1][k]), and the 16 x 16
// transpose of those words puts x[t][k] and x[t + 1][k] side by side in row k of the output,
// which is where they belong. Needs M % 32 == 0 and N % 16 == 0; matmul.py asks for nothing
// else. (float32 copies gained nothing: XLA:CPU's own are fast enough there.)

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

#ifndef __AVX512F__
#error "the transpose kernel needs AVX-512 (library.py checks the CPU before compiling)"
#endif

namespace ffi = xla::ffi;

namespace {

#include "bf16_pack.h"
#include "parallel.h"

// Rows [r0, r0 + 32) x columns [c0, c0 + 16) of x [M, N]: pairs of rows interleaved into 16 x 16
// words, transposed into rows c0.. of the [N, M] output.
inline void block16(const uint16_t* x, int64_t N, int64_t M, int64_t r0, int64_t c0, uint16_t* out) {
  alignas(64) uint32_t words[16 * 16];
  for (int i = 0; i < 16; ++i) {
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + (r0 + 2 * i) * N + c0)));
    const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + (r0 + 2 * i + 1) * N + c0)));
    _mm512_store_si512(words + 16 * i, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
  transpose16(words, 16, reinterpret_cast<uint32_t*>(out + c0 * M + r0), static_cast<int>(M / 2));
}

ffi::Error Transpose(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::ResultBuffer<ffi::BF16> out) {
  const auto d = x.dimensions();
  if (d.size() != 2 || out->dimensions().size() != 2 || out->dimensions()[0] != d[1] || out->dimensions()[1] != d[0])
    return ffi::Error::InvalidArgument("parcae transpose: needs x [M, N] and a result [N, M]");
  const int64_t M = d[0], N = d[1];
  if (M % 32 != 0 || N % 16 != 0) return ffi::Error::InvalidArgument("parcae transpose: needs M % 32 == 0 and N % 16 == 0");
  if (M / 2 * 16 > INT32_MAX || N * 16 > INT32_MAX)  // transpose16 strides are int
    return ffi::Error::InvalidArgument("parcae transpose: operand too large for 32-bit strides");
  const auto* src = reinterpret_cast<const uint16_t*>(x.untyped_data());
  auto* dst = reinterpret_cast<uint16_t*>(out->untyped_data());
  // a task: 32 rows of the input (all of its columns), so each task reads contiguous memory
  parallel_tasks(pool, M / 32, [&](int64_t b) {
    for (int64_t c = 0; c < N; c += 16) block16(src, N, M, b * 32, c, dst);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(parcae_transpose, Transpose,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
