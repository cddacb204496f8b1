/* A plain C driver of the kernel, for paths Python cannot load here (e.g. the NEON
   build under qemu-aarch64): prints the logits of every position, one per line. */
#include <stdio.h>
#include <stdlib.h>

#include "pyllm.h"

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s MODEL VOCAB ID...\n", argv[0]); return 2; }
    char err[256];
    pyllm_model *m = pyllm_open(argv[1], 2, 0, err, sizeof err);
    if (!m) { fprintf(stderr, "%s\n", err); return 1; }
    int n = argc - 3, vocab = atoi(argv[2]), *ids = malloc(sizeof(int) * n);
    float *logits = malloc(sizeof(float) * (size_t)n * vocab);
    for (int i = 0; i < n; i++) ids[i] = atoi(argv[3 + i]);
    int rc = pyllm_forward(m, ids, n, 0, logits, 1);
    if (rc) { fprintf(stderr, "pyllm_forward: error %d\n", rc); return 1; }
    printf("%s\n", pyllm_simd());
    for (long i = 0; i < (long)n * vocab; i++) printf("%.9g\n", logits[i]);
    pyllm_close(m);
    return 0;
}
