/*
 * netbed cache model: private L1D (+ optional private L2) per CPU, a shared LLC,
 * write-invalidate (MESI) coherence between the private caches.
 *
 * This file and model.c know nothing about QEMU, so the model is compiled and
 * checked on its own (tests/unit/conftest.py builds model_trace.c with it for
 * tests/unit/test_cachemodel_*.py);
 * plugin.c is the thin QEMU glue.  Not thread-safe: the caller serialises.
 */
#ifndef NETBED_CACHE_MODEL_H
#define NETBED_CACHE_MODEL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* Order is the CSV order; names in model_event_names[]. */
enum model_event {
    EV_LOADS,
    EV_STORES,
    EV_L1D_MISSES,
    EV_L2_MISSES,
    EV_LLC_MISSES,
    EV_C2C_TRANSFERS,
    EV_INVALIDATIONS_SENT,
    EV_INVALIDATIONS_RECEIVED,
    EV_INSTRUCTIONS,
    EV_DEVICE_WRITES, /* lines found changed by a writer the model cannot see (DMA) */
    EV_COUNT
};

enum model_mode { MODE_KERNEL, MODE_USER, MODE_COUNT };

extern const char *const model_event_names[EV_COUNT];
extern const char *const model_mode_names[MODE_COUNT];

typedef struct {
    uint64_t size; /* bytes; 0 disables the level (only allowed for L2) */
    uint32_t ways;
} cache_geom;

typedef struct {
    cache_geom l1d, l2, llc;
    uint32_t line;  /* bytes, power of two, same for all levels */
    int ncpus;
    bool ddio;      /* device writes land in the LLC (else they leave it too) */
    /*
     * User pcs at or above user_exact_below share one site per user_granule-aligned
     * block (0: every pc its own site); see model_site_get.
     */
    uint64_t user_exact_below, user_granule;
} model_config;

typedef struct model model;

/*
 * Attribution.  A site is one guest instruction address (pc): the plugin gets one
 * per instruction at translation time, so the hot path only adds to counters it
 * already holds a pointer to; symbols are resolved after the window, on the host.
 * Counters: cnt[(cpu * DATA_COUNT + data) * EV_COUNT + event] for the events
 * charged to the accessing CPU (loads, stores, misses, c2c, invalidations sent,
 * device writes).  `data`: was the line last written by a device (DMA) or a CPU
 * when this access found it.
 */
enum model_data { DATA_CPU, DATA_DEVICE, DATA_COUNT };
extern const char *const model_data_names[DATA_COUNT];

typedef struct model_site {
    uint64_t pc;
    int mode;
    /*
     * The window (model_sites_clear count) this site's counters belong to: a site
     * is zeroed and listed when first counted in a window, so starting and copying
     * a window costs the sites it touched, not every site translated since boot.
     */
    uint32_t epoch;
    uint32_t index; /* creation order: the tables' row order */
    /* payload path (payload.h): enum payload_pass of this pc, and 1 << pass (0: other) */
    uint8_t pass, pass_bit;
    uint64_t cnt[]; /* ncpus * DATA_COUNT * EV_COUNT, in the same allocation */
} model_site;

/*
 * The site of `pc` (created on first use; not for the hot path: a hash lookup).
 * A user pc at or above cfg.user_exact_below is charged to the start of its
 * cfg.user_granule block (at least user_exact_below), see model_site_pc.
 */
model_site *model_site_get(model *m, uint64_t pc, int mode);
/* Start a window: every site's counters count as zero (lazily) and the c2c line
 * table is emptied. */
void model_sites_clear(model *m);
/*
 * CSV of the sites with non-zero counters:
 *   window,pc,vcpu,mode,data,<event columns except instructions and invalidations_received>
 * and of the c2c table, one row per (line, requesting site/cpu, owner site/cpu):
 *   window,line,vcpu,pc,owner_vcpu,owner_pc,count
 * (line: physical address of the line; owner_pc: the instruction whose store made
 * the owner's copy dirty, 0 if not known).
 */
void model_write_sites(model *m, FILE *f, unsigned long window);
void model_write_c2c(model *m, FILE *f, unsigned long window);
/*
 * The same two tables copied out of the model (only the non-zero rows, with the
 * sites' pcs), so they can be formatted and written after the caller has let go of
 * the model: the plugin takes them at a window's end under its lock, in
 * milliseconds, and a writer thread formats and writes them while the guest runs
 * on (formatting under the lock stalled the vCPU 40-370 ms).  The write functions
 * give exactly what model_write_sites / model_write_c2c give for that window (the
 * sites writer sorts the copy in place, off the lock).  The copy is each touched
 * site's counter block as is; model_tables_free keeps the buffers for the next
 * take (one spare, handed over atomically, so the writer thread may free while the
 * vCPU thread takes).
 */
typedef struct model_tables model_tables;
model_tables *model_tables_take(model *m, unsigned long window);
unsigned long model_tables_window(const model_tables *t);
void model_tables_write_sites(model_tables *t, FILE *f);
void model_tables_write_c2c(model_tables *t, FILE *f);
void model_tables_free(model_tables *t);

/*
 * Payload path (payload.h): the pass ranges (model_read_passes: every site is
 * classified again; NULL or an error message naming the line), a new window of
 * records (model_payload_window), and the window's statistics as CSV.
 */
const char *model_read_passes(model *m, FILE *f);
void model_payload_window(model *m);
void model_write_payload(model *m, FILE *f, unsigned long window);
void model_tables_write_payload(model_tables *t, FILE *f);

/* NULL when the configuration is usable, else a message naming the bad parameter. */
const char *model_config_error(const model_config *cfg);
model *model_new(const model_config *cfg);
void model_free(model *m);

/*
 * One data access by `cpu` in `mode`; may span two lines (counted as one access).
 * `site`: where the access is attributed (NULL: nowhere).
 * `sums`: digests of the first and last line's bytes right after the access, used
 * to notice device writes; NULL turns that detection off.  `slot` (0..
 * MODEL_MEMO_SLOTS-1): where the model remembers this line for
 * model_repeat_access(); the caller keeps its own key (e.g. virtual line) per slot.
 */
#define MODEL_MEMO_SLOTS 2
void model_access(model *m, int cpu, int mode, uint64_t paddr, unsigned size, bool store,
                  const uint64_t *sums, int slot, model_site *site);
/*
 * Digest value meaning "content not known" (a store the caller did not digest):
 * never reported as a device write.  Callers map a real digest of 0 to 1.
 */
#define MODEL_SUM_UNKNOWN 0

/*
 * A hint, no effect on any count: the host loads the sets model_access may look at for
 * the line of `paddr` (every private cache's and the LLC's), so the caller can start
 * them before the work it does ahead of model_access (the plugin: reading and
 * digesting the line's bytes) and the lookups then find them in the host's cache.
 */
void model_prefetch(const model *m, uint64_t paddr);

/*
 * Fast path for an access to the line remembered in `slot` (the caller decides
 * "same", e.g. by virtual line): counts it and returns true when
 * the line is still in this CPU's L1 in a state that allows the access (no
 * lookup, no digest check); false means: call model_access().
 */
bool model_repeat_access(model *m, int cpu, int mode, bool store, int slot, model_site *site);
/*
 * After repeated stores the previous line's digest is unknown; the caller digests
 * that line once it moves on and records it here, so the next load can still tell
 * CPU writes from device writes (e.g. a page zeroed on allocation, then DMA).
 */
bool model_memo_sum_unknown(const model *m, int cpu, int slot);
void model_set_memo_sum(model *m, int cpu, int slot, uint64_t sum);
/* Empty every cache (cold start); counters are kept. */
void model_clear_caches(model *m);
void model_count(model *m, int cpu, int mode, int ev, uint64_t n);
uint64_t model_counter(const model *m, int cpu, int mode, int ev);
int model_ncpus(const model *m);

/*
 * A recorded access (the plugin's trace=<file>, replayed by model_trace's replay=<file>):
 * what vcpu_mem knew about one access in a window, so the model alone can be timed on
 * a real window's accesses.  sum0/sum1: digests of the access's first and last line
 * after it; evicted: the current digest of the line the access's memo slot remembered
 * (what vcpu_mem records with model_set_memo_sum), MODEL_SUM_UNKNOWN if none.
 */
typedef struct {
    uint64_t pc, vaddr, paddr, sum0, sum1, evicted;
    uint8_t cpu, mode, store, size;
    uint32_t flags; /* TRACE_SUMS: digests known */
} model_trace_rec;
#define TRACE_SUMS 1u

#endif
