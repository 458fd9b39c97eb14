/*
 * netbed cache model as a QEMU TCG plugin: the glue between QEMU's instrumentation
 * and the pure model in model.c.  It builds for plugin API 1 (QEMU 7.2) and API >= 4
 * (QEMU 10.0, which loads only API >= 2): see "Line contents" and "Which vCPU runs"
 * below for the two places they differ in substance.
 *
 * Regions of interest: the guest tool nbmark executes `nopl disp32(%rax)`
 * (0f 1f 80 <disp32>) with disp32 = 0x4E000000 | kind << 20 | id.  The plugin spots
 * the bytes at translation time and puts an exec callback on that one instruction.
 * Until the first region opens, nothing else is instrumented, so boot and setup run
 * at plain TCG speed (plus a byte compare per translated instruction).  Arming the
 * plugin calls qemu_plugin_reset(), whose code-cache flush makes QEMU retranslate
 * everything with memory callbacks; the flush is asynchronous, so code already
 * translated runs uninstrumented until the vCPUs next leave the execution loop (a
 * few blocks).  A `begin` with the plugin unarmed arms it; the `arm` marker (kind 4)
 * arms it without counting, so the flush and most of the retranslation can happen
 * before the window's `begin`, which then only starts counting (the vCPU that ran a
 * `begin` which had to arm stalled 28-40 ms on QEMU 10.0).  `arm` with the plugin
 * armed (a region open, twice, or on 7.2 after the first region) changes nothing.
 * Counting happens only while a region is open.  After the last `end`, the API >= 4
 * build (QEMU 10.0) disarms and flushes again, so code runs uninstrumented until
 * the next `arm` or `begin` (another flush); the API-1 build (QEMU 7.2) cannot: its
 * callbacks return at once but stay in place, and it stays armed.
 *
 * Why 7.2 cannot flush again at `end` to get back to full speed: QEMU 7.2 leaves
 * CPUState.plugin_mem_cbs pointing at the callback array of a TB-ending instruction
 * that calls a helper (ret, calls/jumps across pages, ...): accel/tcg/plugin-gen.c
 * decides whether to clear it before it knows about the helper (changed upstream
 * in 8.x).  A flush frees those arrays and the next helper memory access
 * (interrupt delivery, iret) aborts QEMU in qemu_plugin_vcpu_mem_cb.  The first
 * flush is safe because no memory callback exists yet.  The same stale pointer
 * makes helper-made accesses (interrupt frames, iret) reach vcpu_mem with the
 * stale instruction's mode: they are real accesses, so they are counted.  QEMU 10.0
 * clears the pointer after every block (cpu_tb_exec) and on every exit from a block
 * (cpu_loop_exit), so there a flush frees nothing still in use, and helper accesses
 * outside a block (interrupt frames) are not seen at all.
 *
 * Mode: kernel when the *instruction* address is in the upper half of the x86-64
 * address space, user otherwise.  The 7.2 API exposes no privilege level, and the
 * data address would be wrong for copy_to_user (a kernel instruction storing to a
 * user address must count as kernel).
 *
 * Attribution (sites=<csv>, c2c=<csv>): every instruction gets a model_site when it
 * is translated (a hash lookup per translation, none per execution); its pointer
 * rides in the memory callback's udata (low bit: mode), so the hot path adds to
 * counters it already holds.  Counters are zeroed when the first region opens and
 * copied out (model_tables_take, under the lock) when the last one closes, with the
 * window's number; a writer thread then formats the copy and replaces the files
 * (tmp + rename) while the guest runs on, and last replaces `<sites>.window` with
 * that number, so the host knows when a window's tables are complete (it holds 0
 * from the start).  Formatting on the vCPU thread, under the lock, stalled the
 * guest 40-370 ms at every `end` (the tables grow through a boot).  Symbols are
 * resolved on the host afterwards (testbed/formats/symbols.py).
 *
 * Threading: one global spinlock around the model, so multi-threaded TCG is
 * correct but interleaving (and so the counts) depends on host scheduling;
 * `-accel tcg,thread=single` makes runs repeatable.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glib.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <qemu-plugin.h>

#include "model.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MARKER_MAGIC 0x4Eu /* disp32 top byte, 'N' */
/* KIND_ARM: arm (retranslate with callbacks) without counting; see the top comment. */
enum { KIND_BEGIN = 1, KIND_END = 2, KIND_SNAPSHOT = 3, KIND_ARM = 4 };

static qemu_plugin_id_t plugin_id;
static model *M;
static FILE *out;
static bool cold_start = true;
static bool dma_detect = true;
static unsigned line_bytes = 64;
/* log2(line_bytes): a 64-bit divide per access was ~30% of vcpu_mem's time */
static unsigned line_shift = 6;
static bool always_on;
/*
 * trace=<file>: every access counted in a window is also written there as a
 * model_trace_rec (model.h), at most trace_max of them (default 40 M, 2.2 GB), for
 * timing the model alone on a real window (model_trace replay=<file>).  Recording
 * reads and digests every access's lines, so a traced run is slow; never on in a
 * measurement.
 */
static FILE *trace_out;
static uint64_t trace_left = 40000000;
static int open_regions;
static int counting; /* read without the lock by callbacks: __atomic */
static int armed;    /* code translated from now on gets memory callbacks */
static char lock_flag;
/* Attribution (sites=, c2c=): per-instruction counters, written at each window's end. */
static char *sites_path, *c2c_path, *tables_window_path;
/*
 * Payload path (payload.h): payload=<csv> gets each window's statistics beside the
 * tables; passes=<file> names the guest functions of the checksum and the copy (address
 * ranges, written by the host from the guest's symbols), read again at a window's
 * `begin` when it changed, so the host may write it after boot.
 */
static char *payload_path, *passes_path;
static struct stat passes_seen;
static unsigned long windows_closed;
static GAsyncQueue *tables_queue; /* model_tables * to write, or &tables_stop */
static GThread *tables_writer;
static char tables_stop;

#if QEMU_PLUGIN_VERSION >= 4
#define NB_HOST_POINTERS 0
#define NB_DISARM_AT_END 1 /* a flush at `end` is safe (top of the file) */
#elif QEMU_PLUGIN_VERSION == 1
#define NB_HOST_POINTERS 1
#define NB_DISARM_AT_END 0
#else
#error "netbed-cache builds for plugin API 1 (QEMU 7.2) or >= 4 (QEMU 10: read_memory_vaddr)"
#endif

/*
 * Line contents (DMA digests).  API 1: QEMU's struct qemu_plugin_hwaddr holds the
 * host address of the accessed byte (mirrored below), so a line is read in place.
 * API >= 2 dropped it (the struct holds the physical address and the memory region);
 * API 4 added qemu_plugin_read_memory_vaddr, which copies guest memory by virtual
 * address through QEMU's debug path (a page-table walk per call).  So API >= 4 builds
 * read lines from a mapping of guest RAM of their own when the host put RAM in a
 * memfd (guest_ram=, "Guest RAM read through a mapping" below), and fall back to
 * read_memory_vaddr elsewhere.  A remembered line is then a host pointer into that
 * mapping, or its virtual address, read again later on the same vCPU: with a different
 * address space loaded by then (a context switch between two of its accesses, with
 * no other access in between) the bytes would be another process's.  Between a
 * user store and a switch the kernel touches many lines, so the memo is digested
 * long before.
 *
 * Guest-physical address lookup cache (API 1 only).  qemu_plugin_hwaddr_phys_addr() searches
 * QEMU's RAM blocks on every call (~18 ns here, a third of the plugin's cost on a
 * streaming loop).  The host address backing a guest RAM page never changes while
 * the VM runs, so (host page -> guest-physical page) can be cached per vCPU with
 * no invalidation.  The host address is not in the 7.2 API: it is read from
 * QEMU's struct qemu_plugin_hwaddr (include/qemu/plugin-memory.h), mirrored below.
 * We build against the installed version's header, and the first PHYS_CHECKS hits
 * are checked against the API; a mismatch turns the cache off for good.
 */
#if NB_HOST_POINTERS
struct hwaddr_mirror_72 {
    bool is_io;
    bool is_store;
    union {
        struct {
            void *section;
            uint64_t offset;
        } io;
        struct {
            void *hostaddr;
        } ram;
    } v;
};

#define PHYS_CACHE_SIZE 1024 /* per vCPU, direct mapped */
#define PHYS_CHECKS 200000
typedef struct {
    uintptr_t host_page; /* 0: empty */
    uint64_t phys_page;
} phys_slot;
static phys_slot *phys_cache; /* [max_vcpus][PHYS_CACHE_SIZE] */
#endif
/* Where a line's bytes are: a host pointer (API 1) or its guest-virtual address. */
typedef struct {
#if NB_HOST_POINTERS
    const uint8_t *host; /* NULL: nothing */
#else
    const uint8_t *host; /* in the guest-RAM mapping, or NULL: read `vaddr` */
    uint64_t vaddr;
    bool valid;
#endif
} line_ref;
#define DECODED_INFOS 4
typedef struct {
    qemu_plugin_meminfo_t info; /* ~0: none */
    unsigned size;
    bool store;
} decoded_info;

/* Per vCPU: the virtual lines the model remembers in its memo slots (model.h). */
typedef struct {
    uint64_t vline[MODEL_MEMO_SLOTS];       /* UINT64_MAX: nothing */
    line_ref bytes[MODEL_MEMO_SLOTS];       /* where the line's bytes are */
    int mru;                                /* slot used last */
    decoded_info infos[DECODED_INFOS];      /* recent access kinds, decoded */
#if !NB_HOST_POINTERS
    GByteArray *buf;                        /* read_memory_vaddr's destination */
    uint64_t map_reads, vaddr_reads;        /* lines read each way (the exit line) */
#endif
} recent_lines;
static recent_lines *recent; /* [max_vcpus] */
static unsigned model_cpus;  /* model_ncpus(M), read on every access */
_Static_assert(MODEL_MEMO_SLOTS == 2, "vcpu_mem picks slots for exactly two lines");

static void forget_recent_lines(int ncpus)
{
    for (int i = 0; i < ncpus; i++) {
        for (int j = 0; j < MODEL_MEMO_SLOTS; j++) {
            recent[i].vline[j] = UINT64_MAX;
            recent[i].bytes[j] = (line_ref){0};
        }
    }
}
#if NB_HOST_POINTERS
static int phys_cache_on = 1;
static long phys_checks_left = PHYS_CHECKS;
#endif

/*
 * Which vCPU runs (API >= 4 builds).  QEMU 10.0 passes callbacks a vCPU index that
 * is a constant in the generated code, the index of the vCPU that *translated* the
 * block, whenever the block was translated without CF_PARALLEL (gen_cpu_index() in
 * accel/tcg/plugin-gen.c, "optimize when we run with a single vcpu").  Round-robin
 * TCG (thread=single, which the model needs) has no CF_PARALLEL, yet its vCPUs share
 * one host thread and every translation, so a block vCPU 0 translated reports vCPU 0
 * when vCPU 1 runs it.  Measured: in the ping-pong with both threads on CPU 1, 70 %
 * of the accesses arrived as vCPU 0, which scrambled every per-vCPU count and made
 * c2c transfers out of one vCPU's own accesses (cachemodel/README.md).  QEMU 7.2
 * loads the index at run time.  The running vCPU is QEMU's thread-local current_cpu,
 * numbered by gdb_get_cpu_index() (system mode: cpu_index + 1); neither is plugin API,
 * both are exported by QEMU's executable (-rdynamic), and a QEMU without them refuses
 * to load the plugin (QEMU loads plugins with RTLD_NOW) rather than count wrong.
 */
#if !NB_HOST_POINTERS
extern __thread void *current_cpu __attribute__((tls_model("initial-exec")));
extern int gdb_get_cpu_index(void *cpu);
static __thread void *last_cpu;
static __thread unsigned last_vcpu;

static inline unsigned running_vcpu(unsigned given)
{
    void *cpu = current_cpu;
    if (!cpu) {
        return given;
    }
    if (cpu != last_cpu) {
        last_vcpu = (unsigned)gdb_get_cpu_index(cpu) - 1;
        last_cpu = cpu;
    }
    return last_vcpu;
}
#else
static inline unsigned running_vcpu(unsigned given) { return given; }
#endif

/* Plugin messages reach QEMU's log only with `-d plugin`: say it on stderr too. */
static void warn(const char *msg)
{
    qemu_plugin_outs(msg);
    fputs(msg, stderr);
}

/* guest_ram=<size>: guest RAM is a shared memfd of that size (API >= 4 builds map it). */
static uint64_t guest_ram_bytes;

#if !NB_HOST_POINTERS
/*
 * Guest RAM read through a mapping of our own (API >= 4 builds).  API 4 has no host
 * pointer, and qemu_plugin_read_memory_vaddr() walks the page tables and copies per
 * call (the reads made 10.0 ~1.6x slower than 7.2 inside a region).  When the host
 * starts QEMU with `-object memory-backend-memfd,...,share=on -machine
 * memory-backend=...` and passes `guest_ram=<size>`, guest RAM is a memfd in QEMU's
 * fd table.  It does not exist yet when plugins load, so the first `begin` looks for
 * it: the one /proc/self/fd link `/memfd:...` of exactly that size, mapped read-only
 * and shared (the same page cache pages QEMU and devices write).  On q35 guest RAM
 * starts at guest-physical 0 and the part below the low-memory split (2 GiB when RAM
 * is >= 2.75 GiB, else all of it) is at the same offset in the RAM block, so
 * guest-physical [0, min(size, 2 GiB)) is read at that offset; anything else (RAM
 * above 4 GiB, the legacy VGA/BIOS hole at 0xa0000-0xfffff where ROM or SMRAM may
 * shadow RAM, two lines across a page boundary) still goes through read_memory_vaddr.
 * The first RAM_CHECKS mapped reads are compared with read_memory_vaddr; a mismatch
 * that persists on re-reading (a device may write between the two reads) turns the
 * mapping off for good and says so on stderr.  The mapping is never unmapped (a
 * remembered line may still point into it), only no longer used.
 */
#define RAM_CHECKS 200000
#define RAM_DIRECT_MAX (2ull << 30)
static const uint8_t *ram_map; /* NULL: not (or no longer) used; __atomic */
static uint64_t ram_direct_end;
static long ram_checks_left = RAM_CHECKS;
static int ram_tried;

static void ram_map_open(void)
{
    if (!guest_ram_bytes || !dma_detect ||
        __atomic_exchange_n(&ram_tried, 1, __ATOMIC_ACQ_REL)) {
        return;
    }
    DIR *d = opendir("/proc/self/fd");
    if (!d) {
        warn("netbed-cache: cannot list /proc/self/fd: guest RAM read by virtual address\n");
        return;
    }
    int found = -1, matches = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        char target[256];
        struct stat st;
        if (e->d_name[0] == '.') {
            continue;
        }
        int fd = atoi(e->d_name);
        ssize_t len = readlinkat(dirfd(d), e->d_name, target, sizeof(target) - 1);
        if (fd == dirfd(d) || len <= 0) {
            continue;
        }
        target[len] = '\0';
        if (!strncmp(target, "/memfd:", 7) && fstat(fd, &st) == 0 &&
            (uint64_t)st.st_size == guest_ram_bytes) {
            found = fd;
            matches++;
        }
    }
    void *p = matches == 1 ? mmap(NULL, guest_ram_bytes, PROT_READ, MAP_SHARED, found, 0)
                           : MAP_FAILED;
    closedir(d);
    if (p == MAP_FAILED) {
        g_autofree char *msg = g_strdup_printf(
            "netbed-cache: guest_ram=%" PRIu64 ": %d memfd(s) of that size%s: guest RAM "
            "read by virtual address (slower)\n", guest_ram_bytes, matches,
            matches == 1 ? ", mmap failed" : "");
        warn(msg);
        return;
    }
    ram_direct_end = guest_ram_bytes < RAM_DIRECT_MAX ? guest_ram_bytes : RAM_DIRECT_MAX;
    __atomic_store_n(&ram_map, (const uint8_t *)p, __ATOMIC_RELEASE);
    qemu_plugin_outs("netbed-cache: guest RAM mapped from its memfd\n");
}

/* Where the `n` bytes at guest-physical `pa` are in the mapping, or NULL. */
static inline const uint8_t *ram_bytes(uint64_t pa, unsigned n)
{
    const uint8_t *base = __atomic_load_n(&ram_map, __ATOMIC_ACQUIRE);
    if (!base || pa + n > ram_direct_end || (pa < 0x100000 && pa + n > 0xa0000) ||
        (pa >> 12) != ((pa + n - 1) >> 12)) {
        return NULL;
    }
    return base + pa;
}

/*
 * While checks are left: do the mapped bytes equal what read_memory_vaddr reads at
 * `vaddr`?  Read again up to twice before calling it a mismatch (a device write may
 * land between the two reads).  A mismatch turns the mapping off.
 */
static bool ram_check(const uint8_t *host, uint64_t vaddr, unsigned n, GByteArray *buf)
{
    if (__atomic_load_n(&ram_checks_left, __ATOMIC_RELAXED) <= 0) {
        return true;
    }
    for (int attempt = 0; attempt < 3; attempt++) {
        if (!qemu_plugin_read_memory_vaddr(vaddr, buf, n)) {
            return true; /* nothing to compare with: not a check */
        }
        if (!memcmp(host, buf->data, n)) {
            __atomic_sub_fetch(&ram_checks_left, 1, __ATOMIC_RELAXED);
            return true;
        }
    }
    if (__atomic_exchange_n(&ram_map, NULL, __ATOMIC_ACQ_REL)) {
        g_autofree char *msg = g_strdup_printf(
            "netbed-cache: guest-RAM mapping disagrees with read_memory_vaddr at "
            "vaddr 0x%" PRIx64 " (after %ld checks): mapping off, lines read by virtual "
            "address\n", vaddr, RAM_CHECKS - __atomic_load_n(&ram_checks_left,
                                                           __ATOMIC_RELAXED));
        warn(msg);
    }
    return false;
}
#endif

#if !NB_HOST_POINTERS
/* API >= 2: the physical address is a field of QEMU's hwaddr record (no search). */
static inline uint64_t phys_addr(unsigned vcpu, struct qemu_plugin_hwaddr *hw)
{
    return qemu_plugin_hwaddr_phys_addr(hw);
}
#else
static uint64_t phys_addr(unsigned vcpu, struct qemu_plugin_hwaddr *hw)
{
    if (!__atomic_load_n(&phys_cache_on, __ATOMIC_RELAXED)) {
        return qemu_plugin_hwaddr_phys_addr(hw);
    }
    uintptr_t host = (uintptr_t)((struct hwaddr_mirror_72 *)hw)->v.ram.hostaddr;
    uintptr_t page = host >> 12;
    phys_slot *slot = &phys_cache[vcpu * PHYS_CACHE_SIZE + (page % PHYS_CACHE_SIZE)];
    if (slot->host_page == page && page) {
        uint64_t pa = slot->phys_page << 12 | (host & 0xfff);
        if (__atomic_load_n(&phys_checks_left, __ATOMIC_RELAXED) > 0) {
            __atomic_sub_fetch(&phys_checks_left, 1, __ATOMIC_RELAXED);
            uint64_t want = qemu_plugin_hwaddr_phys_addr(hw);
            if (want != pa) {
                __atomic_store_n(&phys_cache_on, 0, __ATOMIC_RELAXED);
                warn("netbed-cache: physical-address cache disagrees with QEMU "
                     "(struct layout changed?): cache and DMA detection off\n");
                return want;
            }
        }
        return pa;
    }
    uint64_t pa = qemu_plugin_hwaddr_phys_addr(hw);
    if ((pa & 0xfff) != (host & 0xfff)) {
        /* RAM pages are page aligned on both sides: the mirror cannot be right */
        __atomic_store_n(&phys_cache_on, 0, __ATOMIC_RELAXED);
        warn("netbed-cache: host address does not match QEMU's physical address "
             "(struct layout changed?): address cache and DMA detection off\n");
        return pa;
    }
    slot->host_page = page;
    slot->phys_page = pa >> 12;
    return pa;
}
#endif

/*
 * Not cryptographic: a digest that changes whenever any one 8-byte word of the line
 * changes (each step is a bijection of the word: xor, then multiply by an odd
 * constant; the lanes are combined by xor with distinct rotations), and misses a
 * change of several words with probability ~2^-64.  Four independent lanes instead of
 * one chain of eight multiplies: the chain's latency was ~10% of vcpu_mem.
 */
static inline uint64_t line_digest(const uint8_t *p)
{
    const uint64_t k = 0xff51afd7ed558ccdull;
    uint64_t h[4] = {0x9e3779b97f4a7c15ull, 0xc2b2ae3d27d4eb4full, 0x165667b19e3779f9ull,
                     0x27d4eb2f165667c5ull};
    for (unsigned i = 0; i < line_bytes; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h[(i >> 3) & 3] = (h[(i >> 3) & 3] ^ w) * k;
    }
    uint64_t x = h[0] ^ (h[1] << 17 | h[1] >> 47) ^ (h[2] << 31 | h[2] >> 33) ^
                 (h[3] << 47 | h[3] >> 17);
    x ^= x >> 29;
    x *= k;
    x ^= x >> 32;
    return x == MODEL_SUM_UNKNOWN ? 1 : x;
}

/*
 * Digests of the line(s) an access touched: sums[0] for the line of `vaddr`, sums[1]
 * for the next one when the access crosses into it.  False (sums left unknown) when
 * the bytes cannot be read.
 */
static bool access_digests(unsigned vcpu, struct qemu_plugin_hwaddr *hw, uint64_t vaddr,
                           uint64_t pa, unsigned size, uint64_t sums[2], line_ref *ref)
{
    unsigned off = (unsigned)(pa & (line_bytes - 1));
    bool two = off + size > line_bytes;
#if NB_HOST_POINTERS
    if (!__atomic_load_n(&phys_cache_on, __ATOMIC_RELAXED)) {
        return false;
    }
    /* the bytes now in guest RAM, read through QEMU's host mapping */
    const uint8_t *l0 = (const uint8_t *)((struct hwaddr_mirror_72 *)hw)->v.ram.hostaddr - off;
    ref->host = l0;
#else
    uint64_t v0 = vaddr - (vaddr & (line_bytes - 1));
    unsigned n = line_bytes * (two ? 2 : 1);
    GByteArray *buf = recent[vcpu].buf;
    const uint8_t *l0 = ram_bytes(pa - off, n);
    if (l0 && ram_check(l0, v0, n, buf)) {
        recent[vcpu].map_reads++;
    } else {
        if (!qemu_plugin_read_memory_vaddr(v0, buf, n)) {
            return false;
        }
        l0 = NULL;
        recent[vcpu].vaddr_reads++;
    }
    ref->host = l0;
    ref->vaddr = v0;
    ref->valid = true;
    if (!l0) {
        l0 = buf->data;
    }
#endif
    sums[0] = line_digest(l0);
    sums[1] = two ? line_digest(l0 + line_bytes) : sums[0];
    return true;
}

/* Digest of a remembered line now, or MODEL_SUM_UNKNOWN. */
static uint64_t ref_digest(unsigned vcpu, line_ref ref)
{
#if NB_HOST_POINTERS
    return ref.host ? line_digest(ref.host) : MODEL_SUM_UNKNOWN;
#else
    if (ref.host && __atomic_load_n(&ram_map, __ATOMIC_RELAXED)) {
        return line_digest(ref.host);
    }
    GByteArray *buf = recent[vcpu].buf;
    if (!ref.valid || !qemu_plugin_read_memory_vaddr(ref.vaddr, buf, line_bytes)) {
        return MODEL_SUM_UNKNOWN;
    }
    return line_digest(buf->data);
#endif
}

static inline bool ref_valid(line_ref ref)
{
#if NB_HOST_POINTERS
    return ref.host != NULL;
#else
    return ref.valid;
#endif
}

static inline void lock(void)
{
    while (__atomic_test_and_set(&lock_flag, __ATOMIC_ACQUIRE)) {
        __builtin_ia32_pause();
    }
}

static inline void unlock(void) { __atomic_clear(&lock_flag, __ATOMIC_RELEASE); }

static inline bool is_counting(void) { return __atomic_load_n(&counting, __ATOMIC_RELAXED); }

static inline int mode_of(uint64_t pc) { return (pc >> 63) ? MODE_KERNEL : MODE_USER; }

/* Replace `path` with the output of `write`: readers never see half a file. */
static bool replace_file(const char *path, void (*write)(model_tables *, FILE *),
                         model_tables *t, unsigned long n)
{
    g_autofree char *tmp = g_strdup_printf("%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        return false;
    }
    if (write) {
        write(t, f);
    } else {
        fprintf(f, "%lu\n", n);
    }
    return fclose(f) == 0 && rename(tmp, path) == 0;
}

/*
 * The writer thread: each window's tables in the order the windows closed, then the
 * window's number in `<sites>.window`, the host's sign that both tables are that
 * window's.  No lock: the copy belongs to this thread.
 */
static gpointer tables_writer_main(gpointer data)
{
    for (;;) {
        gpointer item = g_async_queue_pop(tables_queue);
        if (item == &tables_stop) {
            return NULL;
        }
        model_tables *t = item;
        unsigned long n = model_tables_window(t);
        bool ok = replace_file(sites_path, model_tables_write_sites, t, n) &&
                  (!c2c_path || replace_file(c2c_path, model_tables_write_c2c, t, n)) &&
                  (!payload_path ||
                   replace_file(payload_path, model_tables_write_payload, t, n)) &&
                  replace_file(tables_window_path, NULL, NULL, n);
        if (!ok) {
            warn("netbed-cache: cannot write the attribution tables\n");
        }
        model_tables_free(t);
    }
}

/* Caller holds the lock.  The pass ranges again when the file changed (or appeared). */
static void load_passes(void)
{
    struct stat st;
    if (!passes_path || stat(passes_path, &st) != 0) {
        return;
    }
    if (st.st_ino == passes_seen.st_ino && st.st_size == passes_seen.st_size &&
        st.st_mtim.tv_sec == passes_seen.st_mtim.tv_sec &&
        st.st_mtim.tv_nsec == passes_seen.st_mtim.tv_nsec) {
        return;
    }
    FILE *f = fopen(passes_path, "r");
    const char *err = f ? model_read_passes(M, f) : "cannot open";
    if (f) {
        fclose(f);
    }
    if (err) {
        g_autofree char *msg = g_strdup_printf("netbed-cache: passes=%s: %s\n", passes_path, err);
        warn(msg);
        return;
    }
    passes_seen = st;
}

/* Caller holds the lock. */
static void snapshot(const char *marker)
{
    if (!out) {
        return;
    }
    for (int cpu = 0; cpu < model_ncpus(M); cpu++) {
        for (int mode = 0; mode < MODE_COUNT; mode++) {
            for (int ev = 0; ev < EV_COUNT; ev++) {
                fprintf(out, "%d,%s,%s,%" PRIu64 ",%s\n", cpu, model_mode_names[mode],
                        model_event_names[ev], model_counter(M, cpu, mode, ev), marker);
            }
        }
    }
    fflush(out);
}

/* trace=: one record of the access vcpu_mem is about to handle (caller: lock not held). */
static void trace_access(unsigned vcpu, int mode, model_site *site, uint64_t vaddr,
                         unsigned size, bool store, qemu_plugin_meminfo_t info)
{
    recent_lines *r = &recent[vcpu];
    struct qemu_plugin_hwaddr *hw = qemu_plugin_get_hwaddr(info, vaddr);
    if (!hw || qemu_plugin_hwaddr_is_io(hw)) {
        return;
    }
    uint64_t pa = phys_addr(vcpu, hw);
    uint64_t sums[2] = {MODEL_SUM_UNKNOWN, MODEL_SUM_UNKNOWN};
    line_ref ref = {0};
    bool have = dma_detect && access_digests(vcpu, hw, vaddr, pa, size, sums, &ref);
    uint64_t vline = vaddr >> line_shift;
    int slot = vline == r->vline[0] ? 0 : vline == r->vline[1] ? 1 : 1 - r->mru;
    model_trace_rec rec = {
        .pc = site ? site->pc : 0, .vaddr = vaddr, .paddr = pa, .sum0 = sums[0],
        .sum1 = sums[1],
        .evicted = ref_valid(r->bytes[slot]) ? ref_digest(vcpu, r->bytes[slot])
                                              : MODEL_SUM_UNKNOWN,
        .cpu = (uint8_t)vcpu, .mode = (uint8_t)mode, .store = store, .size = (uint8_t)size,
        .flags = have ? TRACE_SUMS : 0};
    lock();
    if (trace_left) {
        trace_left--;
        fwrite(&rec, sizeof(rec), 1, trace_out);
    }
    unlock();
}

static void vcpu_mem(unsigned int given, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    unsigned vcpu = running_vcpu(given);
    if (!is_counting() || vcpu >= model_cpus) {
        return;
    }
#ifdef NB_COST_FLOOR
    /* a costing build (cachemodel/README.md, "What a region costs"): QEMU's callbacks
     * and nothing else; never built by netbed */
    return;
#endif
    int mode = (int)((uintptr_t)udata & 1);
    model_site *site = (model_site *)((uintptr_t)udata & ~(uintptr_t)1);
    recent_lines *r = &recent[vcpu];
    /*
     * Two calls into QEMU per access otherwise.  Kept per kind of access, picked by the
     * bits where QEMU puts the load/store flag (oi | rw << 16 in 7.2 and 10.0), so a
     * copy's alternating loads and stores each keep theirs; the whole info is compared,
     * so another layout only costs more decoding.
     */
    decoded_info *d = &r->infos[(info >> 16) & (DECODED_INFOS - 1)];
    if (__builtin_expect(d->info != info, 0)) {
        d->info = info;
        d->size = 1u << qemu_plugin_mem_size_shift(info);
        d->store = qemu_plugin_mem_is_store(info);
    }
    unsigned size = d->size;
    bool store = d->store;
    if (__builtin_expect(trace_out != NULL, 0)) {
        trace_access(vcpu, mode, site, vaddr, size, store, info);
    }
    uint64_t vline = vaddr >> line_shift;
    bool crosses = (vaddr & (line_bytes - 1)) + size > line_bytes;
    /*
     * A virtual line this vCPU used in one of its last accesses (byte-wise rep movsb
     * alternates a source and a destination line, 64 times each): skip the address
     * translation, digest and lock when the model says the line is still in this L1
     * in a usable state.  Only this vCPU's memo is read; other vCPUs change it under
     * the lock, so with thread=single this is exact.
     */
    /* branch-free: a copy alternates between the two slots */
    int hit0 = vline == r->vline[0], hit1 = vline == r->vline[1];
    int slot = (hit0 | hit1) - 1 + (!hit0 & hit1); /* 0, 1, or -1: neither */
    if (slot >= 0 && !crosses && model_repeat_access(M, (int)vcpu, mode, store, slot, site)) {
        r->mru = slot;
        return;
    }
    if (slot < 0) {
        slot = 1 - r->mru;
    }
    struct qemu_plugin_hwaddr *hw = qemu_plugin_get_hwaddr(info, vaddr);
    if (!hw || qemu_plugin_hwaddr_is_io(hw)) {
        return; /* MMIO is not cached */
    }
    uint64_t pa = phys_addr(vcpu, hw);
    model_prefetch(M, pa); /* the model's sets load while the line is read and digested */
    uint64_t sums[2] = {MODEL_SUM_UNKNOWN, MODEL_SUM_UNKNOWN};
    line_ref ref = {0};
    bool have_sums = dma_detect && access_digests(vcpu, hw, vaddr, pa, size, sums, &ref);
    lock();
    if (ref_valid(r->bytes[slot]) && model_memo_sum_unknown(M, (int)vcpu, slot)) {
        /* stores went by the fast path: record what they left before moving on */
        model_set_memo_sum(M, (int)vcpu, slot, ref_digest(vcpu, r->bytes[slot]));
    }
    model_access(M, (int)vcpu, mode, pa, size, store, have_sums ? sums : NULL, slot, site);
    unlock();
    r->vline[slot] = crosses ? UINT64_MAX : vline;
    r->bytes[slot] = crosses ? (line_ref){0} : ref;
    r->mru = slot;
}

static void vcpu_tb_exec(unsigned int given, void *udata)
{
    unsigned vcpu = running_vcpu(given);
    if (!is_counting() || vcpu >= model_cpus) {
        return;
    }
    uintptr_t u = (uintptr_t)udata;
    /* Only this vCPU's thread writes its instruction counter: no lock needed. */
    model_count(M, (int)vcpu, (int)(u & 1), EV_INSTRUCTIONS, u >> 1);
}

static void reset_done(qemu_plugin_id_t id);

static void request_retranslation(void) { qemu_plugin_reset(plugin_id, reset_done); }

static void vcpu_marker(unsigned int given, void *udata)
{
    unsigned vcpu = running_vcpu(given);
    uint32_t disp = (uint32_t)(uintptr_t)udata;
    unsigned kind = (disp >> 20) & 0xf, id = disp & 0xfffff;
    char name[48];
    bool changed = false;
    model_tables *tables = NULL;

    snprintf(name, sizeof(name), "%s:%u",
             kind == KIND_BEGIN ? "begin" : kind == KIND_END ? "end"
             : kind == KIND_ARM ? "arm" : "snapshot", id);
#if !NB_HOST_POINTERS
    if (kind == KIND_BEGIN || kind == KIND_ARM) {
        ram_map_open(); /* once; guest RAM exists by now */
    }
#endif
    lock();
    if (kind == KIND_ARM) {
        /*
         * Arm ahead of a region: the flush and the retranslation with callbacks happen
         * now, so the `begin` after it only starts counting.  Nothing is counted until
         * then (callbacks return while no region is open).  Armed already (a region
         * open, a second `arm`, QEMU 7.2 after its first region): nothing to do, and on
         * 7.2 a second flush would crash QEMU (top comment).
         */
        snapshot(name);
        if (!armed) {
            __atomic_store_n(&armed, 1, __ATOMIC_RELAXED);
            changed = true;
        }
    } else if (kind == KIND_BEGIN) {
        snapshot(name);
        if (open_regions++ == 0) {
            if (cold_start) {
                model_clear_caches(M);
            }
            if (sites_path) {
                model_sites_clear(M);
            }
            load_passes();
            model_payload_window(M);
            forget_recent_lines(model_ncpus(M)); /* mappings may have changed meanwhile */
            __atomic_store_n(&counting, 1, __ATOMIC_RELAXED);
            if (!armed) {
                __atomic_store_n(&armed, 1, __ATOMIC_RELAXED);
                changed = true;
            }
        }
    } else if (kind == KIND_END) {
        if (open_regions == 0) {
            g_autofree char *msg =
                g_strdup_printf("netbed-cache: vcpu %u: end:%u with no open region\n", vcpu, id);
            qemu_plugin_outs(msg);
        } else if (--open_regions == 0) {
            if (!always_on) {
                __atomic_store_n(&counting, 0, __ATOMIC_RELAXED);
                /*
                 * Back to uninstrumented code until the next `arm` or `begin`.  A reset
                 * asked for while one is pending is dropped by QEMU, which is harmless:
                 * the pending flush comes after this change, and translation reads
                 * `armed`.
                 */
                if (NB_DISARM_AT_END) {
                    __atomic_store_n(&armed, 0, __ATOMIC_RELAXED);
                    changed = true;
                }
            }
            windows_closed++;
            if (tables_queue) {
                tables = model_tables_take(M, windows_closed);
            }
        }
        snapshot(name);
    } else {
        snapshot(name);
    }
    unlock();
    if (tables) {
        g_async_queue_push(tables_queue, tables);
    }
    if (changed) {
        request_retranslation();
    }
}

static bool marker_disp(struct qemu_plugin_insn *insn, uint32_t *disp)
{
    if (qemu_plugin_insn_size(insn) != 7) {
        return false;
    }
#if QEMU_PLUGIN_VERSION >= 3
    uint8_t b[7];
    if (qemu_plugin_insn_data(insn, b, sizeof(b)) != sizeof(b)) {
        return false;
    }
#else
    const uint8_t *b = qemu_plugin_insn_data(insn);
#endif
    if (b[0] != 0x0f || b[1] != 0x1f || b[2] != 0x80 || b[6] != MARKER_MAGIC) {
        return false;
    }
    memcpy(disp, b + 3, 4);
    unsigned kind = (*disp >> 20) & 0xf;
    return kind >= KIND_BEGIN && kind <= KIND_ARM;
}

static void vcpu_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    bool instrument = __atomic_load_n(&armed, __ATOMIC_RELAXED);

    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint32_t disp;
        if (marker_disp(insn, &disp)) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, vcpu_marker, QEMU_PLUGIN_CB_NO_REGS,
                                                   (void *)(uintptr_t)disp);
        }
        if (instrument) {
            uint64_t pc = qemu_plugin_insn_vaddr(insn);
            int mode = mode_of(pc);
            uintptr_t site = 0;
            if (sites_path) {
                lock();
                site = (uintptr_t)model_site_get(M, pc, mode);
                unlock();
            }
            qemu_plugin_register_vcpu_mem_cb(insn, vcpu_mem, QEMU_PLUGIN_CB_NO_REGS,
                                             QEMU_PLUGIN_MEM_RW, (void *)(site | (uintptr_t)mode));
        }
    }
    if (instrument && n) {
        int mode = mode_of(qemu_plugin_insn_vaddr(qemu_plugin_tb_get_insn(tb, 0)));
        qemu_plugin_register_vcpu_tb_exec_cb(tb, vcpu_tb_exec, QEMU_PLUGIN_CB_NO_REGS,
                                             (void *)(uintptr_t)((n << 1) | (size_t)mode));
    }
}

static void plugin_exit(qemu_plugin_id_t id, void *udata)
{
    if (tables_writer) {
        /* the last window's tables are written before QEMU goes */
        g_async_queue_push(tables_queue, &tables_stop);
        g_thread_join(tables_writer);
        tables_writer = NULL;
    }
#if !NB_HOST_POINTERS
    if (guest_ram_bytes && __atomic_load_n(&ram_tried, __ATOMIC_RELAXED)) {
        uint64_t mapped = 0, by_vaddr = 0;
        for (int i = 0; i < model_ncpus(M); i++) {
            mapped += recent[i].map_reads;
            by_vaddr += recent[i].vaddr_reads;
        }
        g_autofree char *msg = g_strdup_printf(
            "netbed-cache: line reads: %" PRIu64 " from the guest-RAM mapping (%ld checked), "
            "%" PRIu64 " by virtual address; mapping %s\n", mapped,
            RAM_CHECKS - ram_checks_left, by_vaddr,
            __atomic_load_n(&ram_map, __ATOMIC_RELAXED) ? "on" : "off");
        warn(msg);
    }
#endif
    lock();
    snapshot("exit");
    if (trace_out) {
        fclose(trace_out);
        trace_out = NULL;
    }
    if (out) {
        fclose(out);
        out = NULL;
    }
    unlock();
}

static void register_callbacks(qemu_plugin_id_t id)
{
    qemu_plugin_register_vcpu_tb_trans_cb(id, vcpu_tb_trans);
    qemu_plugin_register_atexit_cb(id, plugin_exit, NULL);
}

/* qemu_plugin_reset() dropped every callback and flushed the code cache. */
static void reset_done(qemu_plugin_id_t id) { register_callbacks(id); }

static bool parse_size(const char *s, uint64_t *v)
{
    char *end;
    unsigned long long x = strtoull(s, &end, 0);
    if (end == s) {
        return false;
    }
    switch (*end) {
    case 'k': case 'K': x <<= 10; end++; break;
    case 'm': case 'M': x <<= 20; end++; break;
    case 'g': case 'G': x <<= 30; end++; break;
    default: break;
    }
    if (*end == 'i') {
        end++; /* KiB, MiB, GiB */
    }
    if (*end == 'B') {
        end++;
    }
    *v = x;
    return *end == '\0';
}

static int fail(const char *fmt, const char *a, const char *b)
{
    g_autofree char *msg = g_strdup_printf(fmt, a, b);
    qemu_plugin_outs(msg);
    fprintf(stderr, "%s", msg);
    return -1;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    model_config cfg = {
        .l1d = {32 << 10, 8},
        .l2 = {1 << 20, 16},
        .llc = {8 << 20, 16},
        .line = 64,
        .ncpus = info->system_emulation ? info->system.max_vcpus : 1,
        .ddio = true,
        .user_exact_below = 1ull << 32, /* testbed.formats.symbols.USER_EXACT_BELOW */
        .user_granule = 1ull << 40,     /* testbed.formats.symbols.USER_GRANULE */
    };
    const char *out_path = NULL;

    for (int i = 0; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) {
            return fail("netbed-cache: argument %s%s is not key=value\n", argv[i], "");
        }
        g_autofree char *key = g_strndup(argv[i], (gsize)(eq - argv[i]));
        const char *val = eq + 1;
        uint64_t v = 0;
        bool is_num = parse_size(val, &v);
        if (!strcmp(key, "out")) {
            out_path = val;
        } else if (!strcmp(key, "sites")) {
            sites_path = g_strdup(val);
        } else if (!strcmp(key, "c2c")) {
            c2c_path = g_strdup(val);
        } else if (!strcmp(key, "payload")) {
            payload_path = g_strdup(val);
        } else if (!strcmp(key, "passes")) {
            passes_path = g_strdup(val);
        } else if (!strcmp(key, "trace")) {
            trace_out = fopen(val, "w");
            if (!trace_out) {
                return fail("netbed-cache: cannot open %s: %s\n", val, g_strerror(errno));
            }
        } else if (!strcmp(key, "trace_max") && is_num) {
            trace_left = v;
        } else if (!strcmp(key, "cold") || !strcmp(key, "always") || !strcmp(key, "dma") ||
                   !strcmp(key, "ddio")) {
            bool b;
            if (!qemu_plugin_bool_parse(key, val, &b)) {
                return fail("netbed-cache: %s=%s: expected on/off\n", key, val);
            }
            *(!strcmp(key, "cold") ? &cold_start : !strcmp(key, "always") ? &always_on
              : !strcmp(key, "dma") ? &dma_detect : &cfg.ddio) = b;
        } else if (!is_num) {
            return fail("netbed-cache: %s=%s: expected a number (suffix K/M/G allowed)\n", key,
                        val);
        } else if (!strcmp(key, "l1d_size")) {
            cfg.l1d.size = v;
        } else if (!strcmp(key, "l1d_assoc")) {
            cfg.l1d.ways = (uint32_t)v;
        } else if (!strcmp(key, "l2_size")) {
            cfg.l2.size = v;
        } else if (!strcmp(key, "l2_assoc")) {
            cfg.l2.ways = (uint32_t)v;
        } else if (!strcmp(key, "llc_size")) {
            cfg.llc.size = v;
        } else if (!strcmp(key, "llc_assoc")) {
            cfg.llc.ways = (uint32_t)v;
        } else if (!strcmp(key, "line")) {
            cfg.line = (uint32_t)v;
        } else if (!strcmp(key, "user_exact")) {
            cfg.user_exact_below = v;
        } else if (!strcmp(key, "user_granule")) {
            cfg.user_granule = v;
        } else if (!strcmp(key, "guest_ram")) {
            guest_ram_bytes = v; /* API >= 4 builds read lines from it; API 1 ignores it */
        } else {
            return fail("netbed-cache: unknown argument %s (known: out, sites, c2c, payload, "
                        "passes, trace, trace_max, l1d_size, l1d_assoc, "
                        "l2_size, l2_assoc, llc_size, llc_assoc, line, cold, always, dma, "
                        "ddio, user_exact, user_granule, guest_ram)%s\n",
                        key, "");
        }
    }
    if (!info->system_emulation) {
        return fail("netbed-cache: needs full-system emulation (physical addresses)%s%s\n", "",
                    "");
    }
    const char *err = model_config_error(&cfg);
    if (err) {
        return fail("netbed-cache: bad cache geometry: %s%s\n", err, "");
    }
    if (!out_path) {
        return fail("netbed-cache: missing out=<csv path>%s%s\n", "", "");
    }
    if (c2c_path && !sites_path) {
        return fail("netbed-cache: c2c=%s needs sites=<csv path> too (the c2c table names "
                    "instruction sites)%s\n", c2c_path, "");
    }
    if (payload_path && !sites_path) {
        return fail("netbed-cache: payload=%s needs sites=<csv path> too (its passes are the "
                    "instruction sites')%s\n", payload_path, "");
    }
    out = fopen(out_path, "a");
    if (!out) {
        return fail("netbed-cache: cannot open %s: %s\n", out_path, g_strerror(errno));
    }
    if (ftell(out) == 0) {
        fprintf(out, "vcpu,mode,event,value,marker\n");
        fflush(out);
    }
    line_bytes = cfg.line;
    line_shift = (unsigned)__builtin_ctz(cfg.line);
    M = model_new(&cfg);
    if (sites_path) {
        tables_window_path = g_strdup_printf("%s.window", sites_path);
        if (!replace_file(tables_window_path, NULL, NULL, 0)) {
            return fail("netbed-cache: cannot write %s.window: %s\n", sites_path,
                        g_strerror(errno));
        }
        tables_queue = g_async_queue_new();
        tables_writer = g_thread_new("netbed-tables", tables_writer_main, NULL);
    }
#if NB_HOST_POINTERS
    phys_cache = g_new0(phys_slot, (gsize)cfg.ncpus * PHYS_CACHE_SIZE);
#endif
    recent = g_new0(recent_lines, (gsize)cfg.ncpus);
    model_cpus = (unsigned)cfg.ncpus;
    for (int i = 0; i < cfg.ncpus; i++) {
        for (int j = 0; j < DECODED_INFOS; j++) {
            recent[i].infos[j].info = (qemu_plugin_meminfo_t)~0u; /* none: decoded on use */
        }
    }
    forget_recent_lines(cfg.ncpus);
#if !NB_HOST_POINTERS
    for (int i = 0; i < cfg.ncpus; i++) {
        recent[i].buf = g_byte_array_sized_new(2 * cfg.line);
    }
#endif
    plugin_id = id;
    counting = armed = always_on;
    register_callbacks(id);
    return 0;
}
