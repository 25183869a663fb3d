// Paged attention, flash style: a unit's query rows (its tokens x the query heads of one KV head)
// walk the keys 16 at a time, straight from the cache blocks, with an online softmax; nothing is
// gathered into a padded copy, and the work grows with the keys each sequence really has.
#include "attention.h"

#include <cmath>
#include <limits>

namespace thrifty {
namespace {

constexpr int64_t kKeys = 16;  // keys per chunk: one AVX-512 register of scores
constexpr int kMaxRows = 16;  // query rows of a unit (tokens x heads sharing a KV head)
constexpr int64_t kMaxHeadDim = 256;
constexpr int kKeyVecs = int(kKeys) / FVec::N;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// s[r][j] = q_r . k_j for RG rows and one chunk of keys (kf: the chunk transposed, [D][16]).
template <int RG>
inline void chunk_scores(const float* q, int64_t D, const float* kf, float* s) {
  FVec acc[RG][kKeyVecs];
  for (auto& row : acc) for (auto& v : row) v = FVec::zero();
  for (int64_t d = 0; d < D; ++d) {
    FVec k[kKeyVecs];
    for (int v = 0; v < kKeyVecs; ++v) k[v] = FVec::load(kf + d * kKeys + v * FVec::N);
    for (int r = 0; r < RG; ++r) {
      const FVec b(q[r * D + d]);
      for (int v = 0; v < kKeyVecs; ++v) acc[r][v] = FVec::fma(b, k[v], acc[r][v]);
    }
  }
  for (int r = 0; r < RG; ++r)
    for (int v = 0; v < kKeyVecs; ++v) acc[r][v].store(s + r * kKeys + v * FVec::N);
}

inline void scores(const float* q, int64_t rows, int64_t D, const float* kf, float* s) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) chunk_scores<4>(q + r * D, D, kf, s + r * kKeys);
  switch (rows - r) {
    case 3: chunk_scores<3>(q + r * D, D, kf, s + r * kKeys); break;
    case 2: chunk_scores<2>(q + r * D, D, kf, s + r * kKeys); break;
    case 1: chunk_scores<1>(q + r * D, D, kf, s + r * kKeys); break;
    default: break;
  }
}

template <typename T>
struct Operands {
  const SeqBatch& batch;
  const AttentionShape& shape;
  const T* q;
  int64_t q_stride;
  const T* k_cache;
  const T* v_cache;
  T* out;
  int64_t out_stride;
  float* partials;
};

template <typename T>
void run_unit(const AttentionUnit& u, const Operands<T>& op) {
  const SeqBatch& b = op.batch;
  const AttentionShape& sh = op.shape;
  const int64_t D = sh.head_dim, bs = sh.block_size, Hkv = sh.num_kv_heads;
  const int64_t G = sh.num_heads / Hkv;
  const int64_t rows = u.num_tokens * G;
  alignas(64) float qf[kMaxRows * kMaxHeadDim];
  alignas(64) float o[kMaxRows * kMaxHeadDim];
  alignas(64) float kf[kMaxHeadDim * kKeys];
  alignas(64) float vf[kKeys * kMaxHeadDim];
  alignas(64) float s[kMaxRows * kKeys];
  float m[kMaxRows], l[kMaxRows];
  int64_t row_end[kMaxRows];  // keys a row may see: up to its own position, causally

  const int64_t pos0 = b.first_pos(u.seq) - b.query_start_loc[u.seq];  // + token index = position
  int64_t key_end = u.key_begin;
  for (int64_t i = 0; i < u.num_tokens; ++i) {
    const int64_t token = u.token_begin + i;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g;
      const T* src = op.q + token * op.q_stride + (u.kv_head * G + g) * D;
      for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_float(src[d]) * sh.scale;
      row_end[r] = std::min<int64_t>(u.key_end, pos0 + token + 1);
      m[r] = kNegInf;
      l[r] = 0.f;
    }
    key_end = std::max(key_end, row_end[i * G]);
  }
  std::fill(o, o + rows * D, 0.f);

  const int32_t* blocks = b.block_table + u.seq * b.block_table_stride;
  for (int64_t c0 = u.key_begin; c0 < key_end; c0 += kKeys) {
    const int64_t nk = std::min(kKeys, key_end - c0);
    const int64_t block = blocks[c0 / bs], off = c0 % bs;
    const T* kt = op.k_cache + (block * Hkv + u.kv_head) * D * bs + off;  // kt[d * bs + j]
    const T* vv = op.v_cache + ((block * Hkv + u.kv_head) * bs + off) * D;  // vv[j * D + d]
    if (nk == kKeys) {
      for (int64_t d = 0; d < D; ++d)
        for (int v = 0; v < kKeyVecs; ++v) FVec::load(kt + d * bs + v * FVec::N).store(kf + d * kKeys + v * FVec::N);
    } else {  // the sequence's last, partial chunk: keys past its end read as zero
      for (int64_t d = 0; d < D; ++d)
        for (int64_t j = 0; j < kKeys; ++j) kf[d * kKeys + j] = j < nk ? to_float(kt[d * bs + j]) : 0.f;
    }
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t d = 0; d < D; d += FVec::N) FVec::load(vv + j * D + d).store(vf + j * D + d);
    scores(qf, rows, D, kf, s);

    for (int64_t r = 0; r < rows; ++r) {
      const int64_t valid = std::min(nk, row_end[r] - c0);
      if (valid <= 0) continue;
      float* sr = s + r * kKeys;
      float chunk_max = sr[0];
      for (int64_t j = 1; j < valid; ++j) chunk_max = std::max(chunk_max, sr[j]);
      const float m_new = std::max(m[r], chunk_max);
      const float correction = std::exp(m[r] - m_new);
      float sum = 0.f;
      for (int v = 0; v < kKeyVecs; ++v) {
        FVec p = exp(FVec::load(sr + v * FVec::N) - FVec(m_new));
        p.store(sr + v * FVec::N);
      }
      for (int64_t j = valid; j < kKeys; ++j) sr[j] = 0.f;
      for (int64_t j = 0; j < valid; ++j) sum += sr[j];
      l[r] = l[r] * correction + sum;
      m[r] = m_new;
      float* orow = o + r * D;
      for (int64_t d = 0; d < D; d += FVec::N) {
        FVec acc = FVec::load(orow + d) * FVec(correction);
        for (int64_t j = 0; j < valid; ++j) acc = FVec::fma(FVec(sr[j]), FVec::load(vf + j * D + d), acc);
        acc.store(orow + d);
      }
    }
  }

  if (u.partial < 0) {
    for (int64_t i = 0; i < u.num_tokens; ++i) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = i * G + g;
        T* dst = op.out + (u.token_begin + i) * op.out_stride + (u.kv_head * G + g) * D;
        const FVec inv(l[r] > 0.f ? 1.f / l[r] : 0.f);
        for (int64_t d = 0; d < D; d += FVec::N) (FVec::load(o + r * D + d) * inv).store(dst + d);
      }
    }
  } else {  // a split decode: unnormalized output, then max and sum per head
    float* part = op.partials + u.partial * (G * D + 2 * G);
    std::copy(o, o + G * D, part);
    std::copy(m, m + G, part + G * D);
    std::copy(l, l + G, part + G * D + G);
  }
}

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

constexpr int64_t kMaxSplits = 64;
constexpr int64_t kMinSplitKeys = 64;

}  // namespace

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
  TORCH_CHECK(sh.head_dim % 16 == 0 && sh.head_dim <= kMaxHeadDim, "head_dim must be a multiple of 16, at most ",
              kMaxHeadDim);
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

template <typename T>
void paged_attention(Team& team, const AttentionPlan& plan, const SeqBatch& batch, const AttentionShape& shape,
                     const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, T* out, int64_t out_stride,
                     float* partials) {
  const Operands<T> op{batch, shape, q, q_stride, k_cache, v_cache, out, out_stride, partials};
  const int64_t n = int64_t(plan.units.size());
  team.for_each(n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run_unit(plan.units[i], op);
  });
  if (plan.merges.empty()) return;
  team.sync();
  team.for_each(int64_t(plan.merges.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run_merge(plan.merges[i], op);
  });
}

template <typename T>
void write_kv_token(const AttentionShape& sh, int64_t slot, const T* k, const T* v, T* k_cache, T* v_cache) {
  const int64_t D = sh.head_dim, bs = sh.block_size, H = sh.num_kv_heads;
  const int64_t block = slot / bs, off = slot % bs;
  for (int64_t h = 0; h < H; ++h) {
    T* kt = k_cache + (block * H + h) * D * bs + off;
    for (int64_t d = 0; d < D; ++d) kt[d * bs] = k[h * D + d];
    std::copy(v + h * D, v + (h + 1) * D, v_cache + ((block * H + h) * bs + off) * D);
  }
}

#define THRIFTY_INSTANTIATE(T)                                                                              \
  template void paged_attention<T>(Team&, const AttentionPlan&, const SeqBatch&, const AttentionShape&,      \
                                   const T*, int64_t, const T*, const T*, T*, int64_t, float*);              \
  template void write_kv_token<T>(const AttentionShape&, int64_t, const T*, const T*, T*, T*);
THRIFTY_INSTANTIATE(float)
THRIFTY_INSTANTIATE(bf16)
#undef THRIFTY_INSTANTIATE

}  // namespace thrifty
