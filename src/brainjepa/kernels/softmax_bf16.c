/* Row softmax of bf16 scores for brainjepa's chunked CPU attention (see brainjepa/native.py).
 *
 * For each row x of a (rows x n) bf16 matrix: m = max(x), e_j = exp(x_j - m) in fp32,
 * s = sum_j e_j, and out_j = bf16(e_j / s) (one rounding, as PyTorch's own softmax), plus
 * optionally the row's log-sum-exp m + log(s) in fp32. A row whose entries are all -inf
 * (every key masked) gets zeros and a log-sum-exp of -inf; an entry of -inf gets exactly 0.
 *
 * exp is computed as 2^t with t = (x - m) * log2(e): t = k + f with k an integer (rounded by
 * the 1.5 * 2^23 shift) and |f| <= 1/2, 2^f from its Taylor polynomial of degree 4 (relative
 * error below 6e-5, far under the 2^-9 of the bf16 result), and 2^k added to the exponent bits.
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
#define C1 0.6931471805599453f
#define C2 0.2402265069591007f
#define C3 0.05550410866482158f
#define C4 0.009618129107628477f

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
    float p = 1.0f + f * (C1 + f * (C2 + f * (C3 + f * C4)));
    int32_t b;
    memcpy(&b, &p, 4);
    b += (int32_t)((uint32_t)k << 23);
    memcpy(&p, &b, 4);
    return p;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define W 16

static inline __m512 load16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void store16(uint16_t *p, __m512 f) {
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(f));
#else
    __m512i u = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(u));
#endif
}

static float row_max(const uint16_t *x, int64_t n) {
    int64_t j = 0;
    float m = -INFINITY;
    if (n >= 4 * W) { /* four accumulators: the max's latency, not its throughput, would bound one */
        __m512 a = load16(x), b = load16(x + W), c = load16(x + 2 * W), d = load16(x + 3 * W);
        for (j = 4 * W; j + 4 * W <= n; j += 4 * W) {
            a = _mm512_max_ps(a, load16(x + j));
            b = _mm512_max_ps(b, load16(x + j + W));
            c = _mm512_max_ps(c, load16(x + j + 2 * W));
            d = _mm512_max_ps(d, load16(x + j + 3 * W));
        }
        m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a, b), _mm512_max_ps(c, d)));
    }
    for (; j < n; j++) {
        float v = bf16_to_f32(x[j]);
        m = v > m ? v : m;
    }
    return m;
}

static float row_exp(const uint16_t *x, float *e, int64_t n, float m) {
    const __m512 l2e = _mm512_set1_ps(LOG2E), off = _mm512_set1_ps(-m * LOG2E);
    const __m512 lowest = _mm512_set1_ps(LOWEST), shift = _mm512_set1_ps(SHIFT);
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + W <= n; j += W) {
        __m512 t = _mm512_fmadd_ps(load16(x + j), l2e, off);
        __mmask16 keep = _mm512_cmp_ps_mask(t, lowest, _CMP_GE_OQ);
        __m512 r = _mm512_add_ps(t, shift);
        __m512i k = _mm512_slli_epi32(_mm512_castps_si512(r), 23);
        __m512 f = _mm512_sub_ps(t, _mm512_sub_ps(r, shift));
        __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(C4), _mm512_set1_ps(C3));
        p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(C2));
        p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(C1));
        p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0f));
        p = _mm512_maskz_mov_ps(keep, _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), k)));
        acc = _mm512_add_ps(acc, p);
        _mm512_storeu_ps(e + j, p);
    }
    float sum = _mm512_reduce_add_ps(acc);
    for (; j < n; j++) {
        e[j] = exp2_nonpositive(bf16_to_f32(x[j]) * LOG2E - m * LOG2E);
        sum += e[j];
    }
    return sum;
}

static void row_scale(const float *e, uint16_t *y, int64_t n, float scale) {
    const __m512 s = _mm512_set1_ps(scale);
    int64_t j = 0;
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
