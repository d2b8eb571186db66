/* reader [-o] NAME COUNT - receive COUNT raw-bytes messages from an existing shmchan
 * channel or named queue (posix backend), then print "count=<N> checksum=<16 hex>".
 * It holds read presence while it reads, so Python writers see it as a reader.
 *
 * Checksum (see README.md): h = 0xcbf29ce484222325; per message in order,
 * crc = CRC-32(le32(len) || bytes) (zlib crc32), h = ((h ^ crc) * 0x100000001b3) mod 2^64.
 * Each receive waits at most 30 s, so a stuck peer makes us fail, not hang. Messages
 * larger than the ring (side segments) are received like any other.
 *
 * A message that is not raw bytes (a Python object: PICKLE or PICKLE_OOB, layout.md
 * 2.2) is consumed either way. Without -o it is an error (exit 3). With -o it is
 * reported on stdout as "other type=<T> len=<N>" and not counted in COUNT.
 */
#include "shmchan_posix.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t checksum_fold(uint64_t h, const unsigned char *p, uint64_t len) {
    uint32_t len32 = (uint32_t)len; /* le32(len): the host is little-endian */
    uint32_t crc = shmchan_crc32_update(shmchan_crc32_update(0, &len32, 4), p, len);
    return (h ^ crc) * 0x100000001b3ull;
}

int main(int argc, char **argv) {
    int allow_other = argc > 1 && strcmp(argv[1], "-o") == 0;
    if (argc - allow_other != 3) {
        fprintf(stderr, "usage: %s [-o] NAME COUNT\n", argv[0]);
        return 2;
    }
    const char *name = argv[1 + allow_other];
    unsigned long long count = strtoull(argv[2 + allow_other], NULL, 0);
    static shmchan_posix ch;
    int rc = shmchan_posix_open(&ch, name, 2.0, 0);
    if (rc != SHMCHAN_OK) {
        fprintf(stderr, "reader: open %s: code %d (%s)\n", name, rc, ch.chan.why);
        return 1;
    }
    if (shmchan_presence_enter(&ch.chan, SHMCHAN_READER) != SHMCHAN_OK) {
        fprintf(stderr, "reader: presence failed\n");
        return 1;
    }
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned long long i = 0; i < count;) {
        void *data;
        uint64_t len;
        uint32_t type;
        do
            rc = shmchan_posix_recv(&ch, &data, &len, &type, 30.0, 0);
        while (rc == SHMCHAN_INTR);
        if (rc != SHMCHAN_OK) {
            fprintf(stderr, "reader: recv #%llu: code %d (%s)\n", i, rc, ch.chan.why);
            return 1;
        }
        if (type != SHMCHAN_RT_BYTES) {
            free(data);
            if (!allow_other) {
                fprintf(stderr, "reader: message #%llu has record type %u, not BYTES\n", i, (unsigned)type);
                return 3;
            }
            printf("other type=%u len=%llu\n", (unsigned)type, (unsigned long long)len);
            continue;
        }
        h = checksum_fold(h, data, len);
        free(data);
        i++;
    }
    printf("count=%llu checksum=%016llx\n", count, (unsigned long long)h);
    shmchan_posix_close(&ch);
    return 0;
}
