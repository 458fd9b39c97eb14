/*
 * nbsnap: the measured window's edge reads, done by one process that is already
 * running, so a read costs system calls, not a fork and exec (under TCG with both
 * vCPUs busy, `ss` took ~0.7 s and five `cat`s of /proc ~0.8 s).
 *
 *   nbsnap OUTDIR IFACE PID  then one command per line on stdin, each answered
 *                            with one line "ok <command>" (or "error <why>") on stdout:
 *
 *   stamp LABEL    append "LABEL <ns>" to OUTDIR/stamps.txt (CLOCK_MONOTONIC)
 *   reader PID     the reader whose sockets `units` reads (replaces the argument)
 *   units LABEL    tcp_info of the reader PID's established TCP sockets (borrowed with
 *                  pidfd_getfd, so no sock_diag module is needed) into OUTDIR/tcpinfo-LABEL.txt, the data NIC's sysfs statistics into
 *                  OUTDIR/nicstats-LABEL.txt; stamped "units-LABEL-start"/"units-LABEL"
 *   proc LABEL     /proc/softirqs, interrupts, net/softnet_stat, net/snmp, stat copied
 *                  into OUTDIR/proc-LABEL/; stamped "proc-LABEL-start"/"proc-LABEL"
 *   trace on|off   write 1/0 to /sys/kernel/tracing/tracing_on; stamped "trace-on|off"
 *   mark begin|end the cache model's marker NOP (id 1, as nbmark); stamped "mark-..."
 *   quit
 * Several commands may share a line, separated by ';': done back to back, answered
 * once ("ok", or "error <what failed>").
 *
 * tcpinfo lines: "local=<addr>:<port> peer=<addr>:<port> bytes_acked=N
 * bytes_received=N bytes_sent=N segs_in=N segs_out=N data_segs_in=N data_segs_out=N"
 * (IPv4-mapped IPv6 addresses printed as IPv4). nicstats lines: "<name> <value>".
 * Marker encoding: keep in step with nbmark.c and cachemodel/plugin/plugin.c.
 */
#include <arpa/inet.h>
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

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void stamp(const char *label)
{
	long long ns = now_ns();
	char path[512];
	FILE *f;

	snprintf(path, sizeof(path), "%s/stamps.txt", outdir);
	f = fopen(path, "a");
	if (f) {
		fprintf(f, "%s %lld\n", label, ns);
		fclose(f);
	}
}

static int copy_file(const char *src, const char *dst)
{
	static char buf[1 << 16];
	int in = open(src, O_RDONLY), out;
	ssize_t n;

	if (in < 0)
		return -1;
	out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (out < 0) {
		close(in);
		return -1;
	}
	while ((n = read(in, buf, sizeof(buf))) > 0)
		if (write(out, buf, (size_t)n) != n)
			break;
	close(in);
	close(out);
	return n < 0 ? -1 : 0;
}

static int proc_snapshot(const char *label)
{
	static const char *files[][2] = {
		{"/proc/softirqs", "softirqs"}, {"/proc/interrupts", "interrupts"},
		{"/proc/net/softnet_stat", "softnet_stat"}, {"/proc/net/snmp", "snmp"},
		{"/proc/stat", "stat"}};
	char dir[512], dst[600];
	int rc = 0;

	snprintf(dir, sizeof(dir), "%s/proc-%s", outdir, label);
	mkdir(dir, 0755);
	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
		snprintf(dst, sizeof(dst), "%s/%s", dir, files[i][1]);
		rc |= copy_file(files[i][0], dst);
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

/* The reader's established TCP sockets: each of its socket fds is borrowed with
 * pidfd_getfd (Linux 5.6), read with getsockopt(TCP_INFO) and closed again at once,
 * so the connection's life is not changed. Needs no sock_diag module. */
static int dump_reader(pid_t pid, FILE *f)
{
	char dir[64], link[128], path[400];
	int pidfd, found = 0;
	DIR *d;
	struct dirent *e;

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
	while ((e = readdir(d))) {
		struct tcp_info ti;
		struct sockaddr_storage la, pa;
		socklen_t tl = sizeof(ti), ll = sizeof(la), pl = sizeof(pa);
		char local[80], peer[80];
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
			addr_text(&la, local, sizeof(local));
			addr_text(&pa, peer, sizeof(peer));
			fprintf(f, "local=%s peer=%s bytes_acked=%llu bytes_received=%llu "
				   "bytes_sent=%llu segs_in=%u segs_out=%u data_segs_in=%u "
				   "data_segs_out=%u\n",
				local, peer, (unsigned long long)ti.tcpi_bytes_acked,
				(unsigned long long)ti.tcpi_bytes_received,
				(unsigned long long)ti.tcpi_bytes_sent, ti.tcpi_segs_in,
				ti.tcpi_segs_out, ti.tcpi_data_segs_in, ti.tcpi_data_segs_out);
			found++;
		}
		close(fd);
	}
	closedir(d);
	close(pidfd);
	return found ? 0 : -1;
}

static int units(const char *label)
{
	static const char *stats[] = {"rx_bytes", "rx_packets", "rx_dropped", "rx_errors",
				      "tx_bytes", "tx_packets"};
	char path[512], value[64];
	int rc = 0;
	FILE *f;

	snprintf(path, sizeof(path), "%s/tcpinfo-%s.txt", outdir, label);
	f = fopen(path, "w");
	if (!f || dump_reader(reader, f))
		rc = -1;
	if (f)
		fclose(f);
	snprintf(path, sizeof(path), "%s/nicstats-%s.txt", outdir, label);
	f = fopen(path, "w");
	if (!f)
		return -1;
	for (size_t i = 0; i < sizeof(stats) / sizeof(stats[0]); i++) {
		char src[512];
		int in;
		ssize_t n;

		snprintf(src, sizeof(src), "/sys/class/net/%s/statistics/%s", iface, stats[i]);
		in = open(src, O_RDONLY);
		n = in < 0 ? -1 : read(in, value, sizeof(value) - 1);
		if (in >= 0)
			close(in);
		if (n <= 0) {
			rc = -1;
			continue;
		}
		value[n] = '\0';
		value[strcspn(value, "\n")] = '\0';
		fprintf(f, "%s %s\n", stats[i], value);
	}
	fclose(f);
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
	if (!strcmp(cmd, "reader") && arg[0]) {
		reader = (pid_t)atoi(arg);
		return reader > 0 ? 0 : -2;
	}
	if (!strcmp(cmd, "trace") && strcmp(arg, "on") && strcmp(arg, "off"))
		return -2;
	if (!strcmp(cmd, "mark") && strcmp(arg, "begin") && strcmp(arg, "end"))
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
		marker(!strcmp(arg, "begin") ? 1 : 2);
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
	/* A line may hold several commands separated by ';', done back to back and
	 * answered once: the edge of the window costs one round trip, not one each. */
	while (fgets(line, sizeof(line), stdin)) {
		char errors[512] = "";
		char *save = NULL, *part;

		line[strcspn(line, "\n")] = '\0';
		if (!strcmp(line, "quit")) {
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
		if (errors[0])
			printf("error %s\n", errors);
		else
			printf("ok\n");
	}
	return 0;
}
