/*
 * loadgen_colo: the load generator of the co-location benchmark (colocation.py), for the
 * rooms and relay protocols (BENCHMARKS.md, "Co-location against the alternatives").
 *
 * It joins every client, waits for every ack, then drives the senders and checks every
 * delivery: exactly once, in order per sender, to the right members only, byte for byte.
 * Why C: see loadgen.c (a Python client would cost what the Python servers cost).
 *
 * Built at run time by the benchmark (`cc -O2`). One epoll loop per process, non-blocking
 * sockets, traffic only to 127.0.0.0/8.
 *
 * Modes (one JSON object with the results on stdout at the end, as loadgen.c's modes):
 *   rooms  G rooms of M members (-r G -c M). The first S members of each room send lines of
 *          -l bytes (`\n` included; S = -S, default: as many as keep at most -B bytes of
 *          lines in flight to any one member, so that no server's output bound is reached).
 *          A line is "<sender:8 hex> <seq:16 hex> <send time:16 hex> " then filler, `\n`.
 *   relay  G streams (-r G), each with 1 publisher and M players (-c M). The publisher
 *          writes frames of -l bytes into its raw byte stream; a frame starts with a
 *          28-byte header ("RLY1", size, sender, seq, send time; little-endian) and then
 *          filler, so that a player can cut the frames out again.
 *
 * Load: closed loop by default: a sender may have -W messages (rooms: default 1; relay:
 * default -B / -l) not yet delivered to every other member of its room (every player of
 * its stream); it sends the next one as soon as one is. With -R RATE, each sender sends
 * RATE messages per second instead (open loop; a send that finds the sender's previous
 * output still unwritten by more than 256 KiB is skipped and counted).
 *
 * Every message carries the sender's id, a sequence number and its send time
 * (CLOCK_MONOTONIC ns). Each receiver checks, per sender: the next expected sequence
 * number (a later one: the earlier ones are missing so far; an earlier one: late, i.e. out
 * of order, or a duplicate if it was seen, with a 64-message memory), that the sender is
 * in its room and is not itself (misrouted), the filler byte for byte (corrupt). After
 * the window (-d seconds after -w of warm-up) the senders stop; the run waits up to -D
 * seconds for the messages still on the way (drain); lost = expected deliveries (every
 * message sent, to every other member) - distinct deliveries. Latency (send to receipt
 * at that member), deliveries/s and bytes/s are over the window.
 *
 * usage: loadgen_colo rooms|relay -p PORT [-H 127.0.0.1] [-c M] [-r G] [-l BYTES]
 *            [-S SENDERS] [-W WINDOW] [-B BYTES] [-R RATE] [-d SEC] [-w SEC] [-D SEC]
 *            [-s SEED] [-P PROCS] [-i INFLIGHT_CONNECTS]
 *   -P  spread the rooms (streams) over PROCS processes started together; each process
 *       has whole rooms, so -P is at most -r.
 * Before the window it prints {"event":"colo.joined","first":g,"ports":[...]}: the local
 * port of one member of each room g, g+1, ... (for mapping rooms to server processes).
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
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- latency histogram (as loadgen.c's): log-linear, 1/1024 relative precision, ns ---- */
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
static void die(const char *what) {
    fprintf(stderr, "loadgen_colo: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* ---- options ---- */
static int relay;                /* 0 rooms, 1 relay */
static int members = 10;         /* rooms: members per room; relay: players per stream */
static int groups = 1;           /* rooms, or streams */
static int msg_size = 100;       /* line or frame, bytes */
static int senders = -1, window = -1, budget = -1;
static double rate, duration = 3, warmup = 0.5, drain_s = 5;
static int procs = 1, inflight_connects = 256;
static unsigned long long seed;
static struct sockaddr_in addr;

/* derived: this process's rooms [g0, g0 + ng) */
static int g0, ng, per_group, hdr_len;
static unsigned char *pattern;

/* ---- clients ---- */
typedef struct {
    uint32_t next; /* next expected sequence number */
    uint64_t seen; /* bit i: next - 1 - i was delivered */
} Pair;

typedef struct {
    int fd, state; /* 0 connecting, 1 joining (ack pending), 2 member, 3 closed */
    int group, idx; /* room (global index), index in it (relay: 0 = the publisher) */
    int ack_n;
    char ack[64];
    int acklen;
    uint32_t off; /* offset in the current incoming message */
    unsigned char hdr[48];
    int bad; /* the current message's filler differed */
    uint16_t port;
    /* sending */
    uint64_t next_seq, low; /* low: the oldest message not yet delivered to all */
    uint32_t *remain;       /* per message in flight (ring of `window`): deliveries due */
    char *wbuf;
    size_t wlen, woff, wcap;
    int want_out;
} Client;

static Client *cs;
static int ncs, epfd;
static Pair *pairs; /* [receiver (local index)][sender index in room] */
static uint64_t *group_deliveries;

/* ---- counters ---- */
static uint64_t sent, deliveries, unique_total, expected_total, duplicates, out_of_order,
    misrouted, corrupt, errors, join_errors, send_skipped, connect_failures;
static int ack_mismatch, drained, stop_sending;
static double g_setup_s, drain_used_s;
static int g_established;

/* the window */
static uint64_t w_start, w_end;
static int w_open, ended;
static double cpu0, cpu_end;
static int child_out = -1, child_ready = -1, child_go = -1;

static void mark_start(void) {
    if (child_out < 0) {
        printf("{\"event\":\"measure.start\"}\n");
        fflush(stdout);
    }
    cpu0 = cpu_s();
}
static void mark_end(void) {
    if (ended) return;
    ended = 1;
    cpu_end = cpu_s();
    if (child_out < 0) {
        printf("{\"event\":\"measure.end\"}\n");
        fflush(stdout);
    }
}

static int receivers_per_msg(void) { return relay ? members : members - 1; }

static void set_events(Client *c, int out) {
    if (c->want_out == out) return;
    c->want_out = out;
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
}

static void close_client(Client *c, int failed) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    if (failed && c->state != 3) errors++;
    c->state = 3;
}

static void flush_out(Client *c) {
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) break;
            close_client(c, 1);
            return;
        }
        c->woff += (size_t)n;
    }
    if (c->woff == c->wlen) c->woff = c->wlen = 0;
    set_events(c, c->wlen > 0);
}

static void put(Client *c, const void *data, size_t len) {
    if (c->wlen + len > c->wcap) {
        if (c->woff) {
            memmove(c->wbuf, c->wbuf + c->woff, c->wlen - c->woff);
            c->wlen -= c->woff;
            c->woff = 0;
        }
        if (c->wlen + len > c->wcap) {
            c->wcap = (c->wlen + len) * 2;
            c->wbuf = realloc(c->wbuf, c->wcap);
            if (!c->wbuf) die("realloc");
        }
    }
    memcpy(c->wbuf + c->wlen, data, len);
    c->wlen += len;
}

static const char HEX[] = "0123456789abcdef";
static void hex(char *out, uint64_t v, int digits) {
    for (int i = digits - 1; i >= 0; i--, v >>= 4) out[i] = HEX[v & 15];
}
static int unhex(const unsigned char *in, int digits, uint64_t *v) {
    uint64_t x = 0;
    for (int i = 0; i < digits; i++) {
        unsigned char ch = in[i];
        int d = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
        if (d < 0) return -1;
        x = x << 4 | (uint64_t)d;
    }
    *v = x;
    return 0;
}

static int sender_id(const Client *c) { return c->group * per_group + c->idx; }

/* one message from c (a sender), into its output */
static void send_message(Client *c, uint64_t t) {
    size_t at = c->wlen;
    put(c, pattern, (size_t)msg_size);
    unsigned char *m = (unsigned char *)c->wbuf + at;
    uint64_t seq = c->next_seq++;
    if (relay) {
        uint32_t id = (uint32_t)sender_id(c), size = (uint32_t)msg_size;
        memcpy(m, "RLY1", 4);
        memcpy(m + 4, &size, 4);
        memcpy(m + 8, &id, 4);
        memcpy(m + 12, &seq, 8);
        memcpy(m + 20, &t, 8);
    } else {
        hex((char *)m, (uint64_t)sender_id(c), 8);
        hex((char *)m + 9, seq, 16);
        hex((char *)m + 26, t, 16);
        m[8] = m[25] = m[42] = ' ';
    }
    if (c->remain) c->remain[seq % (uint64_t)window] = (uint32_t)receivers_per_msg();
    sent++;
    expected_total += (uint64_t)receivers_per_msg();
}

/* closed loop: send while fewer than `window` messages are in flight */
static void refill(Client *c) {
    if (stop_sending || c->state != 2) return;
    int any = 0;
    uint64_t t = now_ns();
    while (c->next_seq - c->low < (uint64_t)window) {
        send_message(c, t);
        any = 1;
    }
    if (any) flush_out(c);
}

static int is_sender(int idx) { return relay ? idx == 0 : idx < senders; }

/* a whole message arrived at c: header in c->hdr */
static void delivered(Client *c, uint64_t t) {
    uint64_t id, seq, ts;
    int ok;
    if (relay) {
        uint32_t size, id32;
        memcpy(&size, c->hdr + 4, 4);
        memcpy(&id32, c->hdr + 8, 4);
        memcpy(&seq, c->hdr + 12, 8);
        memcpy(&ts, c->hdr + 20, 8);
        id = id32;
        ok = !memcmp(c->hdr, "RLY1", 4) && size == (uint32_t)msg_size;
    } else {
        ok = c->hdr[8] == ' ' && c->hdr[25] == ' ' && c->hdr[42] == ' ' &&
             !unhex(c->hdr, 8, &id) && !unhex(c->hdr + 9, 16, &seq) &&
             !unhex(c->hdr + 26, 16, &ts);
    }
    if (!ok || c->bad) {
        corrupt++;
        c->bad = 0;
        return;
    }
    int sg = (int)(id / (uint64_t)per_group), sidx = (int)(id % (uint64_t)per_group);
    if (sg != c->group || sidx == c->idx || !is_sender(sidx)) {
        misrouted++;
        return;
    }
    int nsend = relay ? 1 : senders;
    Pair *p = &pairs[(size_t)(c - cs) * (size_t)nsend + (size_t)(relay ? 0 : sidx)];
    int unique = 1;
    if (seq == p->next) {
        p->seen = p->seen << 1 | 1;
        p->next++;
    } else if (seq > p->next) { /* ahead: the ones between are missing (so far) */
        uint64_t gap = seq - p->next;
        p->seen = gap >= 63 ? 1 : (p->seen << (gap + 1)) | 1;
        p->next = (uint32_t)seq + 1;
    } else {
        uint64_t d = p->next - 1 - seq;
        if (d < 64 && (p->seen >> d & 1)) {
            duplicates++;
            unique = 0;
        } else {
            out_of_order++;
            if (d < 64) p->seen |= 1ull << d;
        }
    }
    if (!unique) return;
    unique_total++;
    if (w_open && t >= w_start && t < w_end) {
        deliveries++;
        group_deliveries[c->group - g0]++;
        record(t - ts);
    }
    /* the sender's window */
    Client *s = &cs[(c->group - g0) * per_group + sidx];
    if (s->remain && seq >= s->low && seq < s->next_seq) {
        uint32_t *r = &s->remain[seq % (uint64_t)window];
        if (*r && --*r == 0 && seq == s->low) {
            while (s->low < s->next_seq && s->remain[s->low % (uint64_t)window] == 0) s->low++;
            if (rate <= 0) refill(s);
        }
    }
}

static void consume(Client *c, const unsigned char *p, size_t n, uint64_t t) {
    while (n) {
        if (c->state == 1) { /* the ack line */
            unsigned char ch = *p++;
            n--;
            if (c->acklen < (int)sizeof c->ack - 1) c->ack[c->acklen++] = (char)ch;
            if (ch != '\n') continue;
            c->ack[c->acklen] = 0;
            if (sscanf(c->ack, "ok %d\n", &c->ack_n) != 1) {
                fprintf(stderr, "loadgen_colo: join refused: %s", c->ack);
                join_errors++;
                close_client(c, 0);
                return;
            }
            c->state = 2;
            continue;
        }
        size_t k;
        if (c->off < (uint32_t)hdr_len) {
            k = (size_t)hdr_len - c->off;
            if (k > n) k = n;
            memcpy(c->hdr + c->off, p, k);
        } else {
            k = (size_t)msg_size - c->off;
            if (k > n) k = n;
            if (memcmp(p, pattern + c->off, k)) c->bad = 1;
        }
        c->off += (uint32_t)k;
        p += k;
        n -= k;
        if (c->off == (uint32_t)msg_size) {
            c->off = 0;
            delivered(c, t);
        }
    }
}

static unsigned char rbuf[262144];

static void on_readable(Client *c) {
    ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        close_client(c, 1);
        return;
    }
    if (n == 0) {
        close_client(c, 1);
        return;
    }
    consume(c, rbuf, (size_t)n, now_ns());
}

static int start_connect(Client *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->state = 0;
    c->want_out = 1;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    return 0;
}

static void on_connected(Client *c) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
        connect_failures++;
        close_client(c, 0);
        return;
    }
    struct sockaddr_in local;
    socklen_t llen = sizeof local;
    if (getsockname(c->fd, (struct sockaddr *)&local, &llen) == 0) c->port = ntohs(local.sin_port);
    char name[64];
    int nl = snprintf(name, sizeof name, "colo-%llu-%d", seed, c->group);
    unsigned char frame[2 + 64];
    frame[0] = relay ? (c->idx == 0 ? 'P' : 'S') : 'J';
    frame[1] = (unsigned char)nl;
    memcpy(frame + 2, name, (size_t)nl);
    c->state = 1;
    c->want_out = -1;
    set_events(c, 0);
    put(c, frame, (size_t)nl + 2);
    flush_out(c);
}

/* connect and join everyone; returns the clients acked */
static int establish(uint64_t limit_ns) {
    struct epoll_event evs[1024];
    int next = 0, connecting = 0, acked = 0, failed = 0;
    uint64_t deadline = now_ns() + limit_ns;
    while (acked + failed < ncs) {
        while (next < ncs && connecting < inflight_connects) {
            if (start_connect(&cs[next]) < 0) {
                connect_failures++;
                failed++;
            } else {
                connecting++;
            }
            next++;
        }
        uint64_t t = now_ns();
        if (t >= deadline) break;
        int n = epoll_wait(epfd, evs, 1024, (int)((deadline - t) / 1000000) + 1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            Client *c = evs[i].data.ptr;
            if (c->state == 0) {
                on_connected(c);
            } else {
                if (evs[i].events & EPOLLOUT) flush_out(c);
                if (c->state == 1 && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                    on_readable(c);
                    if (c->state == 2) {
                        acked++;
                        connecting--;
                    }
                } else if (c->state == 2 && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                    on_readable(c); /* nothing is due before every ack; read it anyway */
                }
            }
            if (c->state == 3) {
                failed++;
                connecting--;
            }
        }
    }
    return acked;
}

/* every room's acks are 1..per_group, each once */
static void check_acks(void) {
    char *seen = calloc((size_t)per_group + 1, 1);
    for (int g = 0; g < ng; g++) {
        memset(seen, 0, (size_t)per_group + 1);
        int bad = 0;
        for (int i = 0; i < per_group; i++) {
            int n = cs[g * per_group + i].ack_n;
            if (n < 1 || n > per_group || seen[n]) bad = 1;
            else seen[n] = 1;
        }
        ack_mismatch += bad;
    }
    free(seen);
}

static void print_joined(void) {
    char line[65536];
    int at = snprintf(line, sizeof line, "{\"event\":\"colo.joined\",\"first\":%d,\"ports\":[", g0);
    for (int g = 0; g < ng && at < (int)sizeof line - 16; g++)
        at += snprintf(line + at, sizeof line - (size_t)at, "%s%u", g ? "," : "",
                       cs[g * per_group].port);
    snprintf(line + at, sizeof line - (size_t)at, "]}\n");
    /* one write: children share stdout with the parent */
    if (write(1, line, strlen(line)) < 0) die("write");
}

static void sync_start(void) {
    if (child_ready < 0) return;
    char x = 'r', y;
    if (write(child_ready, &x, 1) != 1) _exit(4);
    while (read(child_go, &y, 1) < 0 && errno == EINTR) {
    }
}

typedef struct {
    uint64_t sent, deliveries, unique_total, expected_total, duplicates, out_of_order,
        misrouted, corrupt, errors, join_errors, send_skipped, connect_failures, hist_n,
        hist_max;
    double hist_sum, cpu, setup_s, drain_s;
    int ack_mismatch, drained, established;
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

static void print_result(double window_s, double cpu) {
    printf("{\"mode\":\"%s\",\"members\":%d,\"groups\":%d,\"msg_size\":%d,\"senders\":%d,"
           "\"window\":%d,\"rate_per_sender\":%.1f,\"procs\":%d,\"window_s\":%.4f,"
           "\"sent\":%llu,\"deliveries\":%llu,\"rate\":%.1f,\"bytes_per_s\":%.1f,"
           "\"expected\":%llu,\"unique\":%llu,\"lost\":%llu,\"duplicates\":%llu,"
           "\"out_of_order\":%llu,\"misrouted\":%llu,\"corrupt\":%llu,\"errors\":%llu,"
           "\"join_errors\":%llu,\"connect_failures\":%llu,\"ack_mismatch\":%d,"
           "\"send_skipped\":%llu,\"drained\":%s,\"drain_s\":%.3f,\"established\":%d,"
           "\"setup_s\":%.3f,\"client_cpu_s\":%.4f,\"client_cpu_us_per_op\":%.4f,"
           "\"lat_us\":{\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,\"p999\":%.2f,\"max\":%.2f,"
           "\"mean\":%.2f},\"group_deliveries\":[",
           relay ? "relay" : "rooms", members, groups, msg_size, relay ? 1 : senders, window,
           rate, procs, window_s, (unsigned long long)sent, (unsigned long long)deliveries,
           window_s > 0 ? deliveries / window_s : 0,
           window_s > 0 ? (double)deliveries * msg_size / window_s : 0,
           (unsigned long long)expected_total, (unsigned long long)unique_total,
           (unsigned long long)(expected_total > unique_total ? expected_total - unique_total : 0),
           (unsigned long long)duplicates, (unsigned long long)out_of_order,
           (unsigned long long)misrouted, (unsigned long long)corrupt,
           (unsigned long long)errors, (unsigned long long)join_errors,
           (unsigned long long)connect_failures, ack_mismatch,
           (unsigned long long)send_skipped, drained ? "true" : "false", drain_used_s,
           g_established, g_setup_s, cpu, deliveries ? cpu * 1e6 / (double)deliveries : 0,
           percentile_us(0.5), percentile_us(0.9), percentile_us(0.99), percentile_us(0.999),
           hist_max / 1000.0, hist_n ? hist_sum / hist_n / 1000.0 : 0);
    for (int g = 0; g < groups; g++)
        printf("%s%llu", g ? "," : "", (unsigned long long)group_deliveries[g]);
    printf("]}\n");
    fflush(stdout);
}

static int run(void) {
    per_group = relay ? members + 1 : members;
    ncs = ng * per_group;
    cs = calloc((size_t)ncs, sizeof *cs);
    int nsend = relay ? 1 : senders;
    pairs = calloc((size_t)ncs * (size_t)nsend, sizeof *pairs);
    group_deliveries = calloc((size_t)(child_out >= 0 ? ng : groups), sizeof *group_deliveries);
    if (!cs || !pairs || !group_deliveries) die("calloc");
    for (int i = 0; i < ncs; i++) {
        Client *c = &cs[i];
        c->fd = -1;
        c->group = g0 + i / per_group;
        c->idx = i % per_group;
        if (is_sender(c->idx)) {
            c->remain = calloc((size_t)window, sizeof *c->remain);
            if (!c->remain) die("calloc");
        }
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    uint64_t t0 = now_ns();
    int acked = establish(60ull * 1000000000ull);
    g_setup_s = (now_ns() - t0) / 1e9;
    g_established = acked;
    if (acked < ncs) {
        fprintf(stderr, "loadgen_colo: only %d of %d clients joined in %.1f s (%llu connect "
                "failures, %llu refused, %llu closed)\n", acked, ncs, g_setup_s,
                (unsigned long long)connect_failures, (unsigned long long)join_errors,
                (unsigned long long)errors);
        return 3;
    }
    check_acks();
    print_joined();
    sync_start();
    uint64_t t = now_ns();
    w_start = t + (uint64_t)(warmup * 1e9);
    w_end = w_start + (uint64_t)(duration * 1e9);
    w_open = 1;
    if (warmup <= 0) mark_start();
    int started = warmup <= 0;
    /* open loop: one schedule over every sender, round robin */
    int nsenders = ng * nsend, rr = 0;
    double interval = rate > 0 ? 1e9 / (rate * nsenders) : 0;
    double next_due = (double)t;
    if (rate <= 0)
        for (int i = 0; i < ncs; i++)
            if (cs[i].remain) refill(&cs[i]);
    struct epoll_event evs[1024];
    uint64_t drain_end = 0;
    for (;;) {
        t = now_ns();
        if (!started && t >= w_start) {
            started = 1;
            mark_start();
        }
        if (t >= w_end && !stop_sending) {
            stop_sending = 1;
            mark_end();
            drain_end = t + (uint64_t)(drain_s * 1e9);
        }
        if (stop_sending) {
            if (unique_total >= expected_total) {
                drained = 1;
                break;
            }
            if (t >= drain_end) break;
        }
        if (rate > 0 && !stop_sending) {
            int burst = 0;
            if ((double)t - next_due > 1e9) next_due = (double)t; /* far behind: no catch-up */
            while ((double)t >= next_due && burst < 4096) {
                Client *s = &cs[(rr / nsend) * per_group + (relay ? 0 : rr % nsend)];
                rr = (rr + 1) % nsenders;
                next_due += interval;
                burst++;
                if (s->state != 2) continue;
                if (s->wlen - s->woff > 262144) {
                    send_skipped++;
                    continue;
                }
                send_message(s, t);
                flush_out(s);
            }
        }
        uint64_t until = stop_sending ? drain_end : (started ? w_end : w_start);
        int ms = (int)((until > t ? until - t : 0) / 1000000) + 1;
        if (rate > 0 && !stop_sending) {
            /* rounded up: sends are due at a millisecond's grain, without spinning */
            double wait = (next_due - (double)now_ns()) / 1e6;
            if (wait < ms) ms = wait > 0 ? (int)(wait + 0.999) : 0;
        }
        int n = epoll_wait(epfd, evs, 1024, ms);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            Client *c = evs[i].data.ptr;
            if (c->state == 3) continue;
            if (evs[i].events & EPOLLOUT) flush_out(c);
            if (c->state != 3 && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_readable(c);
        }
    }
    mark_end();
    drain_used_s = (now_ns() - w_end) / 1e9;
    double window_s = duration, cpu = cpu_end - cpu0;
    if (child_out >= 0) {
        Part part = {sent, deliveries, unique_total, expected_total, duplicates, out_of_order,
                     misrouted, corrupt, errors, join_errors, send_skipped, connect_failures,
                     hist_n, hist_max, hist_sum, cpu, g_setup_s, drain_used_s, ack_mismatch,
                     drained, g_established};
        if (io_full(child_out, &part, sizeof part, 1) < 0 ||
            io_full(child_out, hist, sizeof hist, 1) < 0 ||
            io_full(child_out, group_deliveries, (size_t)ng * sizeof *group_deliveries, 1) < 0)
            _exit(5);
    } else {
        print_result(window_s, cpu);
    }
    for (int i = 0; i < ncs; i++)
        if (cs[i].fd >= 0) close(cs[i].fd);
    return 0;
}

/* -P N: N processes, each with whole rooms; the parent prints the marks and the sum */
static int run_parallel(void) {
    int ready_p[2], go_p[2], outs[64], firsts[64], counts[64];
    pid_t pids[64];
    if (pipe(ready_p) < 0 || pipe(go_p) < 0) die("pipe");
    int first = 0;
    for (int k = 0; k < procs; k++) {
        int share = groups / procs + (k < groups % procs);
        int out_p[2];
        if (pipe(out_p) < 0) die("pipe");
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
            g0 = first;
            ng = share;
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            _exit(run());
        }
        close(out_p[1]);
        outs[k] = out_p[0];
        pids[k] = pid;
        firsts[k] = first;
        counts[k] = share;
        first += share;
    }
    close(ready_p[1]);
    close(go_p[0]);
    uint64_t deadline = now_ns() + 90ull * 1000000000ull;
    int ready = 0;
    while (ready < procs && now_ns() < deadline) {
        struct pollfd p = {.fd = ready_p[0], .events = POLLIN};
        if (poll(&p, 1, 100) <= 0) continue;
        char buf[64];
        ssize_t n = read(ready_p[0], buf, sizeof buf);
        if (n <= 0) break;
        ready += (int)n;
    }
    if (ready < procs) {
        fprintf(stderr, "loadgen_colo: %d of %d processes set up\n", ready, procs);
        for (int k = 0; k < procs; k++) kill(pids[k], SIGKILL);
        return 3;
    }
    close(go_p[1]);
    struct timespec ts;
    ts.tv_sec = (time_t)warmup;
    ts.tv_nsec = (long)((warmup - (double)ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL);
    mark_start();
    ts.tv_sec = (time_t)duration;
    ts.tv_nsec = (long)((duration - (double)ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL);
    mark_end();
    group_deliveries = calloc((size_t)groups, sizeof *group_deliveries);
    static uint64_t part_hist[NBUCKETS];
    double cpu = 0;
    drained = 1;
    int failed = 0;
    for (int k = 0; k < procs; k++) {
        Part part;
        struct pollfd p = {.fd = outs[k], .events = POLLIN};
        if (poll(&p, 1, (int)(drain_s * 1000) + 30000) <= 0 ||
            io_full(outs[k], &part, sizeof part, 0) < 0 ||
            io_full(outs[k], part_hist, sizeof part_hist, 0) < 0 ||
            io_full(outs[k], group_deliveries + firsts[k],
                    (size_t)counts[k] * sizeof *group_deliveries, 0) < 0) {
            fprintf(stderr, "loadgen_colo: process %d gave no result\n", k);
            failed = 1;
            continue;
        }
        sent += part.sent;
        deliveries += part.deliveries;
        unique_total += part.unique_total;
        expected_total += part.expected_total;
        duplicates += part.duplicates;
        out_of_order += part.out_of_order;
        misrouted += part.misrouted;
        corrupt += part.corrupt;
        errors += part.errors;
        join_errors += part.join_errors;
        send_skipped += part.send_skipped;
        connect_failures += part.connect_failures;
        hist_n += part.hist_n;
        hist_sum += part.hist_sum;
        if (part.hist_max > hist_max) hist_max = part.hist_max;
        for (int b = 0; b < NBUCKETS; b++) hist[b] += part_hist[b];
        cpu += part.cpu;
        ack_mismatch += part.ack_mismatch;
        drained &= part.drained;
        g_established += part.established;
        if (part.setup_s > g_setup_s) g_setup_s = part.setup_s;
        if (part.drain_s > drain_used_s) drain_used_s = part.drain_s;
    }
    for (int k = 0; k < procs; k++) {
        kill(pids[k], SIGKILL);
        waitpid(pids[k], NULL, 0);
    }
    if (failed) return 3;
    print_result(duration, cpu);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || (strcmp(argv[1], "rooms") && strcmp(argv[1], "relay"))) {
        fprintf(stderr, "usage: loadgen_colo rooms|relay -p PORT [-H HOST] [-c M] [-r G] "
                        "[-l BYTES] [-S SENDERS] [-W WINDOW] [-B BYTES] [-R RATE] [-d SEC] "
                        "[-w SEC] [-D SEC] [-s SEED] [-P PROCS] [-i INFLIGHT]\n");
        return 64;
    }
    relay = !strcmp(argv[1], "relay");
    const char *host = "127.0.0.1";
    int port = 0, opt;
    optind = 2;
    while ((opt = getopt(argc, argv, "H:p:c:r:l:S:W:B:R:d:w:D:s:P:i:")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': members = atoi(optarg); break;
        case 'r': groups = atoi(optarg); break;
        case 'l': msg_size = atoi(optarg); break;
        case 'S': senders = atoi(optarg); break;
        case 'W': window = atoi(optarg); break;
        case 'B': budget = atoi(optarg); break;
        case 'R': rate = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'D': drain_s = atof(optarg); break;
        case 's': seed = strtoull(optarg, NULL, 10); break;
        case 'P': procs = atoi(optarg); break;
        case 'i': inflight_connects = atoi(optarg); break;
        default: return 64;
        }
    }
    hdr_len = relay ? 28 : 43;
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1 ||
        (ntohl(addr.sin_addr.s_addr) >> 24) != 127 || port <= 0 || members < 1 ||
        (!relay && members < 2) || groups < 1 || msg_size <= hdr_len ||
        (!relay && msg_size > 65536) || msg_size > (1 << 24) || duration <= 0 ||
        duration > 3600) {
        fprintf(stderr, "loadgen_colo: need a 127.0.0.0/8 host, a port, -c >= 2 (rooms) or "
                        ">= 1, -r >= 1, -l between %d and 65536 (rooms), 0 < -d <= 3600\n",
                hdr_len + 1);
        return 64;
    }
    if (budget <= 0) budget = relay ? 131072 : 65536;
    if (!relay && senders <= 0) {
        senders = budget / msg_size;
        if (senders < 1) senders = 1;
    }
    if (!relay && senders > members) senders = members;
    if (window <= 0) window = relay ? (budget / msg_size > 0 ? budget / msg_size : 1) : 1;
    pattern = malloc((size_t)msg_size);
    if (!pattern) die("malloc");
    for (int i = 0; i < msg_size; i++)
        pattern[i] = relay ? (unsigned char)(i * 131 + 7) : (unsigned char)('a' + i % 26);
    if (!relay) pattern[msg_size - 1] = '\n';
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    if (procs > groups) procs = groups;
    if (procs > 64) procs = 64;
    if (procs > 1) return run_parallel();
    g0 = 0;
    ng = groups;
    return run();
}
