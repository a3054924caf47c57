"""Greedy and beam search: properties that must hold for any model."""
import pytest
import torch

import encdec.search as search
from encdec import decode_kernels
from encdec.search import (beam_search, best_continuations, greedy_search, length_penalty, most_probable,
                           stay_in_place)

from encdec import build_model

from conftest import tiny_config, tiny_model


def _sources(cfg, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, cfg.src_vocab_size, (batch, 9), generator=g)
    src[1, 5:] = cfg.pad_id
    src[batch - 1, 2:] = cfg.pad_id
    return src


@pytest.fixture
def model():
    # A model with a strong preference for ending makes outputs of varied lengths.
    m = tiny_model()
    with torch.no_grad():
        m.output.weight[m.cfg.eos_id] *= 3
    return m


def test_beam_size_one_equals_greedy(model):
    src = _sources(model.cfg)
    greedy = greedy_search(model, src)
    beams = beam_search(model, src, beam_size=1, alpha=0.0)
    assert [h[0].tokens for h in beams] == greedy
    assert len({len(g) for g in greedy}) > 1, "outputs of several lengths exercise finished-row removal"


def test_batched_results_equal_one_sentence_at_a_time(model):
    src = _sources(model.cfg)
    batched = beam_search(model, src, beam_size=4, n_best=3)
    greedy = greedy_search(model, src)
    for i in range(src.size(0)):
        row = src[i : i + 1, : int((src[i] != model.cfg.pad_id).sum())]
        alone = beam_search(model, row, beam_size=4, n_best=3)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        assert greedy_search(model, row) == [greedy[i]]


def test_scores_are_normalised_sequence_log_probabilities_in_order(model):
    src = _sources(model.cfg, batch=3)
    alpha = 0.6
    results = beam_search(model, src, beam_size=5, alpha=alpha, n_best=5)
    for i, hyps in enumerate(results):
        assert len(hyps) == 5
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            cfg = model.cfg
            tgt_in = torch.tensor([[cfg.decoder_start_id] + h.tokens])
            tgt_out = torch.tensor(h.tokens + [cfg.eos_id])
            with torch.no_grad():
                log_probs = model(src[i : i + 1], tgt_in)[0]
            total = log_probs.gather(1, tgt_out[:, None]).sum().item()
            assert h.score == pytest.approx(total / length_penalty(len(tgt_out), alpha), abs=1e-4)


def test_length_limit_is_respected(model):
    src = _sources(model.cfg)
    with torch.no_grad():
        model.output.weight[model.cfg.eos_id] = -10 * model.output.weight[model.cfg.eos_id].abs()
    out = greedy_search(model, src, max_len_ratio=0.0, max_len_extra=4)
    assert all(len(o) <= 3 for o in out)
    for hyps in beam_search(model, src, beam_size=3, max_len_ratio=0.0, max_len_extra=4):
        assert len(hyps[0].tokens) <= 3


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
@pytest.mark.parametrize("n_best", [1, 3])
def test_early_stop_returns_what_running_to_beam_size_finished_returns(model, monkeypatch, alpha, n_best):
    src = _sources(model.cfg, batch=24, seed=1)
    steps = []
    logits = search._Step.logits
    monkeypatch.setattr(search._Step, "logits", lambda self, *a: steps.append(1) or logits(self, *a))
    early = beam_search(model, src, beam_size=4, alpha=alpha, n_best=n_best)
    early_steps, steps[:] = len(steps), []
    monkeypatch.setattr(search, "settled", lambda *a: False)
    full = beam_search(model, src, beam_size=4, alpha=alpha, n_best=n_best)
    assert [[h.tokens for h in hyps] for hyps in early] == [[h.tokens for h in hyps] for hyps in full]
    assert [h.score for hyps in early for h in hyps] == pytest.approx([h.score for hyps in full for h in hyps])
    if alpha == 0.0:
        assert early_steps < len(steps), "with no length penalty the best finished hypothesis settles early"


def plain_beam_search(model, src_row, k, alpha, limit):
    """The beam search of ``beam_search``'s docstring, written plainly for one sentence: every
    step re-runs the whole model on every beam (no cache, no batching, no early stop)."""
    cfg, beams, finished = model.cfg, [([], 0.0)], []
    for t in range(1, limit + 1):
        candidates = []
        for tokens, score in beams:
            with torch.no_grad():
                log_probs = model(src_row, torch.tensor([[cfg.decoder_start_id, *tokens]]))[0, -1]
            ids = [cfg.eos_id] if t == limit else range(log_probs.numel())  # at the limit only ending
            candidates += [(score + float(log_probs[v]), tokens, v) for v in ids]
        top = sorted(candidates, key=lambda c: -c[0])[: 2 * k]
        for score, tokens, v in top[:k]:
            if v == cfg.eos_id and len(finished) < k:
                finished.append((tokens, score / length_penalty(t, alpha)))
        beams = [(tokens + [v], score) for score, tokens, v in top if v != cfg.eos_id][:k]
        if len(finished) >= k or not beams:
            break
    return sorted(finished, key=lambda h: -h[1])


@pytest.mark.parametrize("k, vocab", [(1, 19), (3, 19), (5, 19), (8, 6)])  # 8 beams of 6 words: fewer at first
def test_beam_search_equals_the_plain_algorithm(k, vocab):
    model = tiny_model(tgt_vocab_size=vocab)
    with torch.no_grad():
        model.output.weight[model.cfg.eos_id] *= 3
    src = _sources(model.cfg, batch=4)
    limits = search.max_steps(src, model, 0.5, 3).tolist()
    results = beam_search(model, src, beam_size=k, alpha=0.6, max_len_ratio=0.5, max_len_extra=3, n_best=k)
    for i, hyps in enumerate(results):
        row = src[i : i + 1, : int((src[i] != model.cfg.pad_id).sum())]
        expected = plain_beam_search(model, row, k, 0.6, limits[i])
        assert [h.tokens for h in hyps] == [tokens for tokens, _ in expected]
        assert [h.score for h in hyps] == pytest.approx([score for _, score in expected], abs=1e-5)


def test_n_best_larger_than_beam_is_rejected(model):
    with pytest.raises(ValueError, match="n_best"):
        beam_search(model, _sources(model.cfg), beam_size=2, n_best=3)


def test_most_probable_equals_torch_argmax_with_ties_and_infinities():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 1000, generator=g).round()  # many ties: the first maximum wins
    logits[2] = 0.0
    logits[3, 500:] = float("inf")
    logits[4] = float("-inf")
    logits[5, 7] = logits[5].max() + 1
    with torch.inference_mode():  # as decoding calls it
        got = most_probable(logits)
    assert got.dtype == torch.long and torch.equal(got, logits.argmax(-1))
    assert got[2] == 0 and got[3] == 500 and got[5] == 7
    strided = logits[:, ::3]  # not contiguous
    assert torch.equal(most_probable(strided), strided.argmax(-1))


@pytest.mark.parametrize("sentences,beams,vocab,m", [(32, 5, 8000, 10), (6, 5, 32003, 10), (1, 5, 30000, 10),
                                                       (40, 1, 8191, 2), (3, 4, 100, 8)])
@pytest.mark.parametrize("normalizers", ["C kernel", "log-softmax"])
def test_best_continuations_block_ranking_equals_ranking_all(sentences, beams, vocab, m, normalizers, monkeypatch):
    """At decoding sizes (where blocks of tokens are ranked first) the same scores as ranking all
    beams x vocab continuations, best first, at (beam, token) pairs that hold them: with a best
    token past the last whole block, ties across beams, a beam whose tokens are mostly -inf, -inf
    (unused) beams and a beam at the length limit; and below the size where all are ranked. With
    the C kernel's log-normalisers the scores are rounded differently (logit + (score - lse)), so
    they are equal up to float rounding; with the in-place log-softmax, exactly."""
    if normalizers == "log-softmax":
        monkeypatch.setattr(decode_kernels, "row_normalizers", lambda *args: None)
    elif not decode_kernels.available():
        pytest.skip("encdec/_decode_kernels.c is not built here")
    same = torch.equal if normalizers == "log-softmax" else (
        lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-6) and torch.equal(a.isfinite(), b.isfinite()))
    g = torch.Generator().manual_seed(vocab)
    rows, eos = sentences * beams, 2
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[0, -1] = 100.0  # in the vocab % 32 tokens past the blocks (where there are any)
    logits[rows - 1, 5:] = float("-inf")
    scores = -torch.rand(sentences, beams, generator=g) * 5
    if beams > 1:
        logits[1] = logits[0] = logits[0].round()  # ties within a beam and across two beams
        scores[0, 1] = scores[0, 0]
        scores[-1, 1:] = float("-inf")
    at_limit = torch.zeros(rows, dtype=torch.bool)
    at_limit[beams * (sentences // 2): beams * (sentences // 2) + 1] = True
    log_probs = logits.log_softmax(1)
    forced = torch.full_like(log_probs, float("-inf"))
    forced[:, eos] = log_probs[:, eos]
    total = (torch.where(at_limit[:, None], forced, log_probs) + scores.view(-1, 1)).view(sentences, beams, vocab)
    want = total.view(sentences, -1).topk(min(m, beams * vocab), dim=1).values
    got_scores, got_beam, got_token = best_continuations(logits.clone(), scores, m, at_limit, eos)
    assert same(got_scores, want)
    finite = got_scores.isfinite()
    sentence = torch.arange(sentences)[:, None].expand_as(got_beam)
    assert same(total[sentence, got_beam, got_token][finite], got_scores[finite])
    pairs = (got_beam * vocab + got_token).tolist()
    assert all(len(set(row)) == len(row) for row in pairs)  # m distinct continuations per sentence


@pytest.mark.parametrize("m", [2, 6, 40])
def test_best_continuations_equal_ranking_every_log_probability(m):
    """Ranking each beam's best m logits finds a sentence's best m of all beams x vocab continuations,
    with -inf (unused) beams, -inf logits and beams forced to end at the length limit."""
    g = torch.Generator().manual_seed(0)
    sentences, beams, vocab, eos = 7, 3, 11, 2
    logits = torch.randn(sentences * beams, vocab, generator=g) * 3
    logits[7:12, :2] = float("-inf")  # tokens a model rules out (the normaliser must stay finite)
    scores = -torch.rand(sentences, beams, generator=g) * 5
    scores[0, 1:] = float("-inf")
    at_limit = torch.zeros(sentences * beams, dtype=torch.bool)
    at_limit[3:6] = True  # sentence 1 is at its limit
    log_probs = logits.log_softmax(1)
    forced = torch.full_like(log_probs, float("-inf"))
    forced[:, eos] = log_probs[:, eos]
    log_probs = torch.where(at_limit[:, None], forced, log_probs)
    want_scores, want_index = (scores.view(-1, 1) + log_probs).view(sentences, -1).topk(min(m, beams * vocab), dim=1)
    got_scores, got_beam, got_token = best_continuations(logits.clone(), scores, m, at_limit, eos)
    finite = want_scores.isfinite()
    assert torch.equal(finite, got_scores.isfinite())
    torch.testing.assert_close(got_scores[finite], want_scores[finite])
    assert torch.equal(got_beam[finite], (want_index // vocab)[finite])
    assert torch.equal(got_token[finite], (want_index % vocab)[finite])
    assert (got_token[1][got_scores[1].isfinite()] == eos).all()


def test_stay_in_place_keeps_each_parent_s_best_survivor_in_its_slot():
    """A permutation per sentence; the best survivor continuing beam b lands in slot b; the other
    survivors keep their rank order in the free slots."""
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 3, 5):
        parent = torch.randint(0, k, (50, k), generator=g)
        order = stay_in_place(parent)
        assert torch.equal(order.sort(1).values, torch.arange(k).expand(50, k))
        for ps, slots in zip(parent.tolist(), order.tolist()):
            for b in set(ps):
                assert slots[b] == ps.index(b)
            others = [j for j in slots if ps.index(ps[j]) != j]
            assert others == sorted(others)


# Ensembles: several models decoded together with their next-token probabilities averaged.

def _ensemble_log_probs(models, src_row, prefix):
    """The ensemble's next-token log-probabilities after ``prefix``, with full (uncached) forward passes:
    log of the mean of the models' probabilities, ``(tgt_vocab,)``."""
    cfg = models[0].cfg
    tgt_in = torch.tensor([[cfg.decoder_start_id] + prefix])
    with torch.no_grad():
        probs = torch.stack([m(src_row, tgt_in)[0, -1].exp() for m in models])
    return probs.mean(0).log()


def _ensemble(n=2):
    models = [tiny_model()]
    for seed in range(1, n):
        m = build_model(tiny_config(), seed=seed).eval()
        models.append(m)
    with torch.no_grad():
        for m in models:
            m.output.weight[m.cfg.eos_id] *= 3  # outputs of varied lengths
    return models


def test_an_ensemble_of_one_model_is_that_model(model):
    src = _sources(model.cfg)
    assert greedy_search([model], src) == greedy_search(model, src)
    alone, ensemble = beam_search(model, src, beam_size=4, n_best=2), beam_search([model], src, beam_size=4, n_best=2)
    assert [[(h.tokens, h.score) for h in hyps] for hyps in alone] == \
           [[(h.tokens, h.score) for h in hyps] for hyps in ensemble]


def test_an_ensemble_of_copies_decodes_as_one_model(model):
    src = _sources(model.cfg)
    assert greedy_search([model, model, model], src) == greedy_search(model, src)
    alone, ensemble = beam_search(model, src, beam_size=4, n_best=3), beam_search([model, model], src, 4, n_best=3)
    for a, e in zip(alone, ensemble):
        assert [h.tokens for h in a] == [h.tokens for h in e]
        assert [h.score for h in a] == pytest.approx([h.score for h in e], abs=1e-5)


def test_ensemble_greedy_follows_the_averaged_probabilities_step_by_step():
    models = _ensemble(3)
    src = _sources(models[0].cfg)
    outputs = greedy_search(models, src)
    assert outputs != greedy_search(models[0], src), "the other models must change some outputs"
    for i, out in enumerate(outputs):
        row = src[i : i + 1, : int((src[i] != models[0].cfg.pad_id).sum())]
        prefix = []
        while True:  # the written-out ensemble: every step re-run from scratch, no cache, no batch
            token = int(_ensemble_log_probs(models, row, prefix).argmax())
            if token == models[0].cfg.eos_id or len(prefix) + 1 >= int(search.max_steps(row, models, 2.0, 10)[0]):
                break
            prefix.append(token)
        assert out == prefix


def test_ensemble_beam_search_scores_are_the_ensembles_log_probabilities():
    models = _ensemble(2)
    src = _sources(models[0].cfg, batch=4)
    alpha = 0.6
    batched = beam_search(models, src, beam_size=4, alpha=alpha, n_best=3)
    assert [h[0].tokens for h in beam_search(models, src, beam_size=1, alpha=0.0)] == greedy_search(models, src)
    for i, hyps in enumerate(batched):
        row = src[i : i + 1, : int((src[i] != models[0].cfg.pad_id).sum())]
        alone = beam_search(models, row, beam_size=4, alpha=alpha, n_best=3)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        for h in hyps:
            total = sum(float(_ensemble_log_probs(models, row, h.tokens[:t])[token])
                        for t, token in enumerate(h.tokens + [models[0].cfg.eos_id]))
            assert h.score == pytest.approx(total / length_penalty(len(h.tokens) + 1, alpha), abs=1e-4)


def test_ensemble_members_must_share_the_vocabularies(model):
    other = build_model(tiny_config(tgt_vocab_size=20), seed=1).eval()
    src = _sources(model.cfg)
    with pytest.raises(ValueError, match="model 2 has tgt_vocab_size=20 but model 1 has 19"):
        greedy_search([model, other], src)
    with pytest.raises(ValueError, match="at least one model"):
        beam_search([], src)


def test_an_empty_batch_decodes_to_nothing():
    model = tiny_model()
    src = torch.zeros(0, 5, dtype=torch.long)
    assert greedy_search(model, src) == [] and beam_search(model, src, 3) == []
