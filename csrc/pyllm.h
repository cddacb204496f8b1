/* pyllm: the C API. Declarations only: cffi's cdef reads this file. */
typedef struct pyllm_model pyllm_model;

/* The element type of the KV cache's keys and of its values. */
enum {
    PYLLM_CACHE_F16 = 0, /* rounded to f16, as llama.cpp's default */
    PYLLM_CACHE_F32 = 1  /* kept exact: twice the memory */
};

/* Map and validate a parameters file. n_threads <= 0: one per core; n_ctx <= 0: the
   model's context length. NULL on failure, with a one-line message in err. */
pyllm_model *pyllm_open(const char *path, int n_threads, int n_ctx, int cache_type_k,
                        int cache_type_v, char *err, int err_len);

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
long long pyllm_cache_bytes(const pyllm_model *m); /* the KV cache's mapping, keys and values */
const char *pyllm_simd(void); /* the vector path compiled in: "avx512", "avx2", "neon", "scalar" */
void pyllm_close(pyllm_model *m);

/* (csrc/bandwidth.c) The machine's two ceilings, timed by `pyllm bench --roofline` on the model's
   own threads. pyllm_read: each thread sums its share of buf (64-byte aligned, 1 MiB or more,
   written to) as `streams` parts (1 to 8) read side by side, reps times; returns the bytes read.
   pyllm_fma: each thread runs iters steps of independent f32 FMA chains in registers; returns the
   FLOPs done (an FMA is 2), and their sum in *result unless NULL. -1: bad arguments. */
long long pyllm_read(pyllm_model *m, void *buf, long long bytes, int reps, int streams);
long long pyllm_fma(pyllm_model *m, long long iters, float *result);
