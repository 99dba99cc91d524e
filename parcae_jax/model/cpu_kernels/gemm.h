// Register-blocked products C[M,N] (+)= A[M,K] B[K,N]: AVX-512 float32 FMAs or bf16 pair dots,
// and AMX tiles for bf16 where the CPU has them. Part of attention.cc's translation unit.

#pragma once

// ---- GEMM: C[M,N] (+)= A[M,K] B[K,N] ---------------------------------------------------------
// Elements are 32-bit: floats, or with BF16 pairs of bfloat16 along the contraction (K counts
// pairs). A is row-major (lda), B row-major (ldb), N % 16 == 0.

template <bool BF16, int MR, int NV>
inline void micro(int K, const uint32_t* A, int lda, const uint32_t* B, int ldb, float* C, int ldc,
                  bool accumulate) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(reinterpret_cast<const float*>(B + k * ldb + 16 * v));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      __m512i a = _mm512_set1_epi32(static_cast<int>(A[r * lda + k]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if constexpr (BF16) {
          c[r][v] = dot_bf16(c[r][v], a, b[v]);
        } else {
          c[r][v] = _mm512_fmadd_ps(_mm512_castsi512_ps(a), b[v], c[r][v]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

template <bool BF16, int MR>
inline void micro_n(int nv, int K, const uint32_t* A, int lda, const uint32_t* B, int ldb, float* C, int ldc,
                    bool acc) {
  switch (nv) {
    case 4: return micro<BF16, MR, 4>(K, A, lda, B, ldb, C, ldc, acc);
    case 3: return micro<BF16, MR, 3>(K, A, lda, B, ldb, C, ldc, acc);
    case 2: return micro<BF16, MR, 2>(K, A, lda, B, ldb, C, ldc, acc);
    default: return micro<BF16, MR, 1>(K, A, lda, B, ldb, C, ldc, acc);
  }
}

// Rows of C in register blocks of 6, then one block of the 1-5 left over.
template <bool BF16>
void gemm_avx512(int M, int N, int K, const uint32_t* A, int lda, const uint32_t* B, int ldb, float* C, int ldc,
                 bool acc) {
  for (int j = 0; j < N; j += 64) {
    const int nv = std::min(4, (N - j) / 16);
    int i = 0;
    for (; i + 6 <= M; i += 6) micro_n<BF16, 6>(nv, K, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, acc);
    const uint32_t* a = A + i * lda;
    float* c = C + i * ldc + j;
    switch (M - i) {
      case 5: micro_n<BF16, 5>(nv, K, a, lda, B + j, ldb, c, ldc, acc); break;
      case 4: micro_n<BF16, 4>(nv, K, a, lda, B + j, ldb, c, ldc, acc); break;
      case 3: micro_n<BF16, 3>(nv, K, a, lda, B + j, ldb, c, ldc, acc); break;
      case 2: micro_n<BF16, 2>(nv, K, a, lda, B + j, ldb, c, ldc, acc); break;
      case 1: micro_n<BF16, 1>(nv, K, a, lda, B + j, ldb, c, ldc, acc); break;
      default: break;
    }
  }
}

#ifdef __AMX_BF16__
// AMX: bf16 tiles of 16 rows x 32 values (16 pairs), C tiles of 16 x 16 floats. Tiles 0-3 hold
// a 32 x 32 block of C, 4-5 the A rows, 6-7 the B columns. The pair layout above is the VNNI
// layout the B tiles take.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_ready() {  // the kernel must ask Linux for the tile state once per process
  static const bool ok = [] {
    constexpr long kReqPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
  }();
  return ok;
}

template <int MI, int NJ>
inline void amx_block(int K, const uint32_t* A, int lda, const uint32_t* B, int ldb, float* C, int ldc, bool acc) {
  const int sa = lda * 4, sb = ldb * 4, sc = ldc * 4;
  if (acc) {
    _tile_loadd(0, C, sc);
    if (NJ > 1) _tile_loadd(1, C + 16, sc);
    if (MI > 1) _tile_loadd(2, C + 16 * ldc, sc);
    if (MI > 1 && NJ > 1) _tile_loadd(3, C + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  }
  for (int k = 0; k < K; k += 16) {
    _tile_loadd(4, A + k, sa);
    if (MI > 1) _tile_loadd(5, A + 16 * lda + k, sa);
    _tile_loadd(6, B + k * ldb, sb);
    if (NJ > 1) _tile_loadd(7, B + k * ldb + 16, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (NJ > 1) _tile_dpbf16ps(1, 4, 7);
    if (MI > 1) _tile_dpbf16ps(2, 5, 6);
    if (MI > 1 && NJ > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, sc);
  if (NJ > 1) _tile_stored(1, C + 16, sc);
  if (MI > 1) _tile_stored(2, C + 16 * ldc, sc);
  if (MI > 1 && NJ > 1) _tile_stored(3, C + 16 * ldc + 16, sc);
}

// M, N multiples of 16, K (pairs) a multiple of 16.
void gemm_amx(int M, int N, int K, const uint32_t* A, int lda, const uint32_t* B, int ldb, float* C, int ldc,
              bool acc) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  for (int i = 0; i < M; i += 32) {
    for (int j = 0; j < N; j += 32) {
      const bool mi = M - i >= 32, nj = N - j >= 32;
      const uint32_t* a = A + i * lda;
      const uint32_t* b = B + j;
      float* c = C + i * ldc + j;
      if (mi && nj) amx_block<2, 2>(K, a, lda, b, ldb, c, ldc, acc);
      else if (mi) amx_block<2, 1>(K, a, lda, b, ldb, c, ldc, acc);
      else if (nj) amx_block<1, 2>(K, a, lda, b, ldb, c, ldc, acc);
      else amx_block<1, 1>(K, a, lda, b, ldb, c, ldc, acc);
    }
  }
  _tile_release();
}
#endif

std::atomic<bool> g_use_amx{false};  // parcae_attention_init

template <bool BF16>
void gemm(int M, int N, int K, const uint32_t* A, int lda, const uint32_t* B, int ldb, float* C, int ldc,
          bool acc) {
#ifdef __AMX_BF16__
  if (BF16 && g_use_amx.load(std::memory_order_relaxed) && M % 16 == 0 && N % 16 == 0 && K % 16 == 0)
    return gemm_amx(M, N, K, A, lda, B, ldb, C, ldc, acc);
#endif
  gemm_avx512<BF16>(M, N, K, A, lda, B, ldb, C, ldc, acc);
}

