#include "pointwise.h"

#include <cmath>
#include <limits>

namespace thrifty {
namespace {

template <typename T>
void rms_norm_row(const T* x, const T* weight, float eps, int64_t dim, T* out) {
  int64_t i = 0;
  FVec acc = FVec::zero();
  for (; i + FVec::N <= dim; i += FVec::N) {
    FVec v = FVec::load(x + i);
    acc = FVec::fma(v, v, acc);
  }
  float sum = acc.reduce_add();
  for (; i < dim; ++i) sum += to_float(x[i]) * to_float(x[i]);
  const float inv = 1.f / std::sqrt(sum / float(dim) + eps);
  i = 0;
  for (; i + FVec::N <= dim; i += FVec::N)
    rounded<T>(FVec::load(weight + i) * rounded<T>(FVec::load(x + i) * FVec(inv))).store(out + i);
  for (; i < dim; ++i) store_scalar(out + i, to_float(weight[i]) * round_to(to_float(x[i]) * inv, x));
}

template <typename T>
void rotate_head(T* x, const float* cos, const float* sin, int64_t dim) {
  const int64_t half = dim / 2;
  int64_t i = 0;
  for (; i + FVec::N <= half; i += FVec::N) {
    const FVec x1 = FVec::load(x + i), x2 = FVec::load(x + half + i);
    const FVec c1 = rounded<T>(FVec::load(cos + i)), s1 = rounded<T>(FVec::load(sin + i));
    const FVec c2 = rounded<T>(FVec::load(cos + half + i)), s2 = rounded<T>(FVec::load(sin + half + i));
    const FVec y1 = rounded<T>(rounded<T>(x1 * c1) - rounded<T>(x2 * s1));
    const FVec y2 = rounded<T>(rounded<T>(x2 * c2) + rounded<T>(x1 * s2));
    y1.store(x + i);
    y2.store(x + half + i);
  }
  for (; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[half + i]);
    const float c1 = round_to(cos[i], x), s1 = round_to(sin[i], x);
    const float c2 = round_to(cos[half + i], x), s2 = round_to(sin[half + i], x);
    store_scalar(x + i, round_to(x1 * c1, x) - round_to(x2 * s1, x));
    store_scalar(x + half + i, round_to(x2 * c2, x) + round_to(x1 * s2, x));
  }
}

}  // namespace

template <typename T>
void add_rms_norm_row(T* x, const T* delta, const T* weight, float eps, int64_t dim, T* out) {
  if (delta != nullptr) {
    int64_t i = 0;
    for (; i + FVec::N <= dim; i += FVec::N) (FVec::load(x + i) + FVec::load(delta + i)).store(x + i);
    for (; i < dim; ++i) store_scalar(x + i, to_float(x[i]) + to_float(delta[i]));
  }
  rms_norm_row(x, weight, eps, dim, out);
}

template <typename T>
void add_rms_norm(Team& team, T* x, const T* delta, const T* weight, float eps, int64_t rows, int64_t dim, T* out) {
  team.for_each(rows, team.chunk_for(rows), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      add_rms_norm_row(x + r * dim, delta ? delta + r * dim : nullptr, weight, eps, dim, out + r * dim);
  });
}

template <typename T>
void rope_and_cache(Team& team, const AttentionShape& sh, const RopeArgs& a, int64_t num_tokens, T* qkv,
                    int64_t stride, const T* q_norm, const T* k_norm, void* k_cache, void* v_cache) {
  const int64_t D = sh.head_dim, Hq = sh.num_heads, Hkv = sh.num_kv_heads;
  team.for_each(num_tokens, team.chunk_for(num_tokens), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* row = qkv + t * stride;
      const float* cos = a.cos + a.positions[t] * D;
      const float* sin = a.sin + a.positions[t] * D;
      for (int64_t h = 0; h < Hq + Hkv; ++h) {
        T* head = row + h * D;
        const T* norm = h < Hq ? q_norm : k_norm;
        if (norm != nullptr) rms_norm_row(head, norm, a.eps, D, head);
        rotate_head(head, cos, sin, D);
      }
      write_kv_token(sh, a.slots[t], row + Hq * D, row + (Hq + Hkv) * D, k_cache, v_cache);
    }
  });
}

int64_t argmax_parts(int64_t rows, int num_threads) {
  return rows == 0 || rows >= num_threads ? 1 : num_threads / rows;
}

void argmax_logprob(Team& team, const float* logits, int64_t rows, int64_t vocab, ArgmaxPartial* partials,
                    int64_t* ids, float* logprobs) {
  const int64_t parts = argmax_parts(rows, team.nth);
  const int64_t span = (vocab + parts - 1) / parts;
  // Each part of a row: its largest value, the first index holding it, and sum(e^(x - max)).
  team.for_each(rows * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t lo = std::min(vocab, u % parts * span), hi = std::min(vocab, lo + span);
      const float* x = logits + u / parts * vocab;
      int64_t i = lo;
      FVec vmax(-std::numeric_limits<float>::infinity());
      for (; i + FVec::N <= hi; i += FVec::N) vmax = FVec::max(vmax, FVec::load(x + i));
      float best = vmax.reduce_max();
      for (; i < hi; ++i) best = std::max(best, x[i]);
      int64_t index = lo;
      while (index < hi && x[index] != best) ++index;
      FVec sum = FVec::zero();
      for (i = lo; i + FVec::N <= hi; i += FVec::N) sum = sum + exp(FVec::load(x + i) - FVec(best));
      float total = sum.reduce_add();
      for (; i < hi; ++i) total += std::exp(x[i] - best);
      if (best == -std::numeric_limits<float>::infinity()) total = 0.f;  // e^(-inf - -inf) is NaN, not 1
      partials[u] = {best, total, index < hi ? index : -1};  // -1: empty part, or no value equals the max (NaN)
    }
  });
  team.sync();
  team.for_each(rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const ArgmaxPartial* p = partials + r * parts;
      int64_t first = -1;  // the first part holding the row's largest value: torch.argmax's index
      for (int64_t j = 0; j < parts; ++j)
        if (p[j].index >= 0 && (first < 0 || p[j].max > p[first].max)) first = j;
      float total = 0.f;
      for (int64_t j = 0; j < parts; ++j)
        if (p[j].index >= 0) total += p[j].sum * std::exp(p[j].max - p[first].max);
      ids[r] = first < 0 ? 0 : p[first].index;
      logprobs[r] = first < 0 ? 0.f : -std::log(total);
    }
  });
}

#define THRIFTY_INSTANTIATE(T)                                                                               \
  template void add_rms_norm_row<T>(T*, const T*, const T*, float, int64_t, T*);                                \
  template void add_rms_norm<T>(Team&, T*, const T*, const T*, float, int64_t, int64_t, T*);                   \
  template void rope_and_cache<T>(Team&, const AttentionShape&, const RopeArgs&, int64_t, T*, int64_t, const T*, \
                                  const T*, void*, void*);
THRIFTY_INSTANTIATE(float)
THRIFTY_INSTANTIATE(bf16)
#undef THRIFTY_INSTANTIATE

}  // namespace thrifty
