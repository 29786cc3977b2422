/*
 * connect_storm.c -- the yardstick for nbconn's benchmarks.
 *
 * Why this exists: nbconn runs nginx's connect flow in Python.  To say how much
 * Python costs, we need the same flow with no interpreter at all: this program.
 * Whatever it achieves is what the kernel allows on this machine; every Python
 * variant in benchmarks/run.py is reported as a ratio to it.
 *
 * The flow per connection is the one nginx's ngx_event_connect_peer
 * (src/event/ngx_event_connect.c) and ngx_http_upstream_test_connect
 * (src/http/ngx_http_upstream.c) run, plus SO_LINGER {1, 0} so that close()
 * sends RST and long runs do not fill TIME_WAIT / exhaust ephemeral ports:
 *
 *   socket() -> setsockopt(SO_LINGER {1,0}) -> ioctl(FIONBIO) ->
 *   epoll_ctl(ADD, EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET) -> connect() ->
 *   epoll_wait() -> getsockopt(SO_ERROR) -> close()
 *
 * K connects in total, at most C in flight.  The handshake time of each one is
 * taken like nbconn takes it: the clock before connect(), and again once
 * SO_ERROR has been read.
 *
 * usage: connect_storm HOST PORT K C
 * prints one JSON object on stdout (see print_json below).
 *
 * Build: cc -O2 -o benchmarks/build/connect_storm benchmarks/connect_storm.c
 * (benchmarks/run.py does this when a C compiler is present).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 512    /* nginx's default event list size */
#define MAX_FD 1048576    /* started_ns is indexed by descriptor */
#define WAIT_MS 5000      /* no event for this long: something is wrong, give up */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double seconds(struct timeval tv)
{
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* nearest rank on the sorted array, nbconn's one rule (nbconn/stats.py): the value at rank ceil(q * n),
 * counting from 1; q = 0 gives the minimum */
static uint64_t pick(const uint64_t *sorted, long n, double q)
{
    long rank = (long)(q * n);
    if ((double)rank < q * n)
        rank++;
    long i = rank > 0 ? rank - 1 : 0;
    if (i >= n)
        i = n - 1;
    return n > 0 ? sorted[i] : 0;
}

struct counts {
    long connected, refused, other_so_error, connect_failed, setup_failed;
};

static uint64_t *started_ns;   /* by descriptor: when connect() was called */
static uint64_t *handshake_ns; /* one per decided attempt */
static long decided;
static struct counts counts;

/* Steps 1-5 up to connect().  Returns 1 if a handshake is now in flight. */
static int start_one(int ep, const struct sockaddr_in *addr)
{
    static const struct linger reset = {1, 0};
    int on = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);   /* CPython passes SOCK_CLOEXEC too */
    if (fd == -1) {
        counts.setup_failed++;
        return 0;
    }
    if (fd >= MAX_FD) {
        close(fd);
        counts.setup_failed++;
        return 0;
    }
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);   /* failure ignored, as nginx does */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.fd = fd};
    if (ioctl(fd, FIONBIO, &on) == -1 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == -1) {
        close(fd);
        counts.setup_failed++;
        return 0;
    }
    started_ns[fd] = now_ns();
    if (connect(fd, (const struct sockaddr *)addr, sizeof *addr) == 0) {
        handshake_ns[decided++] = now_ns() - started_ns[fd];
        counts.connected++;
        close(fd);
        return 0;
    }
    if (errno != EINPROGRESS) {
        handshake_ns[decided++] = now_ns() - started_ns[fd];
        counts.connect_failed++;
        close(fd);
        return 0;
    }
    return 1;
}

/* The writable (or error) event: read SO_ERROR, record, close. */
static void finish_one(int fd)
{
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    handshake_ns[decided++] = now_ns() - started_ns[fd];
    if (err == 0)
        counts.connected++;
    else if (err == ECONNREFUSED)
        counts.refused++;
    else
        counts.other_so_error++;
    close(fd);
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST PORT K C\n", argv[0]);
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    long k = atol(argv[3]), c = atol(argv[4]);
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1 || k < 1 || c < 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    started_ns = calloc(MAX_FD, sizeof *started_ns);
    handshake_ns = calloc((size_t)k, sizeof *handshake_ns);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!started_ns || !handshake_ns || ep == -1) {
        perror("setup");
        return 1;
    }
    struct epoll_event events[MAX_EVENTS];
    long started = 0, in_flight = 0;

    struct rusage before, after;
    getrusage(RUSAGE_SELF, &before);
    uint64_t t0 = now_ns();
    while (decided < k) {
        while (started < k && in_flight < c) {
            started++;
            in_flight += start_one(ep, &addr);
        }
        if (in_flight == 0)
            continue;
        int n = epoll_wait(ep, events, MAX_EVENTS, WAIT_MS);
        if (n <= 0) {
            fprintf(stderr, "epoll_wait returned %d (errno %d) with %ld in flight\n", n, errno, in_flight);
            return 1;
        }
        for (int i = 0; i < n; i++) {
            finish_one(events[i].data.fd);
            in_flight--;
        }
    }
    uint64_t elapsed = now_ns() - t0;
    getrusage(RUSAGE_SELF, &after);

    qsort(handshake_ns, (size_t)decided, sizeof *handshake_ns, cmp_u64);
    printf("{\"variant\": \"c\", \"k\": %ld, \"c\": %ld, \"elapsed_ns\": %llu, "
           "\"storm_user_s\": %.6f, \"storm_sys_s\": %.6f, "
           "\"outcomes\": {\"connected\": %ld, \"refused\": %ld, \"other\": %ld}, "
           "\"handshake_ns\": {\"p50\": %llu, \"p99\": %llu, \"min\": %llu, \"max\": %llu}}\n",
           k, c, (unsigned long long)elapsed,
           seconds(after.ru_utime) - seconds(before.ru_utime), seconds(after.ru_stime) - seconds(before.ru_stime),
           counts.connected, counts.refused,
           counts.other_so_error + counts.connect_failed + counts.setup_failed,
           (unsigned long long)pick(handshake_ns, decided, 0.50), (unsigned long long)pick(handshake_ns, decided, 0.99),
           (unsigned long long)pick(handshake_ns, decided, 0.0), (unsigned long long)pick(handshake_ns, decided, 1.0));
    return counts.connected == k ? 0 : 1;
}
