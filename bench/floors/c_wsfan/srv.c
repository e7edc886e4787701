/* bench/floors/c_wsfan: the kernel floor for bench/chat_fanout. A single-threaded
 * epoll loop that speaks just enough WebSocket (RFC 6455 handshake, masked
 * client frames in, unmasked text frames out) to fan every text frame a
 * client sends (after its first, the join) out to every connected client,
 * the sender included, as it is: no JSON, no storage, no ids, no limits, no
 * logging. With INTERVAL_MS 0 each message is written to each client at
 * once (one write per delivery, as a hub that writes as soon as a message
 * is ready); with INTERVAL_MS > 0 frames are gathered per client and every
 * client is written to once per tick (a timerfd), as a paced hub. No chat
 * server doing the same fan-out over the same sockets can spend much less
 * CPU, so its figures show what the machine and ws_fanout.py leave for any.
 * Usage: srv [PORT [INTERVAL_MS]]  (PORT 0: a free one; prints 127.0.0.1:PORT)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "../c_listen.h"

/* ---- SHA-1 (FIPS 180-4) and base64, for Sec-WebSocket-Accept ---- */
static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1(const uint8_t *msg, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    uint8_t *m = calloc(total, 1);
    memcpy(m, msg, len);
    m[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) m[total - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t off = 0; off < total; off += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)m[off + 4 * i] << 24 | (uint32_t)m[off + 4 * i + 1] << 16 |
                   (uint32_t)m[off + 4 * i + 2] << 8 | m[off + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
            else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
            else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
            else f = b ^ c ^ d, k = 0xCA62C1D6;
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d, d = c, c = rol(b, 30), b = a, a = t;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    free(m);
    for (int i = 0; i < 20; i++) out[i] = (uint8_t)(h[i / 4] >> (24 - 8 * (i % 4)));
}

static void base64(const uint8_t *in, size_t n, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        out[o++] = t[v >> 18 & 63];
        out[o++] = t[v >> 12 & 63];
        out[o++] = i + 1 < n ? t[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? t[v & 63] : '=';
    }
    out[o] = 0;
}

/* ---- connections ---- */
#define MAXC 65536
struct conn {
    int fd, upgraded, joined, slot; /* slot: index in live[] once upgraded */
    uint8_t in[70000];
    size_t inlen;
    uint8_t *out;  /* bytes not yet written */
    size_t outlen, outcap;
};
static struct conn *conns[MAXC];  /* by fd */
static struct conn *live[MAXC];   /* the upgraded ones, densely */
static int nlive, interval_ms;

static void out_append(struct conn *c, const uint8_t *p, size_t n) {
    if (c->outlen + n > c->outcap) {
        c->outcap = (c->outlen + n) * 2;
        c->out = realloc(c->out, c->outcap);
    }
    memcpy(c->out + c->outlen, p, n);
    c->outlen += n;
}

static void flush(struct conn *c) {
    while (c->outlen) {
        ssize_t w = write(c->fd, c->out, c->outlen);
        if (w <= 0) return; /* EAGAIN: the rest waits for the next flush */
        memmove(c->out, c->out + w, c->outlen - (size_t)w);
        c->outlen -= (size_t)w;
    }
}

static void drop(struct conn *c) {
    if (c->upgraded) { /* move the last live connection into c's slot */
        live[c->slot] = live[--nlive];
        live[c->slot]->slot = c->slot;
    }
    close(c->fd);
    conns[c->fd] = NULL;
    free(c->out);
    free(c);
}

static void broadcast(const uint8_t *payload, size_t n) {
    uint8_t hdr[4];
    size_t hl = 2;
    hdr[0] = 0x81;
    if (n < 126) hdr[1] = (uint8_t)n;
    else hdr[1] = 126, hdr[2] = (uint8_t)(n >> 8), hdr[3] = (uint8_t)n, hl = 4;
    for (int i = 0; i < nlive; i++) {
        struct conn *c = live[i];
        out_append(c, hdr, hl);
        out_append(c, payload, n);
        if (!interval_ms) flush(c);
    }
}

static int handshake(struct conn *c) {
    c->in[c->inlen] = 0;
    char *end = strstr((char *)c->in, "\r\n\r\n");
    if (!end) return 0;
    char *k = strcasestr((char *)c->in, "Sec-WebSocket-Key:");
    if (!k) return -1;
    k += 18;
    while (*k == ' ') k++;
    char key[128];
    size_t kl = strcspn(k, "\r\n");
    if (kl > 60) return -1;
    memcpy(key, k, kl);
    memcpy(key + kl, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36);
    uint8_t dig[20];
    char acc[32], resp[256];
    sha1((uint8_t *)key, kl + 36, dig);
    base64(dig, 20, acc);
    int rl = snprintf(resp, sizeof resp,
                      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", acc);
    out_append(c, (uint8_t *)resp, (size_t)rl);
    flush(c);
    size_t used = (size_t)(end + 4 - (char *)c->in);
    memmove(c->in, c->in + used, c->inlen - used);
    c->inlen -= used;
    c->upgraded = 1;
    c->slot = nlive;
    live[nlive++] = c;
    return 1;
}

/* Parses whole client frames in c->in; returns -1 to drop the connection. */
static int frames(struct conn *c) {
    size_t off = 0;
    while (c->inlen - off >= 6) {
        uint8_t *p = c->in + off;
        int op = p[0] & 15;
        size_t n = p[1] & 127, h = 2;
        if (!(p[1] & 128)) return -1;
        if (n == 126) {
            if (c->inlen - off < 8) break;
            n = (size_t)p[2] << 8 | p[3], h = 4;
        } else if (n == 127) return -1;
        if (c->inlen - off < h + 4 + n) break;
        uint8_t *mask = p + h, *d = p + h + 4;
        for (size_t i = 0; i < n; i++) d[i] ^= mask[i & 3];
        if (op == 8) return -1;
        if (op == 1) {
            if (c->joined) broadcast(d, n);
            c->joined = 1;
        }
        off += h + 4 + n;
    }
    memmove(c->in, c->in + off, c->inlen - off);
    c->inlen -= off;
    return 0;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    interval_ms = argc > 2 ? atoi(argv[2]) : 0;
    int l = listen_loopback(port, "c_wsfan");
    int ep = epoll_create1(0);
    epoll_add(ep, l, EPOLLIN);
    int tfd = -1;
    if (interval_ms > 0) {
        tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
        struct itimerspec its = {{0, interval_ms * 1000000L}, {0, interval_ms * 1000000L}};
        timerfd_settime(tfd, 0, &its, NULL);
        epoll_add(ep, tfd, EPOLLIN);
    }
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                int s;
                while ((s = accept_nodelay(l)) >= 0) {
                    if (s >= MAXC) { close(s); continue; }
                    struct conn *c = calloc(1, sizeof *c);
                    c->fd = s;
                    conns[s] = c;
                    epoll_add(ep, s, EPOLLIN);
                }
            } else if (fd == tfd) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0) continue;
                for (int k = 0; k < nlive; k++)
                    if (live[k]->outlen) flush(live[k]);
            } else {
                struct conn *c = conns[fd];
                if (!c) continue;
                ssize_t r = read(fd, c->in + c->inlen, sizeof c->in - 1 - c->inlen);
                if (r <= 0) {
                    if (r < 0 && errno == EAGAIN) continue;
                    drop(c);
                    continue;
                }
                c->inlen += (size_t)r;
                if (!c->upgraded) {
                    int h = handshake(c);
                    if (h < 0) { drop(c); continue; }
                    if (h == 0) continue;
                }
                if (frames(c) < 0) drop(c);
            }
        }
    }
}
