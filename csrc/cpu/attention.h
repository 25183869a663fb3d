// Paged attention over the KV cache, read where it lies: decodes, prefills, chunked prefills and
// prefix-cache hits are the same thing, a sequence whose q_len new tokens attend causally over
// its seq_len cached ones (the new ones included).
//
// Cache layout, per layer (block_size a multiple of 16; head_dim 16, 32, 64, 128 or 256). The
// scores of 16 keys are 16 lanes, computed by broadcasting q, with no horizontal sums:
//   fp32 K: [num_blocks, num_kv_heads, head_dim, block_size]  (a block's keys transposed)
//        V: [num_blocks, num_kv_heads, block_size, head_dim]
//   bf16 K: [num_blocks, num_kv_heads, head_dim / 2, block_size, 2]  (dimension pairs per key)
//        V: [num_blocks, num_kv_heads, block_size / 2, head_dim, 2]  (key pairs per dimension)
// The bf16 pairs are what vdpbf16ps multiplies: two products summed into each fp32 lane.
//
// A quantized cache (KvCodec: int8, or fp8 e4m3 as torch.float8_e4m3fn) holds one byte per
// element in the fp32 layout's order and, after each (block, KV head)'s block_size x head_dim
// bytes, one fp32 scale per key and head: element = decode(byte) * scale, the scale being the
// head's largest |element| over the code's largest value. Both K and V are then
//   [num_blocks, num_kv_heads, head_dim * block_size + 4 * block_size] uint8.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "parallel.h"
#include "vec.h"

namespace thrifty {

// A step's sequences, as the runner describes them (vLLM's names).
struct SeqBatch {
  const int32_t* query_start_loc;  // [num_seqs + 1]: a sequence's new tokens in the flat batch
  const int32_t* seq_lens;  // [num_seqs]: tokens in the cache after this step
  const int32_t* block_table;  // [num_seqs, block_table_stride]
  int64_t block_table_stride;
  int64_t num_seqs;
  int64_t num_tokens;

  int64_t q_len(int64_t s) const { return query_start_loc[s + 1] - query_start_loc[s]; }
  // Position of the sequence's first new token.
  int64_t first_pos(int64_t s) const { return seq_lens[s] - q_len(s); }
};

bool supported_head_dim(int64_t head_dim);

SeqBatch make_seq_batch(const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                        const at::Tensor& block_table, int64_t block_size, int64_t num_blocks);

enum class KvCodec : int { kNone, kInt8, kFp8E4M3 };  // kNone: the cache has the model's dtype

// kv_cache_dtype "auto", "int8" or "fp8_e4m3" (EngineConfig's).
KvCodec kv_codec_from_name(const std::string& name);

struct AttentionShape {
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t block_size;
  float scale;
  KvCodec kv_codec = KvCodec::kNone;

  // Bytes of one (block, KV head) of a quantized cache: the codes, then a scale per key.
  int64_t quantized_head_bytes() const { return (head_dim + 4) * block_size; }
};

// One unit of work: a run of query tokens of one sequence, all query heads of one KV head,
// over keys [key_begin, key_end). A decode's keys may be split over several units (so one long
// sequence still keeps every thread busy); those write partial results, merged afterwards.
struct AttentionUnit {
  int32_t seq;
  int32_t kv_head;
  int32_t token_begin;  // first query token (index in the flat batch)
  int32_t num_tokens;
  int32_t key_begin;
  int32_t key_end;
  int32_t partial;  // slot in the partial-result buffer, or -1: write the output directly
};

struct AttentionMerge {  // the partial results of one (sequence, KV head) decode, to combine
  int32_t token;
  int32_t kv_head;
  int32_t first_partial;
  int32_t num_partials;
};

// The units of a step, planned once and run by every layer.
struct AttentionPlan {
  std::vector<AttentionUnit> units;
  std::vector<AttentionMerge> merges;
  int64_t num_partials = 0;
};

AttentionPlan plan_attention(const SeqBatch& batch, const AttentionShape& shape, int num_threads);

// Floats of partial-result buffer the plan needs.
int64_t attention_partial_floats(const AttentionPlan& plan, const AttentionShape& shape);

// out[t, h, :] = attention of q[t, h, :] over its sequence's cached keys and values. Rows of q and
// out are q_stride and out_stride elements apart. Runs two work-shared loops (units, merges) with
// a barrier between them when the plan has merges; no barrier after.
// The caches are T, or bytes when shape.kv_codec says so.
template <typename T>
void paged_attention(Team& team, const AttentionPlan& plan, const SeqBatch& batch, const AttentionShape& shape,
                     const T* q, int64_t q_stride, const void* k_cache, const void* v_cache, T* out,
                     int64_t out_stride, float* partials);

// The position of every new token of the step in its sequence, and its cache slot
// (block * block_size + offset).
void token_positions_and_slots(const SeqBatch& batch, int64_t block_size, int64_t* positions, int64_t* slots);

// Writes the keys and values of one token of one layer into its cache slot. Heads are
// contiguous in k and v.
template <typename T>
void write_kv_token(const AttentionShape& shape, int64_t slot, const T* k, const T* v, void* k_cache, void* v_cache);

}  // namespace thrifty
