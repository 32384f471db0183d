/* loadgen: the benchmark's load generator. One thread, epoll, loopback; one JSON line per run.
 *
 * Every connection starts with an HTTP/1.1 WebSocket upgrade request (a fresh random
 * Sec-WebSocket-Key, a Host header) and checks the answer: status 101, Upgrade: websocket and the
 * right Sec-WebSocket-Accept. After the 101 the tunnel carries raw bytes, which the backend echoes.
 *
 * Each connection sends a deterministic byte stream (a window of a random pattern, shifted per
 * connection) and compares every byte that comes back with what it sent at that offset, so a
 * lost, reordered, duplicated or cross-wired byte is counted in "mismatches".
 *
 * modes
 *   upgrade  C connections, each in a loop: connect, upgrade, read the 101 head, close;
 *            until --count upgrades or --seconds. With --close-by server (the default) the
 *            request path is /close, so the backend sends its FIN right after the 101 and the
 *            load generator closes at that EOF: TIME_WAIT stays on the server side and the
 *            loopback's ephemeral ports are not used up (see echo_backend.c). With
 *            --close-by client it closes right after the 101 head.
 *   echo     C upgraded connections each send --size bytes and wait for the whole echo;
 *            closed loop, or with --rate R an open loop at R messages/s in total (round robin
 *            over the connections, round trips timed from the scheduled send time);
 *            until --count messages or --seconds.
 *   bulk     C upgraded connections each write --chunk byte chunks (at most --window bytes
 *            unechoed) and read the echo back; until --bytes sent and echoed, or --seconds.
 *   idle     open C upgraded tunnels (--parallel handshakes at a time), print the ready line, hold
 *            them until stdin reaches EOF or --seconds pass, then close them.
 *
 * With --sync (used by the Python harness), after setting up its connections it prints
 *   {"event": "ready", ...}
 * and waits for a line on stdin before measuring; after printing its result it waits for stdin
 * to reach EOF before closing its connections, so the caller can sample the proxy in between.
 *
 * TLS (--tls; compiled in with -DBENCH_TLS and OpenSSL, else --tls exits with status 2)
 *   Every connection runs a TLS handshake right after the TCP connect (TLS 1.2 at least, 1.3
 *   unless --tls-version 1.2, SNI --sni (default "localhost"), ALPN http/1.1), then the same
 *   workload through SSL_read/SSL_write on the same non-blocking sockets and the same epoll loop
 *   (SSL_ERROR_WANT_READ/WANT_WRITE become the events to wait for). Every byte is still checked.
 *   The server's certificate is NOT verified: this is a benchmark client on loopback that talks
 *   to a certificate the harness just made; verification would add the same client-side cost to
 *   every proxy and prove nothing. (The server still proves it holds the key: OpenSSL checks its
 *   CertificateVerify signature whatever the verify mode.)
 *   Every connection is a new SSL object and no session is ever offered for resumption, so each
 *   handshake is a full one (ECDHE + the server's signature): the upgrade workload measures the
 *   cost of a new client. Session tickets the server sends are counted and dropped. The result
 *   line gets a "tls" object: what the first handshake negotiated (version, cipher, group,
 *   ALPN), handshakes, resumed ones (must be 0), tickets received, and EOFs without close_notify.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#ifdef BENCH_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

#include "wsutil.h"

#define PATTERN_PERIOD 65521u /* prime, so connections' shifts differ */
#define MAX_WINDOW (256u * 1024u)
#define READ_SIZE (256u * 1024u)
#define HEAD_MAX 2048
#define RING 1024 /* outstanding messages per echo connection */
#define MAX_SAMPLES 20000000u

enum { FREE, CONNECTING, TLS_HANDSHAKE, SENDING, RECEIVING, OPEN, DRAINING, CLOSED };
enum { M_UPGRADE, M_ECHO, M_BULK, M_IDLE };

typedef struct {
    int fd;
    int state;
    uint32_t id;
    uint32_t interest;
    uint32_t shift;
    double started; /* when the connect began */
    char request[320];
    size_t request_len, request_off;
    char accept[29];
    char head[HEAD_MAX];
    size_t head_len;
    uint64_t sent, target, received;
    double *ring; /* scheduled send times of outstanding echo messages */
    uint32_t ring_head, ring_count;
    uint32_t read_wait, write_wait; /* the event a blocked read / write waits for, or 0 */
#ifdef BENCH_TLS
    SSL *ssl;
#endif
} conn;

/* options */
static int mode;
static struct sockaddr_storage target_addr;
static socklen_t target_len;
static char host_header[80];
static uint32_t n_conns = 32;
static uint64_t max_count = UINT64_MAX;
static double seconds = 5.0;
static double setup_seconds = 60.0;
static double rate;
static uint32_t msg_size = 64;
static uint32_t chunk = 65536;
static uint64_t max_bytes = UINT64_MAX;
static uint64_t window = 4 * 65536;
static uint32_t parallel = 256;
static int sync_mode;
static int server_closes = 1;
static int use_tls;
static int tls_max_version; /* 0: OpenSSL's highest (TLS 1.3) */
static const char *sni = "localhost";

/* state */
static int epfd;
static conn *conns;
static uint8_t *pattern;
static uint8_t read_buf[READ_SIZE];
static uint64_t rng_state;
static int measuring, stopping;
static uint64_t started_count, completed, errors, mismatches, dropped, lost, unexpected;
static uint64_t echoed_bytes, budget_left;
static uint32_t open_conns, handshaking;
static char first_error[256];
static double *samples;
static size_t n_samples, cap_samples;
static char timer_tag, stdin_tag;
static char io_error[160]; /* the last TLS error, when errno is EPROTO */
#ifdef BENCH_TLS
static SSL_CTX *tls_ctx;
static uint64_t tls_handshakes, tls_resumed, tls_tickets, tls_unclean_eof;
static char tls_version[16], tls_cipher[64], tls_group[32], tls_alpn[32];
#endif

static uint64_t rng(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void note_error(const char *fmt, const char *detail) {
    errors++;
    if (first_error[0] == '\0') snprintf(first_error, sizeof(first_error), fmt, detail);
}

static void record(double value_us) {
    if (!measuring || n_samples >= MAX_SAMPLES) return;
    if (n_samples == cap_samples) {
        cap_samples = cap_samples ? cap_samples * 2 : 65536;
        samples = realloc(samples, cap_samples * sizeof(double));
        if (samples == NULL) die("realloc");
    }
    samples[n_samples++] = value_us;
}

static void set_interest(conn *c, uint32_t events) {
    if (c->interest == events) return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl MOD");
    c->interest = events;
}

/* --- I/O: read()/write() on a plain socket, SSL_read()/SSL_write() on a TLS one, both with the
 * conventions of read()/write(): n > 0, 0 at EOF, or -1 with errno. A blocked call (EAGAIN) leaves
 * in c->read_wait / c->write_wait the event to wait for: for TLS that is the one OpenSSL asks for
 * (a TLS read may have to write, and a TLS write may have to read). */

static int last_eof_unclean; /* set by the last EOF: the peer closed without close_notify */

static const char *io_strerror(int err) {
    return err == EPROTO && io_error[0] ? io_error : strerror(err);
}

#ifdef BENCH_TLS
static ssize_t tls_result(conn *c, int n, int saved_errno, uint32_t *wait) {
    if (n > 0) return n;
    int err = SSL_get_error(c->ssl, n);
    last_eof_unclean = 0;
    switch (err) {
    case SSL_ERROR_WANT_READ:
        *wait = EPOLLIN;
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_WANT_WRITE:
        *wait = EPOLLOUT;
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_ZERO_RETURN: /* close_notify */
        return 0;
    case SSL_ERROR_SYSCALL:
        if (saved_errno != 0) {
            errno = saved_errno;
            return -1;
        }
        if (ERR_peek_error() == 0) { /* EOF without close_notify */
            last_eof_unclean = 1;
            return 0;
        }
        break;
    case SSL_ERROR_SSL:
        if (ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
            ERR_clear_error();
            last_eof_unclean = 1;
            return 0;
        }
        break;
    default:
        break;
    }
    unsigned long code = ERR_get_error();
    if (code != 0) {
        ERR_error_string_n(code, io_error, sizeof(io_error));
    } else {
        snprintf(io_error, sizeof(io_error), "TLS error %d", err);
    }
    ERR_clear_error();
    errno = EPROTO;
    return -1;
}
#endif

static ssize_t conn_read(conn *c, void *buf, size_t len) {
    c->read_wait = 0;
#ifdef BENCH_TLS
    if (c->ssl != NULL) {
        ERR_clear_error();
        errno = 0;
        int n = SSL_read(c->ssl, buf, len > (1u << 30) ? (1 << 30) : (int)len);
        return tls_result(c, n, errno, &c->read_wait);
    }
#endif
    last_eof_unclean = 0;
    ssize_t n = read(c->fd, buf, len);
    if (n < 0 && errno == EAGAIN) c->read_wait = EPOLLIN;
    return n;
}

static ssize_t conn_write(conn *c, const void *buf, size_t len) {
    c->write_wait = 0;
#ifdef BENCH_TLS
    if (c->ssl != NULL) {
        ERR_clear_error();
        errno = 0;
        int n = SSL_write(c->ssl, buf, len > (1u << 30) ? (1 << 30) : (int)len);
        ssize_t r = tls_result(c, n, errno, &c->write_wait);
        if (r == 0) { /* the peer's close_notify (or EOF) arrived while writing */
            errno = EPIPE;
            return -1;
        }
        return r;
    }
#endif
    ssize_t n = write(c->fd, buf, len);
    if (n < 0 && errno == EAGAIN) c->write_wait = EPOLLOUT;
    return n;
}

/* Decrypted or still encrypted bytes that OpenSSL holds (read-ahead): no epoll event will say so,
 * so whoever reads keeps reading while this is true. Always 0 for a plain socket. */
static int tls_pending(const conn *c) {
#ifdef BENCH_TLS
    return c->ssl != NULL && SSL_has_pending(c->ssl);
#else
    (void)c;
    return 0;
#endif
}

/* Closes the socket (and frees the TLS state; no close_notify is sent: the connection is done). */
static void release(conn *c) {
#ifdef BENCH_TLS
    if (c->ssl != NULL) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
#endif
    close(c->fd);
    c->fd = -1;
}

static void close_conn(conn *c) {
    if (c->state == OPEN) open_conns--;
    if (c->state == CONNECTING || c->state == TLS_HANDSHAKE || c->state == SENDING ||
        c->state == RECEIVING) {
        handshaking--;
    }
    release(c);
    c->state = CLOSED;
}

static void fail(conn *c, const char *fmt, const char *detail) {
    note_error(fmt, detail);
    close_conn(c);
}

static void build_request(conn *c) {
    uint8_t nonce[16];
    for (int i = 0; i < 16; i += 8) {
        uint64_t r = rng();
        memcpy(nonce + i, &r, 8);
    }
    char key[25];
    base64_encode(nonce, 16, key);
    ws_accept(key, 24, c->accept);
    c->request_len = (size_t)snprintf(c->request, sizeof(c->request),
                                      "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                                      "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                                      "Sec-WebSocket-Version: 13\r\n\r\n",
                                      mode == M_UPGRADE && server_closes ? "/close" : "/bench",
                                      host_header, key);
    c->request_off = 0;
}

static void send_request(conn *c);
static void connected(conn *c);

static void start_connect(conn *c) {
    int fd = socket(target_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->state = CLOSED;
        note_error("socket: %s", strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->fd = fd;
    c->started = now_seconds();
    c->head_len = 0;
    c->sent = c->target = c->received = 0;
    c->ring_head = c->ring_count = 0;
    c->read_wait = c->write_wait = 0;
    started_count++;
    handshaking++;
    c->interest = EPOLLOUT;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl ADD");
    build_request(c);
    if (connect(fd, (struct sockaddr *)&target_addr, target_len) == 0) {
        connected(c);
    } else if (errno == EINPROGRESS) {
        c->state = CONNECTING;
    } else {
        c->state = CONNECTING;
        fail(c, "connect: %s", strerror(errno));
    }
}

static void send_request(conn *c) {
    while (c->request_off < c->request_len) {
        ssize_t w = conn_write(c, c->request + c->request_off, c->request_len - c->request_off);
        if (w > 0) {
            c->request_off += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && errno == EAGAIN) {
            set_interest(c, c->write_wait);
            return;
        } else {
            fail(c, "send request: %s", io_strerror(errno));
            return;
        }
    }
    c->state = RECEIVING;
    set_interest(c, EPOLLIN);
}

#ifdef BENCH_TLS
static void tls_established(conn *c) {
    tls_handshakes++;
    if (SSL_session_reused(c->ssl)) tls_resumed++;
    if (tls_version[0] != '\0') return;
    snprintf(tls_version, sizeof(tls_version), "%s", SSL_get_version(c->ssl));
    snprintf(tls_cipher, sizeof(tls_cipher), "%s", SSL_get_cipher_name(c->ssl));
    int group = SSL_get_negotiated_group(c->ssl);
    const char *group_name = group > 0 ? OBJ_nid2sn(group & ~TLSEXT_nid_unknown) : NULL;
    snprintf(tls_group, sizeof(tls_group), "%s", group_name ? group_name : "unknown");
    const unsigned char *alpn = NULL;
    unsigned int alpn_len = 0;
    SSL_get0_alpn_selected(c->ssl, &alpn, &alpn_len);
    snprintf(tls_alpn, sizeof(tls_alpn), "%.*s", (int)(alpn_len < 30 ? alpn_len : 30),
             alpn ? (const char *)alpn : "");
}

static void tls_step(conn *c) {
    ERR_clear_error();
    errno = 0;
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        tls_established(c);
        c->state = SENDING;
        send_request(c);
        return;
    }
    uint32_t wait = 0;
    ssize_t n = tls_result(c, r, errno, &wait);
    if (n < 0 && errno == EAGAIN) {
        set_interest(c, wait);
        return;
    }
    fail(c, "TLS handshake: %s", n == 0 ? "connection closed" : io_strerror(errno));
}

/* Counts the session tickets the server sends and drops them: a new client has none to offer. */
static int on_new_session(SSL *ssl, SSL_SESSION *session) {
    (void)ssl;
    (void)session;
    tls_tickets++;
    return 0; /* not kept: OpenSSL frees it */
}
#endif

/* TCP is up: the TLS handshake first (with --tls), then the upgrade request. */
static void connected(conn *c) {
#ifdef BENCH_TLS
    if (use_tls) {
        c->ssl = SSL_new(tls_ctx);
        if (c->ssl == NULL || SSL_set_fd(c->ssl, c->fd) != 1 ||
            SSL_set_tlsext_host_name(c->ssl, sni) != 1) {
            c->state = TLS_HANDSHAKE;
            fail(c, "%s", "SSL_new/SSL_set_fd/SNI failed");
            return;
        }
        SSL_set_connect_state(c->ssl);
        c->state = TLS_HANDSHAKE;
        tls_step(c);
        return;
    }
#endif
    c->state = SENDING;
    send_request(c);
}

static void on_connected(conn *c) {
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
        fail(c, "connect: %s", strerror(err));
        return;
    }
    connected(c);
}

/* Compares n received bytes with the stream at c->received; returns 0 when they match. */
static int verify(conn *c, const uint8_t *data, size_t n) {
    if (c->received + n > c->sent) return -1; /* more came back than was sent */
    size_t done = 0;
    while (done < n) {
        size_t at = (size_t)((c->received + done + c->shift) % PATTERN_PERIOD);
        size_t len = n - done < MAX_WINDOW ? n - done : MAX_WINDOW;
        if (memcmp(data + done, pattern + at, len) != 0) return -1;
        done += len;
    }
    return 0;
}

static void try_write(conn *c) {
    if (c->state != OPEN) return;
    while (c->sent < c->target) {
        uint64_t want = c->target - c->sent;
        size_t len = want < chunk ? (size_t)want : chunk;
        size_t at = (size_t)((c->sent + c->shift) % PATTERN_PERIOD);
        /* A TLS write that blocked is retried with the same bytes (the same stream offset),
         * as OpenSSL requires; the length may have grown, which it allows. */
        ssize_t w = conn_write(c, pattern + at, len);
        if (w > 0) {
            c->sent += (uint64_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && errno == EAGAIN) {
            set_interest(c, EPOLLIN | c->write_wait | c->read_wait);
            return;
        } else {
            fail(c, "write: %s", io_strerror(errno));
            return;
        }
    }
    set_interest(c, EPOLLIN | c->read_wait);
}

static void queue_message(conn *c, double scheduled) {
    if (c->ring_count == RING) {
        dropped++;
        return;
    }
    c->ring[(c->ring_head + c->ring_count) % RING] = scheduled;
    c->ring_count++;
    c->target += msg_size;
    try_write(c);
}

static void bulk_fill(conn *c) {
    uint64_t in_flight = c->target - c->received;
    if (stopping || in_flight >= window || budget_left == 0) return;
    uint64_t more = window - in_flight;
    if (more > budget_left) more = budget_left;
    budget_left -= more;
    c->target += more;
    try_write(c);
}

static void on_stream_bytes(conn *c, const uint8_t *data, size_t n) {
    if (mode == M_UPGRADE) return;
    if (mode == M_IDLE) {
        unexpected += n;
        return;
    }
    if (verify(c, data, n) != 0) {
        mismatches++;
        fail(c, "%s", "echoed bytes differ from the bytes sent");
        return;
    }
    c->received += n;
    if (measuring) echoed_bytes += n;
    if (mode == M_BULK) {
        bulk_fill(c);
        return;
    }
    double now = now_seconds();
    while (c->state == OPEN && c->ring_count > 0 &&
           c->received >= c->target - (uint64_t)(c->ring_count - 1) * msg_size) {
        double scheduled = c->ring[c->ring_head];
        c->ring_head = (c->ring_head + 1) % RING;
        c->ring_count--;
        if (measuring) {
            completed++;
            record((now - scheduled) * 1e6);
        }
        if (rate == 0 && !stopping && started_count < max_count) {
            started_count++;
            queue_message(c, now);
        }
    }
}

static void on_draining(conn *c);
static void on_open_event(conn *c, uint32_t events);

static void on_upgraded(conn *c, size_t head_len) {
    handshaking--;
    if (mode == M_UPGRADE) {
        if (measuring && !stopping) {
            completed++;
            record((now_seconds() - c->started) * 1e6);
        }
        if (server_closes) { /* wait for the backend's FIN, relayed by the proxy */
            c->state = DRAINING;
            if (tls_pending(c)) on_draining(c); /* close_notify may have come with the 101 */
            return;
        }
        release(c);
        c->state = FREE;
        return;
    }
    c->state = OPEN;
    open_conns++;
    size_t leftover = c->head_len - head_len;
    if (leftover > 0) on_stream_bytes(c, (const uint8_t *)c->head + head_len, leftover);
    if (c->state == OPEN && tls_pending(c)) on_open_event(c, EPOLLIN);
}

static void on_head(conn *c) {
    char *end = NULL;
    while (end == NULL) {
        ssize_t n = conn_read(c, c->head + c->head_len, HEAD_MAX - c->head_len);
        if (n == 0) {
            fail(c, "%s", "connection closed before the 101 head");
            return;
        }
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                fail(c, "read head: %s", io_strerror(errno));
            } else {
                set_interest(c, c->read_wait ? c->read_wait : EPOLLIN);
            }
            return;
        }
        c->head_len += (size_t)n;
        end = memmem(c->head, c->head_len, "\r\n\r\n", 4);
        if (end == NULL && c->head_len == HEAD_MAX) {
            fail(c, "%s", "response head too long");
            return;
        }
        if (end == NULL && !tls_pending(c)) return;
    }
    size_t head_len = (size_t)(end + 4 - c->head);
    if (head_len < 13 || memcmp(c->head, "HTTP/1.1 101", 12) != 0) {
        char line[64];
        size_t len = strcspn(c->head, "\r\n");
        snprintf(line, sizeof(line), "%.*s", (int)(len < 60 ? len : 60), c->head);
        fail(c, "status: %s", line);
        return;
    }
    size_t accept_len = 0, upgrade_len = 0;
    const char *accept = find_header(c->head, head_len, "Sec-WebSocket-Accept", &accept_len);
    const char *upgrade = find_header(c->head, head_len, "Upgrade", &upgrade_len);
    if (accept == NULL || accept_len != 28 || memcmp(accept, c->accept, 28) != 0) {
        fail(c, "%s", "wrong or missing Sec-WebSocket-Accept");
        return;
    }
    if (upgrade == NULL || upgrade_len != 9 || strncasecmp(upgrade, "websocket", 9) != 0) {
        fail(c, "%s", "wrong or missing Upgrade header in the 101");
        return;
    }
    on_upgraded(c, head_len);
}

static void on_draining(conn *c) {
    ssize_t n;
    do {
        n = conn_read(c, read_buf, READ_SIZE);
        if (n > 0) unexpected += (uint64_t)n;
    } while (n > 0 && tls_pending(c));
    if (n > 0) return;
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        set_interest(c, c->read_wait ? c->read_wait : EPOLLIN);
        return;
    }
    if (n < 0) note_error("read after the 101: %s", io_strerror(errno));
#ifdef BENCH_TLS
    if (n == 0 && last_eof_unclean) tls_unclean_eof++;
#endif
    release(c);
    c->state = FREE;
}

static void on_open_event(conn *c, uint32_t events) {
    int readable = (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) != 0;
    if (readable || (c->read_wait == EPOLLOUT && (events & EPOLLOUT))) {
        /* One read() for a plain socket (epoll is level-triggered: it says again if there is
         * more); for TLS, SSL_read until OpenSSL holds nothing more (read-ahead may have taken
         * several records in one read(), and no event would announce those). */
        ssize_t n;
        do {
            n = conn_read(c, read_buf, READ_SIZE);
            if (n > 0) on_stream_bytes(c, read_buf, (size_t)n);
        } while (n > 0 && c->state == OPEN && tls_pending(c));
        if (n == 0) {
#ifdef BENCH_TLS
            if (last_eof_unclean) tls_unclean_eof++;
#endif
            if (mode == M_IDLE) {
                dropped++;
                close_conn(c);
            } else {
                fail(c, "%s", "tunnel closed by the other side");
            }
            return;
        }
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
            if (mode == M_IDLE) dropped++;
            fail(c, "read: %s", io_strerror(errno));
            return;
        }
        if (c->state == OPEN && c->read_wait == EPOLLOUT) set_interest(c, c->interest | EPOLLOUT);
    }
    if (c->state == OPEN && ((events & EPOLLOUT) || (readable && c->write_wait == EPOLLIN))) {
        try_write(c);
    }
}

static int stdin_eof;

static void on_stdin(void) {
    char scratch[256];
    ssize_t n = read(0, scratch, sizeof(scratch));
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) stdin_eof = 1;
}

static int timer_fd = -1;
static double timer_start, interval;
static uint64_t scheduled;

static void on_timer(void) {
    uint64_t ticks = 0;
    if (read(timer_fd, &ticks, sizeof(ticks)) != sizeof(ticks)) return;
    for (uint64_t i = 0; i < ticks; i++) {
        if (stopping || scheduled >= max_count) return;
        double when = timer_start + (double)(scheduled + 1) * interval;
        conn *c = &conns[scheduled % n_conns];
        scheduled++;
        if (c->state != OPEN) {
            dropped++;
            continue;
        }
        queue_message(c, when);
    }
}

static void dispatch(struct epoll_event *ev) {
    if (ev->data.ptr == &timer_tag) {
        on_timer();
        return;
    }
    if (ev->data.ptr == &stdin_tag) {
        on_stdin();
        return;
    }
    conn *c = ev->data.ptr;
    switch (c->state) {
    case CONNECTING:
        on_connected(c);
        break;
#ifdef BENCH_TLS
    case TLS_HANDSHAKE:
        tls_step(c);
        break;
#endif
    case SENDING:
        send_request(c);
        break;
    case RECEIVING:
        on_head(c);
        break;
    case OPEN:
        on_open_event(c, ev->events);
        break;
    case DRAINING:
        on_draining(c);
        break;
    default:
        break;
    }
}

/* Runs the event loop until done() or the deadline; returns 1 when done() became true. */
static int run_until(int (*done)(void), double deadline) {
    struct epoll_event events[512];
    while (!done()) {
        double now = now_seconds();
        if (now >= deadline) return 0;
        int timeout = (int)ceil((deadline - now) * 1000.0);
        if (timeout > 100) timeout = 100;
        int n = epoll_wait(epfd, events, 512, timeout);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) dispatch(&events[i]);
    }
    return 1;
}

/* setup: open every connection, at most `parallel` handshakes at a time */
static uint32_t next_to_open;

static void open_more(void) {
    while (next_to_open < n_conns && handshaking < parallel) {
        start_connect(&conns[next_to_open++]);
    }
}

static int setup_done(void) {
    open_more();
    return next_to_open == n_conns && handshaking == 0;
}

static int upgrade_done(void) {
    if (!stopping && completed >= max_count) stopping = 1;
    for (uint32_t i = 0; i < n_conns && !stopping; i++) {
        conn *c = &conns[i];
        if ((c->state == FREE || c->state == CLOSED) && started_count < max_count) {
            start_connect(c);
        }
    }
    return stopping;
}

static int echo_done(void) {
    if (rate > 0) return scheduled >= max_count && completed + dropped + lost >= max_count;
    return completed >= max_count;
}

static int drained(void) {
    for (uint32_t i = 0; i < n_conns; i++) {
        if (conns[i].state == OPEN && conns[i].ring_count > 0) return 0;
    }
    return 1;
}

static int bulk_done(void) {
    if (budget_left > 0) return 0;
    for (uint32_t i = 0; i < n_conns; i++) {
        if (conns[i].state == OPEN && conns[i].received < conns[i].target) return 0;
    }
    return 1;
}

static int hold_done(void) { return stdin_eof; }

static void wait_for_line(void) { /* blocking: the harness's "go" */
    char ch;
    while (read(0, &ch, 1) == 1 && ch != '\n') {
    }
}

static void wait_for_eof(void) {
    char scratch[256];
    ssize_t n;
    while ((n = read(0, scratch, sizeof(scratch))) != 0) {
        if (n < 0 && errno != EINTR && errno != EAGAIN) break;
    }
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(double p) { /* nearest rank; samples must be sorted */
    if (n_samples == 0) return 0;
    size_t rank = (size_t)ceil(p * (double)n_samples);
    if (rank < 1) rank = 1;
    return samples[rank - 1];
}

static void json_escape(const char *in, char *out, size_t size) {
    size_t o = 0;
    for (; *in && o + 7 < size; in++) {
        unsigned char ch = (unsigned char)*in;
        if (ch == '"' || ch == '\\') {
            out[o++] = '\\';
            out[o++] = (char)ch;
        } else if (ch < 0x20) {
            o += (size_t)snprintf(out + o, size - o, "\\u%04x", ch);
        } else {
            out[o++] = (char)ch;
        }
    }
    out[o] = '\0';
}

static void print_ready(double setup_time) {
    printf("{\"event\": \"ready\", \"open\": %u, \"errors\": %llu, \"setup_seconds\": %.3f}\n",
           open_conns, (unsigned long long)errors, setup_time);
    fflush(stdout);
}

static void parse_target(const char *host, int port) {
    memset(&target_addr, 0, sizeof(target_addr));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&target_addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&target_addr;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        target_len = sizeof(*v4);
        snprintf(host_header, sizeof(host_header), "%s:%d", host, port);
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        target_len = sizeof(*v6);
        snprintf(host_header, sizeof(host_header), "[%s]:%d", host, port);
    } else {
        fprintf(stderr, "loadgen: %s is not a numeric address\n", host);
        exit(2);
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen upgrade|echo|bulk|idle --port P [--host 127.0.0.1] [--conns C]\n"
            "       [--count N] [--seconds T] [--setup-seconds S] [--rate R] [--size B]\n"
            "       [--chunk B] [--bytes B] [--window B] [--parallel P] [--sync]\n"
            "       [--close-by server|client] [--tls [--tls-version 1.2|1.3] [--sni NAME]]\n");
    exit(2);
}

static void tls_init(void) {
#ifdef BENCH_TLS
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (tls_ctx == NULL) {
        fprintf(stderr, "loadgen: SSL_CTX_new failed\n");
        exit(1);
    }
    SSL_CTX_set_min_proto_version(tls_ctx, TLS1_2_VERSION);
    if (tls_max_version != 0) SSL_CTX_set_max_proto_version(tls_ctx, tls_max_version);
    /* No certificate verification: a benchmark client, on loopback, against a certificate the
     * harness made a moment ago (see the header). */
    SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_alpn_protos(tls_ctx, (const unsigned char *)"\x08http/1.1", 9);
    /* Partial writes, so that a blocked SSL_write reports what went out; read-ahead, so that one
     * read() takes several records (tls_pending() then drains what it took). */
    SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_read_ahead(tls_ctx, 1);
    if (mode == M_BULK) SSL_CTX_set_default_read_buffer_len(tls_ctx, 64 * 1024);
    if (mode == M_IDLE) SSL_CTX_set_mode(tls_ctx, SSL_MODE_RELEASE_BUFFERS);
    /* Tickets are counted (on_new_session) and never stored or offered: no resumption. */
    SSL_CTX_set_session_cache_mode(tls_ctx,
                                   SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(tls_ctx, on_new_session);
#else
    fprintf(stderr, "loadgen: built without TLS: the OpenSSL headers were missing when it was "
                    "compiled (apt-get install libssl-dev)\n");
    exit(2);
#endif
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    if (strcmp(argv[1], "upgrade") == 0) {
        mode = M_UPGRADE;
    } else if (strcmp(argv[1], "echo") == 0) {
        mode = M_ECHO;
    } else if (strcmp(argv[1], "bulk") == 0) {
        mode = M_BULK;
    } else if (strcmp(argv[1], "idle") == 0) {
        mode = M_IDLE;
    } else {
        usage();
    }
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 2; i < argc; i++) {
        const char *arg = argv[i];
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(arg, "--sync") == 0) {
            sync_mode = 1;
            continue;
        }
        if (strcmp(arg, "--tls") == 0) {
            use_tls = 1;
            continue;
        }
        if (value == NULL) usage();
        i++;
        if (strcmp(arg, "--close-by") == 0) {
            if (strcmp(value, "server") != 0 && strcmp(value, "client") != 0) usage();
            server_closes = strcmp(value, "server") == 0;
            continue;
        }
        if (strcmp(arg, "--tls-version") == 0) {
            if (strcmp(value, "1.2") != 0 && strcmp(value, "1.3") != 0) usage();
            tls_max_version = strcmp(value, "1.2") == 0 ? 0x0303 : 0x0304;
            continue;
        }
        if (strcmp(arg, "--host") == 0) host = value;
        else if (strcmp(arg, "--sni") == 0) sni = value;
        else if (strcmp(arg, "--port") == 0) port = atoi(value);
        else if (strcmp(arg, "--conns") == 0) n_conns = (uint32_t)strtoul(value, NULL, 10);
        else if (strcmp(arg, "--count") == 0) max_count = strtoull(value, NULL, 10);
        else if (strcmp(arg, "--seconds") == 0) seconds = atof(value);
        else if (strcmp(arg, "--setup-seconds") == 0) setup_seconds = atof(value);
        else if (strcmp(arg, "--rate") == 0) rate = atof(value);
        else if (strcmp(arg, "--size") == 0) msg_size = (uint32_t)strtoul(value, NULL, 10);
        else if (strcmp(arg, "--chunk") == 0) chunk = (uint32_t)strtoul(value, NULL, 10);
        else if (strcmp(arg, "--bytes") == 0) max_bytes = strtoull(value, NULL, 10);
        else if (strcmp(arg, "--window") == 0) window = strtoull(value, NULL, 10);
        else if (strcmp(arg, "--parallel") == 0) parallel = (uint32_t)strtoul(value, NULL, 10);
        else usage();
    }
    if (port <= 0 || port > 65535 || n_conns == 0 || seconds <= 0 || msg_size == 0 ||
        chunk == 0 || chunk > MAX_WINDOW || window == 0 || parallel == 0 || rate < 0) {
        usage();
    }
    parse_target(host, port);
    if (use_tls) tls_init();
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    rng_state = ((uint64_t)getpid() << 32) ^ (uint64_t)(now_seconds() * 1e9) ^ 0x9E3779B97F4A7C15ULL;
    if (rng_state == 0) rng_state = 1;
    pattern = malloc(PATTERN_PERIOD + MAX_WINDOW);
    if (pattern == NULL) die("malloc");
    for (size_t i = 0; i < PATTERN_PERIOD + MAX_WINDOW; i++) {
        pattern[i] = i < PATTERN_PERIOD ? (uint8_t)(rng() >> 56) : pattern[i - PATTERN_PERIOD];
    }
    conns = calloc(n_conns, sizeof(conn));
    if (conns == NULL) die("calloc");
    for (uint32_t i = 0; i < n_conns; i++) {
        conns[i].id = i;
        conns[i].fd = -1;
        conns[i].state = FREE;
        conns[i].shift = (uint32_t)(((uint64_t)i * 7919u) % PATTERN_PERIOD);
        if (mode == M_ECHO && (conns[i].ring = malloc(RING * sizeof(double))) == NULL) {
            die("malloc");
        }
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");

    /* setup: every mode but upgrade opens its tunnels first */
    double setup_time = 0;
    if (mode != M_UPGRADE) {
        double t0 = now_seconds();
        double limit = mode == M_IDLE ? seconds : setup_seconds;
        if (mode != M_IDLE) parallel = parallel < n_conns ? parallel : n_conns;
        run_until(setup_done, t0 + limit);
        setup_time = now_seconds() - t0;
    }
    if (sync_mode || mode == M_IDLE) print_ready(setup_time);
    if (sync_mode && mode != M_IDLE) wait_for_line();

    /* measure */
    uint64_t setup_errors = errors;
    measuring = 1;
    double cpu0 = cpu_seconds();
    double t0 = now_seconds();
    double deadline = t0 + seconds;
    int finished = 0;
    if (mode == M_UPGRADE) {
        finished = run_until(upgrade_done, deadline);
    } else if (mode == M_ECHO) {
        if (rate > 0) {
            timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
            if (timer_fd < 0) die("timerfd_create");
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &timer_tag};
            if (epoll_ctl(epfd, EPOLL_CTL_ADD, timer_fd, &ev) < 0) die("epoll_ctl timer");
            interval = 1.0 / rate;
            struct itimerspec spec;
            spec.it_interval.tv_sec = (time_t)interval;
            spec.it_interval.tv_nsec = (long)((interval - (double)(time_t)interval) * 1e9);
            if (spec.it_interval.tv_sec == 0 && spec.it_interval.tv_nsec == 0) {
                spec.it_interval.tv_nsec = 1;
            }
            spec.it_value = spec.it_interval;
            timer_start = now_seconds();
            if (timerfd_settime(timer_fd, 0, &spec, NULL) < 0) die("timerfd_settime");
        } else {
            started_count = 0; /* from here on, counts messages sent */
            for (uint32_t i = 0; i < n_conns && started_count < max_count; i++) {
                if (conns[i].state != OPEN) continue;
                started_count++;
                queue_message(&conns[i], now_seconds());
            }
        }
        finished = run_until(echo_done, deadline);
        if (rate > 0) { /* stop scheduling; let the outstanding echoes arrive (up to 2 s) */
            stopping = 1;
            run_until(drained, now_seconds() + 2.0);
            for (uint32_t i = 0; i < n_conns; i++) {
                if (conns[i].state == OPEN) lost += conns[i].ring_count;
            }
        }
    } else if (mode == M_BULK) {
        budget_left = max_bytes;
        for (uint32_t i = 0; i < n_conns; i++) {
            if (conns[i].state == OPEN) bulk_fill(&conns[i]);
        }
        finished = run_until(bulk_done, deadline);
    } else {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &stdin_tag};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev) < 0) stdin_eof = 0; /* /dev/null: hold by time */
        run_until(hold_done, deadline);
        finished = 1;
    }
    double elapsed = now_seconds() - t0;
    double cpu = cpu_seconds() - cpu0;
    measuring = 0;
    stopping = 1;
    if (mode == M_ECHO && rate > 0) elapsed = elapsed < seconds ? elapsed : seconds;
    if (mode == M_ECHO && rate > 0 && finished) elapsed = (double)scheduled * interval;

    qsort(samples, n_samples, sizeof(double), compare_doubles);
    char error_text[800];
    json_escape(first_error, error_text, sizeof(error_text));
    const char *names[] = {"upgrade", "echo", "bulk", "idle"};
    printf("{\"mode\": \"%s\", \"conns\": %u, \"seconds\": %.6f, \"finished\": %s, "
           "\"errors\": %llu, \"setup_errors\": %llu, \"mismatches\": %llu, "
           "\"first_error\": \"%s\", \"cpu_seconds\": %.6f, \"cpu_frac\": %.4f",
           names[mode], n_conns, elapsed, finished ? "true" : "false",
           (unsigned long long)(errors - setup_errors), (unsigned long long)setup_errors,
           (unsigned long long)mismatches, error_text, cpu, elapsed > 0 ? cpu / elapsed : 0.0);
    if (mode == M_UPGRADE) {
        printf(", \"close_by\": \"%s\", \"unexpected_bytes\": %llu",
               server_closes ? "server" : "client", (unsigned long long)unexpected);
    }
    if (mode == M_UPGRADE || mode == M_ECHO) {
        printf(", \"count\": %llu, \"rate\": %.3f, \"p50_us\": %.2f, \"p99_us\": %.2f, "
               "\"max_us\": %.2f",
               (unsigned long long)completed, elapsed > 0 ? (double)completed / elapsed : 0.0,
               percentile(0.50), percentile(0.99), n_samples ? samples[n_samples - 1] : 0.0);
    }
    if (mode == M_ECHO) {
        printf(", \"target_rate\": %.3f, \"size\": %u, \"dropped\": %llu, \"lost\": %llu", rate,
               msg_size, (unsigned long long)dropped, (unsigned long long)lost);
    }
    if (mode == M_BULK) {
        printf(", \"bytes\": %llu, \"chunk\": %u, \"mb_per_s\": %.3f",
               (unsigned long long)echoed_bytes, chunk,
               elapsed > 0 ? (double)echoed_bytes / elapsed / 1e6 : 0.0);
    }
    if (mode == M_IDLE) {
        printf(", \"open\": %u, \"dropped\": %llu, \"unexpected_bytes\": %llu", open_conns,
               (unsigned long long)dropped, (unsigned long long)unexpected);
    }
#ifdef BENCH_TLS
    if (use_tls) {
        printf(", \"tls\": {\"version\": \"%s\", \"cipher\": \"%s\", \"group\": \"%s\", "
               "\"alpn\": \"%s\", \"sni\": \"%s\", \"handshakes\": %llu, \"resumed\": %llu, "
               "\"tickets\": %llu, \"unclean_eof\": %llu}",
               tls_version, tls_cipher, tls_group, tls_alpn, sni,
               (unsigned long long)tls_handshakes, (unsigned long long)tls_resumed,
               (unsigned long long)tls_tickets, (unsigned long long)tls_unclean_eof);
    }
#endif
    printf("}\n");
    fflush(stdout);
    if (sync_mode && mode != M_IDLE) wait_for_eof();
    return 0;
}
