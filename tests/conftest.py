"""Shared fixtures: tiny models that run in milliseconds."""
import pytest
import torch

from encdec import ModelConfig, build_model


def tiny_config(**overrides) -> ModelConfig:
    options = dict(src_vocab_size=23, tgt_vocab_size=19, d_model=32, heads=4, ff=64,
                   encoder_layers=2, decoder_layers=2, dropout=0.1, max_len=64)
    options.update(overrides)
    return ModelConfig(**options)


def tiny_model(**overrides):
    return build_model(tiny_config(**overrides), seed=0).eval()


def random_batch(cfg: ModelConfig, batch=3, src_len=7, tgt_len=5, seed=0):
    """Random non-special ids (>= 4) for source and target, (batch, len)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, cfg.src_vocab_size, (batch, src_len), generator=g)
    tgt = torch.randint(4, cfg.tgt_vocab_size, (batch, tgt_len), generator=g)
    tgt[:, 0] = cfg.decoder_start_id
    return src, tgt


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
