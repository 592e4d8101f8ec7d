/*
 * baseline_epoll.c: the floor for mpd's benchmarks. A minimal level-triggered epoll ping
 * server in C: one recv() and one send() per request, one 20-byte reply per frame. It
 * speaks the ping protocol's framing (frames up to a NUL; `C` + 4 key bytes, which may hold
 * NULs, is a key frame and gets no reply; frames may arrive in pieces) with one byte of
 * state per fd, but does no routing, no hand-off, no limits.
 *
 * Built at run time by scripts/bench/run.py with `cc -O2`.
 *
 * usage: baseline_epoll [-p PORT] [-w WORKERS]
 *   -p 0 (default) lets the kernel pick; the port is printed in the first stdout line,
 *      {"event":"baseline.started","port":P,...}, as mpd does.
 *   -w 0 (default) serves in this one process; -w N forks N processes that share the
 *      listening socket (EPOLLEXCLUSIVE), for side-by-side runs with an N-worker mpd.
 * Listens on 127.0.0.1 only. SIGTERM ends it (children die with the parent).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static const char REPLY[20] = "hello, server ping!";
static char replies[20 * 256];
/* Per fd: 0 = at a frame's start, -1 = inside a frame's text, 1..4 = key bytes to come. */
static signed char *state;
static size_t nstate;

static void serve(int lfd) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.fd = lfd};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0) {
        perror("baseline_epoll: epoll");
        exit(1);
    }
    struct epoll_event evs[256];
    char buf[4096];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("baseline_epoll: epoll_wait");
            exit(1);
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (int k = 0; k < 32; k++) {
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) break;
                    if ((size_t)c >= nstate) {
                        close(c);
                        continue;
                    }
                    state[c] = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r <= 0) {
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                close(fd);
                continue;
            }
            int frames = 0;
            signed char st = state[fd];
            for (ssize_t j = 0; j < r; j++) {
                if (st > 0) st--;                              /* a key byte */
                else if (st == 0 && buf[j] == 'C') st = 4;     /* a key frame starts */
                else if (buf[j] == 0) frames++, st = 0;        /* a frame ends */
                else st = -1;
            }
            state[fd] = st;
            while (frames > 0) {
                int k = frames > 256 ? 256 : frames;
                if (send(fd, replies, (size_t)k * 20, MSG_NOSIGNAL) < 0) break;
                frames -= k;
            }
        }
    }
}

int main(int argc, char **argv) {
    int port = 0, workers = 0, opt;
    while ((opt = getopt(argc, argv, "p:w:")) != -1) {
        if (opt == 'p') port = atoi(optarg);
        else if (opt == 'w') workers = atoi(optarg);
        else return 64;
    }
    for (int i = 0; i < 256; i++) memcpy(replies + 20 * i, REPLY, 20);
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl = {1024, 1024};
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    nstate = rl.rlim_cur < (1u << 22) ? (size_t)rl.rlim_cur : (1u << 22);
    state = calloc(nstate, 1);
    if (!state) {
        perror("baseline_epoll: calloc");
        return 1;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 4096) < 0) {
        perror("baseline_epoll: bind/listen");
        return 69;
    }
    socklen_t len = sizeof a;
    getsockname(lfd, (struct sockaddr *)&a, &len);
    printf("{\"event\":\"baseline.started\",\"impl\":\"c\",\"port\":%d,\"pid\":%d,"
           "\"workers\":%d}\n",
           ntohs(a.sin_port), getpid(), workers);
    fflush(stdout);
    if (workers <= 0) serve(lfd);
    for (int i = 0; i < workers; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            serve(lfd);
        }
    }
    for (;;) {
        if (wait(NULL) < 0 && errno == ECHILD) return 0;
    }
}
