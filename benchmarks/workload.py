"""What every system in ``speed.py`` is given: the model shapes and the synthetic data.

Sentence pairs of realistic lengths with Zipf-distributed token ids, batched the way each system
normally batches, and the decoding sources; the same for encdec, PyTorch, Hugging Face and CTranslate2.
"""
from __future__ import annotations

import numpy as np

CONFIGS = {  # d_model, heads, ff, layers (each side), shared vocabulary
    "small": dict(d=256, heads=4, ff=1024, layers=3, vocab=8000),
    "base": dict(d=512, heads=8, ff=2048, layers=6, vocab=32000),
}
MAX_TOKENS = 4096  # per training batch, padding included
SMOOTHING = 0.1
MAX_NEW = 48  # decoding limit for every system: about 1.5 x the ~30-token sources


def zipf_ids(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    """``n`` token ids in ``[low, high)`` with Zipf-like frequencies (id ``low`` the most frequent)."""
    p = np.arange(1, high - low + 1, dtype=np.float64) ** -1.1
    return rng.choice(np.arange(low, high), size=n, p=p / p.sum())


def make_pairs(n: int, low: int, high: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sentence pairs of 5-60 tokens: log-normal source lengths (median ~20, like news text),
    targets within about +-20% of their source, as between related languages."""
    rng = np.random.default_rng(seed)
    src_len = np.clip(np.round(rng.lognormal(np.log(20), 0.5, n)), 5, 60).astype(int)
    tgt_len = np.clip(np.round(src_len * rng.lognormal(0, 0.15, n)), 5, 60).astype(int)
    return [(zipf_ids(rng, s, low, high), zipf_ids(rng, t, low, high)) for s, t in zip(src_len, tgt_len)]


def random_batches(pairs, max_tokens: int, seed: int = 0) -> list[np.ndarray]:
    """How a plain PyTorch user batches: shuffled, a fixed number of sentences per batch, that number
    chosen so that a batch's padded size, sentences x longest side (+1 for BOS/EOS), is ~max_tokens."""
    rng = np.random.default_rng(seed)
    longest = np.array([max(len(s), len(t)) + 1 for s, t in pairs])
    size = 1
    while np.mean([(size + 1) * rng.choice(longest, size + 1).max() for _ in range(50)]) <= max_tokens:
        size += 1
    order = rng.permutation(len(pairs))
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]


def decode_sources(vocab: int, n: int = 32, seed: int = 1) -> list[list[int]]:
    """``n`` Marian sources of 25-35 tokens ending in the end token (id 0); 1 is <unk>, vocab-1 is <pad>."""
    rng = np.random.default_rng(seed)
    return [[*map(int, zipf_ids(rng, int(rng.integers(24, 35)), 2, vocab - 1)), 0] for _ in range(n)]


def pad_rows(rows: list[list[int]], pad: int):
    import torch
    out = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out
