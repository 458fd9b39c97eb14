/*
 * netbed cache model, see model.h.  Design choices (and why):
 *  - Physical line addresses everywhere, so one line seen by two CPUs is one line.
 *  - Snooping instead of a directory: with the handful of vCPUs a guest has, checking
 *    the other CPUs' private sets on a private miss or an S->M upgrade is cheaper than
 *    keeping a directory coherent, and it only happens off the hit path.
 *  - MESI states live in the private caches (L1 and L2 copies kept in step).
 *    Private hierarchy is non-inclusive: L1 victims go to L2, dirty victims that
 *    leave the private hierarchy are written back into the LLC.
 *  - LLC: shared, filled on every private miss and on dirty write-backs, never
 *    back-invalidates (non-inclusive, like recent x86 server parts).
 *  - c2c transfer (perf c2c "HITM"): a private miss (load or store) that finds the
 *    line Modified in another CPU's private cache.  A store that finds the line in
 *    other private caches invalidates them: one "sent" per invalidated CPU on the
 *    writer, one "received" on each victim, charged to the victim's last mode.
 *  - True LRU per set.  No prefetchers, no instruction fetches, no TLB.
 */
#include "model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const model_event_names[EV_COUNT] = {
    "loads",         "stores",         "l1d_misses",
    "l2_misses",     "llc_misses",     "c2c_transfers",
    "invalidations_sent", "invalidations_received", "instructions", "device_writes",
};
const char *const model_mode_names[MODE_COUNT] = {"kernel", "user"};

enum { ST_I = 0, ST_S = 1, ST_E = 2, ST_M = 3 };

typedef struct {
    uint64_t key;   /* line address << 2 | ST_* state; state ST_I means empty */
    uint64_t stamp; /* LRU: larger is more recent */
    uint64_t sum;   /* digest of the line's bytes when a CPU last touched it here */
} entry;

static inline uint8_t state_of(const entry *e) { return (uint8_t)(e->key & 3); }
static inline uint64_t tag_of(const entry *e) { return e->key >> 2; }
static inline void set_state(entry *e, uint8_t st) { e->key = (e->key & ~3ull) | st; }

typedef struct {
    entry *e;
    uint64_t sets;
    uint32_t ways;
    uint64_t clock;
} cache;

typedef struct {
    uint64_t line;
    entry *entry;
    bool valid, m;
} memo_t;

typedef struct {
    cache l1, l2;
    /* Lines of this CPU's last accesses, known to be in its L1 (m: Modified), in
     * slots the caller picks.  Byte-wise `rep movsb` (the kernel's copies under
     * TCG) alternates between a source and a destination line, 64 times each;
     * these repeats skip the lookup.  Cleared whenever another CPU takes the line
     * away or this CPU evicts it. */
    memo_t memo[MODEL_MEMO_SLOTS];
    int last_mode;
    uint64_t cnt[MODE_COUNT][EV_COUNT];
} cpu_state;

struct model {
    model_config cfg;
    unsigned line_shift;
    bool has_l2;
    cache llc;
    cpu_state *cpu;
};

static bool is_pow2(uint64_t x) { return x && !(x & (x - 1)); }

static const char *geom_error(const cache_geom *g, uint32_t line, const char *name)
{
    static char buf[160];
    if (g->ways == 0) {
        snprintf(buf, sizeof(buf), "%s_assoc must be >= 1", name);
        return buf;
    }
    if (g->size % ((uint64_t)line * g->ways) || !is_pow2(g->size / ((uint64_t)line * g->ways))) {
        snprintf(buf, sizeof(buf),
                 "%s_size / (line * %s_assoc) must be a power of two (got %llu / (%u * %u))",
                 name, name, (unsigned long long)g->size, line, g->ways);
        return buf;
    }
    return NULL;
}

const char *model_config_error(const model_config *cfg)
{
    const char *err;
    if (!is_pow2(cfg->line) || cfg->line < 8) {
        return "line must be a power of two >= 8";
    }
    if (cfg->ncpus < 1) {
        return "need at least one vCPU";
    }
    if ((err = geom_error(&cfg->l1d, cfg->line, "l1d"))) {
        return err;
    }
    if (cfg->l2.size && (err = geom_error(&cfg->l2, cfg->line, "l2"))) {
        return err;
    }
    return geom_error(&cfg->llc, cfg->line, "llc");
}

static void cache_init(cache *c, const cache_geom *g, uint32_t line)
{
    c->ways = g->ways;
    c->sets = g->size ? g->size / ((uint64_t)line * g->ways) : 0;
    c->e = c->sets ? calloc(c->sets * c->ways, sizeof(entry)) : NULL;
    c->clock = 0;
}

static void cache_clear(cache *c)
{
    if (c->e) {
        memset(c->e, 0, c->sets * c->ways * sizeof(entry));
    }
}

static inline entry *set_of(const cache *c, uint64_t line)
{
    return c->e + (line & (c->sets - 1)) * c->ways;
}

static inline entry *lookup(const cache *c, uint64_t line)
{
    entry *s = set_of(c, line);
    uint64_t want = line << 2;
    for (uint32_t w = 0; w < c->ways; w++) {
        if ((s[w].key & ~3ull) == want && (s[w].key & 3)) {
            return &s[w];
        }
    }
    return NULL;
}

static inline void touch(cache *c, entry *e) { e->stamp = ++c->clock; }

/* Insert `line`; returns the evicted entry's copy in *victim (state ST_I if none). */
static entry *insert(cache *c, uint64_t line, uint8_t state, entry *victim)
{
    entry *s = set_of(c, line);
    entry *v = &s[0];
    for (uint32_t w = 0; w < c->ways; w++) {
        if (state_of(&s[w]) == ST_I) {
            v = &s[w];
            break;
        }
        if (s[w].stamp < v->stamp) {
            v = &s[w];
        }
    }
    if (victim) {
        *victim = *v;
    }
    v->key = line << 2 | state;
    touch(c, v);
    return v;
}

model *model_new(const model_config *cfg)
{
    if (model_config_error(cfg)) {
        return NULL;
    }
    model *m = calloc(1, sizeof(*m));
    m->cfg = *cfg;
    m->line_shift = (unsigned)__builtin_ctz(cfg->line);
    m->has_l2 = cfg->l2.size != 0;
    cache_init(&m->llc, &cfg->llc, cfg->line);
    m->cpu = calloc((size_t)cfg->ncpus, sizeof(cpu_state));
    for (int i = 0; i < cfg->ncpus; i++) {
        cache_init(&m->cpu[i].l1, &cfg->l1d, cfg->line);
        cache_init(&m->cpu[i].l2, &cfg->l2, cfg->line);
        m->cpu[i].last_mode = MODE_KERNEL;
    }
    return m;
}

void model_free(model *m)
{
    if (!m) {
        return;
    }
    for (int i = 0; i < m->cfg.ncpus; i++) {
        free(m->cpu[i].l1.e);
        free(m->cpu[i].l2.e);
    }
    free(m->cpu);
    free(m->llc.e);
    free(m);
}

void model_clear_caches(model *m)
{
    cache_clear(&m->llc);
    for (int i = 0; i < m->cfg.ncpus; i++) {
        cache_clear(&m->cpu[i].l1);
        cache_clear(&m->cpu[i].l2);
        for (int j = 0; j < MODEL_MEMO_SLOTS; j++) {
            m->cpu[i].memo[j].valid = false;
        }
    }
}

static uint8_t private_state(const model *m, int cpu, uint64_t line)
{
    const entry *e = lookup(&m->cpu[cpu].l1, line);
    if (!e && m->has_l2) {
        e = lookup(&m->cpu[cpu].l2, line);
    }
    return e ? state_of(e) : ST_I;
}

static void set_private_state(model *m, int cpu, uint64_t line, uint8_t state)
{
    for (int i = 0; i < MODEL_MEMO_SLOTS; i++) {
        if (m->cpu[cpu].memo[i].line == line) {
            m->cpu[cpu].memo[i].valid = false;
        }
    }
    if (state == ST_I) {
        entry *x = lookup(&m->cpu[cpu].l1, line);
        if (x) {
            x->key = 0;
        }
        if (m->has_l2 && (x = lookup(&m->cpu[cpu].l2, line))) {
            x->key = 0;
        }
        return;
    }
    entry *e = lookup(&m->cpu[cpu].l1, line);
    if (e) {
        set_state(e, state);
    }
    if (m->has_l2 && (e = lookup(&m->cpu[cpu].l2, line))) {
        set_state(e, state);
    }
}

static void llc_fill(model *m, uint64_t line, uint64_t sum)
{
    entry *e = lookup(&m->llc, line);
    if (e) {
        touch(&m->llc, e);
    } else {
        e = insert(&m->llc, line, ST_S, NULL);
    }
    e->sum = sum;
}

/* A line leaves CPU `cpu`'s L2: dirty data goes to the LLC unless L1 still holds it. */
static void l2_evicted(model *m, int cpu, const entry *v)
{
    if (state_of(v) == ST_M && !lookup(&m->cpu[cpu].l1, tag_of(v))) {
        llc_fill(m, tag_of(v), v->sum);
    }
}

static void fill_l2(model *m, int cpu, uint64_t line, uint8_t state, uint64_t sum)
{
    entry victim;
    insert(&m->cpu[cpu].l2, line, state, &victim)->sum = sum;
    if (state_of(&victim) != ST_I) {
        l2_evicted(m, cpu, &victim);
    }
}

static void fill_l1(model *m, int cpu, uint64_t line, uint8_t state, uint64_t sum)
{
    entry victim;
    insert(&m->cpu[cpu].l1, line, state, &victim)->sum = sum;
    uint8_t vst = state_of(&victim);
    for (int i = 0; vst != ST_I && i < MODEL_MEMO_SLOTS; i++) {
        if (tag_of(&victim) == m->cpu[cpu].memo[i].line) {
            m->cpu[cpu].memo[i].valid = false;
        }
    }
    if (vst == ST_I) {
        return;
    }
    if (m->has_l2) {
        entry *e2 = lookup(&m->cpu[cpu].l2, tag_of(&victim));
        if (e2) {
            set_state(e2, vst);
            e2->sum = victim.sum;
        } else {
            fill_l2(m, cpu, tag_of(&victim), vst, victim.sum);
        }
    } else if (vst == ST_M) {
        llc_fill(m, tag_of(&victim), victim.sum);
    }
}

static void invalidate_others(model *m, int cpu, int mode, uint64_t line)
{
    for (int o = 0; o < m->cfg.ncpus; o++) {
        if (o != cpu && private_state(m, o, line) != ST_I) {
            set_private_state(m, o, line, ST_I);
            m->cpu[cpu].cnt[mode][EV_INVALIDATIONS_SENT]++;
            m->cpu[o].cnt[m->cpu[o].last_mode][EV_INVALIDATIONS_RECEIVED]++;
        }
    }
}

/*
 * Device writes (DMA) never reach a plugin.  With a digest of the line's bytes per
 * access, a load can tell that the line changed since a CPU last touched it, which
 * only an invisible writer can have done: then every private copy is dropped and,
 * with DDIO (as on Intel server parts), the LLC keeps the new data; without, the
 * LLC copy goes too.  Stores cannot be checked (their own bytes changed the line).
 */
static const entry *recorded(const model *m, int cpu, uint64_t line)
{
    const entry *e = lookup(&m->cpu[cpu].l1, line);
    if (!e && m->has_l2) {
        e = lookup(&m->cpu[cpu].l2, line);
    }
    if (e) {
        return e;
    }
    const entry *clean = NULL;
    for (int o = 0; o < m->cfg.ncpus; o++) {
        if (o == cpu) {
            continue;
        }
        const entry *x = lookup(&m->cpu[o].l1, line);
        if (!x && m->has_l2) {
            x = lookup(&m->cpu[o].l2, line);
        }
        if (x && state_of(x) == ST_M) {
            return x;
        }
        clean = clean ? clean : x;
    }
    return clean ? clean : lookup(&m->llc, line);
}

static void device_write(model *m, int cpu, int mode, uint64_t line, uint64_t sum)
{
    m->cpu[cpu].cnt[mode][EV_DEVICE_WRITES]++;
    for (int o = 0; o < m->cfg.ncpus; o++) {
        set_private_state(m, o, line, ST_I);
    }
    if (m->cfg.ddio) {
        llc_fill(m, line, sum);
    } else {
        entry *l = lookup(&m->llc, line);
        if (l) {
            l->key = 0;
        }
    }
}

static void access_line(model *m, int cpu, int mode, uint64_t line, bool store, uint64_t sum,
                        bool check)
{
    cpu_state *c = &m->cpu[cpu];
    uint64_t *k = c->cnt[mode];

    if (check && !store) {
        const entry *r = recorded(m, cpu, line);
        if (r && r->sum != MODEL_SUM_UNKNOWN && r->sum != sum) {
            device_write(m, cpu, mode, line, sum);
        }
    }
    entry *e = lookup(&c->l1, line);

    if (e) { /* L1 hit: the common, cheap path */
        touch(&c->l1, e);
        if (store && state_of(e) != ST_M) {
            if (state_of(e) == ST_S) {
                invalidate_others(m, cpu, mode, line);
            }
            set_private_state(m, cpu, line, ST_M);
        }
        e->sum = sum;
        return;
    }
    k[EV_L1D_MISSES]++;

    if (m->has_l2 && (e = lookup(&c->l2, line))) {
        touch(&c->l2, e);
        uint8_t st = state_of(e);
        if (store && st != ST_M) {
            if (st == ST_S) {
                invalidate_others(m, cpu, mode, line);
            }
            st = ST_M;
            set_state(e, ST_M);
        }
        e->sum = sum;
        fill_l1(m, cpu, line, st, sum);
        return;
    }
    k[EV_L2_MISSES]++;

    bool other_has = false, other_dirty = false;
    for (int o = 0; o < m->cfg.ncpus; o++) {
        if (o == cpu) {
            continue;
        }
        uint8_t so = private_state(m, o, line);
        if (so == ST_I) {
            continue;
        }
        other_has = true;
        other_dirty |= so == ST_M;
        if (store) {
            set_private_state(m, o, line, ST_I);
            k[EV_INVALIDATIONS_SENT]++;
            m->cpu[o].cnt[m->cpu[o].last_mode][EV_INVALIDATIONS_RECEIVED]++;
        } else if (so != ST_S) {
            set_private_state(m, o, line, ST_S); /* M: data written back to LLC below */
        }
    }
    if (other_dirty) {
        k[EV_C2C_TRANSFERS]++;
    }
    entry *l = lookup(&m->llc, line);
    if (l) {
        touch(&m->llc, l);
    } else {
        if (!other_has) {
            k[EV_LLC_MISSES]++;
        }
        l = insert(&m->llc, line, ST_S, NULL);
    }
    l->sum = sum;
    uint8_t st = store ? ST_M : (other_has ? ST_S : ST_E);
    if (m->has_l2) {
        fill_l2(m, cpu, line, st, sum);
    }
    fill_l1(m, cpu, line, st, sum);
}

void model_access(model *m, int cpu, int mode, uint64_t paddr, unsigned size, bool store,
                  const uint64_t *sums, int slot)
{
    cpu_state *c = &m->cpu[cpu];
    memo_t *mm = &c->memo[slot];
    uint64_t first = paddr >> m->line_shift;
    uint64_t last = (paddr + (size ? size : 1) - 1) >> m->line_shift;
    bool check = sums != NULL;
    uint64_t s0 = check ? sums[0] : 0, s1 = check ? sums[1] : 0;

    c->last_mode = mode;
    c->cnt[mode][store ? EV_STORES : EV_LOADS]++;
    if (first == last && mm->valid && first == mm->line && (mm->m || !store)) {
        /* L1 hit on a line just used: already recent, state unchanged */
        if (store || !check || mm->entry->sum == s0 || mm->entry->sum == MODEL_SUM_UNKNOWN) {
            mm->entry->sum = s0;
            return;
        }
    }
    access_line(m, cpu, mode, first, store, s0, check);
    if (last != first) {
        access_line(m, cpu, mode, last, store, s1, check);
    }
    entry *e = lookup(&c->l1, last);
    mm->line = last;
    mm->valid = e != NULL;
    mm->m = e && state_of(e) == ST_M;
    mm->entry = e;
}

bool model_repeat_access(model *m, int cpu, int mode, bool store, int slot)
{
    cpu_state *c = &m->cpu[cpu];
    memo_t *mm = &c->memo[slot];
    if (!mm->valid || (store && !mm->m)) {
        return false;
    }
    c->last_mode = mode;
    c->cnt[mode][store ? EV_STORES : EV_LOADS]++;
    if (store) {
        mm->entry->sum = MODEL_SUM_UNKNOWN;
    }
    return true;
}

bool model_memo_sum_unknown(const model *m, int cpu, int slot)
{
    const memo_t *mm = &m->cpu[cpu].memo[slot];
    return mm->valid && mm->entry->sum == MODEL_SUM_UNKNOWN;
}

void model_set_memo_sum(model *m, int cpu, int slot, uint64_t sum)
{
    memo_t *mm = &m->cpu[cpu].memo[slot];
    if (mm->valid) {
        mm->entry->sum = sum;
    }
}

void model_count(model *m, int cpu, int mode, int ev, uint64_t n)
{
    m->cpu[cpu].cnt[mode][ev] += n;
}

uint64_t model_counter(const model *m, int cpu, int mode, int ev)
{
    return m->cpu[cpu].cnt[mode][ev];
}

int model_ncpus(const model *m) { return m->cfg.ncpus; }
