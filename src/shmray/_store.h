/*
 * shmray's object store: one shared-memory arena per session, mapped by every
 * process of the session (driver, scheduler, workers, actors).
 *
 * Arena byte layout (all positions are offsets from the arena base; nothing
 * in shared memory is a pointer, because each process maps the arena at its
 * own address):
 *
 *   0                 struct shm_header (4096 bytes, one page)
 *                       magic, version, capacity, table and heap geometry,
 *                       the robust process-shared mutex, allocator state,
 *                       counters
 *   table_offset      struct shm_entry[table_slots]: the object table,
 *                       open addressing with linear probing, keyed by
 *                       SHM_ID_SIZE-byte ObjectIDs; deletion by backward
 *                       shift (Knuth 6.4 Algorithm R), so there are no
 *                       tombstones and a lookup stops at the first EMPTY slot
 *   pins_offset       struct shm_pin[table_slots]: the pin table, which
 *                       process holds how many pins on which object, keyed
 *                       by (ObjectID, pid) the same way, so that a dead
 *                       process's pins are given back (shm_reap)
 *   heap_offset       the heap: a chain of blocks, each a 64-byte
 *                       struct shm_block followed by its payload; block sizes
 *                       are multiples of SHM_ALIGN, so every payload is
 *                       64-byte aligned
 *   heap_offset+heap_size == capacity
 *
 * Allocation is address-ordered first fit over one free list kept in address
 * order, with immediate coalescing of physical neighbours.  Address order
 * makes a steady-state workload reuse the same low pages, which are already
 * faulted in: on this class of machine a first touch costs 7-10x a warm copy.
 * Memory lent to a process's numpy buffers (_lend.c), which can't move, is
 * taken by last fit from the end of a free block instead, at the top of the
 * heap, so it doesn't cut the objects' end of it into pieces.
 *
 * Crash safety.  Every operation runs under one robust mutex.  If a process
 * dies holding it, the next locker gets EOWNERDEAD and repairs the arena
 * before marking the mutex consistent.  Repair trusts only two things:
 *   1. the chain of block sizes, walked forward from heap_offset; every
 *      change to a block's `size` is a single aligned 8-byte store, made only
 *      after the header of any block it exposes has been written;
 *   2. the object table entries whose state is not EMPTY.
 * Everything else (free flags, free list, prev_size, counters, the table's
 * probe order) is derived, and repair recomputes it: the table is rebuilt from
 * its valid entries, a block is in use iff exactly one entry points at its
 * payload, every other block is free, adjacent free blocks are merged.
 *
 * Status codes: every function returns SHM_OK or one SHM_ERR_*; Python maps
 * them to exceptions in one place (shmray._object_store).
 */
#ifndef SHMRAY_STORE_H
#define SHMRAY_STORE_H

#include <stddef.h>
#include <stdint.h>

/* The part between the cdef markers is read verbatim by _store_build.py as
 * cffi's cdef, so every declaration below exists exactly once.  Keep it to
 * what cffi's parser accepts: integer #defines, typedefs, structs,
 * prototypes. */
/* cdef-begin */
#define SHM_ID_SIZE 28
#define SHM_ALIGN 64
#define SHM_VERSION 3

/* status codes */
#define SHM_OK 0
#define SHM_ERR_EXISTS 1         /* an object with this id is already stored */
#define SHM_ERR_NOT_FOUND 2      /* no object with this id */
#define SHM_ERR_FULL 3           /* no free block large enough */
#define SHM_ERR_TABLE_FULL 4     /* the object table is at its load limit */
#define SHM_ERR_NOT_SEALED 5     /* the object is still being written */
#define SHM_ERR_SEALED 6         /* seal/abort of an object already sealed */
#define SHM_ERR_PINNED 7         /* the object is in use (pinned) */
#define SHM_ERR_INVALID 8        /* a bad argument: size, id, state */
#define SHM_ERR_TOO_LARGE 9      /* larger than the whole heap */
#define SHM_ERR_CORRUPT 10       /* bad magic or version, or check() failed */
#define SHM_ERR_SYSTEM 11        /* a system call failed; errno says why */
#define SHM_ERR_SPILLED 12       /* the object lives in a spill file */
#define SHM_ERR_EMPTY 13         /* ring: nothing to get (within the wait) */
#define SHM_ERR_CLOSED 14        /* ring: shut down */
#define SHM_ERR_BUFFER 15        /* ring: the caller's buffer is too small (size_out says
                                    how large it must be; nothing was taken) */

/* object states */
#define SHM_STATE_EMPTY 0
#define SHM_STATE_CREATED 1      /* allocated, being written by its creator */
#define SHM_STATE_SEALED 2       /* immutable, readable */
#define SHM_STATE_SPILLED 3      /* no block; its bytes are in a spill file */

/* entry flags */
#define SHM_FLAG_DELETE_PENDING 1  /* deleted while pinned: freed at last release */
#define SHM_FLAG_SPILLING 2        /* being written to a spill file */
#define SHM_FLAG_RESTORING 4       /* CREATED from a spill file */
#define SHM_FLAG_LENT 8            /* one pin is its creator's buffer (shm_adopt) */
#define SHM_FLAG_HAS_FILE 16       /* its spill file exists (kept after a restore: the
                                      bytes never change, so a later spill reuses it) */

/* shm_delete() outcomes (a bit set) */
#define SHM_DELETED_NOW 1        /* the entry and its block are gone */
#define SHM_DELETE_DEFERRED 2    /* pinned: freed when the last pin goes */
#define SHM_DELETED_SPILLED 4    /* the object was spilled: its file is the caller's to remove */

/* test hooks for shm_debug_crash_at(): the calling process SIGKILLs itself at
 * this point of its next allocation or free, while holding the lock */
#define SHM_CRASH_NONE 0
#define SHM_CRASH_AFTER_SPLIT 1    /* block split done, free list and table not */
#define SHM_CRASH_AFTER_ENTRY 2    /* table entry written, free list not updated */
#define SHM_CRASH_IN_COALESCE 3    /* half-way through merging free neighbours */
#define SHM_CRASH_PIN_UNRECORDED 4 /* a get's pin counted, its holder not yet */
#define SHM_CRASH_IN_PIN_SHIFT 5   /* a pin slot moved up, its old slot not cleared */

typedef struct shm_store shm_store;   /* per-process handle, opaque */

typedef struct {
    uint64_t capacity;          /* bytes mapped */
    uint64_t heap_size;         /* bytes available to blocks (headers included) */
    uint64_t bytes_in_use;      /* sum of used block sizes, headers included */
    uint64_t bytes_free;        /* heap_size - bytes_in_use */
    uint64_t largest_free;      /* payload bytes of the largest free block */
    uint64_t num_objects;       /* entries in any state but EMPTY */
    uint64_t num_created;
    uint64_t num_sealed;
    uint64_t num_spilled;
    uint64_t num_pinned;        /* entries with pin_count > 0 */
    uint64_t num_pin_holders;   /* (process, object) pairs with pins */
    uint64_t untracked_pins;    /* pins taken while the pin table was full:
                                   freed with the session, not with their process */
    uint64_t free_blocks;
    uint64_t table_slots;
    uint64_t repairs;           /* times a dead lock holder was recovered from */
} shm_stats;

typedef struct {
    uint8_t id[SHM_ID_SIZE];
    uint32_t state;
    uint32_t flags;
    uint32_t pin_count;
    int32_t creator_pid;
    uint64_t offset;            /* payload offset from the arena base, 0 when spilled */
    uint64_t data_size;
    uint64_t metadata_size;
    uint64_t last_access;       /* logical clock: larger is more recent */
} shm_object_info;

/* --- the arena's memory: create, map, unmap ------------------------------ */

/* A new anonymous shared-memory file of `size` bytes: memfd_create, else
 * shm_open + immediate shm_unlink, so no name is ever left in /dev/shm.
 * Close it with close(2) once every process that needs it has mapped it. */
int shm_arena_create(uint64_t size, int *fd_out);
int shm_arena_map(int fd, uint64_t size, void **base_out);
int shm_arena_unmap(void *base, uint64_t size);

/* --- the store ----------------------------------------------------------- */

/* Smallest arena shm_store_format accepts. */
uint64_t shm_min_capacity(void);
/* Write a fresh, empty store over `size` bytes of zeroed memory at base (the
 * memory must be zero: only the header and the heap's first block are written). */
int shm_store_format(void *base, uint64_t size);
/* A handle on a formatted arena mapped at base (checks magic and version).
 * Handles are per process; after fork() a child may keep using its parent's. */
int shm_store_open(void *base, uint64_t size, shm_store **out);
void shm_store_close(shm_store *s);
/* The arena base this handle maps, for turning offsets into addresses. */
void *shm_store_base(shm_store *s);

/* Reserve data_size + metadata_size bytes for a new object (state CREATED,
 * not pinned, creator_pid = getpid()).  Data comes first, metadata right
 * after it, at *offset_out + data_size.  Zero total size is allowed. */
int shm_create(shm_store *s, const uint8_t *id, uint64_t data_size,
               uint64_t metadata_size, uint64_t *offset_out);
/* CREATED -> SEALED: the bytes are final.  SHM_ERR_SEALED if already sealed. */
int shm_seal(shm_store *s, const uint8_t *id);
/* Drop a CREATED object and its block.  SHM_ERR_SEALED if it is sealed (or
 * spilled).  An unfinished restore goes back to SPILLED instead: its spill
 * file still holds the bytes. */
int shm_abort(shm_store *s, const uint8_t *id);
/* Pin a SEALED object and tell where it is.  SHM_ERR_NOT_SEALED while
 * CREATED, SHM_ERR_SPILLED when spilled (nothing pinned in either case).
 * An object deleted while pinned (DELETE_PENDING) is NOT_FOUND to shm_get,
 * shm_contains and shm_spill_begin; shm_info and shm_list still show it. */
int shm_get(shm_store *s, const uint8_t *id, uint64_t *offset_out,
            uint64_t *data_size_out, uint64_t *metadata_size_out);
/* Unpin one of this process's pins.  If that was the last pin of a
 * DELETE_PENDING object it is freed and *freed_out is 1.  SHM_ERR_INVALID if
 * this process holds no pin on it (a forked child's views are its parent's). */
int shm_release(shm_store *s, const uint8_t *id, int *freed_out);
/* Delete an object in any state.  Unpinned: freed now.  Pinned: marked
 * DELETE_PENDING, freed at its last release.  *outcome_out gets SHM_DELETED_*
 * bits (SHM_DELETED_SPILLED also for an unfinished restore). */
int shm_delete(shm_store *s, const uint8_t *id, int *outcome_out);
/* SHM_OK and the state if present, SHM_ERR_NOT_FOUND otherwise. */
int shm_contains(shm_store *s, const uint8_t *id, uint32_t *state_out);
int shm_info(shm_store *s, const uint8_t *id, shm_object_info *out);
int shm_statistics(shm_store *s, shm_stats *out);
/* Up to `max` entries (any state but EMPTY) into out; *count_out gets how
 * many were written, *total_out how many exist. */
int shm_list(shm_store *s, shm_object_info *out, uint64_t max,
             uint64_t *count_out, uint64_t *total_out);
/* The same a part at a time: up to `max` entries from table slot *cursor on,
 * scanning at most SHM_LIST_BATCH slots, so a listing of a large table holds
 * the lock a short while at a time (others' puts and gets go on between).
 * *cursor moves past the slots scanned, and is 0 once the table is done.  An
 * object made or freed meanwhile may or may not be listed. */
#define SHM_LIST_BATCH 16384
int shm_list_batch(shm_store *s, uint64_t *cursor, shm_object_info *out,
                   uint64_t max, uint64_t *count_out);

/* --- spilling: the policy lives in Python, these keep it race-free ------- */

/* SEALED, unpinned, not DELETE_PENDING -> pinned once, flag SPILLING; the
 * caller then copies the bytes out.  SHM_ERR_PINNED if in use. */
int shm_spill_begin(shm_store *s, const uint8_t *id, uint64_t *offset_out,
                    uint64_t *data_size_out, uint64_t *metadata_size_out);
/* Finish a spill: if ours is the only pin, free the block and mark SPILLED
 * (SHM_OK).  If someone pinned it meanwhile, undo (SHM_ERR_PINNED); if it
 * was deleted meanwhile, free it (SHM_ERR_NOT_FOUND).  In both error cases
 * the spill file is the caller's to remove. */
int shm_spill_finish(shm_store *s, const uint8_t *id);
/* Undo shm_spill_begin when the bytes could not be written out: the spill's
 * pin goes, the object stays in memory (or, if it was deleted meanwhile and
 * that was its last pin, it is freed now).  SHM_OK also when there is no
 * spill to undo because a repair cancelled it. */
int shm_spill_cancel(shm_store *s, const uint8_t *id);
/* SPILLED -> CREATED with flag RESTORING and a fresh block of the recorded
 * sizes; the caller fills it from the file and calls shm_seal.
 * SHM_ERR_FULL when no block fits (spill something else and retry);
 * SHM_ERR_NOT_SEALED while another restore is under way; SHM_ERR_INVALID if
 * the object is not spilled (restored already). */
int shm_restore_begin(shm_store *s, const uint8_t *id, uint64_t *offset_out);

/* --- lending: a process's own large buffers in the arena ----------------- */

/* shm_create for memory lent to a process's own buffers, which can be neither
 * spilled nor moved: only while at least keep_free heap bytes stay free
 * after it, and from the top of the heap, away from the objects that
 * shm_create packs at its bottom. */
int shm_create_within(shm_store *s, const uint8_t *id, uint64_t data_size,
                      uint64_t metadata_size, uint64_t keep_free, uint64_t *offset_out);
/* Turn a CREATED object of this process into the SEALED object `to`, with
 * new sizes that fit its block, pinned once by the buffer still using it
 * (flag LENT): its bytes become an object without being copied.
 * SHM_ERR_EXISTS if `to` is stored, SHM_ERR_INVALID if `from` is not this
 * process's CREATED object or the sizes don't fit. */
int shm_adopt(shm_store *s, const uint8_t *from, const uint8_t *to,
              uint64_t data_size, uint64_t metadata_size);
/* A lent buffer is freed: its CREATED object goes, or an adopted object
 * loses its buffer's pin (which shm_release won't take), and is freed if it
 * was deleted meanwhile.  SHM_ERR_INVALID unless `id` is this process's
 * CREATED or LENT object at payload `offset`. */
int shm_lent_return(shm_store *s, const uint8_t *id, uint64_t offset);

/* numpy's allocator (a PyDataMem_Handler, numpy >= 1.22) for this process:
 * buffers of `threshold` to `largest` bytes come from the arena, while this
 * process holds at most `most_lent` bytes of them and keep_free heap bytes
 * stay free; the rest come from `fallback`, the handler numpy had.  Returns
 * the handler to wrap in a "mem_handler" capsule.  Only the calling process
 * lends.  A child it forks gets private copies of the buffers it inherits,
 * made at fork (not on write), and allocates with fallback. */
void *shm_numpy_handler(shm_store *s, const void *fallback, uint64_t threshold,
                        uint64_t largest, uint64_t most_lent, uint64_t keep_free);
/* Bytes of this process's lent buffers that are neither adopted nor freed. */
uint64_t shm_lent_outstanding(void);
/* Lend no more buffers in this process (those lent stay until freed), and
 * mark those it holds as kept. */
void shm_lend_no_more(void);
/* Whether the lent buffer whose object's payload is at `offset` is kept by
 * its process past its task (shm_lend_no_more): room no one should wait for. */
int shm_lent_kept(shm_store *s, uint64_t offset);
/* Bytes from the start of the object to `data`, if `data` starts a buffer
 * lent to this process and not yet adopted; 0 otherwise. */
uint64_t shm_lent_prefix(const void *data);
/* Make the array data at `data` (n bytes, a buffer lent to this process)
 * the sealed object `id` without copying: the object starts with `header`,
 * shm_lent_prefix(data) bytes in front of the data (which the header must
 * say), and `metadata` follows the data; the array's buffer keeps a pin
 * until numpy frees it.  SHM_ERR_INVALID when `data` is not such a buffer
 * or header or metadata don't fit: store a copy instead. */
int shm_lent_adopt(shm_store *s, const void *data, uint64_t n, const uint8_t *id,
                   const uint8_t *header, uint64_t header_size,
                   const uint8_t *metadata, uint64_t metadata_size);
#define SHM_LEND_HEADER_MAX 4000
#define SHM_LEND_METADATA_MAX 64

/* After a process died: drop every pin it held (the views it had, its
 * adopted buffers'), cancel the spills it had begun, abort the CREATED
 * objects it created and return its unfinished restores to SPILLED; objects
 * deleted meanwhile whose last pin that was are freed.  *count_out gets how
 * many were undone. */
int shm_reap(shm_store *s, int32_t pid, uint64_t *count_out);

/* Walk the whole arena and verify every invariant (block chain covers the
 * heap exactly, sizes aligned, free list sorted and complete, no two adjacent
 * free blocks, each entry findable from its probe start and pointing at the
 * payload of its own used block, counters match).  SHM_ERR_CORRUPT with a
 * description in msg on the first violation. */
int shm_check(shm_store *s, char *msg, size_t msg_size);

/* --- copying ------------------------------------------------------------- */

/* memcpy that splits large copies across up to `threads` threads.  Called
 * with the GIL released (cffi API mode), so Python threads keep running. */
void shm_copy(void *dst, const void *src, uint64_t n, int threads);

/* --- queues: a ring of byte records in shared memory (_ring.c) ------------ */

/* Bytes of a ring's own header; the rest of its memory holds records. */
uint64_t shm_ring_header_size(void);
/* Make a ring of `size` bytes at 64-byte aligned memory (zeroed or not) that
 * holds at most max_items items (0: no limit but its bytes). */
int shm_ring_format(void *ring, uint64_t size, uint64_t max_items);
/* Add `count` records, framed by the caller in `records` (`size` bytes, a
 * multiple of 8: each a u64 length, its bytes, padding to 8).  Waits up to
 * wait_ns while the queue holds max_items; SHM_ERR_FULL if still no room.
 * *overflow_out is 1 if the ring had no room for the bytes: the caller must
 * then hand the records to the keeper, which calls shm_ring_arrived. */
int shm_ring_put(void *ring, const void *records, uint64_t size, uint64_t count,
                 uint64_t wait_ns, int *overflow_out);
/* Take `count` items, all or none, waiting up to wait_ns (SHM_ERR_EMPTY).
 * The ring's records are copied to out; the *overflow_out items after them
 * are the caller's to fetch from the keeper.  SHM_ERR_BUFFER if out_size is
 * too small for the records (*size_out says what is needed). */
int shm_ring_get(void *ring, void *out, uint64_t out_size, uint64_t count,
                 uint64_t wait_ns, uint64_t *size_out, uint64_t *overflow_out);
/* Wait up to wait_ns, taking nothing, until the queue has an item (or, with
 * for_room, room for one more): SHM_OK, else SHM_ERR_EMPTY (SHM_ERR_FULL).  A
 * waiter that gives up loses nothing, which is what asyncio's cancellation
 * needs; the caller then takes or puts without waiting. */
int shm_ring_wait(void *ring, int for_room, uint64_t wait_ns);
/* The keeper has received `count` overflowed items: gets may claim them. */
int shm_ring_arrived(void *ring, uint64_t count);
/* `count` items taken earlier are processed (JoinableQueue.task_done);
 * SHM_ERR_INVALID if that is more than were put. */
int shm_ring_task_done(void *ring, uint64_t count);
/* Wait up to wait_ns until every item put is processed (SHM_ERR_EMPTY if not). */
int shm_ring_join(void *ring, uint64_t wait_ns);
/* Shut the ring: every call from now on, and every waiter, gets SHM_ERR_CLOSED. */
int shm_ring_close(void *ring);
/* How many items the queue holds, and how many are not yet processed. */
int shm_ring_counts(void *ring, uint64_t *items_out, uint64_t *unfinished_out);

/* --- test hooks (used by the test suite only) ---------------------------- */

/* Take the store lock and return without releasing it. */
int shm_debug_lock(shm_store *s);
/* Take a ring's lock and return without releasing it, after adding `skew` to
 * its item count (as a process that died half-way through a put leaves it). */
int shm_ring_debug_lock(void *ring, int64_t skew);
/* Arm a crash point for this process's next allocation or free. */
void shm_debug_crash_at(int point);
/* cdef-end */

/* For the C files of the store only (not cffi's: it has no pthread types). */
#include <pthread.h>
/* A mutex processes share that survives its holder's death (EOWNERDEAD to the
 * next locker): every lock in shared memory is one. */
int shm_robust_mutex_init(pthread_mutex_t *mutex);

#endif /* SHMRAY_STORE_H */
