/*
 * _kquants.c - bit-exact, data-parallel quantizers for so8t-gguf.
 *
 * Produces exactly the bytes of ggml's reference quantizers, quantize_row_q{2,3,4,5,6}_K_ref
 * (what ggml_quantize_chunk and llama-quantize run without an importance matrix) and the
 * Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 refs, of quantize_iq4_nl / quantize_iq4_xs with or without
 * importance weights, and of quantize_row_q{2,3,4,5,6}_K_impl and quantize_row_q{4,5}_{0,1}_impl (what
 * ggml_quantize_chunk runs for the K and legacy types with importance weights), several times faster: libggml-base is compiled without
 * -march flags, so its reference code is scalar SSE. The algorithms follow ggml-quants.c;
 * the code is written anew around SIMD lanes.
 *
 * Exactness rules followed everywhere:
 *   - every float operation is a separately rounded IEEE float32 operation, in the order the
 *     reference evaluates it: no reassociation, no fused multiply-add (the build passes
 *     -ffp-contract=off -fno-fast-math, and FMA is never requested explicitly);
 *   - per-block reductions (sums, running min/max, first-occurrence max |x|, the coordinate
 *     descent of make_q3_quants, the path-dependent min of make_qkx2_quants) stay sequential
 *     over the elements of their block.
 * K-quant speed comes from running many *independent* sub-blocks side by side: the data of
 * 16-48 sub-blocks is transposed so that vector lane k holds sub-block k, and each vector
 * operation performs the same scalar step for all of them at once. Data-dependent branches
 * become per-lane selects. (The legacy types, whose per-block work is tiny, stay in element
 * order; see the comment above their kernels.) The vector code uses GCC vector extensions, so one kernel source serves every
 * instruction set: this file includes itself once per ISA (generic, AVX2, AVX-512) under
 * "#pragma GCC target", and the best one the CPU supports is chosen at run time. The generic
 * build is plain C semantics too, so an old CPU gets the same bytes, only slower.
 *
 * Python interface (CPython extension so8t_core.quantize.engines._kquants, GIL released while
 * quantizing and summing):
 *   quantize(ggml_type, src, dst, nrows, n_per_row, isa=-1, imatrix=None) -> bytes written
 *   supported() -> tuple of ggml type ids;  isas() -> names of the usable kernel sets,
 *   best first;  ISA_NAMES: every kernel set's name, by index (isa=);
 *   block_info(ggml_type) -> (elements per block, bytes per block);
 *   error_sums(reference, approx) -> (sum ref^2, sum approx^2, sum err^2, dot, max |err|),
 *   float64 sums over two float32 arrays in one pass (quantize/error_stats.py);
 *   f32_to_f16(src, dst), f16_to_f32(src, dst): the scalar conversions, for the tests
 */

#ifndef KQ_PASS

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef KQ_X86 /* -DKQ_X86=0 builds the portable kernels only */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KQ_X86 1
#else
#define KQ_X86 0
#endif
#endif

#if defined(__FAST_MATH__)
#error "_kquants.c must be compiled without -ffast-math: its results must be IEEE float32 exact"
#endif

#pragma GCC diagnostic ignored "-Wpsabi"

#if KQ_X86
#include <immintrin.h>
#endif

#define QK_K 256
#define KQ_AI static inline __attribute__((always_inline))

enum {
    T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_IQ4_NL = 20, T_IQ4_XS = 23,
};

/* kvalues_iq4nl (ggml-common.h), and as floats for the lane-wise look-ups */
static const int8_t kq_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const float kq_iq4nl_f[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* ---------------------------------------------------------------- scalar helpers */

/* ggml's nearest_int: adding 1.5*2^23 rounds to an integer (half to even) in the mantissa.
 * Applied unconditionally, exactly like the reference built with NDEBUG. */
static inline int kq_nearest_int(float f) {
    float v = f + 12582912.f;
    int32_t i;
    memcpy(&i, &v, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

/* IEEE binary32 -> binary16, round to nearest even, as ggml_compute_fp32_to_fp16: NaN becomes
 * sign|0x7E00, overflow becomes infinity, subnormal halves are rounded correctly. */
static uint16_t kq_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to infinity */
    if (ax >= 0x38800000u) {                                   /* normal half */
        const uint32_t r = ax - 0x38000000u;                   /* rebias the exponent: 127 -> 15 */
        return (uint16_t)(sign | ((r + 0x0fffu + ((r >> 13) & 1u)) >> 13));
    }
    /* subnormal half (or zero): the result counts units of 2^-24 */
    const uint32_t e = ax >> 23;
    if (e < 102) return (uint16_t)sign;                        /* below half of 2^-24: rounds to zero */
    const uint32_t m = (ax & 0x007fffffu) | 0x00800000u;
    const uint32_t shift = 126u - e;                           /* 14..24 */
    uint32_t k = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (k & 1u))) ++k;
    return (uint16_t)(sign | k);
}

/* binary16 -> binary32 (exact). */
static float kq_fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0) {
        float v = (float)m * 0x1p-24f;                         /* exact */
        memcpy(&bits, &v, sizeof bits);
        bits |= sign;
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (m ? (0x00400000u | (m << 13)) : 0u);
    } else {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline void kq_put_f16(uint8_t *p, float f) {
    const uint16_t h = kq_fp32_to_fp16(f);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

static inline float kq_get_f16(const uint8_t *p) {
    return kq_fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8)));
}

/* float -> int32 as x86's cvttss2si/cvttps2dq do it: truncation, and 0x80000000 for NaN and
 * out-of-range values. libggml-base converts float to int8_t/uint8_t this way and keeps the
 * low byte; the legacy quantizers rely on it for non-finite input. */
static inline int32_t kq_cvtt(float f) {
    return (f > -2147483904.f && f < 2147483648.f) ? (int32_t)f : INT32_MIN;
}

/* The scalar reference of one Q8_0 block, for the rare blocks holding a NaN: libggml's
 * MAX(amax, fabsf(v)) is maxss, which lets a NaN restart the running maximum. */
static void kq_q8_0_block_scalar(const float *x, uint8_t *y) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) {
        const float a = fabsf(x[j]);
        amax = amax > a ? amax : a;
    }
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.0f / d : 0.0f;
    kq_put_f16(y, d);
    for (int j = 0; j < 32; ++j) y[2 + j] = (uint8_t)kq_cvtt(roundf(x[j] * id));
}

/* make_qp_quants (ggml-quants.c): the 6-bit (Q4_K, Q5_K) or 4-bit (Q2_K) scales of a
 * super-block's n sub-block scales or mins x, weighted by each sub-block's sum of importance
 * weights w. Scalar: it runs once per super-block on 8 or 16 values. The reference's types are
 * kept (L is uint8_t, so a negative code wraps as there), and so are its MAX/MIN macros. */
#define KQ_MAX(a, b) ((a) > (b) ? (a) : (b))
#define KQ_MIN(a, b) ((a) < (b) ? (a) : (b))
static float kq_make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *quant_weights) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = KQ_MAX(max, x[i]);
    if (max < 1e-15f) { /* all zero */
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)kq_nearest_int(iscale * x[i]);
    float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale * L[i];
        float w = quant_weights[i];
        best_mse += w * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float iscale_is = (0.1f * is + nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            int l = kq_nearest_int(iscale_is * x[i]);
            l = KQ_MIN(nmax, l);
            float diff = x[i] - scale_is * l;
            float w = quant_weights[i];
            mse += w * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0;
    float suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = kq_nearest_int(iscale * x[i]);
        l = KQ_MIN(nmax, l);
        L[i] = (uint8_t)l;
        float w = quant_weights[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = quant_weights[i];
            float slx = sumlx - w * x[i] * L[i];
            float sl2 = suml2 - w * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = kq_nearest_int(x[i] * sl2 / slx);
                new_l = KQ_MIN(nmax, new_l);
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* get_scale_min_k4 (ggml-quants.c): sub-block j's 6-bit scale and min from Q4_K/Q5_K's 12 bytes */
static inline void kq_scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

/* ---------------------------------------------------------------- per-ISA kernels */

#define KQ_CAT_(a, b) a##_##b
#define KQ_CAT(a, b) KQ_CAT_(a, b)

#define KQ_PASS 1

#define KQ_ISA generic
#define KQ_ID 0
#define KQ_NL 4 /* 128-bit vectors: SSE2 on x86-64 */
#include "_kquants.c" /* this file, once per ISA */
#undef KQ_ISA
#undef KQ_ID
#undef KQ_NL

#if KQ_X86
#pragma GCC push_options
#pragma GCC target("avx2")
#define KQ_ISA avx2
#define KQ_ID 1
#define KQ_NL 8
#include "_kquants.c" /* this file, once per ISA */
#undef KQ_ISA
#undef KQ_ID
#undef KQ_NL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
#define KQ_ISA avx512
#define KQ_ID 2
#define KQ_NL 16
#include "_kquants.c" /* this file, once per ISA */
#undef KQ_ISA
#undef KQ_ID
#undef KQ_NL
#pragma GCC pop_options
#endif

/* ---------------------------------------------------------------- dispatch */

typedef void (*kq_fn)(const float *x, uint8_t *y, int64_t nblocks);
/* the types whose quantizer reads importance weights: qw (n_per_row of them, or NULL) */
typedef void (*kq_wfn)(const float *x, uint8_t *y, int64_t nblocks, const float *qw, int64_t n_per_row);

typedef struct {
    int type;
    int block;  /* elements per block */
    int bytes;  /* bytes per block */
    kq_fn fn[3]; /* generic, avx2, avx512 */
    kq_wfn wfn[3]; /* with importance weights (and without, for the types that have no fn) */
} kq_type;

#if KQ_X86
#define KQ_FNS(name) {name##_generic, name##_avx2, name##_avx512}
#else
#define KQ_FNS(name) {name##_generic, NULL, NULL}
#endif

static const kq_type KQ_TYPES[] = {
    {T_Q4_0, 32, 18, KQ_FNS(q4_0), KQ_FNS(q4_0_w)},
    {T_Q4_1, 32, 20, KQ_FNS(q4_1), KQ_FNS(q4_1_w)},
    {T_Q5_0, 32, 22, KQ_FNS(q5_0), KQ_FNS(q5_0_w)},
    {T_Q5_1, 32, 24, KQ_FNS(q5_1), KQ_FNS(q5_1_w)},
    {T_Q8_0, 32, 34, KQ_FNS(q8_0)},
    {T_Q2_K, QK_K, 84, KQ_FNS(q2k), KQ_FNS(q2k_w)},
    {T_Q3_K, QK_K, 110, KQ_FNS(q3k), KQ_FNS(q3k_w)},
    {T_Q4_K, QK_K, 144, KQ_FNS(q4k), KQ_FNS(q4k_w)},
    {T_Q5_K, QK_K, 176, KQ_FNS(q5k), KQ_FNS(q5k_w)},
    {T_Q6_K, QK_K, 210, KQ_FNS(q6k), KQ_FNS(q6k_w)},
    {T_IQ4_NL, 32, 18, {NULL, NULL, NULL}, KQ_FNS(iq4_nl)},
    {T_IQ4_XS, QK_K, 136, {NULL, NULL, NULL}, KQ_FNS(iq4_xs)},
};
#define KQ_NTYPES ((int)(sizeof KQ_TYPES / sizeof KQ_TYPES[0]))

static const char *const KQ_ISA_NAMES[3] = {"generic", "avx2", "avx512"};

static int kq_usable[3] = {1, 0, 0}; /* filled once by kq_detect_cpu() at import */

static void kq_detect_cpu(void) {
#if KQ_X86
    __builtin_cpu_init();
    kq_usable[1] = __builtin_cpu_supports("avx2");
    kq_usable[2] = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
}

static int kq_isa_usable(int isa) { return isa >= 0 && isa <= 2 && kq_usable[isa]; }

static int kq_best_isa(void) {
    for (int isa = 2; isa > 0; --isa)
        if (kq_isa_usable(isa) && KQ_TYPES[0].fn[isa]) return isa;
    return 0;
}

/* Run the kernels in the default floating-point environment (round to nearest even, no
 * flush-to-zero or denormals-are-zero), which is the one llama-quantize runs in, whatever
 * the host process may have set. MXCSR is per thread. */
static void kq_run(const kq_type *t, int isa, const float *x, uint8_t *y, int64_t nblocks, const float *qw,
                   int64_t n_per_row) {
#if KQ_X86
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(0x1f80);
#endif
    if (t->wfn[isa] && (qw || !t->fn[isa])) t->wfn[isa](x, y, nblocks, qw, n_per_row);
    else t->fn[isa](x, y, nblocks);
#if KQ_X86
    _mm_setcsr(csr);
#endif
}

static const kq_type *kq_find(int type) {
    for (int i = 0; i < KQ_NTYPES; ++i)
        if (KQ_TYPES[i].type == type) return &KQ_TYPES[i];
    return NULL;
}

/* ---------------------------------------------------------------- Python glue */

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    (void)self;
    int type, isa = -1;
    Py_buffer src, dst, imx = {0};
    Py_ssize_t nrows, n_per_row;
    PyObject *imatrix = Py_None;
    if (!PyArg_ParseTuple(args, "iy*w*nn|iO:quantize", &type, &src, &dst, &nrows, &n_per_row, &isa, &imatrix))
        return NULL;
    PyObject *result = NULL;
    if (imatrix != Py_None && PyObject_GetBuffer(imatrix, &imx, PyBUF_SIMPLE) < 0) goto done;
    const kq_type *t = kq_find(type);
    if (!t) {
        PyErr_Format(PyExc_ValueError, "ggml type %d is not supported by the fast engine", type);
        goto done;
    }
    if (nrows < 0 || n_per_row <= 0 || n_per_row % t->block) {
        PyErr_Format(PyExc_ValueError, "row length %zd is not a positive multiple of the block size %d", n_per_row,
                     t->block);
        goto done;
    }
    if (isa < 0) isa = kq_best_isa();
    if (!kq_isa_usable(isa) || (!t->fn[isa] && !t->wfn[isa])) {
        PyErr_Format(PyExc_ValueError, "kernel set %d is not usable on this CPU", isa);
        goto done;
    }
    const int64_t nblocks = (int64_t)nrows * (n_per_row / t->block);
    if (nrows && (int64_t)n_per_row > INT64_MAX / 4 / nrows) {
        PyErr_SetString(PyExc_ValueError, "tensor too large");
        goto done;
    }
    if ((int64_t)src.len < (int64_t)nrows * n_per_row * 4) {
        PyErr_Format(PyExc_ValueError, "source buffer holds %zd bytes, need %lld", src.len,
                     (long long)nrows * n_per_row * 4);
        goto done;
    }
    if ((int64_t)dst.len < nblocks * t->bytes) {
        PyErr_Format(PyExc_ValueError, "destination buffer holds %zd bytes, need %lld", dst.len,
                     (long long)(nblocks * t->bytes));
        goto done;
    }
    if (imx.obj && !t->wfn[isa]) {
        PyErr_Format(PyExc_ValueError, "ggml type %d is not quantized with importance weights here", type);
        goto done;
    }
    if (imx.obj && imx.len != (Py_ssize_t)(n_per_row * 4)) {
        PyErr_Format(PyExc_ValueError, "the importance weights hold %zd bytes, need %zd (n_per_row float32)",
                     imx.len, n_per_row * 4);
        goto done;
    }
    {
        const float *x = (const float *)src.buf;
        const float *qw = imx.obj ? (const float *)imx.buf : NULL;
        uint8_t *y = (uint8_t *)dst.buf;
        Py_BEGIN_ALLOW_THREADS
        kq_run(t, isa, x, y, nblocks, qw, n_per_row);
        Py_END_ALLOW_THREADS
    }
    result = PyLong_FromLongLong((long long)(nblocks * t->bytes));
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (imx.obj) PyBuffer_Release(&imx);
    return result;
}

static PyObject *py_supported(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    PyObject *tup = PyTuple_New(KQ_NTYPES);
    if (!tup) return NULL;
    for (int i = 0; i < KQ_NTYPES; ++i) {
        PyObject *v = PyLong_FromLong(KQ_TYPES[i].type);
        if (!v) {
            Py_DECREF(tup);
            return NULL;
        }
        PyTuple_SET_ITEM(tup, i, v);
    }
    return tup;
}

static PyObject *py_isas(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    PyObject *lst = PyList_New(0);
    if (!lst) return NULL;
    for (int isa = 2; isa >= 0; --isa) {
        if (!kq_isa_usable(isa) || !KQ_TYPES[0].fn[isa]) continue;
        PyObject *s = PyUnicode_FromString(KQ_ISA_NAMES[isa]);
        if (!s || PyList_Append(lst, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(lst);
            return NULL;
        }
        Py_DECREF(s);
    }
    return lst;
}

static PyObject *py_block_info(PyObject *self, PyObject *args) {
    (void)self;
    int type;
    if (!PyArg_ParseTuple(args, "i:block_info", &type)) return NULL;
    const kq_type *t = kq_find(type);
    if (!t) {
        PyErr_Format(PyExc_ValueError, "ggml type %d is not supported by the fast engine", type);
        return NULL;
    }
    return Py_BuildValue("(ii)", t->block, t->bytes);
}

/* The fp16 conversions, exposed for the tests: f32_to_f16(src float32 buffer, dst uint16 buffer)
 * and f16_to_f32(src uint16 buffer, dst float32 buffer), element count from src. */
static PyObject *py_convert(PyObject *args, int to_f16) {
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "y*w*", &src, &dst)) return NULL;
    const Py_ssize_t n = src.len / (to_f16 ? 4 : 2);
    PyObject *result = NULL;
    if (dst.len < n * (to_f16 ? 2 : 4)) {
        PyErr_SetString(PyExc_ValueError, "destination buffer too small");
    } else {
        for (Py_ssize_t i = 0; i < n; ++i) {
            if (to_f16) {
                float f;
                memcpy(&f, (const char *)src.buf + 4 * i, 4);
                const uint16_t h = kq_fp32_to_fp16(f);
                memcpy((char *)dst.buf + 2 * i, &h, 2);
            } else {
                uint16_t h;
                memcpy(&h, (const char *)src.buf + 2 * i, 2);
                const float f = kq_fp16_to_fp32(h);
                memcpy((char *)dst.buf + 4 * i, &f, 4);
            }
        }
        result = PyLong_FromSsize_t(n);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *py_f32_to_f16(PyObject *self, PyObject *args) {
    (void)self;
    return py_convert(args, 1);
}

static PyObject *py_f16_to_f32(PyObject *self, PyObject *args) {
    (void)self;
    return py_convert(args, 0);
}

/* error_sums(reference, approx): float64 sums over two float32 buffers of equal length, for the
 * per-tensor error statistics (so8t_core/metrics.py): (sum r^2, sum a^2, sum (a-r)^2, sum r*a,
 * max |a-r|), max being NaN when any difference is. Four interleaved partial sums in a fixed
 * order: deterministic, and fast without reassociation by the compiler. Releases the GIL. */
static PyObject *py_error_sums(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer ref, app;
    if (!PyArg_ParseTuple(args, "y*y*:error_sums", &ref, &app)) return NULL;
    PyObject *result = NULL;
    if (ref.len != app.len || ref.len % 4) {
        PyErr_SetString(PyExc_ValueError, "error_sums: buffers must be float32 arrays of the same length");
    } else {
        const float *r = (const float *)ref.buf, *a = (const float *)app.buf;
        const Py_ssize_t n = ref.len / 4;
        double rr[4] = {0}, aa[4] = {0}, ee[4] = {0}, ra[4] = {0}, mx = 0.0;
        int nan = 0;
        Py_BEGIN_ALLOW_THREADS
        Py_ssize_t i = 0;
        for (; i + 4 <= n; i += 4) {
            for (int k = 0; k < 4; ++k) {
                const double x = r[i + k], y = a[i + k], e = y - x, ae = fabs(e);
                rr[k] += x * x;
                aa[k] += y * y;
                ee[k] += e * e;
                ra[k] += x * y;
                if (ae > mx) mx = ae;
                nan |= (e != e);
            }
        }
        for (; i < n; ++i) {
            const double x = r[i], y = a[i], e = y - x, ae = fabs(e);
            rr[0] += x * x;
            aa[0] += y * y;
            ee[0] += e * e;
            ra[0] += x * y;
            if (ae > mx) mx = ae;
            nan |= (e != e);
        }
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("(ddddd)", (rr[0] + rr[1]) + (rr[2] + rr[3]), (aa[0] + aa[1]) + (aa[2] + aa[3]),
                               (ee[0] + ee[1]) + (ee[2] + ee[3]), (ra[0] + ra[1]) + (ra[2] + ra[3]),
                               nan ? (double)NAN : mx);
    }
    PyBuffer_Release(&ref);
    PyBuffer_Release(&app);
    return result;
}

static PyMethodDef kq_methods[] = {
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(ggml_type, src, dst, nrows, n_per_row, isa=-1, imatrix=None) -> bytes written. src: C-contiguous "
     "float32 buffer of nrows*n_per_row values; dst: writable buffer. isa: index into ('generic', 'avx2', "
     "'avx512'), -1 for the best the CPU supports. imatrix: n_per_row float32 importance weights (IQ4_NL, "
     "IQ4_XS, the K types and Q4_0/Q4_1/Q5_0/Q5_1 only). Releases the GIL."},
    {"supported", py_supported, METH_NOARGS, "ggml type ids this module quantizes"},
    {"isas", py_isas, METH_NOARGS, "names of the kernel sets usable on this CPU, best first"},
    {"block_info", py_block_info, METH_VARARGS, "block_info(ggml_type) -> (elements, bytes) per block"},
    {"f32_to_f16", py_f32_to_f16, METH_VARARGS, "f32_to_f16(src, dst): the quantizers' float32 -> fp16 rounding"},
    {"f16_to_f32", py_f16_to_f32, METH_VARARGS, "f16_to_f32(src, dst): fp16 -> float32"},
    {"error_sums", py_error_sums, METH_VARARGS,
     "error_sums(reference, approx) -> (sum r^2, sum a^2, sum (a-r)^2, sum r*a, max |a-r|) in float64"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kq_module = {
    PyModuleDef_HEAD_INIT, "_kquants",
    "Bit-exact SIMD re-implementation of ggml's reference K-quant quantizers.", -1, kq_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kquants(void) {
    kq_detect_cpu();
    PyObject *m = PyModule_Create(&kq_module);
    if (!m) return NULL;
    if (PyModule_AddObject(m, "ISA_NAMES", Py_BuildValue("(sss)", "generic", "avx2", "avx512")) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

#else /* KQ_PASS: the kernels, compiled once per ISA */

/*
 * Layout: a group holds G vectors of NL lanes, lane k (0 <= k < G*NL) being sub-block k of a run
 * of consecutive super-blocks. xt[i*G + g] holds element i of the sub-blocks g*NL .. g*NL+NL-1.
 * The G vectors are independent chains interleaved by hand so the out-of-order core has work
 * while one chain waits on the latency of its sequential sums.
 */
#define NL KQ_NL
#define F(name) KQ_CAT(name, KQ_ISA)
#define vf F(vf)
#define vi F(vi)
#define xb F(xb)

typedef float vf __attribute__((vector_size(NL * 4)));
typedef int32_t vi __attribute__((vector_size(NL * 4)));
typedef uint8_t xb __attribute__((vector_size(32)));

#define GMAX 8
#ifndef KQ_G_QKX2
#define KQ_G_QKX2 3
#endif
#ifndef KQ_G_Q3
#define KQ_G_Q3 4
#endif
#ifndef KQ_G_QX
#define KQ_G_QX 1
#endif
#ifndef KQ_G_IQ4
#define KQ_G_IQ4 2 /* even: an IQ4_XS super-block (8 sub-blocks) fills whole groups of 4-lane vectors */
#endif
/* vectors per group: at least `want`, and whole super-blocks (spb sub-blocks each) */
#define GROUP_VECS(spb, want) ((((want) * NL + (spb) - 1) / (spb) * (spb)) / NL)

typedef float kq_f32a __attribute__((may_alias));
typedef int32_t kq_i32a __attribute__((may_alias));

/* --- lane helpers (exact: selects, bit operations and IEEE arithmetic only) */

KQ_AI vf F(splat)(float a) {
    vf r;
    for (int k = 0; k < NL; ++k) r[k] = a;
    return r;
}

KQ_AI vi F(splati)(int a) {
    vi r;
    for (int k = 0; k < NL; ++k) r[k] = a;
    return r;
}

KQ_AI vf F(sel)(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
KQ_AI vi F(seli)(vi m, vi a, vi b) { return (a & m) | (b & ~m); }
KQ_AI vf F(vabs)(vf a) { return (vf)((vi)a & 0x7fffffff); }
KQ_AI vf F(tof)(vi a) { return __builtin_convertvector(a, vf); }

/* sqrtf lane-wise (IEEE square root: correctly rounded, the same in every instruction set) */
KQ_AI vf F(vsqrt)(vf a) {
#if KQ_ID == 2
    return (vf)_mm512_sqrt_ps((__m512)a);
#elif KQ_ID == 1
    return (vf)_mm256_sqrt_ps((__m256)a);
#else
    vf r;
    for (int k = 0; k < NL; ++k) r[k] = sqrtf(a[k]);
    return r;
#endif
}

/* min/max with the x86 semantics a < b ? a : b (only used where no NaN can occur) */
#if KQ_ID == 1
KQ_AI vi F(mini)(vi a, vi b) { return (vi)_mm256_min_epi32((__m256i)a, (__m256i)b); }
KQ_AI vi F(maxi)(vi a, vi b) { return (vi)_mm256_max_epi32((__m256i)a, (__m256i)b); }
KQ_AI vf F(minf)(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
KQ_AI vf F(maxf)(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
#elif KQ_ID == 2
KQ_AI vi F(mini)(vi a, vi b) { return (vi)_mm512_min_epi32((__m512i)a, (__m512i)b); }
KQ_AI vi F(maxi)(vi a, vi b) { return (vi)_mm512_max_epi32((__m512i)a, (__m512i)b); }
KQ_AI vf F(minf)(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
KQ_AI vf F(maxf)(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#else
KQ_AI vi F(mini)(vi a, vi b) { return F(seli)(a < b, a, b); }
KQ_AI vi F(maxi)(vi a, vi b) { return F(seli)(a > b, a, b); }
KQ_AI vf F(minf)(vf a, vf b) { return F(sel)(a < b, a, b); }
KQ_AI vf F(maxf)(vf a, vf b) { return F(sel)(a > b, a, b); }
#endif

KQ_AI int F(all)(vi m) {
    int r = -1;
    for (int k = 0; k < NL; ++k) r &= m[k];
    return r != 0;
}

KQ_AI int F(any)(vi m) {
    int r = 0;
    for (int k = 0; k < NL; ++k) r |= m[k];
    return r != 0;
}

/* nearest_int, lane-wise: the same float add and bit operations as the scalar reference */
KQ_AI vi F(nearest)(vf v) {
    const vf t = v + 12582912.f;
    return ((vi)t & 0x007fffff) - 0x00400000;
}

/* MAX(lo, MIN(hi, nearest_int(v))), as float */
KQ_AI vf F(qclamp)(vf v, int lo, int hi) {
    return F(tof)(F(maxi)(F(mini)(F(nearest)(v), F(splati)(hi)), F(splati)(lo)));
}

/* The same, for lanes known to satisfy |v| < 2^21 (so no NaN): then v + 1.5*2^23 lies in
 * [2^23, 2^24), where the float spacing is 1, so the add rounds v to the nearest integer
 * (ties to even, the magic constant being even) and subtracting the constant again is exact:
 * the result is nearest_int(v) as a float, and the clamp can stay in float. */
KQ_AI vf F(qclamp_safe)(vf v, float lo, float hi) {
    const vf r = (v + 12582912.f) - 12582912.f;
    return F(maxf)(F(minf)(r, F(splat)(hi)), F(splat)(lo));
}

/* kq_iq4nl_f[idx] lane-wise, idx in 0..15 */
KQ_AI vf F(iq4_lut)(vi idx) {
#if KQ_ID == 2
    return (vf)_mm512_permutexvar_ps((__m512i)idx, _mm512_loadu_ps(kq_iq4nl_f));
#elif KQ_ID == 1
    const vf lo = (vf)_mm256_permutevar8x32_ps(_mm256_loadu_ps(kq_iq4nl_f), (__m256i)idx);
    const vf hi = (vf)_mm256_permutevar8x32_ps(_mm256_loadu_ps(kq_iq4nl_f + 8), (__m256i)idx);
    return F(sel)(idx > 7, hi, lo);
#else
    vf r;
    for (int k = 0; k < NL; ++k) r[k] = kq_iq4nl_f[idx[k] & 15];
    return r;
#endif
}

/* MAX(lo, MIN(hi, l)) */
KQ_AI vi F(clampi)(vi l, int lo, int hi) { return F(maxi)(F(mini)(l, F(splati)(hi)), F(splati)(lo)); }

KQ_AI vf F(load)(const float *p) {
    vf r;
    memcpy(&r, p, sizeof r);
    return r;
}

/* xt[i*G + g][lane] = element i of sub-block g*NL + lane, for G*NL consecutive sub-blocks of S */
KQ_AI void F(transpose)(const float *restrict xg, int S, int G, vf *restrict xt) {
    kq_f32a *out = (kq_f32a *)xt;
    for (int k = 0; k < G * NL; ++k)
        for (int i = 0; i < S; ++i) out[(i * G + k / NL) * NL + k % NL] = xg[k * S + i];
}

/* all-lanes test that no element of the transposed sub-blocks is NaN */
KQ_AI int F(no_nan)(int n, const vf *restrict x) {
    vi bad = F(splati)(0);
    for (int j = 0; j < n; ++j) bad |= x[j] != x[j];
    return !F(any)(bad);
}

/* One candidate scale of make_qkx2_quants: the codes (as floats) and their weighted sums.
 * `safe`: every lane is known to give |isc * (x - mn)| < 2^21 (see qclamp_safe). */
KQ_AI void F(qkx2_codes)(const int G, const int S, const int nmax, const int safe, const vf *restrict x,
                         const vf *restrict w, const vf *isc, const vf *mn, vf *restrict laux, vf *sum_l,
                         vf *sum_l2, vf *sum_xl) {
    for (int i = 0; i < S; ++i)
        for (int g = 0; g < G; ++g) {
            const vf xi = x[i * G + g];
            const vf v = isc[g] * (xi - mn[g]);
            const vf lf = safe ? F(qclamp_safe)(v, 0.f, (float)nmax) : F(qclamp)(v, 0, nmax);
            laux[i * G + g] = lf;
            const vf wl = w[i * G + g] * lf;
            sum_l[g] = sum_l[g] + wl;
            sum_l2[g] = sum_l2[g] + wl * lf;
            sum_xl[g] = sum_xl[g] + wl * xi;
        }
}

/* --- make_qkx2_quants for G*NL sub-blocks at once (Q2_K, Q4_K, Q5_K).
 * Per lane: scale, the_min (= -min) and the codes L of the best candidate. */
KQ_AI void F(qkx2)(const int G, const int S, const int nmax, const float rmin, const float rdelta, const int nstep,
                   const int use_mad, const vf *restrict x, const vf *restrict w, vf *restrict scale_out,
                   vf *restrict min_out, vi *restrict L) {
    const vf zero = F(splat)(0.f);
    vf mn[GMAX], mx[GMAX], sum_w[GMAX], sum_x[GMAX], mn0[GMAX], scale[GMAX], best[GMAX];
    vf best_iscale[GMAX], best_lmin[GMAX];
    vi flat[GMAX];
    vf laux[32 * GMAX];
    for (int g = 0; g < G; ++g) {
        mn[g] = x[g];
        mx[g] = x[g];
        sum_w[g] = w[g];
        sum_x[g] = sum_w[g] * x[g];
    }
    for (int i = 1; i < S; ++i)
        for (int g = 0; g < G; ++g) {
            const vf xi = x[i * G + g], wi = w[i * G + g];
            mn[g] = F(sel)(xi < mn[g], xi, mn[g]);
            mx[g] = F(sel)(xi > mx[g], xi, mx[g]);
            sum_w[g] = sum_w[g] + wi;
            sum_x[g] = sum_x[g] + wi * xi;
        }
    /* every x lies in [mn0, mx] unless it is NaN: then the safe path is never taken */
    const int finite_x = F(no_nan)(S * G, x);
    vf iscale[GMAX];
    for (int g = 0; g < G; ++g) {
        mn[g] = F(sel)(mn[g] > zero, zero, mn[g]);
        flat[g] = mx[g] == mn[g];
        mn0[g] = mn[g];
        iscale[g] = (float)nmax / (mx[g] - mn[g]);
        scale[g] = 1.f / iscale[g];
        best[g] = zero;
        best_iscale[g] = iscale[g];
        best_lmin[g] = mn[g];
    }
    for (int i = 0; i < S; ++i)
        for (int g = 0; g < G; ++g) {
            const vf xi = x[i * G + g];
            const vf lf = F(qclamp)(iscale[g] * (xi - mn[g]), 0, nmax);
            vf diff = scale[g] * lf + mn[g] - xi;
            diff = use_mad ? F(vabs)(diff) : diff * diff;
            best[g] = best[g] + w[i * G + g] * diff;
        }
    const vf limit = F(splat)(0x1p21f);
    for (int is = 0; is <= nstep; ++is) {
        const float num = rmin + rdelta * (float)is + (float)nmax;
        vf isc[GMAX], sum_l[GMAX], sum_l2[GMAX], sum_xl[GMAX];
        int safe = finite_x;
        for (int g = 0; g < G; ++g) {
            isc[g] = num / (mx[g] - mn[g]);
            sum_l[g] = zero;
            sum_l2[g] = zero;
            sum_xl[g] = zero;
            /* x - mn is monotonic in x, and so is isc * (x - mn): its extremes over x in
             * [mn0, mx] bound every lane's |isc * (x - mn)|. NaN fails the comparison. */
            const vf b1 = F(vabs)(isc[g] * (mx[g] - mn[g])), b2 = F(vabs)(isc[g] * (mn0[g] - mn[g]));
            safe &= F(all)((b1 < limit) & (b2 < limit));
        }
        if (safe)
            F(qkx2_codes)(G, S, nmax, 1, x, w, isc, mn, laux, sum_l, sum_l2, sum_xl);
        else
            F(qkx2_codes)(G, S, nmax, 0, x, w, isc, mn, laux, sum_l, sum_l2, sum_xl);
        vf D[GMAX], this_scale[GMAX], this_min[GMAX], err[GMAX];
        for (int g = 0; g < G; ++g) {
            D[g] = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g];
            this_scale[g] = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / D[g];
            this_min[g] = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / D[g];
            const vi pos = this_min[g] > zero;
            this_min[g] = F(sel)(pos, zero, this_min[g]);
            this_scale[g] = F(sel)(pos, sum_xl[g] / sum_l2[g], this_scale[g]);
            err[g] = zero;
        }
        for (int i = 0; i < S; ++i)
            for (int g = 0; g < G; ++g) {
                vf diff = this_scale[g] * laux[i * G + g] + this_min[g] - x[i * G + g];
                diff = use_mad ? F(vabs)(diff) : diff * diff;
                err[g] = err[g] + w[i * G + g] * diff;
            }
        for (int g = 0; g < G; ++g) {
            const vi take = (D[g] > zero) & (err[g] < best[g]);
            best[g] = F(sel)(take, err[g], best[g]);
            scale[g] = F(sel)(take, this_scale[g], scale[g]);
            best_iscale[g] = F(sel)(take, isc[g], best_iscale[g]);
            best_lmin[g] = F(sel)(take, mn[g], best_lmin[g]);
            mn[g] = F(sel)(take, this_min[g], mn[g]);
        }
    }
    const vi izero = F(splati)(0);
    for (int i = 0; i < S; ++i)
        for (int g = 0; g < G; ++g)
            L[i * G + g] = F(seli)(flat[g], izero,
                                   F(clampi)(F(nearest)(best_iscale[g] * (x[i * G + g] - best_lmin[g])), 0, nmax));
    for (int g = 0; g < G; ++g) {
        scale_out[g] = F(sel)(flat[g], zero, scale[g]);
        min_out[g] = -F(sel)(flat[g], mn0[g], mn[g]);
    }
}

/* --- first element with the largest |x| (strict >): its signed value, and |value| */
KQ_AI void F(absmax)(const int G, const int S, const vf *restrict x, vf *restrict max, vf *restrict amax) {
    for (int g = 0; g < G; ++g) {
        amax[g] = F(splat)(0.f);
        max[g] = F(splat)(0.f);
    }
    for (int i = 0; i < S; ++i)
        for (int g = 0; g < G; ++g) {
            const vf ax = F(vabs)(x[i * G + g]);
            const vi up = ax > amax[g];
            amax[g] = F(sel)(up, ax, amax[g]);
            max[g] = F(sel)(up, x[i * G + g], max[g]);
        }
}

/* --- make_q3_quants(16, 4, x, L, do_rmse=true) for G*NL sub-blocks. L: codes 0..7 */
KQ_AI void F(q3search)(const int G, const vf *restrict x, vi *restrict L, vf *restrict scale_out) {
    const int S = 16, nmax = 4;
    const vf zero = F(splat)(0.f);
    vf max[GMAX], amax[GMAX], sumlx[GMAX], suml2[GMAX];
    vf w[16 * GMAX], wx[16 * GMAX];
    F(absmax)(G, S, x, max, amax);
    for (int g = 0; g < G; ++g) {
        const vf iscale = (float)(-nmax) / max[g];
        sumlx[g] = zero;
        suml2[g] = zero;
        for (int i = 0; i < S; ++i) {
            const vf xi = x[i * G + g];
            const vi l = F(clampi)(F(nearest)(iscale * xi), -nmax, nmax - 1);
            L[i * G + g] = l;
            w[i * G + g] = xi * xi;
            wx[i * G + g] = w[i * G + g] * xi;
            const vf lf = F(tof)(l);
            sumlx[g] = sumlx[g] + wx[i * G + g] * lf;
            suml2[g] = suml2[g] + w[i * G + g] * lf * lf;
        }
    }
    for (int itry = 0; itry < 5; ++itry) {
        vi changed = F(splati)(0);
        for (int i = 0; i < S; ++i)
            for (int g = 0; g < G; ++g) {
                const int j = i * G + g;
                const vf lf = F(tof)(L[j]);
                const vf slx = sumlx[g] - wx[j] * lf;
                const vf sl2 = suml2[g] - w[j] * lf * lf;
                const vi nl = F(clampi)(F(nearest)(x[j] * sl2 / slx), -nmax, nmax - 1);
                const vf nlf = F(tof)(nl);
                const vf slx_n = slx + wx[j] * nlf;
                const vf sl2_n = sl2 + w[j] * nlf * nlf;
                const vi take = (slx > zero) & (nl != L[j]) & (sl2_n > zero) &
                                (slx_n * slx_n * suml2[g] > sumlx[g] * sumlx[g] * sl2_n);
                L[j] = F(seli)(take, nl, L[j]);
                sumlx[g] = F(sel)(take, slx_n, sumlx[g]);
                suml2[g] = F(sel)(take, sl2_n, suml2[g]);
                changed |= take;
            }
        /* A pass that changes nothing leaves the state as it was, so stopping when no lane
         * changed is the same, lane by lane, as the reference's own early exit. */
        int any = 0;
        for (int k = 0; k < NL; ++k) any |= changed[k];
        if (!any) break;
    }
    const vi izero = F(splati)(0);
    for (int g = 0; g < G; ++g) {
        const vi allzero = amax[g] < F(splat)(1e-15f);
        for (int i = 0; i < S; ++i) L[i * G + g] = F(seli)(allzero, izero, L[i * G + g] + nmax);
        scale_out[g] = F(sel)(allzero | ~(suml2[g] > zero), zero, sumlx[g] / suml2[g]);
    }
}

/* sums of one candidate scale of make_qx_quants: sumlx += (w*x)*l, suml2 += (w*l)*l */
KQ_AI void F(qx_sums)(const int G, const int S, const int nmax, const int safe, const vf *restrict x,
                      const vf *restrict w, const vf *restrict wx, const vf *isc, vf *sumlx, vf *suml2) {
    for (int i = 0; i < S; ++i)
        for (int g = 0; g < G; ++g) {
            const int j = i * G + g;
            const vf v = isc[g] * x[j];
            const vf lf = safe ? F(qclamp_safe)(v, (float)-nmax, (float)(nmax - 1)) : F(qclamp)(v, -nmax, nmax - 1);
            sumlx[g] = sumlx[g] + wx[j] * lf;
            suml2[g] = suml2[g] + w[j] * lf * lf;
        }
}

/* --- make_qx_quants(S, nmax, x, L, rmse_type=1, w) for G*NL sub-blocks of S <= 32 elements, with
 * the weights w of each element (x*x is rmse_type 1 without explicit weights). L: codes 0..2*nmax-1 */
KQ_AI void F(qxsearch)(const int G, const int S, const int nmax, const vf *restrict x, const vf *restrict w,
                       vi *restrict L, vf *restrict scale_out) {
    const vf zero = F(splat)(0.f);
    vf max[GMAX], amax[GMAX], sumlx[GMAX], suml2[GMAX], scale[GMAX], best[GMAX], best_iscale[GMAX];
    vf wx[32 * GMAX];
    F(absmax)(G, S, x, max, amax);
    const int finite_x = F(no_nan)(S * G, x);
    for (int j = 0; j < S * G; ++j) wx[j] = w[j] * x[j];
    for (int g = 0; g < G; ++g) {
        best_iscale[g] = (float)(-nmax) / max[g];
        sumlx[g] = zero;
        suml2[g] = zero;
    }
    for (int i = 0; i < S; ++i)
        for (int g = 0; g < G; ++g) {
            const int j = i * G + g;
            const vf lf = F(tof)(F(clampi)(F(nearest)(best_iscale[g] * x[j]), -nmax, nmax - 1));
            sumlx[g] = sumlx[g] + wx[j] * lf;
            suml2[g] = suml2[g] + w[j] * lf * lf;
        }
    for (int g = 0; g < G; ++g) {
        scale[g] = F(sel)(suml2[g] != zero, sumlx[g] / suml2[g], zero);
        best[g] = scale[g] * sumlx[g];
    }
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        const float num = -((float)nmax + 0.1f * (float)is);
        vf isc[GMAX];
        int safe = finite_x;
        for (int g = 0; g < G; ++g) {
            isc[g] = num / max[g];
            sumlx[g] = zero;
            suml2[g] = zero;
            /* |x| <= |max| and isc * x is monotonic in x: |isc * max| bounds every lane */
            safe &= F(all)(F(vabs)(isc[g] * max[g]) < F(splat)(0x1p21f));
        }
        if (safe)
            F(qx_sums)(G, S, nmax, 1, x, w, wx, isc, sumlx, suml2);
        else
            F(qx_sums)(G, S, nmax, 0, x, w, wx, isc, sumlx, suml2);
        for (int g = 0; g < G; ++g) {
            const vi take = (suml2[g] > zero) & (sumlx[g] * sumlx[g] > best[g] * suml2[g]);
            const vf s = sumlx[g] / suml2[g];
            scale[g] = F(sel)(take, s, scale[g]);
            best[g] = F(sel)(take, s * sumlx[g], best[g]);
            best_iscale[g] = F(sel)(take, isc[g], best_iscale[g]);
        }
    }
    const vi izero = F(splati)(0);
    for (int g = 0; g < G; ++g) {
        const vi allzero = amax[g] < F(splat)(1e-15f);
        for (int i = 0; i < S; ++i)
            L[i * G + g] = F(seli)(allzero, izero,
                                   F(clampi)(F(nearest)(best_iscale[g] * x[i * G + g]), -nmax, nmax - 1) + nmax);
        scale_out[g] = F(sel)(allzero, zero, scale[g]);
    }
}

/* Runs the statements in ... over groups of `per` super-blocks (xg: input, yg: output); a
 * short last group is padded with zeros and only its real blocks are copied out. */
#define KQ_GROUPS(x, y, nb, per, bytes, ...)                                                    \
    do {                                                                                        \
        float pad_[(per) * QK_K];                                                               \
        uint8_t out_[(per) * (bytes)];                                                          \
        for (int64_t b_ = 0; b_ < (nb); b_ += (per)) {                                          \
            const int n_ = (nb) - b_ < (per) ? (int)((nb) - b_) : (per);                        \
            const float *xg = (x) + b_ * QK_K;                                                  \
            uint8_t *yg = (y) + b_ * (bytes);                                                   \
            if (n_ < (per)) {                                                                   \
                memset(pad_, 0, sizeof pad_);                                                   \
                memcpy(pad_, xg, (size_t)n_ * QK_K * sizeof(float));                            \
                xg = pad_;                                                                      \
                yg = out_;                                                                      \
            }                                                                                   \
            __VA_ARGS__;                                                                        \
            if (n_ < (per)) memcpy((y) + b_ * (bytes), out_, (size_t)n_ * (bytes));             \
        }                                                                                       \
    } while (0)

/* --- natural-order helpers */

/* store NL codes (0..255) as bytes */
KQ_AI void F(narrow)(vi l, uint8_t *restrict out) {
#if KQ_ID == 1
    const __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128((__m256i)l), _mm256_extracti128_si256((__m256i)l, 1));
    _mm_storel_epi64((__m128i *)out, _mm_packus_epi16(p16, p16));
#elif KQ_ID == 2
    _mm_storeu_si128((__m128i *)out, _mm512_cvtepi32_epi8((__m512i)l));
#else
    for (int k = 0; k < NL; ++k) out[k] = (uint8_t)l[k];
#endif
}

/* codes for n consecutive elements: clamp(nearest((x + dm) / d), lo, hi) + bias (dm unused: x / d) */
KQ_AI void F(requant)(const float *restrict x, int n, float d, float dm, int use_dm, int lo, int hi, int bias,
                      uint8_t *restrict out) {
    for (int c = 0; c < n; c += NL) {
        vf v = F(load)(x + c);
        if (use_dm) v = v + dm;
        F(narrow)(F(clampi)(F(nearest)(v / d), lo, hi) + bias, out + c);
    }
}

/* Q2_K/Q3_K qs: byte 32h+l holds codes 128h+l, +32, +64, +96 at bit shifts 0, 2, 4, 6 */
KQ_AI void F(pack2)(const uint8_t *restrict L, uint8_t *restrict qs) {
    for (int h = 0; h < 2; ++h) {
        xb a, b, c, d;
        memcpy(&a, L + 128 * h, 32);
        memcpy(&b, L + 128 * h + 32, 32);
        memcpy(&c, L + 128 * h + 64, 32);
        memcpy(&d, L + 128 * h + 96, 32);
        const xb r = a | (b << 2) | (c << 4) | (d << 6);
        memcpy(qs + 32 * h, &r, 32);
    }
}

/* ================================================================ Q4_K / Q5_K */

/* The sum of x^2 of each of n consecutive super-blocks of xg, each in element order as ggml adds
 * it (sigma2 of the importance-weighted K quantizers), the n chains side by side. */
KQ_AI void F(superblock_sumx2)(const float *restrict xg, const int n, float *restrict s2) {
    for (int s = 0; s < n; ++s) s2[s] = 0.f;
    for (int j = 0; j < QK_K; ++j)
        for (int s = 0; s < n; ++s) s2[s] += xg[s * QK_K + j] * xg[s * QK_K + j];
}

/* quantize_row_q{4,5}_K_ref (qw NULL) or, with importance weights qw (n_per_row of them, for
 * whole rows), quantize_row_q{4,5}_K_impl. The two differ in the weights of the search
 * (av_x + |x| per sub-block; qw * sqrtf(sigma2 + x^2), sigma2 = 2 * sum x^2 / 256 over the
 * super-block), in its settings (make_qkx2_quants' and make_qkx3_quants', which are the same
 * search once given explicit weights), and in how the 8 scales and mins become 6-bit values
 * (max / 63 there; make_qp_quants weighted by each sub-block's sum of weights here). The
 * requantization and packing are the same code. */
KQ_AI void F(q45k)(const float *restrict x, uint8_t *restrict y, int64_t nb, const int q5, const float *restrict qw,
                   int64_t n_per_row) {
    enum { G = GROUP_VECS(8, KQ_G_QKX2), PER = G * NL / 8 };
    const int nmax = q5 ? 31 : 15;
    const int bytes = q5 ? 176 : 144;
    int64_t first = 0; /* the first super-block of the group */
    KQ_GROUPS(x, y, nb, PER, bytes, {
        vf xt[32 * G], w[32 * G];
        vi Lv[32 * G];
        F(transpose)(xg, 32, G, xt);
        vf scv[G], mnv[G], swv[G];
        if (qw) {
            float s2[PER]; /* sigma2 of each super-block */
            F(superblock_sumx2)(xg, PER, s2);
            vf sigma[G];
            kq_f32a *wo = (kq_f32a *)w, *so = (kq_f32a *)sigma;
            for (int k = 0; k < G * NL; ++k) {
                const float *qk = qw + (first * QK_K + 32 * (int64_t)k) % n_per_row;
                so[k] = (2.f * s2[k / 8]) / (float)QK_K;
                for (int i = 0; i < 32; ++i) wo[(i * G + k / NL) * NL + k % NL] = qk[i];
            }
            first += PER;
            for (int g = 0; g < G; ++g) swv[g] = F(splat)(0.f);
            for (int i = 0; i < 32; ++i)
                for (int g = 0; g < G; ++g) {
                    const vf xi = xt[i * G + g];
                    w[i * G + g] = w[i * G + g] * F(vsqrt)(sigma[g] + xi * xi);
                    swv[g] = swv[g] + w[i * G + g];
                }
            F(qkx2)(G, 32, nmax, -0.9f, 0.05f, 36, 0, xt, w, scv, mnv, Lv);
        } else {
            vf av_x[G];
            for (int g = 0; g < G; ++g) {
                vf sum_x2 = F(splat)(0.f);
                for (int l = 0; l < 32; ++l) sum_x2 = sum_x2 + xt[l * G + g] * xt[l * G + g];
                const vf q = sum_x2 / 32.f;
                for (int k = 0; k < NL; ++k) av_x[g][k] = sqrtf(q[k]);
            }
            for (int l = 0; l < 32; ++l)
                for (int g = 0; g < G; ++g) w[l * G + g] = av_x[g] + F(vabs)(xt[l * G + g]);
            if (q5)
                F(qkx2)(G, 32, 31, -0.5f, 0.1f, 15, 0, xt, w, scv, mnv, Lv);
            else
                F(qkx2)(G, 32, 15, -1.f, 0.1f, 20, 0, xt, w, scv, mnv, Lv);
        }
        const kq_f32a *scales = (const kq_f32a *)scv, *mins = (const kq_f32a *)mnv, *sws = (const kq_f32a *)swv;
        const kq_i32a *Ls = (const kq_i32a *)Lv;

        for (int s = 0; s < PER; ++s) {
            const float *xs = xg + s * QK_K;
            uint8_t *ys = yg + s * bytes;
            uint8_t *sc = ys + 4;
            const kq_f32a *sc_s = scales + 8 * s, *mn_s = mins + 8 * s;
            if (qw) {
                float scs[8], mns[8], sw[8];
                uint8_t ls[8], lm[8];
                for (int j = 0; j < 8; ++j) {
                    scs[j] = sc_s[j];
                    mns[j] = mn_s[j];
                    sw[j] = sws[8 * s + j];
                }
                const float d_block = kq_make_qp_quants(8, 63, scs, ls, sw);
                const float m_block = kq_make_qp_quants(8, 63, mns, lm, sw);
                for (int j = 0; j < 8; ++j) {
                    uint8_t l = ls[j], m = lm[j];
                    if (q5) { /* only Q5_K's _impl clamps them */
                        l = KQ_MIN(63, l);
                        m = KQ_MIN(63, m);
                    }
                    if (j < 4) {
                        sc[j] = l;
                        sc[j + 4] = m;
                    } else {
                        sc[j + 4] = (uint8_t)((l & 0xF) | ((m & 0xF) << 4));
                        sc[j - 4] |= (uint8_t)((l >> 4) << 6);
                        sc[j - 0] |= (uint8_t)((m >> 4) << 6);
                    }
                }
                kq_put_f16(ys, d_block);
                kq_put_f16(ys + 2, m_block);
            } else {
                float max_scale = 0, max_min = 0;
                for (int j = 0; j < 8; ++j) {
                    if (sc_s[j] > max_scale) max_scale = sc_s[j];
                    if (mn_s[j] > max_min) max_min = mn_s[j];
                }
                const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
                const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
                uint8_t ls[8], lm[8];
                for (int j = 0; j < 8; ++j) {
                    const uint8_t a = (uint8_t)kq_nearest_int(inv_scale * sc_s[j]);
                    const uint8_t b = (uint8_t)kq_nearest_int(inv_min * mn_s[j]);
                    ls[j] = a < 63 ? a : 63;
                    lm[j] = b < 63 ? b : 63;
                }
                for (int j = 0; j < 4; ++j) {
                    sc[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
                    sc[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
                    sc[j + 8] = (uint8_t)((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
                }
                kq_put_f16(ys, max_scale / 63.f);
                kq_put_f16(ys + 2, max_min / 63.f);
            }
            const float d_all = kq_get_f16(ys), dmin_all = kq_get_f16(ys + 2);

            uint8_t L[QK_K];
            for (int j = 0; j < 8; ++j) {
                uint8_t scj, mj;
                kq_scale_min_k4(j, sc, &scj, &mj);
                const float d = d_all * (float)scj;
                if (d == 0.f) { /* the reference keeps the codes of the search */
                    for (int i = 0; i < 32; ++i) L[32 * j + i] = (uint8_t)Ls[i * G * NL + 8 * s + j];
                    continue;
                }
                F(requant)(xs + 32 * j, 32, d, dmin_all * (float)mj, 1, 0, nmax, 0, L + 32 * j);
            }
            if (!q5) {
                uint8_t *qs = ys + 16;
                for (int c = 0; c < 4; ++c) {
                    xb a, b;
                    memcpy(&a, L + 64 * c, 32);
                    memcpy(&b, L + 64 * c + 32, 32);
                    const xb r = a | (b << 4);
                    memcpy(qs + 32 * c, &r, 32);
                }
            } else {
                uint8_t *qh = ys + 16, *ql = ys + 48;
                xb h = {0};
                for (int c = 0; c < 4; ++c) {
                    xb a, b;
                    memcpy(&a, L + 64 * c, 32);
                    memcpy(&b, L + 64 * c + 32, 32);
                    h |= ((a >> 4) & 1) << (2 * c);
                    h |= ((b >> 4) & 1) << (2 * c + 1);
                    const xb r = (a & 0xF) | ((b & 0xF) << 4);
                    memcpy(ql + 32 * c, &r, 32);
                }
                memcpy(qh, &h, 32);
            }
        }
    });
}

static void F(q4k)(const float *x, uint8_t *y, int64_t nb) { F(q45k)(x, y, nb, 0, NULL, QK_K); }
static void F(q5k)(const float *x, uint8_t *y, int64_t nb) { F(q45k)(x, y, nb, 1, NULL, QK_K); }
static void F(q4k_w)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    F(q45k)(x, y, nb, 0, qw, n_per_row);
}
static void F(q5k_w)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    F(q45k)(x, y, nb, 1, qw, n_per_row);
}

/* ================================================================ Q2_K */

/* quantize_row_q2_K_ref (qw NULL) or, with importance weights qw (n_per_row of them, for whole
 * rows), quantize_row_q2_K_impl: the weights qw * sqrtf(sigma2 + x^2), sigma2 = sum x^2 / 256
 * over the super-block, instead of |x|; make_qkx3_quants' settings (squared error, not absolute)
 * instead of make_qkx2_quants'; and make_qp_quants for the 4-bit scales and mins, weighted by
 * each sub-block's sum of weights, instead of max / 15. The rest is the same code. */
KQ_AI void F(q2k_core)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    enum { G = GROUP_VECS(16, KQ_G_QKX2), PER = G * NL / 16 };
    int64_t first = 0; /* the first super-block of the group */
    KQ_GROUPS(x, y, nb, PER, 84, {
        vf xt[16 * G], w[16 * G];
        vi Lv[16 * G];
        F(transpose)(xg, 16, G, xt);
        vf scv[G], mnv[G], swv[G];
        if (qw) {
            float s2[PER]; /* sigma2 of each super-block */
            F(superblock_sumx2)(xg, PER, s2);
            vf sigma[G];
            kq_f32a *wo = (kq_f32a *)w, *so = (kq_f32a *)sigma;
            for (int k = 0; k < G * NL; ++k) {
                const float *qk = qw + (first * QK_K + 16 * (int64_t)k) % n_per_row;
                so[k] = s2[k / 16] / (float)QK_K;
                for (int i = 0; i < 16; ++i) wo[(i * G + k / NL) * NL + k % NL] = qk[i];
            }
            first += PER;
            for (int g = 0; g < G; ++g) swv[g] = F(splat)(0.f);
            for (int i = 0; i < 16; ++i)
                for (int g = 0; g < G; ++g) {
                    const vf xi = xt[i * G + g];
                    w[i * G + g] = w[i * G + g] * F(vsqrt)(sigma[g] + xi * xi);
                    swv[g] = swv[g] + w[i * G + g];
                }
            F(qkx2)(G, 16, 3, -0.9f, 0.05f, 36, 0, xt, w, scv, mnv, Lv);
        } else {
            for (int j = 0; j < 16 * G; ++j) w[j] = F(vabs)(xt[j]);
            F(qkx2)(G, 16, 3, -0.5f, 0.1f, 15, 1, xt, w, scv, mnv, Lv);
        }
        const kq_f32a *scales = (const kq_f32a *)scv, *mins = (const kq_f32a *)mnv, *sws = (const kq_f32a *)swv;
        const kq_i32a *Ls = (const kq_i32a *)Lv;

        for (int s = 0; s < PER; ++s) {
            const float *xs = xg + s * QK_K;
            uint8_t *ys = yg + s * 84;
            uint8_t *sc = ys;
            const kq_f32a *sc_s = scales + 16 * s, *mn_s = mins + 16 * s;
            if (qw) {
                float scs[16], mns[16], sw[16];
                uint8_t ls[16], lm[16];
                for (int j = 0; j < 16; ++j) {
                    scs[j] = sc_s[j];
                    mns[j] = mn_s[j];
                    sw[j] = sws[16 * s + j];
                }
                const float dm = kq_make_qp_quants(16, 15, scs, ls, sw);
                const float mm = kq_make_qp_quants(16, 15, mns, lm, sw);
                kq_put_f16(ys + 80, dm);
                kq_put_f16(ys + 82, mm);
                for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(ls[j] | (lm[j] << 4));
            } else {
                float max_scale = 0, max_min = 0;
                for (int j = 0; j < 16; ++j) {
                    if (sc_s[j] > max_scale) max_scale = sc_s[j];
                    if (mn_s[j] > max_min) max_min = mn_s[j];
                }
                if (max_scale > 0) {
                    const float iscale = 15.f / max_scale;
                    for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)kq_nearest_int(iscale * sc_s[j]);
                    kq_put_f16(ys + 80, max_scale / 15.f);
                } else {
                    memset(sc, 0, 16);
                    kq_put_f16(ys + 80, 0.f);
                }
                if (max_min > 0) {
                    const float iscale = 15.f / max_min;
                    for (int j = 0; j < 16; ++j) sc[j] |= (uint8_t)(kq_nearest_int(iscale * mn_s[j]) << 4);
                    kq_put_f16(ys + 82, max_min / 15.f);
                } else {
                    kq_put_f16(ys + 82, 0.f);
                }
            }
            const float d_all = kq_get_f16(ys + 80), dmin_all = kq_get_f16(ys + 82);
            uint8_t L[QK_K];
            for (int j = 0; j < 16; ++j) {
                const float d = d_all * (float)(sc[j] & 0xF);
                if (d == 0.f) {
                    for (int i = 0; i < 16; ++i) L[16 * j + i] = (uint8_t)Ls[i * G * NL + 16 * s + j];
                    continue;
                }
                F(requant)(xs + 16 * j, 16, d, dmin_all * (float)(sc[j] >> 4), 1, 0, 3, 0, L + 16 * j);
            }
            F(pack2)(L, ys + 16);
        }
    });
}

static void F(q2k)(const float *x, uint8_t *y, int64_t nb) { F(q2k_core)(x, y, nb, NULL, QK_K); }
static void F(q2k_w)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    F(q2k_core)(x, y, nb, qw, n_per_row);
}

/* ================================================================ Q3_K */

/* The rest of a Q3_K block once its 16 six-bit scales lsc (0..63, the stored value, bias 32
 * included) and d are stored: requantize each sub-block with the fp16-rounded d times its scale,
 * or keep the codes of the search (Ls[i * stride + base + j]: element i of sub-block j) where that
 * is 0, then the high-bit mask and the 2-bit codes. */
KQ_AI void F(q3k_finish)(const float *restrict xs, uint8_t *restrict ys, const int *lsc, const kq_i32a *Ls,
                         const int stride, const int base) {
    const float d_all = kq_get_f16(ys + 108);
    uint8_t L[QK_K];
    for (int j = 0; j < 16; ++j) {
        const float d = d_all * (float)(lsc[j] - 32);
        if (d == 0.f) {
            for (int i = 0; i < 16; ++i) L[16 * j + i] = (uint8_t)Ls[i * stride + base + j];
            continue;
        }
        F(requant)(xs + 16 * j, 16, d, 0.f, 0, -4, 3, 4, L + 16 * j);
    }
    /* high bit of code 32k+m goes to bit k of hmask[m]; the low two bits stay */
    xb hm = {0};
    for (int k = 0; k < 8; ++k) {
        xb a;
        memcpy(&a, L + 32 * k, 32);
        hm |= ((a >> 2) & 1) << k;
        a &= 3;
        memcpy(L + 32 * k, &a, 32);
    }
    memcpy(ys, &hm, 32);
    F(pack2)(L, ys + 32);
}

/* the 16 six-bit scales l (0..63) into Q3_K's 12 scale bytes */
KQ_AI void F(q3k_scales)(const int *lsc, uint8_t *restrict sc) {
    memset(sc, 0, 12);
    for (int j = 0; j < 16; ++j) {
        const int l = lsc[j];
        if (j < 8)
            sc[j] = (uint8_t)(l & 0xF);
        else
            sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
        sc[j % 4 + 8] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
    }
}

/* quantize_row_q3_K_ref */
static void F(q3k)(const float *x, uint8_t *y, int64_t nb) {
    enum { G = GROUP_VECS(16, KQ_G_Q3), PER = G * NL / 16 };
    KQ_GROUPS(x, y, nb, PER, 110, {
        vf xt[16 * G];
        vi Lv[16 * G];
        F(transpose)(xg, 16, G, xt);
        vf scv[G];
        F(q3search)(G, xt, Lv, scv);
        const kq_f32a *scales = (const kq_f32a *)scv;
        const kq_i32a *Ls = (const kq_i32a *)Lv;

        for (int s = 0; s < PER; ++s) {
            const float *xs = xg + s * QK_K;
            uint8_t *ys = yg + s * 110;
            const kq_f32a *sc_s = scales + 16 * s;
            float max_scale = 0, amax = 0;
            for (int j = 0; j < 16; ++j) {
                const float a = fabsf(sc_s[j]);
                if (a > amax) {
                    amax = a;
                    max_scale = sc_s[j];
                }
            }
            int lsc[16];
            if (max_scale != 0) {
                const float iscale = -32.f / max_scale;
                for (int j = 0; j < 16; ++j) {
                    int8_t l = (int8_t)kq_nearest_int(iscale * sc_s[j]);
                    lsc[j] = (l > 31 ? 31 : l < -32 ? -32 : l) + 32;
                }
                kq_put_f16(ys + 108, 1.f / iscale);
            } else {
                for (int j = 0; j < 16; ++j) lsc[j] = 0;
                kq_put_f16(ys + 108, 0.f);
            }
            F(q3k_scales)(lsc, ys + 96);
            F(q3k_finish)(xs, ys, lsc, Ls, G * NL, 16 * s);
        }
    });
}

/* quantize_row_q3_K_impl with importance weights qw (n_per_row of them, for whole rows):
 * weight = qw * sqrtf(sigma2 + x^2), sigma2 = 2 * sum x^2 / 256 over the super-block, then
 * make_qx_quants(16, 4, x, L, 1, weight) per sub-block, and make_qx_quants(16, 32, scales, Ls,
 * 1, sw) over a super-block's 16 scales, sw being each sub-block's sum of weights. The first
 * search runs on G*NL sub-blocks at once, the second on NL super-blocks at once (lane = one
 * super-block, element i = its sub-block i), so a group is NL super-blocks. */
static void F(q3k_w)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    if (!qw) {
        F(q3k)(x, y, nb);
        return;
    }
    enum { G = GROUP_VECS(16, KQ_G_Q3), CH = G * NL, NCH = 16 * NL / CH };
    _Static_assert((16 * NL) % (G * NL) == 0, "a group's sub-blocks split into whole chunks");
    float pad[NL * QK_K];
    uint8_t out[NL * 110];
    vi Lv[NCH][16 * G];
    float sc_all[16 * NL], sw_all[16 * NL];
    for (int64_t b = 0; b < nb; b += NL) {
        const int n = nb - b < NL ? (int)(nb - b) : NL;
        const float *xg = x + b * QK_K;
        uint8_t *yg = y + b * 110;
        if (n < NL) {
            memset(pad, 0, sizeof pad);
            memcpy(pad, xg, (size_t)n * QK_K * sizeof(float));
            xg = pad;
            yg = out;
        }
        float s2[NL]; /* sigma2 of each super-block */
        F(superblock_sumx2)(xg, NL, s2);
        for (int s = 0; s < NL; ++s) s2[s] = (2.f * s2[s]) / (float)QK_K;

        for (int c = 0; c < NCH; ++c) {
            vf xt[16 * G], wt[16 * G], sigma[G], scv[G];
            F(transpose)(xg + (size_t)c * CH * 16, 16, G, xt);
            kq_f32a *wo = (kq_f32a *)wt, *so = (kq_f32a *)sigma;
            for (int k = 0; k < CH; ++k) {
                const int kk = c * CH + k; /* sub-block of the group */
                const float *qk = qw + (b * QK_K + 16 * (int64_t)kk) % n_per_row;
                so[k] = s2[kk / 16];
                for (int i = 0; i < 16; ++i) wo[(i * G + k / NL) * NL + k % NL] = qk[i];
            }
            vf sw[G];
            for (int g = 0; g < G; ++g) sw[g] = F(splat)(0.f);
            for (int i = 0; i < 16; ++i)
                for (int g = 0; g < G; ++g) {
                    const vf xi = xt[i * G + g];
                    wt[i * G + g] = wt[i * G + g] * F(vsqrt)(sigma[g] + xi * xi);
                    sw[g] = sw[g] + wt[i * G + g];
                }
            F(qxsearch)(G, 16, 4, xt, wt, Lv[c], scv);
            memcpy(sc_all + c * CH, scv, sizeof scv);
            memcpy(sw_all + c * CH, sw, sizeof sw);
        }
        /* the scales of each super-block, lane = super-block */
        vf st[16], swt[16], dv;
        vi Ls2[16];
        F(transpose)(sc_all, 16, 1, st);
        F(transpose)(sw_all, 16, 1, swt);
        F(qxsearch)(1, 16, 32, st, swt, Ls2, &dv);

        for (int s = 0; s < NL; ++s) {
            const float *xs = xg + s * QK_K;
            uint8_t *ys = yg + s * 110;
            int lsc[16];
            for (int j = 0; j < 16; ++j) lsc[j] = Ls2[j][s];
            F(q3k_scales)(lsc, ys + 96);
            kq_put_f16(ys + 108, dv[s]);
            const int c = 16 * s / CH; /* the chunk holding this super-block's sub-blocks */
            F(q3k_finish)(xs, ys, lsc, (const kq_i32a *)Lv[c], CH, 16 * s - c * CH);
        }
        if (n < NL) memcpy(y + b * 110, out, (size_t)n * 110);
    }
}

/* ================================================================ Q6_K */

/* quantize_row_q6_K_ref (qw NULL: make_qx_quants weighs each element by x*x) or, with
 * importance weights qw (n_per_row of them, for whole rows), quantize_row_q6_K_impl, which
 * weighs each element by its qw alone: the rest of the two is the same code. */
KQ_AI void F(q6k_core)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    enum { G = GROUP_VECS(16, KQ_G_QX), PER = G * NL / 16 };
    int64_t first = 0; /* the first super-block of the group */
    KQ_GROUPS(x, y, nb, PER, 210, {
        vf xt[16 * G], wt[16 * G];
        vi Lv[16 * G];
        F(transpose)(xg, 16, G, xt);
        if (qw) {
            kq_f32a *wo = (kq_f32a *)wt;
            for (int k = 0; k < G * NL; ++k) {
                const float *qk = qw + (first * QK_K + 16 * (int64_t)k) % n_per_row;
                for (int i = 0; i < 16; ++i) wo[(i * G + k / NL) * NL + k % NL] = qk[i];
            }
            first += PER;
        } else {
            for (int j = 0; j < 16 * G; ++j) wt[j] = xt[j] * xt[j];
        }
        vf scv[G];
        F(qxsearch)(G, 16, 32, xt, wt, Lv, scv);
        const kq_f32a *scales = (const kq_f32a *)scv;
        const kq_i32a *Ls = (const kq_i32a *)Lv;

        for (int s = 0; s < PER; ++s) {
            const float *xs = xg + s * QK_K;
            uint8_t *ys = yg + s * 210;
            uint8_t *ql = ys, *qh = ys + 128;
            int8_t *sc = (int8_t *)(ys + 192);
            const kq_f32a *sc_s = scales + 16 * s;
            float max_scale = 0, max_abs_scale = 0;
            for (int j = 0; j < 16; ++j) {
                const float a = fabsf(sc_s[j]);
                if (a > max_abs_scale) {
                    max_abs_scale = a;
                    max_scale = sc_s[j];
                }
            }
            if (max_abs_scale < 1e-15f) {
                memset(ys, 0, 210);
                continue;
            }
            const float iscale = -128.f / max_scale;
            kq_put_f16(ys + 208, 1.f / iscale);
            for (int j = 0; j < 16; ++j) {
                const int l = kq_nearest_int(iscale * sc_s[j]);
                sc[j] = (int8_t)(l < 127 ? l : 127);
            }
            const float d_all = kq_get_f16(ys + 208);
            uint8_t L[QK_K];
            for (int j = 0; j < 16; ++j) {
                const float d = d_all * (float)sc[j];
                if (d == 0.f) {
                    for (int i = 0; i < 16; ++i) L[16 * j + i] = (uint8_t)Ls[i * G * NL + 16 * s + j];
                    continue;
                }
                F(requant)(xs + 16 * j, 16, d, 0.f, 0, -32, 31, 32, L + 16 * j);
            }
            for (int h = 0; h < 2; ++h) {
                xb a, b, c, e;
                memcpy(&a, L + 128 * h, 32);
                memcpy(&b, L + 128 * h + 32, 32);
                memcpy(&c, L + 128 * h + 64, 32);
                memcpy(&e, L + 128 * h + 96, 32);
                const xb lo = (a & 0xF) | ((c & 0xF) << 4);
                const xb hi = (b & 0xF) | ((e & 0xF) << 4);
                const xb hb = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
                memcpy(ql + 64 * h, &lo, 32);
                memcpy(ql + 64 * h + 32, &hi, 32);
                memcpy(qh + 32 * h, &hb, 32);
            }
        }
    });
}

static void F(q6k)(const float *x, uint8_t *y, int64_t nb) { F(q6k_core)(x, y, nb, NULL, QK_K); }
static void F(q6k_w)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    F(q6k_core)(x, y, nb, qw, n_per_row);
}

/* ================================================================ legacy types (32-element blocks)
 *
 * Natural element order: a block is NV vectors. The reductions over a block (max |x|, min, max)
 * are exact in any order once NaN is out of the way (a maximum of non-NaN floats does not depend
 * on the order, only which of several equal elements it returns, i.e. the sign of a zero or
 * the sign behind a |x| tie). So: NaNs are masked the way the reference's comparisons skip them,
 * the value comes from an order-free reduction, and the element the reference would have kept
 * (the first one, its comparisons being strict) is looked up by index. Float -> int8/uint8
 * conversions reproduce libggml's: truncate to int32 (0x80000000 for NaN/overflow), low byte. */

#define NV (32 / NL)

KQ_AI vf F(hred_max)(vf a) { /* max over lanes, for NaN-free a */
#if KQ_NL == 16
    a = F(maxf)(a, __builtin_shuffle(a, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
    a = F(maxf)(a, __builtin_shuffle(a, (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
    a = F(maxf)(a, __builtin_shuffle(a, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
    a = F(maxf)(a, __builtin_shuffle(a, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
#elif KQ_NL == 8
    a = F(maxf)(a, __builtin_shuffle(a, (vi){4, 5, 6, 7, 0, 1, 2, 3}));
    a = F(maxf)(a, __builtin_shuffle(a, (vi){2, 3, 0, 1, 6, 7, 4, 5}));
    a = F(maxf)(a, __builtin_shuffle(a, (vi){1, 0, 3, 2, 5, 4, 7, 6}));
#else
    a = F(maxf)(a, __builtin_shuffle(a, (vi){2, 3, 0, 1}));
    a = F(maxf)(a, __builtin_shuffle(a, (vi){1, 0, 3, 2}));
#endif
    return a;
}

KQ_AI vf F(hred_min)(vf a) { return -F(hred_max)(-a); } /* negation is exact */

/* index of the first element of the block equal (==) to t; -1 if none */
KQ_AI int F(first_eq)(const vf *v, vf t) {
#if KQ_ID == 1
    uint32_t m = 0;
    for (int k = 0; k < NV; ++k) m |= (uint32_t)_mm256_movemask_ps((__m256)(v[k] == t)) << (NL * k);
    return m ? __builtin_ctz(m) : -1;
#elif KQ_ID == 2
    uint32_t m = 0;
    for (int k = 0; k < NV; ++k) m |= (uint32_t)_mm512_cmp_ps_mask((__m512)v[k], (__m512)t, _CMP_EQ_OQ) << (NL * k);
    return m ? __builtin_ctz(m) : -1;
#else
    for (int k = 0; k < NV; ++k)
        for (int l = 0; l < NL; ++l)
            if (v[k][l] == t[0]) return NL * k + l;
    return -1;
#endif
}

/* bit 4 of each of the 32 codes, element j -> bit j */
KQ_AI uint32_t F(bit4_mask)(const vi *q) {
    uint32_t m = 0;
#if KQ_ID == 1
    for (int k = 0; k < NV; ++k) m |= (uint32_t)_mm256_movemask_ps((__m256)(q[k] << 27)) << (NL * k);
#elif KQ_ID == 2
    for (int k = 0; k < NV; ++k) m |= (uint32_t)_mm512_test_epi32_mask((__m512i)q[k], (__m512i)F(splati)(0x10)) << (NL * k);
#else
    for (int k = 0; k < NV; ++k)
        for (int l = 0; l < NL; ++l) m |= (uint32_t)((q[k][l] >> 4) & 1) << (NL * k + l);
#endif
    return m;
}

KQ_AI vi F(cvtt)(vf v) { /* cvttps2dq: 0x80000000 for NaN and out of range */
    const vi in = (v > F(splat)(-2147483904.f)) & (v < F(splat)(2147483648.f));
    return F(seli)(in, __builtin_convertvector(F(sel)(in, v, F(splat)(0.f)), vi), F(splati)(INT32_MIN));
}

KQ_AI vi F(sext8)(vi t) { return (t << 24) >> 24; } /* (int8_t) of the low byte */

/* the signed value of the first element with the largest |x| (NaN never wins), as in Q4_0/Q5_0 */
KQ_AI float F(signed_absmax)(const vf *v) {
    vf a[NV];
    for (int k = 0; k < NV; ++k) a[k] = F(sel)(v[k] == v[k], F(vabs)(v[k]), F(splat)(0.f));
    vf m = a[0];
    for (int k = 1; k < NV; ++k) m = F(maxf)(m, a[k]);
    m = F(hred_max)(m);
    if (m[0] == 0.f) return 0.f; /* never replaced: the initial +0 */
    const int j = F(first_eq)(a, m);
    return v[j / NL][j % NL];
}

/* min (or max) of the block starting from +FLT_MAX (-FLT_MAX) with strict comparisons, as in
 * Q4_1/Q5_1: NaN is skipped, and of equal values the first one stays (the sign of a zero) */
KQ_AI float F(block_min)(const vf *v, int want_max) {
    vf c[NV];
    for (int k = 0; k < NV; ++k) c[k] = F(sel)(v[k] == v[k], want_max ? -v[k] : v[k], F(splat)(3.40282347e+38f));
    vf m = c[0];
    for (int k = 1; k < NV; ++k) m = F(minf)(m, c[k]);
    m = F(hred_min)(F(minf)(m, F(splat)(3.40282347e+38f)));
    const float r = want_max ? -m[0] : m[0];
    if (r == 0.f) { /* +0 or -0: whichever comes first */
        const int j = F(first_eq)(v, F(splat)(0.f));
        return v[j / NL][j % NL];
    }
    return r; /* bitwise the element itself, or the initial value when no element beat it */
}

/* qs byte j = lo nibble code j | code j+16 << 4; codes as int lanes, packed modulo 256 */
KQ_AI void F(pack_nibbles)(const vi *b, uint8_t *qs) {
    for (int k = 0; k < NV / 2; ++k) F(narrow)((b[k] | (b[k + NV / 2] << 4)) & 0xff, qs + NL * k);
}

static void F(q4_0)(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += 32, y += 18) {
        vf v[NV];
        for (int k = 0; k < NV; ++k) v[k] = F(load)(x + NL * k);
        const float max = F(signed_absmax)(v);
        const float d = max / -8.f;
        const float id = d != 0.f ? 1.0f / d : 0.0f;
        kq_put_f16(y, d);
        vi b[NV];
        for (int k = 0; k < NV; ++k) b[k] = F(mini)(F(sext8)(F(cvtt)(v[k] * id + 8.5f)), F(splati)(15)) & 0xff;
        F(pack_nibbles)(b, y + 2);
    }
}

static void F(q4_1)(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += 32, y += 20) {
        vf v[NV];
        for (int k = 0; k < NV; ++k) v[k] = F(load)(x + NL * k);
        const float min = F(block_min)(v, 0), max = F(block_min)(v, 1);
        const float d = (max - min) / 15.f;
        const float id = d != 0.f ? 1.0f / d : 0.0f;
        kq_put_f16(y, d);
        kq_put_f16(y + 2, min);
        vi b[NV];
        for (int k = 0; k < NV; ++k)
            b[k] = F(mini)(F(sext8)(F(cvtt)((v[k] - min) * id + 0.5f)), F(splati)(15)) & 0xff;
        F(pack_nibbles)(b, y + 4);
    }
}

static void F(q5_0)(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += 32, y += 22) {
        vf v[NV];
        for (int k = 0; k < NV; ++k) v[k] = F(load)(x + NL * k);
        const float max = F(signed_absmax)(v);
        const float d = max / -16.f;
        const float id = d != 0.f ? 1.0f / d : 0.0f;
        kq_put_f16(y, d);
        vi b[NV];
        for (int k = 0; k < NV; ++k) b[k] = F(mini)(F(sext8)(F(cvtt)(v[k] * id + 16.5f)), F(splati)(31)) & 0xff;
        const uint32_t qh = F(bit4_mask)(b);
        memcpy(y + 2, &qh, 4);
        for (int k = 0; k < NV; ++k) b[k] &= 0xf;
        F(pack_nibbles)(b, y + 6);
    }
}

static void F(q5_1)(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += 32, y += 24) {
        vf v[NV];
        for (int k = 0; k < NV; ++k) v[k] = F(load)(x + NL * k);
        const float min = F(block_min)(v, 0), max = F(block_min)(v, 1);
        const float d = (max - min) / 31.f;
        const float id = d != 0.f ? 1.0f / d : 0.0f;
        kq_put_f16(y, d);
        kq_put_f16(y + 2, min);
        vi b[NV];
        for (int k = 0; k < NV; ++k) b[k] = F(cvtt)((v[k] - min) * id + 0.5f) & 0xff;
        const uint32_t qh = F(bit4_mask)(b);
        memcpy(y + 4, &qh, 4);
        for (int k = 0; k < NV; ++k) b[k] &= 0xf;
        F(pack_nibbles)(b, y + 8);
    }
}

/* roundf (half away from zero) then cvtt: exact via trunc + the exactly representable fraction */
KQ_AI vi F(cvtt_roundf)(vf v) {
    const vi t = F(cvtt)(v);
    const vf frac = v - F(tof)(t);
    /* |v| < 2^23 (which excludes NaN) may have a fraction; beyond, v is an integer (or cvtt overflows) */
    const vi small = F(vabs)(v) < F(splat)(8388608.f);
    const vi up = small & (F(vabs)(frac) >= F(splat)(0.5f));
    const vi sgn = F(seli)(v < F(splat)(0.f), F(splati)(-1), F(splati)(1));
    return t + (sgn & up);
}

static void F(q8_0)(const float *x, uint8_t *y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += 32, y += 34) {
        vf v[NV];
        vi nan = F(splati)(0);
        for (int k = 0; k < NV; ++k) {
            v[k] = F(load)(x + NL * k);
            nan |= v[k] != v[k];
        }
        if (F(any)(nan)) {
            kq_q8_0_block_scalar(x, y);
            continue;
        }
        vf m = F(vabs)(v[0]);
        for (int k = 1; k < NV; ++k) m = F(maxf)(m, F(vabs)(v[k]));
        const float amax = F(hred_max)(m)[0];
        const float d = amax / 127.f;
        const float id = d != 0.f ? 1.0f / d : 0.0f;
        kq_put_f16(y, d);
        for (int k = 0; k < NV; ++k) F(narrow)(F(cvtt_roundf)(v[k] * id) & 0xff, y + 2 + NL * k);
    }
}

/* quantize_row_q{4,5}_{0,1}_impl: the legacy types with importance weights qw (n_per_row of them,
 * for whole rows). Each 32-element block is searched with the weights qw * sqrtf(sigma2 + x^2),
 * sigma2 = sum x^2 / n_per_row over the block's ROW (summed in element order): Q4_0/Q5_0 by
 * make_qx_quants(32, 8 or 16, rmse_type 1), Q4_1/Q5_1 by make_qkx3_quants(32, 15 or 31, -0.9, 0.05,
 * 36), whose codes are stored as they are (no requantization). G*NL blocks side by side, lane k
 * holding block k of the group; x starts at a row. */
KQ_AI void F(legacy_w)(const float *restrict x, uint8_t *restrict y, int64_t nb, const float *restrict qw,
                       int64_t n_per_row, const int nmax, const int with_min) {
    const int G = with_min ? KQ_G_QKX2 : KQ_G_QX, LANES = G * NL;
    const int q5 = nmax == 16 || nmax == 31, bytes = 18 + 2 * with_min + 4 * q5;
    const int64_t bpr = n_per_row / 32;
    float pad[32 * GMAX * NL];
    uint8_t out[GMAX * NL * 24];
    vf xt[32 * GMAX], wt[32 * GMAX], sigma[GMAX], scv[GMAX], mnv[GMAX];
    vi Lv[32 * GMAX];
    enum { ROWS = 8 };
    const int64_t nrows = nb / bpr;
    int64_t row0 = 0, nrow0 = 0; /* the rows row0 .. row0+nrow0-1 have their sigma2 in sig2 */
    float sig2[ROWS];
    for (int64_t b = 0; b < nb; b += LANES) {
        const int n = nb - b < LANES ? (int)(nb - b) : LANES;
        const float *xg = x + b * 32;
        uint8_t *yg = n < LANES ? out : y + b * bytes;
        if (n < LANES) {
            memset(pad, 0, sizeof pad);
            memcpy(pad, xg, (size_t)n * 32 * sizeof(float));
            xg = pad;
        }
        F(transpose)(xg, 32, G, xt);
        kq_f32a *wo = (kq_f32a *)wt, *so = (kq_f32a *)sigma;
        for (int k = 0; k < LANES; ++k) {
            const int64_t bi = b + (k < n ? k : 0);
            const int64_t r = bi / bpr;
            if (r < row0 || r >= row0 + nrow0) {
                /* each row's sum of x^2 in element order, ROWS rows side by side */
                row0 = r;
                nrow0 = nrows - r < ROWS ? nrows - r : ROWS;
                float s2[ROWS] = {0};
                const float *xr = x + r * n_per_row;
                for (int64_t j = 0; j < n_per_row; ++j)
                    for (int q = 0; q < ROWS; ++q)
                        if (q < nrow0) s2[q] += xr[q * n_per_row + j] * xr[q * n_per_row + j];
                for (int q = 0; q < nrow0; ++q) sig2[q] = s2[q] / (float)n_per_row;
            }
            so[k] = sig2[r - row0];
            const float *qk = qw + (bi % bpr) * 32;
            for (int i = 0; i < 32; ++i) wo[(i * G + k / NL) * NL + k % NL] = qk[i];
        }
        for (int i = 0; i < 32; ++i)
            for (int g = 0; g < G; ++g) {
                const vf xi = xt[i * G + g];
                wt[i * G + g] = wt[i * G + g] * F(vsqrt)(sigma[g] + xi * xi);
            }
        if (with_min)
            F(qkx2)(G, 32, nmax, -0.9f, 0.05f, 36, 0, xt, wt, scv, mnv, Lv);
        else
            F(qxsearch)(G, 32, nmax, xt, wt, Lv, scv);
        const kq_f32a *scales = (const kq_f32a *)scv, *mins = (const kq_f32a *)mnv;
        const kq_i32a *Ls = (const kq_i32a *)Lv;
        for (int k = 0; k < n; ++k) {
            uint8_t *yb = yg + (int64_t)k * bytes;
            kq_put_f16(yb, scales[k]);
            if (with_min) kq_put_f16(yb + 2, -mins[k]);
            uint8_t *qs = yb + 2 + 2 * with_min + 4 * q5;
            uint32_t qh = 0;
            for (int j = 0; j < 16; ++j) {
                const uint32_t l0 = (uint32_t)Ls[j * LANES + k], l1 = (uint32_t)Ls[(j + 16) * LANES + k];
                qs[j] = (uint8_t)((l0 & 0xF) | ((l1 & 0xF) << 4));
                qh |= ((l0 & 0x10u) >> 4) << j;
                qh |= ((l1 & 0x10u) >> 4) << (j + 16);
            }
            if (q5) memcpy(yb + 2 + 2 * with_min, &qh, 4);
        }
        if (n < LANES) memcpy(y + b * bytes, out, (size_t)n * bytes);
    }
}

static void F(q4_0_w)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    F(legacy_w)(x, y, nb, qw, n_per_row, 8, 0);
}
static void F(q5_0_w)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    F(legacy_w)(x, y, nb, qw, n_per_row, 16, 0);
}
static void F(q4_1_w)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    F(legacy_w)(x, y, nb, qw, n_per_row, 15, 1);
}
static void F(q5_1_w)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    F(legacy_w)(x, y, nb, qw, n_per_row, 31, 1);
}

/* ================================================================ IQ4_NL / IQ4_XS
 *
 * quantize_iq4_nl / quantize_iq4_xs, i.e. quantize_row_iq4_nl_impl with ntry = 7, what
 * ggml_quantize_chunk runs for these types with and without an importance matrix. The scale
 * search (16 candidate scales, each a pass over the 32 elements of a sub-block with a table
 * look-up per element) runs on G*NL sub-blocks side by side, lane k holding sub-block k, as the
 * K-quants do; the requantization with the final scale is element-wise, in natural order. */

/* best_index_int8(16, kvalues_iq4nl, x) lane-wise, and the table value it picks. Inside the
 * table's range the binary search ends at mu = 1 + #{k in 1..14 : !(x < v[k])}; a NaN x gives
 * mu = 15 there as in the search, and then index 15 since the final comparison is false. */
KQ_AI vi F(iq4_index)(vf x, vf *q) {
    vi n = F(splati)(1);
    for (int k = 1; k < 15; ++k) n -= ~(x < F(splat)(kq_iq4nl_f[k]));
    const vf lo = F(iq4_lut)(n - 1), hi = F(iq4_lut)(n);
    const vi take_lo = (x - lo) < (hi - x);
    const vi le = x <= F(splat)(kq_iq4nl_f[0]), ge = x >= F(splat)(kq_iq4nl_f[15]);
    vi r = F(seli)(take_lo, n - 1, n);
    vf v = F(sel)(take_lo, lo, hi);
    r = F(seli)(ge, F(splati)(15), r);
    v = F(sel)(ge, hi, v); /* n is 15 there */
    r = F(seli)(le, F(splati)(0), r);
    v = F(sel)(le, lo, v); /* n is 1 there */
    *q = v;
    return r;
}

/* sumqx, sumq2 of one candidate inverse scale per lane (the reference's sequential sums) */
KQ_AI void F(iq4_sums)(const int G, const vf *restrict x, const vf *restrict w, const vf *id, vf *sqx, vf *sq2) {
    for (int i = 0; i < 32; ++i)
        for (int g = 0; g < G; ++g) {
            const vf xi = x[i * G + g];
            vf q;
            (void)F(iq4_index)(id[g] * xi, &q);
            const vf wq = w[i * G + g] * q;
            sqx[g] = sqx[g] + wq * xi;
            sq2[g] = sq2[g] + wq * q;
        }
}

/* The scale of each of G*NL sub-blocks of 32 (x, w transposed), 0 for an all-zero one. */
KQ_AI void F(iq4search)(const int G, const vf *restrict x, const vf *restrict w, vf *restrict scale_out) {
    const vf zero = F(splat)(0.f);
    vf max[GMAX], amax[GMAX], d[GMAX], best[GMAX], id[GMAX], sqx[GMAX], sq2[GMAX];
    F(absmax)(G, 32, x, max, amax);
    for (int g = 0; g < G; ++g) {
        d[g] = -max[g] / kq_iq4nl_f[0];
        id[g] = 1.f / d[g];
        sqx[g] = sq2[g] = zero;
    }
    F(iq4_sums)(G, x, w, id, sqx, sq2);
    for (int g = 0; g < G; ++g) {
        d[g] = F(sel)(sq2[g] > zero, sqx[g] / sq2[g], zero);
        best[g] = d[g] * sqx[g];
    }
    for (int itry = -7; itry <= 7; ++itry) {
        for (int g = 0; g < G; ++g) {
            id[g] = (float)(itry + kq_iq4nl[0]) / max[g];
            sqx[g] = sq2[g] = zero;
        }
        F(iq4_sums)(G, x, w, id, sqx, sq2);
        for (int g = 0; g < G; ++g) {
            const vi take = (sq2[g] > zero) & (sqx[g] * sqx[g] > best[g] * sq2[g]);
            const vf s = sqx[g] / sq2[g];
            d[g] = F(sel)(take, s, d[g]);
            best[g] = F(sel)(take, s * sqx[g], best[g]);
        }
    }
    for (int g = 0; g < G; ++g) scale_out[g] = F(sel)(amax[g] < F(splat)(1e-15f), zero, d[g]);
}

/* 32 elements times `id`, to their 4-bit codes packed as the blocks store them: byte j holds
 * element j in its low nibble and element j+16 in its high one */
KQ_AI void F(iq4_pack)(const float *restrict x, float id, uint8_t *restrict qs) {
    uint8_t L[32];
    for (int k = 0; k < NV; ++k) {
        vf q;
        F(narrow)(F(iq4_index)(F(load)(x + NL * k) * id, &q), L + NL * k);
    }
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)(L[j] | (L[16 + j] << 4));
}

/* nsb super-blocks of `super` elements (32: IQ4_NL, 256: IQ4_XS) from whole rows of n_per_row;
 * qw: the importance of each column, or NULL */
KQ_AI void F(iq4)(const float *restrict x, uint8_t *restrict y, int64_t nsb, const float *restrict qw,
                  int64_t n_per_row, const int super) {
    enum { G = KQ_G_IQ4, LANES = G * NL };
    const int spb = super / 32, per = LANES / spb, bytes = super == 32 ? 18 : 136;
    float pad[LANES * 32];
    vf xt[32 * G], wt[32 * G], scv[G];
    float sigma2[LANES];
    for (int64_t b = 0; b < nsb; b += per) {
        const int n = nsb - b < per ? (int)(nsb - b) : per;
        const float *xg = x + b * super;
        if (n < per) {
            memset(pad, 0, sizeof pad);
            memcpy(pad, xg, (size_t)n * super * sizeof(float));
            xg = pad;
        }
        F(transpose)(xg, 32, G, xt);
        if (qw) {
            for (int s = 0; s < per; ++s) {
                float s2 = 0;
                for (int j = 0; j < super; ++j) s2 += xg[s * super + j] * xg[s * super + j];
                sigma2[s] = s2 * (2.f / super);
            }
            kq_f32a *wo = (kq_f32a *)wt;
            for (int k = 0; k < LANES; ++k) {
                const float *xk = xg + 32 * k, *qk = qw + (b * super + 32 * (int64_t)k) % n_per_row;
                const float s2 = sigma2[k / spb];
                for (int i = 0; i < 32; ++i) wo[(i * G + k / NL) * NL + k % NL] = qk[i] * sqrtf(s2 + xk[i] * xk[i]);
            }
        } else {
            for (int j = 0; j < 32 * G; ++j) wt[j] = xt[j] * xt[j];
        }
        F(iq4search)(G, xt, wt, scv);
        const kq_f32a *scales = (const kq_f32a *)scv;
        for (int s = 0; s < n; ++s) {
            const float *xs = xg + s * super;
            uint8_t *ys = y + (b + s) * bytes;
            if (super == 32) {
                const float d = scales[s];
                kq_put_f16(ys, d);
                F(iq4_pack)(xs, d != 0.f ? 1 / d : 0.f, ys + 2);
                continue;
            }
            const kq_f32a *sc = scales + 8 * s;
            float max_scale = 0, amax_scale = 0;
            for (int ib = 0; ib < 8; ++ib) {
                const float a = fabsf(sc[ib]);
                if (a > amax_scale) {
                    amax_scale = a;
                    max_scale = sc[ib];
                }
            }
            const float d = -max_scale / 32;
            kq_put_f16(ys, d);
            const float id = d != 0.f ? 1 / d : 0.f;
            uint16_t scales_h = 0;
            uint8_t *scales_l = ys + 4;
            for (int ib = 0; ib < 8; ++ib) {
                int l = kq_nearest_int(id * sc[ib]);
                l = l < -32 ? -32 : l > 31 ? 31 : l;
                const float dl = d * l;
                F(iq4_pack)(xs + 32 * ib, dl != 0.f ? 1 / dl : 0.f, ys + 8 + 16 * ib);
                l += 32;
                if (ib % 2 == 0) scales_l[ib / 2] = (uint8_t)(l & 0xf);
                else scales_l[ib / 2] |= (uint8_t)((l & 0xf) << 4);
                scales_h |= (uint16_t)((l >> 4) << 2 * (ib % 8));
            }
            ys[2] = (uint8_t)(scales_h & 0xff);
            ys[3] = (uint8_t)(scales_h >> 8);
        }
    }
}

static void F(iq4_nl)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    F(iq4)(x, y, nb, qw, n_per_row, 32);
}
static void F(iq4_xs)(const float *x, uint8_t *y, int64_t nb, const float *qw, int64_t n_per_row) {
    F(iq4)(x, y, nb, qw, n_per_row, QK_K);
}

#undef NV
#undef NL
#undef F
#undef vf
#undef vi
#undef xb

#endif /* KQ_PASS */
