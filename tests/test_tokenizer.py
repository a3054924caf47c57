import json

import pytest

from encdec.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, CharTokenizer,
                              SentencePieceTokenizer, SymbolTokenizer, load_tokenizer,
                              train_tokenizer)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "the early bird catches the worm",
    "where there is smoke there is fire",
    "actions speak louder than words",
] * 20


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_round_trip_and_save_load(tmp_path, model_type):
    path = tmp_path / "sp.model"
    tok = train_tokenizer("sentencepiece", iter(CORPUS), path, vocab_size=60,
                          model_type=model_type)
    assert isinstance(tok, SentencePieceTokenizer)
    assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id] == [0, 1, 2, 3]
    for sentence in CORPUS[:6]:
        ids = tok.encode(sentence)
        assert ids and all(4 <= i < tok.vocab_size for i in ids)  # no specials added
        assert tok.decode(ids) == sentence
    assert tok.decode([BOS_ID, *tok.encode("the dog"), EOS_ID, PAD_ID]) == "the dog"

    loaded = load_tokenizer(path)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.vocab_size == tok.vocab_size
    assert [loaded.encode(s) for s in CORPUS[:6]] == [tok.encode(s) for s in CORPUS[:6]]
    assert list(tmp_path.iterdir()) == [path]  # one file, no temporary left behind


def test_sentencepiece_vocab_size_is_an_upper_bound_on_tiny_corpora(tmp_path):
    tok = train_tokenizer("sentencepiece", ["tiny corpus", "very tiny"], tmp_path / "sp.model",
                          vocab_size=5000)
    assert 4 < tok.vocab_size < 5000
    assert tok.decode(tok.encode("tiny corpus")) == "tiny corpus"


def test_sentencepiece_unknown_characters(tmp_path):
    tok = train_tokenizer("sentencepiece", CORPUS, tmp_path / "sp.model", vocab_size=60)
    assert UNK_ID in tok.encode("the fox é")
    assert tok.unknown_symbols("the fox éQ") == {"é", "Q"}
    assert tok.unknown_symbols("the fox") == set()


@pytest.mark.parametrize("cls, kind, lines, sample", [
    (CharTokenizer, "char", ["abc ab", "cab"], "ba c"),
    (SymbolTokenizer, "symbol", ["AH B IY", "K AE T"], "K  AH\tT"),
])
def test_vocab_tokenizers_round_trip(tmp_path, cls, kind, lines, sample):
    path = tmp_path / "tok.json"
    tok = train_tokenizer(kind, lines, path)
    assert isinstance(tok, cls)
    ids = tok.encode(sample)
    assert UNK_ID not in ids and all(i >= 4 for i in ids)
    assert tok.decode([BOS_ID, *ids, EOS_ID]) == cls.join(cls.split(sample))
    loaded = load_tokenizer(path)
    assert isinstance(loaded, cls)
    assert loaded.encode(sample) == ids
    assert json.loads(path.read_text(encoding="utf-8"))["kind"] == kind


def test_char_tokenizer_keeps_spaces_and_reports_unknowns(tmp_path):
    tok = train_tokenizer("char", ["ab c\n"], tmp_path / "c.json")
    assert tok.vocab_size == 4 + 4  # a, b, c, space; the newline is not a symbol
    assert tok.decode(tok.encode("c ba")) == "c ba"
    assert tok.encode("axb") == [tok.encode("a")[0], UNK_ID, tok.encode("b")[0]]
    assert tok.unknown_symbols("axyb a") == {"x", "y"}


@pytest.mark.parametrize("case, fold", [("upper", str.upper), ("lower", str.lower)])
def test_case_folding_in_training_encoding_and_files(tmp_path, case, fold):
    tok = train_tokenizer("char", ["Hello", "WORLD"], tmp_path / "c.json", case=case)
    assert set(tok.symbols[4:]) == set(fold("HELOWRD")), "training lines are folded before counting"
    assert tok.encode("hElLo") == tok.encode(fold("hello")) and UNK_ID not in tok.encode("world")
    assert tok.unknown_symbols("Hello, World") == {",", " "}
    assert tok.decode(tok.encode("Hello")) == fold("hello")
    loaded = load_tokenizer(tmp_path / "c.json")
    assert loaded.case == case and loaded.encode("wOrLd") == tok.encode("world")
    kept = train_tokenizer("char", ["Hello"], tmp_path / "k.json")
    assert UNK_ID in kept.encode("HELLO") and "case" not in json.loads((tmp_path / "k.json").read_text())


def test_symbol_tokenizer_unknowns_and_min_count(tmp_path):
    tok = train_tokenizer("symbol", ["AH B", "AH K", "AH"], tmp_path / "s.json", min_count=2)
    assert tok.vocab_size == 5  # only AH is seen twice
    assert tok.encode("AH ZH") == [4, UNK_ID]
    assert tok.unknown_symbols("AH ZH B") == {"ZH", "B"}
    assert tok.decode(tok.encode("AH   AH")) == "AH AH"


def test_unknown_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'bytes'.*'char'"):
        train_tokenizer("bytes", ["a"], tmp_path / "t")


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    cases = {
        b"": "sentencepiece",
        b"\x0a\x03garbage": "sentencepiece",
        b'{"kind": "char", "symbols": ["a"]}': "must be a list of distinct strings",
        b'{"kind": "words", "symbols": []}': "'kind' must be 'char' or 'symbol'",
        b'{"kind": "char", ': "not valid tokenizer JSON",
        b'{"kind": "char", "symbols": ["<pad>", "<s>", "</s>", "<unk>"], "case": "title"}': "'case' must be one of",
    }
    for i, (data, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message) as info:
            load_tokenizer(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
