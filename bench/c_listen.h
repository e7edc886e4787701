/* bench/c_listen.h: the listening socket of the C floors (bench/c_epoll,
 * bench/c_wsfan): non-blocking, on 127.0.0.1:PORT (0: a free port), its
 * address printed as "127.0.0.1:PORT" on stdout for the bench script.
 * Exits with a message naming `who` if it cannot listen. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

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
