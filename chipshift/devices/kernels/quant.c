/* Weight-only quantized linears: bfloat16 rows of x times weights held in GGUF block
   formats (Q8_0, Q4_0, Q4_1: 32 weights a block with fp16 scales), on x86 CPUs with AVX2,
   FMA and F16C. Python side and block layouts: quant.py.

   Decoding reads every weight once per step for a handful of rows, so the cost is moving
   weight bytes; a 4-bit block moves 20 bytes where bfloat16 moves 64. To keep up with that
   stream the arithmetic has to be integer, as llama.cpp does it (ggml_vec_dot_q4_1_q8_1 and
   friends): each row of x is quantized once per call to 8-bit blocks of 32 (d = amax/127,
   q = round(x/d), and s = d * sum(q) for Q4_1's offset m), then each weight block against
   each row is an integer dot product (maddubs to int16 pairs, madd to int32, exact),
   converted to float32 and multiplied by d_w * d_x into a float32 accumulator; Q4_1's
   m * s is summed beside it. One horizontal sum per output, rounded to bfloat16 once.

   Unlike llama.cpp, blocks go two to a vector: the x blocks are laid out so that the 16
   nibble bytes of two weight blocks side by side need one AND for the first halves and a
   shift and an AND for the second, and the fp16 scales of four blocks are converted at
   once. On AVX2 this is bound by the vector ports, not by memory: ~1.2-1.35 ns a block on
   one core of a 2.3 GHz Xeon (Emerald Rapids), ~15 GB/s of Q4_1 weights, where the bfloat16
   kernel streams ~2x the bytes per cycle; at batch 1 a 49152 x 576 Q4_1 matrix takes ~0.6-0.7
   ms on 2 cores against ~1.3-1.6 ms for the bf16 kernel (2.2x; the weights are 3.2x fewer
   bytes). AVX-VNNI (one vpdpbusd for maddubs + madd) measured 8% faster at batch 1, 15% at 4:
   not used, as the AVX2-only CPUs this serves lack it.

   So the result is x's 8-bit approximation times the exact weights: rounding moves each x
   by at most half a step, (its block's largest |x|) / 254, and an output by at most
   sum |w| times that; not the bfloat16 kernel's one rounding. Only float32 summation
   orders differ from that model (the tests hold the kernel to it).

   Threads split the weight rows (OpenMP, one team per call, all matrices of the call in
   one pass, as bf16_linear_many). Each weight block is loaded and unpacked once for up to
   four rows of x; more rows are taken four at a time while the weight row is in L1. */

#include "bf16.h"
#include <stdlib.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define QK 32 /* weights per block */

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 }; /* ggml type ids */

static int block_bytes(int fmt) { return fmt == Q8_0 ? 34 : fmt == Q4_0 ? 18 : fmt == Q4_1 ? 20 : 0; }

static inline uint32_t load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

/* x quantized to 8-bit blocks, laid out for the weight blocks' nibbles: per row, per pair of
   blocks (b, b + 1), 64 bytes: elements 0..15 of b, 0..15 of b + 1, then 16..31 of b, 16..31
   of b + 1 (one AND of 16 nibble bytes of each block, side by side, gives the first half, a
   shift and an AND the second); per block two floats, d and s = d * sum(q), which line up
   with the weights' (d, m) converted four blocks at a time; and per pair the eight int32
   lanes that take Q4_0's offset out of its integer sums: 8 * the sum of the q that each lane
   of the sums covers (so that each lane holds its true partial sum, not two large ones that
   cancel).
   With an odd number of blocks the last pair's second block is zeros. */
typedef struct {
    const int8_t *q;  /* M x np x 64 */
    const float *f;   /* M x 2np x 2 */
    const int32_t *c; /* M x np x 8 */
    int64_t M, nb, np;
} qx;

/* d = amax / 127 and q = round(x / d) (to nearest even), as quantize_row_q8_1 does */
static void quantize_x(const uint16_t *x, int64_t M, int64_t nb, int8_t *q, float *f, int32_t *c) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const int64_t np = (nb + 1) / 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < np * 2; b++) {
            int8_t *qp = q + (m * np + b / 2) * 64 + (b % 2) * 16;
            float *fp = f + (m * np * 2 + b) * 2;
            int32_t *cp = c + (m * np + b / 2) * 8 + (b % 2) * 4;
            if (b == nb) { /* the padding of an odd count */
                memset(qp, 0, 16), memset(qp + 32, 0, 16);
                memset(cp, 0, 16);
                fp[0] = fp[1] = 0.0f;
                continue;
            }
            __m256 v[4];
            for (int j = 0; j < 4; j++) v[j] = widen8(x + 8 * j);
            x += QK;
            __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                     _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
            const float d = hmax(a) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            __m256i n[4];
            for (int j = 0; j < 4; j++)
                n[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(id)),
                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            /* a lane j of the pair sums covers elements 4j..4j+3 and 16+4j..16+4j+3: in the
               low 128 bits of h lanes 0, 1 cover j = 0, 2, in the high ones j = 1, 3 */
            __m256i h = _mm256_hadd_epi32(_mm256_add_epi32(n[0], n[2]), _mm256_add_epi32(n[1], n[3]));
            h = _mm256_hadd_epi32(h, h);
            const __m128i lo4 = _mm256_castsi256_si128(h), hi4 = _mm256_extracti128_si256(h, 1);
            __m128i part = _mm_unpacklo_epi32(lo4, hi4); /* j = 0, 1, 2, 3 */
            _mm_storeu_si128((__m128i *)cp, _mm_slli_epi32(part, 3));
            __m128i s4 = _mm_add_epi32(part, _mm_shuffle_epi32(part, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            /* packs work within 128-bit lanes: 4-byte groups come out as 0 2 4 6 1 3 5 7 */
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
            p = _mm256_permutevar8x32_epi32(p, order);
            _mm_storeu_si128((__m128i *)qp, _mm256_castsi256_si128(p));
            _mm_storeu_si128((__m128i *)(qp + 32), _mm256_extracti128_si256(p, 1));
            fp[0] = d;
            fp[1] = d * (float)_mm_cvtsi128_si32(s4);
        }
}

/* The (d, m) of G (1, 2 or 4) weight blocks as eight floats (m: Q4_1's offset; 0 in the
   other formats), zeros beyond G blocks: one conversion for four blocks. */
ALWAYS_INLINE __m256 load_scales(const uint8_t *blk, const int G, const int fmt) {
    const int BB = fmt == Q8_0 ? 34 : fmt == Q4_0 ? 18 : 20;
    __m128i h;
    if (fmt == Q4_1) {
        h = _mm_cvtsi32_si128((int)load_u32(blk));
        if (G > 1) h = _mm_insert_epi32(h, (int)load_u32(blk + BB), 1);
        if (G > 2) h = _mm_insert_epi32(h, (int)load_u32(blk + 2 * BB), 2);
        if (G > 3) h = _mm_insert_epi32(h, (int)load_u32(blk + 3 * BB), 3);
    } else {
        h = _mm_cvtsi32_si128(load_u16(blk));
        if (G > 1) h = _mm_insert_epi16(h, load_u16(blk + BB), 2);
        if (G > 2) h = _mm_insert_epi16(h, load_u16(blk + 2 * BB), 4);
        if (G > 3) h = _mm_insert_epi16(h, load_u16(blk + 3 * BB), 6);
    }
    return _mm256_cvtph_ps(h);
}

/* Weight blocks b, b + 1 (or b alone: `single`) as the halves lo and hi of qx's layout */
ALWAYS_INLINE void load_pair(const uint8_t *blk, __m256i *lo, __m256i *hi, const int single, const int fmt) {
    const int BB = fmt == Q8_0 ? 34 : fmt == Q4_0 ? 18 : 20, off = fmt == Q4_1 ? 4 : 2;
    const uint8_t *next = blk + BB;
    const __m128i zero = _mm_setzero_si128();
    if (fmt == Q8_0) {
        *lo = _mm256_set_m128i(single ? zero : _mm_loadu_si128((const __m128i *)(next + 2)),
                               _mm_loadu_si128((const __m128i *)(blk + 2)));
        *hi = _mm256_set_m128i(single ? zero : _mm_loadu_si128((const __m128i *)(next + 18)),
                               _mm_loadu_si128((const __m128i *)(blk + 18)));
    } else {
        /* byte j: element j in its low nibble, element j + 16 in its high one */
        __m256i v = _mm256_set_m128i(single ? zero : _mm_loadu_si128((const __m128i *)(next + off)),
                                     _mm_loadu_si128((const __m128i *)(blk + off)));
        const __m256i low = _mm256_set1_epi8(0x0f);
        *lo = _mm256_and_si256(v, low);
        *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
}

/* The eight int32 partial sums of a pair of weight blocks (lanes 0-3: b, 4-7: b + 1) with
   a pair of x's blocks */
ALWAYS_INLINE __m256i pair_sums(__m256i lo, __m256i hi, const int8_t *q, const int fmt) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i xlo = _mm256_loadu_si256((const __m256i *)q), xhi = _mm256_loadu_si256((const __m256i *)(q + 32));
    if (fmt == Q8_0) /* signed weights: maddubs wants one unsigned operand, so |w| and x with w's sign;
                        int16 pairs up to 2 * 128 * 127: each half to int32 first */
        return _mm256_add_epi32(
            _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(lo, lo), _mm256_sign_epi8(xlo, lo)), ones),
            _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(hi, hi), _mm256_sign_epi8(xhi, hi)), ones));
    /* nibbles: int16 pairs up to 2 * 15 * 127, and the sum of both halves fits */
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi)), ones);
}

/* G (1, 2 or 4) weight blocks from block b of a weight row w against R rows of x (q, f, c:
   the first row's; rows qs, fs, qs / 8 apart). Per row one product gives every
   block's d_w d_x and m_w s_x: the first scales the pair's int32 sums (permuted to their
   lanes), the second is summed in accm's odd lanes (Q4_1). Q4_0's nibbles q mean q - 8:
   8 * sum(q_x) comes off the integer sums, lane by lane. */
ALWAYS_INLINE void group_dot(const uint8_t *w, const int8_t *q, const float *f, const int32_t *c, int64_t b,
                             int64_t qs, int64_t fs, __m256 (*acc)[4], __m256 *accm, const int R, const int U,
                             const int G, const int fmt) {
    const int BB = fmt == Q8_0 ? 34 : fmt == Q4_0 ? 18 : 20, P = G == 4 ? 2 : 1;
    const uint8_t *blk = w + b * BB;
    q += b * 32, f += b * 2, c += b * 4;
    const __m256 t = load_scales(blk, G, fmt);
    __m256i lo[2], hi[2];
    for (int u = 0; u < P; u++) load_pair(blk + 2 * u * BB, &lo[u], &hi[u], G == 1, fmt);
    for (int r = 0; r < R; r++) {
        const float *fr = f + r * fs;
        __m256 xs = G == 4 ? _mm256_loadu_ps(fr) : _mm256_set_m128(_mm_setzero_ps(), _mm_loadu_ps(fr));
        __m256 prod = _mm256_mul_ps(t, xs); /* d_w d_x, m_w s_x, for each block */
        if (fmt == Q4_1) accm[r] = _mm256_add_ps(accm[r], prod);
        for (int u = 0; u < P; u++) {
            __m256 scale = _mm256_permutevar8x32_ps(prod, _mm256_setr_epi32(4 * u, 4 * u, 4 * u, 4 * u, 4 * u + 2,
                                                                            4 * u + 2, 4 * u + 2, 4 * u + 2));
            __m256i isums = pair_sums(lo[u], hi[u], q + r * qs + u * 64, fmt);
            if (fmt == Q4_0)
                isums = _mm256_sub_epi32(isums, _mm256_loadu_si256((const __m256i *)(c + (r * qs + u * 64) / 8)));
            __m256 sums = _mm256_cvtepi32_ps(isums);
            acc[u % U][r] = _mm256_fmadd_ps(scale, sums, acc[u % U][r]);
        }
    }
}

/* Bytes ahead of the weight stream to prefetch: the rows follow in memory. In a batch-1
   SmolLM2 Q4_1 step, 4 KiB ahead took the layers from 8.7-9.4 to 5.8-6.9 ms (2-core Xeon,
   AVX512-BF16 without AMX; weights read from memory, not a hot cache). */
#define PREFETCH 4096

/* One weight row (nb blocks at w) against R (1..4) rows of x from `row`, four blocks at a
   time; out[r]: the float32 sums. With one row, two accumulators, so that the FMA latency
   does not bound the loop. */
ALWAYS_INLINE void row_dot(const uint8_t *w, const qx *x, int64_t row, float *out, const int R, const int fmt) {
    const int U = R == 1 ? 2 : 1;
    const int64_t nb = x->nb, qs = x->np * 64, fs = x->np * 4;
    const int8_t *q = x->q + row * qs;
    const float *f = x->f + row * fs;
    const int32_t *c = x->c + row * qs / 8;
    __m256 acc[2][4], accm[4];
    for (int r = 0; r < R; r++) acc[0][r] = acc[1][r] = accm[r] = _mm256_setzero_ps();
    int64_t b = 0;
    const int BB = fmt == Q8_0 ? 34 : fmt == Q4_0 ? 18 : 20;
    for (; b + 4 <= nb; b += 4) { /* ask for the stream PREFETCH bytes ahead (see bf16_linear.c's PREFETCH) */
        _mm_prefetch((const char *)(w + b * BB + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + b * BB + PREFETCH + 64), _MM_HINT_T0);
        group_dot(w, q, f, c, b, qs, fs, acc, accm, R, U, 4, fmt);
    }
    if (nb - b >= 2) group_dot(w, q, f, c, b, qs, fs, acc, accm, R, U, 2, fmt), b += 2;
    if (nb - b == 1) group_dot(w, q, f, c, b, qs, fs, acc, accm, R, U, 1, fmt);
    for (int r = 0; r < R; r++) {
        __m256 a = U == 2 ? _mm256_add_ps(acc[0][r], acc[1][r]) : acc[0][r];
        if (fmt == Q4_1) a = _mm256_add_ps(a, _mm256_blend_ps(_mm256_setzero_ps(), accm[r], 0xaa)); /* the m s */
        out[r] = hsum(a);
    }
}

/* Weight rows n..n+count-1 of one matrix against every row of x, four rows of x at a time. */
ALWAYS_INLINE void rows_block(const uint8_t *w, const qx *x, uint16_t *y, int64_t N, int64_t n, int count,
                              const int fmt) {
    const int64_t row_bytes = x->nb * (fmt == Q8_0 ? 34 : fmt == Q4_0 ? 18 : 20);
    for (int64_t j = n; j < n + count; j++) {
        const uint8_t *wr = w + j * row_bytes;
        for (int64_t m = 0; m < x->M; m += 4) {
            float out[4];
            const int64_t R = x->M - m < 4 ? x->M - m : 4;
            switch (R) {
            case 1: row_dot(wr, x, m, out, 1, fmt); break;
            case 2: row_dot(wr, x, m, out, 2, fmt); break;
            case 3: row_dot(wr, x, m, out, 3, fmt); break;
            default: row_dot(wr, x, m, out, 4, fmt); break;
            }
            for (int64_t r = 0; r < R; r++) y[(m + r) * N + j] = round1(out[r]);
        }
    }
}

static void rows_q8_0(const uint8_t *w, const qx *x, uint16_t *y, int64_t N, int64_t n, int count) {
    rows_block(w, x, y, N, n, count, Q8_0);
}
static void rows_q4_0(const uint8_t *w, const qx *x, uint16_t *y, int64_t N, int64_t n, int count) {
    rows_block(w, x, y, N, n, count, Q4_0);
}
static void rows_q4_1(const uint8_t *w, const qx *x, uint16_t *y, int64_t N, int64_t n, int count) {
    rows_block(w, x, y, N, n, count, Q4_1);
}

/* y_i = x @ W_i.T for `count` (<= 8) weight matrices in GGUF block formats sharing x:
   x M x K bfloat16, y_i M x N[i] bfloat16 (rounded to nearest even once, from float32),
   w_i: N[i] rows of K/32 blocks each, raw GGUF bytes, row-major; fmt[i]: the ggml type id
   (2 = Q4_0, 3 = Q4_1, 8 = Q8_0). K must be a multiple of 32. */
void quant_linear_many(const uint16_t *x, int count, const uint8_t *const *w, const int *fmt,
                       uint16_t *const *y, const int64_t *N, int64_t M, int64_t K, int threads) {
    if (count < 1 || count > 8 || M < 1 || K < 0 || K % QK) return;
    const int64_t nb = K / QK, np = (nb + 1) / 2;
    int8_t *q = malloc((size_t)(M * np * 64));
    float *f = malloc(sizeof(float) * (size_t)(M * np * 4));
    int32_t *c = malloc(sizeof(int32_t) * (size_t)(M * np * 8));
    quantize_x(x, M, nb, q, f, c);
    const qx xq = {q, f, c, M, nb, np};
    /* weight rows go to threads in blocks of 8 */
    const int64_t block = 8;
    int64_t total = 0, first[9], bytes = 0;
    for (int i = 0; i < count; i++) {
        first[i] = total;
        total += (N[i] + block - 1) / block;
        bytes += N[i] * nb * block_bytes(fmt[i]);
    }
    first[count] = total;
    /* a small matrix is not worth waking the other threads for */
#pragma omp parallel for schedule(static) num_threads(bytes >= (1 << 17) ? threads : 1)
    for (int64_t g = 0; g < total; g++) {
        int i = 0;
        while (g >= first[i + 1]) i++;
        const int64_t n = (g - first[i]) * block;
        const int rows = (int)(N[i] - n < block ? N[i] - n : block);
        switch (fmt[i]) {
        case Q8_0: rows_q8_0(w[i], &xq, y[i], N[i], n, rows); break;
        case Q4_0: rows_q4_0(w[i], &xq, y[i], N[i], n, rows); break;
        case Q4_1: rows_q4_1(w[i], &xq, y[i], N[i], n, rows); break;
        default: break; /* the Python side admits only these */
        }
    }
    free(c);
    free(f);
    free(q);
}

/* rows `ids[0..n-1]` of a quantized matrix (an embedding) dequantized to bfloat16 */
void quant_rows(const uint8_t *w, int fmt, int64_t K, const int64_t *ids, int64_t n, uint16_t *out) {
    const int BB = block_bytes(fmt);
    const int64_t nb = K / QK;
    if (!BB) return;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = w + ids[i] * nb * BB;
        uint16_t *o = out + i * K;
        for (int64_t b = 0; b < nb; b++, o += QK) {
            const uint8_t *blk = row + b * BB;
            const float d = _cvtsh_ss(load_u16(blk));
            if (fmt == Q8_0) {
                for (int j = 0; j < QK; j++) o[j] = round1(d * (float)(int8_t)blk[2 + j]);
            } else {
                /* Q4_1: d * q is exact in float32 (an 11-bit d times a 4-bit q), + m rounds once */
                const float m = fmt == Q4_1 ? _cvtsh_ss(load_u16(blk + 2)) : 0.0f;
                const int off = fmt == Q4_1 ? 0 : 8;
                const uint8_t *qs = blk + (fmt == Q4_1 ? 4 : 2);
                for (int j = 0; j < QK / 2; j++) {
                    o[j] = round1(d * (float)((qs[j] & 15) - off) + m);
                    o[j + QK / 2] = round1(d * (float)((qs[j] >> 4) - off) + m);
                }
            }
        }
    }
}
