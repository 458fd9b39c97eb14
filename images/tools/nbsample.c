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
 * asked rate.  Usage: nbsample DURATION INTERVAL
 */
#include <ctype.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

int main(int argc, char **argv)
{
	double duration, interval, end, now;
	char path[64], buf[1024], comm[64], up[32];
	long pid = 0, last = 0, ppid;
	unsigned long long start;
	struct timespec pause;
	int cpu;

	if (argc != 3 || (duration = atof(argv[1])) <= 0 || (interval = atof(argv[2])) <= 0) {
		fprintf(stderr, "usage: nbsample DURATION INTERVAL (seconds)\n");
		return 2;
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
			}
		}
		nanosleep(&pause, NULL);
	}
	return 0;
}
