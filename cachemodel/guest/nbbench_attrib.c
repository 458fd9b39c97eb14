/*
 * nbbench_attrib: known code for the cache model's attribution test (netbed).
 * Built only for micro guests (testbed/vm/cachemodel.py), static and non-PIE at an
 * address of its own, so its user addresses resolve to these functions.
 *
 *   nbbench_attrib pingpong <writes> <cpu-a> <cpu-b> <marker-id>
 *       ping_side() on cpu-a and pong_side() on cpu-b take turns incrementing one
 *       counter alone in a 64-byte line: every turn is a cache-to-cache transfer
 *       whose two sides are these two functions.
 *   nbbench_attrib pipe <bytes> <marker-id>
 *       pipe_loop() writes 16 KiB chunks into a pipe and reads each back: the
 *       kernel's copy from and to user space does the work.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

enum { KIND_BEGIN = 1, KIND_END = 2 };

/* Same marker as images/tools/nbmark.c. */
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

static struct {
    _Alignas(64) uint64_t counter; /* the ping-pong line */
    _Alignas(64) int go;
    int ready;
} sh;
static uint64_t writes;

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set)) {
        perror("sched_setaffinity");
        exit(1);
    }
}

static void wait_go(void)
{
    __atomic_add_fetch(&sh.ready, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&sh.go, __ATOMIC_ACQUIRE)) {
        __builtin_ia32_pause();
        sched_yield();
    }
}

/* Increments on even values.  noinline: each side is its own symbol. */
__attribute__((noinline)) static void *ping_side(void *p)
{
    pin(*(int *)p);
    wait_go();
    for (;;) {
        uint64_t v = __atomic_load_n(&sh.counter, __ATOMIC_ACQUIRE);
        if (v >= writes) {
            return NULL;
        }
        if (v % 2 == 0) {
            __atomic_store_n(&sh.counter, v + 1, __ATOMIC_RELEASE);
        } else {
            __builtin_ia32_pause();
        }
    }
}

/* Increments on odd values. */
__attribute__((noinline)) static void *pong_side(void *p)
{
    pin(*(int *)p);
    wait_go();
    for (;;) {
        uint64_t v = __atomic_load_n(&sh.counter, __ATOMIC_ACQUIRE);
        if (v >= writes) {
            return NULL;
        }
        if (v % 2 == 1) {
            __atomic_store_n(&sh.counter, v + 1, __ATOMIC_RELEASE);
        } else {
            __builtin_ia32_pause();
        }
    }
}

static int pingpong(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: nbbench_attrib pingpong <writes> <cpu-a> <cpu-b> <marker>\n");
        return 2;
    }
    writes = strtoull(argv[2], NULL, 0);
    int cpus[2] = {atoi(argv[3]), atoi(argv[4])};
    unsigned id = (unsigned)atoi(argv[5]);
    pthread_t t[2];
    pthread_create(&t[0], NULL, ping_side, &cpus[0]);
    pthread_create(&t[1], NULL, pong_side, &cpus[1]);
    while (__atomic_load_n(&sh.ready, __ATOMIC_SEQ_CST) < 2) {
        sched_yield();
    }
    nb_marker(KIND_BEGIN, id);
    __atomic_store_n(&sh.go, 1, __ATOMIC_RELEASE);
    pthread_join(t[0], NULL);
    pthread_join(t[1], NULL);
    nb_marker(KIND_END, id);
    printf("pingpong %llu writes done\n", (unsigned long long)sh.counter);
    return 0;
}

#define CHUNK (16 << 10)
static char src[CHUNK], dst[CHUNK];

__attribute__((noinline)) static int pipe_loop(int fd[2], long bytes)
{
    for (long done = 0; done < bytes; done += CHUNK) {
        if (write(fd[1], src, CHUNK) != CHUNK || read(fd[0], dst, CHUNK) != CHUNK) {
            perror("pipe");
            return 1;
        }
    }
    return 0;
}

static int pipe_bench(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: nbbench_attrib pipe <bytes> <marker>\n");
        return 2;
    }
    long bytes = atol(argv[2]);
    unsigned id = (unsigned)atoi(argv[3]);
    int fd[2];
    if (pipe(fd)) {
        perror("pipe");
        return 1;
    }
    memset(src, 0x5a, sizeof(src));
    pipe_loop(fd, CHUNK); /* fault the buffers in outside the region */
    nb_marker(KIND_BEGIN, id);
    int rc = pipe_loop(fd, bytes);
    nb_marker(KIND_END, id);
    printf("pipe %ld bytes done\n", bytes);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "pingpong")) {
        return pingpong(argc, argv);
    }
    if (argc >= 2 && !strcmp(argv[1], "pipe")) {
        return pipe_bench(argc, argv);
    }
    fprintf(stderr, "usage: nbbench_attrib pingpong|pipe ...\n");
    return 2;
}
