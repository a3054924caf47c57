"""Evaluation metrics for sequence-to-sequence outputs.

Every score is a percentage in [0, 100]:

* text metrics (corpus level, computed by sacreBLEU): :func:`bleu`, :func:`chrf`;
* symbol metrics for G2P / transliteration, where an item may have several
  correct references and a hypothesis is compared to its most favourable one:
  :func:`exact_match`, :func:`word_error_rate`, :func:`symbol_error_rate`.

References are always given *per item*: ``references[i]`` is either one
string or a list of strings, all of them correct for ``hypotheses[i]``
(items may have different numbers of references).
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu

__all__ = [
    "bleu",
    "chrf",
    "edit_distance",
    "evaluate_all",
    "exact_match",
    "symbol_error_rate",
    "word_error_rate",
]

References = Sequence[str] | Sequence[Sequence[str]]


def _per_item_references(hypotheses: Sequence[str], references: References) -> list[list[str]]:
    """Validate inputs and return one non-empty list of references per hypothesis."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError("hypotheses and references must be lists, not a single string")
    if len(hypotheses) == 0:
        raise ValueError("no hypotheses given: cannot score an empty corpus")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses but {len(references)} references; "
            "they must be parallel (one entry per item)"
        )
    per_item = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    for index, refs in enumerate(per_item):
        if not refs:
            raise ValueError(f"item {index} has no reference")
    return per_item


def _reference_streams(per_item: list[list[str]]) -> list[list[str | None]]:
    """Transpose per-item references into sacreBLEU's reference streams.

    sacreBLEU wants ``streams[k][i]`` = k-th reference of item i; items with
    fewer references are padded with ``None``, which sacreBLEU skips.
    """
    depth = max(len(refs) for refs in per_item)
    return [[refs[k] if k < len(refs) else None for refs in per_item] for k in range(depth)]


def bleu(hypotheses: Sequence[str], references: References, tokenize: str = "13a") -> float:
    """Corpus BLEU (percent) computed by sacreBLEU.

    ``tokenize`` is a sacreBLEU tokenizer name: ``"13a"`` (the WMT default),
    ``"none"`` (split on whitespace only; equals multi-bleu.perl run on
    untokenized text, as in Carlson et al. 2018), ``"intl"``, ``"char"``, ...
    """
    per_item = _per_item_references(hypotheses, references)
    result = sacrebleu.corpus_bleu(list(hypotheses), _reference_streams(per_item), tokenize=tokenize)
    return float(result.score)


def chrf(hypotheses: Sequence[str], references: References, word_order: int = 0) -> float:
    """Corpus chrF (percent) computed by sacreBLEU; ``word_order=2`` gives chrF++."""
    per_item = _per_item_references(hypotheses, references)
    result = sacrebleu.corpus_chrf(list(hypotheses), _reference_streams(per_item), word_order=word_order)
    return float(result.score)


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences (unit-cost insert/delete/substitute).

    Works on any sequences of hashable items, e.g. lists of phoneme symbols.
    Plain dynamic programming keeping two rows: G2P items are short, so a
    compiled library would not change evaluation time noticeably.
    """
    if len(a) < len(b):
        a, b = b, a  # keep the row as short as possible
    previous = list(range(len(b) + 1))
    for i, item_a in enumerate(a, start=1):
        current = [i]
        for j, item_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete item_a
                    current[j - 1] + 1,  # insert item_b
                    previous[j - 1] + (item_a != item_b),  # substitute or match
                )
            )
        previous = current
    return previous[-1]


def exact_match(hypotheses: Sequence[str], references: References) -> float:
    """Percent of items whose hypothesis equals at least one of its references.

    Strings are compared as whitespace-split symbol sequences, so differences
    in spacing ("AH  B" vs "AH B") do not count.
    """
    per_item = _per_item_references(hypotheses, references)
    hits = sum(
        hyp.split() in [ref.split() for ref in refs] for hyp, refs in zip(hypotheses, per_item)
    )
    return 100.0 * hits / len(per_item)


def word_error_rate(hypotheses: Sequence[str], references: References) -> float:
    """G2P word error rate (percent): items whose hypothesis matches none of its references.

    This is the item-level error used in the G2P literature (a "word" is one
    dictionary entry), not the ASR word error rate; it equals
    ``100 - exact_match``.
    """
    return 100.0 - exact_match(hypotheses, references)


def symbol_error_rate(hypotheses: Sequence[str], references: References) -> float:
    """Symbol (phoneme) error rate in percent, with several references per item.

    For each item the closest reference is chosen, i.e. the one with the
    smallest edit distance to the hypothesis (on whitespace-split symbols).
    Ties are broken in favour of the *longest* reference: like
    :func:`word_error_rate`, the hypothesis is credited with its most
    favourable reference, and the choice does not depend on reference order.
    The result is ``sum(distances) / sum(lengths of the chosen references)``.
    """
    per_item = _per_item_references(hypotheses, references)
    total_distance = 0
    total_length = 0
    for hyp, refs in zip(hypotheses, per_item):
        hyp_symbols = hyp.split()
        distance, negative_length = min(
            (edit_distance(hyp_symbols, ref.split()), -len(ref.split())) for ref in refs
        )
        total_distance += distance
        total_length -= negative_length
    if total_length == 0:
        raise ValueError("all chosen references are empty: symbol error rate is undefined")
    return 100.0 * total_distance / total_length


def evaluate_all(
    hypotheses: Sequence[str], references: References, kind: str = "text"
) -> dict[str, float]:
    """All metrics for one kind of task, as percentages (0-100).

    ``kind="text"`` returns ``{"bleu", "chrf"}`` (sacreBLEU defaults);
    ``kind="symbols"`` returns ``{"wer", "per"}`` (G2P word and phoneme error rates).
    """
    if kind == "text":
        return {"bleu": bleu(hypotheses, references), "chrf": chrf(hypotheses, references)}
    if kind == "symbols":
        return {
            "wer": word_error_rate(hypotheses, references),
            "per": symbol_error_rate(hypotheses, references),
        }
    raise ValueError(f"unknown kind {kind!r}: expected 'text' or 'symbols'")
