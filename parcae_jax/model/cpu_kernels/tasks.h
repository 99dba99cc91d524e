// The checks every attention call makes on its operands' shapes and RoPE tables, and its tasks
// (parallel.h) with their scratch.
// Part of attention.cc's translation unit (inside its anonymous namespace).

#pragma once

bool fits(const Shape& sh) {
  return sh.T % 16 == 0 && sh.D % 16 == 0 && sh.D <= kMaxD && sh.G > 0 && sh.H % sh.G == 0;
}

bool same(ffi::AnyBuffer::Dimensions d, std::initializer_list<int64_t> want) {
  return d.size() == want.size() && std::equal(want.begin(), want.end(), d.begin());
}

// The call's shape from q and k, every other operand checked against it: the kernel trusts
// nothing it reads past.
// The operands' layout: q, k and v buffers [B, T, F] (F at least offset + heads * D), the shape
// from the attributes. Every other operand is checked against it: the kernel trusts nothing it
// reads past.
struct Heads {
  int64_t H, G, D, q_off, k_off, v_off;
};

ffi::Error shape_of(ffi::AnyBuffer::Dimensions qd, ffi::AnyBuffer::Dimensions kd, ffi::AnyBuffer::Dimensions vd,
                    const Heads& hd, Shape& sh) {
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3)
    return ffi::Error::InvalidArgument("parcae attention: q, k and v need rank 3 [B, T, features]");
  sh = Shape{qd[0], qd[1], hd.H, hd.G, hd.D};
  if (!fits(sh))
    return ffi::Error::InvalidArgument("parcae attention: needs T % 16 == 0, D % 16 == 0, D <= 256, H % G == 0");
  const bool ok = kd[0] == sh.B && vd[0] == sh.B && kd[1] == sh.T && vd[1] == sh.T && hd.q_off >= 0 &&
                  hd.k_off >= 0 && hd.v_off >= 0 && hd.q_off + hd.H * hd.D <= qd[2] &&
                  hd.k_off + hd.G * hd.D <= kd[2] && hd.v_off + hd.G * hd.D <= vd[2];
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument("parcae attention: heads outside q, k or v");
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

// The call's RoPE tables and qk-norm as a Prep: cos and sin [Bc, T, D/2] with Bc 1 or B when
// `rope` (else ignored), the norm when `norm`.
ffi::Error prep_of(const Shape& sh, const ffi::Buffer<ffi::F32>& cos, const ffi::Buffer<ffi::F32>& sin, bool rope,
                   bool norm, float eps, Prep& p) {
  p = Prep{};
  p.norm = norm, p.eps = eps;
  if (!rope) return ffi::Error::Success();
  const auto d = cos.dimensions();
  const bool ok = d.size() == 3 && (d[0] == 1 || d[0] == sh.B) && d[1] == sh.T && d[2] == sh.D / 2 &&
                  same(sin.dimensions(), {d[0], d[1], d[2]});
  if (!ok) return ffi::Error::InvalidArgument("parcae attention: RoPE tables need shape [1 or B, T, D/2]");
  p.cos = cos.typed_data(), p.sin = sin.typed_data();
  p.batch_stride = d[0] == 1 ? 0 : sh.T * (sh.D / 2);
  return ffi::Error::Success();
}
