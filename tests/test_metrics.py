"""Tests for encdec.metrics: hand-computed values and cross-checks against sacreBLEU."""

import pytest
import sacrebleu

from encdec.metrics import (
    bleu,
    chrf,
    edit_distance,
    evaluate_all,
    exact_match,
    symbol_error_rate,
    word_error_rate,
)

# Four G2P items, several references each.
WER_HYPS = ["AH B", "T AH M AA T OW", "K AE T", "D  AO G"]
WER_REFS = [
    ["AH B", "AE B"],  # equals the first reference -> correct
    ["T AH M EY T OW", "T AH M AA T OW"],  # equals the second reference -> correct
    ["K AE T S"],  # misses the final S -> error
    ["D AO G"],  # equal once whitespace-split -> correct
]
# By hand: 1 error out of 4 items -> WER = 25 %.


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance(["K", "AE", "T"], ["K", "AE", "T"]) == 0
    assert edit_distance(["AH", "B"], []) == 2
    assert edit_distance([], ["AH"]) == 1
    assert edit_distance(["D", "EY", "T", "AH"], ["D", "EY", "T"]) == 1


def test_word_error_rate_multi_reference():
    assert word_error_rate(WER_HYPS, WER_REFS) == pytest.approx(25.0)
    assert exact_match(WER_HYPS, WER_REFS) == pytest.approx(75.0)


def test_single_string_reference_per_item():
    assert word_error_rate(["AH B", "K AE T"], ["AH B", "K AE"]) == pytest.approx(50.0)


def test_symbol_error_rate_hand_checked():
    hyps = ["K AE T", "D EY T AH", ""]
    refs = [
        ["K AE T S"],  # distance 1 (insert S), length 4
        ["D AE T AH", "D EY T"],  # distance 1 to both: tie -> longest reference, length 4
        ["AH"],  # empty hypothesis: distance 1, length 1
    ]
    # By hand: (1 + 1 + 1) / (4 + 4 + 1) = 3 / 9.  Breaking the tie towards the
    # shorter reference would give 3 / 8 instead.
    assert symbol_error_rate(hyps, refs) == pytest.approx(100.0 * 3 / 9)


def test_symbol_error_rate_prefers_closest_reference():
    # "AH B" is distance 0 from the second reference, so PER is 0 although
    # the first reference differs in every symbol.
    assert symbol_error_rate(["AH B"], [["IY K", "AH B"]]) == 0.0


def test_evaluate_all_symbols_and_text():
    scores = evaluate_all(WER_HYPS, WER_REFS, kind="symbols")
    assert set(scores) == {"wer", "per"}
    assert scores["wer"] == pytest.approx(25.0)
    # Only item 3 has errors: distance 1 over reference lengths 2 + 6 + 4 + 3.
    assert scores["per"] == pytest.approx(100.0 * 1 / 15)
    text = evaluate_all(["the cat sat on the mat"], ["the cat sat on the mat"], kind="text")
    assert set(text) == {"bleu", "chrf"}
    assert text["bleu"] == pytest.approx(100.0) and text["chrf"] == pytest.approx(100.0)


def test_bleu_identical_and_disjoint():
    sentences = ["the cat sat on the mat", "a quick brown fox jumps over the dog"]
    assert bleu(sentences, sentences) == pytest.approx(100.0)
    assert bleu(["one two three four five"], ["six seven eight nine ten"]) == pytest.approx(0.0)


def test_bleu_tokenize_none_differs_on_attached_punctuation():
    hyp, ref = ["Hello, world!"], ["Hello , world !"]
    # 13a splits the punctuation off the hypothesis, so both read "Hello , world !".
    assert bleu(hyp, ref, tokenize="13a") == pytest.approx(100.0)
    # 'none' keeps "Hello," and "world!" as tokens: no unigram matches at all.
    assert bleu(hyp, ref, tokenize="none") == pytest.approx(0.0)


def test_bleu_and_chrf_match_sacrebleu_directly():
    hyps = ["And Jesus wept.", "In the beginning God made the heaven and the earth."]
    refs = ["Jesus wept.", "In the beginning God created the heaven and the earth."]
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert bleu(hyps, refs, tokenize="none") == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score
    )
    assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)


def test_variable_number_of_references_matches_sacrebleu_streams():
    hyps = ["the cat is on the mat", "there is a dog here"]
    per_item = [["the cat sat on the mat", "a cat is on the mat"], ["a dog is here"]]
    streams = [["the cat sat on the mat", "a dog is here"], ["a cat is on the mat", None]]
    assert bleu(hyps, per_item) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    assert chrf(hyps, per_item) == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score)


@pytest.mark.parametrize(
    "metric", [bleu, chrf, exact_match, word_error_rate, symbol_error_rate]
)
def test_input_validation(metric):
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        metric(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="empty"):
        metric([], [])
    with pytest.raises(ValueError, match="no reference"):
        metric(["a"], [[]])


def test_invalid_kind_and_empty_references():
    with pytest.raises(ValueError, match="unknown kind"):
        evaluate_all(["a"], ["a"], kind="speech")
    with pytest.raises(ValueError, match="undefined"):
        symbol_error_rate([""], [""])
