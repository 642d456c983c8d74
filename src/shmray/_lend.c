/*
 * Lending the arena to numpy: a worker's large arrays are allocated in the
 * arena, so an array a task returns becomes an object where it lies instead
 * of being copied there (see shm_numpy_handler and shm_lent_adopt in
 * _store.h, and shmray._lend for when it is used).
 *
 * A lent buffer is the data of a CREATED object with a made-up id.  The
 * SHM_LEND_PREFIX bytes in front of the buffer are the rest of that object:
 * room for the header the object will need, and at their end a tag naming
 * the object, the process it was lent to and the buffer's size.  The free
 * function reads the tag: a buffer still lent aborts its object; an adopted
 * one (the tag now names the real object) drops the pin its array held.
 *
 * numpy calls these functions with or without the GIL, from any thread;
 * they touch no Python state, and the store's lock covers the arena.
 */
#define _GNU_SOURCE
#include "_store.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>
#include <unistd.h>

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

/* At the end of a lent buffer's prefix, right in front of the array data. */
struct lend_tag {
    uint8_t id[SHM_ID_SIZE];
    int32_t pid;
    uint64_t size;
    uint64_t reserved;
};
#define TAG_SIZE 48
_Static_assert(sizeof(struct lend_tag) == TAG_SIZE, "tag layout");
_Static_assert(SHM_LEND_HEADER_MAX + TAG_SIZE == SHM_LEND_PREFIX, "the header stops at the tag");
_Static_assert(SHM_LEND_PREFIX % SHM_ALIGN == 0, "lent data stays aligned");

/* Lent ids can't be taken for real ones: those start with a job or task id,
 * whose bytes are never all 0xff. */
static const uint8_t LENT_MARK[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

struct lender {
    shm_store *store;
    uint8_t *heap_lo, *heap_hi; /* lent buffers lie between */
    uint64_t threshold;
    uint64_t largest;           /* lent buffers are at most this large */
    uint64_t keep_free;
    uint64_t most_lent;         /* at once, to this process: long-lived buffers can't hoard */
    atomic_uint_fast64_t lent;  /* bytes of buffers lent and not yet adopted or given back */
    pid_t pid;                  /* the process that lends; its children don't */
    struct numpy_allocator fallback;
    atomic_uint_fast64_t next;  /* numbers lent ids */
};

static struct lender lender;

static struct lend_tag *tag_of(void *data)
{
    return (struct lend_tag *)((uint8_t *)data - TAG_SIZE);
}

static bool is_lent(const void *data)
{
    return data && (const uint8_t *)data >= lender.heap_lo && (const uint8_t *)data < lender.heap_hi;
}

static void *lend(size_t size)
{
    if (size < lender.threshold || size > lender.largest || getpid() != lender.pid)
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
    uint64_t offset;
    if (shm_create_within(lender.store, tag.id, SHM_LEND_PREFIX + size, SHM_LEND_METADATA_MAX,
                          lender.keep_free, &offset) != SHM_OK) {
        atomic_fetch_sub(&lender.lent, size);
        return NULL;
    }
    uint8_t *data = (uint8_t *)shm_store_base(lender.store) + offset + SHM_LEND_PREFIX;
    *tag_of(data) = tag;
    return data;
}

static void give_back(void *data)
{
    struct lend_tag *tag = tag_of(data);
    if (tag->pid != getpid())
        return; /* a forked child's copy of its parent's array: the parent frees it */
    if (memcmp(tag->id, LENT_MARK, sizeof LENT_MARK) == 0) {
        atomic_fetch_sub(&lender.lent, tag->size);
        shm_abort(lender.store, tag->id);
    } else {
        shm_release_lent(lender.store, tag->id);
    }
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

static void *lend_realloc(void *ctx, void *ptr, size_t new_size)
{
    if (!is_lent(ptr))
        return lender.fallback.realloc(lender.fallback.ctx, ptr, new_size);
    void *moved = lend_malloc(ctx, new_size);
    if (!moved)
        return NULL;
    uint64_t old_size = tag_of(ptr)->size;
    memcpy(moved, ptr, old_size < new_size ? old_size : new_size);
    give_back(ptr);
    return moved;
}

static void lend_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (is_lent(ptr))
        give_back(ptr);
    else
        lender.fallback.free(lender.fallback.ctx, ptr, size);
}

static struct numpy_handler handler = {
    .name = "shmray_arena",
    .version = 1,
    .allocator = {NULL, lend_malloc, lend_calloc, lend_realloc, lend_free},
};

void *shm_numpy_handler(shm_store *s, const void *fallback, uint64_t threshold, uint64_t largest,
                        uint64_t most_lent, uint64_t keep_free)
{
    if (!s || !fallback || ((const struct numpy_handler *)fallback)->version != 1)
        return NULL;
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
    lender.store = own;
    lender.heap_lo = base + (stats.capacity - stats.heap_size);
    lender.heap_hi = base + stats.capacity;
    lender.threshold = threshold > 0 ? threshold : 1;
    lender.largest = largest;
    lender.most_lent = most_lent;
    lender.keep_free = keep_free;
    lender.pid = getpid();
    lender.fallback = ((const struct numpy_handler *)fallback)->allocator;
    return &handler;
}

int shm_lent_adopt(shm_store *s, const void *data, uint64_t n, const uint8_t *id,
                   const uint8_t *header, uint64_t header_size,
                   const uint8_t *metadata, uint64_t metadata_size)
{
    if (!s || shm_store_base(s) != shm_store_base(lender.store) || !id || !is_lent(data) ||
        getpid() != lender.pid)
        return SHM_ERR_INVALID;
    struct lend_tag *tag = tag_of((void *)data);
    if (tag->pid != lender.pid || tag->size != n ||
        memcmp(tag->id, LENT_MARK, sizeof LENT_MARK) != 0 ||
        header_size > SHM_LEND_HEADER_MAX || metadata_size > SHM_LEND_METADATA_MAX)
        return SHM_ERR_INVALID;
    uint8_t *start = (uint8_t *)data - SHM_LEND_PREFIX;
    memcpy(start, header, header_size);
    if (metadata_size)
        memcpy((uint8_t *)data + n, metadata, metadata_size);
    /* The tag names the object before the object exists: once it does, a free
     * must release its pin, never abort. */
    struct lend_tag lent = *tag;
    memcpy(tag->id, id, SHM_ID_SIZE);
    int rc = shm_adopt(s, lent.id, id, SHM_LEND_PREFIX + n, metadata_size);
    if (rc == SHM_OK)
        atomic_fetch_sub(&lender.lent, n); /* an object now, spillable once numpy lets go */
    else
        *tag = lent;
    return rc;
}
