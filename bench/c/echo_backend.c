/* echo_backend: the benchmark's backend. One thread, epoll, loopback.
 *
 * Each connection sends an HTTP/1.1 upgrade request head (read until CRLF CRLF); the backend
 * answers "101 Switching Protocols" with the Sec-WebSocket-Accept of its Sec-WebSocket-Key and
 * from then on echoes every byte verbatim (no WebSocket framing: the proxies under test do not
 * parse after the 101). A partial write keeps the rest and stops reading that connection until it
 * is flushed (back-pressure, bounded memory). EOF from the peer: flush, shutdown(SHUT_WR), close.
 *
 * A request whose path starts with /close gets its 101 and then the backend's FIN at once (the
 * load generator's upgrade workload): the server side closes first, so TIME_WAIT lands on the
 * servers' sockets and not on the clients' ephemeral ports, which a loopback upgrade storm would
 * otherwise exhaust within a second or two, slowing every connect() that follows.
 *
 * usage: echo_backend [--host 127.0.0.1] [--port 0]
 * prints "listening PORT" on stdout once it accepts connections; runs until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "wsutil.h"

#define MAX_HEAD 8192
#define READ_SIZE (256 * 1024)

enum { HEAD, ECHO, CLOSING };

typedef struct {
    int fd;
    int state;
    char *head; /* MAX_HEAD bytes while state == HEAD */
    size_t head_len;
    char *pending; /* bytes not yet written; reading stops while there are any */
    size_t pending_len, pending_off;
} conn;

static int epfd;
static char buf[READ_SIZE + MAX_HEAD + 256];

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void set_interest(conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl MOD");
}

static void close_conn(conn *c) {
    close(c->fd); /* also removes it from the epoll set */
    free(c->head);
    free(c->pending);
    free(c);
}

static void finish(conn *c) {
    shutdown(c->fd, SHUT_WR);
    close_conn(c);
}

/* Writes data (or keeps what does not fit); returns 0, or -1 when the connection was closed. */
static int send_or_keep(conn *c, const char *data, size_t n) {
    size_t off = 0;
    while (off < n) {
        ssize_t w = write(c->fd, data + off, n - off);
        if (w > 0) {
            off += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->pending = malloc(n - off);
            if (c->pending == NULL) die("malloc");
            memcpy(c->pending, data + off, n - off);
            c->pending_len = n - off;
            c->pending_off = 0;
            set_interest(c, EPOLLOUT);
            return 0;
        } else {
            close_conn(c);
            return -1;
        }
    }
    return 0;
}

static void on_head(conn *c) {
    ssize_t n = read(c->fd, c->head + c->head_len, MAX_HEAD - c->head_len);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        close_conn(c);
        return;
    }
    if (n < 0) return;
    c->head_len += (size_t)n;
    char *end = memmem(c->head, c->head_len, "\r\n\r\n", 4);
    if (end == NULL) {
        if (c->head_len == MAX_HEAD) close_conn(c);
        return;
    }
    size_t head_len = (size_t)(end + 4 - c->head);
    size_t key_len = 0;
    const char *key = find_header(c->head, head_len, "Sec-WebSocket-Key", &key_len);
    if (key == NULL || key_len == 0 || key_len > 64) {
        static const char bad[] =
            "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        if (write(c->fd, bad, sizeof(bad) - 1) < 0) { /* closing anyway */
        }
        close_conn(c);
        return;
    }
    int close_after = head_len > 10 && memcmp(c->head, "GET /close", 10) == 0;
    char accept[29];
    ws_accept(key, key_len, accept);
    int len = snprintf(buf, 256,
                       "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                       accept);
    size_t leftover = c->head_len - head_len; /* early tunnel bytes: echoed too */
    memcpy(buf + len, c->head + head_len, leftover);
    free(c->head);
    c->head = NULL;
    c->state = close_after ? CLOSING : ECHO;
    if (close_after) leftover = 0;
    if (send_or_keep(c, buf, (size_t)len + leftover) == 0 && c->state == CLOSING &&
        c->pending == NULL) {
        shutdown(c->fd, SHUT_WR);
    }
}

/* After a /close request's 101 and FIN: discard what arrives, close at the peer's EOF. */
static void on_closing(conn *c) {
    ssize_t n = read(c->fd, buf, READ_SIZE);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) close_conn(c);
}

static void on_readable(conn *c) {
    ssize_t n = read(c->fd, buf, READ_SIZE);
    if (n > 0) {
        send_or_keep(c, buf, (size_t)n);
    } else if (n == 0) {
        finish(c);
    } else if (errno != EAGAIN && errno != EINTR) {
        close_conn(c);
    }
}

static void on_writable(conn *c) {
    while (c->pending_off < c->pending_len) {
        ssize_t w = write(c->fd, c->pending + c->pending_off, c->pending_len - c->pending_off);
        if (w > 0) {
            c->pending_off += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return;
        } else {
            close_conn(c);
            return;
        }
    }
    free(c->pending);
    c->pending = NULL;
    c->pending_len = c->pending_off = 0;
    if (c->state == CLOSING) shutdown(c->fd, SHUT_WR);
    set_interest(c, EPOLLIN); /* an EOF that came meanwhile is read next */
}

static void on_accept(int listen_fd) {
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE) {
                static int warned;
                if (!warned++) fprintf(stderr, "echo_backend: out of descriptors\n");
            }
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        conn *c = calloc(1, sizeof(conn));
        if (c == NULL || (c->head = malloc(MAX_HEAD)) == NULL) die("malloc");
        c->fd = fd;
        c->state = HEAD;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl ADD");
    }
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--host") == 0 && i + 1 < argc) {
            host = argv[++i];
        } else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
            port = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: echo_backend [--host 127.0.0.1] [--port 0]\n");
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    struct sockaddr_storage addr;
    socklen_t addr_len;
    memset(&addr, 0, sizeof(addr));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&addr;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        addr_len = sizeof(*v4);
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        addr_len = sizeof(*v6);
    } else {
        fprintf(stderr, "echo_backend: %s is not a numeric address\n", host);
        return 2;
    }
    int listen_fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listen_fd < 0) die("socket");
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(listen_fd, (struct sockaddr *)&addr, addr_len) < 0) die("bind");
    if (listen(listen_fd, 4096) < 0) die("listen");
    if (getsockname(listen_fd, (struct sockaddr *)&addr, &addr_len) < 0) die("getsockname");
    port = ntohs(addr.ss_family == AF_INET ? v4->sin_port : v6->sin6_port);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, listen_fd, &ev) < 0) die("epoll_ctl listen");
    printf("listening %d\n", port);
    fflush(stdout);

    struct epoll_event events[512];
    for (;;) {
        int n = epoll_wait(epfd, events, 512, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        /* A handler may close a connection another event in this batch points at; each fd
         * appears at most once per batch and handlers only close their own, so that is safe. */
        for (int i = 0; i < n; i++) {
            conn *c = events[i].data.ptr;
            if (c == NULL) {
                on_accept(listen_fd);
            } else if (c->state == HEAD) {
                on_head(c);
            } else if (c->pending != NULL) {
                on_writable(c);
            } else if (c->state == CLOSING) {
                on_closing(c);
            } else {
                on_readable(c);
            }
        }
    }
}
