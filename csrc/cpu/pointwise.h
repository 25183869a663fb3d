// Row-wise kernels between the matmuls: RMSNorm fused with the residual add, rotary embedding
// fused with the KV cache write, the greedy pick. Each rounds where the pure-torch reference
// (thrifty/model/llama.py) rounds, so a bf16 model computes the same values up to the
// summation order of its reductions.
#pragma once

#include "attention.h"
#include "parallel.h"
#include "vec.h"

namespace thrifty {

// x += delta (if delta), then out = weight * rms_normalize(x), for one row of `dim` elements.
template <typename T>
void add_rms_norm_row(T* x, const T* delta, const T* weight, float eps, int64_t dim, T* out);

// The same for each of `rows` consecutive rows, by the team.
template <typename T>
void add_rms_norm(Team& team, T* x, const T* delta, const T* weight, float eps, int64_t rows, int64_t dim, T* out);

struct RopeArgs {
  const int64_t* positions;  // [num_tokens] position of each token in its sequence
  const int64_t* slots;  // [num_tokens] cache slot of each token (see token_slots)
  const float* cos;  // [max_position, head_dim]
  const float* sin;
  float eps;  // for the optional per-head q/k norms
};

// Per token of qkv ([num_tokens, (Hq + 2 Hkv) * D], rows `stride` apart): the optional per-head
// q/k RMSNorm (Qwen3), the rotary embedding of q and k in place, then k and v into the cache.
template <typename T>
void rope_and_cache(Team& team, const AttentionShape& shape, const RopeArgs& args, int64_t num_tokens, T* qkv,
                    int64_t stride, const T* q_norm, const T* k_norm, void* k_cache, void* v_cache);

// For each row of logits: the first index of its largest value (torch.argmax's choice) and that
// value's log-softmax. A row is cut into argmax_parts() parts when there are fewer rows than
// threads (one decode: its vocabulary read by every thread), each part's max, index and sum of
// exponentials kept in `partials` (rows * argmax_parts entries), merged after a barrier.
struct ArgmaxPartial {
  float max;
  float sum;  // of e^(x - max) over the part
  int64_t index;  // of the part's first max; -1 for an empty part
};
int64_t argmax_parts(int64_t rows, int num_threads);
// Entries of `partials` a call on `rows` rows needs with torch's thread count (a team never has
// more threads, and fewer threads need fewer parts).
inline int64_t argmax_partials_size(int64_t rows) { return rows * argmax_parts(rows, at::get_num_threads()); }
void argmax_logprob(Team& team, const float* logits, int64_t rows, int64_t vocab, ArgmaxPartial* partials,
                    int64_t* ids, float* logprobs);

}  // namespace thrifty
