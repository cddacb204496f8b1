/* pyllm: the C API. Declarations only: cffi's cdef reads this file. */
typedef struct pyllm_model pyllm_model;

/* Map and validate a parameters file. n_threads <= 0: one per core; n_ctx <= 0: the
   model's context length. NULL on failure, with a one-line message in err. */
pyllm_model *pyllm_open(const char *path, int n_threads, int n_ctx, char *err, int err_len);

/* Run n_tokens tokens at positions pos.. (the KV cache holds positions < pos).
   logits: vocab floats for the last token, or n_tokens * vocab if all_positions.
   Returns 0, or one of these codes (nothing is run then). */
int pyllm_forward(pyllm_model *m, const int *tokens, int n_tokens, int pos, float *logits,
                  int all_positions);
enum {
    PYLLM_E_ARG = 1,    /* a bad argument */
    PYLLM_E_TOKEN = 2,  /* a token id outside the vocabulary */
    PYLLM_E_CONTEXT = 3 /* positions past the context */
};
int pyllm_n_ctx(const pyllm_model *m);
int pyllm_n_threads(const pyllm_model *m);
const char *pyllm_simd(void); /* the vector path compiled in: "avx512", "avx2", "neon", "scalar" */
void pyllm_close(pyllm_model *m);

/* (csrc/bandwidth.c) The read of the machine's bandwidth, the ceiling of decode (`pyllm bench
   --roofline` times it): the model's threads each sum their share of buf (64-byte aligned, 1 MiB or
   more, written to), reps times. Returns the bytes read, or -1 for bad arguments. */
long long pyllm_read(pyllm_model *m, void *buf, long long bytes, int reps);
