/*
 * model_rxbench: the model alone on a receive loop, for its speed (no QEMU): an e1000-like
 * ring of 256 x 2 KiB buffers the "device" rewrites, the checksum (8-byte loads) on CPU 0,
 * a byte-wise copy (rep movsb under TCG: alternating loads and stores) on CPU <copy_cpu>
 * of the packet <qdepth> packets back, accesses driven as plugin.c's vcpu_mem drives them
 * (two memo slots per CPU, digests, the memo digest fix-up).  Prints the loop's CPU
 * seconds and the copying CPU's L2 misses.  Builds against any checkout's model.c (with
 * -DPAYLOAD and payload.c where the payload path exists), so two builds can be compared:
 *
 *   gcc -O2 -flto -DPAYLOAD -o rxb model_rxbench.c model.c payload.c
 *   ./rxb <copy_cpu> <qdepth> <packets> [passes-file [payload-csv]]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "model.h"
#define RING 256
#define BUF 2048
#define PAY 1536
#define BASE 0x800000ull
#define DST 0x3000000ull
static uint64_t ver[1 << 20];
static unsigned long long mline[2][2]; static int mru[2];
static uint64_t dig(uint64_t line) { return (line * 0x9E3779B97F4A7C15ull + ver[line & ((1<<20)-1)] * 0xC2B2AE3D27D4EB4Full) | 1; }
static void acc(model *m, int cpu, uint64_t a, unsigned size, bool st, model_site *s) {
    uint64_t line = a >> 6;
    int slot = line == mline[cpu][0] ? 0 : line == mline[cpu][1] ? 1 : -1;
    if (st) ver[line & ((1<<20)-1)]++;
    if (slot >= 0 && model_repeat_access(m, cpu, MODE_KERNEL, st, slot, s)) { mru[cpu] = slot; return; }
    if (slot < 0) slot = 1 - mru[cpu];
    if (mline[cpu][slot] != ~0ull && model_memo_sum_unknown(m, cpu, slot))
        model_set_memo_sum(m, cpu, slot, dig(mline[cpu][slot]));
    uint64_t sums[2] = {dig(line), dig(line)};
    model_access(m, cpu, MODE_KERNEL, a, size, st, sums, slot, s);
    mline[cpu][slot] = line; mru[cpu] = slot;
}
int main(int argc, char **argv) {
    int copy_cpu = atoi(argv[1]), qdepth = atoi(argv[2]), packets = atoi(argv[3]);
    model_config cfg = {{32 << 10, 8}, {1 << 20, 16}, {8 << 20, 16}, 64, 2, true, 1ull << 32, 1ull << 40};
    model *m = model_new(&cfg);
#ifdef PAYLOAD
    if (argc > 4) { FILE *f = fopen(argv[4], "r"); if (model_read_passes(m, f)) return 2; fclose(f); }
#endif
    model_site *csum = model_site_get(m, 0xffffffff81001000ull, MODE_KERNEL);
    model_site *copy = model_site_get(m, 0xffffffff81002000ull, MODE_KERNEL);
    model_site *drv = model_site_get(m, 0xffffffff81003000ull, MODE_KERNEL);
    memset(mline, 0xff, sizeof(mline));
    struct timespec t0, t1; clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t0);
    for (int p = 0; p < packets; p++) {
        uint64_t b = BASE + (uint64_t)(p % RING) * BUF;
        for (uint64_t a = b; a < b + BUF; a += 64) ver[(a >> 6) & ((1<<20)-1)] += 7; /* device write */
        acc(m, 0, b, 8, false, drv);
        for (uint64_t a = b + 64; a < b + 64 + PAY; a += 8) acc(m, 0, a, 8, false, csum);
        if (p >= qdepth) {
            uint64_t s = BASE + (uint64_t)((p - qdepth) % RING) * BUF + 64;
            uint64_t d = DST + (uint64_t)(p % 8) * PAY;
            for (unsigned i = 0; i < PAY; i++) { acc(m, copy_cpu, s + i, 1, false, copy); acc(m, copy_cpu, d + i, 1, true, copy); }
        }
    }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t1);
    printf("%.3f s, l2 misses cpu%d %llu\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9, copy_cpu,
           (unsigned long long)model_counter(m, copy_cpu, MODE_KERNEL, EV_L2_MISSES));
#ifdef PAYLOAD
    if (argc > 5) { FILE *f = fopen(argv[5], "w"); model_write_payload(m, f, 1); fclose(f); }
#endif
    return 0;
}
