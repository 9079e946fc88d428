// Threads, barriers and warp collectives of one emulated block (see block_runner.h).
//
// The block's state is guarded by one mutex, so every wait can check the whole block: a thread that
// blocks when no other thread of the block is still running completes nothing ever again, so that
// is reported as a deadlock at once (with where every thread waits) instead of after a timeout.
// Waiting threads sleep on their own semaphore, and whoever completes a barrier wakes exactly the
// threads it releases, handing each its result: a condition variable would wake them all to fight
// over the mutex, and thread switches are what the emulation spends most of its time on.
//
// What ThreadSanitizer may see. On a GPU, the threads of a block are ordered only by the barriers
// and collectives they meet at. The harness's mutex and semaphores would order them far more (a
// thread taking the block's mutex after another would see everything that one did before), hiding
// races from TSan. So in the TSan build the harness's own synchronization and bookkeeping run in
// regions TSan ignores (Hidden), and each barrier and collective states the order CUDA promises:
// every participant releases a sync object made for that one instance before the instance can
// complete, and acquires it after (publish / observe). Blocks stay ordered one after another.
#include "block_runner.h"

#include <pthread.h>
#include <semaphore.h>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
// In libtsan, not in GCC 12's headers: ignore this thread's memory accesses / synchronization.
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
#endif

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace pvq_emulation {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kWarpLanes = 32;

#if defined(__SANITIZE_THREAD__)
class Hidden {
 public:
  Hidden() {
    __tsan_ignore_thread_begin();
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
  }
  ~Hidden() {
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
    __tsan_ignore_thread_end();
  }
  Hidden(const Hidden&) = delete;
  Hidden& operator=(const Hidden&) = delete;
};
void publish(void* sync) { __tsan_release(sync); }
void observe(void* sync) { __tsan_acquire(sync); }
#else
struct Hidden {
  ~Hidden() {}  // user-provided: a scope guard that does nothing here is still not an unused variable
};
void publish(void*) {}
void observe(void*) {}
#endif

enum class State { kRunning, kAtBarrier, kInCollective, kExited };

// One warp collective in progress: the lanes of `mask` that have joined, arrived, and what they
// brought. Also the collective's sync object for TSan, so it lives until every lane has observed it.
struct Pending {
  Collective kind;
  const char* name;
  unsigned mask;
  int width;
  const std::function<void(void* const*)>* apply = nullptr;  // warp_apply's body
  Where where;  // of the first lane to arrive
  unsigned joined = 0, arrived = 0;
  bool complete = false;
  int observed = 0;
  uint64_t value[kWarpLanes] = {};
  int arg[kWarpLanes] = {};
};

// One __syncthreads instance's sync object for TSan (heap-allocated, so a fresh one each time).
struct BarrierOrder {
  int to_observe;
};

struct Warp {
  std::list<Pending> pending;  // at most one per disjoint mask
};

struct Block {
  std::mutex mutex;
  int threads = 0;
  int running = 0;
  int exited = 0;
  int first_exited = -1;
  State state[kMaxThreads];
  Where where[kMaxThreads];
  const char* waiting_in[kMaxThreads];
  uint64_t result[kMaxThreads];  // a collective's result, handed over before the wake-up
  sem_t wake[kMaxThreads];        // a blocked thread sleeps on its own
  void* dynamic_smem = nullptr;
  // __syncthreads: threads that joined this instance (took its sync object), and arrived
  int barrier_joined = 0, barrier_arrived = 0;
  Where barrier_where;
  BarrierOrder* barrier_order = nullptr;
  Warp warps[kMaxThreads / kWarpLanes];

  Block() {
    for (sem_t& s : wake) sem_init(&s, 0, 0);
  }
};

Block& the_block() {
  static Block* block = new Block;  // never destroyed: pool threads may still be parked on its condvars
  return *block;
}

struct ThreadContext {
  int tid = -1;
};
thread_local ThreadContext current;

bool same_place(const Where& a, const Where& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

std::string place(const Where& w) { return std::string(w.file_name()) + ":" + std::to_string(w.line()); }

// Called with the block's mutex held, when no thread can run any more.
[[noreturn]] void report_deadlock(Block& b, const Where& where) {
  std::map<std::string, int> groups;
  for (int t = 0; t < b.threads; ++t) {
    switch (b.state[t]) {
      case State::kAtBarrier: ++groups["__syncthreads at " + place(b.where[t])]; break;
      case State::kInCollective:
        ++groups[std::string(b.waiting_in[t]) + " at " + place(b.where[t]) + " (warp " + std::to_string(t / 32) + ")"];
        break;
      case State::kExited: ++groups["exited"]; break;
      case State::kRunning: ++groups["running"]; break;
    }
  }
  std::string detail;
  for (const auto& [what, count] : groups) detail += "\n  " + std::to_string(count) + " thread(s): " + what;
  fail(where, "deadlock in block (%u,%u,%u): no thread can continue.%s", blockIdx.x, blockIdx.y, blockIdx.z,
       detail.c_str());
}

// The calling thread (holding the lock) stops running until another thread wakes it; reports a
// deadlock if it was the last one running.
void block(Block& b, std::unique_lock<std::mutex>& lock, int tid, State state, const Where& where) {
  b.state[tid] = state;
  b.where[tid] = where;
  if (--b.running == 0) report_deadlock(b, where);
  lock.unlock();
  while (sem_wait(&b.wake[tid]) != 0) {
  }
}

// Lets a blocked thread run again (the caller holds the lock).
void release(Block& b, int tid) {
  b.state[tid] = State::kRunning;
  ++b.running;
  sem_post(&b.wake[tid]);
}

void on_thread_exit(Block& b, int tid) {
  Hidden hidden;
  std::lock_guard<std::mutex> lock(b.mutex);
  b.state[tid] = State::kExited;
  if (b.exited++ == 0) b.first_exited = tid;
  --b.running;
  if (b.barrier_joined > 0)
    fail(b.barrier_where, "divergent __syncthreads: thread %d returned from the kernel while %d thread(s) wait here",
         tid, b.barrier_joined);
  const int lane = tid % kWarpLanes;
  for (const Pending& p : b.warps[tid / kWarpLanes].pending)
    if (!p.complete && (p.mask >> lane & 1u) && !(p.joined >> lane & 1u))
      fail(p.where, "%s: lane %d is in the mask 0x%08x but returned from the kernel while lanes 0x%08x wait here",
           p.name, lane, p.mask, p.joined);
  if (b.running == 0 && b.exited < b.threads) report_deadlock(b, b.where[tid]);
}

// ----- The pool: worker i runs CUDA thread i of every block -------------------------------------------
class Pool {
 public:
  Pool() { sem_init(&done_, 0, 0); }

  // Orders the caller's work before every job (arguments, poisoned shared memory) and every job
  // before the caller's return (the block's writes, for the next block and for the host).
  void run(int threads, const std::function<void(int)>& job) {
    {
      Hidden hidden;
      while (int(workers_.size()) < threads) start_worker();
      job_ = &job;
      remaining_.store(threads);
    }
    publish(&start_order_);
    {
      Hidden hidden;
      for (int i = 0; i < threads; ++i) sem_post(&workers_[i]->start);
      while (sem_wait(&done_) != 0) {
      }
    }
    observe(&end_order_);
  }

 private:
  struct Worker {
    Pool* pool;
    int index;
    sem_t start;
  };

  static void* main(void* arg) {
    Worker& w = *static_cast<Worker*>(arg);
    for (;;) {
      const std::function<void(int)>* job;
      {
        Hidden hidden;
        while (sem_wait(&w.start) != 0) {
        }
        job = w.pool->job_;
      }
      observe(&w.pool->start_order_);
      (*job)(w.index);
      publish(&w.pool->end_order_);
      Hidden hidden;
      if (w.pool->remaining_.fetch_sub(1) == 1) sem_post(&w.pool->done_);
    }
    return nullptr;
  }

  void start_worker() {
    auto w = std::make_unique<Worker>();
    w->pool = this;
    w->index = int(workers_.size());
    sem_init(&w->start, 0, 0);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 4 << 20);  // kernels keep small frames; sanitizers add to them
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    if (pthread_create(&thread, &attr, &Pool::main, w.get()) != 0) {
      std::fprintf(stderr, "pvq-emulation: cannot start thread %zu\n", workers_.size());
      std::_Exit(70);
    }
    pthread_attr_destroy(&attr);
    workers_.push_back(std::move(w));
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(int)>* job_ = nullptr;  // written before the workers' start semaphores
  std::atomic<int> remaining_{0};
  sem_t done_;
  char start_order_ = 0, end_order_ = 0;  // sync objects for TSan
};

Pool& the_pool() {
  static Pool* pool = new Pool;  // workers never exit; the process ends with them parked
  return *pool;
}

// The source lane of a shuffle, as the hardware computes it (PTX shfl.sync): within segments of
// `width` lanes; idx wraps modulo width, and up/down/xor lanes past the segment read their own value
// (xor may read an earlier segment).
int shuffle_source(Collective kind, int lane, int arg, int width) {
  const int first = lane & ~(width - 1), last = first + width - 1;
  switch (kind) {
    case Collective::kShflIdx: return first + (arg & (width - 1));
    case Collective::kShflUp: return lane - (arg & 31) >= first ? lane - (arg & 31) : lane;
    case Collective::kShflDown: return lane + (arg & 31) <= last ? lane + (arg & 31) : lane;
    case Collective::kShflXor: return (lane ^ (arg & 31)) <= last ? lane ^ (arg & 31) : lane;
    default: return lane;
  }
}

bool is_shuffle(Collective kind) {
  return kind == Collective::kShflIdx || kind == Collective::kShflUp || kind == Collective::kShflDown ||
         kind == Collective::kShflXor;
}

// Every lane of p has arrived: what lane l receives goes to result[l].
void complete(const Pending& p, uint64_t* result) {
  uint64_t ballot = 0;
  for (int l = 0; l < kWarpLanes; ++l)
    if ((p.mask >> l & 1u) && p.value[l] != 0) ballot |= uint64_t(1) << l;
  const int first = __builtin_ctz(p.mask);
  for (int l = 0; l < kWarpLanes; ++l) {
    if (!(p.mask >> l & 1u)) continue;
    switch (p.kind) {
      case Collective::kSync: result[l] = 0; break;
      case Collective::kBallot: result[l] = ballot; break;
      case Collective::kAny: result[l] = ballot != 0; break;
      case Collective::kAll: result[l] = ballot == p.mask; break;
      case Collective::kUniform:
        if (p.value[l] != p.value[first] || p.arg[l] != p.arg[first])
          fail(p.where, "%s: lanes pass different operands (lane %d: 0x%llx, %d; lane %d: 0x%llx, %d); all must "
               "pass the same", p.name, first, (unsigned long long)p.value[first], p.arg[first], l,
               (unsigned long long)p.value[l], p.arg[l]);
        result[l] = p.value[l];
        break;
      default: {
        const int src = shuffle_source(p.kind, l, p.arg[l], p.width);
        if (!(p.mask >> src & 1u))
          fail(p.where, "%s: lane %d reads lane %d, which is not in the mask 0x%08x (undefined on a GPU)", p.name, l,
               src, p.mask);
        result[l] = p.value[src];
      }
    }
  }
}

}  // namespace

void fail(const Where& where, const char* fmt, ...) {
  char message[4096];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(message, sizeof message, fmt, args);
  va_end(args);
  std::fprintf(stderr, "pvq-emulation error at %s:%u (%s), block (%u,%u,%u) thread (%u,%u,%u): %s\n",
               where.file_name(), where.line(), where.function_name(), blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
               threadIdx.y, threadIdx.z, message);
  std::fflush(stderr);
  std::_Exit(70);
}

int lane_id() { return current.tid % kWarpLanes; }

void* dynamic_shared_memory() { return the_block().dynamic_smem; }

void sync_block(const Where& where) {
  Block& b = the_block();
  const int tid = current.tid;
  BarrierOrder* order;
  {  // join: checks, and this instance's sync object
    Hidden hidden;
    std::lock_guard<std::mutex> lock(b.mutex);
    if (b.exited > 0)
      fail(where, "divergent __syncthreads: thread %d arrives after thread %d (and %d in all) returned from the kernel",
           tid, b.first_exited, b.exited);
    if (b.barrier_joined == 0) {
      b.barrier_where = where;
      b.barrier_order = new BarrierOrder{b.threads};
    } else if (!same_place(where, b.barrier_where)) {
      fail(where, "divergent __syncthreads: thread %d waits here while %d thread(s) wait at %s", tid, b.barrier_joined,
           place(b.barrier_where).c_str());
    }
    ++b.barrier_joined;
    order = b.barrier_order;
  }
  publish(order);
  {  // arrive: the last one releases the others
    Hidden hidden;
    std::unique_lock<std::mutex> lock(b.mutex);
    if (++b.barrier_arrived < b.threads) {
      block(b, lock, tid, State::kAtBarrier, where);
    } else {
      b.barrier_joined = b.barrier_arrived = 0;
      for (int t = 0; t < b.threads; ++t)
        if (t != tid) release(b, t);
    }
  }
  observe(order);
  Hidden hidden;
  std::lock_guard<std::mutex> lock(b.mutex);
  if (--order->to_observe == 0) delete order;
}

namespace {

uint64_t collective(Collective kind, unsigned mask, uint64_t value, int lane_arg, int width, const char* name,
                    const Where& where, const std::function<void(void* const*)>* apply) {
  Block& b = the_block();
  const int tid = current.tid;
  const int lane = tid % kWarpLanes, warp_first = tid - lane;
  const unsigned bit = 1u << lane;
  if (!(mask & bit))
    fail(where, "%s: lane %d calls it with mask 0x%08x, which does not name the lane", name, lane, mask);
  if (is_shuffle(kind) && (width < 1 || width > kWarpLanes || (width & (width - 1)) != 0))
    fail(where, "%s: width %d is not a power of two in [1, 32]", name, width);
  const int lanes_here = b.threads - warp_first < kWarpLanes ? b.threads - warp_first : kWarpLanes;
  const unsigned existing = lanes_here == kWarpLanes ? ~0u : (1u << lanes_here) - 1;
  if (mask & ~existing)
    fail(where, "%s: mask 0x%08x names lanes that do not exist (this warp has %d)", name, mask, lanes_here);

  Warp& w = b.warps[tid / kWarpLanes];
  Pending* p = nullptr;
  {  // join
    Hidden hidden;
    std::lock_guard<std::mutex> lock(b.mutex);
    for (int l = 0; l < kWarpLanes; ++l)
      if ((mask >> l & 1u) && b.state[warp_first + l] == State::kExited)
        fail(where, "%s: lane %d is in the mask 0x%08x but has returned from the kernel", name, l, mask);
    // A lane joins the pending collective of its kind and mask (PTX: shfl.sync and friends wait for
    // every lane of the mask to execute one with the same qualifiers and mask, from any line). Other
    // pending collectives may overlap its mask (lanes finishing a half-warp shuffle before a
    // full-warp one); lanes that never arrive show up as a deadlock or as lanes that returned.
    for (Pending& q : w.pending)
      if (!q.complete && !(q.joined & bit) && q.mask == mask && q.kind == kind && q.width == width &&
          (q.apply == nullptr) == (apply == nullptr))
        p = &q;
    if (p == nullptr) {
      p = &w.pending.emplace_back();
      p->kind = kind;
      p->name = name;
      p->mask = mask;
      p->width = width;
      p->where = where;
      p->apply = apply;
    }
    p->joined |= bit;
    p->value[lane] = value;
    p->arg[lane] = lane_arg;
  }
  publish(p);
  uint64_t result;
  {  // arrive: the last lane computes every lane's result and wakes the others
    Hidden hidden;
    std::unique_lock<std::mutex> lock(b.mutex);
    p->arrived |= bit;
    if (p->arrived != mask) {
      b.waiting_in[tid] = name;
      block(b, lock, tid, State::kInCollective, where);
      result = b.result[tid];  // written by the lane that completed the collective, before waking this one
    } else {
      uint64_t results[kWarpLanes] = {};
      if (p->apply != nullptr) {
        void* lane_data[kWarpLanes];
        for (int l = 0; l < kWarpLanes; ++l) lane_data[l] = reinterpret_cast<void*>(uintptr_t(p->value[l]));
        (*p->apply)(lane_data);
      } else {
        complete(*p, results);
      }
      p->complete = true;
      for (int l = 0; l < kWarpLanes; ++l) {
        if (!(mask >> l & 1u) || l == lane) continue;
        b.result[warp_first + l] = results[l];
        release(b, warp_first + l);
      }
      result = results[lane];
    }
  }
  observe(p);
  Hidden hidden;
  std::lock_guard<std::mutex> lock(b.mutex);
  if (++p->observed == __builtin_popcount(mask)) w.pending.remove_if([&](const Pending& q) { return &q == p; });
  return result;
}

}  // namespace

uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int lane_arg, int width, const char* name,
                         const Where& where) {
  return collective(kind, mask, value, lane_arg, width, name, where, nullptr);
}

void warp_apply(void* data, const std::function<void(void* const*)>& body, const char* name, const Where& where) {
  collective(Collective::kSync, 0xffffffffu, reinterpret_cast<uintptr_t>(data), 0, kWarpLanes, name, where, &body);
}

void run_block(dim3 grid, dim3 block, uint3 block_index, void* dynamic_smem, const std::function<void()>& body) {
  Block& b = the_block();
  const int threads = int(block.x * block.y * block.z);
  {
    Hidden hidden;
    std::lock_guard<std::mutex> lock(b.mutex);
    b.threads = threads;
    b.running = threads;
    b.exited = 0;
    b.first_exited = -1;
    b.barrier_joined = b.barrier_arrived = 0;
    b.dynamic_smem = dynamic_smem;
    for (int t = 0; t < threads; ++t) b.state[t] = State::kRunning;
    for (Warp& w : b.warps) w.pending.clear();
  }
  the_pool().run(threads, [&](int tid) {
    current.tid = tid;
    threadIdx = uint3{unsigned(tid) % block.x, unsigned(tid) / block.x % block.y, unsigned(tid) / (block.x * block.y)};
    blockIdx = block_index;
    blockDim = block;
    gridDim = grid;
    body();
    on_thread_exit(b, tid);
  });
}

}  // namespace pvq_emulation
