/* shmchan.h - header-only C11 peer for shmchan channels, posix backend only.
 *
 * Implements docs/layout.md v1.0 (binary layout, put/get, record counting and
 * max_items, locks, wakeups) for lock_kind 1 (OFD locks on the shm fd) and
 * wakeup_kind 1 (POSIX named semaphores). It opens an EXISTING channel or named
 * queue; the Python package creates it. It sends BYTES records only; a record of
 * any other type (PICKLE, PICKLE_OOB, LARGE, reserved) is consumed and reported
 * as SHMCHAN_OTHER_TYPE (layout.md 2.2), and the side segment of a LARGE record
 * is removed unread (2.5). task_done()/join() (layout.md 8) are not implemented.
 *
 * Include this header before any system header (it needs _GNU_SOURCE for
 * F_OFD_SETLKW). Linux, glibc, 64-bit little-endian only. A handle is not
 * thread-safe (OFD locks belong to the open file description, so threads sharing
 * one handle would not exclude each other, layout.md 6.1): use one handle per
 * thread. A forked child must shmchan_open() its own handle, never reuse the
 * parent's. Return codes are SHMCHAN_* below; shmchan_strerror() names them and
 * ch->why says what failed.
 */
#ifndef SHMCHAN_H
#define SHMCHAN_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <threads.h>
#include <time.h>
#include <unistd.h>

#ifndef F_OFD_SETLKW
#error "shmchan.h needs OFD locks: include it before any other header, on Linux"
#endif
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "shmchan layout v1 is little-endian only (layout.md 1)"
#endif
/* layout.md 1: 64-bit processes whose 8-byte atomics are lock-free. */
_Static_assert(sizeof(void *) == 8, "shmchan needs a 64-bit process");
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "8-byte atomics must be lock-free");
_Static_assert(sizeof(_Atomic uint64_t) == 8 && sizeof(_Atomic uint32_t) == 4,
               "atomic words must have their plain size to overlay the header");

enum {
    SHMCHAN_OK = 0,
    SHMCHAN_TIMEOUT = 1,     /* send: still full (bytes or max_items) at the deadline;
                                recv: still empty */
    SHMCHAN_TOO_LARGE = 2,   /* send: payload > max payload; recv: buffer too small
                                (nothing consumed, *len = the needed size) */
    SHMCHAN_CORRUPT = 3,     /* bad header/ring, or state == CORRUPT */
    SHMCHAN_OTHER_TYPE = 4,  /* recv: consumed a record that is not BYTES (layout.md 2.2) */
    SHMCHAN_NOT_SHMCHAN = 5, /* open: wrong magic, or segment too small for a header */
    SHMCHAN_INCOMPATIBLE = 6,/* open: other major, unknown incompat bit, other backend */
    SHMCHAN_INIT_TIMEOUT = 7,/* open: magic still 0 at the deadline (creator died?) */
    SHMCHAN_SYSERR = 8       /* a system call failed; see errno */
};

/* Header offsets (layout.md 2.1) and constants. */
#define SHMCHAN_MAGIC 0x004E4148434D4853ull
#define SHMCHAN_HEADER_SIZE 4096u
#define SHMCHAN_OFF_NONCE 40
#define SHMCHAN_OFF_MAX_ITEMS 80      /* block A: 0 = no item limit */
#define SHMCHAN_OFF_TAIL 128
#define SHMCHAN_OFF_MSGS_PUT 136      /* written under the write lock, just before tail */
#define SHMCHAN_OFF_LARGE_SEQ 144     /* Python producers only (side segments) */
#define SHMCHAN_OFF_HEAD 256
#define SHMCHAN_OFF_MSGS_GOT 264      /* written under the read lock, just before head */
#define SHMCHAN_OFF_TASKS_DONE 272    /* task_done(): not implemented here */
#define SHMCHAN_OFF_CONSUMERS_WAITING 384
#define SHMCHAN_OFF_PRODUCERS_WAITING 512
#define SHMCHAN_OFF_STATE 640
#define SHMCHAN_OFF_JOINERS_WAITING 644 /* join(): not implemented here */
#define SHMCHAN_OFF_OWNER 768         /* 256 bytes; Python's lifetime service; ignored */
/* Record types (layout.md 2.2). Only BYTES is sent or decoded by this peer. */
#define SHMCHAN_RT_PADDING 0
#define SHMCHAN_RT_BYTES 1
#define SHMCHAN_RT_PICKLE 2     /* Python pickle: consumed, reported as OTHER_TYPE */
#define SHMCHAN_RT_PICKLE_OOB 3 /* pickle 5 + out-of-band buffers: likewise */
#define SHMCHAN_RT_LARGE 4      /* reference to a side segment: consumed, side segment
                                   removed unread, reported as OTHER_TYPE */
#define SHMCHAN_LARGE_REF_SIZE 24 /* LARGE payload: u64 seq, u64 size, u16 inner type,
                                     u16 + u32 reserved (layout.md 2.5) */
#define SHMCHAN_NAME_MAX 255      /* longest shm name accepted (with its side suffix) */
#define SHMCHAN_SIDE_SUFFIX_LEN 18 /* ".L" + 16 hex digits */
#define SHMCHAN_WAIT_SLICE 0.25  /* layout.md 8: longest single semaphore sleep */
#define SHMCHAN_LOCK_GRACE 0.005 /* like shmchan/_core.py: a lock may take this long */

typedef struct shmchan {
    int fd;                      /* the shm fd: its open file description owns our locks */
    unsigned char *base;         /* mapping of the whole segment */
    size_t size;
    unsigned char *data;         /* base + header_size: the ring */
    uint64_t capacity, mask;
    uint32_t max_record;         /* max payload = max_record - 16 */
    uint64_t max_items;          /* 0, or the most records the ring may hold (2.3) */
    _Atomic uint64_t *tail, *head, *msgs_put, *msgs_got;
    _Atomic uint32_t *consumers_waiting, *producers_waiting, *state;
    sem_t *ne, *nf, *jn;         /* not-empty, not-full, joined (layout.md 7.1) */
    uint16_t last_type;          /* record type of the last record recv consumed */
    uint64_t last_large_seq;     /* recv: seq of the last LARGE record consumed */
    int side_unlink_failed;      /* recv: removing that LARGE record's side segment
                                    failed (errno in side_errno); 0 otherwise */
    int side_errno;
    const char *why;             /* static text describing the last failure */
    /* The channel's shm name as passed to open, with room for a side suffix. */
    char name[SHMCHAN_NAME_MAX - SHMCHAN_SIDE_SUFFIX_LEN + 1];
} shmchan;

/* CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) with zlib's semantics:
 * start with crc = 0, pass the previous result to continue. Byte-wise table,
 * filled once (C11 call_once), so any thread may call it. */
static inline uint32_t *shmchan__crc_table(void)
{
    static uint32_t t[256];
    return t;
}

static inline void shmchan__crc_fill(void)
{
    uint32_t *t = shmchan__crc_table();
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        t[i] = c;
    }
}

static inline uint32_t shmchan_crc32(uint32_t crc, const void *p, size_t n)
{
    static once_flag once = ONCE_FLAG_INIT;
    call_once(&once, shmchan__crc_fill);
    const uint32_t *t = shmchan__crc_table();
    const unsigned char *b = p;
    crc = ~crc;
    while (n--) crc = (crc >> 8) ^ t[(crc ^ *b++) & 0xFFu];
    return ~crc;
}

static inline const char *shmchan_strerror(int rc)
{
    static const char *const s[] = {"ok", "timeout", "too large", "corrupt channel",
        "record of another type", "not a shmchan segment", "incompatible layout",
        "initialisation timeout", "system error"};
    return rc >= 0 && rc <= SHMCHAN_SYSERR ? s[rc] : "unknown";
}

static inline uint32_t shmchan_max_payload(const shmchan *ch) { return ch->max_record - 16; }

/* Records in the ring now, msgs_put - msgs_got (layout.md 2.3; a queue's qsize()):
 * a snapshot, never negative. */
static inline uint64_t shmchan_items(const shmchan *ch)
{
    uint64_t got = atomic_load_explicit(ch->msgs_got, memory_order_acquire);
    uint64_t put = atomic_load_explicit(ch->msgs_put, memory_order_acquire);
    return put > got ? put - got : 0;
}

static inline double shmchan__now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A deadline on the monotonic clock; timeout_s < 0 means "none" (-1). */
static inline double shmchan__deadline(double timeout_s)
{
    return timeout_s < 0 ? -1.0 : shmchan__now() + timeout_s;
}

static inline void shmchan__sleep(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
}

static inline int shmchan__fail(shmchan *ch, int rc, const char *why)
{
    ch->why = why;
    return rc;
}

/* A u16/u32/u64 field of block A: little-endian like the host, so the low bytes. */
static inline uint64_t shmchan__field(const shmchan *ch, size_t off, size_t size)
{
    uint64_t v = 0;
    memcpy(&v, ch->base + off, size);
    return v;
}

static inline void shmchan_close(shmchan *ch)
{
    if (ch->ne && ch->ne != SEM_FAILED) sem_close(ch->ne);
    if (ch->nf && ch->nf != SEM_FAILED) sem_close(ch->nf);
    if (ch->jn && ch->jn != SEM_FAILED) sem_close(ch->jn);
    if (ch->base && ch->base != MAP_FAILED) munmap(ch->base, ch->size);
    if (ch->fd >= 0) close(ch->fd); /* closing the last fd drops our OFD locks (6.1) */
    ch->ne = ch->nf = ch->jn = NULL;
    ch->base = NULL;
    ch->fd = -1;
}

/* Open the existing posix channel `name` (e.g. "/jobs", as Python's Channel.name or
 * Queue.name returns it), waiting at most open_timeout_s (shmchan uses 2 s; < 0: no
 * limit) for its creator to publish it (layout.md 4), then validate it in the order
 * of layout.md 3.1. On failure *ch is closed. */
static inline int shmchan_open(shmchan *ch, const char *name, double open_timeout_s)
{
    memset(ch, 0, sizeof *ch);
    ch->fd = -1;
    /* Kept to name side segments: <name>.L<seq as %016llx> (layout.md 2.5). */
    if (strlen(name) >= sizeof ch->name) {
        errno = ENAMETOOLONG;
        return shmchan__fail(ch, SHMCHAN_SYSERR, "channel name too long");
    }
    strcpy(ch->name, name);
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) return shmchan__fail(ch, SHMCHAN_SYSERR, "shm_open failed");
    ch->fd = fd;
    /* Layout.md 4: wait while shorter than a header or magic is 0. */
    double deadline = shmchan__deadline(open_timeout_s), delay = 0.0005;
    struct stat st;
    for (;;) {
        uint64_t magic = 0;
        if (fstat(fd, &st) != 0) goto sys;
        if (st.st_size >= (off_t)SHMCHAN_HEADER_SIZE && pread(fd, &magic, 8, 0) != 8) goto sys;
        if (magic != 0) break;
        if (deadline >= 0 && shmchan__now() >= deadline) {
            shmchan_close(ch);
            return shmchan__fail(ch, SHMCHAN_INIT_TIMEOUT, "magic still 0 at the deadline");
        }
        shmchan__sleep(delay);
        delay = delay * 2 < 0.02 ? delay * 2 : 0.02;
    }
    if (fstat(fd, &st) != 0) goto sys;
    if (st.st_size < (off_t)SHMCHAN_HEADER_SIZE) { /* shrunk meanwhile */
        shmchan_close(ch);
        return shmchan__fail(ch, SHMCHAN_NOT_SHMCHAN, "segment smaller than a header");
    }
    ch->size = (size_t)st.st_size;
    ch->base = mmap(NULL, ch->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ch->base == MAP_FAILED) goto sys;

    int rc = SHMCHAN_CORRUPT;
    const char *why;
    /* R6: acquire load of magic; every header read below comes after it. */
    uint64_t magic = atomic_load_explicit((_Atomic uint64_t *)ch->base, memory_order_acquire);
    uint64_t capacity = shmchan__field(ch, 16, 8);
    uint32_t max_record = (uint32_t)shmchan__field(ch, 24, 4);
    if (magic != SHMCHAN_MAGIC) {
        rc = SHMCHAN_NOT_SHMCHAN, why = "bad magic";
        goto bad;
    }
    if (shmchan__field(ch, 8, 2) != 1 || shmchan__field(ch, 32, 4) != 0) {
        rc = SHMCHAN_INCOMPATIBLE, why = "layout major is not 1, or unknown incompat feature";
        goto bad;
    }
    if (shmchan_crc32(0, ch->base + 8, 112) != shmchan__field(ch, 120, 4)) {
        why = "header CRC mismatch";
        goto bad;
    }
    if (shmchan__field(ch, 12, 4) != SHMCHAN_HEADER_SIZE ||
        shmchan__field(ch, 28, 2) != 16 || shmchan__field(ch, 30, 2) != 16) {
        why = "unsupported header_size, record_header_size or record_align";
        goto bad;
    }
    if (capacity < 4096 || capacity > (1ull << 40) || (capacity & (capacity - 1)) ||
        max_record < 16 || max_record % 16 || max_record > capacity / 2 ||
        max_record > (1u << 31)) {
        why = "invalid capacity/max_record geometry";
        goto bad;
    }
    if ((uint64_t)st.st_size != SHMCHAN_HEADER_SIZE + capacity) {
        why = "segment size is not header_size + capacity"; /* else SIGBUS risk */
        goto bad;
    }
    if (shmchan__field(ch, 48, 2) != 1 || shmchan__field(ch, 50, 2) != 1) {
        rc = SHMCHAN_INCOMPATIBLE, why = "lock_kind/wakeup_kind is not posix (1/1)";
        goto bad;
    }
    ch->capacity = capacity;
    ch->mask = capacity - 1;
    ch->max_record = max_record;
    ch->max_items = shmchan__field(ch, SHMCHAN_OFF_MAX_ITEMS, 8); /* block A, in the CRC */
    ch->data = ch->base + SHMCHAN_HEADER_SIZE;
    ch->tail = (_Atomic uint64_t *)(ch->base + SHMCHAN_OFF_TAIL);
    ch->head = (_Atomic uint64_t *)(ch->base + SHMCHAN_OFF_HEAD);
    ch->msgs_put = (_Atomic uint64_t *)(ch->base + SHMCHAN_OFF_MSGS_PUT);
    ch->msgs_got = (_Atomic uint64_t *)(ch->base + SHMCHAN_OFF_MSGS_GOT);
    ch->consumers_waiting = (_Atomic uint32_t *)(ch->base + SHMCHAN_OFF_CONSUMERS_WAITING);
    ch->producers_waiting = (_Atomic uint32_t *)(ch->base + SHMCHAN_OFF_PRODUCERS_WAITING);
    ch->state = (_Atomic uint32_t *)(ch->base + SHMCHAN_OFF_STATE);
    uint64_t head = atomic_load_explicit(ch->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(ch->tail, memory_order_acquire);
    if (tail - head > capacity || (head | tail) & 15) {
        why = "impossible ring positions";
        goto bad;
    }
    /* Layout.md 7.1: /shmchan.<nonce as %016llx>.ne, .nf and .jn, opened with flags 0.
     * All three exist in every v1.0 channel (Python refuses to attach otherwise);
     * jn is opened for that check and for completeness, this peer never waits on it. */
    char sname[64];
    unsigned long long nonce = shmchan__field(ch, SHMCHAN_OFF_NONCE, 8);
    snprintf(sname, sizeof sname, "/shmchan.%016llx.ne", nonce);
    ch->ne = sem_open(sname, 0);
    snprintf(sname, sizeof sname, "/shmchan.%016llx.nf", nonce);
    ch->nf = sem_open(sname, 0);
    snprintf(sname, sizeof sname, "/shmchan.%016llx.jn", nonce);
    ch->jn = sem_open(sname, 0);
    if (ch->ne == SEM_FAILED || ch->nf == SEM_FAILED || ch->jn == SEM_FAILED) {
        why = "wakeup semaphores missing";
        goto bad;
    }
    return SHMCHAN_OK;
sys:
    rc = SHMCHAN_SYSERR, why = "system call failed while opening";
bad:;
    int saved = errno;
    shmchan_close(ch);
    errno = saved;
    return shmchan__fail(ch, rc, why);
}

/* -- locks (layout.md 6.1): exclusive OFD lock on byte 128 (write) or 256 (read) -- */

static inline int shmchan__flock(shmchan *ch, int cmd, short type, off_t byte)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl); /* l_pid MUST be 0 for OFD locks */
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = byte;
    fl.l_len = 1;
    return fcntl(ch->fd, cmd, &fl);
}

/* Take a lock before `deadline` (< 0: wait as long as it takes). Holders keep it
 * for microseconds, so a timed wait polls: yields first, then sleeps up to 1 ms. */
static inline int shmchan__lock(shmchan *ch, off_t byte, double deadline)
{
    if (deadline < 0) {
        while (shmchan__flock(ch, F_OFD_SETLKW, F_WRLCK, byte) == -1)
            if (errno != EINTR) return shmchan__fail(ch, SHMCHAN_SYSERR, "F_OFD_SETLKW failed");
        return SHMCHAN_OK;
    }
    double grace = shmchan__now() + SHMCHAN_LOCK_GRACE;
    if (deadline < grace) deadline = grace;
    for (int n = 1;; n++) {
        if (shmchan__flock(ch, F_OFD_SETLK, F_WRLCK, byte) == 0) return SHMCHAN_OK;
        if (errno != EAGAIN && errno != EACCES && errno != EINTR)
            return shmchan__fail(ch, SHMCHAN_SYSERR, "F_OFD_SETLK failed");
        if (shmchan__now() >= deadline) return shmchan__fail(ch, SHMCHAN_TIMEOUT, "lock busy");
        if (n < 64) sched_yield();
        else shmchan__sleep(n - 63 < 50 ? 0.00002 * (n - 63) : 0.001);
    }
}

static inline void shmchan__unlock(shmchan *ch, off_t byte)
{
    shmchan__flock(ch, F_OFD_SETLK, F_UNLCK, byte);
}

/* -- wakeups (layout.md 8) -------------------------------------------------- */

/* Post only while the value is 0: semaphores are hints whose values stay bounded. */
static inline void shmchan__post_if_zero(sem_t *s)
{
    int v = 1;
    if (sem_getvalue(s, &v) == 0 && v == 0) sem_post(s);
}

/* Sleep on `s` for at most one wait slice, never past `deadline`. */
static inline void shmchan__wait(sem_t *s, double deadline)
{
    double slice = SHMCHAN_WAIT_SLICE;
    if (deadline >= 0) {
        double left = deadline - shmchan__now();
        if (left <= 0) return;
        if (left < slice) slice = left;
    }
    struct timespec ts; /* sem_timedwait takes a CLOCK_REALTIME instant */
    clock_gettime(CLOCK_REALTIME, &ts);
    long ns = ts.tv_nsec + (long)(slice * 1e9);
    ts.tv_sec += ns / 1000000000L;
    ts.tv_nsec = ns % 1000000000L;
    sem_timedwait(s, &ts); /* token, timeout or EINTR: the caller re-checks either way */
}

static inline void shmchan__count(_Atomic uint32_t *w, uint32_t delta)
{
    /* Plain load and store (no RMW): only one side writes it, under its lock. */
    uint32_t v = atomic_load_explicit(w, memory_order_relaxed);
    atomic_store_explicit(w, v + delta, memory_order_relaxed);
}

/* -- put (layout.md 5, wrap rule 2.6, counting 2.3); caller holds the write lock -- */

static inline void shmchan__put_header(unsigned char *at, uint32_t len, uint16_t type)
{
    unsigned char h[16] = {0}; /* length, type, flags = 0, reserved = 0 */
    memcpy(h, &len, 4);
    memcpy(h + 4, &type, 2);
    memcpy(at, h, 16);
}

static inline int shmchan__try_put(shmchan *ch, const void *p, uint32_t len)
{
    /* R4: head (acquire) before we overwrite bytes consumers released. */
    uint64_t head = atomic_load_explicit(ch->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(ch->tail, memory_order_relaxed); /* ours */
    if (tail - head > ch->capacity || (head | tail) & 15)
        return shmchan__fail(ch, SHMCHAN_CORRUPT, "impossible ring positions");
    /* Layout.md 2.3: with max_items, full while msgs_put - msgs_got >= max_items.
     * msgs_put is ours; msgs_got is read without the read lock (a stale value only
     * makes us wait for the next not-full post). A count that looks negative (a peer
     * that does not count) imposes no limit, as in Python. */
    uint64_t put = atomic_load_explicit(ch->msgs_put, memory_order_relaxed); /* ours (lock) */
    if (ch->max_items) {
        uint64_t got = atomic_load_explicit(ch->msgs_got, memory_order_relaxed);
        if (put > got && put - got >= ch->max_items)
            return shmchan__fail(ch, SHMCHAN_TIMEOUT, "full: max_items records queued");
    }
    uint64_t need = ((uint64_t)len + 31) & ~(uint64_t)15; /* align16(16 + len) */
    uint64_t idx = tail & ch->mask, rem = ch->capacity - idx;
    uint64_t free_ = ch->capacity - (tail - head);
    uint64_t pad = need <= rem ? 0 : rem;
    if (pad + need > free_) return shmchan__fail(ch, SHMCHAN_TIMEOUT, "full for this record");
    if (pad) { /* padding fills [idx, capacity) exactly; the record goes to 0 */
        shmchan__put_header(ch->data + idx, (uint32_t)(rem - 16), SHMCHAN_RT_PADDING);
        idx = 0;
    }
    shmchan__put_header(ch->data + idx, len, SHMCHAN_RT_BYTES);
    if (len) memcpy(ch->data + idx + 16, p, len);
    /* Layout.md 5, put step 5: msgs_put + 1 just before the tail, so a consumer that sees the
     * record sees it counted; the release store of tail publishes both. */
    atomic_store_explicit(ch->msgs_put, put + 1, memory_order_relaxed);
    /* R1 + commit point of the put: the record bytes before the tail (release). */
    atomic_store_explicit(ch->tail, tail + pad + need, memory_order_release);
    return SHMCHAN_OK;
}

/* Send one BYTES message; timeout_s < 0 waits without limit, 0 does not wait.
 * Waits while the ring has no room for it or holds max_items records. */
static inline int shmchan_send(shmchan *ch, const void *p, uint32_t len, double timeout_s)
{
    if (16 + (uint64_t)len > ch->max_record) /* step 1: before any waiting */
        return shmchan__fail(ch, SHMCHAN_TOO_LARGE, "payload exceeds max_record - 16");
    double deadline = shmchan__deadline(timeout_s);
    int registered = 0, rc;
    for (;;) {
        if ((rc = shmchan__lock(ch, SHMCHAN_OFF_TAIL, deadline)) != SHMCHAN_OK) break;
        if (registered) shmchan__count(ch->producers_waiting, (uint32_t)-1), registered = 0;
        if (atomic_load_explicit(ch->state, memory_order_relaxed) != 0)
            rc = shmchan__fail(ch, SHMCHAN_CORRUPT, "channel marked corrupt");
        else if ((rc = shmchan__try_put(ch, p, len)) == SHMCHAN_TIMEOUT &&
                 !(deadline >= 0 && shmchan__now() >= deadline)) {
            /* Layout.md 8: register, fence (W1), re-check, then sleep unlocked. */
            shmchan__count(ch->producers_waiting, 1), registered = 1;
            atomic_thread_fence(memory_order_seq_cst);
            if ((rc = shmchan__try_put(ch, p, len)) != SHMCHAN_TIMEOUT)
                shmchan__count(ch->producers_waiting, (uint32_t)-1), registered = 0;
        }
        shmchan__unlock(ch, SHMCHAN_OFF_TAIL);
        if (!registered) break;
        shmchan__wait(ch->nf, deadline);
    }
    if (registered) { /* the lock timed out: best-effort deregistration, 1 s */
        if (shmchan__lock(ch, SHMCHAN_OFF_TAIL, shmchan__now() + 1.0) == SHMCHAN_OK) {
            shmchan__count(ch->producers_waiting, (uint32_t)-1);
            shmchan__unlock(ch, SHMCHAN_OFF_TAIL);
        }
    }
    if (rc != SHMCHAN_OK) return rc;
    /* W2: the tail store is ordered before the waiter counters are read. */
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(ch->consumers_waiting, memory_order_relaxed))
        shmchan__post_if_zero(ch->ne);
    if (atomic_load_explicit(ch->producers_waiting, memory_order_relaxed))
        shmchan__post_if_zero(ch->nf); /* baton: wake another waiting producer */
    return SHMCHAN_OK;
}

/* -- get (layout.md 5, validation 3.2); caller holds the read lock ------------ */

static inline int shmchan__corrupt(shmchan *ch, const char *why)
{
    atomic_store_explicit(ch->state, 1, memory_order_relaxed); /* never back to 0 */
    return shmchan__fail(ch, SHMCHAN_CORRUPT, why);
}

static inline int shmchan__try_get(shmchan *ch, void *buf, uint32_t cap, uint32_t *len)
{
    /* R2: tail (acquire) before reading the records it covers. */
    uint64_t tail = atomic_load_explicit(ch->tail, memory_order_acquire);
    uint64_t head = atomic_load_explicit(ch->head, memory_order_relaxed); /* ours */
    if (tail - head > ch->capacity || (head | tail) & 15)
        return shmchan__corrupt(ch, "impossible ring positions");
    uint64_t start = head;
    while (head != tail) {
        uint64_t idx = head & ch->mask;
        uint32_t n;
        uint16_t type; /* copied once: only validated copies are used to index */
        memcpy(&n, ch->data + idx, 4);
        memcpy(&type, ch->data + idx + 4, 2);
        if (type == SHMCHAN_RT_PADDING) {
            if (idx + 16 + n != ch->capacity || ch->capacity - idx > tail - head)
                return shmchan__corrupt(ch, "bad padding record");
            head += ch->capacity - idx;
            continue;
        }
        uint64_t size = ((uint64_t)n + 31) & ~(uint64_t)15;
        if (size > ch->max_record || idx + size > ch->capacity || size > tail - head)
            return shmchan__corrupt(ch, "bad record length");
        *len = n;
        if (n > cap) return shmchan__fail(ch, SHMCHAN_TOO_LARGE, "buffer too small");
        memcpy(buf, ch->data + idx + 16, n);
        ch->last_type = type;
        if (type == SHMCHAN_RT_LARGE && n >= SHMCHAN_LARGE_REF_SIZE)
            memcpy(&ch->last_large_seq, ch->data + idx + 16, 8); /* u64 seq at +0 */
        /* Layout.md 5, get step 4: msgs_got + 1 just before the head store (we hold the read
         * lock, so the plain load/store pair is ours alone). */
        uint64_t got = atomic_load_explicit(ch->msgs_got, memory_order_relaxed);
        atomic_store_explicit(ch->msgs_got, got + 1, memory_order_relaxed);
        /* R3 + commit point of the get: our reads before the head store. */
        atomic_store_explicit(ch->head, head + size, memory_order_release);
        if (type != SHMCHAN_RT_BYTES) return shmchan__fail(ch, SHMCHAN_OTHER_TYPE, "not BYTES");
        return SHMCHAN_OK;
    }
    if (head != start) atomic_store_explicit(ch->head, head, memory_order_release);
    return shmchan__fail(ch, SHMCHAN_TIMEOUT, "empty"); /* any padding: released */
}

/* Receive the oldest record into buf (cap bytes); *len = its payload length.
 * SHMCHAN_OTHER_TYPE: a non-BYTES record was consumed (its payload is in buf, its
 * type in ch->last_type). For a LARGE record (layout.md 2.5) the payload in buf is
 * the 24-byte reference; the side segment <name>.L<seq %016llx> it names is removed
 * here, unread (nobody else would: it would stay in /dev/shm until the channel is
 * removed); ch->last_large_seq is its seq, and ch->side_unlink_failed is set (errno
 * in ch->side_errno) if that removal failed. */
static inline int shmchan_recv(shmchan *ch, void *buf, uint32_t cap, uint32_t *len,
                               double timeout_s)
{
    double deadline = shmchan__deadline(timeout_s);
    int registered = 0, rc;
    ch->side_unlink_failed = 0;
    for (;;) {
        if ((rc = shmchan__lock(ch, SHMCHAN_OFF_HEAD, deadline)) != SHMCHAN_OK) break;
        if (registered) shmchan__count(ch->consumers_waiting, (uint32_t)-1), registered = 0;
        if (atomic_load_explicit(ch->state, memory_order_relaxed) != 0)
            rc = shmchan__fail(ch, SHMCHAN_CORRUPT, "channel marked corrupt");
        else if ((rc = shmchan__try_get(ch, buf, cap, len)) == SHMCHAN_TIMEOUT &&
                 !(deadline >= 0 && shmchan__now() >= deadline)) {
            /* Layout.md 8: register, fence (W1), re-check, then sleep unlocked. */
            shmchan__count(ch->consumers_waiting, 1), registered = 1;
            atomic_thread_fence(memory_order_seq_cst);
            if ((rc = shmchan__try_get(ch, buf, cap, len)) != SHMCHAN_TIMEOUT)
                shmchan__count(ch->consumers_waiting, (uint32_t)-1), registered = 0;
        }
        shmchan__unlock(ch, SHMCHAN_OFF_HEAD);
        if (!registered) break;
        shmchan__wait(ch->ne, deadline);
    }
    if (registered) { /* the lock timed out: best-effort deregistration, 1 s */
        if (shmchan__lock(ch, SHMCHAN_OFF_HEAD, shmchan__now() + 1.0) == SHMCHAN_OK) {
            shmchan__count(ch->consumers_waiting, (uint32_t)-1);
            shmchan__unlock(ch, SHMCHAN_OFF_HEAD);
        }
    }
    if (rc != SHMCHAN_OK && rc != SHMCHAN_OTHER_TYPE) return rc;
    /* W2 mirror: the head store is ordered before the waiter counters are read. */
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(ch->producers_waiting, memory_order_relaxed))
        shmchan__post_if_zero(ch->nf);
    if (atomic_load_explicit(ch->consumers_waiting, memory_order_relaxed) &&
        atomic_load_explicit(ch->tail, memory_order_relaxed) !=
            atomic_load_explicit(ch->head, memory_order_relaxed))
        shmchan__post_if_zero(ch->ne); /* baton: more data for another consumer */
    if (rc == SHMCHAN_OTHER_TYPE && ch->last_type == SHMCHAN_RT_LARGE &&
        *len >= SHMCHAN_LARGE_REF_SIZE) {
        /* Layout.md 2.5 step 4: the record is ours (committed), so its side segment is
         * too: remove its name (after the wakeups: peers need not wait for this system
         * call). Its memory is freed with the name, as nobody else maps it. */
        char side[SHMCHAN_NAME_MAX + 1];
        snprintf(side, sizeof side, "%s.L%016llx", ch->name,
                 (unsigned long long)ch->last_large_seq);
        int saved = errno;
        if (shm_unlink(side) != 0) ch->side_unlink_failed = 1, ch->side_errno = errno;
        errno = saved;
    }
    return rc;
}

#endif /* SHMCHAN_H */
