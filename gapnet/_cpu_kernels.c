/* Max pooling of NCHW-contiguous float32/float64 planes on the CPU, forward and backward.
 *
 * Plain C99 + POSIX threads, no torch headers: gapnet._cpu_kernels compiles it on first use
 * and calls it through ctypes (see that module for why). Every rule here is PyTorch's CPU kernel's:
 *
 * - a window scans its in-bounds cells in row-major order with `v > m || isnan(v)`, starting
 *   from m = -inf at its first in-bounds cell: ties go to the first maximum, a window with a
 *   NaN gives NaN and the index of its last NaN, a window of -inf its first real cell;
 * - indices are flat h*W + w within the plane (return_indices);
 * - the backward adds each output's gradient at its index, the outputs of a plane in order
 *   (deterministic: each plane belongs to one thread).
 *
 * Geometry, as gapnet._shapes.Window2d gives it (padding may be asymmetric: only the top/left
 * padding and the output size are needed): g[] = {planes, H, W, OH, OW, kh, kw, sh, sw, dh, dw,
 * top, left}.
 *
 * The forward works an output row at a time: for each in-bounds (row tap, column tap) it runs
 * one loop over the output columns for which that column tap is in bounds, so the inner loop
 * has no bounds test and a compile-time stride (1 or 2: the common pools) that the compiler
 * vectorises. The row's running max lives in the output row itself and its indices in a
 * 32-bit buffer (same width as float: one vector lane each), both in L1.
 */
#define _POSIX_C_SOURCE 200809L /* pthreads, sched_yield */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>
#include <sched.h>

#define GAPNET_ABI 1

int gapnet_abi(void) { return GAPNET_ABI; }

typedef struct {
    int64_t planes, h, w, oh, ow, kh, kw, sh, sw, dh, dw, top, left;
} geom_t;

static geom_t read_geom(const int64_t *g) {
    geom_t r = {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12]};
    return r;
}

/* ceil(a / b) for b > 0 and any a */
static int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

/* [lo, hi): outputs along an axis whose tap at offset `first` (input position of output 0)
 * lies in [0, size) */
static void span(int64_t first, int64_t stride, int64_t size, int64_t out, int64_t *lo,
                 int64_t *hi) {
    int64_t l = first >= 0 ? 0 : ceil_div(-first, stride);
    int64_t h = size - 1 - first < 0 ? 0 : (size - 1 - first) / stride + 1;
    *lo = l;
    *hi = h < out ? h : out;
}

/* One tap over outputs [0, n) of a row: src[j*S] against m[j]; `base + j*S` is the flat
 * index src[j*S] has. The take rule is PyTorch's: greater, or NaN. */
#define TAP_LOOP(T, IT, S)                                                                     \
    for (int64_t j = 0; j < n; j++) {                                                          \
        T v = src[j * (S)];                                                                    \
        int take = (v > m[j]) | (v != v);                                                      \
        m[j] = take ? v : m[j];                                                                \
        id[j] = take ? (IT)(base + j * (S)) : id[j];                                           \
    }

#define TAP_LOOP_VALUES(T, S)                                                                  \
    for (int64_t j = 0; j < n; j++) {                                                          \
        T v = src[j * (S)];                                                                    \
        m[j] = ((v > m[j]) | (v != v)) ? v : m[j];                                             \
    }

/* tap_<T>_<IT>: one tap, with indices into `id` (or values only where id is NULL) */
#define DEFINE_TAP(NAME, T, IT)                                                                \
    static void NAME(const T *restrict src, T *restrict m, IT *restrict id, int64_t base,      \
                     int64_t n, int64_t stride) {                                              \
        if (!id) {                                                                             \
            if (stride == 1) {                                                                 \
                TAP_LOOP_VALUES(T, 1)                                                          \
            } else if (stride == 2) {                                                          \
                TAP_LOOP_VALUES(T, 2)                                                          \
            } else {                                                                           \
                TAP_LOOP_VALUES(T, stride)                                                     \
            }                                                                                  \
        } else if (stride == 1) {                                                              \
            TAP_LOOP(T, IT, 1)                                                                 \
        } else if (stride == 2) {                                                              \
            TAP_LOOP(T, IT, 2)                                                                 \
        } else {                                                                               \
            TAP_LOOP(T, IT, stride)                                                            \
        }                                                                                      \
    }

/* What every row of a call shares, worked out once per call (integer divisions cost dozens
 * of cycles: per row and tap they cost more than pooling a short row). */
typedef struct {
    geom_t g;
    int64_t *a_lo, *a_hi;    /* [OH]: the in-bounds row taps [a_lo, a_hi) of output row i */
    int64_t *b_lo, *b_hi;    /* [kw]: the outputs [b_lo, b_hi) for which column tap b is in bounds */
    int64_t *first_col;      /* [OW]: the first in-bounds input column of output column j */
    int64_t j_lo, j_hi;      /* the outputs for which every column tap is in bounds */
    int fast;                /* which unrolled window kernel takes the interior (FAST_*), or 0 */
} plan_t;

enum { FAST_NONE, FAST_2X2_S2, FAST_3X3_S2, FAST_3X3_S1 };

static void free_plan(plan_t *p) {
    free(p->a_lo);
    free(p->b_lo);
    free(p->first_col);
}

static int make_plan(plan_t *p, const int64_t *geom) {
    geom_t g = read_geom(geom);
    p->g = g;
    p->a_lo = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * g.oh));
    p->b_lo = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * g.kw));
    p->first_col = (int64_t *)malloc(sizeof(int64_t) * (size_t)(g.ow > 0 ? g.ow : 1));
    if (!p->a_lo || !p->b_lo || !p->first_col) {
        free_plan(p);
        return -1;
    }
    p->a_hi = p->a_lo + g.oh;
    p->b_hi = p->b_lo + g.kw;
    for (int64_t i = 0; i < g.oh; i++)
        span(i * g.sh - g.top, g.dh, g.h, g.kh, &p->a_lo[i], &p->a_hi[i]);
    for (int64_t b = 0; b < g.kw; b++)
        span(b * g.dw - g.left, g.sw, g.w, g.ow, &p->b_lo[b], &p->b_hi[b]);
    for (int64_t j = 0; j < g.ow; j++) {
        int64_t c = j * g.sw - g.left;
        p->first_col[j] = c < 0 ? c + ceil_div(-c, g.dw) * g.dw : c;
    }
    p->j_lo = 0;
    p->j_hi = g.ow;
    for (int64_t b = 0; b < g.kw; b++) {
        p->j_lo = p->b_lo[b] > p->j_lo ? p->b_lo[b] : p->j_lo;
        p->j_hi = p->b_hi[b] < p->j_hi ? p->b_hi[b] : p->j_hi;
    }
    p->fast = FAST_NONE;
    if (g.kh == 2 && g.kw == 2 && g.sw == 2) p->fast = FAST_2X2_S2;
    if (g.kh == 3 && g.kw == 3 && g.sw == 2) p->fast = FAST_3X3_S2;
    if (g.kh == 3 && g.kw == 3 && g.sw == 1) p->fast = FAST_3X3_S1;
    return 0;
}

/* part_<T>_<IT>: outputs [j0, j1) of output row i of one plane, tap by tap (any window).
 * y, id: the row's OW outputs and indices (id NULL: values only). */
#define DEFINE_PART(NAME, TAP, T, IT)                                                          \
    static void NAME(const T *restrict x, T *restrict y, IT *restrict id, const plan_t *p,     \
                     int64_t i, int64_t j0, int64_t j1) {                                      \
        const geom_t *g = &p->g;                                                               \
        int64_t r_first = i * g->sh - g->top, a_lo = p->a_lo[i], a_hi = p->a_hi[i];            \
        for (int64_t j = j0; j < j1; j++) y[j] = (T)(-INFINITY);                               \
        if (id) { /* each window's first in-bounds cell, the index a window of -inf keeps */   \
            int64_t row = (r_first + a_lo * g->dh) * g->w;                                     \
            for (int64_t j = j0; j < j1; j++) id[j] = (IT)(row + p->first_col[j]);             \
        }                                                                                      \
        for (int64_t a = a_lo; a < a_hi; a++) {                                                \
            int64_t r = r_first + a * g->dh;                                                   \
            const T *xr = x + r * g->w;                                                        \
            for (int64_t b = 0; b < g->kw; b++) {                                              \
                int64_t lo = p->b_lo[b] > j0 ? p->b_lo[b] : j0;                                \
                int64_t hi = p->b_hi[b] < j1 ? p->b_hi[b] : j1;                                \
                if (hi <= lo) continue;                                                        \
                int64_t c = b * g->dw - g->left + lo * g->sw;                                  \
                TAP(xr + c, y + lo, id ? id + lo : NULL, r * g->w + c, hi - lo, g->sw);        \
            }                                                                                  \
        }                                                                                      \
    }

/* win_<KH>x<KW>_s<S>_<T>[_<IT>]: outputs [0, n) of an output row whose windows lie wholly
 * inside the input, the taps unrolled (compile-time kernel and column stride) and the running
 * max in registers; src: the windows' top-left cells, rstep: rows between row taps (dh*W),
 * base: src's flat index. Ties: the strict > keeps the first maximum. NaN is not handled
 * (the row is redone tap by tap): returns whether a NaN was read. */
#define TAPS_2X2(STEP) STEP(0, 1) STEP(1, 0) STEP(1, 1)
#define TAPS_3X3(STEP)                                                                         \
    STEP(0, 1) STEP(0, 2) STEP(1, 0) STEP(1, 1) STEP(1, 2) STEP(2, 0) STEP(2, 1) STEP(2, 2)

/* one tap after the first (0, 0), with the chosen tap's offset k */
#define INDEX_STEP(A, B)                                                                       \
    {                                                                                          \
        __typeof__(m) v = s[(A) * rstep + (B) * dw];                                           \
        int take = v > m;                                                                      \
        bad |= v != v;                                                                         \
        m = take ? v : m;                                                                      \
        k = take ? (__typeof__(k))((A) * rstep + (B) * dw) : k;                                \
    }

/* Values only, the window separable: a max over KH rows for each input column the row's
 * windows cover (into tmp: stride 1, contiguous loads), then over KW columns of that. With
 * indices this order would break ties column-major, so the indexed kernel below does not. */
#define DEFINE_WINDOW(NAME, T, KH, KW, S)                                                      \
    static int NAME(const T *restrict src, T *restrict y, int64_t n, int64_t rstep,            \
                    int64_t dw, T *restrict tmp) {                                             \
        int64_t cols = (n - 1) * (S) + ((KW) - 1) * dw + 1;                                    \
        int bad = 0;                                                                           \
        for (int64_t c = 0; c < cols; c++) {                                                   \
            T m = src[c];                                                                      \
            bad |= m != m;                                                                     \
            for (int a = 1; a < (KH); a++) {                                                   \
                T v = src[a * rstep + c];                                                      \
                bad |= v != v;                                                                 \
                m = v > m ? v : m;                                                             \
            }                                                                                  \
            tmp[c] = m;                                                                        \
        }                                                                                      \
        for (int64_t j = 0; j < n; j++) {                                                      \
            const T *s = tmp + j * (S);                                                        \
            T m = s[0];                                                                        \
            for (int b = 1; b < (KW); b++) {                                                   \
                T v = s[b * dw];                                                               \
                m = v > m ? v : m;                                                             \
            }                                                                                  \
            y[j] = m;                                                                          \
        }                                                                                      \
        return bad;                                                                            \
    }

/* indices in IT arithmetic throughout (offsets within a plane fit): with 64-bit offsets
 * next to 32-bit lanes the compiler would not vectorise the loop */
#define DEFINE_WINDOW_INDEXED(NAME, T, IT, TAPS, S)                                            \
    static int NAME(const T *restrict src, T *restrict y, IT *restrict id, int64_t base64,     \
                    int64_t n64, int64_t rstep64, int64_t dw64) {                              \
        IT base = (IT)base64, n = (IT)n64, rstep = (IT)rstep64, dw = (IT)dw64;                 \
        int bad = 0;                                                                           \
        for (IT j = 0; j < n; j++) {                                                           \
            const T *s = src + j * (S);                                                        \
            T m = s[0];                                                                        \
            IT k = 0;                                                                          \
            bad |= m != m;                                                                     \
            TAPS(INDEX_STEP)                                                                   \
            y[j] = m;                                                                          \
            id[j] = base + j * (S) + k;                                                        \
        }                                                                                      \
        return bad;                                                                            \
    }

/* one_<T>_<IT>: output (i, j) of one plane, PyTorch's scan written out (the border outputs
 * of rows whose interior goes through a window kernel: a few per row) */
#define DEFINE_ONE(NAME, T, IT)                                                                \
    static void NAME(const T *restrict x, T *restrict y, IT *restrict id, const plan_t *p,     \
                     int64_t i, int64_t j) {                                                   \
        const geom_t *g = &p->g;                                                               \
        int64_t r_first = i * g->sh - g->top, c_first = j * g->sw - g->left;                   \
        int64_t k = (r_first + p->a_lo[i] * g->dh) * g->w + p->first_col[j];                   \
        T m = (T)(-INFINITY);                                                                  \
        for (int64_t a = p->a_lo[i]; a < p->a_hi[i]; a++) {                                    \
            int64_t r = r_first + a * g->dh;                                                   \
            for (int64_t b = 0; b < g->kw; b++) {                                              \
                int64_t c = c_first + b * g->dw;                                               \
                if (c < 0 || c >= g->w) continue;                                              \
                T v = x[r * g->w + c];                                                         \
                if (v > m || v != v) {                                                         \
                    m = v;                                                                     \
                    k = r * g->w + c;                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        y[j] = m;                                                                              \
        if (id) id[j] = (IT)k;                                                                 \
    }

/* row_<T>_<IT>: output row i of one plane: the interior by an unrolled window kernel where
 * one fits (and no NaN is in it), the rest tap by tap. */
#define DEFINE_ROW(NAME, PART, ONE, T, IT, W22, W33S2, W33S1, W22I, W33S2I, W33S1I)                 \
    static void NAME(const T *restrict x, T *restrict y, IT *restrict id, const plan_t *p,     \
                     int64_t i, T *restrict tmp) {                                             \
        const geom_t *g = &p->g;                                                               \
        int64_t lo = p->j_lo, hi = p->j_hi, n = hi - lo;                                       \
        if (!p->fast || n <= 0 || p->a_lo[i] != 0 || p->a_hi[i] != g->kh) {                    \
            PART(x, y, id, p, i, 0, g->ow);                                                    \
            return;                                                                            \
        }                                                                                      \
        int64_t r = i * g->sh - g->top, c = lo * g->sw - g->left, rstep = g->dh * g->w;        \
        const T *src = x + r * g->w + c;                                                       \
        int bad;                                                                               \
        if (id) {                                                                              \
            int64_t base = r * g->w + c;                                                       \
            if (p->fast == FAST_2X2_S2) bad = W22I(src, y + lo, id + lo, base, n, rstep, g->dw); \
            else if (p->fast == FAST_3X3_S2)                                                   \
                bad = W33S2I(src, y + lo, id + lo, base, n, rstep, g->dw);                     \
            else bad = W33S1I(src, y + lo, id + lo, base, n, rstep, g->dw);                    \
        } else {                                                                               \
            if (p->fast == FAST_2X2_S2) bad = W22(src, y + lo, n, rstep, g->dw, tmp);             \
            else if (p->fast == FAST_3X3_S2) bad = W33S2(src, y + lo, n, rstep, g->dw, tmp);      \
            else bad = W33S1(src, y + lo, n, rstep, g->dw, tmp);                                  \
        }                                                                                      \
        if (bad) PART(x, y, id, p, i, lo, hi);                                                 \
        for (int64_t j = 0; j < lo; j++) ONE(x, y, id, p, i, j);                               \
        for (int64_t j = hi; j < g->ow; j++) ONE(x, y, id, p, i, j);                           \
    }

DEFINE_TAP(tap_f32_i32, float, int32_t)
DEFINE_TAP(tap_f32_i64, float, int64_t)
DEFINE_TAP(tap_f64_i64, double, int64_t)
DEFINE_PART(part_f32_i32, tap_f32_i32, float, int32_t)
DEFINE_PART(part_f32_i64, tap_f32_i64, float, int64_t)
DEFINE_PART(part_f64_i64, tap_f64_i64, double, int64_t)

DEFINE_WINDOW(win_2x2_s2_f32, float, 2, 2, 2)
DEFINE_WINDOW(win_3x3_s2_f32, float, 3, 3, 2)
DEFINE_WINDOW(win_3x3_s1_f32, float, 3, 3, 1)
DEFINE_WINDOW(win_2x2_s2_f64, double, 2, 2, 2)
DEFINE_WINDOW(win_3x3_s2_f64, double, 3, 3, 2)
DEFINE_WINDOW(win_3x3_s1_f64, double, 3, 3, 1)
DEFINE_WINDOW_INDEXED(win_2x2_s2_f32_i32, float, int32_t, TAPS_2X2, 2)
DEFINE_WINDOW_INDEXED(win_3x3_s2_f32_i32, float, int32_t, TAPS_3X3, 2)
DEFINE_WINDOW_INDEXED(win_3x3_s1_f32_i32, float, int32_t, TAPS_3X3, 1)
DEFINE_WINDOW_INDEXED(win_2x2_s2_f64_i64, double, int64_t, TAPS_2X2, 2)
DEFINE_WINDOW_INDEXED(win_3x3_s2_f64_i64, double, int64_t, TAPS_3X3, 2)
DEFINE_WINDOW_INDEXED(win_3x3_s1_f64_i64, double, int64_t, TAPS_3X3, 1)

DEFINE_ONE(one_f32_i32, float, int32_t)
DEFINE_ONE(one_f64_i64, double, int64_t)

DEFINE_ROW(row_f32_i32, part_f32_i32, one_f32_i32, float, int32_t, win_2x2_s2_f32, win_3x3_s2_f32,
           win_3x3_s1_f32, win_2x2_s2_f32_i32, win_3x3_s2_f32_i32, win_3x3_s1_f32_i32)
DEFINE_ROW(row_f64_i64, part_f64_i64, one_f64_i64, double, int64_t, win_2x2_s2_f64, win_3x3_s2_f64,
           win_3x3_s1_f64, win_2x2_s2_f64_i64, win_3x3_s2_f64_i64, win_3x3_s1_f64_i64)

/* planes of 2^31 cells or more: indices need 64 bits, tap by tap */
static void row_f32_i64(const float *restrict x, float *restrict y, int64_t *restrict id,
                        const plan_t *p, int64_t i, float *restrict tmp) {
    (void)tmp;
    part_f32_i64(x, y, id, p, i, 0, p->g.ow);
}

/* ------------------------------------------------------------------------- threads
 * Work is shared out in items (whole output rows of one plane, a few thousand outputs; a
 * plane in the backward) taken from an atomic counter by the calling thread and by helper
 * threads started for the call. The caller waits only for the items to be done, never for a
 * helper to arrive: on a machine where other processes hold the cores, a helper the OS has
 * not scheduled yet would keep a join (an OpenMP region's end) waiting a whole time slice
 * (measured: 2x2 pools of 2 ms taking 8 ms); here a late helper finds no work and exits.
 * Helpers are detached and the job is freed by whoever leaves it last, so nothing outlives
 * the call but a helper on its way out, and no thread pool is left behind for fork(). */

typedef void (*item_fn)(void *ctx, int64_t item, void *scratch);

typedef struct {
    int64_t next, done, items; /* claimed, finished, all */
    int refs, failed;          /* threads still holding the job; a scratch allocation failed */
    item_fn fn;
    void *ctx;
    size_t scratch; /* bytes of scratch per thread */
} job_t;

static void release(job_t *j) {
    if (__atomic_sub_fetch(&j->refs, 1, __ATOMIC_ACQ_REL) == 0) free(j);
}

static void work(job_t *j) {
    void *scratch = NULL;
    for (;;) {
        int64_t item = __atomic_fetch_add(&j->next, 1, __ATOMIC_ACQ_REL);
        if (item >= j->items) break;
        if (!scratch && j->scratch) scratch = malloc(j->scratch);
        if (scratch || !j->scratch) j->fn(j->ctx, item, scratch);
        else __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&j->done, 1, __ATOMIC_RELEASE);
    }
    free(scratch);
}

static void *helper(void *arg) {
    job_t *j = (job_t *)arg;
    work(j);
    release(j);
    return NULL;
}

/* fn(ctx, item, scratch) for items [0, items) on up to `threads` threads; 0, or -1 */
static int run(item_fn fn, void *ctx, int64_t items, size_t scratch, int threads) {
    job_t *j = (job_t *)calloc(1, sizeof(job_t));
    if (!j) return -1;
    j->items = items;
    j->fn = fn;
    j->ctx = ctx;
    j->scratch = scratch;
    j->refs = 1;
    for (int t = 1; t < threads; t++) { /* a helper that cannot start: fewer threads */
        pthread_attr_t attr;
        pthread_t id;
        if (pthread_attr_init(&attr)) break;
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        __atomic_add_fetch(&j->refs, 1, __ATOMIC_RELAXED);
        if (pthread_create(&id, &attr, helper, j)) __atomic_sub_fetch(&j->refs, 1, __ATOMIC_RELAXED);
        pthread_attr_destroy(&attr);
    }
    work(j);
    while (__atomic_load_n(&j->done, __ATOMIC_ACQUIRE) < items) sched_yield();
    int failed = __atomic_load_n(&j->failed, __ATOMIC_RELAXED);
    release(j);
    return failed ? -1 : 0;
}

static int64_t rows_per_item(const geom_t *g) {
    int64_t rows = 4096 / (g->ow > 0 ? g->ow : 1);
    if (rows < 1) rows = 1;
    return rows < g->oh ? rows : g->oh;
}

/* below ~64K cells of work a thread's start (tens of us) costs more than it saves */
static int team_size(int threads, int64_t items, int64_t cells) {
    int64_t t = threads < 1 ? 1 : threads;
    int64_t useful = cells / 65536;
    if (t > useful) t = useful;
    if (t > items) t = items;
    return t < 1 ? 1 : (int)t;
}

/* the 32-bit indices of a row into the int64 output (a function: its restrict pointers let
 * the loop vectorise) */
static void widen(int64_t *restrict dst, const int32_t *restrict src, int64_t n) {
    for (int64_t j = 0; j < n; j++) dst[j] = src[j];
}
static void widen_none(int64_t *restrict dst, const int64_t *restrict src, int64_t n) {
    (void)dst, (void)src, (void)n;
}

typedef struct {
    const void *x;
    void *y;
    int64_t *idx;
    const plan_t *plan;
    int64_t per, chunks; /* output rows per item; items per plane */
} forward_t;

/* The forward, for one (value type, index type): `ROW` pools one output row. Scratch: the
 * row kernels' column buffer (W values) and, for float32, the row's 32-bit indices (OW),
 * widened into `idx` per row. */
#define DEFINE_FORWARD(NAME, ROW, WIDEN, T, IT)                                                \
    static void NAME##_item(void *ctx, int64_t item, void *scratch) {                          \
        const forward_t *f = (const forward_t *)ctx;                                           \
        const geom_t *g = &f->plan->g;                                                         \
        int64_t *idx = f->idx;                                                                 \
        IT *buf = sizeof(IT) != sizeof(int64_t) ? (IT *)scratch : NULL;                        \
        T *tmp = (T *)((char *)scratch + sizeof(int64_t) * (size_t)g->ow);                     \
        int64_t p = item / f->chunks, i0 = (item % f->chunks) * f->per;                        \
        int64_t i1 = i0 + f->per < g->oh ? i0 + f->per : g->oh;                                \
        const T *xp = (const T *)f->x + p * g->h * g->w;                                       \
        for (int64_t i = i0; i < i1; i++) {                                                    \
            int64_t o = (p * g->oh + i) * g->ow;                                               \
            IT *id = idx ? (buf ? buf : (IT *)(void *)(idx + o)) : NULL;                       \
            ROW(xp, (T *)f->y + o, id, f->plan, i, tmp);                                       \
            if (idx && buf) WIDEN(idx + o, buf, g->ow);                                        \
        }                                                                                      \
    }                                                                                          \
    static int NAME(const T *x, T *y, int64_t *idx, const plan_t *plan, int threads) {         \
        const geom_t *g = &plan->g;                                                            \
        forward_t f = {x, y, idx, plan, rows_per_item(g), 0};                                  \
        f.chunks = (g->oh + f.per - 1) / f.per;                                                \
        int64_t items = g->planes * f.chunks;                                                  \
        int team = team_size(threads, items, g->planes * g->h * g->w);                         \
        size_t scratch = sizeof(int64_t) * (size_t)g->ow + sizeof(T) * (size_t)g->w;           \
        return run(NAME##_item, &f, items, scratch, team);                                     \
    }

DEFINE_FORWARD(forward_f32_i32, row_f32_i32, widen, float, int32_t)
DEFINE_FORWARD(forward_f32_i64, row_f32_i64, widen_none, float, int64_t)
DEFINE_FORWARD(forward_f64_i64, row_f64_i64, widen_none, double, int64_t)

/* y (planes, OH, OW) = max over the windows of x (planes, H, W); idx (same shape) the flat
 * index of each max, or NULL for values only. Returns 0, or -1 if memory could not be had. */
int gapnet_max_pool2d_f32(const float *x, float *y, int64_t *idx, const int64_t *geom,
                          int threads) {
    plan_t p;
    if (make_plan(&p, geom)) return -1;
    int big = idx && p.g.h * p.g.w > INT32_MAX;
    int rc = big ? forward_f32_i64(x, y, idx, &p, threads) : forward_f32_i32(x, y, idx, &p, threads);
    free_plan(&p);
    return rc;
}

int gapnet_max_pool2d_f64(const double *x, double *y, int64_t *idx, const int64_t *geom,
                          int threads) {
    plan_t p;
    if (make_plan(&p, geom)) return -1;
    int rc = forward_f64_i64(x, y, idx, &p, threads);
    free_plan(&p);
    return rc;
}

typedef struct {
    const void *gy;
    const int64_t *idx;
    void *gx;
    int64_t hw, n; /* cells of a plane, outputs of a plane */
    int bad;       /* an index outside its plane */
} backward_t;

/* gx (planes, H, W) = 0, then gx[p][idx[p][k]] += gy[p][k] for the outputs k of each plane in
 * order. Returns 0, or -2 if an index lies outside its plane (gx is then incomplete). */
#define DEFINE_BACKWARD(NAME, T)                                                               \
    static void NAME##_item(void *ctx, int64_t p, void *scratch) {                             \
        backward_t *b = (backward_t *)ctx;                                                     \
        T *dst = (T *)b->gx + p * b->hw;                                                       \
        const T *src = (const T *)b->gy + p * b->n;                                            \
        const int64_t *at = b->idx + p * b->n;                                                 \
        (void)scratch;                                                                         \
        memset(dst, 0, sizeof(T) * (size_t)b->hw);                                             \
        for (int64_t k = 0; k < b->n; k++) {                                                   \
            if ((uint64_t)at[k] >= (uint64_t)b->hw) {                                          \
                __atomic_store_n(&b->bad, 1, __ATOMIC_RELAXED);                                \
                return;                                                                        \
            }                                                                                  \
            dst[at[k]] += src[k];                                                              \
        }                                                                                      \
    }                                                                                          \
    int NAME(const T *gy, const int64_t *idx, T *gx, const int64_t *geom, int threads) {       \
        geom_t g = read_geom(geom);                                                            \
        backward_t b = {gy, idx, gx, g.h * g.w, g.oh * g.ow, 0};                               \
        int team = team_size(threads, g.planes, g.planes * (b.n > b.hw ? b.n : b.hw));         \
        if (run(NAME##_item, &b, g.planes, 0, team)) return -1;                                \
        return __atomic_load_n(&b.bad, __ATOMIC_RELAXED) ? -2 : 0;                             \
    }

DEFINE_BACKWARD(gapnet_max_pool2d_backward_f32, float)
DEFINE_BACKWARD(gapnet_max_pool2d_backward_f64, double)
