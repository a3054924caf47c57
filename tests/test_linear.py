"""encdec.linear: oneDNN's float32 products in training, against F.linear and plain matrix products."""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encdec import linear as linear_module
from encdec.linear import (Linear, bound_onednn_caches, linear, onednn_available, product, product_tn,
                           uses_onednn)
from encdec.train import TranslationLoss

from conftest import random_batch, tiny_model

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")


def grads_of(fn, x, weight, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    x_, w_, b_ = leaves[0], leaves[1], (leaves[2] if bias is not None else None)
    out = fn(x_, w_, b_)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    return out.detach(), torch.autograd.grad(out, leaves, upstream)


@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24), (2, 0, 24)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed_input", [False, True])
def test_linear_equals_f_linear_with_gradients(products, shape, bias, transposed_input):
    g = torch.Generator().manual_seed(0)
    if transposed_input:  # a strided input
        x = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)
    else:
        x = torch.randn(shape, generator=g)
    weight, b = torch.randn(40, 24, generator=g), (torch.randn(40, generator=g) if bias else None)
    want, want_grads = grads_of(F.linear, x, weight, b)
    got, got_grads = grads_of(linear, x, weight, b)
    assert uses_onednn(x, weight) == (products == "onednn" and x.numel() > 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got_g, want_g in zip(got_grads, want_grads):
        torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-4)


def test_a_slice_of_a_weight_gets_its_gradient_in_place(products):
    """Encoder-decoder attention multiplies by row blocks of one stacked [W_Q; W_K; W_V] parameter."""
    g = torch.Generator().manual_seed(1)
    stacked = torch.randn(3 * 16, 16, generator=g, requires_grad=True)
    bias = torch.randn(3 * 16, generator=g, requires_grad=True)
    x = torch.randn(6, 16, generator=g)
    want = torch.autograd.grad(F.linear(x, stacked, bias).square().sum(), [stacked, bias])
    outs = [linear(x, stacked[:16], bias[:16]), linear(x, stacked[16:], bias[16:])]
    got = torch.autograd.grad(sum(o.square().sum() for o in outs), [stacked, bias])
    for got_g, want_g in zip(got, want):
        torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m, n", [(3, 40), (40, 3), (17, 17)])
def test_products_equal_plain_matrix_products(products, m, n):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, m, generator=g), torch.randn(50, n, generator=g)
    torch.testing.assert_close(product_tn(a, b), a.t() @ b, rtol=1e-5, atol=1e-4)
    weight, bias = torch.randn(n, m, generator=g), torch.randn(n, generator=g)
    torch.testing.assert_close(product(a, weight, bias), a @ weight.t() + bias, rtol=1e-5, atol=1e-4)
    strided = torch.randn(m, n, generator=g).t()  # a weight read transposed, as the loss's input gradient does
    torch.testing.assert_close(product(a, strided), a @ strided.t(), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_other_dtypes_and_autocast_keep_torch_s_products(monkeypatch):
    monkeypatch.setattr(linear_module, "onednn_beats_blas", lambda: True)
    x, weight = torch.randn(4, 8), torch.randn(6, 8)
    assert uses_onednn(x, weight)
    assert not uses_onednn(x.double(), weight.double())
    assert not uses_onednn(x.bfloat16(), weight.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn(x, weight)
        assert linear(x, weight).dtype == torch.bfloat16  # autocast's own bf16 product
    assert linear(x.double(), weight.double()).dtype == torch.float64


def test_linear_is_an_nn_linear_with_the_same_state(products):
    layer = Linear(8, 6)
    plain = nn.Linear(8, 6)
    plain.load_state_dict(layer.state_dict())
    assert isinstance(layer, nn.Linear) and layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)


def test_without_onednn_the_probe_says_no(monkeypatch):
    monkeypatch.setattr(linear_module, "onednn_available", lambda: False)
    assert linear_module.onednn_beats_blas.__wrapped__() is False


@needs_onednn
def test_training_step_gradients_agree_between_the_libraries(monkeypatch):
    """A whole model's loss and every parameter's gradient, through either library's products."""
    results = {}
    for name in ("blas", "onednn"):
        monkeypatch.setattr(linear_module, "onednn_beats_blas", lambda name=name: name == "onednn")
        model = tiny_model().train()
        torch.manual_seed(5)  # the same dropout masks for both
        src, tgt = random_batch(model.cfg, batch=4, src_len=9, tgt_len=7)
        loss = TranslationLoss(model, 0.1)(src, tgt[:, :-1], tgt[:, 1:])
        loss.backward()
        results[name] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (loss_b, grads_b), (loss_o, grads_o) = results["blas"], results["onednn"]
    torch.testing.assert_close(loss_o, loss_b, rtol=1e-5, atol=1e-5)
    assert grads_o.keys() == grads_b.keys() and len(grads_b) > 10
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_o[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bounding_the_caches_keeps_the_user_s_settings(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "300")
    bound_onednn_caches(16)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16" and os.environ["LRU_CACHE_CAPACITY"] == "300"


GROWTH_PROBE = """
import os, sys, torch
if sys.argv[1] == "bounded":
    from encdec.linear import bound_onednn_caches
    bound_onednn_caches()
from encdec.linear import _onednn_product
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
torch.set_num_threads(1)
weight = torch.randn(512, 256)
for rows in range(2000, 2000 + 160):  # a new shape each time, as training batches are
    if rows == 2040:
        start = rss_mb()
    _onednn_product(torch.randn(rows, 256), weight)
print(rss_mb() - start)
"""


@needs_onednn
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident set size from /proc")
def test_bounded_caches_stop_memory_growing_with_each_new_shape():
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    growth = {kind: int(subprocess.run([sys.executable, "-c", GROWTH_PROBE, kind], env=env, check=True,
                                       capture_output=True, text=True).stdout) for kind in ("bounded", "default")}
    assert growth["bounded"] < 40, growth
    assert growth["default"] > growth["bounded"] + 60, growth  # what the bound is for


@needs_onednn
def test_a_slow_spell_during_the_probe_does_not_decide_it(monkeypatch):
    """The machine stalls (50 ms) for three oneDNN calls in a row, as a shared VM can: the rounds
    alternate the libraries, so the verdict is the undisturbed one."""
    undisturbed = linear_module.onednn_beats_blas.__wrapped__()
    product, calls = linear_module._onednn_product, []

    def stalled(*args):
        calls.append(1)
        if 2 <= len(calls) <= 4:  # the first three timed calls, after the warm-up
            time.sleep(0.05)
        return product(*args)
    monkeypatch.setattr(linear_module, "_onednn_product", stalled)
    assert linear_module.onednn_beats_blas.__wrapped__() is undisturbed
    assert len(calls) == 1 + linear_module.PROBE_ROUNDS


def test_the_probe_leaves_the_global_random_stream_alone():
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    linear_module.onednn_beats_blas.__wrapped__()
    torch.testing.assert_close(torch.rand(3), want)
