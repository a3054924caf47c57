"""The training loss: output projection and label-smoothed cross-entropy in one pass.

Written plainly, ``F.cross_entropy(F.linear(h, W, b), y, label_smoothing=eps)`` keeps the
``(tokens, vocab)`` logits alive for the backward pass and walks over them six or seven
times (log-softmax, its backward, the smoothing term, zero-fills, adds). On a CPU those
passes cost more than the projection's matrix product. :func:`linear_cross_entropy` gives
the same loss and the same gradients, but works on chunks of rows: per chunk, the logits
are made, turned by one softmax into the loss *and* their gradient (``softmax - target
distribution``), and multiplied back into the gradients of ``h``, ``W`` and ``b``. Nothing of
vocabulary size outlives its chunk, and the rest of the formulas below is done on vectors.

With smoothing ``eps`` over ``V`` classes, the target distribution is ``(1 - eps)`` on the
gold token plus ``eps / V`` everywhere (PyTorch's convention), so per row::

    loss = logsumexp(z) - (1 - eps) * z[y] - (eps / V) * sum(z)
    dloss/dz = softmax(z) - (1 - eps) * onehot(y) - eps / V
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .linear import product, product_tn, uses_onednn

# Rows per chunk. The chunk's products want rows (few make slow products), and since the chunk is
# walked only by the softmax and the products, its size need not fit a cache. Forward + backward
# of 3,100 tokens on the 2-core AVX512 EPYC, float32 (bf16 autocast), 128 / 256 / 512 / 1,024 rows:
# 8,000 words 113 / 110 / 106 / 117 ms (77 / 70 / 67 / 82), 32,000 words 1,355 / 983 / 997 / 967 ms
# (501 / 515 / 518 / 513); results/loss-chunks-epyc-avx512.md.
# `python benchmarks/loss_chunks.py` times every size.
CHUNK_ROWS = 512
# Below this log p[y] comes from a probability under 1e-30: too few digits left, or none (-inf).
LOG_TINY = math.log(1e-30)


def _exact_logsumexp(z: Tensor) -> Tensor:
    """``logsumexp`` of the rows of ``z`` ``(rows, vocab)``, shape ``(rows,)``, without denormals.

    exp() is clamped at e^-80: below e^-87 a float32 is denormal, and x86 CPUs slow down ~10x on
    those (``torch.logsumexp`` took 25 ms instead of 2 on 524 x 8,000 logits spread over +-120); the
    clamp moves the sum by less than vocab x e^-80.
    """
    top = z.amax(dim=-1, keepdim=True)
    return (top + (z - top).clamp_(min=-80.0).exp_().sum(dim=-1, keepdim=True).log_()).squeeze(-1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss summed over rows; the gradients are computed in the forward pass and scaled in backward.

    Per chunk the logits ``z`` make one softmax ``p`` (PyTorch's row-at-a-time kernel: each row stays
    in cache), and everything else comes from products or from ``rows`` gathered elements:

    - ``logsumexp(z) = z[y] - log p[y]`` (rows whose ``p[y]`` underflows take :func:`_exact_logsumexp`);
    - ``sum(z) = hidden @ weight.sum(0) + bias.sum()``, for the smoothing term;
    - the gradient ``p - (1 - eps) onehot(y) - eps / V``: the one-hot part is subtracted from ``p`` in
      place (``rows`` elements), the constant ``eps / V`` once at the end, from the products' results
      (``eps / V`` times ``weight.sum(0)``, ``hidden.sum(0)``, ``tokens``).

    So the ``(rows, vocab)`` chunk is walked by the softmax and the two gradient products only, not by
    the seven or eight elementwise passes the textbook formulas take.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                smoothing: float) -> Tensor:
        vocab, device, tokens = weight.size(0), hidden.device, hidden.size(0)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        want_grad = any(ctx.needs_input_grad[:3])
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        # The products run in autocast's dtype where it is on (bf16), else in the weight's; cast once.
        autocast = torch.is_autocast_enabled(device.type)
        mm_dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
        weight_mm, hidden_mm = weight.to(mm_dtype), hidden.to(mm_dtype)
        rows = max(1, min(CHUNK_ROWS, tokens))
        # One set of chunk buffers, reused: glibc's malloc maps and unmaps blocks this large each
        # time, and the page faults made the logits' copies ~18x slower (bf16 training, 1 thread).
        # (oneDNN's float32 products write fresh tensors instead.)
        onednn = uses_onednn(hidden_mm, weight_mm)
        float_dtype = torch.promote_types(weight.dtype, torch.float32)  # softmax and sums: float32 at least
        logits_buf = None if onednn else torch.empty(rows, vocab, dtype=float_dtype, device=device)
        probs_buf = torch.empty(rows, vocab, dtype=float_dtype, device=device)
        low_buf = None if mm_dtype == float_dtype else torch.empty(rows, vocab, dtype=mm_dtype, device=device)
        gold = torch.empty(tokens, dtype=float_dtype, device=device)  # z[y], per row
        log_p_gold = torch.empty(tokens, dtype=float_dtype, device=device)  # z[y] - logsumexp(z), per row
        with torch.autocast(device.type, enabled=False):
            for start in range(0, tokens, rows):
                h, y = hidden_mm[start:start + rows], target[start:start + rows]
                if onednn:
                    z = product(h, weight_mm, bias)
                else:
                    out = logits_buf[:h.size(0)] if low_buf is None else low_buf[:h.size(0)]
                    torch.mm(h, weight_mm.t(), out=out)
                    z = out if low_buf is None else logits_buf[:h.size(0)].copy_(out)
                    if bias is not None:
                        z.add_(bias)
                p = torch.ops.aten._softmax.out(z, -1, False, out=probs_buf[:h.size(0)])
                z_gold = gold[start:start + rows].copy_(z.gather(1, y[:, None]).squeeze(1))
                log_p = log_p_gold[start:start + rows].copy_(p.gather(1, y[:, None]).squeeze(1)).log_()
                lost = log_p < LOG_TINY  # p[y] underflowed: inexact or -inf, take those rows' logsumexp directly
                if lost.any():
                    log_p[lost] = z_gold[lost] - _exact_logsumexp(z[lost])
                if not want_grad:
                    continue
                p.scatter_add_(1, y[:, None], p.new_full((y.numel(), 1), smoothing - 1.0))
                if bias is not None and ctx.needs_input_grad[2]:
                    grad_bias = p.sum(0) if grad_bias is None else grad_bias.add_(p.sum(0))
                g = p if low_buf is None else low_buf[:h.size(0)].copy_(p)  # multiply back in the forward's precision
                if grad_hidden is not None:
                    if onednn or grad_hidden.dtype != g.dtype:
                        grad_hidden[start:start + rows] = product(g, weight_mm.t())
                    else:  # the BLAS writes into the rows' slice (and below adds into the sum): no temporaries
                        torch.mm(g, weight_mm, out=grad_hidden[start:start + rows])
                if ctx.needs_input_grad[1]:
                    if onednn:  # product_tn may hand back a transposed view: summed in its orientation, turned in backward
                        part = product_tn(g, h)
                        grad_weight = part if grad_weight is None else grad_weight.add_(part)
                    elif grad_weight is None:
                        grad_weight = g.t() @ h
                    else:
                        grad_weight.addmm_(g.t(), h)
        # The terms left out above (x = hidden, W = weight, b = bias, e = eps / V):
        #   loss = sum over rows of [logsumexp(z) - (1 - eps) z[y] - e sum(z)]
        #        = -sum(log p[y]) + eps * sum(z[y]) - e * (x.sum(0) . W.sum(0) + tokens * b.sum())
        #   grads: each chunk's product of (p - (1 - eps) onehot) less e times the product of ones.
        weight_sum, hidden_sum = weight.to(float_dtype).sum(0), hidden.to(float_dtype).sum(0)
        loss = -log_p_gold.sum() + smoothing * gold.sum()
        if smoothing:
            z_sum = hidden_sum @ weight_sum + (0.0 if bias is None else tokens * bias.to(float_dtype).sum())
            loss = loss - smoothing / vocab * z_sum
        e = smoothing / vocab
        if grad_hidden is not None and e:
            grad_hidden.sub_((e * weight_sum).to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.to(float_dtype)
            if e:
                grad_weight.sub_(e * hidden_sum)
        if grad_bias is not None and e:
            grad_bias.sub_(e * tokens)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss.float()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        scale = grad_output.float()
        # One pass each: scaled, cast and laid out like the parameter (the weight's gradient may be a
        # transposed view) at once.
        grads = [None if g is None else torch.mul(g, scale, out=torch.empty(g.shape, dtype=dtype, device=g.device))
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                         label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target, label_smoothing=..., reduction="sum")``,
    chunked, with its gradients made on the way.

    Args:
        hidden: ``(tokens, d_model)`` decoder states of real (non-pad) target positions.
        weight: ``(vocab, d_model)`` output projection (the tied embedding, if tied).
        bias: ``(vocab,)`` or ``None``.
        target: ``(tokens,)`` gold token ids.
    Returns:
        The summed loss, a float32 scalar.
    """
    if hidden.dim() != 2 or target.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (tokens, d_model) and target (tokens,), got {tuple(hidden.shape)} "
                         f"and {tuple(target.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, float(label_smoothing))


__all__ = ["linear_cross_entropy"]
