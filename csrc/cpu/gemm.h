// Matmuls against weights packed once at load: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
#pragma once

#include <ATen/ATen.h>

#include "parallel.h"
#include "vec.h"

namespace thrifty {

// Output columns per packed panel: one AVX-512 register of floats, two AVX2 ones.
constexpr int64_t kPanel = 16;

// A [N, K] weight in column panels of 16 outputs, each panel contiguous over all of K, so a
// thread streams its panels front to back and reads every weight byte once per row block:
//   bf16: [ceil(N/16), K/2, 16, 2], the two k of a pair side by side (what vdpbf16ps reads);
//   fp32: [ceil(N/16), K, 16];
//   quantized (a uint8 tensor): a kQuantHeader-byte header (QuantHeader), then per panel its
//   K/group groups, each its quants then 16 fp16 scales d and, with mins, 16 fp16 mins m; the
//   weight is d * q + m (llama.cpp's Q8_0, Q4_0 and Q4_1 blocks, and thrifty's int8 and int4):
//     int8: group x 16 int8, k-major;
//     int4: group/4 chunks of 32 bytes, one per 4 k: byte 2o + e holds output o's k = 4c + e
//           in its low nibble and k = 4c + 2 + e in its high nibble (what vpermw + vdpbf16ps read).
// Columns past N in the last panel are zero.
enum class WeightFormat : int32_t { kFloat = 0, kInt4 = 4, kInt8 = 8 };

constexpr int64_t kQuantHeader = 64;
struct QuantHeader {  // little-endian int32s at the start of a quantized packed weight
  static constexpr int32_t kMagic = 0x51485454;  // "TTHQ"
  int32_t magic, bits, group, has_min;
  int64_t N, K;
};

struct PackedLinear {
  at::Tensor data;
  at::Tensor bias;  // fp32 [N], or undefined
  int64_t N = 0;
  int64_t K = 0;
  WeightFormat format = WeightFormat::kFloat;
  int64_t group = 0;  // quantized: k per scale group
  bool has_min = false;

  int64_t num_panels() const { return (N + kPanel - 1) / kPanel; }
  bool is_quantized() const { return format != WeightFormat::kFloat; }
  // Quantized: the bytes of one group's quants in a panel, and of the group with its scales.
  int64_t quant_bytes() const { return group * kPanel * int64_t(format) / 8; }
  int64_t group_bytes() const { return quant_bytes() + (has_min ? 4 : 2) * kPanel; }
  // The first panel and the bytes from one panel to the next.
  const uint8_t* panels() const {
    return static_cast<const uint8_t*>(data.data_ptr()) + (is_quantized() ? kQuantHeader : 0);
  }
  int64_t panel_bytes() const { return is_quantized() ? K / group * group_bytes() : K * kPanel * data.element_size(); }
};

at::Tensor pack_linear_weight(const at::Tensor& weight);
PackedLinear make_packed_linear(const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t N,
                                int64_t K);

// y = x @ W^T (+ bias) by the whole team (work-shared, no barrier after). x has W's element type,
// or either float type for a quantized W;
// y is bf16 or fp32; with round_bf16, fp32 outputs are rounded to bf16 values (a bf16 model's
// logits). Rows of x and y are `ldx` and `ldy` elements apart.
template <typename T, typename TOut>
void linear(Team& team, const T* x, int64_t M, int64_t ldx, const PackedLinear& w, TOut* y, int64_t ldy,
            bool round_bf16 = false);

// A gate/up weight [2 I, K] (the I gate rows, then the I up rows) packed with gate panel i
// followed by up panel i (each half padded to whole panels), so that every tile of a matmul over
// it holds both factors of its outputs.
at::Tensor pack_gate_up_weight(const at::Tensor& weight);
// The N of such a weight: both halves padded to whole panels.
inline int64_t gate_up_rows(int64_t I) { return 2 * ((I + kPanel - 1) / kPanel * kPanel); }

// act[M, I] = SiLU(x @ gate^T) * (x @ up^T) by the whole team, from a pack_gate_up_weight weight,
// rounded as the unfused matmul and SiLU-and-multiply would round it in T.
template <typename T>
void linear_silu_mul(Team& team, const T* x, int64_t M, int64_t ldx, const PackedLinear& w, int64_t I, T* act,
                     int64_t ldact);

// out[t, :] = row ids[t] of the packed weight (an embedding table that is also the tied LM head),
// a quantized row as d * q + m rounded to T.
template <typename T>
void gather_rows(Team& team, const PackedLinear& w, const int64_t* ids, int64_t num_ids, T* out);

}  // namespace thrifty
