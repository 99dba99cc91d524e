// Tasks over the XLA:CPU intra-op pool, shared by the attention, AdamW, transpose and loss kernels.
// Part of each kernel's translation unit (inside its anonymous namespace, after <algorithm>,
// <atomic>, <memory> and the FFI header).

#pragma once

// ---- tasks over the XLA:CPU intra-op pool ---------------------------------------------------

// Runs fn(task) for task in [0, n) on the calling thread and the pool's threads. Helpers
// claim tasks from a shared counter, so a helper that starts late finds nothing and returns;
// the state lives on the heap because such a helper may outlive this call. The caller then
// sleeps (a futex, not a spin) until tasks a helper is still running are done: with more busy
// threads than cores (test workers, other processes) a spinning caller would take the core
// the helper needs.
template <typename Fn>
void parallel_tasks(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  const Fn* f = &fn;
  auto work = [st, f, n]() {
    for (int64_t i; (i = st->next.fetch_add(1)) < n;) {
      (*f)(i);
      if (st->done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) st->done.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  for (int64_t d; (d = st->done.load(std::memory_order_acquire)) < n;) st->done.wait(d, std::memory_order_acquire);
}
