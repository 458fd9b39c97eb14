/*
 * netbed cache model: the payload path.  Where the reads of device-written lines are
 * served, which pass makes them (the checksum, the copy to user space) and how far the
 * copy lags the checksum, per line, in records that survive the line's eviction.
 *
 * The model (model.c) notices a device write lazily: a load finds the line's bytes
 * changed since a CPU last touched them.  Its mark lives in the cache entry and is lost
 * when the line leaves the LLC, so a copy that lags far behind the checksum finds an
 * unmarked line.  This record is kept apart from the caches, per physical line, from
 * the noticing load until the line's copy (or a CPU store), and does not feed back
 * into the model's counts.  Not thread-safe: the model's caller serialises.
 *
 * Passes come from the instruction's site (model_site.pass): address ranges of guest
 * functions read from a text file (payload_read_passes), e.g. the kernel's
 * csum_partial and copy_user_* from the receiver's /proc/kallsyms.
 */
#ifndef NETBED_CACHE_PAYLOAD_H
#define NETBED_CACHE_PAYLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum payload_pass { PASS_OTHER, PASS_CHECKSUM, PASS_COPY, PASS_COUNT };
extern const char *const payload_pass_names[PASS_COUNT];
/* A record waits for these reads (bits of model_site.pass_bit); 0: no open record. */
#define WANT_CHECKSUM (1u << PASS_CHECKSUM)
#define WANT_COPY (1u << PASS_COPY)

/* Where an access was served (set by the model's slow path for every access). */
enum payload_served {
    SERVED_OWN,           /* the accessing CPU's L1 or L2 */
    SERVED_PEER_CLEAN,    /* another CPU's private cache, clean copy */
    SERVED_PEER_MODIFIED, /* another CPU's private cache, Modified (a c2c transfer) */
    SERVED_LLC,
    SERVED_MEMORY,
    SERVED_COUNT
};
extern const char *const payload_served_names[SERVED_COUNT];

/* The copying CPU against the line's checksum read. */
enum payload_relation { REL_SAME, REL_OTHER, REL_NO_CHECKSUM, REL_COUNT };
extern const char *const payload_relation_names[REL_COUNT];

/* The lag's start: the line's checksum read, or (no checksum read) an earlier read by
 * another pass, e.g. the driver's header parse. */
enum payload_lag_from { LAG_CHECKSUM, LAG_FIRST_READ, LAG_FROM_COUNT };
extern const char *const payload_lag_from_names[LAG_FROM_COUNT];
#define LAG_BUCKETS (1u << 16) /* whole KB; the last bucket holds 64 MiB and more */

enum payload_counter {
    PC_NOTICED,         /* device writes noticed (records opened) */
    PC_UNFINISHED,      /* a record reopened by a new device write before its copy */
    PC_CLOSED_BY_STORE, /* a record a CPU store closed before its copy */
    PC_UNTRACKED,       /* noticed beyond the table's physical range */
    PC_LAG_UNKNOWN,     /* a copy read with no earlier read of the line after its write */
    PC_PASS_RANGES,     /* address ranges known for the passes */
    PC_COUNT
};
extern const char *const payload_counter_names[PC_COUNT];

typedef struct {
    uint64_t first_read[PASS_COUNT];
    uint64_t copy_from[REL_COUNT][SERVED_COUNT];
    uint64_t counter[PC_COUNT];
    uint32_t lag_kb[LAG_FROM_COUNT][LAG_BUCKETS];
} payload_stats;

typedef struct payload payload;
payload *payload_new(uint32_t line_bytes);
void payload_free(payload *p);
/* A new window: every record is stale (lazily, per chunk) and the statistics zero. */
void payload_window(payload *p);

/*
 * One access by `cpu` to physical `line`, after the model served it (`served`);
 * `noticed`: this load found a device write.  Returns the passes the line's record
 * still waits for (0: none), which the model keeps with its memo so a repeated
 * access by such a pass does not take the fast path.
 */
unsigned payload_note(payload *p, int cpu, uint64_t line, bool store, int pass, int served,
                      bool noticed);

/* Whether `line` may have a record this window (its chunk is in use): a cheap filter. */
bool payload_may_have(const payload *p, uint64_t line);

/*
 * Pass ranges: text lines `<start hex> <end hex, exclusive> <checksum|copy>` ('#'
 * comments).  Replaces the ranges; NULL or an error message naming the line.
 */
const char *payload_read_passes(payload *p, FILE *f);
size_t payload_pass_ranges(const payload *p);
int payload_pass_of(const payload *p, uint64_t pc);

void payload_stats_copy(const payload *p, payload_stats *out);
/*
 * CSV: window,kind,name,detail,count with kinds
 *   first_read,<pass>,,n       the first read of a line after its device write, by pass
 *   copy_from,<served>,<relation>,n   the copy's first read of the line
 *   lag_kb,<from>,<KB>,n       device-written KB noticed between lag start and copy
 *   records,<counter>,,n
 */
void payload_stats_write(const payload_stats *s, FILE *f, unsigned long window);

#endif
