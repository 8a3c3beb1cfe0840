/* Single-token decode kernels for CPUs: bf16 weights and caches, fp32 arithmetic.
 *
 * Decoding one token reads every weight and the whole KV cache once, so its speed is set by
 * memory bandwidth -- if the kernels keep up with it. PyTorch's bf16 matrix-vector products do
 * not on CPUs without a native bf16 dot product (AVX2): they convert and multiply at about a
 * third of the read bandwidth. These kernels read each bf16 element once, widen it to fp32 in
 * registers (a 16-bit shift) and accumulate in fp32:
 *
 *   hc_gemv_bf16, hc_swiglu_bf16, hc_rmsnorm_bf16    linear layers, SwiGLU, RMSNorm (few rows)
 *   hc_attn_decode    one query per sequence against every cached position, grouped-query
 *                     heads, the cache in its ordinary layout (head dim contiguous)
 *   hc_attn_step      RoPE, cache write and hc_attn_decode
 *   hc_ssm_step       Mamba-2's step after its input projection
 *   hc_block_*        x + mixer(RMSNorm(x)) for attention, the MLP and Mamba-2, one call
 *
 * Built on first use by hcomposer/primitives/cpu_kernels.py with the system C compiler
 * (-O3 -march=native, OpenMP when available) and called through ctypes; without a compiler
 * hcomposer keeps the PyTorch paths. Linear layers, norms and the SSM step round where the
 * PyTorch paths round (results differ only by fp32 summation order); attention keeps q, the
 * scores and the weights in fp32 where PyTorch's decode path rounds them to bf16, so it is
 * closer to an fp64 reference than that path. A NaN anywhere in a row propagates to its output.
 * Every entry point checks its shapes before writing anything and returns 1 if it does not
 * take them (0 on success).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HC_AVX2 1
#endif

int hc_attn_decode(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                   int64_t B, int64_t H, int64_t Hkv, int64_t hd, int64_t L,
                   int64_t ksb, int64_t ksh, int64_t ksj, int64_t vsb, int64_t vsh, int64_t vsj,
                   float scale, float *work, int threads);

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#ifdef HC_AVX2
static inline __m256 load8_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp for x <= 0 (softmax after subtracting the maximum): 2^n * p(r), x = n ln2 + r,
 * |r| <= ln2 / 2, p a degree-6 polynomial (relative error about 2e-7); below -87 it is 0. */
static inline __m256 exp8_nonpos(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, x); /* max(lo, NaN) is NaN: a NaN score stays NaN */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, y);
}
#endif

/* Dot product of n bf16 values with n fp32 values. */
static inline float dot_bf16_f32(const uint16_t *a, const float *x, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#ifdef HC_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(load8_bf16(a + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(load8_bf16(a + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(load8_bf16(a + i), _mm256_loadu_ps(x + i), acc0);
    s = hsum8(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += bf16_to_f32(a[i]) * x[i];
    return s;
}

/* y[m, n] = sum_k W[n, k] x[m, k] (+ b[n]): W bf16 [N, K] with row stride ldw, x bf16 [M, K]
 * contiguous, y bf16 [M, N] contiguous, b bf16 [N] or NULL. M * K <= 65536 (decoding). */
int hc_gemv_bf16(const uint16_t *W, int64_t ldw, const uint16_t *x, const uint16_t *b,
                 uint16_t *y, int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 1 || N < 1 || K < 1 || M * K > 8 * 8192) return 1;
    float *xf = malloc(sizeof(float) * (size_t)(M * K));
    if (!xf) return 1;
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(x[i]);
    const int64_t block = 16;
    const int64_t nblocks = (N + block - 1) / block;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N * K > 65536)
    for (int64_t bi = 0; bi < nblocks; bi++) {
        const int64_t n0 = bi * block, n1 = n0 + block < N ? n0 + block : N;
        int64_t n = n0;
#ifdef HC_AVX2
        if (K % 8 == 0)
            for (; n + 4 <= n1; n += 4) {
                const uint16_t *r0 = W + n * ldw, *r1 = r0 + ldw, *r2 = r1 + ldw, *r3 = r2 + ldw;
                for (int64_t c = 0; c < 4 * K; c += 32) /* rows 16 ahead: the next block */
                    if (n + 16 < N) _mm_prefetch((const char *)(r0 + 16 * ldw + c), _MM_HINT_T0);
                for (int64_t m = 0; m < M; m++) {
                    const float *xm = xf + m * K;
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    for (int64_t k = 0; k < K; k += 8) {
                        const __m256 xv = _mm256_loadu_ps(xm + k);
                        a0 = _mm256_fmadd_ps(load8_bf16(r0 + k), xv, a0);
                        a1 = _mm256_fmadd_ps(load8_bf16(r1 + k), xv, a1);
                        a2 = _mm256_fmadd_ps(load8_bf16(r2 + k), xv, a2);
                        a3 = _mm256_fmadd_ps(load8_bf16(r3 + k), xv, a3);
                    }
                    y[m * N + n] = f32_to_bf16(hsum8(a0) + (b ? bf16_to_f32(b[n]) : 0.0f));
                    y[m * N + n + 1] = f32_to_bf16(hsum8(a1) + (b ? bf16_to_f32(b[n + 1]) : 0.0f));
                    y[m * N + n + 2] = f32_to_bf16(hsum8(a2) + (b ? bf16_to_f32(b[n + 2]) : 0.0f));
                    y[m * N + n + 3] = f32_to_bf16(hsum8(a3) + (b ? bf16_to_f32(b[n + 3]) : 0.0f));
                }
            }
#endif
        for (; n < n1; n++) {
            const uint16_t *row = W + n * ldw;
            const float bias = b ? bf16_to_f32(b[n]) : 0.0f;
            for (int64_t m = 0; m < M; m++)
                y[m * N + n] = f32_to_bf16(dot_bf16_f32(row, xf + m * K, K) + bias);
        }
    }
    free(xf);
    return 0;
}

#ifdef HC_AVX2
/* s[i] = q[i] . row for the g heads of a group, row bf16 [8 * nc], q fp32 [g, 8 * nc]. */
static inline __attribute__((always_inline)) void scores_row(const uint16_t *row, const float *q,
                                                             float *s, int64_t L, int64_t g,
                                                             const int nc) {
    __m256 k[32];
    for (int c = 0; c < nc; c++) k[c] = load8_bf16(row + 8 * c);
    for (int64_t i = 0; i < g; i++) {
        const float *qi = q + i * 8 * nc;
        __m256 a0 = _mm256_mul_ps(k[0], _mm256_loadu_ps(qi));
        __m256 a1 = _mm256_setzero_ps();
        for (int c = 1; c < nc; c += 2) {
            a1 = _mm256_fmadd_ps(k[c], _mm256_loadu_ps(qi + 8 * c), a1);
            if (c + 1 < nc) a0 = _mm256_fmadd_ps(k[c + 1], _mm256_loadu_ps(qi + 8 * c + 8), a0);
        }
        s[i * L] = hsum8(_mm256_add_ps(a0, a1));
    }
}

/* acc[8 * nc] += sum over the n positions of p[j] * V[j], V bf16 rows of stride vsj. */
static inline __attribute__((always_inline)) void values_tile(const uint16_t *V, int64_t vsj,
                                                              const float *p, int64_t n,
                                                              float *acc, const int nc) {
    __m256 a[32];
    for (int c = 0; c < nc; c++) a[c] = _mm256_loadu_ps(acc + 8 * c);
    for (int64_t j = 0; j < n; j++) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const uint16_t *row = V + j * vsj;
        for (int c = 0; c < nc; c++) a[c] = _mm256_fmadd_ps(load8_bf16(row + 8 * c), pj, a[c]);
    }
    for (int c = 0; c < nc; c++) _mm256_storeu_ps(acc + 8 * c, a[c]);
}
#endif

/* The attention shapes the kernels take: 1..16 query heads per KV head, head dim 1..256. */
static int attn_shape_ok(int64_t H, int64_t Hkv, int64_t hd) {
    return Hkv >= 1 && H >= Hkv && H % Hkv == 0 && H / Hkv <= 16 && hd >= 1 && hd <= 256;
}

/* softmax(q k^T * scale) v for one query per (sequence, head), every one of L keys visible.
 *
 * q bf16 [B, H, hd] contiguous; out bf16 [B, H, hd] contiguous. Keys and values are bf16
 * with the head dimension contiguous: element (b, kv head h, position j, dim d) at
 * base[b * sb + h * sh + j * sj + d] -- the ordinary [B, Hkv, max_len, hd] cache, read as
 * one sequential stream per head. Query head h reads kv head h / (H / Hkv); each key and value
 * is read once for its whole group. The scores and weights stay fp32 (work: fp32
 * [B * Hkv, H / Hkv, L], scratch). Returns 1 (and does nothing) for shapes it does not take. */
int hc_attn_decode(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                   int64_t B, int64_t H, int64_t Hkv, int64_t hd, int64_t L,
                   int64_t ksb, int64_t ksh, int64_t ksj, int64_t vsb, int64_t vsh, int64_t vsj,
                   float scale, float *work, int threads) {
    if (!attn_shape_ok(H, Hkv, hd) || B < 1 || L < 1) return 1;
    const int64_t g = H / Hkv;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t bh = 0; bh < B * Hkv; bh++) {
        const int64_t b = bh / Hkv, h = bh % Hkv;
        const uint16_t *K = k + b * ksb + h * ksh;
        const uint16_t *V = v + b * vsb + h * vsh;
        float *s = work + bh * g * L; /* [g, L] */
        float qf[16 * 256], acc[16 * 256];
        for (int64_t i = 0; i < g; i++)
            for (int64_t d = 0; d < hd; d++) {
                qf[i * hd + d] = bf16_to_f32(q[(b * H + h * g + i) * hd + d]) * scale;
                acc[i * hd + d] = 0.0f;
            }
        const int nc = (int)(hd / 8);
        const int vec = hd % 8 == 0; /* nc = 1..32; the common ones unrolled below */
        /* Scores: one pass over the keys. */
        for (int64_t j = 0; j < L; j++) {
            const uint16_t *row = K + j * ksj;
#ifdef HC_AVX2
            if (vec) {
                /* The hardware prefetcher alone leaves this loop at about half the read
                 * bandwidth: ask for the keys 256 positions ahead (measured best of 8-512). */
                if (j + 256 < L) _mm_prefetch((const char *)(row + 256 * ksj), _MM_HINT_T0);
                switch (nc) {
                case 2: scores_row(row, qf, s + j, L, g, 2); break;
                case 4: scores_row(row, qf, s + j, L, g, 4); break;
                case 8: scores_row(row, qf, s + j, L, g, 8); break;
                case 16: scores_row(row, qf, s + j, L, g, 16); break;
                default: scores_row(row, qf, s + j, L, g, nc); break;
                }
                continue;
            }
#endif
            for (int64_t i = 0; i < g; i++) {
                float a = 0.0f;
                for (int64_t d = 0; d < hd; d++) a += bf16_to_f32(row[d]) * qf[i * hd + d];
                s[i * L + j] = a;
            }
        }
        /* Softmax over positions, per head, in fp32. */
        for (int64_t i = 0; i < g; i++) {
            float *si = s + i * L;
            float mx = -INFINITY, sum = 0.0f;
            int64_t j = 0;
#ifdef HC_AVX2
            __m256 mv = _mm256_set1_ps(-INFINITY);
            for (; j + 8 <= L; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(si + j));
            mx = hmax8(mv);
#endif
            for (; j < L; j++) mx = si[j] > mx ? si[j] : mx;
            j = 0;
#ifdef HC_AVX2
            const __m256 mxv = _mm256_set1_ps(mx);
            __m256 tot = _mm256_setzero_ps();
            for (; j + 8 <= L; j += 8) {
                __m256 e = exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(si + j), mxv));
                _mm256_storeu_ps(si + j, e);
                tot = _mm256_add_ps(tot, e);
            }
            sum = hsum8(tot);
#endif
            for (; j < L; j++) {
                si[j] = expf(si[j] - mx);
                sum += si[j];
            }
            const float inv = 1.0f / sum;
            j = 0;
#ifdef HC_AVX2
            const __m256 iv = _mm256_set1_ps(inv);
            for (; j + 8 <= L; j += 8)
                _mm256_storeu_ps(si + j, _mm256_mul_ps(_mm256_loadu_ps(si + j), iv));
#endif
            for (; j < L; j++) si[j] *= inv;
        }
        /* Values: a tile of positions at a time (it stays in L1 while every head of the
         * group reads it), one pass over the values from memory. */
        const int64_t tile = 64;
        for (int64_t j0 = 0; j0 < L; j0 += tile) {
            const int64_t n = j0 + tile < L ? tile : L - j0;
#ifdef HC_AVX2
            if (j0 + 256 + tile <= L) /* the values 256 positions ahead, as for the keys */
                for (int64_t j = 0; j < tile; j++)
                    for (int64_t c = 0; c < hd; c += 32)
                        _mm_prefetch((const char *)(V + (j0 + 256 + j) * vsj + c), _MM_HINT_T0);
#endif
            for (int64_t i = 0; i < g; i++) {
                float *ai = acc + i * hd;
                const float *pi = s + i * L + j0;
#ifdef HC_AVX2
                if (vec) {
                    switch (nc) {
                    case 2: values_tile(V + j0 * vsj, vsj, pi, n, ai, 2); break;
                    case 4: values_tile(V + j0 * vsj, vsj, pi, n, ai, 4); break;
                    case 8: values_tile(V + j0 * vsj, vsj, pi, n, ai, 8); break;
                    case 16: values_tile(V + j0 * vsj, vsj, pi, n, ai, 16); break;
                    default: values_tile(V + j0 * vsj, vsj, pi, n, ai, nc); break;
                    }
                    continue;
                }
#endif
                for (int64_t j = 0; j < n; j++) {
                    const uint16_t *row = V + (j0 + j) * vsj;
                    for (int64_t d = 0; d < hd; d++) ai[d] += pi[j] * bf16_to_f32(row[d]);
                }
            }
        }
        for (int64_t i = 0; i < g; i++)
            for (int64_t d = 0; d < hd; d++)
                out[(b * H + h * g + i) * hd + d] = f32_to_bf16(acc[i * hd + d]);
    }
    return 0;
}

/* RMSNorm of each of the rows of x (bf16 [rows, dim]) times w (bf16 [dim]), in fp32, rounded
 * to bf16 once: (x * rsqrt(mean(x^2) + eps) * w), as hcomposer's RMSNorm. */
int hc_rmsnorm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows,
                    int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        float ss = 0.0f;
        for (int64_t i = 0; i < dim; i++) {
            const float v = bf16_to_f32(xr[i]);
            ss += v * v;
        }
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++)
            out[r * dim + i] = f32_to_bf16(bf16_to_f32(xr[i]) * inv * bf16_to_f32(w[i]));
    }
    return 0;
}

/* y[m, n] = silu(g) * u with g = Wg x, u = Wu x (SwiGLU's first half), rounded as PyTorch's
 * bf16 path rounds: g and u to bf16, silu(g) to bf16, the product to bf16. */
int hc_swiglu_bf16(const uint16_t *Wg, const uint16_t *Wu, int64_t ldw, const uint16_t *x,
                   uint16_t *y, int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 1 || N < 1 || K < 1 || M * K > 8 * 8192) return 1;
    float *xf = malloc(sizeof(float) * (size_t)(M * K));
    if (!xf) return 1;
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(x[i]);
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N * K > 65536)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            const float g = bf16_to_f32(f32_to_bf16(dot_bf16_f32(Wg + n * ldw, xf + m * K, K)));
            const float u = bf16_to_f32(f32_to_bf16(dot_bf16_f32(Wu + n * ldw, xf + m * K, K)));
            const float sg = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g))));
            y[m * N + n] = f32_to_bf16(sg * u);
        }
    free(xf);
    return 0;
}

/* Rotary embedding of one head vector at position pos, in place in fp32 (half-split pairs:
 * i and i + hd/2), angles pos * inv_freq[i] in fp32, as apply_rope computes them. */
static void rope_f32(float *x, int64_t hd, float pos, const float *inv_freq) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = pos * inv_freq[i];
        const float c = cosf(a), s = sinf(a);
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

/* One decode step of global attention: rotate q [B, H, hd] and k [B, Hkv, hd] (bf16,
 * contiguous: the projections' outputs) to position pos, write k and v [B, Hkv, hd] into the
 * cache at pos (bf16, element (b, h, j, d) at base[b*sb + h*sh + j*sj + d]), and attend over
 * the pos + 1 cached positions (hc_attn_decode). out: bf16 [B, H, hd]. qr: bf16 scratch
 * [B, H, hd] for the rotated queries. */
int hc_attn_step(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *kc,
                 uint16_t *vc, uint16_t *out, uint16_t *qr, int64_t B, int64_t H, int64_t Hkv,
                 int64_t hd, int64_t pos, const float *inv_freq, int64_t ksb, int64_t ksh,
                 int64_t ksj, int64_t vsb, int64_t vsh, int64_t vsj, float scale, float *work,
                 int threads) {
    float t[256];
    if (!attn_shape_ok(H, Hkv, hd) || hd % 2 || B < 1 || pos < 0) return 1;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            const uint16_t *src = q + (b * H + h) * hd;
            for (int64_t d = 0; d < hd; d++) t[d] = bf16_to_f32(src[d]);
            rope_f32(t, hd, (float)pos, inv_freq);
            for (int64_t d = 0; d < hd; d++) qr[(b * H + h) * hd + d] = f32_to_bf16(t[d]);
        }
        for (int64_t h = 0; h < Hkv; h++) {
            const uint16_t *src = k + (b * Hkv + h) * hd;
            for (int64_t d = 0; d < hd; d++) t[d] = bf16_to_f32(src[d]);
            rope_f32(t, hd, (float)pos, inv_freq);
            uint16_t *kd = kc + b * ksb + h * ksh + pos * ksj;
            uint16_t *vd = vc + b * vsb + h * vsh + pos * vsj;
            for (int64_t d = 0; d < hd; d++) {
                kd[d] = f32_to_bf16(t[d]);
                vd[d] = v[(b * Hkv + h) * hd + d];
            }
        }
    }
    return hc_attn_decode(qr, kc, vc, out, B, H, Hkv, hd, pos + 1, ksb, ksh, ksj, vsb, vsh, vsj,
                          scale, work, threads);
}

/* One decode step of Mamba-2 (the S primitive) after its input projection, as
 * Mamba2._decode_step computes it in fp32: the depthwise causal conv over the cached inputs
 * and the new one (conv_state updated in place), SiLU, dt = softplus(dt + dt_bias), the SSM
 * state update with decay exp(-dt exp(A_log)) and input dt x B, y = state C + D x, and the
 * gated RMSNorm (y * silu(z), per group of gsize channels, times its weight), rounded to bf16.
 *
 * zxbcdt bf16 [B, inner + conv_dim + H] (row stride zs); conv_state bf16 [B, conv_dim,
 * dconv - 1]; conv_w bf16 [conv_dim, dconv]; conv_b, dt_bias, A_log, D bf16 [.]; norm_w bf16
 * [inner]; ssm fp32 [B, H, P, N] (updated in place); out bf16 [B, inner]. */
int hc_ssm_step(const uint16_t *zxbcdt, int64_t zs, uint16_t *conv_state, const uint16_t *conv_w,
                const uint16_t *conv_b, const uint16_t *dt_bias, const uint16_t *A_log,
                const uint16_t *Dp, const uint16_t *norm_w, float *ssm, uint16_t *out,
                int64_t B, int64_t H, int64_t P, int64_t G, int64_t N, int64_t dconv,
                int64_t gsize, float eps) {
    if (B < 1 || H < 1 || P < 1 || G < 1 || N < 1 || gsize < 1 || H % G || dconv < 1 ||
        dconv > 16 || (H * P) % gsize || H * P + 2 * G * N > 65536 || zs < H * P + H * P + 2 * G * N + H)
        return 1;
    const int64_t inner = H * P, conv_dim = inner + 2 * G * N, hpg = H / G;
    float xbc[65536];
    for (int64_t b = 0; b < B; b++) {
        const uint16_t *row = zxbcdt + b * zs;
        const uint16_t *z = row, *xin = row + inner, *dtr = row + inner + conv_dim;
        uint16_t *cs = conv_state + b * conv_dim * (dconv - 1);
        for (int64_t c = 0; c < conv_dim; c++) {
            uint16_t *st = cs + c * (dconv - 1);
            const uint16_t *w = conv_w + c * dconv;
            float acc = 0.0f;
            for (int64_t t = 0; t < dconv - 1; t++) acc += bf16_to_f32(st[t]) * bf16_to_f32(w[t]);
            acc += bf16_to_f32(xin[c]) * bf16_to_f32(w[dconv - 1]);
            for (int64_t t = 0; t + 1 < dconv - 1; t++) st[t] = st[t + 1];
            if (dconv > 1) st[dconv - 2] = xin[c];
            acc += bf16_to_f32(conv_b[c]);
            xbc[c] = acc / (1.0f + expf(-acc));
        }
        const float *x = xbc, *Bm = xbc + inner, *Cm = xbc + inner + G * N;
        float *y = xbc; /* y[h, p] overwrites x[h, p] once it has been used */
        for (int64_t h = 0; h < H; h++) {
            const float d0 = bf16_to_f32(dtr[h]) + bf16_to_f32(dt_bias[h]);
            const float dt = d0 > 20.0f ? d0 : log1pf(expf(d0));
            const float decay = expf(dt * -expf(bf16_to_f32(A_log[h])));
            const float Dh = bf16_to_f32(Dp[h]);
            const float *Bg = Bm + (h / hpg) * N, *Cg = Cm + (h / hpg) * N;
            float *S = ssm + (b * H + h) * P * N;
            for (int64_t p = 0; p < P; p++) {
                const float dx = dt * x[h * P + p];
                float *Sp = S + p * N;
                float acc = 0.0f;
                int64_t n = 0;
#ifdef HC_AVX2
                const __m256 dv = _mm256_set1_ps(decay), xv = _mm256_set1_ps(dx);
                __m256 av = _mm256_setzero_ps();
                for (; n + 8 <= N; n += 8) {
                    __m256 sv = _mm256_mul_ps(_mm256_loadu_ps(Sp + n), dv);
                    sv = _mm256_add_ps(sv, _mm256_mul_ps(xv, _mm256_loadu_ps(Bg + n)));
                    _mm256_storeu_ps(Sp + n, sv);
                    av = _mm256_fmadd_ps(sv, _mm256_loadu_ps(Cg + n), av);
                }
                acc = hsum8(av);
#endif
                for (; n < N; n++) {
                    const float sv = Sp[n] * decay + dx * Bg[n];
                    Sp[n] = sv;
                    acc += sv * Cg[n];
                }
                y[h * P + p] = acc + x[h * P + p] * Dh;
            }
        }
        for (int64_t g0 = 0; g0 < inner; g0 += gsize) {
            float ss = 0.0f;
            for (int64_t i = g0; i < g0 + gsize; i++) {
                const float zz = bf16_to_f32(z[i]);
                y[i] = y[i] * (zz / (1.0f + expf(-zz)));
                ss += y[i] * y[i];
            }
            const float inv = 1.0f / sqrtf(ss / (float)gsize + eps);
            for (int64_t i = g0; i < g0 + gsize; i++)
                out[b * inner + i] = f32_to_bf16(y[i] * inv * bf16_to_f32(norm_w[i]));
        }
    }
    return 0;
}

/* Whole decode blocks, x + mixer(RMSNorm(x)), in one call: the same kernels as above chained
 * through bf16 buffers, so the roundings are those of the per-operation path (and of
 * PyTorch's): the norm, every projection and the residual sum each rounded to bf16 once.
 * x, out bf16 [M, d] (may not alias). Return 1 (nothing written) for shapes they do not take. */

static void residual(const uint16_t *x, const uint16_t *y, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(y[i]));
}

/* Scratch for a block: n bf16 elements on the heap (sized to the call, so the caller's stack
 * stays small); NULL if n is out of range. */
static uint16_t *scratch(int64_t n) {
    return (n < 1 || n > 64 * 65536) ? NULL : malloc(sizeof(uint16_t) * (size_t)n);
}

#define ROWS_OK(M, n) ((M) >= 1 && (n) >= 1 && (M) * (n) <= 8 * 8192)

/* SwiGLU MLP: down(silu(gate h) * up h), h = RMSNorm(x). */
int hc_block_mlp(const uint16_t *x, uint16_t *out, int64_t M, int64_t d, const uint16_t *norm_w,
                 float eps, const uint16_t *Wg, const uint16_t *Wu, int64_t ldgu, int64_t hidden,
                 const uint16_t *Wd, int64_t ldd, int threads) {
    if (!ROWS_OK(M, d) || !ROWS_OK(M, hidden) || ldgu < d || ldd < hidden) return 1;
    uint16_t *buf = scratch(M * (2 * d + hidden));
    if (!buf) return 1;
    uint16_t *h = buf, *y = buf + M * d, *a = buf + 2 * M * d;
    hc_rmsnorm_bf16(x, norm_w, h, M, d, eps);
    int rc = hc_swiglu_bf16(Wg, Wu, ldgu, h, a, M, hidden, d, threads);
    if (!rc) rc = hc_gemv_bf16(Wd, ldd, a, NULL, y, M, d, hidden, threads);
    if (!rc) residual(x, y, out, M * d);
    free(buf);
    return rc;
}

/* Mamba-2: out_proj(step(in_proj h)), h = RMSNorm(x); the step as hc_ssm_step (conv and SSM
 * state updated in place). Every shape is checked before the state is touched. */
int hc_block_ssm(const uint16_t *x, uint16_t *out, int64_t M, int64_t d, const uint16_t *norm_w,
                 float eps, const uint16_t *W_in, int64_t ldin, int64_t n_in,
                 const uint16_t *W_out, int64_t ldout, uint16_t *conv_state,
                 const uint16_t *conv_w, const uint16_t *conv_b, const uint16_t *dt_bias,
                 const uint16_t *A_log, const uint16_t *Dp, const uint16_t *gnorm_w, float *ssm,
                 int64_t H, int64_t P, int64_t G, int64_t N, int64_t dconv, int64_t gsize,
                 float geps, int threads) {
    if (H < 1 || P < 1 || G < 1 || N < 1 || gsize < 1 || H % G || (H * P) % gsize ||
        dconv < 1 || dconv > 16 || n_in != 2 * H * P + 2 * G * N + H ||
        H * P + 2 * G * N > 65536 || !ROWS_OK(M, d) || !ROWS_OK(M, n_in) ||
        !ROWS_OK(M, H * P) || ldin < d || ldout < H * P)
        return 1;
    uint16_t *buf = scratch(M * (2 * d + n_in + H * P));
    if (!buf) return 1;
    uint16_t *h = buf, *y = buf + M * d, *z = buf + 2 * M * d, *s = z + M * n_in;
    hc_rmsnorm_bf16(x, norm_w, h, M, d, eps);
    int rc = hc_gemv_bf16(W_in, ldin, h, NULL, z, M, n_in, d, threads);
    if (!rc)
        rc = hc_ssm_step(z, n_in, conv_state, conv_w, conv_b, dt_bias, A_log, Dp, gnorm_w, ssm,
                         s, M, H, P, G, N, dconv, gsize, geps);
    if (!rc) rc = hc_gemv_bf16(W_out, ldout, s, NULL, y, M, d, H * P, threads);
    if (!rc) residual(x, y, out, M * d);
    free(buf);
    return rc;
}

/* Global attention: o_proj(attn_step(q_proj h, k_proj h, v_proj h)), h = RMSNorm(x), the new
 * key and value written into the caches at pos. Every shape is checked before the caches are
 * touched. */
int hc_block_attn(const uint16_t *x, uint16_t *out, int64_t M, int64_t d, const uint16_t *norm_w,
                  float eps, const uint16_t *Wq, const uint16_t *Wk, const uint16_t *Wv,
                  const uint16_t *Wo, int64_t ldq, int64_t ldk, int64_t ldv, int64_t ldo,
                  int64_t H, int64_t Hkv, int64_t hd, uint16_t *kc, uint16_t *vc, int64_t pos,
                  const float *inv_freq, int64_t ksb, int64_t ksh, int64_t ksj, int64_t vsb,
                  int64_t vsh, int64_t vsj, float *work, int threads) {
    if (!attn_shape_ok(H, Hkv, hd) || hd % 2 || pos < 0 || !ROWS_OK(M, d) ||
        !ROWS_OK(M, H * hd) || ldq < d || ldk < d || ldv < d || ldo < H * hd)
        return 1;
    uint16_t *buf = scratch(M * (2 * d + 3 * H * hd + 2 * Hkv * hd));
    if (!buf) return 1;
    uint16_t *h = buf, *y = buf + M * d, *q = buf + 2 * M * d, *o = q + M * H * hd;
    uint16_t *qr = o + M * H * hd, *k = qr + M * H * hd, *v = k + M * Hkv * hd;
    hc_rmsnorm_bf16(x, norm_w, h, M, d, eps);
    int rc = hc_gemv_bf16(Wq, ldq, h, NULL, q, M, H * hd, d, threads);
    if (!rc) rc = hc_gemv_bf16(Wk, ldk, h, NULL, k, M, Hkv * hd, d, threads);
    if (!rc) rc = hc_gemv_bf16(Wv, ldv, h, NULL, v, M, Hkv * hd, d, threads);
    if (!rc)
        rc = hc_attn_step(q, k, v, kc, vc, o, qr, M, H, Hkv, hd, pos, inv_freq, ksb, ksh, ksj,
                          vsb, vsh, vsj, 1.0f / sqrtf((float)hd), work, threads);
    if (!rc) rc = hc_gemv_bf16(Wo, ldo, o, NULL, y, M, d, H * hd, threads);
    if (!rc) residual(x, y, out, M * d);
    free(buf);
    return rc;
}

/* The number of OpenMP threads this library would use, or 0 when built without OpenMP. */
int hc_openmp(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 0;
#endif
}
