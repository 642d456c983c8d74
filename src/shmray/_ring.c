/*
 * A first-in first-out queue of byte records in shared memory: the fast path
 * of shmray.util.queue.Queue (see that module for what goes through it and
 * what does not).
 *
 * The ring lives in the payload of one arena object (or, in local mode, in a
 * private buffer); every position in it is an offset, so each process may map
 * it at its own address.  Layout:
 *
 *   0                  struct ring (RING_HEADER bytes): counters, the robust
 *                      process-shared mutex, the futex words
 *   RING_HEADER        the data: `capacity` bytes, used circularly
 *
 * A record is a u64 length n, then n bytes, padded to a multiple of 8; the
 * capacity is a multiple of 8 too, so a length word never wraps.  The caller
 * frames records (Python builds a batch in one buffer), so a batch goes in
 * and comes out whole, under one lock.
 *
 * Overflow.  A queue without a limit must take a put even when the ring has
 * no room.  Such a put is counted here (overflow_sent) and its records are
 * sent to the queue's keeper process, which counts them in once they arrive
 * (shm_ring_arrived); while any sent item is unclaimed, later puts overflow
 * too, so the items stay in order: the ring's first, then the keeper's.  A
 * get takes from the ring, then claims arrived items, which its caller then
 * fetches from the keeper.
 *
 * Waiting.  A blocked put or get sleeps on a futex word (get_seq or put_seq),
 * bumped under the lock by every change that could let it through; it reads
 * the word under the lock before sleeping, so no wake-up is missed.  A waiter
 * that dies leaves nothing behind but a too-high waiter count, which costs a
 * spare wake-up call: there is no condition variable to leave inconsistent.
 * The caller waits in slices (its Python loop checks signals in between).
 *
 * Crash safety.  A writer copies a record, then moves `tail`, then counts it
 * in `items`; a reader moves `head`, then counts down.  A process that dies
 * holding the mutex leaves at worst `items` wrong, so the next locker
 * recounts it from the records between head and tail.
 */
#define _GNU_SOURCE
#include "_store.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RING_MAGIC 0x474e4952u  /* "RING" */
#define RING_HEADER 256

struct ring {
    uint32_t magic;
    uint32_t closed;            /* set once, by shm_ring_close */
    uint64_t capacity;          /* bytes of data */
    uint64_t max_items;         /* 0: no limit on the count */
    uint64_t head;              /* bytes read since the start (wraps at 2^64) */
    uint64_t tail;              /* bytes written since the start */
    uint64_t items;             /* records between head and tail */
    uint64_t overflow_sent;     /* items put past the ring, to the keeper */
    uint64_t overflow_arrived;  /* ... of which the keeper has received */
    uint64_t overflow_claimed;  /* ... of which gets have taken */
    uint64_t unfinished;        /* puts not yet matched by a task_done */
    _Atomic uint32_t put_seq;   /* bumped when items arrive: getters sleep on it */
    _Atomic uint32_t get_seq;   /* bumped when room is made: putters sleep on it */
    _Atomic uint32_t done_seq;  /* bumped when unfinished reaches 0: joiners */
    _Atomic uint32_t sleepers;  /* processes asleep on any of the three */
    alignas(64) pthread_mutex_t lock;
};

_Static_assert(sizeof(struct ring) <= RING_HEADER, "the ring's header outgrew its room");

static uint8_t *ring_data(struct ring *r)
{
    return (uint8_t *)r + RING_HEADER;
}

static uint64_t padded(uint64_t n)
{
    return (n + 7) & ~(uint64_t)7;
}

/* Copy n bytes out of / into the circular data, starting at position pos. */
static void ring_read(struct ring *r, uint64_t pos, void *out, uint64_t n)
{
    uint64_t at = pos % r->capacity, first = r->capacity - at;
    if (first >= n) {
        memcpy(out, ring_data(r) + at, n);
    } else {
        memcpy(out, ring_data(r) + at, first);
        memcpy((uint8_t *)out + first, ring_data(r), n - first);
    }
}

static void ring_write(struct ring *r, uint64_t pos, const void *in, uint64_t n)
{
    uint64_t at = pos % r->capacity, first = r->capacity - at;
    if (first >= n) {
        memcpy(ring_data(r) + at, in, n);
    } else {
        memcpy(ring_data(r) + at, in, first);
        memcpy(ring_data(r), (const uint8_t *)in + first, n - first);
    }
}

static uint64_t record_length(struct ring *r, uint64_t pos)
{
    uint64_t n;
    ring_read(r, pos, &n, sizeof n);
    return n;
}

/* After a holder died: recount the records between head and tail; a length
 * that can't be right ends the data there (nothing after it was complete). */
static void ring_repair(struct ring *r)
{
    uint64_t pos = r->head, count = 0;
    while (pos != r->tail) {
        uint64_t left = r->tail - pos, n = record_length(r, pos);
        if (left < 8 || n > left - 8 || padded(8 + n) > left) {
            r->tail = pos;
            break;
        }
        pos += padded(8 + n);
        count++;
    }
    r->items = count;
}

static int ring_lock(struct ring *r)
{
    int rc = pthread_mutex_lock(&r->lock);
    if (rc == EOWNERDEAD) {
        ring_repair(r);
        pthread_mutex_consistent(&r->lock);
        return SHM_OK;
    }
    if (rc == ENOTRECOVERABLE)
        return SHM_ERR_CORRUPT;
    if (rc != 0) {
        errno = rc;
        return SHM_ERR_SYSTEM;
    }
    return SHM_OK;
}

/* Lock, for an operation a shut ring refuses (SHM_ERR_CLOSED, unlocked). */
static int ring_enter(struct ring *r)
{
    int rc = ring_lock(r);
    if (rc == SHM_OK && r->closed) {
        pthread_mutex_unlock(&r->lock);
        return SHM_ERR_CLOSED;
    }
    return rc;
}

static void wake(struct ring *r, _Atomic uint32_t *word)
{
    atomic_fetch_add(word, 1);
    if (atomic_load(&r->sleepers))
        syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Called with the lock held, which this releases: sleep until `word` moves
 * (or wait_ns passes, or a signal comes).  Returns 0 if there is no time left
 * to wait. */
static int sleep_on(struct ring *r, _Atomic uint32_t *word, const struct timespec *deadline)
{
    struct timespec now, left;
    uint32_t seen = atomic_load(word);
    clock_gettime(CLOCK_MONOTONIC, &now);
    left.tv_sec = deadline->tv_sec - now.tv_sec;
    left.tv_nsec = deadline->tv_nsec - now.tv_nsec;
    if (left.tv_nsec < 0) {
        left.tv_sec--;
        left.tv_nsec += 1000000000L;
    }
    if (left.tv_sec < 0) {
        pthread_mutex_unlock(&r->lock);
        return 0;
    }
    atomic_fetch_add(&r->sleepers, 1);
    pthread_mutex_unlock(&r->lock);
    syscall(SYS_futex, word, FUTEX_WAIT, seen, &left, NULL, 0);
    atomic_fetch_sub(&r->sleepers, 1);
    return 1;
}

static struct timespec deadline_after(uint64_t wait_ns)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_sec += (time_t)(wait_ns / 1000000000u);
    t.tv_nsec += (long)(wait_ns % 1000000000u);
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

static struct ring *checked(void *memory)
{
    struct ring *r = memory;
    return r != NULL && r->magic == RING_MAGIC ? r : NULL;
}

/* The ring in `memory`, locked (SHM_ERR_INVALID if there is none). */
static int ring_locked(void *memory, struct ring **out)
{
    struct ring *r = checked(memory);
    if (r == NULL)
        return SHM_ERR_INVALID;
    *out = r;
    return ring_lock(r);
}

uint64_t shm_ring_header_size(void)
{
    return RING_HEADER;
}

int shm_ring_format(void *memory, uint64_t size, uint64_t max_items)
{
    struct ring *r = memory;
    if (memory == NULL || ((uintptr_t)memory & 63) || size < RING_HEADER + 64)
        return SHM_ERR_INVALID;
    memset(r, 0, RING_HEADER);
    r->capacity = (size - RING_HEADER) & ~(uint64_t)7;
    r->max_items = max_items;

    int rc = shm_robust_mutex_init(&r->lock);
    if (rc != SHM_OK)
        return rc;
    r->magic = RING_MAGIC;
    return SHM_OK;
}

static uint64_t overflow_unclaimed(const struct ring *r)
{
    return r->overflow_sent - r->overflow_claimed;
}

/* Items a get may take now: the ring's, and those the keeper has received. */
static uint64_t available(const struct ring *r)
{
    return r->items + r->overflow_arrived - r->overflow_claimed;
}

int shm_ring_put(void *memory, const void *records, uint64_t size, uint64_t count,
                 uint64_t wait_ns, int *overflow_out)
{
    struct ring *r = checked(memory);
    if (r == NULL || count == 0 || (size & 7))
        return SHM_ERR_INVALID;
    struct timespec deadline = deadline_after(wait_ns);
    for (;;) {
        int rc = ring_enter(r);
        if (rc != SHM_OK)
            return rc;
        uint64_t held = r->items + overflow_unclaimed(r);
        if (r->max_items == 0 || held + count <= r->max_items) {
            int overflow = overflow_unclaimed(r) > 0 || size > r->capacity - (r->tail - r->head);
            if (overflow) {
                r->overflow_sent += count;
            } else {
                ring_write(r, r->tail, records, size);
                r->tail += size;
                r->items += count;
            }
            r->unfinished += count;
            if (!overflow)
                wake(r, &r->put_seq);
            pthread_mutex_unlock(&r->lock);
            *overflow_out = overflow;
            return SHM_OK;
        }
        if (!sleep_on(r, &r->get_seq, &deadline))
            return SHM_ERR_FULL;
    }
}

int shm_ring_get(void *memory, void *out, uint64_t out_size, uint64_t count,
                 uint64_t wait_ns, uint64_t *size_out, uint64_t *overflow_out)
{
    struct ring *r = checked(memory);
    if (r == NULL || count == 0)
        return SHM_ERR_INVALID;
    struct timespec deadline = deadline_after(wait_ns);
    for (;;) {
        int rc = ring_enter(r);
        if (rc != SHM_OK)
            return rc;
        if (available(r) >= count) {
            uint64_t from_ring = count < r->items ? count : r->items, size = 0;
            for (uint64_t i = 0; i < from_ring; i++)
                size += padded(8 + record_length(r, r->head + size));
            *size_out = size;
            if (size > out_size) {
                pthread_mutex_unlock(&r->lock);
                return SHM_ERR_BUFFER;
            }
            ring_read(r, r->head, out, size);
            r->head += size;
            r->items -= from_ring;
            r->overflow_claimed += count - from_ring;
            *overflow_out = count - from_ring;
            wake(r, &r->get_seq);
            pthread_mutex_unlock(&r->lock);
            return SHM_OK;
        }
        if (!sleep_on(r, &r->put_seq, &deadline))
            return SHM_ERR_EMPTY;
    }
}

int shm_ring_wait(void *memory, int for_room, uint64_t wait_ns)
{
    struct ring *r = checked(memory);
    if (r == NULL)
        return SHM_ERR_INVALID;
    struct timespec deadline = deadline_after(wait_ns);
    for (;;) {
        int rc = ring_enter(r);
        if (rc != SHM_OK)
            return rc;
        int ready = for_room
            ? r->max_items == 0 || r->items + overflow_unclaimed(r) < r->max_items
            : available(r) > 0;
        if (ready) {
            pthread_mutex_unlock(&r->lock);
            return SHM_OK;
        }
        if (!sleep_on(r, for_room ? &r->get_seq : &r->put_seq, &deadline))
            return for_room ? SHM_ERR_FULL : SHM_ERR_EMPTY;
    }
}

int shm_ring_arrived(void *memory, uint64_t count)
{
    struct ring *r;
    int rc = ring_locked(memory, &r);
    if (rc != SHM_OK)
        return rc;
    r->overflow_arrived += count;
    wake(r, &r->put_seq);
    pthread_mutex_unlock(&r->lock);
    return SHM_OK;
}

int shm_ring_task_done(void *memory, uint64_t count)
{
    struct ring *r;
    int rc = ring_locked(memory, &r);
    if (rc != SHM_OK)
        return rc;
    if (count > r->unfinished) {
        pthread_mutex_unlock(&r->lock);
        return SHM_ERR_INVALID;
    }
    r->unfinished -= count;
    if (r->unfinished == 0)
        wake(r, &r->done_seq);
    pthread_mutex_unlock(&r->lock);
    return SHM_OK;
}

int shm_ring_join(void *memory, uint64_t wait_ns)
{
    struct ring *r = checked(memory);
    if (r == NULL)
        return SHM_ERR_INVALID;
    struct timespec deadline = deadline_after(wait_ns);
    for (;;) {
        int rc = ring_lock(r);
        if (rc != SHM_OK)
            return rc;
        if (r->unfinished == 0 || r->closed) {
            rc = r->closed ? SHM_ERR_CLOSED : SHM_OK;
            pthread_mutex_unlock(&r->lock);
            return rc;
        }
        if (!sleep_on(r, &r->done_seq, &deadline))
            return SHM_ERR_EMPTY;
    }
}

int shm_ring_close(void *memory)
{
    struct ring *r;
    int rc = ring_locked(memory, &r);
    if (rc != SHM_OK)
        return rc;
    r->closed = 1;
    wake(r, &r->put_seq);
    wake(r, &r->get_seq);
    wake(r, &r->done_seq);
    pthread_mutex_unlock(&r->lock);
    return SHM_OK;
}

int shm_ring_counts(void *memory, uint64_t *items_out, uint64_t *unfinished_out)
{
    struct ring *r;
    int rc = ring_locked(memory, &r);
    if (rc != SHM_OK)
        return rc;
    *items_out = available(r);
    *unfinished_out = r->unfinished;
    int closed = r->closed;
    pthread_mutex_unlock(&r->lock);
    return closed ? SHM_ERR_CLOSED : SHM_OK;
}

int shm_ring_debug_lock(void *memory, int64_t skew)
{
    struct ring *r;
    int rc = ring_locked(memory, &r);
    if (rc == SHM_OK)
        r->items += (uint64_t)skew;
    return rc;
}
