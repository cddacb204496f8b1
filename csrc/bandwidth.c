/* The read of the machine's bandwidth, the ceiling of decode (`pyllm bench --roofline` times
   it): no part of the model, only its thread pool's neighbour. */
#include <stddef.h>
#include <stdint.h>

#include "pyllm.h"
#include "pyllm_pool.h"

typedef struct {
    uint64_t *buf;   /* 64-byte aligned */
    long long bytes; /* of buf */
    int reps;
} reading_t;

/* 64-bit words of a thread's share: whole 512-byte steps. */
static size_t share(long long bytes, int n_threads) {
    return (size_t)(bytes / 8 / n_threads / 64 * 64);
}

/* A thread's share, summed reps times in 64 lanes (8 lines a step). */
static void read_share(void *arg, int thread, int n_threads) {
    const reading_t *r = arg;
    size_t n = share(r->bytes, n_threads);
    uint64_t *p = r->buf + (size_t)thread * n, acc[64] = {0};
    for (int rep = 0; rep < r->reps; rep++) {
        for (size_t i = 0; i < n; i += 64) { /* size_t: Python's -fwrapv makes int i + k a gather */
            for (int k = 0; k < 64; k++)
                acc[k] += p[i + k];
        }
    }
    for (int k = 0; k < 64; k++)
        p[0] += acc[k]; /* a result stored, so the reads happen */
}

long long pyllm_read(pyllm_model *m, void *buf, long long bytes, int reps) {
    if (!m || !buf || (uintptr_t)buf % 64 || bytes < 1 << 20 || bytes / 8 > INT32_MAX || reps < 1)
        return -1;
    reading_t r = {buf, bytes, reps};
    int n_threads = pyllm_run_on_pool(m, read_share, &r);
    return 8LL * (long long)share(bytes, n_threads) * n_threads * reps;
}
