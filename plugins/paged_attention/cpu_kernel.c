/* kiln::PagedAttention on the CPU: write this call's keys and values into the KV rows, in place,
 * then attend each query over its row (plugins/paged_attention/schema.py has the contract).
 *
 *   q      [B, S, NQ*D] float     this call's queries, rotated
 *   k, v   [B, S, NKV*D] float    this call's keys (rotated) and values
 *   kc, vc [B, NKV, M, D]         the rows of the cache, of `dtype` (KV_* below)
 *   ks, vs [B, NKV, M]  float     a scale per token and head (int8 and fp8 rows), else NULL
 *   pos    [B, S] int64           each token's position in its row (where its key is written)
 *   out    [B, S, NQ*D] float
 * Query (b, s) sees keys j <= pos[b, s] (and j > pos - window when window > 0); each KV head
 * serves NQ / NKV query heads, and each key and value row is converted once for all of them.
 *
 * One source, compiled once per instruction set (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA +
 * F16C, and the portable baseline) by plugins/paged_attention/cpu.py; the loops are written for
 * the compiler to vectorise, so each build uses its own vector width. Work is spread over OpenMP
 * threads: (row, KV head, query) tasks.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2, KV_I8 = 3, KV_FP8 = 4 };
#define MAX_GROUP 32
#define MAX_D 256

static float fp8_table[256]; /* e4m3fn code -> value */

static float e4m3_value(int code) {
    const int sign = code & 0x80, e = (code >> 3) & 0xf, m = code & 7;
    float a = e ? ldexpf(1.f + m / 8.f, e - 7) : ldexpf(m / 8.f, -6);
    if (e == 15 && m == 7) a = NAN;
    return sign ? -a : a;
}

static uint8_t e4m3_code(float x) { /* round to nearest even, saturating at +-448 */
    const uint8_t sign = x < 0 ? 0x80 : 0;
    const float a = fabsf(x);
    if (a >= 448.f) return sign | 0x7e;
    if (a < 0.0009765625f) return sign; /* under half the smallest subnormal, 2^-9 */
    int e;
    const float m = frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1) */
    int E = e + 6, f;
    if (E <= 0) { /* subnormal: a = f / 8 * 2^-6 */
        f = (int)nearbyintf(a * 512.f);
        return f >= 8 ? (sign | 0x08) : (sign | f);
    }
    f = (int)nearbyintf((2.f * m - 1.f) * 8.f);
    if (f == 8) f = 0, E++;
    if (E > 15 || (E == 15 && f == 7)) return sign | 0x7e;
    return sign | (uint8_t)(E << 3) | (uint8_t)f;
}

void kiln_init(void) {
    for (int c = 0; c < 256; c++) fp8_table[c] = e4m3_value(c);
}

void kiln_set_threads(int n) { omp_set_num_threads(n > 0 ? n : 1); }

static inline float bf16_value(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_code(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* x [D] -> slot `t` of a row of keys or values, and its scale when the dtype has one */
static void store(void *cache, float *scales, int dtype, size_t t, const float *x, int D) {
    float amax = 0.f;
    if (dtype == KV_I8 || dtype == KV_FP8)
        for (int i = 0; i < D; i++) amax = fmaxf(amax, fabsf(x[i]));
    switch (dtype) {
    case KV_F32: memcpy((float *)cache + t * D, x, sizeof(float) * D); break;
    case KV_F16: for (int i = 0; i < D; i++) ((_Float16 *)cache)[t * D + i] = (_Float16)x[i]; break;
    case KV_BF16: for (int i = 0; i < D; i++) ((uint16_t *)cache)[t * D + i] = bf16_code(x[i]); break;
    case KV_I8: {
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int i = 0; i < D; i++) ((int8_t *)cache)[t * D + i] = (int8_t)lrintf(x[i] * inv);
        scales[t] = amax / 127.f;
        break;
    }
    case KV_FP8: {
        const float inv = amax > 0.f ? 448.f / amax : 0.f;
        for (int i = 0; i < D; i++) ((uint8_t *)cache)[t * D + i] = e4m3_code(x[i] * inv);
        scales[t] = amax / 448.f;
        break;
    }
    }
}

/* slot `t` of a row -> row [D] floats, times `mul` (and the slot's scale) */
static inline __attribute__((always_inline)) void load(const void *cache, const float *scales, int dtype, size_t t, float mul, float *row, int D) {
    switch (dtype) {
    case KV_F32: {
        const float *p = (const float *)cache + t * D;
#pragma omp simd
        for (int i = 0; i < D; i++) row[i] = p[i] * mul;
        break;
    }
    case KV_F16: {
        const _Float16 *p = (const _Float16 *)cache + t * D;
#pragma omp simd
        for (int i = 0; i < D; i++) row[i] = (float)p[i] * mul;
        break;
    }
    case KV_BF16: {
        const uint16_t *p = (const uint16_t *)cache + t * D;
#pragma omp simd
        for (int i = 0; i < D; i++) row[i] = bf16_value(p[i]) * mul;
        break;
    }
    case KV_I8: {
        const int8_t *p = (const int8_t *)cache + t * D;
        const float m = mul * scales[t];
#pragma omp simd
        for (int i = 0; i < D; i++) row[i] = (float)p[i] * m;
        break;
    }
    case KV_FP8: {
        const uint8_t *p = (const uint8_t *)cache + t * D;
        const float m = mul * scales[t];
        for (int i = 0; i < D; i++) row[i] = fp8_table[p[i]] * m;
        break;
    }
    }
}

#define ATTEND_D(DT)                                                                         \
    switch (D) {                                                                             \
    case 64: attend(qr, kc, vc, ks, vs, DT, lo, hi, g, 64, scale, scores, out, qstride); break;   \
    case 128: attend(qr, kc, vc, ks, vs, DT, lo, hi, g, 128, scale, scores, out, qstride); break; \
    default: attend(qr, kc, vc, ks, vs, DT, lo, hi, g, D, scale, scores, out, qstride);           \
    }

static size_t item_bytes(int dtype) { return dtype == KV_F32 ? 4 : (dtype == KV_F16 || dtype == KV_BF16) ? 2 : 1; }

/* the attention of query (b, s) for the `g` query heads of KV head h: out[g][D]; inlined into
 * `attend_as` for each (dtype, head_dim) pair below, so the inner loops see both as constants */
static inline __attribute__((always_inline)) void attend(const float *qr, const void *kc, const void *vc, const float *ks, const float *vs, int dtype,
                   int lo, int hi, int g, int D, float scale, float *scores, float *out, int qstride) {
    float acc[MAX_GROUP][MAX_D], top[MAX_GROUP], row[MAX_D];
    const int n = hi - lo;
    for (int j = 0; j < g; j++) {
        top[j] = -INFINITY;
        memset(acc[j], 0, sizeof(float) * D);
    }
    for (int t = 0; t < n; t++) {
        load(kc, ks, dtype, (size_t)(lo + t), scale, row, D);
        for (int j = 0; j < g; j++) {
            float d = 0.f;
#pragma omp simd reduction(+ : d)
            for (int i = 0; i < D; i++) d += qr[j * D + i] * row[i];
            scores[j * n + t] = d;
            top[j] = fmaxf(top[j], d);
        }
    }
    float sum[MAX_GROUP];
    for (int j = 0; j < g; j++) {
        float *sj = scores + (size_t)j * n, m = top[j], z = 0.f;
#pragma omp simd reduction(+ : z)
        for (int t = 0; t < n; t++) {
            sj[t] = expf(sj[t] - m);
            z += sj[t];
        }
        sum[j] = z;
    }
    for (int t = 0; t < n; t++) {
        load(vc, vs, dtype, (size_t)(lo + t), 1.f, row, D);
        for (int j = 0; j < g; j++) {
            const float p = scores[j * n + t];
#pragma omp simd
            for (int i = 0; i < D; i++) acc[j][i] += p * row[i];
        }
    }
    for (int j = 0; j < g; j++) {
        const float inv = sum[j] > 0.f ? 1.f / sum[j] : 0.f;
        for (int i = 0; i < D; i++) out[(size_t)j * qstride + i] = acc[j][i] * inv;
    }
}

static void attend_as(const float *qr, const void *kc, const void *vc, const float *ks, const float *vs, int dtype,
                      int lo, int hi, int g, int D, float scale, float *scores, float *out, int qstride) {
    switch (dtype) {
    case KV_F32: ATTEND_D(KV_F32) break;
    case KV_F16: ATTEND_D(KV_F16) break;
    case KV_BF16: ATTEND_D(KV_BF16) break;
    case KV_I8: ATTEND_D(KV_I8) break;
    default: ATTEND_D(KV_FP8) break;
    }
}

/* 0, or -1 when the shapes are outside what this kernel handles (the caller says why) */
int kiln_paged_attention(const float *q, const float *k, const float *v, void *kc, void *vc, float *ks, float *vs,
                         const int64_t *pos, int B, int S, int NQ, int NKV, int D, int M, int dtype, int window,
                         float scale, float *out) {
    if (NKV < 1 || NQ % NKV || NQ / NKV > MAX_GROUP || D > MAX_D || dtype < KV_F32 || dtype > KV_FP8) return -1;
    const int g = NQ / NKV;
    const size_t bytes = item_bytes(dtype), head = (size_t)M * D; /* elements of one head's row */
    const long work = (long)B * S * NKV * (S + (pos[0] > 0 ? pos[0] : 0)); /* ~ keys read: small calls stay on one thread */
    int failed = 0;
#pragma omp parallel if (work > 4096) reduction(| : failed)
    {
#pragma omp for collapse(3) schedule(static)
        for (int b = 0; b < B; b++)
            for (int s = 0; s < S; s++)
                for (int h = 0; h < NKV; h++) {
                    const int64_t p = pos[(size_t)b * S + s];
                    if (p < 0 || p >= M) continue;
                    const size_t at = ((size_t)b * NKV + h) * head, sat = ((size_t)b * NKV + h) * M;
                    const float *src = k + ((size_t)b * S + s) * NKV * D + (size_t)h * D;
                    store((char *)kc + at * bytes, ks ? ks + sat : NULL, dtype, (size_t)p, src, D);
                    src = v + ((size_t)b * S + s) * NKV * D + (size_t)h * D;
                    store((char *)vc + at * bytes, vs ? vs + sat : NULL, dtype, (size_t)p, src, D);
                }
        /* the implicit barrier of the loop above: every key of this call is written before any is read */
        float *scores = malloc(sizeof(float) * (size_t)g * M);
        if (!scores) failed = 1;
#pragma omp for collapse(3) schedule(dynamic, 1)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NKV; h++)
                for (int s = 0; s < S; s++) {
                    if (!scores) continue;
                    int64_t p = pos[(size_t)b * S + s];
                    p = p < 0 ? 0 : p >= M ? M - 1 : p;
                    const int hi = (int)p + 1, lo = window > 0 && hi > window ? hi - window : 0;
                    const size_t at = ((size_t)b * NKV + h) * head, sat = ((size_t)b * NKV + h) * M;
                    const float *qr = q + ((size_t)b * S + s) * NQ * D + (size_t)h * g * D;
                    float *o = out + ((size_t)b * S + s) * NQ * D + (size_t)h * g * D;
                    attend_as(qr, (char *)kc + at * bytes, (char *)vc + at * bytes, ks ? ks + sat : NULL,
                           vs ? vs + sat : NULL, dtype, lo, hi, g, D, scale, scores, o, D);
                }
        free(scores);
    }
    return failed ? -2 : 0;
}
