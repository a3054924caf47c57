"""Decoding's small steps in C: one-query attention over a KV cache, the steps' matrix products, and a
whole decoder layer's step in one call.

A decoding step attends from one new position per hypothesis to every cached key and value,
``2 x layers`` times a step. As PyTorch ops that is two batched products of one-row matrices (MKL
runs each (row, head) as its own matrix-vector product), a scale, a mask and a softmax: calls with
temporaries of their own, small enough that their fixed costs dominate. :func:`attend_one` does
the same in one pass per (sentence, head), over the cache's buffers in place. Sentences with many
query rows (a whole source attending to itself: the encoder's self-attention at inference, called
straight on its projection's output) go in blocks instead: the keys transposed into panels of 16,
then the two products tiled as :func:`linear`'s are (2 threads, AVX2 EPYC, us, one query at a time /
blocks: 32 sentences x 35 queries x 4 heads 1,008 / 567, x 8 heads 2,016 / 1,174, 1 x 30 x 4 51 / 33;
with 5 beams a sentence 144 / 169, with 2 70 / 150, so from 8 query rows a sentence only). Whole
searches, paired, against PyTorch's ops for the encoder's attention: small model greedy batch 1 +8 %
(7 of 8), batch 32 +0.5 % (5 of 8, noise). :func:`attend_packed` does the same for sources packed
without their padding, so that the encoder's products and norms skip it too (:class:`encdec.model.
Encoder`, at inference): speed.py's batch of 32 sources (956 real of 1,120 positions) encodes in
30.6-31.8 against 34.9-47.7 ms (small) and 226-259 against 266-342 ms (base), three repeats each;
whole greedy batch-32 searches, paired: small +3.8 % (10 of 16), base +0.8 % (3 of 6), small beam 5
0.98 (3 of 6): the rest of a search moves by as much between rounds.

Each of a step's products multiplies one row per live hypothesis (1 to a few hundred) by a weight
matrix. oneDNN's packed product pays a fixed 30-45 us a call on CPUs without AVX512 and runs one
row on one core (as does MKL's matrix-vector product). :func:`linear` multiplies from the weights
laid out for it by :func:`column_panels` (``W^T`` in panels of 16 output columns, each contiguous),
a tile of 6 rows x 16 columns at a time with its sums in registers, the threads taking equal runs
of panels (2 threads, AVX2 EPYC, alone, us, oneDNN packed / this: 256 x 768 at 1 row 40 / 12, 32
rows 130 / 94, 160 rows 455 / 446; 1024 x 256 at 32 rows 165 / 118; 512 x 2048 at 5 rows 143 /
88; 2048 x 512 at 1 row 86 / 48; 256 x 8000 at 32 rows 1,111 / 1,069), and can apply the
feed-forward activation to the sums before it stores them.

:class:`DecoderLayerStep` runs a whole decoder layer's step (six products, the cache write, both
attentions, three residuals and norms) in one call and one OpenMP region, the threads waiting at a
barrier between parts instead of being handed each op anew: the ~25 PyTorch calls a layer made
(each a few microseconds of dispatch, arguments, temporaries, and a fork and join of the threads)
were most of a batch-1 step. Whole searches, paired, 2 threads, AVX2 EPYC, against the same
kernels called op by op: small model greedy batch 1 2.14x tokens/s (8 of 8), beam 5 batch 1 1.67x
(5 of 5), greedy batch 32 1.24x (6 of 6), beam 5 batch 32 1.02x (3 of 4); base model 1.40x, 1.42x,
1.08x, 1.01x; the same tokens.

:func:`row_normalizers` gives beam search each row's log-normaliser and block maxima in one read of
the logits (:func:`encdec.search.best_continuations`): whole searches, paired, beam 5 batch 32,
small model +3.0 % (5 of 6), base 0.986 (2 of 5, noise; alone, (160, 32000) logits, 1.7 ms against
3.5 for the in-place log-softmax and block maxima, a search's 30 calls ~50 ms of ~2,800).

The library is compiled with ``-fno-trapping-math`` (setup.py): with GCC's default, the selects in
the exponential (softmax, swish) stayed branches on AVX2 and those loops scalar; paired whole
searches, small model: greedy batch 32 +5.6 % (8 of 8), beam 5 batch 32 +5.7 % (5 of 5), batch 1 even.

All are in one library (``encdec/_decode_kernels.c``, ``encdec/_decoder_layer.c`` and the header they
share), share the work among PyTorch's threads (OpenMP), and are built at install like
:mod:`encdec.mkl`'s shim (optional: without a C compiler there is no library, the functions return
``None`` and callers keep the PyTorch ops); ``ENCDEC_DECODE_KERNELS=0`` turns them off. Float32 on
the CPU without gradients only. Results equal PyTorch's up to float rounding (they sum in another
order). Measured on whole searches (paired, AVX2 EPYC): the attention +13 %
tokens/s for the small model's batch-32 greedy (10 of 10) and +7 % for beam 5 (7 of 8); the products
(against oneDNN's packed product and the few-row kernel before them), small / base model: greedy
batch 32 +22 / +13 %, beam 5 batch 32 +4 / +6 %, greedy batch 1 +32 / +28 %, beam 5 batch 1 +36 /
+38 %, the same tokens.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

import torch
from torch import Tensor

ENV_SWITCH = "ENCDEC_DECODE_KERNELS"

_FLOAT32 = torch.float32
_long, _ptr = ctypes.c_long, ctypes.c_void_p
# The C functions' parameters, in order (see encdec/_decode_kernels.c and encdec/_decoder_layer.c).
_ATTEND_ARGS = (_ptr, _long, _long, _ptr, _ptr, _long, _long, _long, _ptr, _long, _ptr, _long, _long, _long, _long,
                _long, ctypes.c_float, _long)
_LINEAR_ARGS = (_ptr, _long, _long, _ptr, _long, _long, _ptr, _ptr, _long, _long, _long)
_LAYER_ARGS = (_ptr, _ptr, _ptr, _long, _ptr, _ptr, _long, _long, _long, _long, _ptr, _ptr, _long, _long, _long, _long,
               _long, _ptr, _long, _long)
PANEL = 16  # output columns a panel (encdec/_decode_kernels.h's PANEL)


def _load() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    spec = importlib.util.find_spec("encdec._decode_kernels")
    if spec is None or spec.origin is None:
        return None
    try:
        library = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    library.encdec_attend_one.argtypes, library.encdec_attend_one.restype = _ATTEND_ARGS, ctypes.c_int
    library.encdec_linear.argtypes, library.encdec_linear.restype = _LINEAR_ARGS, None
    library.encdec_decoder_layer_step.argtypes = _LAYER_ARGS
    library.encdec_decoder_layer_step.restype = ctypes.c_int
    library.encdec_attend_packed.argtypes = (_ptr, _ptr, _ptr, _long, _long, _long, ctypes.c_float, _ptr, _long)
    library.encdec_attend_packed.restype = ctypes.c_int
    library.encdec_row_normalizers.argtypes = (_ptr, _long, _long, _long, _ptr, _ptr, _long)
    library.encdec_row_normalizers.restype = None
    return library


_library = _load()
_attend_kernel = None if _library is None else _library.encdec_attend_one
_linear_kernel = None if _library is None else _library.encdec_linear
_layer_kernel = None if _library is None else _library.encdec_decoder_layer_step
_normalizers_kernel = None if _library is None else _library.encdec_row_normalizers
_packed_kernel = None if _library is None else _library.encdec_attend_packed


def available() -> bool:
    """Whether the compiled kernels are loaded (built at install, not switched off)."""
    return _attend_kernel is not None


def attend_one(q: Tensor, k: Tensor, v: Tensor, length: int, allowed: Tensor | None = None) -> Tensor | None:
    """``softmax(q K^T / sqrt(head_dim)) V`` for one query per (row, head), from cache buffers.

    Args:
        q: ``(rows, heads, head_dim)`` float32 queries, last dimension contiguous (any row and head
            strides: a view into a fused projection's output will do).
        k, v: a cache's position-major buffers ``(capacity, sentences, heads, head_dim)``, the same
            strides for both, last dimension contiguous; the first ``length`` positions are attended.
            ``rows`` is a multiple of ``sentences``: each sentence's ``rows / sentences`` beams are
            consecutive rows and attend to its keys and values.
        allowed: ``(sentences, length)`` bool, ``False`` where a key is masked (padding); or ``None``.
    Returns:
        ``(rows, heads, head_dim)``, or ``None`` where the kernel does not apply (not built, not
        float32 on the CPU, gradients wanted, other layouts): the caller then uses PyTorch ops.
    """
    if (_attend_kernel is None or q.dtype != _FLOAT32 or k.dtype != _FLOAT32 or q.requires_grad
            or q.device.type != "cpu"):
        return None
    (rows, heads, dim), (capacity, sentences, *_), q_strides, kv_strides = q.shape, k.shape, q.stride(), k.stride()
    if (q_strides[2] != 1 or kv_strides[3] != 1 or v.stride() != kv_strides or k.shape[2:] != (heads, dim)
            or rows % sentences or not 0 < length <= capacity or k.requires_grad or v.requires_grad):
        return None
    mask_pointer, mask_stride = None, 0
    if allowed is not None:
        if allowed.dtype != torch.bool or allowed.stride(1) != 1 or allowed.shape != (sentences, length):
            return None
        mask_pointer, mask_stride = allowed.data_ptr(), allowed.stride(0)
    out = torch.empty(rows, heads, dim)
    failed = _attend_kernel(q.data_ptr(), q_strides[0], q_strides[1], k.data_ptr(), v.data_ptr(), *kv_strides[:3],
                            mask_pointer, mask_stride, out.data_ptr(), sentences, rows // sentences, heads, dim,
                            length, dim ** -0.5, torch.get_num_threads())
    return None if failed else out


def attend_packed(qkv: Tensor, offsets: Tensor, lengths: Tensor, heads: int) -> Tensor | None:
    """Self-attention of sentences packed without padding, as an encoder computes it at inference.

    ``qkv``: ``(rows, 3 * d_model)`` float32, contiguous, each row its query, key and value (a fused
    projection's output); sentence ``s`` is rows ``offsets[s]`` to ``offsets[s] + lengths[s] - 1``
    (int64 ``(sentences,)`` each), and its queries attend to its own keys only. Returns ``(rows,
    d_model)``, or ``None`` where the kernel does not apply (not loaded, another dtype or layout,
    gradients wanted, a head size that is not a multiple of :data:`PANEL`); rows in no sentence are
    left unwritten.
    """
    rows, width = qkv.shape
    d_model = width // 3
    if (_packed_kernel is None or qkv.dtype != _FLOAT32 or not qkv.is_contiguous() or qkv.requires_grad
            or qkv.device.type != "cpu" or width % 3 or d_model % heads or (d_model // heads) % PANEL
            or offsets.dtype != torch.int64 or lengths.dtype != torch.int64):
        return None
    offsets, lengths = offsets.contiguous(), lengths.contiguous()
    out = torch.empty(rows, d_model)
    failed = _packed_kernel(qkv.data_ptr(), offsets.data_ptr(), lengths.data_ptr(), offsets.numel(), heads,
                            d_model // heads, (d_model // heads) ** -0.5, out.data_ptr(), torch.get_num_threads())
    return None if failed else out


def column_panels(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """An ``(out, in)`` float32 ``weight`` as :func:`linear` reads it: ``W^T`` cut into panels of
    :data:`PANEL` output columns, ``(ceil(out / PANEL), in, PANEL)``, contiguous, the last panel
    padded with zero columns; and the bias zero-padded likewise to ``(ceil(out / PANEL) * PANEL,)``,
    or ``None``. The same memory as the weight (plus the padding)."""
    (out, width), n_panels = weight.shape, -(-weight.size(0) // PANEL)
    padded = weight.new_zeros(n_panels * PANEL, width)
    padded[:out] = weight
    panels = padded.view(n_panels, PANEL, width).transpose(1, 2).contiguous()
    if bias is None:
        return panels, None
    padded_bias = bias.new_zeros(padded.size(0))
    padded_bias[:out] = bias
    return panels, padded_bias


# The activations the C code applies to a product's sums (its ACT_* codes), by encdec's names.
ACTIVATIONS = {"relu": 1, "swish": 2, "gelu": 3}


def linear(x: Tensor, panels: Tensor, panel_bias: Tensor | None, out_features: int,
           activation: str | None = None) -> Tensor | None:
    """``x W^T + b`` from :func:`column_panels`' layout: ``(rows, in)`` -> ``(rows, out_features)``,
    passed through ``activation`` (a name in :data:`ACTIVATIONS`) if given.

    ``x``: float32, last dimension contiguous, any number of rows; no gradients flow through the
    product. Returns ``None`` where the kernel is not loaded, or for other dtypes and layouts (the
    caller multiplies with PyTorch).
    """
    if _linear_kernel is None or x.dim() != 2 or x.stride(1) != 1 or x.dtype != _FLOAT32:
        return None
    y = torch.empty(x.size(0), out_features)
    _linear_kernel(x.data_ptr(), x.stride(0), x.size(0), panels.data_ptr(), panels.size(0), panels.size(1),
                   None if panel_bias is None else panel_bias.data_ptr(), y.data_ptr(), out_features,
                   ACTIVATIONS[activation] if activation else 0, torch.get_num_threads())
    return y


class _LayerWeights(ctypes.Structure):
    """encdec/_decoder_layer.c's DecoderLayer."""
    _fields_ = [("d_model", _long), ("heads", _long), ("head_dim", _long), ("ff", _long), ("pre_norm", _long),
                ("activation", _long), ("eps", ctypes.c_double), ("panels", _ptr * 6), ("bias", _ptr * 6),
                ("norm_weight", _ptr * 3), ("norm_bias", _ptr * 3)]


class DecoderLayerStep:
    """A whole decoder layer's decoding step in one C call (``encdec_decoder_layer_step``): what
    :meth:`encdec.layers.DecoderLayer.step` computes with a dozen matrix products, attentions, norms
    and views, each its own call and dispatch otherwise.

    Args:
        products: the ``(panels, panel_bias)`` (:func:`column_panels`) of the layer's six products in
            order: self-attention ``W_QKV`` (``3 d_model`` outputs) and ``W_O``, encoder-decoder
            attention ``W_Q`` and ``W_O``, feed-forward ``W_1`` (``ff``) and ``W_2``.
        norms: the three sub-layers' layer-norm ``(weight, bias)``, each ``(d_model,)``.
        heads: attention heads; ``activation``: a name in :data:`ACTIVATIONS`; ``pre_norm``, ``eps``: the
            layers' norm placement and epsilon.
        max_rows: the most rows a step takes here (more: :meth:`__call__` returns ``None``).
    The tensors are kept (the C side holds their addresses) and must not change shape or move.
    """

    def __init__(self, products: list[tuple[Tensor, Tensor | None]], norms: list[tuple[Tensor, Tensor]], heads: int,
                 activation: str, pre_norm: bool, eps: float, max_rows: int) -> None:
        d_model, ff = products[0][0].size(1), products[5][0].size(1)
        widths = (3 * d_model, d_model, d_model, d_model, ff, d_model)
        for (panels, bias), width, inputs in zip(products, widths, (d_model,) * 5 + (ff,)):
            if (panels.dtype != _FLOAT32 or not panels.is_contiguous()
                    or panels.shape != (-(-width // PANEL), inputs, PANEL)):
                raise ValueError(f"decoder layer products: panels of shape {tuple(panels.shape)}, "
                                 f"expected ({-(-width // PANEL)}, {inputs}, {PANEL}) float32")
        if d_model % heads or activation not in ACTIVATIONS:
            raise ValueError(f"decoder layer: {heads} heads for d_model {d_model}, activation {activation!r}")
        norms = [(weight.contiguous(), bias.contiguous()) for weight, bias in norms]
        self._tensors = [t for pair in products + norms for t in pair if t is not None]  # what the C side reads
        self.d_model, self.heads, self.head_dim, self.max_rows = d_model, heads, d_model // heads, max_rows

        def address(t: Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        self._weights = _LayerWeights(
            d_model, heads, d_model // heads, ff, int(pre_norm), ACTIVATIONS[activation], eps,
            (_ptr * 6)(*(address(p) for p, _ in products)), (_ptr * 6)(*(address(b) for _, b in products)),
            (_ptr * 3)(*(address(w) for w, _ in norms)), (_ptr * 3)(*(address(b) for _, b in norms)))
        self._pointer = ctypes.pointer(self._weights)

    def __call__(self, x: Tensor, self_cache, cross_cache, allowed: Tensor | None) -> Tensor | None:
        """``x`` ``(rows, d_model)`` -> ``(rows, d_model)``, this position's keys and values appended to
        ``self_cache`` (an :class:`encdec.attention.KVCache`); ``cross_cache`` holds the encoder-decoder
        keys and values of ``rows / groups`` sentences, ``allowed`` ``(sentences, src_len)`` bool or
        ``None``. ``None`` (nothing changed) where the kernel does not apply: not loaded, another
        dtype or layout, more than ``max_rows`` rows, an empty encoder-decoder cache."""
        rows = x.size(0)
        if (_layer_kernel is None or x.dtype != _FLOAT32 or x.dim() != 2 or not x.is_contiguous()
                or rows > self.max_rows or x.requires_grad or cross_cache.k is None or x.size(1) != self.d_model):
            return None
        ck, cv = cross_cache.buffers()
        cross_strides, src_len = ck.stride(), len(cross_cache)
        if cross_strides[3] != 1 or cv.stride() != cross_strides or rows % ck.size(1) or ck.dtype != _FLOAT32:
            return None
        mask_pointer, mask_stride = None, 0
        if allowed is not None:
            if allowed.dtype != torch.bool or allowed.stride(1) != 1 or allowed.shape != (ck.size(1), src_len):
                return None
            mask_pointer, mask_stride = allowed.data_ptr(), allowed.stride(0)
        k, v = self_cache.reserve_position(x, self.heads, self.head_dim)  # all checked: room for one more
        self_strides = k.stride()
        if k.size(1) != rows or self_strides[3] != 1 or v.stride() != self_strides or k.dtype != _FLOAT32:
            return None
        y = torch.empty(rows, self.d_model)
        if _layer_kernel(self._pointer, x.data_ptr(), y.data_ptr(), rows, k.data_ptr(), v.data_ptr(), *self_strides[:3],
                         len(self_cache), ck.data_ptr(), cv.data_ptr(), *cross_strides[:3], src_len, rows // ck.size(1),
                         mask_pointer, mask_stride, torch.get_num_threads()):
            return None
        self_cache.advance()
        return y


def row_normalizers(logits: Tensor, block: int) -> tuple[Tensor, Tensor] | None:
    """Each row's log-normaliser and block maxima in one read: ``logits`` ``(rows, vocab)`` float32,
    contiguous -> ``lse`` ``(rows,)`` with ``logits - lse[:, None]`` the log-softmax (NaN for a row of
    -inf), and ``(rows, vocab // block)`` maxima of consecutive blocks of ``block`` values (the
    last ``vocab % block`` in none). ``None`` where the kernel does not apply (not loaded, another
    dtype, device or layout)."""
    if (_normalizers_kernel is None or logits.dtype != _FLOAT32 or logits.dim() != 2 or not logits.is_contiguous()
            or logits.device.type != "cpu" or logits.requires_grad or block < 1):
        return None
    rows, vocab = logits.shape
    lse, block_max = torch.empty(rows), torch.empty(rows, vocab // block)
    _normalizers_kernel(logits.data_ptr(), rows, vocab, block, lse.data_ptr(), block_max.data_ptr(),
                        torch.get_num_threads())
    return lse, block_max
