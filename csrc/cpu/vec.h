// A float vector of the widest kind this CPU has (AVX-512: 16 lanes, AVX2: 8, otherwise a plain
// array the compiler may vectorize), with the few operations the kernels need, and bf16 <-> fp32
// conversions that round as torch does (to nearest even). The library is compiled for the CPU it
// runs on (-march=native at install), so the choice is made by the compiler's feature macros.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define THRIFTY_AVX512 1
#include <immintrin.h>
#if defined(__AVX512BF16__)
#define THRIFTY_AVX512BF16 1
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define THRIFTY_AVX2 1
#include <immintrin.h>
#endif

namespace thrifty {

using bf16 = uint16_t;  // the raw bits of a bfloat16

inline float bf16_to_float(bf16 v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16(0x7fc0);  // NaN, as c10::BFloat16
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16(u >> 16);
}

// Rounds a float to the nearest bf16 value and back: the result of a bf16 operation.
inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// Scalar loads and stores from either element type, so kernels can be templates over it.
inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return bf16_to_float(v); }
inline void store_scalar(float* p, float v) { *p = v; }
inline void store_scalar(bf16* p, float v) { *p = float_to_bf16(v); }
// The value a tensor of element type T holds after storing v: rounding points of bf16 models.
inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const bf16*) { return round_bf16(v); }

#if defined(THRIFTY_AVX512)
struct FVec {
  static constexpr int N = 16;
  __m512 v;
  FVec() = default;
  explicit FVec(__m512 x) : v(x) {}
  explicit FVec(float x) : v(_mm512_set1_ps(x)) {}
  static FVec zero() { return FVec(_mm512_setzero_ps()); }
  static FVec load(const float* p) { return FVec(_mm512_loadu_ps(p)); }
  static FVec load(const bf16* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return FVec(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(bf16* p) const {
#if defined(THRIFTY_AVX512BF16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
#endif
  }
  friend FVec operator+(FVec a, FVec b) { return FVec(_mm512_add_ps(a.v, b.v)); }
  friend FVec operator-(FVec a, FVec b) { return FVec(_mm512_sub_ps(a.v, b.v)); }
  friend FVec operator*(FVec a, FVec b) { return FVec(_mm512_mul_ps(a.v, b.v)); }
  friend FVec operator/(FVec a, FVec b) { return FVec(_mm512_div_ps(a.v, b.v)); }
  static FVec fma(FVec a, FVec b, FVec c) { return FVec(_mm512_fmadd_ps(a.v, b.v, c.v)); }  // a*b+c
  static FVec max(FVec a, FVec b) { return FVec(_mm512_max_ps(a.v, b.v)); }
  static FVec min(FVec a, FVec b) { return FVec(_mm512_min_ps(a.v, b.v)); }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
  // Rounds every lane to the nearest bf16 value (kept as float).
  FVec round_bf16() const {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))),
                                 _mm512_set1_epi32(int(0xffff0000u)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return FVec(_mm512_mask_blend_ps(nan, _mm512_castsi512_ps(r), v));
  }
  // 2^n for integral-valued float lanes n in [-126, 127].
  static FVec pow2(FVec n) {
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23);
    return FVec(_mm512_castsi512_ps(e));
  }
  static FVec round_nearest(FVec a) { return FVec(_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT)); }
};
#elif defined(THRIFTY_AVX2)
struct FVec {
  static constexpr int N = 8;
  __m256 v;
  FVec() = default;
  explicit FVec(__m256 x) : v(x) {}
  explicit FVec(float x) : v(_mm256_set1_ps(x)) {}
  static FVec zero() { return FVec(_mm256_setzero_ps()); }
  static FVec load(const float* p) { return FVec(_mm256_loadu_ps(p)); }
  static FVec load(const bf16* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return FVec(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(bf16* p) const {
    __m256i r = _mm256_srli_epi32(_mm256_castps_si256(round_bf16().v), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  friend FVec operator+(FVec a, FVec b) { return FVec(_mm256_add_ps(a.v, b.v)); }
  friend FVec operator-(FVec a, FVec b) { return FVec(_mm256_sub_ps(a.v, b.v)); }
  friend FVec operator*(FVec a, FVec b) { return FVec(_mm256_mul_ps(a.v, b.v)); }
  friend FVec operator/(FVec a, FVec b) { return FVec(_mm256_div_ps(a.v, b.v)); }
  static FVec fma(FVec a, FVec b, FVec c) { return FVec(_mm256_fmadd_ps(a.v, b.v, c.v)); }
  static FVec max(FVec a, FVec b) { return FVec(_mm256_max_ps(a.v, b.v)); }
  static FVec min(FVec a, FVec b) { return FVec(_mm256_min_ps(a.v, b.v)); }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  FVec round_bf16() const {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))),
                                 _mm256_set1_epi32(int(0xffff0000u)));
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return FVec(_mm256_blendv_ps(_mm256_castsi256_ps(r), v, nan));
  }
  static FVec pow2(FVec n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
    return FVec(_mm256_castsi256_ps(e));
  }
  static FVec round_nearest(FVec a) { return FVec(_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
};
#else
struct FVec {  // portable fallback: the compiler vectorizes what it can
  static constexpr int N = 8;
  float v[N];
  FVec() = default;
  explicit FVec(float x) { for (int i = 0; i < N; ++i) v[i] = x; }
  static FVec zero() { return FVec(0.f); }
  template <typename T>
  static FVec load(const T* p) { FVec r; for (int i = 0; i < N; ++i) r.v[i] = to_float(p[i]); return r; }
  template <typename T>
  void store(T* p) const { for (int i = 0; i < N; ++i) store_scalar(p + i, v[i]); }
#define THRIFTY_FVEC_BINOP(op) \
  friend FVec operator op(FVec a, FVec b) { FVec r; for (int i = 0; i < N; ++i) r.v[i] = a.v[i] op b.v[i]; return r; }
  THRIFTY_FVEC_BINOP(+) THRIFTY_FVEC_BINOP(-) THRIFTY_FVEC_BINOP(*) THRIFTY_FVEC_BINOP(/)
#undef THRIFTY_FVEC_BINOP
  static FVec fma(FVec a, FVec b, FVec c) { FVec r; for (int i = 0; i < N; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]); return r; }
  static FVec max(FVec a, FVec b) { FVec r; for (int i = 0; i < N; ++i) r.v[i] = std::max(a.v[i], b.v[i]); return r; }
  static FVec min(FVec a, FVec b) { FVec r; for (int i = 0; i < N; ++i) r.v[i] = std::min(a.v[i], b.v[i]); return r; }
  float reduce_add() const { float s = 0; for (int i = 0; i < N; ++i) s += v[i]; return s; }
  float reduce_max() const { float s = v[0]; for (int i = 1; i < N; ++i) s = std::max(s, v[i]); return s; }
  FVec round_bf16() const { FVec r; for (int i = 0; i < N; ++i) r.v[i] = thrifty::round_bf16(v[i]); return r; }
  static FVec pow2(FVec n) { FVec r; for (int i = 0; i < N; ++i) r.v[i] = std::ldexp(1.f, int(n.v[i])); return r; }
  static FVec round_nearest(FVec a) { FVec r; for (int i = 0; i < N; ++i) r.v[i] = std::nearbyint(a.v[i]); return r; }
};
#endif

// e^x for every lane: range reduction to r in [-ln2/2, ln2/2], a degree-6 polynomial, times 2^n.
// Relative error about 2e-7. Lanes are clamped to [-87, 88]: below, e^x is about 1e-38 (not 0),
// which every caller only ever adds to a sum of at least 1; above, it stays finite.
inline FVec exp(FVec x) {
  x = FVec::min(FVec::max(x, FVec(-87.f)), FVec(88.f));
  FVec n = FVec::round_nearest(x * FVec(1.44269504088896341f));
  FVec n_capped = FVec::max(FVec(-126.f), n);
  FVec r = FVec::fma(n_capped, FVec(-0.693145751953125f), x);
  r = FVec::fma(n_capped, FVec(-1.428606765330187045e-06f), r);
  FVec p(1.f / 720);
  p = FVec::fma(p, r, FVec(1.f / 120));
  p = FVec::fma(p, r, FVec(1.f / 24));
  p = FVec::fma(p, r, FVec(1.f / 6));
  p = FVec::fma(p, r, FVec(0.5f));
  p = FVec::fma(p, r, FVec(1.f));
  p = FVec::fma(p, r, FVec(1.f));
  return p * FVec::pow2(n_capped);
}

// What a tensor of element type T holds after an operation: every lane rounded (fp32: as is).
template <typename T>
inline FVec rounded(FVec v) {
  if constexpr (std::is_same_v<T, bf16>) return v.round_bf16();
  return v;
}

// SiLU(gate) * up as the reference computes it in T: the SiLU in fp32, rounded to T, times up.
template <typename T>
inline FVec silu_times(FVec gate, FVec up) {
  return rounded<T>(gate / (FVec(1.f) + exp(FVec::zero() - gate))) * up;
}

// Reads FVec::N pairs (two consecutive bf16 per lane: a bf16 pair layout's lanes) as two float
// vectors, the first and the second element of each pair: a shift and a mask, no conversion.
inline void load_pairs(const bf16* p, FVec& first, FVec& second) {
#if defined(THRIFTY_AVX512)
  __m512i raw = _mm512_loadu_si512(p);
  first = FVec(_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)));
  second = FVec(_mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int(0xffff0000u)))));
#elif defined(THRIFTY_AVX2)
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  first = FVec(_mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)));
  second = FVec(_mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(int(0xffff0000u)))));
#else
  for (int i = 0; i < FVec::N; ++i) {
    first.v[i] = bf16_to_float(p[2 * i]);
    second.v[i] = bf16_to_float(p[2 * i + 1]);
  }
#endif
}


// Quantized weights (gemm.h): IEEE fp16 scales, int8 quants and pairs of 4-bit quants.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) return std::copysign(std::ldexp(float(mant), -24), sign ? -1.f : 1.f);  // zero, subnormal
  const uint32_t u = sign | (exp == 31 ? 0x7f800000u : (exp + 112) << 23) | (mant << 13);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// FVec::N fp16 at p.
inline FVec load_fp16(const uint8_t* p) {
#if defined(THRIFTY_AVX512)
  return FVec(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(THRIFTY_AVX2)
  return FVec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  FVec r;
  for (int i = 0; i < FVec::N; ++i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    r.v[i] = half_to_float(h);
  }
  return r;
#endif
}

// FVec::N int8 at p.
inline FVec load_int8(const uint8_t* p) {
#if defined(THRIFTY_AVX512)
  return FVec(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(THRIFTY_AVX2)
  return FVec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  FVec r;
  for (int i = 0; i < FVec::N; ++i) r.v[i] = float(int8_t(p[i]));
  return r;
#endif
}

// 2 * FVec::N bytes where byte 2i + e holds lane i's e-th value in the nibble at `shift` (0: low,
// 4: high), as two float vectors (e = 0, e = 1) of the unsigned nibbles.
inline void load_nibble_pairs(const uint8_t* p, int shift, FVec& first, FVec& second) {
#if defined(THRIFTY_AVX512)
  const __m512i w = _mm512_srl_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                                     _mm_cvtsi32_si128(shift));
  const __m512i mask = _mm512_set1_epi32(15);
  first = FVec(_mm512_cvtepi32_ps(_mm512_and_si512(w, mask)));
  second = FVec(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(w, 8), mask)));
#elif defined(THRIFTY_AVX2)
  const __m256i w = _mm256_srl_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                                     _mm_cvtsi32_si128(shift));
  const __m256i mask = _mm256_set1_epi32(15);
  first = FVec(_mm256_cvtepi32_ps(_mm256_and_si256(w, mask)));
  second = FVec(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 8), mask)));
#else
  for (int i = 0; i < FVec::N; ++i) {
    first.v[i] = float((p[2 * i] >> shift) & 15);
    second.v[i] = float((p[2 * i + 1] >> shift) & 15);
  }
#endif
}

// FVec::N float8_e4m3fn codes at p, each as the fp16 with its sign, exponent and mantissa bits
// (exact, subnormals included): the fp8 value times 2^-8, as e4m3's exponent bias is 7, fp16's 15.
// No code here is NaN (0x7f, 0xff): encoders saturate at 448.
inline FVec load_fp8_e4m3_as_fp16(const uint8_t* p) {
#if defined(THRIFTY_AVX512)
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                    _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7));
  return FVec(_mm512_cvtph_ps(h));
#elif defined(THRIFTY_AVX2)
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                 _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7));
  return FVec(_mm256_cvtph_ps(h));
#else
  FVec r;
  for (int i = 0; i < FVec::N; ++i) r.v[i] = half_to_float(uint16_t(((p[i] & 0x80) << 8) | ((p[i] & 0x7f) << 7)));
  return r;
#endif
}

// Stores FVec::N pairs as bf16, lane i's pair (first[i], second[i]) side by side: the layout
// of bf16 weight panels and of load_pairs.
inline void store_bf16_pairs(bf16* p, FVec first, FVec second) {
#if defined(THRIFTY_AVX512BF16)
  // [first's 16 | second's 16] in bf16, then interleaved: word 2i from first, 2i + 1 from second.
  static const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  _mm512_storeu_si512(p, _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(second.v, first.v)));
#elif defined(THRIFTY_AVX512)
  const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(first.round_bf16().v), 16);
  const __m512i hi = _mm512_castps_si512(second.round_bf16().v);  // low half already zero
  _mm512_storeu_si512(p, _mm512_or_si512(lo, hi));
#elif defined(THRIFTY_AVX2)
  const __m256i lo = _mm256_srli_epi32(_mm256_castps_si256(first.round_bf16().v), 16);
  const __m256i hi = _mm256_castps_si256(second.round_bf16().v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_or_si256(lo, hi));
#else
  for (int i = 0; i < FVec::N; ++i) {
    p[2 * i] = float_to_bf16(first.v[i]);
    p[2 * i + 1] = float_to_bf16(second.v[i]);
  }
#endif
}

}  // namespace thrifty
