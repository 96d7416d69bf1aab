/* Bidirectional scaled dot-product attention for encoder inference on the CPU.
 *
 * PyTorch's CPU flash attention spends most of its time on bookkeeping when heads are narrow
 * (32 wide in multilingual-e5-small): ~40% of an encoder pass for ~11% of its arithmetic. This
 * kernel reads the projections where the linear layers left them ([batch, seq, head, dim], float32
 * or bfloat16) and writes [batch, seq, head, dim], so no tensor is copied or converted around it.
 * It computes in float32; with bfloat16 inputs on a CPU with AVX512-BF16 the two products use
 * bfloat16 pair dot products with float32 sums instead (see run_head_bf16dot). Keys past a
 * sequence's length (right padding) are masked out; query rows past it are written as zeros
 * (nothing downstream reads them but the masked mean, which skips them). The exponential is exp2 on a reduced argument with a degree-6 polynomial (relative
 * error ~2e-7), and the scale folds in log2(e).
 *
 * Work is split by (batch, head) over `threads` OpenMP threads.
 * Written with GCC vector extensions: 16 floats per vector where the CPU has AVX-512, 8 otherwise
 * (AVX2), with register blocks sized to the register file.
 *
 * Build: cc -O3 -march=native -fno-math-errno -fopenmp -fPIC -shared (no -ffast-math: the rounding
 * step of exp2 relies on strict float addition).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
/* 32 vector registers of 16 floats. */
#define VL 16   /* floats per vector */
#define ROWS 8  /* query rows per block: ROWS x dim/VL accumulators for the weighted values */
#define QROWS 4 /* rows per register block of scores */
#define KBLK 4  /* key vectors per register block of scores: QROWS x KBLK accumulators */
#else
/* 16 vector registers (of 8 floats with AVX2): smaller blocks, or they spill. */
#define VL 8
#define ROWS 2
#define QROWS 2
#define KBLK 4
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));
typedef uint16_t vhu __attribute__((vector_size(VL * 2), aligned(2)));
#define MAX_DIM 128
#define MAX_SEQ 8192

static inline vf ld(const float *p) { return *(const vfu *)p; }
static inline void st(float *p, vf v) { *(vfu *)p = v; }
static inline vf splat(float x) {
    vf v;
    for (int i = 0; i < VL; i++) v[i] = x;
    return v;
}

static inline vf bf16_to_vf(const uint16_t *p) {
    vh h = *(const vhu *)p;
    vi w = __builtin_convertvector(h, vi) << 16;
    return (vf)w;
}

static inline uint16_t f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

static inline vf vmax(vf a, vf b) {
    vi m = a > b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}

/* 2^x for x <= 0 (larger inputs are not used here); x below -126 gives 2^-126. */
static inline vf exp2v(vf x) {
    x = vmax(x, splat(-126.0f));
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf t = x + magic;
    vi n = (vi)t - (vi)magic;
    vf r = x - (t - magic); /* r in [-0.5, 0.5] */
    vf p = splat(1.5403530e-4f);
    p = p * r + 1.3333558e-3f;
    p = p * r + 9.6181291e-3f;
    p = p * r + 5.5504109e-2f;
    p = p * r + 2.4022651e-1f;
    p = p * r + 6.9314718e-1f;
    p = p * r + 1.0f;
    return (vf)((vi)p + (n << 23));
}

static inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < VL; i++) m = v[i] > m ? v[i] : m;
    return m;
}

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

/* Masks a row of scores past `len` (of `lp`, a whole number of vectors); returns its maximum. */
static inline vf masked_row_max(float *s, int len, int lp) {
    for (int j = len; j < lp; j++) s[j] = -1e30f;
    vf m = ld(s);
    for (int j = VL; j < lp; j += VL) m = vmax(m, ld(s + j));
    return splat(hmax(m));
}

typedef struct {
    const void *q, *k, *v;
    void *out;
    const int32_t *lengths;
    int64_t qs[3], ks[3], vs[3]; /* element strides for batch, seq, head; dim is contiguous */
    int batch, seq, heads, dim, bf16;
    float scale; /* already multiplied by log2(e) */
    int next;    /* next (batch, head) job, taken atomically */
} task_t;

/* A row of `dim` values (dim a multiple of 16) into float32. */
static inline void load_row(float *dst, const void *base, int bf16, int64_t at, int dim) {
    for (int d = 0; d < dim; d += VL)
        st(dst + d, bf16 ? bf16_to_vf((const uint16_t *)base + at + d) : ld((const float *)base + at + d));
}

/* One vector of output values at element `at`, rounded to bfloat16 for bfloat16 runs. */
static inline void store_out(const task_t *t, int64_t at, vf o) {
    if (t->bf16) {
        uint16_t *dst = (uint16_t *)t->out + at;
        for (int e = 0; e < VL; e++) dst[e] = f32_to_bf16(o[e]);
    } else {
        st((float *)t->out + at, o);
    }
}

/* Padded query rows (from `len` on) of one head: zeros. */
static inline void zero_padded_rows(const task_t *t, int64_t oo, int len, int64_t out_row) {
    const size_t es = t->bf16 ? 2 : 4;
    for (int i = len; i < t->seq; i++)
        memset((char *)t->out + (oo + (int64_t)i * out_row) * es, 0, (size_t)t->dim * es);
}

static inline __attribute__((always_inline)) void run_head_dim(task_t *t, int b, int h, float *kt,
                                                             float *vv, float *sc, float *qb,
                                                             const int dim) {
    const int seq = t->seq, bf16 = t->bf16;
    int len = t->lengths[b];
    if (len > seq) len = seq;
    const int lp = (len + VL - 1) / VL * VL; /* keys padded to whole vectors */
    const int64_t qo = b * t->qs[0] + h * t->qs[2], ko = b * t->ks[0] + h * t->ks[2],
                  vo = b * t->vs[0] + h * t->vs[2];

    /* K transposed ([dim][lp], zero past len) and V ([len][dim]) in float32. */
    float row[MAX_DIM] __attribute__((aligned(64)));
    for (int j = 0; j < len; j++) {
        load_row(row, t->k, bf16, ko + j * t->ks[1], dim);
        for (int d = 0; d < dim; d++) kt[(int64_t)d * lp + j] = row[d];
        load_row(vv + (int64_t)j * dim, t->v, bf16, vo + j * t->vs[1], dim);
    }
    for (int d = 0; d < dim; d++)
        for (int j = len; j < lp; j++) kt[(int64_t)d * lp + j] = 0.0f;

    const int64_t out_row = (int64_t)t->heads * dim;
    const int64_t oo = (int64_t)b * seq * out_row + (int64_t)h * dim;

    for (int i0 = 0; i0 < len; i0 += ROWS) {
        const int rows = len - i0 < ROWS ? len - i0 : ROWS;
        for (int r = 0; r < ROWS; r++) {
            if (r < rows) {
                load_row(qb + r * dim, t->q, bf16, qo + (i0 + r) * t->qs[1], dim);
                for (int d = 0; d < dim; d++) qb[r * dim + d] *= t->scale;
            } else {
                memset(qb + r * dim, 0, sizeof(float) * dim);
            }
        }
        /* Scores: QROWS x (KBLK*16) blocks held in registers. */
        for (int r0 = 0; r0 < ROWS; r0 += QROWS) {
            const float *qr = qb + r0 * dim;
            float *sr = sc + (int64_t)r0 * lp;
            int j = 0;
            for (; j + KBLK * VL <= lp; j += KBLK * VL) {
                vf acc[QROWS][KBLK] = {{{0}}};
                for (int d = 0; d < dim; d++) {
                    const float *kd = kt + (int64_t)d * lp + j;
                    vf kv[KBLK];
                    for (int c = 0; c < KBLK; c++) kv[c] = ld(kd + c * VL);
                    for (int r = 0; r < QROWS; r++) {
                        vf qv = splat(qr[r * dim + d]);
                        for (int c = 0; c < KBLK; c++) acc[r][c] += qv * kv[c];
                    }
                }
                for (int r = 0; r < QROWS; r++)
                    for (int c = 0; c < KBLK; c++) st(sr + (int64_t)r * lp + j + c * VL, acc[r][c]);
            }
            for (; j < lp; j += VL) {
                vf acc[QROWS] = {{0}};
                for (int d = 0; d < dim; d++) {
                    vf kv = ld(kt + (int64_t)d * lp + j);
                    for (int r = 0; r < QROWS; r++) acc[r] += splat(qr[r * dim + d]) * kv;
                }
                for (int r = 0; r < QROWS; r++) st(sr + (int64_t)r * lp + j, acc[r]);
            }
        }
        /* Softmax numerators (unnormalized) and their sums. */
        float inv[ROWS];
        for (int r = 0; r < ROWS; r++) {
            float *s = sc + (int64_t)r * lp;
            const vf mx = masked_row_max(s, len, lp);
            vf sum = {0};
            for (int jj = 0; jj < lp; jj += VL) {
                vf p = exp2v(ld(s + jj) - mx);
                st(s + jj, p);
                sum += p;
            }
            inv[r] = 1.0f / hsum(sum);
        }
        /* Weighted values: ROWS x dim accumulators. */
        vf acc[ROWS][MAX_DIM / VL];
        const int dv = dim / VL;
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < dv; c++) acc[r][c] = (vf){0};
        for (int jj = 0; jj < len; jj++) {
            const float *vrow = vv + (int64_t)jj * dim;
            for (int c = 0; c < dv; c++) {
                vf x = ld(vrow + c * VL);
                for (int r = 0; r < ROWS; r++) acc[r][c] += splat(sc[(int64_t)r * lp + jj]) * x;
            }
        }
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < dv; c++)
                store_out(t, oo + (int64_t)(i0 + r) * out_row + c * VL, acc[r][c] * inv[r]);
    }
    zero_padded_rows(t, oo, len, out_row);
}

#if defined(__AVX512BF16__)
/* Scores of QROWS query rows against nv*16 keys from j, held in registers. */
static inline __attribute__((always_inline)) void bf16_scores(const uint32_t *kp, int lp, int j,
                                                            uint32_t qw[][MAX_DIM / 2], int r0,
                                                            int half, float *pf, vf scale,
                                                            const int nv) {
    __m512 acc[QROWS][4];
    for (int r = 0; r < QROWS; r++)
        for (int c = 0; c < nv; c++) acc[r][c] = _mm512_setzero_ps();
    for (int p = 0; p < half; p++) {
        const uint32_t *kr = kp + (int64_t)p * lp + j;
        __m512bh kv[4];
        for (int c = 0; c < nv; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kr + c * VL);
        for (int r = 0; r < QROWS; r++) {
            __m512bh qv = (__m512bh)_mm512_set1_epi32((int)qw[r0 + r][p]);
            for (int c = 0; c < nv; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qv, kv[c]);
        }
    }
    for (int r = 0; r < QROWS; r++)
        for (int c = 0; c < nv; c++) st(pf + (int64_t)(r0 + r) * lp + j + c * VL, (vf)acc[r][c] * scale);
}
#endif

#if defined(__AVX512BF16__)
/* bfloat16 inputs on a CPU with AVX512-BF16: the two products run as bfloat16 pair dot products
 * (VDPBF16PS: exact products, float32 sums), twice the work per instruction of float32. Query
 * and key are used as given (the scale is applied to the float32 scores); the softmax weights
 * are rounded to bfloat16 for the second product, as PyTorch's bfloat16 attention does too.
 * kp holds K as [dim/2][lp] pairs of dims; vp holds V as [lp/2][dim] pairs of keys. */
static inline __attribute__((always_inline)) void run_head_bf16dot(task_t *t, int b, int h,
                                                                 uint32_t *kp, uint16_t *vp,
                                                                 float *sc, const int dim) {
    const int seq = t->seq, half = dim / 2;
    int len = t->lengths[b];
    if (len > seq) len = seq;
    const int lp = (len + 2 * VL - 1) / (2 * VL) * (2 * VL); /* keys in whole 32-key steps */
    const uint16_t *q = t->q, *k = t->k, *v = t->v;
    const int64_t qo = b * t->qs[0] + h * t->qs[2], ko = b * t->ks[0] + h * t->ks[2],
                  vo = b * t->vs[0] + h * t->vs[2];
    for (int j = 0; j < lp; j++) {
        const uint32_t *krow = (const uint32_t *)(k + ko + j * t->ks[1]);
        for (int p = 0; p < half; p++) kp[(int64_t)p * lp + j] = j < len ? krow[p] : 0u;
        const uint16_t *vrow = v + vo + j * t->vs[1];
        uint16_t *dst = vp + (int64_t)(j / 2) * dim * 2 + (j & 1);
        for (int d = 0; d < dim; d++) dst[2 * d] = j < len ? vrow[d] : 0;
    }
    const int64_t out_row = (int64_t)t->heads * dim;
    const int64_t oo = (int64_t)b * seq * out_row + (int64_t)h * dim;
    float *pf = sc;                                   /* ROWS x lp float32 */
    uint16_t *pb = (uint16_t *)(sc + (int64_t)ROWS * lp); /* ROWS x lp bfloat16 */
    const vf scale = splat(t->scale);

    for (int i0 = 0; i0 < len; i0 += ROWS) {
        const int rows = len - i0 < ROWS ? len - i0 : ROWS;
        uint32_t qw[ROWS][MAX_DIM / 2];
        for (int r = 0; r < ROWS; r++) {
            const uint32_t *qrow = (const uint32_t *)(q + qo + (int64_t)(i0 + (r < rows ? r : 0)) * t->qs[1]);
            for (int p = 0; p < half; p++) qw[r][p] = qrow[p];
        }
        for (int r0 = 0; r0 < ROWS; r0 += QROWS) {
            int j = 0;
            for (; j + 4 * VL <= lp; j += 4 * VL) bf16_scores(kp, lp, j, qw, r0, half, pf, scale, 4);
            for (; j < lp; j += 2 * VL) bf16_scores(kp, lp, j, qw, r0, half, pf, scale, 2);
        }
        float inv[ROWS];
        for (int r = 0; r < ROWS; r++) {
            float *s = pf + (int64_t)r * lp;
            uint16_t *w = pb + (int64_t)r * lp;
            const vf mx = masked_row_max(s, len, lp);
            vf sum = {0};
            for (int jj = 0; jj < lp; jj += 2 * VL) {
                vf p0 = exp2v(ld(s + jj) - mx), p1 = exp2v(ld(s + jj + VL) - mx);
                sum += p0 + p1;
                _mm512_storeu_si512(w + jj, (__m512i)_mm512_cvtne2ps_pbh((__m512)p1, (__m512)p0));
            }
            for (int jj = len; jj < lp; jj++) w[jj] = 0; /* masked keys weigh exactly nothing */
            inv[r] = 1.0f / hsum(sum);
        }
        __m512 acc[ROWS][MAX_DIM / VL];
        const int dv = dim / VL;
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < dv; c++) acc[r][c] = _mm512_setzero_ps();
        for (int m = 0; m < lp / 2; m++) {
            const uint16_t *vrow = vp + (int64_t)m * dim * 2;
            for (int c = 0; c < dv; c++) {
                __m512bh x = (__m512bh)_mm512_loadu_si512(vrow + c * 2 * VL);
                for (int r = 0; r < ROWS; r++) {
                    const uint32_t pw = ((const uint32_t *)(pb + (int64_t)r * lp))[m];
                    acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)_mm512_set1_epi32((int)pw), x);
                }
            }
        }
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < dv; c++)
                store_out(t, oo + (int64_t)(i0 + r) * out_row + c * VL, (vf)acc[r][c] * inv[r]);
    }
    zero_padded_rows(t, oo, len, out_row);
}
#endif

static void run_head(task_t *t, int b, int h, float *kt, float *vv, float *sc, float *qb) {
#if defined(__AVX512BF16__)
    if (t->bf16 && t->dim == 32) {
        run_head_bf16dot(t, b, h, (uint32_t *)kt, (uint16_t *)vv, sc, 32);
        return;
    }
    if (t->bf16 && t->dim == 64) {
        run_head_bf16dot(t, b, h, (uint32_t *)kt, (uint16_t *)vv, sc, 64);
        return;
    }
#endif
    switch (t->dim) { /* the common widths get loops of constant length */
    case 32: run_head_dim(t, b, h, kt, vv, sc, qb, 32); break;
    case 64: run_head_dim(t, b, h, kt, vv, sc, qb, 64); break;
    default: run_head_dim(t, b, h, kt, vv, sc, qb, t->dim); break;
    }
}

static void *worker(void *arg) {
    task_t *t = arg;
    const int dim = t->dim, lp = (t->seq + 2 * VL - 1) / (2 * VL) * (2 * VL);
    float *kt = aligned_alloc(64, sizeof(float) * (size_t)dim * lp);
    float *vv = aligned_alloc(64, sizeof(float) * (size_t)dim * lp);
    float *sc = aligned_alloc(64, sizeof(float) * (size_t)ROWS * lp * 2);
    float *qb = aligned_alloc(64, sizeof(float) * (size_t)ROWS * dim);
    if (kt && vv && sc && qb) {
        const int jobs = t->batch * t->heads;
        for (;;) {
            int job = __atomic_fetch_add(&t->next, 1, __ATOMIC_RELAXED);
            if (job >= jobs) break;
            run_head(t, job / t->heads, job % t->heads, kt, vv, sc, qb);
        }
    }
    free(kt);
    free(vv);
    free(sc);
    free(qb);
    return (kt && vv && sc && qb) ? NULL : (void *)1;
}

/* The instruction set this build was compiled for; PyTorch's own kernels beat a "generic" one. */
const char *cw_attention_isa(void) {
#if defined(__AVX512BF16__)
    return "avx512-bf16";
#elif defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "generic";
#endif
}

/* Returns 0 on success, 1 for unsupported shapes, 2 when memory or threads ran out. */
int cw_attention(const void *q, const void *k, const void *v, void *out, const int32_t *lengths,
                 const int64_t *qs, const int64_t *ks, const int64_t *vs, int batch, int seq,
                 int heads, int dim, int bf16, float scale, int threads) {
    if (dim <= 0 || dim % VL || dim > MAX_DIM || seq <= 0 || seq > MAX_SEQ || batch <= 0 ||
        heads <= 0)
        return 1;
    task_t t = {.q = q, .k = k, .v = v, .out = out, .lengths = lengths, .batch = batch,
                .seq = seq, .heads = heads, .dim = dim, .bf16 = bf16,
                .scale = scale * 1.4426950408889634f, .next = 0};
    for (int i = 0; i < 3; i++) {
        t.qs[i] = qs[i];
        t.ks[i] = ks[i];
        t.vs[i] = vs[i];
    }
    int jobs = batch * heads;
    if (threads > jobs) threads = jobs;
    if (threads < 1) threads = 1;
#ifdef _OPENMP
    /* The caller's OpenMP pool: inside PyTorch that is PyTorch's own (same libgomp), so the
     * kernel's threads are the ones already awake rather than a second set competing for cores. */
#pragma omp parallel num_threads(threads)
    worker(&t);
#else
    worker(&t);
#endif
    /* A worker that could not allocate takes no job; the others take them all. */
    return __atomic_load_n(&t.next, __ATOMIC_RELAXED) >= jobs ? 0 : 2;
}
