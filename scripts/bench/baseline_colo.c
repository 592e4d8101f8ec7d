/*
 * baseline_colo.c: the floor for the co-location benchmark (scripts/bench/colocation.py).
 * A single-process, level-triggered epoll server for the rooms and relay protocols
 * (BENCHMARKS.md, "Co-location against the alternatives"; colo_frames.py in Python).
 *
 * A broadcast costs no copy per member: each read's whole lines (rooms) or the publisher's
 * bytes (relay) become one reference-counted message, queued on every member it is due to.
 * At the end of each loop turn every member with output gets one writev() of everything
 * queued for it (up to IOV_MAX pieces); what it cannot take waits for EPOLLOUT. A member
 * with more than MAX_OUTPUT bytes queued is cut off (relay: with a reset, SO_LINGER {1,0}).
 *
 * Built at run time by the benchmark with `cc -O2`.
 *
 * usage: baseline_colo -t rooms|relay [-p PORT]
 *   -p 0 (default) lets the kernel pick; the port is in the first stdout line,
 *      {"event":"baseline.started","port":P,...}, as mpd logs it.
 * Listens on 127.0.0.1 only. SIGTERM ends it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_LINE 65536
#define MAX_OUTPUT 262144
#define READ_SIZE 262144
#define NIOV 1024

typedef struct Msg {
    int refs;
    size_t len;
    char data[];
} Msg;

typedef struct {
    Msg *msg;
    size_t off;
} Piece;

struct Group;

typedef struct Member {
    int fd;
    int state; /* 0 joining, 1 member (player), 2 publisher */
    int dirty, blocked, closing;
    struct Group *group;
    char head[2 + 255]; /* the first frame, while it is incomplete */
    int headlen;
    char *partial; /* rooms: a line not yet whole */
    size_t plen, pcap;
    Piece *q; /* output queue: q[qhead..qlen) */
    size_t qhead, qlen, qcap, pending;
} Member;

typedef struct Group {
    unsigned char key[255];
    int keylen;
    Member **members; /* rooms: every member; relay: the players */
    int n, cap;
    Member *publisher;
    struct Group *next; /* hash chain */
} Group;

static int rooms; /* 1 rooms, 0 relay */
static int ep;
static Group *table[4096];
/* this turn's members with new output, to cut off, and closed (freed at the turn's end) */
static Member **dirty, **cut, **dead;
static size_t ndirty, cdirty, ncut, ccut, ndead, cdead;

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n);
    if (!p) {
        perror("baseline_colo: realloc");
        exit(1);
    }
    return p;
}

static unsigned hash(const unsigned char *k, int len) {
    uint32_t h = 2166136261u;
    for (int i = 0; i < len; i++) h = (h ^ k[i]) * 16777619u;
    return h & 4095;
}

static Group *group_get(const unsigned char *key, int len, int create) {
    unsigned h = hash(key, len);
    for (Group *g = table[h]; g; g = g->next)
        if (g->keylen == len && !memcmp(g->key, key, (size_t)len)) return g;
    if (!create) return NULL;
    Group *g = calloc(1, sizeof *g);
    if (!g) exit(1);
    memcpy(g->key, key, (size_t)len);
    g->keylen = len;
    g->next = table[h];
    table[h] = g;
    return g;
}

static void group_drop_if_empty(Group *g) {
    if (g->n || g->publisher) return;
    Group **p = &table[hash(g->key, g->keylen)];
    while (*p != g) p = &(*p)->next;
    *p = g->next;
    free(g->members);
    free(g);
}

static void group_remove(Group *g, Member *m) {
    for (int i = 0; i < g->n; i++)
        if (g->members[i] == m) {
            memmove(g->members + i, g->members + i + 1, (size_t)(g->n - i - 1) * sizeof *g->members);
            g->n--;
            return;
        }
}

static void msg_unref(Msg *msg) {
    if (--msg->refs == 0) free(msg);
}

static void push(Member ***list, size_t *n, size_t *cap, Member *m) {
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 1024;
        *list = xrealloc(*list, *cap * sizeof **list);
    }
    (*list)[(*n)++] = m;
}

static void mark_cut(Member *m) { push(&cut, &ncut, &ccut, m); }

static void enqueue(Member *m, Msg *msg) {
    if (m->qlen == m->qcap) {
        if (m->qhead > m->qcap / 2) {
            memmove(m->q, m->q + m->qhead, (m->qlen - m->qhead) * sizeof *m->q);
            m->qlen -= m->qhead;
            m->qhead = 0;
        } else {
            m->qcap = m->qcap ? m->qcap * 2 : 16;
            m->q = xrealloc(m->q, m->qcap * sizeof *m->q);
        }
    }
    m->q[m->qlen++] = (Piece){msg, 0};
    msg->refs++;
    m->pending += msg->len;
    if (!m->dirty) {
        m->dirty = 1;
        push(&dirty, &ndirty, &cdirty, m);
    }
}

/* Close a member; `reset` aborts the connection (RST) so the kernel frees its queue. */
static void drop(Member *m, int reset) {
    if (m->fd < 0) return;
    if (reset) {
        struct linger lg = {1, 0};
        setsockopt(m->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    Group *g = m->group;
    if (g) {
        if (g->publisher == m) {
            g->publisher = NULL;
            /* the stream ended: each player is closed once what is due to it is out */
            for (int i = 0; i < g->n; i++) {
                Member *p = g->members[i];
                p->group = NULL;
                p->closing = 1;
                if (p->qhead == p->qlen && !p->dirty) mark_cut(p);
            }
            g->n = 0;
        } else {
            group_remove(g, m);
        }
        group_drop_if_empty(g);
        m->group = NULL;
    }
    close(m->fd); /* also leaves the epoll set */
    m->fd = -1;
    for (size_t i = m->qhead; i < m->qlen; i++) msg_unref(m->q[i].msg);
    m->qhead = m->qlen = 0;
    m->pending = 0;
    free(m->partial);
    m->partial = NULL;
    push(&dead, &ndead, &cdead, m); /* freed at the end of the turn: lists may hold it */
}

/* write what is due; 1 if everything is out */
static int write_out(Member *m) {
    struct iovec iov[NIOV];
    while (m->qhead < m->qlen) {
        int k = 0;
        for (size_t i = m->qhead; i < m->qlen && k < NIOV; i++, k++) {
            iov[k].iov_base = m->q[i].msg->data + m->q[i].off;
            iov[k].iov_len = m->q[i].msg->len - m->q[i].off;
        }
        ssize_t w = writev(m->fd, iov, k);
        if (w < 0) return errno == EAGAIN || errno == EINTR ? 0 : -1;
        m->pending -= (size_t)w;
        while (w > 0) {
            Piece *p = &m->q[m->qhead];
            size_t left = p->msg->len - p->off;
            if ((size_t)w >= left) {
                w -= (ssize_t)left;
                msg_unref(p->msg);
                m->qhead++;
            } else {
                p->off += (size_t)w;
                w = 0;
            }
        }
        if (k == NIOV) continue; /* more pieces than one writev takes */
        break;
    }
    if (m->qhead == m->qlen) {
        m->qhead = m->qlen = 0;
        return 1;
    }
    return 0;
}

static void set_blocked(Member *m, int blocked) {
    if (m->blocked == blocked) return;
    m->blocked = blocked;
    struct epoll_event ev = {.events = EPOLLIN | (blocked ? EPOLLOUT : 0), .data.ptr = m};
    epoll_ctl(ep, EPOLL_CTL_MOD, m->fd, &ev);
}

static void flush(void) {
    for (size_t i = 0; i < ndirty; i++) {
        Member *m = dirty[i];
        m->dirty = 0;
        if (m->fd < 0) continue; /* dropped during the turn */
        if (!m->blocked) {
            int r = write_out(m);
            if (r < 0) {
                mark_cut(m);
                continue;
            }
            if (r == 0) set_blocked(m, 1);
        }
        if (m->pending > MAX_OUTPUT) mark_cut(m);
        else if (m->closing && m->qhead == m->qlen) mark_cut(m);
    }
    ndirty = 0;
    for (size_t i = 0; i < ncut; i++)
        if (cut[i]->fd >= 0) drop(cut[i], !rooms && !cut[i]->closing);
    ncut = 0;
    for (size_t i = 0; i < ndead; i++) {
        free(dead[i]->q);
        free(dead[i]);
    }
    ndead = 0;
}

static void broadcast(Member *from, Group *g, const char *data, size_t len) {
    Msg *msg = malloc(sizeof *msg + len);
    if (!msg) exit(1);
    msg->refs = 1;
    msg->len = len;
    memcpy(msg->data, data, len);
    for (int i = 0; i < g->n; i++)
        if (g->members[i] != from) enqueue(g->members[i], msg);
    msg_unref(msg);
}

static void send_line(int fd, const char *line) {
    ssize_t r = send(fd, line, strlen(line), MSG_NOSIGNAL);
    (void)r;
}

static void on_lines(Member *m, const char *data, size_t n) {
    const char *buf = data;
    if (m->plen) {
        if (m->plen + n > m->pcap) {
            m->pcap = m->plen + n;
            m->partial = xrealloc(m->partial, m->pcap);
        }
        memcpy(m->partial + m->plen, data, n);
        buf = m->partial;
        n += m->plen;
        m->plen = 0;
    }
    const char *last = memrchr(buf, '\n', n);
    size_t end = last ? (size_t)(last - buf) + 1 : 0;
    if (n - end >= MAX_LINE) {
        drop(m, 0);
        return;
    }
    if (end > MAX_LINE) { /* some line may be too long */
        const char *p = buf, *stop = buf + end;
        while (p < stop) {
            const char *nl = memchr(p, '\n', (size_t)(stop - p));
            if (nl - p + 1 > MAX_LINE) {
                drop(m, 0);
                return;
            }
            p = nl + 1;
        }
    }
    if (end) broadcast(m, m->group, buf, end);
    if (n > end) {
        size_t rest = n - end;
        if (rest > m->pcap) {
            m->pcap = rest;
            char *np = malloc(rest);
            if (!np) exit(1);
            memcpy(np, buf + end, rest);
            free(m->partial);
            m->partial = np;
        } else {
            memmove(m->partial, buf + end, rest);
        }
        m->plen = rest;
    }
}

static void on_data(Member *m, const char *data, size_t n) {
    if (rooms) on_lines(m, data, n);
    else if (m->state == 2 && m->group) broadcast(m, m->group, data, n);
    /* a player's bytes are read and discarded */
}

static void on_join(Member *m, const char *data, size_t n) {
    size_t take = sizeof m->head - (size_t)m->headlen;
    if (take > n) take = n;
    memcpy(m->head + m->headlen, data, take);
    m->headlen += (int)take;
    unsigned char kind = (unsigned char)m->head[0];
    if (rooms ? kind != 'J' : kind != 'P' && kind != 'S') {
        send_line(m->fd, rooms ? "error: first frame must start with 'J'\n"
                               : "error: first frame must start with 'P' or 'S'\n");
        drop(m, 0);
        return;
    }
    if (m->headlen < 2) return;
    int len = (unsigned char)m->head[1];
    if (len == 0) {
        send_line(m->fd, "error: empty key\n");
        drop(m, 0);
        return;
    }
    if (m->headlen < 2 + len) return;
    Group *g = group_get((unsigned char *)m->head + 2, len, 1);
    if (kind == 'P') {
        if (g->publisher) {
            send_line(m->fd, "error: stream has a publisher\n");
            drop(m, 0);
            return;
        }
        g->publisher = m;
        m->state = 2;
    } else {
        if (g->n == g->cap) {
            g->cap = g->cap ? g->cap * 2 : 16;
            g->members = xrealloc(g->members, (size_t)g->cap * sizeof *g->members);
        }
        g->members[g->n++] = m;
        m->state = 1;
    }
    m->group = g;
    char ack[32];
    snprintf(ack, sizeof ack, "ok %d\n", g->n + (g->publisher != NULL));
    send_line(m->fd, ack);
    /* bytes after the first frame in this read */
    size_t used = take - (size_t)(m->headlen - 2 - len);
    if (n > used) on_data(m, data + used, n - used);
}

int main(int argc, char **argv) {
    int port = 0, opt;
    const char *proto = NULL;
    while ((opt = getopt(argc, argv, "p:t:")) != -1) {
        if (opt == 'p') port = atoi(optarg);
        else if (opt == 't') proto = optarg;
        else return 64;
    }
    if (!proto || (strcmp(proto, "rooms") && strcmp(proto, "relay"))) {
        fprintf(stderr, "usage: baseline_colo -t rooms|relay [-p PORT]\n");
        return 64;
    }
    rooms = !strcmp(proto, "rooms");
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl = {1024, 1024};
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    static char buf[READ_SIZE];
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* Nagle off, as a chat or relay server has it (asyncio and uvloop do it by default):
     * else a member's next small write waits for the ACK of its last (40 ms delayed ACK).
     * Accepted sockets inherit it from the listener. */
    setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 4096) < 0) {
        perror("baseline_colo: bind/listen");
        return 69;
    }
    socklen_t alen = sizeof a;
    getsockname(lfd, (struct sockaddr *)&a, &alen);
    printf("{\"event\":\"baseline.started\",\"impl\":\"c\",\"protocol\":\"%s\",\"port\":%d,"
           "\"pid\":%d}\n", proto, ntohs(a.sin_port), getpid());
    fflush(stdout);
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("baseline_colo: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            Member *m = evs[i].data.ptr;
            if (!m) {
                for (int k = 0; k < 64; k++) {
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) break;
                    Member *nm = calloc(1, sizeof *nm);
                    if (!nm) exit(1);
                    nm->fd = c;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = nm};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            if (m->fd < 0) continue; /* dropped earlier in this turn */
            if (evs[i].events & EPOLLOUT) {
                int r = write_out(m);
                if (r < 0) {
                    drop(m, 0);
                    continue;
                }
                if (r == 1) {
                    set_blocked(m, 0);
                    if (m->closing) {
                        drop(m, 0);
                        continue;
                    }
                }
                if (!(evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            }
            ssize_t r = recv(m->fd, buf, sizeof buf, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) {
                drop(m, 0);
                continue;
            }
            if (m->state == 0) on_join(m, buf, (size_t)r);
            else on_data(m, buf, (size_t)r);
        }
        flush();
    }
}
