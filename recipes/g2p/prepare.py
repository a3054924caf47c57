"""Prepare CMUdict grapheme-to-phoneme data: train/dev from the cmudict package, standard test.

Usage::

    python recipes/g2p/prepare.py --out data/g2p

Data
----
* test: ``../shared/data/cmudict/cmudict-0.7b.test`` next to the repository
  (the standard CMUdict 0.7b G2P test split, stress already removed;
  11,994 words, 12,855 lines of which 27 are exact duplicates).
* train/dev: the ``cmudict`` PyPI package's dictionary with stress digits
  removed (39 phonemes), words upper-cased, minus every test word. Words with
  characters outside the test alphabet ``[A-Z']`` (hyphenated compounds such
  as ``ABLE-BODIED``, abbreviations such as ``A.M.``) are skipped: the test set
  never contains them and they would add input symbols the model never sees
  at test time. Pronunciations that become identical once stress is removed
  are merged. Dev is every 20th remaining word in sorted order (5 %),
  deterministic and disjoint from train and test.

Output files (``--out``)
------------------------
* ``train.src`` / ``train.tgt``: one line per (word, pronunciation) pair, so a
  word with two pronunciations gives two lines.
* ``dev.src`` / ``dev.tgt`` and ``test.src`` / ``test.tgt``: one line per word;
  the target is the word's first pronunciation (handy for loss curves).
* ``dev.refs.tsv`` / ``test.refs.tsv``: ``WORD<TAB>PRON1<TAB>PRON2...``, all
  correct pronunciations, same word order as ``*.src``. Score with
  :func:`load_references` and :mod:`encdec.metrics`::

      refs = load_references("data/g2p/test.refs.tsv")
      words = Path("data/g2p/test.src").read_text().split()
      word_error_rate(hyps, [refs[w] for w in words])

The source side is the plain word (``ABADI``), the target side phonemes
separated by single spaces (``AH B AA D IY``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes import write_parallel

Lexicon = dict[str, list[str]]  # WORD -> distinct pronunciations, in first-seen order

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEST_PATH = REPO_ROOT.parent / "shared" / "data" / "cmudict" / "cmudict-0.7b.test"
WORD_PATTERN = re.compile(r"[A-Z']+")
DEV_EVERY = 20


def strip_stress(phonemes: str | Iterable[str]) -> str:
    """Remove ARPAbet stress digits: ``"AH0 B AA1 D IY0"`` -> ``"AH B AA D IY"``."""
    symbols = phonemes.split() if isinstance(phonemes, str) else phonemes
    return " ".join(symbol.rstrip("012") for symbol in symbols)


def _add(lexicon: Lexicon, word: str, pronunciation: str) -> None:
    """Add a pronunciation unless the word already has exactly this one."""
    prons = lexicon.setdefault(word, [])
    if pronunciation not in prons:
        prons.append(pronunciation)


def read_test_set(path: str | Path = DEFAULT_TEST_PATH) -> Lexicon:
    """Read ``WORD  PH ON EMES`` lines into word -> distinct pronunciations."""
    lexicon: Lexicon = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        word, sep, pron = line.partition("  ")
        if not sep or not WORD_PATTERN.fullmatch(word):
            raise ValueError(f"{path}:{number}: expected 'WORD  PHONEMES', got {line!r}")
        _add(lexicon, word, " ".join(pron.split()))
    return lexicon


def package_lexicon(raw: dict[str, list[list[str]]] | None = None) -> tuple[Lexicon, list[str]]:
    """Stress-free, upper-case lexicon from the ``cmudict`` package.

    ``raw`` defaults to ``cmudict.dict()`` (lower-case word -> phoneme lists).
    Returns the lexicon and the sorted list of skipped words (characters
    outside ``[A-Z']``).
    """
    if raw is None:
        import cmudict  # imported lazily: only this recipe needs the package

        raw = cmudict.dict()
    lexicon: Lexicon = {}
    skipped = []
    for word, prons in raw.items():
        upper = word.upper()
        if not WORD_PATTERN.fullmatch(upper):
            skipped.append(upper)
            continue
        for pron in prons:
            _add(lexicon, upper, strip_stress(pron))
    return lexicon, sorted(skipped)


def split_train_dev(
    lexicon: Lexicon, test_words: Iterable[str], dev_every: int = DEV_EVERY
) -> tuple[Lexicon, Lexicon]:
    """Drop test words, then send every ``dev_every``-th word (sorted order) to dev."""
    excluded = set(test_words)
    train: Lexicon = {}
    dev: Lexicon = {}
    for index, word in enumerate(sorted(w for w in lexicon if w not in excluded)):
        target = dev if index % dev_every == dev_every - 1 else train
        target[word] = lexicon[word]
    return train, dev


def write_references(path: str | Path, lexicon: Lexicon) -> None:
    """Write ``WORD<TAB>PRON1<TAB>PRON2...`` lines in the lexicon's order."""
    lines = ["\t".join([word, *prons]) + "\n" for word, prons in lexicon.items()]
    Path(path).write_text("".join(lines), encoding="utf-8")


def load_references(path: str | Path) -> Lexicon:
    """Read a ``*.refs.tsv`` file back into word -> list of correct pronunciations."""
    references: Lexicon = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word, *prons = line.split("\t")
        references[word] = prons
    return references


def write_split(out_dir: Path, split: str, lexicon: Lexicon) -> None:
    """Write one split: all pairs for train; one line per word plus references otherwise.

    Dev also gets ``dev.tsv``, one line per (word, pronunciation): training's
    validation groups lines by source, so every reference counts there too.
    """
    if split == "train":
        pairs = [(word, pron) for word, prons in lexicon.items() for pron in prons]
        write_parallel(out_dir, split, [w for w, _ in pairs], [p for _, p in pairs])
    else:
        write_parallel(out_dir, split, list(lexicon), [prons[0] for prons in lexicon.values()])
        write_references(out_dir / f"{split}.refs.tsv", lexicon)
    if split == "dev":
        rows = "".join(f"{word}\t{pron}\n" for word, prons in lexicon.items() for pron in prons)
        (out_dir / "dev.tsv").write_text(rows, encoding="utf-8")


def prepare(
    out_dir: str | Path, test_path: str | Path = DEFAULT_TEST_PATH, dev_every: int = DEV_EVERY
) -> dict[str, int]:
    """Write train/dev/test files into ``out_dir`` and return their counts."""
    out = Path(out_dir)
    test = read_test_set(test_path)
    lexicon, skipped = package_lexicon()
    train, dev = split_train_dev(lexicon, test, dev_every)
    for split, split_lexicon in (("train", train), ("dev", dev), ("test", test)):
        write_split(out, split, split_lexicon)
    return {
        "package words kept": len(lexicon),
        "package words skipped (outside [A-Z'])": len(skipped),
        "test words removed from package": sum(word in lexicon for word in test),
        "train words": len(train),
        "train pairs": sum(map(len, train.values())),
        "dev words": len(dev),
        "dev pronunciations": sum(map(len, dev.values())),
        "test words": len(test),
        "test pronunciations": sum(map(len, test.values())),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--test", default=str(DEFAULT_TEST_PATH), help="CMUdict 0.7b test file")
    parser.add_argument(
        "--dev-every", type=int, default=DEV_EVERY, help="every N-th word goes to dev"
    )
    args = parser.parse_args(argv)
    for name, value in prepare(args.out, args.test, args.dev_every).items():
        print(f"{name}: {value:,}")


if __name__ == "__main__":
    main()
