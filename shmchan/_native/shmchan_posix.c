/*
 * shmchan_posix.c - open posix-backend channels by name; messages of any size.
 * See shmchan_posix.h. Built into C programs (examples/c), not into the Python
 * extension (Python names and maps memory itself).
 */
#define _GNU_SOURCE
#include "shmchan_posix.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SIDE_GRANULE (1ULL << 20)

static int fail(shmchan_posix *p, int rc, int err, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail(shmchan_posix *p, int rc, int err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->chan.why, sizeof p->chan.why, fmt, ap);
    va_end(ap);
    errno = err;
    return rc;
}

static int creation_locked(int fd) {
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 8};
    if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return 1;
    return fl.l_type != F_UNLCK;
}

int shmchan_posix_open(shmchan_posix *p, const char *name, double timeout, int flags) {
    memset(p, 0, sizeof *p);
    p->chan.fd = -1;
    p->chan.slot = -1;
    if (!name || name[0] != '/' || strlen(name) >= sizeof p->name)
        return fail(p, SHMCHAN_E_SYS, EINVAL, "a posix channel name starts with '/'");
    snprintf(p->name, sizeof p->name, "%s", name);
    int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) return fail(p, SHMCHAN_E_SYS, errno, "shm_open(%s): %s", name, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return fail(p, SHMCHAN_E_SYS, e, "fstat: %s", strerror(e));
    }
    /* Whoever can write a channel can make its readers decode anything: refuse what
     * another user owns or may write (docs/security.md), unless told otherwise. */
    if (!(flags & SHMCHAN_ALLOW_FOREIGN) && (st.st_uid != geteuid() || (st.st_mode & 022))) {
        close(fd);
        return fail(p, SHMCHAN_E_SYS, EACCES, "%s is owned by uid %u with mode %o: refused", name,
                    (unsigned)st.st_uid, (unsigned)(st.st_mode & 0777));
    }
    p->uid = st.st_uid;
    p->mode = st.st_mode & 0777;
    /* Wait for publication (docs/layout.md 4). */
    double deadline = shmchan_now() + (timeout < 0 ? 0 : timeout);
    uint64_t magic = 0;
    for (;;) {
        if (fstat(fd, &st) == 0 && st.st_size >= 8 && pread(fd, &magic, 8, 0) == 8 && magic) break;
        if (st.st_size > 0 && !magic && !creation_locked(fd)) {
            close(fd);
            return fail(p, SHMCHAN_E_SYS, EOWNERDEAD, "%s: its creator died before publishing it", name);
        }
        if (shmchan_now() >= deadline) {
            close(fd);
            return fail(p, SHMCHAN_E_SYS, ETIMEDOUT, "%s was not published in time", name);
        }
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        int e = errno;
        close(fd);
        return fail(p, SHMCHAN_E_SYS, e, "mmap: %s", strerror(e));
    }
    int rc = shmchan_open(&p->chan, base, (uint64_t)st.st_size, fd);
    if (rc == SHMCHAN_OK && p->chan.liveness != SHMCHAN_LIVENESS_OFD) rc = SHMCHAN_E_INCOMPAT;
    if (rc == SHMCHAN_OK) rc = shmchan_attach(&p->chan);
    if (rc != SHMCHAN_OK) {
        shmchan_close(&p->chan);
        munmap(base, (size_t)st.st_size);
        close(fd);
        p->chan.base = NULL;
        p->chan.fd = -1;
        return rc;
    }
    return SHMCHAN_OK;
}

void shmchan_posix_close(shmchan_posix *p) {
    if (!p->chan.base) return;
    shmchan_detach(&p->chan);
    shmchan_close(&p->chan);
    for (int i = 0; i < SHMCHAN_SIDE_SLOTS_MAX; i++)
        if (p->sides[i].map) munmap(p->sides[i].map, (size_t)p->sides[i].size);
    munmap(p->chan.base, (size_t)p->chan.size);
    close(p->chan.fd);
    p->chan.base = NULL;
    p->chan.fd = -1;
}

/* ---- side objects: <name>.S<index as 2 hex digits> ------------------------------------- */

static void side_name(shmchan_posix *p, uint32_t index, char *out, size_t len) {
    snprintf(out, len, "%s.S%02x", p->name, index);
}

/* Map side object `index` (reusing the cached mapping while it is the same file).
 * Returns its mapping or NULL (errno set). With want_size, (re)create it at that size. */
static shmchan_posix_side *side_map(shmchan_posix *p, uint32_t index, uint64_t create_size) {
    char name[300];
    side_name(p, index, name, sizeof name);
    shmchan_posix_side *s = &p->sides[index];
    int fd;
    if (create_size) {
        shm_unlink(name);
        fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, p->mode);
        if (fd < 0) return NULL;
        if (fchmod(fd, p->mode) != 0 || ftruncate(fd, (off_t)create_size) != 0 ||
            (errno = posix_fallocate(fd, 0, (off_t)create_size)) != 0) {
            int e = errno;
            close(fd);
            shm_unlink(name);
            errno = e;
            return NULL;
        }
    } else {
        fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
        if (fd < 0) return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_uid != p->uid || (st.st_mode & 0777 & ~p->mode)) {
        close(fd);
        errno = EACCES;
        return NULL;
    }
    if (s->map && s->dev == st.st_dev && s->ino == st.st_ino && s->size == (uint64_t)st.st_size) {
        close(fd);
        return s;
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (map == MAP_FAILED) {
        errno = e;
        return NULL;
    }
    if (s->map) munmap(s->map, (size_t)s->size);
    s->map = map;
    s->size = (uint64_t)st.st_size;
    s->dev = st.st_dev;
    s->ino = st.st_ino;
    return s;
}

static int send_side(shmchan_posix *p, const void *data, uint64_t n, double deadline, int check_broken) {
    shmchan_chan *c = &p->chan;
    uint32_t index, ticket;
    int rc;
    for (;;) {
        rc = shmchan_side_claim(c, &index, &ticket);
        if (rc == SHMCHAN_OK) break;
        if (rc != SHMCHAN_FULL) return rc;
        /* Entries of writers that died before queueing them are freed under the lock. */
        rc = shmchan_lock(c, SHMCHAN_WLOCK, deadline);
        if (rc != SHMCHAN_OK) return rc;
        shmchan_side_reclaim(c);
        shmchan_unlock(c, SHMCHAN_WLOCK);
        if (shmchan_side_claim(c, &index, &ticket) == SHMCHAN_OK) break;
        rc = shmchan_wait_writable(c, 0, deadline, SHMCHAN_F_SIDE | (check_broken ? SHMCHAN_F_BROKEN : 0));
        if (rc != SHMCHAN_OK) return rc;
    }
    uint64_t size;
    uint32_t gen;
    shmchan_side_file(c, index, &size, &gen);
    shmchan_posix_side *s = size ? side_map(p, index, 0) : NULL;
    if (!s || s->size < n || (s->size > 4 * n && s->size > 16 * SIDE_GRANULE)) {
        gen++;
        shmchan_side_set_file(c, index, ticket, 0, gen);
        uint64_t want = (n + SIDE_GRANULE - 1) / SIDE_GRANULE * SIDE_GRANULE;
        s = side_map(p, index, want);
        if (!s) {
            int e = errno;
            shmchan_side_release(c, index, ticket);
            errno = e;
            return SHMCHAN_E_SYS;
        }
    }
    if (s->size != size) shmchan_side_set_file(c, index, ticket, s->size, gen);
    memcpy(s->map, data, n);
    shmchan_side_ref ref = {index, ticket, gen, SHMCHAN_RT_BYTES, n};
    for (;;) {
        rc = shmchan_lock(c, SHMCHAN_WLOCK, deadline);
        if (rc != SHMCHAN_OK) break;
        size_t written = 0;
        rc = shmchan_side_append(c, &ref, &written);
        shmchan_unlock(c, SHMCHAN_WLOCK);
        if (rc != SHMCHAN_OK) break;
        if (written) {
            shmchan_after_put(c, 1);
            return SHMCHAN_OK;
        }
        rc = shmchan_wait_writable(c, SHMCHAN_SIDE_REF_SIZE, deadline, check_broken ? SHMCHAN_F_BROKEN : 0);
        if (rc != SHMCHAN_OK) break;
    }
    shmchan_side_release(c, index, ticket);
    return rc;
}

int shmchan_posix_send(shmchan_posix *p, const void *data, uint64_t n, double timeout, int check_broken) {
    double deadline = timeout < 0 ? -1.0 : shmchan_now() + timeout;
    if (((n + 31) & ~(uint64_t)15) > p->chan.max_record) return send_side(p, data, n, deadline, check_broken);
    shmchan_chan *c = &p->chan;
    shmchan_part part = {0, data, n};
    shmchan_rec rec = {SHMCHAN_RT_BYTES, n, &part, 1};
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

int shmchan_posix_recv(shmchan_posix *p, void **data, uint64_t *n, uint32_t *type, double timeout,
                       int check_eof) {
    shmchan_chan *c = &p->chan;
    double deadline = timeout < 0 ? -1.0 : shmchan_now() + timeout;
    *data = NULL;
    for (;;) {
        int rc = shmchan_lock(c, SHMCHAN_RLOCK, deadline);
        if (rc != SHMCHAN_OK) return rc;
        uint64_t at;
        shmchan_view v;
        rc = shmchan_r_begin(c, &at);
        if (rc == SHMCHAN_OK) rc = shmchan_r_next(c, &at, &v);
        if (rc == SHMCHAN_EMPTY) {
            shmchan_r_commit(c, at, 0); /* release padding we skipped */
            shmchan_unlock(c, SHMCHAN_RLOCK);
            rc = shmchan_wait_readable(c, deadline, check_eof ? SHMCHAN_F_EOF : 0);
            if (rc != SHMCHAN_OK) return rc;
            continue;
        }
        if (rc != SHMCHAN_OK) {
            shmchan_unlock(c, SHMCHAN_RLOCK);
            return rc;
        }
        if (v.type == SHMCHAN_RT_SIDE) {
            /* Take the entry and commit under the lock; copy the message out after. */
            shmchan_side_ref ref;
            rc = shmchan_side_parse(c, v.payload, v.n, &ref);
            if (rc == SHMCHAN_OK) rc = shmchan_side_take(c, &ref);
            if (rc != SHMCHAN_OK) {
                shmchan_unlock(c, SHMCHAN_RLOCK);
                return rc;
            }
            shmchan_r_commit(c, v.next, 1);
            shmchan_unlock(c, SHMCHAN_RLOCK);
            shmchan_after_get(c, 1);
            shmchan_posix_side *s = side_map(p, ref.index, 0);
            int whole = s && s->size >= ref.size;
            void *buf = whole ? malloc(ref.size ? ref.size : 1) : NULL;
            if (buf) memcpy(buf, s->map, ref.size);
            if (ref.index >= c->side_retained) {
                /* A transient entry: its object goes once read (docs/layout.md 2.5). */
                char side[300];
                side_name(p, ref.index, side, sizeof side);
                shm_unlink(side);
                if (s) {
                    munmap(s->map, (size_t)s->size);
                    memset(s, 0, sizeof *s);
                }
                shmchan_side_drop(c, ref.index, ref.ticket);
            } else {
                shmchan_side_done(c, ref.index, ref.ticket);
            }
            if (!whole) return shmchan_corrupt(c, "a side segment is missing or too short");
            if (!buf) return SHMCHAN_E_SYS;
            *data = buf;
            *n = ref.size;
            *type = ref.inner_type;
            return SHMCHAN_OK;
        }
        void *buf = malloc(v.n ? v.n : 1);
        if (!buf) {
            shmchan_unlock(c, SHMCHAN_RLOCK); /* nothing consumed */
            return SHMCHAN_E_SYS;
        }
        memcpy(buf, v.payload, v.n);
        shmchan_r_commit(c, v.next, 1);
        shmchan_unlock(c, SHMCHAN_RLOCK);
        shmchan_after_get(c, 1);
        *data = buf;
        *n = v.n;
        *type = v.type;
        return SHMCHAN_OK;
    }
}
