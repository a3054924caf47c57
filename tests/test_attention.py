"""MultiHeadAttention and the masks: shapes, the two code paths, and torch.nn equality."""
import pytest
import torch
from torch import nn

from encdec import attention
from encdec.attention import KVCache, MultiHeadAttention, padding_mask, subsequent_mask
from encdec.model import DecoderCache


def test_masks_shapes_and_values():
    tokens = torch.tensor([[5, 6, 0], [7, 0, 0]])
    assert padding_mask(tokens, 0).tolist() == [[[[True, True, False]]], [[[True, False, False]]]]
    causal = subsequent_mask(3)
    assert causal.shape == (1, 1, 3, 3)
    assert causal[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # with 2 cached positions, the 2 new queries see the past and themselves only
    assert subsequent_mask(2, past=2)[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]


def test_shapes_self_and_cross():
    attn = MultiHeadAttention(16, 4).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    assert attn(x).shape == (2, 5, 16)
    assert attn(x, memory).shape == (2, 5, 16)
    assert attn(x).dtype == torch.float32


def test_fast_path_equals_explicit_softmax_and_weights_are_distributions():
    attn = MultiHeadAttention(16, 4).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    mask = padding_mask(torch.tensor([[1] * 9, [1] * 6 + [0] * 3]), 0)
    fast = attn(x, memory, mask)
    attn.record_weights = True
    slow = attn(x, memory, mask)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    w = attn.weights
    assert w.shape == (2, 4, 5, 9)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))
    assert torch.all(w[1, :, :, 6:] == 0), "padded keys must get zero weight"


def _copy_from_torch(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        ours.in_proj.weight.copy_(theirs.in_proj_weight)
        ours.in_proj.bias.copy_(theirs.in_proj_bias)
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
        ours.out_proj.bias.copy_(theirs.out_proj.bias)


def test_equals_torch_multihead_attention_with_padding_and_causal_masks():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    ours = MultiHeadAttention(16, 4).eval()
    _copy_from_torch(ours, theirs)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    keep = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()
    # encoder-decoder attention with key padding
    expected, _ = theirs(x, memory, memory, key_padding_mask=~keep, need_weights=False)
    torch.testing.assert_close(ours(x, memory, keep[:, None, None, :]), expected, atol=1e-5, rtol=1e-5)
    # causal self-attention
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    expected, _ = theirs(x, x, x, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(ours(x, mask=subsequent_mask(5)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [2, 16])  # 2 x 4 heads: the fused kernel; 16 x 4: written out (inference)
def test_inference_equals_torch_multihead_attention_on_both_paths(batch, monkeypatch):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    ours = MultiHeadAttention(16, 4).eval()
    _copy_from_torch(ours, theirs)
    x, memory = torch.randn(batch, 5, 16), torch.randn(batch, 7, 16)
    keep = torch.ones(batch, 7, dtype=torch.bool)
    keep[1:, 4:] = False
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        cross, _ = theirs(x, memory, memory, key_padding_mask=~keep, need_weights=False)
        self_attn, _ = theirs(x, x, x, attn_mask=causal, need_weights=False)
    fused_calls = []  # ours only: torch's MultiheadAttention calls the fused kernel too
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: fused_calls.append(1) or fused(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, memory, keep[:, None, None, :]), cross, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x, mask=subsequent_mask(5)), self_attn, atol=1e-5, rtol=1e-5)
        # one decoding step: a single query row per sentence against the cached keys
        cache = KVCache()
        ours(x[:, :4], mask=subsequent_mask(4), cache=cache)
        torch.testing.assert_close(ours(x[:, 4:], cache=cache), self_attn[:, 4:], atol=1e-5, rtol=1e-5)
    assert bool(fused_calls) == (batch * 4 < attention.WRITTEN_OUT_FROM)


@pytest.mark.parametrize("keys", [attention.TRAINING_WRITTEN_OUT_BELOW - 1, attention.TRAINING_WRITTEN_OUT_BELOW])
def test_training_equals_torch_multihead_attention_on_both_paths(keys, monkeypatch):
    """Training on a CPU writes attention out below TRAINING_WRITTEN_OUT_BELOW keys and takes the
    flash kernel from there: outputs and gradients equal torch's MultiheadAttention on both."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True)
    ours = MultiHeadAttention(16, 4)
    _copy_from_torch(ours, theirs)
    x, memory = torch.randn(2, keys, 16), torch.randn(2, keys, 16)
    keep = torch.ones(2, keys, dtype=torch.bool)
    keep[1, keys // 2:] = False
    causal = nn.Transformer.generate_square_subsequent_mask(keys)

    def outputs_and_grads(self_attention, cross_attention, weights):
        inputs = x.clone().requires_grad_()
        out = self_attention(inputs) + cross_attention(inputs)
        (out * torch.linspace(-1, 1, 16)).sum().backward()
        return out.detach(), [inputs.grad, *(w.grad for w in weights)]

    expected, expected_grads = outputs_and_grads(
        lambda x: theirs(x, x, x, attn_mask=causal, need_weights=False)[0],
        lambda x: theirs(x, memory, memory, key_padding_mask=~keep, need_weights=False)[0],
        (theirs.in_proj_weight, theirs.out_proj.weight))
    fused_calls = []  # ours only: torch's MultiheadAttention calls the fused kernel too
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: fused_calls.append(1) or fused(*a, **k))
    out, grads = outputs_and_grads(lambda x: ours(x, mask=subsequent_mask(keys)),
                                   lambda x: ours(x, memory, keep[:, None, None, :]),
                                   (ours.in_proj.weight, ours.out_proj.weight))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert bool(fused_calls) == (keys >= attention.TRAINING_WRITTEN_OUT_BELOW)


def test_cross_attention_cache_computes_keys_once_and_self_cache_grows():
    attn = MultiHeadAttention(16, 4).eval()
    memory = torch.randn(2, 7, 16)
    cache = KVCache()
    query = torch.randn(2, 1, 16)
    first = attn(query, memory, cache=cache)
    k = cache.k.clone()
    # a different memory on later steps is ignored: keys/values were computed once
    torch.testing.assert_close(attn(query, torch.zeros_like(memory), cache=cache), first)
    torch.testing.assert_close(cache.k, k)


@pytest.mark.parametrize("capacity", [0, 2, 8])
def test_self_attention_cache_grows_in_place_or_by_reallocation(capacity):
    attn = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    full = attn(x, mask=subsequent_mask(5))
    cache = KVCache(capacity)
    steps = []
    for step in range(5):
        steps.append(attn(x[:, step : step + 1], cache=cache))
        assert len(cache) == step + 1 and cache.k.shape == (2, 4, step + 1, 4)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-6, rtol=1e-5)
    cache.reorder(torch.tensor([1, 1]))
    torch.testing.assert_close(cache.k[0], cache.k[1])


@pytest.mark.parametrize("capacity", [0, 3, 16])
def test_cache_reorders_like_indexing_through_growth_and_pruning(capacity):
    """Beam search's pattern: append, reorder (with repeats), prune rows. The preallocated cache
    swaps two buffers (and grows past its capacity of 3), or copies only the moved rows in place
    (nothing moves; one row of four moves; two of four swap), and must still equal plain indexing."""
    g = torch.Generator().manual_seed(0)
    cache, k_ref, v_ref, rows = KVCache(capacity), None, None, 4
    for step, index in enumerate([[0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 2, 3], [3, 1, 1, 0], [1, 0, 2, 3],
                                  [2, 0], [1, 1], [0]]):
        k, v = torch.randn(2, rows, 2, 1, 3, generator=g).unbind(0)
        cache.append(k, v)
        k_ref = k if k_ref is None else torch.cat([k_ref, k], 2)
        v_ref = v if v_ref is None else torch.cat([v_ref, v], 2)
        index = torch.tensor(index)
        cache.reorder(index)
        k_ref, v_ref, rows = k_ref[index], v_ref[index], len(index)
        assert torch.equal(cache.k, k_ref) and torch.equal(cache.v, v_ref), f"step {step}"


def test_reorder_after_shared_prefixes_copies_the_rest_and_equals_indexing():
    """Beam search tells the caches how many leading positions each row's new hypothesis shares with
    its old one (same tokens, so the same keys and values): copying only the later positions, with
    one plan for every layer, must equal plain indexing. Each position's keys encode the tokens up
    to it, so a position left uncopied that should have been would show."""
    g = torch.Generator().manual_seed(0)
    rows, heads, layers = 6, 2, 2
    cache = DecoderCache(layers, capacity=8)
    tokens = torch.zeros(rows, 1, dtype=torch.long)
    reference = [None] * layers
    for index in ([0, 0, 1, 3, 3, 5], [1, 0, 2, 3, 4, 4], [0, 1, 2, 3, 4, 5], [2, 2, 2, 5, 3, 4], [1, 1, 0, 3, 4, 5]):
        # Position p holds what token p's prefix gives (beam search's cache: keys of the tokens fed so far).
        code = (tokens * 2 ** torch.arange(tokens.size(1))).sum(1).float()  # one number per prefix
        for layer, kv in enumerate(cache.self_attn):
            k = (code + 100 * layer)[:, None, None, None] + torch.arange(heads * 3.0).view(1, heads, 1, 3)
            kv.append(k, -k)
            reference[layer] = k if reference[layer] is None else torch.cat([reference[layer], k], 2)
        index = torch.tensor(index)
        cache.reorder_self_attention(index, shared=(tokens != tokens[index]).int().argmax(1))
        for layer, kv in enumerate(cache.self_attn):
            reference[layer] = reference[layer][index]
            assert torch.equal(kv.k, reference[layer]) and torch.equal(kv.v, -reference[layer])
        # the next token of each row (two symbols: long shared prefixes)
        tokens = torch.cat([tokens[index], torch.randint(0, 2, (rows, 1), generator=g)], 1)


@pytest.mark.parametrize("training", [True, False])
def test_bf16_autocast_attention_is_close_to_float32_and_stays_bf16(training):
    """Under CPU autocast, training attends in bf16 written out, inference through float32 flash
    attention; both stay close to float32 (output and gradients) and keep the bf16 dtype."""
    attn = MultiHeadAttention(32, 4)
    x = torch.randn(3, 6, 32)
    tokens = torch.tensor([[5] * 6, [5] * 4 + [0] * 2, [5] * 2 + [0] * 4])
    mask = subsequent_mask(6) & padding_mask(tokens, 0)
    outputs, grads = [], []
    for bf16 in (False, True):
        attn.zero_grad()
        inputs = x.clone().requires_grad_(training)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(training):
            out = attn(inputs, mask=mask)
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        outputs.append(out.float())
        if training:
            (out.float() * torch.linspace(-1, 1, 32)).sum().backward()
            grads.append((inputs.grad, attn.in_proj.weight.grad.clone()))
    torch.testing.assert_close(outputs[1], outputs[0], atol=0.05, rtol=0.05)
    for fp32, bf16 in zip(*grads):
        torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("record", [False, True])
def test_beams_sharing_their_sentence_cache_equal_repeated_keys_and_values(record):
    """Beam search keeps each sentence's encoder keys/values once for its beams (folded into query
    positions): the same outputs and weights as repeating them per beam, padding included."""
    attn = MultiHeadAttention(16, 4).eval()
    attn.record_weights = record
    beams, memory = 3, torch.randn(2, 7, 16)
    mask = padding_mask(torch.tensor([[1] * 7, [1] * 4 + [0] * 3]), 0)
    x = torch.randn(2 * beams, 1, 16)
    shared, repeated = KVCache(), KVCache()
    shared.append(*attn.project_keys_values(memory))
    repeated.append(*attn.project_keys_values(memory.repeat_interleave(beams, 0)))
    got = attn(x, memory, mask, cache=shared)
    got_weights = attn.weights
    want = attn(x, memory, mask.repeat_interleave(beams, 0), cache=repeated)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if record:
        assert got_weights.shape == (2 * beams, 4, 1, 7)
        torch.testing.assert_close(got_weights, attn.weights)
        assert not got_weights[beams:, :, :, 4:].any(), "padded source positions get no weight"
    with pytest.raises(ValueError, match="whole number of beams"):
        attn(x[:5], memory, mask, cache=shared)


@pytest.mark.parametrize("queries", [1, 5, 9])
def test_keys_first_scores_equal_queries_first(monkeypatch, queries):
    """Decoding's (K Q^T)^T scores (taken where MKL runs its AVX512 code) equal Q K^T's."""
    g = torch.Generator().manual_seed(queries)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g) for n in (queries, 11, 11))
    mask = torch.rand(3, 1, 1, 11, generator=g) > 0.3
    mask[..., 0] = True
    monkeypatch.setattr(attention.mkl, "enabled", lambda: False)
    assert not attention._keys_first(q)
    ref_out, ref_weights = attention.scaled_dot_product(q, k, v, mask)
    monkeypatch.setattr(attention.mkl, "enabled", lambda: True)
    assert attention._keys_first(q) == (queries <= attention.KEYS_FIRST_UP_TO)
    assert not attention._keys_first(q.clone().requires_grad_())  # training keeps Q K^T
    out, weights = attention.scaled_dot_product(q, k, v, mask)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
