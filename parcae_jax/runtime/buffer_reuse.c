// Keeps big freed blocks (>= 32 MiB) mapped and hands them out again, preloaded into a CPU
// command's process (LD_PRELOAD, set by runtime/huge_pages.py's re-exec).
//
// Why: XLA:CPU allocates a compiled program's temporary buffer on every call (the bench_cpu
// training step's is ~330 MB) and frees it on return. glibc serves a block that large with a
// fresh mmap and returns it with munmap, so the kernel zeroes the whole buffer again on every
// step (clear_page: ~4% of the bf16 step's CPU time on a Zen 4). glibc cannot be told to keep
// such blocks without also keeping small ones in one arena (tunables arena_max=1, mmap_max=0),
// which fragments the heap and made some processes much slower (docs/performance_zen4_sittings.md).
//
// What: malloc and the aligned allocators serve a request of BIG bytes or more from an idle
// block of ours that fits (at most a quarter larger), else from a new 2 MiB-aligned mapping
// marked for transparent huge pages; free parks our blocks as idle, unmapping the largest idle
// ones while more than an eighth of the machine's memory sits idle. Everything smaller, and
// every pointer that is not ours, goes to glibc's own functions (__libc_*), so calloc and all
// other allocations are untouched. A reused block is not zeroed: malloc promises no contents.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_realloc(void *, size_t);

#define BIG ((size_t)32 << 20)  // glibc maps anything above its 32 MiB mmap threshold afresh
#define PAGE2M ((size_t)2 << 20)
#define SLOTS 64

typedef struct {
  _Atomic(char *) base;  // read without the lock by free(): it changes only while idle
  size_t size;           // a multiple of 2 MiB
  int in_use;
} Block;

static Block blocks[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static size_t idle_bytes, idle_limit;
static atomic_ulong n_reused, n_mapped;  // for parcae_buffer_reuse_stats
static atomic_int enabled = 1;             // parcae_buffer_reuse_enable: A/B in one process

static void lock_all(void) { pthread_mutex_lock(&lock); }
static void unlock_all(void) { pthread_mutex_unlock(&lock); }

__attribute__((constructor)) static void init(void) {
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  idle_limit = (pages > 0 && page > 0) ? (size_t)pages * (size_t)page / 8 : ((size_t)1 << 30);
  pthread_atfork(lock_all, unlock_all, unlock_all);  // a forked child must not inherit the lock held
}

static char *map_aligned(size_t size) {
  size_t len = size + PAGE2M;
  char *raw = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return NULL;
  char *p = (char *)(((uintptr_t)raw + PAGE2M - 1) & ~(uintptr_t)(PAGE2M - 1));
  if (p > raw) munmap(raw, (size_t)(p - raw));
  if (raw + len > p + size) munmap(p + size, (size_t)(raw + len - (p + size)));
  madvise(p, size, MADV_HUGEPAGE);  // whole 2 MiB pages: one fault per 2 MiB where THP is madvise
  return p;
}

static void unmap_slot(int i) {  // lock held, slot idle
  munmap(atomic_load(&blocks[i].base), blocks[i].size);
  idle_bytes -= blocks[i].size;
  atomic_store(&blocks[i].base, NULL);
}

static int largest_idle(void) {  // lock held
  int best = -1;
  for (int i = 0; i < SLOTS; i++)
    if (atomic_load(&blocks[i].base) && !blocks[i].in_use && (best < 0 || blocks[i].size > blocks[best].size))
      best = i;
  return best;
}

// A block of at least n bytes, 2 MiB-aligned, or NULL (the caller then asks glibc).
static void *take(size_t n) {
  if (n > SIZE_MAX - PAGE2M || !atomic_load_explicit(&enabled, memory_order_relaxed)) return NULL;
  size_t size = (n + PAGE2M - 1) & ~(PAGE2M - 1);
  pthread_mutex_lock(&lock);
  int fit = -1, empty = -1;
  for (int i = 0; i < SLOTS; i++) {
    if (!atomic_load(&blocks[i].base)) {
      if (empty < 0) empty = i;
    } else if (!blocks[i].in_use && blocks[i].size >= size && blocks[i].size - size <= size / 4 &&
               (fit < 0 || blocks[i].size < blocks[fit].size)) {
      fit = i;
    }
  }
  char *p = NULL;
  if (fit >= 0) {
    blocks[fit].in_use = 1;
    idle_bytes -= blocks[fit].size;
    p = atomic_load(&blocks[fit].base);
    atomic_fetch_add(&n_reused, 1);
  } else {
    if (empty < 0 && (empty = largest_idle()) >= 0) unmap_slot(empty);
    if (empty >= 0 && (p = map_aligned(size))) {
      blocks[empty].size = size;
      blocks[empty].in_use = 1;
      atomic_store(&blocks[empty].base, p);
      atomic_fetch_add(&n_mapped, 1);
    }
  }
  pthread_mutex_unlock(&lock);
  return p;
}

static int slot_of(const void *p) {
  if (!p) return -1;
  for (int i = 0; i < SLOTS; i++)
    if (atomic_load_explicit(&blocks[i].base, memory_order_acquire) == p) return i;
  return -1;
}

void *malloc(size_t n) {
  void *p = n >= BIG ? take(n) : NULL;
  return p ? p : __libc_malloc(n);
}

void free(void *p) {
  int i = slot_of(p);
  if (i < 0) return __libc_free(p);
  pthread_mutex_lock(&lock);
  blocks[i].in_use = 0;
  idle_bytes += blocks[i].size;
  while (idle_bytes > idle_limit) unmap_slot(largest_idle());
  pthread_mutex_unlock(&lock);
}

void *realloc(void *p, size_t n) {
  int i = slot_of(p);
  if (i < 0) return __libc_realloc(p, n);
  size_t size = blocks[i].size;  // ours and in use: no other thread changes it
  if (n <= size && n >= size / 2) return p;
  void *q = malloc(n);
  if (q) {
    memcpy(q, p, n < size ? n : size);
    free(p);
  }
  return q;
}

static void *aligned(size_t align, size_t n) {
  void *p = (n >= BIG && align <= PAGE2M) ? take(n) : NULL;
  return p ? p : __libc_memalign(align, n);
}

int posix_memalign(void **out, size_t align, size_t n) {
  if (align < sizeof(void *) || (align & (align - 1))) return EINVAL;
  void *p = aligned(align, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void *aligned_alloc(size_t align, size_t n) { return aligned(align, n); }
void *memalign(size_t align, size_t n) { return aligned(align, n); }

size_t malloc_usable_size(void *p) {
  int i = slot_of(p);
  if (i >= 0) return blocks[i].size;
  static size_t (*glibc)(void *);
  if (!glibc) glibc = (size_t(*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  return glibc ? glibc(p) : 0;
}

// Blocks handed out again and blocks mapped, since the process started (the tests read them).
void parcae_buffer_reuse_stats(unsigned long out[2]) {
  out[0] = atomic_load(&n_reused);
  out[1] = atomic_load(&n_mapped);
}

// Turns serving new requests on (1) or off (0: glibc serves them; blocks in use stay ours until
// freed). Returns the previous setting. For measuring the allocator against glibc's in one process.
int parcae_buffer_reuse_enable(int on) { return atomic_exchange(&enabled, on != 0); }
