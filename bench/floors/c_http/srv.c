/* bench/floors/c_http: the kernel floor for bench/http's /healthz. A
 * single-threaded, edge-triggered epoll loop that answers every request
 * head ("\r\n\r\n") with the same fixed bytes: the response netkit gave to
 * /healthz, read from a file, so the floor sends exactly as many bytes. One
 * recv and one send per keep-alive request and nothing else (no parsing, no
 * routing, no date, no limits). No server answering the same requests over
 * the same sockets can spend much less CPU per request, so its figures show
 * what the machine and wrk leave for any server.
 * Usage: srv RESPONSE_FILE [PORT]  (prints "127.0.0.1:PORT")
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

#define MAXFD 65536

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: srv RESPONSE_FILE [PORT]\n");
        return 2;
    }
    static char resp[4096], out[64 * 4096];
    FILE *f = fopen(argv[1], "rb");
    size_t rlen = f ? fread(resp, 1, sizeof resp, f) : 0;
    if (!rlen) {
        perror(argv[1]);
        return 1;
    }
    fclose(f);
    /* The last three bytes of each connection's previous read, so a head
     * split across reads is still seen. */
    static char tail[MAXFD][3];
    int l = listen_loopback(argc > 2 ? atoi(argv[2]) : 0, "c_http");
    int ep = epoll_create1(0);
    struct epoll_event evs[256];
    epoll_add(ep, l, EPOLLIN);
    char buf[3 + 16384];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                int s;
                while ((s = accept_nodelay(l)) >= 0) {
                    if (s >= MAXFD) { close(s); continue; }
                    memset(tail[s], 0, 3);
                    epoll_add(ep, s, EPOLLIN | EPOLLET);
                }
                continue;
            }
            for (;;) {
                memcpy(buf, tail[fd], 3);
                ssize_t r = recv(fd, buf + 3, sizeof buf - 3, 0);
                if (r <= 0) {
                    if (r < 0 && errno == EAGAIN) break;
                    close(fd);
                    break;
                }
                size_t heads = 0;
                for (ssize_t k = 0; k + 3 < r + 3; k++)
                    if (buf[k] == '\r' && buf[k + 1] == '\n' && buf[k + 2] == '\r' && buf[k + 3] == '\n') heads++;
                memcpy(tail[fd], buf + r, 3);
                size_t o = 0;
                for (size_t h = 0; h < heads; h++) {
                    if (o + rlen > sizeof out) { send(fd, out, o, MSG_NOSIGNAL); o = 0; }
                    memcpy(out + o, resp, rlen);
                    o += rlen;
                }
                if (o) send(fd, out, o, MSG_NOSIGNAL);
                if (r < (ssize_t)sizeof buf - 3) break;
            }
        }
    }
}
