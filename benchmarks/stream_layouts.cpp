// Does the batch-1 matmul stream faster if a tile's 8 panels are interleaved along K (one
// sequential stream per thread) instead of each panel being contiguous (8 streams 18 KB apart,
// csrc/cpu/gemm.h's layout)? 269 MB of bf16 weights (the default model's), K = 576, one activation
// row, vdpbf16ps, 2 threads, the two layouts alternated six times (docs/native.md).
//
//   g++ -O3 -march=native -fopenmp benchmarks/stream_layouts.cpp -o /tmp/stream_layouts && /tmp/stream_layouts
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if !defined(__AVX512BF16__)
int main() {
  std::puts("stream_layouts: needs a CPU with AVX512-BF16");
  return 0;
}
#else
constexpr int kPairs = 288;  // K / 2
constexpr int kGroup = 8;    // panels per tile
constexpr size_t kLine = 64;  // one panel's 16 outputs x one k pair, in bytes

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

int main() {
  const size_t groups = (size_t(269) << 20) / (kGroup * kPairs * kLine);
  const size_t bytes = groups * kGroup * kPairs * kLine;
  char* w = static_cast<char*>(std::aligned_alloc(4096, bytes));
  for (size_t i = 0; i < bytes; ++i) w[i] = char(std::rand());  // random: no page merging by the host
  float x[2 * kPairs];
  for (int i = 0; i < 2 * kPairs; ++i) x[i] = 0.001f * i;
  volatile float sink = 0;
  for (int rep = 0; rep < 6; ++rep) {
    for (int interleaved = 0; interleaved < 2; ++interleaved) {
      const double start = now();
      for (int it = 0; it < 10; ++it) {
#pragma omp parallel num_threads(2)
        {
          const int tid = omp_get_thread_num();
          __m512 acc[kGroup];
          for (auto& a : acc) a = _mm512_setzero_ps();
          for (size_t g = groups * tid / 2; g < groups * (tid + 1) / 2; ++g) {
            const char* tile = w + g * kGroup * kPairs * kLine;
            for (int p = 0; p < kPairs; ++p) {
              int32_t pair;
              std::memcpy(&pair, x + 2 * p, sizeof(pair));
              const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
              for (int j = 0; j < kGroup; ++j) {
                const size_t line = interleaved ? size_t(p) * kGroup + j : size_t(j) * kPairs + p;
                acc[j] = _mm512_dpbf16_ps(acc[j], b, (__m512bh)_mm512_loadu_si512(tile + line * kLine));
              }
            }
          }
          float s = 0;
          for (auto& a : acc) s += _mm512_reduce_add_ps(a);
          sink = sink + s;
        }
      }
      const double seconds = (now() - start) / 10;
      std::printf("%s %.1f GB/s\n", interleaved ? "interleaved panels: " : "contiguous panels:  ", bytes / seconds / 1e9);
    }
  }
  std::free(w);
  return 0;
}
#endif
