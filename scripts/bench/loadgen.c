/*
 * loadgen: the benchmark's load generator for mpd's ping protocol.
 *
 * Why C: a Python client pays roughly the same interpreter cost per request as the
 * Python server it is measuring (recv, bytes handling, send, epoll bookkeeping), so a
 * Python load generator saturates its core at about the rate mpd reaches and we would
 * be measuring the client. This one costs a few microseconds per request, a small
 * fraction of the server's, and it also reports its own CPU time so that the driver can
 * show it is not the bottleneck.
 *
 * Built at run time by scripts/bench/run.py (`cc -O2`); nothing here is committed built.
 * Single-threaded, one epoll loop, non-blocking sockets; traffic only to 127.0.0.0/8.
 *
 * Modes (one JSON object with the results on stdout at the end):
 *   ping      N connections, closed loop: each sends "hello, client ping!\0", waits for
 *             the 20-byte reply, repeats. Requests/s and latency percentiles.
 *   connrate  N connection cycles in flight: connect, one ping, reply, close. Conns/s.
 *   handoff   as connrate, but the first send is `C` + random int32 key (LE) + the ping,
 *             in one send() call, so the server must route it (hand-off). Conns/s.
 *   idle      open N connections, ping each once, print {"event":"idle.ready",...}, then
 *             hold them until stdin reaches EOF (or -d seconds pass), then close.
 *
 * Every loop is bounded: by -d seconds and by -n requests (or connections).
 *
 * usage: loadgen MODE -p PORT [-H 127.0.0.1] [-c CONNS] [-d SECONDS] [-w WARMUP]
 *                [-n MAX] [-s SEED] [-i INFLIGHT_CONNECTS] [-F] [-P PROCS]
 *   -P  spread the connections over PROCS processes started together (default 1)
 *   -F  connrate/handoff: close with FIN (TIME_WAIT on the client) instead of RST
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char PING[20] = "hello, client ping!"; /* 19 chars + the NUL = 20 bytes */
#define REPLY_LEN 20

/* ---- latency histogram: log-linear, 1/1024 relative precision, values in ns ---- */
#define SUB_BITS 10
#define SUB (1 << SUB_BITS)
#define NBUCKETS (SUB * 2 + SUB * 44)
static uint64_t hist[NBUCKETS];
static uint64_t hist_n, hist_max;
static double hist_sum;

static int bucket_of(uint64_t v) {
    if (v < 2 * SUB) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - SUB_BITS;
    int b = (shift + 1) * SUB + (int)((v >> shift) - SUB);
    return b < NBUCKETS ? b : NBUCKETS - 1;
}
static uint64_t bucket_low(int b) {
    if (b < 2 * SUB) return (uint64_t)b;
    int shift = b / SUB - 1;
    return ((uint64_t)(b % SUB) + SUB) << shift;
}
static void record(uint64_t ns) {
    hist[bucket_of(ns)]++;
    hist_n++;
    hist_sum += (double)ns;
    if (ns > hist_max) hist_max = ns;
}
static double percentile_us(double q) {
    if (!hist_n) return 0;
    uint64_t rank = (uint64_t)(q * (double)hist_n);
    if (rank >= hist_n) rank = hist_n - 1;
    uint64_t seen = 0;
    for (int b = 0; b < NBUCKETS; b++) {
        seen += hist[b];
        if (seen > rank) return bucket_low(b) / 1000.0;
    }
    return hist_max / 1000.0;
}

/* ---- clocks, cpu ---- */
static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}
static uint64_t rng_state = 88172645463325252ull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

/* ---- options ---- */
static const char *mode;
static struct sockaddr_in addr;
static int conns = 100, inflight_connects = 256;
static double duration = 5, warmup = 0;
static uint64_t max_ops = 100000000ull;
static uint64_t ops, errors, lost, started_ops, completed; /* completed: incl. warm-up */
static int epfd;

typedef struct {
    int fd;
    int state; /* 0 free, 1 connecting, 2 waiting for reply, 3 idle (held) */
    int got;   /* reply bytes received for the current request */
    uint64_t t0;
} Conn;
static Conn *cs;

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int open_conn(Conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->t0 = now_ns();
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->state = 1;
    c->got = 0;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    return 0;
}

/* Connection cycles end with an abortive close (RST) unless -F: a FIN close leaves the
 * client side in TIME_WAIT for 60 s, and at 15k+ connections/s the ~28k ephemeral ports of
 * 127.0.0.1 are all in TIME_WAIT within seconds; connect() then degrades into a search of
 * the port space (measured: every server, C included, capped at ~14k conn/s, p99 ~40 ms,
 * client 55 us of CPU per connection). The server sees ECONNRESET instead of EOF and closes
 * the connection the same way. */
static int fin_close;
static void abort_conn(Conn *c) {
    if (c->fd >= 0 && !fin_close) {
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
}

static void close_conn(Conn *c) {
    if (c->fd >= 0) close(c->fd); /* close() also removes it from the epoll set */
    c->fd = -1;
    c->state = 0;
}

static int send_all(int fd, const char *buf, size_t len) {
    ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
    return n == (ssize_t)len ? 0 : -1; /* 20-25 bytes always fit an empty socket buffer */
}

/* connected (EPOLLOUT): check the result, send the first request, wait for the reply */
static int on_connected(Conn *c, int handoff) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) return -1;
    char buf[25];
    size_t n = 0;
    if (handoff) {
        /* a random key without zero bytes (so servers that count NULs stay in step) */
        buf[0] = 'C';
        for (int i = 1; i <= 4; i++) buf[i] = (char)(1 + rnd() % 255);
        n = 5;
    }
    memcpy(buf + n, PING, sizeof PING);
    n += sizeof PING;
    if (send_all(c->fd, buf, n) < 0) return -1;
    c->state = 2;
    c->got = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
    return 0;
}

/* readable: 0 = still waiting, 1 = reply complete, -1 = error/eof */
static int on_readable(Conn *c) {
    char buf[4096];
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    if (n == 0) return -1;
    c->got += (int)n;
    return c->got >= REPLY_LEN ? 1 : 0;
}

/* -P: several processes share the load (see run_parallel); these are set in a child */
static int procs = 1;
static int child_out = -1, child_ready = -1, child_go = -1;
static int g_established;
static double g_setup_s;
static uint64_t g_connect_errors;

/* In a child: say "set up" and wait until the parent starts every child at once. */
static void sync_start(void) {
    if (child_ready < 0) return;
    char x = 'r', y;
    if (write(child_ready, &x, 1) != 1) _exit(4);
    while (read(child_go, &y, 1) < 0 && errno == EINTR) {
    }
}

/* the driver samples the server's CPU time when it reads this line */
static double mark_start(void) {
    if (child_out < 0) {
        printf("{\"event\":\"measure.start\"}\n");
        fflush(stdout);
    }
    return cpu_s();
}

static int ended;
static double cpu_at_end;
static void mark_end(void) {
    if (ended) return;
    ended = 1;
    cpu_at_end = cpu_s();
    if (child_out < 0) {
        printf("{\"event\":\"measure.end\"}\n");
        fflush(stdout);
    }
}

static void print_result(const char *extra, double window, double cpu);

/* The measured window: it opens after the warm-up and lasts `duration` seconds. */
typedef struct {
    uint64_t start, end; /* ns */
    double cpu0;         /* our CPU seconds when it opened */
    int open;
} Window;

static Window window_new(void) {
    Window w = {0};
    w.start = now_ns() + (uint64_t)(warmup * 1e9);
    w.end = w.start + (uint64_t)(duration * 1e9);
    w.open = warmup <= 0;
    if (w.open) w.cpu0 = mark_start();
    return w;
}

/* call with the time at the top of each loop turn */
static void window_tick(Window *w, uint64_t t) {
    if (!w->open && t >= w->start) {
        w->open = 1;
        w->cpu0 = mark_start();
    }
}

static int in_window(const Window *w, uint64_t t) { return t >= w->start && t < w->end; }

/* after mark_end(): the window's length (cut short if the run ended early) and CPU */
static void window_result(const Window *w, const char *extra) {
    double length = (now_ns() - w->start) / 1e9;
    if (length > duration) length = duration;
    print_result(extra, length, cpu_at_end - w->cpu0);
}

typedef struct {
    uint64_t ops, completed, errors, lost, hist_n, hist_max, connect_errors;
    double hist_sum, cpu, setup_s;
    int established;
} Part;

static int io_full(int fd, void *buf, size_t len, int writing) {
    char *p = buf;
    while (len) {
        ssize_t n = writing ? write(fd, p, len) : read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void print_result(const char *extra, double window, double cpu) {
    if (child_out >= 0) { /* a child of -P: send the raw figures to the parent */
        Part part = {ops, completed, errors, lost, hist_n, hist_max, g_connect_errors,
                     hist_sum, cpu, g_setup_s, g_established};
        if (io_full(child_out, &part, sizeof part, 1) < 0 ||
            io_full(child_out, hist, sizeof hist, 1) < 0)
            _exit(5);
        return;
    }
    printf("{\"mode\":\"%s\",\"conns\":%d,\"window_s\":%.4f,\"ops\":%llu,\"rate\":%.1f,"
           "\"completed\":%llu,\"errors\":%llu,\"lost\":%llu,\"client_cpu_s\":%.4f,"
           "\"client_cpu_us_per_op\":%.3f,"
           "\"lat_us\":{\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,\"p999\":%.2f,\"max\":%.2f,"
           "\"mean\":%.2f},\"hist_us\":[",
           mode, conns, window, (unsigned long long)ops, window > 0 ? ops / window : 0,
           (unsigned long long)completed,
           (unsigned long long)errors, (unsigned long long)lost, cpu,
           ops ? cpu * 1e6 / (double)ops : 0, percentile_us(0.5), percentile_us(0.9),
           percentile_us(0.99), percentile_us(0.999), hist_max / 1000.0,
           hist_n ? hist_sum / hist_n / 1000.0 : 0);
    /* a coarse histogram for plots: power-of-two-ish groups of 64 sub-buckets */
    int first = 1;
    for (int g = 0; g < NBUCKETS; g += 64) {
        uint64_t cnt = 0;
        for (int b = g; b < g + 64 && b < NBUCKETS; b++) cnt += hist[b];
        if (!cnt) continue;
        printf("%s[%.3f,%llu]", first ? "" : ",", bucket_low(g) / 1000.0,
               (unsigned long long)cnt);
        first = 0;
    }
    printf("]%s}\n", extra);
    fflush(stdout);
}

/* Open `conns` connections (at most `inflight_connects` connecting at once), ping each
 * once. Returns how many are established; gives up after `limit_ns`. */
static int establish(uint64_t limit_ns) {
    struct epoll_event evs[1024];
    int next = 0, connecting = 0, ready = 0;
    uint64_t deadline = now_ns() + limit_ns;
    while (ready + (int)lost < conns) {
        while (next < conns && connecting < inflight_connects) {
            if (open_conn(&cs[next]) < 0) {
                lost++;
            } else {
                connecting++;
            }
            next++;
        }
        uint64_t t = now_ns();
        if (t >= deadline) break;
        int ms = (int)((deadline - t) / 1000000) + 1;
        int n = epoll_wait(epfd, evs, 1024, ms);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            Conn *c = evs[i].data.ptr;
            int r = 0;
            if (c->state == 1) {
                r = on_connected(c, 0);
            } else if (c->state == 2) {
                r = on_readable(c);
                if (r == 1) {
                    c->state = 3;
                    connecting--;
                    ready++;
                }
            }
            if (r < 0) {
                close_conn(c);
                connecting--;
                lost++;
            }
        }
    }
    return ready;
}

static int run_ping(void) {
    uint64_t t_start = now_ns();
    int ready = establish(30ull * 1000000000ull);
    if (ready == 0) {
        fprintf(stderr, "loadgen: no connection could be established\n");
        return 3;
    }
    double setup_s = (now_ns() - t_start) / 1e9;
    g_established = ready;
    g_setup_s = setup_s;
    sync_start();
    Window w = window_new();
    int outstanding = 0;
    for (int i = 0; i < conns; i++) {
        Conn *c = &cs[i];
        if (c->state != 3) continue;
        c->t0 = now_ns();
        c->got = 0;
        c->state = 2;
        if (send_all(c->fd, PING, sizeof PING) < 0) {
            close_conn(c);
            lost++;
            continue;
        }
        outstanding++;
    }
    struct epoll_event evs[1024];
    while (outstanding > 0) {
        uint64_t t = now_ns();
        window_tick(&w, t);
        if (t >= w.end || ops >= max_ops) {
            mark_end();
            break;
        }
        int ms = (int)(((w.open ? w.end : w.start) - t) / 1000000) + 1;
        int n = epoll_wait(epfd, evs, 1024, ms);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        uint64_t tn = now_ns();
        int stop = tn >= w.end || ops >= max_ops;
        for (int i = 0; i < n; i++) {
            Conn *c = evs[i].data.ptr;
            int r = on_readable(c);
            if (r < 0) {
                close_conn(c);
                lost++;
                outstanding--;
                continue;
            }
            if (r == 0) continue;
            completed++;
            if (in_window(&w, tn)) {
                record(tn - c->t0);
                ops++;
            }
            if (stop) continue; /* no new request after the end */
            c->got -= REPLY_LEN;
            c->t0 = tn;
            if (send_all(c->fd, PING, sizeof PING) < 0) {
                close_conn(c);
                lost++;
                outstanding--;
            }
        }
    }
    mark_end();
    char extra[128];
    snprintf(extra, sizeof extra, ",\"established\":%d,\"setup_s\":%.3f", ready, setup_s);
    window_result(&w, extra);
    for (int i = 0; i < conns; i++) close_conn(&cs[i]);
    return 0;
}

static int run_cycles(int handoff) {
    sync_start();
    Window w = window_new();
    uint64_t connect_errors = 0;
    struct epoll_event evs[1024];
    for (;;) {
        uint64_t t = now_ns();
        window_tick(&w, t);
        int stop = t >= w.end || started_ops >= max_ops;
        if (stop) mark_end();
        int active = 0;
        for (int i = 0; i < conns; i++) {
            Conn *c = &cs[i];
            if (c->state == 0 && !stop) {
                if (open_conn(c) < 0) {
                    connect_errors++;
                    errors++;
                    continue;
                }
                started_ops++;
            }
            if (c->state) active++;
        }
        if (!active) {
            if (stop) break;
            /* every connect failed (ports or fds exhausted): wait a little, bounded */
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
            continue;
        }
        /* past the end: give in-flight cycles at most 2 s to finish */
        if (t >= w.end + 2000000000ull) break;
        int n = epoll_wait(epfd, evs, 1024, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        uint64_t tn = now_ns();
        for (int i = 0; i < n; i++) {
            Conn *c = evs[i].data.ptr;
            int r;
            if (c->state == 1) {
                r = on_connected(c, handoff);
            } else {
                r = on_readable(c);
                if (r == 1) {
                    completed++;
                    if (in_window(&w, tn)) {
                        record(tn - c->t0);
                        ops++;
                    }
                    abort_conn(c);
                    close_conn(c);
                    continue;
                }
            }
            if (r < 0) {
                errors++;
                close_conn(c);
            }
        }
    }
    mark_end();
    g_connect_errors = connect_errors;
    char extra[128];
    snprintf(extra, sizeof extra, ",\"connect_errors\":%llu",
             (unsigned long long)connect_errors);
    window_result(&w, extra);
    for (int i = 0; i < conns; i++) close_conn(&cs[i]);
    return 0;
}

static int run_idle(void) {
    uint64_t t0 = now_ns();
    int ready = establish(60ull * 1000000000ull);
    printf("{\"event\":\"idle.ready\",\"conns\":%d,\"established\":%d,\"lost\":%llu,"
           "\"setup_s\":%.3f}\n",
           conns, ready, (unsigned long long)lost, (now_ns() - t0) / 1e9);
    fflush(stdout);
    /* hold until stdin closes (or says anything), bounded by -d seconds */
    struct pollfd p = {.fd = 0, .events = POLLIN};
    int ms = (int)(duration * 1000);
    poll(&p, 1, ms > 0 ? ms : 1);
    for (int i = 0; i < conns; i++) close_conn(&cs[i]);
    printf("{\"event\":\"idle.closed\",\"conns\":%d}\n", ready);
    fflush(stdout);
    return 0;
}

static int run_mode(void) {
    cs = calloc((size_t)conns, sizeof *cs);
    if (!cs) die("calloc");
    for (int i = 0; i < conns; i++) cs[i].fd = -1;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    if (!strcmp(mode, "ping")) return run_ping();
    if (!strcmp(mode, "connrate")) return run_cycles(0);
    if (!strcmp(mode, "handoff")) return run_cycles(1);
    if (!strcmp(mode, "idle")) return run_idle();
    fprintf(stderr, "loadgen: unknown mode %s\n", mode);
    return 64;
}

/* -P N: N processes, each with its share of the connections, started together; the
 * parent prints the measurement marks and the merged result. For runs where server and
 * load generator may use every CPU: one thread and one server process ping-pong batches
 * of requests, so without this the "spread" runs could not use more than one core. */
static int run_parallel(void) {
    int ready_p[2], go_p[2], outs[64];
    pid_t pids[64];
    if (pipe(ready_p) < 0 || pipe(go_p) < 0) die("pipe");
    for (int k = 0; k < procs; k++) {
        int out_p[2];
        if (pipe(out_p) < 0) die("pipe");
        int share = conns / procs + (k < conns % procs);
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            close(ready_p[0]);
            close(go_p[1]);
            close(out_p[0]);
            for (int j = 0; j < k; j++) close(outs[j]);
            child_ready = ready_p[1];
            child_go = go_p[0];
            child_out = out_p[1];
            conns = share;
            rng_state ^= (uint64_t)(k + 1) * 0x9E3779B97F4A7C15ull;
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            _exit(run_mode());
        }
        close(out_p[1]);
        outs[k] = out_p[0];
        pids[k] = pid;
    }
    close(ready_p[1]);
    close(go_p[0]);
    /* every child set up (its connections open), bounded: 90 s */
    uint64_t deadline = now_ns() + 90ull * 1000000000ull;
    int ready = 0;
    while (ready < procs && now_ns() < deadline) {
        struct pollfd p = {.fd = ready_p[0], .events = POLLIN};
        if (poll(&p, 1, 100) <= 0) continue;
        char buf[64];
        ssize_t n = read(ready_p[0], buf, sizeof buf);
        if (n <= 0) break; /* every child gone */
        ready += (int)n;
    }
    close(go_p[1]); /* go: every child's read() returns at once */
    struct timespec ts;
    ts.tv_sec = (time_t)warmup;
    ts.tv_nsec = (long)((warmup - (double)ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL);
    mark_start();
    ts.tv_sec = (time_t)duration;
    ts.tv_nsec = (long)((duration - (double)ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL);
    mark_end();
    static uint64_t part_hist[NBUCKETS];
    double cpu = 0, setup_s = 0;
    int established = 0;
    uint64_t connect_errors = 0;
    for (int k = 0; k < procs; k++) {
        Part part;
        struct pollfd p = {.fd = outs[k], .events = POLLIN};
        if (poll(&p, 1, 30000) <= 0 || io_full(outs[k], &part, sizeof part, 0) < 0 ||
            io_full(outs[k], part_hist, sizeof part_hist, 0) < 0) {
            fprintf(stderr, "loadgen: worker %d gave no result\n", k);
            lost += (uint64_t)(conns / procs);
            continue;
        }
        ops += part.ops;
        completed += part.completed;
        errors += part.errors;
        lost += part.lost;
        hist_n += part.hist_n;
        hist_sum += part.hist_sum;
        if (part.hist_max > hist_max) hist_max = part.hist_max;
        for (int b = 0; b < NBUCKETS; b++) hist[b] += part_hist[b];
        cpu += part.cpu;
        connect_errors += part.connect_errors;
        established += part.established;
        if (part.setup_s > setup_s) setup_s = part.setup_s;
    }
    for (int k = 0; k < procs; k++) {
        kill(pids[k], SIGKILL); /* all have reported (or failed): nothing left to wait for */
        waitpid(pids[k], NULL, 0);
    }
    char extra[160];
    snprintf(extra, sizeof extra,
             ",\"procs\":%d,\"established\":%d,\"setup_s\":%.3f,\"connect_errors\":%llu",
             procs, established, setup_s, (unsigned long long)connect_errors);
    print_result(extra, duration, cpu);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: loadgen ping|connrate|handoff|idle -p PORT [-H HOST] [-c N] "
                        "[-d SEC] [-w SEC] [-n MAX] [-s SEED] [-i INFLIGHT] [-F] [-P PROCS]\n");
        return 64;
    }
    mode = argv[1];
    const char *host = "127.0.0.1";
    int port = 0, opt;
    optind = 2;
    while ((opt = getopt(argc, argv, "H:p:c:d:w:n:s:i:FP:")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': conns = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'n': max_ops = strtoull(optarg, NULL, 10); break;
        case 's': rng_state ^= strtoull(optarg, NULL, 10) * 0x9E3779B97F4A7C15ull; break;
        case 'i': inflight_connects = atoi(optarg); break;
        case 'F': fin_close = 1; break;
        case 'P': procs = atoi(optarg); break;
        default: return 64;
        }
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1 ||
        (ntohl(addr.sin_addr.s_addr) >> 24) != 127 || port <= 0 || conns <= 0 ||
        duration <= 0 || duration > 3600) {
        fprintf(stderr, "loadgen: need a 127.0.0.0/8 host, a port, -c > 0, 0 < -d <= 3600\n");
        return 64;
    }
    if (!rng_state) rng_state = 1;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    if (procs > 1 && strcmp(mode, "idle") != 0) {
        if (procs > 64 || procs > conns) procs = conns < 64 ? conns : 64;
        return run_parallel();
    }
    return run_mode();
}
