/*
 * netbed cache model: the payload path, see payload.h.  Design choices (and why):
 *  - One 8-byte record per physical line, in chunks of 4096 lines (256 KiB of guest
 *    RAM, 32 KiB of records) allocated when a device write is first noticed in them:
 *    exact (no collisions, nothing evicted), and bounded by the guest RAM that held
 *    device-written lines (1/8 of it at most; a 1 GiB guest: 128 MiB at most, a
 *    receive path touches far less).  Chunks cover physical addresses below 64 GiB;
 *    a device write noticed above is counted as untracked.
 *  - Each chunk carries the window it belongs to: a new window makes every record
 *    stale in O(1), and a chunk is zeroed when first used again (the model counts only
 *    inside windows, so records from an earlier one describe unseen history).
 *  - The lag is counted in device writes the model noticed (each a line) between the
 *    line's checksum read and its copy: the model's own order of events, which under
 *    thread=single is the emulated order (see cachemodel/README.md, "Payload path").
 */
#include "payload.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

const char *const payload_pass_names[PASS_COUNT] = {"other", "checksum", "copy"};
const char *const payload_served_names[SERVED_COUNT] = {"own", "peer_clean", "peer_modified",
                                                        "llc", "memory"};
const char *const payload_relation_names[REL_COUNT] = {"same_cpu", "other_cpu",
                                                       "no_checksum"};
const char *const payload_lag_from_names[LAG_FROM_COUNT] = {"checksum", "first_read"};
const char *const payload_counter_names[PC_COUNT] = {
    "noticed", "unfinished", "closed_by_store", "untracked", "lag_unknown", "pass_ranges"};

#define CHUNK_SHIFT 12
#define CHUNK_LINES (1u << CHUNK_SHIFT)
#define TOP_CHUNKS (1u << 18) /* 2^30 lines of 64 bytes: 64 GiB of physical space */
#define NO_CPU 0xff
#define NO_LAG 0xff

typedef struct {
    uint32_t seq;     /* device writes noticed in the window when the lag started */
    uint8_t want;     /* WANT_* still awaited; 0: no open record */
    uint8_t csum_cpu; /* the CPU of the checksum read, NO_CPU: none yet */
    uint8_t from;     /* enum payload_lag_from of `seq`, NO_LAG: none */
    uint8_t pad;
} prec;

typedef struct {
    uint32_t window;
    prec rec[CHUNK_LINES];
} chunk;

typedef struct {
    uint64_t start, end;
    int pass;
} pass_range;

struct payload {
    chunk **top;
    uint32_t window; /* chunks of another window hold stale records */
    uint32_t seq;    /* device writes noticed in this window */
    uint32_t line_bytes;
    pass_range *ranges;
    size_t nranges;
    payload_stats st;
};

payload *payload_new(uint32_t line_bytes)
{
    payload *p = calloc(1, sizeof(*p));
    p->top = calloc(TOP_CHUNKS, sizeof(*p->top));
    p->window = 1;
    p->line_bytes = line_bytes;
    return p;
}

void payload_free(payload *p)
{
    if (!p) {
        return;
    }
    for (size_t i = 0; i < TOP_CHUNKS; i++) {
        free(p->top[i]);
    }
    free(p->top);
    free(p->ranges);
    free(p);
}

void payload_window(payload *p)
{
    if (++p->window == 0) { /* wrapped: an old chunk could look current */
        for (size_t i = 0; i < TOP_CHUNKS; i++) {
            if (p->top[i]) {
                p->top[i]->window = 0;
            }
        }
        p->window = 1;
    }
    p->seq = 0;
    size_t n = p->st.counter[PC_PASS_RANGES];
    memset(&p->st, 0, sizeof(p->st));
    p->st.counter[PC_PASS_RANGES] = n;
}

/* The line's record in this window, or NULL (none: `create` makes one). */
static prec *record(payload *p, uint64_t line, bool create)
{
    uint64_t ci = line >> CHUNK_SHIFT;
    if (ci >= TOP_CHUNKS) {
        return NULL;
    }
    chunk *c = p->top[ci];
    if (!c || c->window != p->window) {
        if (!create) {
            return NULL;
        }
        if (!c) {
            c = p->top[ci] = malloc(sizeof(*c));
        }
        memset(c->rec, 0, sizeof(c->rec));
        c->window = p->window;
    }
    return &c->rec[line & (CHUNK_LINES - 1)];
}

bool payload_may_have(const payload *p, uint64_t line)
{
    uint64_t ci = line >> CHUNK_SHIFT;
    return ci < TOP_CHUNKS && p->top[ci] && p->top[ci]->window == p->window;
}

unsigned payload_note(payload *p, int cpu, uint64_t line, bool store, int pass, int served,
                      bool noticed)
{
    prec *r;
    if (noticed) {
        r = record(p, line, true);
        if (!r) {
            p->st.counter[PC_UNTRACKED]++;
            return 0;
        }
        p->st.counter[PC_NOTICED]++;
        p->st.counter[PC_UNFINISHED] += (r->want & WANT_COPY) != 0;
        p->st.first_read[pass]++;
        p->seq++;
        *r = (prec){.seq = p->seq, .want = WANT_CHECKSUM | WANT_COPY, .csum_cpu = NO_CPU,
                    .from = pass == PASS_COPY ? NO_LAG : LAG_FIRST_READ};
    } else {
        r = record(p, line, false);
        if (!r || !r->want) {
            return 0;
        }
    }
    if (store) {
        p->st.counter[PC_CLOSED_BY_STORE] += (r->want & WANT_COPY) != 0;
        r->want = 0;
        return 0;
    }
    if (pass == PASS_CHECKSUM && (r->want & WANT_CHECKSUM)) {
        r->want &= ~WANT_CHECKSUM;
        r->csum_cpu = (uint8_t)cpu;
        r->seq = p->seq;
        r->from = LAG_CHECKSUM;
    } else if (pass == PASS_COPY && (r->want & WANT_COPY)) {
        int rel = r->csum_cpu == NO_CPU ? REL_NO_CHECKSUM
                  : r->csum_cpu == cpu  ? REL_SAME
                                        : REL_OTHER;
        p->st.copy_from[rel][served]++;
        if (r->from >= LAG_FROM_COUNT) { /* NO_LAG (a bound: see repeat_payload) */
            p->st.counter[PC_LAG_UNKNOWN]++;
        } else {
            uint64_t kb = (uint64_t)(p->seq - r->seq) * p->line_bytes / 1024;
            p->st.lag_kb[r->from][kb < LAG_BUCKETS ? kb : LAG_BUCKETS - 1]++;
        }
        r->want = 0;
    }
    return r->want;
}

/* ---------------------------------------------------------------- pass ranges */
static int range_order(const void *a, const void *b)
{
    const pass_range *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

const char *payload_read_passes(payload *p, FILE *f)
{
    static char err[200];
    char buf[512];
    pass_range *r = NULL;
    size_t n = 0, cap = 0;
    int lineno = 0;
    while (fgets(buf, sizeof(buf), f)) {
        lineno++;
        unsigned long long a, b;
        char name[32];
        if (buf[0] == '#' || buf[0] == '\n') {
            continue;
        }
        int pass = -1;
        if (sscanf(buf, "%llx %llx %31s", &a, &b, name) == 3) {
            for (int i = 1; i < PASS_COUNT; i++) {
                pass = strcmp(name, payload_pass_names[i]) ? pass : i;
            }
        }
        if (pass < 0 || b <= a) {
            snprintf(err, sizeof(err), "line %d: expected '<start hex> <end hex> "
                     "<checksum|copy>' with start < end", lineno);
            free(r);
            return err;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            r = realloc(r, cap * sizeof(*r));
        }
        r[n++] = (pass_range){a, b, pass};
    }
    qsort(r, n, sizeof(*r), range_order);
    free(p->ranges);
    p->ranges = r;
    p->nranges = n;
    p->st.counter[PC_PASS_RANGES] = n;
    return NULL;
}

size_t payload_pass_ranges(const payload *p) { return p->nranges; }

int payload_pass_of(const payload *p, uint64_t pc)
{
    size_t lo = 0, hi = p->nranges; /* the last range starting at or below pc */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (p->ranges[mid].start <= pc) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo && pc < p->ranges[lo - 1].end ? p->ranges[lo - 1].pass : PASS_OTHER;
}

/* ---------------------------------------------------------------- output */
void payload_stats_copy(const payload *p, payload_stats *out) { *out = p->st; }

void payload_stats_write(const payload_stats *s, FILE *f, unsigned long window)
{
    fprintf(f, "window,kind,name,detail,count\n");
    for (int i = 0; i < PASS_COUNT; i++) {
        fprintf(f, "%lu,first_read,%s,,%" PRIu64 "\n", window, payload_pass_names[i],
                s->first_read[i]);
    }
    for (int r = 0; r < REL_COUNT; r++) {
        for (int v = 0; v < SERVED_COUNT; v++) {
            fprintf(f, "%lu,copy_from,%s,%s,%" PRIu64 "\n", window, payload_served_names[v],
                    payload_relation_names[r], s->copy_from[r][v]);
        }
    }
    for (int from = 0; from < LAG_FROM_COUNT; from++) {
        for (uint32_t kb = 0; kb < LAG_BUCKETS; kb++) {
            if (s->lag_kb[from][kb]) {
                fprintf(f, "%lu,lag_kb,%s,%u,%u\n", window, payload_lag_from_names[from], kb,
                        s->lag_kb[from][kb]);
            }
        }
    }
    for (int i = 0; i < PC_COUNT; i++) {
        fprintf(f, "%lu,records,%s,,%" PRIu64 "\n", window, payload_counter_names[i],
                s->counter[i]);
    }
}
