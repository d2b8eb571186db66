/* writer NAME COUNT SEED [MAXLEN] - send COUNT pseudo-random messages to an
 * existing shmchan channel or named queue (posix backend), then print
 * "count=<N> checksum=<16 hex>". Each send waits at most 30 s (for room in the
 * ring, or below the queue's max_items).
 *
 * Messages (see README.md): splitmix64 seeded with SEED; per message,
 * len = next() % (limit + 1) with limit = max_payload, or MAXLEN if given and
 * smaller, then ceil(len / 8) further outputs, each contributing its 8
 * little-endian bytes, the last one truncated to len.
 * Checksum: h = 0xcbf29ce484222325; per message in order,
 * crc = CRC-32(le32(len) || bytes) (zlib crc32), h = ((h ^ crc) * 0x100000001b3) mod 2^64.
 */
#include "shmchan.h" /* first: it defines _GNU_SOURCE */

#include <stdlib.h>

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t checksum_fold(uint64_t h, const void *p, uint32_t len)
{
    uint32_t crc = shmchan_crc32(0, &len, 4); /* le32(len): the host is little-endian */
    crc = shmchan_crc32(crc, p, len);
    return (h ^ crc) * 0x100000001b3ull;
}

int main(int argc, char **argv)
{
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s NAME COUNT SEED [MAXLEN]\n", argv[0]);
        return 2;
    }
    unsigned long long count = strtoull(argv[2], NULL, 0);
    uint64_t seed = strtoull(argv[3], NULL, 0);
    unsigned long long maxlen = argc == 5 ? strtoull(argv[4], NULL, 0) : ~0ull;
    shmchan ch;
    int rc = shmchan_open(&ch, argv[1], 2.0);
    if (rc != SHMCHAN_OK) {
        fprintf(stderr, "writer: open %s: %s (%s)\n", argv[1], shmchan_strerror(rc), ch.why);
        return 1;
    }
    uint32_t max_payload = shmchan_max_payload(&ch);
    uint64_t limit = maxlen < max_payload ? maxlen : max_payload;
    unsigned char *buf = malloc((size_t)max_payload + 8);
    if (!buf) {
        perror("writer: malloc");
        return 1;
    }
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned long long i = 0; i < count; i++) {
        uint32_t len = (uint32_t)(splitmix64(&seed) % (limit + 1));
        for (uint32_t k = 0; k < len; k += 8) {
            uint64_t w = splitmix64(&seed);
            memcpy(buf + k, &w, 8); /* little-endian bytes; buf has 8 spare bytes */
        }
        rc = shmchan_send(&ch, buf, len, 30.0);
        if (rc != SHMCHAN_OK) {
            fprintf(stderr, "writer: send #%llu: %s (%s)\n", i, shmchan_strerror(rc), ch.why);
            return 1;
        }
        h = checksum_fold(h, buf, len);
    }
    printf("count=%llu checksum=%016llx\n", count, (unsigned long long)h);
    free(buf);
    shmchan_close(&ch);
    return 0;
}
