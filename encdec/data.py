"""Parallel data: streaming readers, an on-disk binarized corpus, token batching.

Pipeline: ``read_parallel``/``read_tsv`` stream text pairs ->
``BinarizedCorpus.build`` encodes them once into int32 files ->
``BatchIterator`` groups similar lengths into batches of at most
``max_tokens`` and yields padded tensors (``Batch``) epoch after epoch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch

from encdec.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

Pair = tuple[str, str]


def _read_lines(path: str | Path) -> Iterator[str]:
    """Stream the lines of a UTF-8 file without their line terminator.

    Reads bytes and splits on ``\\n`` only, because text mode would also split
    on a stray ``\\r`` inside a line and silently misalign parallel files.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid UTF-8 at byte {exc.start} of the "
                                 "line; re-encode the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # byte-order mark written by some editors
            yield line.rstrip("\r\n")


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> Iterator[Pair]:
    """Stream ``(source, target)`` pairs from two line-aligned UTF-8 files."""
    missing = object()
    for n, (src, tgt) in enumerate(zip_longest(_read_lines(src_path), _read_lines(tgt_path),
                                               fillvalue=missing)):
        if src is missing or tgt is missing:
            short, long = (src_path, tgt_path) if src is missing else (tgt_path, src_path)
            raise ValueError(f"{short} ends after {n} lines but {long} has more; "
                             "parallel files must have the same number of lines")
        yield src, tgt


def read_tsv(path: str | Path) -> Iterator[Pair]:
    """Stream ``(source, target)`` pairs from a UTF-8 file of ``source<TAB>target`` rows."""
    for lineno, line in enumerate(_read_lines(path), 1):
        columns = line.split("\t")
        if len(columns) != 2:
            raise ValueError(f"{path}:{lineno}: expected 2 tab-separated columns, "
                             f"found {len(columns)}")
        yield columns[0], columns[1]


def read_pairs(spec: str | Path | Sequence[str | Path]) -> Iterator[Pair]:
    """Pairs from a TSV path, or from a ``(source_path, target_path)`` sequence."""
    if isinstance(spec, (str, Path)):
        return read_tsv(spec)
    src_path, tgt_path = spec
    return read_parallel(src_path, tgt_path)


class BinarizedCorpus:
    """Token ids of a parallel corpus, memory-mapped from a folder.

    Folder layout: ``src.bin``/``tgt.bin`` (all segments' ids concatenated,
    little-endian int32), ``src_lengths.npy``/``tgt_lengths.npy`` (ids per
    segment) and ``meta.json`` (counts; written last, so its presence marks a
    complete build). Lengths exclude the BOS/EOS that :func:`collate` adds.
    """

    def __init__(self, folder: Path, src_lengths: np.ndarray, tgt_lengths: np.ndarray,
                 meta: dict):
        self.folder = folder
        self.src_lengths = src_lengths  # (N,) int32
        self.tgt_lengths = tgt_lengths  # (N,) int32
        self.n_dropped = meta["n_dropped"]  # pairs over max_len
        self.n_empty = meta["n_empty"]  # pairs with an empty side
        self._src = np.memmap(folder / "src.bin", dtype="<i4", mode="r")
        self._tgt = np.memmap(folder / "tgt.bin", dtype="<i4", mode="r")
        # Start offset of every segment: (N,) int64, so it cannot overflow.
        self._src_offsets = np.cumsum(src_lengths, dtype=np.int64) - src_lengths
        self._tgt_offsets = np.cumsum(tgt_lengths, dtype=np.int64) - tgt_lengths

    @classmethod
    def build(cls, pairs: Iterable[Pair], src_tok: Tokenizer, tgt_tok: Tokenizer,
              out_dir: str | Path, max_len: int | None = None) -> BinarizedCorpus:
        """Encode ``pairs`` (streamed) into ``out_dir`` and return the loaded corpus.

        A pair is dropped, and counted, when either side encodes to no ids
        (``n_empty``) or needs more than ``max_len`` positions once EOS (source)
        or BOS/EOS (target, one of them per sequence) is added (``n_dropped``).
        """
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)  # the folder is incomplete until rebuilt
        src_lengths, tgt_lengths = [], []
        n_dropped = n_empty = 0
        with open(folder / "src.bin", "wb") as src_out, open(folder / "tgt.bin", "wb") as tgt_out:
            for src, tgt in pairs:
                src_ids, tgt_ids = src_tok.encode(src), tgt_tok.encode(tgt)
                if not src_ids or not tgt_ids:
                    n_empty += 1
                elif max_len is not None and max(len(src_ids), len(tgt_ids)) + 1 > max_len:
                    n_dropped += 1
                else:
                    np.asarray(src_ids, dtype="<i4").tofile(src_out)
                    np.asarray(tgt_ids, dtype="<i4").tofile(tgt_out)
                    src_lengths.append(len(src_ids))
                    tgt_lengths.append(len(tgt_ids))
        if not src_lengths:
            raise ValueError(f"no usable segment pairs in {folder}: {n_empty} had an empty side "
                             f"and {n_dropped} were longer than max_len={max_len}")
        np.save(folder / "src_lengths.npy", np.asarray(src_lengths, dtype=np.int32))
        np.save(folder / "tgt_lengths.npy", np.asarray(tgt_lengths, dtype=np.int32))
        meta = {"n_pairs": len(src_lengths), "n_dropped": n_dropped, "n_empty": n_empty,
                "max_len": max_len}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return cls.load(folder)

    @classmethod
    def load(cls, out_dir: str | Path) -> BinarizedCorpus:
        """Open a corpus written by :meth:`build`; ids stay on disk."""
        folder = Path(out_dir)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no complete binarized corpus in {folder} ({meta_path.name} "
                                    "missing); build it with BinarizedCorpus.build(...)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return cls(folder, np.load(folder / "src_lengths.npy"),
                   np.load(folder / "tgt_lengths.npy"), meta)

    def __len__(self) -> int:
        return len(self.src_lengths)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids of pair ``i``: ``(src_ids (S_i,), tgt_ids (T_i,))``, int32, no specials."""
        if not 0 <= i < len(self):
            raise IndexError(f"pair index {i} out of range for {len(self)} pairs")
        s, t = self._src_offsets[i], self._tgt_offsets[i]
        return (self._src[s:s + self.src_lengths[i]], self._tgt[t:t + self.tgt_lengths[i]])


def token_batches(src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int,
                  seed: int, epoch: int, shuffle: bool = True) -> list[np.ndarray]:
    """Split sentence indices into batches of similar length.

    ``src_lengths``/``tgt_lengths`` (N,) are the lengths the model sees (with
    EOS/BOS). A batch costs ``n_sentences * max(longest src, longest tgt)``,
    the padded size, and costs at most ``max_tokens`` unless it holds a single
    sentence that alone exceeds it. Sentences are sorted by (tgt, src) length
    with random tie-breaking, cut greedily, and the batch order is shuffled;
    both random steps depend only on ``(seed, epoch)``. With
    ``shuffle=False`` the order is the plain sorted one.

    Returns a list of (B_k,) int64 index arrays covering ``range(N)`` once.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    rng = np.random.default_rng([seed, epoch])
    keys = (src_lengths, tgt_lengths)  # np.lexsort: the last key is the primary one
    order = np.lexsort((rng.random(len(src_lengths)), *keys) if shuffle else keys)
    longest = np.maximum(src_lengths, tgt_lengths)[order].tolist()
    # One linear pass: the batch grows while its padded cost still fits.
    cuts, start, batch_max = [], 0, 0
    for i, length in enumerate(longest):
        batch_max = max(batch_max, length)
        if i > start and (i - start + 1) * batch_max > max_tokens:
            cuts.append(i)
            start, batch_max = i, length
    batches = np.split(order, cuts)
    if shuffle:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share of one global batch: ``indices[rank::world_size]``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return indices[rank::world_size]


@dataclass
class Batch:
    """Padded tensors for one training step (B sentences).

    ``src`` (B, S): source ids + EOS; ``tgt_in`` (B, T): BOS + target ids
    (decoder input); ``tgt_out`` (B, T): target ids + EOS (what the decoder
    must predict). All int64, right-padded with the pad id; S and T are the
    longest source/target in the batch plus one.
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    n_tgt_tokens: int  # non-pad positions of tgt_out, the loss normaliser

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device),
                     self.n_tgt_tokens)


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """(B, max row length) int64 tensor holding ``rows``, right-padded."""
    out = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, bos_id: int,
            eos_id: int) -> Batch:
    """Pad ``pairs`` of (src_ids, tgt_ids) without specials into a :class:`Batch`."""
    src = [[*map(int, s), eos_id] for s, _ in pairs]
    tgt = [list(map(int, t)) for _, t in pairs]
    tgt_out = _pad([[*t, eos_id] for t in tgt], pad_id)
    return Batch(src=_pad(src, pad_id), tgt_in=_pad([[bos_id, *t] for t in tgt], pad_id),
                 tgt_out=tgt_out, n_tgt_tokens=int((tgt_out != pad_id).sum()))


class BatchIterator:
    """Endless, resumable stream of :class:`Batch` es over a corpus.

    Epoch ``e`` uses ``token_batches(..., seed, e)``; every rank computes the
    same global batches and keeps its :func:`shard`. Global batches with fewer
    sentences than ``world_size`` are skipped on all ranks alike, so no rank
    ever gets an empty batch and ranks stay in step. ``state_dict()`` after k
    batches of an epoch is ``{"epoch": e, "position": k}``; a fresh iterator
    given it via ``load_state_dict`` continues with exactly the same batches.
    """

    def __init__(self, corpus: BinarizedCorpus, max_tokens: int, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        shard(np.arange(1), rank, world_size)  # validates rank/world_size early
        self.corpus, self.max_tokens, self.seed = corpus, max_tokens, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches (index arrays, before sharding) of ``epoch``."""
        # +1: collate adds EOS to the source and BOS or EOS to each target sequence.
        batches = token_batches(self.corpus.src_lengths + 1, self.corpus.tgt_lengths + 1,
                                self.max_tokens, self.seed, epoch, self.shuffle)
        return [b for b in batches if len(b) >= self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batches = self.epoch_batches(self.epoch)
            if not batches:  # would otherwise loop forever without yielding
                raise ValueError(f"no batch holds world_size={self.world_size} sentences; "
                                 "raise max_tokens or use a larger corpus")
            while self.position < len(batches):
                indices = shard(batches[self.position], self.rank, self.world_size)
                # Advance before yielding so state_dict() counts the batch just handed out.
                self.position += 1
                yield collate([self.corpus.pair(i) for i in indices], PAD_ID, BOS_ID, EOS_ID)
            self.epoch, self.position = self.epoch + 1, 0
