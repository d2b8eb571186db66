/*
 * shmchan_posix.h - open posix-backend shmchan channels by name, from C.
 *
 * The layer C programs use on top of shmchan.h: it opens a channel that Python (or
 * another C program) created with the posix backend (`shm_open` name, as
 * `Channel.name` prints it, with its leading slash), checks who owns it as Python does
 * (docs/security.md), attaches, and sends and receives whole messages of any size
 * (messages larger than the ring travel in the side-segment pool, docs/layout.md 2.5).
 * Link shmchan.c and shmchan_posix.c.
 */
#ifndef SHMCHAN_POSIX_H
#define SHMCHAN_POSIX_H

#include <sys/types.h>

#include "shmchan.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SHMCHAN_ALLOW_FOREIGN 1 /* open a channel another user owns or may write */

typedef struct shmchan_posix_side {
    void *map;
    uint64_t size;
    dev_t dev;
    ino_t ino;
} shmchan_posix_side;

typedef struct shmchan_posix {
    shmchan_chan chan;          /* the attachment: use it with every shmchan_* call */
    char name[256];             /* the shm name, with its leading slash */
    uid_t uid;                  /* the segment's owner and mode (side objects must match) */
    mode_t mode;
    shmchan_posix_side sides[SHMCHAN_SIDE_SLOTS_MAX];
} shmchan_posix;

/* Open `name` and attach, waiting up to `timeout` seconds for a creator that has not
 * published it yet. SHMCHAN_OK, or an error with p->chan.why filled: SHMCHAN_E_SYS
 * (errno: ENOENT no such channel, EACCES permissions or a foreign owner (refused unless
 * SHMCHAN_ALLOW_FOREIGN), ETIMEDOUT never published, EOWNERDEAD its creator died),
 * SHMCHAN_E_NOTSHM, SHMCHAN_E_INCOMPAT, SHMCHAN_E_CORRUPT, SHMCHAN_E_NOPEERS. */
int shmchan_posix_open(shmchan_posix *p, const char *name, double timeout, int flags);
/* Detach and unmap everything (presence included). */
void shmchan_posix_close(shmchan_posix *p);

/* Send one message of raw bytes (RT_BYTES) of any size, waiting up to `timeout`
 * seconds (< 0: no limit). With `check_broken`, SHMCHAN_BROKEN once no reader is
 * left (hold write presence first: shmchan_presence_enter). SHMCHAN_INTR if a signal
 * interrupted a wait (call again to go on). */
int shmchan_posix_send(shmchan_posix *p, const void *data, uint64_t n, double timeout, int check_broken);

/* Receive one message into a buffer the library allocates with malloc (*data; the
 * caller frees it): SHMCHAN_OK with *n bytes and its record *type (RT_BYTES for raw
 * bytes; pickles are returned as they are, for the caller to report). With
 * `check_eof`, SHMCHAN_EOF once every writer is gone and the ring is drained. */
int shmchan_posix_recv(shmchan_posix *p, void **data, uint64_t *n, uint32_t *type, double timeout,
                       int check_eof);

#ifdef __cplusplus
}
#endif
#endif /* SHMCHAN_POSIX_H */
