/*
 * nbsnap: the measured window's edge reads, done by one process that is already
 * running, so a read costs system calls, not a fork and exec (under TCG with both
 * vCPUs busy, `ss` took ~0.7 s and five `cat`s of /proc ~0.8 s).
 *
 *   nbsnap OUTDIR IFACE PID  then one command per line on stdin, each answered
 *                            with one line "ok <command>" (or "error <why>") on stdout:
 *
 *   stamp LABEL    append "LABEL <ns>" to OUTDIR/stamps.txt (CLOCK_MONOTONIC)
 *   reader PID     the reader whose sockets `units` reads (replaces the argument); its
 *                  established TCP sockets are borrowed now (pidfd_getfd, so no
 *                  sock_diag module is needed) and kept until quit or the next `reader`
 *   units LABEL    tcp_info of the reader's established TCP sockets into
 *                  OUTDIR/tcpinfo-LABEL.txt (the reader stopped meanwhile: see
 *                  units()), the data NIC's sysfs statistics into
 *                  OUTDIR/nicstats-LABEL.txt; stamped "units-LABEL-start", then
 *                  "units-LABEL-sockets" between the two parts, and "units-LABEL"
 *   proc LABEL     /proc/softirqs, interrupts, net/softnet_stat, net/snmp, stat copied
 *                  into OUTDIR/proc-LABEL/; stamped "proc-LABEL-start"/"proc-LABEL"
 *   trace on|off   write 1/0 to /sys/kernel/tracing/tracing_on; stamped "trace-on|off"
 *   mark begin|end|arm  the cache model's marker NOP (id 1, as nbmark); stamped
 *                  "mark-..."; `arm` (before the window) makes QEMU retranslate with the
 *                  plugin's callbacks then, so `begin` only starts counting
 *   perfctl CTL ACK [PID]  open perf stat's control and ack FIFOs (`--control
 *                  fifo:CTL,ACK`); with PID (perf stat's, if its comm is "perf"), make
 *                  perf SCHED_FIFO too (best effort; stamped "perf-fifo" when done), so
 *                  its acks do not wait behind the busy reader (see perf_raise)
 *   perf enable|disable  write the command to perf's control FIFO and wait for its ack;
 *                  stamped "perf-begin-start"/"perf-begin" ("perf-end-..." for disable),
 *                  so perf's edge sits in the same line as the marker and the units
 *                  read, not one shell round trip away (it was the worst edge: 13-87 ms)
 *   quit
 * Several commands may share a line, separated by ';': done back to back, answered
 * once ("ok", or "error <what failed>").
 *
 * Cheap reads inside a cache-model region (where every system call runs ~10x slower
 * under the plugin, and the units read is what every other edge is compared to): the
 * reader's sockets are found and borrowed at `reader` (a /proc/PID/fd walk, pidfd
 * calls, names), outside the window, so a units read is one getsockopt per socket
 * plus a pread per NIC statistic on files opened at start (sysfs and seq files
 * regenerate at offset 0); the /proc files are kept open the same way. Nothing is
 * written while a line runs: stamps and read contents are kept in memory and
 * written when the line is done, before it is answered. Holding the borrowed
 * sockets keeps the connection open until nbsnap quits, which the window script
 * does before netperf is stopped. A units read that finds no borrowed socket
 * established looks for the reader's sockets again (as every read did before).
 *
 * nbsnap runs SCHED_FIFO (best effort): under load the receive path's softirq work
 * moves to ksoftirqd, and an edge read that shared its CPU waited behind it (under
 * the cache model a units read took up to 535 ms on virtio, against ~10 ms
 * usually). It sleeps on its input between commands, so it takes no CPU inside the
 * window.
 *
 * tcpinfo lines: "local=<addr>:<port> peer=<addr>:<port> bytes_acked=N
 * bytes_received=N bytes_sent=N segs_in=N segs_out=N data_segs_in=N data_segs_out=N"
 * (IPv4-mapped IPv6 addresses printed as IPv4). nicstats lines: "<name> <value>".
 * Marker encoding: keep in step with nbmark.c and cachemodel/plugin/plugin.c.
 */
#include <arpa/inet.h>
#include <sched.h>
#include <signal.h>
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef TCP_ESTABLISHED
#define TCP_ESTABLISHED 1
#endif

static const char *outdir, *iface;
static pid_t reader;
static int perf_ctl_fd = -1, perf_ack_fd = -1;

/* The reader's established TCP sockets, borrowed at `reader`. */
#define MAX_SOCKS 16
static struct {
	int fd;
	char local[80], peer[80];
} socks[MAX_SOCKS];
static int nsocks;

/* What a line writes, kept until the line is done (flush_pending). */
#define MAX_PENDING 32
static struct {
	char path[600];
	char *data;
	size_t len;
	int append, mkdir_parent;
} pending[MAX_PENDING];
static int npending;

static void keep(const char *path, const char *data, size_t len, int append, int mkdir_parent)
{
	if (npending == MAX_PENDING)
		return;
	snprintf(pending[npending].path, sizeof(pending[npending].path), "%s", path);
	pending[npending].data = malloc(len ? len : 1);
	if (!pending[npending].data)
		return;
	memcpy(pending[npending].data, data, len);
	pending[npending].len = len;
	pending[npending].append = append;
	pending[npending].mkdir_parent = mkdir_parent;
	npending++;
}

/* Stamps of the current line, appended to stamps.txt by flush_pending. */
static char stamps_buf[4096];
static size_t stamps_len;

static int flush_pending(void)
{
	char path[512];
	int rc = 0;

	for (int i = 0; i < npending; i++) {
		int fd;

		if (pending[i].mkdir_parent) {
			char dir[sizeof(pending[0].path)];
			char *slash;

			memcpy(dir, pending[i].path, sizeof(dir));
			slash = strrchr(dir, '/');
			if (slash) {
				*slash = '\0';
				mkdir(dir, 0755);
			}
		}
		fd = open(pending[i].path,
			  O_WRONLY | O_CREAT | (pending[i].append ? O_APPEND : O_TRUNC), 0644);
		if (fd < 0 || write(fd, pending[i].data, pending[i].len) != (ssize_t)pending[i].len)
			rc = -1;
		if (fd >= 0)
			close(fd);
		free(pending[i].data);
	}
	npending = 0;
	if (stamps_len) {
		int fd;

		snprintf(path, sizeof(path), "%s/stamps.txt", outdir);
		fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
		if (fd < 0 || write(fd, stamps_buf, stamps_len) != (ssize_t)stamps_len)
			rc = -1;
		if (fd >= 0)
			close(fd);
		stamps_len = 0;
	}
	return rc;
}

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void stamp(const char *label)
{
	long long ns = now_ns();
	int n = snprintf(stamps_buf + stamps_len, sizeof(stamps_buf) - stamps_len, "%s %lld\n",
			 label, ns);

	if (n > 0 && (size_t)n < sizeof(stamps_buf) - stamps_len)
		stamps_len += (size_t)n;
}

/* The whole of a file kept open (fd), read again from offset 0; length or -1. */
static ssize_t pread_all(int fd, char *buf, size_t size)
{
	size_t used = 0;
	ssize_t n;

	if (fd < 0)
		return -1;
	while (used < size && (n = pread(fd, buf + used, size - used, (off_t)used)) > 0)
		used += (size_t)n;
	return n < 0 ? -1 : (ssize_t)used;
}

static const char *proc_files[][2] = {
	{"/proc/softirqs", "softirqs"}, {"/proc/interrupts", "interrupts"},
	{"/proc/net/softnet_stat", "softnet_stat"}, {"/proc/net/snmp", "snmp"},
	{"/proc/stat", "stat"}};
#define NPROC (sizeof(proc_files) / sizeof(proc_files[0]))
static int proc_fds[NPROC];

static const char *nic_stats[] = {"rx_bytes", "rx_packets", "rx_dropped", "rx_errors",
				  "tx_bytes", "tx_packets"};
#define NSTATS (sizeof(nic_stats) / sizeof(nic_stats[0]))
static int stat_fds[NSTATS];

/* The files every snapshot reads, opened once (outside the window). */
static void open_sources(void)
{
	char src[512];

	for (size_t i = 0; i < NPROC; i++)
		proc_fds[i] = open(proc_files[i][0], O_RDONLY);
	for (size_t i = 0; i < NSTATS; i++) {
		snprintf(src, sizeof(src), "/sys/class/net/%s/statistics/%s", iface, nic_stats[i]);
		stat_fds[i] = open(src, O_RDONLY);
	}
}

static int proc_snapshot(const char *label)
{
	static char buf[1 << 17];
	char dst[600];
	int rc = 0;

	for (size_t i = 0; i < NPROC; i++) {
		ssize_t n = pread_all(proc_fds[i], buf, sizeof(buf));

		if (n < 0) {
			rc = -1;
			continue;
		}
		snprintf(dst, sizeof(dst), "%s/proc-%s/%s", outdir, label, proc_files[i][1]);
		keep(dst, buf, (size_t)n, 0, 1);
	}
	return rc;
}

static void addr_text(const struct sockaddr_storage *ss, char *out, size_t len)
{
	char text[INET6_ADDRSTRLEN] = "?";
	unsigned port = 0;

	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *a = (const struct sockaddr_in *)ss;

		inet_ntop(AF_INET, &a->sin_addr, text, sizeof(text));
		port = ntohs(a->sin_port);
	} else if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;

		if (IN6_IS_ADDR_V4MAPPED(&a->sin6_addr))
			inet_ntop(AF_INET, &a->sin6_addr.s6_addr[12], text, sizeof(text));
		else
			inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof(text));
		port = ntohs(a->sin6_port);
	}
	snprintf(out, len, "%s:%u", text, port);
}

static void release_reader(void)
{
	for (int i = 0; i < nsocks; i++)
		close(socks[i].fd);
	nsocks = 0;
}

/* Borrow the reader's established TCP sockets: each of its socket fds is copied with
 * pidfd_getfd (Linux 5.6) and kept, with its addresses, for the units reads; other
 * fds are closed again at once. Needs no sock_diag module. */
static int borrow_reader(pid_t pid)
{
	char dir[64], link[128], path[400];
	int pidfd;
	DIR *d;
	struct dirent *e;

	release_reader();
	snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)pid);
	pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	d = opendir(dir);
	if (pidfd < 0 || !d) {
		if (d)
			closedir(d);
		if (pidfd >= 0)
			close(pidfd);
		return -1;
	}
	while ((e = readdir(d)) && nsocks < MAX_SOCKS) {
		struct tcp_info ti;
		struct sockaddr_storage la, pa;
		socklen_t tl = sizeof(ti), ll = sizeof(la), pl = sizeof(pa);
		ssize_t n;
		int fd;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		n = readlink(path, link, sizeof(link) - 1);
		if (n <= 0 || strncmp(link, "socket:", 7))
			continue;
		fd = (int)syscall(SYS_pidfd_getfd, pidfd, atoi(e->d_name), 0);
		if (fd < 0)
			continue;
		memset(&ti, 0, sizeof(ti));
		if (!getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &tl) &&
		    ti.tcpi_state == TCP_ESTABLISHED && !getsockname(fd, (void *)&la, &ll) &&
		    !getpeername(fd, (void *)&pa, &pl)) {
			addr_text(&la, socks[nsocks].local, sizeof(socks[nsocks].local));
			addr_text(&pa, socks[nsocks].peer, sizeof(socks[nsocks].peer));
			socks[nsocks++].fd = fd;
		} else {
			close(fd);
		}
	}
	closedir(d);
	close(pidfd);
	return nsocks ? 0 : -1;
}

/* tcp_info of the borrowed sockets still established, as tcpinfo lines into buf. */
static int read_socks(char *buf, size_t size, size_t *len)
{
	int found = 0;

	*len = 0;
	for (int i = 0; i < nsocks; i++) {
		struct tcp_info ti;
		socklen_t tl = sizeof(ti);
		int n;

		memset(&ti, 0, sizeof(ti));
		if (getsockopt(socks[i].fd, IPPROTO_TCP, TCP_INFO, &ti, &tl) ||
		    ti.tcpi_state != TCP_ESTABLISHED)
			continue;
		n = snprintf(buf + *len, size - *len,
			     "local=%s peer=%s bytes_acked=%llu bytes_received=%llu "
			     "bytes_sent=%llu segs_in=%u segs_out=%u data_segs_in=%u "
			     "data_segs_out=%u\n",
			     socks[i].local, socks[i].peer, (unsigned long long)ti.tcpi_bytes_acked,
			     (unsigned long long)ti.tcpi_bytes_received,
			     (unsigned long long)ti.tcpi_bytes_sent, ti.tcpi_segs_in,
			     ti.tcpi_segs_out, ti.tcpi_data_segs_in, ti.tcpi_data_segs_out);
		if (n > 0 && (size_t)n < size - *len) {
			*len += (size_t)n;
			found++;
		}
	}
	return found;
}

/*
 * Every read of a snapshot once, results dropped: run at `reader`, outside the window,
 * so the first window's reads do not meet their code (kernel and ours) for the first
 * time inside a region, where QEMU translates it with the plugin's callbacks (the
 * first window of a boot read its units in 256 ms against ~20 ms later).
 */
static void warm_reads(void)
{
	static char buf[1 << 17];
	size_t len;

	read_socks(buf, sizeof(buf), &len);
	for (size_t i = 0; i < NSTATS; i++)
		pread_all(stat_fds[i], buf, sizeof(buf));
	for (size_t i = 0; i < NPROC; i++)
		pread_all(proc_fds[i], buf, sizeof(buf));
}

static int units(const char *label)
{
	static char buf[8192];
	char path[512], value[64], stats[1024];
	size_t len, slen = 0;
	int rc = 0, held;

	/*
	 * The reader is held still (SIGSTOP) for the socket reads. getsockopt(TCP_INFO)
	 * takes the socket lock, which the reader holds through every recv; the lock is
	 * not fair, and a waiter on another vCPU (under TCG's round robin that vCPU is not
	 * even running when the lock is released) mostly found the reader holding it
	 * again: under the cache model, virtio TCP_STREAM, 35-280 ms per read and 5-34
	 * wake-ups that found the lock taken. A stopped reader leaves recv at the next
	 * segment (a pending signal ends the copy loop), releases the lock and cannot take
	 * it back, so the read waits for one release: 2-17 ms there. A recv the stop
	 * interrupted before copying anything restarts by itself (no handler runs).
	 */
	held = reader > 0 && !kill(reader, SIGSTOP);
	if (!read_socks(buf, sizeof(buf), &len) && reader > 0) {
		/* none borrowed, or none established any more: look again (slow, as before) */
		borrow_reader(reader);
		read_socks(buf, sizeof(buf), &len);
	}
	if (held)
		kill(reader, SIGCONT);
	snprintf(path, sizeof(path), "units-%s-sockets", label);
	stamp(path); /* splits a slow units read: socket reads vs NIC statistics */
	if (!len)
		rc = -1;
	snprintf(path, sizeof(path), "%s/tcpinfo-%s.txt", outdir, label);
	keep(path, buf, len, 0, 0);
	for (size_t i = 0; i < NSTATS; i++) {
		ssize_t n = pread_all(stat_fds[i], value, sizeof(value) - 1);
		int w;

		if (n <= 0) {
			rc = -1;
			continue;
		}
		value[n] = '\0';
		value[strcspn(value, "\n")] = '\0';
		w = snprintf(stats + slen, sizeof(stats) - slen, "%s %s\n", nic_stats[i], value);
		if (w > 0 && (size_t)w < sizeof(stats) - slen)
			slen += (size_t)w;
	}
	snprintf(path, sizeof(path), "%s/nicstats-%s.txt", outdir, label);
	keep(path, stats, slen, 0, 0);
	return rc;
}

static void marker(unsigned kind)
{
	static unsigned char *page;
	uint32_t disp = 0x4E000000u | (kind & 0xfu) << 20 | 1u;
	unsigned char code[8] = {0x0f, 0x1f, 0x80, disp & 0xff, disp >> 8 & 0xff,
				 disp >> 16 & 0xff, disp >> 24, 0xc3};

	if (!page) {
		page = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (page == MAP_FAILED) {
			page = NULL;
			return;
		}
	}
	memcpy(page, code, sizeof(code));
	__builtin___clear_cache((char *)page, (char *)page + sizeof(code));
	((void (*)(void))page)();
}

static int tracing(int on)
{
	int fd = open("/sys/kernel/tracing/tracing_on", O_WRONLY);
	int rc = fd >= 0 && write(fd, on ? "1" : "0", 1) == 1 ? 0 : -1;

	if (fd >= 0)
		close(fd);
	return rc;
}

/* The process PID is perf (its comm), so raising it cannot hit a stranger. */
static int is_perf(pid_t pid)
{
	char path[64], comm[32] = "";
	int fd;
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/%d/comm", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	n = read(fd, comm, sizeof(comm) - 1);
	close(fd);
	return n > 0 && !strcmp(comm, "perf\n");
}

/*
 * perf stat's enable and disable are an ioctl per event and CPU, done with perf
 * moved to each CPU in turn (its affinity hop avoids IPIs), so its ack can wait for
 * a CPU the reader keeps busy. SCHED_FIFO, one below nbsnap's own (which sleeps on
 * the ack meanwhile), lets perf preempt the reader at its next preemption point.
 * Under the cache model it cut the median ack from 13 to 8 ms but not the tail (one
 * of 52 took 246 ms), so perf is now kept out of model windows (testbed.run.window);
 * in plain windows acks take at most 8 ms. perf sleeps in poll() inside the window.
 */
static void perf_raise(pid_t pid)
{
	struct sched_param sp = {.sched_priority = 9};

	if (pid > 0 && is_perf(pid) && sched_setscheduler(pid, SCHED_FIFO, &sp) == 0)
		stamp("perf-fifo");
}

/* perf's FIFOs, opened read-write: such an open of a FIFO never blocks. */
static int perf_open(const char *text)
{
	char ctl[160] = "", ack[160] = "";
	int pid = 0;

	if (sscanf(text, "%*s %159s %159s %d", ctl, ack, &pid) < 2)
		return -2;
	perf_raise((pid_t)pid);
	if (perf_ctl_fd >= 0)
		close(perf_ctl_fd);
	if (perf_ack_fd >= 0)
		close(perf_ack_fd);
	perf_ctl_fd = open(ctl, O_RDWR | O_CLOEXEC);
	perf_ack_fd = open(ack, O_RDWR | O_CLOEXEC);
	return perf_ctl_fd >= 0 && perf_ack_fd >= 0 ? 0 : -1;
}

/* "enable" or "disable" to perf, then its "ack\n" (perf writes the tag's NUL too). */
static int perf_command(const char *what)
{
	char buf[64];
	const char *msg = !strcmp(what, "enable") ? "enable\n" : "disable\n";
	size_t len = strlen(msg);

	if (perf_ctl_fd < 0 || perf_ack_fd < 0) {
		errno = EBADF;
		return -1;
	}
	if (write(perf_ctl_fd, msg, len) != (ssize_t)len)
		return -1;
	for (;;) {
		ssize_t n = read(perf_ack_fd, buf, sizeof(buf));

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		if (memchr(buf, '\n', (size_t)n))
			return 0;
	}
}

/* One command; 0 on success, -1 on failure, -2 when it is not a command. */
static int run_command(const char *text)
{
	char cmd[32] = "", arg[160] = "", label[200];
	int rc = 0;

	if (sscanf(text, "%31s %159s", cmd, arg) < 1)
		return 0;
	if (!strcmp(cmd, "stamp") && arg[0]) {
		stamp(arg);
		return 0;
	}
	if (!strcmp(cmd, "perfctl"))
		return perf_open(text);
	if (!strcmp(cmd, "perf")) {
		const char *edge = !strcmp(arg, "enable") ? "perf-begin" :
				   !strcmp(arg, "disable") ? "perf-end" : NULL;

		if (!edge)
			return -2;
		snprintf(label, sizeof(label), "%s-start", edge);
		stamp(label);
		errno = 0;
		rc = perf_command(arg);
		stamp(edge);
		return rc;
	}
	if (!strcmp(cmd, "reader") && arg[0]) {
		reader = (pid_t)atoi(arg);
		if (reader <= 0)
			return -2;
		borrow_reader(reader); /* none yet is not an error: units looks again */
		warm_reads();
		return 0;
	}
	if (!strcmp(cmd, "trace") && strcmp(arg, "on") && strcmp(arg, "off"))
		return -2;
	if (!strcmp(cmd, "mark") && strcmp(arg, "begin") && strcmp(arg, "end") &&
	    strcmp(arg, "arm"))
		return -2;
	if (strcmp(cmd, "units") && strcmp(cmd, "proc") && strcmp(cmd, "trace") &&
	    strcmp(cmd, "mark"))
		return -2;
	if (!arg[0])
		return -2;
	snprintf(label, sizeof(label), "%s-%s-start", cmd, arg);
	stamp(label);
	errno = 0;
	if (!strcmp(cmd, "units"))
		rc = units(arg);
	else if (!strcmp(cmd, "proc"))
		rc = proc_snapshot(arg);
	else if (!strcmp(cmd, "trace"))
		rc = tracing(!strcmp(arg, "on"));
	else
		marker(!strcmp(arg, "begin") ? 1 : !strcmp(arg, "end") ? 2 : 4 /* arm */);
	label[strlen(label) - 6] = '\0';
	stamp(label);
	return rc;
}

int main(int argc, char **argv)
{
	char line[512];

	if (argc != 4) {
		fprintf(stderr, "usage: nbsnap OUTDIR IFACE READER_PID (commands on stdin)\n");
		return 2;
	}
	outdir = argv[1];
	iface = argv[2];
	reader = (pid_t)atoi(argv[3]);
	setvbuf(stdout, NULL, _IOLBF, 0);
	{
		struct sched_param sp = {.sched_priority = 10};

		sched_setscheduler(0, SCHED_FIFO, &sp); /* best effort: edges not behind ksoftirqd */
	}
	open_sources();
	if (reader > 0)
		borrow_reader(reader);
	/* A line may hold several commands separated by ';', done back to back and
	 * answered once: the edge of the window costs one round trip, not one each. */
	while (fgets(line, sizeof(line), stdin)) {
		char errors[512] = "";
		char *save = NULL, *part;

		line[strcspn(line, "\n")] = '\0';
		if (!strcmp(line, "quit")) {
			release_reader();
			printf("ok quit\n");
			return 0;
		}
		for (part = strtok_r(line, ";", &save); part; part = strtok_r(NULL, ";", &save)) {
			int rc = run_command(part);

			if (rc == -2 || rc == -1) {
				size_t used = strlen(errors);

				snprintf(errors + used, sizeof(errors) - used, "%s%s: %s",
					 used ? "; " : "", part,
					 rc == -2 ? "unknown command" : strerror(errno ? errno : EIO));
			}
		}
		if (flush_pending() && !errors[0])
			snprintf(errors, sizeof(errors), "writing the results: %s",
				 strerror(errno ? errno : EIO));
		if (errors[0])
			printf("error %s\n", errors);
		else
			printf("ok\n");
	}
	return 0;
}
