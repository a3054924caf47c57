"""The training loss: output projection and label-smoothed cross-entropy in one pass.

Written plainly, ``F.cross_entropy(F.linear(h, W, b), y, label_smoothing=eps)`` keeps the
``(tokens, vocab)`` logits alive for the backward pass and walks over them six or seven
times (log-softmax, its backward, the smoothing term, zero-fills, adds). On a CPU those
passes cost more than the projection's matrix product. :func:`linear_cross_entropy` gives
the same loss and the same gradients, but works on chunks of rows: per chunk, the logits
are made, turned into the loss *and* into their gradient (``softmax - target distribution``)
while they sit in cache, and multiplied back into the gradients of ``h``, ``W`` and ``b``.
Nothing of vocabulary size outlives its chunk.

With smoothing ``eps`` over ``V`` classes, the target distribution is ``(1 - eps)`` on the
gold token plus ``eps / V`` everywhere (PyTorch's convention), so per row::

    loss = logsumexp(z) - (1 - eps) * z[y] - (eps / V) * sum(z)
    dloss/dz = softmax(z) - (1 - eps) * onehot(y) - eps / V
"""
from __future__ import annotations

import torch
from torch import Tensor

from .linear import product, product_tn, uses_onednn

# Logits per chunk (32 MiB in float32): rows = this // vocab, at least 64. The chunk's products
# want rows: at the base model's vocabulary of 32,000, 65-row chunks (8 MiB) ran the projection
# and its gradients at ~100 GFLOP/s and 256-262-row chunks at 126-143 on a 2-core AVX2 EPYC (base
# training +17% tokens/s, same process A/B); at 8,000 words 262 and 1,048 rows were even.
# `python benchmarks/loss_chunks.py` times every size.
CHUNK_ELEMENTS = 1 << 23


def _chunk_rows(vocab: int) -> int:
    return max(64, CHUNK_ELEMENTS // vocab)


def _chunk_loss_and_softmax(z: Tensor, target: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
    """Summed loss of float32 logits ``z`` ``(rows, vocab)``, and their softmax, made in ``z``'s memory.

    One exp() serves both. It is clamped at e^-80: below e^-87 a float32 is denormal and x86
    CPUs slow down ~10x on them (torch's own log_softmax and softmax do, on real logits); the
    clamp moves no probability by more than e^-80.
    """
    gold = z.gather(1, target[:, None])
    loss = -(1.0 - smoothing) * gold
    if smoothing:
        loss = loss - (smoothing / z.size(1)) * z.sum(dim=-1, keepdim=True)
    top = z.amax(dim=-1, keepdim=True)
    probs = z.sub_(top).clamp_(min=-80.0).exp_()
    norm = probs.sum(dim=-1, keepdim=True)
    loss = loss + top + norm.log()  # + logsumexp(z)
    return loss.sum(), probs.div_(norm)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss summed over rows; the gradients are computed in the forward pass and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                smoothing: float) -> Tensor:
        vocab, device = weight.size(0), hidden.device
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        want_grad = any(ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if ctx.needs_input_grad[2] else None
        # The products run in autocast's dtype where it is on (bf16), else in the weight's; cast once.
        autocast = torch.is_autocast_enabled(device.type)
        mm_dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
        weight_mm, hidden_mm = weight.to(mm_dtype), hidden.to(mm_dtype)
        rows = max(1, min(_chunk_rows(vocab), hidden.size(0)))
        # One set of chunk buffers, reused: glibc's malloc maps and unmaps blocks this large each
        # time, and the page faults made the logits' copies ~18x slower (bf16 training, 1 thread).
        # (oneDNN's float32 products, encdec.linear, write fresh tensors instead.)
        onednn = uses_onednn(hidden_mm, weight_mm)
        logits_buf = None if onednn else torch.empty(rows, vocab, dtype=torch.float32, device=device)
        low_buf = None if mm_dtype == torch.float32 else torch.empty(rows, vocab, dtype=mm_dtype, device=device)
        gw_buf = torch.empty_like(weight_mm) if grad_weight is not None and low_buf is not None else None
        with torch.autocast(device.type, enabled=False):
            for start in range(0, hidden.size(0), rows):
                h, y = hidden_mm[start:start + rows], target[start:start + rows]
                if onednn:
                    z = product(h, weight_mm)
                elif low_buf is None:
                    z = torch.mm(h, weight_mm.t(), out=logits_buf[:h.size(0)])
                else:
                    low = low_buf[:h.size(0)]
                    torch.mm(h, weight_mm.t(), out=low)
                    z = logits_buf[:h.size(0)].copy_(low)
                if bias is not None:
                    z.add_(bias)
                loss, grad = _chunk_loss_and_softmax(z, y, smoothing)
                total += loss
                if not want_grad:
                    continue
                # dloss/dz = softmax(z) - eps/V - (1-eps) onehot(y), in place
                if smoothing:
                    grad.sub_(smoothing / vocab)
                grad.scatter_add_(1, y[:, None], grad.new_full((y.numel(), 1), smoothing - 1.0))
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
                g = grad if low_buf is None else low.copy_(grad)  # multiply back in the forward's precision
                if grad_hidden is not None:
                    grad_hidden[start:start + rows] = product(g, weight_mm.t())
                if grad_weight is None:
                    continue
                if onednn:
                    grad_weight += product_tn(g, h)
                elif gw_buf is None:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += torch.mm(g.t(), h, out=gw_buf)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        scale = grad_output.float()
        grads = [None if g is None else (g.float() * scale).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
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
