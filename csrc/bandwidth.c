/* The machine's read bandwidth, the ceiling of decode (`pyllm bench --roofline`): threads
   each sum their share of a buffer in 64 independent lanes (8 lines a step), so memory is the limit. */
#define _POSIX_C_SOURCE 200809L
#include "pyllm.h"
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

enum { MAX_THREADS = 64 };
typedef struct { const uint64_t *p; size_t n; int reps; uint64_t sum; } bw_arg;

static void *bw_worker(void *arg) {
    bw_arg *a = arg;
    uint64_t acc[64] = {0};
    for (int r = 0; r < a->reps; r++)
        for (size_t i = 0; i + 64 <= a->n; i += 64)
            for (int k = 0; k < 64; k++) acc[k] += a->p[i + k];
    for (int k = 0; k < 64; k++) a->sum += acc[k];
    return NULL;
}

double pyllm_read_bandwidth(long long bytes, int nth, int reps) {
    if (nth < 1 || nth > MAX_THREADS || bytes < 1 << 20 || reps < 1) return -1;
    size_t n = (size_t)bytes / 8;
    uint64_t *buf = NULL;
    if (posix_memalign((void **)&buf, 64, n * 8)) return -1;
    for (size_t i = 0; i < n; i++) buf[i] = i; /* touched, so every page is really there */
    pthread_t th[MAX_THREADS];
    bw_arg args[MAX_THREADS];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < nth; i++) {
        args[i] = (bw_arg){buf + n / nth * i, n / nth, reps, 0};
        pthread_create(&th[i], NULL, bw_worker, &args[i]);
    }
    for (int i = 0; i < nth; i++) pthread_join(th[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    free(buf);
    double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    return (double)(n / nth * nth) * 8.0 * reps / s;
}
