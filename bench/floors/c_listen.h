/* bench/floors/c_listen.h: what the C floors (bench/floors/c_epoll, bench/floors/c_wsfan) share:
 * the listening socket, accepting, and epoll registration. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>

/* A non-blocking socket on 127.0.0.1:PORT (0: a free port), its address
 * printed as "127.0.0.1:PORT" on stdout for the bench script. Exits with a
 * message naming `who` if it cannot listen. */
static int listen_loopback(int port, const char *who) {
    int one = 1;
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096) ||
        getsockname(l, (struct sockaddr *)&a, &alen)) {
        perror(who);
        exit(1);
    }
    printf("127.0.0.1:%d\n", ntohs(a.sin_port));
    fflush(stdout);
    return l;
}

/* The next pending connection, non-blocking with TCP_NODELAY; -1 if none. */
static int accept_nodelay(int l) {
    int one = 1, s = accept4(l, NULL, NULL, SOCK_NONBLOCK);
    if (s >= 0) setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return s;
}

static void epoll_add(int ep, int fd, unsigned events) {
    struct epoll_event e = {.events = events, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
}
