/*
 * shmray's object store.  _store.h describes the arena, the allocator policy,
 * the crash-safety design and the meaning of every public function; this file
 * follows it.
 *
 * Reading order: the three shared structs and their byte layouts, the object
 * table, the heap (free list, blocks, reserve/commit/release), object
 * lifecycle, the lock and repair, the public functions, check(), copy, and the
 * test hooks.
 *
 * Conventions:
 *   - Shared memory holds offsets from the arena base, never pointers.  Offset
 *     0 is the header, so 0 also means "none" in the free list.
 *   - Each public function checks its arguments, takes the lock, calls one
 *     static function that does the work and returns a status, and unlocks.
 *     Only bookkeeping runs under the lock; object bytes are copied unlocked.
 *   - A process may die between any two of its stores.  The stores repair
 *     trusts (a block's size, an entry's state, an entry's flags and pins) go
 *     through publish_*(): each is one aligned store that cannot be torn, and
 *     it is ordered after every store before it.
 */
#define _GNU_SOURCE
#include "_store.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdalign.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SHM_MAGIC UINT64_C(0x31305941524d4853) /* "SHMRAY01" as a little-endian u64 */
#define HEADER_SIZE 4096
#define BLOCK_HEADER_SIZE 64
#define MIN_BLOCK_SIZE (BLOCK_HEADER_SIZE + SHM_ALIGN)
#define PAGE_SIZE_ASSUMED 4096

/* One table slot per 8 KiB of arena: objects that live in the arena are
 * large (small values travel inline in messages), so a full heap holds far
 * fewer objects than slots. */
#define BYTES_PER_SLOT (8 * 1024)
#define MIN_TABLE_SLOTS 1024
#define MAX_TABLE_SLOTS (UINT64_C(1) << 22)
#define MIN_HEAP_BLOCKS 16

#define KNOWN_FLAGS \
    (SHM_FLAG_DELETE_PENDING | SHM_FLAG_SPILLING | SHM_FLAG_RESTORING | SHM_FLAG_LENT | SHM_FLAG_HAS_FILE)
#define HOLDERS_OFFSET 1024
#define HOLDER_BUCKETS 256
#define TABLE_MAP_OFFSET 2048
#define TABLE_MAP_BITS 8192

/* --- layout ---------------------------------------------------------------- */

/*
 * The arena header, at offset 0.  Byte layout:
 *
 *      0  magic         SHM_MAGIC, stored last by format
 *      8  version       SHM_VERSION (u32), then 4 zero bytes
 *     16  capacity      arena bytes the store uses, a multiple of SHM_ALIGN
 *     24  table_offset  == HEADER_SIZE
 *     32  table_slots   a power of two
 *     40  heap_offset   page aligned, just past the table
 *     48  heap_size     heap_offset + heap_size == capacity
 *     56  free_head     lowest free block, 0 when none           (derived)
 *     64  clock         logical clock behind entries' last_access
 *     72  repairs       times a dead lock holder was recovered from
 *     80  bytes_in_use  sum of used block sizes                  (derived)
 *     88  free_blocks                                            (derived)
 *     96  num_objects   entries not EMPTY                        (derived)
 *    104  num_created                                            (derived)
 *    112  num_sealed                                             (derived)
 *    120  num_spilled                                            (derived)
 *    128  num_pinned    entries with pin_count > 0               (derived)
 *    136  pin_slots     slots of the pin table, == table_slots
 *    144  pins_offset   table_offset + table_slots * 80
 *    152  num_pins      pin table slots in use                   (derived)
 *    160  untracked     the entries' untracked pins, summed       (derived)
 *    168  zero
 *    192  lock          pthread_mutex_t, robust and process-shared
 *   1024  holders       u32[256]: pin table slots of the pids in each
 *                       bucket (pid % 256), so that reaping a process
 *                       that held no pins (most) skips the scan   (derived)
 *   2048  table_map     u64[128]: a bit per 1/8192 of the table, set once
 *                       an entry was ever put there.  A listing skips the
 *                       parts never used: reading them would make the
 *                       kernel give the table memory it never needed (a
 *                       memfd's holes are filled when read).  Repair sets
 *                       every bit.
 *         zero up to 4096
 *
 * "Derived" fields are recomputed by repair; nothing else about them is
 * trusted after a crash.
 */
struct shm_header {
    uint64_t magic;
    uint32_t version;
    uint32_t reserved0;
    uint64_t capacity;
    uint64_t table_offset;
    uint64_t table_slots;
    uint64_t heap_offset;
    uint64_t heap_size;
    uint64_t free_head;
    uint64_t clock;
    uint64_t repairs;
    uint64_t bytes_in_use;
    uint64_t free_blocks;
    uint64_t num_objects;
    uint64_t num_created;
    uint64_t num_sealed;
    uint64_t num_spilled;
    uint64_t num_pinned;
    uint64_t pin_slots;
    uint64_t pins_offset;
    uint64_t num_pins;
    uint64_t untracked;
    /* Its own cache line: every locker writes it, the geometry above is only read. */
    alignas(64) pthread_mutex_t lock;
    uint8_t reserved1[HOLDERS_OFFSET - 192 - sizeof(pthread_mutex_t)];
    uint32_t holders[HOLDER_BUCKETS];
    uint64_t table_map[TABLE_MAP_BITS / 64];
    uint8_t reserved2[HEADER_SIZE - TABLE_MAP_OFFSET - TABLE_MAP_BITS / 8];
};
_Static_assert(sizeof(struct shm_header) == HEADER_SIZE, "header is one page");
_Static_assert(offsetof(struct shm_header, capacity) == 16, "layout as documented");
_Static_assert(offsetof(struct shm_header, free_head) == 56, "layout as documented");
_Static_assert(offsetof(struct shm_header, num_pinned) == 128, "layout as documented");
_Static_assert(offsetof(struct shm_header, untracked) == 160, "layout as documented");
_Static_assert(offsetof(struct shm_header, lock) == 192, "layout as documented");
_Static_assert(offsetof(struct shm_header, holders) == HOLDERS_OFFSET, "layout as documented");
_Static_assert(offsetof(struct shm_header, table_map) == TABLE_MAP_OFFSET, "layout as documented");

/*
 * One slot of the object table.  Byte layout (80 bytes):
 *
 *      0  id             SHM_ID_SIZE bytes
 *     28  state          SHM_STATE_*; EMPTY marks a free slot
 *     32  flags          SHM_FLAG_*     } one aligned 8-byte word, flags_pins,
 *     36  pin_count                     } so a spill takes its pin and its
 *                                         flag in one store
 *     40  creator_pid
 *     44  untracked      of its pins, those in no pin table slot (taken while
 *                        the pin table was full, or cut short by a crash):
 *                        any process may give one back
 *     48  offset         payload offset from the arena base; 0 when SPILLED
 *     56  data_size
 *     64  metadata_size
 *     72  last_access    value of the header's clock at the last create/get
 *
 * The state is stored last when an entry is written, and first (as EMPTY)
 * when a slot is overwritten, so repair never sees a half-written entry.
 */
struct shm_entry {
    uint8_t id[SHM_ID_SIZE];
    uint32_t state;
    union {
        struct {
            uint32_t flags;
            uint32_t pin_count;
        };
        uint64_t flags_pins;
    };
    int32_t creator_pid;
    uint32_t untracked;
    uint64_t offset;
    uint64_t data_size;
    uint64_t metadata_size;
    uint64_t last_access;
};
_Static_assert(sizeof(struct shm_entry) == 80, "entry layout as documented");
_Static_assert(offsetof(struct shm_entry, state) == 28, "layout as documented");
_Static_assert(offsetof(struct shm_entry, flags_pins) == 32, "flags_pins is one aligned word");
_Static_assert(offsetof(struct shm_entry, pin_count) == 36, "layout as documented");
_Static_assert(offsetof(struct shm_entry, offset) == 48, "layout as documented");
_Static_assert(offsetof(struct shm_entry, last_access) == 72, "layout as documented");

/*
 * The header of a heap block; the payload follows it.  Byte layout (64 bytes):
 *
 *      0  size       whole block, header included: a multiple of SHM_ALIGN,
 *                    at least MIN_BLOCK_SIZE.  The one field repair trusts.
 *      8  prev_size  size of the physically previous block, 0 for the first
 *     16  is_free    1 or 0
 *     24  next_free  next free block in address order, 0 at the end
 *     32  prev_free  previous free block, 0 at the start
 *     40  zero
 *
 * Every field but size is derived.
 */
struct shm_block {
    uint64_t size;
    uint64_t prev_size;
    uint64_t is_free;
    uint64_t next_free;
    uint64_t prev_free;
    uint8_t reserved[24];
};
_Static_assert(sizeof(struct shm_block) == BLOCK_HEADER_SIZE, "a block header is one alignment unit");
_Static_assert(BLOCK_HEADER_SIZE % SHM_ALIGN == 0, "payloads stay aligned");
_Static_assert(HEADER_SIZE % SHM_ALIGN == 0, "the table starts aligned");

/*
 * One slot of the pin table: how many pins one process holds on one sealed
 * object, so that a process's death gives back exactly its own pins
 * (shm_reap) and nobody else's.  Open addressing keyed by (id, pid), linear
 * probing, deletion by backward shift, like the object table.  Byte layout
 * (48 bytes):
 *
 *      0  id        SHM_ID_SIZE bytes
 *     28  pid       the process; 0 marks a free slot.  Stored last when a
 *                   slot is written, first (as 0) when it is overwritten
 *     32  count     pins it holds, >= 1
 *     36  spilling  1 if one of them is its spill's (SHM_FLAG_SPILLING)
 *     40  zero
 *
 * An entry's pin_count is its LENT buffer's pin, plus the counts of its pin
 * table slots, plus its `untracked` pins.  A pin is added to the entry before
 * its slot and taken from its slot before the entry, so a crash in between
 * can only leave a pin nobody is known to hold (repair counts it untracked):
 * memory kept, never freed under a view.
 */
struct shm_pin {
    uint8_t id[SHM_ID_SIZE];
    int32_t pid;
    uint32_t count;
    uint32_t spilling;
    uint64_t reserved;
};
_Static_assert(sizeof(struct shm_pin) == 48, "pin layout as documented");
_Static_assert(offsetof(struct shm_pin, pid) == 28, "layout as documented");
_Static_assert(offsetof(struct shm_pin, count) == 32, "layout as documented");

/* The per-process handle: where this process mapped the arena, and the
 * geometry validated once at open, so the hot paths need not re-read and
 * re-check it in shared memory.  No pid is cached: a forked child keeps using
 * its parent's handle. */
struct shm_store {
    uint8_t *base;
    uint64_t size;
    struct shm_header *header;
    struct shm_entry *table;
    uint64_t slot_mask;
    struct shm_pin *pins;
    uint64_t pin_mask;
    uint64_t heap_start;
    uint64_t heap_end;
};

/* --- small helpers ----------------------------------------------------------- */

static uint64_t align_up(uint64_t n, uint64_t a)
{
    return (n + a - 1) & ~(a - 1);
}

static void publish_u64(uint64_t *field, uint64_t value)
{
    __atomic_store_n(field, value, __ATOMIC_RELEASE);
}

static void publish_u32(uint32_t *field, uint32_t value)
{
    __atomic_store_n(field, value, __ATOMIC_RELEASE);
}

static void publish_pid(int32_t *field, int32_t value)
{
    __atomic_store_n(field, value, __ATOMIC_RELEASE);
}

/* Keeps the compiler from moving later stores above earlier ones.  That is
 * all a crash needs: the stores of a killed process all land, in program
 * order as the CPU retired them, before another process can take the lock. */
static void crash_order_barrier(void)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* The test hook of shm_debug_crash_at: the only mutable global state. */
static int crash_point_armed = SHM_CRASH_NONE;

static void crash_point_reached(int point)
{
    if (crash_point_armed == point)
        raise(SIGKILL);
}

/* getpid(), cached: a system call less on every get and release.  The cache is
 * dropped in a forked child (pthread_atfork), which has a pid of its own. */
static int32_t cached_pid;

static void forget_pid(void)
{
    cached_pid = 0;
}

static void register_forget_pid(void)
{
    pthread_atfork(NULL, NULL, forget_pid);
}

static int32_t current_pid(void)
{
    if (!cached_pid) {
        static pthread_once_t once = PTHREAD_ONCE_INIT;
        pthread_once(&once, register_forget_pid);
        cached_pid = (int32_t)getpid();
    }
    return cached_pid;
}

/* The size of the block that holds `payload` bytes; empty objects still own
 * one minimal block, so every stored object owns exactly one. */
static uint64_t block_size_for(uint64_t payload)
{
    return align_up(payload ? payload : 1, SHM_ALIGN) + BLOCK_HEADER_SIZE;
}

/* --- the object table ---------------------------------------------------------- */

/* murmur3's 64-bit finaliser: every input bit flips each output bit with
 * probability close to 1/2. */
static uint64_t hash_mix(uint64_t x)
{
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x *= UINT64_C(0xc4ceb9fe1a85ec53);
    x ^= x >> 33;
    return x;
}

/* Ids are a per-process random prefix and a counter, so the counter bytes
 * near the end must reach the low bits that pick a slot: all four words go
 * through the mixer. */
static uint64_t id_hash(const uint8_t *id)
{
    uint64_t word[4] = {0};
    memcpy(word, id, SHM_ID_SIZE);
    uint64_t h = UINT64_C(0x9e3779b97f4a7c15);
    for (int i = 0; i < 4; i++)
        h = hash_mix(h ^ word[i]);
    return h;
}

static uint64_t table_home(const struct shm_store *s, const uint8_t *id)
{
    return id_hash(id) & s->slot_mask;
}

static struct shm_entry *table_find(const struct shm_store *s, const uint8_t *id)
{
    for (uint64_t i = table_home(s, id);; i = (i + 1) & s->slot_mask) {
        struct shm_entry *e = &s->table[i];
        if (e->state == SHM_STATE_EMPTY)
            return NULL;
        if (memcmp(e->id, id, SHM_ID_SIZE) == 0)
            return e;
    }
}

/* At most 3/4 full: probe sequences stay short and every one ends at an
 * EMPTY slot, which is what makes table_find terminate. */
static bool table_has_room(const struct shm_store *s)
{
    uint64_t slots = s->slot_mask + 1;
    return s->header->num_objects < slots - slots / 4;
}

/* The slot a new entry for id goes to; id is absent and the table has room. */
/* Slots of the table per bit of table_map. */
static uint64_t table_map_slots(const struct shm_store *s)
{
    return (s->slot_mask + TABLE_MAP_BITS) / TABLE_MAP_BITS;
}

static struct shm_entry *table_claim(const struct shm_store *s, const uint8_t *id)
{
    uint64_t i = table_home(s, id);
    while (s->table[i].state != SHM_STATE_EMPTY)
        i = (i + 1) & s->slot_mask;
    uint64_t part = i / table_map_slots(s);
    s->header->table_map[part / 64] |= UINT64_C(1) << (part % 64);
    return &s->table[i];
}

/* Whether any entry was ever put in the part of the table slot i is in. */
static bool table_part_used(const struct shm_store *s, uint64_t i)
{
    uint64_t part = i / table_map_slots(s);
    return s->header->table_map[part / 64] & (UINT64_C(1) << (part % 64));
}

/* Copy an entry into another slot.  While dst is being written it reads as
 * EMPTY, and src stays intact, so a crash leaves at worst the same entry in
 * two slots, which repair dedupes. */
static void entry_move(struct shm_entry *dst, const struct shm_entry *src)
{
    publish_u32(&dst->state, SHM_STATE_EMPTY);
    crash_order_barrier();
    struct shm_entry copy = *src;
    copy.state = SHM_STATE_EMPTY;
    *dst = copy;
    publish_u32(&dst->state, src->state);
}

/* Remove e by backward shift (Knuth 6.4, Algorithm R): later entries of the
 * same cluster move up into the hole unless that would put them before their
 * home slot.  Pointers to other entries are stale afterwards. */
static void table_remove(const struct shm_store *s, struct shm_entry *e)
{
    uint64_t mask = s->slot_mask;
    uint64_t hole = (uint64_t)(e - s->table);
    for (uint64_t j = (hole + 1) & mask; s->table[j].state != SHM_STATE_EMPTY; j = (j + 1) & mask) {
        uint64_t home = table_home(s, s->table[j].id);
        /* The entry at j may fill the hole iff the hole lies on its probe
         * path, from its home up to j. */
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            entry_move(&s->table[hole], &s->table[j]);
            hole = j;
        }
    }
    publish_u32(&s->table[hole].state, SHM_STATE_EMPTY);
}

/* --- the pin table: who holds which pins ------------------------------------------ */

static uint64_t pin_home(const struct shm_store *s, const uint8_t *id, int32_t pid)
{
    return hash_mix(id_hash(id) ^ (uint32_t)pid) & s->pin_mask;
}

static struct shm_pin *pin_find(const struct shm_store *s, const uint8_t *id, int32_t pid)
{
    for (uint64_t i = pin_home(s, id, pid);; i = (i + 1) & s->pin_mask) {
        struct shm_pin *p = &s->pins[i];
        if (p->pid == 0)
            return NULL;
        if (p->pid == pid && memcmp(p->id, id, SHM_ID_SIZE) == 0)
            return p;
    }
}

/* At most 3/4 full, as the object table. */
static bool pins_have_room(const struct shm_store *s)
{
    uint64_t slots = s->pin_mask + 1;
    return s->header->num_pins < slots - slots / 4;
}

/* One more pin of pid's on id, its spill's if `spill`.  False if the table
 * has no room for a new slot: the pin is then nobody's in particular. */
static bool pin_add(const struct shm_store *s, const uint8_t *id, int32_t pid, bool spill)
{
    struct shm_pin *p = pin_find(s, id, pid);
    if (p) {
        p->count++;
        if (spill)
            p->spilling = 1;
        return true;
    }
    if (!pins_have_room(s))
        return false;
    uint64_t i = pin_home(s, id, pid);
    while (s->pins[i].pid != 0)
        i = (i + 1) & s->pin_mask;
    p = &s->pins[i];
    *p = (struct shm_pin){.count = 1, .spilling = spill};
    memcpy(p->id, id, SHM_ID_SIZE);
    s->header->num_pins++;
    s->header->holders[(uint32_t)pid % HOLDER_BUCKETS]++;
    publish_pid(&p->pid, pid);
    return true;
}

/* Copy a slot into another; as entry_move, a crash leaves at worst the same
 * slot twice, which repair dedupes. */
static void pin_move(struct shm_pin *dst, const struct shm_pin *src)
{
    publish_pid(&dst->pid, 0);
    crash_order_barrier();
    struct shm_pin copy = *src;
    copy.pid = 0;
    *dst = copy;
    publish_pid(&dst->pid, src->pid);
}

/* Remove a slot by backward shift (table_remove's Algorithm R). */
static void pin_remove(const struct shm_store *s, struct shm_pin *p)
{
    uint64_t mask = s->pin_mask;
    uint64_t hole = (uint64_t)(p - s->pins);
    s->header->holders[(uint32_t)p->pid % HOLDER_BUCKETS]--;
    for (uint64_t j = (hole + 1) & mask; s->pins[j].pid != 0; j = (j + 1) & mask) {
        uint64_t home = pin_home(s, s->pins[j].id, s->pins[j].pid);
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            pin_move(&s->pins[hole], &s->pins[j]);
            crash_point_reached(SHM_CRASH_IN_PIN_SHIFT);
            hole = j;
        }
    }
    publish_pid(&s->pins[hole].pid, 0);
    s->header->num_pins--;
}

/* One pin less of pid's on id (its spill's if `spill`); false if pid holds
 * no such pin. */
static bool pin_drop(const struct shm_store *s, const uint8_t *id, int32_t pid, bool spill)
{
    struct shm_pin *p = pin_find(s, id, pid);
    if (!p || (spill && !p->spilling))
        return false;
    if (spill)
        p->spilling = 0;
    if (--p->count == 0)
        pin_remove(s, p);
    return true;
}

/* --- the heap: free list ---------------------------------------------------- */

static struct shm_block *block_at(const struct shm_store *s, uint64_t offset)
{
    assert(offset >= s->heap_start && offset < s->heap_end && "a block lies in the heap");
    return (struct shm_block *)(s->base + offset);
}

static uint64_t block_offset(const struct shm_store *s, const struct shm_block *b)
{
    return (uint64_t)((const uint8_t *)b - s->base);
}

static struct shm_block *block_next(const struct shm_store *s, const struct shm_block *b)
{
    uint64_t next = block_offset(s, b) + b->size;
    return next < s->heap_end ? block_at(s, next) : NULL;
}

static struct shm_block *block_prev(const struct shm_store *s, const struct shm_block *b)
{
    return b->prev_size ? block_at(s, block_offset(s, b) - b->prev_size) : NULL;
}

/* Point the neighbours of the list position of b (given by b's own links) at b. */
static void free_list_link(const struct shm_store *s, struct shm_block *b)
{
    uint64_t off = block_offset(s, b);
    if (b->prev_free)
        block_at(s, b->prev_free)->next_free = off;
    else
        s->header->free_head = off;
    if (b->next_free)
        block_at(s, b->next_free)->prev_free = off;
}

/* Insert b in address order.  Its list neighbours are the nearest free
 * blocks before and after it, found by whichever of three walks in lockstep
 * ends first: the list from its head (short when few blocks are free) and
 * the chain both ways from b (short when many are).  A plain list walk makes
 * freeing in address order quadratic in a fragmented heap. */
static void free_list_insert(const struct shm_store *s, struct shm_block *b)
{
    uint64_t off = block_offset(s, b), list = s->header->free_head, list_prev = 0;
    const struct shm_block *back = b, *fwd = b;
    for (;;) {
        if (list == 0 || list > off) {
            b->prev_free = list_prev;
            b->next_free = list;
            break;
        }
        assert(list != off && "a block is on the free list once");
        list_prev = list;
        list = block_at(s, list)->next_free;
        if (fwd && (fwd = block_next(s, fwd)) != NULL && fwd->is_free) {
            b->next_free = block_offset(s, fwd);
            b->prev_free = fwd->prev_free;
            break;
        }
        if (back && (back = block_prev(s, back)) != NULL && back->is_free) {
            b->prev_free = block_offset(s, back);
            b->next_free = back->next_free;
            break;
        }
    }
    free_list_link(s, b);
}

static void free_list_remove(const struct shm_store *s, struct shm_block *b)
{
    if (b->prev_free)
        block_at(s, b->prev_free)->next_free = b->next_free;
    else
        s->header->free_head = b->next_free;
    if (b->next_free)
        block_at(s, b->next_free)->prev_free = b->prev_free;
}

/* Put `with` where `old` is on the list; no free block lies between them. */
static void free_list_replace(const struct shm_store *s, struct shm_block *old, struct shm_block *with)
{
    with->prev_free = old->prev_free;
    with->next_free = old->next_free;
    free_list_link(s, with);
}

/* --- the heap: blocks --------------------------------------------------------- */

/* Cut free block b down to `size` bytes and return the rest as a new free
 * block (not yet on the free list), or NULL if the rest is too small to be a
 * block and stays inside b.  The new block's header is written before b
 * shrinks, so the chain of sizes is whole at every instant. */
static struct shm_block *block_split(const struct shm_store *s, struct shm_block *b, uint64_t size)
{
    assert(b->is_free && size % SHM_ALIGN == 0 && size <= b->size && "split a free block on alignment");
    uint64_t rest = b->size - size;
    if (rest < MIN_BLOCK_SIZE)
        return NULL;
    struct shm_block *r = (struct shm_block *)((uint8_t *)b + size);
    *r = (struct shm_block){.size = rest, .prev_size = size, .is_free = 1};
    publish_u64(&b->size, size);
    struct shm_block *after = block_next(s, r);
    if (after)
        after->prev_size = rest;
    return r;
}

/* Grow `left` over its physical successor `right` with one store to left's
 * size; right's header becomes payload bytes of left. */
static void block_absorb(const struct shm_store *s, struct shm_block *left, struct shm_block *right)
{
    assert((uint8_t *)left + left->size == (uint8_t *)right && "only neighbours merge");
    publish_u64(&left->size, left->size + right->size);
    struct shm_block *after = block_next(s, left);
    if (after)
        after->prev_size = left->size;
}

/* A block taken for an object: split off first, handed over to the object's
 * entry next, taken off the free list last (see heap_reserve). */
struct reservation {
    struct shm_block *block;
    struct shm_block *rest; /* split off block, or NULL */
    bool cut_from_end;      /* block is the end of a free block that stays listed */
};

/* Address-ordered first fit.  The block stays on the free list until
 * heap_commit: the free list is derived state, so updating it after the
 * entry has been written costs nothing in crash safety. */
static bool heap_reserve(const struct shm_store *s, uint64_t size, struct reservation *out)
{
    for (uint64_t off = s->header->free_head; off;) {
        struct shm_block *b = block_at(s, off);
        if (b->size >= size) {
            out->block = b;
            out->rest = block_split(s, b, size);
            out->cut_from_end = false;
            crash_point_reached(SHM_CRASH_AFTER_SPLIT);
            return true;
        }
        off = b->next_free;
    }
    return false;
}

/* Address-ordered last fit, cut from the end of the block: for memory lent to
 * a process's buffers, which can be neither spilled nor moved, kept at the
 * top of the heap, away from the objects first fit packs at its bottom. */
static bool heap_reserve_top(const struct shm_store *s, uint64_t size, struct reservation *out)
{
    struct shm_block *last = NULL;
    for (uint64_t off = s->header->free_head; off; off = block_at(s, off)->next_free)
        if (block_at(s, off)->size >= size)
            last = block_at(s, off);
    if (!last)
        return false;
    if (last->size - size < MIN_BLOCK_SIZE) {
        *out = (struct reservation){.block = last, .rest = NULL, .cut_from_end = false};
    } else {
        struct shm_block *end = block_split(s, last, last->size - size);
        *out = (struct reservation){.block = end, .rest = NULL, .cut_from_end = true};
    }
    crash_point_reached(SHM_CRASH_AFTER_SPLIT);
    return true;
}

static void heap_commit(const struct shm_store *s, const struct reservation *r)
{
    struct shm_header *h = s->header;
    if (r->cut_from_end) {
        /* The free block it was cut from keeps its place on the list. */
    } else if (r->rest) {
        free_list_replace(s, r->block, r->rest);
    } else {
        free_list_remove(s, r->block);
        h->free_blocks--;
    }
    r->block->is_free = 0;
    h->bytes_in_use += r->block->size;
}

/* Return a used block to the free space, merging it with free neighbours:
 * sizes first (single stores, so the chain stays whole), the list after. */
static void heap_release(const struct shm_store *s, struct shm_block *b)
{
    assert(!b->is_free && "release a used block");
    struct shm_header *h = s->header;
    h->bytes_in_use -= b->size;
    b->is_free = 1;
    struct shm_block *next = block_next(s, b), *prev = block_prev(s, b);
    bool merge_next = next && next->is_free, merge_prev = prev && prev->is_free;
    if (merge_next) {
        block_absorb(s, b, next);
        crash_point_reached(SHM_CRASH_IN_COALESCE);
    }
    if (merge_prev) {
        block_absorb(s, prev, b);
        crash_point_reached(SHM_CRASH_IN_COALESCE);
    }
    /* next's header is payload now, but its links are still there to read. */
    if (merge_prev && merge_next) {
        free_list_remove(s, next);
        h->free_blocks--;
    } else if (merge_next) {
        free_list_replace(s, next, b);
    } else if (!merge_prev) {
        free_list_insert(s, b);
        h->free_blocks++;
    }
}

/* --- objects --------------------------------------------------------------------- */

static uint64_t *state_counter(struct shm_header *h, uint32_t state)
{
    switch (state) {
    case SHM_STATE_CREATED: return &h->num_created;
    case SHM_STATE_SEALED: return &h->num_sealed;
    case SHM_STATE_SPILLED: return &h->num_spilled;
    }
    assert(0 && "an entry in the table has a real state");
    return &h->num_objects;
}

static struct shm_block *entry_block(const struct shm_store *s, const struct shm_entry *e)
{
    assert(e->state != SHM_STATE_SPILLED && "a spilled object owns no block");
    return block_at(s, e->offset - BLOCK_HEADER_SIZE);
}

static void entry_set_state(const struct shm_store *s, struct shm_entry *e, uint32_t state)
{
    --*state_counter(s->header, e->state);
    ++*state_counter(s->header, state);
    publish_u32(&e->state, state);
}

/* Flags and pins in one store: a spill's flag never exists without its pin. */
static void entry_set_flags_pins(const struct shm_store *s, struct shm_entry *e, uint32_t flags, uint32_t pins)
{
    s->header->num_pinned += (pins > 0) - (e->pin_count > 0);
    struct shm_entry word = {.flags = flags, .pin_count = pins};
    publish_u64(&e->flags_pins, word.flags_pins);
}

static void entry_touch(const struct shm_store *s, struct shm_entry *e)
{
    e->last_access = ++s->header->clock;
}

/* A new CREATED entry owning the payload of `block`. */
static struct shm_entry *entry_insert(const struct shm_store *s, const uint8_t *id, struct shm_block *block,
                                      uint64_t data_size, uint64_t metadata_size)
{
    struct shm_header *h = s->header;
    struct shm_entry *e = table_claim(s, id);
    *e = (struct shm_entry){
        .state = SHM_STATE_EMPTY,
        .creator_pid = current_pid(),
        .offset = block_offset(s, block) + BLOCK_HEADER_SIZE,
        .data_size = data_size,
        .metadata_size = metadata_size,
        .last_access = ++h->clock,
    };
    memcpy(e->id, id, SHM_ID_SIZE);
    h->num_objects++;
    h->num_created++;
    publish_u32(&e->state, SHM_STATE_CREATED);
    return e;
}

/* Remove the entry first, then free its block: repair frees a block no entry
 * points at, whereas an entry left pointing into a merged block would be
 * lost data it cannot explain. */
static void object_free(const struct shm_store *s, struct shm_entry *e)
{
    struct shm_header *h = s->header;
    struct shm_block *b = e->state == SHM_STATE_SPILLED ? NULL : entry_block(s, e);
    --*state_counter(h, e->state);
    h->num_objects--;
    if (e->pin_count)
        h->num_pinned--;
    table_remove(s, e);
    if (b)
        heap_release(s, b);
}

/* A restore that will not finish: back to SPILLED, the file still holds the
 * bytes.  The state goes first, so the block is unowned before it is freed. */
static void object_unrestore(const struct shm_store *s, struct shm_entry *e)
{
    struct shm_block *b = entry_block(s, e);
    entry_set_state(s, e, SHM_STATE_SPILLED);
    entry_set_flags_pins(s, e, e->flags & ~(uint32_t)SHM_FLAG_RESTORING, 0);
    e->offset = 0;
    heap_release(s, b);
}

static void object_info_fill(const struct shm_entry *e, shm_object_info *out)
{
    memcpy(out->id, e->id, SHM_ID_SIZE);
    out->state = e->state;
    out->flags = e->flags;
    out->pin_count = e->pin_count;
    out->creator_pid = e->creator_pid;
    out->offset = e->offset;
    out->data_size = e->data_size;
    out->metadata_size = e->metadata_size;
    out->last_access = e->last_access;
}

/* Deleted while pinned: still in the table for its pin holders, gone for
 * everyone else. */
static bool entry_is_visible(const struct shm_entry *e)
{
    return !(e->flags & SHM_FLAG_DELETE_PENDING);
}

/* --- the lock and repair ----------------------------------------------------------- */

static int entry_cmp_id(const void *a, const void *b)
{
    return memcmp(((const struct shm_entry *)a)->id, ((const struct shm_entry *)b)->id, SHM_ID_SIZE);
}

static int entry_cmp_offset(const void *a, const void *b)
{
    uint64_t x = ((const struct shm_entry *)a)->offset, y = ((const struct shm_entry *)b)->offset;
    return (x > y) - (x < y);
}

/* Turn a salvaged entry into one check() accepts, or return false to drop
 * it.  A spill in progress is cancelled and its pin dropped: the spiller may
 * be the process that died, and a live one is told by shm_spill_finish. */
static bool entry_normalize(struct shm_entry *e)
{
    e->flags &= KNOWN_FLAGS;
    if (e->flags & SHM_FLAG_SPILLING) {
        e->flags &= ~(uint32_t)SHM_FLAG_SPILLING;
        if (e->pin_count)
            e->pin_count--;
    }
    switch (e->state) {
    case SHM_STATE_CREATED:
        e->flags &= SHM_FLAG_RESTORING | SHM_FLAG_HAS_FILE;
        e->pin_count = 0;
        e->untracked = 0;
        return true;
    case SHM_STATE_SEALED:
        e->flags &= SHM_FLAG_DELETE_PENDING | SHM_FLAG_LENT | SHM_FLAG_HAS_FILE;
        if (e->pin_count == 0)
            e->flags &= ~(uint32_t)SHM_FLAG_LENT;
        /* Its last pin went, but the dead process did not get to free it. */
        return !(e->flags & SHM_FLAG_DELETE_PENDING && e->pin_count == 0);
    case SHM_STATE_SPILLED:
        e->flags = SHM_FLAG_HAS_FILE;
        e->pin_count = 0;
        e->untracked = 0;
        e->offset = 0;
        return true;
    }
    return false;
}

/* Copy the table's entries out, normalised and deduplicated by id, sorted by
 * offset.  The table itself is left alone until table_refill. */
static int table_salvage(const struct shm_store *s, struct shm_entry **out, uint64_t *count_out)
{
    uint64_t slots = s->slot_mask + 1, count = 0, n = 0;
    for (uint64_t i = 0; i < slots; i++)
        count += s->table[i].state != SHM_STATE_EMPTY;
    struct shm_entry *saved = malloc((count ? count : 1) * sizeof *saved);
    if (!saved)
        return SHM_ERR_SYSTEM;
    for (uint64_t i = 0; i < slots && n < count; i++) {
        if (s->table[i].state == SHM_STATE_EMPTY)
            continue;
        saved[n] = s->table[i];
        n += entry_normalize(&saved[n]);
    }
    /* An entry interrupted in entry_move is in two slots, whole in both. */
    qsort(saved, n, sizeof *saved, entry_cmp_id);
    uint64_t kept = 0;
    for (uint64_t i = 0; i < n; i++)
        if (kept == 0 || memcmp(saved[kept - 1].id, saved[i].id, SHM_ID_SIZE) != 0)
            saved[kept++] = saved[i];
    qsort(saved, kept, sizeof *saved, entry_cmp_offset);
    *out = saved;
    *count_out = kept;
    return SHM_OK;
}

static bool entry_fits(const struct shm_entry *e, uint64_t block_size)
{
    uint64_t payload = block_size - BLOCK_HEADER_SIZE;
    return e->data_size <= payload && e->metadata_size <= payload - e->data_size;
}

static bool block_size_sane(const struct shm_store *s, uint64_t offset, uint64_t size)
{
    return size >= MIN_BLOCK_SIZE && size % SHM_ALIGN == 0 && size <= s->heap_end - offset;
}

/* Walk the chain of sizes; a block is used iff exactly one salvaged entry
 * points at its payload and fits in it.  Every other entry that claims a
 * block is dropped (state set to EMPTY in `e`).  Free neighbours merge, and
 * the free list, prev_size, is_free and the heap counters are rebuilt.  A
 * size that cannot be right ends the chain: the rest of the heap becomes one
 * free block. */
static void heap_rebuild(const struct shm_store *s, struct shm_entry *e, uint64_t n)
{
    struct shm_header *h = s->header;
    struct shm_block *prev = NULL, *last_free = NULL;
    uint64_t i = 0, list_tail = 0;
    h->free_head = 0;
    h->free_blocks = 0;
    h->bytes_in_use = 0;
    for (uint64_t off = s->heap_start; off < s->heap_end;) {
        struct shm_block *b = (struct shm_block *)(s->base + off);
        if (!block_size_sane(s, off, b->size)) {
            uint64_t rest = s->heap_end - off;
            if (rest < MIN_BLOCK_SIZE) {
                /* Too small to be a block: the previous block takes it.
                 * There is one, as the heap holds at least MIN_HEAP_BLOCKS. */
                publish_u64(&prev->size, prev->size + rest);
                if (!prev->is_free)
                    h->bytes_in_use += rest;
                break;
            }
            publish_u64(&b->size, rest);
        }
        uint64_t payload = off + BLOCK_HEADER_SIZE, owners = 0;
        for (; i < n && e[i].offset < payload; i++)
            if (e[i].state != SHM_STATE_SPILLED)
                e[i].state = SHM_STATE_EMPTY; /* points inside a block */
        while (i + owners < n && e[i + owners].offset == payload)
            owners++;
        bool used = owners == 1 && entry_fits(&e[i], b->size);
        if (!used)
            for (uint64_t k = 0; k < owners; k++)
                e[i + k].state = SHM_STATE_EMPTY;
        i += owners;

        uint64_t size = b->size;
        if (used) {
            b->is_free = 0;
            b->prev_size = prev ? prev->size : 0;
            h->bytes_in_use += size;
            prev = b;
            last_free = NULL;
        } else if (last_free) {
            publish_u64(&last_free->size, last_free->size + size);
        } else {
            b->prev_size = prev ? prev->size : 0;
            b->is_free = 1;
            b->prev_free = list_tail;
            b->next_free = 0;
            if (list_tail)
                block_at(s, list_tail)->next_free = off;
            else
                h->free_head = off;
            list_tail = off;
            h->free_blocks++;
            prev = last_free = b;
        }
        off += size;
    }
    for (; i < n; i++)
        if (e[i].state != SHM_STATE_SPILLED)
            e[i].state = SHM_STATE_EMPTY; /* points past the heap */
}

/* Write the surviving entries back, each on its own probe path, and recount. */
static void table_refill(const struct shm_store *s, const struct shm_entry *e, uint64_t n)
{
    struct shm_header *h = s->header;
    uint64_t slots = s->slot_mask + 1;
    for (uint64_t i = 0; i < slots; i++)
        s->table[i].state = SHM_STATE_EMPTY;
    h->num_objects = h->num_created = h->num_sealed = h->num_spilled = h->num_pinned = 0;
    /* The one stretch of repair that a crash would hurt: entries only in our
     * scratch copy are lost if this process dies here (their blocks then
     * read as free to the next repair). */
    for (uint64_t i = 0; i < n; i++) {
        if (e[i].state == SHM_STATE_EMPTY)
            continue;
        *table_claim(s, e[i].id) = e[i];
        h->num_objects++;
        ++*state_counter(h, e[i].state);
        h->num_pinned += e[i].pin_count > 0;
    }
}

static int pin_cmp(const void *a, const void *b)
{
    const struct shm_pin *x = a, *y = b;
    int c = memcmp(x->id, y->id, SHM_ID_SIZE);
    return c ? c : (x->pid > y->pid) - (x->pid < y->pid);
}

/* Rebuild the pin table against the repaired object table.  A slot in two
 * places (a move cut short) counts once; a slot for an object gone or not
 * sealed goes; a spill's pin goes with the spill (entry_normalize cancelled
 * them all); and where slots claim more pins than their entry has, some were
 * taken off the entry but not yet off the slot: the slots give them up.
 * Whatever an entry has beyond its slots and its lent buffer is untracked. */
static int pins_rebuild(const struct shm_store *s)
{
    struct shm_header *h = s->header;
    uint64_t slots = s->pin_mask + 1, count = 0, n = 0;
    for (uint64_t i = 0; i < slots; i++)
        count += s->pins[i].pid != 0;
    struct shm_pin *saved = malloc((count ? count : 1) * sizeof *saved);
    uint32_t *tracked = calloc(s->slot_mask + 1, sizeof *tracked);
    if (!saved || !tracked) {
        free(saved);
        free(tracked);
        return SHM_ERR_SYSTEM;
    }
    /* Emptied as it is read: a repairer that dies past here leaves pins
     * untracked, which a later repair counts as such. */
    for (uint64_t i = 0; i < slots && n < count; i++) {
        if (s->pins[i].pid == 0)
            continue;
        saved[n++] = s->pins[i];
        publish_pid(&s->pins[i].pid, 0);
    }
    qsort(saved, n, sizeof *saved, pin_cmp);
    h->num_pins = 0;
    memset(h->holders, 0, sizeof h->holders);
    for (uint64_t i = 0; i < n; i++) {
        struct shm_pin p = saved[i];
        if (i && pin_cmp(&saved[i - 1], &p) == 0)
            continue;
        if (p.spilling) {
            p.spilling = 0;
            p.count--;
        }
        const struct shm_entry *e = table_find(s, p.id);
        if (!e || e->state != SHM_STATE_SEALED || p.count == 0)
            continue;
        uint64_t slot = (uint64_t)(e - s->table);
        uint32_t held = e->pin_count - ((e->flags & SHM_FLAG_LENT) ? 1 : 0) - tracked[slot];
        if (p.count > held)
            p.count = held;
        if (p.count == 0)
            continue;
        tracked[slot] += p.count;
        uint64_t j = pin_home(s, p.id, p.pid);
        while (s->pins[j].pid != 0)
            j = (j + 1) & s->pin_mask;
        struct shm_pin *dst = &s->pins[j];
        *dst = (struct shm_pin){.count = p.count};
        memcpy(dst->id, p.id, SHM_ID_SIZE);
        h->num_pins++;
        h->holders[(uint32_t)p.pid % HOLDER_BUCKETS]++;
        publish_pid(&dst->pid, p.pid);
    }
    h->untracked = 0;
    for (uint64_t i = 0; i <= s->slot_mask; i++) {
        struct shm_entry *e = &s->table[i];
        if (e->state != SHM_STATE_SEALED)
            continue;
        e->untracked = e->pin_count - ((e->flags & SHM_FLAG_LENT) ? 1 : 0) - tracked[i];
        h->untracked += e->untracked;
    }
    free(saved);
    free(tracked);
    return SHM_OK;
}

static int store_repair(const struct shm_store *s)
{
    struct shm_entry *saved;
    uint64_t n;
    if (table_salvage(s, &saved, &n) != SHM_OK)
        return SHM_ERR_SYSTEM;
    heap_rebuild(s, saved, n);
    memset(s->header->table_map, 0xff, sizeof s->header->table_map);
    table_refill(s, saved, n);
    free(saved);
    return pins_rebuild(s);
}

/* Take the store lock.  If its holder died, repair what it left half-done
 * before anyone else sees the arena.  If repair itself cannot run (no memory
 * for its scratch table), the mutex is given up unrepaired, which makes it
 * unrecoverable: every later caller gets SHM_ERR_CORRUPT rather than a
 * damaged store. */
static int store_lock(const struct shm_store *s)
{
    struct shm_header *h = s->header;
    int rc = pthread_mutex_lock(&h->lock);
    if (rc == 0)
        return SHM_OK;
    if (rc == EOWNERDEAD) {
        if (store_repair(s) != SHM_OK) {
            int err = errno;
            pthread_mutex_unlock(&h->lock);
            errno = err;
            return SHM_ERR_SYSTEM;
        }
        h->repairs++;
        pthread_mutex_consistent(&h->lock);
        return SHM_OK;
    }
    if (rc == ENOTRECOVERABLE)
        return SHM_ERR_CORRUPT;
    errno = rc;
    return SHM_ERR_SYSTEM;
}

static void store_unlock(const struct shm_store *s)
{
    pthread_mutex_unlock(&s->header->lock);
}

/* --- the arena's memory ---------------------------------------------------------- */

/* shm_open needs a name; this one is unique to the process and the moment,
 * and it is unlinked as soon as it is open. */
static int arena_create_posix(uint64_t size, int *fd_out)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    for (int attempt = 0; attempt < 100; attempt++) {
        char name[64];
        snprintf(name, sizeof name, "/shmray-%d-%lld-%ld-%d", (int)getpid(), (long long)now.tv_sec,
                 now.tv_nsec, attempt);
        int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0 && errno == EEXIST)
            continue;
        if (fd < 0)
            return SHM_ERR_SYSTEM;
        shm_unlink(name);
        if (ftruncate(fd, (off_t)size) != 0) {
            int err = errno;
            close(fd);
            errno = err;
            return SHM_ERR_SYSTEM;
        }
        *fd_out = fd;
        return SHM_OK;
    }
    errno = EEXIST;
    return SHM_ERR_SYSTEM;
}

int shm_arena_create(uint64_t size, int *fd_out)
{
    if (size == 0 || size > (uint64_t)INT64_MAX || !fd_out)
        return SHM_ERR_INVALID;
    int fd = memfd_create("shmray-arena", MFD_CLOEXEC);
    if (fd < 0)
        return errno == ENOSYS ? arena_create_posix(size, fd_out) : SHM_ERR_SYSTEM;
    if (ftruncate(fd, (off_t)size) != 0) {
        int err = errno;
        close(fd);
        errno = err;
        return SHM_ERR_SYSTEM;
    }
    *fd_out = fd;
    return SHM_OK;
}

int shm_arena_map(int fd, uint64_t size, void **base_out)
{
    if (fd < 0 || size == 0 || !base_out)
        return SHM_ERR_INVALID;
    /* No MADV_DONTFORK: forked workers must inherit the mapping. */
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED)
        return SHM_ERR_SYSTEM;
    *base_out = base;
    return SHM_OK;
}

int shm_arena_unmap(void *base, uint64_t size)
{
    if (!base)
        return SHM_ERR_INVALID;
    return munmap(base, size) == 0 ? SHM_OK : SHM_ERR_SYSTEM;
}

/* --- the store -------------------------------------------------------------------- */

static uint64_t table_slots_for(uint64_t capacity)
{
    uint64_t slots = MIN_TABLE_SLOTS;
    while (slots < capacity / BYTES_PER_SLOT && slots < MAX_TABLE_SLOTS)
        slots <<= 1;
    return slots;
}

/* The pin table has as many slots as the object table, and follows it. */
static uint64_t pins_offset_for(uint64_t slots)
{
    return HEADER_SIZE + slots * sizeof(struct shm_entry);
}

static uint64_t heap_offset_for(uint64_t slots)
{
    return align_up(pins_offset_for(slots) + slots * sizeof(struct shm_pin), PAGE_SIZE_ASSUMED);
}

uint64_t shm_min_capacity(void)
{
    return heap_offset_for(MIN_TABLE_SLOTS) + MIN_HEAP_BLOCKS * MIN_BLOCK_SIZE;
}

int shm_robust_mutex_init(pthread_mutex_t *mutex)
{
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0)
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (rc == 0)
        rc = pthread_mutex_init(mutex, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        return SHM_ERR_SYSTEM;
    }
    return SHM_OK;
}

int shm_store_format(void *base, uint64_t size)
{
    if (!base || size < shm_min_capacity())
        return SHM_ERR_INVALID;
    struct shm_header *h = base;
    uint64_t capacity = size & ~(uint64_t)(SHM_ALIGN - 1);
    uint64_t slots = table_slots_for(capacity);
    uint64_t heap_offset = heap_offset_for(slots);

    memset(h, 0, sizeof *h);
    h->version = SHM_VERSION;
    h->capacity = capacity;
    h->table_offset = HEADER_SIZE;
    h->table_slots = slots;
    h->pin_slots = slots;
    h->pins_offset = pins_offset_for(slots);
    h->heap_offset = heap_offset;
    h->heap_size = capacity - heap_offset;
    /* The tables are left to the caller's zeroed memory (a fresh memfd is):
     * writing zeros over them would fault in every page of them at start-up,
     * 64 ms for the default arena here, where a session touches only the
     * pages its objects hash to. */

    struct shm_block *first = (struct shm_block *)((uint8_t *)base + heap_offset);
    *first = (struct shm_block){.size = h->heap_size, .is_free = 1};
    h->free_head = heap_offset;
    h->free_blocks = 1;
    int rc = shm_robust_mutex_init(&h->lock);
    if (rc != SHM_OK)
        return rc;
    publish_u64(&h->magic, SHM_MAGIC);
    return SHM_OK;
}

static bool header_geometry_valid(const struct shm_header *h, uint64_t size)
{
    uint64_t slots = h->table_slots;
    return h->capacity <= size && h->table_offset == HEADER_SIZE && slots >= MIN_TABLE_SLOTS &&
           slots <= MAX_TABLE_SLOTS && (slots & (slots - 1)) == 0 && h->pin_slots == slots &&
           h->pins_offset == pins_offset_for(slots) && h->heap_offset == heap_offset_for(slots) &&
           h->heap_size >= MIN_HEAP_BLOCKS * MIN_BLOCK_SIZE && h->heap_size % SHM_ALIGN == 0 &&
           h->heap_offset + h->heap_size == h->capacity;
}

int shm_store_open(void *base, uint64_t size, shm_store **out)
{
    if (!base || size < HEADER_SIZE || !out)
        return SHM_ERR_INVALID;
    struct shm_header *h = base;
    if (h->magic != SHM_MAGIC || h->version != SHM_VERSION || !header_geometry_valid(h, size))
        return SHM_ERR_CORRUPT;
    struct shm_store *s = malloc(sizeof *s);
    if (!s)
        return SHM_ERR_SYSTEM;
    *s = (struct shm_store){
        .base = base,
        .size = size,
        .header = h,
        .table = (struct shm_entry *)((uint8_t *)base + h->table_offset),
        .slot_mask = h->table_slots - 1,
        .pins = (struct shm_pin *)((uint8_t *)base + h->pins_offset),
        .pin_mask = h->pin_slots - 1,
        .heap_start = h->heap_offset,
        .heap_end = h->heap_offset + h->heap_size,
    };
    *out = s;
    return SHM_OK;
}

void shm_store_close(shm_store *s)
{
    free(s);
}

void *shm_store_base(shm_store *s)
{
    return s ? s->base : NULL;
}

/* --- object operations (each runs under the lock) ---------------------------------- */

static int object_create(const struct shm_store *s, const uint8_t *id, uint64_t data_size,
                         uint64_t metadata_size, bool at_top, uint64_t *offset_out)
{
    if (table_find(s, id))
        return SHM_ERR_EXISTS;
    if (!table_has_room(s))
        return SHM_ERR_TABLE_FULL;
    struct reservation r;
    uint64_t size = block_size_for(data_size + metadata_size);
    if (!(at_top ? heap_reserve_top(s, size, &r) : heap_reserve(s, size, &r)))
        return SHM_ERR_FULL;
    struct shm_entry *e = entry_insert(s, id, r.block, data_size, metadata_size);
    crash_point_reached(SHM_CRASH_AFTER_ENTRY);
    heap_commit(s, &r);
    if (offset_out)
        *offset_out = e->offset;
    return SHM_OK;
}

static int object_seal(const struct shm_store *s, const uint8_t *id)
{
    struct shm_entry *e = table_find(s, id);
    if (!e)
        return SHM_ERR_NOT_FOUND;
    if (e->state != SHM_STATE_CREATED)
        return SHM_ERR_SEALED; /* a spilled object was sealed before it spilled */
    /* State first: a CREATED entry that lost its RESTORING flag would be
     * aborted by shm_reap rather than returned to its spill file. */
    entry_set_state(s, e, SHM_STATE_SEALED);
    entry_set_flags_pins(s, e, e->flags & ~(uint32_t)SHM_FLAG_RESTORING, e->pin_count);
    return SHM_OK;
}

static int object_abort(const struct shm_store *s, const uint8_t *id)
{
    struct shm_entry *e = table_find(s, id);
    if (!e)
        return SHM_ERR_NOT_FOUND;
    if (e->state != SHM_STATE_CREATED)
        return SHM_ERR_SEALED;
    if (e->flags & SHM_FLAG_RESTORING)
        object_unrestore(s, e); /* its spill file still holds the bytes */
    else
        object_free(s, e);
    return SHM_OK;
}

/* The entry is taken out before its replacement goes in: a crash in between
 * leaves a block no entry owns, which repair frees (its process is dead, so
 * nobody uses it), never two entries owning one block. */
static int object_adopt(const struct shm_store *s, const uint8_t *from, const uint8_t *to,
                        uint64_t data_size, uint64_t metadata_size)
{
    struct shm_entry *e = table_find(s, from);
    if (!e || e->state != SHM_STATE_CREATED || e->flags || e->pin_count ||
        e->creator_pid != current_pid())
        return SHM_ERR_INVALID;
    if (table_find(s, to))
        return SHM_ERR_EXISTS;
    struct shm_block *b = entry_block(s, e);
    if (data_size > b->size || metadata_size > b->size ||
        block_size_for(data_size + metadata_size) > b->size)
        return SHM_ERR_INVALID;
    struct shm_header *h = s->header;
    h->num_created--;
    h->num_objects--;
    table_remove(s, e);
    e = entry_insert(s, to, b, data_size, metadata_size);
    entry_set_state(s, e, SHM_STATE_SEALED);
    entry_set_flags_pins(s, e, SHM_FLAG_LENT, 1);
    return SHM_OK;
}

static int object_get(const struct shm_store *s, const uint8_t *id, uint64_t *offset_out,
                      uint64_t *data_size_out, uint64_t *metadata_size_out)
{
    struct shm_entry *e = table_find(s, id);
    if (!e || !entry_is_visible(e))
        return SHM_ERR_NOT_FOUND;
    if (e->state == SHM_STATE_CREATED)
        return SHM_ERR_NOT_SEALED;
    if (e->state == SHM_STATE_SPILLED)
        return SHM_ERR_SPILLED;
    if (e->pin_count == UINT32_MAX)
        return SHM_ERR_INVALID;
    entry_set_flags_pins(s, e, e->flags, e->pin_count + 1);
    crash_point_reached(SHM_CRASH_PIN_UNRECORDED);
    if (!pin_add(s, id, current_pid(), false)) {
        e->untracked++;
        s->header->untracked++;
    }
    entry_touch(s, e);
    if (offset_out)
        *offset_out = e->offset;
    if (data_size_out)
        *data_size_out = e->data_size;
    if (metadata_size_out)
        *metadata_size_out = e->metadata_size;
    return SHM_OK;
}

/* One pin less, the flags now `flags`; frees a deleted object whose last pin
 * that was (returns 1 then). */
static int object_unpin(const struct shm_store *s, struct shm_entry *e, uint32_t flags)
{
    entry_set_flags_pins(s, e, flags, e->pin_count - 1);
    if (e->pin_count == 0 && (e->flags & SHM_FLAG_DELETE_PENDING)) {
        object_free(s, e);
        return 1;
    }
    return 0;
}

static int object_release(const struct shm_store *s, const uint8_t *id, int *freed_out)
{
    struct shm_entry *e = table_find(s, id);
    if (!e)
        return SHM_ERR_NOT_FOUND;
    /* A spilling object's last pin is the spiller's, for shm_spill_finish; a
     * lent one's is its buffer's, for shm_lent_return. */
    uint32_t kept = ((e->flags & SHM_FLAG_SPILLING) ? 1 : 0) + ((e->flags & SHM_FLAG_LENT) ? 1 : 0);
    if (e->pin_count <= kept)
        return SHM_ERR_INVALID;
    /* Only a pin of the caller's own, or one nobody is known to hold: a forked
     * child must not give back the pins of the views it inherited, which are
     * its parent's. */
    if (!pin_drop(s, id, current_pid(), false)) {
        if (!e->untracked)
            return SHM_ERR_INVALID;
        e->untracked--;
        s->header->untracked--;
    }
    *freed_out = object_unpin(s, e, e->flags);
    return SHM_OK;
}

/* Checked against the payload offset too, so a damaged tag in front of a
 * buffer can't drop someone else's object. */
static int object_lent_return(const struct shm_store *s, const uint8_t *id, uint64_t offset)
{
    struct shm_entry *e = table_find(s, id);
    if (!e || e->offset != offset || e->creator_pid != current_pid())
        return SHM_ERR_INVALID;
    if (e->state == SHM_STATE_CREATED && !(e->flags & SHM_FLAG_RESTORING)) {
        object_free(s, e);
        return SHM_OK;
    }
    if (e->state == SHM_STATE_SEALED && (e->flags & SHM_FLAG_LENT)) {
        object_unpin(s, e, e->flags & ~(uint32_t)SHM_FLAG_LENT);
        return SHM_OK;
    }
    return SHM_ERR_INVALID;
}

static int object_delete(const struct shm_store *s, const uint8_t *id, int *outcome_out)
{
    struct shm_entry *e = table_find(s, id);
    if (!e)
        return SHM_ERR_NOT_FOUND;
    /* A restore in progress still has its spill file, and a restored object keeps its
     * own; none is needed once the object is deleted. */
    bool has_file = e->state == SHM_STATE_SPILLED || (e->flags & (SHM_FLAG_RESTORING | SHM_FLAG_HAS_FILE));
    if (e->pin_count) {
        entry_set_flags_pins(s, e, e->flags | SHM_FLAG_DELETE_PENDING, e->pin_count);
        *outcome_out = SHM_DELETE_DEFERRED | (has_file ? SHM_DELETED_SPILLED : 0);
        return SHM_OK;
    }
    *outcome_out = SHM_DELETED_NOW | (has_file ? SHM_DELETED_SPILLED : 0);
    object_free(s, e);
    return SHM_OK;
}

static int object_spill_begin(const struct shm_store *s, const uint8_t *id, uint64_t *offset_out,
                              uint64_t *data_size_out, uint64_t *metadata_size_out)
{
    struct shm_entry *e = table_find(s, id);
    if (!e || !entry_is_visible(e))
        return SHM_ERR_NOT_FOUND;
    if (e->state == SHM_STATE_CREATED)
        return SHM_ERR_NOT_SEALED;
    if (e->state == SHM_STATE_SPILLED)
        return SHM_ERR_SPILLED;
    if (e->pin_count)
        return SHM_ERR_PINNED;
    if (!pins_have_room(s))
        return SHM_ERR_PINNED; /* a spill its spiller's death could not undo: skip it */
    entry_set_flags_pins(s, e, e->flags | SHM_FLAG_SPILLING, 1);
    (void)pin_add(s, id, current_pid(), true); /* there is room */
    if (offset_out)
        *offset_out = e->offset;
    if (data_size_out)
        *data_size_out = e->data_size;
    if (metadata_size_out)
        *metadata_size_out = e->metadata_size;
    return SHM_OK;
}

static int object_spill_finish(const struct shm_store *s, const uint8_t *id)
{
    struct shm_entry *e = table_find(s, id);
    if (!e)
        return SHM_ERR_NOT_FOUND;
    if (e->state != SHM_STATE_SEALED)
        return SHM_ERR_INVALID; /* no spill was begun */
    if (!(e->flags & SHM_FLAG_SPILLING))
        return SHM_ERR_PINNED; /* a repair cancelled the spill (see entry_normalize) */
    assert(e->state == SHM_STATE_SEALED && e->pin_count >= 1 && "a spill holds a pin on a sealed object");
    if (!pin_drop(s, id, current_pid(), true))
        return SHM_ERR_PINNED; /* cancelled by a repair; the spill now is another's */
    /* The caller's file is whole by now: it stays as long as the object does. */
    uint32_t flags = (e->flags & ~(uint32_t)SHM_FLAG_SPILLING) | SHM_FLAG_HAS_FILE;
    uint32_t pins = e->pin_count - 1;
    entry_set_flags_pins(s, e, flags, pins);
    if (flags & SHM_FLAG_DELETE_PENDING) {
        if (pins == 0)
            object_free(s, e);
        return SHM_ERR_NOT_FOUND;
    }
    if (pins)
        return SHM_ERR_PINNED;
    struct shm_block *b = entry_block(s, e);
    entry_set_state(s, e, SHM_STATE_SPILLED);
    e->offset = 0;
    heap_release(s, b);
    return SHM_OK;
}

static int object_spill_cancel(const struct shm_store *s, const uint8_t *id)
{
    struct shm_entry *e = table_find(s, id);
    if (!e)
        return SHM_ERR_NOT_FOUND;
    if (!(e->flags & SHM_FLAG_SPILLING))
        return e->state == SHM_STATE_SEALED ? SHM_OK : SHM_ERR_INVALID; /* a repair cancelled it */
    if (!pin_drop(s, id, current_pid(), true))
        return SHM_OK; /* cancelled by a repair, and another process spills it now */
    uint32_t flags = e->flags & ~(uint32_t)SHM_FLAG_SPILLING, pins = e->pin_count - 1;
    entry_set_flags_pins(s, e, flags, pins);
    if (pins == 0 && (flags & SHM_FLAG_DELETE_PENDING))
        object_free(s, e);
    return SHM_OK;
}

static int object_restore_begin(const struct shm_store *s, const uint8_t *id, uint64_t *offset_out)
{
    struct shm_entry *e = table_find(s, id);
    if (!e)
        return SHM_ERR_NOT_FOUND;
    if (e->state == SHM_STATE_SEALED)
        return SHM_ERR_INVALID; /* restored already */
    if (e->state == SHM_STATE_CREATED)
        return SHM_ERR_NOT_SEALED; /* being restored (or written) by someone */
    struct reservation r;
    if (!heap_reserve(s, block_size_for(e->data_size + e->metadata_size), &r))
        return SHM_ERR_FULL;
    e->offset = block_offset(s, r.block) + BLOCK_HEADER_SIZE;
    e->creator_pid = current_pid();
    entry_set_flags_pins(s, e, e->flags | SHM_FLAG_RESTORING, 0);
    entry_touch(s, e);
    entry_set_state(s, e, SHM_STATE_CREATED);
    crash_point_reached(SHM_CRASH_AFTER_ENTRY);
    heap_commit(s, &r);
    if (offset_out)
        *offset_out = e->offset;
    return SHM_OK;
}

/* What shm_reap does to one entry: REAP_NONE (not the dead process's, or
 * nothing of it to undo), REAP_KEPT (undone, the entry stays), REAP_GONE
 * (undone and removed: a later entry may have moved into its slot). */
enum reap_outcome { REAP_NONE, REAP_KEPT, REAP_GONE };

static enum reap_outcome reap_entry(const struct shm_store *s, struct shm_entry *e, int32_t pid)
{
    if (e->state == SHM_STATE_EMPTY || e->creator_pid != pid)
        return REAP_NONE;
    if (e->state == SHM_STATE_CREATED && (e->flags & SHM_FLAG_RESTORING)) {
        object_unrestore(s, e);
        return REAP_KEPT;
    }
    if (e->state == SHM_STATE_CREATED) {
        object_free(s, e);
        return REAP_GONE;
    }
    if (e->state == SHM_STATE_SEALED && (e->flags & SHM_FLAG_LENT))
        return object_unpin(s, e, e->flags & ~(uint32_t)SHM_FLAG_LENT) ? REAP_GONE : REAP_KEPT;
    return REAP_NONE;
}

/* The pins a dead process held, its slot already gone: off its object, which
 * is freed if that was the last pin of a deleted one.  A spill it had begun
 * is cancelled (its file, half written or not, is never read). */
static void pins_give_back(const struct shm_store *s, const struct shm_pin *gone)
{
    struct shm_entry *e = table_find(s, gone->id);
    if (!e || e->state != SHM_STATE_SEALED)
        return;
    uint32_t flags = e->flags, held = e->pin_count - ((flags & SHM_FLAG_LENT) ? 1 : 0);
    if (gone->spilling)
        flags &= ~(uint32_t)SHM_FLAG_SPILLING;
    entry_set_flags_pins(s, e, flags, e->pin_count - (gone->count < held ? gone->count : held));
    if (e->pin_count == 0 && (e->flags & SHM_FLAG_DELETE_PENDING))
        object_free(s, e);
}

/* Removing a slot shifts later ones up into it, so the scan looks at slot i
 * again after each removal (as store_reap does with entries). */
static uint64_t pins_reap(const struct shm_store *s, int32_t pid)
{
    uint64_t undone = 0;
    if (s->header->holders[(uint32_t)pid % HOLDER_BUCKETS] == 0)
        return 0; /* no slot of its: no need to look at the whole table */
    for (uint64_t i = 0; i <= s->pin_mask; i++) {
        while (s->pins[i].pid == pid) {
            struct shm_pin gone = s->pins[i];
            pin_remove(s, &s->pins[i]);
            pins_give_back(s, &gone);
            undone++;
        }
    }
    return undone;
}

/* Removing an entry shifts later ones up into its slot, so the scan looks at
 * slot i again after undoing it.  Entries that wrap around the table's end
 * may be looked at twice, which is harmless: undone ones no longer match. */
static uint64_t store_reap(const struct shm_store *s, int32_t pid)
{
    uint64_t undone = pins_reap(s, pid);
    for (uint64_t i = 0; i <= s->slot_mask; i++) {
        enum reap_outcome outcome;
        while ((outcome = reap_entry(s, &s->table[i], pid)) != REAP_NONE) {
            undone++;
            if (outcome == REAP_KEPT)
                break;
        }
    }
    return undone;
}

static void store_statistics(const struct shm_store *s, shm_stats *out)
{
    const struct shm_header *h = s->header;
    uint64_t largest = 0;
    for (uint64_t off = h->free_head; off; off = block_at(s, off)->next_free)
        if (block_at(s, off)->size > largest)
            largest = block_at(s, off)->size;
    *out = (shm_stats){
        .capacity = h->capacity,
        .heap_size = h->heap_size,
        .bytes_in_use = h->bytes_in_use,
        .bytes_free = h->heap_size - h->bytes_in_use,
        .largest_free = largest ? largest - BLOCK_HEADER_SIZE : 0,
        .num_objects = h->num_objects,
        .num_created = h->num_created,
        .num_sealed = h->num_sealed,
        .num_spilled = h->num_spilled,
        .num_pinned = h->num_pinned,
        .num_pin_holders = h->num_pins,
        .untracked_pins = h->untracked,
        .free_blocks = h->free_blocks,
        .table_slots = h->table_slots,
        .repairs = h->repairs,
    };
}

/* --- the public functions: check arguments, lock, work, unlock ---------------------- */

/* shm_create and shm_create_within: memory lent to a process's buffers goes
 * to the top of the heap, and only while keep_free heap bytes stay free. */
static int create(shm_store *s, const uint8_t *id, uint64_t data_size, uint64_t metadata_size,
                  bool lent, uint64_t keep_free, uint64_t *offset_out)
{
    if (!s || !id)
        return SHM_ERR_INVALID;
    uint64_t heap_size = s->heap_end - s->heap_start;
    /* Checked separately first, so the sum below cannot overflow. */
    if (data_size > heap_size || metadata_size > heap_size ||
        block_size_for(data_size + metadata_size) > heap_size)
        return SHM_ERR_TOO_LARGE;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    const struct shm_header *h = s->header;
    if (lent && h->heap_size - h->bytes_in_use < block_size_for(data_size + metadata_size) + keep_free)
        rc = SHM_ERR_FULL;
    else
        rc = object_create(s, id, data_size, metadata_size, lent, offset_out);
    store_unlock(s);
    return rc;
}

int shm_create(shm_store *s, const uint8_t *id, uint64_t data_size, uint64_t metadata_size,
               uint64_t *offset_out)
{
    return create(s, id, data_size, metadata_size, false, 0, offset_out);
}

int shm_create_within(shm_store *s, const uint8_t *id, uint64_t data_size, uint64_t metadata_size,
                      uint64_t keep_free, uint64_t *offset_out)
{
    return create(s, id, data_size, metadata_size, true, keep_free, offset_out);
}

int shm_adopt(shm_store *s, const uint8_t *from, const uint8_t *to, uint64_t data_size,
              uint64_t metadata_size)
{
    if (!s || !from || !to)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = object_adopt(s, from, to, data_size, metadata_size);
    store_unlock(s);
    return rc;
}

int shm_lent_return(shm_store *s, const uint8_t *id, uint64_t offset)
{
    if (!s || !id)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = object_lent_return(s, id, offset);
    store_unlock(s);
    return rc;
}

int shm_seal(shm_store *s, const uint8_t *id)
{
    if (!s || !id)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = object_seal(s, id);
    store_unlock(s);
    return rc;
}

int shm_abort(shm_store *s, const uint8_t *id)
{
    if (!s || !id)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = object_abort(s, id);
    store_unlock(s);
    return rc;
}

int shm_get(shm_store *s, const uint8_t *id, uint64_t *offset_out, uint64_t *data_size_out,
            uint64_t *metadata_size_out)
{
    if (!s || !id)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = object_get(s, id, offset_out, data_size_out, metadata_size_out);
    store_unlock(s);
    return rc;
}

int shm_release(shm_store *s, const uint8_t *id, int *freed_out)
{
    int freed = 0;
    if (!s || !id)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = object_release(s, id, &freed);
    store_unlock(s);
    if (freed_out)
        *freed_out = freed;
    return rc;
}

int shm_delete(shm_store *s, const uint8_t *id, int *outcome_out)
{
    int outcome = 0;
    if (!s || !id)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = object_delete(s, id, &outcome);
    store_unlock(s);
    if (outcome_out)
        *outcome_out = outcome;
    return rc;
}

int shm_contains(shm_store *s, const uint8_t *id, uint32_t *state_out)
{
    if (!s || !id)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    const struct shm_entry *e = table_find(s, id);
    rc = e && entry_is_visible(e) ? SHM_OK : SHM_ERR_NOT_FOUND;
    if (rc == SHM_OK && state_out)
        *state_out = e->state;
    store_unlock(s);
    return rc;
}

int shm_info(shm_store *s, const uint8_t *id, shm_object_info *out)
{
    if (!s || !id || !out)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    const struct shm_entry *e = table_find(s, id);
    rc = e ? SHM_OK : SHM_ERR_NOT_FOUND;
    if (e)
        object_info_fill(e, out);
    store_unlock(s);
    return rc;
}

int shm_statistics(shm_store *s, shm_stats *out)
{
    if (!s || !out)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    store_statistics(s, out);
    store_unlock(s);
    return SHM_OK;
}

/* The first slot from i (below end) that holds an entry, else end.  Parts of the table no
 * entry was ever put in are skipped unread (see table_map). */
static uint64_t next_entry(const struct shm_store *s, uint64_t i, uint64_t end)
{
    uint64_t step = table_map_slots(s);
    while (i < end) {
        if (!table_part_used(s, i))
            i = (i / step + 1) * step;
        else if (s->table[i].state != SHM_STATE_EMPTY)
            return i;
        else
            i++;
    }
    return end;
}

int shm_list(shm_store *s, shm_object_info *out, uint64_t max, uint64_t *count_out, uint64_t *total_out)
{
    if (!s || (max && !out))
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    uint64_t count = 0, total = 0, slots = s->slot_mask + 1;
    for (uint64_t i = next_entry(s, 0, slots); i < slots; i = next_entry(s, i + 1, slots)) {
        if (count < max)
            object_info_fill(&s->table[i], &out[count++]);
        total++;
    }
    store_unlock(s);
    if (count_out)
        *count_out = count;
    if (total_out)
        *total_out = total;
    return SHM_OK;
}

int shm_list_batch(shm_store *s, uint64_t *cursor, shm_object_info *out, uint64_t max,
                   uint64_t *count_out)
{
    if (!s || !cursor || !count_out || (max && !out))
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    uint64_t slots = s->slot_mask + 1, end = *cursor + SHM_LIST_BATCH, count = 0, i;
    if (end > slots)
        end = slots;
    for (i = next_entry(s, *cursor, end); i < end && count < max; i = next_entry(s, i + 1, end))
        object_info_fill(&s->table[i], &out[count++]);
    store_unlock(s);
    *cursor = i < slots ? i : 0;
    *count_out = count;
    return SHM_OK;
}

int shm_spill_begin(shm_store *s, const uint8_t *id, uint64_t *offset_out, uint64_t *data_size_out,
                    uint64_t *metadata_size_out)
{
    if (!s || !id)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = object_spill_begin(s, id, offset_out, data_size_out, metadata_size_out);
    store_unlock(s);
    return rc;
}

int shm_spill_finish(shm_store *s, const uint8_t *id)
{
    if (!s || !id)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = object_spill_finish(s, id);
    store_unlock(s);
    return rc;
}

int shm_spill_cancel(shm_store *s, const uint8_t *id)
{
    if (!s || !id)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = object_spill_cancel(s, id);
    store_unlock(s);
    return rc;
}

int shm_restore_begin(shm_store *s, const uint8_t *id, uint64_t *offset_out)
{
    if (!s || !id)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = object_restore_begin(s, id, offset_out);
    store_unlock(s);
    return rc;
}

int shm_reap(shm_store *s, int32_t pid, uint64_t *count_out)
{
    if (!s)
        return SHM_ERR_INVALID;
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    uint64_t undone = store_reap(s, pid);
    store_unlock(s);
    if (count_out)
        *count_out = undone;
    return SHM_OK;
}

/* --- check ----------------------------------------------------------------------------- */

static int check_fail(char *msg, size_t msg_size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int check_fail(char *msg, size_t msg_size, const char *fmt, ...)
{
    if (msg && msg_size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, msg_size, fmt, ap);
        va_end(ap);
    }
    return SHM_ERR_CORRUPT;
}

/* A block or an entry's claim on one, for matching the two sides. */
struct span {
    uint64_t offset; /* payload offset */
    uint64_t bytes;  /* used block: payload size; entry: bytes it needs */
};

static int span_cmp(const void *a, const void *b)
{
    uint64_t x = ((const struct span *)a)->offset, y = ((const struct span *)b)->offset;
    return (x > y) - (x < y);
}

/* The chain of blocks covers the heap exactly, sizes are aligned, the derived
 * fields agree with it, the free list holds exactly the free blocks in
 * address order, no two free blocks touch.  Used blocks go to `used` (when
 * not NULL); *used_count_out gets how many there are. */
static int heap_check(const struct shm_store *s, struct span *used, uint64_t *used_count_out, char *msg,
                      size_t msg_size)
{
    const struct shm_header *h = s->header;
    uint64_t prev_size = 0, prev_free = 0, expect_free = h->free_head, in_use = 0, free_blocks = 0,
             used_count = 0;
    bool prev_is_free = false;
    uint64_t off = s->heap_start;
    while (off < s->heap_end) {
        const struct shm_block *b = (const struct shm_block *)(s->base + off);
        if (b->size % SHM_ALIGN)
            return check_fail(msg, msg_size, "block at offset %" PRIu64 ": size %" PRIu64 " not a multiple of %d",
                              off, b->size, SHM_ALIGN);
        if (b->size < MIN_BLOCK_SIZE)
            return check_fail(msg, msg_size, "block at offset %" PRIu64 ": size %" PRIu64 " below the minimum %d",
                              off, b->size, MIN_BLOCK_SIZE);
        if (b->size > s->heap_end - off)
            return check_fail(msg, msg_size, "block at offset %" PRIu64 ": size %" PRIu64 " runs past the heap end %" PRIu64,
                              off, b->size, s->heap_end);
        if (b->prev_size != prev_size)
            return check_fail(msg, msg_size, "block at offset %" PRIu64 ": prev_size %" PRIu64 ", previous block has size %" PRIu64,
                              off, b->prev_size, prev_size);
        if (b->is_free > 1)
            return check_fail(msg, msg_size, "block at offset %" PRIu64 ": is_free is %" PRIu64, off, b->is_free);
        if (b->is_free) {
            if (prev_is_free)
                return check_fail(msg, msg_size, "block at offset %" PRIu64 ": free, and so is the block before it", off);
            if (expect_free != off)
                return check_fail(msg, msg_size, "block at offset %" PRIu64 ": free but the free list has %" PRIu64 " next",
                                  off, expect_free);
            if (b->prev_free != prev_free)
                return check_fail(msg, msg_size, "block at offset %" PRIu64 ": prev_free %" PRIu64 ", expected %" PRIu64,
                                  off, b->prev_free, prev_free);
            prev_free = off;
            expect_free = b->next_free;
            free_blocks++;
        } else {
            if (used)
                used[used_count] = (struct span){off + BLOCK_HEADER_SIZE, b->size - BLOCK_HEADER_SIZE};
            used_count++;
            in_use += b->size;
        }
        prev_is_free = b->is_free;
        prev_size = b->size;
        off += b->size;
    }
    if (off != s->heap_end)
        return check_fail(msg, msg_size, "block chain ends at %" PRIu64 ", the heap at %" PRIu64, off, s->heap_end);
    if (expect_free != 0)
        return check_fail(msg, msg_size, "free list goes on to %" PRIu64 ", which is no free block", expect_free);
    if (in_use != h->bytes_in_use)
        return check_fail(msg, msg_size, "bytes_in_use is %" PRIu64 ", used blocks add up to %" PRIu64, h->bytes_in_use,
                          in_use);
    if (free_blocks != h->free_blocks)
        return check_fail(msg, msg_size, "free_blocks is %" PRIu64 ", the heap has %" PRIu64, h->free_blocks, free_blocks);
    *used_count_out = used_count;
    return SHM_OK;
}

/* The rules a single entry obeys, whatever the rest of the table. */
static int entry_check(const struct shm_entry *e, uint64_t slot, char *msg, size_t msg_size)
{
    uint32_t st = e->state, f = e->flags, pins = e->pin_count;
    if (st != SHM_STATE_CREATED && st != SHM_STATE_SEALED && st != SHM_STATE_SPILLED)
        return check_fail(msg, msg_size, "entry in slot %" PRIu64 ": state %u unknown", slot, st);
    if (f & ~(uint32_t)KNOWN_FLAGS)
        return check_fail(msg, msg_size, "entry in slot %" PRIu64 ": flags %#x unknown", slot, f);
    if ((f & SHM_FLAG_DELETE_PENDING) && pins == 0)
        return check_fail(msg, msg_size, "entry in slot %" PRIu64 ": DELETE_PENDING with pin_count 0", slot);
    if ((f & SHM_FLAG_SPILLING) && (st != SHM_STATE_SEALED || pins == 0))
        return check_fail(msg, msg_size, "entry in slot %" PRIu64 ": SPILLING but state %u, pin_count %u", slot, st, pins);
    if ((f & SHM_FLAG_LENT) && (st != SHM_STATE_SEALED || pins == 0))
        return check_fail(msg, msg_size, "entry in slot %" PRIu64 ": LENT but state %u, pin_count %u", slot, st, pins);
    if ((f & SHM_FLAG_RESTORING) && st != SHM_STATE_CREATED)
        return check_fail(msg, msg_size, "entry in slot %" PRIu64 ": RESTORING but state %u", slot, st);
    if (st == SHM_STATE_CREATED && pins)
        return check_fail(msg, msg_size, "entry in slot %" PRIu64 ": CREATED with pin_count %u", slot, pins);
    if (st == SHM_STATE_SPILLED && (pins || e->offset || f != SHM_FLAG_HAS_FILE))
        return check_fail(msg, msg_size, "entry in slot %" PRIu64 ": SPILLED with pin_count %u, offset %" PRIu64 ", flags %#x",
                          slot, pins, e->offset, f);
    if (st != SHM_STATE_SEALED && e->untracked)
        return check_fail(msg, msg_size, "entry in slot %" PRIu64 ": state %u with %u untracked pins", slot, st,
                          e->untracked);
    return SHM_OK;
}

/* Every entry is valid on its own and findable from its home slot (no EMPTY
 * slot and no entry with its id before it on its probe path); counters
 * match.  Claims on blocks go to `claims`; *claim_count_out gets how many. */
static int table_check(const struct shm_store *s, struct span *claims, uint64_t *claim_count_out, char *msg,
                       size_t msg_size)
{
    const struct shm_header *h = s->header;
    uint64_t objects = 0, created = 0, sealed = 0, spilled = 0, pinned = 0, n = 0;
    for (uint64_t i = 0; i <= s->slot_mask; i++) {
        const struct shm_entry *e = &s->table[i];
        if (e->state == SHM_STATE_EMPTY)
            continue;
        int rc = entry_check(e, i, msg, msg_size);
        if (rc != SHM_OK)
            return rc;
        for (uint64_t j = table_home(s, e->id); j != i; j = (j + 1) & s->slot_mask) {
            if (s->table[j].state == SHM_STATE_EMPTY)
                return check_fail(msg, msg_size, "entry in slot %" PRIu64 ": unreachable, slot %" PRIu64 " on its probe path is EMPTY",
                                  i, j);
            if (memcmp(s->table[j].id, e->id, SHM_ID_SIZE) == 0)
                return check_fail(msg, msg_size, "entry in slot %" PRIu64 ": its id is also in slot %" PRIu64, i, j);
        }
        objects++;
        created += e->state == SHM_STATE_CREATED;
        sealed += e->state == SHM_STATE_SEALED;
        spilled += e->state == SHM_STATE_SPILLED;
        pinned += e->pin_count > 0;
        if (e->state != SHM_STATE_SPILLED)
            claims[n++] = (struct span){e->offset, e->data_size + e->metadata_size};
    }
    if (objects != h->num_objects || created != h->num_created || sealed != h->num_sealed ||
        spilled != h->num_spilled || pinned != h->num_pinned)
        return check_fail(msg, msg_size,
                          "counters (objects %" PRIu64 ", created %" PRIu64 ", sealed %" PRIu64 ", spilled %" PRIu64
                          ", pinned %" PRIu64 ") disagree with the table (%" PRIu64 ", %" PRIu64 ", %" PRIu64 ", %" PRIu64
                          ", %" PRIu64 ")",
                          h->num_objects, h->num_created, h->num_sealed, h->num_spilled, h->num_pinned, objects, created,
                          sealed, spilled, pinned);
    if (objects > s->slot_mask + 1 - (s->slot_mask + 1) / 4)
        return check_fail(msg, msg_size, "table holds %" PRIu64 " entries, above its load limit", objects);
    *claim_count_out = n;
    return SHM_OK;
}

/* Used blocks and entries' claims, both sorted by offset, must pair up one
 * to one, each entry fitting in its block. */
static int ownership_check(struct span *used, uint64_t used_count, struct span *claims, uint64_t claim_count,
                           char *msg, size_t msg_size)
{
    qsort(claims, claim_count, sizeof *claims, span_cmp);
    for (uint64_t i = 0; i < used_count || i < claim_count; i++) {
        if (i >= claim_count || (i < used_count && used[i].offset < claims[i].offset))
            return check_fail(msg, msg_size, "block at offset %" PRIu64 ": used, but no entry points at it",
                              used[i].offset - BLOCK_HEADER_SIZE);
        if (i >= used_count || claims[i].offset < used[i].offset)
            return check_fail(msg, msg_size, "entry with offset %" PRIu64 ": not the payload of a used block%s",
                              claims[i].offset,
                              i + 1 < claim_count && claims[i + 1].offset == claims[i].offset ? " (shared with another entry)" : "");
        if (claims[i].bytes > used[i].bytes)
            return check_fail(msg, msg_size, "entry with offset %" PRIu64 ": %" PRIu64 " bytes in a %" PRIu64 "-byte payload",
                              claims[i].offset, claims[i].bytes, used[i].bytes);
    }
    return SHM_OK;
}

/* Every pin table slot names a process and a sealed object, holds a pin or
 * more, and is the one a lookup finds (reachable from its home, no twin); per
 * object, its lent buffer, its slots and its untracked pins are its pins; the
 * counters match. */
static int pins_check(const struct shm_store *s, char *msg, size_t msg_size)
{
    const struct shm_header *h = s->header;
    uint64_t *tracked = calloc(s->slot_mask + 1, sizeof *tracked);
    uint32_t holders[HOLDER_BUCKETS] = {0};
    if (!tracked)
        return SHM_ERR_SYSTEM;
    uint64_t used = 0, untracked = 0;
    int rc = SHM_OK;
    for (uint64_t i = 0; i <= s->pin_mask && rc == SHM_OK; i++) {
        const struct shm_pin *p = &s->pins[i];
        if (p->pid == 0)
            continue;
        used++;
        const struct shm_entry *e = table_find(s, p->id);
        if (p->pid < 0 || p->count == 0 || p->spilling > 1)
            rc = check_fail(msg, msg_size, "pin slot %" PRIu64 ": pid %d, count %u, spilling %u", i, (int)p->pid,
                            p->count, p->spilling);
        else if (pin_find(s, p->id, p->pid) != p)
            rc = check_fail(msg, msg_size, "pin slot %" PRIu64 ": not the slot a lookup finds (unreachable or a twin)", i);
        else if (!e || e->state != SHM_STATE_SEALED)
            rc = check_fail(msg, msg_size, "pin slot %" PRIu64 ": pins an object that is not sealed", i);
        else if (p->spilling && !(e->flags & SHM_FLAG_SPILLING))
            rc = check_fail(msg, msg_size, "pin slot %" PRIu64 ": holds a spill's pin, its object is not spilling", i);
        else {
            tracked[e - s->table] += p->count;
            holders[(uint32_t)p->pid % HOLDER_BUCKETS]++;
        }
    }
    for (uint64_t i = 0; i <= s->slot_mask && rc == SHM_OK; i++) {
        const struct shm_entry *e = &s->table[i];
        if (e->state != SHM_STATE_SEALED)
            continue;
        uint64_t known = tracked[i] + e->untracked + ((e->flags & SHM_FLAG_LENT) ? 1 : 0);
        if (known != e->pin_count)
            rc = check_fail(msg, msg_size,
                            "entry in slot %" PRIu64 ": %u pins, its holders and untracked pins make %" PRIu64, i,
                            e->pin_count, known);
        untracked += e->untracked;
    }
    if (rc == SHM_OK && (used != h->num_pins || untracked != h->untracked))
        rc = check_fail(msg, msg_size,
                        "pin counters (slots %" PRIu64 ", untracked %" PRIu64 ") disagree with the tables (%" PRIu64
                        ", %" PRIu64 ")",
                        h->num_pins, h->untracked, used, untracked);
    for (int b = 0; b < HOLDER_BUCKETS && rc == SHM_OK; b++)
        if (holders[b] != h->holders[b])
            rc = check_fail(msg, msg_size, "holders of pid bucket %d: %u counted, %u in the pin table", b,
                            h->holders[b], holders[b]);
    if (rc == SHM_OK && used > s->pin_mask + 1 - (s->pin_mask + 1) / 4)
        rc = check_fail(msg, msg_size, "pin table holds %" PRIu64 " slots, above its load limit", used);
    free(tracked);
    return rc;
}

static int store_check(const struct shm_store *s, char *msg, size_t msg_size)
{
    const struct shm_header *h = s->header;
    if (h->magic != SHM_MAGIC || h->version != SHM_VERSION || !header_geometry_valid(h, s->size))
        return check_fail(msg, msg_size, "header: bad magic, version or geometry");
    uint64_t used_count = 0, claim_count = 0;
    int rc = heap_check(s, NULL, &used_count, msg, msg_size);
    if (rc != SHM_OK)
        return rc;
    uint64_t entries = 0;
    for (uint64_t i = 0; i <= s->slot_mask; i++)
        entries += s->table[i].state != SHM_STATE_EMPTY;
    struct span *used = malloc((used_count + 1) * sizeof *used);
    struct span *claims = malloc((entries + 1) * sizeof *claims);
    if (!used || !claims) {
        rc = SHM_ERR_SYSTEM;
    } else {
        rc = heap_check(s, used, &used_count, msg, msg_size);
        if (rc == SHM_OK)
            rc = table_check(s, claims, &claim_count, msg, msg_size);
        if (rc == SHM_OK)
            rc = ownership_check(used, used_count, claims, claim_count, msg, msg_size);
        if (rc == SHM_OK)
            rc = pins_check(s, msg, msg_size);
    }
    free(used);
    free(claims);
    return rc;
}

int shm_check(shm_store *s, char *msg, size_t msg_size)
{
    if (!s)
        return SHM_ERR_INVALID;
    if (msg && msg_size)
        msg[0] = '\0';
    int rc = store_lock(s);
    if (rc != SHM_OK)
        return rc;
    rc = store_check(s, msg, msg_size);
    store_unlock(s);
    return rc;
}

/* --- copying ----------------------------------------------------------------------------- */

/* Below this a copy takes about a millisecond, and starting threads is not
 * worth it. */
#define COPY_PARALLEL_MIN (UINT64_C(8) << 20)
#define COPY_MAX_THREADS 8

struct copy_chunk {
    uint8_t *dst;
    const uint8_t *src;
    size_t n;
};

static void *copy_chunk_run(void *arg)
{
    struct copy_chunk *c = arg;
    memcpy(c->dst, c->src, c->n);
    return NULL;
}

void shm_copy(void *dst, const void *src, uint64_t n, int threads)
{
    if (threads > COPY_MAX_THREADS)
        threads = COPY_MAX_THREADS;
    if (n == 0)
        return;
    if (threads <= 1 || n < COPY_PARALLEL_MIN) {
        memcpy(dst, src, n);
        return;
    }
    /* Cut on page boundaries of dst, so no two threads fault in or write the
     * same page. */
    struct copy_chunk chunk[COPY_MAX_THREADS];
    uintptr_t d = (uintptr_t)dst;
    uint64_t start = 0;
    for (int i = 0; i < threads; i++) {
        uint64_t end = n;
        if (i < threads - 1) {
            end = align_up(d + n / (uint64_t)threads * (uint64_t)(i + 1), PAGE_SIZE_ASSUMED) - d;
            end = end > n ? n : end;
        }
        chunk[i] = (struct copy_chunk){(uint8_t *)dst + start, (const uint8_t *)src + start, end - start};
        start = end;
    }
    pthread_t tid[COPY_MAX_THREADS];
    bool started[COPY_MAX_THREADS] = {false};
    for (int i = 1; i < threads; i++) {
        started[i] = pthread_create(&tid[i], NULL, copy_chunk_run, &chunk[i]) == 0;
        if (!started[i])
            copy_chunk_run(&chunk[i]);
    }
    copy_chunk_run(&chunk[0]);
    for (int i = 1; i < threads; i++)
        if (started[i])
            pthread_join(tid[i], NULL);
}

/* --- test hooks -------------------------------------------------------------------------- */

int shm_debug_lock(shm_store *s)
{
    if (!s)
        return SHM_ERR_INVALID;
    return store_lock(s);
}

void shm_debug_crash_at(int point)
{
    crash_point_armed = point;
}
