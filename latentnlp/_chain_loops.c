/* The time loops of the scaled forward-backward algorithm (latentnlp.chain), compiled.
 *
 * For a chain whose every step multiplies by one dense matrix, P [K, K] (shared) or P [B, K, K]
 * (one per chain), on the CPU, in float32 or float64.  Each step is a B x K x K product, so when
 * B K^2 is small a step costs far less than one numpy or torch call; here a step costs its
 * arithmetic.  The buffers are C-contiguous, time-major, and written in place:
 *
 *   forward:  a_t = (alpha_{t-1} P) * e_t,  c_t = sum_j a_t(j),  alpha_t = a_t / c_t   (t = 1 .. T-1)
 *   backward: u_t = w_t * beta_t,  beta_{t-1} = P u_t                                  (t = T-1 .. 1)
 *
 * with alpha, e, beta, u, w [T, B, K] and c [T, B].  A padding step (padding[b, t], checked for
 * t >= all_valid_until only) keeps the previous alpha with c_t = 1, and sets u_t = 0 with
 * beta_{t-1} = beta_t.  The backward takes the transposed matrix P^T (contiguous), so both loops
 * run over rows of a contiguous matrix.  The GIL is released while a loop runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LOOP_TARGETS __attribute__((target_clones("avx2", "default")))
#else
#define LOOP_TARGETS
#endif

/* out[j] = sum_i in[i] * m[i, j] for a row-major K x K matrix m. */
#define ROW_TIMES_MATRIX(REAL)                                                                          \
    for (Py_ssize_t j = 0; j < K; j++) out[j] = 0;                                                      \
    for (Py_ssize_t i = 0; i < K; i++) {                                                                \
        const REAL a = in[i];                                                                           \
        const REAL *restrict row = m + i * K;                                                           \
        for (Py_ssize_t j = 0; j < K; j++) out[j] += a * row[j];                                        \
    }

#define DEFINE_LOOPS(SUFFIX, REAL)                                                                      \
    LOOP_TARGETS static void forward_##SUFFIX(REAL *restrict alpha, REAL *restrict scale,               \
                                              const REAL *restrict emit_probs, const REAL *restrict probs, \
                                              Py_ssize_t probs_stride, const char *restrict padding,    \
                                              Py_ssize_t T, Py_ssize_t B, Py_ssize_t K,                 \
                                              Py_ssize_t all_valid_until) {                             \
        for (Py_ssize_t t = 1; t < T; t++) {                                                            \
            for (Py_ssize_t b = 0; b < B; b++) {                                                        \
                const REAL *restrict in = alpha + ((t - 1) * B + b) * K;                                \
                REAL *restrict out = alpha + (t * B + b) * K;                                           \
                if (t >= all_valid_until && padding[b * T + t]) {                                       \
                    for (Py_ssize_t j = 0; j < K; j++) out[j] = in[j];                                  \
                    scale[t * B + b] = 1;                                                               \
                    continue;                                                                           \
                }                                                                                       \
                const REAL *restrict m = probs + b * probs_stride;                                      \
                const REAL *restrict e = emit_probs + (t * B + b) * K;                                  \
                ROW_TIMES_MATRIX(REAL)                                                                  \
                REAL c = 0;                                                                             \
                for (Py_ssize_t j = 0; j < K; j++) {                                                    \
                    out[j] *= e[j];                                                                     \
                    c += out[j];                                                                        \
                }                                                                                       \
                scale[t * B + b] = c;                                                                   \
                for (Py_ssize_t j = 0; j < K; j++) out[j] /= c;                                         \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    LOOP_TARGETS static void backward_##SUFFIX(REAL *restrict beta, REAL *restrict u,                   \
                                               const REAL *restrict weights, const REAL *restrict probs, \
                                               Py_ssize_t probs_stride, const char *restrict padding,   \
                                               Py_ssize_t T, Py_ssize_t B, Py_ssize_t K,                \
                                               Py_ssize_t all_valid_until) {                            \
        for (Py_ssize_t t = T - 1; t > 0; t--) {                                                        \
            for (Py_ssize_t b = 0; b < B; b++) {                                                        \
                REAL *restrict in = u + (t * B + b) * K;                                                \
                const REAL *restrict next = beta + (t * B + b) * K;                                     \
                REAL *restrict out = beta + ((t - 1) * B + b) * K;                                      \
                if (t >= all_valid_until && padding[b * T + t]) {                                       \
                    for (Py_ssize_t j = 0; j < K; j++) {                                                \
                        in[j] = 0;                                                                      \
                        out[j] = next[j];                                                               \
                    }                                                                                   \
                    continue;                                                                           \
                }                                                                                       \
                const REAL *restrict w = weights + (t * B + b) * K;                                     \
                for (Py_ssize_t j = 0; j < K; j++) in[j] = w[j] * next[j];                              \
                const REAL *restrict m = probs + b * probs_stride;                                      \
                ROW_TIMES_MATRIX(REAL)                                                                  \
            }                                                                                           \
        }                                                                                               \
    }

DEFINE_LOOPS(float, float)
DEFINE_LOOPS(double, double)

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

enum { FORWARD, BACKWARD };

/* Shared argument handling of both loops: (state, vectors, per_step, probs, padding, all_valid_until). */
static PyObject *run_loop(PyObject *args, int direction) {
    PyObject *objs[5];
    Py_ssize_t all_valid_until;
    if (!PyArg_ParseTuple(args, "OOOOOn", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &all_valid_until))
        return NULL;
    static const char *forward_names[] = {"alpha", "scale", "emit_probs", "probs", "padding"};
    static const char *backward_names[] = {"beta", "u", "weights", "probs_t", "padding"};
    const char **names = direction == FORWARD ? forward_names : backward_names;
    /* forward: alpha [T,B,K] rw, scale [T,B] rw, emit_probs [T,B,K]; backward: beta, u rw, weights [T,B,K] */
    const int writable[5] = {1, 1, 0, 0, 0};
    const int ndim_min[5] = {3, direction == FORWARD ? 2 : 3, 3, 2, 2};
    const int ndim_max[5] = {3, direction == FORWARD ? 2 : 3, 3, 3, 2};
    Py_buffer views[5];
    int got = 0;
    PyObject *result = NULL;
    for (; got < 5; got++)
        if (get_buffer(objs[got], &views[got], names[got], writable[got], ndim_min[got], ndim_max[got]) < 0)
            goto done;
    const Py_ssize_t T = views[0].shape[0], B = views[0].shape[1], K = views[0].shape[2];
    const char kind = item_kind(&views[0]);
    if (kind != 'f' && kind != 'd') {
        PyErr_Format(PyExc_ValueError, "%s: expected float32 or float64 items, got format '%s'", names[0],
                     views[0].format);
        goto done;
    }
    for (int i = 1; i < 4; i++) {
        if (item_kind(&views[i]) != kind) {
            PyErr_Format(PyExc_ValueError, "%s: expected the item format of %s ('%c'), got '%s'", names[i],
                         names[0], kind, views[i].format);
            goto done;
        }
    }
    const Py_buffer *second = &views[1], *third = &views[2], *probs = &views[3], *padding = &views[4];
    int shapes_ok = third->shape[0] == T && third->shape[1] == B && third->shape[2] == K;
    if (direction == FORWARD)
        shapes_ok = shapes_ok && second->shape[0] == T && second->shape[1] == B;
    else
        shapes_ok = shapes_ok && second->shape[0] == T && second->shape[1] == B && second->shape[2] == K;
    if (!shapes_ok) {
        PyErr_Format(PyExc_ValueError, "%s, %s: shapes do not match %s [T=%zd, B=%zd, K=%zd]", names[1], names[2],
                     names[0], T, B, K);
        goto done;
    }
    const int batched = probs->ndim == 3;
    if ((batched && (probs->shape[0] != B || probs->shape[1] != K || probs->shape[2] != K)) ||
        (!batched && (probs->shape[0] != K || probs->shape[1] != K))) {
        PyErr_Format(PyExc_ValueError, "%s: expected [K, K] or [B, K, K] with B=%zd, K=%zd", names[3], B, K);
        goto done;
    }
    if (padding->itemsize != 1 || padding->shape[0] != B || padding->shape[1] != T) {
        PyErr_Format(PyExc_ValueError, "%s: expected [B=%zd, T=%zd] of one-byte booleans", names[4], B, T);
        goto done;
    }
    const Py_ssize_t stride = batched ? K * K : 0;
    Py_BEGIN_ALLOW_THREADS
    if (direction == FORWARD && kind == 'f')
        forward_float(views[0].buf, views[1].buf, views[2].buf, views[3].buf, stride, views[4].buf, T, B, K,
                      all_valid_until);
    else if (direction == FORWARD)
        forward_double(views[0].buf, views[1].buf, views[2].buf, views[3].buf, stride, views[4].buf, T, B, K,
                       all_valid_until);
    else if (kind == 'f')
        backward_float(views[0].buf, views[1].buf, views[2].buf, views[3].buf, stride, views[4].buf, T, B, K,
                       all_valid_until);
    else
        backward_double(views[0].buf, views[1].buf, views[2].buf, views[3].buf, stride, views[4].buf, T, B, K,
                        all_valid_until);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    return result;
}

static PyObject *scaled_forward(PyObject *self, PyObject *args) { return run_loop(args, FORWARD); }

static PyObject *scaled_backward(PyObject *self, PyObject *args) { return run_loop(args, BACKWARD); }

static PyMethodDef methods[] = {
    {"scaled_forward", scaled_forward, METH_VARARGS,
     "scaled_forward(alpha, scale, emit_probs, probs, padding, all_valid_until): the scaled forward loop, "
     "t = 1 .. T-1, in place (alpha[0] given)."},
    {"scaled_backward", scaled_backward, METH_VARARGS,
     "scaled_backward(beta, u, weights, probs_t, padding, all_valid_until): the scaled backward loop, "
     "t = T-1 .. 1, in place (beta[T-1] given)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_chain_loops",
                                    "Compiled time loops of the scaled forward-backward algorithm.", -1, methods};

PyMODINIT_FUNC PyInit__chain_loops(void) { return PyModule_Create(&module); }
