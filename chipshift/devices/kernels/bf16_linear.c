/* y = x @ w.T (+ b) for a few rows of bfloat16 x and bfloat16 weights w, on x86 CPUs with
   AVX2 and FMA. Inputs and output are bfloat16; the arithmetic is float32.

   CPUs without AVX512-BF16 or AMX have no bfloat16 arithmetic, and PyTorch's bfloat16
   linear on them runs at a few GFLOP/s whatever the batch. Decoding reads every weight once
   per step for a handful of rows, so the work is dominated by moving weight bytes: this
   kernel streams the bfloat16 weights once, widens them to float32 (a bfloat16 is the top
   half of a float32) and multiplies them into every row of x with fused multiply-adds.
   The numbers are those of a native bfloat16 GEMM (exact products, float32 accumulation,
   one rounding to bfloat16 at the end, to nearest even); only the summation order differs.

   Two paths; both split the weight rows between threads (OpenMP; loaded into a process
   that already holds PyTorch's libgomp, so one runtime serves both).
   Up to six rows: each weight row is read as one sequential stream, which keeps the
   hardware prefetchers streaming, widened 8 at a time in registers and multiplied into
   every row with two or four accumulators per row, summed across the vector at the end.
   With one to four rows this is bound by memory.
   Seven rows or more are bound by arithmetic, and there the rows of x become the vector
   lanes instead: x is transposed once per call, a register tile of 6 weight rows x 2
   vectors of x (16 rows, or 8 rows x a pair of k) broadcasts each weight once into two
   fused multiply-adds, with no widening and no horizontal sum in the inner loop, and the
   sums come out one vector per output column, rounded together. Each tile's weights are
   first widened, 128 k at a time, into a float32 buffer in L1, and the next tile's are
   prefetched meanwhile: 6 rows read side by side are not streams the hardware prefetchers
   follow.
   The paths sum in different orders, so a row's last bit may depend on how many rows came
   with it. (Seven rows or more on a CPU with AVX512-BF16 take a third path: see dp_tile.) */

#include "bf16.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *x; /* M x K, widened once per call */
    const uint16_t *w, *b;
    uint16_t *y;
    int64_t M, N, K;
} problem;

static inline void finish(const problem *p, float s, int64_t m, int64_t n, int64_t k) {
    for (; k < p->K; k++) s += p->x[m * p->K + k] * widen1(p->w[n * p->K + k]);
    if (p->b) s += widen1(p->b[n]);
    p->y[m * p->N + n] = round1(s);
}

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* How far ahead (in weights) the dot products ask for the stream they read: a core keeps
   only a few cache-line misses in flight, and on its own sustains ~7 GB/s from memory.
   Asking 8 KiB ahead (the next rows: they follow in memory) took a batch-1 SmolLM2 step
   from 20-24 to 14-15 ms (2-core Xeon, AVX512-BF16 without AMX). */
#define PREFETCH 4096

/* R (1..6) rows of x against weight rows n..n+count-1, each weight row one sequential stream,
   widened 8 at a time and multiplied into every row: 4 accumulators per row with one row,
   2 with more (fewer would wait on the FMA latency). */
ALWAYS_INLINE void rows_dot(const problem *p, int64_t n, int count, const int R) {
    const int U = R == 1 ? 4 : 2;
    const int64_t K = p->K;
    const float *x = p->x;
    for (int j = 0; j < count; j++) {
        const uint16_t *w = p->w + (n + j) * K;
        __m256 acc[6][4];
        for (int r = 0; r < R; r++)
            for (int u = 0; u < U; u++) acc[r][u] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 * U <= K; k += 8 * U) {
            _mm_prefetch((const char *)(w + k + PREFETCH), _MM_HINT_T0);
            for (int u = 0; u < U; u++) {
                __m256 b = widen8(w + k + 8 * u);
                for (int r = 0; r < R; r++) acc[r][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k + 8 * u), b, acc[r][u]);
            }
        }
        for (; k + 8 <= K; k += 8) {
            __m256 b = widen8(w + k);
            for (int r = 0; r < R; r++) acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), b, acc[r][0]);
        }
        for (int r = 0; r < R; r++) {
            __m256 s = U == 4 ? _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]))
                              : _mm256_add_ps(acc[r][0], acc[r][1]);
            finish(p, hsum(s), r, n + j, k);
        }
    }
}

static void dot_block(const problem *p, int64_t n, int count) {
    switch (p->M) {
    case 1: rows_dot(p, n, count, 1); break;
    case 2: rows_dot(p, n, count, 2); break;
    case 3: rows_dot(p, n, count, 3); break;
    case 4: rows_dot(p, n, count, 4); break;
    case 5: rows_dot(p, n, count, 5); break;
    default: rows_dot(p, n, count, 6); break;
    }
}

/* Seven rows or more: a chunk of up to 16 rows of x, transposed for the column tiles below,
   padded with zero rows to `lanes` = 8 or 16. With 16 lanes a vector holds x[0..7][k] or
   x[8..15][k]; with 8 it holds x[0..3][k, k+1] or x[4..7][k, k+1] (pairs of k, so that
   one broadcast pair of weights serves two vectors). k runs to k_end, K rounded down to
   16, in the order of slot(); finish() adds the k beyond. */
typedef struct {
    float *xt;
    int64_t row, rows, k_end;
    int lanes;
} chunk;

#define KC 128 /* k per block of the widened weights: 6 rows x KC float32 stay in L1 */

/* Widening 16 bfloat16 at once (two in-lane unpacks with zeros) leaves them in the order
   k 0-3, 8-11, 4-7, 12-15: where k lands in its block of 16. x is transposed to match. */
static inline int slot(int k) { return k >= 4 && k < 8 ? k + 4 : k >= 8 && k < 12 ? k - 4 : k; }

/* The hardware prefetchers do not follow a tile's rows as streams: ask for the next tile's
   rows (the `cols` after these; they follow in memory) while this one computes, spread over
   its K loop. At k, a multiple of 8: a quarter of those rows, the cache line holding k. */
ALWAYS_INLINE void prefetch_next(const uint16_t *w, int64_t K, const int cols, int64_t k) {
    for (int i = (int)(k / 8) % 4; i < cols; i += 4)
        _mm_prefetch((const char *)(w + (cols + i) * K + k / 32 * 32), _MM_HINT_T0);
}

/* The chunk's rows against weight rows n..n+cols-1, a register tile of cols x 2 vector
   accumulators. KC k at a time, the tile's weights are widened into a float32 buffer in
   L1; each step then broadcasts one of them (16 lanes) or a pair (8 lanes) and multiplies
   it into two vectors of x: one load per two fused multiply-adds, no horizontal sums. */
ALWAYS_INLINE void col_tile(const problem *p, const chunk *c, int64_t n, const int cols, const int lanes) {
    const int G = lanes == 16 ? 1 : 2; /* k per lane group */
    const int64_t K = p->K, k_end = c->k_end;
    const uint16_t *w = p->w + n * K;
    __m256 acc[6][2];
    for (int i = 0; i < cols; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    float wf[6 * KC] __attribute__((aligned(32)));
    for (int64_t k0 = 0; k0 < k_end; k0 += KC) {
        const int64_t kc = k_end - k0 < KC ? k_end - k0 : KC;
        for (int i = 0; i < cols; i++)
            for (int64_t k = 0; k < kc; k += 16) {
                __m256i h = _mm256_loadu_si256((const __m256i *)(w + i * K + k0 + k)), zero = _mm256_setzero_si256();
                _mm256_store_si256((__m256i *)(wf + i * KC + k), _mm256_unpacklo_epi16(zero, h));
                _mm256_store_si256((__m256i *)(wf + i * KC + k + 8), _mm256_unpackhi_epi16(zero, h));
            }
        __m256 a[6][2]; /* a copy that GCC keeps in registers through the loop */
        for (int i = 0; i < cols; i++) a[i][0] = acc[i][0], a[i][1] = acc[i][1];
        for (int64_t kb = 0; kb < kc; kb += 8) {
            prefetch_next(w, K, cols, k0 + kb);
#pragma GCC unroll 1 /* unrolled, GCC runs out of registers */
            for (int64_t k = kb; k < kb + 8; k += G) {
                const float *xk = c->xt + (k0 + k) * lanes;
                __m256 x0 = _mm256_loadu_ps(xk), x1 = _mm256_loadu_ps(xk + 8);
#pragma GCC unroll 6
                for (int i = 0; i < cols; i++) {
                    __m256 b = G == 1 ? _mm256_broadcast_ss(wf + i * KC + k)
                                      : _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(wf + i * KC + k)));
                    a[i][0] = _mm256_fmadd_ps(x0, b, a[i][0]);
                    a[i][1] = _mm256_fmadd_ps(x1, b, a[i][1]);
                }
            }
        }
        for (int i = 0; i < cols; i++) acc[i][0] = a[i][0], acc[i][1] = a[i][1];
    }
    for (int i = 0; i < cols; i++) {
        __m256 lo = acc[i][0], hi = acc[i][1]; /* rows 0..7 and 8..15 */
        if (G == 2) { /* the pairs of lanes (k, k+1) of rows 0..3 and 4..7 */
            lo = _mm256_hadd_ps(acc[i][0], acc[i][1]); /* rows 0 1 4 5 2 3 6 7 */
            lo = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(lo), 0xd8));
        }
        if (k_end == K) { /* all of K done: the column's rows rounded together */
            __m256 bias = _mm256_set1_ps(p->b ? widen1(p->b[n + i]) : 0.0f);
            uint32_t out[16];
            _mm256_storeu_si256((__m256i *)out, round8(_mm256_add_ps(lo, bias)));
            if (lanes == 16) _mm256_storeu_si256((__m256i *)(out + 8), round8(_mm256_add_ps(hi, bias)));
            for (int64_t r = 0; r < c->rows; r++) p->y[(c->row + r) * p->N + n + i] = (uint16_t)out[r];
        } else {
            float out[16];
            _mm256_storeu_ps(out, lo);
            if (lanes == 16) _mm256_storeu_ps(out + 8, hi);
            for (int64_t r = 0; r < c->rows; r++) finish(p, out[r], c->row + r, n + i, k_end);
        }
    }
}

/* Weight rows n..n+count-1 against every chunk: tiles of 6 columns, then narrower ones. */
ALWAYS_INLINE void col_rows(const problem *p, const chunk *c, int64_t n, int count, const int lanes) {
    for (; count >= 6; count -= 6, n += 6) col_tile(p, c, n, 6, lanes);
    for (; count >= 4; count -= 4, n += 4) col_tile(p, c, n, 4, lanes);
    for (; count >= 1; count -= 1, n += 1) col_tile(p, c, n, 1, lanes);
}

static void col_block(const problem *p, const chunk *chunks, int nchunks, int64_t n, int count) {
    for (int i = 0; i < nchunks; i++) {
        if (chunks[i].lanes == 16)
            col_rows(p, chunks + i, n, count, 16);
        else
            col_rows(p, chunks + i, n, count, 8);
    }
}

/* The chunk's rows of x (widened: xf) in its layout, by blocks of 16 k (reading along
   rows K apart would thrash the cache). */
ALWAYS_INLINE void fill_chunk(chunk *c, const float *xf, int64_t K, const int lanes) {
    const int G = lanes == 16 ? 1 : 2;
    if (c->rows < lanes) memset(c->xt, 0, sizeof(float) * (size_t)(lanes * c->k_end));
    for (int64_t kb = 0; kb < c->k_end; kb += 16)
        for (int64_t r = 0; r < c->rows; r++)
            for (int k = 0; k < 16; k += G)
                for (int g = 0; g < G; g++)
                    c->xt[(kb + slot(k)) * lanes + r * G + g] = xf[(c->row + r) * K + kb + k + g];
}

/* Seven rows or more on a CPU with AVX512-BF16 (which the library is not compiled for: these
   functions alone are, and run only where the CPU has it, `use_avx512_bf16`). VDPBF16PS
   multiplies 16 pairs of bfloat16 exactly and adds them into float32 lanes: a native
   bfloat16 GEMM's numbers (exact products, float32 sums; it flushes subnormals to zero),
   32 multiply-adds an instruction against 8 for the widening FMA path above, which at 8
   rows is bound by arithmetic. A tile of 2 weight rows (each one sequential stream, 32 k at
   a time) is multiplied into up to 8 rows of x held in L1: 16 accumulators, each load of x
   serving both weight rows, the 16 sums reduced together at the end (sum16).
   The weights are prefetched into L2, not L1: at 8 rows the core is busy with the dot
   products, and prefetches into L1 (which hold L1's few miss buffers and evict x) left a
   SmolLM2 step streaming at ~15 GB/s. Measured (2-core AMD EPYC, AVX512-BF16 without AMX,
   a SmolLM2-135M decode step of 8 rows): one weight row at a time, prefetched into L1,
   17-21 ms; this, 12-16 ms. */
int use_avx512_bf16 = -1; /* -1: as the CPU says (set on first call); 0/1: set by bf16_set_avx512 */

#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

void bf16_set_avx512(int on) { use_avx512_bf16 = on && __builtin_cpu_supports("avx512bf16"); }

/* The sums of 16 vectors, one per lane (lane i: the sum of v[i]), by a tree of shuffles and
   adds: 45 instructions where 16 horizontal sums take ~130, one after another. */
AVX512_BF16 static inline __m512 sum16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* in each 128-bit lane: v[2i] v[2i+1] v[2i] v[2i+1] */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* in each 128-bit lane: v[4i] .. v[4i+3] */
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xee));
    for (int i = 0; i < 2; i++) /* 128-bit lanes: v[8i..8i+3], the same, v[8i+4..8i+7], the same */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
}

/* R (1..8) rows of x (from row m0) against a tile of C (1 or 2) weight rows from n, read
   side by side, 32 k at a time: C x R accumulators, each load of x serving C rows of
   weights. The tile's sums come out one per lane of a vector (sum16), rounded together. */
AVX512_BF16 static inline __attribute__((always_inline)) void dp_tile(const problem *p, const uint16_t *x, int64_t n,
                                                                      int64_t m0, const int C, const int R) {
    const int64_t K = p->K, k_end = K / 32 * 32;
    const __mmask32 tail = (__mmask32)((1ull << (K - k_end)) - 1);
    const uint16_t *w = p->w + n * K;
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < k_end; k += 32) {
        __m512bh wv[2];
        for (int j = 0; j < C; j++) {
            _mm_prefetch((const char *)(w + j * K + k + PREFETCH), _MM_HINT_T1);
            wv[j] = (__m512bh)_mm512_loadu_si512(w + j * K + k);
        }
        for (int r = 0; r < R; r++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + r) * K + k);
            for (int j = 0; j < C; j++) acc[8 * j + r] = _mm512_dpbf16_ps(acc[8 * j + r], xv, wv[j]);
        }
    }
    if (tail) {
        for (int j = 0; j < C; j++) {
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + j * K + k);
            for (int r = 0; r < R; r++)
                acc[8 * j + r] = _mm512_dpbf16_ps(acc[8 * j + r],
                                                  (__m512bh)_mm512_maskz_loadu_epi16(tail, x + (m0 + r) * K + k), wv);
        }
    }
    __m512 s = sum16(acc); /* lane 8 j + r: row m0 + r, column n + j */
    if (p->b) {
        const __m512 b0 = _mm512_set1_ps(widen1(p->b[n])), b1 = _mm512_set1_ps(C > 1 ? widen1(p->b[n + 1]) : 0.0f);
        s = _mm512_add_ps(s, _mm512_mask_blend_ps(0xff00, b0, b1));
    }
    /* round1 on 16 lanes */
    const __m512i u = _mm512_castps_si512(s);
    __m512i r16 = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))),
                                    16);
    r16 = _mm512_mask_mov_epi32(r16, _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    uint16_t out[16];
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(r16));
    for (int j = 0; j < C; j++)
        for (int r = 0; r < R; r++) p->y[(m0 + r) * p->N + n + j] = out[8 * j + r];
}

AVX512_BF16 static inline __attribute__((always_inline)) void dp_rows(const problem *p, const uint16_t *x, int64_t n,
                                                                      int count, int64_t m0, const int R) {
    int j = 0;
    for (; j + 2 <= count; j += 2) dp_tile(p, x, n + j, m0, 2, R);
    if (j < count) dp_tile(p, x, n + j, m0, 1, R);
}

AVX512_BF16 static void dp_block(const problem *p, const uint16_t *x, int64_t n, int count) {
    for (int64_t m0 = 0; m0 < p->M; m0 += 8) {
        switch (p->M - m0 < 8 ? p->M - m0 : 8) {
        case 1: dp_rows(p, x, n, count, m0, 1); break;
        case 2: dp_rows(p, x, n, count, m0, 2); break;
        case 3: dp_rows(p, x, n, count, m0, 3); break;
        case 4: dp_rows(p, x, n, count, m0, 4); break;
        case 5: dp_rows(p, x, n, count, m0, 5); break;
        case 6: dp_rows(p, x, n, count, m0, 6); break;
        case 7: dp_rows(p, x, n, count, m0, 7); break;
        default: dp_rows(p, x, n, count, m0, 8); break;
        }
    }
}

#else /* a compiler without the AVX512-BF16 intrinsics: the AVX2 path only */
void bf16_set_avx512(int on) { use_avx512_bf16 = 0 * on; }
static void dp_block(const problem *p, const uint16_t *x, int64_t n, int count) {
    (void)p, (void)x, (void)n, (void)count;
}
#endif

/* y_i = x @ w_i.T (+ b_i) for `count` matrices sharing x and K (q/k/v, gate/up): one pass
   over the union of their weight rows, one thread team. */
void bf16_linear_many(const uint16_t *x, int count, const uint16_t *const *w, const uint16_t *const *b,
                      uint16_t *const *y, const int64_t *N, int64_t M, int64_t K, int threads) {
    if (use_avx512_bf16 < 0) bf16_set_avx512(1);
    const int dp = M > 6 && use_avx512_bf16;
    float *xf = dp ? NULL : malloc(sizeof(float) * (size_t)(M * K)); /* the dot products take x as it is */
    for (int64_t i = 0; !dp && i < M * K; i++) xf[i] = widen1(x[i]);
    /* rows of x in chunks of 16, each transposed (see `chunk`) */
    int nchunks = M > 6 && !dp ? (int)((M + 15) / 16) : 0;
    chunk *chunks = malloc(sizeof(chunk) * (size_t)(nchunks + 1));
    float *xt = nchunks ? malloc(sizeof(float) * (size_t)(16 * K * nchunks)) : NULL;
    for (int i = 0; i < nchunks; i++) {
        chunk *c = chunks + i;
        c->row = 16 * (int64_t)i;
        c->rows = M - c->row < 16 ? M - c->row : 16;
        c->lanes = c->rows > 8 ? 16 : 8;
        c->xt = xt + 16 * K * i;
        c->k_end = K / 16 * 16;
        if (c->lanes == 16)
            fill_chunk(c, xf, K, 16);
        else
            fill_chunk(c, xf, K, 8);
    }
    /* weight rows go to threads in blocks of 8 (dot products) or of a register tile (6) */
    const int64_t block = M > 6 ? 6 : 8;
    int64_t total = 0, first[9];
    for (int i = 0; i < count; i++) { first[i] = total; total += (N[i] + block - 1) / block; }
    first[count] = total;
    int64_t elements = 0;
    for (int i = 0; i < count; i++) elements += N[i] * K;
    /* a small matrix is not worth waking the other threads for */
#pragma omp parallel for schedule(static) num_threads(elements >= (1 << 18) ? threads : 1)
    for (int64_t g = 0; g < total; g++) {
        int i = 0;
        while (g >= first[i + 1]) i++;
        problem p = {xf, w[i], b ? b[i] : NULL, y[i], M, N[i], K};
        int64_t n = (g - first[i]) * block;
        int rows = (int)(N[i] - n < block ? N[i] - n : block);
        if (M <= 6)
            dot_block(&p, n, rows);
        else if (dp)
            dp_block(&p, x, n, rows);
        else
            col_block(&p, chunks, nchunks, n, rows);
    }
    free(xt);
    free(chunks);
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
