/* y = x @ w.T (+ b) for a few rows of bfloat16 x and bfloat16 weights w, on x86 CPUs with
   AVX2 and FMA. Inputs and output are bfloat16; the arithmetic is float32.

   CPUs without AVX512-BF16 or AMX have no bfloat16 arithmetic, and PyTorch's bfloat16
   linear on them runs at a few GFLOP/s whatever the batch. Decoding reads every weight once
   per step for a handful of rows, so the work is dominated by moving weight bytes: this
   kernel streams each bfloat16 weight row once, widens it to float32 in registers (a
   bfloat16 is the top half of a float32) and multiplies it into every row of x with fused
   multiply-adds. The numbers are those of a native bfloat16 GEMM (exact products, float32
   accumulation, one rounding to bfloat16 at the end, to nearest even); only the summation
   order differs.

   Two paths. A single row (decode at batch 1) is bound by memory: each weight row is read
   as one sequential stream, widened and multiplied with four accumulators, rows split
   between threads, which keeps the hardware prefetchers streaming. Several rows are bound
   by arithmetic: each block of eight weight rows is widened once into a float32 buffer that
   stays in cache, and register tiles of 2 rows of x by 4 weight rows reuse every load. The
   two paths sum in different orders, so a row's last bit may depend on whether it was alone.
   Threads split the weight rows (OpenMP; loaded into a process that already holds
   PyTorch's libgomp, so one runtime serves both). */

#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

static inline __m256 widen8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float widen1(uint16_t v) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)v << 16};
    return c.f;
}

static inline uint16_t round1(float f) { /* to nearest even, like torch's float -> bfloat16 */
    union { float f; uint32_t u; } c = {.f = f};
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

typedef struct {
    const float *x; /* M x K, widened once per call */
    const uint16_t *w, *b;
    uint16_t *y;
    int64_t M, N, K;
} problem;

static inline void finish(const problem *p, __m256 acc, int64_t m, int64_t n, int64_t k) {
    float s = hsum(acc);
    for (; k < p->K; k++) s += p->x[m * p->K + k] * widen1(p->w[n * p->K + k]);
    if (p->b) s += widen1(p->b[n]);
    p->y[m * p->N + n] = round1(s);
}

/* Two rows of x (m, m+1) against four float32 weight rows at wf (row stride K; already
   widened), whose rows are n..n+3 of w. */
static void tile_2x4(const problem *p, const float *wf, int64_t m, int64_t n) {
    const int64_t K = p->K;
    const float *x0 = p->x + m * K, *x1 = x0 + K;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k), b;
        b = _mm256_loadu_ps(wf + k);         a00 = _mm256_fmadd_ps(u, b, a00); a10 = _mm256_fmadd_ps(v, b, a10);
        b = _mm256_loadu_ps(wf + K + k);     a01 = _mm256_fmadd_ps(u, b, a01); a11 = _mm256_fmadd_ps(v, b, a11);
        b = _mm256_loadu_ps(wf + 2 * K + k); a02 = _mm256_fmadd_ps(u, b, a02); a12 = _mm256_fmadd_ps(v, b, a12);
        b = _mm256_loadu_ps(wf + 3 * K + k); a03 = _mm256_fmadd_ps(u, b, a03); a13 = _mm256_fmadd_ps(v, b, a13);
    }
    finish(p, a00, m, n, k); finish(p, a01, m, n + 1, k); finish(p, a02, m, n + 2, k); finish(p, a03, m, n + 3, k);
    finish(p, a10, m + 1, n, k); finish(p, a11, m + 1, n + 1, k);
    finish(p, a12, m + 1, n + 2, k); finish(p, a13, m + 1, n + 3, k);
}

/* The odd row left over when there are several: `count` (<= 8) widened weight rows at wf. */
static void tile_1xn(const problem *p, const float *wf, int64_t m, int64_t n, int count) {
    const int64_t K = p->K;
    const float *x0 = p->x + m * K;
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 u = _mm256_loadu_ps(x0 + k);
        for (int j = 0; j < count; j++) {
            acc[j] = _mm256_fmadd_ps(u, _mm256_loadu_ps(wf + j * K + k), acc[j]);
        }
    }
    for (int j = 0; j < count; j++) finish(p, acc[j], m, n + j, k);
}


/* One row of x against weight rows n..n+count-1, each row one sequential stream read with
   four accumulators (a single one would wait on the FMA latency). */
static void row_dot(const problem *p, int64_t m, int64_t n, int count) {
    const int64_t K = p->K;
    const float *x0 = p->x + m * K;
    for (int j = 0; j < count; j++) {
        const uint16_t *w = p->w + (n + j) * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), widen8(w + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 8), widen8(w + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 16), widen8(w + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 24), widen8(w + k + 24), a3);
        }
        for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), widen8(w + k), a0);
        finish(p, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), m, n + j, k);
    }
}

/* y_i = x @ w_i.T (+ b_i) for `count` matrices sharing x and K (q/k/v, gate/up): one pass
   over the union of their weight rows, one thread team. */
void bf16_linear_many(const uint16_t *x, int count, const uint16_t *const *w, const uint16_t *const *b,
                      uint16_t *const *y, const int64_t *N, int64_t M, int64_t K, int threads) {
    float *xf = malloc(sizeof(float) * (size_t)(M * K));
    for (int64_t i = 0; i < M * K; i++) xf[i] = widen1(x[i]);
    int64_t total = 0, first[9];
    for (int i = 0; i < count; i++) { first[i] = total; total += (N[i] + 7) / 8; }
    first[count] = total;
    int64_t elements = 0;
    for (int i = 0; i < count; i++) elements += N[i] * K;
    /* a small matrix is not worth waking the other threads for */
#pragma omp parallel num_threads(elements >= (1 << 18) ? threads : 1)
    {
        /* with several rows, each block of eight weight rows is widened once into this
           buffer (it stays in L1/L2) and every row of x reads it from there */
        float *wf = M > 1 ? malloc(sizeof(float) * (size_t)(8 * K)) : NULL;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < total; g++) {
            int i = 0;
            while (g >= first[i + 1]) i++;
            problem p = {xf, w[i], b ? b[i] : NULL, y[i], M, N[i], K};
            int64_t n = (g - first[i]) * 8;
            int rows = (int)(N[i] - n < 8 ? N[i] - n : 8);
            if (wf)
                for (int j = 0; j < rows; j++)
                    for (int64_t k = 0; k + 8 <= K; k += 8)
                        _mm256_storeu_ps(wf + j * K + k, widen8(p.w + (n + j) * K + k));
            int64_t m = 0;
            if (wf && rows == 8)
                for (; m + 2 <= M; m += 2) { tile_2x4(&p, wf, m, n); tile_2x4(&p, wf + 4 * K, m, n + 4); }
            if (wf)
                for (; m < M; m++) tile_1xn(&p, wf, m, n, rows);
            else
                row_dot(&p, 0, n, rows);
        }
        free(wf);
    }
    free(xf);
}

void bf16_linear(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
    bf16_linear_many(x, 1, &w, b ? &b : NULL, &y, &N, M, K, threads);
}

/* RMSNorm of bfloat16 rows as the model computes it: in float32, x * rsqrt(mean(x^2) + eps),
   rounded to bfloat16, then times the bfloat16 weight and rounded again. One call per
   norm instead of eight small tensor operations, which at decode cost more than the math. */
void bf16_rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t D, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xr = x + m * D;
        float ss = 0.0f;
        for (int64_t d = 0; d < D; d++) { float v = widen1(xr[d]); ss += v * v; }
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t d = 0; d < D; d++)
            y[m * D + d] = round1(widen1(round1(widen1(xr[d]) * r)) * widen1(w[d]));
    }
}
