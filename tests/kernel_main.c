/* A plain C driver of the kernel, for paths Python cannot load here (e.g. the NEON
   build under qemu-aarch64): feeds the ids in forward calls of the given sizes and prints
   the logits of every position, one per line. CACHE: f16 or f32, for keys and values. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pyllm.h"

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s MODEL THREADS CACHE CHUNK,CHUNK,... VOCAB ID...\n", argv[0]);
        return 2;
    }
    char err[256];
    int cache = strcmp(argv[3], "f32") ? PYLLM_CACHE_F16 : PYLLM_CACHE_F32;
    pyllm_model *m = pyllm_open(argv[1], atoi(argv[2]), 0, cache, cache, err, sizeof err);
    if (!m) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    int n = argc - 6;
    int vocab = atoi(argv[5]);
    int *ids = malloc(sizeof(int) * n);
    float *logits = malloc(sizeof(float) * (size_t)n * vocab);
    for (int i = 0; i < n; i++) {
        ids[i] = atoi(argv[6 + i]);
    }
    int pos = 0;
    for (char *chunk = argv[4]; pos < n && *chunk; chunk++) {
        int len = (int)strtol(chunk, &chunk, 10);
        int rc = pyllm_forward(m, ids + pos, len, pos, logits + (size_t)pos * vocab, 1);
        if (rc) {
            fprintf(stderr, "pyllm_forward: error %d at position %d\n", rc, pos);
            return 1;
        }
        pos += len;
        if (!*chunk) {
            break;
        }
    }
    if (pos != n) {
        fprintf(stderr, "the chunks feed %d of %d ids\n", pos, n);
        return 2;
    }
    printf("%s\n", pyllm_simd());
    for (long i = 0; i < (long)n * vocab; i++) {
        printf("%.9g\n", logits[i]);
    }
    pyllm_close(m);
    return 0;
}
