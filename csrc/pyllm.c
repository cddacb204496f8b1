/* pyllm: the forward pass of a Llama-family transformer over a memory-mapped f16 file.
   Data-flow order: file -> f16 vectors -> kernels -> threads -> forward. docs/FORMAT.md. */
#define _GNU_SOURCE
#include "pyllm.h"
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- the file: a 128-byte header, then a table of {offset, nbytes} per tensor ---- */
typedef struct {
    char magic[8];
    uint32_t version, header_size, dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim,
        vocab, max_seq_len, flags, sliding_window;
    float norm_eps;
    uint32_t reserved;
    uint64_t n_tensors, table_offset, meta_offset, meta_size, file_size;
} header_t;
enum { FLAG_TIED = 1, FLAG_QKV_BIAS = 2, MAX_THREADS = 64, BLOCK = 128, QR = 4, SEG = 512, LIMIT = 1 << 20 };
#ifndef MIN /* <sys/param.h> has the same two (and some systems' headers include it) */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#endif

typedef uint16_t f16;
typedef struct {
    const f16 *attn_norm, *qkv, *qkv_bias, *wo, *ffn_norm, *gate_up, *down;
} layer_t;

struct pyllm_model {
    header_t h;
    int n_ctx, n_threads, q_dim, kv_dim, qkv_dim;
    void *map; /* h.file_size bytes */
    const f16 *embd, *out_norm, *output;
    const float *rope_freqs;
    layer_t *layers;
    f16 *k_cache, *v_cache; /* one mapping, [segment][layer][kv_head], blocked matrices: K SEG rows, V head_dim rows */
    size_t kv_bytes;
    union { /* each its own allocation, so ASan sees an overrun from one into the next */
        struct {
            float *x, *xb, *qkv, *att, *hb, *hb2, *rope; /* a block's activations */
            float *scratch; /* per thread, ld_scratch floats: attention scores or a prefill weight panel */
            float *part; /* attention partials per (KV head, row tile, segment, row): o[hd], max, sum */
        };
        float *buf[9];
    };
    size_t ld_scratch;
    int n_workers; /* the pool: threads taking jobs, the caller's included; a job is posted by moving gen */
    pthread_t th[MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int gen, done, ids;
    struct job *job; /* NULL: quit */
};

/* ---- f16 <-> f32 one value at a time, and the vector paths ---- */
static float h2f(f16 h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) { float f = (float)m * 0x1p-24f; return s ? -f : f; } /* zero or subnormal */
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
    if (u > 0x7f800000) return (f16)(s | 0x7e00);
    if (u >= 0x477ff000) return (f16)(s | 0x7c00);
    if (u < 0x38800000) { float a; memcpy(&a, &u, 4); return (f16)(s | (uint32_t)lrintf(a * 0x1p24f)); }
    return (f16)(s | ((u + 0xfff + ((u >> 13) & 1) - 0x38000000) >> 13));
}

/* Vectors are GNU C vector types (gcc, clang): arithmetic and comparisons on every path. Per
   ISA: register budget, f16 conversion, FMA, rounding (add-and-subtract folds under -ffast-math). */
#if defined(__AVX512F__)
#include <immintrin.h>
#define SIMD "avx512"
enum { VL = 16, RB = 3, TT = 8, AB = 4 }; /* as registers allow: tiles of RB x 16 rows by TT tokens (matmul), AB x 16 by QR (attention) */
#define vloadh(p) ((vec)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p))))
#define vstoreh(p, v) _mm256_storeu_si256((__m256i *)(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#define vfma(a, b, c) ((vec)_mm512_fmadd_ps(a, b, c))
#define vround(x) ((vec)_mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT))
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define SIMD "avx2"
enum { VL = 8, RB = 1, TT = 6, AB = 1 };
#define vloadh(p) ((vec)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))
#define vstoreh(p, v) _mm_storeu_si128((__m128i *)(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#define vfma(a, b, c) ((vec)_mm256_fmadd_ps(a, b, c))
#define vround(x) ((vec)_mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define SIMD "neon"
enum { VL = 4, RB = 1, TT = 6, AB = 1 };
#define vloadh(p) ((vec)vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))))
#define vstoreh(p, v) vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v)))
#define vfma(a, b, c) ((vec)vfmaq_f32(c, a, b))
#define vround(x) ((vec)vrndnq_f32(x))
#else
#define SIMD "scalar" /* one-lane vectors: plain scalar code */
enum { VL = 1, RB = 1, TT = 4, AB = 1 };
#define vloadh(p) ((vec){h2f(*(p))})
#define vstoreh(p, v) (*(p) = f2h((v)[0]))
#define vfma(a, b, c) ((a) * (b) + (c))
#define vround(x) ((vec){rintf((x)[0])})
#endif
typedef float vec __attribute__((vector_size(4 * VL)));
typedef int32_t veci __attribute__((vector_size(4 * VL)));
static inline vec vload(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }
#define vzero() ((vec){0})
#define vset1(s) ((s) - vzero()) /* a broadcast (s + 0 would not fold: -0 + 0 is +0) */
static inline vec vsel(veci m, vec a, vec b) { return (vec)(((veci)a & m) | ((veci)b & ~m)); } /* m ? a : b */
static inline vec vmax(vec a, vec b) { return vsel(a > b, a, b); } /* b if either is NaN, as max_ps */
static inline vec vmin(vec a, vec b) { return vsel(a < b, a, b); }
static inline float vsum(vec v) { /* halves added pairwise, as x86's own reductions */
    for (int w = VL / 2; w; w /= 2)
        for (int i = 0; i < w; i++) v[i] += v[i + w];
    return v[0];
}
#define vpow2(n) ((vec)((__builtin_convertvector(n, veci) + 127) << 23)) /* 2^n, n whole */
enum { BR = 16, NV = BR / VL }; /* matrices are stored in blocks of BR rows: NV vectors */
#define INLINE static inline __attribute__((always_inline)) /* kernels specialised by constant tile sizes */
#define ROWS16(r) (((uint64_t)(r) + BR - 1) / BR * BR)

/* exp(x) (Cephes' polynomial): 2^n p(r), n = round(x / ln 2), r = x - n ln 2; inf near overflow. */
static inline vec vexp(vec x) {
    x = vmin(vmax(x, vset1(-87.0f)), vset1(88.9f));
    vec n = vround(x * vset1(1.44269504f)), r = vfma(n, vset1(2.12194440e-4f), vfma(n, vset1(-0.693359375f), x));
    vec p = vfma(vset1(1.9875691500e-4f), r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    return vfma(p * r, r, r + vset1(1.0f)) * vpow2(n);
}

/* s[j] = exp(s[j] - mx), j in [j0, j1], mx their largest; out = {mx, their sum}, {-inf, 0} if
   none. Whole vectors: s has room, lanes past j1 padded with -inf (vexp: ~1e-38, beside 1+). */
static void softmax_exp(float *s, int j0, int j1, float *out) {
    if (j1 < j0) { out[0] = -INFINITY, out[1] = 0; return; }
    int e = j0 + (j1 - j0 + VL) / VL * VL;
    vec m = vset1(-INFINITY), acc = vzero();
    for (int j = j1 + 1; j < e; j++) s[j] = -INFINITY;
    for (int j = j0; j < e; j += VL) m = vmax(m, vload(s + j));
    float mx = -INFINITY;
    for (int i = 0; i < VL; i++) mx = m[i] > mx ? m[i] : mx; /* exact in any order */
    for (int j = j0; j < e; j += VL) {
        vec x = vexp(vload(s + j) - vset1(mx));
        vstore(s + j, x);
        acc = acc + x;
    }
    out[0] = mx, out[1] = vsum(acc);
}

/* ---- open: validate every size before trusting an offset, then map ---- */
#define ERR(...) ({ if (err && el > 0) snprintf(err, (size_t)el, __VA_ARGS__); -1; }) /* the caller's message; -1 */

/* Walks the tensor table in canonical order (format.py tensor_layout): checks each
   entry's size and bounds, and points the model's weights into the map. */
static int bind_tensors(pyllm_model *m, const uint64_t *table, size_t size, char *err, int el) {
    const header_t *h = &m->h;
    uint64_t d = h->dim, qkv = (uint64_t)m->qkv_dim, end = h->meta_offset + h->meta_size;
    int idx = 0, per_layer = 6 + !!(h->flags & FLAG_QKV_BIAS);
    uint64_t want_n = 3 + (uint64_t)h->n_layers * per_layer + !(h->flags & FLAG_TIED);
    if (h->n_tensors != want_n)
        return ERR("tensor table has %llu entries, the header implies %llu",
                   (unsigned long long)h->n_tensors, (unsigned long long)want_n);
#define TAKE(dst, type, count) do { \
        uint64_t off = table[2 * idx], nb = table[2 * idx + 1], want = (uint64_t)(count) * sizeof(type); \
        if (nb != want || off % 64 || off < end || off > size || nb > size - off) \
            return ERR("tensor %d: offset %llu size %llu is outside the file or wrong", \
                       idx, (unsigned long long)off, (unsigned long long)nb); \
        end = off + nb; dst = (const type *)((const char *)m->map + off); idx++; } while (0)
    TAKE(m->embd, f16, ROWS16(h->vocab) * d);
    TAKE(m->rope_freqs, float, h->head_dim / 2);
    for (uint32_t l = 0; l < h->n_layers; l++) {
        layer_t *L = &m->layers[l];
        TAKE(L->attn_norm, f16, d);
        TAKE(L->qkv, f16, ROWS16(qkv) * d);
        if (h->flags & FLAG_QKV_BIAS) TAKE(L->qkv_bias, f16, qkv);
        TAKE(L->wo, f16, ROWS16(d) * m->q_dim);
        TAKE(L->ffn_norm, f16, d);
        TAKE(L->gate_up, f16, 2 * ROWS16(h->hidden_dim) * d); /* gate's blocks, then up's */
        TAKE(L->down, f16, ROWS16(d) * h->hidden_dim);
    }
    TAKE(m->out_norm, f16, d);
    if (h->flags & FLAG_TIED) m->output = m->embd;
    else TAKE(m->output, f16, ROWS16(h->vocab) * d);
#undef TAKE
    return 0;
}

static void *worker(void *arg);
static void pool_run(pyllm_model *m, struct job *job);

#define FAIL(...) do { ERR(__VA_ARGS__); goto bad; } while (0) /* for pyllm_open */

pyllm_model *pyllm_open(const char *path, int n_threads, int n_ctx, char *err, int el) {
    pyllm_model *m = calloc(1, sizeof *m);
    if (!m) { ERR("out of memory"); return NULL; }
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) FAIL("%s: %s", path, strerror(errno));
    size_t size = (size_t)st.st_size;
    header_t *h = &m->h;
    if (size < sizeof *h || pread(fd, h, sizeof *h, 0) != (ssize_t)sizeof *h) FAIL("%s: too short for a pyllm file", path);
    if (memcmp(h->magic, "PYLLM\0\0\0", 8)) FAIL("%s: not a pyllm file (bad magic)", path);
    if (h->version != 2) FAIL("%s: format version %u, this pyllm reads version 2 (convert the model again)", path, h->version);
    if (h->file_size != size)
        FAIL("%s: file is %zu bytes, header says %llu (truncated?)", path, size, (unsigned long long)h->file_size);
    const uint32_t dims[] = {h->dim, h->n_layers, h->n_heads, h->n_kv_heads, h->head_dim,
                             h->hidden_dim, h->vocab, h->max_seq_len};
    for (int i = 0; i < 8; i++)
        if (dims[i] == 0 || dims[i] >= LIMIT) FAIL("%s: header field %d out of range", path, i);
    if (h->header_size != 128 || h->n_heads % h->n_kv_heads || h->head_dim % 2 || !(h->norm_eps > 0) ||
        (uint64_t)h->n_heads * ROWS16(h->head_dim) >= LIMIT || /* q_dim (an int, a buffer row); the KV cache size */
        h->sliding_window >= LIMIT || h->n_tensors > 16ull * LIMIT || h->table_offset != 128 ||
        h->meta_offset < 128 + 16 * h->n_tensors || h->meta_offset > size || h->meta_size > size - h->meta_offset)
        FAIL("%s: inconsistent header", path);
    m->q_dim = (int)(h->n_heads * h->head_dim);
    m->kv_dim = (int)(h->n_kv_heads * h->head_dim);
    m->qkv_dim = m->q_dim + 2 * m->kv_dim;
    m->n_ctx = n_ctx <= 0 || n_ctx > (int)h->max_seq_len ? (int)h->max_seq_len : n_ctx;
    m->map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (m->map == MAP_FAILED) { m->map = NULL; FAIL("%s: mmap: %s", path, strerror(errno)); }
    if (!(m->layers = calloc(h->n_layers, sizeof *m->layers))) FAIL("out of memory");
    if (bind_tensors(m, (const uint64_t *)((const char *)m->map + 128), size, err, el)) goto bad;
    if (n_threads <= 0) n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    m->n_threads = MIN(MAX(n_threads, 1), MAX_THREADS);
    /* attention segments of SEG positions: decode splits across threads by them; the cache is
       segment-major, so the pages touched grow with the context, even as 2 MiB pages */
    size_t nseg = (m->n_ctx + SEG - 1) / SEG, kv_seg = (size_t)h->n_layers * h->n_kv_heads * ROWS16(h->head_dim) * SEG;
    m->kv_bytes = 2 * nseg * kv_seg * sizeof(f16);
    void *kv = mmap(NULL, m->kv_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); /* zeroed as touched */
    if (kv == MAP_FAILED) FAIL("out of memory for a context of %d tokens", m->n_ctx);
#ifdef MADV_HUGEPAGE
    madvise(kv, m->kv_bytes, MADV_HUGEPAGE); /* Linux: 2 MiB pages, far fewer TLB misses in attention (+6% tg at depth 2048) */
#endif
    m->k_cache = kv, m->v_cache = m->k_cache + nseg * kv_seg;
    size_t d = h->dim, hd = h->hidden_dim, n_in = MAX(MAX(d, hd), (size_t)m->q_dim); /* the longest matmul input */
    m->ld_scratch = MAX(RB * BR * n_in, (size_t)QR * (SEG + 16 + h->head_dim)); /* a prefill panel, or QR rows of scores and q */
    size_t tiles = (BLOCK * (h->n_heads / h->n_kv_heads) + QR - 1) / QR;
    size_t rows = BLOCK + TT; /* zeroed activation rows: a tile reads up to TT - 1 past a block's last token */
    size_t sizes[] = {rows * d, rows * d, rows * m->qkv_dim, rows * m->q_dim, rows * hd, rows * hd, rows * h->head_dim,
                      m->n_threads * m->ld_scratch, h->n_kv_heads * tiles * nseg * QR * (h->head_dim + 2)};
    for (int i = 0; i < 9; i++) {
        if (posix_memalign((void **)&m->buf[i], 64, sizes[i] * 4)) FAIL("out of memory for a context of %d tokens", m->n_ctx);
        memset(m->buf[i], 0, sizes[i] * 4);
    }
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->cv, NULL);
    for (m->n_workers = 1; m->n_workers < m->n_threads; m->n_workers++) /* fewer if the system refuses */
        if (pthread_create(&m->th[m->n_workers], NULL, worker, m)) break;
    close(fd);
    return m;
bad:
    if (fd >= 0) close(fd);
    pyllm_close(m);
    return NULL;
}

void pyllm_close(pyllm_model *m) {
    if (!m) return;
    if (m->n_workers) { /* the pool was started */
        pool_run(m, NULL);
        for (int i = 1; i < m->n_workers; i++) pthread_join(m->th[i], NULL);
        pthread_mutex_destroy(&m->mu);
        pthread_cond_destroy(&m->cv);
    }
    if (m->map) munmap(m->map, m->h.file_size);
    if (m->k_cache) munmap(m->k_cache, m->kv_bytes);
    free(m->layers);
    for (int i = 0; i < 9; i++) free(m->buf[i]);
    free(m);
}

int pyllm_n_ctx(const pyllm_model *m) { return m->n_ctx; }
int pyllm_n_threads(const pyllm_model *m) { return m->n_threads; }
const char *pyllm_simd(void) { return SIMD; }

/* ---- kernels ---- */

/* Matrices are stored in blocks of BR rows, input-major inside ([rows / BR][n][BR], rows
   padded with zeros): one vector holds BR rows at input k, so no horizontal sums, and every
   output is a single FMA chain over k in order, whatever the tile, thread count or ISA.
   The same tile serves attention: K and V in the cache are such matrices too.
   y[t][row] (+)= W[row] . x[t] over inputs k < n, for the blocks' rows < n_out and tokens
   t < nt: NB blocks of lw inputs, bq blocks apart, by NT tokens; W read as mode says (an
   f32 panel wf has w's layout). pf: a line every 8 inputs from there is prefetched. */
enum { F16, TO_PANEL, PANEL }; /* read f16 w; read it and write the panel; read the panel */
INLINE void tile(const f16 *w, float *wf, int lw, int bq, int n, const float *x, size_t ldx, int nt, float *y,
                 size_t ldy, int r0, int n_out, const f16 *bias, int add, const f16 *pf, const f16 *ahead, int NB, int NT, int mode) {
    vec acc[4 * NV][TT];
    for (int v = 0; v < NB * NV; v++)
        for (int t = 0; t < NT; t++) acc[v][t] = vzero();
    for (int k = 0; k < n; k++) {
        if (pf && k % 8 == 0) __builtin_prefetch(pf + k / 8 * 32, 0, 2);
        vec wv[4 * NV];
        for (int v = 0; v < NB * NV; v++) {
            size_t o = ((size_t)(v / NV) * bq * lw + k) * BR + v % NV * VL;
            if (ahead && k % 2 == 0 && v % NV == 0) __builtin_prefetch(ahead + o); /* a line of each block per 2 inputs */
            wv[v] = mode == PANEL ? vload(wf + o) : vloadh(w + o);
            if (mode == TO_PANEL) vstore(wf + o, wv[v]);
        }
        for (int t = 0; t < NT; t++) {
            vec xt = vset1(x[(size_t)t * ldx + k]);
            for (int v = 0; v < NB * NV; v++) acc[v][t] = vfma(wv[v], xt, acc[v][t]);
        }
    }
    for (int b = 0, r = r0; b < NB; b++, r += bq * BR)
        for (int t = 0; t < nt; t++) {
            float s[BR], *o = y + (size_t)t * ldy;
            for (int v = 0; r + BR <= n_out && v < NV; v++) { /* a whole block as vectors, else lane by lane */
                vec z = acc[b * NV + v][t];
                if (bias) z = z + vloadh(bias + r + v * VL);
                if (add) z = vload(o + r + v * VL) + z;
                vstore(o + r + v * VL, z);
            }
            for (int v = 0; r + BR > n_out && v < NV; v++) vstore(s + v * VL, acc[b * NV + v][t]);
            for (int i = 0; r + BR > n_out && i < BR && r + i < n_out; i++) {
                float z = bias ? s[i] + h2f(bias[r + i]) : s[i];
                o[r + i] = add ? o[r + i] + z : z;
            }
        }
}

/* Blocks [b0, b1) of y[T][ldy] (+)= x[T][n] W^T. Prefill: panels of RB blocks, tiles of TT
   tokens (x has rows to spare past T); a panel's first tile converts it to f32 (wf) as it
   goes, the others read wf; the last panel prefetches `after` (the thread's next one, or
   NULL). Decode: blocks a quarter of the range apart, 4 long sequential streams (one
   reached ~70% of the bandwidth). */
static void matmul_rows(const f16 *w, int n, const float *x, int T, float *y, int ldy, int n_out, const f16 *bias,
                        int add, int b0, int b1, float *wf, const f16 *after) {
#define TILE(b, t, bq, pf, NB, NT, mode) tile(w + (size_t)(b) * BR * n, wf, n, bq, n, x + (size_t)(t) * n, n, MIN(T - (t), NT), \
                                            y + (size_t)(t) * ldy, ldy, (b) * BR, n_out, bias, add, pf, NULL, NB, NT, mode)
#define PANEL_TILE(b, pf, NB) (t == 0 ? TILE(b, 0, 1, pf, NB, TT, TO_PANEL) : TILE(b, t, 1, pf, NB, TT, PANEL))
    int b = b0, q = (b1 - b0) / 4;
    if (T == 1) {
        for (; b < b0 + q; b++) TILE(b, 0, q, NULL, 4, 1, F16);
        for (b = b0 + 4 * q; b < b1; b++) TILE(b, 0, 1, NULL, 1, 1, F16);
        return;
    }
    for (; b + RB <= b1; b += RB) {
        const f16 *next = b + 2 * RB <= b1 ? w + (size_t)(b + RB) * BR * n : after; /* n / 8 lines of it a tile */
        for (int t = 0; t < T; t += TT) {
            size_t l = (size_t)t / TT * (n / 8); /* lines of the next panel before this tile's slice */
            PANEL_TILE(b, next && l < (size_t)RB * BR * n / 32 ? next + l * 32 : NULL, RB);
        }
    }
    for (; b < b1; b++)
        for (int t = 0; t < T; t += TT) PANEL_TILE(b, NULL, 1);
#undef PANEL_TILE
#undef TILE
}

/* g[i] = silu(g[i]) * u[i] for i < n. A chunk starts on a block, so a row is in the same
   lane or tail at any chunking: prefill and decode round alike. */
static void swiglu(float *g, const float *u, int n) {
    int i = 0;
    for (vec x; i + VL <= n; i += VL) x = vload(g + i), vstore(g + i, x * vload(u + i) / (vset1(1.0f) + vexp(-x)));
    for (; i < n; i++) g[i] = g[i] * u[i] / (1.0f + expf(-g[i]));
}

static void rmsnorm(float *o, const float *x, const f16 *w, int n, float eps) {
    vec acc = vzero();
    int i = 0;
    for (; i + VL <= n; i += VL) acc = vfma(vload(x + i), vload(x + i), acc);
    float ss = vsum(acc), s;
    for (int j = i; j < n; j++) ss += x[j] * x[j];
    s = 1.0f / sqrtf(ss / n + eps);
    for (i = 0; i + VL <= n; i += VL) vstore(o + i, vload(x + i) * vset1(s) * vloadh(w + i));
    for (; i < n; i++) o[i] = x[i] * s * h2f(w[i]);
}

/* o[i * stride] = x[i] rounded to f16, i < n. */
static void to_f16(f16 *o, size_t stride, const float *x, int n) {
    int i = 0;
    for (f16 h[VL]; i + VL <= n; i += VL) {
        vstoreh(h, vload(x + i));
        for (int u = 0; u < VL; u++) o[(size_t)(i + u) * stride] = h[u];
    }
    for (; i < n; i++) o[(size_t)i * stride] = f2h(x[i]);
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

/* y[k][r] = W[r] . x[k] for k < NT and the rows r < n_out of blocks [b0, b1) of an f16 matrix
   with blocks lw inputs long: AB blocks a tile, then one; each block's line pd on is prefetched. */
INLINE void attn_tiles(const f16 *w, size_t pd, int lw, int n, const float *x, size_t ldx, float *y, size_t ldy,
                       int b0, int b1, int n_out, int NT) {
#define ATILE(NB) tile(w + (size_t)b * lw * BR, NULL, lw, 1, n, x, ldx, NT, y, ldy, b * BR, n_out, NULL, 0, NULL, \
                       w + (size_t)b * lw * BR + pd, NB, NT, F16)
    int b = b0;
    for (; b + AB <= b1; b += AB) ATILE(AB);
    for (; b < b1; b++) ATILE(1);
#undef ATILE
}

/* Where segment sg of layer l, KV head kvh starts in the K and in the V cache (the same offset). */
static size_t kv_offset(const pyllm_model *m, size_t sg, int l, int kvh) {
    return ((sg * m->h.n_layers + (size_t)l) * m->h.n_kv_heads + (size_t)kvh) * SEG * ROWS16(m->h.head_dim);
}

/* Attention for up to QR query rows of the block that share KV head kvh (row r of the
   group is token r / g, head kvh * g + r % g), over the positions of segment sg only:
   writes each row's unnormalized o, its max score and its sum of exponentials to part. */
static void attend(pyllm_model *m, int l, int kvh, int r0, int pos, int T, int sg, float *scores, float *part) {
    int hd = (int)m->h.head_dim, g = (int)(m->h.n_heads / m->h.n_kv_heads), sw = (int)m->h.sliding_window;
    int n = MIN(T * g - r0, QR), a[QR], b[QR], lo = INT32_MAX, hi = -1;
    size_t lds = SEG + 16, off = kv_offset(m, (size_t)sg, l, kvh);
    float *q = scores + QR * lds; /* the rows' q, gathered: a tile's rows of x are evenly apart */
    for (int k = 0; k < n; k++) {
        int r = r0 + k, t = r / g, h = kvh * g + r % g, p = pos + t;
        memcpy(q + k * hd, m->qkv + (size_t)t * m->qkv_dim + (size_t)h * hd, (size_t)hd * 4);
        a[k] = MAX(sw ? p + 1 - sw : 0, sg * SEG) - sg * SEG; /* the row's positions in the segment, from its start */
        b[k] = MIN(p, (sg + 1) * SEG - 1) - sg * SEG;
        if (a[k] <= b[k]) lo = MIN(a[k], lo), hi = MAX(b[k], hi);
    }
    lo = MIN(lo, hi + 1); /* no row sees sg: an empty range */
#define ROWS(call) (n == 1 ? call(1) : n == 2 ? call(2) : n == 3 ? call(3) : call(QR)) /* n constant inside */
#define SCORES(nr) attn_tiles(m->k_cache + off, (size_t)AB * hd * BR, hd, hd, q, hd, scores, lds, lo / BR, (hi + BR) / BR, \
                              hi + 1, nr) /* K: SEG rows by hd inputs; a tile prefetches the next */
    ROWS(SCORES); /* scores[k][j] = q[k] . K[j] */
    for (int k = 0; k < n; k++) {
        float *s = scores + k * lds;
        softmax_exp(s, a[k], b[k], part + k * (hd + 2) + hd); /* max and sum: -inf and 0 if the row sees none of sg */
        for (int j = lo; j < a[k] && j <= hi; j++) s[j] = 0; /* zero weights outside the row's range */
        for (int j = MAX(b[k] + 1, lo); j <= hi; j++) s[j] = 0;
    }
#define WSUM(nr) attn_tiles(m->v_cache + off + (size_t)lo * BR, 16 * BR, SEG, hi + 1 - lo, scores + lo, lds, part, hd + 2, \
                            0, (hd + BR - 1) / BR, hd, nr) /* V: hd rows by SEG inputs; prefetched 16 inputs on */
    ROWS(WSUM); /* o[k] = sum_j scores[k][j] V[j] */
}

/* Each attention row's output from its segments' partials, merged in segment order. */
static void merge_segments(pyllm_model *m, int T, int tiles, int nseg) {
    int hd = (int)m->h.head_dim, g = (int)(m->h.n_heads / m->h.n_kv_heads), ld = QR * (hd + 2);
    for (int kvh = 0; kvh < (int)m->h.n_kv_heads; kvh++)
        for (int r = 0; r < T * g; r++) { /* row r of the group: token r / g, head kvh * g + r % g */
            float *o = m->att + (size_t)(r / g) * m->q_dim + (size_t)(kvh * g + r % g) * hd, mx = -INFINITY, sum = 0;
            const float *pt = m->part + ((size_t)(kvh * tiles + r / QR) * nseg * QR + r % QR) * (hd + 2);
            for (int s = 0; s < nseg; s++) mx = fmaxf(mx, pt[(size_t)s * ld + hd]);
            memset(o, 0, (size_t)hd * 4);
            for (int s = 0; s < nseg; s++) {
                const float *ps = pt + (size_t)s * ld;
                float w = ps[hd + 1] > 0 ? expf(ps[hd] - mx) : 0;
                sum += w * ps[hd + 1];
                for (int i = 0; i < hd; i++) o[i] += w * ps[i];
            }
            for (int i = 0; i < hd; i++) o[i] /= sum;
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
    int op, layer, T, pos, add, n, n_out, n_chunks;
    const f16 *w, *bias;
    const float *x;
    float *y;
    atomic_int next;
} job_t;
static void run_job(pyllm_model *m, job_t *j, int tid);

static void *worker(void *arg) {
    pyllm_model *m = arg;
    int tid = atomic_fetch_add(&m->ids, 1) + 1, seen = 0; /* 1.., as the threads start: a scratch area each */
    for (;;) {
        for (int spin = 0; atomic_load_explicit(&m->gen, memory_order_acquire) == seen; spin++) {
            if (spin < 2000) { relax(); continue; }
            if (spin < 4000) { sched_yield(); continue; }
            pthread_mutex_lock(&m->mu);
            while (atomic_load(&m->gen) == seen) pthread_cond_wait(&m->cv, &m->mu);
            pthread_mutex_unlock(&m->mu);
        }
        seen = atomic_load(&m->gen);
        if (!m->job) return NULL;
        run_job(m, m->job, tid);
        atomic_fetch_add_explicit(&m->done, 1, memory_order_release);
    }
}

static void pool_run(pyllm_model *m, job_t *job) { /* job NULL: the workers quit */
    m->job = job;
    atomic_store(&m->done, 0);
    pthread_mutex_lock(&m->mu);
    atomic_fetch_add_explicit(&m->gen, 1, memory_order_release);
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
    if (!job) return;
    run_job(m, job, 0);
    for (int spin = 0; atomic_load_explicit(&m->done, memory_order_acquire) != m->n_workers - 1; spin++)
        if (spin < 2000) relax(); else sched_yield();
}

/* ---- forward ---- */
enum { OP_MATMUL, OP_GATE_UP, OP_ATTEND, OP_READ }; /* OP_MATMUL is 0: a job's default */

/* The next blocks of a matmul for a thread: guided, a 2 * threads'th of what is left in
   multiples of unit, so chunks are long early (long streams, prefetched panels) and short
   at the end (the threads finish together; a slow thread delays only a short chunk). */
static int grab(atomic_int *next, int total, int unit, int nth, int *start) {
    int b = atomic_load_explicit(next, memory_order_relaxed), n;
    do {
        if (b >= total) return 0;
        n = MIN(MAX((total - b) / (2 * nth) / unit * unit, unit), total - b);
    } while (!atomic_compare_exchange_weak_explicit(next, &b, b + n, memory_order_relaxed, memory_order_relaxed));
    *start = b;
    return n;
}

static void run_job(pyllm_model *m, job_t *j, int tid) {
    if (j->op == OP_READ) { /* the bandwidth probe: a share each, summed in 64 lanes (8 lines a step) */
        uint64_t *p = (uint64_t *)j->y + (size_t)tid * j->n_out, acc[64] = {0};
        for (int r = 0; r < j->n; r++)
            for (size_t i = 0; i < (size_t)j->n_out; i += 64) /* size_t: Python's -fwrapv makes int i + k a gather */
                for (int k = 0; k < 64; k++) acc[k] += p[i + k];
        for (int k = 0; k < 64; k++) p[0] += acc[k]; /* a result stored, so the reads happen */
        return;
    }
    if (j->op == OP_ATTEND) { /* a chunk: QR query rows of one KV head, one segment */
        for (int c; (c = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed)) < j->n_chunks;) {
            int tiles = (j->T * (int)(m->h.n_heads / m->h.n_kv_heads) + QR - 1) / QR, nseg = j->n;
            int sg = c / tiles / (int)m->h.n_kv_heads, kvh = c / tiles % (int)m->h.n_kv_heads, tile = c % tiles;
            attend(m, j->layer, kvh, tile * QR, j->pos, j->T, sg, m->scratch + tid * m->ld_scratch, /* in cache order */
                   m->part + (((size_t)kvh * tiles + tile) * nseg + sg) * QR * (m->h.head_dim + 2));
        }
        return;
    }
    /* blocks in groups of 4 for decode's 4 streams, of RB for prefill's panels; the next
       chunk is taken a chunk early, so its first panel is prefetched by this one's last */
    int nb = (j->n_out + BR - 1) / BR, unit = j->T == 1 ? 4 : RB, b0, len = grab(&j->next, nb, unit, m->n_threads, &b0);
    const f16 *up = j->w + ROWS16(j->n_out) * j->n; /* OP_GATE_UP: up's blocks follow gate's */
    for (int nb0, nlen; len; b0 = nb0, len = nlen) {
        int b1 = b0 + len;
        float *wf = m->scratch + tid * m->ld_scratch;
        const f16 *after = (nlen = grab(&j->next, nb, unit, m->n_threads, &nb0)) ? j->w + (size_t)nb0 * BR * j->n : NULL;
        matmul_rows(j->w, j->n, j->x, j->T, j->y, j->n_out, j->n_out, j->bias, j->add, b0, b1, wf,
                    j->op == OP_GATE_UP ? up + (size_t)b0 * BR * j->n : after);
        if (j->op == OP_GATE_UP) { /* hb = silu(gate) * up */
            size_t hid = (size_t)j->n_out, r1 = MIN((size_t)b1 * BR, hid);
            matmul_rows(up, j->n, j->x, j->T, m->hb2, j->n_out, j->n_out, NULL, 0, b0, b1, wf, after);
            for (int t = 0; t < j->T; t++) swiglu(j->y + t * hid + b0 * BR, m->hb2 + t * hid + b0 * BR, (int)(r1 - (size_t)b0 * BR));
        }
    }
}

static void forward_block(pyllm_model *m, const int *tok, int T, int pos, float *logits, int all) {
    const header_t *h = &m->h;
    int d = (int)h->dim, hd = (int)h->head_dim, half = hd / 2, hid = (int)h->hidden_dim;
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < d; i++) m->x[(size_t)t * d + i] = h2f(m->embd[((size_t)tok[t] / BR * d + i) * BR + tok[t] % BR]);
        for (int i = 0; i < half; i++) {
            float a = (float)(pos + t) * m->rope_freqs[i];
            m->rope[t * hd + i] = cosf(a);
            m->rope[t * hd + half + i] = sinf(a);
        }
    }
    for (int l = 0; l < (int)h->n_layers; l++) {
        const layer_t *L = &m->layers[l];
        for (int t = 0; t < T; t++) rmsnorm(m->xb + (size_t)t * d, m->x + (size_t)t * d, L->attn_norm, d, h->norm_eps);
        pool_run(m, &(job_t){.w = L->qkv, .bias = L->qkv_bias, .x = m->xb, .n = d, .T = T, .y = m->qkv, .n_out = m->qkv_dim});
        for (int t = 0; t < T; t++) { /* rope q and k (adjacent heads), scale q; k and v into the cache as f16 */
            float *q = m->qkv + (size_t)t * m->qkv_dim, *k = q + m->q_dim, *v = k + m->kv_dim;
            for (int i = 0; i < (int)(h->n_heads + h->n_kv_heads); i++) rope(q + i * hd, m->rope + t * hd, hd);
            for (int i = 0; i < m->q_dim; i++) q[i] *= 1.0f / sqrtf((float)hd);
            for (int i = 0; i < (int)h->n_kv_heads; i++) {
                size_t p = (size_t)(pos + t), off = kv_offset(m, p / SEG, l, i);
                to_f16(m->k_cache + off + p % SEG / BR * BR * hd + p % BR, BR, k + i * hd, hd); /* K: row p % SEG */
                for (int j = 0; j < hd; j += BR) /* V: input p % SEG of each block of rows */
                    to_f16(m->v_cache + off + (size_t)j * SEG + p % SEG * BR, 1, v + i * hd + j, MIN(BR, hd - j));
            }
        }
        int tiles = (T * (int)(h->n_heads / h->n_kv_heads) + QR - 1) / QR, nseg = (pos + T + SEG - 1) / SEG;
        job_t att = {.op = OP_ATTEND, .layer = l, .T = T, .pos = pos, .n = nseg, .n_chunks = (int)h->n_kv_heads * tiles * nseg};
        pool_run(m, &att);
        merge_segments(m, T, tiles, nseg);
        pool_run(m, &(job_t){.w = L->wo, .x = m->att, .n = m->q_dim, .T = T, .y = m->x, .n_out = d, .add = 1});
        for (int t = 0; t < T; t++) rmsnorm(m->xb + (size_t)t * d, m->x + (size_t)t * d, L->ffn_norm, d, h->norm_eps);
        pool_run(m, &(job_t){.op = OP_GATE_UP, .w = L->gate_up, .x = m->xb, .n = d, .T = T, .y = m->hb, .n_out = hid});
        pool_run(m, &(job_t){.w = L->down, .x = m->hb, .n = hid, .T = T, .y = m->x, .n_out = d, .add = 1});
    }
    if (!logits) return;
    int first = all ? 0 : T - 1, n = T - first;
    for (int t = first; t < T; t++) rmsnorm(m->xb + (size_t)(t - first) * d, m->x + (size_t)t * d, m->out_norm, d, h->norm_eps);
    pool_run(m, &(job_t){.w = m->output, .x = m->xb, .n = d, .T = n, .y = logits, .n_out = (int)h->vocab});
}

int pyllm_forward(pyllm_model *m, const int *tokens, int n, int pos, float *logits, int all) {
    if (!m || !tokens || n <= 0 || pos < 0) return PYLLM_E_ARG;
    if (pos > m->n_ctx - n) return PYLLM_E_CONTEXT;
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= m->h.vocab) return PYLLM_E_TOKEN;
    for (int i = 0; i < n; i += BLOCK) {
        int T = MIN(n - i, BLOCK), last = i + T == n;
        float *out = !logits ? NULL : all ? logits + (size_t)i * m->h.vocab : last ? logits : NULL;
        forward_block(m, tokens + i, T, pos + i, out, all);
    }
    return 0;
}

long long pyllm_read(pyllm_model *m, void *buf, long long bytes, int reps) {
    if (!m || !buf || (uintptr_t)buf % 64 || bytes < 1 << 20 || bytes / 8 > INT32_MAX || reps < 1) return -1;
    job_t j = {.op = OP_READ, .n = reps, .n_out = (int)(bytes / 8 / m->n_workers / 64 * 64), .y = buf};
    pool_run(m, &j);
    return 8LL * j.n_out * m->n_workers * reps;
}
