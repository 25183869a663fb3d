// Packed-weight matmuls. One tile computes MR rows x NR panels (16 columns each) over all of K
// in registers, then adds the bias and stores. The inner kernels, all over pairs of k:
//   bf16 weights with AVX512-BF16: vdpbf16ps, the activation pair broadcast;
//   otherwise fp32 FMA: fp32 weights, or bf16 weights with each pair widened to two fp32 vectors;
//   quantized weights: the quants decoded to floats in registers (int4 with AVX512-BF16 and bf16
//   activations: to bf16 by a vpermw table, for vdpbf16ps), summed per group, then scaled.
// At one row a matmul is bound by streaming the weights from memory, so a thread walks its
// panels front to back; at many rows it is bound by the FMA units, and row blocks are sized so
// that a block of x stays in L2 while the thread's panels pass over it.
#include "gemm.h"

#include <array>
#include <cstring>
#include <vector>

namespace thrifty {
namespace {

constexpr int S = int(kPanel) / FVec::N;  // vectors per panel
constexpr int MR = 4;                     // rows per tile
constexpr int NR = 4;                     // panels per tile
// Quantized tiles decode each chunk of weights once for all their rows, so they take one row more
// than float tiles: a speculative verify step of 5 tokens is then one tile, not a 4-row and a
// 1-row one that decode every weight twice. 5 rows x 2 panels fit both sets of accumulators
// (and, for int4, the decoded weights and the table) in the 32 AVX-512 registers.
constexpr int MR_QUANT = 5;
// One or two rows (decoding alone, or nearly) are bound by streaming the weights: tiles of 8
// panels, and one contiguous run of panels per thread, which streamed the fastest of the layouts
// tried (docs/native.md, Matmuls).
constexpr int64_t kStreamRows = 2;
constexpr int NR_STREAM = 8;
static_assert(NR % 2 == 0 && NR_STREAM % 2 == 0, "gate/up tiles must hold whole (gate, up) panel pairs");

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, typename TOut>
struct Tile {
  const T* x;  // the tile's first row
  int64_t ldx;
  const uint8_t* w;  // the tile's first panel
  int64_t pstride;  // bytes from one panel to the next
  int64_t K;
  const PackedLinear* lin;  // the weight's format
  const float* bias;  // at the tile's first column, or null
  TOut* y;  // the tile's first output
  int64_t ldy;
  const float* x_sums;  // quantized with mins: row m's sum of x over group g at x_sums[m * K / group + g]
  int64_t n_valid;  // columns of the tile's output inside the matrix
  bool round_bf16;
  bool silu_mul;  // the panels are (gate, up) pairs and the tile stores SiLU(gate) * up
};

template <int M, int P>
inline void set_zero(FVec (&acc)[M][P][S]) {
  for (auto& row : acc) for (auto& panel : row) for (auto& v : panel) v = FVec::zero();
}

// Stores the first n of v's lanes at out.
template <typename TOut>
inline void store_lanes(const FVec& v, TOut* out, int64_t n) {
  if (n >= FVec::N) {
    v.store(out);
    return;
  }
  float tmp[FVec::N];
  v.store(tmp);
  for (int64_t i = 0; i < n; ++i) store_scalar(out + i, tmp[i]);
}

// The gate/up epilogue: the pair's outputs rounded to T as the unfused gate_up matmul would
// store them, then SiLU(gate) * up as silu_times rounds it; a tile of P panels writes P/2 of output.
template <int M, int P, typename T, typename TOut>
inline void store_silu_mul(FVec (&acc)[M][P][S], const Tile<T, TOut>& t) {
  static_assert(std::is_same_v<T, TOut>, "the activation has the input's type");
  for (int m = 0; m < M; ++m)
    for (int j = 0; j + 1 < P; j += 2)
      for (int s = 0; s < S; ++s) {
        const int64_t col = j / 2 * kPanel + s * FVec::N;
        if (col >= t.n_valid) continue;
        const FVec v = silu_times<T>(rounded<T>(acc[m][j][s]), rounded<T>(acc[m][j + 1][s]));
        store_lanes(v, t.y + m * t.ldy + col, t.n_valid - col);
      }
}

template <int M, int P, typename T, typename TOut>
inline void store_tile(FVec (&acc)[M][P][S], const Tile<T, TOut>& t) {
  if constexpr (std::is_same_v<T, TOut>) {
    if (t.silu_mul) return store_silu_mul<M, P>(acc, t);
  }
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < P; ++j) {
      for (int s = 0; s < S; ++s) {
        const int64_t col = j * kPanel + s * FVec::N;
        if (col >= t.n_valid) continue;
        FVec v = acc[m][j][s];
        if (t.bias != nullptr) {
          if (col + FVec::N <= t.n_valid) {
            v = v + FVec::load(t.bias + col);
          } else {
            float b[FVec::N] = {};
            std::memcpy(b, t.bias + col, sizeof(float) * (t.n_valid - col));
            v = v + FVec::load(b);
          }
        }
        if (t.round_bf16) v = v.round_bf16();
        store_lanes(v, t.y + m * t.ldy + col, t.n_valid - col);
      }
    }
  }
}

// Reads the weights of two consecutive k (2p and 2p + 1) for the FVec::N outputs of a panel's
// s-th slice: an fp32 panel holds each k's 16 outputs in turn, a bf16 panel the two k of each
// output side by side (widened here: a shift and a mask).
inline void load_k_pair(const float* panel, int64_t p, int s, FVec& first, FVec& second) {
  first = FVec::load(panel + 2 * p * kPanel + s * FVec::N);
  second = FVec::load(panel + (2 * p + 1) * kPanel + s * FVec::N);
}

inline void load_k_pair(const bf16* panel, int64_t p, int s, FVec& first, FVec& second) {
  load_pairs(panel + p * 2 * kPanel + s * 2 * FVec::N, first, second);
}

// fp32 multiply-adds: fp32 weights, and bf16 weights on CPUs without AVX512-BF16.
template <int M, int P>
struct KernelFma {
  template <typename T, typename TOut>
  static void run(const Tile<T, TOut>& t) {
    FVec acc[M][P][S];
    set_zero(acc);
    for (int64_t p = 0; p < t.K / 2; ++p) {
      FVec first[P][S], second[P][S];
      for (int j = 0; j < P; ++j)
        for (int s = 0; s < S; ++s)
          load_k_pair(reinterpret_cast<const T*>(t.w + j * t.pstride), p, s, first[j][s], second[j][s]);
      for (int m = 0; m < M; ++m) {
        const FVec b0(to_float(t.x[m * t.ldx + 2 * p]));
        const FVec b1(to_float(t.x[m * t.ldx + 2 * p + 1]));
        for (int j = 0; j < P; ++j)
          for (int s = 0; s < S; ++s)
            acc[m][j][s] = FVec::fma(b1, second[j][s], FVec::fma(b0, first[j][s], acc[m][j][s]));
      }
    }
    store_tile<M, P>(acc, t);
  }
};

#if defined(THRIFTY_AVX512BF16)
template <int M, int P>
struct KernelBf16Dot {
  template <typename T, typename TOut>
  static void run(const Tile<T, TOut>& t) {
    static_assert(std::is_same_v<T, bf16>, "vdpbf16ps multiplies bf16 pairs");
    __m512 acc[M][P];
    for (auto& row : acc) for (auto& v : row) v = _mm512_setzero_ps();
    for (int64_t p = 0; p < t.K / 2; ++p) {
      __m512i w[P];
      for (int j = 0; j < P; ++j) w[j] = _mm512_loadu_si512(t.w + j * t.pstride + p * 2 * kPanel * sizeof(bf16));
      for (int m = 0; m < M; ++m) {
        int32_t pair;
        std::memcpy(&pair, t.x + m * t.ldx + 2 * p, sizeof(pair));
        const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
        for (int j = 0; j < P; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], b, (__m512bh)w[j]);
      }
    }
    FVec out[M][P][S];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < P; ++j) out[m][j][0] = FVec(acc[m][j]);
    store_tile<M, P>(out, t);
  }
};
template <int M, int P>
using KernelBf16 = KernelBf16Dot<M, P>;
#else
template <int M, int P>
using KernelBf16 = KernelFma<M, P>;
#endif

// Quantized weights (gemm.h's layouts): the quants of k pair p of a group, for a panel's s-th
// slice of FVec::N outputs, as floats.
struct Int8Quants {
  static void load_k_pair(const uint8_t* quants, int64_t p, int s, FVec& first, FVec& second) {
    first = load_int8(quants + 2 * p * kPanel + s * FVec::N);
    second = load_int8(quants + (2 * p + 1) * kPanel + s * FVec::N);
  }
};

struct Int4Quants {  // pair p is chunk p / 2's low (p even) or high (p odd) nibbles
  static void load_k_pair(const uint8_t* quants, int64_t p, int s, FVec& first, FVec& second) {
    load_nibble_pairs(quants + p / 2 * 2 * kPanel + s * 2 * FVec::N, p % 2 * 4, first, second);
  }
};

// acc += d * (a group's sums of x * q) + m * (the group's sum of x), for the group of the tile's
// panels at `group` (the first panel's group; the scales follow its quants) starting at k0.
template <int M, int P, typename T, typename TOut>
inline void add_scaled_group(FVec (&acc)[M][P][S], const FVec (&sums)[M][P][S], const uint8_t* group,
                             const Tile<T, TOut>& t, int64_t k0) {
  const PackedLinear& w = *t.lin;
  const int64_t groups = t.K / w.group, g = k0 / w.group;
  for (int j = 0; j < P; ++j) {
    const uint8_t* scales = group + j * t.pstride + w.quant_bytes();
    for (int s = 0; s < S; ++s) {
      const FVec d = load_fp16(scales + s * FVec::N * 2);
      for (int m = 0; m < M; ++m) acc[m][j][s] = FVec::fma(sums[m][j][s], d, acc[m][j][s]);
      if (w.has_min) {
        const FVec mins = load_fp16(scales + (kPanel + s * FVec::N) * 2);
        for (int m = 0; m < M; ++m) acc[m][j][s] = FVec::fma(FVec(t.x_sums[m * groups + g]), mins, acc[m][j][s]);
      }
    }
  }
}

// Quantized weights by fp32 multiply-adds, any activation type.
template <int M, int P, typename Quants>
struct KernelQuantFma {
  template <typename T, typename TOut>
  static void run(const Tile<T, TOut>& t) {
    const PackedLinear& w = *t.lin;
    FVec acc[M][P][S];
    set_zero(acc);
    for (int64_t k0 = 0; k0 < t.K; k0 += w.group) {
      const uint8_t* group = t.w + k0 / w.group * w.group_bytes();
      FVec sums[M][P][S];
      set_zero(sums);
      for (int64_t p = 0; p < w.group / 2; ++p) {
        FVec first[P][S], second[P][S];
        for (int j = 0; j < P; ++j)
          for (int s = 0; s < S; ++s) Quants::load_k_pair(group + j * t.pstride, p, s, first[j][s], second[j][s]);
        for (int m = 0; m < M; ++m) {
          const FVec b0(to_float(t.x[m * t.ldx + k0 + 2 * p]));
          const FVec b1(to_float(t.x[m * t.ldx + k0 + 2 * p + 1]));
          for (int j = 0; j < P; ++j)
            for (int s = 0; s < S; ++s)
              sums[m][j][s] = FVec::fma(b1, second[j][s], FVec::fma(b0, first[j][s], sums[m][j][s]));
        }
      }
      add_scaled_group<M, P>(acc, sums, group, t, k0);
    }
    store_tile<M, P>(acc, t);
  }
};
template <int M, int P>
using KernelInt8 = KernelQuantFma<M, P, Int8Quants>;

#if defined(THRIFTY_AVX512BF16)
// int4 weights and bf16 activations: 32 bytes of nibbles widened to 16-bit lanes, each nibble
// turned into its bf16 value by one vpermw (a 32-entry table indexed by the lane's low 5 bits),
// then vdpbf16ps as for bf16 weights: one chunk (4 k) is two vdpbf16ps per panel.
template <int M, int P>
struct KernelInt4Dot {
  template <typename T, typename TOut>
  static void run(const Tile<T, TOut>& t) {
    static_assert(std::is_same_v<T, bf16>, "vdpbf16ps multiplies bf16 pairs");
    static const std::array<bf16, 32> table = [] {
      std::array<bf16, 32> a{};
      for (int i = 0; i < 32; ++i) a[i] = float_to_bf16(float(i & 15));  // bit 4: the high nibble's
      return a;
    }();
    const __m512i lut = _mm512_loadu_si512(table.data());
    const PackedLinear& w = *t.lin;
    FVec acc[M][P][S];
    set_zero(acc);
    for (int64_t k0 = 0; k0 < t.K; k0 += w.group) {
      const uint8_t* group = t.w + k0 / w.group * w.group_bytes();
      __m512 dots[M][P];
      for (auto& row : dots) for (auto& v : row) v = _mm512_setzero_ps();
      for (int64_t c = 0; c < w.group / 4; ++c) {
        __m512i low[P], high[P];
        for (int j = 0; j < P; ++j) {
          const __m512i bytes = _mm512_cvtepu8_epi16(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + j * t.pstride + c * 2 * kPanel)));
          low[j] = _mm512_permutexvar_epi16(bytes, lut);
          high[j] = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), lut);
        }
        for (int m = 0; m < M; ++m) {
          int32_t pairs[2];
          std::memcpy(pairs, t.x + m * t.ldx + k0 + 4 * c, sizeof(pairs));
          const __m512bh b0 = (__m512bh)_mm512_set1_epi32(pairs[0]), b1 = (__m512bh)_mm512_set1_epi32(pairs[1]);
          for (int j = 0; j < P; ++j)
            dots[m][j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(dots[m][j], b0, (__m512bh)low[j]), b1, (__m512bh)high[j]);
        }
      }
      FVec sums[M][P][S];
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < P; ++j) sums[m][j][0] = FVec(dots[m][j]);
      add_scaled_group<M, P>(acc, sums, group, t, k0);
    }
    store_tile<M, P>(acc, t);
  }
};
#endif

template <int M, int P>
using KernelInt4Fma = KernelQuantFma<M, P, Int4Quants>;

template <typename T, typename TOut>
using TileFn = void (*)(const Tile<T, TOut>&);

// Panels [0, np) from `panels` of a quantized weight as the float panels of T that the float
// kernels read (gemm.h's fp32 or bf16 layout), each weight d * q + m rounded to T.
template <typename Quants, typename T>
void dequantize_panels(const PackedLinear& w, const uint8_t* panels, int64_t np, T* out) {
  for (int64_t j = 0; j < np; ++j) {
    const uint8_t* panel = panels + j * w.panel_bytes();
    T* dst = out + j * w.K * kPanel;
    for (int64_t k0 = 0; k0 < w.K; k0 += w.group) {
      const uint8_t* group = panel + k0 / w.group * w.group_bytes();
      const uint8_t* scales = group + w.quant_bytes();
      for (int s = 0; s < S; ++s) {
        const FVec d = load_fp16(scales + s * FVec::N * 2);
        const FVec m = w.has_min ? load_fp16(scales + (kPanel + s * FVec::N) * 2) : FVec::zero();
        for (int64_t p = 0; p < w.group / 2; ++p) {
          FVec first, second;
          Quants::load_k_pair(group, p, s, first, second);
          first = FVec::fma(first, d, m);
          second = FVec::fma(second, d, m);
          const int64_t k = k0 + 2 * p;
          if constexpr (std::is_same_v<T, bf16>) {
            store_bf16_pairs(dst + k * kPanel + s * 2 * FVec::N, first, second);
          } else {
            first.store(dst + k * kPanel + s * FVec::N);
            second.store(dst + (k + 1) * kPanel + s * FVec::N);
          }
        }
      }
    }
  }
}

template <typename T>
void dequantize_panels(const PackedLinear& w, const uint8_t* panels, int64_t np, T* out) {
  if (w.format == WeightFormat::kInt8) return dequantize_panels<Int8Quants>(w, panels, np, out);
  dequantize_panels<Int4Quants>(w, panels, np, out);
}

template <template <int, int> class Kernel, int M, typename T, typename TOut>
TileFn<T, TOut> pick_panels(int64_t panels) {
  switch (panels) {
    case 1: return &Kernel<M, 1>::template run<T, TOut>;
    case 2: return &Kernel<M, 2>::template run<T, TOut>;
    case 3: return &Kernel<M, 3>::template run<T, TOut>;
    case 4: return &Kernel<M, 4>::template run<T, TOut>;
    default:
      if constexpr (M <= kStreamRows) {  // streaming: up to NR_STREAM panels (<= 16 accumulators)
        switch (panels) {
          case 5: return &Kernel<M, 5>::template run<T, TOut>;
          case 6: return &Kernel<M, 6>::template run<T, TOut>;
          case 7: return &Kernel<M, 7>::template run<T, TOut>;
          default: return &Kernel<M, NR_STREAM>::template run<T, TOut>;
        }
      }
      return &Kernel<M, NR>::template run<T, TOut>;
  }
}

template <template <int, int> class Kernel, typename T, typename TOut>
TileFn<T, TOut> pick(int64_t rows, int64_t panels) {
  switch (rows) {
    case 1: return pick_panels<Kernel, 1, T, TOut>(panels);
    case 2: return pick_panels<Kernel, 2, T, TOut>(panels);
    case 3: return pick_panels<Kernel, 3, T, TOut>(panels);
    default: return pick_panels<Kernel, MR, T, TOut>(panels);
  }
}

// Quantized tiles: up to MR_QUANT rows; from 3 rows on, at most 2 panels (quantized_panels).
template <template <int, int> class Kernel, typename T, typename TOut>
TileFn<T, TOut> pick_quantized(int64_t rows, int64_t panels) {
  static_assert(MR_QUANT == 5, "one case per row count");
  if (rows <= 2) return pick<Kernel, T, TOut>(rows, panels);
  const bool one = panels == 1;
  switch (rows) {
    case 3: return one ? &Kernel<3, 1>::template run<T, TOut> : &Kernel<3, 2>::template run<T, TOut>;
    case 4: return one ? &Kernel<4, 1>::template run<T, TOut> : &Kernel<4, 2>::template run<T, TOut>;
    default: return one ? &Kernel<5, 1>::template run<T, TOut> : &Kernel<5, 2>::template run<T, TOut>;
  }
}

// Panels per quantized tile of `rows` rows: quantized tiles keep a second set of accumulators (a
// group's sums), so fewer panels than float tiles, so that both sets stay in registers. Always
// even, for gate/up pairs.
int64_t quantized_panels(int64_t rows) { return rows == 1 ? 8 : rows == 2 ? 4 : 2; }

// Each row's sums of x over each group of k, which the mins of every panel multiply: computed
// once per matmul, not once per tile.
template <typename T>
void sum_groups(const T* x, int64_t M, int64_t ldx, int64_t K, int64_t group, std::vector<float>& out) {
  out.resize(size_t(M * (K / group)));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k0 = 0; k0 < K; k0 += group) {
      FVec sum = FVec::zero();
      for (int64_t k = k0; k < k0 + group; k += FVec::N) sum = sum + FVec::load(x + m * ldx + k);
      out[size_t(m * (K / group) + k0 / group)] = sum.reduce_add();
    }
}

// From this many rows on, a quantized matmul is bound by multiply-adds, which the float kernels
// do faster than the quantized ones (vdpbf16ps, no per-group sums): each thread dequantizes a
// run of panels into a scratch that stays in L2 and runs the float kernel over every row.
constexpr int64_t kDequantizeRows = 8;

// Kernel: w's own; FloatKernel: the float kernel for T, which quantized weights dequantized
// for many rows take.
template <template <int, int> class Kernel, template <int, int> class FloatKernel, typename T, typename TOut>
void run_tiles(Team& team, const T* x, int64_t M, int64_t ldx, const PackedLinear& w, TOut* y, int64_t ldy,
               bool round_bf16, int64_t silu_mul_cols) {
  // silu_mul_cols > 0: w is a gate/up pair weight (pack_gate_up_weight) and y gets that many
  // columns of SiLU(gate) * up. Every tile then starts at an even panel and holds whole pairs:
  // chunks are whole tiles of an even number of panels, and the weight has an even number.
  if (M == 0) return;  // a step whose rows all sample nothing still runs the LM head on none
  const int64_t panels = w.num_panels();
  const int64_t pstride = w.panel_bytes();
  const uint8_t* wdata = w.panels();
  const float* bias = w.bias.defined() ? w.bias.data_ptr<float>() : nullptr;
  // Row blocks whose x (about 128 KiB) stays in L2 while the panels of a chunk pass over it.
  const int64_t block_rows = std::max<int64_t>(MR, (int64_t(128) << 10) / (w.K * int64_t(sizeof(T))) / MR * MR);
  // Quantized weights dequantized for many rows are decoded once per call: a unit then takes
  // every row (its rows of x come from L2 or L3 once per run of panels), not one row block.
  const bool dequantize = w.is_quantized() && M >= kDequantizeRows;
  const int64_t mb = dequantize || M <= 64 ? M : std::min(M, block_rows);
  const int64_t row_blocks = cdiv(M, mb);
  // Units of work: runs of whole tiles of panels; about four per thread (so a thread slowed by
  // a neighbour does less), or one per thread when streaming (each thread's reads one long run).
  const bool streaming = M <= kStreamRows;
  const int64_t nr = streaming ? NR_STREAM : NR;
  const int64_t per_thread = streaming ? 1 : 4;
  const int64_t chunks = std::min(cdiv(panels, nr), std::max<int64_t>(1, cdiv(per_thread * team.nth, row_blocks)));
  const int64_t chunk_panels = cdiv(cdiv(panels, chunks), nr) * nr;
  const int64_t num_chunks = cdiv(panels, chunk_panels);
  const bool quantized = w.is_quantized() && !dequantize;  // tiles of the quantized kernel
  const int64_t tile_rows = quantized ? MR_QUANT : MR;
  // Every thread sums the groups of all M rows itself (a few hundred vector adds): no barrier.
  thread_local std::vector<float> x_sums;
  if (quantized && w.has_min) sum_groups(x, M, ldx, w.K, w.group, x_sums);
  team.for_each(row_blocks * num_chunks, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<T> scratch;  // dequantized panels
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t m0 = unit / num_chunks * mb, m1 = std::min(M, m0 + mb);
      const int64_t p0 = unit % num_chunks * chunk_panels, p1 = std::min(panels, p0 + chunk_panels);
      for (int64_t pb = p0; pb < p1; pb += nr) {
        const int64_t pe = std::min(p1, pb + nr);
        const uint8_t* block = wdata + pb * pstride;  // panels [pb, pe)
        int64_t block_stride = pstride;
        if (dequantize) {
          scratch.resize(size_t(nr * w.K * kPanel));
          dequantize_panels(w, block, pe - pb, scratch.data());
          block = reinterpret_cast<const uint8_t*>(scratch.data());
          block_stride = w.K * kPanel * int64_t(sizeof(T));
        }
        for (int64_t m = m0; m < m1; m += tile_rows) {
          const int64_t nm = std::min<int64_t>(tile_rows, m1 - m);
          const int64_t tile_nr = quantized ? quantized_panels(nm) : nr;
          for (int64_t p = pb; p < pe; p += tile_nr) {
            const int64_t np = std::min(tile_nr, pe - p);
            const int64_t col = silu_mul_cols ? p / 2 * kPanel : p * kPanel;  // the tile's first output
            const int64_t cols = silu_mul_cols ? std::min(np / 2 * kPanel, silu_mul_cols - col)
                                               : std::min(np * kPanel, w.N - col);
            Tile<T, TOut> tile{x + m * ldx, ldx, block + (p - pb) * block_stride, block_stride, w.K, &w,
                               bias ? bias + p * kPanel : nullptr, y + m * ldy + col, ldy,
                               quantized && w.has_min ? x_sums.data() + m * (w.K / w.group) : nullptr,
                               cols, round_bf16, silu_mul_cols > 0};
            (quantized ? pick_quantized<Kernel, T, TOut>(nm, np) : pick<FloatKernel, T, TOut>(nm, np))(tile);
          }
        }
      }
    }
  });
}

// Quantized weights take their format's kernel, float weights (and quantized ones for many rows)
// FloatKernel.
template <template <int, int> class FloatKernel, typename T, typename TOut>
void run_quantized_or(Team& team, const T* x, int64_t M, int64_t ldx, const PackedLinear& w, TOut* y,
                      int64_t ldy, bool round_bf16, int64_t silu_mul_cols) {
  if (w.format == WeightFormat::kInt8) {
    run_tiles<KernelInt8, FloatKernel>(team, x, M, ldx, w, y, ldy, round_bf16, silu_mul_cols);
  } else if (w.format == WeightFormat::kInt4) {
#if defined(THRIFTY_AVX512BF16)
    if constexpr (std::is_same_v<T, bf16>) {
      run_tiles<KernelInt4Dot, FloatKernel>(team, x, M, ldx, w, y, ldy, round_bf16, silu_mul_cols);
      return;
    }
#endif
    run_tiles<KernelInt4Fma, FloatKernel>(team, x, M, ldx, w, y, ldy, round_bf16, silu_mul_cols);
  } else {
    run_tiles<FloatKernel, FloatKernel>(team, x, M, ldx, w, y, ldy, round_bf16, silu_mul_cols);
  }
}

// fp32 activations take the fp32 kernel; bf16 ones the bf16 kernel this CPU has.
template <typename T, typename TOut>
void run_linear(Team& team, const T* x, int64_t M, int64_t ldx, const PackedLinear& w, TOut* y, int64_t ldy,
                bool round_bf16, int64_t silu_mul_cols) {
  if constexpr (std::is_same_v<T, float>) {
    run_quantized_or<KernelFma>(team, x, M, ldx, w, y, ldy, round_bf16, silu_mul_cols);
  } else {
    run_quantized_or<KernelBf16>(team, x, M, ldx, w, y, ldy, round_bf16, silu_mul_cols);
  }
}

}  // namespace

at::Tensor pack_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_linear_weight: expected a 2-D [N, K] weight");
  TORCH_CHECK(weight.device().is_cpu(), "pack_linear_weight: expected a CPU tensor");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "pack_linear_weight: fp32 or bf16 weights only");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t panels = cdiv(N, kPanel);
  at::Tensor padded = at::zeros({panels * kPanel, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  TORCH_CHECK(K % 2 == 0, "pack_linear_weight: the kernels take pairs of k, so an even input size, got ", K);
  if (dtype == at::kBFloat16) {
    // [panels, 16, K/2, 2] -> [panels, K/2, 16, 2]
    return padded.view({panels, kPanel, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
  }
  return padded.view({panels, kPanel, K}).permute({0, 2, 1}).contiguous();  // [panels, K, 16]
}

at::Tensor pack_gate_up_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % 2 == 0, "pack_gate_up_weight: expected a [2 I, K] weight");
  const int64_t I = weight.size(0) / 2, K = weight.size(1), panels = cdiv(I, kPanel);
  at::Tensor pairs = at::zeros({panels * kPanel, 2, K}, weight.options());  // [Ip, 2, K] then panel pairs
  pairs.narrow(0, 0, I).select(1, 0).copy_(weight.narrow(0, 0, I));
  pairs.narrow(0, 0, I).select(1, 1).copy_(weight.narrow(0, I, I));
  // [panels, 16, 2, K] -> [panels, 2, 16, K]: gate panel i, then up panel i.
  return pack_linear_weight(pairs.view({panels, kPanel, 2, K}).transpose(1, 2).reshape({2 * panels * kPanel, K}));
}

PackedLinear make_packed_linear(const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t N,
                                int64_t K) {
  PackedLinear w;
  w.data = packed;
  w.N = N;
  w.K = K;
  if (packed.scalar_type() == at::kByte) {
    TORCH_CHECK(packed.is_contiguous() && packed.numel() >= kQuantHeader,
                "quantized packed weight: expected a contiguous uint8 tensor of at least ", kQuantHeader, " bytes");
    QuantHeader h;
    std::memcpy(&h, packed.data_ptr(), sizeof(h));
    TORCH_CHECK(h.magic == QuantHeader::kMagic && (h.bits == 4 || h.bits == 8),
                "quantized packed weight: not thrifty's layout (bad header)");
    TORCH_CHECK(h.N == N && h.K == K, "quantized packed weight is [", h.N, ", ", h.K, "], expected [", N, ", ", K, "]");
    // int4 chunks are 4 k, the mins' sums of x whole vectors: groups of 32 (of pairs for int8).
    const int64_t multiple = h.bits == 4 || h.has_min ? 32 : 2;
    TORCH_CHECK(h.group > 0 && K % h.group == 0 && h.group % multiple == 0,
                "quantized packed weight: the group size must be a multiple of ", multiple,
                " dividing the input size ", K, ", got ", h.group);
    w.format = WeightFormat(h.bits);
    w.group = h.group;
    w.has_min = h.has_min != 0;
    TORCH_CHECK(packed.numel() == kQuantHeader + w.num_panels() * w.panel_bytes(),
                "quantized packed weight has ", packed.numel(), " bytes, its header says ",
                kQuantHeader + w.num_panels() * w.panel_bytes());
  } else {
    TORCH_CHECK(packed.is_contiguous() && packed.numel() == cdiv(N, kPanel) * kPanel * K,
                "packed weight does not match its shape [", N, ", ", K, "]");
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " elements, expected ", N);
    w.bias = bias->to(at::kFloat).contiguous();
  }
  return w;
}

template <typename T, typename TOut>
void linear(Team& team, const T* x, int64_t M, int64_t ldx, const PackedLinear& w, TOut* y, int64_t ldy,
            bool round_bf16) {
  run_linear(team, x, M, ldx, w, y, ldy, round_bf16, 0);
}

template <typename T>
void linear_silu_mul(Team& team, const T* x, int64_t M, int64_t ldx, const PackedLinear& w, int64_t I, T* act,
                     int64_t ldact) {
  run_linear(team, x, M, ldx, w, act, ldact, false, I);
}

template void linear_silu_mul<float>(Team&, const float*, int64_t, int64_t, const PackedLinear&, int64_t, float*,
                                     int64_t);
template void linear_silu_mul<bf16>(Team&, const bf16*, int64_t, int64_t, const PackedLinear&, int64_t, bf16*,
                                    int64_t);
template void linear<float, float>(Team&, const float*, int64_t, int64_t, const PackedLinear&, float*, int64_t, bool);
template void linear<bf16, bf16>(Team&, const bf16*, int64_t, int64_t, const PackedLinear&, bf16*, int64_t, bool);
template void linear<bf16, float>(Team&, const bf16*, int64_t, int64_t, const PackedLinear&, float*, int64_t, bool);

namespace {

// Row n of a quantized weight as d * q + m (q * d first, as llama.cpp dequantizes), rounded to T.
template <typename T>
void dequantize_row(const PackedLinear& w, int64_t n, T* row) {
  const int64_t lane = n % kPanel;
  const uint8_t* panel = w.panels() + n / kPanel * w.panel_bytes();
  for (int64_t k0 = 0; k0 < w.K; k0 += w.group) {
    const uint8_t* quants = panel + k0 / w.group * w.group_bytes();
    const uint8_t* scales = quants + w.quant_bytes();
    uint16_t bits[2] = {0, 0};
    std::memcpy(&bits[0], scales + 2 * lane, 2);
    if (w.has_min) std::memcpy(&bits[1], scales + 2 * (kPanel + lane), 2);
    const float d = half_to_float(bits[0]), m = half_to_float(bits[1]);
    for (int64_t k = 0; k < w.group; ++k) {
      int q;
      if (w.format == WeightFormat::kInt8) {
        q = int8_t(quants[k * kPanel + lane]);
      } else {
        const uint8_t byte = quants[k / 4 * 2 * kPanel + 2 * lane + k % 2];
        q = k % 4 < 2 ? byte & 15 : byte >> 4;
      }
      float v = float(q) * d;
      if (w.has_min) v += m;
      store_scalar(row + k0 + k, v);
    }
  }
}

}  // namespace

template <typename T>
void gather_rows(Team& team, const PackedLinear& w, const int64_t* ids, int64_t num_ids, T* out) {
  const T* data = reinterpret_cast<const T*>(w.data.data_ptr());
  const int64_t K = w.K;
  team.for_each(num_ids, team.chunk_for(num_ids), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = ids[t];
      if (w.is_quantized()) {
        dequantize_row(w, n, out + t * K);
        continue;
      }
      const T* panel = data + n / kPanel * K * kPanel;
      const int64_t lane = n % kPanel;
      T* row = out + t * K;
      if constexpr (std::is_same_v<T, bf16>) {
        for (int64_t k = 0; k < K; ++k) row[k] = panel[(k / 2) * 2 * kPanel + lane * 2 + k % 2];
      } else {
        for (int64_t k = 0; k < K; ++k) row[k] = panel[k * kPanel + lane];
      }
    }
  });
}

template void gather_rows<float>(Team&, const PackedLinear&, const int64_t*, int64_t, float*);
template void gather_rows<bf16>(Team&, const PackedLinear&, const int64_t*, int64_t, bf16*);

}  // namespace thrifty
