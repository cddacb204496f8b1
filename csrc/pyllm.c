/* pyllm: the forward pass of a Llama-family transformer over a memory-mapped f16 file.
   In data-flow order: the file and its validation, f16 vectors, the kernels, the thread pool,
   forward. The file's layout: docs/FORMAT.md. */
#define _GNU_SOURCE
#include "pyllm.h"
#include "pyllm_pool.h"
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef uint16_t f16;

enum {
    FLAG_TIED = 1,                           /* the output head is the embedding matrix */
    FLAG_QKV_BIAS = 2,                       /* the q, k and v projections have biases */
    KNOWN_FLAGS = FLAG_TIED | FLAG_QKV_BIAS, /* any other bit: a file this kernel cannot read */
    SIZE_LIMIT = 1 << 20,                    /* each header dimension is below this */
    MAX_THREADS = 64,                        /* the pool's size at most */
    BLOCK_ROWS = 16,     /* matrices are stored in blocks of 16 rows, input-major inside */
    PASS_TOKENS = 128,   /* tokens of one forward pass: a longer prompt runs in passes */
    SEGMENT = 512,       /* attention runs over segments of positions, merged per row after */
    ATTN_ROWS = 4,       /* query rows of an attention tile */
    DECODE_STREAMS = 4,  /* a decode matmul reads each thread's rows as this many streams */
    MAX_TILE_BLOCKS = 4, /* blocks of rows a tile reads at most */
};

/* ---- the file: a 128-byte header, a table of {offset, nbytes} per tensor, the tensors ---- */

typedef struct {
    char magic[8]; /* "PYLLM\0\0\0" */
    uint32_t version, header_size, dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim;
    uint32_t vocab, max_seq_len, flags, sliding_window; /* sliding_window 0: attend to all */
    float norm_eps;
    uint32_t reserved;
    uint64_t n_tensors, table_offset, meta_offset, meta_size, file_size;
} header_t;

/* A matrix of n_out rows by n_in inputs, blocked: [n_out / 16][n_in][16], rows padded to 16. */
typedef struct {
    const f16 *w;
    int n_in;
    int n_out;
    const f16 *bias; /* n_out values added to the product, or NULL */
} matrix_t;

typedef struct {
    const f16 *attn_norm; /* [dim] */
    matrix_t qkv;         /* [q_dim + 2 kv_dim][dim]: q's heads, k's, v's; biased or not */
    matrix_t wo;          /* [dim][q_dim] */
    const f16 *ffn_norm;  /* [dim] */
    matrix_t gate, up;    /* [hidden_dim][dim] each, up's blocks right after gate's */
    matrix_t down;        /* [dim][hidden_dim] */
} layer_t;

struct pyllm_model {
    header_t h;
    int n_ctx;               /* positions the KV cache holds */
    int n_threads;           /* asked for; the pool's own count is n_workers */
    int q_dim;               /* n_heads * head_dim */
    int kv_dim;              /* n_kv_heads * head_dim */
    int qkv_dim;             /* q_dim + 2 kv_dim */
    const char *map;         /* the file, h.file_size bytes */
    matrix_t embd;           /* [vocab][dim] */
    const float *rope_freqs; /* [head_dim / 2] */
    layer_t *layers;         /* [n_layers] */
    const f16 *out_norm;     /* [dim] */
    matrix_t output;         /* [vocab][dim]: embd if tied */
    /* The KV cache, one mapping of kv_bytes: [segment][layer][KV head] blocked matrices, K of
       SEGMENT rows (positions) by head_dim inputs, V of head_dim rows by SEGMENT inputs */
    void *k_cache, *v_cache;
    int k_type, v_type; /* PYLLM_CACHE_F16 or PYLLM_CACHE_F32 */
    size_t kv_bytes;
    /* The activations, each its own allocation (so ASan sees an overrun from one into the next),
       of PASS_TOKENS + TILE_TOKENS rows: zeroed, as a tile reads up to TILE_TOKENS - 1 rows past
       a pass's last token */
    float *x;           /* [rows][dim]: the residual stream */
    float *xb;          /* [rows][dim]: its norm */
    float *qkv;         /* [rows][qkv_dim] */
    float *att;         /* [rows][q_dim]: attention's output */
    float *hb, *hb2;    /* [rows][hidden_dim]: silu(gate) * up; up */
    float *rope;        /* [rows][head_dim]: cos, then sin of the position's angles */
    float *scratch;     /* [n_threads][scratch_len]: attention's scores and q */
    size_t scratch_len; /* floats */
    float *part; /* [n_kv_heads][row tiles][segment][ATTN_ROWS][head_dim + 2]: attention partials */
    /* The pool: n_workers threads (the caller's included) run each job posted by moving gen */
    int n_workers;
    pthread_t threads[MAX_THREADS];
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    atomic_int gen, done, ids;
    struct job *job; /* NULL: quit */
};

static int imin(int a, int b) {
    return a < b ? a : b;
}
static int imax(int a, int b) {
    return a > b ? a : b;
}

/* Rows rounded up to whole blocks. */
static size_t padded(size_t rows) {
    return (rows + BLOCK_ROWS - 1) / BLOCK_ROWS * BLOCK_ROWS;
}

/* Where element (row r, input k) of a blocked matrix of n inputs is: [r / 16][k][r % 16]. */
static size_t blocked(size_t r, size_t k, size_t n) {
    return (r / BLOCK_ROWS * n + k) * BLOCK_ROWS + r % BLOCK_ROWS;
}

/* A one-line message into err; returns -1. */
static int say(char *err, int err_len, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    if (err && err_len > 0)
        vsnprintf(err, (size_t)err_len, fmt, args);
    va_end(args);
    return -1;
}

/* The header's rules (pyllm/format.py checks the same):
   - a regular file of at least 128 bytes, the magic "PYLLM\0\0\0", the version 2;
   - file_size is the file's size;
   - dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim, vocab, max_seq_len: 1 .. 2^20-1;
   - norm_eps is finite and > 0;
   - flags has no bits but tied (1) and qkv-bias (2);
   - header_size and table_offset are 128; n_heads is a multiple of n_kv_heads; head_dim is even;
   - n_heads * (head_dim rounded up to 16) < 2^20; sliding_window < 2^20; n_tensors <= 2^24;
   - the metadata starts after the table and ends inside the file.
   Then the table (bind_tensors): the entries the header implies, in canonical order, each
   64-byte aligned, after the previous one (the first after the metadata), inside the file, of
   exactly its shape's bytes. */
static int check_header(header_t *h, int fd, const char *path, char *err, int err_len) {
    struct stat st;
    if (fstat(fd, &st) != 0)
        return say(err, err_len, "%s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return say(err, err_len, "%s: not a regular file", path);
    size_t size = (size_t)st.st_size;
    if (size < sizeof *h || pread(fd, h, sizeof *h, 0) != (ssize_t)sizeof *h)
        return say(err, err_len, "%s: too short for a pyllm file", path);
    if (memcmp(h->magic, "PYLLM\0\0\0", 8))
        return say(err, err_len, "%s: not a pyllm file (bad magic)", path);
    if (h->version != 2)
        return say(err, err_len,
                   "%s: format version %u, this pyllm reads version 2 (convert the model again)",
                   path, h->version);
    if (h->file_size != size)
        return say(err, err_len, "%s: file is %zu bytes, header says %llu (truncated?)", path, size,
                   (unsigned long long)h->file_size);
    const uint32_t dims[] = {h->dim,      h->n_layers,   h->n_heads, h->n_kv_heads,
                             h->head_dim, h->hidden_dim, h->vocab,   h->max_seq_len};
    for (int i = 0; i < 8; i++) {
        if (dims[i] == 0 || dims[i] >= SIZE_LIMIT)
            return say(err, err_len, "%s: header field %d out of range", path, i);
    }
    if (!(h->norm_eps > 0 && h->norm_eps < INFINITY))
        return say(err, err_len, "%s: norm_eps %g is not a positive finite number", path,
                   (double)h->norm_eps);
    if (h->flags & ~KNOWN_FLAGS)
        return say(err, err_len, "%s: unknown flag bits 0x%x", path, h->flags & ~KNOWN_FLAGS);
    if (h->header_size != 128 || h->table_offset != 128 || h->n_heads % h->n_kv_heads ||
        h->head_dim % 2 || h->n_heads * padded(h->head_dim) >= SIZE_LIMIT ||
        h->sliding_window >= SIZE_LIMIT || h->n_tensors > 16ull * SIZE_LIMIT ||
        h->meta_offset < 128 + 16 * h->n_tensors || h->meta_offset > size ||
        h->meta_size > size - h->meta_offset)
        return say(err, err_len, "%s: inconsistent header", path);
    return 0;
}

/* The tensor table, read in canonical order (format.py tensor_layout). */
typedef struct {
    const char *map;       /* the file */
    const uint64_t *table; /* {offset, nbytes} per tensor */
    uint64_t end;          /* where the previous tensor ends (at first, the metadata) */
    int next;              /* the entry to read */
    int bad;               /* the first wrong entry, or -1 */
} tensors_t;

/* The next tensor, of nbytes bytes; NULL if it (or one before) is wrong. */
static const void *take(tensors_t *t, const header_t *h, uint64_t nbytes) {
    uint64_t off = t->table[2 * t->next];
    uint64_t nb = t->table[2 * t->next + 1];
    if (nb != nbytes || off % 64 || off < t->end || off > h->file_size || nb > h->file_size - off)
        t->bad = t->bad < 0 ? t->next : t->bad;
    t->next++;
    t->end = off + nb;
    return t->bad < 0 ? t->map + off : NULL;
}

static matrix_t take_matrix(tensors_t *t, const header_t *h, int n_out, int n_in) {
    return (matrix_t){take(t, h, padded(n_out) * n_in * sizeof(f16)), n_in, n_out, NULL};
}

/* Points the model's weights into the map, checking each table entry. */
static int bind_tensors(pyllm_model *m, char *err, int err_len) {
    const header_t *h = &m->h;
    int d = (int)h->dim, hidden = (int)h->hidden_dim, vocab = (int)h->vocab;
    int bias = h->flags & FLAG_QKV_BIAS, tied = h->flags & FLAG_TIED;
    uint64_t want = 3 + (uint64_t)h->n_layers * (6 + !!bias) + !tied;
    if (h->n_tensors != want)
        return say(err, err_len, "tensor table has %llu entries, the header implies %llu",
                   (unsigned long long)h->n_tensors, (unsigned long long)want);
    tensors_t t = {m->map, (const uint64_t *)(m->map + 128), h->meta_offset + h->meta_size, 0, -1};
    m->embd = take_matrix(&t, h, vocab, d);
    m->rope_freqs = take(&t, h, h->head_dim / 2 * sizeof(float));
    for (uint32_t l = 0; l < h->n_layers; l++) {
        layer_t *L = &m->layers[l];
        L->attn_norm = take(&t, h, d * sizeof(f16));
        L->qkv = take_matrix(&t, h, m->qkv_dim, d);
        L->qkv.bias = bias ? take(&t, h, m->qkv_dim * sizeof(f16)) : NULL;
        L->wo = take_matrix(&t, h, d, m->q_dim);
        L->ffn_norm = take(&t, h, d * sizeof(f16));
        L->gate = take_matrix(&t, h, 2 * (int)padded(hidden), d);
        L->gate.n_out = hidden;
        L->up = (matrix_t){L->gate.w ? L->gate.w + padded(hidden) * d : NULL, d, hidden, NULL};
        L->down = take_matrix(&t, h, d, hidden);
    }
    m->out_norm = take(&t, h, d * sizeof(f16));
    m->output = tied ? m->embd : take_matrix(&t, h, vocab, d);
    if (t.bad >= 0)
        return say(err, err_len, "tensor %d: offset %llu size %llu is outside the file or wrong",
                   t.bad, (unsigned long long)t.table[2 * t.bad],
                   (unsigned long long)t.table[2 * t.bad + 1]);
    return 0;
}

static int alloc_floats(float **p, size_t n) {
    if (posix_memalign((void **)p, 64, n * sizeof(float)))
        return -1;
    memset(*p, 0, n * sizeof(float));
    return 0;
}

/* ---- f16 <-> f32 one value at a time, and the vector paths ---- */

static float h2f(f16 h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) { /* zero or subnormal */
        float f = (float)m * 0x1p-24f;
        return s ? -f : f;
    }
    uint32_t u = s | (e == 31 ? 0x7f800000 : (e + 112) << 23) | (m << 13); /* inf/nan or normal */
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static f16 f2h(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t s = (u >> 16) & 0x8000;
    u &= 0x7fffffff;
    if (u > 0x7f800000)
        return (f16)(s | 0x7e00);
    if (u >= 0x477ff000)
        return (f16)(s | 0x7c00);
    if (u < 0x38800000) {
        float a;
        memcpy(&a, &u, 4);
        return (f16)(s | (uint32_t)lrintf(a * 0x1p24f));
    }
    return (f16)(s | ((u + 0xfff + ((u >> 13) & 1) - 0x38000000) >> 13));
}

/* Vectors are GNU C vector types (gcc, clang): arithmetic and comparisons on every path. Per
   ISA: f16 conversion, FMA, rounding, and the tile sizes its registers allow: LANES floats a
   vector; batch tiles of BATCH_BLOCKS blocks by TILE_TOKENS tokens; attention tiles of
   ATTN_BLOCKS blocks by ATTN_ROWS query rows. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define SIMD "avx512"
enum { LANES = 16, BATCH_BLOCKS = 3, TILE_TOKENS = 8, ATTN_BLOCKS = 4 };
#define vloadh(p) ((vec)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p))))
#define vstoreh(p, v)                                                                              \
    _mm256_storeu_si256((__m256i *)(p),                                                            \
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#define vfma(a, b, c) ((vec)_mm512_fmadd_ps(a, b, c))
#define vround(x) ((vec)_mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT))
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define SIMD "avx2"
enum { LANES = 8, BATCH_BLOCKS = 1, TILE_TOKENS = 6, ATTN_BLOCKS = 1 };
#define vloadh(p) ((vec)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))
#define vstoreh(p, v)                                                                              \
    _mm_storeu_si128((__m128i *)(p),                                                               \
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#define vfma(a, b, c) ((vec)_mm256_fmadd_ps(a, b, c))
#define vround(x) ((vec)_mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define SIMD "neon"
enum { LANES = 4, BATCH_BLOCKS = 1, TILE_TOKENS = 6, ATTN_BLOCKS = 1 };
#define vloadh(p) ((vec)vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))))
#define vstoreh(p, v) vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v)))
#define vfma(a, b, c) ((vec)vfmaq_f32(c, a, b))
#define vround(x) ((vec)vrndnq_f32(x))
#else
#define SIMD "scalar" /* one-lane vectors: plain scalar code */
enum { LANES = 1, BATCH_BLOCKS = 1, TILE_TOKENS = 4, ATTN_BLOCKS = 1 };
#define vloadh(p) ((vec){h2f(*(p))})
#define vstoreh(p, v) (*(p) = f2h((v)[0]))
#define vfma(a, b, c) ((a) * (b) + (c))
#define vround(x) ((vec){rintf((x)[0])})
#endif
enum { VECS = BLOCK_ROWS / LANES }; /* vectors a block's row of 16 holds */
typedef float vec __attribute__((vector_size(4 * LANES)));
typedef int32_t veci __attribute__((vector_size(4 * LANES)));
#define vzero() ((vec){0})
#define vset1(s) ((s) - vzero()) /* a broadcast (s + 0 would not fold: -0 + 0 is +0) */
#define vpow2(n) ((vec)((__builtin_convertvector(n, veci) + 127) << 23)) /* 2^n, n whole */

static inline vec vload(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void vstore(float *p, vec v) {
    memcpy(p, &v, sizeof v);
}
static inline vec vsel(veci m, vec a, vec b) { /* m ? a : b */
    return (vec)(((veci)a & m) | ((veci)b & ~m));
}
static inline float vsum(vec v) { /* halves added pairwise, as x86's own reductions */
    for (int w = LANES / 2; w; w /= 2) {
        for (int i = 0; i < w; i++)
            v[i] += v[i + w];
    }
    return v[0];
}

/* exp(x) (Cephes' polynomial): 2^n p(r), n = round(x / ln 2), r = x - n ln 2; inf near overflow. */
static inline vec vexp(vec x) {
    x = vsel(x > vset1(-87.0f), x, vset1(-87.0f)); /* -87 if x is NaN, as max_ps */
    x = vsel(x < vset1(88.9f), x, vset1(88.9f));
    vec n = vround(x * vset1(1.44269504f));
    vec r = vfma(n, vset1(2.12194440e-4f), vfma(n, vset1(-0.693359375f), x));
    vec p = vfma(vset1(1.9875691500e-4f), r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    return vfma(p * r, r, r + vset1(1.0f)) * vpow2(n);
}

/* o[i * stride] = x[i] rounded to f16, i < n. */
static void to_f16(f16 *o, size_t stride, const float *x, int n) {
    int i = 0;
    for (f16 h[LANES]; i + LANES <= n; i += LANES) {
        vstoreh(h, vload(x + i));
        for (int u = 0; u < LANES; u++)
            o[(size_t)(i + u) * stride] = h[u];
    }
    for (; i < n; i++)
        o[(size_t)i * stride] = f2h(x[i]);
}

/* ---- the kernels ---- */

/* A matmul's operands: y[t][r] (+)= W[r] . x[t] (+ bias[r]) for tokens t < n_tokens and rows
   r < n_out, over inputs k < n_in. W is blocked (matrix_t) with blocks of stride inputs: n_in,
   but a V cache segment sums only the positions seen of its SEGMENT. Every output is a single
   FMA chain over k in order, whatever the tile, thread count or ISA: bit-identical logits. */
typedef struct {
    const f16 *w;
    int n_in;
    int stride;
    int n_out;
    const f16 *bias;
    int accumulate; /* y += rather than y = */
    const float *x; /* n_tokens rows, ldx apart */
    size_t ldx;
    float *y; /* n_tokens rows, ldy apart */
    size_t ldy;
    int n_tokens;
    size_t lookahead; /* attention: each block's line this many elements on is prefetched */
    const float *wf;  /* W as f32 (an f32 KV cache), or NULL */
} matmul_t;

/* The operands of y (+)= x W^T (+ bias): the rows of x and y are n_in and n_out long. */
static matmul_t operands(const matrix_t *w, const float *x, float *y, int n_tokens, int add) {
    return (matmul_t){w->w,    w->n_in, w->n_in,  w->n_out, w->bias, add, x,
                      w->n_in, y,       w->n_out, n_tokens, 0,       NULL};
}

/* Rows r.. of token t's outputs, s[i] for row r + i, up to n_out (a last block is partial). */
static inline __attribute__((always_inline)) void store_block(const matmul_t *op, int r, int t,
                                                              const float *s) {
    float *y = op->y + (size_t)t * op->ldy + r;
    for (int i = 0; i < imin(BLOCK_ROWS, op->n_out - r); i++) {
        float z = op->bias ? s[i] + h2f(op->bias[r + i]) : s[i];
        y[i] = op->accumulate ? y[i] + z : z;
    }
}

/* How a tile reads W: as f16; as f16 or as f32 (wf), prefetching lookahead elements on. */
enum { W_F16, W_F16_AHEAD, W_F32_AHEAD };

/* The register tile: NB blocks from block b on, spacing blocks apart, by NT tokens from t0 (x
   has rows to spare past n_tokens). NB, NT and mode are constants where it is inlined, so each
   call site is a kernel of its own. */
static inline __attribute__((always_inline)) void tile(const matmul_t *op, int b, int t0,
                                                       int spacing, int NB, int NT, int mode) {
    const matmul_t mm = *op; /* a copy: the stores to y could alias *op */
    size_t base = blocked((size_t)b * BLOCK_ROWS, 0, mm.stride); /* block b's first element */
    const f16 *w = mode == W_F32_AHEAD ? NULL : mm.w + base;
    const float *wf = mode == W_F32_AHEAD ? mm.wf + base : NULL;
    const float *x = mm.x + (size_t)t0 * mm.ldx;
    vec acc[MAX_TILE_BLOCKS * VECS][TILE_TOKENS];
    for (int v = 0; v < NB * VECS; v++) {
        for (int t = 0; t < NT; t++)
            acc[v][t] = vzero();
    }
    for (int k = 0; k < mm.n_in; k++) {
        vec wv[MAX_TILE_BLOCKS * VECS];
        for (int v = 0; v < NB * VECS; v++) {
            size_t o =
                blocked((size_t)(v / VECS * spacing) * BLOCK_ROWS + v % VECS * LANES, k, mm.stride);
            if (mode == W_F16_AHEAD && k % 2 == 0 && v % VECS == 0)
                __builtin_prefetch(w + mm.lookahead + o); /* a line of each block per 2 inputs */
            if (mode == W_F32_AHEAD && v % VECS == 0)
                __builtin_prefetch(wf + mm.lookahead + o); /* per input */
            wv[v] = mode == W_F32_AHEAD ? vload(wf + o) : vloadh(w + o);
        }
        for (int t = 0; t < NT; t++) {
            vec xt = vset1(x[(size_t)t * mm.ldx + k]);
            for (int v = 0; v < NB * VECS; v++)
                acc[v][t] = vfma(wv[v], xt, acc[v][t]);
        }
    }
    int nt = imin(mm.n_tokens - t0, NT);
    for (int i = 0; i < NB; i++) {
        for (int t = 0; t < nt; t++) {
            float s[BLOCK_ROWS];
            for (int v = 0; v < VECS; v++)
                vstore(s + v * LANES, acc[i * VECS + v][t]);
            store_block(&mm, (b + i * spacing) * BLOCK_ROWS, t0 + t, s);
        }
    }
}

/* NB blocks from b on, spacing apart, by all tokens: tiles of TILE_TOKENS, then one tile of the
   rest, so the blocks are read once per TILE_TOKENS tokens. Written out, each count is a
   constant: a kernel of its own (a loop over the counts is not reliably unrolled). */
static inline __attribute__((always_inline)) void token_tiles(const matmul_t *op, int b,
                                                              int spacing, int NB) {
    int t = 0;
    for (; t + TILE_TOKENS <= op->n_tokens; t += TILE_TOKENS)
        tile(op, b, t, spacing, NB, TILE_TOKENS, W_F16);
    int rest = op->n_tokens - t;
    if (rest == 1)
        tile(op, b, t, spacing, NB, 1, W_F16);
    else if (rest == 2)
        tile(op, b, t, spacing, NB, 2, W_F16);
    else if (rest == 3)
        tile(op, b, t, spacing, NB, 3, W_F16);
    else if (rest == 4 && TILE_TOKENS > 4)
        tile(op, b, t, spacing, NB, 4, W_F16);
    else if (rest == 5 && TILE_TOKENS > 5)
        tile(op, b, t, spacing, NB, 5, W_F16);
    else if (rest == 6 && TILE_TOKENS > 6)
        tile(op, b, t, spacing, NB, 6, W_F16);
    else if (rest == 7 && TILE_TOKENS > 7)
        tile(op, b, t, spacing, NB, 7, W_F16);
}

/* Blocks [b0, b1) of a matmul, each read from memory once, as f16. Up to a few tokens: blocks a
   quarter of the range apart, 4 long sequential streams (one reached ~70% of the bandwidth),
   as many as a batch tile's registers hold. More: BATCH_BLOCKS adjacent blocks by all the
   tokens, the blocks staying in cache across tiles. */
static void matmul_rows(const matmul_t *op, int b0, int b1) {
    if (op->n_tokens == 1) {
        int q = (b1 - b0) / DECODE_STREAMS;
        for (int b = b0; b < b0 + q; b++)
            tile(op, b, 0, q, DECODE_STREAMS, 1, W_F16);
        for (int b = b0 + DECODE_STREAMS * q; b < b1; b++)
            tile(op, b, 0, 1, 1, 1, W_F16);
        return;
    }
    int b = b0;
    if (op->n_tokens * DECODE_STREAMS <= BATCH_BLOCKS * TILE_TOKENS) {
        int q = (b1 - b0) / DECODE_STREAMS;
        for (; b < b0 + q; b++)
            token_tiles(op, b, q, DECODE_STREAMS);
        b = b0 + DECODE_STREAMS * q;
    }
    for (; b + BATCH_BLOCKS <= b1; b += BATCH_BLOCKS)
        token_tiles(op, b, 1, BATCH_BLOCKS);
    for (; b < b1; b++)
        token_tiles(op, b, 1, 1);
}

/* Blocks [b0, b1) of an attention product of NT query rows: ATTN_BLOCKS blocks a tile, then one. */
static inline __attribute__((always_inline)) void attention_blocks(const matmul_t *op, int b0,
                                                                   int b1, int NT, int mode) {
    int b = b0;
    for (; b + ATTN_BLOCKS <= b1; b += ATTN_BLOCKS)
        tile(op, b, 0, 1, ATTN_BLOCKS, NT, mode);
    for (; b < b1; b++)
        tile(op, b, 0, 1, 1, NT, mode);
}

/* The same, from an f16 or an f32 cache (wf set). */
static inline __attribute__((always_inline)) void attention_tiles(const matmul_t *op, int b0,
                                                                  int b1, int NT) {
    if (op->wf)
        attention_blocks(op, b0, b1, NT, W_F32_AHEAD);
    else
        attention_blocks(op, b0, b1, NT, W_F16_AHEAD);
}

/* The same for 1 to ATTN_ROWS rows: a kernel for each count. */
static void attention_product(const matmul_t *op, int b0, int b1) {
    if (op->n_tokens == 1)
        attention_tiles(op, b0, b1, 1);
    else if (op->n_tokens == 2)
        attention_tiles(op, b0, b1, 2);
    else if (op->n_tokens == 3)
        attention_tiles(op, b0, b1, 3);
    else
        attention_tiles(op, b0, b1, ATTN_ROWS);
}

static void rmsnorm(float *o, const float *x, const f16 *w, int n, float eps) {
    vec acc = vzero();
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        acc = vfma(vload(x + i), vload(x + i), acc);
    float ss = vsum(acc);
    for (int j = i; j < n; j++)
        ss += x[j] * x[j];
    float s = 1.0f / sqrtf(ss / n + eps);
    for (i = 0; i + LANES <= n; i += LANES)
        vstore(o + i, vload(x + i) * vset1(s) * vloadh(w + i));
    for (; i < n; i++)
        o[i] = x[i] * s * h2f(w[i]);
}

/* Rotate-half RoPE: pairs (i, i + hd/2) by the angle in cs = [cos..., sin...]. */
static void rope(float *v, const float *cs, int hd) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half], c = cs[i], s = cs[half + i];
        v[i] = a * c - b * s;
        v[i + half] = a * s + b * c;
    }
}

/* s[j] = exp(s[j] - mx), j in [j0, j1], mx their largest; out = {mx, their sum}, {-inf, 0} if
   none. Whole vectors: s has room, lanes past j1 padded with -inf (vexp: ~1e-38, beside 1+). */
static void softmax_exp(float *s, int j0, int j1, float *out) {
    out[0] = -INFINITY;
    out[1] = 0;
    if (j1 < j0)
        return;
    int e = j0 + (j1 - j0 + LANES) / LANES * LANES;
    vec m = vset1(-INFINITY), acc = vzero();
    for (int j = j1 + 1; j < e; j++)
        s[j] = -INFINITY;
    for (int j = j0; j < e; j += LANES)
        m = vsel(m > vload(s + j), m, vload(s + j));
    for (int i = 0; i < LANES; i++)
        out[0] = m[i] > out[0] ? m[i] : out[0]; /* exact in any order */
    for (int j = j0; j < e; j += LANES) {
        vec x = vexp(vload(s + j) - vset1(out[0]));
        vstore(s + j, x);
        acc = acc + x;
    }
    out[1] = vsum(acc);
}

/* g[i] = silu(g[i]) * u[i] for i < n. A chunk starts on a block, so a row is in the same
   lane or tail at any chunking: prefill and decode round alike. */
static void swiglu(float *g, const float *u, int n) {
    int i = 0;
    for (; i + LANES <= n; i += LANES) {
        vec x = vload(g + i);
        vstore(g + i, x * vload(u + i) / (vset1(1.0f) + vexp(-x)));
    }
    for (; i < n; i++)
        g[i] = g[i] * u[i] / (1.0f + expf(-g[i]));
}

/* Attention over one pass: its query rows are grouped by KV head (row r of a group is token
   r / group, query head kvh * group + r % group) and cut into tiles of ATTN_ROWS rows. */
typedef struct {
    int layer;
    int n_tokens;   /* the pass's */
    int pos;        /* the first token's position */
    int n_segments; /* of SEGMENT positions, up to the pass's last */
    int row_tiles;  /* per KV head */
} attention_t;

/* Where segment sg of layer l, KV head kvh starts in the K and in the V cache (the same offset). */
static size_t kv_offset(const pyllm_model *m, size_t sg, int l, int kvh) {
    return ((sg * m->h.n_layers + (size_t)l) * m->h.n_kv_heads + (size_t)kvh) * SEGMENT *
           padded(m->h.head_dim);
}

/* A tile's partial results in segment sg: per row, o[head_dim], max score, sum of exps. */
static float *partials(const pyllm_model *m, const attention_t *a, int kvh, int tile, int sg) {
    size_t at = ((size_t)kvh * a->row_tiles + tile) * a->n_segments + sg;
    return m->part + at * ATTN_ROWS * (m->h.head_dim + 2);
}

/* An attention product's W: the cache's elements from at on, as f16 (w) or f32 (wf). */
static void from_cache(matmul_t *op, void *cache, int type, size_t at) {
    op->w = type == PYLLM_CACHE_F16 ? (f16 *)cache + at : NULL;
    op->wf = type == PYLLM_CACHE_F32 ? (float *)cache + at : NULL;
}

/* One row tile of KV head kvh over segment sg: each row's unnormalized o, max score and sum of
   exponentials, into its partials. */
static void attend(pyllm_model *m, const attention_t *a, int kvh, int tile, int sg, float *scores) {
    int hd = (int)m->h.head_dim, group = (int)(m->h.n_heads / m->h.n_kv_heads);
    int window = (int)m->h.sliding_window, r0 = tile * ATTN_ROWS;
    int n = imin(a->n_tokens * group - r0, ATTN_ROWS), first[ATTN_ROWS], last[ATTN_ROWS];
    int lo = INT32_MAX, hi = -1; /* the positions any row sees, from the segment's start */
    size_t lds = SEGMENT + 16, off = kv_offset(m, (size_t)sg, a->layer, kvh);
    float *q = scores + ATTN_ROWS * lds; /* the rows' q, gathered: evenly apart for the tile */
    float *part = partials(m, a, kvh, tile, sg);
    for (int k = 0; k < n; k++) {
        int r = r0 + k, t = r / group, p = a->pos + t;
        const float *qk = m->qkv + (size_t)t * m->qkv_dim + (size_t)(kvh * group + r % group) * hd;
        memcpy(q + k * hd, qk, (size_t)hd * 4);
        first[k] = imax(window ? p + 1 - window : 0, sg * SEGMENT) - sg * SEGMENT;
        last[k] = imin(p, (sg + 1) * SEGMENT - 1) - sg * SEGMENT;
        lo = first[k] <= last[k] ? imin(first[k], lo) : lo;
        hi = first[k] <= last[k] ? imax(last[k], hi) : hi;
    }
    lo = imin(lo, hi + 1); /* no row sees sg: an empty range */
    /* scores[k][j] = q[k] . K[j]: K is SEGMENT rows by hd inputs; a tile prefetches the next */
    size_t ahead = (size_t)ATTN_BLOCKS * hd * BLOCK_ROWS;
    matmul_t qk = {NULL, hd, hd, hi + 1, NULL, 0, q, hd, scores, lds, n, ahead, NULL};
    from_cache(&qk, m->k_cache, m->k_type, off);
    attention_product(&qk, lo / BLOCK_ROWS, (hi + BLOCK_ROWS) / BLOCK_ROWS);
    for (int k = 0; k < n; k++) {
        float *s = scores + k * lds;
        softmax_exp(s, first[k], last[k], part + k * (hd + 2) + hd);
        for (int j = lo; j < first[k] && j <= hi; j++)
            s[j] = 0; /* zero weights outside the row's range */
        for (int j = imax(last[k] + 1, lo); j <= hi; j++)
            s[j] = 0;
    }
    /* o[k] = sum_j scores[k][j] V[j]: V is hd rows by SEGMENT inputs, prefetched 16 on */
    matmul_t sv = {NULL,   hi + 1 - lo, SEGMENT,         hd,  NULL, 0, scores + lo, lds, part,
                   hd + 2, n,           16 * BLOCK_ROWS, NULL};
    from_cache(&sv, m->v_cache, m->v_type, off + (size_t)lo * BLOCK_ROWS);
    attention_product(&sv, 0, (hd + BLOCK_ROWS - 1) / BLOCK_ROWS);
}

/* Each attention row's output from its segments' partials, merged in segment order. */
static void merge_segments(pyllm_model *m, const attention_t *a) {
    int hd = (int)m->h.head_dim, group = (int)(m->h.n_heads / m->h.n_kv_heads);
    for (int kvh = 0; kvh < (int)m->h.n_kv_heads; kvh++) {
        for (int r = 0; r < a->n_tokens * group; r++) {
            int t = r / group, head = kvh * group + r % group;
            float *o = m->att + (size_t)t * m->q_dim + (size_t)head * hd, mx = -INFINITY, sum = 0;
            size_t row = (size_t)(r % ATTN_ROWS) * (hd + 2); /* within its tile's partials */
            for (int sg = 0; sg < a->n_segments; sg++)
                mx = fmaxf(mx, partials(m, a, kvh, r / ATTN_ROWS, sg)[row + hd]);
            memset(o, 0, (size_t)hd * 4);
            for (int sg = 0; sg < a->n_segments; sg++) {
                const float *ps = partials(m, a, kvh, r / ATTN_ROWS, sg) + row;
                float w = ps[hd + 1] > 0 ? expf(ps[hd] - mx) : 0;
                sum += w * ps[hd + 1];
                for (int i = 0; i < hd; i++)
                    o[i] += w * ps[i];
            }
            for (int i = 0; i < hd; i++)
                o[i] /= sum;
        }
    }
}

/* ---- threads: a persistent pool dealing chunks from a shared counter (a preempted thread
   delays only its chunk); idle threads spin briefly, then yield, then sleep ---- */

#if defined(__x86_64__)
#define relax() __builtin_ia32_pause()
#else
#define relax() ((void)0)
#endif

typedef struct job {
    void (*run)(pyllm_model *m, struct job *job, int thread); /* by each of the pool's threads */
    const matmul_t *mm;                                       /* a matmul's; gate/up: {gate, up} */
    int gate_up;                                        /* mm is {gate, up}: hb = silu(gate) * up */
    const attention_t *att;                             /* attention's */
    void (*hook)(void *arg, int thread, int n_threads); /* pyllm_run_on_pool's */
    void *hook_arg;
    atomic_int next; /* the next block or chunk to take */
} job_t;

static void backoff(int spin) {
    if (spin < 2000)
        relax();
    else
        sched_yield();
}

static void *worker(void *arg) {
    pyllm_model *m = arg;
    int thread = atomic_fetch_add(&m->ids, 1) + 1; /* 1.., as the threads start: a scratch each */
    int seen = 0;
    for (;;) {
        for (int spin = 0; atomic_load_explicit(&m->gen, memory_order_acquire) == seen; spin++) {
            backoff(spin);
            if (spin < 4000)
                continue;
            pthread_mutex_lock(&m->mutex);
            while (atomic_load(&m->gen) == seen)
                pthread_cond_wait(&m->wake, &m->mutex);
            pthread_mutex_unlock(&m->mutex);
        }
        seen = atomic_load(&m->gen);
        if (!m->job)
            return NULL;
        m->job->run(m, m->job, thread);
        atomic_fetch_add_explicit(&m->done, 1, memory_order_release);
    }
}

/* Runs job on every thread, the caller's too; job NULL: the workers quit. */
static void pool_run(pyllm_model *m, job_t *job) {
    m->job = job;
    atomic_store(&m->done, 0);
    pthread_mutex_lock(&m->mutex);
    atomic_fetch_add_explicit(&m->gen, 1, memory_order_release);
    pthread_cond_broadcast(&m->wake);
    pthread_mutex_unlock(&m->mutex);
    if (!job)
        return;
    job->run(m, job, 0);
    for (int spin = 0; atomic_load_explicit(&m->done, memory_order_acquire) != m->n_workers - 1;
         spin++)
        backoff(spin);
}

static void hook_job(pyllm_model *m, job_t *j, int thread) {
    j->hook(j->hook_arg, thread, m->n_workers);
}

int pyllm_run_on_pool(pyllm_model *m, void (*fn)(void *arg, int thread, int n_threads), void *arg) {
    job_t job = {.run = hook_job, .hook = fn, .hook_arg = arg};
    pool_run(m, &job);
    return m->n_workers;
}

/* The next blocks of a matmul for a thread: guided, a 2 * threads'th of what is left in
   multiples of unit, so chunks are long early (long streams) and short at the end (the threads
   finish together; a slow thread delays only a short chunk). One thread takes all at once:
   the longest streams (decode 5-10% faster than in halving chunks). */
static int grab(atomic_int *next, int total, int unit, int n_threads, int *start) {
    int b = atomic_load_explicit(next, memory_order_relaxed), n;
    int parts = n_threads == 1 ? 1 : 2 * n_threads;
    do {
        if (b >= total)
            return 0;
        n = imin(imax((total - b) / parts / unit * unit, unit), total - b);
    } while (!atomic_compare_exchange_weak_explicit(next, &b, b + n, memory_order_relaxed,
                                                    memory_order_relaxed));
    *start = b;
    return n;
}

/* A matmul's blocks in guided chunks: groups of DECODE_STREAMS in decode, of BATCH_BLOCKS
   for more tokens. With gate_up, j->mm is {gate, up}, and a chunk's gate rows become
   silu(gate) * up. */
static void matmul_job(pyllm_model *m, job_t *j, int thread) {
    (void)thread;
    const matmul_t *op = &j->mm[0], *up = &j->mm[j->gate_up]; /* up: op again, unless gate_up */
    int n_blocks = (int)(padded(op->n_out) / BLOCK_ROWS);
    int unit = op->n_tokens == 1 ? DECODE_STREAMS : BATCH_BLOCKS, b0, n;
    while ((n = grab(&j->next, n_blocks, unit, m->n_threads, &b0))) {
        matmul_rows(op, b0, b0 + n);
        if (!j->gate_up)
            continue;
        matmul_rows(up, b0, b0 + n);
        int r0 = b0 * BLOCK_ROWS, r1 = imin((b0 + n) * BLOCK_ROWS, op->n_out);
        for (int t = 0; t < op->n_tokens; t++)
            swiglu(op->y + t * op->ldy + r0, up->y + t * up->ldy + r0, r1 - r0);
    }
}

/* Attention in chunks of one row tile of one KV head in one segment, in the cache's order. */
static void attention_job(pyllm_model *m, job_t *j, int thread) {
    const attention_t *a = j->att;
    int n_kv = (int)m->h.n_kv_heads, n_chunks = n_kv * a->row_tiles * a->n_segments;
    for (int c; (c = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed)) < n_chunks;) {
        int sg = c / a->row_tiles / n_kv, kvh = c / a->row_tiles % n_kv;
        attend(m, a, kvh, c % a->row_tiles, sg, m->scratch + thread * m->scratch_len);
    }
}

/* ---- forward: one pass of up to PASS_TOKENS tokens at positions pos.. ---- */

/* y (+)= x W^T (+ bias), rows of n_tokens tokens. */
static void matmul(pyllm_model *m, const matrix_t *w, const float *x, float *y, int n_tokens,
                   int add) {
    matmul_t op = operands(w, x, y, n_tokens, add);
    pool_run(m, &(job_t){.run = matmul_job, .mm = &op});
}

/* hb = silu(xb Wgate^T) * (xb Wup^T). */
static void gate_up(pyllm_model *m, const layer_t *L, int n_tokens) {
    matmul_t ops[2] = {operands(&L->gate, m->xb, m->hb, n_tokens, 0),
                       operands(&L->up, m->xb, m->hb2, n_tokens, 0)};
    pool_run(m, &(job_t){.run = matmul_job, .mm = ops, .gate_up = 1});
}

/* xb[t] = rmsnorm(x[t]) * w, t < n_tokens. */
static void norm(pyllm_model *m, const f16 *w, const float *x, int n_tokens) {
    int d = (int)m->h.dim;
    for (int t = 0; t < n_tokens; t++)
        rmsnorm(m->xb + (size_t)t * d, x + (size_t)t * d, w, d, m->h.norm_eps);
}

/* x = the tokens' embeddings; rope = the cos and sin of their positions' angles. */
static void embed(pyllm_model *m, const int *tokens, int n_tokens, int pos) {
    int d = (int)m->h.dim, hd = (int)m->h.head_dim, half = hd / 2;
    for (int t = 0; t < n_tokens; t++) {
        for (int i = 0; i < d; i++)
            m->x[(size_t)t * d + i] = h2f(m->embd.w[blocked((size_t)tokens[t], i, d)]);
        for (int i = 0; i < half; i++) {
            float angle = (float)(pos + t) * m->rope_freqs[i];
            m->rope[t * hd + i] = cosf(angle);
            m->rope[t * hd + half + i] = sinf(angle);
        }
    }
}

/* cache[at + i * stride] = x[i], i < n, in the cache's type. */
static void to_cache(void *cache, int type, size_t at, size_t stride, const float *x, int n) {
    if (type == PYLLM_CACHE_F16) {
        to_f16((f16 *)cache + at, stride, x, n);
        return;
    }
    for (int i = 0; i < n; i++)
        ((float *)cache)[at + (size_t)i * stride] = x[i];
}

/* RoPE on q and k (adjacent heads in qkv), q scaled by 1/sqrt(head_dim); k and v into the
   layer's cache (f16 or f32): K row p, V input p of each block of rows. */
static void rope_and_cache(pyllm_model *m, int layer, int n_tokens, int pos) {
    int hd = (int)m->h.head_dim;
    for (int t = 0; t < n_tokens; t++) {
        float *q = m->qkv + (size_t)t * m->qkv_dim, *k = q + m->q_dim, *v = k + m->kv_dim;
        for (int i = 0; i < (int)(m->h.n_heads + m->h.n_kv_heads); i++)
            rope(q + i * hd, m->rope + t * hd, hd);
        for (int i = 0; i < m->q_dim; i++)
            q[i] *= 1.0f / sqrtf((float)hd);
        size_t p = (size_t)(pos + t), row = p % SEGMENT;
        for (int i = 0; i < (int)m->h.n_kv_heads; i++) {
            size_t off = kv_offset(m, p / SEGMENT, layer, i);
            to_cache(m->k_cache, m->k_type, off + blocked(row, 0, hd), BLOCK_ROWS, k + i * hd, hd);
            for (int j = 0; j < hd; j += BLOCK_ROWS)
                to_cache(m->v_cache, m->v_type, off + blocked(j, row, SEGMENT), 1, v + i * hd + j,
                         imin(BLOCK_ROWS, hd - j));
        }
    }
}

/* att = softmax(q K^T) V for each query head, over the cache's positions up to each token's. */
static void attention(pyllm_model *m, int layer, int n_tokens, int pos) {
    int group = (int)(m->h.n_heads / m->h.n_kv_heads);
    attention_t a = {layer, n_tokens, pos, (pos + n_tokens + SEGMENT - 1) / SEGMENT,
                     (n_tokens * group + ATTN_ROWS - 1) / ATTN_ROWS};
    pool_run(m, &(job_t){.run = attention_job, .att = &a});
    merge_segments(m, &a);
}

static void forward_pass(pyllm_model *m, const int *tokens, int T, int pos, float *logits,
                         int all) {
    embed(m, tokens, T, pos);
    for (int l = 0; l < (int)m->h.n_layers; l++) {
        const layer_t *L = &m->layers[l];
        norm(m, L->attn_norm, m->x, T);          /* xb = rmsnorm(x) */
        matmul(m, &L->qkv, m->xb, m->qkv, T, 0); /* qkv = xb Wqkv^T + bias */
        rope_and_cache(m, l, T, pos);            /* rotate q and k; k, v into the cache */
        attention(m, l, T, pos);                 /* att = softmax(q K^T) V */
        matmul(m, &L->wo, m->att, m->x, T, 1);   /* x += att Wo^T */
        norm(m, L->ffn_norm, m->x, T);           /* xb = rmsnorm(x) */
        gate_up(m, L, T);                        /* hb = silu(xb Wgate^T) * (xb Wup^T) */
        matmul(m, &L->down, m->hb, m->x, T, 1);  /* x += hb Wdown^T */
    }
    if (!logits)
        return;
    int first = all ? 0 : T - 1; /* the rows whose logits are asked for */
    norm(m, m->out_norm, m->x + (size_t)first * m->h.dim, T - first);
    matmul(m, &m->output, m->xb, logits, T - first, 0); /* logits = xb Wout^T */
}

int pyllm_forward(pyllm_model *m, const int *tokens, int n, int pos, float *logits, int all) {
    if (!m || !tokens || n <= 0 || pos < 0)
        return PYLLM_E_ARG;
    if (pos > m->n_ctx - n)
        return PYLLM_E_CONTEXT;
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= m->h.vocab)
            return PYLLM_E_TOKEN;
    }
    for (int i = 0; i < n; i += PASS_TOKENS) {
        int T = imin(n - i, PASS_TOKENS);
        /* every pass's logits, or the last one's */
        float *out = logits && all ? logits + (size_t)i * m->h.vocab : logits;
        forward_pass(m, tokens + i, T, pos + i, all || i + T == n ? out : NULL, all);
    }
    return 0;
}

/* ---- open and close ---- */

/* The KV cache and the activations for n_ctx positions, then the pool. */
static int start(pyllm_model *m, int n_threads, char *err, int err_len) {
    const header_t *h = &m->h;
    size_t d = h->dim, hidden = h->hidden_dim, hd = h->head_dim, rows = PASS_TOKENS + TILE_TOKENS;
    /* attention segments: decode splits across threads by them; the cache is segment-major,
       so the pages touched grow with the context, even as 2 MiB pages */
    size_t n_segments = (size_t)(m->n_ctx + SEGMENT - 1) / SEGMENT;
    size_t segment = (size_t)h->n_layers * h->n_kv_heads * padded(hd) * SEGMENT; /* K's or V's */
    size_t k_bytes = n_segments * segment * (m->k_type == PYLLM_CACHE_F32 ? 4 : 2);
    m->kv_bytes = k_bytes + n_segments * segment * (m->v_type == PYLLM_CACHE_F32 ? 4 : 2);
    void *kv = mmap(NULL, m->kv_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (kv == MAP_FAILED)
        return say(err, err_len, "out of memory for a context of %d tokens", m->n_ctx);
#ifdef MADV_HUGEPAGE
    madvise(kv, m->kv_bytes, MADV_HUGEPAGE); /* fewer TLB misses in attention (+6% tg at 2048) */
#endif
    m->k_cache = kv;
    m->v_cache = (char *)kv + k_bytes;
    m->scratch_len = ATTN_ROWS * (SEGMENT + 16 + hd); /* scores and q */
    size_t tiles = (PASS_TOKENS * (h->n_heads / h->n_kv_heads) + ATTN_ROWS - 1) / ATTN_ROWS;
    if (alloc_floats(&m->x, rows * d) || alloc_floats(&m->xb, rows * d) ||
        alloc_floats(&m->qkv, rows * m->qkv_dim) || alloc_floats(&m->att, rows * m->q_dim) ||
        alloc_floats(&m->hb, rows * hidden) || alloc_floats(&m->hb2, rows * hidden) ||
        alloc_floats(&m->rope, rows * hd) ||
        alloc_floats(&m->scratch, m->n_threads * m->scratch_len) ||
        alloc_floats(&m->part, h->n_kv_heads * tiles * n_segments * ATTN_ROWS * (hd + 2)))
        return say(err, err_len, "out of memory for a context of %d tokens", m->n_ctx);
    pthread_mutex_init(&m->mutex, NULL);
    pthread_cond_init(&m->wake, NULL);
    for (m->n_workers = 1; m->n_workers < n_threads; m->n_workers++) {
        if (pthread_create(&m->threads[m->n_workers], NULL, worker, m))
            break; /* fewer threads, if the system refuses */
    }
    return 0;
}

/* Reads and checks the header, maps the file, binds the tensors. */
static int load(pyllm_model *m, int fd, const char *path, char *err, int err_len) {
    header_t *h = &m->h;
    if (check_header(h, fd, path, err, err_len))
        return -1;
    m->q_dim = (int)(h->n_heads * h->head_dim);
    m->kv_dim = (int)(h->n_kv_heads * h->head_dim);
    m->qkv_dim = m->q_dim + 2 * m->kv_dim;
    void *map = mmap(NULL, h->file_size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return say(err, err_len, "%s: mmap: %s", path, strerror(errno));
    m->map = map;
    m->layers = calloc(h->n_layers, sizeof *m->layers);
    if (!m->layers)
        return say(err, err_len, "out of memory");
    return bind_tensors(m, err, err_len);
}

pyllm_model *pyllm_open(const char *path, int n_threads, int n_ctx, int cache_type_k,
                        int cache_type_v, char *err, int err_len) {
    int k_ok = cache_type_k == PYLLM_CACHE_F16 || cache_type_k == PYLLM_CACHE_F32;
    int v_ok = cache_type_v == PYLLM_CACHE_F16 || cache_type_v == PYLLM_CACHE_F32;
    pyllm_model *m = k_ok && v_ok ? calloc(1, sizeof *m) : NULL;
    if (!m) {
        say(err, err_len,
            k_ok && v_ok ? "out of memory" : "a cache type is neither f16 (0) nor f32 (1)");
        return NULL;
    }
    m->k_type = cache_type_k;
    m->v_type = cache_type_v;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not block */
    int failed = fd < 0 ? say(err, err_len, "%s: %s", path, strerror(errno))
                        : load(m, fd, path, err, err_len);
    if (fd >= 0)
        close(fd);
    if (n_threads <= 0)
        n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    m->n_threads = imin(imax(n_threads, 1), MAX_THREADS);
    m->n_ctx = n_ctx <= 0 || n_ctx > (int)m->h.max_seq_len ? (int)m->h.max_seq_len : n_ctx;
    if (failed || start(m, m->n_threads, err, err_len)) {
        pyllm_close(m);
        return NULL;
    }
    return m;
}

void pyllm_close(pyllm_model *m) {
    if (!m)
        return;
    if (m->n_workers) { /* the pool was started */
        pool_run(m, NULL);
        for (int i = 1; i < m->n_workers; i++)
            pthread_join(m->threads[i], NULL);
        pthread_mutex_destroy(&m->mutex);
        pthread_cond_destroy(&m->wake);
    }
    if (m->map)
        munmap((void *)m->map, m->h.file_size);
    if (m->k_cache)
        munmap(m->k_cache, m->kv_bytes);
    float *buffers[] = {m->x, m->xb, m->qkv, m->att, m->hb, m->hb2, m->rope, m->scratch, m->part};
    for (int i = 0; i < 9; i++)
        free(buffers[i]);
    free(m->layers);
    free(m);
}

int pyllm_n_ctx(const pyllm_model *m) {
    return m->n_ctx;
}

int pyllm_n_threads(const pyllm_model *m) {
    return m->n_threads;
}

long long pyllm_cache_bytes(const pyllm_model *m) {
    return (long long)m->kv_bytes;
}

const char *pyllm_simd(void) {
    return SIMD;
}
