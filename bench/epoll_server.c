/*
 * epoll_server: the machine's ceiling for the poetry protocol.
 *
 * Reads the poem once, then for every accepted connection writes the whole
 * poem and closes: the same work as the poetry servers under test, with no
 * logging and nothing else.  Single-threaded, non-blocking, epoll.
 *
 * usage: epoll_server [-i IFACE] [-b BACKLOG] PORT POEM
 * PORT 0 binds an ephemeral port.  The bound port is printed on standard
 * output as one line once the socket listens.  SIGINT/SIGTERM stop it
 * (exit 0).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static char *poem;
static size_t poem_len;
/* Bytes of the poem already written, per descriptor, for the rare client
 * whose socket buffer could not take the whole poem at once. */
static size_t *sent;
static size_t sent_cap;

static int read_poem(const char *path)
{
	FILE *f = fopen(path, "rb");
	struct stat sb;
	if (!f) {
		fprintf(stderr, "epoll_server: cannot read poem file '%s': %s\n", path,
			strerror(errno));
		return -1;
	}
	if (fstat(fileno(f), &sb) != 0 || sb.st_size <= 0) {
		fprintf(stderr, "epoll_server: poem file '%s' is empty\n", path);
		fclose(f);
		return -1;
	}
	poem_len = (size_t)sb.st_size;
	poem = malloc(poem_len);
	if (!poem || fread(poem, 1, poem_len, f) != poem_len) {
		fprintf(stderr, "epoll_server: cannot read poem file '%s'\n", path);
		fclose(f);
		return -1;
	}
	fclose(f);
	return 0;
}

static void raise_nofile(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
		sent_cap = rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > 1048576 ? 1048576
										  : rl.rlim_cur;
	} else {
		sent_cap = 1024;
	}
	sent = calloc(sent_cap, sizeof *sent);
}

/* Write what is left of the poem; 1 when done (or failed: the descriptor is
 * closed either way), 0 when the socket buffer is full. */
static int send_rest(int fd)
{
	while (sent[fd] < poem_len) {
		ssize_t n = send(fd, poem + sent[fd], poem_len - sent[fd], MSG_NOSIGNAL);
		if (n > 0) {
			sent[fd] += (size_t)n;
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && errno == EAGAIN) {
			return 0;
		} else {
			break;
		}
	}
	close(fd);
	return 1;
}

int main(int argc, char **argv)
{
	const char *iface = "127.0.0.1";
	long backlog = 4096;
	int opt, lfd, epfd;
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t slen = sizeof sin;
	struct sigaction sa = { .sa_handler = on_signal };
	struct epoll_event ev, events[256];
	char *end;
	long port;

	while ((opt = getopt(argc, argv, "i:b:")) != -1) {
		switch (opt) {
		case 'i':
			iface = optarg;
			break;
		case 'b':
			backlog = strtol(optarg, &end, 10);
			if (*end || backlog < 1)
				goto usage;
			break;
		default:
			goto usage;
		}
	}
	if (argc - optind != 2)
		goto usage;
	port = strtol(argv[optind], &end, 10);
	if (*end || port < 0 || port > 65535)
		goto usage;
	if (inet_pton(AF_INET, iface, &sin.sin_addr) != 1) {
		fprintf(stderr, "epoll_server: not an IPv4 address: %s\n", iface);
		return 2;
	}
	sin.sin_port = htons((unsigned short)port);
	if (read_poem(argv[optind + 1]) < 0)
		return 1;

	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	raise_nofile();
	if (!sent) {
		fprintf(stderr, "epoll_server: out of memory\n");
		return 1;
	}

	lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	opt = 1;
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &opt, sizeof opt) < 0 ||
	    bind(lfd, (struct sockaddr *)&sin, sizeof sin) < 0 ||
	    listen(lfd, (int)backlog) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&sin, &slen) < 0) {
		fprintf(stderr, "epoll_server: cannot listen on %s:%ld: %s\n", iface, port,
			strerror(errno));
		return 1;
	}
	printf("%d\n", ntohs(sin.sin_port));
	fflush(stdout);

	epfd = epoll_create1(EPOLL_CLOEXEC);
	ev = (struct epoll_event){ .events = EPOLLIN, .data.fd = lfd };
	if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) {
		fprintf(stderr, "epoll_server: epoll: %s\n", strerror(errno));
		return 1;
	}

	while (!stop_requested) {
		int n = epoll_wait(epfd, events, 256, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "epoll_server: epoll_wait: %s\n", strerror(errno));
			return 1;
		}
		for (int i = 0; i < n; i++) {
			int fd = events[i].data.fd;
			if (fd != lfd) {
				send_rest(fd); /* writable again */
				continue;
			}
			for (;;) {
				int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
				if (cfd < 0)
					break; /* EAGAIN, or out of descriptors: retry on next wakeup */
				if ((size_t)cfd >= sent_cap) {
					close(cfd);
					continue;
				}
				sent[cfd] = 0;
				if (send_rest(cfd))
					continue;
				ev = (struct epoll_event){ .events = EPOLLOUT, .data.fd = cfd };
				if (epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &ev) < 0)
					close(cfd);
			}
		}
	}
	close(lfd);
	close(epfd);
	return 0;

usage:
	fprintf(stderr, "usage: %s [-i IFACE] [-b BACKLOG] PORT POEM\n", argv[0]);
	return 2;
}
