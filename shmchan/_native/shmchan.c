/*
 * shmchan.c - the shmchan v2 ring (see shmchan.h and docs/layout.md).
 *
 * Memory ordering: every word another process reads or writes concurrently is accessed
 * with a C11 atomic whose order is written at the call, with the rule of docs/layout.md
 * section 9 it implements in a comment (R1..R6, W1, W2, L1..L3). Record bytes and the
 * identity block are ordinary memory: the commit stores and the magic store publish
 * them.
 */
#define _GNU_SOURCE
#include "shmchan.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "8-byte atomics must be lock-free");
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "4-byte atomics must be lock-free");
_Static_assert(sizeof(_Atomic uint64_t) == 8 && sizeof(_Atomic uint32_t) == 4, "atomic sizes");
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the shmchan layout is little-endian"
#endif

typedef _Atomic uint64_t a64;
typedef _Atomic uint32_t a32;

#define W64(c, off) ((a64 *)((c)->base + (off)))
#define W32(c, off) ((a32 *)((c)->base + (off)))

/* Units and counts of a commit word. */
#define UNITS(w) ((w) & SHMCHAN_UNIT_MASK)
#define COUNT(w) ((w) >> SHMCHAN_UNIT_BITS)
static inline uint64_t mkword(uint64_t count, uint64_t units) {
    return ((count & SHMCHAN_COUNT_MASK) << SHMCHAN_UNIT_BITS) | (units & SHMCHAN_UNIT_MASK);
}
static inline uint64_t align16(uint64_t n) { return (n + 15) & ~(uint64_t)15; }

/* A batch publishes at least every BATCH_BYTES of ring, so the other side can copy
 * what is published while this side goes on. */
#define BATCH_BYTES (64u * 1024u)
/* Lock waiters check the holder's liveness this often; the first check comes sooner. */
#define LIVENESS_PERIOD 0.010
#define LIVENESS_FIRST 0.002
/* Spin budgets (nanoseconds) before sleeping. */
#define SPIN_MIN_NS 2000
#define SPIN_START_NS 50000
#define SPIN_MAX_NS 100000
/* Wakes that woke nobody before the waiter bitmaps are swept for dead peers. */
#define IDLE_WAKES_BEFORE_SWEEP 16

static const uint32_t seq_off[3] = {SHMCHAN_OFF_NE_SEQ, SHMCHAN_OFF_NF_SEQ, SHMCHAN_OFF_JN_SEQ};
static const uint32_t bitmap_off[3] = {SHMCHAN_OFF_WAITING_CONSUMERS, SHMCHAN_OFF_WAITING_PRODUCERS,
                                       SHMCHAN_OFF_WAITING_JOINERS};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

double shmchan_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void set_why(shmchan_chan *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_why(shmchan_chan *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->why, sizeof c->why, fmt, ap);
    va_end(ap);
}

static void put_why(char *why, size_t whylen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void put_why(char *why, size_t whylen, const char *fmt, ...) {
    if (!why || !whylen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, whylen, fmt, ap);
    va_end(ap);
}

/* ---- test-only fault points ---------------------------------------------------------- */

static pthread_once_t fault_once = PTHREAD_ONCE_INIT;
static int fault_on;
static char fault_point[64];
static int fault_action; /* 1 stop, 2 exit */
static long fault_countdown = 1;

static void fault_init(void) {
    const char *spec = getenv("SHMCHAN_TEST_FAULT");
    if (!spec || !*spec) return;
    char buf[64];
    snprintf(buf, sizeof buf, "%s", spec);
    char *act = strchr(buf, ':');
    if (!act) return;
    *act++ = 0;
    char *count = strchr(act, ':');
    if (count) {
        *count++ = 0;
        fault_countdown = strtol(count, NULL, 10);
        if (fault_countdown < 1) fault_countdown = 1;
    }
    snprintf(fault_point, sizeof fault_point, "%s", buf);
    fault_action = !strcmp(act, "stop") ? 1 : !strcmp(act, "exit") ? 2 : 0;
    fault_on = fault_action != 0;
}

void shmchan_fault(const char *point) {
    if (!fault_on || strcmp(point, fault_point) != 0) return;
    if (__atomic_sub_fetch(&fault_countdown, 1, __ATOMIC_SEQ_CST) != 0) return;
    if (fault_action == 1) {
        static const char msg[] = "shmchan: parked at a test fault point\n";
        ssize_t ignored = write(2, msg, sizeof msg - 1);
        (void)ignored;
        raise(SIGSTOP);
    } else {
        _exit(137);
    }
}

#define FAULT(point)                                       \
    do {                                                   \
        if (__builtin_expect(fault_on, 0)) shmchan_fault(point); \
    } while (0)

/* ---- little-endian field access for the immutable identity block ------------------- */

static uint64_t rd64(const void *base, size_t off) {
    uint64_t v;
    memcpy(&v, (const uint8_t *)base + off, 8);
    return v;
}
static uint32_t rd32(const void *base, size_t off) {
    uint32_t v;
    memcpy(&v, (const uint8_t *)base + off, 4);
    return v;
}
static uint16_t rd16(const void *base, size_t off) {
    uint16_t v;
    memcpy(&v, (const uint8_t *)base + off, 2);
    return v;
}
static void wr64(void *base, size_t off, uint64_t v) { memcpy((uint8_t *)base + off, &v, 8); }
static void wr32(void *base, size_t off, uint32_t v) { memcpy((uint8_t *)base + off, &v, 4); }
static void wr16(void *base, size_t off, uint16_t v) { memcpy((uint8_t *)base + off, &v, 2); }

/* ---- futex ------------------------------------------------------------------------- */

/* Shared (not FUTEX_PRIVATE) futexes: the words live in memory other processes map. */
static long futex_wait(a32 *word, uint32_t expected, double timeout) {
    struct timespec ts;
    if (timeout < 0) timeout = 0;
    ts.tv_sec = (time_t)timeout;
    ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
    return syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, &ts, NULL, 0);
}

static long futex_wake(a32 *word, int n) {
    return syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* ---- CRC-32 (IEEE 802.3, as zlib.crc32) --------------------------------------------- */

uint32_t shmchan_crc32_update(uint32_t crc, const void *p, size_t n) {
    const uint8_t *b = p;
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= b[i];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

uint32_t shmchan_crc32(const void *p, size_t n) { return shmchan_crc32_update(0, p, n); }

/* ---- header -------------------------------------------------------------------------- */

uint32_t shmchan_header_size(uint32_t max_peers) {
    uint64_t end = SHMCHAN_PEER_TABLE_OFFSET + (uint64_t)SHMCHAN_PEER_ENTRY_SIZE * max_peers;
    return (uint32_t)((end + 4095) & ~(uint64_t)4095);
}

const char *shmchan_check_geometry(uint64_t capacity, uint64_t max_record) {
    if (capacity < SHMCHAN_MIN_CAPACITY || capacity > SHMCHAN_MAX_CAPACITY || (capacity & (capacity - 1)))
        return "capacity is not a power of two in [4096, 2**40]";
    if (max_record % SHMCHAN_RECORD_ALIGN || max_record < SHMCHAN_RECORD_HEADER_SIZE)
        return "max_record is not a multiple of 16 of at least 16";
    if (max_record > capacity / 2 || max_record > SHMCHAN_MAX_RECORD_LIMIT)
        return "max_record exceeds capacity/2 or 2**31";
    return NULL;
}

int shmchan_init_header(void *base, uint64_t size, const shmchan_params *p, char *why, size_t whylen) {
    uint32_t max_peers = p->max_peers ? p->max_peers : SHMCHAN_DEFAULT_MAX_PEERS;
    uint32_t side_slots = p->side_slots ? p->side_slots : SHMCHAN_DEFAULT_SIDE_SLOTS;
    uint32_t side_retained = p->side_retained ? p->side_retained : SHMCHAN_DEFAULT_SIDE_RETAINED;
    if (side_retained > side_slots) side_retained = side_slots;
    const char *bad = shmchan_check_geometry(p->capacity, p->max_record);
    if (bad) {
        put_why(why, whylen, "%s", bad);
        return SHMCHAN_E_STATE;
    }
    if (max_peers > SHMCHAN_MAX_PEERS_LIMIT || side_slots > SHMCHAN_SIDE_SLOTS_MAX || !p->nonce ||
        (p->liveness != SHMCHAN_LIVENESS_OFD && p->liveness != SHMCHAN_LIVENESS_SYSV)) {
        put_why(why, whylen, "bad creation parameters");
        return SHMCHAN_E_STATE;
    }
    uint32_t header_size = shmchan_header_size(max_peers);
    if (size != (uint64_t)header_size + p->capacity) {
        put_why(why, whylen, "segment is %llu bytes, needs %llu", (unsigned long long)size,
                (unsigned long long)header_size + p->capacity);
        return SHMCHAN_E_STATE;
    }
    /* The creator owns the unpublished segment: ordinary stores, published by magic. */
    wr16(base, SHMCHAN_OFF_LAYOUT_MAJOR, SHMCHAN_LAYOUT_MAJOR);
    wr16(base, SHMCHAN_OFF_LAYOUT_MINOR, SHMCHAN_LAYOUT_MINOR);
    wr32(base, SHMCHAN_OFF_HEADER_SIZE, header_size);
    wr64(base, SHMCHAN_OFF_CAPACITY, p->capacity);
    wr32(base, SHMCHAN_OFF_MAX_RECORD, p->max_record);
    wr16(base, SHMCHAN_OFF_RECORD_HEADER_SIZE, SHMCHAN_RECORD_HEADER_SIZE);
    wr16(base, SHMCHAN_OFF_RECORD_ALIGN, SHMCHAN_RECORD_ALIGN);
    wr32(base, SHMCHAN_OFF_FEATURES_INCOMPAT, 0);
    wr32(base, SHMCHAN_OFF_FEATURES_COMPAT, 0);
    wr64(base, SHMCHAN_OFF_NONCE, p->nonce);
    wr16(base, SHMCHAN_OFF_LIVENESS_KIND, (uint16_t)p->liveness);
    wr16(base, SHMCHAN_OFF_WAKEUP_KIND, SHMCHAN_WAKEUP_FUTEX);
    wr32(base, SHMCHAN_OFF_CREATOR_PID, p->creator_pid);
    wr64(base, SHMCHAN_OFF_CREATED_UNIX_NS, p->created_unix_ns);
    wr32(base, SHMCHAN_OFF_SEMID_PEERS, (uint32_t)(p->liveness == SHMCHAN_LIVENESS_SYSV ? p->semid_peers : -1));
    wr32(base, SHMCHAN_OFF_SEMID_PRESENCE,
         (uint32_t)(p->liveness == SHMCHAN_LIVENESS_SYSV ? p->semid_presence : -1));
    wr32(base, SHMCHAN_OFF_MAX_PEERS, max_peers);
    wr32(base, SHMCHAN_OFF_PEER_TABLE_OFFSET, SHMCHAN_PEER_TABLE_OFFSET);
    wr64(base, SHMCHAN_OFF_MAX_ITEMS, p->max_items);
    wr32(base, SHMCHAN_OFF_SIDE_SLOTS, side_slots);
    wr32(base, SHMCHAN_OFF_SIDE_TABLE_OFFSET, SHMCHAN_SIDE_TABLE_OFFSET);
    wr32(base, SHMCHAN_OFF_CREATOR_UID, p->creator_uid);
    wr32(base, SHMCHAN_OFF_SIDE_RETAINED, side_retained);
    wr32(base, SHMCHAN_OFF_HEADER_CRC, shmchan_crc32((const uint8_t *)base + 8, SHMCHAN_OFF_HEADER_CRC - 8));
    return SHMCHAN_OK;
}

void shmchan_publish(void *base) {
    /* R6: every initialising store happens before magic (release). */
    atomic_store_explicit((a64 *)base, SHMCHAN_MAGIC, memory_order_release);
}

int shmchan_check_header(const void *base, uint64_t size, int liveness, char *why, size_t whylen) {
    if (size < SHMCHAN_HEADER_BASE) {
        put_why(why, whylen, "segment is %llu bytes, shorter than a header", (unsigned long long)size);
        return SHMCHAN_E_CORRUPT;
    }
    /* R6: magic (acquire) before any header field. */
    uint64_t magic = atomic_load_explicit((a64 *)base, memory_order_acquire);
    if (magic != SHMCHAN_MAGIC) {
        put_why(why, whylen, "not a shmchan segment (magic %#018llx)", (unsigned long long)magic);
        return SHMCHAN_E_NOTSHM;
    }
    uint16_t major = rd16(base, SHMCHAN_OFF_LAYOUT_MAJOR), minor = rd16(base, SHMCHAN_OFF_LAYOUT_MINOR);
    if (major != SHMCHAN_LAYOUT_MAJOR) {
        put_why(why, whylen, "the segment uses layout %u.%u; this shmchan reads layout %u.x only", major, minor,
                SHMCHAN_LAYOUT_MAJOR);
        return SHMCHAN_E_INCOMPAT;
    }
    uint32_t incompat = rd32(base, SHMCHAN_OFF_FEATURES_INCOMPAT);
    if (incompat) {
        put_why(why, whylen, "the segment needs unknown incompatible features %#x", incompat);
        return SHMCHAN_E_INCOMPAT;
    }
    if (shmchan_crc32((const uint8_t *)base + 8, SHMCHAN_OFF_HEADER_CRC - 8) != rd32(base, SHMCHAN_OFF_HEADER_CRC)) {
        put_why(why, whylen, "header checksum mismatch");
        return SHMCHAN_E_CORRUPT;
    }
    uint32_t max_peers = rd32(base, SHMCHAN_OFF_MAX_PEERS), header_size = rd32(base, SHMCHAN_OFF_HEADER_SIZE);
    uint32_t side_slots = rd32(base, SHMCHAN_OFF_SIDE_SLOTS);
    uint64_t capacity = rd64(base, SHMCHAN_OFF_CAPACITY);
    uint32_t max_record = rd32(base, SHMCHAN_OFF_MAX_RECORD);
    if (max_peers < 1 || max_peers > SHMCHAN_MAX_PEERS_LIMIT || header_size != shmchan_header_size(max_peers) ||
        rd32(base, SHMCHAN_OFF_PEER_TABLE_OFFSET) != SHMCHAN_PEER_TABLE_OFFSET ||
        rd32(base, SHMCHAN_OFF_SIDE_TABLE_OFFSET) != SHMCHAN_SIDE_TABLE_OFFSET || side_slots > SHMCHAN_SIDE_SLOTS_MAX ||
        rd32(base, SHMCHAN_OFF_SIDE_RETAINED) > side_slots) {
        put_why(why, whylen, "impossible header geometry (header_size %u, max_peers %u, side_slots %u)", header_size,
                max_peers, side_slots);
        return SHMCHAN_E_CORRUPT;
    }
    if (rd16(base, SHMCHAN_OFF_RECORD_HEADER_SIZE) != SHMCHAN_RECORD_HEADER_SIZE ||
        rd16(base, SHMCHAN_OFF_RECORD_ALIGN) != SHMCHAN_RECORD_ALIGN) {
        put_why(why, whylen, "unsupported record header size or alignment");
        return SHMCHAN_E_CORRUPT;
    }
    const char *bad = shmchan_check_geometry(capacity, max_record);
    if (bad) {
        put_why(why, whylen, "%s", bad);
        return SHMCHAN_E_CORRUPT;
    }
    if (size != (uint64_t)header_size + capacity) {
        put_why(why, whylen, "segment is %llu bytes, its header says %llu", (unsigned long long)size,
                (unsigned long long)header_size + capacity);
        return SHMCHAN_E_CORRUPT;
    }
    uint16_t kind = rd16(base, SHMCHAN_OFF_LIVENESS_KIND);
    if (kind != SHMCHAN_LIVENESS_OFD && kind != SHMCHAN_LIVENESS_SYSV) {
        put_why(why, whylen, "unknown liveness kind %u", kind);
        return SHMCHAN_E_CORRUPT;
    }
    if (liveness && kind != liveness) {
        put_why(why, whylen, "liveness kind %u is not this backend's %d", kind, liveness);
        return SHMCHAN_E_INCOMPAT;
    }
    if (rd16(base, SHMCHAN_OFF_WAKEUP_KIND) != SHMCHAN_WAKEUP_FUTEX) {
        put_why(why, whylen, "unknown wakeup kind %u", rd16(base, SHMCHAN_OFF_WAKEUP_KIND));
        return SHMCHAN_E_CORRUPT;
    }
    /* R2/R4: the positions (acquire). */
    uint64_t h = atomic_load_explicit((a64 *)((const uint8_t *)base + SHMCHAN_OFF_HEAD), memory_order_acquire);
    uint64_t t = atomic_load_explicit((a64 *)((const uint8_t *)base + SHMCHAN_OFF_TAIL), memory_order_acquire);
    uint64_t used = ((UNITS(t) - UNITS(h)) & SHMCHAN_UNIT_MASK) << 4;
    uint64_t records = (COUNT(t) - COUNT(h)) & SHMCHAN_COUNT_MASK;
    if (used > capacity || records * 16 > used) {
        put_why(why, whylen, "impossible ring positions (head %#llx, tail %#llx)", (unsigned long long)h,
                (unsigned long long)t);
        return SHMCHAN_E_CORRUPT;
    }
    return SHMCHAN_OK;
}

/* ---- attach ---------------------------------------------------------------------------- */

static inline uint64_t peer_off(uint32_t slot) {
    return SHMCHAN_PEER_TABLE_OFFSET + (uint64_t)SHMCHAN_PEER_ENTRY_SIZE * slot;
}

int shmchan_open(shmchan_chan *c, void *base, uint64_t size, int fd) {
    pthread_once(&fault_once, fault_init);
    memset(c, 0, sizeof *c);
    c->slot = -1;
    c->fd = fd;
    c->semid_peers = c->semid_presence = -1;
    int rc = shmchan_check_header(base, size, 0, c->why, sizeof c->why);
    if (rc != SHMCHAN_OK) return rc;
    /* Process-local copies of the geometry: every bound check uses these, so a peer that
     * scribbles on the header later cannot make this process index outside the mapping. */
    c->base = base;
    c->size = size;
    c->capacity = rd64(base, SHMCHAN_OFF_CAPACITY);
    c->mask = c->capacity - 1;
    c->max_record = rd32(base, SHMCHAN_OFF_MAX_RECORD);
    c->header_size = rd32(base, SHMCHAN_OFF_HEADER_SIZE);
    c->max_peers = rd32(base, SHMCHAN_OFF_MAX_PEERS);
    c->side_slots = rd32(base, SHMCHAN_OFF_SIDE_SLOTS);
    c->side_retained = rd32(base, SHMCHAN_OFF_SIDE_RETAINED);
    c->max_items = rd64(base, SHMCHAN_OFF_MAX_ITEMS);
    c->liveness = rd16(base, SHMCHAN_OFF_LIVENESS_KIND);
    c->semid_peers = (int32_t)rd32(base, SHMCHAN_OFF_SEMID_PEERS);
    c->semid_presence = (int32_t)rd32(base, SHMCHAN_OFF_SEMID_PRESENCE);
    c->data = (uint8_t *)base + c->header_size;
    c->spin_ns[0] = c->spin_ns[1] = sysconf(_SC_NPROCESSORS_ONLN) > 1 ? SPIN_START_NS : 0;
    pthread_mutex_t *m = malloc(sizeof *m);
    if (!m) {
        errno = ENOMEM;
        return SHMCHAN_E_SYS;
    }
    pthread_mutex_init(m, NULL);
    c->reg_lock = m;
    return SHMCHAN_OK;
}

void shmchan_close(shmchan_chan *c) {
    if (c->reg_lock) {
        pthread_mutex_destroy(c->reg_lock);
        free(c->reg_lock);
        c->reg_lock = NULL;
    }
}

/* Liveness locks: the kernel releases them when their holder dies, however it dies.
 * Kind 1: an exclusive OFD lock on the slot's first byte, on our own open file
 * description. Kind 2: semaphore `slot` of the peers set, taken 0 -> 1 with SEM_UNDO. */
static int live_trylock(shmchan_chan *c, uint32_t slot) {
    if (c->liveness == SHMCHAN_LIVENESS_OFD) {
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = (off_t)peer_off(slot), .l_len = 1};
        for (;;) {
            if (fcntl(c->fd, F_OFD_SETLK, &fl) == 0) return SHMCHAN_OK;
            if (errno == EINTR) continue;
            return (errno == EAGAIN || errno == EACCES) ? SHMCHAN_BUSY : SHMCHAN_E_SYS;
        }
    }
    struct sembuf ops[2] = {{(unsigned short)slot, 0, IPC_NOWAIT}, {(unsigned short)slot, 1, SEM_UNDO | IPC_NOWAIT}};
    for (;;) {
        if (semop(c->semid_peers, ops, 2) == 0) return SHMCHAN_OK;
        if (errno == EINTR) continue;
        return errno == EAGAIN ? SHMCHAN_BUSY : SHMCHAN_E_SYS;
    }
}

static void live_unlock(shmchan_chan *c, uint32_t slot) {
    int saved = errno;
    if (c->liveness == SHMCHAN_LIVENESS_OFD) {
        struct flock fl = {.l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = (off_t)peer_off(slot), .l_len = 1};
        (void)fcntl(c->fd, F_OFD_SETLK, &fl);
    } else {
        struct sembuf op = {(unsigned short)slot, -1, SEM_UNDO | IPC_NOWAIT};
        (void)semop(c->semid_peers, &op, 1);
    }
    errno = saved;
}

/* 1 if some process holds slot's liveness lock, 0 if none, -1 on error. Kind 1: our own
 * open file's locks are invisible to F_OFD_GETLK, so callers handle their own slot. */
static int live_held(shmchan_chan *c, uint32_t slot) {
    if (c->liveness == SHMCHAN_LIVENESS_OFD) {
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = (off_t)peer_off(slot), .l_len = 1};
        if (fcntl(c->fd, F_OFD_GETLK, &fl) != 0) return -1;
        return fl.l_type != F_UNLCK;
    }
    int v = semctl(c->semid_peers, (int)slot, GETVAL);
    return v < 0 ? -1 : v > 0;
}

/* Whether the owner of (slot, gen) is alive. False negatives are impossible: a live owner
 * holds its liveness lock all the time it is attached, and its generation stays. A false
 * positive (the slot was just re-claimed, its new generation not yet stored) only delays a
 * takeover until the next check. Errors count as alive (never rob on doubt). */
static int owner_alive(shmchan_chan *c, uint32_t slot, uint32_t gen, uint32_t genmask) {
    if (slot >= c->max_peers) return 0;
    if ((int)slot == c->slot) return (c->gen & genmask) == gen;
    a32 *g = W32(c, peer_off(slot) + SHMCHAN_PEER_GEN);
    /* L2: the slot's generation (acquire) around the liveness probe. */
    if ((atomic_load_explicit(g, memory_order_acquire) & genmask) != gen) return 0;
    int held = live_held(c, slot);
    if (held == 0) return 0;
    /* Held, but perhaps by a new owner that has not stored its generation yet. */
    return (atomic_load_explicit(g, memory_order_acquire) & genmask) == gen;
}

int shmchan_token_dead(shmchan_chan *c, uint64_t token) {
    uint32_t slot1 = (uint32_t)(token & 0xFFFF);
    if (!slot1) return 1;
    return !owner_alive(c, slot1 - 1, (uint32_t)(token >> 16), 0xFFFFFFFFu);
}

static void clear_waiter_bits(shmchan_chan *c, uint32_t slot) {
    uint64_t bit = 1ULL << (slot & 63);
    for (int ev = 0; ev < 3; ev++)
        /* W1 (undo): the dead peer's registration goes (seq_cst RMW). */
        atomic_fetch_and_explicit(W64(c, bitmap_off[ev] + 8 * (slot >> 6)), ~bit, memory_order_seq_cst);
}

/* Uncount sleepers whose process died: for each set bit of a slot that is not ours, take
 * the slot's liveness lock if it can be had (then its owner is dead and no one reclaimed
 * it), clear the bits, give the lock back. */
static void sweep_waiters(shmchan_chan *c) {
    uint32_t words = (c->max_peers + 63) / 64;
    for (int ev = 0; ev < 3; ev++) {
        for (uint32_t w = 0; w < words; w++) {
            uint64_t bits = atomic_load_explicit(W64(c, bitmap_off[ev] + 8 * w), memory_order_relaxed);
            while (bits) {
                uint32_t slot = w * 64 + (uint32_t)__builtin_ctzll(bits);
                bits &= bits - 1;
                if ((int)slot == c->slot || slot >= c->max_peers) continue;
                if (live_trylock(c, slot) == SHMCHAN_OK) {
                    clear_waiter_bits(c, slot);
                    live_unlock(c, slot);
                }
            }
        }
    }
}

int shmchan_attach(shmchan_chan *c) {
    if (c->slot >= 0) return SHMCHAN_OK;
    uint32_t start = (uint32_t)getpid() * 2654435761u;
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t k = 0; k < c->max_peers; k++) {
            uint32_t slot = (start + k) % c->max_peers;
            a32 *flags = W32(c, peer_off(slot) + SHMCHAN_PEER_FLAGS);
            if (pass == 0 && atomic_load_explicit(flags, memory_order_relaxed) != 0) continue;
            int rc = live_trylock(c, slot);
            if (rc == SHMCHAN_BUSY) continue;
            if (rc != SHMCHAN_OK) return rc;
            /* The slot is ours. Whatever its dead previous owner registered goes first. */
            clear_waiter_bits(c, slot);
            a32 *g = W32(c, peer_off(slot) + SHMCHAN_PEER_GEN);
            uint32_t gen = atomic_load_explicit(g, memory_order_relaxed) + 1;
            if (!gen) gen = 1;
            /* L1: the new generation (release) after the liveness lock is held, before the
             * token can appear in any lock word. */
            atomic_store_explicit(g, gen, memory_order_release);
            atomic_store_explicit(W32(c, peer_off(slot) + SHMCHAN_PEER_PID), (uint32_t)getpid(),
                                  memory_order_relaxed);
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            atomic_store_explicit(W64(c, peer_off(slot) + SHMCHAN_PEER_ATTACHED_UNIX_NS),
                                  (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec, memory_order_relaxed);
            atomic_store_explicit(flags, 1, memory_order_release);
            c->slot = (int)slot;
            c->gen = gen;
            c->token = ((uint64_t)gen << 16) | (slot + 1);
            sweep_waiters(c);
            return SHMCHAN_OK;
        }
    }
    set_why(c, "all %u peer slots are held by live processes", c->max_peers);
    return SHMCHAN_E_NOPEERS;
}

void shmchan_detach(shmchan_chan *c) {
    if (c->roles & (1u << SHMCHAN_WRITER)) shmchan_presence_leave(c, SHMCHAN_WRITER);
    if (c->roles & (1u << SHMCHAN_READER)) shmchan_presence_leave(c, SHMCHAN_READER);
    if (c->slot >= 0) {
        uint32_t slot = (uint32_t)c->slot;
        clear_waiter_bits(c, slot);
        atomic_store_explicit(W32(c, peer_off(slot) + SHMCHAN_PEER_FLAGS), 0, memory_order_release);
        live_unlock(c, slot);
        c->slot = -1;
        c->token = 0;
    }
}

void shmchan_after_fork(shmchan_chan *c, int fd) {
    /* The parent's slot, lock token, presence and registrations stay the parent's. */
    c->slot = -1;
    c->token = 0;
    c->gen = 0;
    c->roles = 0;
    c->fd = fd;
    c->closing = 0;
    c->local_waiters[0] = c->local_waiters[1] = c->local_waiters[2] = 0;
    if (c->reg_lock) pthread_mutex_init(c->reg_lock, NULL); /* a parent thread may have held it */
}

/* ---- locks ------------------------------------------------------------------------------ */

static inline a64 *lock_word(shmchan_chan *c, int which) {
    return W64(c, which == SHMCHAN_RLOCK ? SHMCHAN_OFF_RLOCK : SHMCHAN_OFF_WLOCK);
}

int shmchan_trylock(shmchan_chan *c, int which) {
    if (c->slot < 0) return SHMCHAN_E_STATE;
    a64 *L = lock_word(c, which);
    for (int i = 0; i < 64; i++) {
        uint64_t v = atomic_load_explicit(L, memory_order_relaxed);
        /* L3: taking the lock is an acquire CAS; releasing it a release store, so one
         * holder's accesses happen before the next holder's (R5). */
        if (v == 0 && atomic_compare_exchange_weak_explicit(L, &v, c->token, memory_order_acquire,
                                                            memory_order_relaxed))
            return SHMCHAN_OK;
        cpu_relax();
    }
    return SHMCHAN_BUSY;
}

/* Finish what a dead write-lock holder left half done: a journaled side-segment put
 * (docs/layout.md 2.5). The read side needs no repair: a consumer's only store is its
 * commit. */
static void repair(shmchan_chan *c, int which) {
    if (which != SHMCHAN_WLOCK) return;
    a64 *J = W64(c, SHMCHAN_OFF_SIDE_JOURNAL);
    uint64_t j = atomic_load_explicit(J, memory_order_acquire);
    if (!j) return;
    uint32_t index = (uint32_t)(j & 0xFFFFFFFFu) - 1, ticket = (uint32_t)(j >> 32);
    uint64_t jt = atomic_load_explicit(W64(c, SHMCHAN_OFF_SIDE_JOURNAL_TAIL), memory_order_acquire);
    uint64_t t = atomic_load_explicit(W64(c, SHMCHAN_OFF_TAIL), memory_order_acquire);
    if (index < c->side_slots && t != jt) {
        /* Not committed: the entry goes back to FREE (it was WRITING or QUEUED by the dead). */
        a64 *S = W64(c, SHMCHAN_SIDE_TABLE_OFFSET + (uint64_t)SHMCHAN_SIDE_ENTRY_SIZE * index);
        uint64_t s = atomic_load_explicit(S, memory_order_acquire);
        uint32_t st = (uint32_t)(s & 3);
        if (((s >> 2) & 0x3FFFFFFFu) == ticket && (st == SHMCHAN_SIDE_WRITING || st == SHMCHAN_SIDE_QUEUED))
            atomic_compare_exchange_strong_explicit(S, &s, (uint64_t)ticket << 2, memory_order_acq_rel,
                                                    memory_order_relaxed);
    }
    atomic_store_explicit(J, 0, memory_order_release);
}

int shmchan_lock(shmchan_chan *c, int which, double deadline) {
    int rc = shmchan_trylock(c, which);
    if (rc != SHMCHAN_BUSY) return rc;
    a64 *L = lock_word(c, which);
    double start = shmchan_now(), next_check = start + LIVENESS_FIRST;
    long sleep_ns = 20000;
    for (unsigned iter = 0;; iter++) {
        uint64_t v = atomic_load_explicit(L, memory_order_relaxed);
        if (v == 0) {
            if (atomic_compare_exchange_strong_explicit(L, &v, c->token, memory_order_acquire, memory_order_relaxed))
                return SHMCHAN_OK;
            continue;
        }
        if (atomic_load_explicit((_Atomic int *)&c->closing, memory_order_relaxed)) return SHMCHAN_CLOSED;
        double now = shmchan_now();
        if (now >= next_check) {
            next_check = now + LIVENESS_PERIOD;
            if (v != c->token && shmchan_token_dead(c, v)) {
                /* Takeover: the CAS from the dead token succeeds for exactly one waiter. */
                if (atomic_compare_exchange_strong_explicit(L, &v, c->token, memory_order_acquire,
                                                            memory_order_relaxed)) {
                    repair(c, which);
                    atomic_fetch_add_explicit(W64(c, SHMCHAN_OFF_RECOVERIES), 1, memory_order_relaxed);
                    return SHMCHAN_OK;
                }
                continue;
            }
        }
        if (deadline >= 0 && now >= deadline) return SHMCHAN_TIMEOUT;
        if (c->slice_intr && now - start >= SHMCHAN_WAIT_SLICE) return SHMCHAN_INTR;
        /* A holder keeps the lock for a microsecond unless it is descheduled (a loaded
         * machine), stopped or dead. For about a millisecond, yield the processor (the
         * holder may be waiting for it); only then back off to sleeps, never past the
         * deadline or the next liveness check. */
        if (now - start < 0.001) {
            for (int i = 0; i < 16; i++) cpu_relax();
            sched_yield();
            continue;
        }
        double until = next_check;
        if (deadline >= 0 && deadline < until) until = deadline;
        double left = until - now;
        long ns = sleep_ns;
        if (left * 1e9 < (double)ns) ns = left > 0 ? (long)(left * 1e9) + 1 : 1;
        struct timespec ts = {0, ns};
        if (nanosleep(&ts, NULL) != 0 && errno == EINTR) return SHMCHAN_INTR;
        if (sleep_ns < 1000000) sleep_ns *= 2;
        (void)iter;
    }
}

void shmchan_unlock(shmchan_chan *c, int which) {
    /* L3: release store: everything done under the lock happens before the next holder. */
    atomic_store_explicit(lock_word(c, which), 0, memory_order_release);
}

/* ---- producer side ----------------------------------------------------------------------- */

typedef void (*precommit_fn)(shmchan_chan *c, uint64_t new_tail, void *arg);

/* SHMCHAN_OK, or the error a state other than NORMAL means. */
static int state_error(shmchan_chan *c) {
    uint32_t st = atomic_load_explicit(W32(c, SHMCHAN_OFF_STATE), memory_order_acquire);
    if (st == SHMCHAN_STATE_NORMAL) return SHMCHAN_OK;
    if (st == SHMCHAN_STATE_REMOVED) {
        set_why(c, "the channel was removed");
        return SHMCHAN_E_REMOVED;
    }
    set_why(c, "the channel was marked corrupt");
    return SHMCHAN_E_CORRUPT;
}

static int append(shmchan_chan *c, const shmchan_rec *recs, size_t nrec, size_t *written, precommit_fn hook,
                  void *arg) {
    *written = 0;
    int bad = state_error(c);
    if (bad) return bad;
    FAULT("w.locked");
    /* We hold the write lock: only write-lock holders store tail. */
    uint64_t t = atomic_load_explicit(W64(c, SHMCHAN_OFF_TAIL), memory_order_relaxed);
    /* R4: head (acquire) before overwriting the bytes consumers released. */
    uint64_t h = atomic_load_explicit(W64(c, SHMCHAN_OFF_HEAD), memory_order_acquire);
    uint64_t used = ((UNITS(t) - UNITS(h)) & SHMCHAN_UNIT_MASK) << 4;
    uint64_t inring = (COUNT(t) - COUNT(h)) & SHMCHAN_COUNT_MASK;
    if (used > c->capacity || inring * 16 > used)
        return shmchan_corrupt(c, "impossible ring positions seen by a producer");
    uint64_t freeb = c->capacity - used, pos = UNITS(t), k = 0;
    uint64_t start = pos;
    for (size_t i = 0; i < nrec; i++) {
        const shmchan_rec *r = &recs[i];
        uint64_t need = align16(SHMCHAN_RECORD_HEADER_SIZE + r->n);
        if (need > c->max_record || r->n > 0xFFFFFFFFu) {
            if (i == 0) return SHMCHAN_E_TOOBIG;
            break;
        }
        if (c->max_items && inring + k >= c->max_items) break;
        if (inring + k >= SHMCHAN_MAX_RECORDS_IN_RING) break;
        if (k && (((pos - start) & SHMCHAN_UNIT_MASK) << 4) >= BATCH_BYTES) break;
        uint64_t idx = (pos << 4) & c->mask, rem = c->capacity - idx;
        uint64_t pad = need <= rem ? 0 : rem;
        if (pad + need > freeb) break;
        if (pad) {
            /* Wrap rule: a PADDING record fills [idx, capacity); the record goes at 0. */
            uint32_t hdr[4] = {(uint32_t)(rem - 16), SHMCHAN_RT_PADDING, 0, 0};
            memcpy(c->data + idx, hdr, 16);
            idx = 0;
        }
        uint32_t hdr[4] = {(uint32_t)r->n, r->type & 0xFFFF, 0, 0};
        memcpy(c->data + idx, hdr, 16);
        for (size_t p = 0; p < r->nparts; p++) {
            const shmchan_part *pt = &r->parts[p];
            if (pt->off > r->n || pt->n > r->n - pt->off) {
                set_why(c, "a payload part lies outside its record");
                return SHMCHAN_E_STATE;
            }
            if (pt->n) memcpy(c->data + idx + 16 + pt->off, pt->p, pt->n);
        }
        pos = (pos + ((pad + need) >> 4)) & SHMCHAN_UNIT_MASK;
        freeb -= pad + need;
        k++;
    }
    if (k) {
        uint64_t nt = mkword(COUNT(t) + k, pos);
        FAULT("w.written");
        if (hook) hook(c, nt, arg);
        uint64_t L = atomic_load_explicit(W64(c, SHMCHAN_OFF_MSGS_PUT), memory_order_relaxed);
        uint64_t total = L + ((COUNT(t) - L) & SHMCHAN_COUNT_MASK);
        /* R1: the commit point of the put: the records' bytes before the tail (release). */
        atomic_store_explicit(W64(c, SHMCHAN_OFF_TAIL), nt, memory_order_release);
        FAULT("w.committed");
        /* The full-width total trails the commit word (docs/layout.md 2.3). */
        atomic_store_explicit(W64(c, SHMCHAN_OFF_MSGS_PUT), total + k, memory_order_release);
    }
    *written = (size_t)k;
    return SHMCHAN_OK;
}

int shmchan_w_append(shmchan_chan *c, const shmchan_rec *recs, size_t nrec, size_t *written) {
    return append(c, recs, nrec, written, NULL, NULL);
}

/* Free bytes and records now, from a racy look at the positions (no lock). */
int shmchan_room_for(shmchan_chan *c, uint64_t n) {
    uint64_t h = atomic_load_explicit(W64(c, SHMCHAN_OFF_HEAD), memory_order_acquire);
    uint64_t t = atomic_load_explicit(W64(c, SHMCHAN_OFF_TAIL), memory_order_acquire);
    uint64_t used = ((UNITS(t) - UNITS(h)) & SHMCHAN_UNIT_MASK) << 4;
    if (used > c->capacity) return 1; /* corrupt or racing: let the locked path decide */
    uint64_t inring = (COUNT(t) - COUNT(h)) & SHMCHAN_COUNT_MASK;
    if (c->max_items && inring >= c->max_items) return 0;
    uint64_t need = align16(16 + n), idx = (UNITS(t) << 4) & c->mask, rem = c->capacity - idx;
    uint64_t pad = need <= rem ? 0 : rem;
    return pad + need <= c->capacity - used;
}

/* ---- consumer side ------------------------------------------------------------------------ */

int shmchan_r_begin(shmchan_chan *c, uint64_t *at) {
    int bad = state_error(c);
    if (bad) return bad;
    FAULT("r.locked");
    /* We hold the read lock: only read-lock holders store head. */
    *at = UNITS(atomic_load_explicit(W64(c, SHMCHAN_OFF_HEAD), memory_order_relaxed));
    return SHMCHAN_OK;
}

int shmchan_r_next(shmchan_chan *c, uint64_t *at, shmchan_view *v) {
    /* R2: tail (acquire) before reading the records it publishes. */
    uint64_t t = atomic_load_explicit(W64(c, SHMCHAN_OFF_TAIL), memory_order_acquire);
    uint64_t h = atomic_load_explicit(W64(c, SHMCHAN_OFF_HEAD), memory_order_relaxed);
    uint64_t used = ((UNITS(t) - UNITS(h)) & SHMCHAN_UNIT_MASK) << 4;
    uint64_t done = ((*at - UNITS(h)) & SHMCHAN_UNIT_MASK) << 4;
    if (used > c->capacity || done > used) return shmchan_corrupt(c, "impossible ring positions seen by a consumer");
    for (;;) {
        uint64_t avail = ((UNITS(t) - *at) & SHMCHAN_UNIT_MASK) << 4;
        if (!avail) return SHMCHAN_EMPTY;
        uint64_t idx = (*at << 4) & c->mask;
        uint32_t hdr[2];
        memcpy(hdr, c->data + idx, 8);
        uint64_t n = hdr[0];
        uint32_t type = hdr[1] & 0xFFFF;
        uint64_t size = align16(16 + n);
        if (type == SHMCHAN_RT_PADDING) {
            if (idx + 16 + n != c->capacity || c->capacity - idx > avail)
                return shmchan_corrupt(c, "bad padding record");
            *at = (*at + ((c->capacity - idx) >> 4)) & SHMCHAN_UNIT_MASK;
            continue;
        }
        if (size > c->max_record || idx + size > c->capacity || size > avail)
            return shmchan_corrupt(c, "bad record length");
        v->type = type;
        v->n = n;
        v->payload = c->data + idx + 16;
        v->next = (*at + (size >> 4)) & SHMCHAN_UNIT_MASK;
        return SHMCHAN_OK;
    }
}

void shmchan_r_commit(shmchan_chan *c, uint64_t at, uint32_t count) {
    uint64_t h = atomic_load_explicit(W64(c, SHMCHAN_OFF_HEAD), memory_order_relaxed);
    if (UNITS(h) == at && !count) return;
    if (count) FAULT("r.taken");
    /* Every get that frees room wakes one sleeping producer (docs/layout.md section 8);
     * one that takes the ring to half full or below, or empties it, or frees an item
     * slot of a ring full by count, wakes them all (their needs may differ). */
    uint64_t t = atomic_load_explicit(W64(c, SHMCHAN_OFF_TAIL), memory_order_acquire);
    uint64_t before = ((UNITS(t) - UNITS(h)) & SHMCHAN_UNIT_MASK) << 4;
    uint64_t after = ((UNITS(t) - at) & SHMCHAN_UNIT_MASK) << 4;
    uint64_t records = (COUNT(t) - COUNT(h)) & SHMCHAN_COUNT_MASK;
    c->room_plenty = after == 0 || (before > c->capacity / 2 && after <= c->capacity / 2) ||
                    (c->max_items && records >= c->max_items && records - count < c->max_items) ||
                    (c->max_items && records - count <= c->max_items / 2 && records > c->max_items / 2);
    uint64_t L = atomic_load_explicit(W64(c, SHMCHAN_OFF_MSGS_GOT), memory_order_relaxed);
    uint64_t total = L + ((COUNT(h) - L) & SHMCHAN_COUNT_MASK);
    /* R3: the commit point of the get: our reads of the records before the head (release). */
    atomic_store_explicit(W64(c, SHMCHAN_OFF_HEAD), mkword(COUNT(h) + count, at), memory_order_release);
    if (count) FAULT("r.committed");
    if (count) atomic_store_explicit(W64(c, SHMCHAN_OFF_MSGS_GOT), total + count, memory_order_release);
}

/* ---- counts -------------------------------------------------------------------------------- */

static uint64_t total_of(shmchan_chan *c, uint32_t total_off, uint32_t word_off) {
    /* Read the trailing total first (acquire), then the commit word (acquire): the word is
     * then at least as new as the total, and the count field extends it exactly. */
    uint64_t L = atomic_load_explicit(W64(c, total_off), memory_order_acquire);
    uint64_t w = atomic_load_explicit(W64(c, word_off), memory_order_acquire);
    return L + ((COUNT(w) - L) & SHMCHAN_COUNT_MASK);
}

uint64_t shmchan_put_total(shmchan_chan *c) { return total_of(c, SHMCHAN_OFF_MSGS_PUT, SHMCHAN_OFF_TAIL); }
uint64_t shmchan_got_total(shmchan_chan *c) { return total_of(c, SHMCHAN_OFF_MSGS_GOT, SHMCHAN_OFF_HEAD); }

uint64_t shmchan_qsize(shmchan_chan *c) {
    /* Head first: a consumer only commits records already committed by the tail, so the
     * difference is never negative. */
    uint64_t h = atomic_load_explicit(W64(c, SHMCHAN_OFF_HEAD), memory_order_acquire);
    uint64_t t = atomic_load_explicit(W64(c, SHMCHAN_OFF_TAIL), memory_order_acquire);
    return (COUNT(t) - COUNT(h)) & SHMCHAN_COUNT_MASK;
}

int shmchan_is_empty(shmchan_chan *c) {
    uint64_t h = atomic_load_explicit(W64(c, SHMCHAN_OFF_HEAD), memory_order_acquire);
    uint64_t t = atomic_load_explicit(W64(c, SHMCHAN_OFF_TAIL), memory_order_acquire);
    return UNITS(h) == UNITS(t);
}

uint64_t shmchan_unfinished(shmchan_chan *c) {
    uint64_t done = atomic_load_explicit(W64(c, SHMCHAN_OFF_TASKS_DONE), memory_order_acquire);
    uint64_t put = shmchan_put_total(c);
    return put >= done ? put - done : 0;
}

int shmchan_task_done(shmchan_chan *c) {
    a64 *D = W64(c, SHMCHAN_OFF_TASKS_DONE);
    uint64_t d = atomic_load_explicit(D, memory_order_acquire);
    for (;;) {
        uint64_t put = shmchan_put_total(c);
        if (d >= put) return SHMCHAN_E_STATE;
        if (atomic_compare_exchange_weak_explicit(D, &d, d + 1, memory_order_seq_cst, memory_order_acquire)) {
            if (d + 1 == put) shmchan_wake(c, SHMCHAN_EV_JOINED, INT_MAX);
            return SHMCHAN_OK;
        }
    }
}

void shmchan_mark_removed(void *base) {
    atomic_store_explicit((a32 *)((uint8_t *)base + SHMCHAN_OFF_STATE), SHMCHAN_STATE_REMOVED, memory_order_seq_cst);
    for (int ev = 0; ev < 3; ev++) {
        a32 *seq = (a32 *)((uint8_t *)base + seq_off[ev]);
        atomic_fetch_add_explicit(seq, 1, memory_order_seq_cst);
        futex_wake(seq, INT_MAX);
    }
}

int shmchan_state(shmchan_chan *c) {
    return (int)atomic_load_explicit(W32(c, SHMCHAN_OFF_STATE), memory_order_acquire);
}

int shmchan_corrupt(shmchan_chan *c, const char *why) {
    set_why(c, "%s", why);
    /* Monotonic: racing writers agree. Then wake every sleeper so it sees the state. */
    atomic_store_explicit(W32(c, SHMCHAN_OFF_STATE), SHMCHAN_STATE_CORRUPT, memory_order_seq_cst);
    for (int ev = 0; ev < 3; ev++) {
        atomic_fetch_add_explicit(W32(c, seq_off[ev]), 1, memory_order_seq_cst);
        futex_wake(W32(c, seq_off[ev]), INT_MAX);
    }
    return SHMCHAN_E_CORRUPT;
}

/* ---- waiting and waking ------------------------------------------------------------------ */

uint32_t shmchan_seq(shmchan_chan *c, int event) {
    return atomic_load_explicit(W32(c, seq_off[event]), memory_order_acquire);
}

void shmchan_register(shmchan_chan *c, int event, int delta) {
    if (c->slot < 0) return;
    uint64_t bit = 1ULL << (c->slot & 63);
    a64 *word = W64(c, bitmap_off[event] + 8 * ((uint32_t)c->slot >> 6));
    pthread_mutex_lock(c->reg_lock);
    int before = c->local_waiters[event];
    c->local_waiters[event] = before + delta;
    if (delta > 0 && before == 0)
        /* W1: the registration (seq_cst RMW) ... */
        atomic_fetch_or_explicit(word, bit, memory_order_seq_cst);
    else if (delta < 0 && before + delta == 0)
        atomic_fetch_and_explicit(word, ~bit, memory_order_seq_cst);
    pthread_mutex_unlock(c->reg_lock);
    /* W1: ... then a full fence before the caller's re-check of the ring. */
    atomic_thread_fence(memory_order_seq_cst);
}

static int anyone_waiting(shmchan_chan *c, int event) {
    uint32_t words = (c->max_peers + 63) / 64;
    for (uint32_t w = 0; w < words; w++)
        if (atomic_load_explicit(W64(c, bitmap_off[event] + 8 * w), memory_order_seq_cst)) return 1;
    return 0;
}

void shmchan_wake(shmchan_chan *c, int event, int n) {
    if (!anyone_waiting(c, event)) return;
    a32 *seq = W32(c, seq_off[event]);
    /* The counter moves first (release), so a sleeper about to sleep on its old value
     * returns at once (FUTEX_WAIT compares it in the kernel). */
    atomic_fetch_add_explicit(seq, 1, memory_order_release);
    long woken = futex_wake(seq, n);
    if (woken == 0 && ++c->idle_wakes >= IDLE_WAKES_BEFORE_SWEEP) {
        c->idle_wakes = 0;
        sweep_waiters(c);
    } else if (woken > 0) {
        c->idle_wakes = 0;
    }
}

void shmchan_after_put(shmchan_chan *c, size_t records) {
    /* W2: the commit (tail store) before reading the waiter bitmaps (full fence). */
    atomic_thread_fence(memory_order_seq_cst);
    shmchan_wake(c, SHMCHAN_EV_NOT_EMPTY, records > INT_MAX ? INT_MAX : (int)records);
}

void shmchan_after_get(shmchan_chan *c, size_t records) {
    (void)records;
    /* W2: the commit (head store) before reading the waiter bitmaps (full fence). */
    atomic_thread_fence(memory_order_seq_cst);
    shmchan_wake(c, SHMCHAN_EV_NOT_FULL, c->room_plenty ? INT_MAX : 1);
    if (!shmchan_is_empty(c)) shmchan_wake(c, SHMCHAN_EV_NOT_EMPTY, 1); /* the baton */
}

int shmchan_wait(shmchan_chan *c, int event, uint32_t seen, double timeout) {
    if (timeout <= 0) return SHMCHAN_TIMEOUT;
    long rc = futex_wait(W32(c, seq_off[event]), seen, timeout);
    if (rc == 0) return SHMCHAN_OK;
    if (errno == ETIMEDOUT) return SHMCHAN_TIMEOUT;
    if (errno == EINTR) return SHMCHAN_INTR;
    return SHMCHAN_OK; /* EAGAIN: the counter had moved already */
}

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
struct shm_futex_waitv {
    uint64_t val, uaddr;
    uint32_t flags, reserved;
};

int shmchan_wait_any(shmchan_chan *const *cs, const uint32_t *seen, size_t n, double timeout) {
    if (timeout <= 0) return SHMCHAN_TIMEOUT;
    if (n == 0) return SHMCHAN_TIMEOUT;
    if (n <= 128) {
        struct shm_futex_waitv w[128];
        for (size_t i = 0; i < n; i++) {
            w[i].val = seen[i];
            w[i].uaddr = (uint64_t)(uintptr_t)W32(cs[i], SHMCHAN_OFF_NE_SEQ);
            w[i].flags = 2; /* FUTEX_32, shared */
            w[i].reserved = 0;
        }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        double at = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 + timeout;
        ts.tv_sec = (time_t)at;
        ts.tv_nsec = (long)((at - (double)ts.tv_sec) * 1e9);
        long rc = syscall(SYS_futex_waitv, w, (unsigned)n, 0, &ts, CLOCK_MONOTONIC);
        if (rc >= 0) return SHMCHAN_OK;
        if (errno == ETIMEDOUT) return SHMCHAN_TIMEOUT;
        if (errno == EINTR) return SHMCHAN_INTR;
        if (errno == EAGAIN) return SHMCHAN_OK;
        if (errno != ENOSYS) return SHMCHAN_E_SYS;
    }
    /* Without FUTEX_WAITV (Linux < 5.16): short sleeps on each in turn. */
    double slice = timeout < 0.002 ? timeout : 0.002;
    for (size_t i = 0; i < n; i++) {
        if (shmchan_seq(cs[i], SHMCHAN_EV_NOT_EMPTY) != seen[i]) return SHMCHAN_OK;
    }
    int rc = shmchan_wait(cs[0], SHMCHAN_EV_NOT_EMPTY, seen[0], slice);
    return rc == SHMCHAN_INTR ? rc : SHMCHAN_OK;
}

int shmchan_spin(shmchan_chan *c, int dir, int (*still_waiting)(shmchan_chan *, void *), void *arg) {
    int64_t budget = c->spin_ns[dir];
    if (budget <= 0) return 0;
    int64_t start = now_ns(), end = start + budget;
    for (unsigned i = 1;; i++) {
        if (!still_waiting(c, arg)) {
            int64_t took = now_ns() - start;
            int64_t next = 2 * took > budget ? 2 * took : budget;
            c->spin_ns[dir] = next > SPIN_MAX_NS ? SPIN_MAX_NS : next;
            return 1;
        }
        cpu_relax();
        if ((i & 63) == 0 && now_ns() > end) break;
    }
    c->spin_ns[dir] = budget / 2 < SPIN_MIN_NS ? SPIN_MIN_NS : budget / 2;
    return 0;
}

static int ring_empty_cb(shmchan_chan *c, void *arg) {
    (void)arg;
    return shmchan_is_empty(c);
}

int shmchan_spin_readable(shmchan_chan *c) { return shmchan_spin(c, 0, ring_empty_cb, NULL); }

static int no_room_cb(shmchan_chan *c, void *arg) { return !shmchan_room_for(c, *(uint64_t *)arg); }

static int side_none_free(shmchan_chan *c) {
    for (uint32_t i = 0; i < c->side_slots; i++) {
        uint64_t s = atomic_load_explicit(W64(c, SHMCHAN_SIDE_TABLE_OFFSET + (uint64_t)SHMCHAN_SIDE_ENTRY_SIZE * i),
                                          memory_order_acquire);
        if ((s & 3) == SHMCHAN_SIDE_FREE) return 0;
    }
    return 1;
}

static int no_side_cb(shmchan_chan *c, void *arg) {
    (void)arg;
    return side_none_free(c);
}

static double slice_until(double deadline) {
    if (deadline < 0) return SHMCHAN_WAIT_SLICE;
    double left = deadline - shmchan_now();
    return left < SHMCHAN_WAIT_SLICE ? left : SHMCHAN_WAIT_SLICE;
}

static int closing(shmchan_chan *c) { return atomic_load_explicit((_Atomic int *)&c->closing, memory_order_relaxed); }

int shmchan_wait_readable(shmchan_chan *c, double deadline, int flags) {
    int spun = (flags & SHMCHAN_F_NOSPIN) != 0;
    for (;;) {
        if (closing(c)) return SHMCHAN_CLOSED;
        int bad = state_error(c);
        if (bad) return bad;
        if (!shmchan_is_empty(c)) return SHMCHAN_OK;
        if ((flags & SHMCHAN_F_EOF) && shmchan_role_gone(c, SHMCHAN_WRITER) == 1) {
            /* The writers' departures before a last look at the ring. */
            atomic_thread_fence(memory_order_seq_cst);
            return shmchan_is_empty(c) ? SHMCHAN_EOF : SHMCHAN_OK;
        }
        if (deadline >= 0 && shmchan_now() >= deadline) return SHMCHAN_TIMEOUT;
        if (!spun) {
            spun = 1;
            if (shmchan_spin(c, 0, ring_empty_cb, NULL)) continue;
        }
        uint32_t seen = shmchan_seq(c, SHMCHAN_EV_NOT_EMPTY);
        shmchan_register(c, SHMCHAN_EV_NOT_EMPTY, +1);
        int rc = SHMCHAN_OK;
        /* W1: re-check after registering (the fence is in shmchan_register). */
        if (shmchan_is_empty(c) && !closing(c)) rc = shmchan_wait(c, SHMCHAN_EV_NOT_EMPTY, seen, slice_until(deadline));
        shmchan_register(c, SHMCHAN_EV_NOT_EMPTY, -1);
        if (rc == SHMCHAN_INTR || (rc == SHMCHAN_TIMEOUT && c->slice_intr)) return SHMCHAN_INTR;
    }
}

int shmchan_wait_writable(shmchan_chan *c, uint64_t n, double deadline, int flags) {
    int spun = (flags & SHMCHAN_F_NOSPIN) != 0;
    int side = (flags & SHMCHAN_F_SIDE) != 0;
    for (;;) {
        if (closing(c)) return SHMCHAN_CLOSED;
        int bad = state_error(c);
        if (bad) return bad;
        if (side ? !side_none_free(c) : shmchan_room_for(c, n)) return SHMCHAN_OK;
        if ((flags & SHMCHAN_F_BROKEN) && shmchan_role_gone(c, SHMCHAN_READER) == 1) return SHMCHAN_BROKEN;
        if (deadline >= 0 && shmchan_now() >= deadline) return SHMCHAN_TIMEOUT;
        if (!spun) {
            spun = 1;
            if (shmchan_spin(c, 1, side ? no_side_cb : no_room_cb, &n)) continue;
        }
        uint32_t seen = shmchan_seq(c, SHMCHAN_EV_NOT_FULL);
        shmchan_register(c, SHMCHAN_EV_NOT_FULL, +1);
        int rc = SHMCHAN_OK;
        int still = side ? side_none_free(c) : !shmchan_room_for(c, n);
        if (still && !closing(c)) rc = shmchan_wait(c, SHMCHAN_EV_NOT_FULL, seen, slice_until(deadline));
        shmchan_register(c, SHMCHAN_EV_NOT_FULL, -1);
        if (rc == SHMCHAN_INTR || (rc == SHMCHAN_TIMEOUT && c->slice_intr)) return SHMCHAN_INTR;
    }
}

int shmchan_wait_joined(shmchan_chan *c, double deadline) {
    for (;;) {
        if (closing(c)) return SHMCHAN_CLOSED;
        int bad = state_error(c);
        if (bad) return bad;
        if (shmchan_unfinished(c) == 0) return SHMCHAN_OK;
        if (deadline >= 0 && shmchan_now() >= deadline) return SHMCHAN_TIMEOUT;
        uint32_t seen = shmchan_seq(c, SHMCHAN_EV_JOINED);
        shmchan_register(c, SHMCHAN_EV_JOINED, +1);
        int rc = SHMCHAN_OK;
        if (shmchan_unfinished(c) != 0 && !closing(c))
            rc = shmchan_wait(c, SHMCHAN_EV_JOINED, seen, slice_until(deadline));
        shmchan_register(c, SHMCHAN_EV_JOINED, -1);
        if (rc == SHMCHAN_INTR || (rc == SHMCHAN_TIMEOUT && c->slice_intr)) return SHMCHAN_INTR;
    }
}

/* ---- presence ----------------------------------------------------------------------------- */

static const uint32_t open_off[2] = {SHMCHAN_OFF_WRITERS_OPEN, SHMCHAN_OFF_READERS_OPEN};
static const uint32_t seen_off[2] = {SHMCHAN_OFF_WRITERS_SEEN, SHMCHAN_OFF_READERS_SEEN};

static int presence_op(shmchan_chan *c, int role, int enter) {
    if (c->liveness == SHMCHAN_LIVENESS_OFD) {
        /* A shared OFD lock on the role's byte: never conflicts with other holders. */
        struct flock fl = {.l_type = (short)(enter ? F_RDLCK : F_UNLCK), .l_whence = SEEK_SET,
                           .l_start = open_off[role], .l_len = 1};
        while (fcntl(c->fd, F_OFD_SETLK, &fl) != 0) {
            if (errno != EINTR) return SHMCHAN_E_SYS;
        }
        return SHMCHAN_OK;
    }
    struct sembuf op = {(unsigned short)role, (short)(enter ? 1 : -1), SEM_UNDO | (enter ? 0 : IPC_NOWAIT)};
    while (semop(c->semid_presence, &op, 1) != 0) {
        if (errno != EINTR) return SHMCHAN_E_SYS;
    }
    return SHMCHAN_OK;
}

int shmchan_presence_enter(shmchan_chan *c, int role) {
    if (c->roles & (1u << role)) return SHMCHAN_OK;
    int rc = presence_op(c, role, 1);
    if (rc != SHMCHAN_OK) return rc;
    c->roles |= 1u << role;
    atomic_fetch_add_explicit(W32(c, open_off[role]), 1, memory_order_relaxed);
    /* The presence is held before `seen` says there was a holder (release): the other
     * order could let a receiver see "seen, nobody present" and end the stream early. */
    atomic_store_explicit(W32(c, seen_off[role]), 1, memory_order_seq_cst);
    return SHMCHAN_OK;
}

int shmchan_presence_leave(shmchan_chan *c, int role) {
    if (!(c->roles & (1u << role))) return SHMCHAN_OK;
    c->roles &= ~(1u << role);
    a32 *open = W32(c, open_off[role]);
    uint32_t v = atomic_load_explicit(open, memory_order_relaxed);
    while (v && !atomic_compare_exchange_weak_explicit(open, &v, v - 1, memory_order_relaxed, memory_order_relaxed)) {
    }
    /* Everything this handle committed precedes its departure. */
    atomic_thread_fence(memory_order_seq_cst);
    int rc = presence_op(c, role, 0);
    atomic_thread_fence(memory_order_seq_cst);
    /* The last writer's departure wakes every receiver (end of stream); the last reader's
     * every sender (broken channel). Waking all is what makes several sleepers see it. */
    shmchan_wake(c, role == SHMCHAN_WRITER ? SHMCHAN_EV_NOT_EMPTY : SHMCHAN_EV_NOT_FULL, INT_MAX);
    return rc;
}

int shmchan_presence_others(shmchan_chan *c, int role) {
    if (c->liveness == SHMCHAN_LIVENESS_OFD) {
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = open_off[role], .l_len = 1};
        if (fcntl(c->fd, F_OFD_GETLK, &fl) != 0) return SHMCHAN_E_SYS;
        return fl.l_type != F_UNLCK;
    }
    int v = semctl(c->semid_presence, role, GETVAL);
    if (v < 0) return SHMCHAN_E_SYS;
    return v - (int)((c->roles >> role) & 1u) > 0;
}

int shmchan_role_gone(shmchan_chan *c, int role) {
    if (!atomic_load_explicit(W32(c, seen_off[role]), memory_order_seq_cst)) return 0;
    int others = shmchan_presence_others(c, role);
    if (others < 0) return others;
    return !others;
}

/* ---- side-segment pool -------------------------------------------------------------------- */

#define SIDE_ST(w) ((uint32_t)((w) & 3))
#define SIDE_TICKET(w) ((uint32_t)(((w) >> 2) & 0x3FFFFFFFu))
#define SIDE_OWNER(w) ((uint32_t)((w) >> 32))

static inline a64 *side_state(shmchan_chan *c, uint32_t index) {
    return W64(c, SHMCHAN_SIDE_TABLE_OFFSET + (uint64_t)SHMCHAN_SIDE_ENTRY_SIZE * index);
}
static inline uint32_t my_owner(shmchan_chan *c) { return (uint32_t)(c->slot + 1) | ((c->gen & 0xFFFF) << 16); }
static inline uint64_t mkside(uint32_t st, uint32_t ticket, uint32_t owner) {
    return (uint64_t)st | ((uint64_t)(ticket & 0x3FFFFFFFu) << 2) | ((uint64_t)owner << 32);
}
static int side_owner_dead(shmchan_chan *c, uint32_t owner) {
    uint32_t slot1 = owner & 0xFFFF;
    if (!slot1) return 1;
    return !owner_alive(c, slot1 - 1, owner >> 16, 0xFFFFu);
}

/* An entry READING by a reader that died after taking it and not while holding the read
 * lock (then its record is still at the head and the next reader takes the entry over):
 * nobody's, per the state table of docs/layout.md 2.5. */
static int side_abandoned(shmchan_chan *c, uint64_t s) {
    if (SIDE_ST(s) != SHMCHAN_SIDE_READING || !side_owner_dead(c, SIDE_OWNER(s))) return 0;
    uint64_t r = atomic_load_explicit(W64(c, SHMCHAN_OFF_RLOCK), memory_order_acquire);
    uint32_t rowner = (uint32_t)(r & 0xFFFF) | (uint32_t)(((r >> 16) & 0xFFFF) << 16);
    return !(r && rowner == SIDE_OWNER(s));
}

/* The ticket of an entry's next holder (30 bits, never 0). */
static uint32_t side_next_ticket(uint64_t s) {
    uint32_t t = (SIDE_TICKET(s) + 1) & 0x3FFFFFFFu;
    return t ? t : 1;
}

int shmchan_side_claim(shmchan_chan *c, uint32_t *index, uint32_t *ticket) {
    if (c->slot < 0) return SHMCHAN_E_STATE;
    /* Retained entries first (their objects are already made and mapped), then the
     * transient ones; last, entries whose reader died after taking them. */
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < c->side_slots; i++) {
            a64 *S = side_state(c, i);
            uint64_t s = atomic_load_explicit(S, memory_order_acquire);
            uint32_t st = SIDE_ST(s);
            if (pass == 1 && side_abandoned(c, s)) st = SHMCHAN_SIDE_FREE;
            if (st != SHMCHAN_SIDE_FREE) continue;
            uint32_t t = side_next_ticket(s);
            /* S1: claiming an entry is an acquire CAS (the previous reader's copy-out
             * happens before our writes into the backing object). */
            if (atomic_compare_exchange_strong_explicit(S, &s, mkside(SHMCHAN_SIDE_WRITING, t, my_owner(c)),
                                                        memory_order_acquire, memory_order_relaxed)) {
                *index = i;
                *ticket = t;
                return SHMCHAN_OK;
            }
        }
    }
    return SHMCHAN_FULL;
}

int shmchan_side_retained_busy(shmchan_chan *c, int *reading) {
    *reading = 0;
    if (!c->side_retained) return 0;
    for (uint32_t i = 0; i < c->side_slots; i++) {
        /* S1 (read only): an acquire load of the entry's state word; nothing is written. */
        uint64_t s = atomic_load_explicit(side_state(c, i), memory_order_acquire);
        uint32_t st = SIDE_ST(s);
        if (i < c->side_retained && st == SHMCHAN_SIDE_FREE) return 0;
        /* One live reader is enough: no liveness probe (a system call) for the others. */
        if (!*reading && st == SHMCHAN_SIDE_READING && !side_owner_dead(c, SIDE_OWNER(s))) *reading = 1;
    }
    return 1;
}

uint32_t shmchan_side_sweep(shmchan_chan *c, uint32_t *index, uint32_t *ticket, uint32_t max) {
    uint32_t n = 0;
    if (c->slot < 0) return 0;
    for (uint32_t i = c->side_retained; i < c->side_slots && n < max; i++) {
        a64 *S = side_state(c, i);
        uint64_t s = atomic_load_explicit(S, memory_order_acquire);
        if (!side_abandoned(c, s)) continue;
        uint32_t t = side_next_ticket(s);
        /* S1: taking the dead reader's entry is an acquire CAS, like a claim. */
        if (atomic_compare_exchange_strong_explicit(S, &s, mkside(SHMCHAN_SIDE_WRITING, t, my_owner(c)),
                                                    memory_order_acquire, memory_order_relaxed)) {
            index[n] = i;
            ticket[n] = t;
            n++;
        }
    }
    return n;
}

void shmchan_side_forget(shmchan_chan *c, uint32_t index, uint32_t ticket) {
    uint64_t size;
    uint32_t gen;
    if (index >= c->side_slots) return;
    shmchan_side_file(c, index, &size, &gen);
    /* The object is gone (the caller removed it): size 0 and a new generation, then FREE. */
    shmchan_side_set_file(c, index, ticket, 0, gen + 1);
    shmchan_side_release(c, index, ticket);
}

/* With the write lock held: entries left WRITING by writers that died before queueing
 * them are nobody's (a writer that died while queueing held the lock, and its journal was
 * resolved when we took the lock over). */
static void side_reclaim_writers(shmchan_chan *c) {
    for (uint32_t i = 0; i < c->side_slots; i++) {
        a64 *S = side_state(c, i);
        uint64_t s = atomic_load_explicit(S, memory_order_acquire);
        if (SIDE_ST(s) == SHMCHAN_SIDE_WRITING && SIDE_OWNER(s) != my_owner(c) && side_owner_dead(c, SIDE_OWNER(s)))
            atomic_compare_exchange_strong_explicit(S, &s, mkside(SHMCHAN_SIDE_FREE, SIDE_TICKET(s), 0),
                                                    memory_order_acq_rel, memory_order_relaxed);
    }
}

void shmchan_side_file(shmchan_chan *c, uint32_t index, uint64_t *size, uint32_t *file_gen) {
    uint64_t off = SHMCHAN_SIDE_TABLE_OFFSET + (uint64_t)SHMCHAN_SIDE_ENTRY_SIZE * index;
    *size = atomic_load_explicit(W64(c, off + SHMCHAN_SIDE_SIZE), memory_order_acquire);
    *file_gen = atomic_load_explicit(W32(c, off + SHMCHAN_SIDE_FILE_GEN), memory_order_acquire);
}

int shmchan_side_set_file(shmchan_chan *c, uint32_t index, uint32_t ticket, uint64_t size, uint32_t file_gen) {
    if (index >= c->side_slots) return SHMCHAN_E_STATE;
    uint64_t s = atomic_load_explicit(side_state(c, index), memory_order_acquire);
    if (s != mkside(SHMCHAN_SIDE_WRITING, ticket, my_owner(c))) return SHMCHAN_E_STATE;
    uint64_t off = SHMCHAN_SIDE_TABLE_OFFSET + (uint64_t)SHMCHAN_SIDE_ENTRY_SIZE * index;
    /* Only the entry's owner writes these; the queueing CAS (release) publishes them. */
    atomic_store_explicit(W32(c, off + SHMCHAN_SIDE_FILE_GEN), file_gen, memory_order_relaxed);
    atomic_store_explicit(W64(c, off + SHMCHAN_SIDE_SIZE), size, memory_order_relaxed);
    return SHMCHAN_OK;
}

void shmchan_side_release(shmchan_chan *c, uint32_t index, uint32_t ticket) {
    if (index >= c->side_slots) return;
    uint64_t s = mkside(SHMCHAN_SIDE_WRITING, ticket, my_owner(c));
    if (atomic_compare_exchange_strong_explicit(side_state(c, index), &s, mkside(SHMCHAN_SIDE_FREE, ticket, 0),
                                                memory_order_release, memory_order_relaxed))
        shmchan_wake(c, SHMCHAN_EV_NOT_FULL, 1);
}

struct side_hook {
    uint32_t index, ticket;
};

static void side_precommit(shmchan_chan *c, uint64_t new_tail, void *arg) {
    struct side_hook *sh = arg;
    /* J1: the journal names the entry and the tail that commits it (release), then the
     * entry becomes QUEUED (release), then the tail store commits the record. A taker
     * over of the write lock finds the journal and undoes an uncommitted entry. */
    atomic_store_explicit(W64(c, SHMCHAN_OFF_SIDE_JOURNAL_TAIL), new_tail, memory_order_release);
    atomic_store_explicit(W64(c, SHMCHAN_OFF_SIDE_JOURNAL), ((uint64_t)sh->ticket << 32) | (sh->index + 1),
                          memory_order_release);
    atomic_store_explicit(side_state(c, sh->index), mkside(SHMCHAN_SIDE_QUEUED, sh->ticket, 0),
                          memory_order_release);
    FAULT("side.queued");
}

int shmchan_side_append(shmchan_chan *c, const shmchan_side_ref *ref, size_t *written) {
    *written = 0;
    if (ref->index >= c->side_slots) return SHMCHAN_E_STATE;
    uint64_t s = atomic_load_explicit(side_state(c, ref->index), memory_order_acquire);
    if (s != mkside(SHMCHAN_SIDE_WRITING, ref->ticket, my_owner(c))) {
        set_why(c, "side entry %u is not ours to queue", ref->index);
        return SHMCHAN_E_STATE;
    }
    uint8_t payload[SHMCHAN_SIDE_REF_SIZE];
    memset(payload, 0, sizeof payload);
    memcpy(payload + 0, &ref->index, 4);
    memcpy(payload + 4, &ref->ticket, 4);
    memcpy(payload + 8, &ref->size, 8);
    memcpy(payload + 16, &ref->file_gen, 4);
    uint16_t inner = (uint16_t)ref->inner_type;
    memcpy(payload + 20, &inner, 2);
    shmchan_part part = {0, payload, sizeof payload};
    shmchan_rec rec = {SHMCHAN_RT_SIDE, sizeof payload, &part, 1};
    struct side_hook sh = {ref->index, ref->ticket};
    int rc = append(c, &rec, 1, written, side_precommit, &sh);
    /* Committed (or not attempted): the journal is done with. */
    atomic_store_explicit(W64(c, SHMCHAN_OFF_SIDE_JOURNAL), 0, memory_order_release);
    return rc;
}

int shmchan_side_parse(shmchan_chan *c, const uint8_t *payload, uint64_t n, shmchan_side_ref *ref) {
    if (n != SHMCHAN_SIDE_REF_SIZE) return shmchan_corrupt(c, "a side-segment record has a bad length");
    uint16_t inner;
    memcpy(&ref->index, payload + 0, 4);
    memcpy(&ref->ticket, payload + 4, 4);
    memcpy(&ref->size, payload + 8, 8);
    memcpy(&ref->file_gen, payload + 16, 4);
    memcpy(&inner, payload + 20, 2);
    ref->inner_type = inner;
    if (ref->index >= c->side_slots || inner == SHMCHAN_RT_SIDE || inner == SHMCHAN_RT_PADDING)
        return shmchan_corrupt(c, "a side-segment record refers to no valid entry");
    return SHMCHAN_OK;
}

int shmchan_side_take(shmchan_chan *c, const shmchan_side_ref *ref) {
    a64 *S = side_state(c, ref->index);
    uint64_t s = atomic_load_explicit(S, memory_order_acquire);
    uint32_t st = SIDE_ST(s);
    /* QUEUED, or READING by a reader that died holding the read lock we now hold. */
    if (SIDE_TICKET(s) != ref->ticket || (st != SHMCHAN_SIDE_QUEUED && st != SHMCHAN_SIDE_READING))
        return shmchan_corrupt(c, "a side-segment record does not match its entry");
    uint64_t size;
    uint32_t gen;
    shmchan_side_file(c, ref->index, &size, &gen);
    if (gen != ref->file_gen || size < ref->size)
        return shmchan_corrupt(c, "a side-segment record does not match its backing object");
    if (!atomic_compare_exchange_strong_explicit(S, &s, mkside(SHMCHAN_SIDE_READING, ref->ticket, my_owner(c)),
                                                 memory_order_acq_rel, memory_order_relaxed))
        return shmchan_corrupt(c, "a side-segment entry changed under the read lock");
    return SHMCHAN_OK;
}

void shmchan_side_done(shmchan_chan *c, uint32_t index, uint32_t ticket) {
    if (index >= c->side_slots) return;
    uint64_t s = mkside(SHMCHAN_SIDE_READING, ticket, my_owner(c));
    /* S2: our copy-out happens before the entry is free again (release). */
    if (atomic_compare_exchange_strong_explicit(side_state(c, index), &s, mkside(SHMCHAN_SIDE_FREE, ticket, 0),
                                                memory_order_release, memory_order_relaxed)) {
        atomic_thread_fence(memory_order_seq_cst);
        shmchan_wake(c, SHMCHAN_EV_NOT_FULL, 1);
    }
}

void shmchan_side_reclaim(shmchan_chan *c) { side_reclaim_writers(c); }

void shmchan_side_drop(shmchan_chan *c, uint32_t index, uint32_t ticket) {
    if (index >= c->side_slots) return;
    uint64_t off = SHMCHAN_SIDE_TABLE_OFFSET + (uint64_t)SHMCHAN_SIDE_ENTRY_SIZE * index;
    /* The reader owns the entry: it records that the object is gone (its caller removed
     * it), then frees the entry (release), so the next writer makes a new one. */
    atomic_store_explicit(W64(c, off + SHMCHAN_SIDE_SIZE), 0, memory_order_relaxed);
    shmchan_side_done(c, index, ticket);
}

/* ---- blocking calls for C programs --------------------------------------------------------- */

static double deadline_of(double timeout) { return timeout < 0 ? -1.0 : shmchan_now() + timeout; }

int shmchan_send(shmchan_chan *c, const void *p, uint64_t n, double timeout, int check_broken) {
    double deadline = deadline_of(timeout);
    shmchan_part part = {0, p, n};
    shmchan_rec rec = {SHMCHAN_RT_BYTES, n, &part, 1};
    if (align16(16 + n) > c->max_record) return SHMCHAN_E_TOOBIG;
    for (;;) {
        if (check_broken && shmchan_role_gone(c, SHMCHAN_READER) == 1) return SHMCHAN_BROKEN;
        int rc = shmchan_lock(c, SHMCHAN_WLOCK, deadline);
        if (rc != SHMCHAN_OK) return rc;
        size_t written = 0;
        rc = shmchan_w_append(c, &rec, 1, &written);
        shmchan_unlock(c, SHMCHAN_WLOCK);
        if (rc != SHMCHAN_OK) return rc;
        if (written) {
            shmchan_after_put(c, 1);
            return SHMCHAN_OK;
        }
        rc = shmchan_wait_writable(c, n, deadline, check_broken ? SHMCHAN_F_BROKEN : 0);
        if (rc != SHMCHAN_OK) return rc;
    }
}

int shmchan_recv(shmchan_chan *c, void *buf, uint64_t cap, uint64_t *n, uint32_t *type, double timeout,
                 int check_eof) {
    double deadline = deadline_of(timeout);
    for (;;) {
        int rc = shmchan_lock(c, SHMCHAN_RLOCK, deadline);
        if (rc != SHMCHAN_OK) return rc;
        uint64_t at;
        shmchan_view v;
        rc = shmchan_r_begin(c, &at);
        if (rc == SHMCHAN_OK) rc = shmchan_r_next(c, &at, &v);
        if (rc == SHMCHAN_OK) {
            int result = SHMCHAN_OK;
            *n = v.n;
            *type = v.type;
            if (v.n > cap)
                result = SHMCHAN_E_TOOBIG;
            else
                memcpy(buf, v.payload, v.n);
            /* A side-segment record is consumed here; a C program cannot map the side
             * object portably, so it frees the entry at once (the message is dropped and
             * reported as SHMCHAN_RT_SIDE). */
            shmchan_side_ref ref;
            if (v.type == SHMCHAN_RT_SIDE && shmchan_side_parse(c, v.payload, v.n, &ref) == SHMCHAN_OK &&
                shmchan_side_take(c, &ref) == SHMCHAN_OK) {
                shmchan_r_commit(c, v.next, 1);
                shmchan_unlock(c, SHMCHAN_RLOCK);
                shmchan_side_done(c, ref.index, ref.ticket);
                shmchan_after_get(c, 1);
                return result;
            }
            shmchan_r_commit(c, v.next, 1);
            shmchan_unlock(c, SHMCHAN_RLOCK);
            shmchan_after_get(c, 1);
            return result;
        }
        if (rc == SHMCHAN_EMPTY) shmchan_r_commit(c, at, 0); /* release padding we skipped */
        shmchan_unlock(c, SHMCHAN_RLOCK);
        if (rc != SHMCHAN_EMPTY) return rc;
        rc = shmchan_wait_readable(c, deadline, check_eof ? SHMCHAN_F_EOF : 0);
        if (rc != SHMCHAN_OK) return rc;
    }
}
