// One OpenMP region per call, in which every thread runs the whole sequence of kernels, meeting at
// a barrier between dependent ones (as llama.cpp runs its graph). A decode step is a few hundred
// small kernels: a fork and join of the OpenMP team per kernel costs a thread wake-up each, while
// a spinning barrier costs well under a microsecond. Work inside a kernel is handed out in chunks
// from an atomic counter, so a thread slowed by a noisy neighbour does less of it.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace thrifty {

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Sense-reversing barrier that spins, then yields: a thread that lost its core to another
// process (the server's event loop, say) must not be waited for by a busy loop.
class SpinBarrier {
 public:
  void init(int n) { n_ = n; }
  void wait() {
    if (n_ <= 1) return;
    int gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < kSpinsBeforeYield) cpu_relax(); else sched_yield();
    }
  }

 private:
  static constexpr int kSpinsBeforeYield = 1 << 14;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
  int n_ = 1;
};

// The view one thread has of the team: its id, the barrier, and a fresh work counter per
// work-shared loop (every thread runs the same loops in the same order, so the k-th loop of one
// thread is the k-th of every other).
class Team {
 public:
  Team(int tid, int nth, SpinBarrier* barrier, std::atomic<int64_t>* counters, int num_counters)
      : tid(tid), nth(nth), barrier_(barrier), counters_(counters), num_counters_(num_counters) {}
  Team(const Team&) = delete;

  const int tid;
  const int nth;

  void sync() { barrier_->wait(); }

  // Calls f(begin, end) on chunks of [0, n) claimed from a shared counter. No barrier after.
  template <typename F>
  void for_each(int64_t n, int64_t chunk, F&& f) {
    if (next_counter_ >= num_counters_) {  // a caller ran more loops than it declared: a bug
      std::fprintf(stderr, "thrifty: run_parallel ran more work-shared loops than declared\n");
      std::abort();
    }
    std::atomic<int64_t>& next = counters_[next_counter_++];
    chunk = std::max<int64_t>(chunk, 1);
    for (;;) {
      int64_t begin = next.fetch_add(chunk, std::memory_order_relaxed);
      if (begin >= n) break;
      f(begin, std::min(n, begin + chunk));
    }
  }

  // A chunk size that hands each thread about `per_thread` chunks of [0, n).
  int64_t chunk_for(int64_t n, int64_t per_thread = 4) const {
    return std::max<int64_t>(1, n / (int64_t(nth) * per_thread));
  }

 private:
  SpinBarrier* barrier_;
  std::atomic<int64_t>* counters_;
  int num_counters_;
  int next_counter_ = 0;
};

// Runs f(Team&) on every thread of torch's intra-op team (at most max_threads of them: a job too
// small to repay waking a sleeping thread runs on the caller's alone). `num_loops` bounds how
// many for_each loops f runs (each needs its own counter). f must not throw: check inputs first.
template <typename F>
void run_parallel(int num_loops, F&& f, int max_threads = 1 << 30) {
  int requested = std::max(1, std::min(at::get_num_threads(), max_threads));
  SpinBarrier barrier;
  std::unique_ptr<std::atomic<int64_t>[]> counters(new std::atomic<int64_t>[std::max(num_loops, 1)]);
  for (int i = 0; i < num_loops; ++i) counters[i].store(0, std::memory_order_relaxed);
#pragma omp parallel num_threads(requested)
  {
#pragma omp single
    barrier.init(omp_get_num_threads());
    // (the implicit barrier after `single` publishes init)
    Team team(omp_get_thread_num(), omp_get_num_threads(), &barrier, counters.get(), num_loops);
    f(team);
  }
}

}  // namespace thrifty
