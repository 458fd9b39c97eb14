/*
 * nbbench_pingpong: cache-model validation (netbed).  Two threads, pinned to
 * <cpu-a> and <cpu-b>, take turns incrementing one counter that sits alone in a
 * 64-byte line, <writes> increments in all.  Each turn the line moves from the
 * other thread's cache, so a coherent model reports ~<writes> cache-to-cache
 * transfers in user mode when the CPUs differ and ~0 when they are the same.
 *
 *   nbbench_pingpong <writes> <cpu-a> <cpu-b> [<marker-id>]
 *
 * Waiting spins with PAUSE: under QEMU TCG, PAUSE leaves the execution loop, so with
 * round-robin TCG (thread=single) the other vCPU runs at once instead of after a
 * 100 ms time slice.  On one CPU the waiter also calls sched_yield() so the other
 * thread runs.  With <marker-id> the increments run inside that region.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
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

static struct {
    _Alignas(64) uint64_t counter; /* the ping-pong line: nothing else lives here */
    _Alignas(64) int go;
    int ready;
} sh;

static uint64_t writes;
static int same_cpu;

struct arg {
    int cpu;
    uint64_t parity;
};

static void *worker(void *p)
{
    struct arg *a = p;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(a->cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set)) {
        perror("sched_setaffinity");
        exit(1);
    }
    __atomic_add_fetch(&sh.ready, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&sh.go, __ATOMIC_ACQUIRE)) {
        __builtin_ia32_pause();
        sched_yield();
    }
    for (;;) {
        uint64_t v = __atomic_load_n(&sh.counter, __ATOMIC_ACQUIRE);
        if (v >= writes) {
            return NULL;
        }
        if ((v & 1) == a->parity) {
            __atomic_store_n(&sh.counter, v + 1, __ATOMIC_RELEASE);
            continue;
        }
        __builtin_ia32_pause();
        if (same_cpu) {
            sched_yield();
        }
    }
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: nbbench_pingpong <writes> <cpu-a> <cpu-b> [<marker-id>]\n");
        return 2;
    }
    writes = strtoull(argv[1], NULL, 0);
    struct arg a = {atoi(argv[2]), 0}, b = {atoi(argv[3]), 1};
    same_cpu = a.cpu == b.cpu;
    int marked = argc == 5;
    unsigned id = marked ? (unsigned)strtoul(argv[4], NULL, 0) : 0;

    pthread_t ta, tb;
    if (pthread_create(&ta, NULL, worker, &a) || pthread_create(&tb, NULL, worker, &b)) {
        perror("pthread_create");
        return 1;
    }
    while (__atomic_load_n(&sh.ready, __ATOMIC_ACQUIRE) < 2) {
        sched_yield();
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (marked) {
        nb_marker(KIND_BEGIN, id);
    }
    __atomic_store_n(&sh.go, 1, __ATOMIC_RELEASE);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    if (marked) {
        nb_marker(KIND_END, id);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("nbbench_pingpong writes=%llu cpus=%d,%d elapsed_ns=%lld\n",
           (unsigned long long)writes, a.cpu, b.cpu,
           (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
    return 0;
}
