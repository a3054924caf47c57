"""Text normalisation for G2P (``encdec.g2p``): folding, numbers, word splitting, and how
:func:`pronounce` puts the model's word pronunciations together."""

import pytest

from encdec.g2p import fold, pronounce, spell


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("hello", ["HELLO"]),
        ("Naïve café", ["NAIVE", "CAFE"]),
        ("Straße Æsop", ["STRASSE", "AESOP"]),
        ("x-ray, well-known!", ["X", "RAY", "WELL", "KNOWN"]),
        ("world's 'quoted' dogs'", ["WORLD'S", "QUOTED", "DOGS"]),
        ("42", ["FORTY", "TWO"]),
        ("105", ["ONE", "HUNDRED", "FIVE"]),  # American: no "and"
        ("1,000 and 1,2", ["ONE", "THOUSAND", "AND", "ONE", "TWO"]),  # "1,2" is a list, not a thousand
        ("3.25", ["THREE", "POINT", "TWO", "FIVE"]),
        ("21st 2nd", ["TWENTY", "FIRST", "SECOND"]),
        ("R2D2", ["R", "TWO", "D", "TWO"]),
        ("9" * 16, ["NINE"] * 16),  # an ID, not a quantity: digit by digit
        ("!!! ...", []),
    ],
)
def test_spell(text, words):
    assert spell(text) == (words, set())


def test_spell_reports_letters_it_cannot_read():
    assert spell("Ωmega и x") == (["MEGA", "X"], {"Ω", "И"})


def test_fold_keeps_plain_text():
    text = "Plain ASCII, with punctuation: 'quotes' and 123."
    assert fold(text) == text


class RecordingTranslator:
    """Stands in for the model: a word's 'pronunciation' is its letters, lower case; calls are kept."""

    def __init__(self):
        self.calls = []

    def translate(self, sentences, beam=1, alpha=1.0):
        self.calls.append((list(sentences), beam, alpha))
        return [" ".join(word.lower()) for word in sentences]


def test_pronounce_joins_words_and_decodes_each_distinct_word_once():
    fake = RecordingTranslator()
    outputs, skipped = pronounce(fake, ["x-ray", "ray", "X ray!", "?", "Ωx"], beam=3)
    assert outputs == ["x r a y", "r a y", "x r a y", "", "x"]
    assert skipped == {"Ω"}
    assert fake.calls == [(["RAY", "X"], 3, 0.0)]  # one batch, sorted, no length penalty


def test_pronounce_without_words_does_not_call_the_model():
    fake = RecordingTranslator()
    assert pronounce(fake, ["", "..."]) == (["", ""], set())
    assert fake.calls == []
