/*
 * nbbench_stream: cache-model validation and speed workload (netbed).
 *
 *   nbbench_stream <bytes> <passes> [<id>]
 *
 * Reads every 8-byte word of a page-aligned buffer <passes> times.  With <id>, it
 * marks region <id> around all passes and a snapshot <id>+1 after the first pass,
 * so (snapshot - begin) is the cold first pass and (end - snapshot) the later ones.
 * The buffer is written before the region so page faults stay outside it.
 * Prints elapsed_ns (guest clock, the reads only) and loads for benchmarks.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

enum { KIND_BEGIN = 1, KIND_END = 2, KIND_SNAPSHOT = 3 };

/* Same marker as nbmark.c (kept self-contained: the image builds each file alone). */
static void nb_marker(unsigned kind, unsigned id)
{
    static unsigned char *page;
    uint32_t disp = 0x4E000000u | (kind & 0xfu) << 20 | (id & 0xfffffu);
    unsigned char code[8] = {0x0f, 0x1f, 0x80, disp & 0xff, disp >> 8 & 0xff,
                             disp >> 16 & 0xff, disp >> 24, 0xc3};
    if (!page) {
        page = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS,
                    -1, 0);
        if (page == MAP_FAILED) {
            perror("mmap");
            exit(125);
        }
    }
    memcpy(page, code, sizeof(code));
    __builtin___clear_cache((char *)page, (char *)page + sizeof(code));
    ((void (*)(void))page)();
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t pass(const volatile uint64_t *p, size_t words)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < words; i++) {
        sum += p[i];
    }
    return sum;
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: nbbench_stream <bytes> <passes> [<marker-id>]\n");
        return 2;
    }
    size_t bytes = strtoull(argv[1], NULL, 0);
    long passes = strtol(argv[2], NULL, 0);
    int marked = argc == 4;
    unsigned id = marked ? (unsigned)strtoul(argv[3], NULL, 0) : 0;
    if (bytes < 8 || passes < 1) {
        fprintf(stderr, "nbbench_stream: need bytes >= 8 and passes >= 1\n");
        return 2;
    }
    size_t words = bytes / 8;
    uint64_t *buf = aligned_alloc(4096, (bytes + 4095) & ~(size_t)4095);
    if (!buf) {
        perror("aligned_alloc");
        return 1;
    }
    memset(buf, 1, bytes);

    uint64_t sum = 0, t0 = now_ns();
    if (marked) {
        nb_marker(KIND_BEGIN, id);
    }
    sum += pass(buf, words);
    if (marked) {
        nb_marker(KIND_SNAPSHOT, id + 1);
    }
    for (long i = 1; i < passes; i++) {
        sum += pass(buf, words);
    }
    if (marked) {
        nb_marker(KIND_END, id);
    }
    uint64_t t1 = now_ns();
    printf("nbbench_stream bytes=%zu passes=%ld loads=%zu elapsed_ns=%llu sum=%llu\n", bytes,
           passes, words * (size_t)passes, (unsigned long long)(t1 - t0),
           (unsigned long long)sum);
    return 0;
}
