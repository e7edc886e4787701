/* bench/floors/c_epoll: the kernel floor for bench/tcp_rand. A single-threaded,
 * edge-triggered epoll loop that answers every '\n'-terminated line with
 * "42\n": one recv and one send per round trip and nothing else (no random
 * numbers, no limits, no timers, no logging). No server doing the same work
 * over the same sockets can spend much less CPU per round trip, so its
 * figures show what the machine and the load tool leave for any server.
 * Usage: srv [PORT]  (0 or nothing: a free port; prints "127.0.0.1:PORT")
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../c_listen.h"

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    int l = listen_loopback(port, "c_epoll");
    int ep = epoll_create1(0);
    struct epoll_event evs[256];
    epoll_add(ep, l, EPOLLIN);
    char buf[4096], out[3 * sizeof buf];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                int s;
                while ((s = accept_nodelay(l)) >= 0) epoll_add(ep, s, EPOLLIN | EPOLLET);
                continue;
            }
            for (;;) {
                ssize_t r = recv(fd, buf, sizeof buf, 0);
                if (r <= 0) {
                    if (r < 0 && errno == EAGAIN) break;
                    close(fd);
                    break;
                }
                size_t o = 0;
                for (ssize_t k = 0; k < r; k++)
                    if (buf[k] == '\n') { memcpy(out + o, "42\n", 3); o += 3; }
                if (o) send(fd, out, o, MSG_NOSIGNAL);
                if (r < (ssize_t)sizeof buf) break;
            }
        }
    }
}
