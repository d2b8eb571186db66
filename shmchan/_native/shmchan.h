/*
 * shmchan.h - the shmchan ring, layout version 2, as a plain C library.
 *
 * This is the library that the Python extension (shmchan._cext) is built on, and the
 * supported API for C programs that share channels with Python (examples/c). It does
 * not include Python.h. docs/layout.md is the normative description of every byte
 * and ordering rule used here; shmchan/_layout.py holds the same constants for Python,
 * and tests/test_layout.py checks that the three agree.
 *
 * What the library does: validate and initialise a mapped segment, claim a peer slot
 * whose liveness the kernel tracks, take and recover the write and read locks,
 * place, commit, read and release records, register waiters, sleep and wake on the
 * futex event counters, track presence (end of stream), and run the side-segment
 * pool's ownership protocol. What it does not do: create or map memory (the caller
 * does: shm_open, open, shmget), name things, or pickle.
 *
 * Threads: one shmchan_chan may be used by several threads at once for the blocking
 * calls (shmchan_send, shmchan_recv, ...). Fork: a child must not use its parent's
 * shmchan_chan (see shmchan_after_fork).
 */
#ifndef SHMCHAN_H
#define SHMCHAN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- identity ---------------------------------------------------------------------- */

#define SHMCHAN_MAGIC 0x004E4148434D4853ULL /* "SHMCHAN\0" little-endian */
#define SHMCHAN_LAYOUT_MAJOR 2
#define SHMCHAN_LAYOUT_MINOR 0

/* ---- header offsets (docs/layout.md section 2.1) ----------------------------------- */

/* Block A, identity: written by the creator before magic, never changed afterwards. */
#define SHMCHAN_OFF_MAGIC 0                 /* u64 */
#define SHMCHAN_OFF_LAYOUT_MAJOR 8          /* u16 */
#define SHMCHAN_OFF_LAYOUT_MINOR 10         /* u16 */
#define SHMCHAN_OFF_HEADER_SIZE 12          /* u32 */
#define SHMCHAN_OFF_CAPACITY 16             /* u64 */
#define SHMCHAN_OFF_MAX_RECORD 24           /* u32 */
#define SHMCHAN_OFF_RECORD_HEADER_SIZE 28   /* u16 */
#define SHMCHAN_OFF_RECORD_ALIGN 30         /* u16 */
#define SHMCHAN_OFF_FEATURES_INCOMPAT 32    /* u32 */
#define SHMCHAN_OFF_FEATURES_COMPAT 36      /* u32 */
#define SHMCHAN_OFF_NONCE 40                /* u64 */
#define SHMCHAN_OFF_LIVENESS_KIND 48        /* u16 */
#define SHMCHAN_OFF_WAKEUP_KIND 50          /* u16 */
#define SHMCHAN_OFF_CREATOR_PID 52          /* u32 */
#define SHMCHAN_OFF_CREATED_UNIX_NS 56      /* u64 */
#define SHMCHAN_OFF_SEMID_PEERS 64          /* i32 */
#define SHMCHAN_OFF_SEMID_PRESENCE 68       /* i32 */
#define SHMCHAN_OFF_MAX_PEERS 72            /* u32 */
#define SHMCHAN_OFF_PEER_TABLE_OFFSET 76    /* u32 */
#define SHMCHAN_OFF_MAX_ITEMS 80            /* u64 */
#define SHMCHAN_OFF_SIDE_SLOTS 88           /* u32 */
#define SHMCHAN_OFF_SIDE_TABLE_OFFSET 92    /* u32 */
#define SHMCHAN_OFF_CREATOR_UID 96          /* u32 */
#define SHMCHAN_OFF_SIDE_RETAINED 100       /* u32 */
#define SHMCHAN_OFF_HEADER_CRC 120          /* u32: CRC-32 of bytes [8, 120) */
/* Block B, producers. */
#define SHMCHAN_OFF_TAIL 128                /* u64 commit word */
#define SHMCHAN_OFF_WLOCK 136               /* u64 lock word */
#define SHMCHAN_OFF_MSGS_PUT 144            /* u64 */
#define SHMCHAN_OFF_SIDE_JOURNAL 152        /* u64 */
#define SHMCHAN_OFF_SIDE_JOURNAL_TAIL 160   /* u64 */
/* Block C, consumers. */
#define SHMCHAN_OFF_HEAD 256                /* u64 commit word */
#define SHMCHAN_OFF_RLOCK 264               /* u64 lock word */
#define SHMCHAN_OFF_MSGS_GOT 272            /* u64 */
#define SHMCHAN_OFF_TASKS_DONE 280          /* u64 */
/* Blocks D, E, F: event counters (futex words), state, statistics. */
#define SHMCHAN_OFF_NE_SEQ 384              /* u32: not-empty event counter */
#define SHMCHAN_OFF_NF_SEQ 512              /* u32: not-full event counter */
#define SHMCHAN_OFF_STATE 640               /* u32 */
#define SHMCHAN_OFF_JN_SEQ 644              /* u32: joined event counter */
#define SHMCHAN_OFF_RECOVERIES 648          /* u64: lock takeovers so far */
/* Block G, owner of an unnamed queue (Python's lifetime service). */
#define SHMCHAN_OFF_OWNER 768               /* char[256] */
#define SHMCHAN_OWNER_SIZE 256
/* Block H, presence hints (and, for liveness kind 1, the presence lock bytes). */
#define SHMCHAN_OFF_WRITERS_OPEN 1024       /* u32 */
#define SHMCHAN_OFF_WRITERS_SEEN 1028       /* u32 */
#define SHMCHAN_OFF_READERS_OPEN 1032       /* u32 */
#define SHMCHAN_OFF_READERS_SEEN 1036       /* u32 */
/* Waiter bitmaps: bit i of word i/64 is set while peer slot i has a sleeper. */
#define SHMCHAN_OFF_WAITING_CONSUMERS 1152  /* u64[16] */
#define SHMCHAN_OFF_WAITING_PRODUCERS 1280  /* u64[16] */
#define SHMCHAN_OFF_WAITING_JOINERS 1408    /* u64[16] */

#define SHMCHAN_SIDE_TABLE_OFFSET 2048
#define SHMCHAN_SIDE_ENTRY_SIZE 32
#define SHMCHAN_SIDE_SLOTS_MAX 64
#define SHMCHAN_PEER_TABLE_OFFSET 4096
#define SHMCHAN_PEER_ENTRY_SIZE 32
#define SHMCHAN_MAX_PEERS_LIMIT 1024

/* Side entry fields (relative to the entry). */
#define SHMCHAN_SIDE_STATE 0                /* u64 state word */
#define SHMCHAN_SIDE_SIZE 8                 /* u64 bytes of the backing object */
#define SHMCHAN_SIDE_FILE_GEN 16            /* u32 */
/* Peer slot fields (relative to the slot). */
#define SHMCHAN_PEER_GEN 0                  /* u32 */
#define SHMCHAN_PEER_PID 4                  /* u32, diagnostic */
#define SHMCHAN_PEER_FLAGS 8                /* u32, bit 0: in use */
#define SHMCHAN_PEER_ATTACHED_UNIX_NS 16    /* u64, diagnostic */

/* ---- constants ----------------------------------------------------------------------- */

#define SHMCHAN_HEADER_BASE 4096            /* header_size = align4096(4096 + 32 * max_peers) */
#define SHMCHAN_RECORD_HEADER_SIZE 16
#define SHMCHAN_RECORD_ALIGN 16
#define SHMCHAN_MIN_CAPACITY 4096ULL
#define SHMCHAN_MAX_CAPACITY (1ULL << 40)
#define SHMCHAN_MAX_RECORD_LIMIT (1ULL << 31)
#define SHMCHAN_DEFAULT_MAX_PEERS 1024
#define SHMCHAN_DEFAULT_SIDE_SLOTS 64
#define SHMCHAN_DEFAULT_SIDE_RETAINED 4

/* Commit words (tail, head): count in the top 27 bits, position in 16-byte units in the
 * low 37 bits, both modulo their width (docs/layout.md section 2.3). */
#define SHMCHAN_UNIT_BITS 37
#define SHMCHAN_COUNT_BITS 27
#define SHMCHAN_UNIT_MASK ((1ULL << SHMCHAN_UNIT_BITS) - 1)
#define SHMCHAN_COUNT_MASK ((1ULL << SHMCHAN_COUNT_BITS) - 1)
#define SHMCHAN_MAX_RECORDS_IN_RING (SHMCHAN_COUNT_MASK - 1)

/* Record types (record header offset +4). */
#define SHMCHAN_RT_PADDING 0
#define SHMCHAN_RT_BYTES 1
#define SHMCHAN_RT_PICKLE 2
#define SHMCHAN_RT_PICKLE_OOB 3
#define SHMCHAN_RT_SIDE 4
#define SHMCHAN_SIDE_REF_SIZE 24            /* payload of an RT_SIDE record */

/* liveness_kind */
#define SHMCHAN_LIVENESS_OFD 1              /* OFD locks on the segment's file */
#define SHMCHAN_LIVENESS_SYSV 2             /* a SysV semaphore set with SEM_UNDO */
/* wakeup_kind */
#define SHMCHAN_WAKEUP_FUTEX 1              /* futex event counters in the header */

/* state */
#define SHMCHAN_STATE_NORMAL 0
#define SHMCHAN_STATE_CORRUPT 1
#define SHMCHAN_STATE_REMOVED 2          /* sysv: the channel was removed; handles stop */

/* Side entry states (low two bits of the state word). */
#define SHMCHAN_SIDE_FREE 0
#define SHMCHAN_SIDE_WRITING 1
#define SHMCHAN_SIDE_QUEUED 2
#define SHMCHAN_SIDE_READING 3

/* Roles for presence. */
#define SHMCHAN_WRITER 0
#define SHMCHAN_READER 1

/* Events: which counter a waiter sleeps on. */
#define SHMCHAN_EV_NOT_EMPTY 0              /* consumers */
#define SHMCHAN_EV_NOT_FULL 1               /* producers */
#define SHMCHAN_EV_JOINED 2                 /* joiners */

/* Locks. */
#define SHMCHAN_WLOCK 0
#define SHMCHAN_RLOCK 1

/* Return codes. Non-negative: outcomes; negative: errors. */
#define SHMCHAN_OK 0
#define SHMCHAN_EMPTY 1         /* nothing to read now */
#define SHMCHAN_FULL 2          /* no room now */
#define SHMCHAN_TIMEOUT 3       /* the deadline passed */
#define SHMCHAN_INTR 4          /* a signal interrupted a wait (nothing changed) */
#define SHMCHAN_BUSY 5          /* the lock is held by someone else */
#define SHMCHAN_EOF 6           /* every writer is gone and the ring is drained */
#define SHMCHAN_BROKEN 7        /* every reader is gone */
#define SHMCHAN_CLOSED 8        /* the caller asked to stop (shmchan_chan.closing) */
#define SHMCHAN_E_CORRUPT -1    /* impossible positions, records or state: see why */
#define SHMCHAN_E_SYS -2        /* a system call failed: errno is set */
#define SHMCHAN_E_NOPEERS -3    /* every peer slot is taken by a live process */
#define SHMCHAN_E_NOTSHM -4     /* wrong magic */
#define SHMCHAN_E_INCOMPAT -5   /* layout major or incompat feature not understood */
#define SHMCHAN_E_TOOBIG -6     /* a record can never fit */
#define SHMCHAN_E_STATE -7      /* an argument does not match the segment's state */
#define SHMCHAN_E_REMOVED -8    /* the channel was removed (state REMOVED) */

/* ---- the per-attachment handle ------------------------------------------------------- */

/* Process-local state of one attachment. Fields are read-only for callers except
 * `closing`, which a caller may set (with an atomic store, from any thread) to make
 * every wait of this handle return SHMCHAN_CLOSED. */
typedef struct shmchan_chan {
    uint8_t *base;              /* the mapped segment */
    uint64_t size;
    uint8_t *data;              /* base + header_size */
    uint64_t capacity, mask, max_items;
    uint32_t max_record, header_size, max_peers, side_slots, side_retained;
    int liveness;               /* SHMCHAN_LIVENESS_* */
    int fd;                     /* liveness 1: this attachment's own open file */
    int semid_peers, semid_presence; /* liveness 2 */
    int slot;                   /* our peer slot, -1 when none */
    uint32_t gen;               /* its generation when we claimed it */
    uint64_t token;             /* (gen << 16) | (slot + 1): our lock token */
    uint32_t roles;             /* presence held: bit SHMCHAN_WRITER / SHMCHAN_READER */
    int closing;                /* set to make waits return SHMCHAN_CLOSED */
    int slice_intr;             /* set: a blocking wait or lock wait also returns SHMCHAN_INTR
                                 * after each slice (SHMCHAN_WAIT_SLICE) without progress, so
                                 * that a caller can run signal handlers that a signal
                                 * arriving outside a system call left pending */
    int64_t spin_ns[2];         /* adaptive spin budgets: [0] receive, [1] send */
    uint32_t idle_wakes;        /* wakes that woke nobody (triggers a waiter sweep) */
    int local_waiters[3];       /* this handle's sleepers per event (reg_lock) */
    int room_plenty;            /* the last get emptied the ring, took it to half full or
                                 * below, or freed an item slot: wake every producer */
    void *reg_lock;             /* a pthread_mutex_t owned by the library */
    char why[160];              /* what a SHMCHAN_E_CORRUPT/... result was about */
} shmchan_chan;

/* What a creator chooses (everything else is derived). */
typedef struct shmchan_params {
    uint64_t capacity;          /* power of two in [4096, 2^40] */
    uint32_t max_record;        /* multiple of 16, >= 16, <= capacity/2, <= 2^31 */
    uint64_t max_items;         /* 0: no item limit */
    uint32_t max_peers;         /* 0: SHMCHAN_DEFAULT_MAX_PEERS */
    uint32_t side_slots;        /* 0: SHMCHAN_DEFAULT_SIDE_SLOTS; at most 64 */
    uint32_t side_retained;     /* entries that keep their objects; 0: the default */
    uint64_t nonce;             /* random, non-zero */
    int liveness;
    int semid_peers, semid_presence;   /* liveness 2, else -1 */
    uint32_t creator_pid, creator_uid;
    uint64_t created_unix_ns;
} shmchan_params;

/* One piece of a record's payload: n bytes from p, at payload offset off. */
typedef struct shmchan_part {
    uint64_t off;
    const void *p;
    uint64_t n;
} shmchan_part;

/* A record to write: `n` payload bytes of `type`, gathered from `parts`. */
typedef struct shmchan_rec {
    uint32_t type;
    uint64_t n;
    const shmchan_part *parts;
    size_t nparts;
} shmchan_rec;

/* A record found by shmchan_r_next: its payload stays valid until the read lock is
 * released. `next` is the cursor after it. */
typedef struct shmchan_view {
    uint32_t type;
    uint64_t n;
    const uint8_t *payload;
    uint64_t next;              /* head position, in units, after this record */
} shmchan_view;

/* The payload of an RT_SIDE record. */
typedef struct shmchan_side_ref {
    uint32_t index, ticket, file_gen, inner_type;
    uint64_t size;
} shmchan_side_ref;

/* ---- header ------------------------------------------------------------------------ */

uint32_t shmchan_crc32(const void *p, size_t n);
/* Chained CRC-32, as zlib's crc32(crc, p, n): shmchan_crc32(p, n) == update(0, p, n). */
uint32_t shmchan_crc32_update(uint32_t crc, const void *p, size_t n);
/* header_size for a number of peer slots. */
uint32_t shmchan_header_size(uint32_t max_peers);
/* Why a geometry is invalid (NULL when valid). */
const char *shmchan_check_geometry(uint64_t capacity, uint64_t max_record);
/* Write the identity block of a fresh, zero-filled segment (magic stays 0). */
int shmchan_init_header(void *base, uint64_t size, const shmchan_params *p, char *why, size_t whylen);
/* Publish: a release store of magic. */
void shmchan_publish(void *base);
/* Validate a published header against the mapped size and the backend's liveness kind
 * (SHMCHAN_OK, _E_NOTSHM, _E_INCOMPAT, _E_CORRUPT with `why`). liveness 0: any. */
int shmchan_check_header(const void *base, uint64_t size, int liveness, char *why, size_t whylen);

/* ---- attach, detach, fork -------------------------------------------------------- */

/* Fill `c` from a validated segment. fd (liveness 1) is this attachment's own open file
 * description of the segment: the library takes OFD locks on it. Does not claim a slot. */
int shmchan_open(shmchan_chan *c, void *base, uint64_t size, int fd);
/* Claim a peer slot: its liveness lock, then a new generation. Also sweeps registrations
 * left by dead peers. SHMCHAN_OK, SHMCHAN_E_NOPEERS, SHMCHAN_E_SYS. */
int shmchan_attach(shmchan_chan *c);
/* Give up presence and the peer slot, and free the handle's own resources. The caller
 * must have stopped using c. */
void shmchan_detach(shmchan_chan *c);
/* Free what shmchan_open allocated (after shmchan_detach, or without attaching). */
void shmchan_close(shmchan_chan *c);
/* In a forked child: forget the parent's slot and presence (the child must not use the
 * parent's lock token); `fd` is the child's own new open file (liveness 1), or -1. The
 * caller then calls shmchan_attach and re-enters its roles. */
void shmchan_after_fork(shmchan_chan *c, int fd);

/* ---- locks ----------------------------------------------------------------------- */

/* Try to take lock `which` (SHMCHAN_WLOCK/RLOCK) with a short spin: SHMCHAN_OK or
 * SHMCHAN_BUSY. Never sleeps and never makes a system call. */
int shmchan_trylock(shmchan_chan *c, int which);
/* Take lock `which`, waiting until `deadline` (CLOCK_MONOTONIC seconds; < 0: no limit).
 * A holder found dead (its slot's liveness is gone or its generation changed) is taken
 * over, and what it left half done is repaired. SHMCHAN_OK, SHMCHAN_TIMEOUT,
 * SHMCHAN_INTR (a signal interrupted a sleep, or a slice passed with `slice_intr` set:
 * nothing changed, call again), SHMCHAN_CLOSED, SHMCHAN_E_SYS. A stopped (SIGSTOP)
 * holder is waited for, never robbed. */
int shmchan_lock(shmchan_chan *c, int which, double deadline);
void shmchan_unlock(shmchan_chan *c, int which);
/* Whether the holder of the lock word `token` is certainly dead (a system call). */
int shmchan_token_dead(shmchan_chan *c, uint64_t token);

/* ---- producer side (write lock held) ------------------------------------------------ */

/* Append records from recs[0..nrec) in order, as many as fit now (at most 64 KiB of ring
 * per call after the first), published with one commit store. *written = how many.
 * SHMCHAN_OK (possibly 0 written: full), SHMCHAN_E_TOOBIG (recs[0] can never fit),
 * SHMCHAN_E_CORRUPT. */
int shmchan_w_append(shmchan_chan *c, const shmchan_rec *recs, size_t nrec, size_t *written);
/* Whether a record of n payload bytes fits now (a racy check without the lock). */
int shmchan_room_for(shmchan_chan *c, uint64_t n);

/* ---- consumer side (read lock held) -------------------------------------------------- */

/* The record at the cursor (in units; shmchan_r_begin starts it at the head). Padding is
 * skipped, moving the cursor past it: SHMCHAN_OK with *v filled (v->next is the cursor
 * after the record), SHMCHAN_EMPTY, SHMCHAN_E_CORRUPT. */
int shmchan_r_begin(shmchan_chan *c, uint64_t *at);
int shmchan_r_next(shmchan_chan *c, uint64_t *at, shmchan_view *v);
/* Commit: head = `at`, consuming `count` records (padding before `at` included). */
void shmchan_r_commit(shmchan_chan *c, uint64_t at, uint32_t count);

/* ---- waiting and waking -------------------------------------------------------------- */

uint32_t shmchan_seq(shmchan_chan *c, int event);
/* Count one more (delta +1) or one fewer (-1) sleeper of this handle on `event`: the
 * handle's bit in the event's waiter bitmap is set while it has any (so a sleeper that
 * dies is uncounted by whoever next holds its dead slot). */
void shmchan_register(shmchan_chan *c, int event, int delta);
/* Sleep until `event`'s counter moves from `seen`, the timeout passes (seconds), or a
 * signal arrives: SHMCHAN_OK (moved or spurious), SHMCHAN_TIMEOUT, SHMCHAN_INTR.
 * The waits below return SHMCHAN_INTR when a signal interrupts them (nothing changed:
 * call again), and, with `slice_intr` set, after every slice that ended without progress. */
int shmchan_wait(shmchan_chan *c, int event, uint32_t seen, double timeout);
/* Wait on several handles' not-empty counters at once (FUTEX_WAITV). */
int shmchan_wait_any(shmchan_chan *const *cs, const uint32_t *seen, size_t n, double timeout);
/* Move `event`'s counter and wake up to n sleepers, if any is registered. */
void shmchan_wake(shmchan_chan *c, int event, int n);
/* After a commit: the wakes docs/layout.md section 8 prescribes. */
void shmchan_after_put(shmchan_chan *c, size_t records);
void shmchan_after_get(shmchan_chan *c, size_t records);
/* Adaptive spin: poll until `still_waiting` is false or the budget runs out. */
int shmchan_spin(shmchan_chan *c, int dir, int (*still_waiting)(shmchan_chan *, void *), void *arg);
/* The receiver's spin: 1 if a record appeared within the budget. */
int shmchan_spin_readable(shmchan_chan *c);

/* Flags of the blocking waits. */
#define SHMCHAN_F_EOF 1         /* a receive may end with SHMCHAN_EOF (no writer left) */
#define SHMCHAN_F_BROKEN 2      /* a send may end with SHMCHAN_BROKEN (no reader left) */
#define SHMCHAN_F_SIDE 4        /* a send waits for a free side entry, not for ring room */
#define SHMCHAN_F_NOSPIN 8      /* sleep at once, without the adaptive spin */

/* The complete wait of a receiver, without taking anything: return SHMCHAN_OK once a
 * record is probably there (the caller then takes it under the read lock, and calls
 * again if another consumer was faster), or SHMCHAN_TIMEOUT (deadline < 0: none),
 * SHMCHAN_EOF, SHMCHAN_INTR, SHMCHAN_CLOSED, SHMCHAN_E_CORRUPT. Spins adaptively, then
 * registers, re-checks and sleeps in slices of at most SHMCHAN_WAIT_SLICE seconds. */
int shmchan_wait_readable(shmchan_chan *c, double deadline, int flags);
/* The same for a sender waiting for room for a record of n payload bytes (or, with
 * SHMCHAN_F_SIDE, for a free side entry): SHMCHAN_OK, _TIMEOUT, _BROKEN, _INTR, ... */
int shmchan_wait_writable(shmchan_chan *c, uint64_t n, double deadline, int flags);
/* Wait until every record put so far was marked done. */
int shmchan_wait_joined(shmchan_chan *c, double deadline);
#define SHMCHAN_WAIT_SLICE 0.1

/* ---- counts and tasks ---------------------------------------------------------------- */

uint64_t shmchan_put_total(shmchan_chan *c);
uint64_t shmchan_got_total(shmchan_chan *c);
uint64_t shmchan_qsize(shmchan_chan *c);
uint64_t shmchan_unfinished(shmchan_chan *c);
/* SHMCHAN_OK, or SHMCHAN_E_STATE if more tasks would be done than were put. */
int shmchan_task_done(shmchan_chan *c);
int shmchan_is_empty(shmchan_chan *c);
int shmchan_corrupt(shmchan_chan *c, const char *why);
int shmchan_state(shmchan_chan *c);

/* ---- presence (channels) --------------------------------------------------------------- */

int shmchan_presence_enter(shmchan_chan *c, int role);
int shmchan_presence_leave(shmchan_chan *c, int role);
/* 1 if a handle other than this one holds `role`, 0 if none, negative on error. */
int shmchan_presence_others(shmchan_chan *c, int role);
/* 1 if `role` has had a holder and none but this handle is left. */
int shmchan_role_gone(shmchan_chan *c, int role);

/* ---- side-segment pool (docs/layout.md section 2.5) ------------------------------------ */

/* Claim a FREE entry (or one whose owner died, when nothing is free) for writing:
 * SHMCHAN_OK with the entry's index and ticket, or SHMCHAN_FULL when every entry is in use. */
int shmchan_side_claim(shmchan_chan *c, uint32_t *index, uint32_t *ticket);
/* 1 when every retained entry (index < side_retained) is in use, 0 when one is FREE or
 * there are none; with 1, *reading tells whether a live reader is copying an entry out
 * (READING). A hint for a writer deciding between waiting for a retained entry (whose
 * object is made and mapped) and making a transient one; acquire loads only, and the
 * answer may be stale at once. */
int shmchan_side_retained_busy(shmchan_chan *c, int *reading);
/* Take over (as WRITING(me)) up to `max` transient entries (index >= side_retained) whose
 * reader died after taking them, so that their objects, which nobody else would remove
 * until the channel goes, can be removed: returns how many, with their indexes and new
 * tickets. For each, the caller removes the object, then calls shmchan_side_forget. */
uint32_t shmchan_side_sweep(shmchan_chan *c, uint32_t *index, uint32_t *ticket, uint32_t max);
/* A writer's entry whose object it removed: size 0, a new file generation, FREE. */
void shmchan_side_forget(shmchan_chan *c, uint32_t index, uint32_t ticket);
/* With the write lock held: free entries left WRITING by writers that died before queueing
 * them (then call shmchan_side_claim again). */
void shmchan_side_reclaim(shmchan_chan *c);
/* Read an entry's backing object: size and file generation. */
void shmchan_side_file(shmchan_chan *c, uint32_t index, uint64_t *size, uint32_t *file_gen);
/* The writer (owner) records a new backing object. */
int shmchan_side_set_file(shmchan_chan *c, uint32_t index, uint32_t ticket, uint64_t size, uint32_t file_gen);
/* Give a claimed entry back without queueing it. */
void shmchan_side_release(shmchan_chan *c, uint32_t index, uint32_t ticket);
/* Under the write lock: queue the RT_SIDE record for a written entry (journaled). */
int shmchan_side_append(shmchan_chan *c, const shmchan_side_ref *ref, size_t *written);
/* Under the read lock, for an RT_SIDE record at the head: take the entry for reading. */
int shmchan_side_take(shmchan_chan *c, const shmchan_side_ref *ref);
/* Parse and validate an RT_SIDE payload. */
int shmchan_side_parse(shmchan_chan *c, const uint8_t *payload, uint64_t n, shmchan_side_ref *ref);
/* The reader is done with an entry: it becomes FREE. Entries from index side_retained on
 * are transient: their reader removes the backing object first, then calls
 * shmchan_side_drop (size 0, FREE) instead. */
void shmchan_side_done(shmchan_chan *c, uint32_t index, uint32_t ticket);
void shmchan_side_drop(shmchan_chan *c, uint32_t index, uint32_t ticket);

/* ---- simple blocking calls for C programs ------------------------------------------- */

/* Send one record of raw bytes (RT_BYTES), waiting up to `timeout` seconds (< 0: no
 * limit). SHMCHAN_OK, SHMCHAN_TIMEOUT, SHMCHAN_BROKEN (no reader left, when
 * `check_broken`), SHMCHAN_E_TOOBIG, errors. SHMCHAN_INTR when a signal arrived. */
int shmchan_send(shmchan_chan *c, const void *p, uint64_t n, double timeout, int check_broken);
/* Receive one record into buf (capacity cap): SHMCHAN_OK with *n and *type (a record too
 * large for buf is consumed and reported with SHMCHAN_E_TOOBIG and its size in *n),
 * SHMCHAN_TIMEOUT, SHMCHAN_EOF (when `check_eof`), SHMCHAN_INTR, errors. */
int shmchan_recv(shmchan_chan *c, void *buf, uint64_t cap, uint64_t *n, uint32_t *type, double timeout,
                 int check_eof);

/* Mark a channel removed (sysv: its objects are gone) and wake every sleeper. */
void shmchan_mark_removed(void *base);

/* Test-only fault points: with SHMCHAN_TEST_FAULT="point:action[:n]" in the environment
 * (read once), the n-th time (default 1) this process reaches `point` it stops itself
 * (action "stop": SIGSTOP) or exits at once (action "exit": _exit(137)). Points:
 * w.locked, w.written, w.committed (write lock held), r.locked, r.taken, r.committed
 * (read lock held), side.queued (write lock held, between the QUEUED and tail stores).
 * Without the variable a fault point costs one predictable branch. */
void shmchan_fault(const char *point);

/* CLOCK_MONOTONIC in seconds (the clock Python's time.monotonic() reads on Linux). */
double shmchan_now(void);

#ifdef __cplusplus
}
#endif
#endif /* SHMCHAN_H */
