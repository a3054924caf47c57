"""Multi-head attention, the masks it takes, and the key/value cache for decoding.

Mask convention everywhere: a boolean tensor broadcastable to
``(batch, heads, query_len, key_len)`` where ``True`` means "may attend".
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import decode_kernels, mkl
from .linear import Linear, linear


def padding_mask(tokens: Tensor, pad_id: int) -> Tensor:
    """Keys that are real tokens: ``(batch, len)`` ids -> ``(batch, 1, 1, len)`` bool."""
    return (tokens != pad_id)[:, None, None, :]


def subsequent_mask(size: int, past: int = 0, device: torch.device | None = None) -> Tensor:
    """Causal (look-ahead) mask: query ``i`` sees keys ``<= past + i``.

    Returns ``(1, 1, size, past + size)`` bool; ``past`` is the number of cached
    positions before the ``size`` new queries (0 for full-sequence decoding).
    """
    ones = torch.ones(size, past + size, dtype=torch.bool, device=device)
    return ones.tril(past)[None, None]


class PackedLayout(NamedTuple):
    """Where each sentence's real positions lie once padding is dropped (:func:`packed_layout`)."""
    index: Tensor  # (rows,): each real position's index in the flattened (batch * len) layout
    offsets: Tensor  # (batch,): the first row of each sentence
    lengths: Tensor  # (batch,): its real positions


def packed_layout(mask: Tensor) -> PackedLayout | None:
    """The layout of a padding mask ``(batch, 1, 1, len)``'s real positions packed row after row, for
    sentences whose padding all comes after their tokens; ``None`` where there is no padding (nothing
    to drop) or it sits elsewhere."""
    allowed = mask[:, 0, 0]
    if bool(allowed.all()):
        return None
    lengths = allowed.sum(1)
    if not torch.equal(allowed, torch.arange(allowed.size(1), device=mask.device) < lengths[:, None]):
        return None
    return PackedLayout(allowed.reshape(-1).nonzero().squeeze(1), lengths.cumsum(0) - lengths, lengths)


class KVCache:
    """Keys and values of one attention sub-layer, kept between decoding steps.

    Self-attention grows by one step at a time (:meth:`append`); encoder-decoder
    attention fills it once per source sentence and then only reads it. :attr:`k` and
    :attr:`v` are ``(batch, heads, len, head_dim)``. With a ``capacity`` the buffers are
    allocated once and written in place, so a step costs no copy of the past.

    The buffers are position-major, ``(capacity, batch, heads, head_dim)``, so the filled
    positions are one contiguous block and :attr:`k` is a permuted view of it. A decoding
    step reads every layer's cache from memory (a beam-5 batch outgrows the caches), and
    batched matrix products read one block ~2x faster than ``(batch, heads, capacity,
    head_dim)`` buffers, whose filled parts have gaps: 2 threads, 160 rows x 4 heads x 25 of 50
    positions, from memory, ``Q K^T`` 302 against 490 us and ``weights V`` 202 against 425.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.length = 0
        self._k: Tensor | None = None  # (buffer positions, batch, heads, head_dim)
        self._v: Tensor | None = None
        self._spare: tuple[Tensor, Tensor] | None = None  # reorder()'s second buffers, flat
        self._views: tuple[Tensor, Tensor] | None = None  # k and v, until append() or reorder()

    def __len__(self) -> int:
        return self.length

    def _filled(self) -> tuple[Tensor, Tensor] | None:
        # Encoder-decoder attention reads the same views at every step: made once, not per read.
        if self._views is None and self._k is not None:
            self._views = (self._k[: self.length].permute(1, 2, 0, 3), self._v[: self.length].permute(1, 2, 0, 3))
        return self._views

    @property
    def k(self) -> Tensor | None:
        views = self._filled()
        return None if views is None else views[0]

    @property
    def v(self) -> Tensor | None:
        views = self._filled()
        return None if views is None else views[1]

    def buffers(self) -> tuple[Tensor, Tensor]:
        """The key and value buffers, position-major ``(capacity, batch, heads, head_dim)``; the first
        ``len(self)`` positions are filled. Empty caches have none: fill them first."""
        if self._k is None:
            raise ValueError("the cache is empty: it has no buffers yet")
        return self._k, self._v

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``(batch, heads, new, head_dim)`` keys and values; returns all of them so far."""
        end = self.length + k.size(2)
        self._make_room(end, k.size(0), k.size(1), k.size(3), k)
        self._k[self.length : end] = k.permute(2, 0, 1, 3)
        self._v[self.length : end] = v.permute(2, 0, 1, 3)
        self.length, self._views = end, None
        return self._filled()

    def _make_room(self, end: int, batch: int, heads: int, head_dim: int, like: Tensor) -> None:
        """Buffers for positions up to ``end``, holding what is filled so far; new ones get
        ``like``'s dtype and device."""
        if self._k is None or end > self._k.size(0):
            size = max(end, self.capacity, 2 * self.length)
            grown_k = like.new_empty(size, batch, heads, head_dim)
            grown_v = like.new_empty(grown_k.shape)
            if self.length:
                grown_k[: self.length] = self._k[: self.length]
                grown_v[: self.length] = self._v[: self.length]
            self._k, self._v = grown_k, grown_v

    def reserve_position(self, x: Tensor, heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
        """The buffers (:meth:`buffers`), with room for position ``len(self)``, for a kernel that writes
        a step's keys and values there itself (then :meth:`advance`). ``x``: the step's ``(batch,
        d_model)`` states, whose dtype and device new buffers get."""
        self._make_room(self.length + 1, x.size(0), heads, head_dim, x)
        return self._k, self._v

    def advance(self) -> None:
        """Count the position a kernel wrote at ``len(self)`` (see :meth:`reserve_position`)."""
        self.length, self._views = self.length + 1, None

    def append_position(self, k: Tensor, v: Tensor) -> None:
        """Add one position's ``(batch, heads, head_dim)`` keys and values (one decoding step; any
        strides). With room left in the preallocated buffers this is one copy each, straight into
        them; :attr:`k` / :attr:`v` (or :meth:`buffers`) read them back.
        """
        if self._k is None or self.length >= self._k.size(0):
            self.append(k.unsqueeze(2), v.unsqueeze(2))
            return
        self._k[self.length] = k
        self._v[self.length] = v
        self.length, self._views = self.length + 1, None

    def reorder(self, index: Tensor, shared: Tensor | None = None) -> None:
        """Keep batch rows ``index`` (beam search reordering and pruning).

        ``shared`` ``(rows,)``, optional, where the row count stays: for each row, how many leading
        positions already hold what row ``index[row]`` holds there (the two hypotheses share those
        tokens, so their keys and values are the same); only the later positions are copied.
        """
        self.apply_reorder(index, self.plan_reorder(index, shared))

    def plan_reorder(self, index: Tensor, shared: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """What :meth:`reorder` copies where few positions of a preallocated cache change: the
        ``(to, source)`` slices of the buffer seen as ``(length * rows, heads * head_dim)``; ``None``
        where a gather of every row is cheaper. Caches of the same length and rows (a decoder's
        layers) share one plan (:meth:`DecoderCache.reorder_self_attention`)."""
        if self._k is None or not self.capacity or self._k.requires_grad or index.numel() != self._k.size(1):
            return None
        # The same rows, reordered (beams moving among their sentence's slots): where most rows stay
        # put (beam search keeps a beam's continuation in its slot where it can) and the moved ones
        # share most of their prefix with the beam they replace, copying only the slices that
        # differ reads and writes less than a full gather.
        rows = index.numel()
        moved = (index != torch.arange(rows, device=index.device)).nonzero().squeeze(1)
        positions = torch.arange(self.length, device=index.device)[:, None]
        to, source = positions * rows + moved, positions * rows + index[moved]  # (positions, moved)
        if shared is None:
            to, source = to.view(-1), source.view(-1)
        else:
            differ = positions >= shared[moved]
            to, source = to[differ], source[differ]
        # A slice copied is read and written twice (gathered, then put back); a full gather once.
        return (to, source) if 2 * to.numel() <= rows * self.length else None

    def apply_reorder(self, index: Tensor, plan: tuple[Tensor, Tensor] | None) -> None:
        """:meth:`reorder` with the slices :meth:`plan_reorder` chose (``None``: gather every row)."""
        if self._k is None:
            return
        self._views = None
        if not self.capacity or self._k.requires_grad:  # (out= copies cannot be differentiated)
            self._k, self._v = self._k.index_select(1, index), self._v.index_select(1, index)
            return
        rows, filled_k, filled_v = index.numel(), self._k[: self.length], self._v[: self.length]
        if plan is not None:
            if plan[0].numel():
                # Each position's row is one contiguous (heads * head_dim) slice: seen as rows of a
                # 2-D buffer, the slices are gathered and written back by dimension-0 index_select /
                # index_copy_, which copy whole slices (in-place indexing copied them element by
                # element: 2 threads, 65 of 160 rows x 20 positions x 3 layers' keys and values,
                # 513 against 894 us).
                to, source = plan
                for filled in (filled_k, filled_v):
                    slices = filled.view(self.length * rows, -1)
                    slices.index_copy_(0, to, slices.index_select(0, source))
            return
        # Preallocated: copy only the filled positions, into a second buffer that then swaps with
        # the first, so beam search's per-step reordering allocates nothing. The buffers are kept
        # flat and viewed at the current row count, so the filled block stays contiguous.
        shape = (self._k.size(0), rows, *self._k.shape[2:])
        needed = math.prod(shape)
        if self._spare is None or self._spare[0].numel() < needed:
            self._spare = (self._k.new_empty(needed), self._v.new_empty(needed))
        new_k, new_v = (flat[:needed].view(shape) for flat in self._spare)
        torch.index_select(filled_k, 1, index, out=new_k[: self.length])
        torch.index_select(filled_v, 1, index, out=new_v[: self.length])
        self._spare = (self._k.view(-1), self._v.view(-1))
        self._k, self._v = new_k, new_v


def fold_groups(q: Tensor, groups: int) -> Tensor:
    """``(sentences * groups, heads, len, head_dim)`` queries -> ``(sentences, heads, groups * len, head_dim)``.

    The ``groups`` beams of a sentence attend to the same encoder keys and values, so they can
    be one sentence's queries: one matrix product per sentence and head, and the keys and values
    are neither repeated per beam nor re-read for each. ``groups == 1`` returns ``q`` as it is.
    """
    if groups == 1:
        return q
    n, heads, length, dim = q.shape
    return q.view(n // groups, groups, heads, length, dim).transpose(1, 2).reshape(
        n // groups, heads, groups * length, dim)


def beams_per_sentence(rows: int, sentences: int) -> int:
    """How many consecutive query rows share each cached sentence's encoder keys and values."""
    groups, rest = divmod(rows, sentences)
    if rest:
        raise ValueError(f"{rows} query rows for {sentences} cached sentences: not a whole number of beams each")
    return groups


def unfold_groups(x: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`fold_groups` (also for attention weights, whose last dimension is the keys')."""
    if groups == 1:
        return x
    n, heads, rows, last = x.shape
    return x.view(n, heads, groups, rows // groups, last).transpose(1, 2).reshape(
        n * groups, heads, rows // groups, last)


def scaled_dot_product(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float = 0.0
                       ) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T / sqrt(d_k)) V written out: ``(out, weights)``.

    ``q`` ``(batch, heads, q_len, d_k)``, ``k``/``v`` ``(batch, heads, k_len, d_k)``;
    ``out`` ``(batch, heads, q_len, d_k)``, ``weights`` ``(batch, heads, q_len, k_len)``
    (before dropout).
    """
    # Scaled in place (autograd keeps q and k, not the product), masked in one call: a decoding
    # step makes this call 2 x layers times, where each op costs microseconds whatever its size.
    if _keys_first(q):
        scores = torch.matmul(k, q.transpose(-2, -1)).transpose(-2, -1)
    else:
        scores = torch.matmul(q, k.transpose(-2, -1))
    scores = scores.div_(math.sqrt(q.size(-1)))
    if mask is not None:
        scores = torch.where(mask, scores, float("-inf"))
    weights = scores.softmax(dim=-1)
    return torch.matmul(F.dropout(weights, dropout) if dropout > 0 else weights, v), weights


# Decoding's scores for up to this many queries per (row, head) are computed as (K Q^T)^T where MKL
# runs its AVX512 code (encdec.mkl): its batched product of a few queries by the transposed keys was
# ~2x slower there than on its AVX2 path (MKL_VERBOSE, small model beam 5 batch 32: 27.8 against 12.9 ms
# a search), keys by transposed queries is not. Same tokens; whole searches, paired, beam 5 batch 32:
# small +3.6 % (4 of 5), base +6.4 % (5 of 5), greedy even; on MKL's AVX2 path it would cost 16 %.
KEYS_FIRST_UP_TO = 8


def _keys_first(q: Tensor) -> bool:
    """Whether :func:`scaled_dot_product` multiplies keys by queries (see :data:`KEYS_FIRST_UP_TO`)."""
    return (q.size(-2) <= KEYS_FIRST_UP_TO and not q.requires_grad and q.device.type == "cpu"
            and q.dtype == torch.float32 and mkl.enabled())


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float) -> Tensor:
    """``F.scaled_dot_product_attention``, or on a CPU the product written out where that is faster.

    torch 2.13's CPU flash kernel multiplies blocks of queries and keys through the BLAS (MKL's AVX2
    code on AMD), one (sentence, head) after another: small products for short sentences. It is
    written out:

    - in training, for keys shorter than :data:`TRAINING_WRITTEN_OUT_BELOW` (float32);
    - in bf16 training, at any length: the flash kernel's bf16 backward runs ~5x slower than its
      float32 one (9 vs 1.6 ms a call at batch 64 x 32 positions, d_model 256), and casting to
      float32 and back costs a third of the float32 kernel's time again (fwd + bwd at (512, 4, 8,
      64): written out in bf16 5.0 ms, against 10.1 for the cast flash kernel and 11.4 for bf16 flash);
    - at inference, from :data:`WRITTEN_OUT_FROM` (batch x heads) matrices (bf16 inference takes
      the flash kernel in float32).
    """
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and q.requires_grad:  # training
            written_out = q.dtype == torch.bfloat16 or k.size(-2) < TRAINING_WRITTEN_OUT_BELOW
        elif q.dtype == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout)
            return out.to(torch.bfloat16)
        else:
            written_out = q.size(0) * q.size(1) >= WRITTEN_OUT_FROM
        if written_out:
            return scaled_dot_product(q, k, v, mask, dropout)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


# Training on a CPU writes attention out below this many keys (`python benchmarks/attention_kernels.py`,
# results/attention-kernels-epyc-avx512.md: forward + backward of ~4,000 tokens, key-padding mask,
# 2 threads, AVX512 EPYC, ms written out / flash): 4 heads, 12 keys 8.6 / 12.5, 24: 7.0 / 8.9, 32:
# 8.0 / 8.0, 61: 11.5 / 12.9; 8 heads, 12: 15.9 / 25.9, 32: 15.1 / 17.3, 61: 21.9 / 25.7. From 64 keys
# the two are about even (4 heads, 64: 10.1 / 10.4), from 128 the flash kernel is faster (256: 29.3 /
# 24.1), and it does not keep the (batch, heads, queries, keys) weights for the backward as the
# written-out form does. Whole training steps of speed.py's models (sentences of 5-60 tokens), same
# batches in turn: small +2.4 % (12 of 16 rounds), base even (1.002, 6 of 10).
TRAINING_WRITTEN_OUT_BELOW = 64

# Inference on a CPU writes attention out from this many (batch x heads) matrices up: torch 2.13's
# CPU flash kernel is made for long query blocks, and a decoding step has one query per row
# (five per sentence with beams folded). 2 threads, keys of 30 positions: (32, 8, 1, 64) queries
# 135-169 us against 167-208 with the kernel, (32, 8, 5, 64) 380 against 1,030, (160, 8, 1, 64)
# 560-940 against 1,520-2,100, a whole (32, 8, 30, 64) sentence batch 1,880 against 2,640; at
# (8, 8) they are even, and below the kernel wins ((1, 4, 1, 64): 12 against 28 us).
WRITTEN_OUT_FROM = 64


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``heads`` subspaces of ``d_model``.

    ``in_proj`` holds the query, key and value projections stacked as
    ``[W_Q; W_K; W_V]`` (``(3 * d_model, d_model)``) so self-attention projects all
    three in one matrix product; encoder-decoder attention uses the first block on
    the decoder states and the other two on the encoder output. ``out_proj`` maps
    the concatenated heads back to ``d_model``.

    Set ``record_weights = True`` to keep the last attention weights in
    ``self.weights`` (``(batch, heads, query_len, key_len)``) for plots; otherwise each call takes
    the faster of ``F.scaled_dot_product_attention`` and the written-out product (``_attend``).
    """

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.d_model, self.heads, self.head_dim = d_model, heads, d_model // heads
        self.dropout = dropout
        self.in_proj = Linear(d_model, 3 * d_model)
        self.out_proj = Linear(d_model, d_model)
        self.record_weights = False
        self.weights: Tensor | None = None
        # Set by split_projections() for inference: W_Q and [W_K; W_V] as Linear layers of their own.
        self.q_proj: nn.Module | None = None
        self.kv_proj: nn.Module | None = None

    def split_projections(self) -> None:
        """For encoder-decoder attention at inference: replace ``in_proj`` by two Linear layers,
        ``q_proj`` (``W_Q``) and ``kv_proj`` (``[W_K; W_V]``), so that transforms that swap Linear
        modules (weight packing, int8 quantization) reach the blocks it uses separately."""
        d, weight, bias = self.d_model, self.in_proj.weight.detach(), self.in_proj.bias.detach()
        for name, rows in (("q_proj", slice(0, d)), ("kv_proj", slice(d, 3 * d))):
            linear = nn.Linear(d, rows.stop - rows.start, device=weight.device)
            linear.weight = nn.Parameter(weight[rows], requires_grad=False)
            linear.bias = nn.Parameter(bias[rows], requires_grad=False)
            setattr(self, name, linear)
        self.in_proj = None  # self-attention would need it: this module is encoder-decoder attention now

    def _queries(self, x: Tensor) -> Tensor:
        """Encoder-decoder attention's queries: ``x`` times the ``W_Q`` block only."""
        if self.q_proj is not None:
            return self.q_proj.forward(x)  # forward: see DecoderLayer.step
        d = self.d_model
        return linear(x, self.in_proj.weight[:d], self.in_proj.bias[:d])

    def _split_heads(self, x: Tensor) -> Tensor:
        """``(batch, len, d_model)`` -> ``(batch, heads, len, head_dim)``."""
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def project_keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``memory`` ``(batch, src_len, d_model)``, each ``(batch, heads, src_len, head_dim)``."""
        d = self.d_model
        if self.kv_proj is not None:
            kv = self.kv_proj(memory)
        else:
            kv = linear(memory, self.in_proj.weight[d:], self.in_proj.bias[d:])
        k, v = kv.split(d, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def forward(self, x: Tensor, memory: Tensor | None = None, mask: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        """Attend from ``x`` to itself (``memory=None``) or to ``memory``.

        Args:
            x: queries' source, ``(batch, tgt_len, d_model)``.
            memory: encoder output ``(batch, src_len, d_model)`` for encoder-decoder
                attention; ``None`` for self-attention.
            mask: bool, broadcastable to ``(batch, heads, tgt_len, key_len)``.
            cache: for incremental decoding. Self-attention appends this step's keys
                and values to it; encoder-decoder attention computes them from
                ``memory`` on the first call and reuses them afterwards. An
                encoder-decoder cache may hold each sentence once for ``g``
                consecutive rows of ``x`` (its beams); ``mask`` is then per sentence.
        Returns:
            ``(batch, tgt_len, d_model)``.
        """
        d, groups = self.d_model, 1
        if memory is None:
            b, t, _ = x.shape
            qkv = self.in_proj(x).view(b, t, 3, self.heads, self.head_dim)
            if (cache is None and not self.record_weights and not (self.training and self.dropout)
                    and (mask is None or mask.shape == (b, 1, 1, t))):
                # A whole source attending to itself at inference (the encoder's): each sentence's t
                # queries to its t keys in C, straight from the projection's output (one kernel
                # call, where the PyTorch ops transpose, copy, mask and multiply in ~10 calls).
                out = decode_kernels.attend_one(qkv[:, :, 0].reshape(b * t, self.heads, self.head_dim),
                                                qkv[:, :, 1].transpose(0, 1), qkv[:, :, 2].transpose(0, 1), t,
                                                None if mask is None else mask[:, 0, 0])
                if out is not None:
                    return self.out_proj(out.view(b, t, d))
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # one view for the three: (3, batch, heads, len, head_dim)
            if cache is not None:
                k, v = cache.append(k, v)
        else:
            q = self._split_heads(self._queries(x))
            if cache is None:
                k, v = self.project_keys_values(memory)
            else:
                if cache.k is None:
                    cache.append(*self.project_keys_values(memory))
                k, v = cache.k, cache.v
                # Beam search keeps each sentence's encoder keys and values once, for all its
                # beams: then the beams are folded into the query positions of their sentence.
                groups = beams_per_sentence(q.size(0), k.size(0))
                q = fold_groups(q, groups)
        dropout = self.dropout if self.training else 0.0
        if self.record_weights:
            out = self._attention_with_weights(q, k, v, mask, dropout, groups)
        else:
            out = _attend(q, k, v, mask, dropout)
        out = unfold_groups(out, groups)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))

    def packed_self_attention(self, x: Tensor, layout: PackedLayout) -> Tensor:
        """Self-attention of sentences packed without padding (inference, no gradients): ``x``
        ``(rows, d_model)``, the rows :func:`packed_layout` lays out -> ``(rows, d_model)``, through
        :func:`encdec.decode_kernels.attend_packed` (the caller checks that it applies)."""
        out = decode_kernels.attend_packed(self.in_proj(x), layout.offsets, layout.lengths, self.heads)
        if out is None:
            raise RuntimeError("packed self-attention needs encdec's C kernels, float32 on the CPU without "
                               "gradients, and a head size that is a multiple of 16")
        return self.out_proj(out)

    def self_attention_step(self, x: Tensor, cache: KVCache) -> Tensor:
        """Self-attention for one new position per row (incremental decoding, inference): ``x``
        ``(rows, d_model)`` -> ``(rows, d_model)``; its key and value are appended to ``cache``.

        What :meth:`forward` computes for a ``(rows, 1, d_model)`` input with a cache, on 2-D states
        and with fewer views; attention weights are not recorded.
        """
        rows = x.size(0)  # the Linear layers' forward is called directly: see DecoderLayer.step
        qkv = self.in_proj.forward(x).view(rows, 3, self.heads, self.head_dim)
        cache.append_position(qkv[:, 1], qkv[:, 2])
        out = decode_kernels.attend_one(qkv[:, 0], *cache.buffers(), len(cache))  # (rows, heads, head_dim)
        if out is None:  # the cache's (rows, heads, len, head_dim) views, made only here
            out = _attend(qkv[:, 0, :, None], cache.k, cache.v, None, 0.0)  # (rows, heads, 1, head_dim)
        return self.out_proj.forward(out.reshape(rows, self.d_model))

    def cross_attention_step(self, x: Tensor, cache: KVCache, mask: Tensor | None) -> Tensor:
        """Encoder-decoder attention for one new position per row (inference): ``x`` ``(rows,
        d_model)`` -> ``(rows, d_model)``, attending to the keys and values ``cache`` holds (filled
        by :meth:`project_keys_values`, once per sentence for ``rows / sentences`` consecutive
        beams; ``mask`` ``(sentences, 1, 1, src_len)`` or ``None``).
        """
        rows, k, v = x.size(0), cache.k, cache.v
        if k is None:
            raise ValueError("the encoder-decoder cache is empty: fill it first (DecoderCache.fill_cross_attention)")
        groups = beams_per_sentence(rows, k.size(0))
        q = self._queries(x).view(rows, self.heads, self.head_dim)
        out = decode_kernels.attend_one(q, *cache.buffers(), len(cache), None if mask is None else mask[:, 0, 0])
        if out is None:
            out = unfold_groups(_attend(fold_groups(q[:, :, None], groups), k, v, mask, 0.0), groups)
        return self.out_proj.forward(out.reshape(rows, self.d_model))  # forward: see DecoderLayer.step

    def _attention_with_weights(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                                dropout: float, groups: int = 1) -> Tensor:
        """:func:`scaled_dot_product`, keeping the attention weights in ``self.weights``."""
        out, weights = scaled_dot_product(q, k, v, mask, dropout)
        self.weights = unfold_groups(weights.detach(), groups)
        return out
