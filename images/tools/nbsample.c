/*
 * nbsample: where does the reader run?  Samples the CPU (field 39 of
 * /proc/<pid>/stat) of netserver's data process, the newest child of the oldest
 * process named "netserver", every INTERVAL seconds for DURATION seconds.
 *
 * Output, one line per sample, the format testbed.measure parses:
 *     # pid <pid>          whenever the sampled process changes
 *     <uptime> <cpu>       /proc/uptime seconds (guest clock) and the CPU
 *
 * A shell loop under TCG with both vCPUs saturated managed 2-8 samples a
 * second; this costs one open/read per sample and no fork, so it keeps the
 * asked rate.  Usage: nbsample DURATION INTERVAL [QUEUE_FILE]
 *
 * With QUEUE_FILE, each round also samples how much payload waits in the reader's
 * established TCP sockets (testbed/formats/sockqueue.py parses the file):
 *     # sockqueue source=sock_diag|proc [why]   how the samples were read
 *     # socket <i> local=<addr>:<port> peer=<addr>:<port>
 *     <ns> <i> <rqueue> <rmem_alloc> <rcvbuf>
 * <ns> is CLOCK_MONOTONIC (the clock of nbsnap's stamps.txt, so analysis keeps only
 * samples between the window's edges); rqueue is the payload received in order and not
 * yet copied to user space (tcp rcv_nxt - copied_seq), rmem_alloc the memory its skbs
 * hold, rcvbuf the socket's buffer (sk_rcvbuf) at that moment; "-" where the source
 * has no such field.  None of these reads takes the socket lock, which the reader
 * holds through every recv (SIOCINQ and TCP_INFO take it: images/tools/nbsnap.c,
 * units): sock_diag's exact lookup without INET_DIAG_INFO fills idiag_rqueue and
 * INET_DIAG_SKMEMINFO from READ_ONCE loads (tcp_diag_get_info, sock_diag_put_meminfo
 * in Linux 6.1).  Where sock_diag has no TCP handler (the distro kernel keeps
 * tcp_diag in a module the guest lacks) the samples come from /proc/net/tcp{,6}'s
 * rx_queue (get_tcp4_sock: the same difference, also without the lock), which has no
 * memory fields.  Results stay in memory until the end (no writes inside the window).
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int read_file(const char *path, char *buf, size_t len)
{
	FILE *f = fopen(path, "r");
	size_t n;

	if (!f)
		return -1;
	n = fread(buf, 1, len - 1, f);
	fclose(f);
	buf[n] = '\0';
	return (int)n;
}

/* comm, ppid, start time and processor of a /proc/<pid>/stat line. */
static int parse_stat(const char *stat, char *comm, size_t comm_len, long *ppid,
		      unsigned long long *start, int *cpu)
{
	const char *open = strchr(stat, '('), *close = strrchr(stat, ')');
	const char *p;
	int field;
	size_t n;

	if (!open || !close || close < open)
		return -1;
	n = (size_t)(close - open - 1);
	if (n >= comm_len)
		n = comm_len - 1;
	memcpy(comm, open + 1, n);
	comm[n] = '\0';
	/* after ") " comes field 3 (state) */
	p = close + 2;
	for (field = 3; *p && field <= 39; field++) {
		if (field == 4)
			*ppid = strtol(p, NULL, 10);
		else if (field == 22)
			*start = strtoull(p, NULL, 10);
		else if (field == 39)
			*cpu = atoi(p);
		p = strchr(p, ' ');
		if (!p)
			break;
		p++;
	}
	return field > 39 ? 0 : -1;
}

/* The newest netserver child of the oldest netserver, or 0. */
static long find_reader(void)
{
	DIR *d = opendir("/proc");
	struct dirent *e;
	char path[300], buf[1024], comm[64];
	long daemon = 0, best = 0, ppid, pids[4096];
	unsigned long long start, daemon_start = ~0ULL, best_start = 0;
	int cpu, n = 0, i;

	if (!d)
		return 0;
	while ((e = readdir(d)) && n < 4096) {
		if (!isdigit((unsigned char)e->d_name[0]))
			continue;
		snprintf(path, sizeof(path), "/proc/%s/stat", e->d_name);
		if (read_file(path, buf, sizeof(buf)) <= 0 ||
		    parse_stat(buf, comm, sizeof(comm), &ppid, &start, &cpu) ||
		    strcmp(comm, "netserver"))
			continue;
		pids[n++] = atol(e->d_name);
		if (start < daemon_start) {
			daemon_start = start;
			daemon = atol(e->d_name);
		}
	}
	closedir(d);
	for (i = 0; i < n; i++) {
		snprintf(path, sizeof(path), "/proc/%ld/stat", pids[i]);
		if (read_file(path, buf, sizeof(buf)) <= 0 ||
		    parse_stat(buf, comm, sizeof(comm), &ppid, &start, &cpu))
			continue;
		if (ppid == daemon && start >= best_start) {
			best_start = start;
			best = pids[i];
		}
	}
	return best;
}

static double uptime(char *text, size_t len)
{
	char buf[128];

	if (read_file("/proc/uptime", buf, sizeof(buf)) <= 0)
		return -1;
	sscanf(buf, "%31s", text);
	(void)len;
	return atof(text);
}

/* ------------------------------------------------------------ socket queue samples */

#define MAX_QSOCKS 16
#define TCP_ESTABLISHED_STATE 1
static struct {
	unsigned long inode;
	int family;
	struct inet_diag_sockid id;
} qs[MAX_QSOCKS];
static int nqs, diag_fd = -1, use_proc;
static char queue_why[160];
static FILE *qout;

/* Inodes of the established-or-not sockets among PID's fds ("socket:[N]" links). */
static int socket_inodes(long pid, unsigned long *inodes, int max)
{
	char dir[64], path[400], link[64];
	DIR *d;
	struct dirent *e;
	int n = 0;

	snprintf(dir, sizeof(dir), "/proc/%ld/fd", pid);
	d = opendir(dir);
	if (!d)
		return 0;
	while ((e = readdir(d)) && n < max) {
		ssize_t len;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		len = readlink(path, link, sizeof(link) - 1);
		if (len <= 8)
			continue;
		link[len] = '\0';
		if (!strncmp(link, "socket:[", 8))
			inodes[n++] = strtoul(link + 8, NULL, 10);
	}
	closedir(d);
	return n;
}

static long long mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void addr_port(int family, const __be32 *addr, __be16 port, char *out, size_t len)
{
	char text[INET6_ADDRSTRLEN] = "?";

	if (family == AF_INET6 && addr[0] == 0 && addr[1] == 0 && addr[2] == htonl(0xffff))
		inet_ntop(AF_INET, &addr[3], text, sizeof(text)); /* v4-mapped: as IPv4 */
	else
		inet_ntop(family, addr, text, sizeof(text));
	snprintf(out, len, "%s:%u", text, (unsigned)ntohs(port));
}

/* One sock_diag request: a dump of FAMILY's established TCP sockets, or (id given) the
 * exact lookup of one socket; memory info asked, INET_DIAG_INFO (which locks) not. */
static int diag_request(int family, const struct inet_diag_sockid *id)
{
	struct {
		struct nlmsghdr nlh;
		struct inet_diag_req_v2 req;
	} msg;
	struct sockaddr_nl sa = {.nl_family = AF_NETLINK};

	memset(&msg, 0, sizeof(msg));
	msg.nlh.nlmsg_len = sizeof(msg);
	msg.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
	msg.nlh.nlmsg_flags = NLM_F_REQUEST | (id ? 0 : NLM_F_DUMP);
	msg.req.sdiag_family = (unsigned char)family;
	msg.req.sdiag_protocol = IPPROTO_TCP;
	msg.req.idiag_states = 1u << TCP_ESTABLISHED_STATE;
	msg.req.idiag_ext = 1u << (INET_DIAG_SKMEMINFO - 1);
	if (id)
		msg.req.id = *id;
	else
		msg.req.id.idiag_cookie[0] = msg.req.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;
	return sendto(diag_fd, &msg, sizeof(msg), 0, (struct sockaddr *)&sa, sizeof(sa)) < 0
		? -1 : 0;
}

/* The memory fields of a reply's INET_DIAG_SKMEMINFO attribute, if present. */
static void diag_meminfo(struct nlmsghdr *h, long long *rmem, long long *rcvbuf)
{
	struct inet_diag_msg *m = NLMSG_DATA(h);
	int len = (int)h->nlmsg_len - (int)NLMSG_LENGTH(sizeof(*m));
	struct rtattr_ {
		unsigned short rta_len, rta_type;
	} *a = (struct rtattr_ *)(m + 1);

	while (len >= (int)sizeof(*a) && a->rta_len >= sizeof(*a) && a->rta_len <= len) {
		if (a->rta_type == INET_DIAG_SKMEMINFO &&
		    a->rta_len >= sizeof(*a) + sizeof(__u32) * (SK_MEMINFO_RCVBUF + 1)) {
			__u32 *v = (__u32 *)(a + 1);

			*rmem = v[SK_MEMINFO_RMEM_ALLOC];
			*rcvbuf = v[SK_MEMINFO_RCVBUF];
		}
		len -= (a->rta_len + 3) & ~3;
		a = (struct rtattr_ *)((char *)a + ((a->rta_len + 3) & ~3));
	}
}

/*
 * Read replies until the request is answered. For a dump, every message whose inode is
 * the reader's is recorded (discovery); for an exact lookup, its fields go to the
 * outputs. Returns 0, or -errno of an NLMSG_ERROR, or -1.
 */
static int diag_replies(int family, const unsigned long *inodes, int ninodes,
			long long *rq, long long *rmem, long long *rcvbuf)
{
	static char buf[32768];

	for (;;) {
		ssize_t n = recv(diag_fd, buf, sizeof(buf), 0);
		struct nlmsghdr *h;

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
			struct inet_diag_msg *m = NLMSG_DATA(h);

			if (h->nlmsg_type == NLMSG_DONE)
				return 0;
			if (h->nlmsg_type == NLMSG_ERROR) {
				struct nlmsgerr *err = NLMSG_DATA(h);

				return err->error ? err->error : 0;
			}
			if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY)
				continue;
			if (!inodes) { /* exact lookup: one answer */
				*rq = m->idiag_rqueue;
				diag_meminfo(h, rmem, rcvbuf);
				return 0;
			}
			for (int i = 0; i < ninodes && nqs < MAX_QSOCKS; i++)
				if (m->idiag_inode == inodes[i]) {
					qs[nqs].inode = inodes[i];
					qs[nqs].family = family;
					qs[nqs++].id = m->id;
				}
		}
	}
}

/* The established sockets of the reader, from sock_diag dumps (or, without a TCP
 * handler there, /proc/net/tcp{,6}); their header lines go to the queue file. */
static int queue_discover(long pid)
{
	unsigned long inodes[64];
	int ninodes = socket_inodes(pid, inodes, 64);
	static const int families[] = {AF_INET, AF_INET6};

	nqs = 0;
	if (!ninodes)
		return -1;
	if (!use_proc) {
		for (size_t f = 0; f < 2; f++) {
			int rc = diag_request(families[f], NULL) ? -1 :
				 diag_replies(families[f], inodes, ninodes, NULL, NULL, NULL);

			if (rc && families[f] == AF_INET) {
				use_proc = 1;
				snprintf(queue_why, sizeof(queue_why), "(sock_diag: %s)",
					 strerror(rc < -1 ? -rc : errno ? errno : EIO));
				break;
			}
		}
	}
	if (use_proc) {
		static const char *files[] = {"/proc/net/tcp", "/proc/net/tcp6"};

		nqs = 0;
		for (size_t f = 0; f < 2; f++) {
			FILE *in = fopen(files[f], "r");
			char line[512];

			while (in && fgets(line, sizeof(line), in)) {
				unsigned long inode;
				unsigned st;
				char la[64], pa[64];

				if (sscanf(line, "%*s %63s %63s %x %*s %*s %*s %*s %*s %lu", la, pa,
					   &st, &inode) != 4 || st != TCP_ESTABLISHED_STATE)
					continue;
				for (int i = 0; i < ninodes && nqs < MAX_QSOCKS; i++)
					if (inode == inodes[i]) {
						qs[nqs].inode = inode;
						qs[nqs].family = f ? AF_INET6 : AF_INET;
						/* addresses as the kernel prints them: hex words */
						for (int w = 0; w < (f ? 4 : 1); w++) {
							sscanf(la + 8 * w, "%8x", &qs[nqs].id.idiag_src[w]);
							sscanf(pa + 8 * w, "%8x", &qs[nqs].id.idiag_dst[w]);
						}
						qs[nqs].id.idiag_sport =
							htons((unsigned short)strtoul(strchr(la, ':') + 1, NULL, 16));
						qs[nqs++].id.idiag_dport =
							htons((unsigned short)strtoul(strchr(pa, ':') + 1, NULL, 16));
					}
			}
			if (in)
				fclose(in);
		}
	}
	if (!nqs)
		return -1;
	fprintf(qout, "# sockqueue source=%s%s%s\n", use_proc ? "proc" : "sock_diag",
		queue_why[0] ? " " : "", queue_why);
	for (int i = 0; i < nqs; i++) {
		char local[80], peer[80];

		addr_port(qs[i].family, qs[i].id.idiag_src, qs[i].id.idiag_sport, local,
			  sizeof(local));
		addr_port(qs[i].family, qs[i].id.idiag_dst, qs[i].id.idiag_dport, peer,
			  sizeof(peer));
		fprintf(qout, "# socket %d local=%s peer=%s\n", i, local, peer);
	}
	return 0;
}

static void field(long long v, char *out, size_t len)
{
	if (v < 0)
		snprintf(out, len, "-");
	else
		snprintf(out, len, "%lld", v);
}

/* One round: every discovered socket's queue, one line each. */
static void queue_sample(void)
{
	long long t = mono_ns();

	if (use_proc) {
		static const char *files[] = {"/proc/net/tcp", "/proc/net/tcp6"};
		static char text[1 << 16];

		for (size_t f = 0; f < 2; f++) {
			FILE *in = fopen(files[f], "r");
			char *line, *save = NULL;
			size_t n;

			if (!in)
				continue;
			n = fread(text, 1, sizeof(text) - 1, in);
			fclose(in);
			text[n] = '\0';
			for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
				unsigned long inode, rq;

				if (sscanf(line, "%*s %*s %*s %*s %*[0-9A-Fa-f]:%lx %*s %*s %*s %*s %lu",
					   &rq, &inode) != 2)
					continue;
				for (int i = 0; i < nqs; i++)
					if (qs[i].inode == inode)
						fprintf(qout, "%lld %d %lu - -\n", t, i, rq);
			}
		}
		return;
	}
	for (int i = 0; i < nqs; i++) {
		long long rq = -1, rmem = -1, rcvbuf = -1;
		char a[24], b[24], c[24];

		if (diag_request(qs[i].family, &qs[i].id) ||
		    diag_replies(qs[i].family, NULL, 0, &rq, &rmem, &rcvbuf))
			continue; /* gone (the test ended): no sample */
		field(rq, a, sizeof(a));
		field(rmem, b, sizeof(b));
		field(rcvbuf, c, sizeof(c));
		fprintf(qout, "%lld %d %s %s %s\n", t, i, a, b, c);
	}
}

int main(int argc, char **argv)
{
	double duration, interval, end, now;
	char path[64], buf[1024], comm[64], up[32];
	long pid = 0, last = 0, ppid, queued = 0;
	unsigned long long start;
	struct timespec pause;
	int cpu;

	if ((argc != 3 && argc != 4) || (duration = atof(argv[1])) <= 0 ||
	    (interval = atof(argv[2])) <= 0) {
		fprintf(stderr, "usage: nbsample DURATION INTERVAL [QUEUE_FILE] (seconds)\n");
		return 2;
	}
	if (argc == 4) {
		static char qbuf[1 << 20]; /* the samples stay here until the end */

		qout = fopen(argv[3], "w");
		if (!qout) {
			fprintf(stderr, "nbsample: %s: %s\n", argv[3], strerror(errno));
			return 2;
		}
		setvbuf(qout, qbuf, _IOFBF, sizeof(qbuf));
		diag_fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
		if (diag_fd < 0) {
			use_proc = 1;
			snprintf(queue_why, sizeof(queue_why), "(sock_diag: %s)", strerror(errno));
		}
	}
	pause.tv_sec = (time_t)interval;
	pause.tv_nsec = (long)((interval - (double)pause.tv_sec) * 1e9);
	end = uptime(up, sizeof(up)) + duration;
	while ((now = uptime(up, sizeof(up))) >= 0 && now < end) {
		if (!pid)
			pid = find_reader();
		if (pid) {
			snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
			if (read_file(path, buf, sizeof(buf)) <= 0 ||
			    parse_stat(buf, comm, sizeof(comm), &ppid, &start, &cpu)) {
				pid = 0; /* gone: look again next round */
			} else {
				if (pid != last) {
					printf("# pid %ld\n", pid);
					last = pid;
				}
				printf("%s %d\n", up, cpu);
				fflush(stdout);
				if (qout && queued != pid)
					queued = queue_discover(pid) ? 0 : pid;
				if (qout && queued == pid)
					queue_sample();
			}
		}
		nanosleep(&pause, NULL);
	}
	if (qout && fclose(qout)) {
		fprintf(stderr, "nbsample: writing the queue samples: %s\n", strerror(errno));
		return 1;
	}
	return 0;
}
