/* Row softmax of bf16 scores for brainjepa's chunked CPU attention (see brainjepa/native.py).
 *
 * For each row x of a (rows x n) bf16 matrix: m = max(x), e_j = exp(x_j - m) in fp32,
 * s = sum_j e_j, and out_j = bf16(e_j / s) (one rounding, as PyTorch's own softmax), plus
 * optionally the row's log-sum-exp m + log(s) in fp32. A row whose entries are all -inf
 * (every key masked) gets zeros and a log-sum-exp of -inf; an entry of -inf gets exactly 0.
 *
 * exp is computed as 2^t with t = (x - m) * log2(e): t = k + f with k the nearest integer and
 * |f| <= 1/2, 2^f from a quartic fitted to minimise its largest relative error on [-1/2, 1/2]
 * (below 2.6e-6, far under the 2^-9 of the bf16 result), times 2^k (AVX-512's scalef, or k
 * added to the exponent bits in the portable code).
 *
 * Compiled on the user's machine with -march=native, so the AVX-512 path below is taken where
 * the CPU has it (with AVX512-BF16's rounding conversion where present); elsewhere the plain
 * loops are left to the compiler's vectoriser. Rows are split over `threads` POSIX threads.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LOG2E 1.4426950408889634f
#define SHIFT 12582912.0f /* 1.5 * 2^23 */
#define LOWEST -125.0f    /* 2^t below this is taken as 0 */
#define P0 0.99999926f /* 2^f on [-1/2, 1/2]: minimax (relative error) quartic, error < 2.6e-6 */
#define P1 0.69312181f
#define P2 0.24024745f
#define P3 0.05591786f
#define P4 0.00957010f

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float exp2_nonpositive(float t) { /* 2^t, t <= 0; 0 below LOWEST */
    if (!(t >= LOWEST)) return 0.0f;
    float r = t + SHIFT;
    int32_t k;
    memcpy(&k, &r, 4);
    float f = t - (r - SHIFT);
    float p = P0 + f * (P1 + f * (P2 + f * (P3 + f * P4)));
    int32_t b;
    memcpy(&b, &p, 4);
    b += (int32_t)((uint32_t)k << 23);
    memcpy(&p, &b, 4);
    return p;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define W 16
#define W2 32

static inline __m512 load16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#if !defined(__AVX512BF16__)
static inline __m512i round_bf16(__m512 f) { /* the bf16 in the upper 16 bits, rounded to nearest even */
    __m512i u = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
}
#endif

static inline void store16(uint16_t *p, __m512 f) {
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(f));
#else
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bf16(f), 16)));
#endif
}

/* 32 bf16 entries as two fp32 vectors, the even entries (0, 2, ..., 30) and the odd ones: a shift
 * and a mask, cheaper than widening 16 entries at a time. Softmax's passes do not care about
 * the order; the exponentials are kept in this order and put back in place by store32. */
static inline void load32(const uint16_t *p, __m512 *even, __m512 *odd) {
    __m512i v = _mm512_loadu_si512((const void *)p);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
}

static inline void store32(uint16_t *p, __m512 even, __m512 odd) { /* bf16, entries back in order */
#if defined(__AVX512BF16__)
    static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(odd, even); /* even: words 0-15, odd: 16-31 */
    _mm512_storeu_si512((void *)p, _mm512_permutexvar_epi16(_mm512_loadu_si512((const void *)order), packed));
#else
    __m512i lo = _mm512_srli_epi32(round_bf16(even), 16);
    __m512i hi = _mm512_and_si512(round_bf16(odd), _mm512_set1_epi32((int)0xFFFF0000u));
    _mm512_storeu_si512((void *)p, _mm512_or_si512(lo, hi));
#endif
}

static float row_max(const uint16_t *x, int64_t n) {
    int64_t j = 0;
    __m512 a = _mm512_set1_ps(-INFINITY), b = a, c = a, d = a; /* four chains: max's latency */
    for (; j + 2 * W2 <= n; j += 2 * W2) {
        __m512 e0, o0, e1, o1;
        load32(x + j, &e0, &o0);
        load32(x + j + W2, &e1, &o1);
        a = _mm512_max_ps(a, e0);
        b = _mm512_max_ps(b, o0);
        c = _mm512_max_ps(c, e1);
        d = _mm512_max_ps(d, o1);
    }
    for (; j + W <= n; j += W) a = _mm512_max_ps(a, load16(x + j));
    float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a, b), _mm512_max_ps(c, d)));
    for (; j < n; j++) {
        float v = bf16_to_f32(x[j]);
        m = v > m ? v : m;
    }
    return m;
}

/* 2^t for 16 lanes (t = (x - m) log2(e) <= 0), 0 where t < LOWEST (and for -inf) */
static inline __m512 exp2_16(__m512 t) {
    __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(LOWEST), _CMP_GE_OQ);
    __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, k);
    __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(P4), _mm512_set1_ps(P3));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(P2));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(P1));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(P0));
    return _mm512_maskz_scalef_ps(keep, p, k); /* p * 2^k */
}

/* e = exp(x - m) (each 32 entries stored as their even then their odd entries), returns sum(e) */
static float row_exp(const uint16_t *x, float *e, int64_t n, float m) {
    const __m512 l2e = _mm512_set1_ps(LOG2E), off = _mm512_set1_ps(-m * LOG2E);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + W2 <= n; j += W2) {
        __m512 even, odd;
        load32(x + j, &even, &odd);
        __m512 pe = exp2_16(_mm512_fmadd_ps(even, l2e, off)), po = exp2_16(_mm512_fmadd_ps(odd, l2e, off));
        acc0 = _mm512_add_ps(acc0, pe);
        acc1 = _mm512_add_ps(acc1, po);
        _mm512_storeu_ps(e + j, pe);
        _mm512_storeu_ps(e + j + W, po);
    }
    for (; j + W <= n; j += W) {
        __m512 p = exp2_16(_mm512_fmadd_ps(load16(x + j), l2e, off));
        acc0 = _mm512_add_ps(acc0, p);
        _mm512_storeu_ps(e + j, p);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    for (; j < n; j++) {
        e[j] = exp2_nonpositive(bf16_to_f32(x[j]) * LOG2E - m * LOG2E);
        sum += e[j];
    }
    return sum;
}

static void row_scale(const float *e, uint16_t *y, int64_t n, float scale) { /* e in row_exp's order */
    const __m512 s = _mm512_set1_ps(scale);
    int64_t j = 0;
    for (; j + W2 <= n; j += W2)
        store32(y + j, _mm512_mul_ps(_mm512_loadu_ps(e + j), s), _mm512_mul_ps(_mm512_loadu_ps(e + j + W), s));
    for (; j + W <= n; j += W) store16(y + j, _mm512_mul_ps(_mm512_loadu_ps(e + j), s));
    for (; j < n; j++) y[j] = f32_to_bf16(e[j] * scale);
}

#else /* portable loops for the compiler to vectorise */

static float row_max(const uint16_t *x, int64_t n) {
    float m = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        float v = bf16_to_f32(x[j]);
        m = v > m ? v : m;
    }
    return m;
}

static float row_exp(const uint16_t *x, float *e, int64_t n, float m) {
    float sum = 0.0f, off = -m * LOG2E;
    for (int64_t j = 0; j < n; j++) e[j] = exp2_nonpositive(bf16_to_f32(x[j]) * LOG2E + off);
    for (int64_t j = 0; j < n; j++) sum += e[j];
    return sum;
}

static void row_scale(const float *e, uint16_t *y, int64_t n, float scale) {
    for (int64_t j = 0; j < n; j++) y[j] = f32_to_bf16(e[j] * scale);
}

#endif

typedef struct {
    const uint16_t *x;
    int64_t ldx;
    uint16_t *y;
    int64_t ldy;
    int64_t first, last, n;
    float *lse;
    int status;
} job_t;

static void *run_rows(void *arg) {
    job_t *job = (job_t *)arg;
    float *e = (float *)malloc((size_t)(job->n > 0 ? job->n : 1) * sizeof(float));
    if (!e) {
        job->status = -1;
        return NULL;
    }
    for (int64_t r = job->first; r < job->last; r++) {
        const uint16_t *x = job->x + r * job->ldx;
        uint16_t *y = job->y + r * job->ldy;
        float m = row_max(x, job->n);
        if (m == -INFINITY) { /* no key to attend to (or no keys at all) */
            memset(y, 0, (size_t)job->n * sizeof(uint16_t));
            if (job->lse) job->lse[r] = -INFINITY;
            continue;
        }
        float sum = row_exp(x, e, job->n, m);
        row_scale(e, y, job->n, 1.0f / sum);
        if (job->lse) job->lse[r] = m + logf(sum);
    }
    free(e);
    job->status = 0;
    return NULL;
}

/* softmax over the rows of x (rows x n, row stride ldx) into y (row stride ldy; y may be x),
 * lse (rows floats) or NULL. Returns 0, or -1 when memory or threads could not be had. */
int brainjepa_softmax_bf16(const uint16_t *x, int64_t ldx, uint16_t *y, int64_t ldy, int64_t rows, int64_t n,
                           float *lse, int threads) {
    enum { MAX_THREADS = 256 };
    job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = (int)rows;
    if (threads < 1) threads = 1;
    for (int t = 0; t < threads; t++) {
        job_t job = {x, ldx, y, ldy, rows * t / threads, rows * (t + 1) / threads, n, lse, -1};
        jobs[t] = job;
    }
    int started = 0;
    for (int t = 1; t < threads; t++, started++)
        if (pthread_create(&ids[t], NULL, run_rows, &jobs[t]) != 0) break;
    for (int t = started + 1; t < threads; t++) run_rows(&jobs[t]); /* threads that could not start */
    run_rows(&jobs[0]);
    for (int t = 1; t <= started; t++) pthread_join(ids[t], NULL);
    int status = 0;
    for (int t = 0; t < threads; t++) status |= jobs[t].status;
    return status;
}
