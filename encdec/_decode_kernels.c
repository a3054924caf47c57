/* Decoding's small steps in one pass each: one query per (row, head) against the cached keys and
 * values (or a source's positions against each other), the steps' matrix products, and beam
 * search's log-normalisers. encdec/_decoder_layer.c makes a decoder layer's whole step of them.
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
#include "_decode_kernels.h"

/* A Linear layer's panels [first, last) (column_panels' layout: panel p at p * in * PANEL, rows of
 * PANEL floats) for every row; y (rows, out) contiguous. */
CLONES INTERNAL void multiply_panels(const float *x, long x_row, long rows, const float *panels, long in, long first,
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
 * threads (PyTorch's count) take equal runs of panels: for one row together they stream the
 * weights at the memory's multi-core rate, where oneDNN's and MKL's one-row products run on one
 * core. */
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

/* Sentences [first, last) of encdec_attend_one; `scratch`: attention_scratch(last - first, ...) floats. */
INTERNAL void attend(const float *q, long q_row, long q_head, const float *k, const float *v, long kv_pos,
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
