// bfloat16 rounding, the pair layout of bf16 products and 32-bit transposes (AVX-512).
// Part of the attention, transpose and loss kernels' translation units (inside their anonymous
// namespaces).

#pragma once

// ---- bfloat16 -------------------------------------------------------------------------------

// 16 floats -> 16 bfloat16, rounded to nearest even (NaN stays NaN).
inline __m256i cvt_bf16(__m512 x) {
#ifdef __AVX512BF16__
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
#endif
}

// n floats (n % 16 == 0) -> n bf16 in memory order: read as uint32, element 2i is the low half
// of pair i, which is the operand form the bf16 dots take along the contraction.
inline void row_to_bf16(const float* x, uint16_t* out, int n) {
  for (int i = 0; i < n; i += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), cvt_bf16(_mm512_loadu_ps(x + i)));
}

// Two float rows (n % 16 == 0) -> n uint32 pairs (lo[i], hi[i]): contraction along rows.
inline void rows_to_pairs(const float* lo, const float* hi, uint32_t* out, int n) {
  for (int i = 0; i < n; i += 16) {
    const __m512i l = _mm512_cvtepu16_epi32(cvt_bf16(_mm512_loadu_ps(lo + i)));
    const __m512i h = _mm512_cvtepu16_epi32(cvt_bf16(_mm512_loadu_ps(hi + i)));
    _mm512_storeu_si512(out + i, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
  }
}

// acc += a.lo * b.lo + a.hi * b.hi per 32-bit lane (bf16 pairs, float32 accumulation).
inline __m512 dot_bf16(__m512 acc, __m512i a, __m512 b) {
#ifdef __AVX512BF16__
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else  // a bf16 times a bf16 is exact in float32: two FMAs on the widened halves
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const __m512i bi = _mm512_castps_si512(b);
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(bi, 16)), acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)), _mm512_castsi512_ps(_mm512_and_si512(bi, hi)), acc);
#endif
}

// dst[c][r] = src[r][c] for a 16 x 16 block of 32-bit elements: swapping the off-diagonal
// d x d blocks of every 2d x 2d block, for d = 8, 4, 2, 1, transposes the whole.
inline void transpose16(const uint32_t* src, int lds, uint32_t* dst, int ldd) {
  struct Index {
    __m512i lo[4], hi[4];
    Index() {
      for (int l = 0; l < 4; ++l) {
        const int d = 8 >> l;
        alignas(64) int a[16], b[16];
        for (int c = 0; c < 16; ++c) {
          a[c] = (c & d) ? 16 + c - d : c;
          b[c] = (c & d) ? 16 + c : c + d;
        }
        lo[l] = _mm512_load_si512(a);
        hi[l] = _mm512_load_si512(b);
      }
    }
  };
  static const Index idx;
  __m512i r[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * lds);
#pragma GCC unroll 4
  for (int l = 0; l < 4; ++l) {
    const int d = 8 >> l;
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i & d) continue;
      const __m512i a = r[i], b = r[i + d];
      r[i] = _mm512_permutex2var_epi32(a, idx.lo[l], b);
      r[i + d] = _mm512_permutex2var_epi32(a, idx.hi[l], b);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * ldd, r[i]);
}

// dst[c][r] = src[r][c] for 32-bit elements.
inline void transpose32(const uint32_t* src, int rows, int cols, int lds, uint32_t* dst, int ldd) {
  for (int r0 = 0; r0 < rows; r0 += 16) {
    for (int c0 = 0; c0 < cols; c0 += 16) {
      if (r0 + 16 <= rows && c0 + 16 <= cols) {
        transpose16(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
        continue;
      }
      for (int r = r0; r < std::min(rows, r0 + 16); ++r)
        for (int c = c0; c < std::min(cols, c0 + 16); ++c) dst[c * ldd + r] = src[r * lds + c];
    }
  }
}

