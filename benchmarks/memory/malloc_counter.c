/* Live heap bytes of a process, with a resettable peak: an LD_PRELOAD malloc-family counter.
 *
 * Every allocation entry point forwards to glibc's own implementation (the exported __libc_*
 * functions, so no dlsym bootstrap is needed) and adds or subtracts malloc_usable_size() of the
 * block. Read it from Python with ctypes: mc_live(), mc_peak(), mc_reset() (peak := live),
 * mc_allocs() (number of allocations so far). Build:
 *   gcc -O2 -shared -fPIC -o libmalloc_counter.so malloc_counter.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *ptr, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);
extern void __libc_free(void *ptr);

static int64_t live_bytes;
static int64_t peak_bytes;
static int64_t alloc_count;

static void count_alloc(void *ptr) {
    if (ptr == NULL) return;
    int64_t size = (int64_t)malloc_usable_size(ptr);
    int64_t now = __atomic_add_fetch(&live_bytes, size, __ATOMIC_RELAXED) ;
    __atomic_add_fetch(&alloc_count, 1, __ATOMIC_RELAXED);
    int64_t peak = __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED);
    while (now > peak &&
           !__atomic_compare_exchange_n(&peak_bytes, &peak, now, 1, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
}

static void count_free(void *ptr) {
    if (ptr == NULL) return;
    __atomic_sub_fetch(&live_bytes, (int64_t)malloc_usable_size(ptr), __ATOMIC_RELAXED);
}

void *malloc(size_t size) {
    void *ptr = __libc_malloc(size);
    count_alloc(ptr);
    return ptr;
}

void *calloc(size_t n, size_t size) {
    void *ptr = __libc_calloc(n, size);
    count_alloc(ptr);
    return ptr;
}

void *realloc(void *old, size_t size) {
    count_free(old);  /* realloc may move or free the block: count it out, the result back in */
    void *ptr = __libc_realloc(old, size);
    if (ptr == NULL && old != NULL && size != 0) {
        count_alloc(old);  /* failed: the old block is still there */
        return NULL;
    }
    count_alloc(ptr);
    return ptr;
}

void free(void *ptr) {
    count_free(ptr);
    __libc_free(ptr);
}

void *memalign(size_t alignment, size_t size) {
    void *ptr = __libc_memalign(alignment, size);
    count_alloc(ptr);
    return ptr;
}

void *aligned_alloc(size_t alignment, size_t size) {
    return memalign(alignment, size);
}

int posix_memalign(void **out, size_t alignment, size_t size) {
    if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0) return EINVAL;
    void *ptr = memalign(alignment, size);
    if (ptr == NULL && size != 0) return ENOMEM;
    *out = ptr;
    return 0;
}

void *valloc(size_t size) {
    return memalign((size_t)sysconf(_SC_PAGESIZE), size);
}

int64_t mc_live(void) { return __atomic_load_n(&live_bytes, __ATOMIC_RELAXED); }

int64_t mc_peak(void) { return __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED); }

int64_t mc_allocs(void) { return __atomic_load_n(&alloc_count, __ATOMIC_RELAXED); }

void mc_reset(void) { __atomic_store_n(&peak_bytes, mc_live(), __ATOMIC_RELAXED); }
