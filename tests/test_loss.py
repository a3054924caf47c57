"""The fused output projection + label-smoothed cross-entropy against PyTorch's unfused one."""
import pytest
import torch
import torch.nn.functional as F

from encdec import loss as loss_module
from encdec.loss import linear_cross_entropy


def reference(hidden, weight, bias, target, smoothing):
    return F.cross_entropy(F.linear(hidden, weight, bias), target, label_smoothing=smoothing, reduction="sum")


def leaves(n=300, d=24, vocab=700, bias=True, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, d, generator=g, dtype=dtype) * scale).requires_grad_()
    weight = torch.randn(vocab, d, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_() if bias else None
    target = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, b, target


def loss_and_grads(fn, hidden, weight, bias, target, smoothing):
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    value = fn(hidden, weight, bias, target, smoothing)
    return value.detach(), torch.autograd.grad(value * 0.37, inputs)  # a scale that backward must apply


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_equals_unfused_loss_and_gradients_across_chunks(monkeypatch, products, bias, smoothing):
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 64)  # 300 rows -> 5 chunks, ragged end
    args = leaves(bias=bias)
    want, want_grads = loss_and_grads(reference, *args, smoothing)
    got, got_grads = loss_and_grads(linear_cross_entropy, *args, smoothing)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits_stay_exact(dtype):
    """Logits spread over hundreds: exp() underflows for most classes, and for the gold class of
    some rows (whose logsumexp then cannot come from the softmax), which must not change the result."""
    args = leaves(scale=30.0, dtype=dtype)
    wide = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in args]
    with torch.no_grad():
        gold_log_prob = F.linear(wide[0], wide[1], wide[2]).log_softmax(-1).gather(1, wide[3][:, None])
    assert (gold_log_prob < -100).any() and (gold_log_prob > -1).any(), "some gold classes underflow, some not"
    want, want_grads = loss_and_grads(reference, *wide, 0.1)
    got, got_grads = loss_and_grads(linear_cross_entropy, *args, 0.1)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-2)
    atol = 1e-4 if dtype == torch.float64 else 2e-3  # PyTorch's own float32 loss misses float64's by 7e-4 here
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=atol)


def test_without_gradients_it_is_the_same_loss():
    hidden, weight, bias, target = leaves()
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, bias, target, 0.1)
        want = reference(hidden, weight, bias, target, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


def test_bf16_autocast_matches_the_autocast_reference():
    args = leaves(n=200, d=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = loss_and_grads(lambda h, w, b, t, s: F.cross_entropy(
            F.linear(h, w, b).float(), t, label_smoothing=s, reduction="sum"), *args, 0.1)
        got, got_grads = loss_and_grads(linear_cross_entropy, *args, 0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-2)
    for g, w, leaf in zip(got_grads, want_grads, args):
        assert g.dtype == leaf.dtype == torch.float32, "gradients come back in the parameters' dtype"
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-2 * float(w.abs().max()))


def test_tied_weights_accumulate_both_gradients():
    """The output layer's weight is also the embedding table: autograd must sum both uses."""
    hidden, weight, _, target = leaves(bias=False)
    ids = torch.randint(0, weight.size(0), (hidden.size(0),))
    got = torch.autograd.grad(linear_cross_entropy(hidden + weight[ids], weight, None, target, 0.1), weight)[0]
    want = torch.autograd.grad(reference(hidden + weight[ids], weight, None, target, 0.1), weight)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_shape_errors_are_clear():
    hidden, weight, bias, target = leaves()
    with pytest.raises(ValueError, match="expected hidden"):
        linear_cross_entropy(hidden[None], weight, bias, target)
