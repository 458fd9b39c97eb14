/*
 * model_trace: drive model.c from a text trace, for tests of the model alone
 * (tests/unit/conftest.py compiles it for tests/unit/test_cachemodel_*.py; no QEMU involved).
 *
 *   model_trace [ncpus=N] [l1d_size=B] [l1d_assoc=W] [l2_size=B] [l2_assoc=W]
 *               [llc_size=B] [llc_assoc=W] [line=B] [sites=PATH] [c2c=PATH]
 *               [user_exact=B] [user_granule=B]  (both 0 unless given)
 *               [passes=PATH] [payload=PATH]  < trace
 *   model_trace [same arguments] replay=PATH [rounds=N]
 *
 * replay= reads a binary trace the plugin recorded from a real window (its trace=
 * argument, model_trace_rec records) into memory, then drives the model with it as
 * vcpu_mem does (two memo slots per CPU keyed by virtual line, the fast path, else
 * model_access with the recorded digests) `rounds` times (default 1), timing only
 * that loop: the model's own cost, without QEMU, the callbacks and the line reads.
 * stderr gets one line: records, fast-path share, ns per access (CPU time).
 *
 * Any access line may start with `@<pc> `: the access is attributed to that
 * instruction address (as the plugin does); sites=/c2c= write the attribution
 * tables (model_write_sites / model_write_c2c, window 1) at the end.  passes= reads
 * the payload passes' address ranges (payload.h) before the trace, payload= writes the
 * last window's payload path statistics (model_write_payload, window 1) at the end.
 *
 * Trace lines:  <cpu> <k|u> <l|s> <paddr> [size [digest]]   one access; with a digest
 *                                   (of the line's bytes after the access) device
 *                                   writes are looked for
 *               S <cpu> <k|u> <l|s> <start> <bytes> <stride> [repeat]  a strided sweep
 *               R <cpu> <k|u> <l|s> <paddr>          repeat of the previous line: the
 *                                   plugin's fast path, else a normal access
 *               P <cpu> <k|u> <l|s> <paddr> <size> <digest> <evicted-digest>
 *                                   one access as plugin.c's vcpu_mem makes it: two memo
 *                                   slots per CPU keyed by line, the fast path when the
 *                                   line is in one, else model_access into the other slot
 *                                   (the one used less recently), first recording
 *                                   <evicted-digest> (the current digest of the line that
 *                                   slot remembered) when repeated stores left it unknown
 *               clear                               empty all caches
 *               window                              a new window for the attribution
 *                                   tables and payload records (the plugin's begin):
 *                                   earlier counts drop out
 * Prints the final counters as CSV: vcpu,mode,event,value.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model.h"

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* replay=: see the top comment.  Returns the process's exit status. */
static int replay(model *m, const model_config *cfg, const char *path, long rounds,
                  bool with_sites)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return 2;
    }
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    size_t n = (size_t)bytes / sizeof(model_trace_rec);
    model_trace_rec *rec = malloc(n * sizeof(*rec) + 1);
    model_site **site = calloc(n + 1, sizeof(*site));
    if (fread(rec, sizeof(*rec), n, f) != n) {
        fprintf(stderr, "%s: short read\n", path);
        return 2;
    }
    fclose(f);
    for (size_t i = 0; with_sites && i < n; i++) { /* the plugin does this at translation */
        site[i] = rec[i].pc ? model_site_get(m, rec[i].pc, rec[i].mode) : NULL;
    }
    unsigned shift = (unsigned)__builtin_ctz(cfg->line);
    uint64_t fast = 0;
    double t0 = cpu_now();
    for (long r = 0; r < rounds; r++) {
        uint64_t vl[64][MODEL_MEMO_SLOTS];
        bool ref[64][MODEL_MEMO_SLOTS] = {{false}}; /* the plugin's line_ref: digests known */
        int mru[64] = {0};
        memset(vl, 0xff, sizeof(vl));
        model_clear_caches(m);
        if (with_sites) {
            model_sites_clear(m);
        }
        model_payload_window(m);
        for (size_t i = 0; i < n; i++) {
            const model_trace_rec *a = &rec[i];
            int cpu = a->cpu;
            uint64_t vline = a->vaddr >> shift;
            bool crosses = (a->vaddr & (cfg->line - 1)) + a->size > cfg->line;
            int hit0 = vline == vl[cpu][0], hit1 = vline == vl[cpu][1];
            int slot = hit0 ? 0 : hit1 ? 1 : -1;
            if (slot >= 0 && !crosses &&
                model_repeat_access(m, cpu, a->mode, a->store, slot, site[i])) {
                mru[cpu] = slot;
                fast++;
                continue;
            }
            if (slot < 0) {
                slot = 1 - mru[cpu];
            }
            if (ref[cpu][slot] && model_memo_sum_unknown(m, cpu, slot)) {
                model_set_memo_sum(m, cpu, slot, a->evicted);
            }
            uint64_t sums[2] = {a->sum0, a->sum1};
            model_access(m, cpu, a->mode, a->paddr, a->size, a->store,
                         (a->flags & TRACE_SUMS) ? sums : NULL, slot, site[i]);
            vl[cpu][slot] = crosses ? UINT64_MAX : vline;
            ref[cpu][slot] = !crosses && (a->flags & TRACE_SUMS);
            mru[cpu] = slot;
        }
    }
    double t = cpu_now() - t0;
    fprintf(stderr, "replay: %zu accesses x %ld rounds, fast path %.1f%%, %.2f ns/access "
            "(%.3f s CPU)\n", n, rounds, 100.0 * (double)fast / ((double)n * (double)rounds),
            t * 1e9 / ((double)n * (double)rounds), t);
    free(rec);
    free(site);
    return 0;
}

int main(int argc, char **argv)
{
    model_config cfg = {{32 << 10, 8}, {1 << 20, 16}, {8 << 20, 16}, 64, 2, true};
    const char *sites_path = NULL, *c2c_path = NULL, *passes_path = NULL, *payload_path = NULL;
    const char *replay_path = NULL;
    long rounds = 1;
    for (int i = 1; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) {
            fprintf(stderr, "bad argument %s\n", argv[i]);
            return 2;
        }
        *eq = '\0';
        unsigned long long v = strtoull(eq + 1, NULL, 0);
        if (!strcmp(argv[i], "sites")) sites_path = eq + 1;
        else if (!strcmp(argv[i], "c2c")) c2c_path = eq + 1;
        else if (!strcmp(argv[i], "passes")) passes_path = eq + 1;
        else if (!strcmp(argv[i], "payload")) payload_path = eq + 1;
        else if (!strcmp(argv[i], "replay")) replay_path = eq + 1;
        else if (!strcmp(argv[i], "rounds")) rounds = (long)v;
        else if (!strcmp(argv[i], "ncpus")) cfg.ncpus = (int)v;
        else if (!strcmp(argv[i], "l1d_size")) cfg.l1d.size = v;
        else if (!strcmp(argv[i], "l1d_assoc")) cfg.l1d.ways = (uint32_t)v;
        else if (!strcmp(argv[i], "l2_size")) cfg.l2.size = v;
        else if (!strcmp(argv[i], "l2_assoc")) cfg.l2.ways = (uint32_t)v;
        else if (!strcmp(argv[i], "llc_size")) cfg.llc.size = v;
        else if (!strcmp(argv[i], "llc_assoc")) cfg.llc.ways = (uint32_t)v;
        else if (!strcmp(argv[i], "line")) cfg.line = (uint32_t)v;
        else if (!strcmp(argv[i], "ddio")) cfg.ddio = v != 0;
        else if (!strcmp(argv[i], "user_exact")) cfg.user_exact_below = v;
        else if (!strcmp(argv[i], "user_granule")) cfg.user_granule = v;
        else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    const char *err = model_config_error(&cfg);
    if (err) {
        fprintf(stderr, "bad config: %s\n", err);
        return 2;
    }
    model *m = model_new(&cfg);
    if (passes_path) {
        FILE *f = fopen(passes_path, "r");
        if (!f) {
            perror(passes_path);
            return 2;
        }
        const char *perr = model_read_passes(m, f);
        fclose(f);
        if (perr) {
            fprintf(stderr, "%s: %s\n", passes_path, perr);
            return 2;
        }
    }
    if (replay_path) {
        int rc = replay(m, &cfg, replay_path, rounds, sites_path != NULL);
        if (rc) {
            return rc;
        }
        goto report;
    }
    /* P lines: per CPU, the lines in the memo slots (plugin.c's recent_lines) */
    unsigned long long memo_line[64][MODEL_MEMO_SLOTS];
    int memo_mru[64] = {0};
    memset(memo_line, 0xff, sizeof(memo_line));
    if (cfg.ncpus > 64) {
        fprintf(stderr, "at most 64 cpus\n");
        return 2;
    }
    char buf[256];
    int lineno = 0;
    while (fgets(buf, sizeof(buf), stdin)) {
        lineno++;
        char *line = buf;
        model_site *site = NULL;
        unsigned long long pc = 0;
        if (line[0] == '@') {
            char *end;
            pc = strtoull(line + 1, &end, 0); /* unsigned: kernel addresses */
            line = end + strspn(end, " ");
        }
        int cpu;
        char mode, rw;
        unsigned long long a, b, c, rep = 1, digest = 0;
        unsigned size = 8;
        int fields;
        if (line[0] == '\n' || line[0] == '#') {
            continue;
        }
        if (line[0] == 'R' && sscanf(line + 1, "%d %c %c %lli", &cpu, &mode, &rw, &a) == 4) {
            int mo = mode == 'k' ? MODE_KERNEL : MODE_USER;
            site = buf[0] == '@' ? model_site_get(m, pc, mo) : NULL;
            if (!model_repeat_access(m, cpu, mo, rw == 's', 0, site)) {
                model_access(m, cpu, mo, a, 8, rw == 's', NULL, 0, site);
            }
        } else if (line[0] == 'P' &&
                   sscanf(line + 1, "%d %c %c %lli %u %lli %lli", &cpu, &mode, &rw, &a, &size,
                          &digest, &b) == 7) {
            if (cpu < 0 || cpu >= cfg.ncpus) {
                fprintf(stderr, "line %d: cpu %d out of range\n", lineno, cpu);
                return 2;
            }
            int mo = mode == 'k' ? MODE_KERNEL : MODE_USER;
            site = buf[0] == '@' ? model_site_get(m, pc, mo) : NULL;
            unsigned long long vline = a / cfg.line;
            bool crosses = (a & (cfg.line - 1)) + size > cfg.line;
            int slot = vline == memo_line[cpu][0] ? 0 : vline == memo_line[cpu][1] ? 1 : -1;
            if (slot >= 0 && !crosses && model_repeat_access(m, cpu, mo, rw == 's', slot, site)) {
                memo_mru[cpu] = slot;
                continue;
            }
            if (slot < 0) {
                slot = 1 - memo_mru[cpu];
            }
            if (memo_line[cpu][slot] != ~0ull && model_memo_sum_unknown(m, cpu, slot)) {
                model_set_memo_sum(m, cpu, slot, b);
            }
            uint64_t sums[2] = {digest, digest};
            model_access(m, cpu, mo, a, size, rw == 's', sums, slot, site);
            memo_line[cpu][slot] = crosses ? ~0ull : vline;
            memo_mru[cpu] = slot;
        } else if (!strncmp(line, "clear", 5)) {
            model_clear_caches(m);
            memset(memo_line, 0xff, sizeof(memo_line));
        } else if (!strncmp(line, "window", 6)) {
            model_sites_clear(m);
            model_payload_window(m);
        } else if (line[0] == 'S' &&
                   sscanf(line + 1, "%d %c %c %lli %lli %lli %lli", &cpu, &mode, &rw, &a, &b, &c,
                          &rep) >= 6) {
            int mo = mode == 'k' ? MODE_KERNEL : MODE_USER;
            site = buf[0] == '@' ? model_site_get(m, pc, mo) : NULL;
            for (unsigned long long r = 0; r < rep; r++) {
                for (unsigned long long off = 0; off < b; off += c) {
                    model_access(m, cpu, mo, a + off, 8, rw == 's', NULL, 0, site);
                }
            }
        } else if ((fields = sscanf(line, "%d %c %c %lli %u %lli", &cpu, &mode, &rw, &a, &size,
                                    &digest)) >= 4) {
            uint64_t sums[2] = {digest, digest};
            if (cpu < 0 || cpu >= cfg.ncpus) {
                fprintf(stderr, "line %d: cpu %d out of range\n", lineno, cpu);
                return 2;
            }
            int mo = mode == 'k' ? MODE_KERNEL : MODE_USER;
            site = buf[0] == '@' ? model_site_get(m, pc, mo) : NULL;
            model_access(m, cpu, mo, a, size, rw == 's', fields == 6 ? sums : NULL, 0, site);
        } else {
            fprintf(stderr, "line %d: cannot parse: %s", lineno, line);
            return 2;
        }
    }
report:
    printf("vcpu,mode,event,value\n");
    for (int cpu = 0; cpu < cfg.ncpus; cpu++) {
        for (int mo = 0; mo < MODE_COUNT; mo++) {
            for (int ev = 0; ev < EV_COUNT; ev++) {
                printf("%d,%s,%s,%llu\n", cpu, model_mode_names[mo], model_event_names[ev],
                       (unsigned long long)model_counter(m, cpu, mo, ev));
            }
        }
    }
    for (int i = 0; i < 3; i++) {
        const char *path = i == 2 ? payload_path : i ? c2c_path : sites_path;
        if (!path) {
            continue;
        }
        FILE *f = fopen(path, "w");
        if (!f) {
            perror(path);
            return 2;
        }
        (i == 2 ? model_write_payload : i ? model_write_c2c : model_write_sites)(m, f, 1);
        fclose(f);
    }
    model_free(m);
    return 0;
}
