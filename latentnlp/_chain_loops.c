/* The time loops of the scaled forward-backward algorithm (latentnlp.chain), compiled.
 *
 * For a chain whose every step multiplies by the same transition, on the CPU, in float32 or float64:
 * one dense matrix P [K, K] (shared) or P [B, K, K] (one per chain), or the Kronecker product of L
 * such factors P^l [k, k] | [B, k, k] over S = k^L joint states (a factorial HMM's L chains, applied
 * one axis of the joint state at a time, the S x S matrix never built).  Each step is a few small
 * products, so a numpy or torch call costs more than a step's arithmetic; here a step costs its
 * arithmetic.  The buffers are C-contiguous, time-major (but the scores), and written in place:
 *
 *   forward:  m_t = max_j emit_t(j),  e_t = exp(emit_t - m_t)  (from the scores emit [B, T, S]),
 *             a_t = (alpha_{t-1} P) * e_t,  c_t = sum_j a_t(j),  alpha_t = a_t / c_t,
 *             w_t = e_t / c_t (the backward's weights)                                  (t = 0 .. T-1)
 *             log_z = sum_t log c_t + sum_t m_t,  flagged[b] = 1 where some c_t is below
 *             max(tiny / eps, S tiny / min P) (underflow, or a rounded-away mass that may matter later:
 *             latentnlp.chain.normaliser_floor; NaN is not below); alpha, c, w, m stored, or (no gradient to take) the
 *             filter kept in two rolling rows
 *   backward: u_t = w_t * beta_t,  beta_{t-1} = P u_t                                  (t = T-1 .. 1)
 *
 * with alpha, e, u, w [T, B, S] time-major and c, m [T, B].  A padding step (padding[b, t], checked for
 * t >= all_valid_until only) keeps the previous alpha with c_t = 1, and sets u_t = 0 with
 * beta_{t-1} = beta_t.  The backward takes the transposed matrices (contiguous), so both loops
 * run over rows of contiguous matrices; it holds beta_t in two rolling rows, writes the marginals
 * gamma_t = alpha_t * beta_t batch-major ([B, T, S]: the gradient of log Z w.r.t. the emission scores,
 * in the caller's layout) as each beta_t is final, and says whether the sum of gamma and u is finite
 * (inf and NaN propagate: the overflow check of the gradient, latentnlp.chain._smoother_gradients,
 * for free).  The GIL is
 * released while a loop runs, and the rows of the batch, independent, can be shared among threads
 * (pthreads; one thread where they are not built), each taking a contiguous range of rows.
 *
 * A step's product out[b] = in[b] m_b (m_b = P, or P_b) is plain C (any compiler and CPU), or, on
 * x86-64 CPUs with AVX2 and FMA (checked when the module loads), tiles of 4 rows against two 32-byte
 * vectors of columns with the accumulators in registers (GCC's vector extension): 23-26 against 4-6
 * billion multiply-adds a second on one core here, from K = 16 to 128.  A Kronecker step takes each
 * row's joint state as [A, k, C] for factor l (A = k^l, C = k^(L-1-l)) and forms
 * y[a, j, c] = sum_i x[a, i, c] P^l[i, j] in place of the axis, vectors running along c (the last
 * axis, C = 1, is the rows product): 21-32 billion multiply-adds a second at (L, k) = (2, 16), (3, 12),
 * (4, 8), where numpy's batched products of the same step reach 10-18.  With AVX2 the exponentials are
 * vectors too (tiled_shifted_exp; libm's exp one element at a time in the plain product's mode).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define HAVE_THREADS 1
#endif

#define MAX_THREADS 64

typedef enum { PLAIN, TILED } product_kind;

#define MAX_FACTORS 32

/* What every step multiplies by: the Kronecker product of `count` factors of k x k (count = 1: one matrix,
 * k = S), factor l with batch stride stride[l] (0: shared by every row), over S = k^count states, and
 * two rows of S of scratch for the products between (count > 1). */
typedef struct {
    int count;
    Py_ssize_t k, states;
    const void *factor[MAX_FACTORS];
    Py_ssize_t stride[MAX_FACTORS];
    void *scratch[2];
} kronecker_step;
static product_kind product_in_use = PLAIN;

#define DEFINE_PLAIN_PRODUCT(SUFFIX, REAL)                                                              \
    static void plain_product_##SUFFIX(const REAL *restrict in, const REAL *restrict probs,             \
                                       Py_ssize_t probs_stride, REAL *restrict out, Py_ssize_t B,       \
                                       Py_ssize_t K) {                                                  \
        for (Py_ssize_t b = 0; b < B; b++) {                                                            \
            const REAL *restrict x = in + b * K, *restrict m = probs + b * probs_stride;                \
            REAL *restrict y = out + b * K;                                                             \
            for (Py_ssize_t j = 0; j < K; j++) y[j] = 0;                                                \
            for (Py_ssize_t i = 0; i < K; i++) {                                                        \
                const REAL a = x[i];                                                                    \
                const REAL *restrict row = m + i * K;                                                   \
                for (Py_ssize_t j = 0; j < K; j++) y[j] += a * row[j];                                  \
            }                                                                                           \
        }                                                                                               \
    }

DEFINE_PLAIN_PRODUCT(float, float)
DEFINE_PLAIN_PRODUCT(double, double)

/* y[a, j, c] = sum_i x[a, i, c] m[i, j] for x, y [A, K, C]: factor m applied to the middle axis. */
#define DEFINE_PLAIN_AXIS_PRODUCT(SUFFIX, REAL)                                                         \
    static void plain_axis_product_##SUFFIX(const REAL *restrict x, const REAL *restrict m,             \
                                            REAL *restrict y, Py_ssize_t A, Py_ssize_t K, Py_ssize_t C) { \
        if (C == 1) {                                                                                   \
            plain_product_##SUFFIX(x, m, 0, y, A, K);                                                   \
            return;                                                                                     \
        }                                                                                               \
        for (Py_ssize_t a = 0; a < A; a++) {                                                            \
            for (Py_ssize_t j = 0; j < K; j++) {                                                        \
                REAL *restrict out = y + (a * K + j) * C;                                               \
                for (Py_ssize_t c = 0; c < C; c++) out[c] = 0;                                          \
                for (Py_ssize_t i = 0; i < K; i++) {                                                    \
                    const REAL w = m[i * K + j], *restrict row = x + (a * K + i) * C;                   \
                    for (Py_ssize_t c = 0; c < C; c++) out[c] += w * row[c];                            \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    }

DEFINE_PLAIN_AXIS_PRODUCT(float, float)
DEFINE_PLAIN_AXIS_PRODUCT(double, double)

/* statistics[i, j] += sum_{a, c} x[a, i, c] y[a, j, c] for x, y [A, K, C]: the edge statistics of the factor
 * on the middle axis, from the filter with the factors before it applied (x) and the backward message with
 * the factors after it applied (y). */
#define DEFINE_PLAIN_AXIS_STATISTICS(SUFFIX, REAL)                                                      \
    static void plain_axis_statistics_##SUFFIX(const REAL *restrict x, const REAL *restrict y,          \
                                               REAL *restrict statistics, Py_ssize_t A, Py_ssize_t K,   \
                                               Py_ssize_t C) {                                          \
        for (Py_ssize_t a = 0; a < A; a++)                                                              \
            for (Py_ssize_t i = 0; i < K; i++) {                                                        \
                const REAL *restrict row = x + (a * K + i) * C;                                         \
                for (Py_ssize_t j = 0; j < K; j++) {                                                    \
                    const REAL *restrict other = y + (a * K + j) * C;                                   \
                    REAL total = 0;                                                                     \
                    for (Py_ssize_t c = 0; c < C; c++) total += row[c] * other[c];                      \
                    statistics[i * K + j] += total;                                                     \
                }                                                                                       \
            }                                                                                           \
    }

DEFINE_PLAIN_AXIS_STATISTICS(float, float)
DEFINE_PLAIN_AXIS_STATISTICS(double, double)

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define HAVE_TILED_PRODUCT 1
#define AVX2_FMA __attribute__((target("avx2,fma")))

/* Columns [j0, K) of rows x m (rows of x K apart), by the plain loop; the tiles below take two vectors
 * of columns at a time, then one, then a half one, then these. */
#define DEFINE_TILED_PRODUCT(SUFFIX, REAL)                                                              \
    typedef REAL vector_##SUFFIX __attribute__((vector_size(32)));                                      \
    typedef REAL unaligned_##SUFFIX __attribute__((vector_size(32), aligned(sizeof(REAL))));            \
    typedef REAL half_##SUFFIX __attribute__((vector_size(16)));                                        \
    typedef REAL unaligned_half_##SUFFIX __attribute__((vector_size(16), aligned(sizeof(REAL))));       \
    enum { LANES_##SUFFIX = 32 / sizeof(REAL) };                                                        \
    AVX2_FMA static inline void edge_columns_##SUFFIX(const REAL *restrict x, const REAL *restrict m,      \
                                                   REAL *restrict y, int rows, Py_ssize_t j0,           \
                                                   Py_ssize_t K) {                                      \
        for (int r = 0; r < rows; r++) {                                                                \
            for (Py_ssize_t j = j0; j < K; j++) y[r * K + j] = 0;                                       \
            for (Py_ssize_t i = 0; i < K; i++) {                                                        \
                const REAL a = x[r * K + i];                                                            \
                for (Py_ssize_t j = j0; j < K; j++) y[r * K + j] += a * m[i * K + j];                   \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    /* four rows of x times m */                                                                        \
    AVX2_FMA static inline void four_rows_##SUFFIX(const REAL *restrict x, const REAL *restrict m,         \
                                                REAL *restrict y, Py_ssize_t K) {                       \
        const Py_ssize_t width = 2 * LANES_##SUFFIX, full = K - K % width;                              \
        for (Py_ssize_t j0 = 0; j0 < full; j0 += width) {                                               \
            vector_##SUFFIX a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0}, c0 = {0}, c1 = {0}, d0 = {0}, d1 = {0}; \
            for (Py_ssize_t i = 0; i < K; i++) {                                                        \
                const vector_##SUFFIX p0 = *(const unaligned_##SUFFIX *)(m + i * K + j0);               \
                const vector_##SUFFIX p1 = *(const unaligned_##SUFFIX *)(m + i * K + j0 + LANES_##SUFFIX); \
                const REAL xa = x[i], xb = x[K + i], xc = x[2 * K + i], xd = x[3 * K + i];              \
                a0 += xa * p0, a1 += xa * p1, b0 += xb * p0, b1 += xb * p1;                             \
                c0 += xc * p0, c1 += xc * p1, d0 += xd * p0, d1 += xd * p1;                             \
            }                                                                                           \
            REAL *restrict at = y + j0;                                                                 \
            *(unaligned_##SUFFIX *)at = a0, *(unaligned_##SUFFIX *)(at + LANES_##SUFFIX) = a1;          \
            at += K;                                                                                    \
            *(unaligned_##SUFFIX *)at = b0, *(unaligned_##SUFFIX *)(at + LANES_##SUFFIX) = b1;          \
            at += K;                                                                                    \
            *(unaligned_##SUFFIX *)at = c0, *(unaligned_##SUFFIX *)(at + LANES_##SUFFIX) = c1;          \
            at += K;                                                                                    \
            *(unaligned_##SUFFIX *)at = d0, *(unaligned_##SUFFIX *)(at + LANES_##SUFFIX) = d1;          \
        }                                                                                               \
        Py_ssize_t done = full;                                                                         \
        if (K - done >= LANES_##SUFFIX) { /* one vector of columns more */                              \
            vector_##SUFFIX a0 = {0}, b0 = {0}, c0 = {0}, d0 = {0};                                     \
            for (Py_ssize_t i = 0; i < K; i++) {                                                        \
                const vector_##SUFFIX p0 = *(const unaligned_##SUFFIX *)(m + i * K + done);             \
                a0 += x[i] * p0, b0 += x[K + i] * p0, c0 += x[2 * K + i] * p0, d0 += x[3 * K + i] * p0; \
            }                                                                                           \
            *(unaligned_##SUFFIX *)(y + done) = a0, *(unaligned_##SUFFIX *)(y + K + done) = b0;         \
            *(unaligned_##SUFFIX *)(y + 2 * K + done) = c0, *(unaligned_##SUFFIX *)(y + 3 * K + done) = d0; \
            done += LANES_##SUFFIX;                                                                     \
        }                                                                                               \
        if (K - done >= LANES_##SUFFIX / 2) { /* a half vector more */                                  \
            half_##SUFFIX a0 = {0}, b0 = {0}, c0 = {0}, d0 = {0};                                       \
            for (Py_ssize_t i = 0; i < K; i++) {                                                        \
                const half_##SUFFIX p0 = *(const unaligned_half_##SUFFIX *)(m + i * K + done);          \
                a0 += x[i] * p0, b0 += x[K + i] * p0, c0 += x[2 * K + i] * p0, d0 += x[3 * K + i] * p0; \
            }                                                                                           \
            *(unaligned_half_##SUFFIX *)(y + done) = a0, *(unaligned_half_##SUFFIX *)(y + K + done) = b0; \
            *(unaligned_half_##SUFFIX *)(y + 2 * K + done) = c0;                                        \
            *(unaligned_half_##SUFFIX *)(y + 3 * K + done) = d0;                                        \
            done += LANES_##SUFFIX / 2;                                                                 \
        }                                                                                               \
        if (done < K) edge_columns_##SUFFIX(x, m, y, 4, done, K);                                       \
    }                                                                                                   \
    /* one row of x times m */                                                                          \
    AVX2_FMA static inline void one_row_##SUFFIX(const REAL *restrict x, const REAL *restrict m,           \
                                              REAL *restrict y, Py_ssize_t K) {                         \
        const Py_ssize_t width = 2 * LANES_##SUFFIX, full = K - K % width;                              \
        for (Py_ssize_t j0 = 0; j0 < full; j0 += width) {                                               \
            vector_##SUFFIX a0 = {0}, a1 = {0};                                                         \
            for (Py_ssize_t i = 0; i < K; i++) {                                                        \
                const REAL xa = x[i];                                                                   \
                a0 += xa * *(const unaligned_##SUFFIX *)(m + i * K + j0);                               \
                a1 += xa * *(const unaligned_##SUFFIX *)(m + i * K + j0 + LANES_##SUFFIX);              \
            }                                                                                           \
            *(unaligned_##SUFFIX *)(y + j0) = a0, *(unaligned_##SUFFIX *)(y + j0 + LANES_##SUFFIX) = a1; \
        }                                                                                               \
        Py_ssize_t done = full;                                                                         \
        if (K - done >= LANES_##SUFFIX) { /* one vector of columns more */                              \
            vector_##SUFFIX a0 = {0};                                                                   \
            for (Py_ssize_t i = 0; i < K; i++) a0 += x[i] * *(const unaligned_##SUFFIX *)(m + i * K + done); \
            *(unaligned_##SUFFIX *)(y + done) = a0;                                                     \
            done += LANES_##SUFFIX;                                                                     \
        }                                                                                               \
        if (K - done >= LANES_##SUFFIX / 2) { /* a half vector more */                                  \
            half_##SUFFIX a0 = {0};                                                                     \
            for (Py_ssize_t i = 0; i < K; i++) a0 += x[i] * *(const unaligned_half_##SUFFIX *)(m + i * K + done); \
            *(unaligned_half_##SUFFIX *)(y + done) = a0;                                                \
            done += LANES_##SUFFIX / 2;                                                                 \
        }                                                                                               \
        if (done < K) edge_columns_##SUFFIX(x, m, y, 1, done, K);                                       \
    }                                                                                                   \
    AVX2_FMA static void tiled_product_##SUFFIX(const REAL *restrict in, const REAL *restrict probs,       \
                                             Py_ssize_t probs_stride, REAL *restrict out, Py_ssize_t B, \
                                             Py_ssize_t K) {                                            \
        Py_ssize_t b = 0;                                                                               \
        if (probs_stride == 0)                                                                          \
            for (; b + 4 <= B; b += 4) four_rows_##SUFFIX(in + b * K, probs, out + b * K, K);           \
        for (; b < B; b++) one_row_##SUFFIX(in + b * K, probs + b * probs_stride, out + b * K, K);      \
    }                                                                                                   \
    /* y[a, j, c] = sum_i x[a, i, c] m[i, j] for x, y [A, K, C]: for each vector of c (then a half one,  \
     * then single ones), four columns j of m at a time against the K rows of x's axis */               \
    AVX2_FMA static void tiled_axis_product_##SUFFIX(const REAL *restrict x, const REAL *restrict m,       \
                                                  REAL *restrict y, Py_ssize_t A, Py_ssize_t K,         \
                                                  Py_ssize_t C) {                                       \
        if (C == 1) {                                                                                   \
            tiled_product_##SUFFIX(x, m, 0, y, A, K);                                                   \
            return;                                                                                     \
        }                                                                                               \
        const Py_ssize_t lanes = LANES_##SUFFIX, full = C - C % lanes;                                  \
        for (Py_ssize_t a = 0; a < A; a++) {                                                            \
            const REAL *restrict xa = x + a * K * C;                                                    \
            REAL *restrict ya = y + a * K * C;                                                          \
            for (Py_ssize_t c = 0; c < full; c += lanes) {                                              \
                Py_ssize_t j = 0;                                                                       \
                for (; j + 4 <= K; j += 4) {                                                            \
                    vector_##SUFFIX a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                             \
                    for (Py_ssize_t i = 0; i < K; i++) {                                                \
                        const vector_##SUFFIX v = *(const unaligned_##SUFFIX *)(xa + i * C + c);        \
                        const REAL *restrict w = m + i * K + j;                                         \
                        a0 += v * w[0], a1 += v * w[1], a2 += v * w[2], a3 += v * w[3];                 \
                    }                                                                                   \
                    *(unaligned_##SUFFIX *)(ya + j * C + c) = a0;                                       \
                    *(unaligned_##SUFFIX *)(ya + (j + 1) * C + c) = a1;                                 \
                    *(unaligned_##SUFFIX *)(ya + (j + 2) * C + c) = a2;                                 \
                    *(unaligned_##SUFFIX *)(ya + (j + 3) * C + c) = a3;                                 \
                }                                                                                       \
                for (; j < K; j++) {                                                                    \
                    vector_##SUFFIX a0 = {0};                                                           \
                    for (Py_ssize_t i = 0; i < K; i++) a0 += *(const unaligned_##SUFFIX *)(xa + i * C + c) * m[i * K + j]; \
                    *(unaligned_##SUFFIX *)(ya + j * C + c) = a0;                                       \
                }                                                                                       \
            }                                                                                           \
            Py_ssize_t c = full;                                                                        \
            if (C - c >= lanes / 2) {                                                                   \
                for (Py_ssize_t j = 0; j < K; j++) {                                                    \
                    half_##SUFFIX a0 = {0};                                                             \
                    for (Py_ssize_t i = 0; i < K; i++) a0 += *(const unaligned_half_##SUFFIX *)(xa + i * C + c) * m[i * K + j]; \
                    *(unaligned_half_##SUFFIX *)(ya + j * C + c) = a0;                                  \
                }                                                                                       \
                c += lanes / 2;                                                                         \
            }                                                                                           \
            for (; c < C; c++)                                                                          \
                for (Py_ssize_t j = 0; j < K; j++) {                                                    \
                    REAL total = 0;                                                                     \
                    for (Py_ssize_t i = 0; i < K; i++) total += xa[i * C + c] * m[i * K + j];           \
                    ya[j * C + c] = total;                                                              \
                }                                                                                       \
        }                                                                                               \
    }                                                                                                   \
    /* statistics[i, j] += sum_{a, c} x[a, i, c] y[a, j, c]: for the last axis (C = 1) rows of statistics \
     * updated by x[a, i] y[a, :]; for C of a vector or more, four columns j at a time, vectors along c    \
     * summed over a (and the c past the last whole vector one by one); the plain loop between */       \
    AVX2_FMA static void tiled_axis_statistics_##SUFFIX(const REAL *restrict x, const REAL *restrict y,    \
                                                     REAL *restrict statistics, Py_ssize_t A,           \
                                                     Py_ssize_t K, Py_ssize_t C) {                      \
        const Py_ssize_t lanes = LANES_##SUFFIX, full = C - C % lanes;                                  \
        if (C == 1) { /* x^T y over the A rows: four rows i of statistics by a vector of columns j in      \
                       * registers over every a (then a half vector, then the plain loop) */            \
            Py_ssize_t i = 0;                                                                           \
            for (; i + 4 <= K; i += 4) {                                                                \
                Py_ssize_t j = 0;                                                                       \
                for (; j + lanes <= K; j += lanes) {                                                    \
                    vector_##SUFFIX a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                             \
                    for (Py_ssize_t a = 0; a < A; a++) {                                                \
                        const vector_##SUFFIX v = *(const unaligned_##SUFFIX *)(y + a * K + j);         \
                        const REAL *restrict w = x + a * K + i;                                         \
                        a0 += w[0] * v, a1 += w[1] * v, a2 += w[2] * v, a3 += w[3] * v;                 \
                    }                                                                                   \
                    *(unaligned_##SUFFIX *)(statistics + i * K + j) += a0;                              \
                    *(unaligned_##SUFFIX *)(statistics + (i + 1) * K + j) += a1;                        \
                    *(unaligned_##SUFFIX *)(statistics + (i + 2) * K + j) += a2;                        \
                    *(unaligned_##SUFFIX *)(statistics + (i + 3) * K + j) += a3;                        \
                }                                                                                       \
                if (K - j >= lanes / 2) {                                                               \
                    half_##SUFFIX a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                               \
                    for (Py_ssize_t a = 0; a < A; a++) {                                                \
                        const half_##SUFFIX v = *(const unaligned_half_##SUFFIX *)(y + a * K + j);      \
                        const REAL *restrict w = x + a * K + i;                                         \
                        a0 += w[0] * v, a1 += w[1] * v, a2 += w[2] * v, a3 += w[3] * v;                 \
                    }                                                                                   \
                    *(unaligned_half_##SUFFIX *)(statistics + i * K + j) += a0;                         \
                    *(unaligned_half_##SUFFIX *)(statistics + (i + 1) * K + j) += a1;                   \
                    *(unaligned_half_##SUFFIX *)(statistics + (i + 2) * K + j) += a2;                   \
                    *(unaligned_half_##SUFFIX *)(statistics + (i + 3) * K + j) += a3;                   \
                    j += lanes / 2;                                                                     \
                }                                                                                       \
                for (; j < K; j++)                                                                      \
                    for (int q = 0; q < 4; q++) {                                                       \
                        REAL total = 0;                                                                 \
                        for (Py_ssize_t a = 0; a < A; a++) total += x[a * K + i + q] * y[a * K + j];    \
                        statistics[(i + q) * K + j] += total;                                           \
                    }                                                                                   \
            }                                                                                           \
            for (; i < K; i++)                                                                          \
                for (Py_ssize_t a = 0; a < A; a++) {                                                    \
                    const REAL w = x[a * K + i], *restrict other = y + a * K;                           \
                    REAL *restrict out = statistics + i * K;                                            \
                    for (Py_ssize_t j = 0; j < K; j++) out[j] += w * other[j];                          \
                }                                                                                       \
            return;                                                                                     \
        }                                                                                               \
        if (full == 0) {                                                                                \
            plain_axis_statistics_##SUFFIX(x, y, statistics, A, K, C);                                  \
            return;                                                                                     \
        }                                                                                               \
        const Py_ssize_t half = C - full >= lanes / 2 ? full + lanes / 2 : full;                         \
        for (Py_ssize_t i = 0; i < K; i++) {                                                            \
            for (Py_ssize_t j = 0; j < K; j += 4) {                                                     \
                const int width = K - j < 4 ? (int)(K - j) : 4;                                         \
                vector_##SUFFIX a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                 \
                half_##SUFFIX h0 = {0}, h1 = {0}, h2 = {0}, h3 = {0};                                   \
                REAL rest[4] = {0};                                                                     \
                for (Py_ssize_t a = 0; a < A; a++) {                                                    \
                    const REAL *restrict row = x + (a * K + i) * C;                                     \
                    const REAL *restrict other = y + (a * K + j) * C;                                   \
                    if (width == 4) {                                                                   \
                        for (Py_ssize_t c = 0; c < full; c += lanes) {                                  \
                            const vector_##SUFFIX v = *(const unaligned_##SUFFIX *)(row + c);           \
                            a0 += v * *(const unaligned_##SUFFIX *)(other + c);                         \
                            a1 += v * *(const unaligned_##SUFFIX *)(other + C + c);                     \
                            a2 += v * *(const unaligned_##SUFFIX *)(other + 2 * C + c);                 \
                            a3 += v * *(const unaligned_##SUFFIX *)(other + 3 * C + c);                 \
                        }                                                                               \
                        if (half > full) {                                                              \
                            const half_##SUFFIX v = *(const unaligned_half_##SUFFIX *)(row + full);     \
                            h0 += v * *(const unaligned_half_##SUFFIX *)(other + full);                 \
                            h1 += v * *(const unaligned_half_##SUFFIX *)(other + C + full);             \
                            h2 += v * *(const unaligned_half_##SUFFIX *)(other + 2 * C + full);         \
                            h3 += v * *(const unaligned_half_##SUFFIX *)(other + 3 * C + full);         \
                        }                                                                               \
                    } else {                                                                            \
                        for (Py_ssize_t c = 0; c < full; c += lanes) {                                  \
                            const vector_##SUFFIX v = *(const unaligned_##SUFFIX *)(row + c);           \
                            a0 += v * *(const unaligned_##SUFFIX *)(other + c);                         \
                            if (width > 1) a1 += v * *(const unaligned_##SUFFIX *)(other + C + c);      \
                            if (width > 2) a2 += v * *(const unaligned_##SUFFIX *)(other + 2 * C + c);  \
                        }                                                                               \
                        for (Py_ssize_t c = full; c < half; c++)                                        \
                            for (int q = 0; q < width; q++) rest[q] += row[c] * other[q * C + c];       \
                    }                                                                                   \
                    for (Py_ssize_t c = half; c < C; c++)                                               \
                        for (int q = 0; q < width; q++) rest[q] += row[c] * other[q * C + c];           \
                }                                                                                       \
                const vector_##SUFFIX sums[4] = {a0, a1, a2, a3};                                       \
                const half_##SUFFIX halves[4] = {h0, h1, h2, h3};                                       \
                for (int q = 0; q < width; q++) {                                                       \
                    REAL total = rest[q];                                                               \
                    for (int l = 0; l < LANES_##SUFFIX; l++) total += sums[q][l];                       \
                    for (int l = 0; l < LANES_##SUFFIX / 2; l++) total += halves[q][l];                 \
                    statistics[i * K + j + q] += total;                                                 \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    }

DEFINE_TILED_PRODUCT(float, float)
DEFINE_TILED_PRODUCT(double, double)
#define ROWS_PRODUCT(SUFFIX) (product_in_use == TILED ? tiled_product_##SUFFIX : plain_product_##SUFFIX)
#define AXIS_PRODUCT(SUFFIX) (product_in_use == TILED ? tiled_axis_product_##SUFFIX : plain_axis_product_##SUFFIX)
#define AXIS_STATISTICS(SUFFIX) \
    (product_in_use == TILED ? tiled_axis_statistics_##SUFFIX : plain_axis_statistics_##SUFFIX)
#else
#define ROWS_PRODUCT(SUFFIX) plain_product_##SUFFIX
#define AXIS_PRODUCT(SUFFIX) plain_axis_product_##SUFFIX
#define AXIS_STATISTICS(SUFFIX) plain_axis_statistics_##SUFFIX
#endif

/* e[i] = exp(x[i] - shift) for i < n: libm's exp, one element at a time. */
static inline void plain_shifted_exp_float(const float *restrict x, float shift, float *restrict e, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) e[i] = expf(x[i] - shift);
}

static inline void plain_shifted_exp_double(const double *restrict x, double shift, double *restrict e, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) e[i] = exp(x[i] - shift);
}

#ifdef HAVE_TILED_PRODUCT
/* The same, eight (four) lanes at a time: Cody and Waite's reduction exp(x) = 2^n exp(r), n = round(x / ln 2),
 * r = x - n ln 2 (ln 2 in two parts, |r| <= ln 2 / 2), and Cephes' approximations of exp(r) (a degree-7
 * polynomial in float32, the rational 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)) in float64; both within an ulp or
 * two of the rounded exponential).  x is first clamped to [-104, 89] (float32) or [-746, 710] (float64), just
 * past where exp underflows to 0 and overflows to inf, and 2^n is applied as two normal powers of two
 * 2^(n >> 1) 2^(n - (n >> 1)), so that results in the subnormal range round once and the overflows give inf;
 * -inf gives 0 and NaN stays NaN (vmaxps and vminps return their second operand, x, where it is NaN).  The tail of a row
 * shorter than a vector goes through a vector of its own. */
typedef float exp_vector_float __attribute__((vector_size(32)));
typedef int32_t exp_bits_float __attribute__((vector_size(32)));
typedef double exp_vector_double __attribute__((vector_size(32)));
typedef int64_t exp_bits_double __attribute__((vector_size(32)));

AVX2_FMA static inline exp_vector_float vector_exp_float(exp_vector_float x) {
    const exp_vector_float zero = {0};
    x = __builtin_ia32_minps256(zero + 89.0f, __builtin_ia32_maxps256(zero - 104.0f, x)); /* NaN: the second */
    const float magic = 12582912.0f; /* 1.5 2^23: adding it rounds to an integer, held in the low bits */
    const exp_vector_float shifted = x * 1.44269504088896341f + magic;
    const exp_bits_float n = (exp_bits_float)shifted - (exp_bits_float)((exp_vector_float){0} + magic);
    const exp_vector_float nf = shifted - magic;
    exp_vector_float r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    exp_vector_float p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const exp_bits_float half = n >> 1, rest = n - half;
    return p * (exp_vector_float)((half + 127) << 23) * (exp_vector_float)((rest + 127) << 23);
}

AVX2_FMA static inline exp_vector_double vector_exp_double(exp_vector_double x) {
    const exp_vector_double zero = {0};
    x = __builtin_ia32_minpd256(zero + 710.0, __builtin_ia32_maxpd256(zero - 746.0, x));
    const double magic = 6755399441055744.0; /* 1.5 2^52 */
    const exp_vector_double shifted = x * 1.4426950408889634073599 + magic;
    const exp_bits_double n = (exp_bits_double)shifted - (exp_bits_double)((exp_vector_double){0} + magic);
    const exp_vector_double nf = shifted - magic;
    exp_vector_double r = x - nf * 6.93145751953125e-1;
    r = r - nf * 1.42860682030941723212e-6;
    const exp_vector_double rr = r * r;
    exp_vector_double p = 1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2;
    p = (p * rr + 9.99999999999999999910e-1) * r;
    exp_vector_double q = 3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3;
    q = q * rr + 2.27265548208155028766e-1;
    q = q * rr + 2.00000000000000000009e0;
    const exp_vector_double e = 1.0 + 2.0 * p / (q - p);
    const exp_bits_double half = n >> 1, rest = n - half;
    return e * (exp_vector_double)((half + 1023) << 52) * (exp_vector_double)((rest + 1023) << 52);
}

#define DEFINE_TILED_SHIFTED_EXP(SUFFIX, REAL)                                                          \
    typedef REAL exp_unaligned_##SUFFIX __attribute__((vector_size(32), aligned(sizeof(REAL))));        \
    AVX2_FMA static inline void tiled_shifted_exp_##SUFFIX(const REAL *restrict x, REAL shift, REAL *restrict e, \
                                                    Py_ssize_t n) {                                     \
        enum { LANES = 32 / sizeof(REAL) };                                                             \
        Py_ssize_t i = 0;                                                                               \
        for (; i + LANES <= n; i += LANES)                                                              \
            *(exp_unaligned_##SUFFIX *)(e + i) =                                                        \
                vector_exp_##SUFFIX(*(const exp_unaligned_##SUFFIX *)(x + i) - shift);                  \
        if (i < n) {                                                                                    \
            REAL tail[LANES];                                                                           \
            for (int l = 0; l < LANES; l++) tail[l] = i + l < n ? x[i + l] - shift : 0;                 \
            const exp_vector_##SUFFIX y = vector_exp_##SUFFIX(*(const exp_unaligned_##SUFFIX *)tail);    \
            for (int l = 0; i + l < n; l++) e[i + l] = y[l];                                            \
        }                                                                                               \
    }

DEFINE_TILED_SHIFTED_EXP(float, float)
DEFINE_TILED_SHIFTED_EXP(double, double)
#endif

/* out[b] = in[b] times the step's transition, for B rows [B, S] of a step starting at batch row `first`
 * (whose factors they take): one matrix, all rows at once;
 * a Kronecker product, per row, factor l on axis l of the row seen as [k^l, k, k^(L-1-l)], the rows between
 * in the scratch buffers. */
#define DEFINE_STEP_PRODUCT(SUFFIX, REAL)                                                               \
    static void step_product_##SUFFIX(const kronecker_step *step, const REAL *in, REAL *out, Py_ssize_t first, \
                                      Py_ssize_t B) {                                                   \
        const Py_ssize_t k = step->k, S = step->states;                                                 \
        if (step->count == 1) {                                                                         \
            const REAL *m = (const REAL *)step->factor[0] + first * step->stride[0];                    \
            ROWS_PRODUCT(SUFFIX)(in, m, step->stride[0], out, B, k);                                    \
            return;                                                                                     \
        }                                                                                               \
        void (*const axis)(const REAL *, const REAL *, REAL *, Py_ssize_t, Py_ssize_t, Py_ssize_t) =    \
            AXIS_PRODUCT(SUFFIX);                                                                       \
        for (Py_ssize_t b = 0; b < B; b++) {                                                            \
            const REAL *x = in + b * S;                                                                 \
            Py_ssize_t before = 1, after = S / k;                                                       \
            for (int l = 0; l < step->count; l++) {                                                     \
                REAL *target = l == step->count - 1 ? out + b * S : (REAL *)step->scratch[l % 2];      \
                axis(x, (const REAL *)step->factor[l] + (first + b) * step->stride[l], target, before, k, after); \
                x = target;                                                                             \
                before *= k, after /= k;                                                                \
            }                                                                                           \
        }                                                                                               \
    }

DEFINE_STEP_PRODUCT(float, float)
DEFINE_STEP_PRODUCT(double, double)

/* x[i] *= w[i] for i < n, returning sum_i x[i]: eight running partial sums, so that the additions are
 * independent (and vectorised) rather than one chain of n dependent ones, which costs n times an
 * addition's latency where S = k^L is large. */
#define DEFINE_WEIGH_AND_SUM(SUFFIX, REAL)                                                              \
    static inline REAL weigh_and_sum_##SUFFIX(REAL *restrict x, const REAL *restrict w, Py_ssize_t n) { \
        REAL part[8] = {0};                                                                             \
        Py_ssize_t i = 0;                                                                               \
        for (; i + 8 <= n; i += 8)                                                                      \
            for (int l = 0; l < 8; l++) {                                                               \
                x[i + l] *= w[i + l];                                                                   \
                part[l] += x[i + l];                                                                    \
            }                                                                                           \
        for (; i < n; i++) {                                                                            \
            x[i] *= w[i];                                                                               \
            part[0] += x[i];                                                                            \
        }                                                                                               \
        return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])); \
    }                                                                                                   \
    /* sum_i x[i] for i < n, in eight running partial sums */                                           \
    static inline REAL sum_##SUFFIX(const REAL *restrict x, Py_ssize_t n) {                             \
        REAL part[8] = {0};                                                                             \
        Py_ssize_t i = 0;                                                                               \
        for (; i + 8 <= n; i += 8)                                                                      \
            for (int l = 0; l < 8; l++) part[l] += x[i + l];                                            \
        for (; i < n; i++) part[0] += x[i];                                                             \
        return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])); \
    }

DEFINE_WEIGH_AND_SUM(float, float)
DEFINE_WEIGH_AND_SUM(double, double)

/* One thread's share of the forward: the rows [b0, b1). */
typedef struct {
    char kind;
    const void *emit;        /* scores [B, T, S] */
    const void *init;        /* scores [S] (init_stride 0) or [B, S] (init_stride S) */
    Py_ssize_t init_stride;
    kronecker_step step;
    const char *padding;     /* [B, T] */
    Py_ssize_t T, B, b0, b1, all_valid_until;
    Py_ssize_t chunk;        /* steps whose exponentials are taken ahead of their recursion */
    double *log_z;           /* [B] */
    char *flagged;           /* [B] */
    void *final_filter;      /* [B, S], or NULL */
    void *alpha, *scale, *weights, *shifts; /* [T, B, S], [T, B], [T, B, S], [T, B]; all NULL: not stored */
    void *rows;              /* not stored: alpha_{t-1}, alpha_t [2, b1 - b0, S], e [chunk, b1 - b0, S], m [chunk, b1 - b0] */
    double *sums;            /* [3, b1 - b0]: each row's running product of c_t, sum of logs, sum of shifts */
    const double *floor;     /* [B]: a row is flagged where some c_t inside its length is below floor[b] */
} forward_job;

/* max_i x[i] over i < n in four running maxima, 0 where it is not finite (a row of -inf; NaN is not
 * larger than anything, so that a NaN score only reaches the result through its exponential). */
#define DEFINE_ROW_MAX(SUFFIX, REAL)                                                                    \
    static inline REAL plain_row_max_##SUFFIX(const REAL *restrict x, Py_ssize_t n) {                   \
        REAL m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};                                       \
        Py_ssize_t i = 0;                                                                               \
        for (; i + 4 <= n; i += 4)                                                                      \
            for (int l = 0; l < 4; l++) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];                       \
        for (; i < n; i++) m[0] = x[i] > m[0] ? x[i] : m[0];                                            \
        const REAL a = m[0] > m[1] ? m[0] : m[1], b = m[2] > m[3] ? m[2] : m[3], top = a > b ? a : b;    \
        return top > -INFINITY && top < INFINITY ? top : 0;                                             \
    }

DEFINE_ROW_MAX(float, float)
DEFINE_ROW_MAX(double, double)

#ifdef HAVE_TILED_PRODUCT
/* The same a vector at a time (vmaxps and vmaxpd return their second operand where the first is NaN), the
 * lanes' maxima then folded by shuffles. */
AVX2_FMA static inline float tiled_row_max_float(const float *restrict x, Py_ssize_t n) {
    exp_vector_float m = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) m = __builtin_ia32_maxps256(*(const exp_unaligned_float *)(x + i), m);
    m = __builtin_ia32_maxps256(m, __builtin_shuffle(m, (exp_bits_float){4, 5, 6, 7, 0, 1, 2, 3}));
    m = __builtin_ia32_maxps256(m, __builtin_shuffle(m, (exp_bits_float){2, 3, 0, 1, 6, 7, 4, 5}));
    m = __builtin_ia32_maxps256(m, __builtin_shuffle(m, (exp_bits_float){1, 0, 3, 2, 5, 4, 7, 6}));
    float top = m[0];
    for (; i < n; i++) top = x[i] > top ? x[i] : top;
    return top > -INFINITY && top < INFINITY ? top : 0;
}

AVX2_FMA static inline double tiled_row_max_double(const double *restrict x, Py_ssize_t n) {
    exp_vector_double m = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) m = __builtin_ia32_maxpd256(*(const exp_unaligned_double *)(x + i), m);
    m = __builtin_ia32_maxpd256(m, __builtin_shuffle(m, (exp_bits_double){2, 3, 0, 1}));
    m = __builtin_ia32_maxpd256(m, __builtin_shuffle(m, (exp_bits_double){1, 0, 3, 2}));
    double top = m[0];
    for (; i < n; i++) top = x[i] > top ? x[i] : top;
    return top > -INFINITY && top < INFINITY ? top : 0;
}
#endif

/* The forward loop (see the top of the file), from the scores: at each step t and row b the shift
 * m_t = max_j emit[b, t, j] (row_max), e_t = exp(emit_t - m_t), a_t = (alpha_{t-1} P) * e_t, c_t = sum a_t,
 * alpha_t = a_t / c_t, w_t = e_t / c_t; step 0 from a_0 = exp(init - m_init) * exp(emit_0 - m_0) with the
 * shift m_init + m_0.  log_z[b] = sum_t log c_t + sum_t m_t over the steps inside the length (the
 * transition's own shifts are the caller's), the c_t multiplied in double and their product's log taken
 * only when it leaves [2^-500, 2^500] (a c_t outside that range, which float64 allows down to 2^-970
 * unflagged, has its own log taken: the product stays a normal double).  Stored: alpha, c, w and m every step (a padding step: the previous
 * alpha, c = 1, m = 0, w = the unnormalised e_t); else the filters in two rolling rows.
 * The shifts and exponentials, which do not depend on the filters, are taken a chunk of steps at a time
 * ahead of the recursion over those steps (into w and m, or the job's chunk buffers), all the chunk's
 * maxima first: independent of each other, they pipeline (measured at (B, T, K) = (8, 1024, 16), fastest
 * of 300 alternating calls: 1.04-1.07x over a chunk of one step, 1.07x over each row's maximum and
 * exponentials in one pass). */
#define DEFINE_FORWARD(VARIANT, SUFFIX, REAL, ATTRIBUTES)                                               \
    ATTRIBUTES static void forward_##VARIANT##_##SUFFIX(const forward_job *job) {                       \
        const kronecker_step *step = &job->step;                                                        \
        const Py_ssize_t S = step->states, T = job->T, B = job->B, b0 = job->b0, b1 = job->b1;          \
        const Py_ssize_t rows = b1 - b0, chunk = job->chunk;                                            \
        const REAL *restrict emit = job->emit, *restrict init = job->init;                              \
        REAL *alpha = job->alpha, *scale = job->scale, *weights = job->weights, *shifts = job->shifts;  \
        const int stored = alpha != NULL;                                                               \
        /* not stored: the two rolling filters [2, rows, S], then e and m of a chunk [chunk, rows, S + 1] */ \
        REAL *rolling = job->rows, *chunk_e = (REAL *)job->rows + 2 * rows * S;                         \
        REAL *chunk_m = chunk_e + chunk * rows * S;                                                     \
        double *restrict product = job->sums, *restrict logs = job->sums + rows;                        \
        double *restrict total_shift = job->sums + 2 * rows;                                            \
        const char *restrict padding = job->padding;                                                    \
        for (Py_ssize_t t0 = 0; t0 < T; t0 += chunk) {                                                  \
            const Py_ssize_t t1 = t0 + chunk < T ? t0 + chunk : T;                                      \
            /* each row's steps of the chunk (contiguous in emit): the shifts, then the exponentials     \
             * (two loops: each exponential then waits on no reduction of its own) */                   \
            for (Py_ssize_t b = b0; b < b1; b++)                                                        \
                for (Py_ssize_t t = t0; t < t1; t++) {                                                  \
                    const REAL m = VARIANT##_row_max_##SUFFIX(emit + (b * T + t) * S, S);               \
                    if (stored)                                                                         \
                        shifts[t * B + b] = m;                                                          \
                    else                                                                                \
                        chunk_m[(t - t0) * rows + b - b0] = m;                                          \
                }                                                                                       \
            for (Py_ssize_t b = b0; b < b1; b++)                                                        \
                for (Py_ssize_t t = t0; t < t1; t++) {                                                  \
                    const Py_ssize_t at = (t - t0) * rows + b - b0;                                     \
                    const REAL m = stored ? shifts[t * B + b] : chunk_m[at];                            \
                    REAL *restrict e = stored ? weights + (t * B + b) * S : chunk_e + at * S;           \
                    VARIANT##_shifted_exp_##SUFFIX(emit + (b * T + t) * S, m, e, S);                    \
                }                                                                                       \
            for (Py_ssize_t t = t0; t < t1; t++) {                                                      \
                /* the rows b0.. of alpha_{t-1} and alpha_t */                                          \
                const REAL *previous = t == 0 ? NULL                                                    \
                                       : stored ? alpha + ((t - 1) * B + b0) * S                        \
                                                : rolling + ((t - 1) % 2) * rows * S;                   \
                REAL *current = stored ? alpha + (t * B + b0) * S : rolling + (t % 2) * rows * S;       \
                if (t == 0) { /* a_0 = exp(init - m_init) e_0; the sums start from m_init */             \
                    for (Py_ssize_t b = b0; b < b1; b++) {                                              \
                        const REAL *restrict first = init + b * job->init_stride;                       \
                        const REAL m_init = VARIANT##_row_max_##SUFFIX(first, S);                       \
                        VARIANT##_shifted_exp_##SUFFIX(first, m_init, current + (b - b0) * S, S);       \
                        product[b - b0] = 1, logs[b - b0] = 0, total_shift[b - b0] = m_init;             \
                    }                                                                                   \
                } else {                                                                                \
                    step_product_##SUFFIX(step, previous, current, b0, rows);                           \
                }                                                                                       \
                for (Py_ssize_t b = b0; b < b1; b++) {                                                  \
                    const Py_ssize_t i = b - b0, at = (t - t0) * rows + i;                               \
                    REAL *restrict out = current + i * S;                                               \
                    REAL *restrict e = stored ? weights + (t * B + b) * S : chunk_e + at * S;           \
                    REAL m = stored ? shifts[t * B + b] : chunk_m[at];                                  \
                    if (t == 0) {                                                                       \
                        if (padding && padding[b * T]) m = 0;                                           \
                    } else if (t >= job->all_valid_until && padding[b * T + t]) {                       \
                        for (Py_ssize_t j = 0; j < S; j++) out[j] = previous[i * S + j];                \
                        if (stored) scale[t * B + b] = 1, shifts[t * B + b] = 0;                        \
                        continue;                                                                       \
                    }                                                                                   \
                    const REAL c = weigh_and_sum_##SUFFIX(out, e, S), inverse = 1 / c;                  \
                    if (c < job->floor[b] && !(padding && padding[b * T + t])) job->flagged[b] = 1;     \
                    for (Py_ssize_t j = 0; j < S; j++) out[j] *= inverse;                               \
                    if (stored) {                                                                       \
                        for (Py_ssize_t j = 0; j < S; j++) e[j] *= inverse;                             \
                        scale[t * B + b] = c, shifts[t * B + b] = t ? m : m + total_shift[i];           \
                    }                                                                                   \
                    total_shift[i] += m;                                                                \
                    if (!(c >= 0x1p-500 && c <= 0x1p500)) { /* its log apart (and 0, inf, NaN's) */     \
                        logs[i] += log(c);                                                              \
                        continue;                                                                       \
                    }                                                                                   \
                    double p = product[i] * c; /* both in [2^-500, 2^500]: a normal double */           \
                    if (!(p >= 0x1p-500 && p <= 0x1p500)) logs[i] += log(p), p = 1;                     \
                    product[i] = p;                                                                     \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        const REAL *last = stored ? alpha + ((T - 1) * B + b0) * S : rolling + ((T - 1) % 2) * rows * S; \
        for (Py_ssize_t b = b0; b < b1; b++) {                                                          \
            const Py_ssize_t i = b - b0;                                                                \
            job->log_z[b] = logs[i] + log(product[i]) + total_shift[i];                                 \
            if (job->final_filter)                                                                      \
                memcpy((REAL *)job->final_filter + b * S, last + i * S, S * sizeof(REAL));              \
        }                                                                                               \
    }

DEFINE_FORWARD(plain, float, float, )
DEFINE_FORWARD(plain, double, double, )
#ifdef HAVE_TILED_PRODUCT
DEFINE_FORWARD(tiled, float, float, AVX2_FMA)
DEFINE_FORWARD(tiled, double, double, AVX2_FMA)
#endif

/* The backward loop over the rows [b0, b1) of the batch only (the rows are independent, so that several
 * threads can each take a range of them). */
#define DEFINE_LOOPS(SUFFIX, REAL)                                                                      \
    /* gamma[b, t] = alpha_t[b] * beta_t[b] for the rows [b0, b1) of step t (gamma batch-major [B, T, S], beta_t \
     * the rows' [b1 - b0, S]), returning the sum of what it wrote */                                  \
    static inline REAL marginals_##SUFFIX(REAL *restrict gamma, const REAL *restrict alpha,            \
                                          const REAL *restrict beta_t, Py_ssize_t t, Py_ssize_t T,      \
                                          Py_ssize_t B, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t S) {   \
        REAL total = 0;                                                                                 \
        for (Py_ssize_t b = b0; b < b1; b++) {                                                          \
            REAL *restrict out = gamma + (b * T + t) * S;                                               \
            const REAL *restrict filter = alpha + (t * B + b) * S;                                      \
            const REAL *restrict smoothed = beta_t + (b - b0) * S;                                      \
            for (Py_ssize_t j = 0; j < S; j++) out[j] = smoothed[j];                                    \
            total += weigh_and_sum_##SUFFIX(out, filter, S);                                            \
        }                                                                                               \
        return total;                                                                                   \
    }                                                                                                   \
    /* The backward loop: beta_t in two rolling rows of [b1 - b0, S] (beta_rows: slot t % 2), gamma     \
     * written batch-major as each beta_t is final, u_t into u's buffer.  Returns whether the sum of     \
     * gamma and u is finite. */                                                                        \
    static int backward_##SUFFIX(REAL *restrict gamma, REAL *restrict u, const REAL *restrict weights,  \
                                 const kronecker_step *step, const char *restrict padding, Py_ssize_t T, \
                                 Py_ssize_t B, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t all_valid_until, \
                                 const REAL *restrict alpha, REAL *restrict beta_rows) {                \
        const Py_ssize_t K = step->states, n = (b1 - b0) * K;                                           \
        REAL total = 0;                                                                                 \
        for (Py_ssize_t j = 0; j < n; j++) beta_rows[((T - 1) % 2) * n + j] = 1;                         \
        for (Py_ssize_t t = T - 1; t > 0; t--) {                                                        \
            const Py_ssize_t at = (t * B + b0) * K;                                                     \
            REAL *restrict message = u + at;                                                            \
            const REAL *restrict next = beta_rows + (t % 2) * n, *restrict w = weights + at;            \
            REAL *restrict current = beta_rows + ((t - 1) % 2) * n;                                     \
            total += marginals_##SUFFIX(gamma, alpha, next, t, T, B, b0, b1, K);                        \
            for (Py_ssize_t i = 0; i < n; i++) message[i] = w[i] * next[i];                             \
            step_product_##SUFFIX(step, message, current, b0, b1 - b0);                                 \
            if (t >= all_valid_until)                                                                   \
                for (Py_ssize_t b = 0; b < b1 - b0; b++) {                                              \
                    if (!padding[(b0 + b) * T + t]) continue;                                           \
                    for (Py_ssize_t j = 0; j < K; j++) {                                                \
                        message[b * K + j] = 0;                                                         \
                        current[b * K + j] = next[b * K + j];                                           \
                    }                                                                                   \
                }                                                                                       \
            total += sum_##SUFFIX(message, n);                                                          \
        }                                                                                               \
        if (T > 0) total += marginals_##SUFFIX(gamma, alpha, beta_rows, 0, T, B, b0, b1, K);            \
        return isfinite(total);                                                                         \
    }                                                                                                   \
    /* The backward loop that also sums each row's edge statistics of every factor l over the steps,     \
     * statistics[b, l] = sum_t sum_{a, c} A^l_{t-1}[a, i, c] U^l_t[a, j, c] ([B, F, k, k]), where A^l is    \
     * alpha_{t-1} with the factors before l applied (forward) and U^l is u_t with those after l applied  \
     * (backward, transposed): the gradient of log Z w.r.t. factor l is P^l times them.  A step's row     \
     * applies the transposed factors from the last to the first, so that each U^l is a stage of its own \
     * product; u_t is kept in u's buffer, or (u NULL) in a scratch row.  rows: F + 2 scratch rows of S;  \
     * beta_rows as for the backward.  Returns whether the sum of gamma and the statistics is finite. */ \
    static int backward_statistics_##SUFFIX(REAL *restrict gamma, REAL *restrict u, const REAL *restrict weights, \
                                            const kronecker_step *step_t, const kronecker_step *step,  \
                                            const char *restrict padding, Py_ssize_t T, Py_ssize_t B,  \
                                            Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t all_valid_until,   \
                                            const REAL *restrict alpha, REAL *restrict statistics,      \
                                            REAL *restrict rows, REAL *restrict beta_rows) {            \
        void (*const axis)(const REAL *, const REAL *, REAL *, Py_ssize_t, Py_ssize_t, Py_ssize_t) =    \
            AXIS_PRODUCT(SUFFIX);                                                                       \
        void (*const gather)(const REAL *, const REAL *, REAL *, Py_ssize_t, Py_ssize_t, Py_ssize_t) =  \
            AXIS_STATISTICS(SUFFIX);                                                                    \
        const int F = step->count;                                                                      \
        const Py_ssize_t k = step->k, S = step->states, kk = k * k, n = (b1 - b0) * S;                  \
        REAL *restrict stage[2] = {rows + F * S, rows + (F + 1) * S};                                   \
        const REAL *before[MAX_FACTORS];                                                                \
        REAL total = 0;                                                                                 \
        for (Py_ssize_t i = b0 * F * kk; i < b1 * F * kk; i++) statistics[i] = 0;                       \
        for (Py_ssize_t j = 0; j < n; j++) beta_rows[((T - 1) % 2) * n + j] = 1;                         \
        for (Py_ssize_t t = T - 1; t > 0; t--) {                                                        \
            const REAL *restrict next_rows = beta_rows + (t % 2) * n;                                   \
            REAL *restrict current_rows = beta_rows + ((t - 1) % 2) * n;                                \
            total += marginals_##SUFFIX(gamma, alpha, next_rows, t, T, B, b0, b1, S);                   \
            for (Py_ssize_t b = b0; b < b1; b++) {                                                      \
                const Py_ssize_t at = (t * B + b) * S;                                                  \
                REAL *restrict message = u ? u + at : rows;                                             \
                const REAL *restrict next = next_rows + (b - b0) * S, *restrict w = weights + at;       \
                REAL *restrict current = current_rows + (b - b0) * S;                                   \
                if (t >= all_valid_until && padding[b * T + t]) {                                       \
                    for (Py_ssize_t j = 0; j < S; j++) message[j] = 0, current[j] = next[j];            \
                    continue;                                                                           \
                }                                                                                       \
                for (Py_ssize_t j = 0; j < S; j++) message[j] = w[j] * next[j];                         \
                before[0] = alpha + at - B * S; /* A^0 = alpha_{t-1}; A^{l+1} = A^l with factor l applied */ \
                Py_ssize_t left = 1, right = S / k;                                                     \
                for (int l = 0; l + 1 < F; l++) {                                                       \
                    REAL *target = rows + (l + 1) * S;                                                  \
                    axis(before[l], (const REAL *)step->factor[l] + b * step->stride[l], target, left, k, right); \
                    before[l + 1] = target;                                                             \
                    left *= k, right /= k;                                                              \
                }                                                                                       \
                const REAL *x = message; /* U^{F-1} = u_t */                                            \
                for (int l = F - 1; l >= 0; l--) {                                                      \
                    gather(before[l], x, statistics + (b * F + l) * kk, left, k, right);                \
                    REAL *target = l == 0 ? current : stage[l % 2];                                     \
                    axis(x, (const REAL *)step_t->factor[l] + b * step_t->stride[l], target, left, k, right); \
                    x = target;                                                                         \
                    if (l) left /= k, right *= k;                                                       \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        if (T > 0) total += marginals_##SUFFIX(gamma, alpha, beta_rows, 0, T, B, b0, b1, S);            \
        total += sum_##SUFFIX(statistics + b0 * F * kk, (b1 - b0) * F * kk);                            \
        return isfinite(total);                                                                         \
    }

DEFINE_LOOPS(float, float)
DEFINE_LOOPS(double, double)

/* One thread's share of the backward: the rows [b0, b1), with its own scratch rows. */
typedef struct {
    char kind;
    void *buffers[3]; /* gamma, u, weights */
    const char *padding;
    const void *alpha;
    kronecker_step step;
    Py_ssize_t T, B, b0, b1, all_valid_until;
    int finite;
    /* with statistics: the forward factors, statistics [B, F, k, k], F + 2 scratch rows */
    const kronecker_step *forward_step;
    void *statistics, *rows;
    void *beta_rows; /* beta_t, beta_{t-1}: [2, b1 - b0, S] */
} backward_job;

static void run_forward_job(void *job) {
    const forward_job *f = job;
#ifdef HAVE_TILED_PRODUCT
    if (product_in_use == TILED) {
        if (f->kind == 'f')
            forward_tiled_float(f);
        else
            forward_tiled_double(f);
        return;
    }
#endif
    if (f->kind == 'f')
        forward_plain_float(f);
    else
        forward_plain_double(f);
}

static void run_backward_job(void *job) {
    backward_job *j = job;
    void **v = j->buffers;
    if (j->statistics && j->kind == 'f')
        j->finite = backward_statistics_float(v[0], v[1], v[2], &j->step, j->forward_step, j->padding, j->T, j->B,
                                              j->b0, j->b1, j->all_valid_until, j->alpha, j->statistics, j->rows,
                                              j->beta_rows);
    else if (j->statistics)
        j->finite = backward_statistics_double(v[0], v[1], v[2], &j->step, j->forward_step, j->padding, j->T, j->B,
                                               j->b0, j->b1, j->all_valid_until, j->alpha, j->statistics, j->rows,
                                               j->beta_rows);
    else if (j->kind == 'f')
        j->finite = backward_float(v[0], v[1], v[2], &j->step, j->padding, j->T, j->B, j->b0, j->b1,
                                   j->all_valid_until, j->alpha, j->beta_rows);
    else
        j->finite = backward_double(v[0], v[1], v[2], &j->step, j->padding, j->T, j->B, j->b0, j->b1,
                                    j->all_valid_until, j->alpha, j->beta_rows);
}

#ifdef HAVE_THREADS
typedef struct {
    void (*run)(void *);
    void *job;
} thread_start;

static void *job_thread(void *start) {
    thread_start *s = start;
    s->run(s->job);
    return NULL;
}
#endif

/* run(job) for `count` jobs of `size` bytes, the first on the calling thread and the others on threads of
 * their own (on one thread each in turn where threads are not built, or where one could not be started). */
static void run_jobs(void (*run)(void *), void *jobs, size_t size, int count) {
#define JOB(i) ((char *)jobs + (size_t)(i) * size)
#ifdef HAVE_THREADS
    pthread_t threads[MAX_THREADS];
    thread_start starts[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 1; i < count; i++) {
        starts[i] = (thread_start){run, JOB(i)};
        started[i] = pthread_create(&threads[i], NULL, job_thread, &starts[i]) == 0;
    }
    run(JOB(0));
    for (int i = 1; i < count; i++) {
        if (started[i])
            pthread_join(threads[i], NULL);
        else
            run(JOB(i));
    }
#else
    for (int i = 0; i < count; i++) run(JOB(i));
#endif
#undef JOB
}

/* A writable or read-only C-contiguous buffer of the given item format and number of dimensions. */
static int get_buffer(PyObject *obj, Py_buffer *view, const char *name, int writable, int ndim_min, int ndim_max) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous%s array", name, writable ? " writable" : "");
        return -1;
    }
    if (view->ndim < ndim_min || view->ndim > ndim_max) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d to %d dimensions, got %d", name, ndim_min, ndim_max,
                     view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static char item_kind(const Py_buffer *view) {
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (f[0] && !f[1]) return f[0];
    return 0;
}

/* The item kind ('f' or 'd') of views[0], which every views[i] with shared[i] set must have too; 0 with a
 * ValueError naming the first view that does not. */
static char shared_float_kind(const Py_buffer *views, const char *const *names, int count, const int *shared) {
    const char kind = item_kind(&views[0]);
    if (kind != 'f' && kind != 'd') {
        PyErr_Format(PyExc_ValueError, "%s: expected float32 or float64 items, got format '%s'", names[0],
                     views[0].format);
        return 0;
    }
    for (int i = 1; i < count; i++) {
        if (shared[i] && item_kind(&views[i]) != kind) {
            PyErr_Format(PyExc_ValueError, "%s: expected the item format of %s ('%c'), got '%s'", names[i],
                         names[0], kind, views[i].format);
            return 0;
        }
    }
    return kind;
}

/* The step's factors from `obj`: one C-contiguous [S, S] or [B, S, S] array, or a tuple of L arrays
 * [k, k] | [B, k, k] with k^L = S, each of item kind `kind`; their buffers go to views (count set to how
 * many were taken, to be released by the caller).  -1 with a ValueError naming `name` on a mismatch. */
static int get_factors(PyObject *obj, const char *name, char kind, Py_ssize_t B, Py_ssize_t S, Py_buffer *views,
                       int *count, kronecker_step *step) {
    const int many = PyTuple_Check(obj);
    const Py_ssize_t given = many ? PyTuple_GET_SIZE(obj) : 1;
    *count = 0;
    if (given < 1 || given > MAX_FACTORS) {
        PyErr_Format(PyExc_ValueError, "%s: expected 1 to %d factors, got %zd", name, MAX_FACTORS, given);
        return -1;
    }
    for (; *count < given; (*count)++) {
        Py_buffer *view = &views[*count];
        if (get_buffer(many ? PyTuple_GET_ITEM(obj, *count) : obj, view, name, 0, 2, 3) < 0) return -1;
        const int batched = view->ndim == 3;
        const Py_ssize_t k = view->shape[view->ndim - 1];
        if (item_kind(view) != kind || view->shape[view->ndim - 2] != k || (batched && view->shape[0] != B) ||
            (*count && k != step->k)) {
            (*count)++;
            PyErr_Format(PyExc_ValueError, "%s: factor %d: expected '%c' items, [k, k] or [B=%zd, k, k] with one k", name,
                         *count - 1, kind, B);
            return -1;
        }
        step->k = k;
        step->factor[*count] = view->buf;
        step->stride[*count] = batched ? k * k : 0;
    }
    Py_ssize_t states = 1;
    for (int l = 0; l < *count && states <= S; l++) states *= step->k;
    if (states != S) {
        PyErr_Format(PyExc_ValueError, "%s: %d factor(s) of k=%zd states do not make the S=%zd states of the buffers",
                     name, *count, step->k, S);
        return -1;
    }
    step->count = *count;
    step->states = S;
    return 0;
}

/* How many jobs share B rows among `threads` threads (at most B, at least 1). */
static int job_count(int threads, Py_ssize_t B) {
    int count = threads < MAX_THREADS ? threads : MAX_THREADS;
    return count > B ? (B > 0 ? (int)B : 1) : count;
}

/* Whether every entry of a float array is above 0 (zero set; NaN is not), or is not -inf (zero unset). */
static int all_above(const Py_buffer *view, char kind, int zero) {
    const Py_ssize_t n = view->len / view->itemsize;
    if (kind == 'f') {
        const float *x = view->buf;
        for (Py_ssize_t i = 0; i < n; i++)
            if (zero ? !(x[i] > 0) : x[i] == -INFINITY) return 0;
    } else {
        const double *x = view->buf;
        for (Py_ssize_t i = 0; i < n; i++)
            if (zero ? !(x[i] > 0) : x[i] == -INFINITY) return 0;
    }
    return 1;
}

/* The smallest of n floats or doubles. */
static double smallest_of(const void *buf, char kind, Py_ssize_t n) {
    double smallest = INFINITY;
    for (Py_ssize_t i = 0; i < n; i++) {
        const double x = kind == 'f' ? ((const float *)buf)[i] : ((const double *)buf)[i];
        if (x < smallest) smallest = x;
    }
    return smallest;
}

/* floor[b] = max(tiny / eps, S tiny / p_b), p_b the smallest entry of row b's step (the product of its factors'
 * smallest entries, every entry positive here): the normaliser floor of latentnlp.chain.normaliser_floor. */
static void normaliser_floors(const kronecker_step *step, char kind, Py_ssize_t B, double *floor) {
    const double tiny = kind == 'f' ? FLT_MIN : DBL_MIN, eps = kind == 'f' ? FLT_EPSILON : DBL_EPSILON;
    const Py_ssize_t itemsize = kind == 'f' ? sizeof(float) : sizeof(double), kk = step->k * step->k;
    for (Py_ssize_t b = 0; b < B; b++) floor[b] = 1;
    for (int l = 0; l < step->count; l++) {
        const double shared = step->stride[l] ? 0 : smallest_of(step->factor[l], kind, kk);
        for (Py_ssize_t b = 0; b < B; b++)
            floor[b] *= step->stride[l] ? smallest_of((const char *)step->factor[l] + b * kk * itemsize, kind, kk)
                                        : shared;
    }
    for (Py_ssize_t b = 0; b < B; b++) {
        const double bound = step->states * tiny / floor[b];
        floor[b] = bound > tiny / eps ? bound : tiny / eps;
    }
}

/* scaled_forward(emit, init, probs, padding, all_valid_until, log_z, flagged, threads, final_filter, alpha, scale,
 * weights, shifts) -> bool: the forward loop from the scores emit [B, T, S] and init [S] | [B, S]; False (nothing
 * written) where some state is not reachable at every step: init has a -inf or a factor an entry not above 0
 * (the caller's shift over the reachable states is then needed), and where T = 0.  padding [B, T] (bytes) is read from step
 * all_valid_until on; None if that is T.  log_z [B] float64 and flagged [B] (bytes, set,
 * never cleared) are written, final_filter [B, S] where given; alpha [T, B, S], scale [T, B], weights [T, B, S]
 * and shifts [T, B] are all given (written) or all None. */
static PyObject *scaled_forward(PyObject *self, PyObject *args) {
    enum { EMIT, INIT, PADDING, LOG_Z, FLAGGED, FINAL, ALPHA, SCALE, WEIGHTS, SHIFTS, VIEWS };
    static const char *names[VIEWS] = {"emit", "init", "padding", "log_z", "flagged", "final_filter",
                                       "alpha", "scale", "weights", "shifts"};
    PyObject *objs[VIEWS], *probs;
    Py_ssize_t all_valid_until;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOnOOiOOOOO", &objs[EMIT], &objs[INIT], &probs, &objs[PADDING],
                          &all_valid_until, &objs[LOG_Z], &objs[FLAGGED], &threads, &objs[FINAL], &objs[ALPHA],
                          &objs[SCALE], &objs[WEIGHTS], &objs[SHIFTS]))
        return NULL;
    const int writable[VIEWS] = {0, 0, 0, 1, 1, 1, 1, 1, 1, 1};
    const int ndim_min[VIEWS] = {3, 1, 2, 1, 1, 2, 3, 2, 3, 2}, ndim_max[VIEWS] = {3, 2, 2, 1, 1, 2, 3, 2, 3, 2};
    Py_buffer views[VIEWS], factors[MAX_FACTORS];
    int taken[VIEWS] = {0}, factors_taken = 0;
    kronecker_step step = {0};
    forward_job jobs[MAX_THREADS];
    void *scratch = NULL;
    PyObject *result = NULL;
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "threads: expected at least 1, got %d", threads);
        return NULL;
    }
    const int stored = objs[ALPHA] != Py_None;
    for (int i = SCALE; i <= SHIFTS; i++)
        if ((objs[i] != Py_None) != stored) {
            PyErr_SetString(PyExc_ValueError, "alpha, scale, weights, shifts: expected all four or none");
            return NULL;
        }
    for (int i = 0; i < VIEWS; i++) {
        if (objs[i] == Py_None && (i >= FINAL || i == PADDING)) continue; /* padding: checked below */
        if (get_buffer(objs[i], &views[i], names[i], writable[i], ndim_min[i], ndim_max[i]) < 0) goto done;
        taken[i] = 1;
    }
    const Py_ssize_t B = views[EMIT].shape[0], T = views[EMIT].shape[1], S = views[EMIT].shape[2];
    const int floats[VIEWS] = {1, 1, 0, 0, 0, taken[FINAL], stored, stored, stored, stored};
    const char kind = shared_float_kind(views, names, VIEWS, floats);
    if (!kind) goto done;
    const Py_buffer *init = &views[INIT];
    if (init->shape[init->ndim - 1] != S || (init->ndim == 2 && init->shape[0] != B)) {
        PyErr_Format(PyExc_ValueError, "init: expected [S=%zd] or [B=%zd, S]", S, B);
        goto done;
    }
    if (!taken[PADDING] && all_valid_until < T) {
        PyErr_Format(PyExc_ValueError, "padding: None needs all_valid_until >= T = %zd, got %zd", T, all_valid_until);
        goto done;
    }
    if (taken[PADDING] &&
        (views[PADDING].itemsize != 1 || views[PADDING].shape[0] != B || views[PADDING].shape[1] != T)) {
        PyErr_Format(PyExc_ValueError, "padding: expected [B=%zd, T=%zd] of one-byte booleans", B, T);
        goto done;
    }
    if (item_kind(&views[LOG_Z]) != 'd' || views[LOG_Z].shape[0] != B) {
        PyErr_Format(PyExc_ValueError, "log_z: expected [B=%zd] of float64", B);
        goto done;
    }
    if (views[FLAGGED].itemsize != 1 || views[FLAGGED].shape[0] != B) {
        PyErr_Format(PyExc_ValueError, "flagged: expected [B=%zd] of one-byte booleans", B);
        goto done;
    }
    if (taken[FINAL] && (views[FINAL].shape[0] != B || views[FINAL].shape[1] != S)) {
        PyErr_Format(PyExc_ValueError, "final_filter: expected [B=%zd, S=%zd]", B, S);
        goto done;
    }
    if (stored) {
        const Py_buffer *a = &views[ALPHA], *c = &views[SCALE], *w = &views[WEIGHTS], *m = &views[SHIFTS];
        if (a->shape[0] != T || a->shape[1] != B || a->shape[2] != S || w->shape[0] != T || w->shape[1] != B ||
            w->shape[2] != S || c->shape[0] != T || c->shape[1] != B || m->shape[0] != T || m->shape[1] != B) {
            PyErr_Format(PyExc_ValueError,
                         "alpha, scale, weights, shifts: expected [T=%zd, B=%zd, S=%zd], [T, B], [T, B, S], [T, B]",
                         T, B, S);
            goto done;
        }
    }
    if (get_factors(probs, "probs", kind, B, S, factors, &factors_taken, &step) < 0) goto done;
    int reachable = all_above(init, kind, 0);
    for (int l = 0; reachable && l < factors_taken; l++) reachable = all_above(&factors[l], kind, 1);
    if (!reachable || T == 0) {
        result = PyBool_FromLong(0);
        goto done;
    }
    const int count = job_count(threads, B);
    const Py_ssize_t itemsize = views[EMIT].itemsize, job_rows = B / count + 1, row = S > 0 ? S : 1;
    /* a chunk's exponentials in about 16 KB (L1) */
    Py_ssize_t chunk = 16384 / (job_rows * row * itemsize);
    chunk = chunk < 1 ? 1 : chunk > 64 ? 64 : chunk;
    /* a job's scratch: the Kronecker product's two rows, without storage its filters' 2 job_rows rows and a
     * chunk's e and m; then every job's sums, 3 B doubles, and the rows' normaliser floors, B */
    const Py_ssize_t kron_items = step.count > 1 ? 2 * row : 0;
    const Py_ssize_t rolling_items = stored ? 0 : 2 * job_rows * row + chunk * job_rows * (row + 1);
    const size_t job_bytes = (size_t)((kron_items + rolling_items) * itemsize + 63) / 64 * 64;
    scratch = PyMem_Malloc(job_bytes * count + 4 * (size_t)(B > 0 ? B : 1) * sizeof(double));
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    double *sums = (double *)((char *)scratch + job_bytes * count), *floor = sums + 3 * B;
    normaliser_floors(&step, kind, B, floor);
    for (int i = 0; i < count; i++) {
        forward_job *job = &jobs[i];
        char *mine = (char *)scratch + job_bytes * i;
        *job = (forward_job){kind, views[EMIT].buf, init->buf, init->ndim == 2 ? S : 0, step,
                             taken[PADDING] ? views[PADDING].buf : NULL,
                             T, B, B * i / count, B * (i + 1) / count, all_valid_until, chunk, views[LOG_Z].buf,
                             views[FLAGGED].buf, taken[FINAL] ? views[FINAL].buf : NULL};
        if (stored)
            job->alpha = views[ALPHA].buf, job->scale = views[SCALE].buf, job->weights = views[WEIGHTS].buf,
            job->shifts = views[SHIFTS].buf;
        job->step.scratch[0] = mine, job->step.scratch[1] = mine + S * itemsize;
        job->rows = mine + kron_items * itemsize;
        job->sums = sums + 3 * job->b0;
        job->floor = floor;
    }
    Py_BEGIN_ALLOW_THREADS
    run_jobs(run_forward_job, jobs, sizeof(forward_job), count);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(1);
done:
    PyMem_Free(scratch);
    for (int i = 0; i < factors_taken; i++) PyBuffer_Release(&factors[i]);
    for (int i = 0; i < VIEWS; i++)
        if (taken[i]) PyBuffer_Release(&views[i]);
    return result;
}

/* scaled_backward(gamma, u, weights, probs_t, padding, all_valid_until, alpha[, threads[, probs, statistics]]) ->
 * bool, whether the sum of gamma and u (or of the statistics) is finite.  probs_t: the step's matrix, or the
 * tuple of its Kronecker factors, transposed.  threads: how many threads share the rows (default 1; at most
 * B). */
static PyObject *scaled_backward(PyObject *self, PyObject *args) {
    PyObject *objs[6], *forward_probs = Py_None, *statistics_obj = Py_None;
    Py_ssize_t all_valid_until;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOOOOnO|iOO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &all_valid_until,
                          &objs[5], &threads, &forward_probs, &statistics_obj))
        return NULL;
    const int with_statistics = statistics_obj != Py_None;
    const int no_u = with_statistics && objs[1] == Py_None; /* u_t kept in a scratch row only */
    /* the views taken from objs: all but the factors (3) and an absent u (1) */
#define TAKEN(i) ((i) != 3 && !((i) == 1 && no_u))
    static const char *names[] = {"gamma", "u", "weights", "probs_t", "padding", "alpha"};
    /* gamma [B,T,S], u [T,B,S] rw, weights, alpha [T,B,S]; the factors (index 3) are taken apart, by
     * get_factors */
    const int writable[6] = {1, 1, 0, 0, 0, 0};
    const int ndim_min[6] = {3, 3, 3, 0, 2, 3};
    const int ndim_max[6] = {3, 3, 3, 0, 2, 3};
    Py_buffer views[6], factors[MAX_FACTORS], forward_factors[MAX_FACTORS], statistics;
    int got = 0, taken = 0, forward_taken = 0, statistics_taken = 0;
    kronecker_step step = {0}, forward_step = {0};
    backward_job jobs[MAX_THREADS];
    void *scratch = NULL;
    PyObject *result = NULL;
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "threads: expected at least 1, got %d", threads);
        return NULL;
    }
    for (; got < 6; got++)
        if (TAKEN(got) && get_buffer(objs[got], &views[got], names[got], writable[got], ndim_min[got], ndim_max[got]) < 0)
            goto done;
    /* the time-major buffer that gives T, B, S: alpha */
    const Py_buffer *time_major = &views[5];
    const Py_ssize_t T = time_major->shape[0], B = time_major->shape[1], S = time_major->shape[2];
    const int shared[6] = {1, !no_u, 1, 0, 0, 1}; /* padding is booleans */
    const char kind = shared_float_kind(views, names, 6, shared);
    if (!kind) goto done;
    if (get_factors(objs[3], names[3], kind, B, S, factors, &taken, &step) < 0) goto done;
    const Py_buffer *second = &views[1], *third = &views[2], *padding = &views[4];
    const int shapes_ok = third->shape[0] == T && third->shape[1] == B && third->shape[2] == S &&
                          (no_u || (second->shape[0] == T && second->shape[1] == B && second->shape[2] == S)) &&
                          views[0].shape[0] == B && views[0].shape[1] == T && views[0].shape[2] == S;
    if (!shapes_ok) {
        PyErr_Format(PyExc_ValueError, "gamma [B, T, S], u, weights: shapes do not match alpha [T=%zd, B=%zd, S=%zd]",
                     T, B, S);
        goto done;
    }
    if (padding->itemsize != 1 || padding->shape[0] != B || padding->shape[1] != T) {
        PyErr_Format(PyExc_ValueError, "%s: expected [B=%zd, T=%zd] of one-byte booleans", names[4], B, T);
        goto done;
    }
    if (with_statistics) {
        if (get_factors(forward_probs, "probs", kind, B, S, forward_factors, &forward_taken, &forward_step) < 0)
            goto done;
        int same = forward_step.count == step.count && forward_step.k == step.k;
        for (int l = 0; same && l < step.count; l++) same = forward_step.stride[l] == step.stride[l];
        if (!same) {
            PyErr_Format(PyExc_ValueError, "probs: expected the layout of probs_t's %d factor(s) of k=%zd", step.count,
                         step.k);
            goto done;
        }
        if (get_buffer(statistics_obj, &statistics, "statistics", 1, 4, 4) < 0) goto done;
        statistics_taken = 1;
        if (item_kind(&statistics) != kind || statistics.shape[0] != B || statistics.shape[1] != step.count ||
            statistics.shape[2] != step.k || statistics.shape[3] != step.k) {
            PyErr_Format(PyExc_ValueError, "statistics: expected '%c' items [B=%zd, F=%d, k=%zd, k]", kind, B,
                         step.count, step.k);
            goto done;
        }
    }
    const int count = job_count(threads, B);
    const Py_ssize_t row_bytes = (S > 0 ? S : 1) * views[0].itemsize;
    const int job_rows = with_statistics ? step.count + 2 : step.count > 1 ? 2 : 0; /* scratch rows a job */
    /* and the backward's two rows of beta for each row of the batch */
    const Py_ssize_t beta_rows = 2 * B;
    scratch = PyMem_Malloc((job_rows * count + beta_rows) * row_bytes);
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    for (int i = 0; i < count; i++) {
        backward_job *job = &jobs[i];
        *job = (backward_job){kind, {views[0].buf, no_u ? NULL : views[1].buf, views[2].buf}, views[4].buf,
                              views[5].buf, step, T, B, B * i / count, B * (i + 1) / count, all_valid_until, 1,
                              &forward_step, with_statistics ? statistics.buf : NULL, NULL};
        char *mine = (char *)scratch + job_rows * i * row_bytes;
        job->step.scratch[0] = mine;
        job->step.scratch[1] = mine + row_bytes;
        job->rows = mine;
        job->beta_rows = (char *)scratch + (job_rows * count + 2 * job->b0) * row_bytes;
    }
    Py_BEGIN_ALLOW_THREADS
    run_jobs(run_backward_job, jobs, sizeof(backward_job), count);
    Py_END_ALLOW_THREADS
    int finite = 1;
    for (int i = 0; i < count; i++) finite = finite && jobs[i].finite;
    result = PyBool_FromLong(finite);
done:
    PyMem_Free(scratch);
    for (int i = 0; i < taken; i++) PyBuffer_Release(&factors[i]);
    for (int i = 0; i < forward_taken; i++) PyBuffer_Release(&forward_factors[i]);
    if (statistics_taken) PyBuffer_Release(&statistics);
    for (int i = 0; i < got; i++)
        if (TAKEN(i)) PyBuffer_Release(&views[i]);
    return result;
#undef TAKEN
}

/* Viterbi (max-plus) loops, one dense matrix for every step:
 *   forward:   a_t[j] = max_i (a_{t-1}[i] + m[i, j]) + emit_t[j]   (t = 1 .. T-1; a_0 given; a_t = a_{t-1}
 *              at padding steps), scores a [T, B, K] time-major, emit [B, T, K] batch-major
 *   backtrack: z_{T-1} = argmax_j a_{T-1}[j], z_{t-1} = argmax_i (a_{t-1}[i] + m[i, z_t]) (z kept at
 *              padding steps), from the columns of m (m^T, [K_next, K_prev] rows); ties to the lowest
 *              index, as numpy's and torch's argmax. */
#define DEFINE_VITERBI(SUFFIX, REAL)                                                                    \
    static void viterbi_forward_##SUFFIX(REAL *restrict scores, const REAL *restrict emit,              \
                                         const REAL *restrict matrix, Py_ssize_t stride,                \
                                         const char *restrict padding, Py_ssize_t T, Py_ssize_t B,      \
                                         Py_ssize_t K, Py_ssize_t all_valid_until) {                    \
        for (Py_ssize_t t = 1; t < T; t++) {                                                            \
            for (Py_ssize_t b = 0; b < B; b++) {                                                        \
                const REAL *restrict in = scores + ((t - 1) * B + b) * K;                               \
                REAL *restrict out = scores + (t * B + b) * K;                                          \
                if (t >= all_valid_until && padding[b * T + t]) {                                       \
                    for (Py_ssize_t j = 0; j < K; j++) out[j] = in[j];                                  \
                    continue;                                                                           \
                }                                                                                       \
                const REAL *restrict m = matrix + b * stride, *restrict e = emit + (b * T + t) * K;     \
                for (Py_ssize_t j = 0; j < K; j++) out[j] = in[0] + m[j];                               \
                for (Py_ssize_t i = 1; i < K; i++) {                                                    \
                    const REAL a = in[i];                                                               \
                    const REAL *restrict row = m + i * K;                                               \
                    for (Py_ssize_t j = 0; j < K; j++) {                                                \
                        const REAL candidate = a + row[j];                                              \
                        out[j] = candidate > out[j] ? candidate : out[j];                               \
                    }                                                                                   \
                }                                                                                       \
                for (Py_ssize_t j = 0; j < K; j++) out[j] += e[j];                                      \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    static Py_ssize_t argmax_##SUFFIX(const REAL *restrict x, const REAL *restrict y, Py_ssize_t K) {  \
        Py_ssize_t best = 0;                                                                            \
        REAL top = x[0] + (y ? y[0] : 0);                                                               \
        for (Py_ssize_t i = 1; i < K; i++) {                                                            \
            const REAL v = x[i] + (y ? y[i] : 0);                                                       \
            if (v > top) top = v, best = i;                                                             \
        }                                                                                               \
        return best;                                                                                    \
    }                                                                                                   \
    static void viterbi_backtrack_##SUFFIX(const REAL *restrict scores, const REAL *restrict columns,   \
                                           Py_ssize_t stride, const char *restrict padding,             \
                                           Py_ssize_t T, Py_ssize_t B, Py_ssize_t K,                    \
                                           Py_ssize_t all_valid_until, int64_t *restrict path) {        \
        for (Py_ssize_t b = 0; b < B; b++) {                                                            \
            const REAL *restrict c = columns + b * stride;                                              \
            Py_ssize_t z = argmax_##SUFFIX(scores + ((T - 1) * B + b) * K, NULL, K);                    \
            for (Py_ssize_t t = T - 1; t > 0; t--) {                                                    \
                path[t * B + b] = z;                                                                    \
                if (t >= all_valid_until && padding[b * T + t]) continue;                               \
                z = argmax_##SUFFIX(scores + ((t - 1) * B + b) * K, c + z * K, K);                      \
            }                                                                                           \
            path[b] = z;                                                                                \
        }                                                                                               \
    }

DEFINE_VITERBI(float, float)
DEFINE_VITERBI(double, double)

/* viterbi(scores, emit, matrix, columns, padding, all_valid_until, path): both Viterbi loops. */
static PyObject *viterbi(PyObject *self, PyObject *args) {
    PyObject *objs[6];
    Py_ssize_t all_valid_until;
    if (!PyArg_ParseTuple(args, "OOOOOnO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &all_valid_until,
                          &objs[5]))
        return NULL;
    static const char *names[] = {"scores", "emit", "matrix", "columns", "padding", "path"};
    const int writable[6] = {1, 0, 0, 0, 0, 1};
    const int ndim_min[6] = {3, 3, 2, 2, 2, 2}, ndim_max[6] = {3, 3, 3, 3, 2, 2};
    Py_buffer views[6];
    int got = 0;
    PyObject *result = NULL;
    for (; got < 6; got++)
        if (get_buffer(objs[got], &views[got], names[got], writable[got], ndim_min[got], ndim_max[got]) < 0)
            goto done;
    const Py_ssize_t T = views[0].shape[0], B = views[0].shape[1], K = views[0].shape[2];
    const int shared[6] = {1, 1, 1, 1, 0, 0};
    const char kind = shared_float_kind(views, names, 6, shared);
    if (!kind) goto done;
    const Py_buffer *emit = &views[1], *matrix = &views[2], *columns = &views[3];
    if (emit->shape[0] != B || emit->shape[1] != T || emit->shape[2] != K) {
        PyErr_Format(PyExc_ValueError, "emit: expected [B=%zd, T=%zd, K=%zd]", B, T, K);
        goto done;
    }
    const int batched = matrix->ndim == 3;
    for (int i = 2; i < 4; i++) {
        const Py_buffer *v = &views[i];
        if (v->ndim != matrix->ndim || (batched && v->shape[0] != B) || v->shape[v->ndim - 1] != K ||
            v->shape[v->ndim - 2] != K) {
            PyErr_Format(PyExc_ValueError, "%s: expected [K, K] or [B, K, K] (as matrix) with B=%zd, K=%zd", names[i],
                         B, K);
            goto done;
        }
    }
    if (views[4].itemsize != 1 || views[4].shape[0] != B || views[4].shape[1] != T) {
        PyErr_Format(PyExc_ValueError, "padding: expected [B=%zd, T=%zd] of one-byte booleans", B, T);
        goto done;
    }
    if (item_kind(&views[5]) != 'l' && item_kind(&views[5]) != 'q') {
        PyErr_Format(PyExc_ValueError, "path: expected int64 items, got format '%s'", views[5].format);
        goto done;
    }
    if (views[5].itemsize != 8 || views[5].shape[0] != T || views[5].shape[1] != B) {
        PyErr_Format(PyExc_ValueError, "path: expected [T=%zd, B=%zd] of int64", T, B);
        goto done;
    }
    const Py_ssize_t stride = batched ? K * K : 0;
    Py_BEGIN_ALLOW_THREADS
    if (kind == 'f') {
        viterbi_forward_float(views[0].buf, emit->buf, matrix->buf, stride, views[4].buf, T, B, K, all_valid_until);
        viterbi_backtrack_float(views[0].buf, columns->buf, stride, views[4].buf, T, B, K, all_valid_until,
                                views[5].buf);
    } else {
        viterbi_forward_double(views[0].buf, emit->buf, matrix->buf, stride, views[4].buf, T, B, K, all_valid_until);
        viterbi_backtrack_double(views[0].buf, columns->buf, stride, views[4].buf, T, B, K, all_valid_until,
                                 views[5].buf);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    return result;
}

/* Backward sampling, one dense matrix for every step: z_{t-1} ~ p(i | z_t = j) proportional to
 * exp(log_filter[b, t-1, i] + columns[j, i]) (columns: the log matrix transposed), drawn by inverting
 * the cumulative weights at one uniform u[t-1, s, b]; a chain whose weights are all 0 (no state
 * leads into j) takes the first state of largest weight, as an argmax of -inf scores does. */
#define DEFINE_SAMPLING(SUFFIX, REAL)                                                                   \
    static void backward_sample_##SUFFIX(const REAL *restrict log_filter, const REAL *restrict columns, \
                                         Py_ssize_t stride, const char *restrict padding,               \
                                         const REAL *restrict uniform, int64_t *restrict path,          \
                                         const int64_t *restrict last, Py_ssize_t S, Py_ssize_t B,      \
                                         Py_ssize_t T, Py_ssize_t K, REAL *restrict weights) {          \
        for (Py_ssize_t s = 0; s < S; s++) {                                                            \
            for (Py_ssize_t b = 0; b < B; b++) {                                                        \
                int64_t *restrict out = path + (s * B + b) * T;                                         \
                int64_t z = last[s * B + b];                                                            \
                for (Py_ssize_t t = T - 1; t > 0; t--) {                                                \
                    if (padding[b * T + t]) {                                                           \
                        out[t] = 0;                                                                     \
                        continue;                                                                       \
                    }                                                                                   \
                    out[t] = z;                                                                         \
                    const REAL *restrict f = log_filter + (b * T + t - 1) * K;                          \
                    const REAL *restrict c = columns + b * stride + z * K;                              \
                    Py_ssize_t best = 0;                                                                \
                    REAL top = f[0] + c[0];                                                             \
                    for (Py_ssize_t i = 0; i < K; i++) {                                                \
                        weights[i] = f[i] + c[i];                                                       \
                        if (weights[i] > top) top = weights[i], best = i;                               \
                    }                                                                                   \
                    if (!(top > -INFINITY) || !isfinite(top)) {                                         \
                        z = best;                                                                       \
                        continue;                                                                       \
                    }                                                                                   \
                    REAL total = 0;                                                                     \
                    for (Py_ssize_t i = 0; i < K; i++) total += weights[i] = exp(weights[i] - top);     \
                    const REAL target = uniform[((t - 1) * S + s) * B + b] * total;                     \
                    REAL running = 0;                                                                   \
                    z = K - 1;                                                                          \
                    for (Py_ssize_t i = 0; i < K; i++) {                                                \
                        running += weights[i];                                                          \
                        if (running > target && weights[i] > 0) {                                       \
                            z = i;                                                                      \
                            break;                                                                      \
                        }                                                                               \
                    }                                                                                   \
                    if (!(weights[z] > 0)) z = best;                                                    \
                }                                                                                       \
                out[0] = z;                                                                             \
            }                                                                                           \
        }                                                                                               \
    }

DEFINE_SAMPLING(float, float)
DEFINE_SAMPLING(double, double)

/* backward_sample(log_filter, columns, padding, uniform, last, path): backward sampling into path. */
static PyObject *backward_sample(PyObject *self, PyObject *args) {
    PyObject *objs[6];
    if (!PyArg_ParseTuple(args, "OOOOOO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &objs[5])) return NULL;
    static const char *names[] = {"log_filter", "columns", "padding", "uniform", "last", "path"};
    const int writable[6] = {0, 0, 0, 0, 0, 1};
    const int ndim_min[6] = {3, 2, 2, 3, 2, 3}, ndim_max[6] = {3, 3, 2, 3, 2, 3};
    Py_buffer views[6];
    int got = 0;
    PyObject *result = NULL;
    void *weights = NULL;
    for (; got < 6; got++)
        if (get_buffer(objs[got], &views[got], names[got], writable[got], ndim_min[got], ndim_max[got]) < 0)
            goto done;
    const Py_ssize_t B = views[0].shape[0], T = views[0].shape[1], K = views[0].shape[2];
    const Py_ssize_t S = views[5].shape[0];
    const int shared[6] = {1, 1, 0, 1, 0, 0};
    const char kind = shared_float_kind(views, names, 6, shared);
    if (!kind) goto done;
    const Py_buffer *columns = &views[1];
    const int batched = columns->ndim == 3;
    if ((batched && columns->shape[0] != B) || columns->shape[columns->ndim - 1] != K ||
        columns->shape[columns->ndim - 2] != K) {
        PyErr_Format(PyExc_ValueError, "columns: expected [K, K] or [B, K, K] with B=%zd, K=%zd", B, K);
        goto done;
    }
    if (views[2].itemsize != 1 || views[2].shape[0] != B || views[2].shape[1] != T) {
        PyErr_Format(PyExc_ValueError, "padding: expected [B=%zd, T=%zd] of one-byte booleans", B, T);
        goto done;
    }
    if (views[3].shape[0] != (T > 0 ? T - 1 : 0) || views[3].shape[1] != S || views[3].shape[2] != B) {
        PyErr_Format(PyExc_ValueError, "uniform: expected [T-1=%zd, S=%zd, B=%zd]", T - 1, S, B);
        goto done;
    }
    for (int i = 4; i < 6; i++) {
        const char k = item_kind(&views[i]);
        if ((k != 'l' && k != 'q') || views[i].itemsize != 8 || views[i].shape[0] != S || views[i].shape[1] != B ||
            (i == 5 && views[i].shape[2] != T)) {
            PyErr_Format(PyExc_ValueError, "%s: expected int64 [S=%zd, B=%zd%s]", names[i], S, B,
                         i == 5 ? ", T" : "");
            goto done;
        }
    }
    weights = PyMem_Malloc((K > 0 ? K : 1) * views[0].itemsize);
    if (!weights) {
        PyErr_NoMemory();
        goto done;
    }
    const Py_ssize_t stride = batched ? K * K : 0;
    Py_BEGIN_ALLOW_THREADS
    if (kind == 'f')
        backward_sample_float(views[0].buf, columns->buf, stride, views[2].buf, views[3].buf, views[5].buf,
                              views[4].buf, S, B, T, K, weights);
    else
        backward_sample_double(views[0].buf, columns->buf, stride, views[2].buf, views[3].buf, views[5].buf,
                               views[4].buf, S, B, T, K, weights);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(weights);
    for (int i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    return result;
}

static const char *product_name(product_kind kind) { return kind == TILED ? "avx2-fma tiles" : "plain"; }

static PyObject *product(PyObject *self, PyObject *args) { return PyUnicode_FromString(product_name(product_in_use)); }

static PyObject *set_product(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (strcmp(name, product_name(PLAIN)) == 0) {
        product_in_use = PLAIN;
    } else if (strcmp(name, product_name(TILED)) == 0) {
#ifdef HAVE_TILED_PRODUCT
        if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) {
            PyErr_SetString(PyExc_ValueError, "product: 'avx2-fma tiles' needs a CPU with AVX2 and FMA");
            return NULL;
        }
        product_in_use = TILED;
#else
        PyErr_SetString(PyExc_ValueError, "product: 'avx2-fma tiles' is not built on this platform");
        return NULL;
#endif
    } else {
        PyErr_Format(PyExc_ValueError, "product: expected 'plain' or 'avx2-fma tiles', got '%s'", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"product", product, METH_NOARGS, "product(): the step product in use, 'plain' or 'avx2-fma tiles'."},
    {"set_product", set_product, METH_VARARGS,
     "set_product(name): use the 'plain' or the 'avx2-fma tiles' step product (the latter where the CPU has "
     "AVX2 and FMA, the default there)."},
    {"scaled_forward", scaled_forward, METH_VARARGS,
     "scaled_forward(emit, init, probs, padding, all_valid_until, log_z, flagged, threads, final_filter, alpha, "
     "scale, weights, shifts) -> bool: the scaled forward loop from the scores emit [B, T, S] and init [S] | [B, S], "
     "t = 0 .. T-1 (padding [B, T] read from step all_valid_until on, None where that is T), writing log_z [B] (float64: sum_t log c_t + sum_t m_t inside the length), flagged[b] where "
     "a step's scale inside the length fell below max(tiny / eps, S tiny / min P), final_filter [B, S] (or None) and, given (else "
     "all None), alpha [T, B, S], scale [T, B], weights [T, B, S] and shifts [T, B]; False, writing nothing, "
     "where init has a -inf or a factor an entry not above 0; probs is the step's matrix or the tuple of its "
     "Kronecker factors; threads: how many threads share the rows."},
    {"scaled_backward", scaled_backward, METH_VARARGS,
     "scaled_backward(gamma, u, weights, probs_t, padding, all_valid_until, alpha[, threads[, probs, statistics]]): "
     "the scaled backward loop, "
     "t = T-1 .. 1 (beta_{T-1} = 1), writing the marginals gamma = alpha * beta batch-major; returns whether "
     "the sum of gamma and u[1:] is finite; probs_t is the step's matrix or the tuple of its Kronecker "
     "factors, transposed; threads as for scaled_forward; with probs (the factors) and statistics [B, F, k, k], "
     "each row's edge statistics of every factor are summed into statistics (u may then be None), and the "
     "check is of gamma and the statistics."},
    {"viterbi", viterbi, METH_VARARGS,
     "viterbi(scores, emit, matrix, columns, padding, all_valid_until, path): the max-plus forward, "
     "t = 1 .. T-1, into scores [T, B, K] (scores[0] given; emit [B, T, K]), then the backtracking into "
     "path [T, B] int64 from the columns (the matrix transposed, contiguous)."},
    {"backward_sample", backward_sample, METH_VARARGS,
     "backward_sample(log_filter, columns, padding, uniform, last, path): backward sampling, t = T-1 .. 1, "
     "from the log filters [B, T, K] and the log matrix's columns, one uniform [T-1, S, B] a draw, from the "
     "last states last [S, B] into path [S, B, T] int64 (0 at padding)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_chain_loops",
                                    "Compiled time loops of the scaled forward-backward algorithm.", -1, methods};

PyMODINIT_FUNC PyInit__chain_loops(void) {
#ifdef HAVE_TILED_PRODUCT
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) product_in_use = TILED;
#endif
    return PyModule_Create(&module);
}
