"""Tokenizers: text <-> integer ids, with the same special ids for every kind.

Three kinds share the :class:`Tokenizer` interface:

* ``"sentencepiece"`` -- subword units (unigram or BPE) learned by the
  `sentencepiece` library; for translation.
* ``"char"`` -- every Unicode character (spaces included) is one symbol; for
  transliteration and spelling-level tasks.
* ``"symbol"`` -- whitespace-separated symbols such as phonemes (``"AH B IY"``);
  for G2P targets.

Every tokenizer is stored as ONE file at the path the caller chooses: a
sentencepiece model (binary protobuf) or a JSON document
``{"kind": "char" | "symbol", "symbols": [...]}`` in which ``symbols[i]`` has
id ``i``. :func:`load_tokenizer` tells the two apart by content, not by name.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_SYMBOLS = ("<pad>", "<s>", "</s>", "<unk>")  # indexed by the ids above
_SPECIAL_IDS = frozenset(range(len(SPECIAL_SYMBOLS)))


class Tokenizer(ABC):
    """Maps text to ids and back. Ids 0-3 are always ``<pad> <s> </s> <unk>``."""

    kind: str  # name used by train_tokenizer / load_tokenizer

    pad_id = property(lambda self: PAD_ID)
    bos_id = property(lambda self: BOS_ID)
    eos_id = property(lambda self: EOS_ID)
    unk_id = property(lambda self: UNK_ID)

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included; valid ids are ``0 .. vocab_size-1``."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids for ``text``; no BOS/EOS is added (the collator does that)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``; all four special ids (``<unk>`` too) are skipped."""

    @abstractmethod
    def unknown_symbols(self, text: str) -> set[str]:
        """The symbols of ``text`` that :meth:`encode` would map to ``<unk>``."""

    @abstractmethod
    def serialized(self) -> bytes:
        """The tokenizer as the bytes of its file: equal bytes, equal tokenizers."""

    def save(self, path: str | Path) -> None:
        """Write the tokenizer to the single file ``path`` (atomically)."""
        _atomic_write(path, self.serialized())


def _without_specials(ids: Sequence[int]) -> list[int]:
    return [int(i) for i in ids if int(i) not in _SPECIAL_IDS]


def _clean_lines(lines: Iterable[str]) -> Iterator[str]:
    # Callers may pass an open file; its line terminators must not become symbols.
    for line in lines:
        yield line.rstrip("\r\n")


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask (0o644 under 0o022).

    Temporary files (``tempfile.mkstemp``, and safetensors' own writer) are created 0o600;
    files renamed into place from them get this mode, so a model folder is as readable as any
    other file its user writes.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class SentencePieceTokenizer(Tokenizer):
    """Subword tokenizer backed by a trained sentencepiece model."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        """Wrap a serialized sentencepiece model; ``source`` only names it in errors."""
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except RuntimeError as exc:
            raise ValueError(f"{source} is not a valid sentencepiece model ({exc}); "
                             "re-train it with train_tokenizer('sentencepiece', ...)") from None
        pieces = tuple(processor.id_to_piece(i) for i in range(min(4, processor.get_piece_size())))
        # Catches empty files (which parse as an empty model) and models trained
        # elsewhere whose special ids differ from ours.
        if pieces != SPECIAL_SYMBOLS:
            raise ValueError(f"{source}: sentencepiece model must start with pieces "
                             f"{list(SPECIAL_SYMBOLS)}, found {list(pieces)}; "
                             "re-train it with train_tokenizer('sentencepiece', ...)")
        self._sp = processor

    @classmethod
    def train(cls, lines: Iterable[str], path: str | Path, vocab_size: int = 8000,
              model_type: str = "unigram", character_coverage: float = 1.0,
              ) -> SentencePieceTokenizer:
        """Learn a model from ``lines`` (streamed), save it to ``path`` and return it.

        ``vocab_size`` is an upper bound: training runs with
        ``hard_vocab_limit=False``, so a corpus too small to support that many
        pieces yields a smaller vocabulary instead of an error. sentencepiece
        keeps at most 5M sentences (a random sample) in memory while training.
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_clean_lines(lines), model_writer=model,
                vocab_size=vocab_size, model_type=model_type,
                character_coverage=character_coverage, hard_vocab_limit=False,
                pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
                pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", unk_piece="<unk>",
                input_sentence_size=5_000_000, shuffle_input_sentence=True,
                minloglevel=2)
        except RuntimeError as exc:
            message = " ".join(str(exc).split())  # sentencepiece errors span lines
            raise ValueError(f"sentencepiece training for {path} failed: {message}") from None
        tokenizer = cls(model.getvalue(), source=str(path))
        tokenizer.save(path)
        return tokenizer

    @classmethod
    def load(cls, path: str | Path) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes(), source=str(path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(_without_specials(ids))

    def unknown_symbols(self, text: str) -> set[str]:
        """Unknown characters of ``text``, after sentencepiece's normalization.

        sentencepiece merges a run of unknown characters (plus neighbours it
        could not segment) into one ``<unk>`` piece, so each character of such
        a piece is checked against the vocabulary on its own.
        """
        pieces = self._sp.encode(text, out_type=str)
        ids = self._sp.encode(text)
        candidates = {c for piece, i in zip(pieces, ids) if i == UNK_ID for c in piece}
        return {c for c in candidates if self._sp.piece_to_id(c) == UNK_ID}

    def serialized(self) -> bytes:
        return self._sp.serialized_model_proto()


CASES = {"keep": str, "upper": str.upper, "lower": str.lower}  # case folding of char/symbol tokenizers


class VocabTokenizer(Tokenizer):
    """A fixed symbol inventory; subclasses say how text splits into symbols.

    Subclasses define ``kind``, :meth:`split` and :meth:`join` only. ``case="upper"``
    (or ``"lower"``) folds the case of every text before it is split, in training and
    encoding alike, so a model trained on upper-case words (CMUdict) takes "hello" too.
    """

    def __init__(self, symbols: Sequence[str], case: str = "keep"):
        """``symbols[i]`` gets id ``i``; the first four must be the specials."""
        if case not in CASES:
            raise ValueError(f"case must be one of {sorted(CASES)}, got {case!r}")
        self.symbols, self.case = list(symbols), case
        self._ids = {s: i for i, s in enumerate(self.symbols)}
        self._fold = CASES[case]

    @staticmethod
    @abstractmethod
    def split(text: str) -> list[str]:
        """Text -> symbols."""

    @staticmethod
    @abstractmethod
    def join(symbols: list[str]) -> str:
        """Symbols -> text; the inverse of :meth:`split` on normalized text."""

    @classmethod
    def train(cls, lines: Iterable[str], path: str | Path, min_count: int = 1, case: str = "keep") -> VocabTokenizer:
        """Collect the symbols of ``lines`` (case-folded by ``case``) seen at least ``min_count`` times.

        Symbols are ordered by descending frequency (ties by code point), so
        the inventory is deterministic for a given corpus. Saved to ``path``.
        """
        fold = CASES.get(case, str)
        counts = Counter(s for line in _clean_lines(lines) for s in cls.split(fold(line)))
        kept = sorted((s for s, n in counts.items() if n >= min_count and s not in SPECIAL_SYMBOLS),
                      key=lambda s: (-counts[s], s))
        tokenizer = cls([*SPECIAL_SYMBOLS, *kept], case)
        tokenizer.save(path)
        return tokenizer

    @classmethod
    def from_json(cls, document: object, source: str) -> VocabTokenizer:
        """Build from a parsed JSON document, checking it is one of ours."""
        fix = f"re-train it with train_tokenizer({cls.kind!r}, ...)"
        symbols = document.get("symbols") if isinstance(document, dict) else None
        if (not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols)
                or tuple(symbols[:4]) != SPECIAL_SYMBOLS or len(set(symbols)) != len(symbols)):
            raise ValueError(f"{source}: 'symbols' must be a list of distinct strings starting "
                             f"with {list(SPECIAL_SYMBOLS)}; {fix}")
        case = document.get("case", "keep")
        if case not in CASES:
            raise ValueError(f"{source}: 'case' must be one of {sorted(CASES)}, got {case!r}; {fix}")
        return cls(symbols, case)

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(s, UNK_ID) for s in self.split(self._fold(text))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.join([self.symbols[i] for i in _without_specials(ids)])

    def unknown_symbols(self, text: str) -> set[str]:
        return {s for s in self.split(self._fold(text)) if s not in self._ids}

    def serialized(self) -> bytes:
        document = {"kind": self.kind, "symbols": self.symbols}
        if self.case != "keep":
            document["case"] = self.case
        return json.dumps(document, ensure_ascii=False, indent=0).encode("utf-8")


class CharTokenizer(VocabTokenizer):
    """Each Unicode code point, spaces included, is one symbol."""

    kind = "char"
    split = staticmethod(list)
    join = staticmethod("".join)


class SymbolTokenizer(VocabTokenizer):
    """Whitespace-separated symbols (e.g. phonemes); decode joins with one space."""

    kind = "symbol"
    split = staticmethod(str.split)
    join = staticmethod(" ".join)


_KINDS: dict[str, type[Tokenizer]] = {
    cls.kind: cls for cls in (SentencePieceTokenizer, CharTokenizer, SymbolTokenizer)}


def train_tokenizer(kind: str, lines: Iterable[str], path: str | Path, **options) -> Tokenizer:
    """Train a tokenizer of ``kind`` on ``lines``, save it to ``path``, return it.

    ``options`` go to the kind's ``train``: ``vocab_size``, ``model_type``,
    ``character_coverage`` for sentencepiece; ``min_count`` and ``case`` for char/symbol.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {sorted(_KINDS)}")
    return _KINDS[kind].train(lines, path, **options)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer file written by :func:`train_tokenizer` or ``save``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist; "
                                "check the path or create it with train_tokenizer(...)")
    data = path.read_bytes()
    # A serialized sentencepiece model starts with a protobuf tag byte, never '{'.
    if not data.lstrip().startswith(b"{"):
        return SentencePieceTokenizer(data, source=str(path))
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid tokenizer JSON ({exc}); "
                         "re-train it with train_tokenizer(...)") from None
    kind = document.get("kind") if isinstance(document, dict) else None
    if kind not in ("char", "symbol"):
        raise ValueError(f"{path}: JSON tokenizer 'kind' must be 'char' or 'symbol', got "
                         f"{kind!r}; re-train it with train_tokenizer(...)")
    return _KINDS[kind].from_json(document, source=str(path))
