/*
 * Lending the arena to numpy: a worker's large arrays are allocated in the
 * arena, so an array a task returns becomes an object where it lies instead
 * of being copied there (see shm_numpy_handler and shm_lent_adopt in
 * _store.h, and shmray._lend for when it is used).
 *
 * A lent buffer is the data of a CREATED object with a made-up id, placed so
 * that the pages it spans, and the page in front of it, belong to it alone:
 *
 *     payload start            the object's header, once adopted
 *     data - 4096 .. data      (page aligned) ends with the tag: the object's
 *                              id, the owner's pid, the size, the payload offset
 *     data .. data + size      the array's bytes; metadata follows, once adopted
 *
 * The free function reads the tag: a buffer still lent drops its object; an
 * adopted one (the tag now names the real object) drops the pin its array
 * held.  The store checks the tag's id against its offset either way.
 *
 * Fork.  The arena is a shared mapping, so a child forked by a task would
 * share its lent buffers with the worker instead of getting copies, and
 * could write into a sealed object.  Each process keeps a list of its live
 * buffers; at fork the child maps private copies over them before it runs
 * any code of its own, while the parent waits (no buffer of it may be freed
 * and reused meanwhile).  Should that fail, the child's pages of the buffer
 * are made to fault rather than stay shared.  The child then frees nothing
 * it inherited and lends nothing.
 *
 * numpy calls these functions with or without the GIL, from any thread; they
 * touch no Python state, and the store's lock covers the arena.
 */
#define _GNU_SOURCE
#include "_store.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

/* numpy's PyDataMem_Handler (numpy/ndarraytypes.h), version 1; its layout is
 * part of numpy's ABI. */
struct numpy_allocator {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
};

struct numpy_handler {
    char name[127];
    uint8_t version;
    struct numpy_allocator allocator;
};

struct lend_tag {
    uint8_t id[SHM_ID_SIZE];
    int32_t pid;
    uint64_t size;
    uint64_t offset; /* of the object's payload, from the arena base */
};
#define TAG_SIZE 48
_Static_assert(sizeof(struct lend_tag) == TAG_SIZE, "tag layout");
/* The data's page is the first page boundary at least a page past the
 * payload's start (64-byte aligned); a page more, less 64 bytes, at most. */
#define MOST_IN_FRONT (2 * PAGE - SHM_ALIGN)
_Static_assert(SHM_LEND_HEADER_MAX + TAG_SIZE <= PAGE, "the header stops before the tag");

/* Lent ids can't be taken for real ones: those start with a random prefix
 * that shmray._ids never lets begin with eight 0xff bytes. */
static const uint8_t LENT_MARK[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
/* At the start of a lent buffer's object once its process keeps it past its task. */
static const uint8_t KEPT_MARK[8] = {'s', 'h', 'm', 'K', 'E', 'P', 'T', 0};

struct live_buffer {
    uint8_t *data;
    uint64_t size;
};

struct lender {
    shm_store *store;
    uint8_t *base;
    uint8_t *heap_lo, *heap_hi; /* lent buffers lie between */
    uint64_t threshold;
    uint64_t largest;           /* lent buffers are at most this large */
    uint64_t keep_free;
    uint64_t most_lent;         /* at once, to this process: long-lived buffers can't hoard */
    atomic_uint_fast64_t lent;  /* bytes of buffers lent and not yet adopted or given back */
    atomic_uint_fast64_t next;  /* numbers lent ids */
    atomic_bool no_more;        /* shm_lend_no_more was called */
    pid_t pid;                  /* the process that lends; its children don't */
    struct numpy_allocator fallback;
    /* The buffers a forked child must copy, lent or adopted, until freed. */
    pthread_mutex_t live_lock;
    struct live_buffer *live;
    size_t live_count, live_capacity;
    bool forking;               /* between before_fork and the after_fork functions */
    bool parent_waits;          /* ...for the child to signal on fork_done */
    int fork_done[2];           /* the child says it has its copies; -1 when no wait */
};

static struct lender lender = {.live_lock = PTHREAD_MUTEX_INITIALIZER, .fork_done = {-1, -1}};

static uint64_t page_up(uint64_t n)
{
    return (n + PAGE - 1) & ~(uint64_t)(PAGE - 1);
}

static struct lend_tag *tag_of(void *data)
{
    return (struct lend_tag *)((uint8_t *)data - TAG_SIZE);
}

static bool is_lent(const void *data)
{
    return data && (const uint8_t *)data >= lender.heap_lo && (const uint8_t *)data < lender.heap_hi;
}

static bool live_add(uint8_t *data, uint64_t size)
{
    bool added = true;
    pthread_mutex_lock(&lender.live_lock);
    if (lender.live_count == lender.live_capacity) {
        size_t capacity = lender.live_capacity ? 2 * lender.live_capacity : 64;
        struct live_buffer *grown = realloc(lender.live, capacity * sizeof *grown);
        if (grown) {
            lender.live = grown;
            lender.live_capacity = capacity;
        }
    }
    if (lender.live_count < lender.live_capacity)
        lender.live[lender.live_count++] = (struct live_buffer){data, size};
    else
        added = false;
    pthread_mutex_unlock(&lender.live_lock);
    return added;
}

static void live_remove(const uint8_t *data)
{
    pthread_mutex_lock(&lender.live_lock);
    for (size_t i = 0; i < lender.live_count; i++) {
        if (lender.live[i].data == data) {
            lender.live[i] = lender.live[--lender.live_count];
            break;
        }
    }
    pthread_mutex_unlock(&lender.live_lock);
}

/* Drop the buffer's object (lent) or its pin (adopted). */
static void give_back(void *data)
{
    struct lend_tag *tag = tag_of(data);
    if (memcmp(tag->id, LENT_MARK, sizeof LENT_MARK) == 0)
        atomic_fetch_sub(&lender.lent, tag->size);
    shm_lent_return(lender.store, tag->id, tag->offset);
}

static void *lend(size_t size)
{
    if (size < lender.threshold || size > lender.largest || getpid() != lender.pid ||
        atomic_load(&lender.no_more))
        return NULL;
    if (atomic_fetch_add(&lender.lent, size) + size > lender.most_lent) {
        atomic_fetch_sub(&lender.lent, size);
        return NULL;
    }
    struct lend_tag tag = {.pid = lender.pid, .size = size};
    uint64_t n = atomic_fetch_add(&lender.next, 1);
    memcpy(tag.id, LENT_MARK, sizeof LENT_MARK);
    memcpy(tag.id + sizeof LENT_MARK, &tag.pid, sizeof tag.pid);
    memcpy(tag.id + sizeof LENT_MARK + sizeof tag.pid, &n, sizeof n);
    if (shm_create_within(lender.store, tag.id, MOST_IN_FRONT + page_up(size), SHM_LEND_METADATA_MAX,
                          lender.keep_free, &tag.offset) != SHM_OK) {
        atomic_fetch_sub(&lender.lent, size);
        return NULL;
    }
    uint8_t *data = lender.base + page_up(tag.offset + PAGE);
    *tag_of(data) = tag;
    if (!live_add(data, size)) {
        give_back(data);
        return NULL;
    }
    return data;
}

static void *lend_malloc(void *ctx, size_t size)
{
    (void)ctx;
    void *data = lend(size);
    return data ? data : lender.fallback.malloc(lender.fallback.ctx, size);
}

/* Zeroed memory stays numpy's: its lazily zeroed pages cost nothing until used. */
static void *lend_calloc(void *ctx, size_t nelem, size_t elsize)
{
    (void)ctx;
    return lender.fallback.calloc(lender.fallback.ctx, nelem, elsize);
}

static void lend_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (!is_lent(ptr)) {
        lender.fallback.free(lender.fallback.ctx, ptr, size);
    } else if (getpid() == lender.pid) {
        live_remove(ptr);
        give_back(ptr);
    }
    /* else a forked child's private copy of its parent's buffer: it stays mapped */
}

static void *lend_realloc(void *ctx, void *ptr, size_t new_size)
{
    if (!is_lent(ptr))
        return lender.fallback.realloc(lender.fallback.ctx, ptr, new_size);
    void *moved = lend_malloc(ctx, new_size);
    if (!moved)
        return NULL;
    uint64_t old_size = tag_of(ptr)->size;
    memcpy(moved, ptr, old_size < new_size ? old_size : new_size);
    lend_free(ctx, ptr, old_size);
    return moved;
}

/* --- fork ------------------------------------------------------------------------- */

/* The pipe the next child signals on is made ahead, so that a fork needs no
 * new descriptor (a process at its limit would otherwise fork unwaited). */
static void make_fork_pipe(void)
{
    if (lender.fork_done[0] < 0 && pipe2(lender.fork_done, O_CLOEXEC) != 0)
        lender.fork_done[0] = lender.fork_done[1] = -1;
}

static void before_fork(void)
{
    if (getpid() != lender.pid)
        return; /* a child's fork: what it inherited is private already */
    pthread_mutex_lock(&lender.live_lock); /* until the child has its copies */
    lender.forking = true;
    if (lender.live_count)
        make_fork_pipe();
    lender.parent_waits = lender.live_count && lender.fork_done[0] >= 0;
}

static void after_fork_in_parent(void)
{
    if (!lender.forking)
        return;
    int saved_errno = errno; /* what a failed fork() reports */
    if (lender.parent_waits) {
        close(lender.fork_done[1]);
        char done;
        while (read(lender.fork_done[0], &done, 1) < 0 && errno == EINTR)
            ; /* a byte, or the end when the child died or fork failed */
        close(lender.fork_done[0]);
        lender.fork_done[0] = lender.fork_done[1] = -1;
        make_fork_pipe();
    }
    lender.forking = false;
    pthread_mutex_unlock(&lender.live_lock);
    errno = saved_errno;
}

/* Replace the shared pages of a live buffer (and its tag's page) by private
 * pages holding the same bytes: mremap moves the copy into place in one step.
 * Returns false if it could not. */
static bool copy_privately(uint8_t *start, uint64_t length)
{
    void *copy = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (copy == MAP_FAILED)
        return false;
    memcpy(copy, start, length);
    if (mremap(copy, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, start) == MAP_FAILED) {
        munmap(copy, length);
        return false;
    }
    return true;
}

/* Without a copy the child must not keep the shared pages: its writes would
 * land in the worker's buffers, later in objects.  Pages that fault on any
 * touch are the safe answer; a child that can't even have those dies here. */
static void cut_off(uint8_t *start, uint64_t length)
{
    if (mmap(start, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) ==
        MAP_FAILED) {
        static const char msg[] = "shmray: a child forked by a task could not unshare its parent's arrays\n";
        ssize_t ignored = write(2, msg, sizeof msg - 1);
        (void)ignored;
        _exit(70);
    }
}

/* The parent waits (fork_done) while this runs, so none of these buffers is
 * freed and reused meanwhile; without that wait a copy could be of someone
 * else's bytes, so the buffers are cut off instead. */
static void after_fork_in_child(void)
{
    if (!lender.forking)
        return;
    for (size_t i = 0; i < lender.live_count; i++) {
        uint8_t *start = lender.live[i].data - PAGE;
        uint64_t length = PAGE + page_up(lender.live[i].size);
        if (!lender.parent_waits || !copy_privately(start, length))
            cut_off(start, length);
    }
    if (lender.parent_waits) {
        char done = 1;
        while (write(lender.fork_done[1], &done, 1) < 0 && errno == EINTR)
            ;
    }
    if (lender.fork_done[0] >= 0) { /* the parent's, made for its next fork */
        close(lender.fork_done[0]);
        close(lender.fork_done[1]);
        lender.fork_done[0] = lender.fork_done[1] = -1;
    }
    lender.forking = false;
    pthread_mutex_init(&lender.live_lock, NULL);
}

/* --- the handler ------------------------------------------------------------------ */

static struct numpy_handler handler = {
    .name = "shmray_arena",
    .version = 1,
    .allocator = {NULL, lend_malloc, lend_calloc, lend_realloc, lend_free},
};

void *shm_numpy_handler(shm_store *s, const void *fallback, uint64_t threshold, uint64_t largest,
                        uint64_t most_lent, uint64_t keep_free)
{
    if (!s || !fallback || ((const struct numpy_handler *)fallback)->version != 1 ||
        sysconf(_SC_PAGESIZE) != PAGE)
        return NULL; /* the layout keeps each buffer on pages of its own */
    if (lender.store && lender.pid == getpid())
        return &handler; /* lending already */
    uint8_t *base = shm_store_base(s);
    shm_stats stats;
    if (shm_statistics(s, &stats) != SHM_OK)
        return NULL;
    /* A handle of its own, never closed: arrays may outlive the caller's. */
    shm_store *own;
    if (shm_store_open(base, stats.capacity, &own) != SHM_OK)
        return NULL;
    static bool hooked;
    if (!hooked && pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child) != 0) {
        shm_store_close(own);
        return NULL;
    }
    hooked = true;
    lender.store = own;
    lender.base = base;
    lender.heap_lo = base + (stats.capacity - stats.heap_size);
    lender.heap_hi = base + stats.capacity;
    lender.threshold = threshold > 0 ? threshold : 1;
    lender.largest = largest;
    lender.most_lent = most_lent;
    lender.keep_free = keep_free;
    lender.pid = getpid();
    lender.fallback = ((const struct numpy_handler *)fallback)->allocator;
    make_fork_pipe();
    return &handler;
}

uint64_t shm_lent_outstanding(void)
{
    return getpid() == lender.pid ? atomic_load(&lender.lent) : 0;
}

void shm_lend_no_more(void)
{
    atomic_store(&lender.no_more, true);
    /* The buffers it holds now are kept (in a global, a cache): say so where others look
     * (shm_lent_kept), in the object's header room, unused until an adoption. */
    pthread_mutex_lock(&lender.live_lock);
    for (size_t i = 0; i < lender.live_count; i++) {
        const struct lend_tag *tag = tag_of(lender.live[i].data);
        if (memcmp(tag->id, LENT_MARK, sizeof LENT_MARK) == 0)
            memcpy(lender.base + tag->offset, KEPT_MARK, sizeof KEPT_MARK);
    }
    pthread_mutex_unlock(&lender.live_lock);
}

int shm_lent_kept(shm_store *s, uint64_t offset)
{
    if (!s || offset < sizeof KEPT_MARK)
        return 0;
    return memcmp((uint8_t *)shm_store_base(s) + offset, KEPT_MARK, sizeof KEPT_MARK) == 0;
}

uint64_t shm_lent_prefix(const void *data)
{
    if (!is_lent(data) || getpid() != lender.pid)
        return 0;
    const struct lend_tag *tag = tag_of((void *)data);
    if (tag->pid != lender.pid || memcmp(tag->id, LENT_MARK, sizeof LENT_MARK) != 0)
        return 0;
    return (uint64_t)((const uint8_t *)data - lender.base) - tag->offset;
}

int shm_lent_adopt(shm_store *s, const void *data, uint64_t n, const uint8_t *id,
                   const uint8_t *header, uint64_t header_size,
                   const uint8_t *metadata, uint64_t metadata_size)
{
    uint64_t prefix = shm_lent_prefix(data);
    if (!s || shm_store_base(s) != lender.base || !id || prefix == 0)
        return SHM_ERR_INVALID;
    struct lend_tag *tag = tag_of((void *)data);
    if (tag->size != n || header_size > SHM_LEND_HEADER_MAX || header_size > prefix - TAG_SIZE ||
        metadata_size > SHM_LEND_METADATA_MAX)
        return SHM_ERR_INVALID;
    memcpy(lender.base + tag->offset, header, header_size);
    if (metadata_size)
        memcpy((uint8_t *)data + n, metadata, metadata_size);
    /* The tag names the object before the object exists: once it does, a free
     * must drop its pin, never its object. */
    struct lend_tag lent = *tag;
    memcpy(tag->id, id, SHM_ID_SIZE);
    int rc = shm_adopt(s, lent.id, id, prefix + n, metadata_size);
    if (rc == SHM_OK)
        atomic_fetch_sub(&lender.lent, n); /* an object now, spillable once numpy lets go */
    else
        *tag = lent;
    return rc;
}
