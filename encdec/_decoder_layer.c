/* A whole decoder layer's decoding step in one call (encdec/decode_kernels.py's DecoderLayerStep),
 * made of encdec/_decode_kernels.c's products and attention. Part of the encdec._decode_kernels
 * library (setup.py).
 */
#include "_decode_kernels.h"

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

