/* One pass over a float32 layer output for every per-unit figure the CPU route needs.
 *
 * Why this exists: the torch route makes ~8 passes over each output (a subtraction, two sums, a
 * max, a sign, a dot, a min, a read), each paying PyTorch's dispatch in the middle of a step, and
 * together they kept the agent's offload thread busy for most of a small network's step and
 * competing with the training thread for the memory bus. One pass here does the same work.
 *
 * The output is seen as [outer, units, inner] (Linear-like: inner == 1; conv-like: inner is the
 * spatial size). Each unit's moments are taken about its first element, as the torch route does
 * (see reduce.Reduced): deviations are of the order of the spread, so nothing large cancels.
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

enum { SAT_NONE = 0, SAT_TANH = 1, SAT_SIGMOID = 2 }; /* kernel.SAT_*: constants() */
/* A shapes row's last field is the saturation kind, plus RELU where the output to reduce is
 * max(x, 0) of the buffer given: a ReLU's output, read from its input (the layer before it),
 * which the offload thread then reads once for both layers (kernel.RELU_OF_INPUT). */
#define RELU 4
#define SAT_MASK 3

/* The element the figures are of: x, or the ReLU of x. `x < 0 ? 0 : x` keeps a NaN a NaN, as
 * torch.relu does, so a NaN still poisons the sums and sends the output to the exact route. */
static inline float act(float x, int relu) { return relu && x < 0.0f ? 0.0f : x; }

/* One row of elements into per-lane partial sums. `restrict`: the lanes never alias the input,
 * which lets the compiler vectorise the loop without run-time overlap checks. */
static inline void accumulate(const float *restrict v, const float *restrict ref, float *restrict sum,
                              float *restrict sq, float *restrict hi, float *restrict lo,
                              float *restrict nz, Py_ssize_t n, int relu) {
    for (Py_ssize_t k = 0; k < n; k++) {
        float x = act(v[k], relu), d = x - ref[k];
        sum[k] += d;
        sq[k] += d * d;
        hi[k] = x > hi[k] ? x : hi[k];
        lo[k] = x < lo[k] ? x : lo[k];
        nz[k] += x != 0.0f ? 1.0f : 0.0f;
    }
}

static inline void count_saturated(const float *restrict v, float *restrict st, int sat, Py_ssize_t n,
                                   int relu) {
    if (sat == SAT_TANH)
        for (Py_ssize_t k = 0; k < n; k++) st[k] += fabsf(act(v[k], relu)) > 0.99f ? 1.0f : 0.0f;
    else if (sat == SAT_SIGMOID)
        for (Py_ssize_t k = 0; k < n; k++) {
            const float x = act(v[k], relu);
            st[k] += (x < 0.01f) | (x > 0.99f) ? 1.0f : 0.0f;
        }
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

/* out is 4 rows of `ld` (a batch's units in all): at this output's first unit, each unit's
 * reference (its first element), the sums of deviations from it and of their squares, and its
 * max. Both layouts start and end their units the same way. */
static void start_units(const float *x, Py_ssize_t units, Py_ssize_t inner, double *out, Py_ssize_t ld,
                        int relu) {
    double *ref = out, *dsum = out + ld, *dsq = out + 2 * ld, *umax = out + 3 * ld;
    for (Py_ssize_t u = 0; u < units; u++) {
        ref[u] = umax[u] = act(x[u * inner], relu);
        dsum[u] = dsq[u] = 0.0;
    }
}

/* The scalars (3 rows of `ls`: min, non-zero and saturated counts), and whether every unit's sums
 * are finite (else an element was NaN/Inf, or a float32 partial sum overflowed, and the caller
 * takes the exact route). */
static int finish_units(const double *out, Py_ssize_t units, Py_ssize_t ld, float vmin, double nonzero,
                        double saturated, double *scalars, Py_ssize_t ls) {
    const double *dsum = out + ld, *dsq = out + 2 * ld;
    int finite = 1;
    for (Py_ssize_t u = 0; u < units; u++) finite &= isfinite(dsum[u]) && isfinite(dsq[u]);
    scalars[0] = vmin;
    scalars[ls] = nonzero;
    scalars[2 * ls] = saturated;
    return finite;
}

/* Where one output's results go: its columns of the batch's [4, ld] moments and [3, ls] scalars. */
typedef struct {
    double *out, *scalars;
    Py_ssize_t ld, ls;
} Dest;

/* Rows of columns: each row of `units * inner` elements updates every column's lanes, so the
 * column axis is the SIMD axis. Units on the last axis (inner == 1: Linear-like) and units before
 * a run too short for reduce_runs' lanes to pay (see SHORT_RUN) both go here;
 * a column of unit u takes u's reference, and its partials are folded into u once per block.
 * Columns go COLUMN_CHUNK at a time: the lanes stay in cache, and their memory is bounded
 * whatever the width of the output. */
static int reduce_rows(const float *x, Py_ssize_t rows, Py_ssize_t units, Py_ssize_t inner, int sat,
                       int relu, Dest d) {
    double *ref = d.out, *dsum = d.out + d.ld, *dsq = d.out + 2 * d.ld, *umax = d.out + 3 * d.ld;
    const Py_ssize_t cols = units * inner;
    const Py_ssize_t width = cols < COLUMN_CHUNK ? cols : COLUMN_CHUNK;
    Lanes l;
    if (lanes_new(&l, width) < 0) return -1;
    start_units(x, units, inner, d.out, d.ld, relu);
    float vmin = act(x[0], relu);
    double nonzero = 0.0, saturated = 0.0;
    for (Py_ssize_t c0 = 0; c0 < cols; c0 += width) {
        const Py_ssize_t n = cols - c0 < width ? cols - c0 : width;
        /* u, j: column c0 + k is unit u's j-th (counted along, not divided: a division a column
         * cost more than the reduction of a 128-row Linear output). */
        for (Py_ssize_t k = 0, u = c0 / inner, j = c0 % inner; k < n; k++) {
            l.ref[k] = (float)ref[u];
            l.hi[k] = l.lo[k] = act(x[c0 + k], relu);
            if (++j == inner) {
                j = 0;
                u++;
            }
        }
        for (Py_ssize_t start = 0; start < rows; start += BLOCK_ROWS) {
            Py_ssize_t stop = start + BLOCK_ROWS < rows ? start + BLOCK_ROWS : rows;
            lanes_clear(&l, n);
            for (Py_ssize_t i = start; i < stop; i++) {
                accumulate(x + i * cols + c0, l.ref, l.sum, l.sq, l.hi, l.lo, l.nz, n, relu);
                count_saturated(x + i * cols + c0, l.st, sat, n, relu);
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
    return finish_units(d.out, units, d.ld, vmin, nonzero, saturated, d.scalars, d.ls);
}

/* Units before a contiguous run (conv-like): each (sample, unit) is a run of `inner` elements,
 * taken LANES at a time into independent accumulators (a reduction the compiler vectorises
 * without reassociating float arithmetic). */
static int reduce_runs(const float *x, Py_ssize_t outer, Py_ssize_t units, Py_ssize_t inner, int sat,
                       int relu, Dest d) {
    double *ref = d.out, *dsum = d.out + d.ld, *dsq = d.out + 2 * d.ld, *umax = d.out + 3 * d.ld;
    Lanes l;
    if (lanes_new(&l, LANES) < 0) return -1;
    float vmin = act(x[0], relu);
    double nonzero = 0.0, saturated = 0.0;
    start_units(x, units, inner, d.out, d.ld, relu);
    for (Py_ssize_t n = 0; n < outer; n++) {
        for (Py_ssize_t u = 0; u < units; u++) {
            const float *run = x + (n * units + u) * inner;
            for (int k = 0; k < LANES; k++) {
                l.ref[k] = (float)ref[u];
                l.hi[k] = l.lo[k] = act(run[0], relu);
            }
            for (Py_ssize_t start = 0; start < inner; start += RUN_BLOCK) {
                Py_ssize_t stop = start + RUN_BLOCK < inner ? start + RUN_BLOCK : inner, i = start;
                lanes_clear(&l, LANES);
                for (; i + LANES <= stop; i += LANES) {
                    accumulate(run + i, l.ref, l.sum, l.sq, l.hi, l.lo, l.nz, LANES, relu);
                    count_saturated(run + i, l.st, sat, LANES, relu);
                }
                accumulate(run + i, l.ref, l.sum, l.sq, l.hi, l.lo, l.nz, stop - i, relu); /* the tail */
                count_saturated(run + i, l.st, sat, stop - i, relu);
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
    return finish_units(d.out, units, d.ld, vmin, nonzero, saturated, d.scalars, d.ls);
}

/* `formats`: the one-character struct codes accepted (int64 is 'l' on LP64 systems, 'q' elsewhere). */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *formats, Py_ssize_t itemsize,
                      Py_ssize_t count, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    /* len / itemsize: itemsize * count could overflow for a count the caller made up. */
    if (view->itemsize != itemsize || view->format == NULL || strlen(view->format) != 1 ||
        strchr(formats, view->format[0]) == NULL || view->len % itemsize != 0 || view->len / itemsize != count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd C-contiguous items of format '%s'", what, count,
                     formats);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The [n, 4] int64 shapes (outer, units, inner, kind: sat + RELU), copied out of the caller's buffer and checked.
 * Why a copy: the kernel writes into other buffers the caller passed, and another thread may run
 * while the GIL is released; a shapes buffer that shared memory with either could change after
 * the check, and a unit count read again then could send a write past the moments. Bounded so
 * that every index and byte count fits in a Py_ssize_t. Returns NULL with an exception set. */
static long long *take_shapes(PyObject *obj, Py_ssize_t n, Py_ssize_t *total_units, const char *fn) {
    Py_buffer view;
    if (n < 1 || n > PY_SSIZE_T_MAX / 64) {
        PyErr_Format(PyExc_ValueError, "%s: at least one output", fn);
        return NULL;
    }
    if (get_buffer(obj, &view, 0, "lq", 8, 4 * n, "shapes") < 0) return NULL;
    long long *shapes = PyMem_Malloc(sizeof(long long) * 4 * (size_t)n);
    if (shapes == NULL) {
        PyBuffer_Release(&view);
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(shapes, view.buf, sizeof(long long) * 4 * (size_t)n);
    PyBuffer_Release(&view);
    *total_units = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const long long outer = shapes[4 * i], units = shapes[4 * i + 1], inner = shapes[4 * i + 2];
        const long long kind = shapes[4 * i + 3];
        if (outer < 1 || units < 1 || inner < 1 || kind < 0 || (kind & ~(long long)(RELU | SAT_MASK)) ||
            (kind & SAT_MASK) > SAT_SIGMOID ||
            units > PY_SSIZE_T_MAX / 32 - *total_units || outer > PY_SSIZE_T_MAX / 4 / units / inner) {
            PyErr_Format(PyExc_ValueError,
                         "%s: output %zd: outer, units and inner must be positive and their product "
                         "addressable; kind 0-2, +4 for a ReLU of the buffer",
                         fn, i);
            PyMem_Free(shapes);
            return NULL;
        }
        *total_units += (Py_ssize_t)units;
    }
    return shapes;
}

/* One output, by the layout that suits its shape (see SHORT_RUN). */
static int reduce_one(const float *x, Py_ssize_t outer, Py_ssize_t units, Py_ssize_t inner, int kind, Dest d) {
    const int sat = kind & SAT_MASK, relu = (kind & RELU) != 0;
    if (units == 1 && inner == 1) /* one column: as one run, the lanes have something to do */
        return reduce_runs(x, 1, 1, outer, sat, relu, d);
    if (inner >= SHORT_RUN && inner / RUNS_OVER_ROWS >= outer)
        return reduce_runs(x, outer, units, inner, sat, relu, d);
    return reduce_rows(x, outer, units, inner, sat, relu, d);
}

static void release_all(Py_buffer *views, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) PyBuffer_Release(&views[i]);
}

PyDoc_STRVAR(reduce_doc,
             "reduce_batch(xs, shapes, moments, scalars, ok) -> None\n\n"
             "Reduces P float32 outputs in one call, the GIL released for all of them.\n"
             "xs: P C-contiguous float32 buffers. shapes: int64 [P, 4], each output's outer, units\n"
             "and inner sizes (units on the middle axis; outer*units*inner elements) and its\n"
             "saturation kind (0 none, 1 tanh, 2 sigmoid), plus 4 to reduce max(x, 0) of the\n"
             "buffer instead of x (a ReLU's output from its input). moments: float64 [4, U], U the units of all\n"
             "P outputs in order, written with each unit's reference (its first element), the sums of\n"
             "deviations from it and of their squares, and its max. scalars: float64 [3, P], written\n"
             "with each output's min, non-zero count and saturated count. ok: bool [P], False where an\n"
             "element was non-finite or a float32 partial sum overflowed: that output's results are\n"
             "then not to be used.");

static PyObject *reduce_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "reduce_batch takes 5 arguments");
        return NULL;
    }
    /* A tuple of our own: the caller's list cannot change length while buffers are taken. */
    PyObject *xs = PySequence_Tuple(args[0]);
    if (xs == NULL) return NULL;
    const Py_ssize_t n = PyTuple_GET_SIZE(xs);
    PyObject *result = NULL;
    Py_buffer mv, sv, okv;
    int have_moments = 0, have_scalars = 0, have_ok = 0;
    Py_ssize_t got = 0; /* views[0..got) are held */
    Py_buffer *views = NULL;
    Py_ssize_t total_units = 0;
    long long *shapes = take_shapes(args[1], n, &total_units, "reduce_batch");
    if (shapes == NULL) goto done;
    if (get_buffer(args[2], &mv, 1, "d", 8, 4 * total_units, "moments") < 0) goto done;
    have_moments = 1;
    if (get_buffer(args[3], &sv, 1, "d", 8, 3 * n, "scalars") < 0) goto done;
    have_scalars = 1;
    if (get_buffer(args[4], &okv, 1, "?", 1, n, "ok") < 0) goto done;
    have_ok = 1;
    views = PyMem_Malloc(sizeof(Py_buffer) * (size_t)n);
    if (views == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++) {
        const long long *sh = shapes + 4 * got;
        if (get_buffer(PyTuple_GET_ITEM(xs, got), &views[got], 0, "f", 4,
                       (Py_ssize_t)(sh[0] * sh[1] * sh[2]), "x") < 0)
            goto done;
    }
    int failed = 0;
    char *ok = okv.buf;
    Py_BEGIN_ALLOW_THREADS;
    Py_ssize_t first = 0;
    for (Py_ssize_t i = 0; i < n && !failed; i++) {
        const long long *sh = shapes + 4 * i;
        Dest d = {(double *)mv.buf + first, (double *)sv.buf + i, total_units, n};
        int found = reduce_one(views[i].buf, (Py_ssize_t)sh[0], (Py_ssize_t)sh[1], (Py_ssize_t)sh[2],
                               (int)sh[3], d);
        failed = found < 0;
        ok[i] = found > 0;
        first += (Py_ssize_t)sh[1];
    }
    Py_END_ALLOW_THREADS;
    if (failed)
        PyErr_NoMemory();
    else
        result = Py_NewRef(Py_None);
done:
    release_all(views, got);
    PyMem_Free(views);
    PyMem_Free(shapes);
    if (have_ok) PyBuffer_Release(&okv);
    if (have_scalars) PyBuffer_Release(&sv);
    if (have_moments) PyBuffer_Release(&mv);
    Py_DECREF(xs);
    return result;
}

/* The figures of each output of a batch, from its moments (reduce_batch's), as finish.Finalizer
 * computes them with torch ops for any other sample (see _activation_figures there for the why of
 * each formula). Why here too: for a batch those were ~55 small ops and ~10 MB of temporaries a
 * sample on the offload thread, longer than the reductions' Python; here they are one pass.
 * Columns of `cols` [P, FINISH_COLS]: */
enum { F_MEAN, F_STD, F_MIN, F_MAX, F_DEAD, F_ZERO, F_SAT, F_SHIFT, FINISH_COLS }; /* named in constants() */
#define SHIFT_VAR_FLOOR 0.01 /* kernel.SHIFT_VAR_FLOOR: constants() */
#define VAR_EPS 1e-12        /* kernel.VAR_EPS */

static void finish_one(const double *mom, Py_ssize_t ld, const double *sc, Py_ssize_t ls, const long long *sh,
                       const double *prev_mean, const double *prev_var, double prev_layer_var, double *cols,
                       double *umean, double *uvar, double *layer_var) {
    const Py_ssize_t units = (Py_ssize_t)sh[1];
    const double numel = (double)sh[0] * (double)sh[1] * (double)sh[2], n = numel / (double)units;
    const double *ref = mom, *dsum = mom + ld, *dsq = mom + 2 * ld, *umax = mom + 3 * ld;
    double total = 0.0, within = 0.0, mx = -INFINITY, dead = 0.0;
    for (Py_ssize_t u = 0; u < units; u++) {
        const double shift = dsum[u] / n, v = dsq[u] / n - shift * shift;
        umean[u] = ref[u] + shift;
        uvar[u] = v > 0.0 ? v : 0.0;
        total += umean[u];
        within += uvar[u];
        mx = umax[u] > mx ? umax[u] : mx;
        dead += umax[u] <= 0.0;
    }
    const double mean = total / (double)units, lvar = within / (double)units;
    double spread = 0.0;
    for (Py_ssize_t u = 0; u < units; u++) spread += (umean[u] - mean) * (umean[u] - mean);
    const double var = lvar + spread / (double)units;
    *layer_var = var; /* the shift's floor: the layer's total variance, within and across units */
    cols[F_MEAN] = mean;
    cols[F_STD] = sqrt(var > 0.0 ? var : 0.0);
    cols[F_MIN] = isfinite(sc[0]) ? sc[0] : NAN;
    cols[F_MAX] = isfinite(mx) ? mx : NAN;
    cols[F_DEAD] = dead / (double)units;
    cols[F_ZERO] = 1.0 - sc[ls] / numel;
    cols[F_SAT] = (sh[3] & SAT_MASK) == SAT_NONE ? NAN : sc[2 * ls] / numel;
    cols[F_SHIFT] = NAN;
    if (prev_mean == NULL || isnan(prev_layer_var)) return; /* no previous sample of this layer */
    const double larger = prev_layer_var > var ? prev_layer_var : var;
    const double floor_ = SHIFT_VAR_FLOOR * larger + VAR_EPS;
    double kl = 0.0;
    for (Py_ssize_t u = 0; u < units; u++) {
        /* `<` keeps a NaN (a unit the last sample could not measure) as torch.maximum does. */
        const double v1 = prev_var[u] < floor_ ? floor_ : prev_var[u], v2 = uvar[u] < floor_ ? floor_ : uvar[u];
        const double dm = prev_mean[u] - umean[u];
        kl += 0.5 * (log(v2 / v1) + (v1 + dm * dm) / v2 - 1.0);
    }
    cols[F_SHIFT] = kl / (double)units;
}

PyDoc_STRVAR(finish_doc,
             "finish_batch(moments, scalars, shapes, prev, cols, units_out, layer_var) -> None\n\n"
             "The figures of a batch reduce_batch reduced (every output finite), one row of cols\n"
             "(float64 [P, 8]) an output: mean, std, min, max, dead_frac, zero_frac, sat_frac (NaN\n"
             "for none), shift (NaN without a previous sample). units_out (float64 [2, U]) gets each\n"
             "unit's mean and variance, layer_var (float64 [P]) each output's total variance, for\n"
             "the next sample's shift. prev: None, or the last sample's (unit means [U], unit\n"
             "variances [U], total variances [P]) in this batch's layout, NaN where absent.");

static PyObject *finish_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "finish_batch takes 7 arguments");
        return NULL;
    }
    enum { MOM, SC, CO, UO, LVO, PM, PV, PLV, NVIEWS };
    Py_buffer v[NVIEWS];
    int held[NVIEWS] = {0};
    PyObject *result = NULL;
    Py_ssize_t n = 0, total_units = 0;
    long long *sh = NULL;
    /* P, the outputs, from the scalars ([3, P]); every other size is checked against it. */
    if (PyObject_GetBuffer(args[1], &v[SC], PyBUF_C_CONTIGUOUS) < 0) goto done;
    n = v[SC].len / 24;
    PyBuffer_Release(&v[SC]);
    sh = take_shapes(args[2], n, &total_units, "finish_batch");
    if (sh == NULL) goto done;
    struct {
        int at, arg, writable;
        Py_ssize_t count;
        const char *what;
    } want[] = {{MOM, 0, 0, 4 * total_units, "moments"}, {SC, 1, 0, 3 * n, "scalars"},
                {CO, 4, 1, FINISH_COLS * n, "cols"},   {UO, 5, 1, 2 * total_units, "units_out"},
                {LVO, 6, 1, n, "layer_var"}};
    for (size_t w = 0; w < sizeof(want) / sizeof(want[0]); w++) {
        if (get_buffer(args[want[w].arg], &v[want[w].at], want[w].writable, "d", 8, want[w].count, want[w].what) < 0)
            goto done;
        held[want[w].at] = 1;
    }
    const double *pm = NULL, *pv = NULL, *plv = NULL;
    if (args[3] != Py_None) {
        if (!PyTuple_Check(args[3]) || PyTuple_GET_SIZE(args[3]) != 3) {
            PyErr_SetString(PyExc_TypeError, "finish_batch: prev must be None or a 3-tuple");
            goto done;
        }
        const Py_ssize_t counts[3] = {total_units, total_units, n};
        for (int k = 0; k < 3; k++) {
            if (get_buffer(PyTuple_GET_ITEM(args[3], k), &v[PM + k], 0, "d", 8, counts[k], "prev") < 0) goto done;
            held[PM + k] = 1;
        }
        pm = v[PM].buf;
        pv = v[PV].buf;
        plv = v[PLV].buf;
    }
    const double *mom = v[MOM].buf, *sc = v[SC].buf;
    double *cols = v[CO].buf, *uo = v[UO].buf, *lvo = v[LVO].buf;
    Py_BEGIN_ALLOW_THREADS;
    Py_ssize_t first = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        finish_one(mom + first, total_units, sc + i, n, sh + 4 * i, pm ? pm + first : NULL, pv ? pv + first : NULL,
                   plv ? plv[i] : NAN, cols + FINISH_COLS * i, uo + first, uo + total_units + first, lvo + i);
        first += (Py_ssize_t)sh[4 * i + 1];
    }
    Py_END_ALLOW_THREADS;
    result = Py_NewRef(Py_None);
done:
    for (int k = 0; k < NVIEWS; k++)
        if (held[k]) PyBuffer_Release(&v[k]);
    PyMem_Free(sh);
    return result;
}

/* The constants above, for Python to check its own against (tests/test_reductions.py): they agree
 * by test, not by comment. */
static PyObject *constants(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:d,s:d,s:(ssssssss)}", "SAT_NONE", SAT_NONE, "SAT_TANH", SAT_TANH,
                         "SAT_SIGMOID", SAT_SIGMOID, "RELU_OF_INPUT", RELU, "SHIFT_VAR_FLOOR", SHIFT_VAR_FLOOR,
                         "VAR_EPS", VAR_EPS, "FINISH_STATS", "mean", "std", "min", "max", "dead_frac", "zero_frac",
                         "sat_frac", "shift");
}

static PyMethodDef methods[] = {
    {"reduce_batch", (PyCFunction)(void (*)(void))reduce_batch, METH_FASTCALL, reduce_doc},
    {"finish_batch", (PyCFunction)(void (*)(void))finish_batch, METH_FASTCALL, finish_doc},
    {"constants", constants, METH_NOARGS, "The kernel's constants and its finish columns, by name."},
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
