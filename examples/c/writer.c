/* writer NAME COUNT SEED [MAXLEN] - send COUNT pseudo-random messages to an existing
 * shmchan channel or named queue (posix backend), then print
 * "count=<N> checksum=<16 hex>". It holds write presence while it writes, so Python
 * readers see the stream end when it exits (docs/layout.md 13). Each send waits at most
 * 30 s (for room in the ring, or below the queue's max_items).
 *
 * Messages (see README.md): splitmix64 seeded with SEED; per message,
 * len = next() % (limit + 1) with limit = the channel's max_message, or MAXLEN if
 * given (MAXLEN may exceed max_message: such messages travel in side segments), then
 * ceil(len / 8) further outputs, each contributing its 8 little-endian bytes, the last
 * one truncated to len.
 * Checksum: h = 0xcbf29ce484222325; per message in order,
 * crc = CRC-32(le32(len) || bytes) (zlib crc32), h = ((h ^ crc) * 0x100000001b3) mod 2^64.
 */
#include "shmchan_posix.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t checksum_fold(uint64_t h, const unsigned char *p, uint64_t len) {
    uint32_t len32 = (uint32_t)len; /* le32(len): the host is little-endian */
    uint32_t crc = shmchan_crc32_update(shmchan_crc32_update(0, &len32, 4), p, len);
    return (h ^ crc) * 0x100000001b3ull;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s NAME COUNT SEED [MAXLEN]\n", argv[0]);
        return 2;
    }
    unsigned long long count = strtoull(argv[2], NULL, 0);
    uint64_t seed = strtoull(argv[3], NULL, 0);
    static shmchan_posix ch;
    int rc = shmchan_posix_open(&ch, argv[1], 2.0, 0);
    if (rc != SHMCHAN_OK) {
        fprintf(stderr, "writer: open %s: code %d (%s)\n", argv[1], rc, ch.chan.why);
        return 1;
    }
    rc = shmchan_presence_enter(&ch.chan, SHMCHAN_WRITER);
    if (rc != SHMCHAN_OK) {
        fprintf(stderr, "writer: presence: code %d\n", rc);
        return 1;
    }
    uint64_t max_message = ch.chan.max_record - SHMCHAN_RECORD_HEADER_SIZE;
    uint64_t limit = argc == 5 ? strtoull(argv[4], NULL, 0) : max_message;
    unsigned char *buf = malloc(limit + 8);
    if (!buf) {
        perror("writer: malloc");
        return 1;
    }
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned long long i = 0; i < count; i++) {
        uint64_t len = splitmix64(&seed) % (limit + 1);
        for (uint64_t k = 0; k < len; k += 8) {
            uint64_t w = splitmix64(&seed);
            memcpy(buf + k, &w, 8); /* little-endian bytes; buf has 8 spare bytes */
        }
        do
            rc = shmchan_posix_send(&ch, buf, len, 30.0, 0);
        while (rc == SHMCHAN_INTR);
        if (rc != SHMCHAN_OK) {
            fprintf(stderr, "writer: send #%llu: code %d (%s)\n", i, rc, ch.chan.why);
            return 1;
        }
        h = checksum_fold(h, buf, len);
    }
    printf("count=%llu checksum=%016llx\n", count, (unsigned long long)h);
    free(buf);
    shmchan_posix_close(&ch);
    return 0;
}
