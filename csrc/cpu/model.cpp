// The whole forward pass of a Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2's qkv bias,
// Qwen3's q/k norms) as one call: embeddings, every layer, the final norm and the LM head for the
// rows that sample. Every thread of the team runs the same sequence of kernels inside one
// OpenMP region, meeting at a barrier between dependent ones, so a decode step costs one fork
// and join plus a few hundred barriers, not a Python dispatch per op.
#include "model.h"

#include <chrono>

namespace thrifty {

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

constexpr const char* kPhaseNames[] = {"embed", "norm", "qkv_proj", "rope_and_cache", "attention", "o_proj",
                                       "gate_up_proj", "down_proj", "final_norm", "lm_head", "greedy", "forward"};

}  // namespace

LlamaModel::LlamaModel(int64_t hidden_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                       int64_t intermediate_size, int64_t vocab_size, double rms_norm_eps, int64_t block_size)
    : hidden_(hidden_size),
      intermediate_(intermediate_size),
      vocab_(vocab_size),
      eps_(float(rms_norm_eps)),
      shape_{num_heads, num_kv_heads, head_dim, block_size, float(1.0 / std::sqrt(double(head_dim)))} {
  TORCH_CHECK(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(supported_head_dim(head_dim), "the native kernels take head_dim 16, 32, 64, 128 or 256, got ",
              head_dim);
  TORCH_CHECK(block_size % 16 == 0, "the native kernels need block_size % 16 == 0, got ", block_size);
}

namespace {

at::Tensor checked_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == n, name, ": expected ", n, " elements, got shape ", t.sizes());
  return t.to(dtype).contiguous();
}

}  // namespace

void LlamaModel::add_layer(const at::Tensor& input_norm, const at::Tensor& qkv, const c10::optional<at::Tensor>& qkv_bias,
                           const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                           const at::Tensor& o, const at::Tensor& post_norm, const at::Tensor& gate_up,
                           const at::Tensor& down) {
  dtype_ = input_norm.scalar_type();  // the model's: its norms are never quantized
  const int64_t D = shape_.head_dim, q_size = shape_.num_heads * D, kv_size = shape_.num_kv_heads * D;
  Layer layer;
  layer.input_norm = checked_vector(input_norm, hidden_, dtype_, "input_layernorm");
  layer.post_norm = checked_vector(post_norm, hidden_, dtype_, "post_attention_layernorm");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q_norm and k_norm come together");
  if (q_norm.has_value()) {
    layer.q_norm = checked_vector(*q_norm, D, dtype_, "q_norm");
    layer.k_norm = checked_vector(*k_norm, D, dtype_, "k_norm");
  }
  layer.qkv = make_packed_linear(qkv, qkv_bias, q_size + 2 * kv_size, hidden_);
  layer.o = make_packed_linear(o, c10::nullopt, hidden_, q_size);
  layer.gate_up = make_packed_linear(gate_up, c10::nullopt, gate_up_rows(intermediate_), hidden_);  // in pairs
  layer.down = make_packed_linear(down, c10::nullopt, hidden_, intermediate_);
  for (const PackedLinear* w : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down})
    TORCH_CHECK(w->data.scalar_type() == dtype_ || w->is_quantized(),
                "every float packed weight must have the model's dtype (its norms')");
  layers_.push_back(std::move(layer));
}

void LlamaModel::set_head(const c10::optional<at::Tensor>& embedding, const at::Tensor& head,
                          const at::Tensor& final_norm) {
  head_ = make_packed_linear(head, c10::nullopt, vocab_, hidden_);
  TORCH_CHECK(head_.is_quantized() || head.scalar_type() == dtype_, "a float LM head must have the layers' dtype");
  final_norm_ = checked_vector(final_norm, hidden_, dtype_, "norm");
  if (embedding.has_value()) {
    TORCH_CHECK(embedding->dim() == 2 && embedding->size(0) == vocab_ && embedding->size(1) == hidden_,
                "embedding: expected [vocab_size, hidden_size]");
    embedding_ = embedding->to(dtype_).contiguous();
  } else {
    embedding_ = at::Tensor();  // tied: token rows are read from the packed head
  }
}

void LlamaModel::set_rope(const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == shape_.head_dim && cos.sizes() == sin.sizes(),
              "rope tables: expected [max_position, head_dim]");
  cos_ = cos.to(at::kFloat).contiguous();
  sin_ = sin.to(at::kFloat).contiguous();
}

void LlamaModel::set_kv_caches(const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                                const std::string& kv_cache_dtype) {
  TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "one K and V cache per layer");
  const int64_t H = shape_.num_kv_heads, D = shape_.head_dim, bs = shape_.block_size;
  shape_.kv_codec = kv_codec_from_name(kv_cache_dtype);
  num_blocks_ = k_caches.empty() ? 0 : k_caches[0].size(0);
  const bool pairs = dtype_ == at::kBFloat16;  // see attention.h
  std::vector<int64_t> k_shape = pairs ? std::vector<int64_t>{num_blocks_, H, D / 2, bs, 2}
                                       : std::vector<int64_t>{num_blocks_, H, D, bs};
  std::vector<int64_t> v_shape = pairs ? std::vector<int64_t>{num_blocks_, H, bs / 2, D, 2}
                                       : std::vector<int64_t>{num_blocks_, H, bs, D};
  const bool quantized = shape_.kv_codec != KvCodec::kNone;
  if (quantized) k_shape = v_shape = {num_blocks_, H, shape_.quantized_head_bytes()};
  const at::ScalarType cache_dtype = quantized ? at::kByte : dtype_;
  for (size_t i = 0; i < k_caches.size(); ++i) {
    TORCH_CHECK(k_caches[i].sizes() == at::IntArrayRef(k_shape) && k_caches[i].is_contiguous(), "K cache ", i,
                ": expected contiguous ", at::IntArrayRef(k_shape), " (attention.h), got ", k_caches[i].sizes());
    TORCH_CHECK(v_caches[i].sizes() == at::IntArrayRef(v_shape) && v_caches[i].is_contiguous(), "V cache ", i,
                ": expected contiguous ", at::IntArrayRef(v_shape), " (attention.h), got ", v_caches[i].sizes());
    TORCH_CHECK(k_caches[i].scalar_type() == cache_dtype && v_caches[i].scalar_type() == cache_dtype,
                "the KV cache must have the model's dtype, or be uint8 when quantized");
  }
  k_caches_ = k_caches;
  v_caches_ = v_caches;
}

void LlamaModel::release_buffers() {
  buffers_.clear();
  buffers_.shrink_to_fit();
}

at::Tensor LlamaModel::buffer(size_t index, int64_t rows, int64_t cols, at::ScalarType dtype) {
  if (buffers_.size() <= index) buffers_.resize(index + 1);
  at::Tensor& b = buffers_[index];
  if (!b.defined() || b.numel() < rows * cols || b.scalar_type() != dtype) {
    b = at::empty({std::max<int64_t>(rows * cols, 1)}, at::TensorOptions().dtype(dtype));
  }
  return b.narrow(0, 0, rows * cols).view({rows, cols});
}

void LlamaModel::set_profiling(bool on) {
  profiling_ = on;
  std::fill(profile_seconds_.begin(), profile_seconds_.end(), 0.0);
}

c10::Dict<std::string, double> LlamaModel::profile() const {
  c10::Dict<std::string, double> out;
  for (int i = 0; i < int(Phase::kNumPhases); ++i) out.insert(kPhaseNames[i], profile_seconds_[i]);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> LlamaModel::forward(const at::Tensor& input_ids,
                                                                   const at::Tensor& query_start_loc,
                                                                   const at::Tensor& seq_lens,
                                                                   const at::Tensor& block_table,
                                                                   const at::Tensor& logits_indices, bool greedy,
                                                                   const std::vector<int64_t>& layers) {
  const double start = profiling_ ? now_seconds() : 0.0;
  TORCH_CHECK(!layers_.empty() && head_.data.defined() && cos_.defined() && !k_caches_.empty(),
              "the model is not complete: add its layers, head, rope tables and KV caches first");
  TORCH_CHECK(input_ids.scalar_type() == at::kLong && input_ids.dim() == 1 && input_ids.is_contiguous(),
              "input_ids: expected a contiguous int64 vector");
  TORCH_CHECK(logits_indices.scalar_type() == at::kLong && logits_indices.dim() == 1 &&
                  logits_indices.is_contiguous(),
              "logits_indices: expected a contiguous int64 vector");
  std::vector<int64_t> L = layers;
  if (L.empty()) {
    for (size_t l = 0; l < layers_.size(); ++l) L.push_back(int64_t(l));
  }
  for (int64_t l : L) TORCH_CHECK(l >= 0 && l < int64_t(layers_.size()), "layer index ", l, " out of range");
  const int64_t T = input_ids.numel();
  SeqBatch batch = make_seq_batch(query_start_loc, seq_lens, block_table, shape_.block_size, num_blocks_);
  TORCH_CHECK(batch.num_tokens == T, "query_start_loc covers ", batch.num_tokens, " tokens, input_ids has ", T);
  const int64_t* ids = input_ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(ids[t] >= 0 && ids[t] < vocab_, "token id ", ids[t], " out of range");
  const int64_t S = logits_indices.numel();
  const int64_t* rows = logits_indices.data_ptr<int64_t>();
  for (int64_t i = 0; i < S; ++i) TORCH_CHECK(rows[i] >= 0 && rows[i] < T, "logits index out of range");
  for (int64_t s = 0; s < batch.num_seqs; ++s)
    TORCH_CHECK(batch.seq_lens[s] <= cos_.size(0), "seq_len ", batch.seq_lens[s], " exceeds the rope table");

  at::Tensor positions = buffer(kPositions, T, 1, at::kLong), slots = buffer(kSlots, T, 1, at::kLong);
  token_positions_and_slots(batch, shape_.block_size, positions.data_ptr<int64_t>(), slots.data_ptr<int64_t>());
  const AttentionPlan plan = plan_attention(batch, shape_, at::get_num_threads());
  at::Tensor partials = buffer(kPartials, attention_partial_floats(plan, shape_), 1, at::kFloat);
  at::Tensor logits = buffer(kLogits, S, vocab_, at::kFloat);
  at::Tensor token_ids = buffer(kTokenIds, greedy ? S : 0, 1, at::kLong).view(-1);
  at::Tensor logprobs = buffer(kLogprobs, greedy ? S : 0, 1, at::kFloat).view(-1);
  Greedy pick{greedy ? token_ids.data_ptr<int64_t>() : nullptr, logprobs.data_ptr<float>(),
              std::vector<ArgmaxPartial>(greedy ? argmax_partials_size(S) : 0)};
  const RopeArgs rope{positions.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), cos_.data_ptr<float>(),
                      sin_.data_ptr<float>(), eps_};
  if (dtype_ == at::kBFloat16) {
    run<bf16>(ids, T, L, batch, plan, rope, rows, S, partials.data_ptr<float>(), logits.data_ptr<float>(), pick);
  } else {
    TORCH_CHECK(dtype_ == at::kFloat, "the native model runs fp32 or bf16 weights");
    run<float>(ids, T, L, batch, plan, rope, rows, S, partials.data_ptr<float>(), logits.data_ptr<float>(), pick);
  }
  if (profiling_) profile_seconds_[int(Phase::kForward)] += now_seconds() - start;
  return {logits, token_ids, logprobs};
}

template <typename T>
void LlamaModel::run(const int64_t* ids, int64_t num_tokens, const std::vector<int64_t>& layers, const SeqBatch& batch,
                     const AttentionPlan& plan, const RopeArgs& rope, const int64_t* logit_rows,
                     int64_t num_logits, float* partials, float* logits, Greedy& greedy) {
  const at::ScalarType dt = dtype_;
  const int64_t H = hidden_, I = intermediate_, D = shape_.head_dim;
  const int64_t q_size = shape_.num_heads * D, qkv_size = q_size + 2 * shape_.num_kv_heads * D;
  const int64_t n = num_tokens;
  auto ptr = [](const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); };
  auto opt = [&](const at::Tensor& t) { return t.defined() ? ptr(t) : nullptr; };
  T* x = ptr(buffer(kResidual, n, H, dt));  // the residual stream
  T* h = ptr(buffer(kNormed, n, H, dt));
  T* delta = ptr(buffer(kDelta, n, H, dt));  // a sublayer's output, added to x by the next norm
  T* qkv = ptr(buffer(kQKV, n, qkv_size, dt));
  T* attn = ptr(buffer(kAttention, n, q_size, dt));
  T* act = ptr(buffer(kActivation, n, I, dt));
  T* final_rows = ptr(buffer(kFinal, num_logits, H, dt));
  T* final_x = ptr(buffer(kFinalResidual, num_logits, H, dt));
  const T* embedding = embedding_.defined() ? ptr(embedding_) : nullptr;
  // Work-shared loops per thread: per layer norm, qkv, rope, attention (2), o, norm, gate/up,
  // down; then the embedding, the final norm, the head and the greedy pick (2).
  const int num_loops = int(layers.size()) * 9 + 5;

  run_parallel(num_loops, [&](Team& team) {
    // Thread 0 times each kernel from the barrier before it to the barrier after it.
    const bool timing = profiling_ && team.tid == 0;
    double last = timing ? now_seconds() : 0.0;
    auto sync = [&](Phase phase) {
      team.sync();
      if (timing) {
        const double now = now_seconds();
        profile_seconds_[int(phase)] += now - last;
        last = now;
      }
    };
    if (embedding != nullptr) {
      team.for_each(n, team.chunk_for(n), [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) std::copy(embedding + ids[t] * H, embedding + (ids[t] + 1) * H, x + t * H);
      });
    } else {
      gather_rows(team, head_, ids, n, x);
    }
    sync(Phase::kEmbed);
    for (size_t i = 0; i < layers.size(); ++i) {
      const int64_t l = layers[i];
      const Layer& L = layers_[l];
      void* k_cache = k_caches_[l].data_ptr();  // T, or bytes of a quantized cache
      void* v_cache = v_caches_[l].data_ptr();
      add_rms_norm(team, x, i == 0 ? nullptr : delta, ptr(L.input_norm), eps_, n, H, h);
      sync(Phase::kNorm);
      linear(team, h, n, H, L.qkv, qkv, qkv_size);
      sync(Phase::kQKVProj);
      rope_and_cache(team, shape_, rope, n, qkv, qkv_size, opt(L.q_norm), opt(L.k_norm), k_cache, v_cache);
      sync(Phase::kRope);
      paged_attention(team, plan, batch, shape_, qkv, qkv_size, k_cache, v_cache, attn, q_size, partials);
      sync(Phase::kAttention);
      linear(team, attn, n, q_size, L.o, delta, H);
      sync(Phase::kOProj);
      add_rms_norm(team, x, delta, ptr(L.post_norm), eps_, n, H, h);
      sync(Phase::kNorm);
      linear_silu_mul(team, h, n, H, L.gate_up, I, act, I);
      sync(Phase::kGateUpProj);
      linear(team, act, n, I, L.down, delta, H);
      sync(Phase::kDownProj);
    }
    // Only the rows that sample need the last residual add, the final norm and the head.
    team.for_each(num_logits, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = logit_rows[i];
        std::copy(x + r * H, x + (r + 1) * H, final_x + i * H);
        add_rms_norm_row(final_x + i * H, delta + r * H, ptr(final_norm_), eps_, H, final_rows + i * H);
      }
    });
    sync(Phase::kFinalNorm);
    linear(team, final_rows, num_logits, H, head_, logits, vocab_, std::is_same_v<T, bf16>);
    sync(Phase::kLMHead);
    if (greedy.token_ids != nullptr) {
      argmax_logprob(team, logits, num_logits, vocab_, greedy.partials.data(),
                     greedy.token_ids, greedy.logprobs);
      sync(Phase::kGreedy);
    }
  });
}

}  // namespace thrifty
