/* One pass over a float32 layer output for every per-unit figure the CPU route needs.
 *
 * Why this exists: the torch route makes ~8 passes over each output (a subtraction, two sums, a
 * max, a sign, a dot, a min, a read), each paying PyTorch's dispatch in the middle of a step, and
 * together they kept the agent's offload thread busy for most of a small network's step and
 * competing with the training thread for the memory bus. One pass here does the same work.
 *
 * The output is seen as [outer, units, inner] (Linear-like: inner == 1; conv-like: inner is the
 * spatial size). Each unit's moments are taken about its first element, as the torch route does
 * (see figures.Reduced): deviations are of the order of the spread, so nothing large cancels.
 * Partial sums run in float32 over short blocks (SIMD-wide) and are added into float64, so
 * rounding stays at a block's length, not the output's.
 *
 * Non-finite elements are not masked here: they make a unit's sums non-finite, the function then
 * returns False and the caller takes the exact masked route, as it does for float32 overflow.
 * The GIL is released while the loop runs: the training thread keeps the interpreter.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if defined(_MSC_VER) && !defined(restrict)
#define restrict __restrict /* MSVC's C without /std:c11 spells it so */
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK_ROWS 64 /* rows of float32 partial sums before they are added into float64 */
#define LANES 16      /* independent accumulators along a contiguous run (conv-like) */
#define RUN_BLOCK 1024 /* elements of a run each lane sums in float32 before float64 */
/* reduce_runs takes runs at least this long and at least RUNS_OVER_ROWS times longer than there
 * are rows; reduce_rows everything else. Measured (ns an element, 2-core x86-64, -O3): rows win
 * from [256, 64, 64] (0.47 vs 1.5) to [64, 64, 128] (0.55 vs 1.05); runs win from [16, 64, 1024]
 * (0.60 vs 1.27) on, where rows are too few to pay for the per-block fold. */
#define SHORT_RUN 64
#define RUNS_OVER_ROWS 8
#define COLUMN_CHUNK 4096  /* columns reduce_rows keeps lanes for at once */

enum { SAT_NONE = 0, SAT_TANH = 1, SAT_SIGMOID = 2 }; /* as figures.SAT_* */

/* One row of elements into per-lane partial sums. `restrict`: the lanes never alias the input,
 * which lets the compiler vectorise the loop without run-time overlap checks. */
static inline void accumulate(const float *restrict v, const float *restrict ref, float *restrict sum,
                              float *restrict sq, float *restrict hi, float *restrict lo,
                              float *restrict nz, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < n; k++) {
        float x = v[k], d = x - ref[k];
        sum[k] += d;
        sq[k] += d * d;
        hi[k] = x > hi[k] ? x : hi[k];
        lo[k] = x < lo[k] ? x : lo[k];
        nz[k] += x != 0.0f ? 1.0f : 0.0f;
    }
}

static inline void count_saturated(const float *restrict v, float *restrict st, int sat, Py_ssize_t n) {
    if (sat == SAT_TANH)
        for (Py_ssize_t k = 0; k < n; k++) st[k] += fabsf(v[k]) > 0.99f ? 1.0f : 0.0f;
    else if (sat == SAT_SIGMOID)
        for (Py_ssize_t k = 0; k < n; k++) st[k] += (v[k] < 0.01f) | (v[k] > 0.99f) ? 1.0f : 0.0f;
}

/* Lanes of float32 partials: the per-unit (rows) or per-lane (runs) accumulators. */
typedef struct {
    float *ref, *sum, *sq, *hi, *lo, *nz, *st;
    float *block; /* one allocation for all seven */
} Lanes;

static int lanes_new(Lanes *l, Py_ssize_t n) {
    l->block = malloc(sizeof(float) * (size_t)n * 7);
    if (l->block == NULL) return -1;
    l->ref = l->block;
    l->sum = l->ref + n;
    l->sq = l->sum + n;
    l->hi = l->sq + n;
    l->lo = l->hi + n;
    l->nz = l->lo + n;
    l->st = l->nz + n;
    return 0;
}

/* Zero the partial sums and counts (the extremes and the reference carry over). */
static void lanes_clear(Lanes *l, Py_ssize_t n) {
    memset(l->sum, 0, sizeof(float) * (size_t)n);
    memset(l->sq, 0, sizeof(float) * (size_t)n);
    memset(l->nz, 0, sizeof(float) * (size_t)n);
    memset(l->st, 0, sizeof(float) * (size_t)n);
}

/* out is [4, units]: each unit's reference (its first element), the sums of deviations from it
 * and of their squares, and its max. Both layouts start and end their units the same way. */
static void start_units(const float *x, Py_ssize_t units, Py_ssize_t inner, double *out) {
    double *ref = out, *dsum = out + units, *dsq = out + 2 * units, *umax = out + 3 * units;
    for (Py_ssize_t u = 0; u < units; u++) {
        ref[u] = umax[u] = x[u * inner];
        dsum[u] = dsq[u] = 0.0;
    }
}

/* The scalars, and whether every unit's sums are finite (else an element was NaN/Inf, or a float32
 * partial sum overflowed, and the caller takes the exact route). */
static int finish_units(const double *out, Py_ssize_t units, float vmin, double nonzero, double saturated,
                        double *scalars) {
    const double *dsum = out + units, *dsq = out + 2 * units;
    int finite = 1;
    for (Py_ssize_t u = 0; u < units; u++) finite &= isfinite(dsum[u]) && isfinite(dsq[u]);
    scalars[0] = vmin;
    scalars[1] = nonzero;
    scalars[2] = saturated;
    return finite;
}

/* Rows of columns: each row of `units * inner` elements updates every column's lanes, so the
 * column axis is the SIMD axis. Units on the last axis (inner == 1: Linear-like) and units before
 * a run too short for reduce_runs' lanes to pay (see SHORT_RUN) both go here;
 * a column of unit u takes u's reference, and its partials are folded into u once per block.
 * Columns go COLUMN_CHUNK at a time: the lanes stay in cache, and their memory is bounded
 * whatever the width of the output. */
static int reduce_rows(const float *x, Py_ssize_t rows, Py_ssize_t units, Py_ssize_t inner, int sat,
                       double *out, double *scalars) {
    double *ref = out, *dsum = out + units, *dsq = out + 2 * units, *umax = out + 3 * units;
    const Py_ssize_t cols = units * inner;
    const Py_ssize_t width = cols < COLUMN_CHUNK ? cols : COLUMN_CHUNK;
    Lanes l;
    if (lanes_new(&l, width) < 0) return -1;
    start_units(x, units, inner, out);
    float vmin = x[0];
    double nonzero = 0.0, saturated = 0.0;
    for (Py_ssize_t c0 = 0; c0 < cols; c0 += width) {
        const Py_ssize_t n = cols - c0 < width ? cols - c0 : width;
        /* u, j: column c0 + k is unit u's j-th (counted along, not divided: a division a column
         * cost more than the reduction of a 128-row Linear output). */
        for (Py_ssize_t k = 0, u = c0 / inner, j = c0 % inner; k < n; k++) {
            l.ref[k] = (float)ref[u];
            l.hi[k] = l.lo[k] = x[c0 + k];
            if (++j == inner) {
                j = 0;
                u++;
            }
        }
        for (Py_ssize_t start = 0; start < rows; start += BLOCK_ROWS) {
            Py_ssize_t stop = start + BLOCK_ROWS < rows ? start + BLOCK_ROWS : rows;
            lanes_clear(&l, n);
            for (Py_ssize_t i = start; i < stop; i++) {
                accumulate(x + i * cols + c0, l.ref, l.sum, l.sq, l.hi, l.lo, l.nz, n);
                count_saturated(x + i * cols + c0, l.st, sat, n);
            }
            /* Fold the columns into their units. With one column a unit (the common Linear case)
             * the loop is plain, and vectorised. */
            if (inner == 1) {
                for (Py_ssize_t k = 0; k < n; k++) {
                    dsum[c0 + k] += l.sum[k];
                    dsq[c0 + k] += l.sq[k];
                }
            } else {
                for (Py_ssize_t k = 0, u = c0 / inner, j = c0 % inner; k < n; k++) {
                    dsum[u] += l.sum[k];
                    dsq[u] += l.sq[k];
                    if (++j == inner) {
                        j = 0;
                        u++;
                    }
                }
            }
            for (Py_ssize_t k = 0; k < n; k++) {
                nonzero += l.nz[k];
                saturated += l.st[k];
            }
        }
        for (Py_ssize_t k = 0, u = c0 / inner, j = c0 % inner; k < n; k++) {
            umax[u] = l.hi[k] > umax[u] ? l.hi[k] : umax[u];
            vmin = l.lo[k] < vmin ? l.lo[k] : vmin;
            if (++j == inner) {
                j = 0;
                u++;
            }
        }
    }
    free(l.block);
    return finish_units(out, units, vmin, nonzero, saturated, scalars);
}

/* Units before a contiguous run (conv-like): each (sample, unit) is a run of `inner` elements,
 * taken LANES at a time into independent accumulators (a reduction the compiler vectorises
 * without reassociating float arithmetic). */
static int reduce_runs(const float *x, Py_ssize_t outer, Py_ssize_t units, Py_ssize_t inner, int sat,
                       double *out, double *scalars) {
    double *ref = out, *dsum = out + units, *dsq = out + 2 * units, *umax = out + 3 * units;
    Lanes l;
    if (lanes_new(&l, LANES) < 0) return -1;
    float vmin = x[0];
    double nonzero = 0.0, saturated = 0.0;
    start_units(x, units, inner, out);
    for (Py_ssize_t n = 0; n < outer; n++) {
        for (Py_ssize_t u = 0; u < units; u++) {
            const float *run = x + (n * units + u) * inner;
            for (int k = 0; k < LANES; k++) {
                l.ref[k] = (float)ref[u];
                l.hi[k] = l.lo[k] = run[0];
            }
            for (Py_ssize_t start = 0; start < inner; start += RUN_BLOCK) {
                Py_ssize_t stop = start + RUN_BLOCK < inner ? start + RUN_BLOCK : inner, i = start;
                lanes_clear(&l, LANES);
                for (; i + LANES <= stop; i += LANES) {
                    accumulate(run + i, l.ref, l.sum, l.sq, l.hi, l.lo, l.nz, LANES);
                    count_saturated(run + i, l.st, sat, LANES);
                }
                accumulate(run + i, l.ref, l.sum, l.sq, l.hi, l.lo, l.nz, stop - i); /* the tail */
                count_saturated(run + i, l.st, sat, stop - i);
                for (int k = 0; k < LANES; k++) {
                    dsum[u] += l.sum[k];
                    dsq[u] += l.sq[k];
                    nonzero += l.nz[k];
                    saturated += l.st[k];
                }
            }
            for (int k = 0; k < LANES; k++) {
                umax[u] = l.hi[k] > umax[u] ? l.hi[k] : umax[u];
                vmin = l.lo[k] < vmin ? l.lo[k] : vmin;
            }
        }
    }
    free(l.block);
    return finish_units(out, units, vmin, nonzero, saturated, scalars);
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *format,
                      Py_ssize_t itemsize, Py_ssize_t count, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    /* len / itemsize: itemsize * count could overflow for a count the caller made up. */
    if (view->itemsize != itemsize || view->format == NULL || strcmp(view->format, format) != 0 ||
        view->len % itemsize != 0 || view->len / itemsize != count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd C-contiguous items of format '%s'", what, count,
                     format);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(reduce_doc,
             "reduce_f32(x, outer, units, inner, sat, out, scalars) -> bool\n\n"
             "x: float32 buffer of outer*units*inner elements (units on the middle axis).\n"
             "out: float64 buffer [4, units] written with each unit's reference (first element),\n"
             "sum and sum of squares of deviations from it, and max. scalars: float64 [3] written\n"
             "with the min, the non-zero count and the saturated count (sat: 0 none, 1 tanh, 2\n"
             "sigmoid). False when an element is non-finite or a float32 partial sum overflowed:\n"
             "the results are then not to be used.");

static PyObject *reduce_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "reduce_f32 takes 7 arguments");
        return NULL;
    }
    Py_ssize_t outer, units, inner;
    long sat;
    if ((outer = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred()) return NULL;
    if ((units = PyLong_AsSsize_t(args[2])) == -1 && PyErr_Occurred()) return NULL;
    if ((inner = PyLong_AsSsize_t(args[3])) == -1 && PyErr_Occurred()) return NULL;
    if ((sat = PyLong_AsLong(args[4])) == -1 && PyErr_Occurred()) return NULL;
    /* Bounded so that every index and byte count below fits in a Py_ssize_t. */
    if (outer < 1 || units < 1 || inner < 1 || sat < SAT_NONE || sat > SAT_SIGMOID ||
        units > PY_SSIZE_T_MAX / 32 || outer > PY_SSIZE_T_MAX / 4 / units / inner) {
        PyErr_SetString(PyExc_ValueError,
                        "reduce_f32: outer, units and inner must be positive and their product "
                        "addressable; sat 0-2");
        return NULL;
    }
    Py_buffer xv, ov, sv;
    if (get_buffer(args[0], &xv, 0, "f", 4, outer * units * inner, "x") < 0) return NULL;
    if (get_buffer(args[5], &ov, 1, "d", 8, 4 * units, "out") < 0) {
        PyBuffer_Release(&xv);
        return NULL;
    }
    if (get_buffer(args[6], &sv, 1, "d", 8, 3, "scalars") < 0) {
        PyBuffer_Release(&xv);
        PyBuffer_Release(&ov);
        return NULL;
    }
    int found;
    Py_BEGIN_ALLOW_THREADS;
    if (units == 1 && inner == 1) /* one column: as one run, the lanes have something to do */
        found = reduce_runs(xv.buf, 1, 1, outer, (int)sat, ov.buf, sv.buf);
    else if (inner >= SHORT_RUN && inner / RUNS_OVER_ROWS >= outer)
        found = reduce_runs(xv.buf, outer, units, inner, (int)sat, ov.buf, sv.buf);
    else
        found = reduce_rows(xv.buf, outer, units, inner, (int)sat, ov.buf, sv.buf);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&xv);
    PyBuffer_Release(&ov);
    PyBuffer_Release(&sv);
    if (found < 0) return PyErr_NoMemory();
    return PyBool_FromLong(found);
}

static PyMethodDef methods[] = {
    {"reduce_f32", (PyCFunction)(void (*)(void))reduce_f32, METH_FASTCALL, reduce_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fused",
    .m_doc = "One-pass reductions of float32 layer outputs (CPU).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
