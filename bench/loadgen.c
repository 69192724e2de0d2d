/*
 * loadgen: a closed-loop load generator for poetry servers.
 *
 * Keeps C connections in flight against HOST:PORT.  In fetch mode (the
 * default) each connection connects, reads to end-of-file, checks the byte
 * count against the expected poem size, closes, and a new connection takes its
 * place.  In hold mode (-H) it opens C connections and keeps them open while
 * reading slowly (at most -r bytes every -i milliseconds per connection), to
 * see how many concurrent clients a slow server can hold; a connection that
 * ends is replaced.  In HTTP mode (-k PATH) each connection sends
 * "GET PATH HTTP/1.1" and, once the whole response has arrived, the next
 * request on the same connection (keep-alive), one request in flight per
 * connection; a connection the server closes is replaced.  A response needs a
 * Content-Length or ends at end-of-file; chunked responses are not supported
 * (counted as bad responses).
 *
 * The run is bounded by -d SECONDS and/or -n FETCHES (at most N connections
 * are started and the run ends when all of them have finished), and it stops
 * early and still reports on SIGINT/SIGTERM.  The result is one JSON line on
 * standard output; with -p MS a progress line is printed every MS
 * milliseconds first.  Every outcome of a started connection (of a started
 * request, in HTTP mode) is counted exactly once: fetches (end-of-file with
 * the expected byte count; a whole response with the expected body size),
 * mismatches (another byte count, split into short and long), errors
 * (refused, reset, timed out, other; in HTTP mode also a status other than
 * 2xx and a malformed response), or abandoned (still open when the run
 * stopped).
 *
 * Exit status: 0 after a run (whatever the outcomes), 2 on a usage error,
 * 1 when the run could not start.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum state { ST_IDLE, ST_CONNECTING, ST_OPEN };
enum outcome { OUT_EOF, OUT_ERROR, OUT_TIMEOUT, OUT_STATUS, OUT_BAD, OUT_CLOSED };
enum phase { PH_HEADERS, PH_BODY };

/* HTTP mode: the most header bytes a response may have. */
#define HEADER_MAX 8192

struct conn {
	int fd;
	enum state state;
	uint32_t gen;      /* bumped on every start; stale pause entries skip */
	int paused;        /* hold mode: waiting before the next read */
	int receiving;     /* hold mode: has received at least one byte */
	uint64_t start_ns; /* when connect() was called (HTTP: the request sent) */
	long long bytes;   /* HTTP mode: body bytes of the current response */
	/* HTTP mode only. */
	enum phase phase;
	int keep_alive;    /* the server keeps the connection after this response */
	int until_close;   /* no Content-Length: the body ends at end-of-file */
	long long body_left;
	size_t header_len;
	char *header;      /* HEADER_MAX bytes, allocated once per slot */
};

struct pause_entry {
	uint32_t slot;
	uint32_t gen;
	uint64_t resume_ns;
};

struct options {
	int concurrency;
	double duration;       /* seconds, 0 = unbounded */
	long long max_fetches; /* 0 = unbounded */
	long long expected;    /* -1 = do not check */
	double timeout;        /* seconds per fetch (connect phase in hold mode) */
	int hold;
	int read_chunk;        /* hold mode: bytes per read */
	int read_interval_ms;  /* hold mode: pause between reads */
	int progress_ms;       /* 0 = no progress lines */
	int max_connecting;    /* hold mode: connects in flight at once */
	const char *http_path; /* HTTP mode: the path to GET, or NULL */
	const char *host;
	const char *port;
};

struct stats {
	long long started, fetches, mismatches, errors, abandoned;
	long long refused, reset, timeouts, other, http_status, bad_response;
	long long short_, long_; /* mismatches: fewer or more bytes than expected */
	long long connections;    /* TCP connections opened (HTTP mode: fewer than requests) */
	long long connected; /* hold mode: connections that got established */
	long long bytes;
	long long max_open, max_receiving;
	char first_error[96];
	uint32_t *lat_us;
	size_t lat_len, lat_cap;
};

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s [-c CONNS] [-d SECONDS] [-n FETCHES] [-b BYTES] [-T SECONDS]\n"
		"          [-H [-r BYTES] [-i MS] [-P CONNECTING] | -k PATH] [-p MS] HOST PORT\n"
		"  -c  connections kept in flight (default 50)\n"
		"  -d  stop after this many seconds (default 10 unless -n is given)\n"
		"  -n  start at most this many fetches; stop when all have finished\n"
		"  -b  expected bytes per fetch (HTTP: per response body); others are mismatches\n"
		"  -T  seconds before an unfinished fetch counts as an error (default 10)\n"
		"  -H  hold mode: keep the connections open, reading slowly\n"
		"  -r  hold mode: bytes per read (default 64)\n"
		"  -i  hold mode: milliseconds between reads of one connection (default 100)\n"
		"  -P  hold mode: connection attempts in flight at once (default 512)\n"
		"  -k  HTTP/1.1 keep-alive mode: GET PATH again and again on each connection\n"
		"  -p  print a progress line every MS milliseconds\n",
		argv0);
}

static int parse_long(const char *s, long long min, long long *out)
{
	char *end;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (errno || *s == '\0' || *end != '\0' || v < min)
		return -1;
	*out = v;
	return 0;
}

static int parse_double(const char *s, double *out)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || *s == '\0' || *end != '\0' || v < 0)
		return -1;
	*out = v;
	return 0;
}

static int parse_options(int argc, char **argv, struct options *o)
{
	long long v;
	int opt, have_duration = 0;

	*o = (struct options){
		.concurrency = 50,
		.duration = 10,
		.max_fetches = 0,
		.expected = -1,
		.timeout = 10,
		.read_chunk = 64,
		.read_interval_ms = 100,
		.max_connecting = 512,
	};
	while ((opt = getopt(argc, argv, "c:d:n:b:T:Hr:i:p:P:k:h")) != -1) {
		switch (opt) {
		case 'c':
			if (parse_long(optarg, 1, &v) || v > 1000000)
				return -1;
			o->concurrency = (int)v;
			break;
		case 'd':
			if (parse_double(optarg, &o->duration))
				return -1;
			have_duration = 1;
			break;
		case 'n':
			if (parse_long(optarg, 1, &o->max_fetches))
				return -1;
			break;
		case 'b':
			if (parse_long(optarg, 0, &o->expected))
				return -1;
			break;
		case 'T':
			if (parse_double(optarg, &o->timeout) || o->timeout == 0)
				return -1;
			break;
		case 'H':
			o->hold = 1;
			break;
		case 'r':
			if (parse_long(optarg, 1, &v) || v > 65536)
				return -1;
			o->read_chunk = (int)v;
			break;
		case 'i':
			if (parse_long(optarg, 0, &v) || v > 3600000)
				return -1;
			o->read_interval_ms = (int)v;
			break;
		case 'p':
			if (parse_long(optarg, 1, &v) || v > 3600000)
				return -1;
			o->progress_ms = (int)v;
			break;
		case 'P':
			if (parse_long(optarg, 1, &v) || v > 1000000)
				return -1;
			o->max_connecting = (int)v;
			break;
		case 'k':
			if (optarg[0] != '/' || strpbrk(optarg, " \r\n"))
				return -1;
			o->http_path = optarg;
			break;
		default:
			return -1;
		}
	}
	if (argc - optind != 2)
		return -1;
	if (o->hold && o->http_path)
		return -1;
	/* -n alone bounds the run by count; -d 0 means "no time bound". */
	if (o->max_fetches && !have_duration)
		o->duration = 0;
	if (o->duration == 0 && o->max_fetches == 0)
		return -1;
	o->host = argv[optind];
	o->port = argv[optind + 1];
	return 0;
}

static void raise_nofile(rlim_t want)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
		return;
	if (rl.rlim_cur >= want)
		return;
	rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? want : rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);
}

static struct options opt;
static struct stats st;
static struct conn *conns;
static int epfd;
static struct sockaddr_storage addr;
static socklen_t addrlen;
static int family;

/* Slots not in use, as a stack. */
static uint32_t *idle;
static int idle_top;
static int open_count, connecting_count, receiving_count;
static uint64_t backoff_until;

/* Hold mode: connections waiting to read again, in resume order (the pause
 * is the same for all, so appending keeps the ring sorted). */
static struct pause_entry *ring;
static size_t ring_cap, ring_head, ring_len;

static void record_latency(uint32_t us)
{
	if (st.lat_len == st.lat_cap) {
		size_t cap = st.lat_cap ? st.lat_cap * 2 : 65536;
		uint32_t *p = realloc(st.lat_us, cap * sizeof *p);
		if (!p)
			return; /* keep counting; percentiles use what fits */
		st.lat_us = p;
		st.lat_cap = cap;
	}
	st.lat_us[st.lat_len++] = us;
}

static void note_first_error(const char *message)
{
	if (!st.first_error[0])
		snprintf(st.first_error, sizeof st.first_error, "%s", message);
}

static void count_error(int err)
{
	st.errors++;
	note_first_error(strerror(err));
	if (err == ECONNREFUSED)
		st.refused++;
	else if (err == ECONNRESET || err == EPIPE)
		st.reset++;
	else if (err == ETIMEDOUT)
		st.timeouts++;
	else
		st.other++;
}

static void release(uint32_t slot)
{
	struct conn *c = &conns[slot];
	close(c->fd); /* also removes it from the epoll set */
	if (c->state == ST_CONNECTING)
		connecting_count--;
	else
		open_count--;
	if (c->receiving)
		receiving_count--;
	c->fd = -1;
	c->state = ST_IDLE;
	c->paused = 0;
	c->receiving = 0;
	idle[idle_top++] = slot;
}

/* A whole poem or response arrived: a fetch, or a mismatch if its size is off. */
static void count_arrival(struct conn *c, uint64_t now)
{
	if (opt.expected >= 0 && c->bytes != opt.expected) {
		st.mismatches++;
		if (c->bytes < opt.expected)
			st.short_++;
		else
			st.long_++;
	} else {
		uint64_t us = (now - c->start_ns) / 1000;
		st.fetches++;
		record_latency(us > UINT32_MAX ? UINT32_MAX : (uint32_t)us);
	}
}

static void finish(uint32_t slot, enum outcome out, int err, uint64_t now)
{
	struct conn *c = &conns[slot];
	switch (out) {
	case OUT_EOF:
		count_arrival(c, now);
		break;
	case OUT_TIMEOUT:
		count_error(ETIMEDOUT);
		break;
	case OUT_STATUS:
		st.errors++;
		st.http_status++;
		note_first_error("HTTP status other than 2xx");
		break;
	case OUT_BAD:
		st.errors++;
		st.bad_response++;
		note_first_error("malformed or unsupported HTTP response");
		break;
	case OUT_CLOSED:
		st.errors++;
		st.other++;
		note_first_error("connection closed before a whole response");
		break;
	case OUT_ERROR:
		count_error(err);
		break;
	}
	release(slot);
}

static void send_request(uint32_t slot, uint64_t now, int count_it);

/* Start a connection in a free slot; 0 on success, -1 if it failed at once
 * (counted as an error, slot freed). */
static int start(uint32_t slot)
{
	struct conn *c = &conns[slot];
	struct epoll_event ev = { .data.u32 = slot };
	int fd, r;

	st.started++;
	st.connections++;
	fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		count_error(errno);
		idle[idle_top++] = slot;
		return -1;
	}
	c->fd = fd;
	c->gen++;
	c->bytes = 0;
	c->paused = 0;
	c->receiving = 0;
	c->start_ns = now_ns();
	r = connect(fd, (struct sockaddr *)&addr, addrlen);
	if (r < 0 && errno != EINPROGRESS) {
		count_error(errno);
		close(fd);
		c->fd = -1;
		idle[idle_top++] = slot;
		return -1;
	}
	/* Fetch mode needs no EPOLLOUT: a failed connect shows up as an error
	 * on the first read.  Hold mode waits for EPOLLOUT to count the
	 * connection as established, HTTP mode to send its request. */
	if ((opt.hold || opt.http_path) && r < 0) {
		c->state = ST_CONNECTING;
		connecting_count++;
		ev.events = EPOLLIN | EPOLLOUT;
	} else {
		c->state = ST_OPEN;
		open_count++;
		if (opt.hold)
			st.connected++;
		ev.events = EPOLLIN;
	}
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		int err = errno;
		release(slot);
		count_error(err);
		return -1;
	}
	if (opt.http_path && c->state == ST_OPEN)
		send_request(slot, c->start_ns, 0);
	return 0;
}

/* Start connections in free slots, within the bounds. */
static void fill(uint64_t now)
{
	if (now < backoff_until)
		return;
	while (idle_top > 0 && !stop_requested) {
		if (opt.max_fetches && st.started >= opt.max_fetches)
			return;
		if (opt.hold && connecting_count >= opt.max_connecting)
			return;
		if (start(idle[--idle_top]) < 0) {
			/* Out of ports or descriptors: do not spin; try again
			 * in 10 ms. */
			backoff_until = now_ns() + 10000000u;
			return;
		}
	}
}

static void ring_push(uint32_t slot, uint32_t gen, uint64_t resume_ns)
{
	if (ring_len == ring_cap) {
		size_t cap = ring_cap ? ring_cap * 2 : 1024;
		struct pause_entry *p = malloc(cap * sizeof *p);
		if (!p) {
			fprintf(stderr, "loadgen: out of memory\n");
			exit(1);
		}
		for (size_t i = 0; i < ring_len; i++)
			p[i] = ring[(ring_head + i) % ring_cap];
		free(ring);
		ring = p;
		ring_cap = cap;
		ring_head = 0;
	}
	ring[(ring_head + ring_len) % ring_cap] =
		(struct pause_entry){ .slot = slot, .gen = gen, .resume_ns = resume_ns };
	ring_len++;
}

static void resume_due(uint64_t now)
{
	while (ring_len > 0 && ring[ring_head].resume_ns <= now) {
		struct pause_entry e = ring[ring_head];
		struct conn *c = &conns[e.slot];
		ring_head = (ring_head + 1) % ring_cap;
		ring_len--;
		if (c->gen != e.gen || !c->paused || c->fd < 0)
			continue;
		struct epoll_event ev = { .events = EPOLLIN, .data.u32 = e.slot };
		c->paused = 0;
		epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
	}
}

static char buf[65536];

static void on_readable_fetch(uint32_t slot, uint64_t now)
{
	struct conn *c = &conns[slot];
	for (;;) {
		ssize_t n = read(c->fd, buf, sizeof buf);
		if (n > 0) {
			c->bytes += n;
			st.bytes += n;
		} else if (n == 0) {
			finish(slot, OUT_EOF, 0, now);
			return;
		} else if (errno == EAGAIN) {
			return;
		} else if (errno != EINTR) {
			finish(slot, OUT_ERROR, errno, now);
			return;
		}
	}
}

static void on_event_hold(uint32_t slot, uint32_t events, uint64_t now)
{
	struct conn *c = &conns[slot];
	if (c->state == ST_CONNECTING) {
		int err = 0;
		socklen_t len = sizeof err;
		if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
			return;
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err) {
			finish(slot, OUT_ERROR, err, now);
			return;
		}
		c->state = ST_OPEN;
		connecting_count--;
		open_count++;
		st.connected++;
		struct epoll_event ev = { .events = EPOLLIN, .data.u32 = slot };
		epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
		if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
			return;
	}
	ssize_t n = read(c->fd, buf, (size_t)opt.read_chunk);
	if (n > 0) {
		c->bytes += n;
		st.bytes += n;
		if (!c->receiving) {
			c->receiving = 1;
			receiving_count++;
		}
		if (opt.read_interval_ms > 0 && !c->paused) {
			struct epoll_event ev = { .events = 0, .data.u32 = slot };
			c->paused = 1;
			epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
			ring_push(slot, c->gen, now + (uint64_t)opt.read_interval_ms * 1000000u);
		}
	} else if (n == 0) {
		finish(slot, OUT_EOF, 0, now);
	} else if (errno != EAGAIN && errno != EINTR) {
		finish(slot, OUT_ERROR, errno, now);
	}
}

/* HTTP mode: the request every connection sends, built once. */
static char request[1024];
static size_t request_len;

/* The next request on an open connection; *count_it* is 0 for a connection's
 * first request, which start() has counted already. */
static void send_request(uint32_t slot, uint64_t now, int count_it)
{
	struct conn *c = &conns[slot];
	if (count_it)
		st.started++;
	c->phase = PH_HEADERS;
	c->header_len = 0;
	c->bytes = 0;
	c->body_left = 0;
	c->until_close = 0;
	c->keep_alive = 0;
	c->start_ns = now;
	/* A request this small fits in an idle socket's send buffer: a short
	 * write would mean something is badly wrong, so it counts as an error. */
	ssize_t n = write(c->fd, request, request_len);
	if (n != (ssize_t)request_len)
		finish(slot, OUT_ERROR, n < 0 ? errno : EIO, now);
}

/* The value of header *name* in the NUL-terminated header block *h*, with
 * its length in *len*, or NULL. */
static const char *header_value(const char *h, const char *name, size_t *len)
{
	size_t name_len = strlen(name);
	for (const char *line = strstr(h, "\r\n"); line; line = strstr(line, "\r\n")) {
		line += 2;
		if (strncasecmp(line, name, name_len) == 0 && line[name_len] == ':') {
			const char *v = line + name_len + 1;
			while (*v == ' ' || *v == '\t')
				v++;
			const char *end = strstr(v, "\r\n");
			*len = end ? (size_t)(end - v) : strlen(v);
			while (*len && (v[*len - 1] == ' ' || v[*len - 1] == '\t'))
				(*len)--;
			return v;
		}
	}
	return NULL;
}

static int token_in(const char *v, size_t len, const char *token)
{
	size_t t = strlen(token);
	for (size_t i = 0; i + t <= len; i++)
		if (strncasecmp(v + i, token, t) == 0)
			return 1;
	return 0;
}

/* Parse the status line and headers (c->header[0..end), NUL-terminated by
 * the caller): OUT_EOF if the body follows, OUT_STATUS or OUT_BAD. */
static enum outcome parse_response(struct conn *c)
{
	const char *h = c->header, *v;
	size_t len;
	int minor, status;

	if (sscanf(h, "HTTP/1.%1d %3d", &minor, &status) != 2 || h[8] != ' ')
		return OUT_BAD;
	c->keep_alive = minor >= 1;
	if ((v = header_value(h, "Connection", &len))) {
		if (token_in(v, len, "close"))
			c->keep_alive = 0;
		else if (token_in(v, len, "keep-alive"))
			c->keep_alive = 1;
	}
	if ((v = header_value(h, "Transfer-Encoding", &len)) && !(len == 8 && !strncasecmp(v, "identity", 8)))
		return OUT_BAD;
	if ((v = header_value(h, "Content-Length", &len))) {
		char *end;
		errno = 0;
		long long n = strtoll(v, &end, 10);
		if (errno || end != v + len || n < 0)
			return OUT_BAD;
		c->body_left = n;
	} else {
		c->until_close = 1;
		c->keep_alive = 0;
	}
	if (status < 200 || status > 299)
		return OUT_STATUS;
	return OUT_EOF;
}

/* A whole response arrived: count it, then ask again on the same connection
 * if it stays open and the run goes on; else free the slot for a new one. */
static void complete_response(uint32_t slot, uint64_t now)
{
	struct conn *c = &conns[slot];
	count_arrival(c, now);
	if (c->keep_alive && !stop_requested &&
	    !(opt.max_fetches && st.started >= opt.max_fetches))
		send_request(slot, now, 1);
	else
		release(slot);
}

static void on_event_http(uint32_t slot, uint32_t events, uint64_t now)
{
	struct conn *c = &conns[slot];
	if (c->state == ST_CONNECTING) {
		int err = 0;
		socklen_t len = sizeof err;
		if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
			return;
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err) {
			finish(slot, OUT_ERROR, err, now);
			return;
		}
		c->state = ST_OPEN;
		connecting_count--;
		open_count++;
		struct epoll_event ev = { .events = EPOLLIN, .data.u32 = slot };
		epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
		send_request(slot, now, 0);
		return;
	}
	for (;;) {
		ssize_t n;
		if (c->phase == PH_HEADERS) {
			n = read(c->fd, c->header + c->header_len, HEADER_MAX - c->header_len);
			if (n > 0) {
				size_t from = c->header_len >= 3 ? c->header_len - 3 : 0;
				c->header_len += (size_t)n;
				st.bytes += n;
				c->header[c->header_len] = '\0';
				char *end = memmem(c->header + from, c->header_len - from, "\r\n\r\n", 4);
				if (!end) {
					if (c->header_len == HEADER_MAX) {
						finish(slot, OUT_BAD, 0, now);
						return;
					}
					continue;
				}
				size_t body_start = (size_t)(end - c->header) + 4;
				long long extra = (long long)(c->header_len - body_start);
				end[2] = '\0'; /* keep the last header's CRLF for header_value */
				enum outcome out = parse_response(c);
				if (out != OUT_EOF) {
					finish(slot, out, 0, now);
					return;
				}
				c->phase = PH_BODY;
				c->bytes = extra;
				if (!c->until_close) {
					c->body_left -= extra;
					if (c->body_left < 0) {
						finish(slot, OUT_BAD, 0, now); /* more than one response */
						return;
					}
					if (c->body_left == 0) {
						complete_response(slot, now);
						return;
					}
				}
				continue;
			}
			if (n == 0) {
				finish(slot, OUT_CLOSED, 0, now);
				return;
			}
		} else {
			size_t want = sizeof buf;
			if (!c->until_close && (long long)want > c->body_left + 1)
				want = (size_t)c->body_left + 1; /* one more shows a server that sends too much */
			n = read(c->fd, buf, want);
			if (n > 0) {
				c->bytes += n;
				st.bytes += n;
				if (c->until_close)
					continue;
				c->body_left -= n;
				if (c->body_left < 0) {
					finish(slot, OUT_BAD, 0, now);
				} else if (c->body_left == 0) {
					complete_response(slot, now);
				} else {
					continue;
				}
				return;
			}
			if (n == 0) {
				/* End-of-file: the end of a body without a length, or a
				 * body cut short (a short mismatch, as in fetch mode). */
				if (c->until_close) {
					finish(slot, OUT_EOF, 0, now);
				} else {
					st.mismatches++;
					st.short_++;
					release(slot);
				}
				return;
			}
		}
		if (errno == EAGAIN)
			return;
		if (errno != EINTR) {
			finish(slot, OUT_ERROR, errno, now);
			return;
		}
	}
}

static void expire(uint64_t now)
{
	uint64_t limit = (uint64_t)(opt.timeout * 1e9);
	for (int i = 0; i < opt.concurrency; i++) {
		struct conn *c = &conns[i];
		if (c->fd < 0)
			continue;
		/* A held connection is meant to stay open; only its connect
		 * can time out. */
		if (opt.hold && c->state != ST_CONNECTING)
			continue;
		if (now - c->start_ns > limit)
			finish((uint32_t)i, OUT_TIMEOUT, 0, now);
	}
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

static uint32_t percentile(double p)
{
	if (st.lat_len == 0)
		return 0;
	size_t i = (size_t)(p / 100.0 * (double)(st.lat_len - 1) + 0.5);
	return st.lat_us[i];
}

static void print_progress(uint64_t t0, uint64_t now)
{
	printf("{\"type\":\"progress\",\"t_s\":%.3f,\"started\":%lld,\"fetches\":%lld,"
	       "\"mismatches\":%lld,\"errors\":%lld,\"connecting\":%d,\"open\":%d,"
	       "\"receiving\":%d}\n",
	       (double)(now - t0) / 1e9, st.started, st.fetches, st.mismatches, st.errors,
	       connecting_count, open_count, receiving_count);
	fflush(stdout);
}

static void print_result(double elapsed)
{
	struct rusage ru;
	double mean = 0;

	getrusage(RUSAGE_SELF, &ru);
	for (size_t i = 0; i < st.lat_len; i++)
		mean += st.lat_us[i];
	if (st.lat_len)
		mean /= (double)st.lat_len;
	qsort(st.lat_us, st.lat_len, sizeof *st.lat_us, cmp_u32);
	printf("{\"type\":\"result\",\"mode\":\"%s\",\"concurrency\":%d,\"expected_bytes\":%lld,"
	       "\"started\":%lld,\"fetches\":%lld,\"mismatches\":%lld,\"errors\":%lld,"
	       "\"error_kinds\":{\"refused\":%lld,\"reset\":%lld,\"timeout\":%lld,\"other\":%lld,"
	       "\"http_status\":%lld,\"bad_response\":%lld},"
	       "\"mismatch_kinds\":{\"short\":%lld,\"long\":%lld},\"connections\":%lld,"
	       "\"first_error\":\"%s\",\"abandoned\":%lld,\"elapsed_s\":%.6f,"
	       "\"fetches_per_s\":%.1f,\"p50_us\":%u,\"p90_us\":%u,\"p99_us\":%u,\"max_us\":%u,"
	       "\"mean_us\":%.1f,\"bytes\":%lld,\"connected\":%lld,\"max_open\":%lld,"
	       "\"max_receiving\":%lld,\"cpu_user_s\":%.3f,\"cpu_sys_s\":%.3f}\n",
	       opt.hold ? "hold" : opt.http_path ? "http" : "fetch", opt.concurrency, opt.expected,
	       st.started, st.fetches, st.mismatches, st.errors, st.refused, st.reset,
	       st.timeouts, st.other, st.http_status, st.bad_response, st.short_, st.long_,
	       st.connections, st.first_error, st.abandoned,
	       elapsed, elapsed > 0 ? (double)st.fetches / elapsed : 0.0, percentile(50),
	       percentile(90), percentile(99), st.lat_len ? st.lat_us[st.lat_len - 1] : 0,
	       mean, st.bytes, st.connected, st.max_open, st.max_receiving,
	       (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
	fflush(stdout);
}

static int resolve(void)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res;
	int r = getaddrinfo(opt.host, opt.port, &hints, &res);
	if (r != 0) {
		fprintf(stderr, "loadgen: cannot resolve %s:%s: %s\n", opt.host, opt.port,
			gai_strerror(r));
		return -1;
	}
	memcpy(&addr, res->ai_addr, res->ai_addrlen);
	addrlen = res->ai_addrlen;
	family = res->ai_family;
	freeaddrinfo(res);
	return 0;
}

int main(int argc, char **argv)
{
	struct epoll_event events[1024];
	struct sigaction sa = { .sa_handler = on_signal };
	uint64_t t0, deadline, now, next_expire, next_progress;

	if (parse_options(argc, argv, &opt) < 0) {
		usage(argv[0]);
		return 2;
	}
	if (resolve() < 0)
		return 1;

	/* No SA_RESTART: epoll_wait returns EINTR and the loop sees the flag. */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	raise_nofile((rlim_t)opt.concurrency + 64);

	conns = calloc((size_t)opt.concurrency, sizeof *conns);
	idle = calloc((size_t)opt.concurrency, sizeof *idle);
	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (!conns || !idle || epfd < 0) {
		fprintf(stderr, "loadgen: cannot set up: %s\n", strerror(errno));
		return 1;
	}
	for (int i = opt.concurrency - 1; i >= 0; i--) {
		conns[i].fd = -1;
		idle[idle_top++] = (uint32_t)i;
		if (opt.http_path && !(conns[i].header = malloc(HEADER_MAX + 1))) {
			fprintf(stderr, "loadgen: out of memory\n");
			return 1;
		}
	}
	if (opt.http_path) {
		int n = snprintf(request, sizeof request,
				 "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUser-Agent: tend-bench-loadgen\r\n"
				 "Accept: */*\r\n\r\n",
				 opt.http_path, opt.host, opt.port);
		if (n < 0 || (size_t)n >= sizeof request) {
			usage(argv[0]);
			return 2;
		}
		request_len = (size_t)n;
	}

	t0 = now_ns();
	deadline = opt.duration > 0 ? t0 + (uint64_t)(opt.duration * 1e9) : 0;
	next_expire = t0 + 100000000u;
	next_progress = opt.progress_ms ? t0 + (uint64_t)opt.progress_ms * 1000000u : 0;
	fill(t0);
	now = t0;

	while (!stop_requested) {
		now = now_ns();
		if (deadline && now >= deadline)
			break;
		if (opt.max_fetches &&
		    st.fetches + st.mismatches + st.errors >= opt.max_fetches)
			break;

		uint64_t wake = next_expire;
		if (deadline && deadline < wake)
			wake = deadline;
		if (next_progress && next_progress < wake)
			wake = next_progress;
		if (ring_len && ring[ring_head].resume_ns < wake)
			wake = ring[ring_head].resume_ns;
		if (backoff_until > now && backoff_until < wake)
			wake = backoff_until;
		int timeout_ms = wake > now ? (int)((wake - now + 999999) / 1000000) : 0;

		if (open_count + connecting_count > st.max_open)
			st.max_open = open_count + connecting_count;
		if (receiving_count > st.max_receiving)
			st.max_receiving = receiving_count;
		int n = epoll_wait(epfd, events, 1024, timeout_ms);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "loadgen: epoll_wait: %s\n", strerror(errno));
			return 1;
		}
		now = now_ns();
		for (int i = 0; i < n; i++) {
			uint32_t slot = events[i].data.u32;
			if (conns[slot].fd < 0)
				continue;
			if (opt.hold)
				on_event_hold(slot, events[i].events, now);
			else if (opt.http_path)
				on_event_http(slot, events[i].events, now);
			else
				on_readable_fetch(slot, now);
		}
		resume_due(now);
		if (now >= next_expire) {
			expire(now);
			next_expire = now + 100000000u;
		}
		if (next_progress && now >= next_progress) {
			print_progress(t0, now);
			next_progress = now + (uint64_t)opt.progress_ms * 1000000u;
		}
		fill(now);
	}

	if (stop_requested)
		now = now_ns();
	for (int i = 0; i < opt.concurrency; i++) {
		if (conns[i].fd >= 0) {
			st.abandoned++;
			release((uint32_t)i);
		}
	}
	print_result((double)(now - t0) / 1e9);
	return 0;
}
