/* Decode attention over a KV cache read in place: the prototype of the "kernel kiln owns" route
 * (benchmarks/bench_cpu_kernels.py, docs/decisions/cpu-kernels.md).
 *
 * One new token per row, grouped-query attention: each of a row's HKV key/value heads serves
 * HQ / HKV query heads, and each key and value is read once for all of them.
 *   q     [B, HQ, D] float
 *   k, v  [B, HKV, T, D] float (attn_decode_f32) or int8 with a scale per token and head
 *         ks, vs [B, HKV, T] (attn_decode_i8): key = k * ks, value = v * vs
 *   lens  [B] keys each row attends to (its past and the new token)
 *   out   [B, HQ, D] float
 * Rows x KV heads are spread over OpenMP threads. Built with the system compiler for the CPU it
 * runs on (-O3 -march=native -ffast-math -fopenmp): a benchmark kernel, not a dispatching library.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_GROUP 16

#define ATTN_BODY(KT, KEY, VAL)                                                              \
    _Pragma("omp parallel for schedule(static)")                                            \
    for (int task = 0; task < B * HKV; task++) {                                             \
        const int b = task / HKV, h = task % HKV, g = HQ / HKV, n = lens[b];                 \
        const KT *kr = k + ((size_t)b * HKV + h) * T * D, *vr = v + ((size_t)b * HKV + h) * T * D; \
        const float *qr = q + ((size_t)b * HQ + h * g) * D;                                  \
        float *s = malloc(sizeof(float) * (size_t)g * n), acc[MAX_GROUP][256] = {{0}};      \
        float top[MAX_GROUP], sum[MAX_GROUP];                                                \
        for (int j = 0; j < g; j++) top[j] = -INFINITY, sum[j] = 0.f;                        \
        float row[256];                                                                      \
        for (int t = 0; t < n; t++) {                                                        \
            const KT *kt = kr + (size_t)t * D;                                               \
            const float ksc = KEY * scale;                                                   \
            _Pragma("omp simd")                                                              \
            for (int i = 0; i < D; i++) row[i] = (float)kt[i] * ksc; /* converted once */    \
            for (int j = 0; j < g; j++) {                                                    \
                float d = 0.f;                                                               \
                _Pragma("omp simd reduction(+:d)")                                           \
                for (int i = 0; i < D; i++) d += qr[j * D + i] * row[i];                     \
                s[j * n + t] = d;                                                            \
                if (d > top[j]) top[j] = d;                                                  \
            }                                                                                \
        }                                                                                    \
        for (int j = 0; j < g; j++) { /* softmax numerators, vectorised over t (libmvec) */   \
            float *sj = s + (size_t)j * n, m = top[j], z = 0.f;                              \
            _Pragma("omp simd reduction(+:z)")                                               \
            for (int t = 0; t < n; t++) { sj[t] = expf(sj[t] - m); z += sj[t]; }             \
            sum[j] = z;                                                                      \
        }                                                                                    \
        for (int t = 0; t < n; t++) {                                                        \
            const KT *vt = vr + (size_t)t * D;                                               \
            const float vsc = VAL;                                                           \
            _Pragma("omp simd")                                                              \
            for (int i = 0; i < D; i++) row[i] = (float)vt[i] * vsc; /* converted once */    \
            for (int j = 0; j < g; j++) {                                                    \
                const float p = s[j * n + t];                                                \
                _Pragma("omp simd")                                                          \
                for (int i = 0; i < D; i++) acc[j][i] += p * row[i];                         \
            }                                                                                \
        }                                                                                    \
        for (int j = 0; j < g; j++)                                                          \
            for (int i = 0; i < D; i++) out[((size_t)b * HQ + h * g + j) * D + i] = acc[j][i] / sum[j]; \
        free(s);                                                                             \
    }

int attn_decode_f32(const float *q, const float *k, const float *v, const int *lens, int B, int HQ, int HKV,
                    int T, int D, float *out) {
    if (HQ / HKV > MAX_GROUP || D > 256) return -1;
    const float scale = 1.f / sqrtf((float)D);
    ATTN_BODY(float, 1.f, 1.f)
    return 0;
}

int attn_decode_i8(const float *q, const int8_t *k, const int8_t *v, const float *ks, const float *vs,
                   const int *lens, int B, int HQ, int HKV, int T, int D, float *out) {
    if (HQ / HKV > MAX_GROUP || D > 256) return -1;
    const float scale = 1.f / sqrtf((float)D);
    ATTN_BODY(int8_t, ks[((size_t)b * HKV + h) * T + t], vs[((size_t)b * HKV + h) * T + t])
    return 0;
}
