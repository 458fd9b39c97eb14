/*
 * rxreader: the "blocking reader" of the wake-on-RX-CPU functional test.
 *
 * Listens on a TCP port, accepts one connection and reads it to EOF with
 * blocking recv() (the path whose wake-up the rx_wake_local patch changes;
 * epoll would not be), then prints how many bytes it read and, for every
 * recv() that returned data, the CPU it returned on (sched_getcpu()): where
 * the copy to user space really ran. Built static so it runs in any initramfs.
 *
 * usage: rxreader PORT
 */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CPUS 64

int main(int argc, char **argv)
{
	static char buf[1 << 16];
	unsigned long long bytes = 0, per_cpu[MAX_CPUS] = {0};
	struct sockaddr_in addr = {.sin_family = AF_INET};
	int one = 1, lfd, fd, cpu;
	ssize_t n;

	if (argc != 2) {
		fprintf(stderr, "usage: %s PORT\n", argv[0]);
		return 2;
	}
	addr.sin_port = htons(atoi(argv[1]));
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) || listen(lfd, 1)) {
		perror("rxreader: listen");
		return 1;
	}
	printf("rxreader: listening pid=%d port=%s\n", getpid(), argv[1]);
	fflush(stdout);
	fd = accept(lfd, NULL, NULL);
	if (fd < 0) {
		perror("rxreader: accept");
		return 1;
	}
	while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) {
		bytes += n;
		cpu = sched_getcpu();
		if (cpu >= 0 && cpu < MAX_CPUS)
			per_cpu[cpu]++;
	}
	printf("rxreader: bytes=%llu", bytes);
	for (cpu = 0; cpu < MAX_CPUS; cpu++)
		if (per_cpu[cpu])
			printf(" recv_cpu%d=%llu", cpu, per_cpu[cpu]);
	printf("\n");
	return n < 0;
}
