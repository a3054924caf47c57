"""Text in, text out: a model with its tokenizers, batching and decoding options.

>>> import encdec
>>> model = encdec.load("runs/quickstart/best")
>>> model.translate(["42"], beam=5)
['forty-two']
>>> ensemble = encdec.load(["runs/a/best", "runs/b/best"])   # same tokenizers: probabilities averaged
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import load_model_folder
from .inference import check_precision, prepare_for_cpu
from .search import Hypothesis, Models, beam_search, ensemble_members, greedy_search
from .tokenizer import Tokenizer


class InputError(ValueError):
    """An input segment cannot be translated as given (one-line message)."""


def check_decoding_options(beam: int, n_best: int, max_len_ratio: float, batch_tokens: int) -> None:
    """Raise ``ValueError`` naming the first option out of range."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if not 1 <= n_best <= beam:
        raise ValueError(f"n_best must be between 1 and the beam ({beam}), got {n_best}")
    if not max_len_ratio > 0:
        raise ValueError(f"max_len_ratio must be > 0, got {max_len_ratio}")
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")


class Translator:
    """A trained :class:`Transformer` (or an ensemble of them) with its source and target tokenizers.

    ``model`` is one model or a list of models that share the tokenizers: an ensemble, decoded
    with the average of their next-token probabilities. :attr:`model` is the first of them
    (its config gives the limits and special ids, which the ensemble shares).
    """

    def __init__(self, model: Models, src_tok: Tokenizer, tgt_tok: Tokenizer) -> None:
        self.models = [m.eval() for m in ensemble_members(model)]
        self.model, self.src_tok, self.tgt_tok = self.models[0], src_tok, tgt_tok
        self.device = next(self.model.parameters()).device

    def encode(self, sentences: list[str], on_unknown: str = "warn") -> list[list[int]]:
        """Source ids per sentence, end token included.

        Over-long inputs raise :class:`InputError`. Unknown symbols become <unk>
        and, with ``on_unknown="warn"``, are reported once on stderr
        (``"error"`` raises instead, ``"ignore"`` says nothing).
        """
        if on_unknown not in ("warn", "error", "ignore"):
            raise ValueError(f"on_unknown must be 'warn', 'error' or 'ignore', got {on_unknown!r}")
        encoded, unknown = self.encode_checked(sentences, find_unknown=on_unknown != "ignore")
        if unknown:
            message = f"unknown symbols mapped to <unk>: {' '.join(sorted(unknown)[:20])}"
            if on_unknown == "error":
                raise InputError(message)
            print(f"warning: {message}", file=sys.stderr)
        return encoded

    def encode_checked(self, sentences: list[str], find_unknown: bool = True) -> tuple[list[list[int]], set[str]]:
        """Source ids per sentence (end token included) and the set of symbols mapped to <unk>.

        Raises :class:`InputError` naming the first input longer than the model takes.
        """
        if isinstance(sentences, str):  # iterating it would translate each character
            raise TypeError("expected a list of texts, got one str; pass [text]")
        limit = self.model.cfg.max_len - 1
        encoded, unknown = [], set()
        for n, sentence in enumerate(sentences, 1):
            if not isinstance(sentence, str):
                raise TypeError(f"input {n} is {type(sentence).__name__}, not str")
            if find_unknown:
                unknown |= self.src_tok.unknown_symbols(sentence)
            ids = self.src_tok.encode(sentence) + [self.model.cfg.eos_id]
            if len(ids) > limit:
                raise InputError(f"input {n} has {len(ids)} tokens but the model takes at most {limit}; "
                                 "split it into shorter segments")
            encoded.append(ids)
        return encoded, unknown

    def translate(self, sentences: list[str], beam: int = 1, alpha: float = 1.0, max_len_ratio: float = 2.0,
                  max_len_extra: int = 10, batch_tokens: int = 8000, on_unknown: str = "warn") -> list[str]:
        """The best output for each input sentence (greedy when ``beam == 1``)."""
        nbest = self.translate_nbest(sentences, beam, alpha, max_len_ratio, max_len_extra, 1, batch_tokens, on_unknown)
        return [hyps[0][0] for hyps in nbest]

    def translate_nbest(self, sentences: list[str], beam: int = 5, alpha: float = 1.0, max_len_ratio: float = 2.0,
                        max_len_extra: int = 10, n_best: int = 1, batch_tokens: int = 8000,
                        on_unknown: str = "warn") -> list[list[tuple[str, float]]]:
        """The ``n_best`` outputs and their scores for each sentence, best first.

        Sentences are sorted by length and decoded in batches of about
        ``batch_tokens`` source tokens (times the beam), then put back in order.
        """
        return self.translate_encoded(self.encode(sentences, on_unknown), beam, alpha, max_len_ratio, max_len_extra,
                                      n_best, batch_tokens)

    def translate_encoded(self, encoded: list[list[int]], beam: int = 5, alpha: float = 1.0,
                          max_len_ratio: float = 2.0, max_len_extra: int = 10, n_best: int = 1,
                          batch_tokens: int = 8000) -> list[list[tuple[str, float]]]:
        """:meth:`translate_nbest` for sentences already encoded (by :meth:`encode`)."""
        check_decoding_options(beam, n_best, max_len_ratio, batch_tokens)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[list[tuple[str, float]]] = [[] for _ in encoded]
        start = 0
        while start < len(order):
            end = start + 1
            longest = len(encoded[order[start]])
            while end < len(order) and (end - start + 1) * max(longest, len(encoded[order[end]])) * beam <= batch_tokens:
                longest = max(longest, len(encoded[order[end]]))
                end += 1
            rows = order[start:end]
            for i, hyps in zip(rows, self._decode([encoded[i] for i in rows], beam, alpha, max_len_ratio,
                                                  max_len_extra, n_best)):
                results[i] = [(self.tgt_tok.decode(h.tokens), h.score) for h in hyps]
            start = end
        return results

    def _decode(self, ids: list[list[int]], beam: int, alpha: float, max_len_ratio: float, max_len_extra: int,
                n_best: int) -> list[list[Hypothesis]]:
        pad = self.model.cfg.pad_id
        src = torch.full((len(ids), max(map(len, ids))), pad, dtype=torch.long)
        for row, seq in enumerate(ids):
            src[row, : len(seq)] = torch.tensor(seq)
        src = src.to(self.device)
        if beam == 1:
            return [[Hypothesis(tokens, 0.0)] for tokens in greedy_search(self.models, src, max_len_ratio,
                                                                          max_len_extra)]
        return beam_search(self.models, src, beam, alpha, max_len_ratio, max_len_extra, n_best)


def load(folder: str | Path | Sequence[str | Path], device: str = "cpu", precision: str = "fp32") -> Translator:
    """Load a model folder (``runs/NAME/best``, a checkpoint, or an averaged model) for translation,
    or a list of folders: an ensemble of models trained with the same tokenizers.

    On the CPU the model is prepared for fast decoding (:func:`prepare_for_cpu`):
    pre-packed float32 weights; ``precision="bf16"``, packed bf16 weights (fast on CPUs
    with AMX or AVX512-BF16); ``precision="int8"``, int8 dynamic quantization. The last
    two may change outputs slightly.
    """
    check_precision(precision)  # before the (slow) load
    if torch.device(device).type != "cpu" and precision != "fp32":
        raise ValueError(f"{precision} decoding runs on the CPU only; drop --{precision} or use --device cpu")
    folders = [folder] if isinstance(folder, (str, Path)) else list(folder)
    if not folders:
        raise ValueError("no model folder given")
    models, tokenizers, reference = [], None, None
    for path in folders:
        model, src_tok, tgt_tok, _ = load_model_folder(path)
        serialized = (src_tok.serialized(), tgt_tok.serialized())
        if tokenizers is None:
            tokenizers, reference = (src_tok, tgt_tok), serialized
        elif serialized != reference:
            raise ValueError(f"{path}: its tokenizers differ from those of {folders[0]}; an ensemble needs models "
                             "trained with the same tokenizers (copy src.tokenizer and tgt.tokenizer into each "
                             "run folder before training)")
        if torch.device(device).type == "cpu":
            model = prepare_for_cpu(model, precision, inplace=True)  # the loaded float model is not kept
        models.append(model.to(device))
    return Translator(models, *tokenizers)
