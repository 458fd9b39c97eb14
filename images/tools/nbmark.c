/*
 * nbmark: mark regions of interest for netbed's cache-model QEMU plugin.
 *
 *   nbmark begin <id>            open region <id> (counting starts when the first opens)
 *   nbmark end <id>              close it (counting stops when the last closes)
 *   nbmark snapshot <id>         write a counter snapshot without changing regions
 *   nbmark arm <id>              arm the plugin ahead of a region without counting: QEMU
 *                                retranslates with callbacks now, so a later `begin`
 *                                only starts counting (a no-op when armed already)
 *   nbmark run <id> -- cmd ...   begin, run cmd, end; exits with cmd's status
 *
 * The marker is the 7-byte NOP `nopl disp32(%rax)` = 0f 1f 80 <disp32> with
 * disp32 = 0x4E000000 | kind << 20 | id (kind 1 begin, 2 end, 3 snapshot, 4 arm;
 * id < 2^20).
 * The id is only known at run time, so the instruction is written into an
 * executable page and called.  On real hardware or without the plugin it is a NOP.
 * Keep the encoding in step with cachemodel/plugin/plugin.c and testbed/cachemodel.py.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

enum { KIND_BEGIN = 1, KIND_END = 2, KIND_SNAPSHOT = 3, KIND_ARM = 4 };

static void nb_marker(unsigned kind, unsigned id)
{
    static unsigned char *page;
    uint32_t disp = 0x4E000000u | (kind & 0xfu) << 20 | (id & 0xfffffu);
    unsigned char code[8] = {0x0f, 0x1f, 0x80, disp & 0xff, disp >> 8 & 0xff,
                             disp >> 16 & 0xff, disp >> 24, 0xc3 /* ret */};
    if (!page) {
        page = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS,
                    -1, 0);
        if (page == MAP_FAILED) {
            perror("nbmark: mmap");
            exit(125);
        }
    }
    memcpy(page, code, sizeof(code));
    __builtin___clear_cache((char *)page, (char *)page + sizeof(code));
    ((void (*)(void))page)();
}

static unsigned parse_id(const char *s)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 0);
    if (errno || end == s || *end || v > 0xfffff) {
        fprintf(stderr, "nbmark: bad id %s (want 0..1048575)\n", s);
        exit(2);
    }
    return (unsigned)v;
}

static int usage(void)
{
    fprintf(stderr, "usage: nbmark begin|end|snapshot|arm <id>\n"
                    "       nbmark run <id> -- command [args...]\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        return usage();
    }
    unsigned id = parse_id(argv[2]);
    if (!strcmp(argv[1], "begin") && argc == 3) {
        nb_marker(KIND_BEGIN, id);
    } else if (!strcmp(argv[1], "end") && argc == 3) {
        nb_marker(KIND_END, id);
    } else if (!strcmp(argv[1], "snapshot") && argc == 3) {
        nb_marker(KIND_SNAPSHOT, id);
    } else if (!strcmp(argv[1], "arm") && argc == 3) {
        nb_marker(KIND_ARM, id);
    } else if (!strcmp(argv[1], "run") && argc >= 5 && !strcmp(argv[3], "--")) {
        nb_marker(KIND_BEGIN, id);
        pid_t pid = fork();
        if (pid < 0) {
            perror("nbmark: fork");
            nb_marker(KIND_END, id);
            return 125;
        }
        if (pid == 0) {
            execvp(argv[4], argv + 4);
            fprintf(stderr, "nbmark: exec %s: %s\n", argv[4], strerror(errno));
            _exit(127);
        }
        int status = 0;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        nb_marker(KIND_END, id);
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    } else {
        return usage();
    }
    return 0;
}
