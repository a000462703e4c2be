/* One token through one MoE block in one call: moeify's batch-1 decode step on the CPU.
 *
 * At batch 1 a decode step reads every weight it uses once, and on a CPU the time of the
 * step is those bytes plus a fixed cost per library call (~4 us per float32 MKL call, ~17 us
 * per bfloat16 oneDNN call on AVX512-BF16/AMX: benchmarks/bf16_call_cost.py). Run op by op,
 * an MoE block makes 5-8 such calls where the dense MLP makes 3, and that costs more than
 * the bytes its unselected experts save. Here the router, the shared expert and the selected
 * experts run in one call: each thread takes a share of the active neurons and, for each,
 * reads its gate row, up row and down row once (h = act(g.x) * (u.x) * scale, out += h * d),
 * into a float32 accumulator of its own; the accumulators are summed at the end.
 *
 * Numerics: float32 accumulation everywhere (bfloat16 weights and input are widened
 * exactly); routing in float32 as in moeify.kernels.common.route; the selected experts are the
 * top k of the scores (+ selection bias), ties to the lower index, weighted by every gate rule of
 * MoEMLP.route. Equal expert sizes only; moeify/kernels/native.py builds this file with the
 * machine's C compiler and falls back to the torch path when it cannot. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* Must match native.py's _Block field for field. */
typedef struct {
    int32_t bf16;      /* weights and input: 0 float32, 1 bfloat16 */
    int32_t H;         /* hidden size */
    int32_t act;       /* 0 silu, 1 relu, 2 gelu (tanh approximation), 3 gelu (erf) */
    int32_t N, k, m;   /* routed experts, selected per token, neurons per expert */
    int32_t S;         /* shared-expert neurons (0: none) */
    int32_t n;         /* analytical router neurons; 0: the caller passes the selected ids */
    int32_t absolute;  /* analytical router: |act(g) * u| */
    int32_t gate;      /* expert weight on top of its scale: 0 none, 1 CMoE's 1 + softmax(s)_e * u_e, 2 softmax(s)_e */
    const void *shared_gu, *shared_down;  /* [2S, H] (S gate rows, then S up rows), [S, H] */
    const void *gate_up, *down;           /* routed, packed: expert e is rows [2me, 2m(e+1)) and [me, m(e+1)) */
    const float *scales;                  /* [N] static expert scales, or NULL (all 1) */
    const float *router_gu, *combine;     /* analytical router, float32: [2n, H] (gate rows, up rows), [n, N] */
    const float *selection_bias;          /* [N], or NULL */
    const float *gate_u;                  /* [N] CMoE's per-expert gate scale u (gate 1), or NULL */
    const float *bias, *bias_total;       /* compensation of unselected experts: [N, H] and its sum [H], or NULL */
} Block;

typedef union { uint32_t u; float f; } bits;

/* accumulators up to this size live on the caller's stack (e.g. 2 threads x H 8192, 16 threads x H 1024) */
#define STACK_BYTES (64 * 1024)

static inline float widen(uint16_t v) { bits b; b.u = (uint32_t)v << 16; return b.f; }

static inline float act_fn(float g, int a) {
    switch (a) {
    case 0: return g / (1.0f + expf(-g));
    case 1: return g > 0.0f ? g : 0.0f;
    case 2: return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    default: return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
    }
}

/* (g . x, u . x) for one neuron's gate and up rows */
static inline void dot2_f32(const float *restrict g, const float *restrict u, const float *restrict x, int H, float *og, float *ou) {
    float a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
    for (int i = 0; i < H; i++) { a += g[i] * x[i]; b += u[i] * x[i]; }
    *og = a;
    *ou = b;
}

static inline void dot2_bf16(const uint16_t *restrict g, const uint16_t *restrict u, const float *restrict x, int H, float *og, float *ou) {
    float a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
    for (int i = 0; i < H; i++) { a += widen(g[i]) * x[i]; b += widen(u[i]) * x[i]; }
    *og = a;
    *ou = b;
}

/* y += a * w */
static inline void axpy_f32(float *restrict y, float a, const float *restrict w, int H) {
#pragma omp simd
    for (int i = 0; i < H; i++) y[i] += a * w[i];
}

static inline void axpy_bf16(float *restrict y, float a, const uint16_t *restrict w, int H) {
#pragma omp simd
    for (int i = 0; i < H; i++) y[i] += a * widen(w[i]);
}

/* Neurons [lo, hi) of a group of m: gate rows gu[0, m), up rows gu[m, 2m), down rows dn[0, m); acc += their output. */
static void neurons(const Block *B, const void *gu, const void *dn, int m, int lo, int hi, float scale, const float *x, float *acc) {
    const int H = B->H;
    for (int j = lo; j < hi; j++) {
        float g, u;
        if (B->bf16) {
            const uint16_t *w = (const uint16_t *)gu;
            dot2_bf16(w + (size_t)j * H, w + (size_t)(m + j) * H, x, H, &g, &u);
            axpy_bf16(acc, act_fn(g, B->act) * u * scale, (const uint16_t *)dn + (size_t)j * H, H);
        } else {
            const float *w = (const float *)gu;
            dot2_f32(w + (size_t)j * H, w + (size_t)(m + j) * H, x, H, &g, &u);
            axpy_f32(acc, act_fn(g, B->act) * u * scale, (const float *)dn + (size_t)j * H, H);
        }
    }
}

/* The analytical router's neurons [lo, hi): r_j = act(g_j . x) * (u_j . x), its absolute value if asked. */
static void router_neurons(const Block *B, const float *x, float *r, int lo, int hi) {
    const int H = B->H, n = B->n;
    for (int j = lo; j < hi; j++) {
        float g, u;
        dot2_f32(B->router_gu + (size_t)j * H, B->router_gu + (size_t)(n + j) * H, x, H, &g, &u);
        const float v = act_fn(g, B->act) * u;
        r[j] = B->absolute ? fabsf(v) : v;
    }
}

/* scores s = r @ combine; the top k of s + selection bias, ascending; their weights: scale_e, times the gate of s. */
static void select_experts(const Block *B, const float *r, int32_t *ids, float *w) {
    const int n = B->n, N = B->N;
    float s[N], sel[N];
    char taken[N];
    for (int e = 0; e < N; e++) {
        s[e] = 0.0f;
        taken[e] = 0;
    }
    for (int j = 0; j < n; j++)
        for (int e = 0; e < N; e++) s[e] += r[j] * B->combine[(size_t)j * N + e];
    for (int e = 0; e < N; e++) sel[e] = B->selection_bias ? s[e] + B->selection_bias[e] : s[e];
    for (int t = 0; t < B->k; t++) {
        int best = -1;
        for (int e = 0; e < N; e++)  /* NaN ranks highest, as in torch.topk */
            if (!taken[e] && (best < 0 || sel[e] > sel[best] || (isnan(sel[e]) && !isnan(sel[best])))) best = e;
        taken[best] = 1;
    }
    float top = 0.0f, sum = 0.0f;
    if (B->gate) {  /* softmax over all N scores (without the selection bias), as MoEMLP.route */
        top = s[0];
        for (int e = 1; e < N; e++) top = s[e] > top ? s[e] : top;
        for (int e = 0; e < N; e++) sum += expf(s[e] - top);
    }
    for (int e = 0, t = 0; e < N; e++) {
        if (!taken[e]) continue;
        const float p = B->gate ? expf(s[e] - top) / sum : 0.0f;
        const float scale = B->scales ? B->scales[e] : 1.0f;
        ids[t] = e;
        w[t++] = B->gate == 1 ? scale * (1.0f + p * B->gate_u[e]) : B->gate == 2 ? scale * p : scale;
    }
}

/* Routed neurons [lo, hi) of the token's k * m: the i-th selected expert's are [im, (i+1)m). */
static void routed(const Block *B, const int32_t *ids, const float *w, int lo, int hi, const float *x, float *acc) {
    const int m = B->m;
    const size_t es = B->bf16 ? 2 : 4, H = (size_t)B->H;
    for (int i = 0; i < B->k; i++) {
        const int a = i * m, l = lo > a ? lo : a, h = hi < a + m ? hi : a + m;
        if (l >= h) continue;
        const int e = ids[i];
        const char *gu = (const char *)B->gate_up + 2 * (size_t)m * e * H * es;
        const char *dn = (const char *)B->down + (size_t)m * e * H * es;
        neurons(B, gu, dn, m, l - a, h - a, w[i], x, acc);
    }
}

/* out[H] (float32) = the block's output for one token x[H] (float32 or bfloat16, as the weights).
 * given_ids, given_w: the k selected experts and their weights (NULL: each expert's scale) when the router
 * runs outside (B->n == 0), else NULL.
 * Each thread takes its share of the router's neurons, then of the shared expert's (which
 * do not wait for the routing), then, once the experts are chosen, of the selected experts'.
 * Returns 0, or -1 when memory for the accumulators could not be had. */
int moe_decode(const Block *B, const void *x_in, float *out, const int32_t *given_ids, const float *given_w, int nthreads) {
    const int H = B->H, S = B->S, n = B->n, km = B->k * B->m;
    float x[H], r[n > 0 ? n : 1], w[B->k > 0 ? B->k : 1];
    int32_t ids[B->k > 0 ? B->k : 1];
    if (B->bf16) {
        const uint16_t *xb = (const uint16_t *)x_in;
        for (int i = 0; i < H; i++) x[i] = widen(xb[i]);
    } else {
        memcpy(x, x_in, sizeof(float) * H);
    }
    for (int i = 0; !n && i < B->k; i++) {
        ids[i] = given_ids[i];
        w[i] = given_w ? given_w[i] : B->scales ? B->scales[ids[i]] : 1.0f;
    }
    if (nthreads > (S + km) / 64) nthreads = (S + km) / 64;  /* below ~64 neurons a thread costs more than it reads */
    if (nthreads < 1) nthreads = 1;
    /* the threads' accumulators: on this stack (no allocation per call) unless they are large; a team smaller
     * than asked (OMP_DYNAMIC) splits the work among fewer threads and the other accumulators stay 0 */
    const size_t bytes = sizeof(float) * (size_t)H * nthreads;
    float on_stack[bytes <= STACK_BYTES ? (size_t)H * nthreads : 1];
    float *part = bytes <= STACK_BYTES ? on_stack : (float *)malloc(bytes);
    if (!part) return -1;
    memset(part, 0, bytes);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *acc = part + (size_t)t * H;
        if (n) router_neurons(B, x, r, n * t / nt, n * (t + 1) / nt);
        if (S) neurons(B, B->shared_gu, B->shared_down, S, S * t / nt, S * (t + 1) / nt, 1.0f, x, acc);
        if (n) {
#pragma omp barrier
#pragma omp single
            select_experts(B, r, ids, w);
        }
        routed(B, ids, w, (int)((long)km * t / nt), (int)((long)km * (t + 1) / nt), x, acc);
    }
    for (int i = 0; i < H; i++) {
        float v = 0.0f;
        for (int t = 0; t < nthreads; t++) v += part[(size_t)t * H + i];
        out[i] = v;
    }
    if (part != on_stack) free(part);
    if (B->bias)
        for (int i = 0; i < H; i++) {
            float c = B->bias_total[i];
            for (int j = 0; j < B->k; j++) c -= B->bias[(size_t)ids[j] * H + i];
            out[i] += c;
        }
    return 0;
}
