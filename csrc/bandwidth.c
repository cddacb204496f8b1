/* The machine's ceilings, timed by `pyllm bench --roofline` on the model's own thread pool: the
   read bandwidth (decode's limit) and the f32 FMA peak (prefill's). No part of the model, only
   its pool's neighbour. Each call is one pattern; the caller times several and keeps the best. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "pyllm.h"
#include "pyllm_pool.h"

/* The build's widest f32 vector and its FMA, and enough independent accumulator chains to keep
   every FMA pipe busy through the instruction's latency (pipes x latency, with room). */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 fvec;
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define SET1(s) _mm512_set1_ps(s)
enum { CHAINS = 16 };
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef __m256 fvec;
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define SET1(s) _mm256_set1_ps(s)
enum { CHAINS = 12 };
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
typedef float32x4_t fvec;
#define FMA(a, b, c) vfmaq_f32(c, a, b)
#define SET1(s) vdupq_n_f32(s)
enum { CHAINS = 16 };
#else
typedef float fvec; /* the plain C path: a multiply and an add, 2 FLOPs as an FMA's */
#define FMA(a, b, c) ((a) * (b) + (c))
#define SET1(s) (s)
enum { CHAINS = 8 };
#endif
enum { LANES = sizeof(fvec) / sizeof(float), MAX_STREAMS = 8, LINE = 64, STEP = 4 };
enum { MAX_SUMS = 64 }; /* per-thread results kept (the pool has at most this many threads) */

/* ---- read: each thread sums its share of buf as `streams` parts read side by side ---- */
typedef struct {
    const char *buf; /* 64-byte aligned */
    long long bytes;
    int reps, streams;
    uint64_t sums[MAX_SUMS]; /* each thread's sum, where the caller sees it: the reads happen */
} reading_t;

typedef uint64_t line_t __attribute__((vector_size(LINE))); /* a cache line, as the ISA splits */

/* Lines in each of a thread's streams: whole steps of STEP lines. */
static size_t stream_lines(long long bytes, int n_threads, int streams) {
    return (size_t)(bytes / LINE / n_threads / streams / STEP * STEP);
}

static void read_share(void *arg, int thread, int n_threads) {
    reading_t *r = arg;
    size_t n = stream_lines(r->bytes, n_threads, r->streams), streams = (size_t)r->streams;
    const line_t *share = (const line_t *)r->buf + (size_t)thread * n * streams;
    line_t acc[STEP] = {{0}};
    for (int rep = 0; rep < r->reps; rep++) {
        for (size_t i = 0; i < n; i += STEP) { /* STEP lines of each stream, one after another */
            for (size_t s = 0; s < streams; s++) {
                const line_t *p = share + s * n + i;
                for (int k = 0; k < STEP; k++) {
                    acc[k] += p[k];
                }
            }
        }
    }
    line_t t = acc[0] + acc[1] + acc[2] + acc[3];
    uint64_t sum = 0;
    for (int k = 0; k < LINE / 8; k++) {
        sum += t[k];
    }
    if (thread < MAX_SUMS) {
        r->sums[thread] = sum;
    }
}

long long pyllm_read(pyllm_model *m, void *buf, long long bytes, int reps, int streams) {
    if (!m || !buf || (uintptr_t)buf % LINE || bytes < 1 << 20 || reps < 1 || streams < 1 ||
        streams > MAX_STREAMS) {
        return -1;
    }
    reading_t r = {buf, bytes, reps, streams, {0}};
    int n_threads = pyllm_run_on_pool(m, read_share, &r);
    return (long long)stream_lines(bytes, n_threads, streams) * LINE * streams * n_threads * reps;
}

/* ---- compute: CHAINS independent FMA chains per thread, all in registers ---- */
typedef struct {
    long long iters;
    float sums[MAX_SUMS];
} fma_run_t;

static void fma_share(void *arg, int thread, int n_threads) {
    (void)n_threads;
    fma_run_t *f = arg;
    fvec acc[CHAINS], a = SET1(0.999999f), b = SET1(1e-7f); /* converges: no inf, no subnormal */
    for (int c = 0; c < CHAINS; c++) {
        acc[c] = SET1((float)c);
    }
    for (long long i = 0; i < f->iters; i++) {
        for (int c = 0; c < CHAINS; c++) {
            acc[c] = FMA(acc[c], a, b);
        }
    }
    float s = 0;
    for (int c = 0; c < CHAINS; c++) {
        float lanes[LANES];
        memcpy(lanes, &acc[c], sizeof lanes);
        for (int k = 0; k < LANES; k++) {
            s += lanes[k];
        }
    }
    if (thread < MAX_SUMS) {
        f->sums[thread] = s;
    }
}

long long pyllm_fma(pyllm_model *m, long long iters, float *result) {
    if (!m || iters < 1) {
        return -1;
    }
    fma_run_t f = {iters, {0}};
    int n_threads = pyllm_run_on_pool(m, fma_share, &f);
    float s = 0;
    for (int k = 0; k < MAX_SUMS; k++) {
        s += f.sums[k];
    }
    if (result) {
        *result = s;
    }
    return 2LL * LANES * CHAINS * iters * n_threads;
}
