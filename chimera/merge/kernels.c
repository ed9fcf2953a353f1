/* chimera's fused CPU merge kernels: W = sum_i lambda_i * W_i in float32, read and written in the
 * stored formats (bf16 / f16 / f32, DeepSeek block FP8) without float32 copies of whole tensors.
 *
 * Built once per machine by chimera/merge/native.py (`cc -O3 -march=native -ffp-contract=off`) and
 * loaded with ctypes; every function works on a caller-given row range, so Python threads (ctypes
 * drops the GIL) split a chunk between cores. The arithmetic is the one of chimera's torch path,
 * operation by operation, so both give the same bytes:
 *
 *   float mix    acc = x_0 * l_0 ; acc = fma(x_i, l_i, acc) for i >= 1 ; out = round_to_out(acc)
 *   FP8 decode   w = lut[q] * s_b                       (lut: the 256 e4m3fn values, NaN codes NaN)
 *   FP8 mix      acc = lut[q_0] * (s_0b * l_0) ; acc = fma(lut[q_i], s_ib * l_i, acc)
 *   FP8 encode   s_b = max(amax_b |acc|, 1e-4) / 448 (ue8m0: the smallest power of two >= s_b)
 *                q = e4m3fn_rne(clamp(acc / s_b, -448, 448))
 *
 * Rounding to bf16 and to e4m3fn is round-to-nearest-even, as torch's conversions. Every function
 * returns 1 if a non-finite value was produced (NaN/Inf in a parent), else 0, and FILE_GONE (-2) if it
 * touched a page of a mapped parent file that no longer exists (the file was truncated by someone else
 * while it was read): a SIGBUS inside a kernel call is caught (`guard_install`) and that call returns,
 * instead of the signal ending the process.
 */
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define FP8_MAX 448.0f
#define MAX_PARENTS 16
#define MAX_BLOCK 256
#define FILE_GONE (-2)

/* SIGBUS from a mapped file that shrank: jump back out of the kernel call that touched it (each thread has its
 * own jump target; a SIGBUS outside a kernel call gets the previous handler, i.e. the usual crash). */
static __thread sigjmp_buf guard_jb;
static __thread volatile sig_atomic_t guard_on;
static struct sigaction prev_bus;

static void on_sigbus(int sig, siginfo_t *info, void *ctx) {
    (void)sig; (void)info; (void)ctx;
    if (guard_on) {
        guard_on = 0;
        siglongjmp(guard_jb, 1);
    }
    sigaction(SIGBUS, &prev_bus, NULL);  /* not ours: the faulting access repeats under the previous handler */
}

int guard_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;   /* not masked while handled: nothing to restore after the jump */
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, &prev_bus);
}

/* the kernels are called from here, not inlined: a function that calls sigsetjmp is optimized less */
#define GUARDED(call)                                    \
    do {                                                 \
        if (sigsetjmp(guard_jb, 0)) return FILE_GONE;    \
        guard_on = 1;                                    \
        int r_ = (call);                                 \
        guard_on = 0;                                    \
        return r_;                                       \
    } while (0)

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline int finite_bits(uint32_t u) { return (u & 0x7F800000u) != 0x7F800000u; }

/* float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN */
static inline uint16_t bf16_rne(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* float32 in [-448, 448] -> e4m3fn code, round to nearest even (NaN -> 0x7F | sign) */
static inline uint8_t e4m3_rne(float f) {
    uint32_t u = f2u(f);
    uint32_t sign = (u >> 24) & 0x80u;
    u &= 0x7FFFFFFFu;
    uint32_t r;
    if (u > 0x7F800000u) {
        r = 0x7F;
    } else if (u < (121u << 23)) {
        /* below 2^-6, e4m3's subnormals are multiples of 2^-9: add 2^14 (whose float32 ulp is 2^-9)
         * so the FPU rounds to that grid, then read the multiple off the mantissa */
        r = f2u(u2f(u) + 16384.0f) - f2u(16384.0f);
    } else {
        /* re-bias the exponent (127 -> 7) and round the 23-bit mantissa to 3 bits, ties to even */
        r = (u - ((127u - 7u) << 23) + 0x7FFFFu + ((u >> 20) & 1u)) >> 20;
    }
    return (uint8_t)(r | sign);
}

static float LUT[256];
static int lut_ready = 0;

static void init_lut(void) {
    if (lut_ready) return;
    for (int c = 0; c < 256; c++) {
        int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
        float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf((float)m, -9);
        if ((c & 0x7F) == 0x7F) v = NAN;
        LUT[c] = s ? -v : v;
    }
    lut_ready = 1;
}

#define TILE 2048

/* acc[0:len] = x[a:a+len] * l (first) or fma(x[a:a+len], l, acc) (later parents); one loop per dtype */
static void accumulate(float *acc, const void *x, int dt, int64_t a, int len, float l, int first) {
    if (dt == BF16) {
        const uint16_t *p = (const uint16_t *)x + a;
        if (first) for (int i = 0; i < len; i++) acc[i] = u2f((uint32_t)p[i] << 16) * l;
        else for (int i = 0; i < len; i++) acc[i] = fmaf(u2f((uint32_t)p[i] << 16), l, acc[i]);
    } else if (dt == F16) {
        const _Float16 *p = (const _Float16 *)x + a;
        if (first) for (int i = 0; i < len; i++) acc[i] = (float)p[i] * l;
        else for (int i = 0; i < len; i++) acc[i] = fmaf((float)p[i], l, acc[i]);
    } else {
        const float *p = (const float *)x + a;
        if (first) for (int i = 0; i < len; i++) acc[i] = p[i] * l;
        else for (int i = 0; i < len; i++) acc[i] = fmaf(p[i], l, acc[i]);
    }
}

/* out[a:a+len] = round(acc) in the output dtype; returns whether a value is NaN/Inf */
static uint32_t store(void *out, int dt, int64_t a, int len, const float *acc) {
    uint32_t bad = 0;
    for (int i = 0; i < len; i++) bad |= !finite_bits(f2u(acc[i]));
    if (dt == BF16) for (int i = 0; i < len; i++) ((uint16_t *)out)[a + i] = bf16_rne(acc[i]);
    else if (dt == F16) for (int i = 0; i < len; i++) ((_Float16 *)out)[a + i] = (_Float16)acc[i];
    else memcpy((float *)out + a, acc, (size_t)len * 4);
    return bad;
}

/* out[i] = sum_k l_k x_k[i] for i in [start, stop): k parents of dtypes dts, output dtype out_dt,
 * through a float32 tile of TILE elements (in L1) */
static __attribute__((noinline)) int mix_float_impl(int64_t start, int64_t stop, int k, const void *const *xs, const int *dts, const float *lams,
              void *out, int out_dt) {
    float acc[TILE];
    uint32_t bad = 0;
    for (int64_t a = start; a < stop; a += TILE) {
        int len = (int)(stop - a < TILE ? stop - a : TILE);
        for (int j = 0; j < k; j++) accumulate(acc, xs[j], dts[j], a, len, lams[j], j == 0);
        bad |= store(out, out_dt, a, len, acc);
    }
    return bad != 0;
}

/* two bf16 parents, bf16 out: the common case, one loop (wide vectors pay off here, not with gathers) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("prefer-vector-width=512")))
#endif
static __attribute__((noinline)) int mix2_bf16_impl(int64_t start, int64_t stop, const uint16_t *x, const uint16_t *y, float l0, float l1,
              uint16_t *out) {
    uint32_t bad = 0;
    for (int64_t i = start; i < stop; i++) {
        float acc = fmaf(u2f((uint32_t)y[i] << 16), l1, u2f((uint32_t)x[i] << 16) * l0);
        bad |= !finite_bits(f2u(acc));
        out[i] = bf16_rne(acc);
    }
    return bad != 0;
}

/* DeepSeek block FP8 [R, N] (scales [ceil(R/b), ceil(N/b)]) -> float32, rows [r0, r1) */
static __attribute__((noinline)) int decode_fp8_impl(int64_t r0, int64_t r1, int64_t n, const uint8_t *q, const float *s, int64_t nb, int block,
               float *out) {
    init_lut();
    uint32_t bad = 0;
    for (int64_t r = r0; r < r1; r++) {
        const float *srow = s + (r / block) * nb;
        for (int64_t c0 = 0; c0 < n; c0 += block) {
            int64_t c1 = c0 + block < n ? c0 + block : n;
            float sc = srow[c0 / block];
            for (int64_t c = c0; c < c1; c++) {
                float w = LUT[q[r * n + c]] * sc;
                bad |= !finite_bits(f2u(w));
                out[r * n + c] = w;
            }
        }
    }
    return bad != 0;
}

/* the scale of one block from its largest |value| (see the header) */
static inline float block_scale(float amax, int ue8m0) {
    float s = (amax > 1e-4f ? amax : 1e-4f) / FP8_MAX;
    if (ue8m0 && (f2u(s) & 0x007FFFFFu))  /* not a power of two: round up to the next one */
        s = u2f((f2u(s) & 0x7F800000u) + 0x00800000u);
    return s;
}

/* encode one [bm, bn] float32 tile (row stride ld) into codes (row stride n); returns its scale */
static float encode_tile(const float *tile, int bm, int bn, int ld, float amax, int ue8m0, uint8_t *q,
                         int64_t n) {
    float s = block_scale(amax, ue8m0);
    for (int i = 0; i < bm; i++)
        for (int j = 0; j < bn; j++) {
            float v = tile[i * ld + j] / s;
            v = v < -FP8_MAX ? -FP8_MAX : (v > FP8_MAX ? FP8_MAX : v);
            q[i * n + j] = e4m3_rne(v);
        }
    return s;
}

/* K FP8 parents [R, N] with block scales -> mixed, re-quantized FP8 + scales; row blocks [rb0, rb1).
 * Parents and output share one block size b; edge blocks are partial. */
static __attribute__((noinline)) int mix_fp8_impl(int64_t rb0, int64_t rb1, int64_t rows, int64_t n, int k, const uint8_t *const *qs,
            const float *const *ss, const float *lams, int ue8m0, int block, uint8_t *q_out, float *s_out) {
    init_lut();
    if (k > MAX_PARENTS || block > MAX_BLOCK) return -1;
    int64_t nb = (n + block - 1) / block;
    static __thread float tile[MAX_BLOCK * MAX_BLOCK];
    uint32_t bad = 0;
    for (int64_t rb = rb0; rb < rb1; rb++) {
        int64_t r0 = rb * block;
        int bm = (int)(rows - r0 < block ? rows - r0 : block);
        for (int64_t cb = 0; cb < nb; cb++) {
            int64_t c0 = cb * block;
            int bn = (int)(n - c0 < block ? n - c0 : block);
            float sl[MAX_PARENTS];
            for (int j = 0; j < k; j++) sl[j] = ss[j][rb * nb + cb] * lams[j];
            float amax = 0.0f;
            for (int i = 0; i < bm; i++) {
                int64_t off = (r0 + i) * n + c0;
                float *t = tile + i * block;
                const uint8_t *q0 = qs[0] + off;
                for (int c = 0; c < bn; c++) t[c] = LUT[q0[c]] * sl[0];
                for (int j = 1; j < k; j++) {
                    const uint8_t *qj = qs[j] + off;
                    float l = sl[j];
                    for (int c = 0; c < bn; c++) t[c] = fmaf(LUT[qj[c]], l, t[c]);
                }
                for (int c = 0; c < bn; c++) {
                    float a = fabsf(t[c]);
                    amax = a > amax ? a : amax;
                    bad |= !finite_bits(f2u(t[c]));
                }
            }
            s_out[rb * nb + cb] = encode_tile(tile, bm, bn, block, amax, ue8m0, q_out + r0 * n + c0, n);
        }
    }
    return bad != 0;
}

/* float32 [R, N] -> FP8 codes + block scales, row blocks [rb0, rb1) (quantize a cast or a generic mix) */
static __attribute__((noinline)) int encode_fp8_impl(int64_t rb0, int64_t rb1, int64_t rows, int64_t n, const float *w, int ue8m0, int block,
               uint8_t *q_out, float *s_out) {
    if (block > MAX_BLOCK) return -1;
    int64_t nb = (n + block - 1) / block;
    uint32_t bad = 0;
    for (int64_t rb = rb0; rb < rb1; rb++) {
        int64_t r0 = rb * block;
        int bm = (int)(rows - r0 < block ? rows - r0 : block);
        for (int64_t cb = 0; cb < nb; cb++) {
            int64_t c0 = cb * block;
            int bn = (int)(n - c0 < block ? n - c0 : block);
            float amax = 0.0f;
            for (int i = 0; i < bm; i++)
                for (int c = 0; c < bn; c++) {
                    float v = w[(r0 + i) * n + c0 + c];
                    float a = fabsf(v);
                    amax = a > amax ? a : amax;
                    bad |= !finite_bits(f2u(v));
                }
            s_out[rb * nb + cb] = encode_tile(w + r0 * n + c0, bm, bn, (int)n, amax, ue8m0, q_out + r0 * n + c0, n);
        }
    }
    return bad != 0;
}

/* distances: over i in [start, stop) the float64 sums of (a_i - b_i)^2, a_i^2 and b_i^2, into out[3]
 * (a and b of dtypes adt, bdt; each value widened exactly to float64, as numpy's astype does) */
static __attribute__((noinline)) int norms_float_impl(int64_t start, int64_t stop, const void *a, int adt, const void *b, int bdt, double *out) {
    float ta[TILE], tb[TILE];
    double d2[8] = {0}, a2[8] = {0}, b2[8] = {0};   /* 8 independent lanes: the sums vectorize */
    for (int64_t s = start; s < stop; s += TILE) {
        int len = (int)(stop - s < TILE ? stop - s : TILE);
        accumulate(ta, a, adt, s, len, 1.0f, 1);
        accumulate(tb, b, bdt, s, len, 1.0f, 1);
        for (int i = len; i < (len + 7) / 8 * 8; i++) ta[i] = tb[i] = 0.0f;
        for (int i = 0; i < len; i += 8)
            for (int j = 0; j < 8; j++) {
                double x = ta[i + j], y = tb[i + j], d = x - y;
                d2[j] += d * d;
                a2[j] += x * x;
                b2[j] += y * y;
            }
    }
    out[0] = out[1] = out[2] = 0.0;
    for (int j = 0; j < 8; j++) {
        out[0] += d2[j];
        out[1] += a2[j];
        out[2] += b2[j];
    }
    return 0;
}

/* distances on block FP8 without float32 copies: rows [r0, r1) of two [R, N] code arrays with their
 * scales ([ceil(R/b), ceil(N/b)], the same block b); each value is value(q) * s as decode_fp8 makes it.
 * Summation order (what the float64 sums depend on): per row, per column block, element c of the block
 * goes to lane c mod 8 in order; the 8 lanes are added at the end (lane 0 first). The AVX-512 path keeps
 * exactly that order (16 codes per step: elements c..c+7, then c+8..c+15, into the same 8 lanes), so both
 * paths give the same bits; it decodes codes with arithmetic instead of table gathers (~2.5x faster). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define NORMS_AVX512 1
/* 16 e4m3fn codes -> their values / 256, exactly: the 7 magnitude bits become a float16 (exponent bias 15
 * vs 7, whose subnormals cover e4m3's), converted by the hardware; NaN codes (0x7F, 0xFF) are flagged */
static inline __m512 e4m3x16(const uint8_t *p, __mmask16 *nan) {
    __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i mag = _mm256_and_si256(x, _mm256_set1_epi16(0x7F));
    *nan |= _mm256_cmpeq_epi16_mask(mag, _mm256_set1_epi16(0x7F));
    __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x80)), 8),
                                _mm256_slli_epi16(mag, 7));
    return _mm512_cvtph_ps(h);
}
static inline __m512d lo_pd(__m512 x) { return _mm512_cvtps_pd(_mm512_castps512_ps256(x)); }
static inline __m512d hi_pd(__m512 x) {
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}
#endif

static __attribute__((noinline)) int norms_fp8_impl(int64_t r0, int64_t r1, int64_t n, const uint8_t *qa, const float *sa, const uint8_t *qb,
              const float *sb, int64_t nb, int block, double *out) {
    init_lut();
    float ta[MAX_BLOCK], tb[MAX_BLOCK];
    double d2[8] = {0}, a2[8] = {0}, b2[8] = {0};
    if (block > MAX_BLOCK) return -1;
#ifdef NORMS_AVX512
    __m512d vd2 = _mm512_setzero_pd(), va2 = _mm512_setzero_pd(), vb2 = _mm512_setzero_pd();
    __mmask16 nan_a = 0, nan_b = 0;
#endif
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t c0 = 0; c0 < n; c0 += block) {
            int len = (int)(n - c0 < block ? n - c0 : block);
            float fa = sa[(r / block) * nb + c0 / block], fb = sb[(r / block) * nb + c0 / block];
            const uint8_t *pa = qa + r * n + c0, *pb = qb + r * n + c0;
            int i = 0;
#ifdef NORMS_AVX512
            /* (value / 256) * (256 s) rounds like value * s: 256 s is exact, the real product the same */
            __m512 sfa = _mm512_set1_ps(fa * 256.0f), sfb = _mm512_set1_ps(fb * 256.0f);
            for (; i + 16 <= len; i += 16) {
                __m512 x = _mm512_mul_ps(e4m3x16(pa + i, &nan_a), sfa), y = _mm512_mul_ps(e4m3x16(pb + i, &nan_b), sfb);
                __m512d xl = lo_pd(x), yl = lo_pd(y), xh = hi_pd(x), yh = hi_pd(y);
                __m512d dl = _mm512_sub_pd(xl, yl), dh = _mm512_sub_pd(xh, yh);
                vd2 = _mm512_add_pd(vd2, _mm512_mul_pd(dl, dl));
                vd2 = _mm512_add_pd(vd2, _mm512_mul_pd(dh, dh));
                va2 = _mm512_add_pd(va2, _mm512_mul_pd(xl, xl));
                va2 = _mm512_add_pd(va2, _mm512_mul_pd(xh, xh));
                vb2 = _mm512_add_pd(vb2, _mm512_mul_pd(yl, yl));
                vb2 = _mm512_add_pd(vb2, _mm512_mul_pd(yh, yh));
            }
            if (i == len) continue;
            _mm512_storeu_pd(d2, vd2);
            _mm512_storeu_pd(a2, va2);
            _mm512_storeu_pd(b2, vb2);
#endif
            int m = len - i;  /* the rest (all of it without AVX-512): element i + k into lane k mod 8 */
            for (int k = 0; k < m; k++) {
                ta[k] = LUT[pa[i + k]] * fa;
                tb[k] = LUT[pb[i + k]] * fb;
            }
            for (int k = m; k < (m + 7) / 8 * 8; k++) ta[k] = tb[k] = 0.0f;
            for (int k = 0; k < m; k += 8)
                for (int j = 0; j < 8; j++) {
                    double x = ta[k + j], y = tb[k + j], d = x - y;
                    d2[j] += d * d;
                    a2[j] += x * x;
                    b2[j] += y * y;
                }
#ifdef NORMS_AVX512
            vd2 = _mm512_loadu_pd(d2);
            va2 = _mm512_loadu_pd(a2);
            vb2 = _mm512_loadu_pd(b2);
#endif
        }
    }
#ifdef NORMS_AVX512
    _mm512_storeu_pd(d2, vd2);
    _mm512_storeu_pd(a2, va2);
    _mm512_storeu_pd(b2, vb2);
#endif
    out[0] = out[1] = out[2] = 0.0;
    for (int j = 0; j < 8; j++) {
        out[0] += d2[j];
        out[1] += a2[j];
        out[2] += b2[j];
    }
#ifdef NORMS_AVX512
    /* a NaN code makes the sums it enters NaN, as the table's NaN does on the scalar path */
    if (nan_a) out[0] = out[1] = NAN;
    if (nan_b) out[0] = out[2] = NAN;
#endif
    return 0;
}

int mix_float(int64_t start, int64_t stop, int k, const void *const *xs, const int *dts, const float *lams,
              void *out, int out_dt) {
    GUARDED(mix_float_impl(start, stop, k, xs, dts, lams, out, out_dt));
}

int mix2_bf16(int64_t start, int64_t stop, const uint16_t *x, const uint16_t *y, float l0, float l1,
              uint16_t *out) {
    GUARDED(mix2_bf16_impl(start, stop, x, y, l0, l1, out));
}

int decode_fp8(int64_t r0, int64_t r1, int64_t n, const uint8_t *q, const float *s, int64_t nb, int block,
               float *out) {
    GUARDED(decode_fp8_impl(r0, r1, n, q, s, nb, block, out));
}

int mix_fp8(int64_t rb0, int64_t rb1, int64_t rows, int64_t n, int k, const uint8_t *const *qs,
            const float *const *ss, const float *lams, int ue8m0, int block, uint8_t *q_out, float *s_out) {
    GUARDED(mix_fp8_impl(rb0, rb1, rows, n, k, qs, ss, lams, ue8m0, block, q_out, s_out));
}

int encode_fp8(int64_t rb0, int64_t rb1, int64_t rows, int64_t n, const float *w, int ue8m0, int block,
               uint8_t *q_out, float *s_out) {
    GUARDED(encode_fp8_impl(rb0, rb1, rows, n, w, ue8m0, block, q_out, s_out));
}

int norms_float(int64_t start, int64_t stop, const void *a, int adt, const void *b, int bdt, double *out) {
    GUARDED(norms_float_impl(start, stop, a, adt, b, bdt, out));
}

int norms_fp8(int64_t r0, int64_t r1, int64_t n, const uint8_t *qa, const float *sa, const uint8_t *qb,
              const float *sb, int64_t nb, int block, double *out) {
    GUARDED(norms_fp8_impl(r0, r1, n, qa, sa, qb, sb, nb, block, out));
}
