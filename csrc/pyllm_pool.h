/* Internal to the extension (cffi does not read it): the model's thread pool, for the
   kernel's neighbours such as csrc/bandwidth.c. */
typedef struct pyllm_model pyllm_model; /* as in pyllm.h (C11 allows the repeat) */

/* Runs fn(arg, thread, n_threads) on each of the pool's n_threads threads (thread 0 is the
   caller's) and returns n_threads once all have returned. */
int pyllm_run_on_pool(pyllm_model *m, void (*fn)(void *arg, int thread, int n_threads), void *arg);
