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
// marked for transparent huge pages; free parks our blocks as idle and unmaps the least
// recently freed ones while more than the idle limit sits idle (an eighth of the machine's or
// the cgroup's memory; PARCAE_JAX_BUFFER_REUSE_IDLE_MB sets it). Everything smaller, and every
// pointer that is not ours, goes to glibc's own functions (__libc_*), so calloc and all other
// allocations are untouched. A reused block is not zeroed: malloc promises no contents.
// Idle blocks are not inherited by a forked child (MADV_DONTFORK around fork).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_realloc(void *, size_t);

#define BIG ((size_t)32 << 20)  // glibc maps anything above its 32 MiB mmap threshold afresh
#define PAGE2M ((size_t)2 << 20)
#define SLOTS 256  // blocks tracked at once, in use or idle; past that glibc serves them

typedef struct {
  _Atomic(char *) base;  // read without the lock by slot_of(); changes only under the lock
  size_t size;           // a multiple of 2 MiB
  int in_use;
  unsigned long freed_at;  // tick of its last free: the least recently freed goes first
} Block;

static Block blocks[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static size_t idle_bytes, idle_limit = (size_t)1 << 30;
static unsigned long ticks;
static atomic_ulong n_reused, n_mapped;    // for parcae_buffer_reuse_stats
static atomic_int enabled = 1;             // parcae_buffer_reuse_enable: A/B in one process
static size_t (*glibc_usable_size)(void *);

// The first number in a small file (a cgroup limit), or 0.
static size_t read_number(const char *path) {
  char text[32] = {0};
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t n = read(fd, text, sizeof text - 1);
  close(fd);
  return n > 0 ? strtoull(text, NULL, 10) : 0;  // "max" reads as 0: no limit
}

static void fork_prepare(void);
static void fork_parent(void);
static void fork_child(void);

__attribute__((constructor)) static void init(void) {
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  size_t memory = (pages > 0 && page > 0) ? (size_t)pages * (size_t)page : 0;
  const size_t cgroup[2] = {read_number("/sys/fs/cgroup/memory.max"),
                            read_number("/sys/fs/cgroup/memory/memory.limit_in_bytes")};
  for (int i = 0; i < 2; i++)
    if (cgroup[i] && (!memory || cgroup[i] < memory)) memory = cgroup[i];
  if (memory) idle_limit = memory / 8;
  const char *mb = getenv("PARCAE_JAX_BUFFER_REUSE_IDLE_MB");
  if (mb && *mb) idle_limit = (size_t)strtoull(mb, NULL, 10) << 20;
  glibc_usable_size = (size_t(*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  pthread_atfork(fork_prepare, fork_parent, fork_child);
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

// Blocks taken out of the table under the lock, unmapped after it is released.
typedef struct {
  char *base[SLOTS];
  size_t size[SLOTS];
  int n;
} Doomed;

static void doom(int i, Doomed *d) {  // lock held, slot idle: out of the table first, so no
  d->base[d->n] = atomic_load(&blocks[i].base);  // free() can match its address once unmapped
  d->size[d->n++] = blocks[i].size;
  idle_bytes -= blocks[i].size;
  atomic_store(&blocks[i].base, NULL);
}

static void unmap_doomed(const Doomed *d) {
  for (int i = 0; i < d->n; i++) munmap(d->base[i], d->size[i]);
}

static int oldest_idle(void) {  // lock held
  int best = -1;
  for (int i = 0; i < SLOTS; i++)
    if (atomic_load(&blocks[i].base) && !blocks[i].in_use && (best < 0 || blocks[i].freed_at < blocks[best].freed_at))
      best = i;
  return best;
}

// A block of at least n bytes, 2 MiB-aligned, or NULL (the caller then asks glibc).
static void *take(size_t n) {
  if (n > SIZE_MAX / 2 || !atomic_load_explicit(&enabled, memory_order_relaxed)) return NULL;
  const int saved_errno = errno;
  size_t size = (n + PAGE2M - 1) & ~(PAGE2M - 1);
  Doomed doomed = {.n = 0};
  char *p = NULL;
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
  if (fit >= 0) {
    blocks[fit].in_use = 1;
    idle_bytes -= blocks[fit].size;
    p = atomic_load(&blocks[fit].base);
    atomic_fetch_add(&n_reused, 1);
  } else {
    if (empty < 0 && (empty = oldest_idle()) >= 0) doom(empty, &doomed);
    if (empty >= 0) {
      // Map with the lock released; if the mapping fails, give idle blocks back and retry.
      pthread_mutex_unlock(&lock);
      unmap_doomed(&doomed);
      doomed.n = 0;
      p = map_aligned(size);
      pthread_mutex_lock(&lock);
      if (!p && oldest_idle() >= 0) {
        for (int j; (j = oldest_idle()) >= 0;) doom(j, &doomed);
        pthread_mutex_unlock(&lock);
        unmap_doomed(&doomed);
        doomed.n = 0;
        p = map_aligned(size);
        pthread_mutex_lock(&lock);
      }
      int slot = -1;  // another thread may have filled the empty slot meanwhile
      for (int i = 0; p && i < SLOTS && slot < 0; i++)
        if (!atomic_load(&blocks[i].base)) slot = i;
      if (p && slot < 0 && (slot = oldest_idle()) >= 0) doom(slot, &doomed);
      if (p && slot >= 0) {
        blocks[slot].size = size;
        blocks[slot].in_use = 1;
        atomic_store(&blocks[slot].base, p);
        atomic_fetch_add(&n_mapped, 1);
      } else if (p) {  // every slot holds a block in use: not ours to track
        doomed.base[doomed.n] = p, doomed.size[doomed.n++] = size;
        p = NULL;
      }
    }
  }
  pthread_mutex_unlock(&lock);
  unmap_doomed(&doomed);
  errno = saved_errno;
  return p;
}

static int slot_of(const void *p) {
  if (!p || ((uintptr_t)p & (PAGE2M - 1))) return -1;  // ours start on 2 MiB: most frees stop here
  for (int i = 0; i < SLOTS; i++)
    if (atomic_load_explicit(&blocks[i].base, memory_order_acquire) == p) return i;
  return -1;
}

// Parks block `p` as idle if it is ours; 0 if it is not (then it is glibc's to free).
static int give_back(void *p) {
  int i = slot_of(p);
  if (i < 0) return 0;
  const int saved_errno = errno;
  Doomed doomed = {.n = 0};
  pthread_mutex_lock(&lock);
  if (atomic_load(&blocks[i].base) != p) {  // gone between the scan and the lock: not ours now
    pthread_mutex_unlock(&lock);
    return 0;
  }
  if (!blocks[i].in_use) {  // freed twice: stop, as glibc would
    pthread_mutex_unlock(&lock);
    abort();
  }
  blocks[i].in_use = 0;
  blocks[i].freed_at = ++ticks;
  idle_bytes += blocks[i].size;
  for (int j; idle_bytes > idle_limit && (j = oldest_idle()) >= 0;) doom(j, &doomed);
  pthread_mutex_unlock(&lock);
  unmap_doomed(&doomed);
  errno = saved_errno;
  return 1;
}

// Idle blocks stay out of a forked child (its copy-on-write share would split their huge pages
// in the parent and keep dead data alive in the child); blocks in use are inherited as usual.
// Blocks another thread holds outside the table at that moment (being mapped or unmapped) are
// inherited and never unmapped in the child: address space only, as glibc's would be.
static void mark_idle(int advice) {
  for (int i = 0; i < SLOTS; i++) {
    char *base = atomic_load(&blocks[i].base);
    if (base && !blocks[i].in_use) madvise(base, blocks[i].size, advice);
  }
}

static void fork_prepare(void) {
  pthread_mutex_lock(&lock);
  mark_idle(MADV_DONTFORK);
}

static void fork_parent(void) {
  mark_idle(MADV_DOFORK);
  pthread_mutex_unlock(&lock);
}

static void fork_child(void) {
  for (int i = 0; i < SLOTS; i++)
    if (atomic_load(&blocks[i].base) && !blocks[i].in_use) {  // not mapped here
      idle_bytes -= blocks[i].size;
      atomic_store(&blocks[i].base, NULL);
    }
  pthread_mutex_unlock(&lock);
}

void *malloc(size_t n) {
  void *p = n >= BIG ? take(n) : NULL;
  return p ? p : __libc_malloc(n);
}

void free(void *p) {
  if (!give_back(p)) __libc_free(p);
}

void free_sized(void *p, size_t n) {
  (void)n;
  free(p);
}

void free_aligned_sized(void *p, size_t align, size_t n) {
  (void)align, (void)n;
  free(p);
}

void *realloc(void *p, size_t n) {
  int i = slot_of(p);
  if (i < 0) return __libc_realloc(p, n);
  if (n == 0) {  // as glibc: free, return NULL
    free(p);
    return NULL;
  }
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
  const int power_of_two = align && !(align & (align - 1));  // else glibc's answer (EINVAL)
  void *p = (n >= BIG && power_of_two && align <= PAGE2M) ? take(n) : NULL;
  return p ? p : __libc_memalign(align, n);
}

int posix_memalign(void **out, size_t align, size_t n) {
  if (align < sizeof(void *) || (align & (align - 1))) return EINVAL;
  const int saved_errno = errno;
  void *p = aligned(align, n);
  if (!p) return ENOMEM;
  errno = saved_errno;  // posix_memalign reports through its result, not errno
  *out = p;
  return 0;
}

void *aligned_alloc(size_t align, size_t n) { return aligned(align, n); }
void *memalign(size_t align, size_t n) { return aligned(align, n); }

size_t malloc_usable_size(void *p) {
  int i = slot_of(p);
  if (i >= 0) return blocks[i].size;
  return glibc_usable_size ? glibc_usable_size(p) : 0;
}

// Blocks handed out again, blocks mapped, and the bytes now idle (the tests read them).
void parcae_buffer_reuse_stats(unsigned long out[3]) {
  out[0] = atomic_load(&n_reused);
  out[1] = atomic_load(&n_mapped);
  pthread_mutex_lock(&lock);
  out[2] = idle_bytes;
  pthread_mutex_unlock(&lock);
}

// Turns serving new requests on (1) or off (0: glibc serves them; blocks in use stay ours until
// freed). Returns the previous setting. For measuring the allocator against glibc's in one process.
int parcae_buffer_reuse_enable(int on) { return atomic_exchange(&enabled, on != 0); }
