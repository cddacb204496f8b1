/* A plain C driver of the kernel, for paths Python cannot load here (e.g. the NEON
   build under qemu-aarch64), feeding ids as `pyllm check` does (pyllm/check.py,
   kernel_logits): all but the last DECODE in one call, then those one at a time; then
   all of them in one call again. Prints the vector path, then the logits of every
   position of the first pass, then of the second, one per line. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pyllm.h"

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s MODEL f16|f32 THREADS DECODE VOCAB ID...\n", argv[0]);
        return 2;
    }
    int cache = strcmp(argv[2], "f32") ? PYLLM_CACHE_F16 : PYLLM_CACHE_F32;
    int threads = atoi(argv[3]), decode = atoi(argv[4]), vocab = atoi(argv[5]), n = argc - 6;
    if (decode < 0 || decode >= n || vocab <= 0) { fprintf(stderr, "bad DECODE or VOCAB\n"); return 2; }
    char err[256];
    pyllm_model *m = pyllm_open(argv[1], threads, n, cache, cache, err, sizeof err);
    if (!m) { fprintf(stderr, "%s\n", err); return 1; }
    int *ids = malloc(sizeof(int) * n), split = n - decode, rc = 0;
    float *logits = malloc(sizeof(float) * (size_t)n * vocab);
    for (int i = 0; i < n; i++) ids[i] = atoi(argv[6 + i]);
    printf("%s\n", pyllm_simd());
    for (int pass = 0; pass < 2 && !rc; pass++) {
        if (pass == 0) {
            rc = pyllm_forward(m, ids, split, 0, logits, 1);
            for (int i = split; i < n && !rc; i++) rc = pyllm_forward(m, ids + i, 1, i, logits + (size_t)i * vocab, 0);
        } else {
            rc = pyllm_forward(m, ids, n, 0, logits, 1);
        }
        for (long i = 0; !rc && i < (long)n * vocab; i++) printf("%.9g\n", logits[i]);
    }
    if (rc) { fprintf(stderr, "pyllm_forward: error %d\n", rc); return 1; }
    pyllm_close(m);
    return 0;
}
