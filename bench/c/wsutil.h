/* wsutil.h: the few pieces of RFC 6455 both bench programs need, with no library beyond libc:
 * SHA-1 (FIPS 180-4), base64, the Sec-WebSocket-Accept of a key, a monotonic clock and a
 * case-insensitive header lookup in a request/response head.
 */
#ifndef BENCH_WSUTIL_H
#define BENCH_WSUTIL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

typedef struct {
    uint32_t h[5];
    uint64_t length; /* bytes hashed so far */
    uint8_t block[64];
    size_t used; /* bytes waiting in block */
} sha1_ctx;

static inline uint32_t sha1_rol(uint32_t value, int bits) {
    return (value << bits) | (value >> (32 - bits));
}

static inline void sha1_block(sha1_ctx *ctx, const uint8_t *p) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++) {
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    }
    for (int i = 16; i < 80; i++) w[i] = sha1_rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = ctx->h[0], b = ctx->h[1], c = ctx->h[2], d = ctx->h[3], e = ctx->h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        uint32_t t = sha1_rol(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = sha1_rol(b, 30);
        b = a;
        a = t;
    }
    ctx->h[0] += a;
    ctx->h[1] += b;
    ctx->h[2] += c;
    ctx->h[3] += d;
    ctx->h[4] += e;
}

static inline void sha1_init(sha1_ctx *ctx) {
    ctx->h[0] = 0x67452301;
    ctx->h[1] = 0xEFCDAB89;
    ctx->h[2] = 0x98BADCFE;
    ctx->h[3] = 0x10325476;
    ctx->h[4] = 0xC3D2E1F0;
    ctx->length = 0;
    ctx->used = 0;
}

static inline void sha1_update(sha1_ctx *ctx, const void *data, size_t n) {
    const uint8_t *p = data;
    ctx->length += n;
    while (n > 0) {
        size_t take = 64 - ctx->used < n ? 64 - ctx->used : n;
        memcpy(ctx->block + ctx->used, p, take);
        ctx->used += take;
        p += take;
        n -= take;
        if (ctx->used == 64) {
            sha1_block(ctx, ctx->block);
            ctx->used = 0;
        }
    }
}

static inline void sha1_final(sha1_ctx *ctx, uint8_t digest[20]) {
    uint64_t bits = ctx->length * 8;
    uint8_t pad = 0x80;
    sha1_update(ctx, &pad, 1);
    pad = 0;
    while (ctx->used != 56) sha1_update(ctx, &pad, 1);
    uint8_t tail[8];
    for (int i = 0; i < 8; i++) tail[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha1_update(ctx, tail, 8);
    for (int i = 0; i < 20; i++) digest[i] = (uint8_t)(ctx->h[i / 4] >> (24 - 8 * (i % 4)));
}

/* Writes 4*ceil(n/3) characters and a NUL to out. */
static inline void base64_encode(const uint8_t *in, size_t n, char *out) {
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = alphabet[(v >> 18) & 63];
        out[o++] = alphabet[(v >> 12) & 63];
        out[o++] = i + 1 < n ? alphabet[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? alphabet[v & 63] : '=';
    }
    out[o] = '\0';
}

/* accept must hold 29 bytes: base64 of a 20-byte digest plus NUL. */
static inline void ws_accept(const char *key, size_t key_len, char accept[29]) {
    sha1_ctx ctx;
    uint8_t digest[20];
    sha1_init(&ctx);
    sha1_update(&ctx, key, key_len);
    sha1_update(&ctx, WS_GUID, sizeof(WS_GUID) - 1);
    sha1_final(&ctx, digest);
    base64_encode(digest, 20, accept);
}

static inline double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Finds header `name` in a head of length n (CRLF lines); returns its trimmed value and sets
 * *value_len, or NULL. The first line (request or status line) is skipped. */
static inline const char *find_header(const char *head, size_t n, const char *name, size_t *value_len) {
    size_t name_len = strlen(name);
    const char *end = head + n;
    const char *line = memchr(head, '\n', n);
    while (line != NULL && line + 1 < end) {
        line++;
        const char *eol = memchr(line, '\n', (size_t)(end - line));
        if (eol == NULL) eol = end;
        if ((size_t)(eol - line) > name_len && line[name_len] == ':' &&
            strncasecmp(line, name, name_len) == 0) {
            const char *v = line + name_len + 1;
            const char *v_end = eol;
            while (v < v_end && (*v == ' ' || *v == '\t')) v++;
            while (v_end > v && (v_end[-1] == '\r' || v_end[-1] == ' ' || v_end[-1] == '\t'))
                v_end--;
            *value_len = (size_t)(v_end - v);
            return v;
        }
        line = eol < end ? eol : NULL;
    }
    return NULL;
}

#endif
