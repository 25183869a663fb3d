// Row-wise kernels between the matmuls: RMSNorm fused with the residual add, rotary embedding
// fused with the KV cache write, SiLU(gate) x up. Each rounds where the pure-torch reference
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
                    int64_t stride, const T* q_norm, const T* k_norm, T* k_cache, T* v_cache);

// For each row of logits: the first index of its largest value (torch.argmax's choice) and that
// value's log-softmax, in one read of the row for the max, one for the index, one for the sum.
void argmax_logprob(Team& team, const float* logits, int64_t rows, int64_t vocab, int64_t* ids, float* logprobs);

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, dim + i].
template <typename T>
void silu_and_mul(Team& team, const T* gate_up, int64_t rows, int64_t dim, T* out);

}  // namespace thrifty
