"""Decoding: greedy and beam search, batched, on the key/value cache.

Both encode the source once, then extend every hypothesis one token per step with
:meth:`Transformer.decode_step` on a :class:`DecoderCache`. Sentences (and beams) that
have finished are dropped from the batch so later steps only pay for live ones.

Either search also takes a list of models trained on the same vocabularies: an ensemble,
whose next-token distribution is the average of the models' (each model keeps its own cache).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import decode_kernels
from .attention import padding_mask
from .model import DecoderCache, Transformer


@dataclass
class Hypothesis:
    """One output: token ids (no start or end token) and its length-normalised log-probability."""

    tokens: list[int]
    score: float


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ``((5 + length) / 6) ** alpha`` (Wu et al. 2016); ``alpha=0`` turns it off."""
    return ((5.0 + length) / 6.0) ** alpha


Models = Transformer | Sequence[Transformer]  # one model, or an ensemble


def ensemble_members(models: Models) -> list[Transformer]:
    """``models`` as a list, checked to agree on everything decoding shares: the vocabulary sizes and
    the pad, end and start ids (their tokenizers must be the same too: the caller's to check)."""
    members = [models] if isinstance(models, Transformer) else list(models)
    if not members:
        raise ValueError("an ensemble needs at least one model")
    first = members[0].cfg
    for n, model in enumerate(members[1:], 2):
        for name in ("src_vocab_size", "tgt_vocab_size", "pad_id", "eos_id", "decoder_start_id"):
            if getattr(model.cfg, name) != getattr(first, name):
                raise ValueError(f"ensemble: model {n} has {name}={getattr(model.cfg, name)} but model 1 has "
                                 f"{getattr(first, name)}; ensemble only models trained on the same vocabularies")
    return members


def max_steps(src: Tensor, models: Models, max_len_ratio: float, max_len_extra: int) -> Tensor:
    """Per sentence, the most target tokens (end token included) to generate: ``(batch,)``.

    ``ratio * source length + extra``, capped by the (smallest) model ``max_len``.
    """
    members = ensemble_members(models)
    src_len = (src != members[0].cfg.pad_id).sum(1)
    steps = (src_len.float() * max_len_ratio).ceil().long() + max_len_extra
    return steps.clamp(1, min(m.cfg.max_len for m in members) - 1)


class _Step:
    """The source mask and caches of the live rows, and one decoding step.

    The encoder-decoder keys and values are computed from the encoder output once
    per sentence and kept once per sentence, shared by its ``repeat`` beams (the
    decoder rows ``i * repeat`` to ``(i + 1) * repeat - 1``); the source mask is per
    sentence too, and the encoder output itself is not read again. An ensemble's
    models each keep their own cache, reordered together.
    """

    def __init__(self, models: list[Transformer], src: Tensor, steps: int) -> None:
        """``models``: the :func:`ensemble_members` (one or more)."""
        self.models = models
        self.src_mask = padding_mask(src, self.models[0].cfg.pad_id)
        self.caches: list[DecoderCache] = []
        for model in self.models:
            cache = model.new_cache(capacity=steps)
            cache.fill_cross_attention(model.decoder, model.encode(src, self.src_mask))
            self.caches.append(cache)
        if bool(self.src_mask.all()):  # no padding (always at batch 1): attention needs no mask,
            self.src_mask = None  # and without one it does less each step

    def logits(self, last: Tensor) -> Tensor:
        """Next-token scores ``(rows, tgt_vocab)`` given each row's last token ``(rows,)``: one model's
        logits; for an ensemble, the log of the models' average probabilities (already normalised)."""
        scores = [model.project(model.decode_step(last, cache, self.src_mask)).float()
                  for model, cache in zip(self.models, self.caches)]
        if len(scores) == 1:
            return scores[0]
        log_probs = torch.stack([torch.log_softmax(s, 1, out=s) for s in scores])
        return torch.logsumexp(log_probs, 0) - math.log(len(scores))

    def keep(self, rows: Tensor, sentences: Tensor | None = None, shared: Tensor | None = None) -> None:
        """Keep (reorder, repeat) hypothesis rows ``rows``; ``sentences``: the live sentences that
        stay, where some have finished (``None``: all stay, rows only move among their beams);
        ``shared``: see :meth:`KVCache.reorder`."""
        for cache in self.caches:
            cache.reorder_self_attention(rows, shared)
        if sentences is not None:
            if self.src_mask is not None:
                self.src_mask = self.src_mask.index_select(0, sentences)
            for cache in self.caches:
                cache.reorder_cross_attention(sentences)


def most_probable(logits: Tensor) -> Tensor:
    """Each row's highest-scoring token, the first where several tie: ``(rows, vocab)`` -> ``(rows,)``.

    On a CPU this is NumPy's ``argmax`` on the same memory: torch 2.13's CPU argmax reduction took
    ~10x longer (2 threads: (32, 8000) 338 against 31 us, (32, 32000) ~1.3 ms against ~0.13,
    (160, 8000) 1.7 against 0.15 ms), a few per cent of a batch-32 greedy step.
    """
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return logits.argmax(-1)
    return torch.from_numpy(logits.numpy().argmax(-1))


def best_continuations(logits: Tensor, scores: Tensor, m: int, at_limit: Tensor,
                       eos_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``m`` best one-token continuations of each sentence's beams.

    Args:
        logits: next-token logits of every beam, ``(sentences * beams, vocab)``; overwritten
            (with their log-softmax, or only where ``at_limit``).
        scores: the beams' log-probabilities so far, ``(sentences, beams)``.
        at_limit: ``(sentences * beams,)`` bool: beams that may only end now (length limit).
    Returns:
        scores, beam and token of the best continuations, each ``(sentences, m')`` with
        ``m' = min(m, beams * vocab)``, best first (among equal scores, in any order).

    A continuation's score is the beam's plus the token's log-probability. Large steps rank
    blocks first: each beam's row is cut into blocks of :data:`RANK_BLOCK` consecutive tokens, and
    a block's best log-probability plus its beam's score bounds every continuation in it. The
    sentence's ``m`` best continuations lie in its ``m`` blocks with the best bounds (any other
    block's continuations are at most the ``m``-th best bound, and each chosen block holds a
    continuation equal to its bound), so only those ``m * RANK_BLOCK`` continuations (and the
    tokens past the last whole block) are ranked. That is one pass over the log-probabilities
    (block maxima of consecutive tokens) and two small ``topk``: torch 2.13's CPU ``topk`` reads
    each element several times more slowly than a maximum does. Small beam-5 batch-32 decoding on
    the AVX512 EPYC, in-process A/B of whole searches: +5 % tokens/s (+4 % base) against ranking
    each beam's best ``m`` tokens (by column maxima) and then the sentence's ``beams * m``.

    Where encdec's C kernels are built, one read of the logits gives each row's log-normaliser and
    block maxima (:func:`encdec.decode_kernels.row_normalizers`), and the normaliser goes into the
    beam's score: no log-probability is written ((160, 8000), 2 threads, AVX2 EPYC: 0.39 ms against
    1.02 for the in-place log-softmax and the block maxima). Otherwise the log-softmax is written over
    the logits in place: one pass that allocates nothing, where a separate log-normaliser
    (``logsumexp``) made temporaries of the logits' size, and was slower ((160, 8000), 2 threads: 0.67
    against 1.28 ms in 16-row chunks; (160, 32000) 3.8 against 4.9).
    """
    n, beams = scores.shape
    (rows, vocab), device = logits.shape, logits.device
    blocks = vocab // RANK_BLOCK
    small = device.type != "cpu" or rows * vocab < 2 ** 17 or blocks < m
    normalizers = None if small else decode_kernels.row_normalizers(logits, RANK_BLOCK)
    if normalizers is None:
        log_probs, block_max = torch.log_softmax(logits, 1, out=logits), None
        row_scores = scores.reshape(-1)
    else:  # the log-normalisers moved into the scores: log_probs + score = logit + (score - lse)
        log_probs, (lse, block_max) = logits, normalizers
        row_scores = scores.reshape(-1) - lse
    if at_limit.any():  # only the end token: the rest -inf
        forced = log_probs[at_limit, eos_id]
        log_probs[at_limit] = float("-inf")
        log_probs[at_limit, eos_id] = forced
        if block_max is not None:
            block_max[at_limit] = float("-inf")
            if eos_id < blocks * RANK_BLOCK:
                block_max[at_limit, eos_id // RANK_BLOCK] = forced
    if small:  # rank them all
        total = (log_probs + row_scores[:, None]).view(n, beams * vocab)
        top_scores, index = total.topk(min(m, beams * vocab), dim=1)
        return top_scores, index // vocab, index % vocab
    whole = blocks * RANK_BLOCK
    if block_max is None:
        block_max = log_probs[:, :whole].view(rows, blocks, RANK_BLOCK).amax(2)
    bound = block_max.add_(row_scores[:, None])
    chosen = bound.view(n, beams * blocks).topk(m, dim=1, sorted=False).indices  # beam * blocks + block
    first = (chosen // blocks) * vocab + (chosen % blocks) * RANK_BLOCK  # in the sentence's beams x vocab
    index = (first[:, :, None] + torch.arange(RANK_BLOCK, device=device)).view(n, m * RANK_BLOCK)
    if whole < vocab:  # each beam's last tokens, in no block: always ranked
        tail = torch.arange(beams, device=device)[:, None] * vocab + torch.arange(whole, vocab, device=device)
        index = torch.cat([index, tail.view(1, -1).expand(n, -1)], 1)
    beam_scores = row_scores.view(n, beams).gather(1, index // vocab)
    candidates = log_probs.view(n, beams * vocab).gather(1, index).add_(beam_scores)
    top_scores, best = candidates.topk(m, dim=1)
    index = index.gather(1, best)
    return top_scores, index // vocab, index % vocab


# Tokens per block when ranking a large step's continuations (best_continuations): the block
# maxima are a fast reduction over 32 consecutive values; 16 and 64 were slower ((160, 8000)
# log-probabilities, 30 steps: 31, 18 and 20 ms; (160, 32000): 143, 58 and 57).
RANK_BLOCK = 32


def stay_in_place(parent: Tensor) -> Tensor:
    """A column order for each sentence's surviving beams that keeps beams in their parents' slots.

    ``parent`` ``(sentences, beams)``: the beam each survivor continues, best survivor first.
    Returns ``order`` ``(sentences, beams)``: survivor ``order[i, s]`` goes to slot ``s``. The best
    survivor continuing beam ``b`` gets slot ``b``; the others fill the free slots in rank order.
    The slots' order means nothing to the search, but a survivor in its parent's slot needs no
    copy of its cached keys and values (:meth:`KVCache.reorder`).

    Written in Python over the ids: the same thing as tensor ops took ~15 small ops, 35-40 us a
    call at any size (and ~75 us inside a beam-5 batch-1 search), against 5 us here for one
    sentence and 58 for 32.
    """
    orders = []
    for parents in parent.tolist():
        k = len(parents)
        slot, taken = [-1] * k, [False] * k
        for survivor, p in enumerate(parents):
            if not taken[p]:  # the best survivor continuing beam p
                taken[p], slot[survivor] = True, p
        free = iter([b for b in range(k) if not taken[b]])
        order = [0] * k
        for survivor in range(k):
            order[slot[survivor] if slot[survivor] >= 0 else next(free)] = survivor
        orders.append(order)
    return torch.tensor(orders, dtype=torch.long, device=parent.device).view(parent.shape)


def settled(finished: list[Hypothesis], n_best: int, best_live: float, t: int, limit: int, alpha: float) -> bool:
    """Whether a sentence's ``n_best`` finished hypotheses are final after step ``t``: no live beam
    (the best of them has log-probability ``best_live``) can end with a better score.

    A hypothesis' log-probability only falls as it grows, and it ends at a length from ``t + 1``
    to ``limit``; the length penalty is monotonic in the length for any ``alpha``, so the best
    score it can reach is ``best_live`` divided by the penalty at one of those two ends. This is
    an exact test, not a heuristic: stopping here returns what running to ``beam_size`` finished
    hypotheses returns (for ``alpha=0``, usually as soon as the best beam has ended).
    """
    if len(finished) < n_best:
        return False
    nth = sorted((h.score for h in finished), reverse=True)[n_best - 1]
    bound = max(best_live / length_penalty(t + 1, alpha), best_live / length_penalty(max(limit, t + 1), alpha))
    return nth >= bound


@torch.inference_mode()
def greedy_search(model: Models, src: Tensor, max_len_ratio: float = 2.0,
                  max_len_extra: int = 10) -> list[list[int]]:
    """The most probable next token at each step. ``src`` ``(batch, src_len)`` -> token ids per sentence.

    ``model``: one :class:`Transformer` or a list of them (an ensemble, :func:`ensemble_members`).
    """
    models = ensemble_members(model)
    if src.size(0) == 0:
        return []
    cfg = models[0].cfg
    limit = max_steps(src, models, max_len_ratio, max_len_extra)
    steps = int(limit.max())
    step = _Step(models, src, steps=steps)
    device = src.device
    # The bookkeeping is NumPy's on the host: a few small ops a step, each ~1 us there against 4-15
    # as tensor ops (paired whole searches, small model: batch 1 +6.3 %, 7 of 10; batch 32 +2.5 %).
    limit = limit.cpu().numpy()
    alive = np.arange(src.size(0))  # which sentence each live row is
    last = torch.full((src.size(0),), cfg.decoder_start_id, dtype=torch.long, device=device)
    out = np.full((src.size(0), steps), -1, dtype=np.int64)  # -1: nothing (ended)
    for t in range(1, steps + 1):
        last = most_probable(step.logits(last))  # the argmax of the logits is that of the probabilities
        ids = last.cpu().numpy()
        # The length limit counts the end token, as in beam search.
        done = (ids == cfg.eos_id) | (limit[alive] <= t)
        out[alive, t - 1] = np.where(done, -1, ids)
        if done.all():
            break
        if done.any():
            kept = np.flatnonzero(~done)
            rows = torch.from_numpy(kept).to(device)
            step.keep(rows, sentences=rows)
            alive, last = alive[kept], last[rows]
    return [row[: row.index(-1)] if -1 in row else row for row in out.tolist()]


@torch.inference_mode()
def beam_search(model: Models, src: Tensor, beam_size: int = 5, alpha: float = 1.0,
                max_len_ratio: float = 2.0, max_len_extra: int = 10, n_best: int = 1) -> list[list[Hypothesis]]:
    """Beam search with GNMT length penalty ``alpha``, batched over sentences and beams.

    Each step scores ``beam_size * vocab`` continuations per sentence and looks at the
    best ``2 * beam_size``: those ending in the end token among the top ``beam_size``
    are finished (score divided by :func:`length_penalty`), the best ``beam_size``
    others go on. A sentence is done once it has ``beam_size`` finished hypotheses,
    or at its length limit, where every live beam is ended, or as soon as no live beam can
    still reach its ``n_best`` (:func:`settled`: the same results, fewer steps).

    ``model``: one :class:`Transformer` or a list of them (an ensemble, :func:`ensemble_members`).
    Returns, per sentence, the ``n_best`` hypotheses, best first.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size={beam_size}, got {n_best}")
    models = ensemble_members(model)
    if src.size(0) == 0:
        return []
    cfg, k = models[0].cfg, beam_size
    limit = max_steps(src, models, max_len_ratio, max_len_extra)
    limits = limit.tolist()  # read per sentence and step: once, not as tensor elements
    step = _Step(models, src, steps=int(limit.max()))
    batch, device = src.size(0), src.device
    alive = torch.arange(batch, device=device)
    # All beams would start identical: the first step runs one row per sentence, and its k best
    # continuations become the k beams (the first step costs a k-th; the same results).
    tokens = torch.full((batch, 1), cfg.decoder_start_id, dtype=torch.long, device=device)
    scores = torch.zeros(batch, 1, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    for t in range(1, int(limit.max()) + 1):
        n, beams = scores.shape
        at_limit = (limit[alive] <= t).repeat_interleave(beams)
        top_scores, top_beam, top_token = best_continuations(step.logits(tokens[:, -1]), scores, 2 * k,
                                                             at_limit, cfg.eos_id)
        is_eos = top_token == cfg.eos_id
        penalty = length_penalty(t, alpha)
        for i, j in (is_eos[:, :k] & top_scores[:, :k].isfinite()).nonzero().tolist():
            sentence = int(alive[i])
            if len(finished[sentence]) < k:
                row = i * beams + int(top_beam[i, j])
                finished[sentence].append(Hypothesis(tokens[row, 1:].tolist(), float(top_scores[i, j]) / penalty))
        # The best k candidates that do not end go on, for the sentences not yet done.
        go_scores, go_rank = top_scores.masked_fill(is_eos, float("-inf")).topk(min(k, top_scores.size(1)), dim=1)
        order = stay_in_place(top_beam.gather(1, go_rank))
        go_scores, go_rank = go_scores.gather(1, order), go_rank.gather(1, order)
        rows = torch.arange(n, device=device)[:, None] * beams + top_beam.gather(1, go_rank)
        next_token = top_token.gather(1, go_rank)
        best_live = go_scores.max(1).values.tolist()
        done = torch.tensor([len(finished[s]) >= k or settled(finished[s], n_best, best_live[i], t, limits[s], alpha)
                             for i, s in enumerate(alive.tolist())], device=device) | (limit[alive] <= t)
        if done.all():
            break
        keep = (~done).nonzero().squeeze(1)
        rows = rows[keep].view(-1)
        shared = None
        if rows.numel() == tokens.size(0):
            # Row j's new hypothesis continues old row rows[j]. Up to their first differing token the
            # two hold the same cached keys and values (position p's depend on tokens 0..p only), so
            # the cache copies only the positions from there on. (Where nothing differs, argmax
            # gives 0: everything is copied.)
            shared = (tokens != tokens[rows]).int().argmax(1)
        tokens = torch.cat([tokens[rows], next_token[keep].view(-1, 1)], dim=1)
        scores, alive = go_scores[keep], alive[keep]
        step.keep(rows, sentences=None if len(keep) == n else keep, shared=shared)
    return [sorted(h, key=lambda h: -h.score)[:n_best] for h in finished]
