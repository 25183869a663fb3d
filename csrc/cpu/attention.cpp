// Paged attention, flash style: a unit's query rows (its tokens x the query heads of one KV head)
// walk the keys straight from the cache blocks, 64 at a time (four chunks of 16), with an online
// softmax; nothing is gathered into a padded copy, and the work grows with the keys each
// sequence really has.
//
// Rows are taken a few at a time: their scores for a block of keys come from one pass over its
// keys, one softmax update per row follows, then their outputs from one pass over its values.
// With bf16 caches the pairs layout lets AVX512-BF16 CPUs multiply bf16 pairs straight into fp32
// sums (vdpbf16ps); other CPUs widen each pair to two fp32 vectors. Quantized caches (int8, fp8)
// are decoded to fp32 in registers; a block's key scales multiply its scores, its value scales
// the probabilities.
#include "attention.h"

#include <c10/util/Float8_e4m3fn.h>

#include <cmath>
#include <limits>

namespace thrifty {
namespace {

constexpr int64_t kKeys = 16;  // keys per chunk
constexpr int kMaxRows = 16;  // query rows of a unit (tokens x heads sharing a KV head)
constexpr int kKeyVecs = int(kKeys) / FVec::N;  // vectors per row of scores
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#if defined(THRIFTY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif
// Keys are taken kBlockChunks chunks (64 keys) at a time. Multiply-adds into one accumulator
// wait for each other (about 5 cycles apart), so a group of rows walks the block's chunks side by
// side: its scores keep rows x chunks accumulators in flight, its outputs rows x D/16.
constexpr int kBlockChunks = 4;
// How far ahead, in keys, cache blocks are prefetched. A decode is bound by reading the cache,
// and its blocks lie anywhere.
constexpr int64_t kPrefetchKeys = 2 * kKeys;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 1.0 in the first `valid` lanes of a chunk of 16, 0.0 after: mask_table + 16 - valid.
alignas(64) constexpr float kMaskTable[2 * kKeys] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                                     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};

// Into L2 (T1), not L1: the blocks are fetched a pass of keys ahead of their use, and decode
// attention measured faster so (docs/native.md, Attention).
inline void prefetch(const void* p, int64_t bytes) {
#if defined(THRIFTY_AVX512) || defined(THRIFTY_AVX2)
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(static_cast<const char*>(p) + i, _MM_HINT_T1);
#else
  (void)p, (void)bytes;
#endif
}

// Where one chunk of 16 keys and their values lie in one layer's cache, for one KV head.
template <typename T>
struct Chunk {
  const T* k;  // the chunk's first key
  const T* v;  // the chunk's first value
};

template <typename T, int D>
struct CacheLayout;

// fp32: K [blocks, heads, D, bs] (keys transposed), V [blocks, heads, bs, D].
template <int D>
struct CacheLayout<float, D> {
  using Elem = float;
  using ChunkType = Chunk<float>;
  int64_t bs, heads;
  Chunk<float> chunk(const float* kc, const float* vc, int64_t block, int64_t head, int64_t off) const {
    return {kc + (block * heads + head) * D * bs + off, vc + ((block * heads + head) * bs + off) * D};
  }
  void write(int64_t block, int64_t off, const float* k, const float* v, float* kc, float* vc) const {
    for (int64_t h = 0; h < heads; ++h) {
      float* kt = kc + (block * heads + h) * D * bs + off;
      for (int64_t d = 0; d < D; ++d) kt[d * bs] = k[h * D + d];
      std::copy(v + h * D, v + (h + 1) * D, vc + ((block * heads + h) * bs + off) * D);
    }
  }
};

// bf16: K [blocks, heads, D/2, bs, 2] (pairs of dimensions side by side per key),
//       V [blocks, heads, bs/2, D, 2] (pairs of keys side by side per dimension).
template <int D>
struct CacheLayout<bf16, D> {
  using Elem = bf16;
  using ChunkType = Chunk<bf16>;
  int64_t bs, heads;
  Chunk<bf16> chunk(const bf16* kc, const bf16* vc, int64_t block, int64_t head, int64_t off) const {
    return {kc + (block * heads + head) * D * bs + off * 2, vc + (block * heads + head) * bs * D + off * D};
  }
  void write(int64_t block, int64_t off, const bf16* k, const bf16* v, bf16* kc, bf16* vc) const {
    for (int64_t h = 0; h < heads; ++h) {
      bf16* kt = kc + (block * heads + h) * D * bs + off * 2;
      for (int64_t d = 0; d < D; ++d) kt[(d / 2) * bs * 2 + d % 2] = k[h * D + d];
      bf16* vt = vc + (block * heads + h) * bs * D + (off / 2) * D * 2 + off % 2;
      for (int64_t d = 0; d < D; ++d) vt[d * 2] = v[h * D + d];
    }
  }
};

// Quantized caches (attention.h): a code per element, decoded to fp32 as FVec::N lanes at a
// time; decode(code) * kUnit is the element over its scale.
struct Int8Kv {
  static constexpr float kMax = 127.f;  // the largest code
  static constexpr float kUnit = 1.f;
  static FVec load(const uint8_t* p) { return load_int8(p); }
  static uint8_t encode(float x) {  // x in [-127, 127]: round half to even, as torch.round
    return uint8_t(int8_t(std::nearbyint(std::clamp(x, -kMax, kMax))));
  }
};

struct Fp8Kv {  // float8_e4m3fn, decoded as the fp16 with the same sign, exponent and mantissa bits
  static constexpr float kMax = 448.f;
  static constexpr float kUnit = 256.f;  // 2^(15 - 7): fp16's exponent bias over e4m3's
  static FVec load(const uint8_t* p) { return load_fp8_e4m3_as_fp16(p); }
  static uint8_t encode(float x) { return c10::Float8_e4m3fn(x).x; }  // round to nearest even, as torch
};

struct QuantChunk {
  const uint8_t* k;  // the chunk's first key: K is [D, bs] codes, keys transposed
  const uint8_t* v;  // its first value: V is [bs, D]
  const float* k_scale;  // the chunk's first key's scale
  const float* v_scale;
};

// Encodes n elements of x, `stride` apart in out, with one scale (returned): the largest |x|
// maps to the largest code.
template <typename Codec, typename T>
float encode_head(const T* x, int64_t n, uint8_t* out, int64_t stride) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::abs(to_float(x[i])));
  const float inv = amax > 0.f ? Codec::kMax / amax : 0.f;
  for (int64_t i = 0; i < n; ++i) out[i * stride] = Codec::encode(to_float(x[i]) * inv);
  return amax / Codec::kMax;
}

template <typename Codec, int D>
struct QuantCacheLayout {
  using Elem = uint8_t;
  using ChunkType = QuantChunk;
  int64_t bs, heads;
  int64_t head_bytes() const { return (D + 4) * bs; }
  QuantChunk chunk(const uint8_t* kc, const uint8_t* vc, int64_t block, int64_t head, int64_t off) const {
    const uint8_t* kb = kc + (block * heads + head) * head_bytes();
    const uint8_t* vb = vc + (block * heads + head) * head_bytes();
    return {kb + off, vb + off * D, reinterpret_cast<const float*>(kb + D * bs) + off,
            reinterpret_cast<const float*>(vb + D * bs) + off};
  }
  template <typename T>
  void write(int64_t block, int64_t off, const T* k, const T* v, uint8_t* kc, uint8_t* vc) const {
    for (int64_t h = 0; h < heads; ++h) {
      uint8_t* kb = kc + (block * heads + h) * head_bytes();
      uint8_t* vb = vc + (block * heads + h) * head_bytes();
      reinterpret_cast<float*>(kb + D * bs)[off] = encode_head<Codec>(k + h * D, D, kb + off, bs);
      reinterpret_cast<float*>(vb + D * bs)[off] = encode_head<Codec>(v + h * D, D, vb + off * D, 1);
    }
  }
};

template <int D>
struct CacheLayout<Int8Kv, D> : QuantCacheLayout<Int8Kv, D> {};
template <int D>
struct CacheLayout<Fp8Kv, D> : QuantCacheLayout<Fp8Kv, D> {};

// Reads two consecutive dimensions of FVec::N keys (QK), or two consecutive keys' FVec::N
// dimensions (PV), as two float vectors: from the fp32 layout's rows, or from the bf16 pairs
// layout (widened: a shift and a mask).
template <int D>
struct PairReads {
  static void keys(const Chunk<float>& c, int64_t bs, int dp, int v, FVec& first, FVec& second) {
    first = FVec::load(c.k + 2 * dp * bs + v * FVec::N);
    second = FVec::load(c.k + (2 * dp + 1) * bs + v * FVec::N);
  }
  static void values(const Chunk<float>& c, int64_t jp, int v, FVec& first, FVec& second) {
    first = FVec::load(c.v + 2 * jp * D + v * FVec::N);
    second = FVec::load(c.v + (2 * jp + 1) * D + v * FVec::N);
  }
  static void keys(const Chunk<bf16>& c, int64_t bs, int dp, int v, FVec& first, FVec& second) {
    load_pairs(c.k + (dp * bs + v * FVec::N) * 2, first, second);
  }
  static void values(const Chunk<bf16>& c, int64_t jp, int v, FVec& first, FVec& second) {
    load_pairs(c.v + (jp * D + v * FVec::N) * 2, first, second);
  }
};

// The inner loops over a block of chunks: scores of RG rows (QK) and their weighted values (PV).
// Queries hold the rows' queries as the variant wants them; p the rows' probabilities for the
// block's keys (fp32, 16 per chunk; zero past the valid keys); o the rows' outputs so far, in
// memory, each D floats. Both walk pairs (of dimensions, of keys), the unit vdpbf16ps takes.

// fp32 multiply-adds: fp32 caches, and bf16 caches on CPUs without AVX512-BF16.
template <typename T, int D>
struct BlockMathFma {
  static constexpr int VD = D / FVec::N;
  struct Queries { float q[kMaxRows][D]; };  // widened and scaled
  static void prepare(Queries& qs, int r, const T* src, float scale) {
    for (int d = 0; d < D; ++d) qs.q[r][d] = to_float(src[d]) * scale;
  }
  static constexpr bool kScaleScores = false;
  template <int RG>
  static void scores(const Queries& qs, int r0, const Chunk<T> (&c)[kBlockChunks], int64_t bs,
                     FVec (&s)[kBlockChunks][RG][kKeyVecs]) {
    for (int dp = 0; dp < D / 2; ++dp) {
      FVec first[kBlockChunks][kKeyVecs], second[kBlockChunks][kKeyVecs];
      for (int b = 0; b < kBlockChunks; ++b)
        for (int v = 0; v < kKeyVecs; ++v) PairReads<D>::keys(c[b], bs, dp, v, first[b][v], second[b][v]);
      for (int r = 0; r < RG; ++r) {
        const FVec q0(qs.q[r0 + r][2 * dp]), q1(qs.q[r0 + r][2 * dp + 1]);
        for (int b = 0; b < kBlockChunks; ++b)
          for (int v = 0; v < kKeyVecs; ++v)
            s[b][r][v] = FVec::fma(q1, second[b][v], FVec::fma(q0, first[b][v], s[b][r][v]));
      }
    }
  }
  template <int RG>
  static void values(const float (*p)[kBlockChunks * kKeys], const int64_t (&valid)[kBlockChunks],
                     const Chunk<T> (&c)[kBlockChunks], float* const* o) {
    FVec acc[RG][VD];
    for (int r = 0; r < RG; ++r)
      for (int v = 0; v < VD; ++v) acc[r][v] = FVec::load(o[r] + v * FVec::N);
    for (int b = 0; b < kBlockChunks; ++b) {
      for (int64_t jp = 0; jp < (valid[b] + 1) / 2; ++jp) {
        for (int v = 0; v < VD; ++v) {
          FVec first, second;
          PairReads<D>::values(c[b], jp, v, first, second);
          for (int r = 0; r < RG; ++r)
            acc[r][v] = FVec::fma(FVec(p[r][b * kKeys + 2 * jp + 1]), second,
                                  FVec::fma(FVec(p[r][b * kKeys + 2 * jp]), first, acc[r][v]));
        }
      }
    }
    for (int r = 0; r < RG; ++r)
      for (int v = 0; v < VD; ++v) acc[r][v].store(o[r] + v * FVec::N);
  }
};

#if defined(THRIFTY_AVX512BF16)
// vdpbf16ps straight from the bf16 cache: queries stay bf16 pairs (one 32-bit broadcast per
// pair), the scale is applied to the scores, probabilities are rounded to bf16 pairs for PV.
template <int D>
struct BlockMathDot {
  static constexpr int VD = D / 16;
  struct Queries { int32_t pairs[kMaxRows][D / 2]; };
  static void prepare(Queries& qs, int r, const bf16* src, float) { std::memcpy(qs.pairs[r], src, D * sizeof(bf16)); }
  static constexpr bool kScaleScores = true;
  template <int RG>
  static void scores(const Queries& qs, int r0, const Chunk<bf16> (&c)[kBlockChunks], int64_t bs,
                     FVec (&s)[kBlockChunks][RG][kKeyVecs]) {
    for (int dp = 0; dp < D / 2; ++dp) {
      __m512i k[kBlockChunks];
      for (int b = 0; b < kBlockChunks; ++b) k[b] = _mm512_loadu_si512(c[b].k + dp * bs * 2);
      for (int r = 0; r < RG; ++r) {
        const __m512bh q = (__m512bh)_mm512_set1_epi32(qs.pairs[r0 + r][dp]);
        for (int b = 0; b < kBlockChunks; ++b) s[b][r][0].v = _mm512_dpbf16_ps(s[b][r][0].v, q, (__m512bh)k[b]);
      }
    }
  }
  template <int RG>
  static void values(const float (*p)[kBlockChunks * kKeys], const int64_t (&valid)[kBlockChunks],
                     const Chunk<bf16> (&c)[kBlockChunks], float* const* o) {
    int32_t pp[RG][kBlockChunks * kKeys / 2];  // each row's probabilities as bf16 pairs of keys
    for (int r = 0; r < RG; ++r)
      for (int b = 0; b < kBlockChunks; ++b)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pp[r] + b * kKeys / 2),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p[r] + b * kKeys)));
    __m512 acc[RG][VD];
    for (int r = 0; r < RG; ++r)
      for (int v = 0; v < VD; ++v) acc[r][v] = _mm512_loadu_ps(o[r] + v * 16);
    for (int b = 0; b < kBlockChunks; ++b) {
      for (int64_t jp = 0; jp < (valid[b] + 1) / 2; ++jp) {
        __m512i x[VD];
        for (int v = 0; v < VD; ++v) x[v] = _mm512_loadu_si512(c[b].v + (jp * D + v * 16) * 2);
        for (int r = 0; r < RG; ++r) {
          const __m512bh w = (__m512bh)_mm512_set1_epi32(pp[r][b * kKeys / 2 + jp]);
          for (int v = 0; v < VD; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], w, (__m512bh)x[v]);
        }
      }
    }
    for (int r = 0; r < RG; ++r)
      for (int v = 0; v < VD; ++v) _mm512_storeu_ps(o[r] + v * 16, acc[r][v]);
  }
};
template <typename T, int D>
using BlockMath = std::conditional_t<std::is_same_v<T, bf16>, BlockMathDot<D>, BlockMathFma<T, D>>;
#else
template <typename T, int D>
using BlockMath = BlockMathFma<T, D>;
#endif

// A quantized cache, for any activation type: fp32 multiply-adds over single dimensions (QK)
// and single keys (PV) of decoded codes; the key scales applied to each block's scores, the
// value scales folded into its probabilities.
template <typename T, typename Codec, int D>
struct BlockMathQuant {
  static constexpr int VD = D / FVec::N;
  using Queries = typename BlockMathFma<T, D>::Queries;
  static void prepare(Queries& qs, int r, const T* src, float scale) { BlockMathFma<T, D>::prepare(qs, r, src, scale); }
  static constexpr bool kScaleScores = false;
  template <int RG>
  static void scores(const Queries& qs, int r0, const QuantChunk (&c)[kBlockChunks], int64_t bs,
                     FVec (&s)[kBlockChunks][RG][kKeyVecs]) {
    for (int d = 0; d < D; ++d) {
      FVec k[kBlockChunks][kKeyVecs];
      for (int b = 0; b < kBlockChunks; ++b)
        for (int v = 0; v < kKeyVecs; ++v) k[b][v] = Codec::load(c[b].k + d * bs + v * FVec::N);
      for (int r = 0; r < RG; ++r) {
        const FVec q(qs.q[r0 + r][d]);
        for (int b = 0; b < kBlockChunks; ++b)
          for (int v = 0; v < kKeyVecs; ++v) s[b][r][v] = FVec::fma(q, k[b][v], s[b][r][v]);
      }
    }
    for (int b = 0; b < kBlockChunks; ++b)
      for (int v = 0; v < kKeyVecs; ++v) {
        const FVec scale = FVec::load(c[b].k_scale + v * FVec::N) * FVec(Codec::kUnit);
        for (int r = 0; r < RG; ++r) s[b][r][v] = s[b][r][v] * scale;
      }
  }
  template <int RG>
  static void values(const float (*p)[kBlockChunks * kKeys], const int64_t (&valid)[kBlockChunks],
                     const QuantChunk (&c)[kBlockChunks], float* const* o) {
    FVec acc[RG][VD];
    for (int r = 0; r < RG; ++r)
      for (int v = 0; v < VD; ++v) acc[r][v] = FVec::load(o[r] + v * FVec::N);
    for (int b = 0; b < kBlockChunks; ++b) {
      float w[RG][kKeys];  // probability x scale of each key
      for (int r = 0; r < RG; ++r)
        for (int64_t j = 0; j < valid[b]; ++j) w[r][j] = p[r][b * kKeys + j] * c[b].v_scale[j] * Codec::kUnit;
      for (int64_t j = 0; j < valid[b]; ++j) {
        for (int v = 0; v < VD; ++v) {
          const FVec x = Codec::load(c[b].v + j * D + v * FVec::N);
          for (int r = 0; r < RG; ++r) acc[r][v] = FVec::fma(FVec(w[r][j]), x, acc[r][v]);
        }
      }
    }
    for (int r = 0; r < RG; ++r)
      for (int v = 0; v < VD; ++v) acc[r][v].store(o[r] + v * FVec::N);
  }
};

template <typename Layout>
Layout make_layout(const AttentionShape& shape) {
  Layout layout{};
  layout.bs = shape.block_size;
  layout.heads = shape.num_kv_heads;
  return layout;
}

// The math for activations T over a cache of C (T itself, or a quantized cache's codec).
template <typename T, typename C, int D>
using MathFor = std::conditional_t<std::is_same_v<T, C>, BlockMath<T, D>, BlockMathQuant<T, C, D>>;

template <typename T>
struct Operands {
  const SeqBatch& batch;
  const AttentionShape& shape;
  const T* q;
  int64_t q_stride;
  const void* k_cache;  // T, or a quantized cache's bytes
  const void* v_cache;
  T* out;
  int64_t out_stride;
  float* partials;
};

template <typename T, typename C, int D>
class UnitRunner {
  using Math = MathFor<T, C, D>;
  using Layout = CacheLayout<C, D>;
  using Elem = typename Layout::Elem;
  using ChunkT = typename Layout::ChunkType;
  // Rows per group: their scores for a block of keys, or their outputs, in half the registers.
  static constexpr int RG =
      std::max(1, std::min(4, kVectorRegisters / 2 / std::max(Math::VD, kBlockChunks * kKeyVecs)));

 public:
  UnitRunner(const AttentionUnit& u, const Operands<T>& op) : u_(u), op_(op) {
    const SeqBatch& b = op.batch;
    G_ = op.shape.num_heads / op.shape.num_kv_heads;
    rows_ = u.num_tokens * G_;
    streams_ = u.num_tokens == 1;
    layout_ = make_layout<Layout>(op.shape);
    k_cache_ = static_cast<const Elem*>(op.k_cache);
    v_cache_ = static_cast<const Elem*>(op.v_cache);
    const int64_t pos0 = b.first_pos(u.seq) - b.query_start_loc[u.seq];  // + token index = position
    key_end_ = u.key_begin;
    for (int64_t i = 0; i < u.num_tokens; ++i) {
      const int64_t token = u.token_begin + i;
      for (int64_t g = 0; g < G_; ++g) {
        const int r = int(i * G_ + g);
        Math::prepare(queries_, r, op.q + token * op.q_stride + (u.kv_head * G_ + g) * D, op.shape.scale);
        row_end_[r] = std::min<int64_t>(u.key_end, pos0 + token + 1);  // causal
      }
      key_end_ = std::max(key_end_, row_end_[i * G_]);
    }
  }

  void run() {
    int r0 = 0;
    for (; r0 + RG <= rows_; r0 += RG) run_rows<RG>(r0);
    switch (rows_ - r0) {  // RG <= 4
      case 3: run_rows<3>(r0); break;
      case 2: run_rows<2>(r0); break;
      case 1: run_rows<1>(r0); break;
      default: break;
    }
  }

 private:
  // A block's scores for the rows at once, then one softmax update per row (one max, one
  // correction), then the block's values.
  template <int R>
  void run_rows(int r0) {
    alignas(64) float o[R][D];
    float m[R], l[R];
    float* orow[R];
    for (int r = 0; r < R; ++r) {
      std::fill(o[r], o[r] + D, 0.f);
      orow[r] = o[r];
      m[r] = kNegInf;
      l[r] = 0.f;
    }
    const int64_t bs = op_.shape.block_size;
    const int32_t* blocks = op_.batch.block_table + u_.seq * op_.batch.block_table_stride;
    alignas(64) float p[R][kBlockChunks * kKeys];
    for (int64_t b0 = u_.key_begin; b0 < key_end_; b0 += kBlockChunks * kKeys) {
      // Chunks past the keys (the last block of a sequence) repeat the first: their scores are
      // computed and masked out, which keeps the loops above of fixed length.
      ChunkT chunks[kBlockChunks];
      for (int c = 0; c < kBlockChunks; ++c) {
        const int64_t c0 = b0 + c * kKeys;
        if (c0 >= key_end_) {
          chunks[c] = chunks[0];
          continue;
        }
        chunks[c] = layout_.chunk(k_cache_, v_cache_, blocks[c0 / bs], u_.kv_head, c0 % bs);
        const int64_t ahead = c0 + std::max(bs, kPrefetchKeys);
        // A decode streams its keys from memory once: entering a block, fetch a later one whole.
        // A prefill tile's rows walk keys that earlier tiles left in L2, where prefetching is
        // only more instructions.
        if (streams_ && r0 == 0 && c0 % bs == 0 && ahead < key_end_) {
          const ChunkT next = layout_.chunk(k_cache_, v_cache_, blocks[ahead / bs], u_.kv_head, 0);
          prefetch(next.k, D * bs * int64_t(sizeof(Elem)));
          prefetch(next.v, D * bs * int64_t(sizeof(Elem)));
        }
      }
      FVec s[kBlockChunks][R][kKeyVecs];
      for (auto& chunk : s) for (auto& row : chunk) for (auto& v : row) v = FVec::zero();
      Math::template scores<R>(queries_, r0, chunks, bs, s);
      int64_t valid_max[kBlockChunks] = {};
      for (int r = 0; r < R; ++r) {
        const int64_t row_valid = row_end_[r0 + r] - b0;  // keys of the block this row may see
        if (row_valid <= 0) {
          std::fill(p[r], p[r] + kBlockChunks * kKeys, 0.f);
          continue;
        }
        // Lanes past the row's last key: mask 0, score -1e30 (finite: no inf - inf below).
        FVec block_max(kNegInf);
        for (int c = 0; c < kBlockChunks; ++c) {
          const int64_t valid = std::clamp<int64_t>(row_valid - c * kKeys, 0, kKeys);
          valid_max[c] = std::max(valid_max[c], valid);
          for (int v = 0; v < kKeyVecs; ++v) {
            const FVec mask = FVec::load(kMaskTable + kKeys - valid + v * FVec::N);
            FVec sv = s[c][r][v];
            if constexpr (Math::kScaleScores) sv = sv * FVec(op_.shape.scale);
            s[c][r][v] = FVec::fma(sv, mask, (mask - FVec(1.f)) * FVec(1e30f));
            block_max = FVec::max(block_max, s[c][r][v]);
          }
        }
        const float m_new = std::max(m[r], block_max.reduce_max());
        const float correction = std::exp(m[r] - m_new);
        FVec sum = FVec::zero();
        for (int c = 0; c < kBlockChunks; ++c) {
          const int64_t valid = std::clamp<int64_t>(row_valid - c * kKeys, 0, kKeys);
          for (int v = 0; v < kKeyVecs; ++v) {
            const FVec mask = FVec::load(kMaskTable + kKeys - valid + v * FVec::N);
            const FVec pv = exp(s[c][r][v] - FVec(m_new)) * mask;
            pv.store(p[r] + c * kKeys + v * FVec::N);
            sum = sum + pv;
          }
        }
        l[r] = l[r] * correction + sum.reduce_add();
        m[r] = m_new;
        if (correction != 1.f)
          for (int d = 0; d < D; d += FVec::N) (FVec::load(o[r] + d) * FVec(correction)).store(o[r] + d);
      }
      Math::template values<R>(p, valid_max, chunks, orow);
    }
    finish<R>(r0, o, m, l);
  }

  template <int R>
  void finish(int r0, const float (&o)[R][D], const float* m, const float* l) {
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r, token = u_.token_begin + row / G_, head = u_.kv_head * G_ + row % G_;
      if (u_.partial < 0) {
        T* dst = op_.out + token * op_.out_stride + head * D;
        const FVec inv(l[r] > 0.f ? 1.f / l[r] : 0.f);
        for (int d = 0; d < D; d += FVec::N) (FVec::load(o[r] + d) * inv).store(dst + d);
      } else {  // a split decode: unnormalized output, then max and sum per head
        float* part = op_.partials + u_.partial * (G_ * D + 2 * G_);
        std::copy(o[r], o[r] + D, part + (row % G_) * D);
        part[G_ * D + row % G_] = m[r];
        part[G_ * D + G_ + row % G_] = l[r];
      }
    }
  }

  const AttentionUnit& u_;
  const Operands<T>& op_;
  int64_t G_ = 1;
  int rows_ = 0;
  bool streams_ = false;  // a decode: its keys come from memory, worth prefetching
  Layout layout_{};
  const Elem* k_cache_ = nullptr;
  const Elem* v_cache_ = nullptr;
  typename Math::Queries queries_;
  int64_t row_end_[kMaxRows];
  int64_t key_end_ = 0;
};

template <typename T>
void run_merge(const AttentionMerge& mg, const Operands<T>& op) {
  const int64_t D = op.shape.head_dim;
  const int64_t G = op.shape.num_heads / op.shape.num_kv_heads;
  const int64_t size = G * D + 2 * G;
  const float* first = op.partials + mg.first_partial * size;
  for (int64_t g = 0; g < G; ++g) {
    float m_max = kNegInf;
    for (int64_t p = 0; p < mg.num_partials; ++p) m_max = std::max(m_max, first[p * size + G * D + g]);
    float weights[64];
    float total = 0.f;
    for (int64_t p = 0; p < mg.num_partials; ++p) {
      const float* part = first + p * size;
      weights[p] = part[G * D + G + g] > 0.f ? std::exp(part[G * D + g] - m_max) : 0.f;
      total += weights[p] * part[G * D + G + g];
    }
    T* dst = op.out + mg.token * op.out_stride + (mg.kv_head * G + g) * D;
    for (int64_t d = 0; d < D; d += FVec::N) {
      FVec acc = FVec::zero();
      for (int64_t p = 0; p < mg.num_partials; ++p)
        acc = FVec::fma(FVec(weights[p]), FVec::load(first + p * size + g * D + d), acc);
      (acc * FVec(total > 0.f ? 1.f / total : 0.f)).store(dst + d);
    }
  }
}

// Runs f.template operator()<D>() for the cache's head_dim (one of kHeadDims).
template <typename F>
void with_head_dim(int64_t head_dim, F&& f) {
  switch (head_dim) {
    case 16: f.template operator()<16>(); break;
    case 32: f.template operator()<32>(); break;
    case 64: f.template operator()<64>(); break;
    case 128: f.template operator()<128>(); break;
    case 256: f.template operator()<256>(); break;
    default: break;  // rejected by plan_attention
  }
}

constexpr int64_t kMaxSplits = 64;
constexpr int64_t kMinSplitKeys = 64;

}  // namespace

bool supported_head_dim(int64_t head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
}

SeqBatch make_seq_batch(const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                        const at::Tensor& block_table, int64_t block_size, int64_t num_blocks) {
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_table.scalar_type() == at::kInt,
              "query_start_loc, seq_lens and block_table must be int32");
  TORCH_CHECK(query_start_loc.is_contiguous() && seq_lens.is_contiguous() && block_table.dim() == 2 &&
                  block_table.stride(1) == 1,
              "query_start_loc and seq_lens must be contiguous, block_table 2-D with contiguous rows");
  const int64_t n = seq_lens.numel();
  TORCH_CHECK(query_start_loc.numel() == n + 1 && block_table.size(0) >= n,
              "query_start_loc must have num_seqs + 1 entries and block_table a row per sequence");
  SeqBatch b{query_start_loc.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), block_table.data_ptr<int32_t>(),
             block_table.stride(0), n, n ? query_start_loc.data_ptr<int32_t>()[n] : 0};
  // Checked here, once per step, so the kernels can trust every index they read.
  TORCH_CHECK(n == 0 || b.query_start_loc[0] == 0, "query_start_loc must start at 0");
  for (int64_t s = 0; s < n; ++s) {
    const int64_t q = b.q_len(s), len = b.seq_lens[s];
    TORCH_CHECK(q >= 1 && q <= len, "sequence ", s, ": ", q, " new tokens but seq_len ", len);
    TORCH_CHECK(cdiv(len, block_size) <= block_table.size(1), "sequence ", s, ": seq_len ", len,
                " needs more blocks than the block table has");
    for (int64_t i = 0; i < cdiv(len, block_size); ++i) {
      const int64_t block = b.block_table[s * b.block_table_stride + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, "sequence ", s, ": block id ", block, " out of range");
    }
  }
  return b;
}

void token_positions_and_slots(const SeqBatch& b, int64_t block_size, int64_t* positions, int64_t* slots) {
  for (int64_t s = 0; s < b.num_seqs; ++s) {
    const int32_t* blocks = b.block_table + s * b.block_table_stride;
    for (int64_t t = b.query_start_loc[s], pos = b.first_pos(s); t < b.query_start_loc[s + 1]; ++t, ++pos) {
      positions[t] = pos;
      slots[t] = blocks[pos / block_size] * block_size + pos % block_size;
    }
  }
}

AttentionPlan plan_attention(const SeqBatch& b, const AttentionShape& sh, int num_threads) {
  TORCH_CHECK(supported_head_dim(sh.head_dim), "head_dim must be 16, 32, 64, 128 or 256, got ", sh.head_dim);
  TORCH_CHECK(sh.block_size % kKeys == 0, "block_size must be a multiple of ", kKeys);
  const int64_t G = sh.num_heads / sh.num_kv_heads;
  TORCH_CHECK(G >= 1 && G <= kMaxRows && G * sh.num_kv_heads == sh.num_heads,
              "query heads must be a multiple of KV heads, at most ", kMaxRows, " per KV head");
  const int64_t tile = std::max<int64_t>(1, kMaxRows / G);
  int64_t whole = 0;
  for (int64_t s = 0; s < b.num_seqs; ++s) whole += sh.num_kv_heads * cdiv(b.q_len(s), tile);
  // Too few units to keep every thread busy (a few decodes): split the decodes' keys.
  const int64_t want = 4 * int64_t(num_threads);
  const int64_t splits = whole >= want ? 1 : std::min(kMaxSplits, cdiv(want, std::max<int64_t>(whole, 1)));
  AttentionPlan plan;
  for (int64_t s = 0; s < b.num_seqs; ++s) {
    const int32_t start = b.query_start_loc[s], q = int32_t(b.q_len(s)), len = b.seq_lens[s];
    const int64_t n = q == 1 ? std::min(splits, std::max<int64_t>(1, len / kMinSplitKeys)) : 1;
    for (int32_t h = 0; h < sh.num_kv_heads; ++h) {
      if (n == 1) {
        for (int32_t t = 0; t < q; t += int32_t(tile))
          plan.units.push_back({int32_t(s), h, start + t, std::min<int32_t>(int32_t(tile), q - t), 0, len, -1});
        continue;
      }
      const int32_t per_split = int32_t(cdiv(cdiv(len, n), kKeys) * kKeys);
      const int32_t first = int32_t(plan.num_partials);
      for (int32_t k0 = 0; k0 < len; k0 += per_split)
        plan.units.push_back({int32_t(s), h, start, 1, k0, std::min(len, k0 + per_split), int32_t(plan.num_partials++)});
      plan.merges.push_back({start, h, first, int32_t(plan.num_partials - first)});
    }
  }
  return plan;
}

int64_t attention_partial_floats(const AttentionPlan& plan, const AttentionShape& sh) {
  const int64_t G = sh.num_heads / sh.num_kv_heads;
  return plan.num_partials * (G * sh.head_dim + 2 * G);
}

KvCodec kv_codec_from_name(const std::string& name) {
  if (name == "auto") return KvCodec::kNone;
  if (name == "int8") return KvCodec::kInt8;
  TORCH_CHECK(name == "fp8_e4m3", "kv_cache_dtype must be auto, int8 or fp8_e4m3, got ", name);
  return KvCodec::kFp8E4M3;
}

namespace {

// Runs f.template operator()<C>() with C the cache's element type (T) or codec.
template <typename T, typename F>
void with_cache_type(KvCodec codec, F&& f) {
  switch (codec) {
    case KvCodec::kInt8: f.template operator()<Int8Kv>(); break;
    case KvCodec::kFp8E4M3: f.template operator()<Fp8Kv>(); break;
    default: f.template operator()<T>(); break;
  }
}

}  // namespace

template <typename T>
void paged_attention(Team& team, const AttentionPlan& plan, const SeqBatch& batch, const AttentionShape& shape,
                     const T* q, int64_t q_stride, const void* k_cache, const void* v_cache, T* out,
                     int64_t out_stride, float* partials) {
  const Operands<T> op{batch, shape, q, q_stride, k_cache, v_cache, out, out_stride, partials};
  const int64_t n = int64_t(plan.units.size());
  team.for_each(n, 1, [&](int64_t begin, int64_t end) {
    with_cache_type<T>(shape.kv_codec, [&]<typename C>() {
      with_head_dim(shape.head_dim, [&]<int D>() {
        for (int64_t i = begin; i < end; ++i) UnitRunner<T, C, D>(plan.units[i], op).run();
      });
    });
  });
  if (plan.merges.empty()) return;
  team.sync();
  team.for_each(int64_t(plan.merges.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run_merge(plan.merges[i], op);
  });
}

template <typename T>
void write_kv_token(const AttentionShape& sh, int64_t slot, const T* k, const T* v, void* k_cache, void* v_cache) {
  with_cache_type<T>(sh.kv_codec, [&]<typename C>() {
    with_head_dim(sh.head_dim, [&]<int D>() {
      using Layout = CacheLayout<C, D>;
      using Elem = typename Layout::Elem;
      make_layout<Layout>(sh).write(slot / sh.block_size, slot % sh.block_size, k, v, static_cast<Elem*>(k_cache),
                   static_cast<Elem*>(v_cache));
    });
  });
}

#define THRIFTY_INSTANTIATE(T)                                                                              \
  template void paged_attention<T>(Team&, const AttentionPlan&, const SeqBatch&, const AttentionShape&,      \
                                   const T*, int64_t, const void*, const void*, T*, int64_t, float*);        \
  template void write_kv_token<T>(const AttentionShape&, int64_t, const T*, const T*, void*, void*);
THRIFTY_INSTANTIATE(float)
THRIFTY_INSTANTIATE(bf16)
#undef THRIFTY_INSTANTIATE

}  // namespace thrifty
