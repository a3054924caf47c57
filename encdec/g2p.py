"""English text -> ARPAbet phonemes with a grapheme-to-phoneme model (e.g. the shipped ``models/g2p-en``).

The model reads one word at a time, spelled as in CMUdict: the letters A-Z and inner apostrophes.
:func:`spell` brings free text to that form, as a user of ``g2p_en`` would expect:

- accents and ligatures folded (``naïve`` -> ``NAIVE``, ``Straße`` -> ``STRASSE``);
- numbers read out in American English with num2words (``42`` -> ``FORTY TWO``, ``1,000`` ->
  ``ONE THOUSAND``, ``3.25`` -> ``THREE POINT TWO FIVE``, ``21st`` -> ``TWENTY FIRST``; more than
  15 digits are read one by one);
- words split at spaces, hyphens and other punctuation (``x-ray`` -> ``X RAY``); apostrophes stay
  inside a word (``world's``) and are dropped at its ends (quotes).

:func:`pronounce` then decodes each distinct word once and joins a text's words' phonemes.
"""
from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from num2words import num2words

if TYPE_CHECKING:
    from .translator import Translator

# Letters that Unicode decomposition does not reduce to A-Z.
_LIGATURES = str.maketrans({"ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O",
                            "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH"})
_ORDINAL = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
_WORD = re.compile(r"[A-Z]+(?:'[A-Z]+)*")


_LONGEST_NAMED = 15  # digits; longer numbers (IDs, phone numbers) are read digit by digit


def _digits(digits: str) -> str:
    return " ".join(num2words(int(d)) for d in digits)


def _number_words(number: str, ordinal: bool = False) -> str:
    """``"1,234.5"`` -> ``" one thousand two hundred thirty-four point five "``."""
    whole, _, fraction = number.replace(",", "").partition(".")
    if len(whole) > _LONGEST_NAMED:
        words = _digits(whole)
    else:
        # num2words says "one hundred and five" (British); American reading, as CMUdict's, drops the "and".
        words = num2words(int(whole), to="ordinal" if ordinal else "cardinal").replace(" and ", " ")
    return f" {words} point {_digits(fraction)} " if fraction else f" {words} "


def fold(text: str) -> str:
    """``text`` with accents and ligatures folded to plain Latin letters (``"Naïve Straße"`` -> ``"Naive Strasse"``)."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_LIGATURES))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def spell(text: str) -> tuple[list[str], set[str]]:
    """The words of ``text`` as the model reads them, in order, and the letters it had to skip.

    ``spell("Naïve x-ray, 42!")`` -> ``(["NAIVE", "X", "RAY", "FORTY", "TWO"], set())``;
    letters outside A-Z even after folding (Greek, Cyrillic, ...) are skipped and returned.
    """
    text = _ORDINAL.sub(lambda m: _number_words(m.group(1), ordinal=True), fold(text))
    text = _NUMBER.sub(lambda m: _number_words(m.group(0)), text).upper()
    skipped = {c for c in text if c.isalpha() and not ("A" <= c <= "Z")}
    return _WORD.findall(text), skipped


def pronounce(translator: Translator, texts: list[str], beam: int = 5,
              alpha: float = 0.0) -> tuple[list[str], set[str]]:
    """ARPAbet phonemes (space-separated) for each text, and the letters skipped in all of them.

    Every distinct word is decoded once, in one batch; a text without any word gives ``""``.
    Beam search runs without a length penalty by default (``alpha=0``): on CMUdict's dev words the
    shipped model scores within three words of alpha 0.6 and 1 (``recipes/g2p/report.py`` measures it).
    """
    spelled, skipped = [], set()
    for text in texts:
        words, missing = spell(text)
        spelled.append(words)
        skipped |= missing
    vocabulary = sorted({word for words in spelled for word in words})
    phonemes = dict(zip(vocabulary, translator.translate(vocabulary, beam=beam, alpha=alpha))) if vocabulary else {}
    return [" ".join(phonemes[word] for word in words) for words in spelled], skipped
