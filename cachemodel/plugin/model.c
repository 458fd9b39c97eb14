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
#include "payload.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

const char *const model_event_names[EV_COUNT] = {
    "loads",         "stores",         "l1d_misses",
    "l2_misses",     "llc_misses",     "c2c_transfers",
    "invalidations_sent", "invalidations_received", "instructions", "device_writes",
};
const char *const model_mode_names[MODE_COUNT] = {"kernel", "user"};

const char *const model_data_names[DATA_COUNT] = {"cpu", "device"};

enum { ST_I = 0, ST_S = 1, ST_E = 2, ST_M = 3 };
_Static_assert(EV_STORES == EV_LOADS + 1, "model_repeat_access computes the event");
#define KEY_DEV 4ull /* line last written by a device (DMA), not by a CPU */

/*
 * A cache is kept as parallel arrays (one element per way, a set's ways adjacent),
 * not as an array of entry records: a lookup scans only the keys of one set, 128
 * bytes for 16 ways instead of 512, and on a streaming load the model makes a dozen
 * lookups in sets nobody touched lately, so its cost was the host's cache misses on
 * those scans (perf: the key loads of `lookup` and the LRU stamps of `insert` were
 * the hottest instructions).  LRU order is a rank per way (0: most recent), one byte,
 * so choosing a victim reads 16 bytes where 64-bit stamps took 128; a line's digest
 * and writer sit together (written together on every fill).  An entry is named by
 * its index; `entry` is only a copy of a line's data in transit between levels.
 */
typedef struct {
    uint64_t key;       /* line << 3 | dev << 2 | ST_* state; 0 (ST_I) means empty */
    uint64_t sum;       /* digest of the line's bytes when a CPU last touched it here */
    model_site *writer; /* attribution: the store that made this copy Modified */
} entry;

#define NONE SIZE_MAX /* no entry */

typedef struct {
    uint64_t sum;
    model_site *writer;
} line_data;

#define MAX_WAYS 255 /* ranks are bytes */
typedef uint8_t rank_vec __attribute__((vector_size(16)));

typedef struct {
    uint64_t *key;       /* as entry.key; an empty way is 0 */
    line_data *data;     /* as entry.sum and entry.writer */
    /*
     * LRU rank of each way in its set, 0 the most recent: a permutation per set.  Sets
     * are RANK_STRIDE-aligned rows (padding 0xff), so a touch is a few vector ops.
     * Victim choice matches 64-bit stamps exactly: a valid way was touched when filled,
     * so among valid ways the ranks are the order of their last touches.
     */
    uint8_t *rank;
    /*
     * Per way, a byte of the tag of the line last inserted there (rows as `rank`): a
     * lookup compares a whole row with the wanted line's byte at once and reads keys
     * only where it matches, instead of every key of the set (a 16-way miss scanned 16
     * keys, and a private miss makes half a dozen of them: most of the model's
     * instructions on a streaming load).  Only `insert` gives a way a new tag, and it
     * writes the byte, so a valid way's byte is always its key's; a stale byte of an
     * emptied way costs one key compare, nothing else.  The result is the first
     * matching way, as the full scan's.
     */
    uint8_t *hint;
    uint64_t sets;
    uint32_t ways, rank_stride;
    int ways_shift; /* log2(ways), or -1 when ways is not a power of two */
    int set_bits;   /* log2(sets) */
} cache;

static inline uint8_t key_state(uint64_t key) { return (uint8_t)(key & 3); }
static inline int key_dev(uint64_t key) { return (key & KEY_DEV) ? DATA_DEVICE : DATA_CPU; }
static inline uint64_t key_tag(uint64_t key) { return key >> 3; }
static inline uint8_t state_at(const cache *c, size_t i) { return key_state(c->key[i]); }
static inline int dev_at(const cache *c, size_t i) { return key_dev(c->key[i]); }
static inline void set_state(cache *c, size_t i, uint8_t st)
{
    c->key[i] = (c->key[i] & ~3ull) | st;
}
static inline void set_dev(cache *c, size_t i, int data)
{
    c->key[i] = (c->key[i] & ~KEY_DEV) | (data == DATA_DEVICE ? KEY_DEV : 0);
}
static inline entry entry_at(const cache *c, size_t i)
{
    return (entry){c->key[i], c->data[i].sum, c->data[i].writer};
}
/* What a line carries between levels: digest, device flag, writer. */
static inline void copy_data(cache *c, size_t i, const entry *from)
{
    c->key[i] = (c->key[i] & ~KEY_DEV) | (from->key & KEY_DEV);
    c->data[i] = (line_data){from->sum, from->writer};
}

typedef struct {
    uint64_t line;
    size_t idx; /* its entry in this CPU's L1 */
    bool valid, m;
    int data; /* the line's data kind, kept here so repeats need not read the entry */
    /* passes this line's payload record may wait for (payload_access): a repeated load
     * by one of them looks at the record (repeat_payload) */
    unsigned want;
    /*
     * Repeats counted here for one site counter (psite->cnt[pidx]), not yet added to it:
     * a copy's repeats each add to the same counter, and reading and writing the site
     * on every one was most of what attribution cost (perf: the site's epoch and counter
     * were the fast path's hottest spots, attribution +30-45 % on the pipe).  Added
     * when the repeat's counter changes (memo_flush), and for every memo before the
     * sites are read or a window starts (sites_flush), so every table is as before.
     * psite's epoch was the current one when it was set, and a window's start flushes
     * and forgets it, so adding needs no site_touch.
     */
    model_site *psite;
    uint32_t pidx;
    uint64_t pn;
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

/* Where one CPU holds a line privately: its L1 or L2 entry (c NULL: nowhere). */
typedef struct {
    cache *c;
    size_t i;
} held;

/* c2c line table: one record per (line, requesting site and CPU, owner site and CPU). */
typedef struct {
    uint64_t line;
    model_site *req, *own;
    int req_cpu, own_cpu;
    uint64_t n;
} c2c_rec;

/* Open-addressing index (slot value: record number + 1, 0 = empty). */
typedef struct {
    uint32_t *slot;
    size_t cap; /* power of two */
} hindex;

struct model {
    model_config cfg;
    unsigned line_shift;
    bool has_l2;
    cache llc;
    cpu_state *cpu;
    held *others;            /* scratch for access_line: each CPU's copy of one line */
    model_site **sites;
    size_t nsites, sites_cap;
    hindex site_idx;
    uint32_t epoch;          /* the current window's; sites of another hold stale counts */
    model_site **touched;    /* the sites counted in the current window */
    size_t ntouched, touched_cap;
    c2c_rec *c2c;
    size_t nc2c, c2c_cap;
    hindex c2c_idx;
    payload *pay;            /* payload path records (payload.h) */
    int served;              /* enum payload_served of access_line's last line */
    bool noticed;            /* access_line's last line: a device write noticed */
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
    if (cfg->l1d.ways > MAX_WAYS || cfg->l2.ways > MAX_WAYS || cfg->llc.ways > MAX_WAYS) {
        return "associativity (l1d_assoc, l2_assoc, llc_assoc) must be at most 255";
    }
    if (cfg->user_granule && !is_pow2(cfg->user_granule)) {
        return "user_granule must be 0 or a power of two";
    }
    if ((err = geom_error(&cfg->l1d, cfg->line, "l1d"))) {
        return err;
    }
    if (cfg->l2.size && (err = geom_error(&cfg->l2, cfg->line, "l2"))) {
        return err;
    }
    return geom_error(&cfg->llc, cfg->line, "llc");
}

static void rank_reset(cache *c)
{
    for (uint64_t set = 0; set < c->sets; set++) {
        uint8_t *r = c->rank + set * c->rank_stride;
        for (uint32_t w = 0; w < c->rank_stride; w++) {
            r[w] = w < c->ways ? (uint8_t)w : 0xff;
        }
    }
}

static void cache_init(cache *c, const cache_geom *g, uint32_t line)
{
    c->ways = g->ways;
    c->sets = g->size ? g->size / ((uint64_t)line * g->ways) : 0;
    c->ways_shift = is_pow2(g->ways) ? __builtin_ctz(g->ways) : -1;
    c->rank_stride = (g->ways + 15) & ~15u;
    size_t n = c->sets * c->ways;
    c->key = n ? calloc(n, sizeof(*c->key)) : NULL;
    c->data = n ? calloc(n, sizeof(*c->data)) : NULL;
    c->rank = n ? aligned_alloc(16, c->sets * c->rank_stride) : NULL;
    c->hint = n ? aligned_alloc(16, c->sets * c->rank_stride) : NULL;
    c->set_bits = c->sets ? __builtin_ctzll(c->sets) : 0;
    if (c->rank) {
        rank_reset(c);
        memset(c->hint, 0, c->sets * c->rank_stride);
    }
}

static void cache_destroy(cache *c)
{
    free(c->key);
    free(c->data);
    free(c->rank);
    free(c->hint);
}

static void cache_clear(cache *c)
{
    size_t n = c->sets * c->ways;
    if (n) {
        memset(c->key, 0, n * sizeof(*c->key));
        memset(c->data, 0, n * sizeof(*c->data));
        rank_reset(c);
    }
}

static inline size_t set_base(const cache *c, uint64_t line)
{
    return (size_t)(line & (c->sets - 1)) * c->ways;
}

/* The byte of `line`'s tag kept in `hint` (bits above the set index, folded). */
static inline uint8_t tag_hint(const cache *c, uint64_t line)
{
    uint64_t t = line >> c->set_bits;
    return (uint8_t)(t ^ (t >> 8) ^ (t >> 16) ^ (t >> 24));
}

/* Bit w set: byte w of the 16 at `row` equals `b` (w < 16). */
static inline unsigned bytes_equal(const uint8_t *row, uint8_t b)
{
#ifdef __SSE2__
    return (unsigned)_mm_movemask_epi8(
        _mm_cmpeq_epi8(_mm_load_si128((const __m128i *)row), _mm_set1_epi8((char)b)));
#else
    unsigned mask = 0;
    for (unsigned w = 0; w < 16; w++) {
        mask |= (unsigned)(row[w] == b) << w;
    }
    return mask;
#endif
}

static inline size_t lookup(const cache *c, uint64_t line)
{
    size_t set = (size_t)(line & (c->sets - 1));
    size_t base = set * c->ways;
    const uint64_t *k = c->key + base;
    const uint8_t *h = c->hint + set * c->rank_stride;
    uint8_t want_h = tag_hint(c, line);
    uint64_t want = line << 3;
    for (uint32_t x = 0; x < c->ways; x += 16) {
        unsigned mask = bytes_equal(h + x, want_h);
        if (c->ways - x < 16) {
            mask &= (1u << (c->ways - x)) - 1; /* the row's padding */
        }
        while (mask) {
            uint32_t w = x + (uint32_t)__builtin_ctz(mask);
            if ((k[w] & ~7ull) == want && (k[w] & 3)) {
                return base + w;
            }
            mask &= mask - 1;
        }
    }
    return NONE;
}

static inline uint8_t *rank_row(const cache *c, size_t i, uint32_t *way)
{
    size_t set = c->ways_shift >= 0 ? i >> c->ways_shift : i / c->ways;
    *way = (uint32_t)(i - set * c->ways);
    return c->rank + set * c->rank_stride;
}

/* Make way i the most recent of its set: ranks below its own move up by one. */
static inline void touch(cache *c, size_t i)
{
    uint32_t w;
    uint8_t *r = rank_row(c, i, &w);
    uint8_t old = r[w];
    if (old == 0) {
        return;
    }
    rank_vec lim = {0};
    lim += old;
    for (uint32_t x = 0; x < c->rank_stride; x += 16) {
        rank_vec v = *(rank_vec *)(r + x);
        *(rank_vec *)(r + x) = v - (rank_vec)(v < lim); /* true is -1: adds one */
    }
    r[w] = 0;
}

/* Insert `line` with `data`'s digest, device flag and writer; the evicted entry's
 * copy goes to *victim (state ST_I if none).  Returns the new entry.  The victim is
 * the first empty way, else the least recently used one. */
static size_t insert(cache *c, uint64_t line, uint8_t state, const entry *data, entry *victim)
{
    size_t base = set_base(c, line), v = NONE;
    for (uint32_t w = 0; w < c->ways; w++) {
        if (key_state(c->key[base + w]) == ST_I) {
            v = base + w;
            break;
        }
    }
    if (v == NONE) {
        uint32_t w0;
        const uint8_t *r = rank_row(c, base, &w0);
        uint8_t oldest = (uint8_t)(c->ways - 1);
        /* ranks are a permutation of 0..ways-1 (padding 0xff): exactly one match */
        for (uint32_t x = 0; v == NONE && x < c->ways; x += 16) {
            unsigned mask = bytes_equal(r + x, oldest);
            if (mask) {
                v = base + x + (uint32_t)__builtin_ctz(mask);
            }
        }
    }
    if (victim) {
        *victim = entry_at(c, v);
    }
    uint32_t hw;
    uint8_t *hrow = c->hint + (rank_row(c, v, &hw) - c->rank);
    hrow[hw] = tag_hint(c, line);
    c->key[v] = line << 3 | state;
    copy_data(c, v, data);
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
    m->others = calloc((size_t)cfg->ncpus, sizeof(held));
    m->epoch = 1; /* new sites hold 0: stale, so the first count lists them */
    m->pay = payload_new(cfg->line);
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
        cache_destroy(&m->cpu[i].l1);
        cache_destroy(&m->cpu[i].l2);
    }
    for (size_t i = 0; i < m->nsites; i++) {
        free(m->sites[i]);
    }
    free(m->sites);
    free(m->touched);
    free(m->site_idx.slot);
    free(m->c2c);
    free(m->c2c_idx.slot);
    free(m->cpu);
    free(m->others);
    cache_destroy(&m->llc);
    payload_free(m->pay);
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

/* ---------------------------------------------------------------- attribution */
static inline uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

/* Find (or the empty slot for) a key; `eq(i)` tells whether record i matches. */
#define HINDEX_FIND(ix, hash, eq_expr, out_slot)                                            \
    do {                                                                                  \
        size_t _i = (size_t)(hash) & ((ix)->cap - 1);                                     \
        for (;;) {                                                                        \
            uint32_t _v = (ix)->slot[_i];                                                 \
            if (_v == 0) {                                                                \
                break;                                                                    \
            }                                                                             \
            size_t rec = _v - 1;                                                          \
            (void)rec;                                                                    \
            if (eq_expr) {                                                                \
                break;                                                                    \
            }                                                                             \
            _i = (_i + 1) & ((ix)->cap - 1);                                              \
        }                                                                                 \
        (out_slot) = _i;                                                                  \
    } while (0)

static uint64_t site_hash(const model_site *s) { return mix(s->pc * 2 + (uint64_t)s->mode); }

static uint64_t c2c_hash(const c2c_rec *r)
{
    return mix(r->line ^ mix((uint64_t)(uintptr_t)r->req + (uint64_t)r->req_cpu * 977) ^
               mix((uint64_t)(uintptr_t)r->own * 31 + (uint64_t)r->own_cpu));
}

static void site_reindex(model *m)
{
    free(m->site_idx.slot);
    m->site_idx.cap = m->site_idx.cap ? m->site_idx.cap * 2 : 1024;
    m->site_idx.slot = calloc(m->site_idx.cap, sizeof(uint32_t));
    for (size_t i = 0; i < m->nsites; i++) {
        size_t at;
        HINDEX_FIND(&m->site_idx, site_hash(m->sites[i]), false, at);
        m->site_idx.slot[at] = (uint32_t)(i + 1);
    }
}

/*
 * Code at randomized addresses (ASLR: PIE executables, shared libraries, in user
 * mode) has new pcs in every process, so one site per pc grew without bound: 3.7 M
 * sites (~1.5 GB) after ~80 s of a matrix run, and the receiver's QEMU at 9 GB after
 * one boot's 18 windows (2026-11-30). Such pcs name no function anyway (the plugin
 * cannot tell processes apart); analysis labels them by address range
 * (testbed.formats.symbols.USER_RANGES, whose bounds are multiples of the granule),
 * so charging them to their block's start keeps every label. Below user_exact_below
 * (our static, non-PIE tools) pcs stay exact.
 */
static uint64_t model_site_pc(const model *m, uint64_t pc, int mode)
{
    uint64_t floor = m->cfg.user_exact_below, granule = m->cfg.user_granule;
    if (mode != MODE_USER || !granule || pc < floor) {
        return pc;
    }
    uint64_t block = pc & ~(granule - 1);
    return block < floor ? floor : block;
}

static void site_classify(const model *m, model_site *s)
{
    s->pass = (uint8_t)payload_pass_of(m->pay, s->pc);
    s->pass_bit = s->pass == PASS_OTHER ? 0 : (uint8_t)(1u << s->pass);
}

const char *model_read_passes(model *m, FILE *f)
{
    const char *err = payload_read_passes(m->pay, f);
    for (size_t i = 0; !err && i < m->nsites; i++) {
        site_classify(m, m->sites[i]);
    }
    return err;
}

void model_payload_window(model *m) { payload_window(m->pay); }

model_site *model_site_get(model *m, uint64_t pc, int mode)
{
    pc = model_site_pc(m, pc, mode);
    if ((m->nsites + 1) * 2 > m->site_idx.cap) {
        site_reindex(m);
    }
    size_t at;
    HINDEX_FIND(&m->site_idx, mix(pc * 2 + (uint64_t)mode),
                m->sites[rec]->pc == pc && m->sites[rec]->mode == mode, at);
    if (m->site_idx.slot[at]) {
        return m->sites[m->site_idx.slot[at] - 1];
    }
    if (m->nsites == m->sites_cap) {
        m->sites_cap = m->sites_cap ? m->sites_cap * 2 : 1024;
        m->sites = realloc(m->sites, m->sites_cap * sizeof(*m->sites));
    }
    model_site *s =
        calloc(1, sizeof(*s) + (size_t)m->cfg.ncpus * DATA_COUNT * EV_COUNT * sizeof(uint64_t));
    s->pc = pc;
    s->mode = mode;
    s->index = (uint32_t)m->nsites;
    site_classify(m, s);
    m->sites[m->nsites++] = s;
    m->site_idx.slot[at] = (uint32_t)m->nsites;
    return s;
}

/* First count of `s` in this window: zero what it holds from an earlier one, list it. */
static void site_touch(model *m, model_site *s)
{
    memset(s->cnt, 0, (size_t)m->cfg.ncpus * DATA_COUNT * EV_COUNT * sizeof(uint64_t));
    s->epoch = m->epoch;
    if (m->ntouched == m->touched_cap) {
        m->touched_cap = m->touched_cap ? m->touched_cap * 2 : 1024;
        m->touched = realloc(m->touched, m->touched_cap * sizeof(*m->touched));
    }
    m->touched[m->ntouched++] = s;
}

static inline void site_add(model *m, model_site *s, int cpu, int data, int ev)
{
    if (s) {
        if (__builtin_expect(s->epoch != m->epoch, 0)) {
            site_touch(m, s);
        }
        s->cnt[((size_t)cpu * DATA_COUNT + (size_t)data) * EV_COUNT + (size_t)ev]++;
    }
}

static void c2c_reindex(model *m)
{
    free(m->c2c_idx.slot);
    m->c2c_idx.cap = m->c2c_idx.cap ? m->c2c_idx.cap * 2 : 1024;
    m->c2c_idx.slot = calloc(m->c2c_idx.cap, sizeof(uint32_t));
    for (size_t i = 0; i < m->nc2c; i++) {
        size_t at;
        HINDEX_FIND(&m->c2c_idx, c2c_hash(&m->c2c[i]), false, at);
        m->c2c_idx.slot[at] = (uint32_t)(i + 1);
    }
}

static void c2c_record(model *m, uint64_t line, model_site *req, int req_cpu, model_site *own,
                       int own_cpu)
{
    if ((m->nc2c + 1) * 2 > m->c2c_idx.cap) {
        c2c_reindex(m);
    }
    c2c_rec key = {line, req, own, req_cpu, own_cpu, 0};
    size_t at;
    HINDEX_FIND(&m->c2c_idx, c2c_hash(&key),
                m->c2c[rec].line == line && m->c2c[rec].req == req &&
                    m->c2c[rec].own == own && m->c2c[rec].req_cpu == req_cpu &&
                    m->c2c[rec].own_cpu == own_cpu,
                at);
    if (m->c2c_idx.slot[at]) {
        m->c2c[m->c2c_idx.slot[at] - 1].n++;
        return;
    }
    if (m->nc2c == m->c2c_cap) {
        m->c2c_cap = m->c2c_cap ? m->c2c_cap * 2 : 1024;
        m->c2c = realloc(m->c2c, m->c2c_cap * sizeof(*m->c2c));
    }
    key.n = 1;
    m->c2c[m->nc2c++] = key;
    m->c2c_idx.slot[at] = (uint32_t)m->nc2c;
}

static inline void memo_flush(memo_t *mm)
{
    if (mm->pn) {
        mm->psite->cnt[mm->pidx] += mm->pn;
        mm->pn = 0;
    }
}

/* Every memo's pending repeats into their sites (memo_t.psite); forgotten with `forget`. */
static void sites_flush(model *m, bool forget)
{
    for (int cpu = 0; cpu < m->cfg.ncpus; cpu++) {
        for (int i = 0; i < MODEL_MEMO_SLOTS; i++) {
            memo_t *mm = &m->cpu[cpu].memo[i];
            memo_flush(mm);
            if (forget) {
                mm->psite = NULL;
            }
        }
    }
}

void model_sites_clear(model *m)
{
    sites_flush(m, true); /* the old window's: its sites are zeroed when next counted */
    /* O(1) for the sites (a full memset grew to ~200 ms through a boot): each is
     * zeroed when first counted in the new window (site_touch) */
    if (++m->epoch == 0) {
        /* wrapped: a site last counted 2^32 windows ago would look current */
        for (size_t i = 0; i < m->nsites; i++) {
            m->sites[i]->epoch = 0;
        }
        m->epoch = 1;
    }
    m->ntouched = 0;
    m->nc2c = 0;
    if (m->c2c_idx.slot) {
        memset(m->c2c_idx.slot, 0, m->c2c_idx.cap * sizeof(uint32_t));
    }
}

static bool site_event(int ev)
{
    return ev != EV_INSTRUCTIONS && ev != EV_INVALIDATIONS_RECEIVED;
}

/*
 * A window's tables as copied out of the model: per touched site its pc, creation
 * index and mode, and its counter block as is (ncpus * DATA_COUNT * EV_COUNT, one
 * memcpy); zero rows are dropped and rows ordered when formatting, off the lock.
 * The buffers are kept for the next window (model_tables_free hands them back), so
 * a take writes into memory already mapped: with fresh allocations the page faults
 * were a good part of its cost.
 */
typedef struct {
    uint64_t pc;
    uint32_t index; /* the site's creation order */
    int mode;
    size_t at; /* its counter block: cnt + at * block */
} site_copy;

typedef struct {
    uint64_t line, pc, owner_pc, n;
    int cpu, owner_cpu;
} c2c_row;

struct model_tables {
    unsigned long window;
    int ncpus;
    site_copy *sites;
    uint64_t *cnt;
    size_t nsites, sites_cap;
    c2c_row *c2c;
    size_t nc2c, c2c_cap;
    payload_stats *pay; /* the window's payload path statistics */
};

/* One spare set of buffers, handed between the taker and the writer thread. */
static model_tables *spare_tables;

/*
 * Buffers start this large and are touched when they grow: the first take is the
 * throw-away region at boot (testbed.vm.cachemodel.arm_model), which touches few
 * sites, so the first measured window grew its buffers from there and paid for the
 * allocation and its page faults inside its `end` stall: 70-105 ms in the first
 * window of a boot against 7-12 ms in later ones (a real window touches 30-60k sites
 * here). 65536 sites is ~18 MB of counters with 2 vCPUs, paid once at boot.
 */
#define TABLES_MIN_SITES 65536
#define TABLES_MIN_C2C 65536

/* Grow *buf from old to new elements of size bytes and touch the new part now. */
static void *grow_touched(void *buf, size_t old, size_t new, size_t size)
{
    char *p = realloc(buf, new * size);
    if (p) {
        memset(p + old * size, 0, (new - old) * size);
    }
    return p;
}

model_tables *model_tables_take(model *m, unsigned long window)
{
    sites_flush(m, false);
    size_t block = (size_t)m->cfg.ncpus * DATA_COUNT * EV_COUNT;
    model_tables *t = __atomic_exchange_n(&spare_tables, NULL, __ATOMIC_ACQ_REL);
    if (!t || t->ncpus != m->cfg.ncpus) {
        model_tables_free(t);
        t = calloc(1, sizeof(*t));
        t->ncpus = m->cfg.ncpus;
    }
    t->window = window;
    if (t->sites_cap < m->ntouched || !t->sites) {
        size_t cap = m->ntouched + m->ntouched / 4 + 1024;
        cap = cap < TABLES_MIN_SITES ? TABLES_MIN_SITES : cap;
        t->sites = grow_touched(t->sites, t->sites_cap, cap, sizeof(*t->sites));
        t->cnt = grow_touched(t->cnt, t->sites_cap * block, cap * block, sizeof(uint64_t));
        t->sites_cap = cap;
    }
    for (size_t i = 0; i < m->ntouched; i++) {
        const model_site *s = m->touched[i];
        t->sites[i] = (site_copy){s->pc, s->index, s->mode, i};
        memcpy(t->cnt + i * block, s->cnt, block * sizeof(uint64_t));
    }
    t->nsites = m->ntouched;
    if (t->c2c_cap < m->nc2c || !t->c2c) {
        size_t cap = m->nc2c + m->nc2c / 4 + 1024;
        cap = cap < TABLES_MIN_C2C ? TABLES_MIN_C2C : cap;
        t->c2c = grow_touched(t->c2c, t->c2c_cap, cap, sizeof(*t->c2c));
        t->c2c_cap = cap;
    }
    for (size_t i = 0; i < m->nc2c; i++) {
        const c2c_rec *r = &m->c2c[i];
        t->c2c[i] = (c2c_row){r->line << m->line_shift, r->req ? r->req->pc : 0,
                              r->own ? r->own->pc : 0, r->n, r->req_cpu, r->own_cpu};
    }
    t->nc2c = m->nc2c;
    if (!t->pay) {
        t->pay = malloc(sizeof(*t->pay));
    }
    payload_stats_copy(m->pay, t->pay);
    return t;
}

unsigned long model_tables_window(const model_tables *t) { return t->window; }

static void tables_destroy(model_tables *t)
{
    if (t) {
        free(t->sites);
        free(t->cnt);
        free(t->c2c);
        free(t->pay);
        free(t);
    }
}

void model_tables_free(model_tables *t)
{
    /* kept as the spare (the one there before, if any, goes) */
    tables_destroy(__atomic_exchange_n(&spare_tables, t, __ATOMIC_ACQ_REL));
}

/* Sites in creation order: the order of the full scan the tables had before. */
static int site_copy_order(const void *a, const void *b)
{
    const site_copy *x = a, *y = b;
    return x->index < y->index ? -1 : x->index > y->index;
}

void model_tables_write_sites(model_tables *t, FILE *f)
{
    size_t block = (size_t)t->ncpus * DATA_COUNT * EV_COUNT;
    /* sorted here, on the writer's time, not under the caller's lock */
    qsort(t->sites, t->nsites, sizeof(*t->sites), site_copy_order);
    fprintf(f, "window,pc,vcpu,mode,data");
    for (int ev = 0; ev < EV_COUNT; ev++) {
        if (site_event(ev)) {
            fprintf(f, ",%s", model_event_names[ev]);
        }
    }
    fputc('\n', f);
    for (size_t i = 0; i < t->nsites; i++) {
        const site_copy *s = &t->sites[i];
        for (int cpu = 0; cpu < t->ncpus; cpu++) {
            for (int d = 0; d < DATA_COUNT; d++) {
                const uint64_t *c = t->cnt + s->at * block +
                                    ((size_t)cpu * DATA_COUNT + (size_t)d) * EV_COUNT;
                bool any = false;
                for (int ev = 0; ev < EV_COUNT; ev++) {
                    any |= c[ev] != 0;
                }
                if (!any) {
                    continue;
                }
                fprintf(f, "%lu,0x%llx,%d,%s,%s", t->window, (unsigned long long)s->pc, cpu,
                        model_mode_names[s->mode], model_data_names[d]);
                for (int ev = 0; ev < EV_COUNT; ev++) {
                    if (site_event(ev)) {
                        fprintf(f, ",%llu", (unsigned long long)c[ev]);
                    }
                }
                fputc('\n', f);
            }
        }
    }
}

void model_tables_write_c2c(model_tables *t, FILE *f)
{
    fprintf(f, "window,line,vcpu,pc,owner_vcpu,owner_pc,count\n");
    for (size_t i = 0; i < t->nc2c; i++) {
        const c2c_row *r = &t->c2c[i];
        fprintf(f, "%lu,0x%llx,%d,0x%llx,%d,0x%llx,%llu\n", t->window,
                (unsigned long long)r->line, r->cpu, (unsigned long long)r->pc, r->owner_cpu,
                (unsigned long long)r->owner_pc, (unsigned long long)r->n);
    }
}

void model_tables_write_payload(model_tables *t, FILE *f)
{
    payload_stats_write(t->pay, f, t->window);
}

void model_write_payload(model *m, FILE *f, unsigned long window)
{
    model_tables *t = model_tables_take(m, window);
    model_tables_write_payload(t, f);
    model_tables_free(t);
}

void model_write_sites(model *m, FILE *f, unsigned long window)
{
    model_tables *t = model_tables_take(m, window);
    model_tables_write_sites(t, f);
    model_tables_free(t);
}

void model_write_c2c(model *m, FILE *f, unsigned long window)
{
    model_tables *t = model_tables_take(m, window);
    model_tables_write_c2c(t, f);
    model_tables_free(t);
}

/* ---------------------------------------------------------------- coherence */
static held private_entry(const model *m, int cpu, uint64_t line)
{
    cache *l1 = &m->cpu[cpu].l1, *l2 = &m->cpu[cpu].l2;
    size_t i = lookup(l1, line);
    if (i != NONE) {
        return (held){l1, i};
    }
    if (m->has_l2 && (i = lookup(l2, line)) != NONE) {
        return (held){l2, i};
    }
    return (held){NULL, NONE};
}

static inline uint8_t held_state(held h) { return h.c ? state_at(h.c, h.i) : ST_I; }

static uint8_t private_state(const model *m, int cpu, uint64_t line)
{
    return held_state(private_entry(m, cpu, line));
}

static void set_private_state(model *m, int cpu, uint64_t line, uint8_t state)
{
    cache *l1 = &m->cpu[cpu].l1, *l2 = &m->cpu[cpu].l2;
    for (int i = 0; i < MODEL_MEMO_SLOTS; i++) {
        if (m->cpu[cpu].memo[i].line == line) {
            m->cpu[cpu].memo[i].valid = false;
        }
    }
    size_t x = lookup(l1, line);
    if (x != NONE) {
        if (state == ST_I) {
            l1->key[x] = 0;
        } else {
            set_state(l1, x, state);
        }
    }
    if (m->has_l2 && (x = lookup(l2, line)) != NONE) {
        if (state == ST_I) {
            l2->key[x] = 0;
        } else {
            set_state(l2, x, state);
        }
    }
}

static void llc_fill(model *m, uint64_t line, const entry *data)
{
    size_t i = lookup(&m->llc, line);
    if (i != NONE) {
        touch(&m->llc, i);
        copy_data(&m->llc, i, data);
    } else {
        insert(&m->llc, line, ST_S, data, NULL);
    }
}

/* A line leaves CPU `cpu`'s L2: dirty data goes to the LLC unless L1 still holds it. */
static void l2_evicted(model *m, int cpu, const entry *v)
{
    if (key_state(v->key) == ST_M && lookup(&m->cpu[cpu].l1, key_tag(v->key)) == NONE) {
        llc_fill(m, key_tag(v->key), v);
    }
}

static void fill_l2(model *m, int cpu, uint64_t line, uint8_t state, const entry *data)
{
    entry victim;
    insert(&m->cpu[cpu].l2, line, state, data, &victim);
    if (key_state(victim.key) != ST_I) {
        l2_evicted(m, cpu, &victim);
    }
}

/* Returns the line's new L1 entry. */
static size_t fill_l1(model *m, int cpu, uint64_t line, uint8_t state, const entry *data)
{
    entry victim;
    size_t at = insert(&m->cpu[cpu].l1, line, state, data, &victim);
    uint8_t vst = key_state(victim.key);
    if (vst == ST_I) {
        return at;
    }
    uint64_t vtag = key_tag(victim.key);
    for (int i = 0; i < MODEL_MEMO_SLOTS; i++) {
        if (vtag == m->cpu[cpu].memo[i].line) {
            m->cpu[cpu].memo[i].valid = false;
        }
    }
    if (m->has_l2) {
        cache *l2 = &m->cpu[cpu].l2;
        size_t e2 = lookup(l2, vtag);
        if (e2 != NONE) {
            set_state(l2, e2, vst);
            copy_data(l2, e2, &victim);
        } else {
            fill_l2(m, cpu, vtag, vst, &victim);
        }
    } else if (vst == ST_M) {
        llc_fill(m, vtag, &victim);
    }
    return at;
}

static void invalidate_others(model *m, int cpu, int mode, uint64_t line, model_site *site,
                              int data)
{
    for (int o = 0; o < m->cfg.ncpus; o++) {
        if (o != cpu && private_state(m, o, line) != ST_I) {
            set_private_state(m, o, line, ST_I);
            m->cpu[cpu].cnt[mode][EV_INVALIDATIONS_SENT]++;
            site_add(m, site, cpu, data, EV_INVALIDATIONS_SENT);
            m->cpu[o].cnt[m->cpu[o].last_mode][EV_INVALIDATIONS_RECEIVED]++;
        }
    }
}

/* Every other CPU's private copy of `line`, into m->others (cpu's own slot: none). */
static void find_others(model *m, int cpu, uint64_t line)
{
    for (int o = 0; o < m->cfg.ncpus; o++) {
        m->others[o] = o == cpu ? (held){NULL, NONE} : private_entry(m, o, line);
    }
}

/*
 * Device writes (DMA) never reach a plugin.  With a digest of the line's bytes per
 * access, a load can tell that the line changed since a CPU last touched it, which
 * only an invisible writer can have done: then every private copy is dropped and,
 * with DDIO (as on Intel server parts), the LLC keeps the new data; without, the
 * LLC copy goes too.  Stores cannot be checked (their own bytes changed the line).
 * The line is then marked as written by a device until a CPU stores to it, so
 * accesses are attributed as data=device or data=cpu.
 *
 * The copy whose digest a load is checked against, when the loading CPU holds none
 * (m->others filled): a Modified copy elsewhere, else the first other copy, else the
 * LLC's (*llc: its entry, looked up here).
 */
static held recorded_elsewhere(model *m, uint64_t line, size_t *llc)
{
    held clean = {NULL, NONE};
    for (int o = 0; o < m->cfg.ncpus; o++) {
        held x = m->others[o];
        if (x.c && state_at(x.c, x.i) == ST_M) {
            return x;
        }
        clean = clean.c ? clean : x;
    }
    if (clean.c) {
        return clean;
    }
    *llc = lookup(&m->llc, line);
    return (held){*llc != NONE ? &m->llc : NULL, *llc};
}

static void device_write(model *m, int cpu, int mode, uint64_t line, uint64_t sum,
                         model_site *site)
{
    m->cpu[cpu].cnt[mode][EV_DEVICE_WRITES]++;
    site_add(m, site, cpu, DATA_DEVICE, EV_DEVICE_WRITES);
    m->noticed = true;
    for (int o = 0; o < m->cfg.ncpus; o++) {
        set_private_state(m, o, line, ST_I);
    }
    if (m->cfg.ddio) {
        entry d = {.key = KEY_DEV, .sum = sum, .writer = NULL};
        llc_fill(m, line, &d);
    } else {
        size_t l = lookup(&m->llc, line);
        if (l != NONE) {
            m->llc.key[l] = 0;
        }
    }
}

/*
 * One line of an access; returns whether the line was last written by a device, and
 * the line's L1 entry afterwards in *l1_at.  Each cache is looked up once per call
 * (a device write, which changes them all, makes the lookups start again).
 */
static int access_line(model *m, int cpu, int mode, uint64_t line, bool store, uint64_t sum,
                       bool check, model_site *site, size_t *l1_at)
{
    cpu_state *c = &m->cpu[cpu];
    uint64_t *k = c->cnt[mode];
    int data = DATA_CPU;
    cache *l1 = &c->l1, *l2 = &c->l2;
    size_t e = lookup(l1, line);
    size_t e2 = (e == NONE && m->has_l2) ? lookup(l2, line) : NONE;
    bool others_known = false, llc_known = false;
    size_t l = NONE;
    m->noticed = false;
    m->served = SERVED_OWN;

    if (check && !store) {
        held r = e != NONE ? (held){l1, e} : e2 != NONE ? (held){l2, e2} : (held){NULL, NONE};
        if (!r.c) {
            find_others(m, cpu, line);
            others_known = true;
            r = recorded_elsewhere(m, line, &l);
            llc_known = !r.c || r.c == &m->llc;
        }
        if (r.c && r.c->data[r.i].sum != MODEL_SUM_UNKNOWN && r.c->data[r.i].sum != sum) {
            device_write(m, cpu, mode, line, sum, site);
            data = DATA_DEVICE;
            /* every private copy is gone; the LLC changed */
            e = e2 = NONE;
            for (int o = 0; o < m->cfg.ncpus; o++) {
                m->others[o] = (held){NULL, NONE};
            }
            others_known = true;
            llc_known = false;
        }
    }

    if (e != NONE) { /* L1 hit: the common, cheap path */
        data = dev_at(l1, e);
        touch(l1, e);
        if (store) {
            if (state_at(l1, e) != ST_M) {
                if (state_at(l1, e) == ST_S) {
                    invalidate_others(m, cpu, mode, line, site, data);
                }
                set_private_state(m, cpu, line, ST_M);
            }
            set_dev(l1, e, DATA_CPU);
            l1->data[e].writer = site;
        }
        l1->data[e].sum = sum;
        *l1_at = e;
        return data;
    }

    if (e2 != NONE) {
        data = dev_at(l2, e2);
        k[EV_L1D_MISSES]++;
        site_add(m, site, cpu, data, EV_L1D_MISSES);
        touch(l2, e2);
        uint8_t st = state_at(l2, e2);
        if (store) {
            if (st != ST_M) {
                if (st == ST_S) {
                    invalidate_others(m, cpu, mode, line, site, data);
                }
                st = ST_M;
                set_state(l2, e2, ST_M);
            }
            set_dev(l2, e2, DATA_CPU);
            l2->data[e2].writer = site;
        }
        l2->data[e2].sum = sum;
        entry from = entry_at(l2, e2);
        *l1_at = fill_l1(m, cpu, line, st, &from);
        return data;
    }

    /* private miss: where is the line?  (the data flag comes with it) */
    if (!others_known) {
        find_others(m, cpu, line);
    }
    if (!llc_known) {
        l = lookup(&m->llc, line);
    }
    bool other_has = false;
    held owner = {NULL, NONE};
    int owner_cpu = -1;
    for (int o = 0; o < m->cfg.ncpus; o++) {
        held x = m->others[o];
        if (!x.c) {
            continue;
        }
        if (!other_has) {
            data |= dev_at(x.c, x.i);
        }
        other_has = true;
        if (state_at(x.c, x.i) == ST_M) {
            owner = x;
            owner_cpu = o;
        }
    }
    if (!other_has && l != NONE) {
        data |= dev_at(&m->llc, l);
    }
    m->served = owner.c ? SERVED_PEER_MODIFIED : other_has ? SERVED_PEER_CLEAN
                : l != NONE ? SERVED_LLC : SERVED_MEMORY;
    k[EV_L1D_MISSES]++;
    k[EV_L2_MISSES]++;
    site_add(m, site, cpu, data, EV_L1D_MISSES);
    site_add(m, site, cpu, data, EV_L2_MISSES);
    if (owner.c) {
        k[EV_C2C_TRANSFERS]++;
        site_add(m, site, cpu, data, EV_C2C_TRANSFERS);
        c2c_record(m, line, site, cpu, owner.c->data[owner.i].writer, owner_cpu);
    }
    for (int o = 0; other_has && o < m->cfg.ncpus; o++) {
        uint8_t so = held_state(m->others[o]);
        if (so == ST_I) {
            continue;
        }
        if (store) {
            set_private_state(m, o, line, ST_I);
            k[EV_INVALIDATIONS_SENT]++;
            site_add(m, site, cpu, data, EV_INVALIDATIONS_SENT);
            m->cpu[o].cnt[m->cpu[o].last_mode][EV_INVALIDATIONS_RECEIVED]++;
        } else if (so != ST_S) {
            set_private_state(m, o, line, ST_S); /* M: data written back to LLC below */
        }
    }
    entry now = {.key = (!store && data == DATA_DEVICE) ? KEY_DEV : 0, .sum = sum,
                 .writer = store ? site : NULL};
    if (l != NONE) {
        touch(&m->llc, l);
        copy_data(&m->llc, l, &now);
    } else {
        if (!other_has) {
            k[EV_LLC_MISSES]++;
            site_add(m, site, cpu, data, EV_LLC_MISSES);
        }
        insert(&m->llc, line, ST_S, &now, NULL);
    }
    uint8_t st = store ? ST_M : (other_has ? ST_S : ST_E);
    if (m->has_l2) {
        fill_l2(m, cpu, line, st, &now);
    }
    *l1_at = fill_l1(m, cpu, line, st, &now);
    return data;
}

/*
 * A repeated load (an L1 hit on the memo's line) by a pass the line's record may wait
 * for: the record is kept here, on the fast path, so its counts stay exactly those of
 * the fast path (falling back to the slow path would check the digest the fast path
 * skips).  No allocation here (payload_note creates records only for noticed writes),
 * so the plugin's lock-free fast path stays memory-safe; under thread=single exact.
 */
static inline void repeat_payload(model *m, int cpu, memo_t *mm, bool store, model_site *site)
{
    if (__builtin_expect(mm->want && !store && site && (mm->want & site->pass_bit), 0)) {
        mm->want = payload_note(m->pay, cpu, mm->line, false, site->pass, SERVED_OWN, false);
    }
}

/*
 * The payload record of the line access_line just handled, when the access can matter
 * to it: a load that noticed a device write (opens it), a load by the checksum or the
 * copy (records it), a store to a line still marked device-written (closes it: the
 * buffer reused; a store to a line whose mark left the caches does not).  Other
 * accesses skip the record's lookup (a host cache miss on the model's slow path,
 * ~+18 % on an e1000 receive when every access looked) and return "unknown" where the
 * line's chunk holds records (the line's next checksum or copy load finds out, also on
 * the fast path), else "none", so lines far from any received data cost the fast path
 * one test of the memo.
 */
static inline unsigned payload_access(model *m, int cpu, uint64_t line, bool store, int pass,
                                      int data)
{
    if (m->noticed || (store ? data == DATA_DEVICE : pass != PASS_OTHER)) {
        return payload_note(m->pay, cpu, line, store, pass, m->served, m->noticed);
    }
    return payload_may_have(m->pay, line) ? WANT_CHECKSUM | WANT_COPY : 0;
}

void model_access(model *m, int cpu, int mode, uint64_t paddr, unsigned size, bool store,
                  const uint64_t *sums, int slot, model_site *site)
{
    cpu_state *c = &m->cpu[cpu];
    memo_t *mm = &c->memo[slot];
    uint64_t first = paddr >> m->line_shift;
    uint64_t last = (paddr + (size ? size : 1) - 1) >> m->line_shift;
    bool check = sums != NULL;
    uint64_t s0 = check ? sums[0] : 0, s1 = check ? sums[1] : 0;
    int ev = store ? EV_STORES : EV_LOADS;

    c->last_mode = mode;
    c->cnt[mode][ev]++;
    if (first == last && mm->valid && first == mm->line && (mm->m || !store)) {
        /* L1 hit on a line just used: already recent, state unchanged */
        uint64_t *sum = &c->l1.data[mm->idx].sum;
        if (store || !check || *sum == s0 || *sum == MODEL_SUM_UNKNOWN) {
            site_add(m, site, cpu, mm->data, ev);
            *sum = s0;
            if (store) {
                c->l1.data[mm->idx].writer = site;
            }
            repeat_payload(m, cpu, mm, store, site);
            return;
        }
    }
    size_t at;
    int pass = site ? site->pass : PASS_OTHER;
    int data = access_line(m, cpu, mode, first, store, s0, check, site, &at);
    unsigned want = payload_access(m, cpu, first, store, pass, data);
    site_add(m, site, cpu, data, ev);
    if (last != first) {
        data = access_line(m, cpu, mode, last, store, s1, check, site, &at);
        want = payload_access(m, cpu, last, store, pass, data);
    }
    mm->want = want;
    mm->line = last;
    mm->valid = true;
    mm->m = state_at(&c->l1, at) == ST_M;
    mm->data = dev_at(&c->l1, at);
    mm->idx = at;
}

/* Prefetch one cache's set of `line`: its keys, and its LRU ranks (a miss inserts). */
static inline void prefetch_set(const cache *c, uint64_t line)
{
    if (c->sets) {
        size_t b = set_base(c, line);
        for (uint32_t w = 0; w < c->ways; w += 8) {
            __builtin_prefetch(c->key + b + w);
        }
        __builtin_prefetch(c->rank + (b / c->ways) * c->rank_stride);
    }
}

/*
 * A private miss looks at a dozen sets nobody touched lately (every CPU's L1 and L2,
 * the LLC), each a host cache miss when the model's caches exceed the host's; one after
 * the other they were most of the slow path's time on a streaming load.  Prefetched at
 * once, before the caller's digest work, their latencies overlap that work and each
 * other.  (Prefetching inside model_access, with nothing to overlap, gained nothing.)
 */
void model_prefetch(const model *m, uint64_t paddr)
{
    uint64_t line = paddr >> m->line_shift;
    prefetch_set(&m->llc, line);
    for (int o = 0; o < m->cfg.ncpus; o++) {
        prefetch_set(&m->cpu[o].l1, line);
        prefetch_set(&m->cpu[o].l2, line);
    }
}

bool model_repeat_access(model *m, int cpu, int mode, bool store, int slot, model_site *site)
{
    /*
     * Byte-wise copies alternate a load and a store here, so nothing below branches on
     * `store` (bitwise tests, a computed event, a conditional move): a branch on it was
     * mispredicted on every access and was the hottest spot of the path (perf, the pipe
     * workload on QEMU 10.0).
     */
    cpu_state *c = &m->cpu[cpu];
    memo_t *mm = &c->memo[slot];
    if (!mm->valid || ((int)store & !mm->m)) {
        return false;
    }
    int ev = EV_LOADS + (int)store;
    if (site) {
        uint32_t idx = (uint32_t)(((size_t)cpu * DATA_COUNT + (size_t)mm->data) * EV_COUNT +
                                  (size_t)ev);
        if (site != mm->psite || idx != mm->pidx) {
            if (site->epoch != m->epoch) {
                /* a site's first count in a window lists it (site_touch): under the
                 * caller's lock, in model_access, not on this lock-free path */
                return false;
            }
            memo_flush(mm);
            mm->psite = site;
            mm->pidx = idx;
        }
        mm->pn++;
    }
    c->last_mode = mode;
    c->cnt[mode][ev]++;
    uint64_t *sum = &c->l1.data[mm->idx].sum;
    *sum = store ? MODEL_SUM_UNKNOWN : *sum;
    repeat_payload(m, cpu, mm, store, site);
    return true;
}

bool model_memo_sum_unknown(const model *m, int cpu, int slot)
{
    const cpu_state *c = &m->cpu[cpu];
    const memo_t *mm = &c->memo[slot];
    return mm->valid && c->l1.data[mm->idx].sum == MODEL_SUM_UNKNOWN;
}

void model_set_memo_sum(model *m, int cpu, int slot, uint64_t sum)
{
    cpu_state *c = &m->cpu[cpu];
    memo_t *mm = &c->memo[slot];
    if (mm->valid) {
        c->l1.data[mm->idx].sum = sum;
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
