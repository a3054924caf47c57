/* What encdec/_decode_kernels.c (products, attention) and encdec/_decoder_layer.c (a decoder layer's
 * step made of them) share: the exponential and the activations, the register-tiled product, the
 * softmax, and the attention entry the layer calls. One library, encdec._decode_kernels (setup.py).
 */
#ifndef ENCDEC_DECODE_KERNELS_H
#define ENCDEC_DECODE_KERNELS_H

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Vector code for the CPU it runs on: GCC builds each clone and picks one when the library loads. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Internal to the library: not exported from the shared object. */
#define INTERNAL __attribute__((visibility("hidden")))

/* e^x, within ~2 float ulps of expf, in a form the compiler vectorizes (glibc's expf is one call per
 * value, and those calls would cost more than the dot products): x = n ln2 + r with |r| <= ln2 / 2,
 * e^r by its Taylor polynomial to r^7 (error below 2^-26 there), times 2^n built in the exponent
 * bits. Below -87.3 the result would be subnormal: 0 (a softmax weight that small is 0 after the
 * division by the total anyway); above 88 it is e^88 (swish only divides by it). */
static inline float exp_float(float x) {
    x = x < 88.0f ? x : 88.0f;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f; /* ln2 in two parts: r is exact-ish */
    float p = 1.98412698e-4f;
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.3f ? 0.0f : p * scale;
}

/* The feed-forward activations (encdec/layers.py's ACTIVATIONS), applied to a product's sums before
 * they are stored. GELU's erf by Abramowitz and Stegun's 7.1.26 (absolute error below 1.5e-7). */
enum { ACT_NONE = 0, ACT_RELU = 1, ACT_SWISH = 2, ACT_GELU = 3 };
static inline float activate(float x, int activation) {
    if (activation == ACT_RELU) return x > 0.0f ? x : 0.0f;
    if (activation == ACT_SWISH) return x / (1.0f + exp_float(-x));
    if (activation == ACT_GELU) {
        const float z = fabsf(x) * 0.70710678118654752f, t = 1.0f / (1.0f + 0.3275911f * z);
        const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                                      t * 1.061405429f))));
        const float erf_z = 1.0f - poly * exp_float(-z * z);
        return 0.5f * x * (1.0f + (x < 0.0f ? -erf_z : erf_z));
    }
    return x;
}

/* Products for decoding steps: y = x W^T + b with W^T in panels of PANEL output columns, each
 * panel (in, PANEL) contiguous, so a tile's weights stream from memory in order. A tile is ROWS rows
 * times one panel, its sums in registers: with AVX2, 6 x 2 sums, 2 registers of weights and 1 of
 * the broadcast input are 15 of the 16 vector registers (8 rows spill, and ran 1.3-1.5x slower at
 * 32 rows). The weights of a panel are read once per ROWS rows, from L1 after the first time. */
#define PANEL 16
#define ROWS 6
/* activate() over a tile's sums; inlined with `kind` a constant, so the loop vectorizes. */
static inline __attribute__((always_inline)) void activate_tile(float sums[ROWS][PANEL], const int rows,
                                                                 const int kind) {
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < PANEL; o++) sums[r][o] = activate(sums[r][o], kind);
}

static inline __attribute__((always_inline)) void panel_tile(const float *x, long x_row, const int rows,
                                                              const float *w, long w_row, long in, const float *bias,
                                                              float *y, long y_row, int columns, int activation) {
    float sums[ROWS][PANEL];
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < PANEL; o++) sums[r][o] = bias ? bias[o] : 0.0f;
    for (long i = 0; i < in; i++) {
        const float *wi = w + i * w_row;
        for (int r = 0; r < rows; r++) {
            const float xi = x[r * x_row + i];
#pragma omp simd
            for (int o = 0; o < PANEL; o++) sums[r][o] += xi * wi[o];
        }
    }
    switch (activation) {  /* a constant in each loop, so that each vectorizes */
        case ACT_RELU: activate_tile(sums, rows, ACT_RELU); break;
        case ACT_SWISH: activate_tile(sums, rows, ACT_SWISH); break;
        case ACT_GELU: activate_tile(sums, rows, ACT_GELU); break;
        default: break;
    }
    if (columns == PANEL) {  /* a constant bound: stores straight from the registers */
        for (int r = 0; r < rows; r++)
            for (int o = 0; o < PANEL; o++) y[r * y_row + o] = sums[r][o];
    } else {
        for (int r = 0; r < rows; r++)
            for (int o = 0; o < columns; o++) y[r * y_row + o] = sums[r][o];
    }
}

/* One row times one panel: four partial sums over alternate input features, since one chain of
 * additions waits out each addition's latency (1 row alone, AVX2: 2048 x 512 48 against 94 us). */
static inline __attribute__((always_inline)) void panel_row(const float *x, const float *w, long w_row, long in,
                                                             const float *bias, float *y, int columns, int activation) {
    float sums[4][PANEL];
    for (int u = 0; u < 4; u++)
        for (int o = 0; o < PANEL; o++) sums[u][o] = 0.0f;
    long i = 0;
    for (; i + 4 <= in; i += 4)
        for (int u = 0; u < 4; u++) {
            const float xi = x[i + u], *wi = w + (i + u) * w_row;
#pragma omp simd
            for (int o = 0; o < PANEL; o++) sums[u][o] += xi * wi[o];
        }
    for (; i < in; i++)
        for (int o = 0; o < PANEL; o++) sums[0][o] += x[i] * w[i * w_row + o];
    for (int o = 0; o < columns; o++)
        y[o] = activate((bias ? bias[o] : 0.0f) + ((sums[0][o] + sums[1][o]) + (sums[2][o] + sums[3][o])), activation);
}

/* Panels [first, last) for every row: y[r, o] = x[r, :] . W^T[:, o] (+ bias[o]), activated. Panel p
 * starts at w + p * panel_step, its input row i at + i * w_row, 16 floats (the columns past
 * `columns` of a last, partial panel are read and ignored: they must be readable); y's rows are
 * y_row floats apart and hold `out` columns. Rows ROWS at a time, the row count a constant in each
 * call so that the sums stay in registers. Inlined, so that the products' strides are constants. */
static inline __attribute__((always_inline)) void multiply_tiles(const float *x, long x_row, long rows, const float *w,
                                                                 long panel_step, long w_row, long in, long first,
                                                                 long last, const float *bias, float *y, long y_row,
                                                                 long out, int activation) {
    for (long p = first; p < last; p++) {
        const float *wp = w + p * panel_step, *b = bias ? bias + p * PANEL : NULL;
        const int columns = out - p * PANEL < PANEL ? (int)(out - p * PANEL) : PANEL;
        if (rows == 1) {
            panel_row(x, wp, w_row, in, b, y + p * PANEL, columns, activation);
            continue;
        }
        for (long r0 = 0; r0 < rows; r0 += ROWS) {
            const float *xr = x + r0 * x_row;
            float *yr = y + r0 * y_row + p * PANEL;
            switch (rows - r0 < ROWS ? rows - r0 : ROWS) {
                case 6: panel_tile(xr, x_row, 6, wp, w_row, in, b, yr, y_row, columns, activation); break;
                case 5: panel_tile(xr, x_row, 5, wp, w_row, in, b, yr, y_row, columns, activation); break;
                case 4: panel_tile(xr, x_row, 4, wp, w_row, in, b, yr, y_row, columns, activation); break;
                case 3: panel_tile(xr, x_row, 3, wp, w_row, in, b, yr, y_row, columns, activation); break;
                case 2: panel_tile(xr, x_row, 2, wp, w_row, in, b, yr, y_row, columns, activation); break;
                default: panel_tile(xr, x_row, 1, wp, w_row, in, b, yr, y_row, columns, activation); break;
            }
        }
    }
}

/* A row of scores -> their softmax, in place. */
static inline void softmax(float *row, long len) {
    float top = -INFINITY, total = 0.0f;
    for (long j = 0; j < len; j++) top = row[j] > top ? row[j] : top;
    if (top == -INFINITY) {  /* every key masked: PyTorch's softmax gives NaN, so do we */
        for (long j = 0; j < len; j++) row[j] = NAN;
        return;
    }
#pragma omp simd reduction(+ : total)
    for (long j = 0; j < len; j++) {
        row[j] = exp_float(row[j] - top);
        total += row[j];
    }
    const float inverse = 1.0f / total;
    for (long j = 0; j < len; j++) row[j] *= inverse;
}

/* Floats of scratch attend_block needs for `queries` rows and `len` keys. */
static inline long block_scratch(long queries, long dim, long len) {
    return (len + PANEL - 1) / PANEL * PANEL * dim + queries * len;
}

/* Sentences with at least this many query rows each attend in blocks (attend_blocks): a source's
 * positions, not a sentence's 5 beams, where the transposition costs more than it saves (see
 * encdec/decode_kernels.py for the measurements). */
#define BLOCK_GROUPS 8

static inline int in_blocks(long groups, long dim) { return groups >= BLOCK_GROUPS && dim % PANEL == 0; }

/* Floats of scratch space a thread needs to attend for up to `sentences` sentences. */
static inline long attention_scratch(long sentences, long groups, long heads, long dim, long len) {
    return in_blocks(groups, dim) ? block_scratch(groups, dim, len) : sentences * groups * heads * len;
}

/* Defined in _decode_kernels.c, called by _decoder_layer.c as well. */
INTERNAL void multiply_panels(const float *x, long x_row, long rows, const float *panels, long in, long first,
                              long last, const float *bias, float *y, long out, int activation);
INTERNAL void attend(const float *q, long q_row, long q_head, const float *k, const float *v, long kv_pos,
                     long kv_sentence, long kv_head, const unsigned char *allowed, long allowed_sentence, float *out,
                     long first, long last, long groups, long heads, long dim, long len, float scale, float *scratch);

#endif
