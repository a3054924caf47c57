"""Shared fixtures: tiny models that run in milliseconds."""
import encdec  # noqa: F401  first, as users do: MKL's AVX512 path on AMD CPUs (encdec/mkl.py) for every test
import pytest
import torch

from encdec import ModelConfig, build_model
from encdec import linear as linear_module


def tiny_config(**overrides) -> ModelConfig:
    options = dict(src_vocab_size=23, tgt_vocab_size=19, d_model=32, heads=4, ff=64,
                   encoder_layers=2, decoder_layers=2, dropout=0.1, max_len=64)
    options.update(overrides)
    return ModelConfig(**options)


def tiny_model(**overrides):
    return build_model(tiny_config(**overrides), seed=0).eval()


def randomize_norms(model, seed=0):
    """Layer norms with gains and biases away from their initial 1 and 0, so a path that drops
    or swaps one computes something else."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
    return model


def random_batch(cfg: ModelConfig, batch=3, src_len=7, tgt_len=5, seed=0):
    """Random non-special ids (>= 4) for source and target, (batch, len)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, cfg.src_vocab_size, (batch, src_len), generator=g)
    tgt = torch.randint(4, cfg.tgt_vocab_size, (batch, tgt_len), generator=g)
    tgt[:, 0] = cfg.decoder_start_id
    return src, tgt


@pytest.fixture(params=["blas", "onednn"])
def products(request, monkeypatch):
    """Run the test with each library's float32 products (encdec.linear), whatever its probe found here."""
    if request.param == "onednn" and not linear_module.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(linear_module, "onednn_beats_blas", lambda: request.param == "onednn")
    return request.param


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
