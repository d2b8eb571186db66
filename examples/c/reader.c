/* reader NAME COUNT - receive COUNT messages from an existing shmchan channel
 * (posix backend), then print "count=<N> checksum=<16 hex>".
 *
 * Checksum (see README.md): h = 0xcbf29ce484222325; per message in order,
 * crc = CRC-32(le32(len) || bytes) (zlib crc32), h = ((h ^ crc) * 0x100000001b3) mod 2^64.
 * Each receive waits at most 30 s, so a stuck peer makes us fail, not hang.
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
    if (argc != 3) {
        fprintf(stderr, "usage: %s NAME COUNT\n", argv[0]);
        return 2;
    }
    unsigned long long count = strtoull(argv[2], NULL, 0);
    shmchan ch;
    int rc = shmchan_open(&ch, argv[1], 2.0);
    if (rc != SHMCHAN_OK) {
        fprintf(stderr, "reader: open %s: %s (%s)\n", argv[1], shmchan_strerror(rc), ch.why);
        return 1;
    }
    uint32_t cap = shmchan_max_payload(&ch), len = 0;
    unsigned char *buf = malloc(cap ? cap : 1);
    if (!buf) {
        perror("reader: malloc");
        return 1;
    }
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned long long i = 0; i < count; i++) {
        rc = shmchan_recv(&ch, buf, cap, &len, 30.0);
        if (rc == SHMCHAN_OTHER_TYPE) {
            fprintf(stderr, "reader: message #%llu has record type %u, not BYTES\n", i,
                    (unsigned)ch.last_type);
            return 3;
        }
        if (rc != SHMCHAN_OK) {
            fprintf(stderr, "reader: recv #%llu: %s (%s)\n", i, shmchan_strerror(rc), ch.why);
            return 1;
        }
        h = checksum_fold(h, buf, len);
    }
    printf("count=%llu checksum=%016llx\n", count, (unsigned long long)h);
    free(buf);
    shmchan_close(&ch);
    return 0;
}
