/* One decode step of the chipshift transformer (chipshift/model/transformer.py) with
   bfloat16 weights, for a few rows, in one native call: embedding, every layer, the final
   norm and the output projection, writing this step's keys and values into the engine's
   KV cache. Any weight matrix may instead be GGUF blocks (Q8_0, Q4_0, Q4_1; quant.c),
   multiplied as they are.

   Why: at batch 1 the arithmetic of a SmolLM2-135M step is ~11 ms of streaming weights,
   but the same step as PyTorch operators spends as long again between them (about 20
   operators a layer, each a dispatch, an allocation and a pass over a few KiB), which on a
   2-core CPU held decode at a quarter of the memory bound. Here the only costs are the
   weight streams (bf16_linear_many, one thread team per projection group) and attention.

   The roundings are the model's in bfloat16: every operator's result is rounded to
   bfloat16 where PyTorch's would be (the norms as bf16_rms_norm, RoPE's two products and
   their sum, the residual adds, silu and its product with up), and the matmuls are exact
   products summed in float32, rounded once. Attention is float32 throughout (scores,
   softmax, weighted sum), rounded to bfloat16 at the end, as the engine's float32-attention
   twin computes it; the KV cache holds bfloat16 or float32 (the same bfloat16 values).
   Only summation orders differ from PyTorch's. */

#include "bf16.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

void bf16_linear_many(const uint16_t *x, int count, const uint16_t *const *w, const uint16_t *const *b,
                      uint16_t *const *y, const int64_t *N, int64_t M, int64_t K, int threads);
void bf16_rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t D, float eps);
void quant_linear_many(const uint16_t *x, int count, const uint8_t *const *w, const int *fmt,
                       uint16_t *const *y, const int64_t *N, int64_t M, int64_t K, int threads);
void quant_rows(const uint8_t *w, int fmt, int64_t K, const int64_t *ids, int64_t n, uint16_t *out);

/* A weight matrix: bfloat16 (fmt 0) or GGUF blocks (fmt: the ggml type id; quant.c). */
typedef struct {
    const void *w;
    int fmt;
} matrix;

enum { Q, K, V, O, GATE, UP, DOWN };

typedef struct {
    const uint16_t *attn_norm, *mlp_norm, *bias[3]; /* q, k, v biases or NULL */
    matrix m[7];                                    /* by the enum above */
} layer_weights;

typedef struct {
    int64_t layers, dim, heads, kv_heads, head_dim, ffn, vocab;
    int64_t slots, max_len; /* the cache: (layers, slots, kv_heads, max_len, head_dim) */
    float eps;
    int kv_float32; /* cache elements: 1 float32, 0 bfloat16 */
    matrix embed, out;
    const uint16_t *norm;
    const float *inv_freq; /* head_dim / 2 RoPE frequencies, float32 */
    void *k_cache, *v_cache;
    const layer_weights *layer;
} decoder;

/* y_i = x @ W_i.T (+ b_i) for `count` matrices sharing x: one call for those in bfloat16, one
   for those quantized (whose biases are added to the rounded product, then rounded again). */
static void project(const uint16_t *x, int count, const matrix *m, const uint16_t *const *b, uint16_t *const *y,
                    const int64_t *N, int64_t M, int64_t Kdim, int threads) {
    const void *w[8][2];
    const uint16_t *bb[8];
    uint16_t *yy[8][2];
    int64_t nn[8][2];
    int fm[8], n[2] = {0, 0};
    for (int i = 0; i < count; i++) {
        const int qd = m[i].fmt != 0, j = n[qd]++;
        w[j][qd] = m[i].w, yy[j][qd] = y[i], nn[j][qd] = N[i];
        if (qd) fm[j] = m[i].fmt;
        else bb[j] = b ? b[i] : NULL;
    }
    if (n[0]) {
        const uint16_t *ws[8];
        uint16_t *ys[8];
        int64_t ns[8];
        for (int j = 0; j < n[0]; j++) ws[j] = w[j][0], ys[j] = yy[j][0], ns[j] = nn[j][0];
        bf16_linear_many(x, n[0], ws, b ? bb : NULL, ys, ns, M, Kdim, threads);
    }
    if (n[1]) {
        const uint8_t *ws[8];
        uint16_t *ys[8];
        int64_t ns[8];
        for (int j = 0; j < n[1]; j++) ws[j] = w[j][1], ys[j] = yy[j][1], ns[j] = nn[j][1];
        quant_linear_many(x, n[1], ws, fm, ys, ns, M, Kdim, threads);
        if (b)
            for (int i = 0; i < count; i++)
                if (m[i].fmt && b[i])
                    for (int64_t r = 0; r < M; r++)
                        for (int64_t c = 0; c < N[i]; c++)
                            y[i][r * N[i] + c] = round1(widen1(y[i][r * N[i] + c]) + widen1(b[i][c]));
    }
}

static inline float bmul(float a, float b) { return widen1(round1(a * b)); } /* a bfloat16 product */

/* x * cos + rotate_half(x) * sin on each head of a row, with bfloat16 cos/sin: each
   product rounded, then their sum (rotate_half's -x2 times sin is -(x2 sin) exactly). */
static void rope(uint16_t *x, int64_t heads, int64_t hd, const float *cs, const float *sn) {
    const int64_t half = hd / 2;
    for (int64_t h = 0; h < heads; h++, x += hd) {
        float t[1024];
        for (int64_t i = 0; i < hd; i++) t[i] = widen1(x[i]);
        for (int64_t i = 0; i < half; i++) {
            x[i] = round1(bmul(t[i], cs[i]) - bmul(t[i + half], sn[i]));
            x[i + half] = round1(bmul(t[i + half], cs[i + half]) + bmul(t[i], sn[i + half]));
        }
    }
}

static inline void add_into(uint16_t *x, const uint16_t *y, int64_t n) { /* x = bf16(x + y) */
    for (int64_t i = 0; i < n; i++) x[i] = round1(widen1(x[i]) + widen1(y[i]));
}

/* element i of a cache row as float32 */
static inline float load1(const void *row, int64_t i, int f32) {
    return f32 ? ((const float *)row)[i] : widen1(((const uint16_t *)row)[i]);
}

/* 8 elements of a cache row as float32 */
static inline __m256 load8(const void *row, int64_t i, int f32) {
    return f32 ? _mm256_loadu_ps((const float *)row + i) : widen8((const uint16_t *)row + i);
}

/* q . row over hd elements: 8 lanes at a time, then the rest one by one */
static inline float dot_row(const float *q, const void *row, int64_t hd, int f32) {
    __m256 a = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= hd; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(row, i, f32), a);
    float d = hsum(a);
    for (; i < hd; i++) d += q[i] * load1(row, i, f32);
    return d;
}

/* acc += p * row over hd elements */
static inline void axpy_row(float p, const void *row, float *acc, int64_t hd, int f32) {
    const __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= hd; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, load8(row, i, f32), _mm256_loadu_ps(acc + i)));
    for (; i < hd; i++) acc[i] += p * load1(row, i, f32);
}

/* exp of 8 lanes (arguments <= 0 here: scores minus their maximum), as Cephes' expf:
   x = n ln2 + r, a degree-5 polynomial for e^r, times 2^n; within ~2 ulp of expf, which
   is far below the bfloat16 rounding of attention's output. Softmax of a long history
   spent most of its time in scalar expf. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f)); /* below: 0 after the 2^n scaling anyway */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* Attention of one row's query heads of kv head g (heads g*G .. g*G+G-1) over positions
   0..pos of its cache slot. */
static void attend(const decoder *m, int64_t l, int64_t slot, int64_t g, int64_t pos, const uint16_t *q,
                   uint16_t *y) {
    const int64_t hd = m->head_dim, G = m->heads / m->kv_heads, n = pos + 1;
    const size_t esz = m->kv_float32 ? 4 : 2;
    const int64_t base = ((l * m->slots + slot) * m->kv_heads + g) * m->max_len * hd;
    const char *kc = (const char *)m->k_cache + base * esz, *vc = (const char *)m->v_cache + base * esz;
    const float scale = 1.0f / sqrtf((float)hd);
    float *qf = malloc(sizeof(float) * (size_t)(G * hd * 2 + G * n)), *acc = qf + G * hd, *sc = acc + G * hd;
    for (int64_t i = 0; i < G * hd; i++) qf[i] = widen1(q[g * G * hd + i]), acc[i] = 0.0f;
    for (int64_t s = 0; s < n; s++)
        for (int64_t j = 0; j < G; j++)
            sc[j * n + s] = dot_row(qf + j * hd, kc + s * hd * esz, hd, m->kv_float32) * scale;
    for (int64_t j = 0; j < G; j++) {
        float *p = sc + j * n, mx = -INFINITY, sum = 0.0f;
        for (int64_t s = 0; s < n; s++) mx = p[s] > mx ? p[s] : mx;
        int64_t s = 0;
        __m256 vsum = _mm256_setzero_ps();
        for (; s + 8 <= n; s += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), _mm256_set1_ps(mx)));
            _mm256_storeu_ps(p + s, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        sum = hsum(vsum);
        for (; s < n; s++) sum += (p[s] = expf(p[s] - mx));
        for (s = 0; s < n; s++) p[s] /= sum;
    }
    for (int64_t s = 0; s < n; s++)
        for (int64_t j = 0; j < G; j++) axpy_row(sc[j * n + s], vc + s * hd * esz, acc + j * hd, hd, m->kv_float32);
    for (int64_t i = 0; i < G * hd; i++) y[g * G * hd + i] = round1(acc[i]);
    free(qf);
}

/* This step's k and v of a row into its cache slot at its position. */
static void store_kv(const decoder *m, int64_t l, int64_t slot, int64_t pos, const uint16_t *k, const uint16_t *v) {
    const int64_t hd = m->head_dim;
    for (int64_t g = 0; g < m->kv_heads; g++) {
        const int64_t at = (((l * m->slots + slot) * m->kv_heads + g) * m->max_len + pos) * hd;
        for (int64_t i = 0; i < hd; i++) {
            if (m->kv_float32) {
                ((float *)m->k_cache)[at + i] = widen1(k[g * hd + i]);
                ((float *)m->v_cache)[at + i] = widen1(v[g * hd + i]);
            } else {
                ((uint16_t *)m->k_cache)[at + i] = k[g * hd + i];
                ((uint16_t *)m->v_cache)[at + i] = v[g * hd + i];
            }
        }
    }
}

/* Row r's token tokens[r] goes at position positions[r] of cache slot slots[r] (slots NULL:
   slot r) and attends to positions 0..positions[r] of its slot: a decode step is one row per
   slot, a prefill the prompt's rows in one slot (each row's keys and values are stored
   before any row attends, so row p sees rows 0..p: causal). logits: the last `out_rows` rows'
   x vocab float32 (the bfloat16 logits, widened). Returns 0, or -1 when a shape is outside
   what this code takes. */
int decode_step(const decoder *m, int64_t rows, const int64_t *tokens, const int64_t *positions,
                const int64_t *slots, int64_t out_rows, float *logits, int threads) {
    const int64_t D = m->dim, hd = m->head_dim, QD = m->heads * hd, KD = m->kv_heads * hd, F = m->ffn;
    if (hd > 1024 || hd % 2 || m->heads % m->kv_heads || out_rows < 1 || out_rows > rows) return -1;
    int64_t *slot = malloc(sizeof(int64_t) * (size_t)rows);
    for (int64_t r = 0; r < rows; r++) {
        slot[r] = slots ? slots[r] : r;
        if (slot[r] < 0 || slot[r] >= m->slots || positions[r] < 0 || positions[r] >= m->max_len) {
            free(slot);
            return -1;
        }
    }
    uint16_t *x = malloc(2 * (size_t)(rows * (3 * D + 2 * QD + 2 * KD + 2 * F) + out_rows * m->vocab));
    uint16_t *h = x + rows * D, *o = h + rows * D, *q = o + rows * D, *k = q + rows * QD, *v = k + rows * KD;
    uint16_t *att = v + rows * KD, *g = att + rows * QD, *u = g + rows * F, *lg = u + rows * F;
    float *cs = malloc(sizeof(float) * (size_t)(rows * hd * 2)), *sn = cs + rows * hd;
    for (int64_t r = 0; r < rows; r++) {
        if (!m->embed.fmt)
            memcpy(x + r * D, (const uint16_t *)m->embed.w + tokens[r] * D, sizeof(uint16_t) * (size_t)D);
        for (int64_t i = 0; i < hd / 2; i++) { /* positions * inv_freq in float32, cos/sin to bfloat16 */
            const float f = (float)positions[r] * m->inv_freq[i];
            cs[r * hd + i] = cs[r * hd + i + hd / 2] = widen1(round1(cosf(f)));
            sn[r * hd + i] = sn[r * hd + i + hd / 2] = widen1(round1(sinf(f)));
        }
    }
    if (m->embed.fmt) quant_rows(m->embed.w, m->embed.fmt, D, tokens, rows, x);
    for (int64_t l = 0; l < m->layers; l++) {
        const layer_weights *L = m->layer + l;
        bf16_rms_norm(x, L->attn_norm, h, rows, D, m->eps);
        uint16_t *y3[3] = {q, k, v};
        const int64_t n3[3] = {QD, KD, KD};
        project(h, 3, L->m + Q, L->bias[0] ? L->bias : NULL, y3, n3, rows, D, threads);
        for (int64_t r = 0; r < rows; r++) {
            rope(q + r * QD, m->heads, hd, cs + r * hd, sn + r * hd);
            rope(k + r * KD, m->kv_heads, hd, cs + r * hd, sn + r * hd);
            store_kv(m, l, slot[r], positions[r], k + r * KD, v + r * KD);
        }
        const int64_t tasks = rows * m->kv_heads;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t r = t / m->kv_heads;
            attend(m, l, slot[r], t % m->kv_heads, positions[r], q + r * QD, att + r * QD);
        }
        uint16_t *yo[1] = {o};
        const int64_t nd[1] = {D};
        project(att, 1, L->m + O, NULL, yo, nd, rows, QD, threads);
        add_into(x, o, rows * D);
        bf16_rms_norm(x, L->mlp_norm, h, rows, D, m->eps);
        uint16_t *y2[2] = {g, u};
        const int64_t n2[2] = {F, F};
        project(h, 2, L->m + GATE, NULL, y2, n2, rows, D, threads);
#pragma omp parallel for schedule(static) num_threads(rows * F >= 4096 ? threads : 1)
        for (int64_t i = 0; i < rows * F; i++) { /* silu(gate) rounded, times up rounded */
            const float a = widen1(g[i]);
            g[i] = round1(widen1(round1(a / (1.0f + expf(-a)))) * widen1(u[i]));
        }
        project(g, 1, L->m + DOWN, NULL, yo, nd, rows, F, threads);
        add_into(x, o, rows * D);
    }
    const int64_t skip = rows - out_rows; /* rows whose logits nobody asked for */
    bf16_rms_norm(x + skip * D, m->norm, h, out_rows, D, m->eps);
    uint16_t *yl[1] = {lg};
    const int64_t nv[1] = {m->vocab};
    project(h, 1, &m->out, NULL, yl, nv, out_rows, D, threads);
    for (int64_t i = 0; i < out_rows * m->vocab; i++) logits[i] = widen1(lg[i]);
    free(slot);
    free(cs);
    free(x);
    return 0;
}
