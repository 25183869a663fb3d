// The library's ops and its model class, registered with torch (torch.ops.thrifty.*,
// torch.classes.thrifty.LlamaModel) when Python loads the library. The single ops run one kernel
// each on torch's intra-op threads; the tests compare them with the pure-torch reference path.
#include <torch/library.h>

#include "model.h"

namespace thrifty {
namespace {

template <typename T>
T* data(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Runs body<float> or body<bf16> by the dtype of `t`.
template <typename F>
void dispatch(const at::Tensor& t, F&& body) {
  if (t.scalar_type() == at::kFloat) {
    body(float{});
  } else {
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, "thrifty ops take fp32 or bf16 tensors, got ", t.scalar_type());
    body(bf16{});
  }
}

at::Tensor linear_op(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                     int64_t N, bool out_fp32) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "linear: x must be 2-D with contiguous rows");
  TORCH_CHECK(x.scalar_type() == packed.scalar_type() || packed.scalar_type() == at::kByte,
              "linear: x and a float weight must share a dtype");
  const PackedLinear w = make_packed_linear(packed, bias, N, x.size(1));
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_fp32 ? at::kFloat : x.scalar_type()));
  if (M == 0) return y;
  dispatch(x, [&](auto t) {
    using T = decltype(t);
    run_parallel(1, [&](Team& team) {
      if (out_fp32) {
        linear(team, data<T>(x), M, x.stride(0), w, data<float>(y), N);
      } else {
        linear(team, data<T>(x), M, x.stride(0), w, data<T>(y), N);
      }
    });
  });
  return y;
}

// The shape of a step over a cache in attention.h's layout for the dtype (bf16: pairs; uint8: a
// quantized cache, kv_cache_dtype int8 or fp8_e4m3). q is the step's queries (or keys): a float
// cache has their dtype; V is K's like (a quantized one: the same shape).
AttentionShape attention_shape(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               double scale, const std::string& kv_cache_dtype) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q: expected contiguous [num_tokens, num_heads, head_dim]");
  const KvCodec codec = kv_codec_from_name(kv_cache_dtype);
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() && v_cache.is_contiguous() &&
                  v_cache.size(0) == k_cache.size(0) &&
                  (codec != KvCodec::kNone ? v_cache.sizes() == k_cache.sizes() : q.scalar_type() == k_cache.scalar_type()),
              "q and the caches must share a dtype (a quantized V cache: K's dtype and shape); caches contiguous");
  TORCH_CHECK((codec != KvCodec::kNone) == (k_cache.scalar_type() == at::kByte),
              "a uint8 cache is a quantized one: give its kv_cache_dtype (int8 or fp8_e4m3)");
  if (codec != KvCodec::kNone) {
    const int64_t D = q.size(2);
    TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && k_cache.size(2) % (D + 4) == 0,
                "quantized k_cache: expected contiguous [blocks, kv_heads, (head_dim + 4) * block_size] uint8");
    TORCH_CHECK(supported_head_dim(D), "head_dim must be 16, 32, 64, 128 or 256");
    return {q.size(1), k_cache.size(1), D, k_cache.size(2) / (D + 4), float(scale), codec};
  }
  const bool pairs = k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK(k_cache.dim() == (pairs ? 5 : 4) && k_cache.is_contiguous(),
              "k_cache: expected attention.h's layout, [blocks, kv_heads, head_dim, block] (fp32) or "
              "[blocks, kv_heads, head_dim / 2, block, 2] (bf16)");
  const int64_t head_dim = pairs ? k_cache.size(2) * 2 : k_cache.size(2);
  TORCH_CHECK(head_dim == q.size(2), "q and the cache disagree on head_dim");
  TORCH_CHECK(supported_head_dim(head_dim), "head_dim must be 16, 32, 64, 128 or 256");
  return {q.size(1), k_cache.size(1), head_dim, k_cache.size(3), float(scale)};
}

at::Tensor paged_attention_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                              const at::Tensor& block_table, double scale, const std::string& kv_cache_dtype) {
  const AttentionShape shape = attention_shape(q, k_cache, v_cache, scale, kv_cache_dtype);
  const SeqBatch batch = make_seq_batch(query_start_loc, seq_lens, block_table, shape.block_size, k_cache.size(0));
  TORCH_CHECK(batch.num_tokens == q.size(0), "query_start_loc does not cover q's tokens");
  const AttentionPlan plan = plan_attention(batch, shape, at::get_num_threads());
  at::Tensor partials = at::empty({attention_partial_floats(plan, shape)}, q.options().dtype(at::kFloat));
  at::Tensor out = at::empty_like(q);
  dispatch(q, [&](auto t) {
    using T = decltype(t);
    const int64_t stride = shape.num_heads * shape.head_dim;
    run_parallel(2, [&](Team& team) {
      paged_attention(team, plan, batch, shape, data<T>(q), stride, k_cache.data_ptr(), v_cache.data_ptr(),
                      data<T>(out), stride, data<float>(partials));
    });
  });
  return out;
}

void write_kv_op(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
                 const at::Tensor& query_start_loc, const at::Tensor& seq_lens, const at::Tensor& block_table,
                 const std::string& kv_cache_dtype) {
  const AttentionShape shape = attention_shape(k, k_cache, v_cache, 1.0, kv_cache_dtype);
  TORCH_CHECK(k.size(1) == shape.num_kv_heads && v.scalar_type() == k.scalar_type(),
              "write_kv: k and v [tokens, kv_heads, head_dim] must match the caches' heads and each other's dtype");
  TORCH_CHECK(v.sizes() == k.sizes() && v.is_contiguous(), "v must be shaped and laid out as k");
  const SeqBatch batch = make_seq_batch(query_start_loc, seq_lens, block_table, shape.block_size, k_cache.size(0));
  TORCH_CHECK(batch.num_tokens == k.size(0), "query_start_loc does not cover k's tokens");
  std::vector<int64_t> positions(batch.num_tokens), slots(batch.num_tokens);
  token_positions_and_slots(batch, shape.block_size, positions.data(), slots.data());
  dispatch(k, [&](auto t) {
    using T = decltype(t);
    const int64_t stride = shape.num_kv_heads * shape.head_dim;
    for (int64_t i = 0; i < batch.num_tokens; ++i)
      write_kv_token(shape, slots[i], data<T>(k) + i * stride, data<T>(v) + i * stride, k_cache.data_ptr(),
                     v_cache.data_ptr());
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_op(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                               const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && weight.numel() == x.size(1), "rms_norm: x [rows, dim], weight [dim]");
  at::Tensor residual = x.contiguous().clone(), out = at::empty_like(residual);
  at::Tensor d = delta.has_value() ? delta->to(x.scalar_type()).contiguous() : at::Tensor();
  at::Tensor w = weight.to(x.scalar_type()).contiguous();
  dispatch(x, [&](auto t) {
    using T = decltype(t);
    run_parallel(1, [&](Team& team) {
      add_rms_norm(team, data<T>(residual), d.defined() ? data<T>(d) : nullptr, data<T>(w), float(eps), x.size(0),
                   x.size(1), data<T>(out));
    });
  });
  return {residual, out};
}

at::Tensor linear_silu_mul_op(const at::Tensor& x, const at::Tensor& packed, int64_t I) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "linear_silu_mul: x must be 2-D with contiguous rows");
  TORCH_CHECK(x.scalar_type() == packed.scalar_type() || packed.scalar_type() == at::kByte,
              "linear_silu_mul: x and a float weight must share a dtype");
  const PackedLinear w = make_packed_linear(packed, c10::nullopt, gate_up_rows(I), x.size(1));
  at::Tensor act = at::empty({x.size(0), I}, x.options());
  dispatch(x, [&](auto t) {
    using T = decltype(t);
    run_parallel(1, [&](Team& team) {
      linear_silu_mul(team, data<T>(x), x.size(0), x.stride(0), w, I, data<T>(act), I);
    });
  });
  return act;
}

std::tuple<at::Tensor, at::Tensor> argmax_logprob_op(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "argmax_logprob: fp32 logits [rows, vocab]");
  at::Tensor x = logits.contiguous();
  at::Tensor ids = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({x.size(0)}, x.options());
  std::vector<ArgmaxPartial> partials(argmax_partials_size(x.size(0)));
  run_parallel(2, [&](Team& team) {
    argmax_logprob(team, x.data_ptr<float>(), x.size(0), x.size(1), partials.data(), ids.data_ptr<int64_t>(),
                   logprobs.data_ptr<float>());
  });
  return {ids, logprobs};
}

}  // namespace

TORCH_LIBRARY(thrifty, m) {
  m.def("pack_linear_weight(Tensor weight) -> Tensor", &pack_linear_weight);
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, int N, bool out_fp32=False) -> Tensor", &linear_op);
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor query_start_loc, Tensor seq_lens, "
        "Tensor block_table, float scale, str kv_cache_dtype=\"auto\") -> Tensor",
        &paged_attention_op);
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor query_start_loc, "
        "Tensor seq_lens, Tensor block_table, str kv_cache_dtype=\"auto\") -> ()",
        &write_kv_op);
  m.def("rms_norm(Tensor x, Tensor? delta, Tensor weight, float eps) -> (Tensor, Tensor)", &rms_norm_op);
  m.def("pack_gate_up_weight(Tensor weight) -> Tensor", &pack_gate_up_weight);
  m.def("linear_silu_mul(Tensor x, Tensor packed, int I) -> Tensor", &linear_silu_mul_op);
  m.def("argmax_logprob(Tensor logits) -> (Tensor, Tensor)", &argmax_logprob_op);
  m.class_<LlamaModel>("LlamaModel")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t>())
      .def("add_layer", &LlamaModel::add_layer)
      .def("set_head", &LlamaModel::set_head)
      .def("set_rope", &LlamaModel::set_rope)
      .def("set_kv_caches", &LlamaModel::set_kv_caches)
      .def("release_buffers", &LlamaModel::release_buffers)
      .def("forward", &LlamaModel::forward)
      .def("set_profiling", &LlamaModel::set_profiling)
      .def("profile", &LlamaModel::profile);
}

}  // namespace thrifty
