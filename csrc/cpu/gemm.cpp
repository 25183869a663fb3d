// Packed-weight matmuls. One tile computes MR rows x NR panels (16 columns each) over all of K
// in registers, then adds the bias and stores. Two inner kernels, both over pairs of k:
//   bf16 weights with AVX512-BF16: vdpbf16ps, the activation pair broadcast;
//   otherwise fp32 FMA: fp32 weights, or bf16 weights with each pair widened to two fp32 vectors.
// At one row a matmul is bound by streaming the weights from memory, so a thread walks its
// panels front to back; at many rows it is bound by the FMA units, and row blocks are sized so
// that a block of x stays in L2 while the thread's panels pass over it.
#include "gemm.h"

#include <cstring>

namespace thrifty {
namespace {

constexpr int S = int(kPanel) / FVec::N;  // vectors per panel
constexpr int MR = 4;                     // rows per tile
constexpr int NR = 4;                     // panels per tile
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
  const T* w;  // the tile's first panel
  int64_t pstride;  // elements from one panel to the next
  int64_t K;
  const float* bias;  // at the tile's first column, or null
  TOut* y;  // the tile's first output
  int64_t ldy;
  int64_t n_valid;  // columns of the tile's output inside the matrix
  bool round_bf16;
  bool silu_mul;  // the panels are (gate, up) pairs and the tile stores SiLU(gate) * up
};

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
    for (auto& row : acc) for (auto& panel : row) for (auto& v : panel) v = FVec::zero();
    for (int64_t p = 0; p < t.K / 2; ++p) {
      FVec first[P][S], second[P][S];
      for (int j = 0; j < P; ++j)
        for (int s = 0; s < S; ++s) load_k_pair(t.w + j * t.pstride, p, s, first[j][s], second[j][s]);
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
      for (int j = 0; j < P; ++j) w[j] = _mm512_loadu_si512(t.w + j * t.pstride + p * 2 * kPanel);
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

template <typename T, typename TOut>
using TileFn = void (*)(const Tile<T, TOut>&);

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

template <template <int, int> class Kernel, typename T, typename TOut>
void run_tiles(Team& team, const T* x, int64_t M, int64_t ldx, const PackedLinear& w, TOut* y, int64_t ldy,
               bool round_bf16, int64_t silu_mul_cols) {
  // silu_mul_cols > 0: w is a gate/up pair weight (pack_gate_up_weight) and y gets that many
  // columns of SiLU(gate) * up. Every tile then starts at an even panel and holds whole pairs:
  // chunks are whole tiles of an even number of panels, and the weight has an even number.
  if (M == 0) return;  // a step whose rows all sample nothing still runs the LM head on none
  const int64_t panels = w.num_panels();
  const int64_t pstride = w.K * kPanel;  // bf16: K/2 pairs x 32; fp32: K x 16
  const T* wdata = reinterpret_cast<const T*>(w.data.data_ptr());
  const float* bias = w.bias.defined() ? w.bias.data_ptr<float>() : nullptr;
  // Row blocks whose x (about 128 KiB) stays in L2 while the panels of a chunk pass over it.
  const int64_t block_rows = std::max<int64_t>(MR, (int64_t(128) << 10) / (w.K * int64_t(sizeof(T))) / MR * MR);
  const int64_t mb = M <= 64 ? M : std::min(M, block_rows);
  const int64_t row_blocks = cdiv(M, mb);
  // Units of work: runs of whole tiles of panels; about four per thread (so a thread slowed by
  // a neighbour does less), or one per thread when streaming (each thread's reads one long run).
  const bool streaming = M <= kStreamRows;
  const int64_t nr = streaming ? NR_STREAM : NR;
  const int64_t per_thread = streaming ? 1 : 4;
  const int64_t chunks = std::min(cdiv(panels, nr), std::max<int64_t>(1, cdiv(per_thread * team.nth, row_blocks)));
  const int64_t chunk_panels = cdiv(cdiv(panels, chunks), nr) * nr;
  const int64_t num_chunks = cdiv(panels, chunk_panels);
  team.for_each(row_blocks * num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t m0 = unit / num_chunks * mb, m1 = std::min(M, m0 + mb);
      const int64_t p0 = unit % num_chunks * chunk_panels, p1 = std::min(panels, p0 + chunk_panels);
      for (int64_t p = p0; p < p1; p += nr) {
        const int64_t np = std::min<int64_t>(nr, p1 - p);
        for (int64_t m = m0; m < m1; m += MR) {
          const int64_t nm = std::min<int64_t>(MR, m1 - m);
          const int64_t col = silu_mul_cols ? p / 2 * kPanel : p * kPanel;  // the tile's first output
          const int64_t cols = silu_mul_cols ? std::min(np / 2 * kPanel, silu_mul_cols - col)
                                             : std::min(np * kPanel, w.N - col);
          Tile<T, TOut> tile{x + m * ldx, ldx, wdata + p * pstride, pstride, w.K,
                             bias ? bias + p * kPanel : nullptr, y + m * ldy + col, ldy,
                             cols, round_bf16, silu_mul_cols > 0};
          pick<Kernel, T, TOut>(nm, np)(tile);
        }
      }
    }
  });
}

// fp32 weights take the fp32 kernel; bf16 weights the bf16 kernel this CPU has.
template <typename T, typename TOut>
void run_linear(Team& team, const T* x, int64_t M, int64_t ldx, const PackedLinear& w, TOut* y, int64_t ldy,
                bool round_bf16, int64_t silu_mul_cols) {
  if constexpr (std::is_same_v<T, float>) {
    run_tiles<KernelFma>(team, x, M, ldx, w, y, ldy, round_bf16, silu_mul_cols);
  } else {
    run_tiles<KernelBf16>(team, x, M, ldx, w, y, ldy, round_bf16, silu_mul_cols);
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
  TORCH_CHECK(packed.is_contiguous() && packed.numel() == cdiv(N, kPanel) * kPanel * K,
              "packed weight does not match its shape [", N, ", ", K, "]");
  PackedLinear w;
  w.data = packed;
  w.N = N;
  w.K = K;
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

template <typename T>
void gather_rows(Team& team, const PackedLinear& w, const int64_t* ids, int64_t num_ids, T* out) {
  const T* data = reinterpret_cast<const T*>(w.data.data_ptr());
  const int64_t K = w.K;
  team.for_each(num_ids, team.chunk_for(num_ids), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = ids[t];
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
