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

   Every y[m][n] is summed in the same order whatever M is and whichever tile computes it,
   so a row's result does not depend on the other rows of the call (batch invariance).
   Threads split the weight rows (OpenMP; loaded into a process that already holds
   PyTorch's libgomp, so one runtime serves both). */

#include <immintrin.h>
#include <stdint.h>
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

/* One row of x against `count` (<= 8) weight rows from n, widened on the fly (wf NULL:
   eight weight streams in flight, for the memory-bound single row) or read from wf. */
static void tile_1xn(const problem *p, const float *wf, int64_t m, int64_t n, int count) {
    const int64_t K = p->K;
    const float *x0 = p->x + m * K;
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 u = _mm256_loadu_ps(x0 + k);
        for (int j = 0; j < count; j++) {
            __m256 b = wf ? _mm256_loadu_ps(wf + j * K + k) : widen8(p->w + (n + j) * K + k);
            acc[j] = _mm256_fmadd_ps(u, b, acc[j]);
        }
    }
    for (int j = 0; j < count; j++) finish(p, acc[j], m, n + j, k);
}

void bf16_linear(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
    float *xf = malloc(sizeof(float) * (size_t)(M * K));
    for (int64_t i = 0; i < M * K; i++) xf[i] = widen1(x[i]);
    problem p = {xf, w, b, y, M, N, K};
    int64_t blocks = (N + 7) / 8;
#pragma omp parallel num_threads(threads)
    {
        /* with several rows, each block of eight weight rows is widened once into this
           buffer (it stays in L1/L2) and every row of x reads it from there */
        float *wf = M > 1 ? malloc(sizeof(float) * (size_t)(8 * K)) : NULL;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            int64_t n = blk * 8;
            int count = (int)(N - n < 8 ? N - n : 8);
            if (wf)
                for (int j = 0; j < count; j++)
                    for (int64_t k = 0; k + 8 <= K; k += 8)
                        _mm256_storeu_ps(wf + j * K + k, widen8(w + (n + j) * K + k));
            int64_t m = 0;
            if (wf && count == 8)
                for (; m + 2 <= M; m += 2) { tile_2x4(&p, wf, m, n); tile_2x4(&p, wf + 4 * K, m, n + 4); }
            for (; m < M; m++) tile_1xn(&p, wf, m, n, count);
        }
        free(wf);
    }
    free(xf);
}
