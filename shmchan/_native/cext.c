/*
 * cext.c - the CPython binding of the shmchan C library: the module shmchan._cext.
 *
 * One type, Core: one attachment to one channel. It owns the mapping and the peer slot,
 * and does every put and get of the Python faces in one call: encode (exact bytes as
 * they are, other objects with pickle protocol 5), lock, place, copy, commit, unlock,
 * wake, and decode. What needs the OS beyond the segment (side segments) or unusual
 * encodings (out-of-band pickle buffers) goes to Python hooks set with configure().
 *
 * GIL rules, which make the combination deadlock-free:
 *  - An uncontended operation runs entirely with the GIL held (no GIL round trip).
 *  - A thread never waits for a ring lock while holding the GIL: with the GIL it only
 *    tries (a bounded spin); a real wait happens with the GIL released.
 *  - Copies of at least GIL_FREE_BYTES are done with the GIL released, and the lock is
 *    released before the GIL is taken back.
 *  - Waits are sliced; a signal interrupts them (EINTR): the GIL is re-taken, pending
 *    signal handlers run (PyErr_CheckSignals, as CPython's own semaphore code does), and
 *    the wait resumes with the same absolute deadline unless a handler raised.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <time.h>
#include <unistd.h>

#include "shmchan.h"

#define GIL_FREE_BYTES (64 * 1024)
#define PYERR (-1000) /* internal: a Python exception is set */
#define LOCK_GRACE 0.005 /* a non-blocking call may wait this long for a lock */
#define SIDE_RETAINED_WAIT 0.005 /* a big put may wait this long for a retained side entry, */
#define SIDE_IDLE_GRACE 0.001    /* or this long when no reader is at work */

/* Binding flags (the library's own are 1..8). */
#define F_RAW 0x10      /* bytes in, bytes out: no pickling */
#define F_NOGRACE 0x20  /* return BUSY at once if a lock is held (the async face) */

/* ---- module state (single-phase init: one interpreter) ------------------------------ */

static PyObject *E_NotFound, *E_Shmchan, *E_Closed, *E_Corrupt, *E_NotShm, *E_Incompat, *E_Eof, *E_Broken, *E_TooLarge,
    *E_Undecodable, *E_UndecodableBatch, *E_TooManyPeers;
static PyObject *H_encode_slow, *H_decode_slow, *H_side_prepare, *H_side_read;
static PyObject *pickle_dumps, *pickle_loads, *kw_buffer_callback, *py_five;
static PyObject *NOTHING, *BUSY;

/* ---- the Core type ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    shmchan_chan c;
    int kind;             /* liveness kind: 1 fd-backed, 2 SysV */
    void *map;            /* our mapping (mmap or shmat) */
    uint64_t map_size;
    int attached;         /* holds a peer slot */
    int closed;           /* close() was called: no new operations */
    int finalized;        /* the mapping and the slot are gone */
    int roles;            /* presence this handle should hold (re-taken after fork) */
    Py_ssize_t inflight;  /* operations of this process inside the core (GIL-protected) */
    PyObject *broken;     /* an exception every operation raises (a failed fork re-attach) */
    PyObject *name;
    PyObject *ctx;
    PyObject *weakreflist;
} CoreObject;

static PyTypeObject CoreType;

static void finalize(CoreObject *self) {
    if (self->finalized) return;
    self->finalized = 1;
    /* The context holds this handle's side-segment mappings: they go now, not whenever
     * the garbage collector gets to them. */
    Py_CLEAR(self->ctx);
    if (self->attached) {
        shmchan_detach(&self->c);
        self->attached = 0;
    }
    shmchan_close(&self->c);
    if (self->map) {
        if (self->kind == SHMCHAN_LIVENESS_SYSV)
            shmdt(self->map);
        else
            munmap(self->map, self->map_size);
        self->map = NULL;
    }
    if (self->kind == SHMCHAN_LIVENESS_OFD && self->c.fd >= 0) {
        close(self->c.fd);
        self->c.fd = -1;
    }
}

/* Every operation is bracketed: enter() refuses a closed handle, leave() finishes a close
 * that was deferred because this or another thread of the process was inside. */
static int enter(CoreObject *self) {
    if (self->closed) {
        PyErr_Format(E_Closed, "channel handle %R is closed", self->name);
        return -1;
    }
    if (self->broken) {
        PyErr_SetObject((PyObject *)Py_TYPE(self->broken), self->broken);
        return -1;
    }
    self->inflight++;
    return 0;
}

static void leave(CoreObject *self) {
    if (--self->inflight == 0 && self->closed) finalize(self);
}

static PyObject *raise_rc(CoreObject *self, int rc) {
    const char *why = self->c.why[0] ? self->c.why : "unknown";
    switch (rc) {
    case PYERR: /* a signal handler raised: its exception is already set */
        return NULL;
    case SHMCHAN_E_CORRUPT:
        return PyErr_Format(E_Corrupt, "channel %R: %s", self->name, why);
    case SHMCHAN_E_SYS:
        return PyErr_SetFromErrno(PyExc_OSError);
    case SHMCHAN_E_NOPEERS:
        return PyErr_Format(E_TooManyPeers, "channel %R: %s", self->name, why);
    case SHMCHAN_E_NOTSHM:
        return PyErr_Format(E_NotShm, "%R: %s", self->name, why);
    case SHMCHAN_E_INCOMPAT:
        return PyErr_Format(E_Incompat, "%R: %s", self->name, why);
    case SHMCHAN_E_TOOBIG:
        return PyErr_Format(E_TooLarge, "a message exceeds channel %R's largest record (%u bytes)", self->name,
                            self->c.max_record);
    case SHMCHAN_E_REMOVED:
        return PyErr_Format(E_NotFound, "channel %R was removed", self->name);
    case SHMCHAN_CLOSED:
        return PyErr_Format(E_Closed, "channel handle %R was closed during the call", self->name);
    case SHMCHAN_EOF:
        return PyErr_Format(E_Eof, "channel %R: every writer is gone", self->name);
    case SHMCHAN_BROKEN:
        return PyErr_Format(E_Broken, "channel %R: every reader is gone", self->name);
    default:
        return PyErr_Format(E_Shmchan, "channel %R: %s (code %d)", self->name, why, rc);
    }
}

static int parse_deadline(PyObject *o, double *out) {
    if (o == Py_None) {
        *out = -1.0;
        return 0;
    }
    double d = PyFloat_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) return -1;
    *out = d < 0 ? 0.0 : d;
    return 0;
}

/* The lock deadline of a call: even a non-blocking call may wait LOCK_GRACE for a lock
 * whose holder is in its microsecond-long critical section. */
static double lock_deadline(double deadline) {
    if (deadline < 0) return deadline;
    double floor = shmchan_now() + LOCK_GRACE;
    return deadline > floor ? deadline : floor;
}

/* Take lock `which`: a short try with the GIL, then a real wait without it. Returns a
 * library code, or PYERR when a signal handler raised; SHMCHAN_INTR never escapes
 * (signal handlers run here, between slices of the wait, as in CPython's own locks). */
static int take_lock(CoreObject *self, int which, double deadline, int flags) {
    int rc = shmchan_trylock(&self->c, which);
    if (rc != SHMCHAN_BUSY) return rc;
    if (flags & F_NOGRACE) return SHMCHAN_BUSY;
    double ld = lock_deadline(deadline);
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = shmchan_lock(&self->c, which, ld);
        Py_END_ALLOW_THREADS
        if (rc != SHMCHAN_INTR) return rc;
        if (PyErr_CheckSignals() < 0) return PYERR;
    }
}

/* ---- encoding ------------------------------------------------------------------------ */

#define MAX_PARTS_INLINE 4

typedef struct {
    uint32_t type;
    uint64_t n;
    PyObject *keep;                   /* owns what the parts point into */
    Py_buffer *bufs;                  /* held buffers (raw objects, slow parts) */
    Py_ssize_t nbufs;
    shmchan_part *parts;
    shmchan_part inline_parts[MAX_PARTS_INLINE];
    size_t nparts;
    int big;                          /* needs a side segment */
    int prepared;                     /* big: a side entry holds it (ref valid) */
    shmchan_side_ref ref;
} enc_t;

static void enc_init(enc_t *e) {
    memset(e, 0, sizeof *e);
    e->parts = e->inline_parts;
}

static void enc_release(enc_t *e) {
    for (Py_ssize_t i = 0; i < e->nbufs; i++) PyBuffer_Release(&e->bufs[i]);
    PyMem_Free(e->bufs);
    e->bufs = NULL;
    e->nbufs = 0;
    if (e->parts != e->inline_parts) PyMem_Free(e->parts);
    e->parts = e->inline_parts;
    Py_CLEAR(e->keep);
}

static int enc_single(enc_t *e, uint32_t type, PyObject *bytes_obj) {
    e->type = type;
    e->n = (uint64_t)PyBytes_GET_SIZE(bytes_obj);
    e->keep = Py_NewRef(bytes_obj);
    e->inline_parts[0].off = 0;
    e->inline_parts[0].p = PyBytes_AS_STRING(bytes_obj);
    e->inline_parts[0].n = e->n;
    e->nparts = 1;
    return 0;
}

/* Take (rtype, n, payload) from the slow encoder: payload is one bytes-like object or a
 * list of (offset, bytes-like) parts. */
static int enc_from_slow(enc_t *e, PyObject *res) {
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 3) {
        PyErr_SetString(PyExc_TypeError, "encode hook must return (rtype, n, payload)");
        return -1;
    }
    unsigned long type = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(res, 0));
    unsigned long long n = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(res, 1));
    if (PyErr_Occurred()) return -1;
    PyObject *payload = PyTuple_GET_ITEM(res, 2);
    e->type = (uint32_t)type;
    e->n = n;
    e->keep = Py_NewRef(res);
    if (PyList_Check(payload)) {
        Py_ssize_t k = PyList_GET_SIZE(payload);
        e->bufs = PyMem_Calloc((size_t)(k ? k : 1), sizeof(Py_buffer));
        if (k > MAX_PARTS_INLINE) e->parts = PyMem_Calloc((size_t)k, sizeof(shmchan_part));
        if (!e->bufs || !e->parts) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < k; i++) {
            PyObject *item = PyList_GET_ITEM(payload, i);
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
                PyErr_SetString(PyExc_TypeError, "parts must be (offset, buffer) pairs");
                return -1;
            }
            unsigned long long off = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
            if (PyErr_Occurred()) return -1;
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 1), &e->bufs[i], PyBUF_SIMPLE) < 0) return -1;
            e->nbufs = i + 1;
            e->parts[i].off = off;
            e->parts[i].p = e->bufs[i].buf;
            e->parts[i].n = (uint64_t)e->bufs[i].len;
            if (off > n || (uint64_t)e->bufs[i].len > n - off) {
                PyErr_SetString(PyExc_ValueError, "a payload part lies outside its record");
                return -1;
            }
        }
        e->nparts = (size_t)k;
        return 0;
    }
    e->bufs = PyMem_Calloc(1, sizeof(Py_buffer));
    if (!e->bufs) {
        PyErr_NoMemory();
        return -1;
    }
    if (PyObject_GetBuffer(payload, &e->bufs[0], PyBUF_SIMPLE) < 0) return -1;
    e->nbufs = 1;
    if ((uint64_t)e->bufs[0].len != n) {
        PyErr_SetString(PyExc_ValueError, "payload size does not match n");
        return -1;
    }
    e->inline_parts[0].off = 0;
    e->inline_parts[0].p = e->bufs[0].buf;
    e->inline_parts[0].n = n;
    e->nparts = 1;
    return 0;
}

static PyObject *call_encode_slow(PyObject *obj, int raw, PyObject *data, PyObject *buffers) {
    PyObject *args[4] = {obj, raw ? Py_True : Py_False, data ? data : Py_None, buffers ? buffers : Py_None};
    return PyObject_Vectorcall(H_encode_slow, args, 4, NULL);
}

/* Encode one object. Fast: exact bytes (no copy), raw bytes-like objects, and pickles
 * without out-of-band buffers. Everything else goes through the slow hook. */
static int encode(CoreObject *self, PyObject *obj, int raw, enc_t *e) {
    enc_init(e);
    if (PyBytes_CheckExact(obj)) {
        enc_single(e, SHMCHAN_RT_BYTES, obj);
    } else if (raw) {
        e->bufs = PyMem_Calloc(1, sizeof(Py_buffer));
        if (!e->bufs) {
            PyErr_NoMemory();
            return -1;
        }
        if (PyObject_GetBuffer(obj, &e->bufs[0], PyBUF_SIMPLE) == 0) {
            e->nbufs = 1;
            e->type = SHMCHAN_RT_BYTES;
            e->n = (uint64_t)e->bufs[0].len;
            e->inline_parts[0] = (shmchan_part){0, e->bufs[0].buf, e->n};
            e->nparts = 1;
            e->keep = Py_NewRef(obj);
        } else {
            /* Not one contiguous block (or no buffer at all): the slow encoder copies it
             * or raises TypeError. */
            if (!PyErr_ExceptionMatches(PyExc_BufferError)) return -1;
            PyErr_Clear();
            PyObject *res = call_encode_slow(obj, 1, NULL, NULL);
            if (!res) return -1;
            int rc = enc_from_slow(e, res);
            Py_DECREF(res);
            if (rc < 0) return -1;
        }
    } else if (PyByteArray_CheckExact(obj) || PyMemoryView_Check(obj)) {
        PyObject *res = call_encode_slow(obj, 0, NULL, NULL);
        if (!res) return -1;
        int rc = enc_from_slow(e, res);
        Py_DECREF(res);
        if (rc < 0) return -1;
    } else {
        PyObject *buffers = PyList_New(0);
        if (!buffers) return -1;
        PyObject *append = PyObject_GetAttrString(buffers, "append");
        if (!append) {
            Py_DECREF(buffers);
            return -1;
        }
        PyObject *args[3] = {obj, py_five, append};
        PyObject *data = PyObject_Vectorcall(pickle_dumps, args, 2, kw_buffer_callback);
        Py_DECREF(append);
        if (!data) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
                Py_DECREF(buffers);
                return -1;
            }
            /* e.g. a memoryview nested in a container: the slow pickler can send it. */
            PyErr_Clear();
            PyObject *res = call_encode_slow(obj, 0, NULL, NULL);
            Py_DECREF(buffers);
            if (!res) return -1;
            int rc = enc_from_slow(e, res);
            Py_DECREF(res);
            if (rc < 0) return -1;
        } else if (PyList_GET_SIZE(buffers) == 0 && PyBytes_CheckExact(data)) {
            Py_DECREF(buffers);
            enc_single(e, SHMCHAN_RT_PICKLE, data);
            Py_DECREF(data);
        } else {
            PyObject *res = call_encode_slow(obj, 0, data, buffers);
            Py_DECREF(data);
            Py_DECREF(buffers);
            if (!res) return -1;
            int rc = enc_from_slow(e, res);
            Py_DECREF(res);
            if (rc < 0) return -1;
        }
    }
    if (((e->n + 31) & ~(uint64_t)15) > self->c.max_record) {
        if (raw) {
            PyErr_Format(E_TooLarge, "message of %llu bytes exceeds channel %R's max_message (%u bytes)",
                         (unsigned long long)e->n, self->name, self->c.max_record - 16);
            return -1;
        }
        e->big = 1;
    }
    return 0;
}

/* Claim a side entry for a big message: 1 with its index, ticket, object size and file
 * generation; 0 when the deadline passed with every entry in use; -1 with an exception.
 * Waits (GIL released) for a free entry. */
static int claim_side(CoreObject *self, double deadline, uint32_t *index, uint32_t *ticket, uint64_t *size,
                      uint32_t *gen) {
    shmchan_chan *c = &self->c;
    int reclaimed = 0;
    int reading;
    if (shmchan_side_retained_busy(c, &reading)) {
        /* Every retained entry is in use. While readers are at work (one is copying an
         * entry out, or the get count moved), wait a little for a retained entry to be
         * freed rather than make, fill and remove a transient object, which costs the
         * writer and the reader more than the copy itself. Bounded by the deadline and
         * SIDE_RETAINED_WAIT; with no reader at work for SIDE_IDLE_GRACE, or a reader
         * stopped mid-copy, the writer goes on with a transient entry. */
        double start = shmchan_now(), until = start + SIDE_RETAINED_WAIT;
        if (deadline >= 0 && deadline < until) until = deadline;
        uint64_t got = shmchan_got_total(c);
        Py_BEGIN_ALLOW_THREADS
        struct timespec pause = {0, 20000};
        for (;;) {
            double now = shmchan_now();
            if (now >= until) break;
            if (now >= start + SIDE_IDLE_GRACE && !reading && shmchan_got_total(c) == got) break;
            nanosleep(&pause, NULL);
            if (!shmchan_side_retained_busy(c, &reading)) break;
        }
        Py_END_ALLOW_THREADS
        if (PyErr_CheckSignals() < 0) return -1; /* nothing claimed yet: no effect */
    }
    int rc;
    for (;;) {
        rc = shmchan_side_claim(c, index, ticket);
        if (rc == SHMCHAN_OK) {
            shmchan_side_file(c, *index, size, gen);
            return 1;
        }
        if (rc != SHMCHAN_FULL) break;
        if (!reclaimed) {
            /* Entries of writers that died before queueing them: free them (write lock). */
            reclaimed = 1;
            rc = take_lock(self, SHMCHAN_WLOCK, deadline, 0);
            if (rc == SHMCHAN_OK) {
                shmchan_side_reclaim(c);
                shmchan_unlock(c, SHMCHAN_WLOCK);
                continue;
            }
            if (rc != SHMCHAN_TIMEOUT) break;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = shmchan_wait_writable(c, 0, deadline, SHMCHAN_F_SIDE);
        Py_END_ALLOW_THREADS
        if (rc == SHMCHAN_INTR) {
            if (PyErr_CheckSignals() < 0) return -1;
            continue;
        }
        if (rc == SHMCHAN_OK) {
            reclaimed = 0;
            continue;
        }
        if (rc == SHMCHAN_TIMEOUT) return 0;
        break;
    }
    raise_rc(self, rc); /* PYERR: a signal handler's exception is already set */
    return -1;
}

/* Write a big message into a side entry: the entry is claimed here (waiting until the
 * deadline), then the Python hook makes sure its object is large enough and copies the
 * message in. Returns 1 when prepared, 0 when the deadline passed first, -1 on error.
 * If the hook raises (a Ctrl-C can land anywhere in Python code), the entry is released
 * here: no exception can leave it WRITING for the life of this process. */
static int side_prepare(CoreObject *self, enc_t *e, double deadline) {
    uint32_t index, ticket, file_gen;
    uint64_t size;
    int claimed = claim_side(self, deadline, &index, &ticket, &size, &file_gen);
    if (claimed <= 0) return claimed;
    PyObject *claim = Py_BuildValue("(IIKI)", index, ticket, (unsigned long long)size, file_gen);
    if (!claim) {
        shmchan_side_release(&self->c, index, ticket);
        return -1;
    }
    /* Transient entries whose reader died holding them: taken over here, their objects
     * removed by the hook, and forgotten below whatever the hook does. */
    uint32_t dead_index[8], dead_ticket[8];
    uint32_t ndead = shmchan_side_sweep(&self->c, dead_index, dead_ticket, 8);
    PyObject *res = NULL;
    PyObject *dead = PyTuple_New(ndead);
    for (uint32_t k = 0; dead && k < ndead; k++) {
        PyObject *v = PyLong_FromUnsignedLong(dead_index[k]);
        if (!v) {
            Py_CLEAR(dead);
            break;
        }
        PyTuple_SET_ITEM(dead, k, v);
    }
    PyObject *parts = dead ? PyList_New((Py_ssize_t)e->nparts) : NULL;
    for (size_t i = 0; parts && i < e->nparts; i++) {
        PyObject *mv = PyMemoryView_FromMemory((char *)e->parts[i].p, (Py_ssize_t)e->parts[i].n, PyBUF_READ);
        PyObject *pair = mv ? Py_BuildValue("(KN)", (unsigned long long)e->parts[i].off, mv) : NULL;
        if (!pair) {
            Py_CLEAR(parts);
            break;
        }
        PyList_SET_ITEM(parts, (Py_ssize_t)i, pair);
    }
    PyObject *nobj = parts ? PyLong_FromUnsignedLongLong(e->n) : NULL;
    if (nobj) {
        PyObject *args[5] = {(PyObject *)self, nobj, parts, claim, dead};
        res = PyObject_Vectorcall(H_side_prepare, args, 5, NULL);
    }
    Py_XDECREF(nobj);
    Py_XDECREF(dead);
    Py_DECREF(claim);
    if (!self->finalized)
        for (uint32_t k = 0; k < ndead; k++) shmchan_side_forget(&self->c, dead_index[k], dead_ticket[k]);
    if (parts) {
        /* The views point into our parts: they must not outlive this call. The hook's
         * exception (if any) is kept aside meanwhile, so that it is the one raised. */
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *pending = PyErr_GetRaisedException();
#else
        PyObject *ptype, *pvalue, *ptb;
        PyErr_Fetch(&ptype, &pvalue, &ptb);
#endif
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(parts); i++) {
            PyObject *mv = PyTuple_GET_ITEM(PyList_GET_ITEM(parts, i), 1);
            PyObject *r = PyObject_CallMethod(mv, "release", NULL);
            if (!r) PyErr_Clear();
            Py_XDECREF(r);
        }
#if PY_VERSION_HEX >= 0x030C0000
        PyErr_SetRaisedException(pending);
#else
        PyErr_Restore(ptype, pvalue, ptb);
#endif
        Py_DECREF(parts);
    }
    unsigned int got_index = 0, got_ticket = 0, got_gen = 0;
    unsigned long long got_size = 0;
    int ok = res && PyArg_ParseTuple(res, "IIKI", &got_index, &got_ticket, &got_size, &got_gen) &&
             got_index == index && got_ticket == ticket;
    if (res && !ok && !PyErr_Occurred())
        PyErr_Format(PyExc_SystemError, "side_prepare hook returned another entry than it was given");
    Py_XDECREF(res);
    if (!ok) {
        if (!self->finalized) shmchan_side_release(&self->c, index, ticket);
        return -1;
    }
    e->ref.index = index;
    e->ref.ticket = ticket;
    e->ref.size = e->n;
    e->ref.file_gen = got_gen;
    e->ref.inner_type = e->type;
    e->prepared = 1;
    return 1;
}

static void side_unprepare(CoreObject *self, enc_t *e) {
    if (e->big && e->prepared) {
        shmchan_side_release(&self->c, e->ref.index, e->ref.ticket);
        e->prepared = 0;
    }
}

/* ---- the send loop ------------------------------------------------------------------------ */

/* Append items[from..] under the held write lock: a run of ring records with one commit,
 * or one side record. Returns a library code; *wrote = how many items went in. */
static int append_locked(CoreObject *self, enc_t *items, size_t nitems, size_t from, shmchan_rec *recs,
                         size_t *wrote) {
    *wrote = 0;
    if (items[from].big) return shmchan_side_append(&self->c, &items[from].ref, wrote);
    size_t k = 0;
    while (from + k < nitems && !items[from + k].big) {
        enc_t *e = &items[from + k];
        recs[k] = (shmchan_rec){e->type, e->n, e->parts, e->nparts};
        k++;
    }
    return shmchan_w_append(&self->c, recs, k, wrote);
}

static uint64_t item_ring_bytes(const enc_t *e) { return e->big ? SHMCHAN_SIDE_REF_SIZE : e->n; }

/* Send items[0..nitems) in order before `deadline`. *sent = how many went in (a prefix).
 * Returns SHMCHAN_OK, SHMCHAN_TIMEOUT, SHMCHAN_BUSY (F_NOGRACE), or PYERR with a Python
 * error set (library errors are raised). */
static int send_items(CoreObject *self, enc_t *items, size_t nitems, double deadline, int flags, size_t *sent) {
    shmchan_chan *c = &self->c;
    size_t done = 0;
    int rc = SHMCHAN_OK;
    shmchan_rec *recs = PyMem_Malloc(sizeof(shmchan_rec) * (nitems ? nitems : 1));
    if (!recs) {
        PyErr_NoMemory();
        return -1;
    }
    while (done < nitems) {
        enc_t *e = &items[done];
        if (e->big && !e->prepared) {
            int p = side_prepare(self, e, deadline);
            if (p < 0) {
                rc = PYERR;
                break;
            }
            if (p == 0) {
                rc = SHMCHAN_TIMEOUT;
                break;
            }
        }
        int gil_free = e->n >= GIL_FREE_BYTES && !e->big;
        size_t wrote = 0;
        /* Fast path: the lock at once, with the GIL (small copies). */
        if (!gil_free && shmchan_trylock(c, SHMCHAN_WLOCK) == SHMCHAN_OK) {
            rc = append_locked(self, items, nitems, done, recs, &wrote);
            shmchan_unlock(c, SHMCHAN_WLOCK);
            if (wrote) shmchan_after_put(c, wrote);
            if (rc < 0) {
                raise_rc(self, rc);
                rc = PYERR;
                break;
            }
            if (wrote) {
                done += wrote;
                continue;
            }
        } else if (flags & F_NOGRACE) {
            /* The async face never waits for a lock in the event loop's thread. */
            if (!gil_free) {
                rc = SHMCHAN_BUSY;
                break;
            }
        }
        /* Slow path, without the GIL: lock (waiting), append, or wait for room. */
        int waited = 0;
        for (;;) {
            double ld = lock_deadline(deadline);
            Py_BEGIN_ALLOW_THREADS
            for (;;) {
                rc = shmchan_lock(c, SHMCHAN_WLOCK, ld);
                if (rc != SHMCHAN_OK) break;
                rc = append_locked(self, items, nitems, done, recs, &wrote);
                shmchan_unlock(c, SHMCHAN_WLOCK);
                if (wrote) shmchan_after_put(c, wrote);
                if (rc < 0 || wrote) break;
                if (deadline >= 0 && waited && shmchan_now() >= deadline) {
                    rc = SHMCHAN_TIMEOUT;
                    break;
                }
                rc = shmchan_wait_writable(c, item_ring_bytes(&items[done]), deadline,
                                           (flags & SHMCHAN_F_BROKEN) | (flags & SHMCHAN_F_NOSPIN));
                waited = 1;
                if (rc != SHMCHAN_OK) break;
            }
            Py_END_ALLOW_THREADS
            if (rc == SHMCHAN_INTR) {
                if (PyErr_CheckSignals() < 0) {
                    rc = PYERR;
                    break;
                }
                continue;
            }
            break;
        }
        if (rc == PYERR) break;
        if (wrote) {
            done += wrote;
            rc = SHMCHAN_OK;
            continue;
        }
        if (rc != PYERR && (rc < 0 || rc == SHMCHAN_CLOSED || rc == SHMCHAN_BROKEN)) {
            raise_rc(self, rc);
            rc = PYERR;
        }
        break;
    }
    PyMem_Free(recs);
    *sent = done;
    if (rc == SHMCHAN_OK && done < nitems) rc = SHMCHAN_TIMEOUT;
    return rc;
}

/* ---- decoding ------------------------------------------------------------------------------ */

static PyObject *decode(CoreObject *self, uint32_t type, PyObject *payload, int raw) {
    if (type == SHMCHAN_RT_BYTES) return payload; /* steals */
    if (type == SHMCHAN_RT_PICKLE && !raw) {
        PyObject *obj = PyObject_Vectorcall(pickle_loads, &payload, 1, NULL);
        Py_DECREF(payload);
        return obj;
    }
    PyObject *t = PyLong_FromUnsignedLong(type);
    if (!t) {
        Py_DECREF(payload);
        return NULL;
    }
    PyObject *args[4] = {(PyObject *)self, t, payload, raw ? Py_True : Py_False};
    PyObject *obj = PyObject_Vectorcall(H_decode_slow, args, 4, NULL);
    Py_DECREF(t);
    Py_DECREF(payload);
    return obj;
}

/* A side record this handle took: the Python hook copies the message out (and removes a
 * transient entry's object) and decodes it; the entry is freed here, in C, whatever the
 * hook did or raised, so that a Ctrl-C landing anywhere in it cannot leave the entry
 * READING for the life of this process. The message is this receiver's either way. */
static PyObject *read_side(CoreObject *self, const shmchan_side_ref *ref, int raw) {
    PyObject *res = PyObject_CallFunction(H_side_read, "OIIKIIO", (PyObject *)self, ref->index, ref->ticket,
                                          (unsigned long long)ref->size, ref->file_gen, ref->inner_type,
                                          raw ? Py_True : Py_False);
    if (!self->finalized) {
        if (ref->index >= self->c.side_retained)
            shmchan_side_drop(&self->c, ref->index, ref->ticket); /* its object went (or goes) */
        else
            shmchan_side_done(&self->c, ref->index, ref->ticket);
    }
    return res;
}

/* A record taken under the read lock, before decoding. */
typedef struct {
    uint32_t type;
    PyObject *payload;            /* owned; NULL for side records */
    shmchan_side_ref ref;
} taken_t;

/* With the read lock held and the GIL held: take up to `max` records into out[]. Copies
 * of at least GIL_FREE_BYTES release the GIL (and then the lock is released inside:
 * *unlocked = 1). Returns the count, or -1 with an error (nothing consumed). */
static Py_ssize_t take_locked(CoreObject *self, Py_ssize_t max, taken_t *out, int *unlocked, int *corrupt) {
    shmchan_chan *c = &self->c;
    uint64_t at;
    Py_ssize_t k = 0;
    uint64_t first = 0, span = 0;
    *unlocked = 0;
    *corrupt = 0;
    int rc = shmchan_r_begin(c, &at);
    first = at;
    while (rc == SHMCHAN_OK && k < max) {
        shmchan_view v;
        uint64_t cursor = at;
        rc = shmchan_r_next(c, &cursor, &v);
        if (rc != SHMCHAN_OK) {
            if (rc == SHMCHAN_EMPTY) at = cursor; /* padding skipped: released with the commit */
            break;
        }
        span = ((v.next - first) & SHMCHAN_UNIT_MASK) << 4;
        if (k && span > 64 * 1024) break;
        if (v.type == SHMCHAN_RT_SIDE) {
            shmchan_side_ref ref;
            rc = shmchan_side_parse(c, v.payload, v.n, &ref);
            if (rc == SHMCHAN_OK) rc = shmchan_side_take(c, &ref);
            if (rc != SHMCHAN_OK) break;
            out[k].type = v.type;
            out[k].payload = NULL;
            out[k].ref = ref;
            k++;
            at = v.next;
            continue;
        }
        PyObject *payload = v.type == SHMCHAN_RT_PICKLE_OOB
                                ? PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)v.n)
                                : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)v.n);
        if (!payload) {
            /* Nothing of this record is consumed; earlier ones are committed below. */
            if (k == 0) {
                shmchan_unlock(c, SHMCHAN_RLOCK);
                *unlocked = 1;
                return -1;
            }
            PyErr_Clear();
            break;
        }
        char *dst = PyBytes_Check(payload) ? PyBytes_AS_STRING(payload) : PyByteArray_AS_STRING(payload);
        out[k].type = v.type;
        out[k].payload = payload;
        k++;
        if (v.n >= GIL_FREE_BYTES) {
            /* A big copy: without the GIL, then commit and unlock before taking it back. */
            uint64_t next = v.next;
            uint32_t count = (uint32_t)k;
            Py_BEGIN_ALLOW_THREADS
            memcpy(dst, v.payload, v.n);
            shmchan_r_commit(c, next, count);
            shmchan_unlock(c, SHMCHAN_RLOCK);
            shmchan_after_get(c, count);
            Py_END_ALLOW_THREADS
            *unlocked = 1;
            return k;
        }
        memcpy(dst, v.payload, v.n);
        at = v.next;
    }
    if (rc < 0) {
        /* A bad record: the channel is marked corrupt; what was taken before it is still
         * returned (committed), the error is raised by the caller when nothing was. */
        *corrupt = 1;
        if (k == 0) {
            shmchan_unlock(c, SHMCHAN_RLOCK);
            *unlocked = 1;
            raise_rc(self, rc);
            return -1;
        }
    }
    shmchan_r_commit(c, at, (uint32_t)k);
    shmchan_unlock(c, SHMCHAN_RLOCK);
    *unlocked = 1;
    if (k) shmchan_after_get(c, (size_t)k);
    return k;
}

/* Take records (waiting until deadline). Returns the count (>= 1), 0 on timeout, -2 for
 * BUSY (F_NOGRACE), -1 with an error set. */
static Py_ssize_t take(CoreObject *self, Py_ssize_t max, taken_t *out, double deadline, int flags) {
    shmchan_chan *c = &self->c;
    for (;;) {
        int rc = take_lock(self, SHMCHAN_RLOCK, deadline, flags);
        if (rc == SHMCHAN_BUSY) return -2;
        if (rc == SHMCHAN_TIMEOUT) return 0;
        if (rc != SHMCHAN_OK) {
            raise_rc(self, rc);
            return -1;
        }
        int unlocked, corrupt;
        Py_ssize_t k = take_locked(self, max, out, &unlocked, &corrupt);
        if (k != 0) return k;
        /* Empty: wait (this also decides end of stream and the deadline). */
        for (;;) {
            Py_BEGIN_ALLOW_THREADS
            rc = shmchan_wait_readable(c, deadline, flags & (SHMCHAN_F_EOF | SHMCHAN_F_NOSPIN));
            Py_END_ALLOW_THREADS
            if (rc == SHMCHAN_INTR) {
                if (PyErr_CheckSignals() < 0) return -1;
                continue;
            }
            break;
        }
        if (rc == SHMCHAN_OK) continue;
        if (rc == SHMCHAN_TIMEOUT) return 0;
        raise_rc(self, rc);
        return -1;
    }
}

static PyObject *decode_taken(CoreObject *self, taken_t *t, int raw) {
    if (t->type == SHMCHAN_RT_SIDE) return read_side(self, &t->ref, raw);
    PyObject *payload = t->payload;
    t->payload = NULL;
    if (raw && t->type != SHMCHAN_RT_BYTES) {
        PyObject *tp = PyLong_FromUnsignedLong(t->type);
        if (!tp) {
            Py_DECREF(payload);
            return NULL;
        }
        PyObject *args[4] = {(PyObject *)self, tp, payload, Py_True};
        PyObject *obj = PyObject_Vectorcall(H_decode_slow, args, 4, NULL);
        Py_DECREF(tp);
        Py_DECREF(payload);
        return obj;
    }
    return decode(self, t->type, payload, raw);
}

/* ---- Core methods ---------------------------------------------------------------------------- */

static int flags_arg(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t i) {
    if (nargs <= i) return 0;
    long f = PyLong_AsLong(args[i]);
    return (f == -1 && PyErr_Occurred()) ? -1 : (int)f;
}

/* put(obj, deadline, flags=0) -> True (sent), False (deadline passed), BUSY (F_NOGRACE). */
static PyObject *Core_put(CoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 3) return PyErr_Format(PyExc_TypeError, "put(obj, deadline, flags=0)");
    double deadline;
    int flags = flags_arg(args, nargs, 2);
    if (flags < 0 || parse_deadline(args[1], &deadline) < 0) return NULL;
    if (enter(self) < 0) return NULL;
    enc_t e;
    PyObject *result = NULL;
    if (encode(self, args[0], flags & F_RAW, &e) == 0) {
        size_t sent = 0;
        int rc = send_items(self, &e, 1, deadline, flags, &sent);
        if (rc != PYERR) {
            if (!sent) side_unprepare(self, &e);
            result = rc == SHMCHAN_BUSY ? Py_NewRef(BUSY) : PyBool_FromLong(sent == 1);
        } else {
            side_unprepare(self, &e);
        }
    }
    enc_release(&e);
    leave(self);
    return result;
}

/* put_many(objs, deadline, flags=0) -> number sent (the first ones, in order). Every object
 * is encoded first, so an encoding error raises before anything is sent. */
static PyObject *Core_put_many(CoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 3) return PyErr_Format(PyExc_TypeError, "put_many(objs, deadline, flags=0)");
    double deadline;
    int flags = flags_arg(args, nargs, 2);
    if (flags < 0 || parse_deadline(args[1], &deadline) < 0) return NULL;
    PyObject *seq = PySequence_Fast(args[0], "put_many() needs an iterable");
    if (!seq) return NULL;
    if (enter(self) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    enc_t *items = PyMem_Calloc((size_t)(n ? n : 1), sizeof(enc_t));
    PyObject *result = NULL;
    Py_ssize_t encoded = 0;
    if (!items) {
        PyErr_NoMemory();
        goto done;
    }
    for (; encoded < n; encoded++) {
        if (encode(self, PySequence_Fast_GET_ITEM(seq, encoded), flags & F_RAW, &items[encoded]) < 0) {
            enc_release(&items[encoded]);
            goto done;
        }
    }
    size_t sent = 0;
    int rc = send_items(self, items, (size_t)n, deadline, flags, &sent);
    for (Py_ssize_t i = (Py_ssize_t)sent; i < n; i++) side_unprepare(self, &items[i]);
    if (rc == SHMCHAN_BUSY && sent == 0)
        result = Py_NewRef(BUSY);
    else if (rc != PYERR)
        result = PyLong_FromSize_t(sent);
    else if (sent) {
        /* Some went in before the error: report the error, but the count matters too. */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        PyObject *cnt = PyLong_FromSize_t(sent);
        if (cnt && ev) {
            if (PyObject_SetAttrString(ev, "sent", cnt) < 0) PyErr_Clear();
        }
        Py_XDECREF(cnt);
        PyErr_Restore(et, ev, tb);
    }
done:
    if (items) {
        for (Py_ssize_t i = 0; i < encoded; i++) enc_release(&items[i]);
        PyMem_Free(items);
    }
    Py_DECREF(seq);
    leave(self);
    return result;
}

/* get(deadline, flags=0) -> the object, NOTHING (deadline passed) or BUSY (F_NOGRACE). */
static PyObject *Core_get(CoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) return PyErr_Format(PyExc_TypeError, "get(deadline, flags=0)");
    double deadline;
    int flags = flags_arg(args, nargs, 1);
    if (flags < 0 || parse_deadline(args[0], &deadline) < 0) return NULL;
    if (enter(self) < 0) return NULL;
    taken_t t;
    memset(&t, 0, sizeof t);
    PyObject *result = NULL;
    Py_ssize_t k = take(self, 1, &t, deadline, flags);
    if (k == 1)
        result = decode_taken(self, &t, flags & F_RAW);
    else if (k == 0)
        result = Py_NewRef(NOTHING);
    else if (k == -2)
        result = Py_NewRef(BUSY);
    leave(self);
    return result;
}

/* get_many(max_items, deadline, flags=0) -> list (empty when the deadline passed), or BUSY.
 * Every record taken is decoded; if some fail, UndecodableBatch carries the others. */
static PyObject *Core_get_many(CoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 3) return PyErr_Format(PyExc_TypeError, "get_many(max_items, deadline, flags=0)");
    Py_ssize_t max = PyLong_AsSsize_t(args[0]);
    if (max == -1 && PyErr_Occurred()) return NULL;
    if (max < 1) return PyErr_Format(PyExc_ValueError, "max_items must be at least 1, not %zd", max);
    double deadline;
    int flags = flags_arg(args, nargs, 2);
    if (flags < 0 || parse_deadline(args[1], &deadline) < 0) return NULL;
    if (max > 65536) max = 65536;
    if (enter(self) < 0) return NULL;
    taken_t *taken = PyMem_Calloc((size_t)max, sizeof(taken_t));
    PyObject *result = NULL;
    if (!taken) {
        PyErr_NoMemory();
        leave(self);
        return NULL;
    }
    Py_ssize_t k = take(self, max, taken, deadline, flags);
    if (k == -2) {
        result = Py_NewRef(BUSY);
    } else if (k >= 0) {
        PyObject *items = PyList_New(0), *errors = PyList_New(0);
        if (items && errors) {
            for (Py_ssize_t i = 0; i < k; i++) {
                PyObject *obj = decode_taken(self, &taken[i], flags & F_RAW);
                if (obj) {
                    PyList_Append(items, obj);
                    Py_DECREF(obj);
                } else {
                    PyObject *et, *exc, *tb;
                    PyErr_Fetch(&et, &exc, &tb);
                    PyErr_NormalizeException(&et, &exc, &tb);
                    if (tb && exc) PyException_SetTraceback(exc, tb);
                    if (!PyErr_GivenExceptionMatches(et, PyExc_Exception)) {
                        /* KeyboardInterrupt, SystemExit...: do not swallow them. */
                        PyErr_Restore(et, exc, tb);
                        for (Py_ssize_t j = i + 1; j < k; j++) {
                            if (taken[j].type == SHMCHAN_RT_SIDE)
                                shmchan_side_done(&self->c, taken[j].ref.index, taken[j].ref.ticket);
                        }
                        Py_CLEAR(items);
                        break;
                    }
                    Py_XDECREF(et);
                    Py_XDECREF(tb);
                    PyObject *pair = Py_BuildValue("(nN)", i, exc);
                    if (pair) {
                        PyList_Append(errors, pair);
                        Py_DECREF(pair);
                    }
                }
            }
            if (items && PyList_GET_SIZE(errors)) {
                PyObject *exc = PyObject_CallFunctionObjArgs(E_UndecodableBatch, items, errors, NULL);
                if (exc) {
                    PyObject *first = PyTuple_GET_ITEM(PyList_GET_ITEM(errors, 0), 1);
                    PyException_SetCause(exc, Py_NewRef(first));
                    PyErr_SetObject(E_UndecodableBatch, exc);
                    Py_DECREF(exc);
                }
                Py_CLEAR(items);
            }
        }
        result = items;
        Py_XDECREF(errors);
    }
    for (Py_ssize_t i = 0; i < (k > 0 ? k : 0); i++) Py_XDECREF(taken[i].payload);
    PyMem_Free(taken);
    leave(self);
    return result;
}

/* put_record(rtype, payload, deadline) -> bool: one record of any type, as it is (tests
 * and byte-level peers). */
static PyObject *Core_put_record(CoreObject *self, PyObject *args) {
    unsigned int type;
    Py_buffer buf;
    PyObject *dl;
    if (!PyArg_ParseTuple(args, "Iy*O", &type, &buf, &dl)) return NULL;
    double deadline;
    if (parse_deadline(dl, &deadline) < 0 || enter(self) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    enc_t e;
    enc_init(&e);
    e.type = type;
    e.n = (uint64_t)buf.len;
    e.inline_parts[0] = (shmchan_part){0, buf.buf, e.n};
    e.nparts = 1;
    PyObject *result = NULL;
    if (((e.n + 31) & ~(uint64_t)15) > self->c.max_record) {
        raise_rc(self, SHMCHAN_E_TOOBIG);
    } else {
        size_t sent = 0;
        int rc = send_items(self, &e, 1, deadline, 0, &sent);
        if (rc != PYERR) result = PyBool_FromLong(sent == 1);
    }
    PyBuffer_Release(&buf);
    leave(self);
    return result;
}


static PyObject *Core_side_set_file(CoreObject *self, PyObject *args) {
    unsigned int index, ticket, gen;
    unsigned long long size;
    if (!PyArg_ParseTuple(args, "IIKI", &index, &ticket, &size, &gen)) return NULL;
    if (enter(self) < 0) return NULL;
    int rc = shmchan_side_set_file(&self->c, index, ticket, size, gen);
    leave(self);
    if (rc != SHMCHAN_OK) return PyErr_Format(E_Shmchan, "side entry %u is not held by this handle", index);
    Py_RETURN_NONE;
}

static PyObject *Core_side_file(CoreObject *self, PyObject *arg) {
    unsigned long index = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (enter(self) < 0) return NULL;
    if (index >= self->c.side_slots) {
        leave(self);
        return PyErr_Format(PyExc_IndexError, "no side entry %lu", index);
    }
    uint64_t size;
    uint32_t gen;
    shmchan_side_file(&self->c, (uint32_t)index, &size, &gen);
    leave(self);
    return Py_BuildValue("(KI)", (unsigned long long)size, gen);
}

/* ---- waiting (the async face and select) ------------------------------------------------------ */

static int event_arg(PyObject *o) {
    long ev = PyLong_AsLong(o);
    if (ev == -1 && PyErr_Occurred()) return -1;
    if (ev < 0 || ev > 2) {
        PyErr_Format(PyExc_ValueError, "no event %ld", ev);
        return -1;
    }
    return (int)ev;
}

static PyObject *Core_seq(CoreObject *self, PyObject *arg) {
    int ev = event_arg(arg);
    if (ev < 0 || enter(self) < 0) return NULL;
    uint32_t s = shmchan_seq(&self->c, ev);
    leave(self);
    return PyLong_FromUnsignedLong(s);
}

static PyObject *Core_register(CoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) return PyErr_Format(PyExc_TypeError, "register(event, delta)");
    int ev = event_arg(args[0]);
    long delta = PyLong_AsLong(args[1]);
    if (ev < 0 || (delta == -1 && PyErr_Occurred())) return NULL;
    if (self->finalized || !self->attached) Py_RETURN_NONE; /* closed meanwhile: nothing to undo */
    shmchan_register(&self->c, ev, delta > 0 ? 1 : -1);
    Py_RETURN_NONE;
}

/* wait(event, seen, timeout) -> bool: sleep (GIL released) until the event's counter moves
 * from `seen` (True) or the timeout passes (False). A signal ends the wait early (False,
 * after running the handlers; their exception propagates). */
static PyObject *Core_wait(CoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "wait(event, seen, timeout)");
    int ev = event_arg(args[0]);
    unsigned long seen = PyLong_AsUnsignedLong(args[1]);
    double timeout = PyFloat_AsDouble(args[2]);
    if (ev < 0 || PyErr_Occurred()) return NULL;
    if (enter(self) < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shmchan_wait(&self->c, ev, (uint32_t)seen, timeout);
    Py_END_ALLOW_THREADS
    leave(self);
    if (rc == SHMCHAN_INTR) {
        if (PyErr_CheckSignals() < 0) return NULL;
        Py_RETURN_FALSE;
    }
    return PyBool_FromLong(rc == SHMCHAN_OK);
}

/* wake(event, n): move the event's counter and wake up to n sleepers. */
static PyObject *Core_wake(CoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) return PyErr_Format(PyExc_TypeError, "wake(event, n)");
    int ev = event_arg(args[0]);
    long n = PyLong_AsLong(args[1]);
    if (ev < 0 || (n == -1 && PyErr_Occurred())) return NULL;
    if (enter(self) < 0) return NULL;
    shmchan_wake(&self->c, ev, n > INT_MAX ? INT_MAX : (int)n);
    leave(self);
    Py_RETURN_NONE;
}


/* ---- counts, tasks, presence ---------------------------------------------------------------- */

#define SIMPLE_U64(fname, expr)                                        \
    static PyObject *fname(CoreObject *self, PyObject *Py_UNUSED(a)) { \
        if (enter(self) < 0) return NULL;                              \
        uint64_t v = (expr);                                           \
        leave(self);                                                   \
        return PyLong_FromUnsignedLongLong(v);                         \
    }

SIMPLE_U64(Core_qsize, shmchan_qsize(&self->c))
SIMPLE_U64(Core_put_total, shmchan_put_total(&self->c))
SIMPLE_U64(Core_got_total, shmchan_got_total(&self->c))
SIMPLE_U64(Core_unfinished, shmchan_unfinished(&self->c))

static PyObject *Core_is_empty(CoreObject *self, PyObject *Py_UNUSED(a)) {
    if (enter(self) < 0) return NULL;
    int v = shmchan_is_empty(&self->c);
    leave(self);
    return PyBool_FromLong(v);
}

static PyObject *Core_room_for(CoreObject *self, PyObject *arg) {
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || enter(self) < 0) return NULL;
    int v = shmchan_room_for(&self->c, n);
    leave(self);
    return PyBool_FromLong(v);
}

static PyObject *Core_task_done(CoreObject *self, PyObject *Py_UNUSED(a)) {
    if (enter(self) < 0) return NULL;
    int rc = shmchan_task_done(&self->c);
    leave(self);
    if (rc != SHMCHAN_OK) return PyErr_Format(PyExc_ValueError, "task_done() called too many times");
    Py_RETURN_NONE;
}

static PyObject *Core_join(CoreObject *self, PyObject *arg) {
    double deadline;
    if (parse_deadline(arg, &deadline) < 0 || enter(self) < 0) return NULL;
    int rc;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = shmchan_wait_joined(&self->c, deadline);
        Py_END_ALLOW_THREADS
        if (rc == SHMCHAN_INTR) {
            if (PyErr_CheckSignals() < 0) {
                leave(self);
                return NULL;
            }
            continue;
        }
        break;
    }
    leave(self);
    if (rc == SHMCHAN_OK) Py_RETURN_TRUE;
    if (rc == SHMCHAN_TIMEOUT) Py_RETURN_FALSE;
    return raise_rc(self, rc);
}

static int role_arg(PyObject *o) {
    long r = PyLong_AsLong(o);
    if (r == -1 && PyErr_Occurred()) return -1;
    if (r != SHMCHAN_WRITER && r != SHMCHAN_READER) {
        PyErr_Format(PyExc_ValueError, "no role %ld", r);
        return -1;
    }
    return (int)r;
}

static PyObject *Core_enter_role(CoreObject *self, PyObject *arg) {
    int role = role_arg(arg);
    if (role < 0 || enter(self) < 0) return NULL;
    int rc = shmchan_presence_enter(&self->c, role);
    if (rc == SHMCHAN_OK) self->roles |= 1 << role;
    leave(self);
    if (rc != SHMCHAN_OK) return raise_rc(self, rc);
    Py_RETURN_NONE;
}

static PyObject *Core_leave_role(CoreObject *self, PyObject *arg) {
    int role = role_arg(arg);
    if (role < 0) return NULL;
    if (self->finalized) Py_RETURN_NONE;
    self->roles &= ~(1 << role);
    int rc = shmchan_presence_leave(&self->c, role);
    if (rc != SHMCHAN_OK) return raise_rc(self, rc);
    Py_RETURN_NONE;
}

static PyObject *Core_role_gone(CoreObject *self, PyObject *arg) {
    int role = role_arg(arg);
    if (role < 0 || enter(self) < 0) return NULL;
    int rc = shmchan_role_gone(&self->c, role);
    leave(self);
    if (rc < 0) return raise_rc(self, rc);
    return PyBool_FromLong(rc);
}

static PyObject *Core_role_open(CoreObject *self, PyObject *arg) {
    int role = role_arg(arg);
    if (role < 0 || enter(self) < 0) return NULL;
    uint32_t off = role == SHMCHAN_WRITER ? SHMCHAN_OFF_WRITERS_OPEN : SHMCHAN_OFF_READERS_OPEN;
    uint32_t v = atomic_load_explicit((_Atomic uint32_t *)(self->c.base + off), memory_order_relaxed);
    leave(self);
    return PyLong_FromUnsignedLong(v);
}

static PyObject *Core_role_seen(CoreObject *self, PyObject *arg) {
    int role = role_arg(arg);
    if (role < 0 || enter(self) < 0) return NULL;
    uint32_t off = role == SHMCHAN_WRITER ? SHMCHAN_OFF_WRITERS_SEEN : SHMCHAN_OFF_READERS_SEEN;
    uint32_t v = atomic_load_explicit((_Atomic uint32_t *)(self->c.base + off), memory_order_acquire);
    leave(self);
    return PyBool_FromLong(v != 0);
}

static PyObject *Core_mark_corrupt(CoreObject *self, PyObject *arg) {
    const char *why = PyUnicode_AsUTF8(arg);
    if (!why || enter(self) < 0) return NULL;
    shmchan_corrupt(&self->c, why);
    leave(self);
    Py_RETURN_NONE;
}

/* swap_owner(expected, new, deadline) -> bytes: under the write lock, if the owner field
 * reads `expected`, write `new` (both NUL-padded to 256 bytes); return the field as it
 * is afterwards. TimeoutError if the lock stays held (by a stopped process) until the
 * deadline. The lifetime service's re-homing uses it (docs/layout.md 12). */
static PyObject *Core_swap_owner(CoreObject *self, PyObject *args) {
    Py_buffer expected, repl;
    PyObject *dl;
    if (!PyArg_ParseTuple(args, "y*y*O", &expected, &repl, &dl)) return NULL;
    double deadline;
    PyObject *result = NULL;
    if (expected.len >= SHMCHAN_OWNER_SIZE || repl.len >= SHMCHAN_OWNER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "owner addresses are shorter than 256 bytes");
    } else if (parse_deadline(dl, &deadline) == 0 && enter(self) == 0) {
        int rc = take_lock(self, SHMCHAN_WLOCK, deadline, 0);
        if (rc == SHMCHAN_OK) {
            uint8_t *field = self->c.base + SHMCHAN_OFF_OWNER;
            char want[SHMCHAN_OWNER_SIZE];
            memset(want, 0, sizeof want);
            memcpy(want, expected.buf, (size_t)expected.len);
            if (memcmp(field, want, SHMCHAN_OWNER_SIZE) == 0) {
                memset(field, 0, SHMCHAN_OWNER_SIZE);
                memcpy(field, repl.buf, (size_t)repl.len);
            }
            result = PyBytes_FromStringAndSize((const char *)field, SHMCHAN_OWNER_SIZE);
            /* L3: the release store of the lock publishes the new owner. */
            shmchan_unlock(&self->c, SHMCHAN_WLOCK);
        } else if (rc == SHMCHAN_TIMEOUT) {
            PyErr_Format(PyExc_TimeoutError, "the write lock of %R stayed held", self->name);
        } else {
            raise_rc(self, rc);
        }
        leave(self);
    }
    PyBuffer_Release(&expected);
    PyBuffer_Release(&repl);
    return result;
}

/* raw(offset, n) -> bytes: a copy of part of the segment (tests, inspection). */
static PyObject *Core_raw(CoreObject *self, PyObject *args) {
    unsigned long long off, n;
    if (!PyArg_ParseTuple(args, "KK", &off, &n)) return NULL;
    if (enter(self) < 0) return NULL;
    PyObject *r;
    if (off > self->c.size || n > self->c.size - off)
        r = PyErr_Format(PyExc_ValueError, "range outside the segment");
    else
        r = PyBytes_FromStringAndSize((const char *)self->c.base + off, (Py_ssize_t)n);
    leave(self);
    return r;
}

/* close(): no new operations; sleepers of this handle wake; the mapping and the peer slot
 * go once the last operation of this process inside the core has returned. */
static PyObject *Core_close(CoreObject *self, PyObject *Py_UNUSED(a)) {
    if (self->closed) Py_RETURN_NONE;
    self->closed = 1;
    if (!self->finalized) {
        atomic_store_explicit((_Atomic int *)&self->c.closing, 1, memory_order_relaxed);
        if (self->inflight) {
            for (int ev = 0; ev < 3; ev++) shmchan_wake(&self->c, ev, INT_MAX);
        }
    }
    if (self->inflight == 0) finalize(self);
    Py_RETURN_NONE;
}

/* after_fork(): in a forked child, give this handle its own open file (kind 1), a new peer
 * slot and its own presence; the parent's stay the parent's. A failure makes every later
 * operation raise it (never share the parent's identity). */
static PyObject *Core_after_fork(CoreObject *self, PyObject *Py_UNUSED(a)) {
    self->inflight = 0;
    if (self->finalized) Py_RETURN_NONE;
    if (self->closed) {
        finalize(self);
        Py_RETURN_NONE;
    }
    int newfd = -1;
    int err = 0;
    if (self->kind == SHMCHAN_LIVENESS_OFD) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", self->c.fd);
        newfd = open(path, O_RDWR | O_CLOEXEC);
        if (newfd < 0) err = errno;
        close(self->c.fd); /* the parent's open file keeps the parent's locks, not ours */
    }
    int roles = self->roles;
    self->attached = 0;
    shmchan_after_fork(&self->c, newfd);
    int rc = err ? SHMCHAN_E_SYS : shmchan_attach(&self->c);
    if (rc == SHMCHAN_OK) {
        self->attached = 1;
        for (int role = 0; role < 2 && rc == SHMCHAN_OK; role++) {
            if (roles & (1 << role)) {
                /* Presence again, without counting in the header's hints (docs 13). */
                rc = shmchan_presence_enter(&self->c, role);
                if (rc == SHMCHAN_OK) {
                    uint32_t off = role == SHMCHAN_WRITER ? SHMCHAN_OFF_WRITERS_OPEN : SHMCHAN_OFF_READERS_OPEN;
                    atomic_fetch_sub_explicit((_Atomic uint32_t *)(self->c.base + off), 1, memory_order_relaxed);
                }
            }
        }
    }
    if (rc != SHMCHAN_OK) {
        if (err) errno = err;
        raise_rc(self, rc);
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        Py_XDECREF(et);
        Py_XDECREF(tb);
        Py_XSETREF(self->broken, ev);
    }
    Py_RETURN_NONE;
}

static PyObject *Core_stats(CoreObject *self, PyObject *Py_UNUSED(a)) {
    if (enter(self) < 0) return NULL;
    shmchan_chan *c = &self->c;
    PyObject *d = Py_BuildValue("{sKsKsKsKsisisK}", "put_total", (unsigned long long)shmchan_put_total(c),
                                "got_total", (unsigned long long)shmchan_got_total(c), "qsize",
                                (unsigned long long)shmchan_qsize(c), "unfinished",
                                (unsigned long long)shmchan_unfinished(c), "slot", c->slot, "state", shmchan_state(c),
                                "token", (unsigned long long)c->token);
    leave(self);
    return d;
}

/* spin_readable() -> bool: the adaptive spin of a receiver (GIL released): True if a
 * record appeared within the budget. The async face calls it before handing its wait to
 * a thread, since a thread wakeup costs more than the spin. */
static PyObject *Core_spin_readable(CoreObject *self, PyObject *Py_UNUSED(ignored)) {
    if (enter(self) < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shmchan_spin_readable(&self->c);
    Py_END_ALLOW_THREADS
    leave(self);
    return PyBool_FromLong(rc);
}

static PyMethodDef Core_methods[] = {
    {"put", (PyCFunction)(void (*)(void))Core_put, METH_FASTCALL, "put(obj, deadline, flags=0) -> bool | BUSY"},
    {"put_many", (PyCFunction)(void (*)(void))Core_put_many, METH_FASTCALL, "put_many(objs, deadline, flags=0) -> int"},
    {"get", (PyCFunction)(void (*)(void))Core_get, METH_FASTCALL, "get(deadline, flags=0) -> obj | NOTHING | BUSY"},
    {"get_many", (PyCFunction)(void (*)(void))Core_get_many, METH_FASTCALL, "get_many(n, deadline, flags=0) -> list"},
    {"put_record", (PyCFunction)Core_put_record, METH_VARARGS, "put_record(rtype, payload, deadline) -> bool"},
    {"side_set_file", (PyCFunction)Core_side_set_file, METH_VARARGS, "side_set_file(index, ticket, size, gen)"},
    {"side_file", (PyCFunction)Core_side_file, METH_O, "side_file(index) -> (size, gen)"},
    {"seq", (PyCFunction)Core_seq, METH_O, "seq(event) -> int"},
    {"register", (PyCFunction)(void (*)(void))Core_register, METH_FASTCALL, "register(event, delta)"},
    {"wait", (PyCFunction)(void (*)(void))Core_wait, METH_FASTCALL, "wait(event, seen, timeout) -> bool"},
    {"wake", (PyCFunction)(void (*)(void))Core_wake, METH_FASTCALL, "wake(event, n)"},
    {"qsize", (PyCFunction)Core_qsize, METH_NOARGS, "records in the ring now"},
    {"put_total", (PyCFunction)Core_put_total, METH_NOARGS, "records ever put"},
    {"got_total", (PyCFunction)Core_got_total, METH_NOARGS, "records ever got"},
    {"unfinished", (PyCFunction)Core_unfinished, METH_NOARGS, "records put and not marked done"},
    {"is_empty", (PyCFunction)Core_is_empty, METH_NOARGS, "whether the ring is empty now"},
    {"room_for", (PyCFunction)Core_room_for, METH_O, "whether a payload of n bytes fits now"},
    {"task_done", (PyCFunction)Core_task_done, METH_NOARGS, "mark one record done"},
    {"join", (PyCFunction)Core_join, METH_O, "join(deadline) -> bool"},
    {"enter_role", (PyCFunction)Core_enter_role, METH_O, "hold presence for a role"},
    {"leave_role", (PyCFunction)Core_leave_role, METH_O, "give up presence for a role"},
    {"role_gone", (PyCFunction)Core_role_gone, METH_O, "whether a role had holders and none else is left"},
    {"role_open", (PyCFunction)Core_role_open, METH_O, "the role's open-handles hint"},
    {"role_seen", (PyCFunction)Core_role_seen, METH_O, "whether the role ever had a holder"},
    {"mark_corrupt", (PyCFunction)Core_mark_corrupt, METH_O, "mark the channel corrupt"},
    {"raw", (PyCFunction)Core_raw, METH_VARARGS, "raw(offset, n) -> bytes"},
    {"swap_owner", (PyCFunction)Core_swap_owner, METH_VARARGS, "swap_owner(expected, new, deadline) -> bytes"},
    {"stats", (PyCFunction)Core_stats, METH_NOARGS, "counters of the channel"},
    {"spin_readable", (PyCFunction)Core_spin_readable, METH_NOARGS, "spin briefly for a record"},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "close this handle"},
    {"after_fork", (PyCFunction)Core_after_fork, METH_NOARGS, "re-attach in a forked child"},
    {NULL, NULL, 0, NULL},
};

static PyObject *Core_get_closed(CoreObject *self, void *Py_UNUSED(c)) { return PyBool_FromLong(self->closed); }
static PyObject *Core_get_slot(CoreObject *self, void *Py_UNUSED(c)) { return PyLong_FromLong(self->c.slot); }
static PyObject *Core_get_capacity(CoreObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLongLong(self->c.capacity);
}
static PyObject *Core_get_max_record(CoreObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLong(self->c.max_record);
}
static PyObject *Core_get_max_payload(CoreObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLong(self->c.max_record - SHMCHAN_RECORD_HEADER_SIZE);
}
static PyObject *Core_get_max_items(CoreObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLongLong(self->c.max_items);
}
static PyObject *Core_get_side_slots(CoreObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLong(self->c.side_slots);
}
static PyObject *Core_get_side_retained(CoreObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLong(self->c.side_retained);
}
static PyObject *Core_get_max_peers(CoreObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLong(self->c.max_peers);
}
static PyObject *Core_get_header_size(CoreObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLong(self->c.header_size);
}
static PyObject *Core_get_nonce(CoreObject *self, void *Py_UNUSED(c)) {
    if (self->finalized) Py_RETURN_NONE;
    uint64_t v;
    memcpy(&v, self->c.base + SHMCHAN_OFF_NONCE, 8);
    return PyLong_FromUnsignedLongLong(v);
}
static PyObject *Core_get_semids(CoreObject *self, void *Py_UNUSED(c)) {
    return Py_BuildValue("(ii)", self->c.semid_peers, self->c.semid_presence);
}

static PyGetSetDef Core_getset[] = {
    {"closed", (getter)Core_get_closed, NULL, "close() was called", NULL},
    {"slot", (getter)Core_get_slot, NULL, "this handle's peer slot (-1: none)", NULL},
    {"capacity", (getter)Core_get_capacity, NULL, "ring bytes", NULL},
    {"max_record", (getter)Core_get_max_record, NULL, "largest record", NULL},
    {"max_payload", (getter)Core_get_max_payload, NULL, "largest payload in the ring", NULL},
    {"max_items", (getter)Core_get_max_items, NULL, "item limit (0: none)", NULL},
    {"side_slots", (getter)Core_get_side_slots, NULL, "side-segment pool entries", NULL},
    {"side_retained", (getter)Core_get_side_retained, NULL, "entries that keep their objects", NULL},
    {"max_peers", (getter)Core_get_max_peers, NULL, "peer slots", NULL},
    {"header_size", (getter)Core_get_header_size, NULL, "header bytes", NULL},
    {"nonce", (getter)Core_get_nonce, NULL, "the segment's nonce", NULL},
    {"semids", (getter)Core_get_semids, NULL, "(peers, presence) SysV semaphore ids, or -1", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Core_members[] = {
    {"name", T_OBJECT, offsetof(CoreObject, name), READONLY, "the channel's name"},
    {"ctx", T_OBJECT, offsetof(CoreObject, ctx), 0, "the face's context (side segments)"},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(CoreObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* Core(kind, handle, size, name, ctx=None): map the segment (kind 1: handle is an fd the
 * Core takes ownership of; kind 2: a SysV shm id), validate it, claim a peer slot. */
static int Core_init(CoreObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"kind", "handle", "size", "name", "ctx", NULL};
    int kind, handle;
    unsigned long long size;
    PyObject *name, *ctx = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiKO|O", kwlist, &kind, &handle, &size, &name, &ctx)) return -1;
    if (self->map || self->finalized) {
        PyErr_SetString(PyExc_RuntimeError, "Core is already initialised");
        return -1;
    }
    Py_XSETREF(self->name, Py_NewRef(name));
    Py_XSETREF(self->ctx, Py_NewRef(ctx));
    self->kind = kind;
    self->c.fd = -1;
    void *map;
    if (kind == SHMCHAN_LIVENESS_OFD) {
        map = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, handle, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(handle);
            errno = e;
            PyErr_SetFromErrno(PyExc_OSError);
            self->finalized = 1;
            return -1;
        }
    } else if (kind == SHMCHAN_LIVENESS_SYSV) {
        map = shmat(handle, NULL, 0);
        if (map == (void *)-1) {
            PyErr_SetFromErrno(PyExc_OSError);
            self->finalized = 1;
            return -1;
        }
    } else {
        PyErr_Format(PyExc_ValueError, "unknown kind %d", kind);
        return -1;
    }
    self->map = map;
    self->map_size = size;
    int rc = shmchan_open(&self->c, map, size, kind == SHMCHAN_LIVENESS_OFD ? handle : -1);
    /* Waits come back for signals after every slice: a signal that arrived outside a
     * system call (so no EINTR) still has its handler run within one slice. */
    self->c.slice_intr = 1;
    if (rc == SHMCHAN_OK && self->c.liveness != kind) {
        snprintf(self->c.why, sizeof self->c.why, "liveness kind %d is not this backend's %d", self->c.liveness,
                 kind);
        rc = SHMCHAN_E_INCOMPAT;
    }
    if (rc == SHMCHAN_OK) {
        rc = shmchan_attach(&self->c);
        if (rc == SHMCHAN_OK) self->attached = 1;
    }
    if (rc != SHMCHAN_OK) {
        char why[sizeof self->c.why];
        memcpy(why, self->c.why, sizeof why);
        int e = errno;
        if (kind == SHMCHAN_LIVENESS_OFD) self->c.fd = handle;
        finalize(self);
        memcpy(self->c.why, why, sizeof why);
        errno = e;
        raise_rc(self, rc);
        return -1;
    }
    return 0;
}

static int Core_traverse(CoreObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->ctx);
    Py_VISIT(self->broken);
    return 0;
}

static int Core_clear(CoreObject *self) {
    Py_CLEAR(self->ctx);
    Py_CLEAR(self->broken);
    return 0;
}

static void Core_dealloc(CoreObject *self) {
    PyObject_GC_UnTrack(self);
    if (self->weakreflist) PyObject_ClearWeakRefs((PyObject *)self);
    if (!self->finalized && (self->map || self->c.reg_lock)) finalize(self);
    Core_clear(self);
    Py_XDECREF(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Core_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    CoreObject *self = (CoreObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->c.fd = -1;
    self->c.slot = -1;
    self->name = Py_NewRef(Py_None);
    return (PyObject *)self;
}

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmchan._cext.Core",
    .tp_basicsize = sizeof(CoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One attachment to a shmchan channel: the compiled data path.",
    .tp_new = Core_new,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
    .tp_members = Core_members,
    .tp_weaklistoffset = offsetof(CoreObject, weakreflist),
};

/* ---- module functions ------------------------------------------------------------------------ */

static PyObject *m_init_header(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"buffer", "capacity", "max_record", "max_items", "max_peers", "side_slots", "nonce",
                             "liveness", "semid_peers", "semid_presence", "creator_pid", "creator_uid",
                             "created_unix_ns", "side_retained", NULL};
    Py_buffer buf;
    shmchan_params p;
    memset(&p, 0, sizeof p);
    unsigned long long capacity, max_items, nonce, created;
    unsigned int max_record, max_peers, side_slots, pid, uid, side_retained = 0;
    int liveness, sp, spr;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "w*KIKIIKiiiIIK|I", kwlist, &buf, &capacity, &max_record,
                                     &max_items, &max_peers, &side_slots, &nonce, &liveness, &sp, &spr, &pid, &uid,
                                     &created, &side_retained))
        return NULL;
    p.side_retained = side_retained;
    p.capacity = capacity;
    p.max_record = max_record;
    p.max_items = max_items;
    p.max_peers = max_peers;
    p.side_slots = side_slots;
    p.nonce = nonce;
    p.liveness = liveness;
    p.semid_peers = sp;
    p.semid_presence = spr;
    p.creator_pid = pid;
    p.creator_uid = uid;
    p.created_unix_ns = created;
    char why[160] = "";
    int rc = shmchan_init_header(buf.buf, (uint64_t)buf.len, &p, why, sizeof why);
    PyBuffer_Release(&buf);
    if (rc != SHMCHAN_OK) return PyErr_Format(PyExc_ValueError, "%s", why);
    Py_RETURN_NONE;
}

static PyObject *m_publish(PyObject *Py_UNUSED(m), PyObject *arg) {
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_WRITABLE) < 0) return NULL;
    if (buf.len < 8) {
        PyBuffer_Release(&buf);
        return PyErr_Format(PyExc_ValueError, "buffer too small");
    }
    shmchan_publish(buf.buf);
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

/* check_header(buffer, liveness=0) -> (code, why): 0 when valid. */
static PyObject *m_check_header(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer buf;
    int liveness = 0;
    if (!PyArg_ParseTuple(args, "y*|i", &buf, &liveness)) return NULL;
    char why[160] = "";
    int rc = shmchan_check_header(buf.buf, (uint64_t)buf.len, liveness, why, sizeof why);
    PyBuffer_Release(&buf);
    return Py_BuildValue("(is)", rc, why);
}

/* mark_removed(buffer): state REMOVED, and every sleeper woken (sysv removal). */
static PyObject *m_mark_removed(PyObject *Py_UNUSED(m), PyObject *arg) {
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_WRITABLE) < 0) return NULL;
    if (buf.len >= SHMCHAN_HEADER_BASE) shmchan_mark_removed(buf.buf);
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

static PyObject *m_header_size(PyObject *Py_UNUSED(m), PyObject *arg) {
    unsigned long n = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromUnsignedLong(shmchan_header_size((uint32_t)n));
}

static PyObject *m_crc32(PyObject *Py_UNUSED(m), PyObject *arg) {
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0) return NULL;
    uint32_t v = shmchan_crc32(buf.buf, (size_t)buf.len);
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(v);
}

static PyObject *m_now(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) { return PyFloat_FromDouble(shmchan_now()); }

/* wait_any(cores, seqs, timeout) -> bool: sleep until any core's not-empty counter moves
 * from its seq (FUTEX_WAITV), or the timeout passes. */
static PyObject *m_wait_any(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *cores, *seqs;
    double timeout;
    if (!PyArg_ParseTuple(args, "OOd", &cores, &seqs, &timeout)) return NULL;
    PyObject *cf = PySequence_Fast(cores, "cores must be a sequence");
    PyObject *sf = cf ? PySequence_Fast(seqs, "seqs must be a sequence") : NULL;
    if (!sf) {
        Py_XDECREF(cf);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(cf);
    PyObject *result = NULL;
    if (n < 1 || n > 128 || PySequence_Fast_GET_SIZE(sf) != n) {
        PyErr_SetString(PyExc_ValueError, "wait_any needs 1 to 128 cores and as many seqs");
        goto out;
    }
    shmchan_chan *cs[128];
    uint32_t seen[128];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(cf, i);
        if (!PyObject_TypeCheck(o, &CoreType)) {
            PyErr_SetString(PyExc_TypeError, "wait_any takes Core objects");
            goto out;
        }
        CoreObject *co = (CoreObject *)o;
        if (co->finalized) {
            PyErr_Format(E_Closed, "channel handle %R is closed", co->name);
            goto out;
        }
        cs[i] = &co->c;
        seen[i] = (uint32_t)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(sf, i));
        if (PyErr_Occurred()) goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) ((CoreObject *)PySequence_Fast_GET_ITEM(cf, i))->inflight++;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shmchan_wait_any(cs, seen, (size_t)n, timeout);
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) leave((CoreObject *)PySequence_Fast_GET_ITEM(cf, i));
    if (rc == SHMCHAN_INTR) {
        if (PyErr_CheckSignals() < 0) goto out;
        result = Py_NewRef(Py_False);
    } else if (rc == SHMCHAN_E_SYS) {
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        result = PyBool_FromLong(rc == SHMCHAN_OK);
    }
out:
    Py_DECREF(cf);
    Py_DECREF(sf);
    return result;
}


/* ---- SysV semaphore sets (sysv_ipc makes sets of one semaphore only) -------------------- */

union semun_ {
    int val;
    struct semid_ds *buf;
    unsigned short *array;
};

/* sem_create(key, nsems, mode) -> semid: a new set (IPC_CREAT | IPC_EXCL), all zero. */
static PyObject *m_sem_create(PyObject *Py_UNUSED(m), PyObject *args) {
    int key, nsems, mode;
    if (!PyArg_ParseTuple(args, "iii", &key, &nsems, &mode)) return NULL;
    int id = semget((key_t)key, nsems, IPC_CREAT | IPC_EXCL | (mode & 0777));
    if (id < 0) return PyErr_SetFromErrno(PyExc_OSError);
    /* Linux zero-fills a new set; set the mode exactly (semget does not apply the umask,
     * but be explicit like fchmod is for files). */
    struct semid_ds ds;
    union semun_ arg = {.buf = &ds};
    if (semctl(id, 0, IPC_STAT, arg) == 0) {
        ds.sem_perm.mode = (unsigned short)(mode & 0777);
        (void)semctl(id, 0, IPC_SET, arg);
    }
    return PyLong_FromLong(id);
}

/* sem_lookup(key) -> semid or None. */
static PyObject *m_sem_lookup(PyObject *Py_UNUSED(m), PyObject *arg) {
    long key = PyLong_AsLong(arg);
    if (key == -1 && PyErr_Occurred()) return NULL;
    int id = semget((key_t)key, 0, 0);
    if (id < 0) {
        if (errno == ENOENT) Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(id);
}

/* sem_info(semid) -> (uid, mode, nsems, cuid, otime, ctime). */
static PyObject *m_sem_info(PyObject *Py_UNUSED(m), PyObject *arg) {
    int id = (int)PyLong_AsLong(arg);
    if (id == -1 && PyErr_Occurred()) return NULL;
    struct semid_ds ds;
    union semun_ a = {.buf = &ds};
    if (semctl(id, 0, IPC_STAT, a) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    return Py_BuildValue("(IIkILL)", (unsigned)ds.sem_perm.uid, (unsigned)ds.sem_perm.mode & 0777u,
                         (unsigned long)ds.sem_nsems, (unsigned)ds.sem_perm.cuid, (long long)ds.sem_otime,
                         (long long)ds.sem_ctime);
}

/* sem_values(semid) -> list of every semaphore's value. */
static PyObject *m_sem_values(PyObject *Py_UNUSED(m), PyObject *arg) {
    int id = (int)PyLong_AsLong(arg);
    if (id == -1 && PyErr_Occurred()) return NULL;
    struct semid_ds ds;
    union semun_ a = {.buf = &ds};
    if (semctl(id, 0, IPC_STAT, a) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    unsigned long n = (unsigned long)ds.sem_nsems;
    unsigned short *vals = PyMem_Calloc(n ? n : 1, sizeof *vals);
    if (!vals) return PyErr_NoMemory();
    union semun_ b = {.array = vals};
    if (semctl(id, 0, GETALL, b) != 0) {
        PyMem_Free(vals);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (unsigned long i = 0; list && i < n; i++) PyList_SET_ITEM(list, (Py_ssize_t)i, PyLong_FromLong(vals[i]));
    PyMem_Free(vals);
    return list;
}

/* sem_remove(semid): IPC_RMID (ENOENT/EINVAL: already gone, not an error). */
static PyObject *m_sem_remove(PyObject *Py_UNUSED(m), PyObject *arg) {
    int id = (int)PyLong_AsLong(arg);
    if (id == -1 && PyErr_Occurred()) return NULL;
    if (semctl(id, 0, IPC_RMID) != 0 && errno != EINVAL && errno != EIDRM)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* sem_op(semid, num, delta, undo, nowait) -> bool: one semop; False if it would block. */
static PyObject *m_sem_op(PyObject *Py_UNUSED(m), PyObject *args) {
    int id, num, delta, undo, nowait;
    if (!PyArg_ParseTuple(args, "iiipp", &id, &num, &delta, &undo, &nowait)) return NULL;
    struct sembuf op = {(unsigned short)num, (short)delta, (short)((undo ? SEM_UNDO : 0) | (nowait ? IPC_NOWAIT : 0))};
    for (;;) {
        if (semop(id, &op, 1) == 0) Py_RETURN_TRUE;
        if (errno == EAGAIN) Py_RETURN_FALSE;
        if (errno != EINTR) return PyErr_SetFromErrno(PyExc_OSError);
        if (PyErr_CheckSignals() < 0) return NULL;
    }
}

/* shm_lookup(key) -> shmid or None (without attaching). */
static PyObject *m_shm_lookup(PyObject *Py_UNUSED(m), PyObject *arg) {
    long key = PyLong_AsLong(arg);
    if (key == -1 && PyErr_Occurred()) return NULL;
    int id = shmget((key_t)key, 0, 0);
    if (id < 0) {
        if (errno == ENOENT) Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(id);
}

/* shm_info(shmid) -> (uid, mode, size, nattch, cpid, lpid, ctime). */
static PyObject *m_shm_info(PyObject *Py_UNUSED(m), PyObject *arg) {
    int id = (int)PyLong_AsLong(arg);
    if (id == -1 && PyErr_Occurred()) return NULL;
    struct shmid_ds ds;
    if (shmctl(id, IPC_STAT, &ds) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    return Py_BuildValue("(IIKkiiL)", (unsigned)ds.shm_perm.uid, (unsigned)ds.shm_perm.mode & 0777u,
                         (unsigned long long)ds.shm_segsz, (unsigned long)ds.shm_nattch, (int)ds.shm_cpid,
                         (int)ds.shm_lpid, (long long)ds.shm_ctime);
}

/* ofd_held(fd, offset, length) -> bool: whether another open file holds a lock there. */
static PyObject *m_ofd_held(PyObject *Py_UNUSED(m), PyObject *args) {
    int fd;
    long long off, len;
    if (!PyArg_ParseTuple(args, "iLL", &fd, &off, &len)) return NULL;
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = (off_t)off, .l_len = (off_t)len};
    if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(fl.l_type != F_UNLCK);
}

/* ofd_lock(fd, offset, length, exclusive) -> bool: F_OFD_SETLK; False if held elsewhere.
 * ofd_unlock(fd, offset, length). */
static PyObject *m_ofd_lock(PyObject *Py_UNUSED(m), PyObject *args) {
    int fd, excl;
    long long off, len;
    if (!PyArg_ParseTuple(args, "iLLp", &fd, &off, &len, &excl)) return NULL;
    struct flock fl = {.l_type = (short)(excl ? F_WRLCK : F_RDLCK), .l_whence = SEEK_SET, .l_start = (off_t)off,
                       .l_len = (off_t)len};
    for (;;) {
        if (fcntl(fd, F_OFD_SETLK, &fl) == 0) Py_RETURN_TRUE;
        if (errno == EAGAIN || errno == EACCES) Py_RETURN_FALSE;
        if (errno != EINTR) return PyErr_SetFromErrno(PyExc_OSError);
    }
}

static PyObject *m_ofd_unlock(PyObject *Py_UNUSED(m), PyObject *args) {
    int fd;
    long long off, len;
    if (!PyArg_ParseTuple(args, "iLL", &fd, &off, &len)) return NULL;
    struct flock fl = {.l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = (off_t)off, .l_len = (off_t)len};
    if (fcntl(fd, F_OFD_SETLK, &fl) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* configure(errors, hooks): the exception classes and the Python hooks. Called once by
 * shmchan._core at import. */
static PyObject *m_configure(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *errors, *hooks;
    if (!PyArg_ParseTuple(args, "O!O!", &PyDict_Type, &errors, &PyDict_Type, &hooks)) return NULL;
#define TAKE(var, dict, key)                                                  \
    do {                                                                      \
        PyObject *v = PyDict_GetItemString(dict, key);                        \
        if (!v) return PyErr_Format(PyExc_KeyError, "configure needs %s", key); \
        Py_XSETREF(var, Py_NewRef(v));                                        \
    } while (0)
    TAKE(E_Shmchan, errors, "ShmchanError");
    TAKE(E_Closed, errors, "ClosedChannel");
    TAKE(E_Corrupt, errors, "CorruptChannel");
    TAKE(E_NotShm, errors, "NotAShmchanSegment");
    TAKE(E_Incompat, errors, "IncompatibleLayout");
    TAKE(E_Eof, errors, "EndOfChannel");
    TAKE(E_Broken, errors, "BrokenChannel");
    TAKE(E_TooLarge, errors, "MessageTooLarge");
    TAKE(E_Undecodable, errors, "UndecodableMessage");
    TAKE(E_UndecodableBatch, errors, "UndecodableBatch");
    TAKE(E_TooManyPeers, errors, "TooManyPeers");
    TAKE(E_NotFound, errors, "ChannelNotFound");
    TAKE(H_encode_slow, hooks, "encode_slow");
    TAKE(H_decode_slow, hooks, "decode_slow");
    TAKE(H_side_prepare, hooks, "side_prepare");
    TAKE(H_side_read, hooks, "side_read");
#undef TAKE
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"init_header", (PyCFunction)(void (*)(void))m_init_header, METH_VARARGS | METH_KEYWORDS,
     "write a fresh segment's identity block (magic stays 0)"},
    {"publish", m_publish, METH_O, "store magic (release): the segment is ready"},
    {"check_header", m_check_header, METH_VARARGS, "check_header(buffer, liveness=0) -> (code, why)"},
    {"header_size", m_header_size, METH_O, "header_size(max_peers) -> int"},
    {"mark_removed", m_mark_removed, METH_O, "mark_removed(buffer): the channel was removed"},
    {"crc32", m_crc32, METH_O, "CRC-32 (IEEE) of a buffer"},
    {"now", m_now, METH_NOARGS, "CLOCK_MONOTONIC seconds"},
    {"wait_any", m_wait_any, METH_VARARGS, "wait_any(cores, seqs, timeout) -> bool"},
    {"configure", m_configure, METH_VARARGS, "configure(errors, hooks)"},
    {"sem_create", m_sem_create, METH_VARARGS, "sem_create(key, nsems, mode) -> semid"},
    {"sem_lookup", m_sem_lookup, METH_O, "sem_lookup(key) -> semid | None"},
    {"sem_info", m_sem_info, METH_O, "sem_info(semid) -> (uid, mode, nsems, cuid, otime, ctime)"},
    {"sem_values", m_sem_values, METH_O, "sem_values(semid) -> list of values"},
    {"sem_remove", m_sem_remove, METH_O, "sem_remove(semid)"},
    {"sem_op", m_sem_op, METH_VARARGS, "sem_op(semid, num, delta, undo, nowait) -> bool"},
    {"shm_lookup", m_shm_lookup, METH_O, "shm_lookup(key) -> shmid | None"},
    {"shm_info", m_shm_info, METH_O, "shm_info(shmid) -> (uid, mode, size, nattch, cpid, lpid, ctime)"},
    {"ofd_held", m_ofd_held, METH_VARARGS, "ofd_held(fd, offset, length) -> bool"},
    {"ofd_lock", m_ofd_lock, METH_VARARGS, "ofd_lock(fd, offset, length, exclusive) -> bool"},
    {"ofd_unlock", m_ofd_unlock, METH_VARARGS, "ofd_unlock(fd, offset, length)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "shmchan._cext", "The compiled data path of shmchan (see shmchan/_native/shmchan.h).",
    -1, module_methods, NULL, NULL, NULL, NULL,
};

static int add_int(PyObject *m, const char *name, long v) { return PyModule_AddIntConstant(m, name, v); }

PyMODINIT_FUNC PyInit__cext(void) {
    if (PyType_Ready(&CoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    PyObject *pickle = PyImport_ImportModule("pickle");
    if (!pickle) goto fail;
    pickle_dumps = PyObject_GetAttrString(pickle, "dumps");
    pickle_loads = PyObject_GetAttrString(pickle, "loads");
    Py_DECREF(pickle);
    if (!pickle_dumps || !pickle_loads) goto fail;
    kw_buffer_callback = Py_BuildValue("(s)", "buffer_callback");
    py_five = PyLong_FromLong(5);
    NOTHING = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    BUSY = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    if (!kw_buffer_callback || !py_five || !NOTHING || !BUSY) goto fail;
    if (PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) < 0) goto fail;
    if (PyModule_AddObjectRef(m, "NOTHING", NOTHING) < 0 || PyModule_AddObjectRef(m, "BUSY", BUSY) < 0) goto fail;
    struct {
        const char *n;
        long v;
    } ints[] = {
        {"LAYOUT_MAJOR", SHMCHAN_LAYOUT_MAJOR}, {"LAYOUT_MINOR", SHMCHAN_LAYOUT_MINOR},
        {"OK", SHMCHAN_OK}, {"E_CORRUPT", SHMCHAN_E_CORRUPT}, {"E_NOTSHM", SHMCHAN_E_NOTSHM},
        {"E_INCOMPAT", SHMCHAN_E_INCOMPAT}, {"EV_NOT_EMPTY", SHMCHAN_EV_NOT_EMPTY},
        {"EV_NOT_FULL", SHMCHAN_EV_NOT_FULL}, {"EV_JOINED", SHMCHAN_EV_JOINED}, {"F_EOF", SHMCHAN_F_EOF},
        {"F_BROKEN", SHMCHAN_F_BROKEN}, {"F_NOSPIN", SHMCHAN_F_NOSPIN}, {"F_RAW", F_RAW}, {"F_NOGRACE", F_NOGRACE},
        {"WRITER", SHMCHAN_WRITER}, {"READER", SHMCHAN_READER}, {"LIVENESS_OFD", SHMCHAN_LIVENESS_OFD},
        {"LIVENESS_SYSV", SHMCHAN_LIVENESS_SYSV}, {"GIL_FREE_BYTES", GIL_FREE_BYTES},
        {"DEFAULT_MAX_PEERS", SHMCHAN_DEFAULT_MAX_PEERS}, {"DEFAULT_SIDE_SLOTS", SHMCHAN_DEFAULT_SIDE_SLOTS},
        {"DEFAULT_SIDE_RETAINED", SHMCHAN_DEFAULT_SIDE_RETAINED},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (add_int(m, ints[i].n, ints[i].v) < 0) goto fail;
    if (PyModule_AddObject(m, "WAIT_SLICE", PyFloat_FromDouble(SHMCHAN_WAIT_SLICE)) < 0) goto fail;
    if (PyModule_AddObject(m, "LOCK_GRACE", PyFloat_FromDouble(LOCK_GRACE)) < 0) goto fail;
    /* Offsets, for tests/test_layout.py to compare with shmchan/_layout.py and the docs. */
    static const struct {
        const char *n;
        long v;
    } offsets[] = {
        {"magic", SHMCHAN_OFF_MAGIC},
        {"layout_major", SHMCHAN_OFF_LAYOUT_MAJOR},
        {"layout_minor", SHMCHAN_OFF_LAYOUT_MINOR},
        {"header_size", SHMCHAN_OFF_HEADER_SIZE},
        {"capacity", SHMCHAN_OFF_CAPACITY},
        {"max_record", SHMCHAN_OFF_MAX_RECORD},
        {"record_header_size", SHMCHAN_OFF_RECORD_HEADER_SIZE},
        {"record_align", SHMCHAN_OFF_RECORD_ALIGN},
        {"features_incompat", SHMCHAN_OFF_FEATURES_INCOMPAT},
        {"features_compat", SHMCHAN_OFF_FEATURES_COMPAT},
        {"nonce", SHMCHAN_OFF_NONCE},
        {"liveness_kind", SHMCHAN_OFF_LIVENESS_KIND},
        {"wakeup_kind", SHMCHAN_OFF_WAKEUP_KIND},
        {"creator_pid", SHMCHAN_OFF_CREATOR_PID},
        {"created_unix_ns", SHMCHAN_OFF_CREATED_UNIX_NS},
        {"semid_peers", SHMCHAN_OFF_SEMID_PEERS},
        {"semid_presence", SHMCHAN_OFF_SEMID_PRESENCE},
        {"max_peers", SHMCHAN_OFF_MAX_PEERS},
        {"peer_table_offset", SHMCHAN_OFF_PEER_TABLE_OFFSET},
        {"max_items", SHMCHAN_OFF_MAX_ITEMS},
        {"side_slots", SHMCHAN_OFF_SIDE_SLOTS},
        {"side_table_offset", SHMCHAN_OFF_SIDE_TABLE_OFFSET},
        {"creator_uid", SHMCHAN_OFF_CREATOR_UID},
        {"side_retained", SHMCHAN_OFF_SIDE_RETAINED},
        {"header_crc", SHMCHAN_OFF_HEADER_CRC},
        {"tail", SHMCHAN_OFF_TAIL},
        {"wlock", SHMCHAN_OFF_WLOCK},
        {"msgs_put", SHMCHAN_OFF_MSGS_PUT},
        {"side_journal", SHMCHAN_OFF_SIDE_JOURNAL},
        {"side_journal_tail", SHMCHAN_OFF_SIDE_JOURNAL_TAIL},
        {"head", SHMCHAN_OFF_HEAD},
        {"rlock", SHMCHAN_OFF_RLOCK},
        {"msgs_got", SHMCHAN_OFF_MSGS_GOT},
        {"tasks_done", SHMCHAN_OFF_TASKS_DONE},
        {"ne_seq", SHMCHAN_OFF_NE_SEQ},
        {"nf_seq", SHMCHAN_OFF_NF_SEQ},
        {"state", SHMCHAN_OFF_STATE},
        {"jn_seq", SHMCHAN_OFF_JN_SEQ},
        {"recoveries", SHMCHAN_OFF_RECOVERIES},
        {"owner", SHMCHAN_OFF_OWNER},
        {"writers_open", SHMCHAN_OFF_WRITERS_OPEN},
        {"writers_seen", SHMCHAN_OFF_WRITERS_SEEN},
        {"readers_open", SHMCHAN_OFF_READERS_OPEN},
        {"readers_seen", SHMCHAN_OFF_READERS_SEEN},
        {"waiting_consumers", SHMCHAN_OFF_WAITING_CONSUMERS},
        {"waiting_producers", SHMCHAN_OFF_WAITING_PRODUCERS},
        {"waiting_joiners", SHMCHAN_OFF_WAITING_JOINERS},
    };
    PyObject *off = PyDict_New();
    for (size_t i = 0; off && i < sizeof offsets / sizeof offsets[0]; i++) {
        PyObject *v = PyLong_FromLong(offsets[i].v);
        if (!v || PyDict_SetItemString(off, offsets[i].n, v) < 0) Py_CLEAR(off);
        Py_XDECREF(v);
    }
    if (!off || PyModule_AddObject(m, "OFFSETS", off) < 0) goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
