/* reader [-o] NAME COUNT - receive COUNT BYTES messages from an existing shmchan
 * channel or named queue (posix backend), then print "count=<N> checksum=<16 hex>".
 *
 * Checksum (see README.md): h = 0xcbf29ce484222325; per message in order,
 * crc = CRC-32(le32(len) || bytes) (zlib crc32), h = ((h ^ crc) * 0x100000001b3) mod 2^64.
 * Each receive waits at most 30 s, so a stuck peer makes us fail, not hang.
 *
 * A record that is not BYTES (a Python object: PICKLE, PICKLE_OOB, or LARGE, layout.md
 * 2.2) is consumed by shmchan_recv either way. Without -o it is an error (exit 3).
 * With -o it is reported on stdout as "other type=<T> len=<N>" and not counted in
 * COUNT (for LARGE, shmchan_recv has removed its side segment unread); the final
 * line is printed as usual.
 */
#include "shmchan.h" /* first: it defines _GNU_SOURCE */

#include <stdlib.h>

static uint64_t checksum_fold(uint64_t h, const void *p, uint32_t len)
{
    uint32_t crc = shmchan_crc32(0, &len, 4); /* le32(len): the host is little-endian */
    crc = shmchan_crc32(crc, p, len);
    return (h ^ crc) * 0x100000001b3ull;
}

int main(int argc, char **argv)
{
    int allow_other = argc > 1 && strcmp(argv[1], "-o") == 0;
    if (argc - allow_other != 3) {
        fprintf(stderr, "usage: %s [-o] NAME COUNT\n", argv[0]);
        return 2;
    }
    const char *name = argv[1 + allow_other];
    unsigned long long count = strtoull(argv[2 + allow_other], NULL, 0);
    shmchan ch;
    int rc = shmchan_open(&ch, name, 2.0);
    if (rc != SHMCHAN_OK) {
        fprintf(stderr, "reader: open %s: %s (%s)\n", name, shmchan_strerror(rc), ch.why);
        return 1;
    }
    uint32_t cap = shmchan_max_payload(&ch), len = 0;
    unsigned char *buf = malloc(cap ? cap : 1);
    if (!buf) {
        perror("reader: malloc");
        return 1;
    }
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned long long i = 0; i < count;) {
        rc = shmchan_recv(&ch, buf, cap, &len, 30.0);
        if (rc == SHMCHAN_OTHER_TYPE) {
            if (!allow_other) {
                fprintf(stderr, "reader: message #%llu has record type %u, not BYTES\n", i,
                        (unsigned)ch.last_type);
                return 3;
            }
            if (ch.side_unlink_failed)
                fprintf(stderr, "reader: removing side segment %016llx: %s\n",
                        (unsigned long long)ch.last_large_seq, strerror(ch.side_errno));
            printf("other type=%u len=%u\n", (unsigned)ch.last_type, (unsigned)len);
            continue;
        }
        if (rc != SHMCHAN_OK) {
            fprintf(stderr, "reader: recv #%llu: %s (%s)\n", i, shmchan_strerror(rc), ch.why);
            return 1;
        }
        h = checksum_fold(h, buf, len);
        i++;
    }
    printf("count=%llu checksum=%016llx\n", count, (unsigned long long)h);
    free(buf);
    shmchan_close(&ch);
    return 0;
}
