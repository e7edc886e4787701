/* bench/floors/c_splice_fwd: the floor for a relay — the least a program in the
 * middle of a TCP stream can cost. One connection in, one out, splice(2)
 * through a 1 MiB pipe per direction in two blocking threads: no parsing, no
 * pairing, no limits, no byte in user space.
 *
 *   fwd TARGET_HOST:PORT CMD [ARG...]
 *
 * listens on 127.0.0.1 (a free port), starts CMD with "%PORT%" in any argument
 * replaced by that port (CMD inherits stdin/stdout), accepts ONE
 * connection, connects it to TARGET, moves bytes both ways until both
 * directions have ended, waits for CMD and exits with its status. So
 *
 *   fwd 127.0.0.1:9000 nc -N 127.0.0.1 %PORT% < file
 *
 * is `nc -N 127.0.0.1 9000 < file` with one relay hop in between, and the
 * hop's CPU is counted with the sender's (bench/transfer_code's driver sums
 * the CPU of the whole process tree). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

struct dir {
    int from, to;
};

static void die(const char *what) {
    perror(what);
    exit(111);
}

/* One direction: socket -> pipe -> socket until EOF, then half-close. */
static void *pump(void *arg) {
    struct dir *d = arg;
    int p[2];
    if (pipe2(p, O_CLOEXEC)) die("fwd: pipe2");
    fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
    for (;;) {
        ssize_t n = splice(d->from, NULL, p[1], NULL, 1 << 20, SPLICE_F_MOVE);
        if (n < 0) die("fwd: splice in");
        if (n == 0) break;
        while (n > 0) {
            ssize_t m = splice(p[0], NULL, d->to, NULL, n, SPLICE_F_MOVE);
            if (m <= 0) die("fwd: splice out");
            n -= m;
        }
    }
    shutdown(d->to, SHUT_WR);
    close(p[0]);
    close(p[1]);
    return NULL;
}

static struct sockaddr_in parse_addr(const char *s) {
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host) {
        fprintf(stderr, "fwd: TARGET must be HOST:PORT, got %s\n", s);
        exit(2);
    }
    memcpy(host, s, colon - s);
    host[colon - s] = 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "fwd: not an IPv4 address: %s\n", host);
        exit(2);
    }
    return a;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: fwd TARGET_HOST:PORT CMD [ARG...]  (%%PORT%% in ARGs = the listening port)\n");
        return 2;
    }
    struct sockaddr_in target = parse_addr(argv[1]);
    int one = 1, l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 16) ||
        getsockname(l, (struct sockaddr *)&a, &alen))
        die("fwd: listen");
    char port[16];
    snprintf(port, sizeof port, "%d", ntohs(a.sin_port));
    for (int i = 3; i < argc; i++) {
        char *at = strstr(argv[i], "%PORT%");
        if (!at) continue;
        size_t n = strlen(argv[i]) + sizeof port;
        char *arg = malloc(n);
        snprintf(arg, n, "%.*s%s%s", (int)(at - argv[i]), argv[i], port, at + 6);
        argv[i] = arg;
    }

    pid_t child = fork();
    if (child < 0) die("fwd: fork");
    if (child == 0) {
        execvp(argv[2], argv + 2);
        die("fwd: exec");
    }
    int in = accept4(l, NULL, NULL, SOCK_CLOEXEC);
    if (in < 0) die("fwd: accept");
    int out = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (out < 0 || connect(out, (struct sockaddr *)&target, sizeof target)) die("fwd: connect");
    setsockopt(in, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(out, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct dir ab = {in, out}, ba = {out, in};
    pthread_t t;
    if (pthread_create(&t, NULL, pump, &ba)) die("fwd: thread");
    pump(&ab);
    pthread_join(t, NULL);
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
