/* Decoding's small steps in one pass each: one query per (row, head) against the cached keys and
 * values, and the steps' matrix products.
 *
 * A decoding step attends from one new position per hypothesis to every key and value in the cache
 * (encdec/attention.py's KVCache). Written with PyTorch ops that is two batched products of one-row
 * matrices (MKL runs them as one matrix-vector product per row and head), a scale, a mask and a
 * softmax, each a call with its own temporaries; encdec_attend_one is one loop per (sentence, head)
 * that reads each key and value once, for all of that sentence's beams. A step's products have one
 * row per hypothesis (1 to a few hundred), where oneDNN's and MKL's products pay tens of
 * microseconds a call and one-row products run on one core: encdec_linear keeps a tile's sums in
 * registers while weights laid out for it stream by. See encdec/decode_kernels.py, which loads this
 * file with ctypes and holds the measurements.
 *
 * Plain C, no Python or PyTorch headers. OpenMP shares the work among PyTorch's threads: the
 * library links libgomp.so.1, which resolves to the copy PyTorch has already loaded.
 */
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

/* e^x for x <= 0 (softmax's shifted scores), within ~2 float ulps of expf, in a form the compiler
 * vectorizes (glibc's expf is one call per value, and those calls would cost more than the dot
 * products): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^7 (error below
 * 2^-26 there), times 2^n built in the exponent bits. Below -87.3 the result would be subnormal:
 * 0 (a weight that small is 0 after the division by the total anyway). */
static inline float exp_nonpositive(float x) {
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

/* The n (1 to 4) positions from p on, `stride` floats apart, as four pointers; the slots past the
 * n-th repeat the n-th (the loops below compute four at a time and ignore those slots' results). */
static inline void four_positions(const float *p, long stride, long n, const float *four[4]) {
    for (long i = 0; i < 4; i++) four[i] = p + (i < n ? i : n - 1) * stride;
}

/* Sentences [first, last) of the batch, every head: see encdec_attend_one. `scores`: room for their
 * rows x heads x len floats.
 *
 * Position by position: the cache is position-major, so one position's keys for these sentences
 * are one contiguous block, and reading key after key of one (sentence, head) instead would jump a
 * whole position's block each time (measured twice as slow inside decoding, where the cache is
 * not in the CPU's caches: each step's matrix products have streamed the weights through them). */
CLONES static void attend_sentences(const float *q, long q_row, long q_head, const float *k, const float *v,
                                    long kv_pos, long kv_sentence, long kv_head, const unsigned char *allowed,
                                    long allowed_sentence, float *out, long first, long last, long groups,
                                    long heads, long dim, long len, float scale, float *scores) {
    /* scores[((s - first) * groups + g) * heads + h][j]: the query of row s * groups + g, head h.
     * Four keys at a time: four independent sums, where one dot product after another would wait on
     * each sum's chain of additions (alone, 32 sentences x 4 heads x 35 keys: 105 -> 87 us; with 5
     * beams a sentence and 20 keys: 189 -> 136). */
    for (long j0 = 0; j0 < len; j0 += 4) {
        const long keys = len - j0 < 4 ? len - j0 : 4;
        for (long s = first; s < last; s++) {
            for (long h = 0; h < heads; h++) {
                const float *key[4];
                four_positions(k + j0 * kv_pos + s * kv_sentence + h * kv_head, kv_pos, keys, key);
                const float *k0 = key[0], *k1 = key[1], *k2 = key[2], *k3 = key[3];
                for (long g = 0; g < groups; g++) {
                    const float *query = q + (s * groups + g) * q_row + h * q_head;
                    float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
                    for (long d = 0; d < dim; d++) {
                        d0 += query[d] * k0[d];
                        d1 += query[d] * k1[d];
                        d2 += query[d] * k2[d];
                        d3 += query[d] * k3[d];
                    }
                    const float dots[4] = {d0, d1, d2, d3};
                    float *row = scores + (((s - first) * groups + g) * heads + h) * len;
                    for (long i = 0; i < keys; i++) {
                        const int masked = allowed != NULL && !allowed[s * allowed_sentence + j0 + i];
                        row[j0 + i] = masked ? -INFINITY : dots[i] * scale;
                    }
                }
            }
        }
    }
    const long queries = (last - first) * groups * heads;
    for (long i = 0; i < queries; i++) {  /* softmax over each query's row of scores */
        float *row = scores + i * len, top = -INFINITY, total = 0.0f;
        for (long j = 0; j < len; j++) top = row[j] > top ? row[j] : top;
        if (top == -INFINITY) {  /* every key masked: PyTorch's softmax gives NaN, so do we */
            for (long j = 0; j < len; j++) row[j] = NAN;
            continue;
        }
#pragma omp simd reduction(+ : total)
        for (long j = 0; j < len; j++) {
            row[j] = exp_nonpositive(row[j] - top);
            total += row[j];
        }
        const float inverse = 1.0f / total;
        for (long j = 0; j < len; j++) row[j] *= inverse;
    }
    float *block = out + first * groups * heads * dim;  /* these rows' outputs, contiguous */
    for (long i = 0; i < queries * dim; i++) block[i] = 0.0f;
    for (long j0 = 0; j0 < len; j0 += 4) {  /* four values at a time: one read and write of the output */
        const long values = len - j0 < 4 ? len - j0 : 4;
        for (long s = first; s < last; s++) {
            for (long h = 0; h < heads; h++) {
                const float *value[4];
                four_positions(v + j0 * kv_pos + s * kv_sentence + h * kv_head, kv_pos, values, value);
                const float *v0 = value[0], *v1 = value[1], *v2 = value[2], *v3 = value[3];
                for (long g = 0; g < groups; g++) {
                    const long i = ((s - first) * groups + g) * heads + h;
                    const float *w = scores + i * len + j0;  /* weights past the last value count 0 */
                    const float w0 = w[0], w1 = values > 1 ? w[1] : 0.0f, w2 = values > 2 ? w[2] : 0.0f;
                    const float w3 = values > 3 ? w[3] : 0.0f;
                    float *o = block + i * dim;
#pragma omp simd
                    for (long d = 0; d < dim; d++) o[d] += (w0 * v0[d] + w1 * v1[d]) + (w2 * v2[d] + w3 * v3[d]);
                }
            }
        }
    }
}

/* out[r, h] = softmax(q[r, h] . k[:, s, h] * scale, masked) @ v[:, s, h] for every row r and head
 * h, where s = r / groups is the row's sentence (its beams are consecutive rows).
 *
 * q: (rows, heads, dim) with strides (q_row, q_head, 1). k, v: (len, sentences, heads, dim) with
 * strides (kv_pos, kv_sentence, kv_head, 1), the same for both. allowed: (sentences, len) bytes,
 * row stride allowed_sentence, or NULL. out: (rows, heads, dim), contiguous. `threads` threads
 * (PyTorch's count: a thread's OpenMP default may differ) take equal shares of the sentences.
 * Returns 0, or -1 if it could not allocate its scratch space (out is then not written). */
__attribute__((visibility("default"))) int encdec_attend_one(
    const float *q, long q_row, long q_head, const float *k, const float *v, long kv_pos, long kv_sentence,
    long kv_head, const unsigned char *allowed, long allowed_sentence, float *out, long sentences, long groups,
    long heads, long dim, long len, float scale, long threads) {
    float *scores = malloc(sizeof(float) * (sentences * groups * heads * len + 1));
    if (scores == NULL) return -1;
    if (threads > sentences) threads = sentences;
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (long t = 0; t < threads; t++) {
        const long first = sentences * t / threads, last = sentences * (t + 1) / threads;
        attend_sentences(q, q_row, q_head, k, v, kv_pos, kv_sentence, kv_head, allowed, allowed_sentence, out, first,
                         last, groups, heads, dim, len, scale, scores + first * groups * heads * len);
    }
    free(scores);
    return 0;
}

/* Products for decoding steps: y = x W^T + b with W^T in panels of PANEL output columns, each
 * panel (in, PANEL) contiguous, so a tile's weights stream from memory in order. A tile is ROWS rows
 * times one panel, its sums in registers: with AVX2, 6 x 2 sums, 2 registers of weights and 1 of
 * the broadcast input are 15 of the 16 vector registers (8 rows spill, and ran 1.3-1.5x slower at
 * 32 rows). The weights of a panel are read once per ROWS rows, from L1 after the first time. */
#define PANEL 16
#define ROWS 6
static inline __attribute__((always_inline)) void panel_tile(const float *x, long x_row, const int rows,
                                                              const float *w, long in, const float *bias, float *y,
                                                              long y_row, int columns) {
    float sums[ROWS][PANEL];
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < PANEL; o++) sums[r][o] = bias ? bias[o] : 0.0f;
    for (long i = 0; i < in; i++) {
        const float *wi = w + i * PANEL;
        for (int r = 0; r < rows; r++) {
            const float xi = x[r * x_row + i];
#pragma omp simd
            for (int o = 0; o < PANEL; o++) sums[r][o] += xi * wi[o];
        }
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
static inline __attribute__((always_inline)) void panel_row(const float *x, const float *w, long in,
                                                             const float *bias, float *y, int columns) {
    float sums[4][PANEL];
    for (int u = 0; u < 4; u++)
        for (int o = 0; o < PANEL; o++) sums[u][o] = 0.0f;
    long i = 0;
    for (; i + 4 <= in; i += 4)
        for (int u = 0; u < 4; u++) {
            const float xi = x[i + u], *wi = w + (i + u) * PANEL;
#pragma omp simd
            for (int o = 0; o < PANEL; o++) sums[u][o] += xi * wi[o];
        }
    for (; i < in; i++)
        for (int o = 0; o < PANEL; o++) sums[0][o] += x[i] * w[i * PANEL + o];
    for (int o = 0; o < columns; o++)
        y[o] = (bias ? bias[o] : 0.0f) + ((sums[0][o] + sums[1][o]) + (sums[2][o] + sums[3][o]));
}

/* Panels [first, last) for every row: see encdec_linear. Rows ROWS at a time, the row count a
 * constant in each call so that the sums stay in registers. */
CLONES static void multiply_panels(const float *x, long x_row, long rows, const float *panels, long in, long first,
                                   long last, const float *bias, float *y, long out) {
    for (long p = first; p < last; p++) {
        const float *w = panels + p * in * PANEL, *b = bias ? bias + p * PANEL : NULL;
        const int columns = out - p * PANEL < PANEL ? (int)(out - p * PANEL) : PANEL;
        if (rows == 1) {
            panel_row(x, w, in, b, y + p * PANEL, columns);
            continue;
        }
        for (long r0 = 0; r0 < rows; r0 += ROWS) {
            const float *xr = x + r0 * x_row;
            float *yr = y + r0 * out + p * PANEL;
            switch (rows - r0 < ROWS ? rows - r0 : ROWS) {
                case 6: panel_tile(xr, x_row, 6, w, in, b, yr, out, columns); break;
                case 5: panel_tile(xr, x_row, 5, w, in, b, yr, out, columns); break;
                case 4: panel_tile(xr, x_row, 4, w, in, b, yr, out, columns); break;
                case 3: panel_tile(xr, x_row, 3, w, in, b, yr, out, columns); break;
                case 2: panel_tile(xr, x_row, 2, w, in, b, yr, out, columns); break;
                default: panel_tile(xr, x_row, 1, w, in, b, yr, out, columns); break;
            }
        }
    }
}

/* y = x W^T + b (a Linear layer's product) for any number of rows, from W^T in column panels
 * (encdec/decode_kernels.py's column_panels).
 *
 * x: (rows, in), row stride x_row, last dimension contiguous. panels: (n_panels, in, PANEL),
 * contiguous: panel p holds outputs p * PANEL to p * PANEL + PANEL - 1 (the last padded with zero
 * columns past `out`). bias: n_panels * PANEL floats (zero-padded likewise), or NULL. y: (rows,
 * out), contiguous. `threads` threads (PyTorch's count) take equal runs of panels: for one row
 * together they stream the weights at the memory's multi-core rate, where oneDNN's and MKL's
 * one-row products run on one core. */
__attribute__((visibility("default"))) void encdec_linear(const float *x, long x_row, long rows, const float *panels,
                                                            long n_panels, long in, const float *bias, float *y,
                                                            long out, long threads) {
    if (threads > n_panels) threads = n_panels;
#pragma omp parallel num_threads(threads < 1 ? 1 : threads)
    {
        const long t = omp_get_thread_num(), n = omp_get_num_threads();
        multiply_panels(x, x_row, rows, panels, in, n_panels * t / n, n_panels * (t + 1) / n, bias, y, out);
    }
}
