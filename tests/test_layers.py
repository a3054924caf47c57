"""Dropout's statistics and gradients; the layers' other behaviour is tested through the model."""
import pytest
import torch

from encdec.layers import Dropout


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_drops_the_right_share_and_scales_the_rest(p):
    x = torch.rand(1000, 1000) + 0.5
    y = Dropout(p).train()(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5, f"dropped {dropped}, wanted {p}"
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    # no pattern across the four 16-bit quarters of one random draw
    for quarter in range(4):
        share = float((y.flatten()[quarter::4] == 0).float().mean())
        assert abs(share - p) < 5 * (p * (1 - p) / (x.numel() / 4)) ** 0.5


def test_gradient_flows_through_kept_elements_only():
    x = torch.randn(8, 16, 32, requires_grad=True)
    y = Dropout(0.25).train()(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, y != 0)
    torch.testing.assert_close(x.grad[y != 0], torch.full_like(x.grad[y != 0], 1 / 0.75))


def test_eval_zero_rate_seeded_and_odd_sizes():
    x = torch.randn(4, 7, 9)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    torch.manual_seed(5)
    a = Dropout(0.2).train()(torch.ones(64, 32))
    torch.manual_seed(5)
    b = Dropout(0.2).train()(torch.ones(64, 32))
    assert torch.equal(a, b), "the same seed gives the same mask (exact resume relies on it)"
    odd = Dropout(0.2).train()(torch.ones(3, 5))  # 15 elements: F.dropout's path
    assert set(odd.unique().tolist()) <= {0.0, 1.25}
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)
