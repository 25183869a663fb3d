#pragma once

#include <torch/custom_class.h>

#include <vector>

#include "attention.h"
#include "gemm.h"
#include "pointwise.h"

namespace thrifty {

// A Llama-family decoder built from packed weights (thrifty/native/model.py builds it from the
// torch model), run by `forward` over one step's flat batch of tokens.
class LlamaModel : public torch::CustomClassHolder {
 public:
  LlamaModel(int64_t hidden_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
             int64_t intermediate_size, int64_t vocab_size, double rms_norm_eps, int64_t block_size);

  // Matmul weights packed by pack_linear_weight, gate_up by pack_gate_up_weight (gemm.h).
  void add_layer(const at::Tensor& input_norm, const at::Tensor& qkv, const c10::optional<at::Tensor>& qkv_bias,
                 const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                 const at::Tensor& o, const at::Tensor& post_norm, const at::Tensor& gate_up,
                 const at::Tensor& down);
  // embedding: [vocab, hidden], or none when tied to the head (rows are read from the packed head).
  void set_head(const c10::optional<at::Tensor>& embedding, const at::Tensor& head, const at::Tensor& final_norm);
  void set_rope(const at::Tensor& cos, const at::Tensor& sin);
  // kv_cache_dtype: "auto" (the model's dtype), "int8" or "fp8_e4m3" (attention.h's layouts).
  void set_kv_caches(const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                     const std::string& kv_cache_dtype);
  // Frees the workspaces `forward` grew (sleep mode); the next forward grows them again.
  void release_buffers();

  // Writes the step's K/V into the caches and returns the fp32 logits [len(logits_indices), vocab]
  // of the given token rows and, with `greedy`, each row's argmax and its log-softmax (else two
  // empty tensors): the sampler's greedy pass, without a second call. All three live in buffers
  // the next call reuses. A non-empty `layers` runs only those layers, in that order, before the
  // final norm and the head (the self-draft of speculative decoding); empty runs them all.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& input_ids,
                                                         const at::Tensor& query_start_loc,
                                                         const at::Tensor& seq_lens, const at::Tensor& block_table,
                                                         const at::Tensor& logits_indices, bool greedy,
                                                         const std::vector<int64_t>& layers);

  // Wall time per kind of kernel, summed over forward calls while profiling is on (thread 0's
  // clock from one barrier to the next, so a kernel's time includes waiting for its slowest
  // thread). Keys: the Phase names below, plus "forward" (whole calls, checks included).
  void set_profiling(bool on);
  c10::Dict<std::string, double> profile() const;

 private:
  struct Layer {
    at::Tensor input_norm, post_norm, q_norm, k_norm;
    PackedLinear qkv, o, gate_up, down;
  };
  enum class Phase : int { kEmbed, kNorm, kQKVProj, kRope, kAttention, kOProj, kGateUpProj, kDownProj,
                     kFinalNorm, kLMHead, kGreedy, kForward, kNumPhases };
  enum Buffer : size_t {
    kPositions, kSlots, kPartials, kLogits, kTokenIds, kLogprobs, kResidual, kNormed, kDelta, kQKV, kAttention,
    kActivation, kFinal, kFinalResidual,
  };
  struct Greedy {  // where forward's greedy pick goes; token_ids null: no pick
    int64_t* token_ids;
    float* logprobs;
    std::vector<ArgmaxPartial> partials;
  };

  // A workspace tensor [rows, cols], grown when a step needs more, reused otherwise: large
  // prefill buffers freed and taken again every step would fault their pages in every step.
  at::Tensor buffer(size_t index, int64_t rows, int64_t cols, at::ScalarType dtype);

  template <typename T>
  void run(const int64_t* ids, int64_t num_tokens, const std::vector<int64_t>& layers, const SeqBatch& batch,
           const AttentionPlan& plan, const RopeArgs& rope, const int64_t* logit_rows, int64_t num_logits,
           float* partials, float* logits, Greedy& greedy);

  int64_t hidden_, intermediate_, vocab_;
  float eps_;
  AttentionShape shape_;
  at::ScalarType dtype_ = at::kFloat;
  std::vector<Layer> layers_;
  PackedLinear head_;
  at::Tensor embedding_, final_norm_, cos_, sin_;
  std::vector<at::Tensor> k_caches_, v_caches_;
  int64_t num_blocks_ = 0;
  std::vector<at::Tensor> buffers_;
  bool profiling_ = false;
  std::vector<double> profile_seconds_ = std::vector<double>(int(Phase::kNumPhases), 0.0);
};

}  // namespace thrifty
