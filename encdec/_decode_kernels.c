/* Decoding's small steps in one pass each: one query per (row, head) against the cached keys and
 * values, the steps' matrix products, and a whole decoder layer's step made of them.
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
        case ACT_RELU: for (int r = 0; r < rows; r++) for (int o = 0; o < PANEL; o++) sums[r][o] = activate(sums[r][o], ACT_RELU); break;
        case ACT_SWISH: for (int r = 0; r < rows; r++) for (int o = 0; o < PANEL; o++) sums[r][o] = activate(sums[r][o], ACT_SWISH); break;
        case ACT_GELU: for (int r = 0; r < rows; r++) for (int o = 0; o < PANEL; o++) sums[r][o] = activate(sums[r][o], ACT_GELU); break;
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

/* A Linear layer's panels [first, last) (column_panels' layout: panel p at p * in * PANEL, rows of
 * PANEL floats) for every row; y (rows, out) contiguous. */
CLONES static void multiply_panels(const float *x, long x_row, long rows, const float *panels, long in, long first,
                                   long last, const float *bias, float *y, long out, int activation) {
    multiply_tiles(x, x_row, rows, panels, in * PANEL, PANEL, in, first, last, bias, y, out, out, activation);
}

/* y = x W^T + b (a Linear layer's product) for any number of rows, from W^T in column panels
 * (encdec/decode_kernels.py's column_panels).
 *
 * x: (rows, in), row stride x_row, last dimension contiguous. panels: (n_panels, in, PANEL),
 * contiguous: panel p holds outputs p * PANEL to p * PANEL + PANEL - 1 (the last padded with zero
 * columns past `out`). bias: n_panels * PANEL floats (zero-padded likewise), or NULL. y: (rows,
 * out), contiguous; `activation` (ACT_*) is applied to each sum before it is stored. `threads`
 * threads (PyTorch's count) take equal runs of panels: for one row together they stream the weights at the memory's multi-core rate, where oneDNN's and MKL's
 * one-row products run on one core. */
__attribute__((visibility("default"))) void encdec_linear(const float *x, long x_row, long rows, const float *panels,
                                                            long n_panels, long in, const float *bias, float *y,
                                                            long out, long activation, long threads) {
    if (threads > n_panels) threads = n_panels;
#pragma omp parallel num_threads(threads < 1 ? 1 : threads)
    {
        const long t = omp_get_thread_num(), n = omp_get_num_threads();
        multiply_panels(x, x_row, rows, panels, in, n_panels * t / n, n_panels * (t + 1) / n, bias, y, out,
                        (int)activation);
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
    for (long i = 0; i < queries; i++) softmax(scores + i * len, len);
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

/* One (sentence, head) with several query rows (beams, or a whole source attending to itself): the
 * keys transposed into panels of 16 (zero-padded; `scratch`: block_scratch(...) floats), then two
 * tiled products as encdec_linear makes them, scores = Q K^T and out = weights V (V's rows read in
 * place: dim a multiple of PANEL). The one-query loops above sum each dot product across a vector's
 * lanes, 4 keys at a time; here each product keeps 6 x 16 sums in registers. `queries` rows of q
 * (q_row apart) against `len` keys and values (kv_pos apart); allowed: the sentence's `len` bytes or
 * NULL; out's rows out_row apart. */
static inline __attribute__((always_inline)) void attend_block(const float *q, long q_row, long queries,
                                                               const float *k, const float *v, long kv_pos, long len,
                                                               const unsigned char *allowed, float *out, long out_row,
                                                               long dim, float scale, float *scratch) {
    const long chunks = (len + PANEL - 1) / PANEL;
    float *keys = scratch, *scores = scratch + chunks * PANEL * dim;
    for (long j = 0; j < chunks * PANEL; j++) {  /* keys[c][d][o] = K[c * 16 + o][d] */
        float *column = keys + (j / PANEL) * dim * PANEL + j % PANEL;
        if (j < len)
            for (long d = 0; d < dim; d++) column[d * PANEL] = k[j * kv_pos + d];
        else
            for (long d = 0; d < dim; d++) column[d * PANEL] = 0.0f;
    }
    multiply_tiles(q, q_row, queries, keys, dim * PANEL, PANEL, dim, 0, chunks, NULL, scores, len, len, ACT_NONE);
    for (long g = 0; g < queries; g++) {
        float *row = scores + g * len;
        for (long j = 0; j < len; j++) row[j] = allowed != NULL && !allowed[j] ? -INFINITY : row[j] * scale;
        softmax(row, len);
    }
    multiply_tiles(scores, len, queries, v, PANEL, kv_pos, len, 0, dim / PANEL, NULL, out, out_row, dim, ACT_NONE);
}

/* Floats of scratch attend_block needs for `queries` rows and `len` keys. */
static inline long block_scratch(long queries, long dim, long len) {
    return (len + PANEL - 1) / PANEL * PANEL * dim + queries * len;
}

/* Sentences [first, last), every head, as attend_sentences computes them: attend_block for each. */
CLONES static void attend_blocks(const float *q, long q_row, long q_head, const float *k, const float *v,
                                 long kv_pos, long kv_sentence, long kv_head, const unsigned char *allowed,
                                 long allowed_sentence, float *out, long first, long last, long groups, long heads,
                                 long dim, long len, float scale, float *scratch) {
    for (long s = first; s < last; s++)
        for (long h = 0; h < heads; h++)
            attend_block(q + s * groups * q_row + h * q_head, q_row, groups, k + s * kv_sentence + h * kv_head,
                         v + s * kv_sentence + h * kv_head, kv_pos, len,
                         allowed != NULL ? allowed + s * allowed_sentence : NULL,
                         out + (s * groups * heads + h) * dim, heads * dim, dim, scale, scratch);
}

/* Head h of the packed sentence at rows offset .. offset + length - 1: see encdec_attend_packed. */
CLONES static void attend_packed_pair(const float *qkv, long offset, long length, long h, long d, long dim,
                                      float scale, float *out, float *scratch) {
    const float *q = qkv + offset * 3 * d + h * dim;
    if (length > 0)
        attend_block(q, 3 * d, length, q + d, q + 2 * d, 3 * d, length, NULL, out + offset * d + h * dim, d, dim,
                     scale, scratch);
}

/* Sources packed without padding attending to themselves (the encoder's self-attention): sentence s
 * is rows offsets[s] .. offsets[s] + lengths[s] - 1 of qkv (rows, 3 * heads * dim), each row its
 * query, key and value; its queries attend to its own keys. out: (rows, heads * dim), contiguous.
 * dim a multiple of PANEL. The threads share the (sentence, head) pairs. Returns 0, or -1 if it
 * could not allocate its scratch space (out is then not written). */
__attribute__((visibility("default"))) int encdec_attend_packed(const float *qkv, const long *offsets,
                                                                  const long *lengths, long sentences, long heads,
                                                                  long dim, float scale, float *out, long threads) {
    long longest = 0;
    for (long s = 0; s < sentences; s++) longest = lengths[s] > longest ? lengths[s] : longest;
    if (threads < 1) threads = 1;
    const long share = block_scratch(longest, dim, longest), d = heads * dim;
    float *scratch = malloc(sizeof(float) * (threads * share + 1));
    if (scratch == NULL) return -1;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (long pair = 0; pair < sentences * heads; pair++)
        attend_packed_pair(qkv, offsets[pair / heads], lengths[pair / heads], pair % heads, d, dim, scale, out,
                           scratch + omp_get_thread_num() * share);
    free(scratch);
    return 0;
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

/* Sentences [first, last) of encdec_attend_one; `scratch`: attention_scratch(last - first, ...) floats. */
static void attend(const float *q, long q_row, long q_head, const float *k, const float *v, long kv_pos,
                   long kv_sentence, long kv_head, const unsigned char *allowed, long allowed_sentence, float *out,
                   long first, long last, long groups, long heads, long dim, long len, float scale, float *scratch) {
    if (first >= last) return;
    if (in_blocks(groups, dim))
        attend_blocks(q, q_row, q_head, k, v, kv_pos, kv_sentence, kv_head, allowed, allowed_sentence, out, first,
                      last, groups, heads, dim, len, scale, scratch);
    else
        attend_sentences(q, q_row, q_head, k, v, kv_pos, kv_sentence, kv_head, allowed, allowed_sentence, out, first,
                         last, groups, heads, dim, len, scale, scratch);
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
    if (threads > sentences) threads = sentences;
    if (threads < 1) threads = 1;
    const long share = attention_scratch((sentences + threads - 1) / threads, groups, heads, dim, len);
    float *scratch = malloc(sizeof(float) * (threads * share + 1));
    if (scratch == NULL) return -1;
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (long t = 0; t < threads; t++)
        attend(q, q_row, q_head, k, v, kv_pos, kv_sentence, kv_head, allowed, allowed_sentence, out,
               sentences * t / threads, sentences * (t + 1) / threads, groups, heads, dim, len, scale,
               scratch + t * share);
    free(scratch);
    return 0;
}

/* A whole decoder layer's step (encdec/layers.py's DecoderLayer.step) in one call: the products,
 * the one-query attentions, the residuals and the layer norms, the threads kept between them (one
 * OpenMP region, a barrier after each part), where PyTorch ops would cost a call and a dispatch
 * each (~25 per layer, a fixed few microseconds apiece: the bulk of a batch-1 step's time). */
typedef struct {
    long d_model, heads, head_dim, ff, pre_norm, activation;
    double eps;
    /* (panels, bias) of W_QKV (3 d_model), self-attention W_O, cross-attention W_Q and W_O, W_1 (ff), W_2;
     * each bias padded to whole panels, or NULL */
    const float *panels[6], *bias[6];
    const float *norm_weight[3], *norm_bias[3]; /* the three sub-layers' layer norms */
} DecoderLayer;

enum { QKV = 0, SELF_OUT, CROSS_Q, CROSS_OUT, FF_1, FF_2 };

/* Rows [first, last) of y = LayerNorm(a + b) (b may be NULL), with the norm's weight and bias. */
CLONES static void residual_norm(const float *a, const float *b, float *y, long first, long last, long d,
                                 const float *weight, const float *bias, float eps) {
    for (long r = first; r < last; r++) {
        const float *ar = a + r * d, *br = b ? b + r * d : NULL;
        float *yr = y + r * d, total = 0.0f, squares = 0.0f;
#pragma omp simd reduction(+ : total)
        for (long i = 0; i < d; i++) {
            yr[i] = br ? ar[i] + br[i] : ar[i];
            total += yr[i];
        }
        const float mean = total / (float)d;
#pragma omp simd reduction(+ : squares)
        for (long i = 0; i < d; i++) squares += (yr[i] - mean) * (yr[i] - mean);
        const float inverse = 1.0f / sqrtf(squares / (float)d + eps);
#pragma omp simd
        for (long i = 0; i < d; i++) yr[i] = (yr[i] - mean) * inverse * weight[i] + bias[i];
    }
}

/* Rows [first, last) of a += b. */
static void add_rows(float *a, const float *b, long first, long last, long d) {
    for (long i = first * d; i < last * d; i++) a[i] += b[i];
}

/* x -> y for one new position per row (`rows` hypotheses, `groups` consecutive ones per sentence).
 *
 * x, y: (rows, d_model), contiguous, not the same memory. self_k, self_v: the self-attention cache's
 * buffers, strides (self_pos, self_row, self_head, 1); positions 0 .. self_len - 1 are filled, and
 * this step's keys and values are written at position self_len (room for it: the caller's). cross_k,
 * cross_v: the encoder-decoder keys and values, (src_len, rows / groups, heads, head_dim), strides
 * (cross_pos, cross_sentence, cross_head, 1); allowed: (rows / groups, src_len) bytes, row stride
 * allowed_sentence, or NULL. Post-norm: y = LN3(x2 + FFN(x2)), x2 = LN2(x1 + Cross(x1)), x1 = LN1(x +
 * Self(x)); pre-norm: y = x2 + FFN(LN3(x2)), and so on. Returns 0, or -1 if it could not allocate
 * its scratch space (then nothing was written). */
__attribute__((visibility("default"))) int encdec_decoder_layer_step(
    const DecoderLayer *layer, const float *x, float *y, long rows, float *self_k, float *self_v, long self_pos,
    long self_row, long self_head, long self_len, const float *cross_k, const float *cross_v, long cross_pos,
    long cross_sentence, long cross_head, long src_len, long groups, const unsigned char *allowed,
    long allowed_sentence, long threads) {
    const long d = layer->d_model, heads = layer->heads, dim = layer->head_dim, ff = layer->ff;
    const long sentences = rows / groups;
    const int pre_norm = (int)layer->pre_norm;
    const float eps = (float)layer->eps, scale = 1.0f / sqrtf((float)dim);
    if (threads < 1) threads = 1;
    /* Each thread's attention scratch, enough for every row or sentence (a team may be smaller). */
    const long self_share = attention_scratch(rows, 1, heads, dim, self_len + 1);
    const long cross_share = attention_scratch(sentences, groups, heads, dim, src_len);
    const long share = self_share > cross_share ? self_share : cross_share;
    /* qkv (rows, 3d); attended (rows, d); sub-layer output (rows, d); normed input (rows, d); hidden (rows, ff) */
    float *scratch = malloc(sizeof(float) * (rows * (6 * d + ff) + threads * share + 1));
    if (scratch == NULL) return -1;
    float *qkv = scratch, *attended = qkv + rows * 3 * d, *sub = attended + rows * d, *normed = sub + rows * d;
    float *hidden = normed + rows * d, *scores = hidden + rows * ff;
#pragma omp parallel num_threads(threads)
    {
        const long t = omp_get_thread_num(), n = omp_get_num_threads();
        const long row0 = rows * t / n, row1 = rows * (t + 1) / n;  /* this thread's rows */
        const long s0 = sentences * t / n, s1 = sentences * (t + 1) / n;  /* and sentences */
#define PRODUCT(input, which, width, output, act)                                                              \
    multiply_panels(input, d, rows, layer->panels[which], d, ((width) + PANEL - 1) / PANEL * t / n,               \
                    ((width) + PANEL - 1) / PANEL * (t + 1) / n, layer->bias[which], output, width, act)
        /* The stream is y from the first residual on; the sub-layers read `in`. */
        const float *in = x;
        if (pre_norm) {
            residual_norm(x, NULL, normed, row0, row1, d, layer->norm_weight[0], layer->norm_bias[0], eps);
            in = normed;
#pragma omp barrier
        }
        /* Self-attention: this position's keys and values into the cache, then every row attends to
         * its own past (one "sentence" a row), the thread's rows only. */
        PRODUCT(in, QKV, 3 * d, qkv, ACT_NONE);
#pragma omp barrier
        for (long r = row0; r < row1; r++)
            for (long h = 0; h < heads; h++) {
                memcpy(self_k + self_len * self_pos + r * self_row + h * self_head, qkv + r * 3 * d + d + h * dim,
                       sizeof(float) * dim);
                memcpy(self_v + self_len * self_pos + r * self_row + h * self_head, qkv + r * 3 * d + 2 * d + h * dim,
                       sizeof(float) * dim);
            }
        attend(qkv, 3 * d, dim, self_k, self_v, self_pos, self_row, self_head, NULL, 0, attended, row0, row1, 1, heads,
               dim, self_len + 1, scale, scores + t * share);
#pragma omp barrier
        /* Then each of the three sub-layers' output projection, residual and norm. */
        for (int part = 0; part < 3; part++) {
            if (part == 1) {  /* encoder-decoder attention: queries from the decoder, one sentence's beams together */
                PRODUCT(in, CROSS_Q, d, qkv, ACT_NONE);
#pragma omp barrier
                attend(qkv, d, dim, cross_k, cross_v, cross_pos, cross_sentence, cross_head, allowed, allowed_sentence,
                       attended, s0, s1, groups, heads, dim, src_len, scale, scores + t * share);
#pragma omp barrier
            }
            if (part < 2) {
                PRODUCT(attended, part == 0 ? SELF_OUT : CROSS_OUT, d, sub, ACT_NONE);
            } else {
                PRODUCT(in, FF_1, ff, hidden, (int)layer->activation);
#pragma omp barrier
                multiply_panels(hidden, ff, rows, layer->panels[FF_2], ff, (d + PANEL - 1) / PANEL * t / n,
                                (d + PANEL - 1) / PANEL * (t + 1) / n, layer->bias[FF_2], sub, d, ACT_NONE);
            }
#pragma omp barrier
            if (!pre_norm) {  /* y = LN(stream + sub), the next sub-layer's input */
                residual_norm(part == 0 ? x : y, sub, y, row0, row1, d, layer->norm_weight[part],
                              layer->norm_bias[part], eps);
                in = y;
            } else {  /* stream += sub; the next input is LN(stream) */
                if (part == 0) memcpy(y + row0 * d, x + row0 * d, sizeof(float) * (row1 - row0) * d);
                add_rows(y, sub, row0, row1, d);
                if (part < 2)
                    residual_norm(y, NULL, normed, row0, row1, d, layer->norm_weight[part + 1],
                                  layer->norm_bias[part + 1], eps);
            }
#pragma omp barrier
        }
#undef PRODUCT
    }
    free(scratch);
    return 0;
}

/* One row of row_normalizers: the maxima of its `blocks` blocks of `block` values, and log(sum e^x). */
CLONES static void row_normalizer(const float *x, long cols, long block, long blocks, float *lse, float *block_max) {
    float top = -INFINITY, total = 0.0f;
    for (long b = 0; b < blocks; b++) {
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (long j = 0; j < block; j++) m = x[b * block + j] > m ? x[b * block + j] : m;
        block_max[b] = m;
        top = m > top ? m : top;
    }
    for (long j = blocks * block; j < cols; j++) top = x[j] > top ? x[j] : top;
    if (top == -INFINITY) {  /* nothing possible: log-softmax's NaN row, as PyTorch's */
        *lse = NAN;
        return;
    }
#pragma omp simd reduction(+ : total)
    for (long j = 0; j < cols; j++) total += exp_float(x[j] - top);
    *lse = top + logf(total);
}

/* For each row of x (rows, cols), contiguous: lse[r] = log(sum_j e^x[r, j]) (so that x[r, j] - lse[r]
 * is the log-softmax), and block_max[r, b] = the largest of x[r, b * block .. b * block + block - 1]
 * for the cols / block whole blocks (beam search ranks blocks of tokens by it: encdec/search.py's
 * best_continuations). One read of the logits for both, where log_softmax writes them all. */
__attribute__((visibility("default"))) void encdec_row_normalizers(const float *x, long rows, long cols, long block,
                                                                     float *lse, float *block_max, long threads) {
    const long blocks = cols / block;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (long r = 0; r < rows; r++) row_normalizer(x + r * cols, cols, block, blocks, lse + r, block_max + r * blocks);
}
